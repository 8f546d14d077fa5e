"""Where a study's work runs: a *runner* maps a shard function over the items and merges the shard results.

Every study that can shard takes ``runner=None``: None is :class:`InProcess` on the study's own model (one shard
of everything, in this process); :class:`tellnorm.apps.distributed.ShardPool` is a runner too (``--ray``: one
model replica per Ray worker). The study calls ``runner.map(shard_fn, items, merge=..., **kwargs)`` either way,
so the sharded path and the single-process path are the same code:

* a **shard function** ``fn(replica, shard, shard_items, **kwargs)`` lives beside its study, at module level (the
  workers import it). ``replica`` (:class:`Replica`) holds the model and caches SAEs; ``shard`` (:class:`Shard`)
  says which of the original items it has (their indices, for request ids that do not depend on the sharding);
* a **merge** ``merge(results, shards)`` puts the shard results, in shard order, back together. A merge of one
  shard is that shard's result, so in process the study gets exactly what one call on all items gives (tables
  byte-identical to the unsharded code). Helpers: :func:`merge_accumulators` (tellnorm's mergeable sums),
  :func:`merge_in_order`, :func:`concat_frames`, :func:`merge_dicts`.

Shards are deterministic (:func:`make_shards`: contiguous blocks or round-robin); :func:`with_strategy` gives a
runner another default. Nothing here imports Ray.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from tellnorm.errors import TellnormError

STRATEGIES = ("contiguous", "round-robin")
DEFAULT_STRATEGY = "contiguous"


# ------------------------------------------------------------------------------------------------------ shards

@dataclass(frozen=True)
class Shard:
    """One shard: its id (position in the merge order) and the original indices of its items."""

    shard_id: int
    indices: tuple[int, ...]


def check_strategy(strategy: str) -> str:
    """``strategy`` if it is one of :data:`STRATEGIES`, else one TellnormError line."""
    if strategy not in STRATEGIES:
        raise TellnormError(f"unknown shard strategy {strategy!r}: choose one of {', '.join(STRATEGIES)}")
    return strategy


def make_shards(n_items: int, n_shards: int, strategy: str = DEFAULT_STRATEGY) -> list[Shard]:
    """Deterministic shards of ``range(n_items)``: ``contiguous`` blocks (sizes differ by at most one, larger first)
    or ``round-robin`` (item i goes to shard i mod n_shards, which mixes easy and hard prompts when the list is
    sorted). ``n_shards`` above ``n_items`` is clamped: no shard is empty."""
    check_strategy(strategy)
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
    """``results[0].merge(results[1]).merge(...)`` in shard order (tellnorm's accumulators all have ``.merge``:
    ``FeatureSums``, ``BoundsSums``, ``SignalSums``); one result is returned as is."""
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


def concat_frames(results: Sequence, shards: Sequence[Shard] = (), *, sort_by: Sequence[str] = ()) -> Any:
    """Per-request tables concatenated; with ``sort_by``, a stable sort on those columns (original order)."""
    import pandas as pd

    frame = pd.concat(list(results), ignore_index=True)
    if sort_by:
        frame = frame.sort_values(list(sort_by), kind="stable").reset_index(drop=True)
    return frame


def merge_dicts(results: Sequence[dict], shards: Sequence[Shard] = ()) -> dict:
    """Dicts with disjoint keys (e.g. keyed by request id) as one, in shard order."""
    return {key: value for result in results for key, value in result.items()}


# ------------------------------------------------------------------------------------------------------ replicas

def _is_spec(model: Any) -> bool:
    return isinstance(model, (str, os.PathLike))


class Replica:
    """What a shard function receives: the model (loaded once on first use) and other resources (SAEs) cached by
    key. ``model``: a loaded model (used as is) or what :func:`tellnorm.backends.load_model` takes (a name or folder,
    loaded with ``backend`` and ``load_options``)."""

    def __init__(self, model: Any = "organism", backend: str = "hf", load_options: dict | None = None):
        self.backend, self.load_options = backend, dict(load_options or {})
        self.spec = model if model is None or _is_spec(model) else None
        self._model = None if self.spec is not None or model is None else model
        self._cache: dict = {}

    @property
    def model(self) -> Any:
        """The loaded model (loaded here on first use when the replica was made from a name or folder)."""
        if self._model is None:
            if self.spec is None:
                raise TellnormError("this runner was made without a model (model=None)")
            from tellnorm.backends import load_model

            self._model = load_model(self.spec, backend=self.backend, **self.load_options)
        return self._model

    def resource(self, key: Any, factory: Callable[[], Any]) -> Any:
        """``factory()`` once per ``key`` on this replica (e.g. SAEs a worker loads for several shards)."""
        if key not in self._cache:
            self._cache[key] = factory()
        return self._cache[key]

    def saes(self, source: Any, layers: Sequence[int] | None = None) -> Mapping:
        """SAEs from ``source``: an already loaded ``{layer: SAE}`` (in process) or a spec that
        :func:`tellnorm.saes.load_saes` takes (loaded once per spec on this replica); ``layers`` picks a subset,
        in that order."""
        if isinstance(source, Mapping):
            saes = source
        else:
            from tellnorm.saes import load_saes

            key = ("saes", source if isinstance(source, (str, os.PathLike)) else repr(source))
            saes = self.resource(key, lambda: load_saes(source, self.model))
        if layers is None:
            return saes
        layers = list(layers)
        missing = [layer for layer in layers if layer not in saes]
        if missing:
            raise TellnormError(f"no SAE for layers {missing}: the SAEs cover layers {sorted(saes)}")
        if layers == list(saes):
            return saes
        return {layer: saes[layer] for layer in layers}


# ------------------------------------------------------------------------------------------------------ runners

@runtime_checkable
class Runner(Protocol):
    """What a study needs from where it runs.

    ``model``: what the shard functions run on (in process: the loaded model; a Ray pool: the name or folder every
    worker loads). ``in_process``: True when everything runs here as one shard (results cannot depend on the
    sharding; progress bars show). ``map(fn, items, *, merge, strategy, **kwargs)``: ``merge([fn(replica, shard,
    shard_items, **kwargs) for shard in shards], shards)``, shards in id order (``strategy``: None for the runner's
    default). ``sae_source(saes, spec=None)``: what a shard function passes to :meth:`Replica.saes` to get the
    driver's SAEs ``saes`` (in process the loaded SAEs themselves; workers need a spec to load: ``spec``, else the
    runner's own)."""

    model: Any
    in_process: bool

    def map(self, fn: Callable, items: Sequence, *, merge: Callable = merge_in_order, strategy: str | None = None,
            **kwargs: Any) -> Any:
        """``merge([fn(replica, shard, shard_items, **kwargs) for shard in shards], shards)``."""
        ...

    def sae_source(self, saes: Any, spec: Any = None) -> Any:
        """What a shard function passes to :meth:`Replica.saes` for the driver's SAEs ``saes``."""
        ...


class InProcess:
    """The default runner: every shard function runs here, on one shard of all items, with the already loaded model
    (or ``model`` loaded once on first use, when given as a name or folder)."""

    in_process = True

    def __init__(self, model: Any = None, *, backend: str = "hf", load_options: dict | None = None):
        self.replica = Replica(model, backend, load_options)

    @property
    def model(self) -> Any:
        """The loaded model (loaded on first use when given as a name or folder; None when made without one)."""
        if self.replica.spec is None and self.replica._model is None:
            return None
        return self.replica.model

    def map(self, fn: Callable, items: Sequence, *, merge: Callable = merge_in_order, strategy: str | None = None,
            **kwargs: Any) -> Any:
        """``merge([fn(replica, Shard(0, all indices), items, **kwargs)], [shard])``: one call on everything."""
        if strategy is not None:
            check_strategy(strategy)
        items = list(items)
        if not items:
            raise TellnormError("nothing to run: the prompt list is empty")
        shard = Shard(0, tuple(range(len(items))))
        return merge([fn(self.replica, shard, items, **kwargs)], [shard])

    def sae_source(self, saes: Any, spec: Any = None) -> Any:
        """``saes`` as they are: loaded SAEs are used here, a spec is loaded once by the replica."""
        return saes


class StrategyRunner:
    """``runner`` with another default shard strategy (everything else is the runner's)."""

    def __init__(self, runner: Runner, strategy: str):
        self.runner, self.strategy = runner, check_strategy(strategy)

    def map(self, fn: Callable, items: Sequence, *, merge: Callable = merge_in_order, strategy: str | None = None,
            **kwargs: Any) -> Any:
        """The runner's ``map``, with this strategy unless ``strategy`` is given."""
        return self.runner.map(fn, items, merge=merge, strategy=strategy or self.strategy, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.runner, name)


def with_strategy(runner: Runner, strategy: str) -> Runner:
    """``runner``, sharding with ``strategy`` (``contiguous`` or ``round-robin``) unless a call says otherwise."""
    return StrategyRunner(runner, strategy)


def as_runner(runner: Runner | None, model: Any) -> Runner:
    """``runner``, or :class:`InProcess` on ``model`` when None (what every study does with ``runner=None``)."""
    return runner if runner is not None else InProcess(model)


# ------------------------------------------------------------------------------------------------------ generation

def generate_shard(replica: Replica, shard: Shard, items: list, *, sampling: Any = None, batch_size: int = 16,
                   token_stats: bool = False, progress: bool = False) -> list:
    """:func:`tellnorm.generation.generate` of one shard's ``(request_id, prompt ids)`` items."""
    from tellnorm.generation import generate

    return generate(replica.model, [ids for _, ids in items], sampling, request_ids=[rid for rid, _ in items],
                    batch_size=batch_size, progress=progress, token_stats=token_stats)


def generate_sharded(runner: Runner, prompts: Sequence[Sequence[int]], sampling: Any = None, *,
                     request_ids: Sequence | None = None,
                     batch_size: int = 16, token_stats: bool = False) -> list:
    """:func:`tellnorm.generation.generate` on ``runner`` by prompt, Generations in prompt order.

    Each request keeps its id (default: its index), so sampled requests draw from the same per-request seeds
    (:func:`tellnorm.generation.request_seed`) however they are sharded."""
    request_ids = list(request_ids) if request_ids is not None else list(range(len(prompts)))
    if len(request_ids) != len(prompts) or len(set(request_ids)) != len(request_ids):
        raise TellnormError("request_ids must be unique, one per prompt")
    return runner.map(generate_shard, [(rid, list(ids)) for rid, ids in zip(request_ids, prompts)],
                      sampling=sampling, batch_size=batch_size, token_stats=token_stats,
                      progress=runner.in_process)


__all__ = [
    "DEFAULT_STRATEGY", "STRATEGIES", "InProcess", "Replica", "Runner", "Shard", "StrategyRunner", "as_runner",
    "check_strategy", "concat_frames", "generate_shard", "generate_sharded", "make_shards", "merge_accumulators",
    "merge_dicts", "merge_in_order", "with_strategy",
]
