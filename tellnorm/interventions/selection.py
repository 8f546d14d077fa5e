"""Which tokens an edit acts on: per request and per position, never per batch slot.

A :class:`Selection` answers, at one hook call, which of the *candidate* tokens (real tokens of the edit's
requests that it has not decided before) are selected::

    select(layer, x, info, candidates) -> bool [batch, seq]       (a subset of candidates)

``x`` is the residual stream at the hook, ``info`` the :class:`~tellnorm.generation.StepInfo` of the pass (which
request each row is, each token's position, the prompt lengths). Candidates arrive in position order per request
(prefill, then one token per decode step; or a whole sequence in a teacher-forced pass), so stateful selections
see tokens in the order generation produces them, whatever the batch.

* :class:`All`, :class:`Prompt`, :class:`Generated` — by position (``position >= n_prompt`` is generated).
* :class:`Mask` — a per-request boolean mask over positions.
* :class:`AboveThreshold` — ``‖x‖₂ > τ_l`` with ``τ_l = Q3 + k·max(IQR, floor)`` from :mod:`tellnorm.thresholds` in
  any mode: ``fixed`` (constant per-layer τ, e.g. calibrated), ``exact`` (per request; a token is checked against
  τ from that request's strictly earlier in-scope tokens, then recorded — the reference code's order), or
  ``pooled-p2`` (the reference code: P² quartiles of the per-step batch-mean norm, pooled across the edit's
  requests; batch-dependent by construction).
* :class:`RandomFraction` — token t of request r at layer l is selected iff ``u(seed, r, l, t) < p_r``, with u a
  uniform [0, 1) hash (splitmix64 of a BLAKE2b key): reproducible under a seed and identical alone or in any batch.

Selections combine with ``&``. Scoped selections (thresholds, random) look only at their ``scope`` (default:
generated tokens, as the reference code measures decode steps only).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Collection, Hashable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from tellnorm.errors import TellnormError
from tellnorm.norms import l2_norm
from tellnorm.thresholds import MODES, FixedThresholds, PeakThreshold, ThresholdConfig, make_threshold

if TYPE_CHECKING:
    from pathlib import Path

    import torch

    from tellnorm.generation import LayerHooks, StepInfo


def is_number(value: object) -> bool:
    """A real number (Python or numpy), not a bool."""
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))


def check_fraction(value: Any, what: str = "fraction", *, allow_zero: bool = False) -> float:
    """A fraction in (0, 1] (or [0, 1] with ``allow_zero``), or one clear TellnormError."""
    if not (is_number(value) and math.isfinite(value) and (value >= 0 if allow_zero else value > 0) and value <= 1):
        raise TellnormError(f"{what} must be a number in {'[' if allow_zero else '('}0, 1], got {value!r}")
    return float(value)


class Selection:
    """Base: ``select`` returns a bool mask ⊆ ``candidates``; ``bind`` validates against an edit before any run."""

    def bind(self, edit: LayerHooks) -> None:
        """Called once by the edit that owns this selection (validation; no state)."""

    def select(self, layer: int, x: torch.Tensor, info: StepInfo, candidates: torch.Tensor) -> torch.Tensor:
        """The selected subset of ``candidates`` (bool ``[batch, seq]``) given the stream ``x``
        ``[batch, seq, d_model]``; each subclass implements it."""
        raise NotImplementedError

    def reset(self) -> None:
        """Forget per-request state (a new run)."""

    def release(self, request_ids: Collection[Hashable]) -> None:
        """Forget the state of finished ``request_ids`` (no pass will show them again)."""
        scope = getattr(self, "scope", None)
        if scope is not None:
            scope.release(request_ids)

    def describe(self) -> str:
        """A short name for tables and logs."""
        return type(self).__name__.lower()

    def pools_requests(self) -> bool:
        """Whether a token's decision depends on the other requests that share its step (so, on vLLM, on the
        engine's scheduling); per-request and fixed rules do not."""
        return bool(getattr(getattr(self, "scope", None), "pools_requests", lambda: False)())

    def __and__(self, other: Selection) -> AllOf:
        return AllOf(self, other)


def prompt_lengths(info: StepInfo, like: torch.Tensor) -> torch.Tensor:
    """``[batch, 1]`` tensor of each row's prompt length, or a TellnormError when the pass did not say."""
    import torch

    if info.n_prompt is None:
        raise TellnormError("selecting prompt or generated tokens needs each request's prompt length: pass n_prompt= "
                            "to run_forward (generate always knows it)")
    return torch.as_tensor(info.n_prompt, device=like.device).reshape(-1, 1)


class All(Selection):
    """Every candidate token."""

    def select(self, layer: int, x: torch.Tensor, info: StepInfo, candidates: torch.Tensor) -> torch.Tensor:
        """``candidates`` itself."""
        return candidates


class Prompt(Selection):
    """Prompt tokens (``position < n_prompt``)."""

    def select(self, layer: int, x: torch.Tensor, info: StepInfo, candidates: torch.Tensor) -> torch.Tensor:
        """The candidates before their request's prompt length."""
        return candidates & (info.positions.to(candidates.device) < prompt_lengths(info, candidates))


class Generated(Selection):
    """Generated tokens (``position >= n_prompt``)."""

    def select(self, layer: int, x: torch.Tensor, info: StepInfo, candidates: torch.Tensor) -> torch.Tensor:
        """The candidates at or after their request's prompt length."""
        return candidates & (info.positions.to(candidates.device) >= prompt_lengths(info, candidates))


class Mask(Selection):
    """Per-request masks over positions (``{request_id: [bool per position]}``); positions past a mask and requests
    without one are not selected."""

    def __init__(self, masks: Mapping[Any, Sequence[bool]]):
        import torch

        self.masks = {rid: torch.as_tensor(list(m), dtype=torch.bool) for rid, m in masks.items()}

    def select(self, layer: int, x: torch.Tensor, info: StepInfo, candidates: torch.Tensor) -> torch.Tensor:
        """The candidates whose request's mask is True at their position."""
        import torch

        out = torch.zeros_like(candidates)
        for row, rid in enumerate(info.request_ids):
            mask = self.masks.get(rid)
            if mask is None or not candidates[row].any():
                continue
            pos = info.positions[row].to(mask.device)
            inside = pos < len(mask)
            hit = torch.zeros_like(inside)
            hit[inside] = mask[pos[inside]]
            out[row] = candidates[row] & hit.to(candidates.device)
        return out


class AllOf(Selection):
    """Tokens every part selects; each part sees the same candidates (stateful parts observe all of them)."""

    def __init__(self, *parts: Selection):
        self.parts = [p for part in parts for p in (part.parts if isinstance(part, AllOf) else [part])]

    def bind(self, edit: LayerHooks) -> None:
        """Bind every part."""
        for part in self.parts:
            part.bind(edit)

    def reset(self) -> None:
        """Reset every part."""
        for part in self.parts:
            part.reset()

    def release(self, request_ids: Collection[Hashable]) -> None:
        """Release the requests in every part."""
        for part in self.parts:
            part.release(request_ids)

    def select(self, layer: int, x: torch.Tensor, info: StepInfo, candidates: torch.Tensor) -> torch.Tensor:
        """The candidates every part selects."""
        out = candidates
        for part in self.parts:
            out = out & part.select(layer, x, info, candidates)
        return out

    def describe(self) -> str:
        """The parts' names joined by ``&``."""
        return " & ".join(p.describe() for p in self.parts)

    def pools_requests(self) -> bool:
        """Whether any part pools requests."""
        return any(p.pools_requests() for p in self.parts)


class AboveThreshold(Selection):
    """Tokens in ``scope`` whose norm exceeds the layer's peak threshold τ_l (PAPER §4–5).

    ``mode``: "fixed" (``fixed`` = FixedThresholds, a {layer: τ} mapping or a JSON path), "exact" (per request,
    ``cfg`` gives k, IQR floor and warm-up) or "pooled-p2" (the reference code's pooled streaming estimate). The τ
    each token was tested against is kept (``tau``), so an edit can act relative to it (clamp to τ/4)."""

    def __init__(self, mode: str = "fixed", *, fixed: FixedThresholds | Mapping[int, float] | str | Path | None = None,
                 cfg: ThresholdConfig | None = None,
                 scope: Selection | None = None):
        if mode not in MODES:
            raise TellnormError(f"unknown threshold mode {mode!r}: choose one of {', '.join(MODES)}")
        if mode == "fixed":
            if fixed is None:
                raise TellnormError("threshold mode 'fixed' needs thresholds: pass fixed= a {layer: tau} mapping, "
                                    "a FixedThresholds or a JSON path")
            self.fixed: FixedThresholds | None = make_threshold("fixed", fixed=fixed)
        else:
            self.fixed = None
        self.mode = mode
        self.cfg = cfg or ThresholdConfig()
        self.scope = scope or Generated()
        self.reset()

    def bind(self, edit: LayerHooks) -> None:
        """Bind the scope; in fixed mode, check there is a τ for every layer of ``edit``."""
        self.scope.bind(edit)
        if self.fixed is not None:
            missing = [layer for layer in edit.layers if layer not in self.fixed.values]
            if missing:
                raise TellnormError(f"fixed thresholds have no value for layer(s) {missing}: give one for every "
                                    f"edited layer {list(edit.layers)}")

    def reset(self) -> None:
        """Forget every tracker and recorded τ (a new run)."""
        self._trackers: dict = {}  # exact: (request, layer) -> ExactThreshold; pooled: layer -> PooledP2Threshold
        self._taus: dict = {}  # adaptive modes: (request, layer) -> {position: tau}
        self.scope.reset()

    def release(self, request_ids: Collection[Hashable]) -> None:
        """Drop the τ trackers and recorded τ of finished ``request_ids`` (pooled mode's trackers are per layer and
        stay)."""
        for table in (self._trackers, self._taus):
            for key in [key for key in table if isinstance(key, tuple) and key[0] in request_ids]:
                del table[key]
        super().release(request_ids)

    def describe(self) -> str:
        """``norm > tau (<mode>)``."""
        return f"norm > tau ({self.mode})"

    def pools_requests(self) -> bool:
        """True in pooled-p2 mode: τ comes from each step's mean norm over its requests."""
        return self.mode == "pooled-p2" or super().pools_requests()

    def tracker(self, request_id: Hashable, layer: int) -> PeakThreshold:
        """The τ tracker of ``request_id`` at ``layer`` (one per layer in pooled mode), created on first use."""
        key = layer if self.mode == "pooled-p2" else (request_id, layer)
        if key not in self._trackers:
            self._trackers[key] = make_threshold(self.mode, self.cfg, [layer])
        return self._trackers[key]

    def select(self, layer: int, x: torch.Tensor, info: StepInfo, candidates: torch.Tensor) -> torch.Tensor:
        """The scoped candidates with ``‖x‖₂ > τ_l`` (PAPER.md §5); adaptive modes test each token against τ from
        earlier tokens, then add its norm, and record the τ it met."""
        import torch

        scoped = self.scope.select(layer, x, info, candidates)
        out = torch.zeros_like(candidates)
        if not scoped.any():
            return out
        norms = l2_norm(x)
        if self.mode == "fixed":
            return scoped & (norms > self.fixed.values[layer])
        rows, cols = scoped.nonzero(as_tuple=True)
        positions = info.positions.to(scoped.device)[rows, cols].tolist()
        values = norms[rows, cols].tolist()
        rids = [info.request_ids[r] for r in rows.tolist()]
        if self.mode == "exact":
            order = sorted(range(len(rids)), key=lambda i: positions[i])  # per request: position order
            groups = [[i] for i in order]
        else:  # pooled: one sample per step = the mean over the rows at that step (the reference code's rule)
            steps = [p - info.n_prompt[r] if info.n_prompt else p for p, r in zip(positions, rows.tolist())]
            by_step: dict = {}
            for i, step in enumerate(steps):
                by_step.setdefault(step, []).append(i)
            groups = [by_step[s] for s in sorted(by_step)]
        for group in groups:
            tracker = self.tracker(rids[group[0]], layer)
            tau = float(tracker.threshold()[0])
            for i in group:
                peak = math.isfinite(tau) and values[i] > tau
                out[rows[i], cols[i]] = peak
                self._taus.setdefault((rids[i], layer), {})[positions[i]] = tau
            tracker.update(np.array([[values[i]] for i in group]).mean(axis=0))
        return out

    def tau(self, layer: int, info: StepInfo, like: torch.Tensor) -> torch.Tensor:
        """``[batch, seq]`` float tensor: the τ each token was tested against (NaN where none; fixed mode: τ_l)."""
        import torch

        if self.fixed is not None:
            return torch.full(like.shape[:2], self.fixed.values[layer], dtype=torch.float32, device=like.device)
        out = torch.full(like.shape[:2], float("nan"), dtype=torch.float32, device=like.device)
        for row, rid in enumerate(info.request_ids):
            taus = self._taus.get((rid, layer))
            if taus:
                values = [taus.get(p, float("nan")) for p in info.positions[row].tolist()]
                out[row] = torch.tensor(values, dtype=torch.float32, device=like.device)
        return out


# splitmix64 constants (Steele, Lea & Flood 2014): a fast bijective mixer with good avalanche.
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)


def token_uniforms(seed: int, request_id: Hashable, layer: int, positions: Sequence[int] | np.ndarray) -> np.ndarray:
    """Uniform [0, 1) numbers, one per position, that depend only on (seed, request, layer, position)."""
    key = hashlib.blake2b(f"{seed}|{request_id!r}|{layer}".encode(), digest_size=8).digest()
    z = np.uint64(int.from_bytes(key, "little")) + np.asarray(positions, dtype=np.uint64) * _GOLDEN
    with np.errstate(over="ignore"):
        z = (z ^ (z >> np.uint64(30))) * _MIX1
        z = (z ^ (z >> np.uint64(27))) * _MIX2
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) / float(2**53)


class RandomFraction(Selection):
    """Each in-scope token independently with probability ``fraction`` (a number, or {request_id: number} to match
    another rule's per-request rate), decided by :func:`token_uniforms` under ``seed``."""

    def __init__(self, fraction: float | Mapping[Any, float], *, seed: int = 0, scope: Selection | None = None):
        if isinstance(fraction, Mapping):
            if not fraction:
                raise TellnormError("random selection got an empty {request: fraction} mapping")
            # a per-request rate matches another rule's, which may be 0 for some requests
            self.fraction: float | dict = {rid: check_fraction(f, f"fraction for request {rid!r}", allow_zero=True)
                                           for rid, f in fraction.items()}
        else:
            self.fraction = check_fraction(fraction)
        if not (isinstance(seed, (int, np.integer)) and not isinstance(seed, bool)):
            raise TellnormError(f"random selection seed must be a whole number, got {seed!r}")
        self.seed = int(seed)
        self.scope = scope or Generated()

    def bind(self, edit: LayerHooks) -> None:
        """Bind the scope."""
        self.scope.bind(edit)

    def describe(self) -> str:
        """``random (seed <seed>)``."""
        return f"random (seed {self.seed})"

    def fraction_for(self, request_id: Hashable) -> float:
        """The selection probability of ``request_id``'s tokens."""
        if isinstance(self.fraction, dict):
            if request_id not in self.fraction:
                raise TellnormError(f"random selection has no fraction for request {request_id!r}")
            return self.fraction[request_id]
        return self.fraction

    def select(self, layer: int, x: torch.Tensor, info: StepInfo, candidates: torch.Tensor) -> torch.Tensor:
        """The scoped candidates whose uniform ``u(seed, request, layer, position)`` is below the fraction."""
        import torch

        scoped = self.scope.select(layer, x, info, candidates)
        out = torch.zeros_like(candidates)
        for row in scoped.any(-1).nonzero().flatten().tolist():
            rid = info.request_ids[row]
            cols = scoped[row].nonzero().flatten()
            u = token_uniforms(self.seed, rid, layer, info.positions[row][cols.cpu()].tolist())
            out[row, cols] = torch.as_tensor(u < self.fraction_for(rid), device=out.device)
        return out
