"""Adaptive per-layer peak thresholds for hidden-state norms (PAPER §5).

A token's norm at layer l is a *peak* when it exceeds

    tau_l = Q3 + k · max(Q3 − Q1, iqr_floor)        k = 1.5, iqr_floor = 1e-3

where Q1 and Q3 are the quartiles of the norms seen so far at that layer. No threshold exists until ``warmup``
samples have been collected (NaN in arrays, None in dicts), so nothing is a peak during warm-up.

Three sources of tau share one interface (``update`` / ``threshold`` / ``is_peak`` / ``observe``):

* ``ExactThreshold`` (tellnorm's default): exact numpy quantiles over every step of one request, as the paper text
  describes ("per decode"). Keeps the samples, so shards merge exactly.
* ``PooledP2Threshold``: what the reference code does. Two P² streaming estimators (Jain & Chlamtac 1985) per layer
  for Q1 and Q3, one sample per decode step (the mean norm over the batch), pooled across requests until
  ``reset()``. Constant memory, approximate, and not mergeable.
* ``FixedThresholds``: per-layer constants from JSON, e.g. calibrated offline.

Timing: ``observe(norms)`` checks a step against tau from the steps strictly before it and then records it, the
reference code's order. ``is_peak`` alone records nothing; ``update`` then ``is_peak`` includes the step itself.
"""

from __future__ import annotations

import bisect
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from tellnorm.errors import TellnormError

WARMUP_SUPPRESSION = 500  # REFERENCE CODE: ALRR and suppression collect 500 decode steps before thresholding
WARMUP_ERSS = 200  # REFERENCE CODE: ERSS collects 200 decode steps before thresholding
MODES = ("exact", "pooled-p2", "fixed")
QUANTILE_METHODS = (
    "inverted_cdf", "averaged_inverted_cdf", "closest_observation", "interpolated_inverted_cdf", "hazen",
    "weibull", "linear", "median_unbiased", "normal_unbiased", "lower", "higher", "midpoint", "nearest",
)
FIXED_JSON_EXAMPLE = '{"layers": {"21": 123.4}}'

Norms = np.ndarray | torch.Tensor | Sequence[float] | Mapping[int, float]
Layers = int | Sequence[int]


def _is_real(x) -> bool:
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, (bool, np.bool_))


@dataclass(frozen=True)
class ThresholdConfig:
    """The knobs of tau = Q3 + k·max(Q3 − Q1, iqr_floor); checked on construction."""

    k: float = 1.5  # PAPER §5: Q3 + k·IQR, k = 1.5
    iqr_floor: float = 1e-3  # REFERENCE CODE: IQR = max(Q3 − Q1, 1e-3), so a flat stream still gets a margin
    warmup: int | None = None  # REFERENCE CODE: steps before τ exists; None: the technique's (500; ERSS 200)
    quantile_method: str = "linear"  # TELLNORM: numpy's default quantile definition; exact mode only

    def __post_init__(self):
        if not (_is_real(self.k) and math.isfinite(self.k) and self.k > 0):
            raise TellnormError(f"threshold k must be a finite number > 0, got {self.k!r}: "
                                "use the paper's k = 1.5 or another positive multiple of the IQR")
        if not (_is_real(self.iqr_floor) and math.isfinite(self.iqr_floor) and self.iqr_floor >= 0):
            raise TellnormError(f"threshold iqr_floor must be a finite number >= 0, got {self.iqr_floor!r}: "
                                "the paper uses 1e-3")
        if self.warmup is not None and not (isinstance(self.warmup, (int, np.integer))
                                            and not isinstance(self.warmup, bool) and self.warmup >= 0):
            raise TellnormError(f"threshold warmup must be a whole number of steps >= 0, got {self.warmup!r}: "
                                f"the paper uses {WARMUP_SUPPRESSION} (ERSS: {WARMUP_ERSS})")
        if self.quantile_method not in QUANTILE_METHODS:
            raise TellnormError(f"unknown quantile method {self.quantile_method!r}: choose one of numpy's "
                                f"{', '.join(QUANTILE_METHODS)}")

    @property
    def warmup_steps(self) -> int:
        """Decode steps before τ exists: the warm-up given, else the reference code's for ALRR and suppression."""
        return WARMUP_SUPPRESSION if self.warmup is None else int(self.warmup)

    def for_technique(self, technique: str) -> ThresholdConfig:
        """This config for one technique's tracker: a warm-up given stays; None becomes the reference code's for
        that technique (ERSS 200 decode steps, ALRR and suppression 500)."""
        if self.warmup is not None:
            return self
        return replace(self, warmup=WARMUP_ERSS if technique == "erss" else WARMUP_SUPPRESSION)


def iqr_threshold(q1: float | np.ndarray | torch.Tensor, q3: float | np.ndarray | torch.Tensor, k: float,
                  iqr_floor: float) -> float | np.ndarray | torch.Tensor:
    """tau = q3 + k·max(q3 − q1, iqr_floor) (PAPER.md §5), elementwise on floats, numpy arrays or torch tensors
    (any shape, e.g. ``[layers]``); NaN stays NaN."""
    iqr = q3 - q1
    floored = torch.clamp(iqr, min=iqr_floor) if isinstance(iqr, torch.Tensor) else np.maximum(iqr, iqr_floor)
    return q3 + k * floored


def _to_numpy(values) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        return values.detach().to(device="cpu", dtype=torch.float64).numpy()
    return np.asarray(values, dtype=np.float64)


def exact_threshold(values: np.ndarray | torch.Tensor | Sequence, cfg: ThresholdConfig | None = None,
                    ) -> np.floating | np.ndarray:
    """tau (PAPER.md §5) from every value along axis 0 — ``[steps]`` (one layer's stream: a scalar) or
    ``[steps, layers]`` (per-layer ``[layers]``) — with numpy quantiles.

    Pure: ignores ``cfg.warmup``, which is the trackers' business.
    """
    cfg = cfg or ThresholdConfig()
    samples = _to_numpy(values)
    if samples.ndim == 0 or samples.shape[0] == 0:
        raise TellnormError("exact_threshold got no values: it needs at least one norm per layer")
    q1, q3 = np.quantile(samples, (0.25, 0.75), axis=0, method=cfg.quantile_method)
    return iqr_threshold(q1, q3, cfg.k, cfg.iqr_floor)


def sorted_quantile(ascending: Sequence[float], q: float) -> float:
    """numpy's default ("linear") quantile ``q`` of values already in ascending order, bit for bit (its virtual
    index ``(n-1)·q`` and its two-sided lerp), in O(1): what lets a tracker that keeps its values sorted answer
    every step without re-partitioning its whole history."""
    n = len(ascending)
    if n == 0:
        raise TellnormError("a quantile needs at least one value")
    virtual = (n - 1) * q
    if virtual >= n - 1:
        return float(ascending[-1])
    below = math.floor(virtual)
    gamma = virtual - below
    a, b = ascending[below], ascending[below + 1]
    diff = b - a
    return float(b - diff * (1 - gamma)) if gamma >= 0.5 else float(a + diff * gamma)


def _resolve_layers(layers: Layers) -> tuple[int, ...]:
    if isinstance(layers, (int, np.integer)) and not isinstance(layers, bool):
        if layers < 1:
            raise TellnormError(f"n_layers must be >= 1, got {layers}")
        return tuple(range(int(layers)))
    resolved = tuple(int(layer) for layer in layers)
    if not resolved or len(set(resolved)) != len(resolved) or min(resolved) < 0:
        raise TellnormError(f"layers must be distinct indices >= 0, got {list(resolved)}")
    return resolved


def _layer_array(norms: Norms, layers: tuple[int, ...]) -> np.ndarray:
    """norms as float64 whose last axis follows ``layers``; a dict needs every tracked layer (extras are ignored)."""
    if isinstance(norms, Mapping):
        missing = [layer for layer in layers if layer not in norms]
        if missing:
            raise TellnormError(f"norms have no value for layer(s) {missing}: give one for every tracked layer "
                                f"{list(layers)}")
        return np.array([float(norms[layer]) for layer in layers], dtype=np.float64)
    values = _to_numpy(norms)
    if values.ndim == 0 or values.shape[-1] != len(layers):
        raise TellnormError(f"norms have shape {tuple(values.shape)} but {len(layers)} layer(s) are tracked "
                            f"({list(layers)}): the last axis needs one value per tracked layer")
    return values


def _step_sample(norms: Norms, layers: tuple[int, ...], *, batch_mean: bool) -> np.ndarray:
    """One finite sample per layer for this step."""
    values = _layer_array(norms, layers)
    if batch_mean and values.ndim == 2:
        values = values.mean(axis=0)  # REFERENCE CODE: one sample per decode step = mean norm over the batch
    if values.ndim != 1:
        accepted = "layers or batch × layers" if batch_mean else "layers (exact mode tracks one request)"
        raise TellnormError(f"one step needs norms shaped {accepted}, got shape {tuple(values.shape)}")
    if not np.isfinite(values).all():
        raise TellnormError(f"norms contain NaN or inf ({values.tolist()}): one would poison every later "
                            "threshold; check the model dtype for overflow")
    return values


class PeakThreshold:
    """What every tracker shares: per-layer tau in ``layers`` order, and peak tests against it."""

    layers: tuple[int, ...]

    def threshold(self) -> np.ndarray:
        """Per-layer tau ``[layers]`` in ``layers`` order; NaN where a layer has none yet."""
        raise NotImplementedError

    def update(self, norms: Norms) -> None:
        """Record one step's norms (``[layers]``, a ``{layer: norm}`` dict, or ``[batch, layers]`` where pooled)."""
        raise NotImplementedError

    def threshold_by_layer(self) -> dict[int, float | None]:
        """{layer: tau}, None while a layer has no threshold yet (JSON-friendly)."""
        return {layer: float(tau) if np.isfinite(tau) else None for layer, tau in zip(self.layers, self.threshold())}

    def is_peak(self, norms: Norms) -> np.ndarray:
        """norms > tau per layer, as bools shaped like the array form of ``norms`` (a leading batch axis is fine).

        Records nothing, and is all False before warm-up ends.
        """
        return _layer_array(norms, self.layers) > self.threshold()

    def observe(self, norms: Norms) -> np.ndarray:
        """The reference code's order: peaks against tau from strictly earlier steps, then record this step."""
        peaks = self.is_peak(norms)
        self.update(norms)
        return peaks


class ExactThreshold(PeakThreshold):
    """Exact per-layer tau over every step of one request (tellnorm's default; PAPER §5 "per decode").

    Keeps all samples (a few thousand steps × layers is small), so quantiles are numpy's exactly. Each layer's
    values are also kept in ascending order (one insertion per step), so under numpy's default quantile method a step
    costs the same at token 8,000 as at token 500 (:func:`sorted_quantile`); other methods re-partition the history.
    """

    def __init__(self, layers: Layers, cfg: ThresholdConfig | None = None):
        self.layers = _resolve_layers(layers)
        self.cfg = cfg or ThresholdConfig()
        self._samples = np.empty((64, len(self.layers)))
        self._ascending: list[list[float]] = [[] for _ in self.layers]  # per layer, for sorted_quantile
        self._count = 0
        self._tau: np.ndarray | None = None  # cached until the next update

    @classmethod
    def from_samples(cls, samples: np.ndarray | torch.Tensor | Sequence, layers: Layers,
                     cfg: ThresholdConfig | None = None) -> ExactThreshold:
        """A tracker that has already seen ``samples`` (steps × layers), e.g. a shard's saved state."""
        tracker = cls(layers, cfg)
        rows = _to_numpy(samples)
        if rows.size == 0:
            return tracker
        if rows.ndim != 2 or rows.shape[1] != len(tracker.layers):
            raise TellnormError(f"samples have shape {tuple(rows.shape)}: expected steps × {len(tracker.layers)} "
                                f"layers ({list(tracker.layers)})")
        if not np.isfinite(rows).all():
            raise TellnormError("samples contain NaN or inf: a saved tracker state should hold only finite norms")
        tracker._append(rows)
        return tracker

    @property
    def count(self) -> int:
        """Steps recorded so far."""
        return self._count

    @property
    def ready(self) -> bool:
        """Whether warm-up is over (at least ``cfg.warmup`` steps, and one): tau exists."""
        return self._count >= max(self.cfg.warmup_steps, 1)

    def samples(self) -> np.ndarray:
        """Every recorded step, steps × layers (a copy)."""
        return self._samples[: self._count].copy()

    def update(self, norms: Norms) -> None:
        """Record one step: a length-n_layers array/tensor or a {layer: norm} dict."""
        self._append(_step_sample(norms, self.layers, batch_mean=False)[None, :])

    def _append(self, rows: np.ndarray) -> None:
        end = self._count + len(rows)
        if end > len(self._samples):  # double, so appending one step at a time stays amortised O(1)
            grown = np.empty((max(end, 2 * len(self._samples)), len(self.layers)))
            grown[: self._count] = self._samples[: self._count]
            self._samples = grown
        self._samples[self._count : end] = rows
        self._count = end
        self._tau = None
        for ascending, column in zip(self._ascending, rows.T.tolist()):
            if len(column) == 1:
                bisect.insort(ascending, column[0])
            else:
                ascending.extend(column)
                ascending.sort()

    def threshold(self) -> np.ndarray:
        """Per-layer tau from every step so far; all NaN before ``cfg.warmup`` steps."""
        if self._tau is None:
            if not self.ready:
                self._tau = np.full(len(self.layers), np.nan)
            elif self.cfg.quantile_method == "linear":
                q1, q3 = (np.array([sorted_quantile(a, q) for a in self._ascending]) for q in (0.25, 0.75))
                self._tau = iqr_threshold(q1, q3, self.cfg.k, self.cfg.iqr_floor)
            else:
                self._tau = exact_threshold(self._samples[: self._count], self.cfg)
        return self._tau.copy()

    def merge(self, other: ExactThreshold) -> ExactThreshold:
        """A new tracker holding both trackers' samples; exact, since quantiles ignore order. Inputs are untouched."""
        if not isinstance(other, ExactThreshold):
            raise TellnormError(f"cannot merge an ExactThreshold with a {type(other).__name__}: "
                                "only exact trackers keep their samples")
        if other.layers != self.layers or other.cfg != self.cfg:
            raise TellnormError("cannot merge exact trackers with different layers or configs: "
                                "build every shard's tracker from the same layers and ThresholdConfig")
        return ExactThreshold.from_samples(np.concatenate([self.samples(), other.samples()]), self.layers, self.cfg)


# P² (Jain & Chlamtac 1985). Markers 0..4 track the min, the p/2, p and (1+p)/2 quantiles, and the max. Positions
# are 0-based here (the paper's are 1-based), so the desired positions start at 0, 2p, 4p, 2+2p, 4.

def _p2_initial_desired(p: float) -> np.ndarray:
    return np.array([0.0, 2 * p, 4 * p, 2 + 2 * p, 4.0])


def _p2_desired_increments(p: float) -> np.ndarray:
    return np.array([0.0, p / 2, p, (1 + p) / 2, 1.0])


def _p2_parabolic(q_prev, q, q_next, n_prev, n, n_next, d):
    """The P² piecewise-parabolic height of a marker moved by d ∈ {−1, +1} positions; floats or arrays."""
    return q + d / (n_next - n_prev) * (
        (n - n_prev + d) * (q_next - q) / (n_next - n) + (n_next - n - d) * (q - q_prev) / (n - n_prev)
    )


def _p2_linear(q, q_toward, n, n_toward, d):
    """The fallback when the parabola would leave the neighbours' interval: interpolate toward the neighbour."""
    return q + d * (q_toward - q) / (n_toward - n)


def _check_probability(p: float) -> None:
    if not (_is_real(p) and 0 < p < 1):
        raise TellnormError(f"P² quantile p must lie strictly between 0 and 1, got {p!r}")


class P2Quantile:
    """One quantile of a stream in O(1) memory: the P² algorithm, five markers, one Python float each.

    Exact (numpy "linear") while at most five samples have been seen, since they are all still held. Textbook
    P² adjusts markers left to right, which biases low quantiles under two-sided extreme tails (Cauchy Q1: off by
    ~5-25% of the IQR at 20k samples); one-sided heavy tails, as norms have, stay within a few per cent.
    """

    def __init__(self, p: float):
        _check_probability(p)
        self.p = p
        self.count = 0
        self._first: list[float] = []
        self._heights: list[float] = []
        self._positions: list[float] = []
        self._desired: list[float] = []
        self._increments = _p2_desired_increments(p).tolist()

    @property
    def value(self) -> float:
        """The current estimate of the p-quantile; NaN before any sample."""
        if self.count == 0:
            return math.nan
        if self.count <= 5:
            return float(np.quantile(self._first, self.p))
        return self._heights[2]

    def update(self, x: float) -> None:
        """Add one finite sample and move the markers (P² step)."""
        x = float(x)
        if not math.isfinite(x):
            raise TellnormError(f"P² got a non-finite sample {x}: it would break the marker order")
        self.count += 1
        if self.count <= 5:
            self._first.append(x)
            if self.count == 5:
                self._heights = sorted(self._first)
                self._positions = [0.0, 1.0, 2.0, 3.0, 4.0]
                self._desired = _p2_initial_desired(self.p).tolist()
            return
        heights, positions = self._heights, self._positions
        heights[0], heights[4] = min(heights[0], x), max(heights[4], x)
        cell = sum(x >= heights[i] for i in (1, 2, 3))  # x falls between markers cell and cell + 1
        for i in range(cell + 1, 5):
            positions[i] += 1.0
        for i in range(5):
            self._desired[i] += self._increments[i]
        for i in (1, 2, 3):
            self._adjust(i)

    def _adjust(self, i: int) -> None:
        h, n = self._heights, self._positions
        d = self._desired[i] - n[i]
        if not ((d >= 1 and n[i + 1] - n[i] > 1) or (d <= -1 and n[i - 1] - n[i] < -1)):
            return
        step = 1.0 if d > 0 else -1.0
        height = _p2_parabolic(h[i - 1], h[i], h[i + 1], n[i - 1], n[i], n[i + 1], step)
        if not h[i - 1] < height < h[i + 1]:
            j = i + int(step)
            height = _p2_linear(h[i], h[j], n[i], n[j], step)
        h[i] = height
        n[i] += step


class P2Quantiles:
    """P2Quantile for ``n_streams`` independent streams at once (one per layer), vectorised in numpy."""

    def __init__(self, p: float, n_streams: int):
        _check_probability(p)
        self.p = p
        self.n_streams = n_streams
        self.count = 0
        self._first = np.empty((5, n_streams))
        self._heights = np.empty((n_streams, 5))
        self._positions = np.empty((n_streams, 5))
        self._desired = np.empty((n_streams, 5))
        self._increments = _p2_desired_increments(p)

    @property
    def value(self) -> np.ndarray:
        """The current p-quantile estimate per stream ``[n_streams]``; NaN before any sample."""
        if self.count == 0:
            return np.full(self.n_streams, np.nan)
        if self.count <= 5:
            return np.quantile(self._first[: self.count], self.p, axis=0)
        return self._heights[:, 2].copy()

    def update(self, x: np.ndarray | torch.Tensor | Sequence[float]) -> None:
        """Add one finite sample per stream, ``x`` ``[n_streams]``."""
        x = _to_numpy(x)
        if x.shape != (self.n_streams,):
            raise TellnormError(f"P² expected one sample per stream, shape ({self.n_streams},), got {x.shape}")
        if not np.isfinite(x).all():
            raise TellnormError(f"P² got non-finite samples {x.tolist()}: they would break the marker order")
        self.count += 1
        if self.count <= 5:
            self._first[self.count - 1] = x
            if self.count == 5:
                self._heights = np.sort(self._first, axis=0).T.copy()
                self._positions = np.tile(np.arange(5.0), (self.n_streams, 1))
                self._desired = np.tile(_p2_initial_desired(self.p), (self.n_streams, 1))
            return
        h = self._heights
        np.minimum(h[:, 0], x, out=h[:, 0])
        np.maximum(h[:, 4], x, out=h[:, 4])
        cell = (x[:, None] >= h[:, 1:4]).sum(axis=1)
        self._positions += np.arange(5) > cell[:, None]
        self._desired += self._increments
        for i in (1, 2, 3):
            self._adjust(i)

    def _adjust(self, i: int) -> None:
        h, n = self._heights, self._positions
        d = self._desired[:, i] - n[:, i]
        up = (d >= 1) & (n[:, i + 1] - n[:, i] > 1)
        down = (d <= -1) & (n[:, i - 1] - n[:, i] < -1)
        rows = np.flatnonzero(up | down)
        if rows.size == 0:
            return
        step = np.where(up[rows], 1.0, -1.0)
        q_prev, q, q_next = h[rows, i - 1], h[rows, i], h[rows, i + 1]
        n_prev, n_i, n_next = n[rows, i - 1], n[rows, i], n[rows, i + 1]
        parabolic = _p2_parabolic(q_prev, q, q_next, n_prev, n_i, n_next, step)
        linear = _p2_linear(q, np.where(step > 0, q_next, q_prev), n_i, np.where(step > 0, n_next, n_prev), step)
        h[rows, i] = np.where((q_prev < parabolic) & (parabolic < q_next), parabolic, linear)
        n[rows, i] += step


class PooledP2Threshold(PeakThreshold):
    """The reference code's tracker: P² Q1 and Q3 per layer, one sample per step, pooled across requests.

    Not mergeable: P² keeps five markers, not the samples, and two marker sets do not combine into the markers
    of the joint stream. Use ExactThreshold for sharded runs. ``cfg.quantile_method`` does not apply.
    """

    def __init__(self, layers: Layers, cfg: ThresholdConfig | None = None):
        self.layers = _resolve_layers(layers)
        self.cfg = cfg or ThresholdConfig()
        self.reset()

    def reset(self) -> None:
        """Forget every request seen so far (warm-up starts again)."""
        self._q1 = P2Quantiles(0.25, len(self.layers))
        self._q3 = P2Quantiles(0.75, len(self.layers))

    @property
    def count(self) -> int:
        """Steps recorded since the last reset."""
        return self._q1.count

    @property
    def ready(self) -> bool:
        """Whether warm-up is over (at least ``cfg.warmup`` steps, and one): tau exists."""
        return self.count >= max(self.cfg.warmup_steps, 1)

    def update(self, norms: Norms) -> None:
        """Record one step: per-layer norms, or batch × layers (pooled into the batch mean)."""
        sample = _step_sample(norms, self.layers, batch_mean=True)
        self._q1.update(sample)
        self._q3.update(sample)

    def threshold(self) -> np.ndarray:
        """Per-layer tau from the P² quartiles; all NaN before ``cfg.warmup`` steps."""
        if not self.ready:
            return np.full(len(self.layers), np.nan)
        return iqr_threshold(self._q1.value, self._q3.value, self.cfg.k, self.cfg.iqr_floor)

    def merge(self, other: PeakThreshold) -> None:
        """Always raises: P² markers do not merge (use ``ExactThreshold`` for sharded runs)."""
        raise TellnormError("pooled P² trackers cannot be merged exactly (they keep markers, not samples): "
                            "use mode 'exact' for sharded runs")


def _layer_index(key) -> int | None:
    """A JSON layer key ("21") or int as a layer index; None when it is not a whole number >= 0."""
    if ((isinstance(key, (int, np.integer)) and not isinstance(key, bool))
            or (isinstance(key, str) and key.strip().isdigit())):
        index = int(key)
    else:
        return None
    return index if index >= 0 else None


def _validated_fixed(values: Mapping, source: str) -> dict[int, float]:
    if not isinstance(values, Mapping) or not values:
        raise TellnormError(f"{source}: thresholds must be a non-empty mapping layer -> tau, like {FIXED_JSON_EXAMPLE}")
    bad_keys = [key for key in values if _layer_index(key) is None]
    if bad_keys:
        raise TellnormError(f"{source}: layer keys must be whole numbers >= 0, got {bad_keys}")
    bad_values = {key: tau for key, tau in values.items()
                  if not (_is_real(tau) and math.isfinite(tau) and tau > 0)}
    if bad_values:
        raise TellnormError(f"{source}: thresholds must be finite numbers > 0, got {bad_values}")
    resolved = {_layer_index(key): float(tau) for key, tau in values.items()}
    if len(resolved) != len(values):
        raise TellnormError(f"{source}: a layer appears twice among {list(values)}")
    return dict(sorted(resolved.items()))


class FixedThresholds(PeakThreshold):
    """Constant per-layer tau, e.g. calibrated offline. JSON form: {"layers": {"21": 123.4, ...}}."""

    ready = True  # no warm-up: the thresholds exist from the start

    def __init__(self, values: Mapping[int, float], *, source: str = "fixed thresholds"):
        self.values = _validated_fixed(values, source)
        self.layers = tuple(self.values)

    def update(self, norms: Norms) -> None:
        """Learns nothing; checks the shape so every mode can drive the same decode loop."""
        _layer_array(norms, self.layers)

    def threshold(self) -> np.ndarray:
        """The constants ``[layers]`` in ``layers`` order."""
        return np.array(list(self.values.values()))

    def to_dict(self) -> dict:
        """The JSON form ``{"layers": {"21": tau, ...}}``."""
        return {"layers": {str(layer): tau for layer, tau in self.values.items()}}

    @classmethod
    def from_dict(cls, data: Mapping, *, source: str = "fixed thresholds") -> FixedThresholds:
        """Thresholds from the JSON form (``data["layers"]``); ``source`` names it in error messages."""
        if not isinstance(data, Mapping) or not isinstance(data.get("layers"), Mapping):
            raise TellnormError(f"{source}: expected an object with a \"layers\" mapping, like {FIXED_JSON_EXAMPLE}")
        return cls(data["layers"], source=source)

    def to_json(self, path: str | Path) -> None:
        """Write the JSON form to ``path``."""
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def from_json(cls, path: str | Path) -> FixedThresholds:
        """Thresholds read from a JSON file; a missing or malformed file raises one TellnormError line."""
        path = Path(path)
        try:
            text = path.read_text()
        except FileNotFoundError:
            raise TellnormError(f"threshold file {path} does not exist: pass the right path, or write one "
                                f"like {FIXED_JSON_EXAMPLE}") from None
        except OSError as exc:
            raise TellnormError(f"cannot read threshold file {path}: {exc.strerror}") from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise TellnormError(f"threshold file {path} is not valid JSON ({exc.msg} at line {exc.lineno}, "
                                f"column {exc.colno}): expected {FIXED_JSON_EXAMPLE}") from None
        return cls.from_dict(data, source=str(path))


def _fixed_from(source) -> FixedThresholds:
    if isinstance(source, FixedThresholds):
        return source
    if isinstance(source, (str, Path)):
        return FixedThresholds.from_json(source)
    if isinstance(source, Mapping) and "layers" in source:
        return FixedThresholds.from_dict(source)
    return FixedThresholds(source)


def make_threshold(mode: str = "exact", cfg: ThresholdConfig | None = None, n_layers: Layers | None = None, *,
                   fixed: str | Path | Mapping | FixedThresholds | None = None) -> PeakThreshold:
    """The tracker for ``mode``: "exact" (default, per request), "pooled-p2" (reference code) or "fixed".

    ``n_layers`` is a count or the layer indices to track; "fixed" reads ``fixed`` (a JSON path or a mapping) and
    checks its layers against ``n_layers`` when given.
    """
    if mode not in MODES:
        raise TellnormError(f"unknown threshold mode {mode!r}: choose one of {', '.join(MODES)}")
    if mode == "fixed":
        if fixed is None:
            raise TellnormError(f"threshold mode 'fixed' needs thresholds: pass fixed= a JSON path like "
                                f"{FIXED_JSON_EXAMPLE} or a mapping")
        thresholds = _fixed_from(fixed)
        if n_layers is not None:
            _check_fixed_layers(thresholds, n_layers)
        return thresholds
    if n_layers is None:
        raise TellnormError(f"threshold mode {mode!r} needs n_layers: the layer count or the layers to track")
    tracker = ExactThreshold if mode == "exact" else PooledP2Threshold
    return tracker(n_layers, cfg)


def calibrated_thresholds(norms_by_layer: Mapping[int, Sequence[float]], cfg: ThresholdConfig | None = None, *,
                          source: str = "calibrated thresholds") -> FixedThresholds:
    """Per-layer constants τ_l = Q3 + k·IQR of a calibration corpus's norms (every value pooled, no warm-up)."""
    values = {}
    for layer, norms in norms_by_layer.items():
        norms = _to_numpy(norms)
        if norms.size == 0:
            raise TellnormError(f"no calibration norms at layer {layer}: the calibration responses have no "
                                "generated tokens there")
        values[int(layer)] = float(exact_threshold(norms, cfg))
    return FixedThresholds(values, source=source)


def _check_fixed_layers(thresholds: FixedThresholds, n_layers: Layers) -> None:
    """A layer count bounds the file's layers; explicit layers must each have a threshold."""
    if isinstance(n_layers, (int, np.integer)):
        outside = [layer for layer in thresholds.layers if layer >= n_layers]
        if outside:
            raise TellnormError(f"fixed thresholds name layer(s) {outside} but the model has {n_layers} layers")
        return
    missing = [layer for layer in _resolve_layers(n_layers) if layer not in thresholds.values]
    if missing:
        raise TellnormError(f"fixed thresholds have no value for layer(s) {missing}: add them to the file")


__all__ = [
    "MODES",
    "WARMUP_ERSS",
    "WARMUP_SUPPRESSION",
    "ExactThreshold",
    "FixedThresholds",
    "P2Quantile",
    "P2Quantiles",
    "PeakThreshold",
    "PooledP2Threshold",
    "ThresholdConfig",
    "calibrated_thresholds",
    "exact_threshold",
    "iqr_threshold",
    "make_threshold",
    "sorted_quantile",
]
