"""Ray for the studies' runners: :class:`ShardPool`, a :class:`tellnorm.studies.runners.Runner` whose shards run on
Ray workers, one model replica each. Everything that does not need Ray (shards, merges, :class:`Replica`, the
in-process runner) is :mod:`tellnorm.studies.runners`; each study's shard function and merge live beside the study.

``ShardPool(model, ray_address=..., workers=..., saes=...)`` holds one replica of the model per worker (a Ray actor
that loads it once, HF or vLLM through :func:`tellnorm.backends.load_model`, and the SAE spec ``saes`` on first
use); a study given ``runner=pool`` calls ``pool.map(fn, items, merge=...)``, which splits ``items`` into
deterministic shards (one per worker), runs ``fn(replica, shard, shard_items, **kwargs)`` on the workers and
merges the results in shard order. ``ray_address=None`` (the default) runs in this process and never imports
Ray; ``"local"`` starts a Ray cluster on this machine with ``num_cpus=workers``; ``"auto"``, ``HOST:PORT`` or
``ray://HOST:PORT`` connect to a running one.

No wait is unbounded, so no Ray call can hang a run (e.g. two Ray jobs competing for one machine's CPUs): the
connection is probed within ``connect_timeout_s`` (a local cluster's raylet gets :data:`RAYLET_START_WAIT_S`), the
workers must load their replica within ``start_timeout_s``, every shard must finish within ``shard_timeout_s`` of
its start, and a finished shard's result must arrive within :data:`FETCH_TIMEOUT_S`. Each ends in one
TellnormError line saying what timed out and what to do; the shards still running are abandoned with their
workers.

Fault tolerance: a worker that dies mid-shard (process crash, OOM kill, lost node) is replaced by a fresh replica
and its shard is submitted again, at most ``max_retries`` times; a shard's result is kept only the first time it
arrives, so nothing is counted twice. An exception raised by the study itself is not retried (it would fail
again) and comes back as one TellnormError line. Nothing is written until every shard has been merged, and the
study writers (:mod:`tellnorm.io`) write to a temporary file and rename it, so a failed run leaves no output.
"""

from __future__ import annotations

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
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from tellnorm.errors import TellnormError
from tellnorm.studies.runners import (
    DEFAULT_STRATEGY,
    InProcess,
    Replica,
    Shard,
    check_strategy,
    make_shards,
    merge_in_order,
)

RAYLET_START_WAIT_S = 120  # seconds a local cluster's raylet may take to start (Ray's default is 10)
LOCAL = "local"
INSTALL_HINT = "pip install -e '.[ray]' (or pip install 'ray==2.60.0')"
DEFAULT_CONNECT_TIMEOUT_S = 30.0  # a cluster at an address must accept a connection within this
DEFAULT_START_TIMEOUT_S = 600.0  # workers must load their replica within this (a large model on a cold node)
DEFAULT_SHARD_TIMEOUT_S = 3600.0  # a shard must finish within this of its start (a whole shard of a study)
FETCH_TIMEOUT_S = 300.0  # a finished shard's result must arrive within this (a large result from another node)
SHARD_TIMEOUT_ENV = "TELLNORM_SHARD_TIMEOUT_S"  # the CLI's shard time-out, in seconds


def check_timeout(name: str, value: float) -> float:
    """``value`` as a float if it is a finite number of seconds > 0, else one TellnormError line."""
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        seconds = math.nan
    if isinstance(value, bool) or not math.isfinite(seconds) or seconds <= 0:
        raise TellnormError(f"{name} must be a finite number of seconds > 0, got {value!r}: every Ray wait has a "
                            "time-out")
    return seconds


def shard_timeout_from_env() -> float:
    """The shard time-out the CLI uses: ``$TELLNORM_SHARD_TIMEOUT_S`` seconds, else :data:`DEFAULT_SHARD_TIMEOUT_S`."""
    value = os.environ.get(SHARD_TIMEOUT_ENV)
    return DEFAULT_SHARD_TIMEOUT_S if value is None else check_timeout(SHARD_TIMEOUT_ENV, value)


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

def import_ray() -> Any:
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
    """A :class:`tellnorm.studies.runners.Runner`: model replicas that run shard functions, one per Ray worker
    (or, with ``ray_address=None``, :class:`~tellnorm.studies.runners.InProcess` on ``model``).

    ``model``: what :func:`tellnorm.backends.load_model` takes (with Ray: a name or folder, since each worker loads
    its own copy; in process a loaded model is used as is); ``backend`` and ``load_options`` go there too.
    ``saes``: the SAE spec the workers load when a study shards SAE sums (the driver's loaded SAEs only say which
    layers). ``strategy``: the default shard strategy (``contiguous`` or ``round-robin``). ``workers``: replicas
    (Ray only). ``num_cpus_per_worker``/``num_gpus_per_worker``: each actor's Ray resources (with GPUs, the HF
    backend loads on ``cuda`` unless ``load_options`` says otherwise). ``max_retries``: how many times a shard whose
    worker died is run again. Time-outs, in seconds (finite): ``connect_timeout_s`` for a cluster at an address to
    answer, ``start_timeout_s`` for the replicas to load, ``shard_timeout_s`` for each shard to finish from its start.
    ``runtime_env``: Ray's, e.g. to ship the code to a cluster. A process already connected to Ray (a notebook)
    keeps its cluster."""

    def __init__(self, model: Any = "organism", *, ray_address: str | None = None, workers: int = 1,
                 backend: str = "hf", load_options: dict | None = None, saes: Any = None,
                 strategy: str = DEFAULT_STRATEGY, num_cpus_per_worker: float = 1, num_gpus_per_worker: float = 0,
                 max_retries: int = 2, connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S,
                 start_timeout_s: float = DEFAULT_START_TIMEOUT_S, shard_timeout_s: float = DEFAULT_SHARD_TIMEOUT_S,
                 runtime_env: dict | None = None):
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
        self.connect_timeout_s = check_timeout("connect_timeout_s", connect_timeout_s)
        self.start_timeout_s = check_timeout("start_timeout_s", start_timeout_s)
        self.shard_timeout_s = check_timeout("shard_timeout_s", shard_timeout_s)
        load_options = dict(load_options or {})
        if num_gpus_per_worker and backend == "hf":
            load_options.setdefault("device", "cuda")
        self.model, self.backend, self.load_options, self.saes = model, backend, load_options, saes
        self.strategy = check_strategy(strategy)
        self.ray_address, self.workers, self.max_retries = ray_address, workers, max_retries
        self.num_cpus_per_worker, self.num_gpus_per_worker = num_cpus_per_worker, num_gpus_per_worker
        self.runtime_env = runtime_env
        self.retried: list[tuple[int, int]] = []  # (shard id, attempt) of every shard run again after a worker died
        self._local: InProcess | None = None
        self._ray = None
        self._owns_ray = False
        self._ray_temp = None  # the local cluster's session folder (ours to remove)
        self._actors: list = []
        self._actor_class = None
        if ray_address is not None:
            self._connect()

    @property
    def uses_ray(self) -> bool:
        """True when the shards run on Ray workers (``ray_address`` given)."""
        return self.ray_address is not None

    @property
    def in_process(self) -> bool:
        """True without Ray: one shard of everything, in this process."""
        return not self.uses_ray

    def sae_source(self, saes: Any, spec: Any = None) -> Any:
        """In process: ``saes`` as they are. With Ray: a spec the workers load (``saes`` itself when it is a spec,
        else ``spec``, else the pool's ``saes``)."""
        if self.in_process or not isinstance(saes, Mapping):
            return saes
        source = spec if spec is not None else self.saes
        if source is None:
            raise TellnormError("with Ray every worker loads its own SAEs: give the pool their spec "
                                "(ShardPool(..., saes='organism' or a folder))")
        return source

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
            # This bounds ray.init's own wait for a local cluster.
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
            check_reachable(address, self.connect_timeout_s)  # ray.init alone retries a silent address for minutes
            ray.init(address=address, runtime_env=self.runtime_env)
        self._owns_ray = True

    def _new_actor(self):
        ray = self._ray
        if self._actor_class is None:
            self._actor_class = ray.remote(num_cpus=self.num_cpus_per_worker, num_gpus=self.num_gpus_per_worker,
                                           max_restarts=0, max_task_retries=0)(_ReplicaActor)
        return self._actor_class.remote(self.model, self.backend, self.load_options)

    def _start_actors(self, count: int) -> None:
        """Grow to ``count`` replicas and wait (at most ``start_timeout_s``) until each has loaded its model."""
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
                f"{len(pending)} of {len(new)} Ray workers did not start within {self.start_timeout_s:g} s "
                f"(start_timeout_s): each needs {self.num_cpus_per_worker:g} CPU and {self.num_gpus_per_worker:g} "
                f"GPU, the cluster has {free.get('CPU', 0):g} CPU and {free.get('GPU', 0):g} GPU free (other Ray "
                "jobs may hold them); use fewer --workers, wait for the other jobs, or raise start_timeout_s")
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
        """Stop the workers, shut down the cluster this pool started and remove its temporary folder."""
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

    def __enter__(self) -> ShardPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- running

    def _in_process_runner(self) -> InProcess:
        if self._local is None:
            self._local = InProcess(self.model, backend=self.backend, load_options=self.load_options)
        return self._local

    def replica(self) -> Replica:
        """The in-process replica (no Ray), e.g. for the parts of a study that stay on the driver."""
        return self._in_process_runner().replica

    def map(self, fn: Callable, items: Sequence, *, merge: Callable = merge_in_order, strategy: str | None = None,
            n_shards: int | None = None, **kwargs: Any) -> Any:
        """``merge([fn(replica, shard, shard_items, **kwargs) for shard in shards], shards)``, shards in id order.

        In process: one shard of everything. With Ray: ``n_shards`` (default: one per worker) deterministic shards
        (``strategy``, default the pool's) over the workers; fewer items than workers use one worker per item (with
        a warning: the result does not depend on the number of workers). ``fn`` must be importable on the workers
        (a module-level function)."""
        strategy = check_strategy(strategy or self.strategy)
        if not self.uses_ray:
            return self._in_process_runner().map(fn, items, merge=merge, strategy=strategy, **kwargs)
        items = list(items)
        if not items:
            raise TellnormError("nothing to run: the prompt list is empty")
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
        """``ray.get`` of a finished task's result, within :data:`FETCH_TIMEOUT_S`; a study's TellnormError as one
        line."""
        ray = self._ray
        try:
            return ray.get(ref, timeout=FETCH_TIMEOUT_S)
        except ray.exceptions.GetTimeoutError:
            raise TellnormError(f"{what}: its result did not arrive within {FETCH_TIMEOUT_S:g} s of finishing: check "
                                "the network between the nodes and the object store's memory") from None
        except ray.exceptions.RayTaskError as err:
            cause = getattr(err, "cause", None)
            if isinstance(cause, TellnormError):
                raise TellnormError(f"{what}: {cause}") from None
            raise

    def _run_shards(self, fn, shards: list[Shard], items: list, kwargs: dict) -> dict:
        """Every shard's result, each exactly once; a shard whose worker died goes to a fresh replica; a shard still
        running ``shard_timeout_s`` after its start ends the run in one line."""
        ray = self._ray
        died = _worker_died_errors(ray)
        pending = deque(shards)
        attempts = {s.shard_id: 0 for s in shards}
        idle = list(range(len(self._actors)))
        in_flight: dict = {}  # ref -> (shard, actor slot, deadline)
        results: dict = {}
        try:
            while pending or in_flight:
                while pending and idle:
                    shard, slot = pending.popleft(), idle.pop(0)
                    attempts[shard.shard_id] += 1
                    ref = self._actors[slot].run.remote(fn, shard, [items[i] for i in shard.indices], kwargs)
                    in_flight[ref] = (shard, slot, time.monotonic() + self.shard_timeout_s)
                wait_s = max(0.0, min(deadline for _, _, deadline in in_flight.values()) - time.monotonic())
                done, _ = ray.wait(list(in_flight), num_returns=1, timeout=wait_s)
                if not done:
                    now = time.monotonic()
                    late = sorted(s.shard_id for s, _, deadline in in_flight.values() if deadline <= now)
                    if not late:
                        continue
                    running = sorted(s.shard_id for s, _, _ in in_flight.values())
                    raise TellnormError(
                        f"shard {late[0]} did not finish within {self.shard_timeout_s:g} s (shard_timeout_s; shards "
                        f"{running} were still running and were stopped): nothing was written; if a shard needs "
                        f"longer, raise shard_timeout_s (CLI: {SHARD_TIMEOUT_ENV}=SECONDS) or use more --workers, "
                        "else check the worker logs and whether other Ray jobs hold the cluster")
                for ref in done:
                    shard, slot, _ = in_flight.pop(ref)
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
            busy = {slot for _, slot, _ in in_flight.values()}
            for slot in busy:
                ray.kill(self._actors[slot])
            self._actors = [actor for slot, actor in enumerate(self._actors) if slot not in busy]
            raise
        return results


def run_sharded(model: Any, items: Sequence, fn: Callable, *, merge: Callable = merge_in_order,
                ray_address: str | None = None, workers: int = 1, strategy: str = DEFAULT_STRATEGY,
                backend: str = "hf", load_options: dict | None = None, max_retries: int = 2, **kwargs: Any) -> Any:
    """One-shot :meth:`ShardPool.map` (a pool for one call, closed afterwards)."""
    with ShardPool(model, ray_address=ray_address, workers=workers, backend=backend, load_options=load_options,
                   max_retries=max_retries, strategy=strategy) as pool:
        return pool.map(fn, items, merge=merge, **kwargs)


__all__ = [
    "DEFAULT_CONNECT_TIMEOUT_S", "DEFAULT_SHARD_TIMEOUT_S", "DEFAULT_START_TIMEOUT_S", "FETCH_TIMEOUT_S", "LOCAL",
    "RAYLET_START_WAIT_S", "SHARD_TIMEOUT_ENV", "ShardPool", "check_reachable", "check_timeout", "import_ray",
    "run_sharded", "shard_timeout_from_env",
]
