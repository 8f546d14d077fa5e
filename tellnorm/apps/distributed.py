"""Ray-sharded studies: prompts split into shards, one model replica per Ray worker, results merged exactly once.

The core is :class:`ShardPool`: ``ShardPool(model, ray_address=..., workers=...)`` holds one replica of the model
per worker (a Ray actor that loads it once, HF or vLLM through :func:`tellnorm.backends.load_model`), and
``pool.map(fn, items, merge=...)`` splits ``items`` into deterministic shards (:func:`make_shards`: contiguous or
round-robin, each shard keeps its items' original indices), runs ``fn(replica, shard, shard_items, **kwargs)`` on
the workers and merges the shard results in shard order — with tellnorm's mergeable accumulators
(:func:`merge_accumulators`: ``FeatureSums``, ``BoundsSums``, ``SignalSums``, ``ExactThreshold``) or by putting
per-request rows back in original prompt order. ``ray_address=None`` (the default) runs in this process and never
imports Ray; ``"local"`` starts a Ray cluster on this machine with ``num_cpus=workers``; ``"auto"``,
``HOST:PORT`` or ``ray://HOST:PORT`` connect to a running one.

Fault tolerance: a worker that dies mid-shard (process crash, OOM kill, lost node) is replaced by a fresh replica
and its shard is submitted again, at most ``max_retries`` times; a shard's result is kept only the first time it
arrives, so nothing is counted twice. An exception raised by the study itself is not retried (it would fail
again) and comes back as one TellnormError line. Nothing is written until every shard has been merged, and the
study writers (:mod:`tellnorm.io`) write to a temporary file and rename it, so a failed run leaves no output.

Wired studies: norm profiles (:func:`trace_both_modes_sharded`, :func:`run_profile_sharded`), the contrast corpus
and feature sums (:func:`contrast_corpus_sharded`, :func:`collect_feature_sums_sharded`,
:func:`feature_collector` for :func:`tellnorm.studies.features.feature_study`), the technique evaluation's decoding
(:func:`sharded_decoder` for :func:`tellnorm.studies.evaluation.run_evaluate`), the bounds and assumption statistics
(:func:`collect_bounds_sharded`, :func:`bounds_collector` for :func:`tellnorm.studies.bounds.bounds_study`), the
correlation signals (:func:`signal_collector` for :func:`tellnorm.studies.correlation.correlation_study`) and the
suppression study's generations and log-probs (:func:`sharded_intervention` for
:func:`tellnorm.studies.suppression.run_intervene`).
"""

from __future__ import annotations

import functools
import math
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import warnings
from collections import deque
from dataclasses import dataclass, replace
from typing import Any, Callable, Sequence

from tellnorm.errors import TellnormError

RAYLET_START_WAIT_S = 120  # seconds a local cluster's raylet may take to start (Ray's default is 10)
LOCAL = "local"
STRATEGIES = ("contiguous", "round-robin")
INSTALL_HINT = "pip install -e '.[ray]' (or pip install 'ray==2.60.0')"
DEFAULT_CONNECT_TIMEOUT_S = 30.0
DEFAULT_START_TIMEOUT_S = 600.0  # workers must load their replica within this (a large model on a cold node)
SHARD_SAFE_THRESHOLD_MODES = ("calibrated", "fixed")  # τ frozen before decoding: a response is independent of others


# ------------------------------------------------------------------------------------------------------ shards

@dataclass(frozen=True)
class Shard:
    """One shard: its id (position in the merge order) and the original indices of its items."""

    shard_id: int
    indices: tuple[int, ...]


def make_shards(n_items: int, n_shards: int, strategy: str = "contiguous") -> list[Shard]:
    """Deterministic shards of ``range(n_items)``: ``contiguous`` blocks (sizes differ by at most one, larger first)
    or ``round-robin`` (item i goes to shard i mod n_shards, which mixes easy and hard prompts when the list is
    sorted). ``n_shards`` above ``n_items`` is clamped: no shard is empty."""
    if strategy not in STRATEGIES:
        raise TellnormError(f"unknown shard strategy {strategy!r}: choose one of {', '.join(STRATEGIES)}")
    if n_items < 1:
        raise TellnormError("nothing to shard: the prompt list is empty")
    if not isinstance(n_shards, int) or isinstance(n_shards, bool) or n_shards < 1:
        raise TellnormError(f"the number of shards must be a whole number ≥ 1, got {n_shards!r}")
    n_shards = min(n_shards, n_items)
    if strategy == "round-robin":
        return [Shard(k, tuple(range(k, n_items, n_shards))) for k in range(n_shards)]
    size, extra = divmod(n_items, n_shards)
    shards, start = [], 0
    for k in range(n_shards):
        stop = start + size + (k < extra)
        shards.append(Shard(k, tuple(range(start, stop))))
        start = stop
    return shards


# ------------------------------------------------------------------------------------------------------ merges

def merge_accumulators(results: Sequence, shards: Sequence[Shard] = ()) -> Any:
    """``results[0].merge(results[1]).merge(...)`` in shard order (tellnorm's accumulators all have ``.merge``)."""
    return functools.reduce(lambda a, b: a.merge(b), results)


def merge_in_order(results: Sequence[Sequence], shards: Sequence[Shard]) -> list:
    """Per-item results (one per shard item, in the shard's order) back in original order."""
    out: list = [None] * sum(len(s.indices) for s in shards)
    for result, shard in zip(results, shards):
        if len(result) != len(shard.indices):
            raise TellnormError(f"shard {shard.shard_id} returned {len(result)} results for {len(shard.indices)} items")
        for index, value in zip(shard.indices, result):
            out[index] = value
    return out


def concat_frames(results: Sequence, shards: Sequence[Shard] = (), *, sort_by: Sequence[str] = ()):
    """Per-request tables concatenated; with ``sort_by``, a stable sort on those columns (original order)."""
    import pandas as pd

    frame = pd.concat(list(results), ignore_index=True)
    if sort_by:
        frame = frame.sort_values(list(sort_by), kind="stable").reset_index(drop=True)
    return frame


# ------------------------------------------------------------------------------------------------------ replicas

class Replica:
    """What one worker holds: the model, loaded once on first use, and other resources (SAEs) cached by key."""

    def __init__(self, model: Any = "organism", backend: str = "hf", load_options: dict | None = None):
        self.spec, self.backend, self.load_options = model, backend, dict(load_options or {})
        self._model = None
        self._cache: dict = {}

    @property
    def model(self):
        if self._model is None:
            if self.spec is None:
                raise TellnormError("this pool was made without a model (model=None)")
            from tellnorm.backends import load_model

            self._model = load_model(self.spec, backend=self.backend, **self.load_options)
        return self._model

    def resource(self, key, factory: Callable[[], Any]):
        if key not in self._cache:
            self._cache[key] = factory()
        return self._cache[key]

    def saes(self, spec, layers: Sequence[int] | None = None) -> dict:
        """``load_saes(spec, model)`` once per spec; ``layers`` picks a subset."""
        from tellnorm.saes import load_saes

        key = ("saes", spec if isinstance(spec, (str, os.PathLike)) else repr(spec))
        saes = self.resource(key, lambda: load_saes(spec, self.model))
        if layers is None:
            return saes
        missing = [layer for layer in layers if layer not in saes]
        if missing:
            raise TellnormError(f"no SAE for layers {missing}: the SAEs cover layers {sorted(saes)}")
        return {layer: saes[layer] for layer in layers}


class _ReplicaActor:
    """The Ray actor around a :class:`Replica` (wrapped with ``ray.remote`` only when Ray is requested)."""

    def __init__(self, model, backend, load_options):
        self.replica = Replica(model, backend, load_options)

    def warm(self) -> int:
        if self.replica.spec is not None:
            self.replica.model  # noqa: B018 — load now, in parallel on every worker
        return os.getpid()

    def run(self, fn, shard: Shard, items: list, kwargs: dict):
        return fn(self.replica, shard, items, **kwargs)


# ------------------------------------------------------------------------------------------------------ Ray

def import_ray():
    """``ray``, or one TellnormError line saying how to install it."""
    try:
        import ray
    except ImportError:
        raise TellnormError(f"Ray is not installed, and --ray needs it: {INSTALL_HINT}") from None
    return ray


def _split_address(address: str) -> tuple[str, int] | None:
    """(host, port) of ``HOST:PORT`` or ``ray://HOST:PORT``; None for ``auto``."""
    if address == "auto":
        return None
    rest = address[len("ray://"):] if address.startswith("ray://") else address
    host, sep, port = rest.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise TellnormError(f"--ray {address!r}: give 'local' (a cluster on this machine), 'auto', HOST:PORT (a Ray "
                            "head's GCS port, 6379 by default) or ray://HOST:PORT (Ray Client, 10001)")
    return host.strip("[]"), int(port)


def check_reachable(address: str, timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S) -> None:
    """One TellnormError line unless a Ray cluster answers at ``address`` within ``timeout_s``.

    A TCP connect first (a closed port or unreachable host fails at once), then a connection from a child process
    killed at the timeout: ``ray.init`` itself retries a silent address for minutes and would leave this process
    half-connected."""
    target = _split_address(address)
    if target is not None:
        try:
            socket.create_connection(target, timeout=timeout_s).close()
        except OSError as err:
            reason = "timed out" if isinstance(err, socket.timeout) else (err.strerror or type(err).__name__)
            raise TellnormError(f"cannot reach the Ray cluster at {address} ({reason}): start one there with "
                                "`ray start --head`, check host and port, or use --ray local") from None
    probe = ("import sys, ray; ray.init(address=sys.argv[1], log_to_driver=False, logging_level='ERROR'); "
             "print('ok')")
    try:
        done = subprocess.run([sys.executable, "-c", probe, address], capture_output=True, text=True,
                              timeout=timeout_s)
    except subprocess.TimeoutExpired:
        raise TellnormError(f"the Ray cluster at {address} did not accept a connection within {timeout_s:g} s: is it "
                            "a Ray head (GCS port, 6379 by default) with the same Ray version?") from None
    if done.returncode != 0 or "ok" not in done.stdout:
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        reason = lines[-1][:300] if lines else "no reason given"
        raise TellnormError(f"cannot connect to the Ray cluster at {address}: {reason}")


def _worker_died_errors(ray) -> tuple:
    names = ("RayActorError", "ActorDiedError", "ActorUnavailableError", "WorkerCrashedError", "NodeDiedError",
             "OutOfMemoryError", "ObjectLostError", "OwnerDiedError")
    return tuple(getattr(ray.exceptions, n) for n in names if hasattr(ray.exceptions, n))


# ------------------------------------------------------------------------------------------------------ the pool

class ShardPool:
    """Model replicas that run shard functions: in this process (``ray_address=None``) or one per Ray worker.

    ``model``: what :func:`tellnorm.backends.load_model` takes (with Ray: a name or folder, since each worker loads
    its own copy; in process a loaded model is used as is); ``backend`` and ``load_options`` go there too.
    ``workers``: replicas (Ray only). ``num_cpus_per_worker``/``num_gpus_per_worker``: each actor's Ray resources
    (with GPUs, the HF backend loads on ``cuda`` unless ``load_options`` says otherwise). ``max_retries``: how many
    times a shard whose worker died is run again. ``start_timeout_s``: for the replicas to load;
    ``shard_timeout_s``: the longest wait for the next shard to finish (None: no limit). ``runtime_env``: Ray's,
    e.g. to ship the code to a cluster. A process already connected to Ray (a notebook) keeps its cluster."""

    def __init__(self, model: Any = "organism", *, ray_address: str | None = None, workers: int = 1,
                 backend: str = "hf", load_options: dict | None = None, num_cpus_per_worker: float = 1,
                 num_gpus_per_worker: float = 0, max_retries: int = 2,
                 connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S, start_timeout_s: float = DEFAULT_START_TIMEOUT_S,
                 shard_timeout_s: float | None = None, runtime_env: dict | None = None):
        if not isinstance(workers, int) or isinstance(workers, bool) or workers < 1:
            raise TellnormError(f"--workers must be a whole number ≥ 1, got {workers!r}")
        if ray_address is None and workers > 1:
            raise TellnormError(f"--workers {workers} needs Ray: add --ray local (a cluster on this machine) or "
                                "--ray HOST:PORT (a running cluster)")
        if not isinstance(max_retries, int) or max_retries < 0:
            raise TellnormError(f"max_retries must be a whole number ≥ 0, got {max_retries!r}")
        if ray_address is not None and model is not None and not isinstance(model, (str, os.PathLike)):
            raise TellnormError("with Ray every worker loads its own model: pass the model as a name or folder "
                                "(e.g. 'organism'), not a loaded model")
        if ray_address is not None and not str(ray_address).strip():
            raise TellnormError("--ray needs an address: 'local', 'auto', HOST:PORT or ray://HOST:PORT")
        load_options = dict(load_options or {})
        if num_gpus_per_worker and backend == "hf":
            load_options.setdefault("device", "cuda")
        self.model, self.backend, self.load_options = model, backend, load_options
        self.ray_address, self.workers, self.max_retries = ray_address, workers, max_retries
        self.num_cpus_per_worker, self.num_gpus_per_worker = num_cpus_per_worker, num_gpus_per_worker
        self.connect_timeout_s, self.start_timeout_s, self.runtime_env = connect_timeout_s, start_timeout_s, runtime_env
        self.shard_timeout_s = shard_timeout_s
        self.retried: list[tuple[int, int]] = []  # (shard id, attempt) of every shard run again after a worker died
        self._local: Replica | None = None
        self._ray = None
        self._owns_ray = False
        self._ray_temp = None  # the local cluster's session folder (ours to remove)
        self._actors: list = []
        self._actor_class = None
        if ray_address is not None:
            self._connect()

    @property
    def uses_ray(self) -> bool:
        return self.ray_address is not None

    # -- lifecycle

    def _connect(self) -> None:
        ray = import_ray()
        self._ray = ray
        if ray.is_initialized():  # a cluster this process already joined (a notebook, the tests): reuse it
            return
        address = str(self.ray_address)
        if address == LOCAL:
            gpus = math.ceil(self.workers * self.num_gpus_per_worker)
            # Ray keeps its session (sockets, logs) under /tmp/ray unless told otherwise: a folder of ours instead,
            # removed when the pool closes.
            self._ray_temp = tempfile.mkdtemp(prefix="tellnorm-ray-")
            # Ray gives its raylet 10 s to start; a loaded shared machine needs longer (measured: a failed start).
            os.environ.setdefault("RAY_raylet_start_wait_time_s", str(RAYLET_START_WAIT_S))
            try:
                ray.init(num_cpus=max(1, math.ceil(self.workers * self.num_cpus_per_worker)),
                         num_gpus=gpus or None, include_dashboard=False,
                         runtime_env=self.runtime_env, _temp_dir=self._ray_temp)
            except BaseException:
                shutil.rmtree(self._ray_temp, ignore_errors=True)
                self._ray_temp = None
                raise
        else:
            check_reachable(address, self.connect_timeout_s)
            ray.init(address=address, runtime_env=self.runtime_env)
        self._owns_ray = True

    def _new_actor(self):
        ray = self._ray
        if self._actor_class is None:
            self._actor_class = ray.remote(num_cpus=self.num_cpus_per_worker, num_gpus=self.num_gpus_per_worker,
                                           max_restarts=0, max_task_retries=0)(_ReplicaActor)
        return self._actor_class.remote(self.model, self.backend, self.load_options)

    def _start_actors(self, count: int) -> None:
        """Grow to ``count`` replicas and wait until each has loaded its model (one line if they cannot start)."""
        ray = self._ray
        new = [self._new_actor() for _ in range(count - len(self._actors))]
        if not new:
            return
        refs = [actor.warm.remote() for actor in new]
        ready, pending = ray.wait(refs, num_returns=len(refs), timeout=self.start_timeout_s)
        if pending:
            for actor in new:
                ray.kill(actor)
            free = ray.available_resources()
            raise TellnormError(
                f"{len(pending)} of {len(new)} Ray workers did not start within {self.start_timeout_s:g} s: each "
                f"needs {self.num_cpus_per_worker:g} CPU and {self.num_gpus_per_worker:g} GPU, the cluster has "
                f"{free.get('CPU', 0):g} CPU and {free.get('GPU', 0):g} GPU free; use fewer --workers")
        try:
            for ref in ready:
                self._get(ref, "starting a worker")
        except _worker_died_errors(ray) as err:
            for actor in new:
                ray.kill(actor)
            raise TellnormError(f"a Ray worker died while loading {self.model!r} ({type(err).__name__}): check "
                                "its memory and the worker logs") from None
        except BaseException:
            for actor in new:
                ray.kill(actor)
            raise
        self._actors.extend(new)

    def close(self) -> None:
        if self._ray is not None:
            for actor in self._actors:
                self._ray.kill(actor)
            self._actors = []
            if self._owns_ray and self._ray.is_initialized():
                self._ray.shutdown()
            self._owns_ray = False
        if self._ray_temp is not None:
            shutil.rmtree(self._ray_temp, ignore_errors=True)
            self._ray_temp = None
        self._local = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- running

    def replica(self) -> Replica:
        """The in-process replica (no Ray), e.g. for the parts of a study that stay on the driver."""
        if self._local is None:
            from tellnorm.backends.base import ModelAPI

            if isinstance(self.model, ModelAPI):
                self._local = Replica(None)
                self._local._model = self.model
            else:
                self._local = Replica(self.model, self.backend, self.load_options)
        return self._local

    def map(self, fn: Callable, items: Sequence, *, merge: Callable = merge_in_order, strategy: str = "contiguous",
            n_shards: int | None = None, **kwargs):
        """``merge([fn(replica, shard, shard_items, **kwargs) for shard in shards], shards)``, shards in id order.

        In process: one shard of everything. With Ray: ``n_shards`` (default: one per worker) deterministic shards
        over the workers; fewer items than workers use one worker per item (with a warning: the result does not
        depend on the number of workers). ``fn`` must be importable on the workers (a module-level function)."""
        items = list(items)
        if not items:
            raise TellnormError("nothing to run: the prompt list is empty")
        if not self.uses_ray:
            shard = Shard(0, tuple(range(len(items))))
            return merge([fn(self.replica(), shard, items, **kwargs)], [shard])
        if len(items) < self.workers:
            n = len(items)
            warnings.warn(f"only {n} prompt{'s' * (n > 1)} for {self.workers} workers: using {n} worker{'s' * (n > 1)}"
                          " (one prompt each); the merged result does not depend on the number of workers",
                          stacklevel=2)
        shards = make_shards(len(items), n_shards or self.workers, strategy)
        self._start_actors(min(self.workers, len(shards)))
        results = self._run_shards(fn, shards, items, kwargs)
        return merge([results[s.shard_id] for s in shards], shards)

    def _get(self, ref, what: str):
        ray = self._ray
        try:
            return ray.get(ref)
        except ray.exceptions.RayTaskError as err:
            cause = getattr(err, "cause", None)
            if isinstance(cause, TellnormError):
                raise TellnormError(f"{what}: {cause}") from None
            raise

    def _run_shards(self, fn, shards: list[Shard], items: list, kwargs: dict) -> dict:
        """Every shard's result, each exactly once; a shard whose worker died goes to a fresh replica."""
        ray = self._ray
        died = _worker_died_errors(ray)
        pending = deque(shards)
        attempts = {s.shard_id: 0 for s in shards}
        idle = list(range(len(self._actors)))
        in_flight: dict = {}  # ref -> (shard, actor slot)
        results: dict = {}
        try:
            while pending or in_flight:
                while pending and idle:
                    shard, slot = pending.popleft(), idle.pop(0)
                    attempts[shard.shard_id] += 1
                    ref = self._actors[slot].run.remote(fn, shard, [items[i] for i in shard.indices], kwargs)
                    in_flight[ref] = (shard, slot)
                done, _ = ray.wait(list(in_flight), num_returns=1, timeout=self.shard_timeout_s)
                if not done:
                    raise TellnormError(f"no shard finished within {self.shard_timeout_s:g} s (shards "
                                        f"{sorted(s.shard_id for s, _ in in_flight.values())} still running); nothing "
                                        "was written")
                for ref in done:
                    shard, slot = in_flight.pop(ref)
                    try:
                        value = self._get(ref, f"shard {shard.shard_id}")
                    except died as err:
                        attempt = attempts[shard.shard_id]
                        if attempt > self.max_retries:
                            raise TellnormError(
                                f"shard {shard.shard_id} failed: its worker died on all {attempt} attempts "
                                f"({type(err).__name__}); nothing was written") from None
                        warnings.warn(f"the worker running shard {shard.shard_id} died ({type(err).__name__}); "
                                      f"running the shard again on a fresh worker (attempt {attempt + 1})",
                                      stacklevel=3)
                        self.retried.append((shard.shard_id, attempt + 1))
                        ray.kill(self._actors[slot])  # never let the lost attempt report later
                        self._actors[slot] = self._new_actor()
                        pending.appendleft(shard)
                    else:
                        results.setdefault(shard.shard_id, value)  # merged once per shard id
                    idle.append(slot)
        except BaseException:
            # Shards still running are abandoned with their workers (idle ones stay warm for the next map).
            busy = {slot for _, slot in in_flight.values()}
            for slot in busy:
                ray.kill(self._actors[slot])
            self._actors = [actor for slot, actor in enumerate(self._actors) if slot not in busy]
            raise
        return results


def run_sharded(model: Any, items: Sequence, fn: Callable, *, merge: Callable = merge_in_order,
                ray_address: str | None = None, workers: int = 1, strategy: str = "contiguous",
                backend: str = "hf", load_options: dict | None = None, max_retries: int = 2, **kwargs):
    """One-shot :meth:`ShardPool.map` (a pool for one call, closed afterwards)."""
    with ShardPool(model, ray_address=ray_address, workers=workers, backend=backend, load_options=load_options,
                   max_retries=max_retries) as pool:
        return pool.map(fn, items, merge=merge, strategy=strategy, **kwargs)


# ------------------------------------------------------------------------------------------------------ generation

def generate_shard(replica: Replica, shard: Shard, items: list, *, sampling=None, batch_size: int = 16,
                   token_stats: bool = False):
    """:func:`tellnorm.generation.generate` of one shard's ``(request_id, prompt ids)`` items."""
    from tellnorm.generation import generate

    return generate(replica.model, [ids for _, ids in items], sampling, request_ids=[rid for rid, _ in items],
                    batch_size=batch_size, progress=False, token_stats=token_stats)


def generate_sharded(pool: ShardPool, prompts: Sequence[Sequence[int]], sampling=None, *, request_ids=None,
                     batch_size: int = 16, token_stats: bool = False, strategy: str = "contiguous") -> list:
    """:func:`tellnorm.generation.generate` by prompt over the pool's workers, Generations in prompt order.

    Each request keeps its id (default: its index), so sampled requests draw from the same per-request seeds
    (:func:`tellnorm.generation.request_seed`) as in one process."""
    request_ids = list(request_ids) if request_ids is not None else list(range(len(prompts)))
    if len(request_ids) != len(prompts) or len(set(request_ids)) != len(request_ids):
        raise TellnormError("request_ids must be unique, one per prompt")
    return pool.map(generate_shard, [(rid, list(ids)) for rid, ids in zip(request_ids, prompts)], strategy=strategy,
                    sampling=sampling, batch_size=batch_size, token_stats=token_stats)


# ------------------------------------------------------------------------------------------------------ norm profiles

MODES = ("thinking", "non-thinking")


def profile_shard(replica: Replica, shard: Shard, rows: list, *, point: str = "resid_post", max_new_tokens: int = 240,
                  batch_size: int = 40, layers=None):
    """:func:`tellnorm.studies.corpus.trace_both_modes` of one shard (request ids carry the rows' original indices)."""
    from tellnorm.studies.corpus import trace_both_modes

    trace = trace_both_modes(replica.model, rows, point=point, max_new_tokens=max_new_tokens, batch_size=batch_size,
                             layers=layers, progress=False, indices=shard.indices)
    return trace.frame, trace.generations


def merge_traces(results: Sequence, shards: Sequence[Shard]):
    """Shard traces as the one :func:`trace_both_modes` gives: rows by mode, then request id, layer, position;
    generations by mode, then prompt index."""
    import pandas as pd

    from tellnorm.norms import NormTrace

    frame = pd.concat([f for f, _ in results], ignore_index=True)
    rank = frame["mode"].map({m: i for i, m in enumerate(MODES)})
    frame = (frame.assign(_mode_rank=rank).sort_values(["_mode_rank", "request_id", "layer", "position"], kind="stable")
             .drop(columns="_mode_rank").reset_index(drop=True))
    # A shard whose responses lack a column's strings (e.g. no closing to match) holds it as object: infer again.
    for column in frame.columns[frame.dtypes == object]:
        frame[column] = frame[column].infer_objects()
    gens = [g for _, shard_gens in results for g in shard_gens]
    gens.sort(key=lambda g: (MODES.index(g.request_id.split("/")[0]), int(g.request_id.split("/")[1])))
    return NormTrace(frame, gens)


def trace_both_modes_sharded(pool: ShardPool, rows: list[dict], *, point: str = "resid_post",
                             max_new_tokens: int = 240, batch_size: int = 40, layers=None,
                             strategy: str = "contiguous"):
    """:func:`tellnorm.studies.corpus.trace_both_modes` over the pool's workers (by prompt): the same NormTrace."""
    return pool.map(profile_shard, rows, merge=merge_traces, strategy=strategy, point=point,
                    max_new_tokens=max_new_tokens, batch_size=batch_size, layers=layers)


def profile_study_sharded(pool: ShardPool, rows: list[dict], out, *, point: str = "resid_post",
                          max_new_tokens: int = 240, batch_size: int = 40, strategy: str = "contiguous"):
    """:func:`tellnorm.studies.profile.profile_study` with the tracing sharded: files are written only after every shard
    has been merged (each through a temporary file), so a failed shard leaves ``out`` without outputs."""
    from pathlib import Path

    from tellnorm.io import check_output_dir
    from tellnorm.studies.profile import profile_study

    out = check_output_dir(out)
    trace = trace_both_modes_sharded(pool, rows, point=point, max_new_tokens=max_new_tokens, batch_size=batch_size,
                                     strategy=strategy)
    out.mkdir(parents=True, exist_ok=True)
    return profile_study(None, rows, Path(out), point=point, trace=trace)


def run_profile_sharded(cfg, *, ray_address: str | None = LOCAL, workers: int = 2, backend: str = "hf",
                        strategy: str = "contiguous", **pool_options):
    """``tellnorm profile`` (a :class:`tellnorm.studies.profile.ProfileConfig`) with the generation sharded over Ray."""
    from tellnorm.io import check_output_dir
    from tellnorm.studies.corpus import load_prompts, organism_prompt_rows

    rows = load_prompts(cfg.prompts) if cfg.prompts else organism_prompt_rows(cfg.n_per_difficulty)
    out = check_output_dir(cfg.out)  # bad input fails before any cluster starts
    with ShardPool(cfg.model, ray_address=ray_address, workers=workers, backend=backend, **pool_options) as pool:
        trace, profile, _ = profile_study_sharded(pool, rows, out, point=cfg.point, max_new_tokens=cfg.max_new_tokens,
                                                  batch_size=cfg.batch_size, strategy=strategy)
    print(profile.pivot(index="layer", columns="mode", values="mean_norm").round(3).to_string())
    print(f"wrote {out}/norms_per_token.parquet, norm_profile.csv, norm_trend.(html|png), norm_heatmap.(html|png)")
    return trace, profile


# ------------------------------------------------------------------------------------------------------ features

def contrast_shard(replica: Replica, shard: Shard, prompts: list[str], *, max_new_tokens: int = 240):
    from tellnorm.studies.corpus import contrast_corpus

    return contrast_corpus(replica.model, prompts=prompts, max_new_tokens=max_new_tokens, progress=False)


def merge_corpora(results: Sequence, shards: Sequence[Shard]):
    """Shard corpora as one :func:`tellnorm.studies.corpus.contrast_corpus`: every thinking response in prompt order, then
    every non-thinking one."""
    from tellnorm.studies.corpus import ContrastCorpus

    n = sum(len(s.indices) for s in shards)
    slots: dict = {}
    for corpus, shard in zip(results, shards):
        k = len(shard.indices)
        for j in range(2 * k):
            mode_rank, local = divmod(j, k)
            slots[mode_rank * n + shard.indices[local]] = (corpus.sequences[j], corpus.n_prompt[j], corpus.modes[j],
                                                           corpus.labels[j])
    columns = list(zip(*(slots[i] for i in range(2 * n))))
    return ContrastCorpus(*(list(c) for c in columns))


def contrast_corpus_sharded(pool: ShardPool, n_per_difficulty: int = 10, *, max_new_tokens: int = 240,
                            prompts: list[str] | None = None, strategy: str = "contiguous"):
    """:func:`tellnorm.studies.corpus.contrast_corpus` (validation problems, both modes, greedy) sharded by prompt."""
    if prompts is None:
        from tellnorm.organism import task

        prompts = [p.prompt_text() for p in task.validation_split(n_per_difficulty).problems]
    return pool.map(contrast_shard, prompts, merge=merge_corpora, strategy=strategy, max_new_tokens=max_new_tokens)


def feature_sums_shard(replica: Replica, shard: Shard, items: list, *, saes, layers=None,
                       fold_decoder_norm: bool = False, batch_size: int = 16):
    """FeatureSums of one shard's ``(request_id, sequence, bucket masks)`` items."""
    from tellnorm.features import collect_feature_sums

    rids = [rid for rid, _, _ in items]
    return collect_feature_sums(replica.model, replica.saes(saes, layers), [seq for _, seq, _ in items],
                                {rid: masks for rid, _, masks in items}, request_ids=rids,
                                fold_decoder_norm=fold_decoder_norm, batch_size=batch_size)


def collect_feature_sums_sharded(pool: ShardPool, saes, sequences, bucket_masks, *, request_ids=None, layers=None,
                                 fold_decoder_norm: bool = False, batch_size: int = 16,
                                 strategy: str = "contiguous"):
    """:func:`tellnorm.features.collect_feature_sums` sharded by sequence, merged with ``FeatureSums.merge``.

    ``saes``: an SAE spec each worker loads once (``'organism'``, a folder, ...); ``layers``: a subset of them."""
    request_ids = list(request_ids) if request_ids is not None else list(range(len(sequences)))
    items = [(rid, list(seq), bucket_masks.get(rid, {})) for rid, seq in zip(request_ids, sequences)]
    return pool.map(feature_sums_shard, items, merge=merge_accumulators, strategy=strategy, saes=saes, layers=layers,
                    fold_decoder_norm=fold_decoder_norm, batch_size=batch_size)


def feature_collector(pool: ShardPool, saes_spec, *, strategy: str = "contiguous") -> Callable:
    """A stand-in for :func:`collect_feature_sums` (``feature_study(..., collect=...)``) that shards the sums; the
    driver's own SAE dict only says which layers (the workers load ``saes_spec`` themselves)."""

    def collect(model, saes, sequences, bucket_masks, *, request_ids=None, fold_decoder_norm=False, batch_size=16):
        return collect_feature_sums_sharded(pool, saes_spec, sequences, bucket_masks, request_ids=request_ids,
                                            layers=sorted(saes), fold_decoder_norm=fold_decoder_norm,
                                            batch_size=batch_size, strategy=strategy)

    return collect


# ------------------------------------------------------------------------------------------------------ evaluation

def decode_shard(replica: Replica, shard: Shard, item_indices: list[int], *, st, name: str, control=None, **options):
    """:func:`tellnorm.studies.evaluation.decode` of the shard's items on the worker's model (edits built there)."""
    from tellnorm.studies.evaluation import control_edits, decode

    st = replace(st, model=replica.model, decoder=None)
    edits = control_edits(st, control[1], control[0]) if control is not None else None
    return decode(st, name, edits=edits, progress=False, item_indices=item_indices, **options)


def merge_runs(results: Sequence, shards: Sequence[Shard]):
    """Shard runs as one: responses in item/sample order, norms per request, token statistics joined."""
    import pandas as pd

    from tellnorm.studies.evaluation import Run

    first = results[0]
    responses = concat_frames([r.responses for r in results], sort_by=("item", "sample"))
    for column in responses.columns[responses.dtypes == object]:  # e.g. a shard whose answers were all None
        responses[column] = responses[column].infer_objects()
    norms = None
    if first.norms is not None:
        norms = concat_frames([r.norms for r in results])
        order = {rid: i for i, rid in enumerate(responses.request_id)}
        norms = (norms.assign(_order=norms.request_id.map(order)).sort_values(["_order", "layer", "position"],
                                                                               kind="stable")
                 .drop(columns="_order").reset_index(drop=True))
    stats = {rid: value for r in results for rid, value in r.token_stats.items()}
    return Run(first.name, first.n_samples, first.greedy, responses, max(r.wall_s for r in results), norms, stats)


def check_evaluation_shardable(cfg) -> None:
    """One TellnormError line, before any work, if ``cfg`` (an EvaluateConfig) cannot be sharded exactly."""
    uses_edits = bool(cfg.techniques or cfg.sampled_techniques or cfg.sensitivity)  # controls follow techniques
    if uses_edits and cfg.threshold_mode not in SHARD_SAFE_THRESHOLD_MODES:
        raise TellnormError(f"threshold mode {cfg.threshold_mode!r} tracks τ over the run's own tokens, so a "
                            "response would depend on its shard: with --ray use --threshold-mode calibrated or fixed")


def sharded_decoder(pool: ShardPool, cfg=None, *, strategy: str = "contiguous") -> Callable:
    """A ``decoder`` for :func:`tellnorm.studies.evaluation.run_evaluate` that decodes the items on the pool's workers.

    Per-response results (answers, firing counters, norms, token statistics) are independent of which other
    responses share a batch as long as τ is frozen before decoding (threshold modes calibrated and fixed); the
    modes that track τ over the run's own tokens are refused (up front when ``cfg`` is given). Edits without a
    recipe for the workers run here. Calibration (setup) stays on the driver."""
    if cfg is not None:
        check_evaluation_shardable(cfg)

    def decoder(st, name, *, techniques=(), n_samples=1, edits=None, trace=False, thresholds=None, alrr=None,
                erss=None, progress=True):
        from tellnorm.studies.evaluation import decode

        edits_here = edits is not None and getattr(edits, "control", None) is None
        if edits_here:
            local = replace(st, decoder=None)
            return decode(local, name, techniques=techniques, n_samples=n_samples, edits=edits, trace=trace,
                          thresholds=thresholds, alrr=alrr, erss=erss, progress=progress)
        if techniques or edits is not None:
            check_evaluation_shardable(st.cfg)
        lite = replace(st, model=None, decoder=None, calibration={},
                       task=replace(st.task, calibration_prompts=[]))
        start = time.perf_counter()
        run = pool.map(decode_shard, list(range(len(st.task.items))), merge=merge_runs, strategy=strategy,
                       st=lite, name=name, control=getattr(edits, "control", None), techniques=techniques,
                       n_samples=n_samples, trace=trace, thresholds=thresholds, alrr=alrr, erss=erss)
        run.wall_s = time.perf_counter() - start
        return run

    return decoder


# ------------------------------------------------------------------------------------------------------ bounds

def bounds_shard(replica: Replica, shard: Shard, items: list, *, saes, layers=None, reasoning, input_scale=1.0,
                 batch_size: int = 16):
    """:func:`tellnorm.bounds.collect_bounds` of one shard's ``(request_id, sequence, masks, capture)`` items."""
    from tellnorm.bounds import collect_bounds

    capture = {rid: positions for rid, _, _, positions in items if positions}
    return collect_bounds(replica.model, replica.saes(saes, layers), [seq for _, seq, _, _ in items],
                          {rid: masks for rid, _, masks, _ in items}, reasoning, capture=capture,
                          request_ids=[rid for rid, _, _, _ in items], input_scale=input_scale, batch_size=batch_size)


def collect_bounds_sharded(pool: ShardPool, saes, sequences, masks, reasoning, *, capture=None, request_ids=None,
                           layers=None, input_scale: float = 1.0, batch_size: int = 16, strategy: str = "contiguous"):
    """:func:`tellnorm.bounds.collect_bounds` sharded by sequence, merged with ``BoundsSums.merge``.

    Counts (tokens, checked and active pairs, violations of the three bounds, histogram bins, fire counts) are
    those of one process whenever every sequence's activations are (always at batch size 1; otherwise they can
    differ by float32 batch padding, ~1e-6 relative); float64 sums differ only by the order of additions; the
    scatter sample is chosen by a per-token hash and the paired states are keyed by request, so both are the same.
    ``saes``: an SAE spec each worker loads once; ``layers``: the subset to check."""
    request_ids = list(request_ids) if request_ids is not None else list(range(len(sequences)))
    capture = capture or {}
    items = [(rid, list(seq), masks.get(rid, {}), set(capture.get(rid, ())))
             for rid, seq in zip(request_ids, sequences)]
    return pool.map(bounds_shard, items, merge=merge_accumulators, strategy=strategy, saes=saes, layers=layers,
                    reasoning={layer: list(map(int, r)) for layer, r in reasoning.items()}, input_scale=input_scale,
                    batch_size=batch_size)


def bounds_collector(pool: ShardPool, saes_spec, *, strategy: str = "contiguous") -> Callable:
    """A stand-in for :func:`tellnorm.bounds.collect_bounds` (``bounds_study(..., collect=...)``) that shards the
    sums; the driver's SAE dict only says which layers (the workers load ``saes_spec`` themselves)."""

    def collect(model, saes, sequences, masks, reasoning, *, capture=None, request_ids=None, input_scale=1.0,
                batch_size=16):
        return collect_bounds_sharded(pool, saes_spec, sequences, masks, reasoning, capture=capture,
                                      request_ids=request_ids, layers=sorted(saes), input_scale=input_scale,
                                      batch_size=batch_size, strategy=strategy)

    return collect


# ------------------------------------------------------------------------------------------------------ correlation

@dataclass
class SignalResult:
    """What :func:`tellnorm.studies.correlation.correlation_study` reads from :func:`tellnorm.signals.collect_signals`'s
    observer: the per-problem sums, the layers whose attention pattern was seen, the layers."""

    sums: Any
    attention_seen: set
    layers: list


def signals_shard(replica: Replica, shard: Shard, items: list, *, saes, layers=None, reasoning,
                  batch_size: int = 16):
    from tellnorm.signals import collect_signals

    observer = collect_signals(replica.model, replica.saes(saes, layers), reasoning, [seq for _, seq, _ in items],
                               {rid: start for rid, _, start in items}, request_ids=[rid for rid, _, _ in items],
                               batch_size=batch_size)
    return SignalResult(observer.sums, set(observer.attention_seen), list(observer.layers))


def merge_signals(results: Sequence, shards: Sequence[Shard], *, order: Sequence = ()) -> SignalResult:
    """``SignalSums.merge`` in shard order, then the problems in ``order`` (the bootstrap resamples by position)."""
    sums = functools.reduce(lambda a, b: a.merge(b), [r.sums for r in results])
    ranked = [rid for rid in order if rid in sums.problems]
    seen = set(ranked)
    rest = [rid for rid in sums.problems if rid not in seen]
    sums.problems = {rid: sums.problems[rid] for rid in ranked + rest}
    return SignalResult(sums, set().union(*(r.attention_seen for r in results)), results[0].layers)


def signal_collector(pool: ShardPool, saes_spec, *, strategy: str = "contiguous") -> Callable:
    """A stand-in for :func:`tellnorm.signals.collect_signals` (``correlation_study(..., collect=...)``) that
    shards the per-problem sums by problem (each problem's sums come from one worker)."""

    def collect(model, saes, reasoning, sequences, starts, *, request_ids=None, batch_size=16):
        rids = list(request_ids) if request_ids is not None else list(range(len(sequences)))
        items = [(rid, list(seq), starts.get(rid, 1 << 30)) for rid, seq in zip(rids, sequences)]
        return pool.map(signals_shard, items, merge=functools.partial(merge_signals, order=rids), strategy=strategy,
                        saes=saes_spec, layers=sorted(saes),
                        reasoning={layer: list(map(int, r)) for layer, r in reasoning.items()}, batch_size=batch_size)

    return collect


# ------------------------------------------------------------------------------------------------------ interventions

SHARD_SAFE_INTERVENTION_MODES = ("calibrated", "fixed", "exact")  # τ fixed, or tracked per request


def check_intervention_shardable(cfg) -> None:
    """One TellnormError line, before any work, if ``cfg`` (an InterventionConfig) cannot be sharded exactly."""
    if cfg.threshold_mode not in SHARD_SAFE_INTERVENTION_MODES:
        raise TellnormError(f"threshold mode {cfg.threshold_mode!r} pools τ over the requests that share a batch, so "
                            "an edit would depend on its shard: with --ray use --threshold-mode calibrated, fixed or "
                            "exact")


@dataclass
class RecordedEdit:
    """An edit as the study's tables read it after a sharded run: its name and its merged decision record."""

    name: str
    record: Any


def _worker_context(replica: Replica, ctx):
    """The driver's calibration context on this worker's model (SAEs loaded here, once per spec and layers)."""
    if not ctx.cfg.features:
        return replace(ctx, model=replica.model)
    from tellnorm.saes import load_saes

    late = tuple(ctx.sets["late"])
    saes = replica.resource(("intervention-saes", str(ctx.cfg.saes), late),
                            lambda: load_saes(ctx.cfg.saes, replica.model, layers=list(late)))
    return replace(ctx, model=replica.model, saes=saes)


def _shard_conditions(ctx, names: Sequence[str]) -> list:
    from tellnorm.studies.suppression import build_conditions

    by_name = {c.name: c for c in build_conditions(ctx)}
    missing = [n for n in names if n not in by_name]
    if missing:
        raise TellnormError(f"conditions {missing} are not rebuilt on the worker from the calibration")
    return [by_name[n] for n in names]


def intervention_shard(replica: Replica, shard: Shard, items: list, *, ctx, names, cfg, fractions,
                       what: str = "generate"):
    """One shard of the suppression study's problems (``(problem, prompt ids)`` items, request ids numbered by
    their original index) under the conditions ``names``, rebuilt on the worker from the calibration ``ctx``:
    ``generate``: ``(generations, {condition: [(edit name, record), ...]})``; ``logprobs``: the answer log-probs."""
    from tellnorm.studies.suppression import answer_logprobs, run_conditions

    wctx = _worker_context(replica, ctx)
    conds = _shard_conditions(wctx, names)
    problems, prompts = [p for p, _ in items], [ids for _, ids in items]
    if what == "logprobs":
        return answer_logprobs(wctx.model, conds, problems, prompts, cfg, fractions, indices=shard.indices)
    outcome = run_conditions(wctx.model, conds, problems, prompts, cfg, fractions, progress=False, desc="",
                             indices=shard.indices)
    return outcome.generations, {name: [(e.name, e.record) for e in edits] for name, edits in outcome.edits.items()}


def merge_outcomes(results: Sequence, shards: Sequence[Shard]):
    """Shard outcomes as one: every generation, and per condition its edits' records merged (requests disjoint)."""
    from tellnorm.interventions.edits import EditRecord
    from tellnorm.studies.suppression import Outcome

    outcome = Outcome()
    for gens, _ in results:
        outcome.generations.update(gens)
    for name, edits in results[0][1].items():
        merged = []
        for j, (edit_name, _) in enumerate(edits):
            record = EditRecord(edit_name)
            for _, shard_edits in results:
                part = shard_edits[name][j][1]
                record.decisions.update(part.decisions)
                record.start.update(part.start)
                record.n_prompt.update(part.n_prompt)
            merged.append(RecordedEdit(edit_name, record))
        outcome.edits[name] = merged
    return outcome


def merge_dicts(results: Sequence[dict], shards: Sequence[Shard]) -> dict:
    return {key: value for result in results for key, value in result.items()}


class ShardedIntervention:
    """The ``runner`` of :func:`tellnorm.studies.suppression.run_intervene` that shards by problem over a pool.

    The validation contrast corpus (:func:`contrast_corpus_sharded`), both generation phases and the answer
    log-probs run on the workers; each worker rebuilds the conditions and their edits from the driver's calibration
    (thresholds, steering direction, feature sets; SAEs loaded there). Request ids, random selections
    (:func:`tellnorm.interventions.selection.token_uniforms`) and per-request τ are keyed by the problem's original
    index, so answers and edit decisions are those of one process. The calibration pass and the matched fractions
    (pooled over the whole run) stay on the driver."""

    def __init__(self, pool: ShardPool, cfg=None, *, strategy: str = "contiguous"):
        if cfg is not None:
            check_intervention_shardable(cfg)
        self.pool, self.strategy = pool, strategy

    def contrast_corpus(self, model, n_per_difficulty: int, *, max_new_tokens: int):
        return contrast_corpus_sharded(self.pool, n_per_difficulty, max_new_tokens=max_new_tokens,
                                       strategy=self.strategy)

    def _map(self, ctx, conds, problems, prompts, cfg, fractions, what: str, merge: Callable):
        check_intervention_shardable(cfg)
        lite = replace(ctx, model=None, saes={})
        return self.pool.map(intervention_shard, list(zip(problems, [list(p) for p in prompts])), merge=merge,
                             strategy=self.strategy, ctx=lite, names=[c.name for c in conds], cfg=cfg,
                             fractions=fractions, what=what)

    def run_conditions(self, ctx, conds, problems, prompts, cfg, fractions, *, progress: bool = False, desc: str = ""):
        return self._map(ctx, conds, problems, prompts, cfg, fractions, "generate", merge_outcomes)

    def answer_logprobs(self, ctx, conds, problems, prompts, cfg, fractions):
        return self._map(ctx, conds, problems, prompts, cfg, fractions, "logprobs", merge_dicts)


def sharded_intervention(pool: ShardPool, cfg=None, *, strategy: str = "contiguous") -> ShardedIntervention:
    """The ``runner`` for :func:`tellnorm.studies.suppression.run_intervene` (``cfg`` checked up front)."""
    return ShardedIntervention(pool, cfg, strategy=strategy)


__all__ = [
    "LOCAL", "STRATEGIES", "RecordedEdit", "Replica", "Shard", "ShardPool", "ShardedIntervention", "SignalResult",
    "bounds_collector", "check_evaluation_shardable", "check_intervention_shardable", "check_reachable",
    "collect_bounds_sharded", "collect_feature_sums_sharded", "concat_frames", "contrast_corpus_sharded",
    "feature_collector", "generate_sharded", "import_ray",
    "make_shards", "merge_accumulators", "merge_corpora", "merge_in_order", "merge_outcomes", "merge_runs",
    "merge_signals", "merge_traces", "profile_study_sharded", "run_profile_sharded", "run_sharded",
    "sharded_decoder", "sharded_intervention", "signal_collector", "trace_both_modes_sharded",
]
