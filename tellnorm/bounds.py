"""The norm-bounds-feature-activation theorem (PAPER.md §3), checked per layer, streamed over tokens.

**1. The exact, assumption-free bound.** An sae_lens SAE first maps the residual-stream vector x to its encoder
input ``z = s(x)·x − β·b_dec`` (β = ``apply_b_dec_to_input``; s = ``input_scale`` for an SAE whose input
normalisation is applied by the caller, times the SAE's own run-time normalisation: 1 for ``none``, and for
``expected_average_only_in`` / ``covariance_whitening``, which sae_lens applies outside ``encode`` and folds into
the weights at save — folding W_enc·s, b_dec/s gives the same bound, see below; ``√d_in/‖x‖`` for
``constant_norm_rescale``; for ``layer_norm`` z = (x − mean)/(std + 1e-5) − β·b_dec, not a scale). Then, from each
architecture's own ``encode`` (sae_lens 6.54, ``saes/*.py``)::

    standard  a_i = ReLU(w_i·z + b_i)
    topk      a_i = ReLU(p_i) if p_i is among the k largest else 0,  p_i = (w_i·z + b_i)·g_i
              (g_i = ‖d_i‖ with ``rescale_acts_by_decoder_norm``, else 1)
    jumprelu  a_i = ReLU(p_i)·1[p_i > θ_i],  p_i = w_i·z + b_i
    gated     a_i = 1[w_i·z + b_gate_i > 0] · ReLU(e^{r_i}·w_i·z + b_mag_i)

Every gate (top-k, threshold, gate path) only zeroes a value, so ``a_i ≤ ReLU(u_i·z + c_i) ≤ ‖u_i‖·‖z‖ +
max(c_i, 0)`` (Cauchy–Schwarz), with (u_i, c_i) the path that sets the *value*: (w_i, b_i) for standard and
jumprelu (θ_i plays no part), (g_i·w_i, g_i·b_i) for topk, and the **magnitude path (e^{r_i}·w_i, b_mag_i) for
gated** — the gate path (w_i, b_gate_i) decides only whether the feature fires, never how much. With an input scale
folded into the weights (W_enc·s, b_dec/s, as sae_lens's ``fold_activation_norm_scaling_factor``) the bound reads
‖s·w_i‖·‖x − b_dec/s‖ = ‖w_i‖·‖s·x − b_dec‖: folded and unfolded SAEs give the same number.

Per (token, feature) the checker compares the encoder's own output with the bound: a **violation** is
``a_i > bound_i + tol_i`` (``tol_i`` from :data:`TOL_ULPS`), **tightness** is ``a_i / bound_i`` over active pairs
(a_i > 0; inactive pairs are trivially slack and would swamp the distribution). The same for the layer's summed
reasoning-feature activation ``Σ_{i∈R} ã_i ≤ Σ_{i∈R} ‖d_i‖·bound_i`` with ``ã_i = a_i·‖d_i‖`` (decoder-norm folded,
as :mod:`tellnorm.features` scores features) and R the layer's top-K contrast features; and against the norm alone:
``‖z‖ ≤ s·‖x‖ + ‖β·b_dec‖`` (triangle inequality; ≤ √d_in + ‖β·b_dec‖ under run-time normalisation) turns it into
the line ``Σ_{i∈R} ã_i ≤ A_R·‖x‖ + B_R`` drawn in the figure.

**2. The two-sided relation on paired states.** The same problem answered in both modes; states taken at marker
positions present in both responses (organism: ``answer``, the ``:`` after it, and the answer value). Per pair,
``Δ = ‖h_T‖² − ‖h_N‖²`` (raw residual stream, the paper's quantity) and ``S = Σ_{i∈R} (ã_i(h_T) − ã_i(h_N))``;
``|R_active|`` = features of R active in either state. Under A1–A4 (unit decoder directions after folding,
reasoning part orthogonal to a base part ≈ h_N, reasoning activations only growing) ``√Δ ≈ ‖Δã_R‖₂`` and
``‖v‖₂ ≤ ‖v‖₁ ≤ √|supp v|·‖v‖₂`` give ``c₁·√Δ ≤ S ≤ c₂·√|R_active|·√Δ`` with c₁ = c₂ = 1 ideally. Fit on pairs with
Δ > 0: ``c₁`` = the ``q_low`` quantile of S/√Δ, ``c₂`` = the ``q_high`` quantile of S/(√|R_active|·√Δ) over pairs
with |R_active| > 0 (numpy's linear-interpolation quantiles). Reported per layer: c₁, c₂, the fraction of Δ > 0
pairs inside the fitted band (about q_high − q_low or more, by construction) and — the actual test — inside the
*ideal* band c₁ = c₂ = 1, the fraction of pairs with Δ ≤ 0, Spearman(S, Δ), and n.

**3. The four assumptions, measured per layer** (thresholds in :class:`AssumptionThresholds`):
A1 decoder near-orthonormality on active supports: per token, |cos| between the decoder rows of every pair of
co-active features (mean and max per token; reported: the token-mean of the per-token mean, the p95 and max of the
per-token max) and the energy cross-term ``|‖Σ c_i d̂_i‖² − Σ c_i²| / Σ c_i²`` (c_i = ã_i), the error of
``‖h‖² ≈ Σ a_i²``. A2 reconstruction fidelity: mean ``‖x − x̂‖/‖x‖`` and FVU. A3 base ⟂ reasoning: on thinking
tokens, cos between the reconstruction from R, ``x̂_R = Σ_{i∈R} c_i d̂_i``, and the rest of the reconstruction
``x̂ − x̂_R`` (b_dec included: the base state carries it), in the SAE's input space; on pairs, how close the base
part is to the non-thinking state, ``‖(s·x_T − x̂_R,T) − s·x_N‖ / ‖s·x_N‖``. A4 overlap: features active (firing on
≥ ``active_rate`` of a mode's tokens) in thinking vs non-thinking tokens, their Jaccard index (also for "ever
active"), and the fraction of R active in non-thinking tokens.

Everything streams: per-layer accumulators (counts, float64 sums, fixed-grid histograms, a bottom-k hash sample of
points for the figure, and the states at the few marker positions) merge across shards; no activation cache.
Position 0 (massive activations) and padding never enter; the token scope is the contrast's (generated tokens by
default, as :func:`tellnorm.features.contrast_masks`).
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from tellnorm.errors import TellnormError
from tellnorm.generation import LayerHooks, StepInfo

if TYPE_CHECKING:
    import numpy.typing as npt
    import pandas as pd
    import torch
    from sae_lens import SAE

    from tellnorm.backends.base import ModelAPI

SUPPORTED_ARCHITECTURES = ("standard", "topk", "jumprelu", "gated")
# Normalisations that are the identity inside sae_lens's encode (applied outside, folded at save).
IDENTITY_NORMALIZATIONS = ("none", "expected_average_only_in", "covariance_whitening")
RUNTIME_NORMALIZATIONS = ("constant_norm_rescale", "layer_norm")
LAYER_NORM_EPS = 1e-5  # sae_lens run_time_activation_ln_in's default eps
# Violation tolerance: tol_i = TOL_ULPS·√d_in·ε(SAE dtype)·(‖u_i‖‖z‖ + |c_i|). The encoder's d_in-term dot product
# rounds with a typical relative error √d_in·ε of Σ|u_ij z_j| ≤ ‖u_i‖‖z‖ (rounding errors of random sign); 8× that is
# margin, while a real mismatch (a wrong encoder, a wrong bound) is off by O(1) of the bound. Rounding can only
# matter where tightness ≈ 1 − 1e-5, so max_tightness says how close the data came.
TOL_ULPS = 8
TIGHTNESS_BINS = 10_000  # fixed grid over [0, 1]: median / p99 to within 1e-4 (upper bin edge), max kept exactly
SCATTER_POINTS = 1500  # per layer, for the figure: a bottom-k sample by token hash (order- and shard-independent)
TOKEN_CHUNK = 256  # tokens encoded at once: [256, d_sae] float64 tensors (≈ 130 MB each at d_sae = 65k)
COSINE_BATCH_ELEMENTS = 20_000_000  # cap on tokens × L0 × d_in per chunk of the co-active Gram computation
PAIR_COLORS = ("#c0392b", "#d68910", "#7d3c98", "#1e8449")  # one per marker in the pairs figure
THINKING, NON_THINKING = "thinking", "non-thinking"


@dataclass(frozen=True)
class BandConfig:
    """How c₁, c₂ are fitted (quantiles of the pair ratios)."""

    q_low: float = 0.05  # [inferred] PAPER §3 gives no constants: c₁ = 5% quantile of S/√Δ
    q_high: float = 0.95  # [inferred] c₂ = 95% quantile of S/(√|R_active|·√Δ)

    def __post_init__(self):
        if not 0 <= self.q_low < self.q_high <= 1:
            raise TellnormError(f"band quantiles need 0 ≤ q_low < q_high ≤ 1, got {self.q_low}, {self.q_high}")


@dataclass(frozen=True)
class AssumptionThresholds:
    """Verdicts: "holds" when the metric is ≤ the first number, "partly" when ≤ the second, else "fails".

    PAPER §3 states A1–A4 qualitatively; these cut-offs are tellnorm's (a 10% / 30% error in the quantity each
    assumption approximates)."""

    a1_mean_cos: tuple = (0.1, 0.3)  # token-mean |cos| of co-active decoder rows
    a2_rel_error: tuple = (0.1, 0.3)  # mean ‖x − x̂‖/‖x‖ (the theorem's ε, relative)
    a3_abs_cos: tuple = (0.1, 0.3)  # mean |cos(x̂_R, x̂ − x̂_R)| on thinking tokens
    a4_reasoning_in_nonthinking: tuple = (0.2, 0.5)  # fraction of R active in non-thinking tokens
    active_rate: float = 0.01  # a feature is "active in a mode" when it fires on ≥ 1% of that mode's tokens


@dataclass(frozen=True)
class Marker:
    """A position found by token strings: ``offset`` tokens after the start of the last match of ``pattern``."""

    name: str
    pattern: tuple
    offset: int = 0


# Both organism responses end in "... answer : X" (tellnorm.organism.task.answer_text).


# --- 1. the exact bound: pure core over tensors -----------------------------------------------------------------

@dataclass(frozen=True)
class SaeGeometry:
    """What the bound and the assumption checks need from one SAE, in float64."""

    architecture: str
    normalization: str
    d_in: int
    u_norm: Any  # [d_sae] ‖u_i‖ of the value path
    c: Any  # [d_sae] bias c_i of the value path
    b_dec_in: Any  # [d_in] β·b_dec, subtracted from the (scaled) input
    b_dec: Any  # [d_in]
    dec_norm: Any  # [d_sae] ‖d_i‖ = ‖W_dec[i]‖ (the fold of tellnorm.features)
    dec_unit: Any  # [d_sae, d_in] d_i / ‖d_i‖
    coef_scale: Any  # [d_sae] coefficient of d̂_i in the decoder per unit of a_i (‖d_i‖, or 1 when topk rescales)
    rel_tol: float


def sae_geometry(sae: SAE) -> SaeGeometry:
    """Read the value path, biases and decoder of ``sae`` (see the module docstring for each architecture)."""
    import torch

    arch = sae.cfg.architecture()
    if arch not in SUPPORTED_ARCHITECTURES:
        raise TellnormError(f"the exact bound is derived for {', '.join(SUPPORTED_ARCHITECTURES)} SAEs; this SAE is "
                            f"{arch!r}")
    norm = sae.cfg.normalize_activations
    if norm not in IDENTITY_NORMALIZATIONS + RUNTIME_NORMALIZATIONS:
        raise TellnormError(f"unknown SAE input normalisation {norm!r}")
    with torch.no_grad():
        w = sae.W_enc.detach().double()
        dec = sae.W_dec.detach().double()
        dec_norm = dec.norm(dim=-1)
        coef_scale = dec_norm
        if arch == "gated":
            u, c = w * sae.r_mag.detach().double().exp(), sae.b_mag.detach().double()
        else:
            u, c = w, sae.b_enc.detach().double()
            if arch == "topk" and getattr(sae.cfg, "rescale_acts_by_decoder_norm", False):
                u, c, coef_scale = u * dec_norm, c * dec_norm, torch.ones_like(dec_norm)
        b_dec = sae.b_dec.detach().double()
    eps = torch.finfo(sae.W_enc.dtype).eps
    return SaeGeometry(arch, norm, int(sae.cfg.d_in), u.norm(dim=0), c,
                       b_dec * float(bool(sae.cfg.apply_b_dec_to_input)), b_dec, dec_norm,
                       dec / dec_norm.clamp_min(1e-30)[:, None], coef_scale, TOL_ULPS * math.sqrt(sae.cfg.d_in) * eps)


def encoder_input(geom: SaeGeometry, x: torch.Tensor, input_scale: float = 1.0) -> torch.Tensor:
    """``z = s(x)·x − β·b_dec`` in float64 ``[T, d_in]`` from ``x`` ``[T, d_in]``: what the encoder's weights
    multiply."""
    x = x.double() * input_scale
    if geom.normalization == "constant_norm_rescale":
        x = x * (math.sqrt(geom.d_in) / x.norm(dim=-1, keepdim=True))
    elif geom.normalization == "layer_norm":
        x = x - x.mean(-1, keepdim=True)
        x = x / (x.std(-1, keepdim=True) + LAYER_NORM_EPS)
    return x - geom.b_dec_in


def feature_bounds(geom: SaeGeometry, x: torch.Tensor, input_scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(bound, tol)``, float64 ``[T, d_sae]`` for ``x`` ``[T, d_in]``: the exact bound ``‖u_i‖·‖z‖ + max(c_i, 0)``
    (PAPER.md §3) and its float tolerance."""
    core = encoder_input(geom, x, input_scale).norm(dim=-1, keepdim=True) * geom.u_norm
    return core + geom.c.clamp_min(0), geom.rel_tol * (core + geom.c.abs())


def input_norm_line(geom: SaeGeometry, input_scale: float = 1.0) -> tuple[float, float]:
    """``(slope, offset)`` with ``‖z‖ ≤ slope·‖x‖ + offset`` for every x (triangle inequality)."""
    offset = float(geom.b_dec_in.norm())
    if geom.normalization in RUNTIME_NORMALIZATIONS:  # ‖s(x)·x‖ = √d_in, ‖LN(x)‖ < √(d_in − 1)
        return 0.0, math.sqrt(geom.d_in) + offset
    return abs(float(input_scale)), offset


def reasoning_line(geom: SaeGeometry, reasoning: torch.Tensor | Sequence[int],
                   input_scale: float = 1.0) -> tuple[float, float]:
    """``(A_R, B_R)`` with ``Σ_{i∈R} ã_i ≤ A_R·‖x‖ + B_R``: the bound as a function of the norm alone (PAPER.md §3).

    ``reasoning``: the feature ids R (long ``[K]``)."""
    slope, offset = input_norm_line(geom, input_scale)
    weight = float((geom.dec_norm[reasoning] * geom.u_norm[reasoning]).sum())
    bias = float((geom.dec_norm[reasoning] * geom.c[reasoning].clamp_min(0)).sum())
    return weight * slope, weight * offset + bias


@dataclass
class TokenCheck:
    """The encoder's activations on T tokens beside their bounds (all float64 ``[T, d_sae]``)."""

    acts: Any
    bound: Any
    tol: Any
    recon: Any  # the SAE's own reconstruction, float64 [T, d_in]

    @property
    def violations(self) -> torch.Tensor:
        """bool ``[T, d_sae]``: ``a_i > bound_i + tol_i``."""
        return self.acts > self.bound + self.tol

    @property
    def tightness(self) -> torch.Tensor:
        """``a_i / bound_i`` where a_i > 0 (inf where the bound is 0), 0 elsewhere; float64 ``[T, d_sae]``."""
        import torch

        active = self.acts > 0
        ratio = torch.where(self.bound > 0, self.acts / self.bound.clamp_min(1e-300),
                            torch.full_like(self.acts, math.inf))
        return torch.where(active, ratio, torch.zeros_like(self.acts))


def check_tokens(sae: SAE, x: torch.Tensor, *, input_scale: float = 1.0,
                 geometry: SaeGeometry | None = None) -> TokenCheck:
    """Encode ``input_scale·x`` (``x`` ``[T, d_in]``) with ``sae`` (its own ``encode``) and compute the exact bound
    of every activation (PAPER.md §3)."""
    import torch

    geom = geometry or sae_geometry(sae)
    with torch.no_grad():
        inputs = x if input_scale == 1.0 else x * input_scale
        acts = sae.encode(inputs)
        recon = sae.decode(acts)  # right after encode: constant_norm_rescale keeps the input scale between them
    bound, tol = feature_bounds(geom, x, input_scale)
    return TokenCheck(acts.double(), bound, tol, recon.double())


# --- streaming, mergeable accumulators -----------------------------------------------------------------------------

@dataclass
class Histogram:
    """Counts on a fixed grid of ``bins`` bins over [0, 1] plus an overflow bin (> 1), and the exact maximum.

    Mergeable by addition. ``quantile(q)`` returns the upper edge of the bin holding the ⌈q·n⌉-th smallest value
    (at most 1/bins above the exact quantile, never below it), capped at the maximum."""

    bins: int = TIGHTNESS_BINS
    counts: Any = None  # int64 [bins + 1]
    max: float = math.nan

    def __post_init__(self):
        if self.counts is None:
            self.counts = np.zeros(self.bins + 1, dtype=np.int64)

    @property
    def n(self) -> int:
        """How many values were added."""
        return int(self.counts.sum())

    def add(self, values: npt.ArrayLike) -> None:
        """Count ``values`` (any shape, flattened) on the grid and update the maximum."""
        v = np.asarray(values, dtype=np.float64).ravel()
        if v.size == 0:
            return
        idx = np.minimum(np.floor(np.clip(v, 0.0, 1.0) * self.bins), self.bins - 1).astype(np.int64)
        idx[v > 1.0] = self.bins
        self.counts += np.bincount(idx, minlength=self.bins + 1)
        top = float(v.max())
        self.max = top if math.isnan(self.max) else max(self.max, top)

    def merge(self, other: Histogram) -> Histogram:
        """A new histogram of both inputs' values (same grid only)."""
        if other.bins != self.bins:
            raise TellnormError("cannot merge histograms on different grids")
        tops = [m for m in (self.max, other.max) if not math.isnan(m)]
        return Histogram(self.bins, self.counts + other.counts, max(tops) if tops else math.nan)

    def quantile(self, q: float) -> float:
        """The ``q`` quantile to within one bin (upper bin edge, capped at the maximum); NaN when empty."""
        n = self.n
        if n == 0:
            return math.nan
        rank = max(1, math.ceil(q * n))
        i = int(np.searchsorted(np.cumsum(self.counts), rank))
        return self.max if i >= self.bins else min((i + 1) / self.bins, self.max)


@dataclass
class PointSample:
    """A bottom-k sample of points by a per-token hash priority: the same k points whatever the order or sharding."""

    k: int = SCATTER_POINTS
    columns: dict = field(default_factory=dict)  # name -> ndarray; "priority" always present

    def add(self, priority: npt.ArrayLike, **columns: npt.ArrayLike) -> None:
        """Add points (one ``priority`` and one value per column each) and keep the ``k`` lowest priorities."""
        new = {"priority": np.asarray(priority, dtype=np.float64),
               **{name: np.asarray(v) for name, v in columns.items()}}
        if self.columns:
            new = {name: np.concatenate([self.columns[name], new[name]]) for name in new}
        keep = np.lexsort((np.arange(new["priority"].size), new["priority"]))[: self.k]
        self.columns = {name: v[keep] for name, v in new.items()}

    def merge(self, other: PointSample) -> PointSample:
        """The sample of both inputs' points together (what one pass over all of them would keep)."""
        out = PointSample(self.k, dict(self.columns))
        if other.columns:
            out.add(**other.columns)
        return out

    def frame(self) -> pd.DataFrame:
        """The sampled points, one row each, in priority order."""
        import pandas as pd

        return pd.DataFrame(self.columns).sort_values("priority", kind="stable").reset_index(drop=True)


@dataclass
class LayerBounds:
    """Per layer: the exact check over (token, feature) pairs and over the reasoning sum. Mergeable."""

    n_tokens: int = 0
    n_checked: int = 0
    n_active: int = 0
    violations: int = 0
    tightness: Histogram = field(default_factory=Histogram)
    sum_tokens: int = 0  # tokens with Σ_R ã > 0
    sum_violations: int = 0
    sum_tightness: Histogram = field(default_factory=Histogram)
    line_violations: int = 0
    line_tightness: Histogram = field(default_factory=Histogram)
    sample: PointSample = field(default_factory=PointSample)

    def add(self, check: TokenCheck, geom: SaeGeometry, reasoning: torch.Tensor, line: tuple[float, float],
            norms: torch.Tensor, modes: Sequence[str], priority: npt.ArrayLike) -> None:
        """Add T checked tokens: per-feature violations and tightness, the reasoning sum against its bound and
        against the norm ``line``, and the figure sample (``norms`` float64 ``[T]``, one mode and priority each)."""
        t, d_sae = check.acts.shape
        self.n_tokens += t
        self.n_checked += t * d_sae
        active = check.acts > 0
        self.n_active += int(active.sum())
        self.violations += int(check.violations.sum())
        self.tightness.add(check.tightness[active].numpy())
        fold = geom.dec_norm[reasoning]
        total = (check.acts[:, reasoning] * fold).sum(1)
        total_bound = (check.bound[:, reasoning] * fold).sum(1)
        total_tol = (check.tol[:, reasoning] * fold).sum(1)
        line_bound = line[0] * norms + line[1]
        fired = total > 0
        self.sum_tokens += int(fired.sum())
        self.sum_violations += int((total > total_bound + total_tol).sum())
        self.sum_tightness.add((total[fired] / total_bound[fired]).numpy())
        self.line_violations += int((total > line_bound * (1 + geom.rel_tol) + total_tol).sum())
        self.line_tightness.add((total[fired] / line_bound[fired]).numpy())
        self.sample.add(priority, norm=norms.numpy(), reasoning_sum=total.numpy(), mode=np.asarray(modes))

    def merge(self, other: LayerBounds) -> LayerBounds:
        """The statistics of both shards together."""
        return LayerBounds(self.n_tokens + other.n_tokens, self.n_checked + other.n_checked,
                           self.n_active + other.n_active, self.violations + other.violations,
                           self.tightness.merge(other.tightness), self.sum_tokens + other.sum_tokens,
                           self.sum_violations + other.sum_violations, self.sum_tightness.merge(other.sum_tightness),
                           self.line_violations + other.line_violations,
                           self.line_tightness.merge(other.line_tightness), self.sample.merge(other.sample))


def coactive_cosines(active: torch.Tensor, dec_unit: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per token: mean and max |cos| over pairs of distinct co-active features' decoder rows, and the pair count.

    ``active`` bool ``[T, d_sae]``, ``dec_unit`` ``[d_sae, d_in]``; tokens with < 2 active features get NaN."""
    import torch

    t = active.shape[0]
    mean = torch.full((t,), math.nan, dtype=torch.float64)
    top = torch.full((t,), math.nan, dtype=torch.float64)
    counts = active.sum(1)
    pairs = counts * (counts - 1)
    width = int(counts.max()) if t else 0
    if width < 2:
        return mean, top, pairs
    chunk = max(1, COSINE_BATCH_ELEMENTS // (width * width + width * dec_unit.shape[1]))
    for start in range(0, t, chunk):
        part = active[start : start + chunk].to(torch.float32)
        idx = torch.topk(part, width, dim=1, sorted=True).indices  # active features first
        valid = torch.arange(width)[None, :] < counts[start : start + chunk, None]
        vecs = dec_unit[idx]  # [t, width, d_in]
        gram = (vecs @ vecs.transpose(1, 2)).abs()
        off = valid[:, :, None] & valid[:, None, :] & ~torch.eye(width, dtype=torch.bool)[None]
        gram = torch.where(off, gram, torch.zeros_like(gram))
        n = pairs[start : start + chunk].double()
        ok = n > 0
        mean[start : start + chunk] = torch.where(ok, gram.sum((1, 2)) / n.clamp_min(1), torch.full_like(n, math.nan))
        top[start : start + chunk] = torch.where(ok, gram.amax((1, 2)), torch.full_like(n, math.nan))
    return mean, top, pairs


@dataclass
class LayerAssumptions:
    """Per layer: sufficient statistics of A1–A4. Mergeable."""

    quality: Any = None  # tellnorm.saes.quality.QualitySums: FVU, L0 (the SAE quality report's own statistics)
    rel_error_sum: float = 0.0
    a1_tokens: int = 0  # tokens with ≥ 2 co-active features
    a1_mean_cos_sum: float = 0.0
    a1_max_cos: Histogram = field(default_factory=Histogram)
    energy_tokens: int = 0
    energy_sum: float = 0.0
    a3_tokens: int = 0  # thinking tokens
    a3_with_reasoning: int = 0  # ... on which some feature of R fires
    a3_cos_sum: float = 0.0
    a3_abs_cos_sum: float = 0.0
    fire_counts: dict = field(default_factory=dict)  # mode -> int64 [d_sae]
    mode_tokens: dict = field(default_factory=dict)  # mode -> int

    def add(self, x: torch.Tensor, check: TokenCheck, geom: SaeGeometry, reasoning: torch.Tensor,
            modes: Sequence[str], thinking_mask: Sequence[bool], input_scale: float) -> None:
        """Add T tokens (``x`` ``[T, d_in]``, their check, one mode and thinking flag each) to the A1–A4
        statistics (PAPER.md §3)."""
        import torch

        from tellnorm.saes.quality import QualitySums

        x64 = x.double() * input_scale  # the SAE's input; its reconstruction lives in the same space
        part = QualitySums()
        part.add(x64, check.recon, check.acts)
        self.quality = part if self.quality is None else self.quality.merge(part)
        self.rel_error_sum += float(((x64 - check.recon).norm(dim=-1) / x64.norm(dim=-1).clamp_min(1e-30)).sum())
        active = check.acts > 0
        mean_cos, max_cos, _ = coactive_cosines(active, geom.dec_unit.float())
        has_pairs = ~torch.isnan(mean_cos)
        self.a1_tokens += int(has_pairs.sum())
        self.a1_mean_cos_sum += float(mean_cos[has_pairs].sum())
        self.a1_max_cos.add(max_cos[has_pairs].numpy())
        coef = check.acts * geom.coef_scale
        vec = coef @ geom.dec_unit
        energy = (coef ** 2).sum(1)
        some = energy > 0
        self.energy_tokens += int(some.sum())
        self.energy_sum += float(((vec[some] ** 2).sum(1) - energy[some]).abs().div(energy[some]).sum())
        think = torch.as_tensor(thinking_mask, dtype=torch.bool)
        self.a3_tokens += int(think.sum())
        reason_vec = coef[:, reasoning] @ geom.dec_unit[reasoning]
        base = vec + geom.b_dec - reason_vec
        cos = torch.nn.functional.cosine_similarity(reason_vec, base, dim=-1)
        ok = think & (reason_vec.norm(dim=-1) > 0) & (base.norm(dim=-1) > 0)
        self.a3_with_reasoning += int(ok.sum())
        self.a3_cos_sum += float(cos[ok].sum())
        self.a3_abs_cos_sum += float(cos[ok].abs().sum())
        for mode in set(modes):
            rows = torch.as_tensor([m == mode for m in modes], dtype=torch.bool)
            fired = active[rows].sum(0).numpy().astype(np.int64)
            self.fire_counts[mode] = self.fire_counts.get(mode, 0) + fired
            self.mode_tokens[mode] = self.mode_tokens.get(mode, 0) + int(rows.sum())

    def merge(self, other: LayerAssumptions) -> LayerAssumptions:
        """The statistics of both shards together."""
        quality = (other.quality if self.quality is None else
                   self.quality if other.quality is None else self.quality.merge(other.quality))
        counts = dict(self.fire_counts)
        tokens = dict(self.mode_tokens)
        for mode, value in other.fire_counts.items():
            counts[mode] = counts.get(mode, 0) + value
            tokens[mode] = tokens.get(mode, 0) + other.mode_tokens[mode]
        return LayerAssumptions(quality, self.rel_error_sum + other.rel_error_sum, self.a1_tokens + other.a1_tokens,
                                self.a1_mean_cos_sum + other.a1_mean_cos_sum, self.a1_max_cos.merge(other.a1_max_cos),
                                self.energy_tokens + other.energy_tokens, self.energy_sum + other.energy_sum,
                                self.a3_tokens + other.a3_tokens, self.a3_with_reasoning + other.a3_with_reasoning,
                                self.a3_cos_sum + other.a3_cos_sum, self.a3_abs_cos_sum + other.a3_abs_cos_sum,
                                counts, tokens)


@dataclass
class PairState:
    """One layer's state at one marker position: what the paired analysis needs (a few d_in vectors in all)."""

    norm_sq: float  # ‖x‖² of the raw residual stream
    reasoning_sum: float  # Σ_{i∈R} ã_i
    reasoning_active: Any  # bool [K]: which features of R fire
    sae_input: Any  # s·x (float32 [d_in]; two such vectors per marker position and layer are all that is kept)
    reasoning_recon: Any  # x̂_R = Σ_{i∈R} c_i d̂_i (float32 [d_in])


@dataclass
class BoundsSums:
    """Everything the bounds study accumulates, per layer; ``merge`` combines shards (e.g. prompt subsets)."""

    bounds: dict = field(default_factory=dict)  # layer -> LayerBounds
    assumptions: dict = field(default_factory=dict)  # layer -> LayerAssumptions
    states: dict = field(default_factory=dict)  # (request_id, position, layer) -> PairState

    def merge(self, other: BoundsSums) -> BoundsSums:
        """Both shards' per-layer statistics merged and their captured states together."""
        out = BoundsSums(dict(self.bounds), dict(self.assumptions), {**self.states, **other.states})
        for layer, value in other.bounds.items():
            out.bounds[layer] = out.bounds[layer].merge(value) if layer in out.bounds else value
        for layer, value in other.assumptions.items():
            out.assumptions[layer] = out.assumptions[layer].merge(value) if layer in out.assumptions else value
        return out


def token_priority(request_id: Hashable, position: int) -> float:
    """A token's sampling priority in [0, 1): a hash of (request, position), the same in any batch or shard."""
    return zlib.crc32(f"{request_id!r}:{int(position)}".encode()) / 2 ** 32


@dataclass
class _Batch:
    select: Any  # bool [b, s]: tokens that enter the statistics
    modes: list  # per selected token (row-major order)
    request_ids: list
    positions: list
    priority: Any
    capture: list  # (index into selected tokens, request_id, position)

    def part(self, start: int, stop: int) -> _Batch:
        """Tokens ``start:stop`` of the selection (capture indices shifted to the part)."""
        return _Batch(None, self.modes[start:stop], self.request_ids[start:stop], self.positions[start:stop],
                      self.priority[start:stop], [(i - start, r, p) for i, r, p in self.capture if start <= i < stop])


class BoundsObserver(LayerHooks):
    """Observer for :func:`tellnorm.generation.run_forward`: per layer, encodes the in-scope tokens with that
    layer's SAE and adds them to :class:`BoundsSums`; keeps the states at ``capture`` positions for the pairs."""

    edits_stream = False  # records only (vLLM under tensor parallelism runs it on one rank)

    def __init__(self, model: ModelAPI, saes: Mapping[int, SAE], masks: Mapping[Any, Mapping[str, Sequence[bool]]],
                 reasoning: Mapping[int, Sequence[int]], capture: Mapping[Any, Iterable[int]] | None = None, *,
                 input_scale: float = 1.0, sample_size: int = SCATTER_POINTS):
        import torch

        super().__init__(model, saes)
        self.saes = dict(saes)
        self.geometry = {layer: sae_geometry(sae) for layer, sae in self.saes.items()}
        self.reasoning = {layer: torch.as_tensor(list(reasoning[layer]), dtype=torch.long) for layer in self.saes}
        self.lines = {layer: reasoning_line(self.geometry[layer], self.reasoning[layer], input_scale)
                      for layer in self.saes}
        self._masks = {rid: {mode: torch.as_tensor(m, dtype=torch.bool) for mode, m in buckets.items()}
                       for rid, buckets in masks.items()}
        self._capture = {rid: set(positions) for rid, positions in (capture or {}).items()}
        self.input_scale = input_scale
        self.sums = BoundsSums()
        self._sample_size = sample_size
        self._modes: list = []
        self._batch: _Batch | None = None

    def on_step(self, info: StepInfo) -> None:
        """Work out, once per pass, which tokens enter the statistics (their mode, priority, capture)."""
        import torch

        super().on_step(info)
        code = torch.full(info.valid.shape, -1, dtype=torch.long)  # index into self._modes, -1: not selected
        for row, rid in enumerate(info.request_ids):
            real = info.valid[row] & (info.positions[row] > 0)
            pos = info.positions[row]
            for mode, mask in self._masks.get(rid, {}).items():
                if mode not in self._modes:
                    self._modes.append(mode)
                inside = pos < len(mask)
                chosen = torch.zeros_like(real)
                chosen[inside] = mask[pos[inside]]
                code[row][chosen & real] = self._modes.index(mode)
        select = code >= 0
        rows = select.nonzero(as_tuple=True)[0].tolist()
        modes = [self._modes[c] for c in code[select].tolist()]
        rids = [info.request_ids[r] for r in rows]
        positions = info.positions[select].tolist()
        capture = [(i, rid, pos) for i, (rid, pos) in enumerate(zip(rids, positions))
                   if pos in self._capture.get(rid, ())]
        priority = np.array([token_priority(r, p) for r, p in zip(rids, positions)], dtype=np.float64)
        self._batch = _Batch(select, modes, rids, positions, priority, capture)

    def hook_for(self, layer: int) -> Callable[..., Any]:
        """The hook at ``layer``: checks the selected tokens of ``x`` ``[batch, seq, d_model]``, ``TOKEN_CHUNK`` at
        a time; returns ``x`` unchanged."""
        import torch

        def hook(x, hook):
            batch = self._batch
            if batch is None or not batch.modes:
                return x
            with torch.no_grad():
                tokens = x[batch.select.to(x.device)].float().cpu()
                for start in range(0, len(batch.modes), TOKEN_CHUNK):
                    self._add(layer, tokens[start : start + TOKEN_CHUNK], batch.part(start, start + TOKEN_CHUNK))
            return x
        return hook

    def _add(self, layer: int, tokens, batch: _Batch) -> None:
        geom, reasoning, sae = self.geometry[layer], self.reasoning[layer], self.saes[layer]
        check = check_tokens(sae, tokens, input_scale=self.input_scale, geometry=geom)
        norms = tokens.double().norm(dim=-1)
        bounds = self.sums.bounds.setdefault(layer, LayerBounds(sample=PointSample(self._sample_size)))
        bounds.add(check, geom, reasoning, self.lines[layer], norms, batch.modes, batch.priority)
        thinking = [m == THINKING for m in batch.modes]
        self.sums.assumptions.setdefault(layer, LayerAssumptions()).add(
            tokens, check, geom, reasoning, batch.modes, thinking, self.input_scale)
        if batch.capture:
            idx = [i for i, _, _ in batch.capture]
            coef = check.acts[idx] * geom.coef_scale
            recon_r = coef[:, reasoning] @ geom.dec_unit[reasoning]
            sae_input = encoder_input(geom, tokens[idx], self.input_scale) + geom.b_dec_in
            for j, (i, rid, pos) in enumerate(batch.capture):
                acts_r = check.acts[i, reasoning]
                self.sums.states[(rid, pos, layer)] = PairState(
                    float(norms[i] ** 2), float((acts_r * geom.dec_norm[reasoning]).sum()),
                    (acts_r > 0).numpy(), sae_input[j].float().numpy(), recon_r[j].float().numpy())


# --- 2. pairs: positions present in both modes, and the two-sided fit ---------------------------------------------

def find_marker(tokens: Sequence[str], marker: Marker, start: int = 0) -> int | None:
    """Position of ``marker`` in ``tokens[start:]`` (last match of its pattern, plus offset), or None."""
    pattern = tuple(marker.pattern)
    m = len(pattern)
    for s in range(len(tokens) - m, start - 1, -1):
        if tuple(tokens[s : s + m]) == pattern:
            pos = s + marker.offset
            return pos if start <= pos < len(tokens) else None
    return None


def pair_positions(tokens_t: Sequence[str], tokens_n: Sequence[str], markers: Sequence[Marker], *,
                   start_t: int = 0, start_n: int = 0) -> list[tuple[str, int, int]]:
    """``(marker, position in the thinking response, position in the non-thinking one)`` for every marker found in
    both token lists (searched from ``start_*``, e.g. the prompt length)."""
    out = []
    for marker in markers:
        pt, pn = find_marker(tokens_t, marker, start_t), find_marker(tokens_n, marker, start_n)
        if pt is not None and pn is not None:
            out.append((marker.name, pt, pn))
    return out


def problem_pairs(modes: Sequence[str]) -> list[tuple[int, int]]:
    """``(thinking index, non-thinking index)`` of each problem: the k-th request of one mode with the k-th of the
    other (the order :func:`tellnorm.studies.corpus.contrast_corpus` writes)."""
    think = [i for i, m in enumerate(modes) if m == THINKING]
    nothink = [i for i, m in enumerate(modes) if m == NON_THINKING]
    if len(think) != len(nothink):
        raise TellnormError(f"the corpus has {len(think)} thinking and {len(nothink)} non-thinking responses: the "
                            "paired analysis needs every problem answered in both modes")
    return list(zip(think, nothink))


def pair_frame(states: Mapping, pairs: Sequence[tuple], layers: Sequence[int]) -> pd.DataFrame:
    """One row per (layer, problem, marker): Δ, S, |R_active| and the A3 base check, from captured states.

    ``pairs``: ``(problem, marker, request_t, position_t, request_n, position_n)``."""
    import pandas as pd

    rows = []
    for layer in layers:
        for problem, marker, rt, pt, rn, pn in pairs:
            t, n = states.get((rt, pt, layer)), states.get((rn, pn, layer))
            if t is None or n is None:
                continue
            u_n = n.sae_input.astype(np.float64)
            base = t.sae_input.astype(np.float64) - t.reasoning_recon
            nrm = float(np.linalg.norm(u_n))
            rows.append({"layer": layer, "problem": problem, "marker": marker, "delta": t.norm_sq - n.norm_sq,
                         "reasoning_delta": t.reasoning_sum - n.reasoning_sum,
                         "r_active": int((t.reasoning_active | n.reasoning_active).sum()),
                         "base_vs_nonthinking": float(np.linalg.norm(base - u_n)) / nrm if nrm > 0 else math.nan})
    columns = ["layer", "problem", "marker", "delta", "reasoning_delta", "r_active", "base_vs_nonthinking"]
    return pd.DataFrame(rows, columns=columns)


def fit_band(delta: npt.ArrayLike, s: npt.ArrayLike, r_active: npt.ArrayLike, band: BandConfig = BandConfig()) -> dict:
    """The two-sided fit ``c₁·√Δ ≤ S ≤ c₂·√|R_active|·√Δ`` (PAPER.md §3) on pairs with Δ > 0 (definitions in the
    module docstring); ``delta``, ``s``, ``r_active``: one value per pair."""
    from tellnorm.stats import spearman

    delta, s, r = (np.asarray(v, dtype=np.float64) for v in (delta, s, r_active))
    n = int(delta.size)
    pos = delta > 0
    out = {"n_pairs": n, "n_delta_positive": int(pos.sum()),
           "frac_delta_nonpositive": float((~pos).mean()) if n else math.nan,
           "c1": math.nan, "c2": math.nan, "in_band": math.nan, "in_band_ideal": math.nan,
           "frac_s_positive": math.nan, "spearman_s_delta_x100": math.nan}
    if not pos.any():
        return out
    d, sv, rv = delta[pos], s[pos], r[pos]
    root = np.sqrt(d)
    c1 = float(np.quantile(sv / root, band.q_low))
    upper = rv > 0
    c2 = float(np.quantile(sv[upper] / (np.sqrt(rv[upper]) * root[upper]), band.q_high)) if upper.any() else math.nan

    def inside(lo, hi):
        top = np.where(rv > 0, hi * np.sqrt(rv) * root, 0.0)  # S = 0 exactly when no feature of R fires
        return float(((lo * root <= sv) & (sv <= top)).mean())

    out.update(c1=c1, c2=c2, in_band=inside(c1, c2) if upper.any() else math.nan, in_band_ideal=inside(1.0, 1.0),
               frac_s_positive=float((sv > 0).mean()), spearman_s_delta_x100=100 * spearman(sv, d))
    return out


def pairs_table(frame: pd.DataFrame, layers: Sequence[int], band: BandConfig = BandConfig()) -> pd.DataFrame:
    """Per layer: c₁, c₂, in-band fractions, n, and the median A3 base check (see :func:`fit_band`)."""
    import pandas as pd

    rows = []
    for layer in layers:
        g = frame[frame.layer == layer]
        fit = fit_band(g.delta, g.reasoning_delta, g.r_active, band)
        rows.append({"layer": layer, **fit, "median_r_active": float(g.r_active.median()) if len(g) else math.nan,
                     "median_base_vs_nonthinking": float(g.base_vs_nonthinking.median()) if len(g) else math.nan,
                     "q_low": band.q_low, "q_high": band.q_high})
    return pd.DataFrame(rows)


# --- tables -------------------------------------------------------------------------------------------------------

def bounds_table(sums: BoundsSums, geometry: Mapping[int, SaeGeometry]) -> pd.DataFrame:
    """One row per layer: the exact check (per feature and for the reasoning sum) and its tightness."""
    import pandas as pd

    rows = []
    for layer in sorted(sums.bounds):
        b = sums.bounds[layer]
        rows.append({"layer": layer, "architecture": geometry[layer].architecture, "n_tokens": b.n_tokens,
                     "n_checked": b.n_checked, "n_active": b.n_active, "violations": b.violations,
                     "median_tightness": b.tightness.quantile(0.5), "p99_tightness": b.tightness.quantile(0.99),
                     "max_tightness": b.tightness.max, "sum_n_tokens": b.sum_tokens,
                     "sum_violations": b.sum_violations, "sum_median_tightness": b.sum_tightness.quantile(0.5),
                     "sum_p99_tightness": b.sum_tightness.quantile(0.99), "sum_max_tightness": b.sum_tightness.max,
                     "norm_line_violations": b.line_violations,
                     "norm_line_median_tightness": b.line_tightness.quantile(0.5),
                     "norm_line_max_tightness": b.line_tightness.max, "rel_tol": geometry[layer].rel_tol})
    return pd.DataFrame(rows)


def verdict(value: float, limits: tuple) -> str:
    """"holds" / "partly" / "fails" for a metric where smaller is better; "n/a" when it could not be measured."""
    if value is None or math.isnan(value):
        return "n/a"
    return "holds" if value <= limits[0] else "partly" if value <= limits[1] else "fails"


def assumptions_table(sums: BoundsSums, reasoning: Mapping[int, Sequence[int]],
                      thresholds: AssumptionThresholds = AssumptionThresholds()) -> pd.DataFrame:
    """One row per layer: the A1–A4 measurements and a verdict column per assumption."""
    import pandas as pd

    nan = math.nan
    rows = []
    for layer in sorted(sums.assumptions):
        a = sums.assumptions[layer]
        q = a.quality
        think_n, nothink_n = a.mode_tokens.get(THINKING, 0), a.mode_tokens.get(NON_THINKING, 0)
        zero = np.zeros_like(next(iter(a.fire_counts.values())))
        think_c, nothink_c = a.fire_counts.get(THINKING, zero), a.fire_counts.get(NON_THINKING, zero)
        rate_t = think_c / think_n if think_n else zero.astype(float)
        rate_n = nothink_c / nothink_n if nothink_n else zero.astype(float)
        act_t, act_n = rate_t >= thresholds.active_rate, rate_n >= thresholds.active_rate
        ever_t, ever_n = think_c > 0, nothink_c > 0
        r = np.asarray(list(reasoning[layer]), dtype=np.int64)
        row = {
            "layer": layer,
            "a1_mean_cos": a.a1_mean_cos_sum / a.a1_tokens if a.a1_tokens else nan,
            "a1_p95_max_cos": a.a1_max_cos.quantile(0.95), "a1_max_cos": a.a1_max_cos.max,
            "a1_energy_cross_ratio": a.energy_sum / a.energy_tokens if a.energy_tokens else nan,
            "a1_tokens": a.a1_tokens,
            "a2_rel_error": a.rel_error_sum / q.n_tokens if q and q.n_tokens else nan,
            "a2_fvu": q.fvu() if q and q.n_tokens else nan, "l0": q.sum_l0 / q.n_tokens if q and q.n_tokens else nan,
            "a3_mean_cos": a.a3_cos_sum / a.a3_with_reasoning if a.a3_with_reasoning else nan,
            "a3_mean_abs_cos": a.a3_abs_cos_sum / a.a3_with_reasoning if a.a3_with_reasoning else nan,
            "a3_reasoning_token_fraction": a.a3_with_reasoning / a.a3_tokens if a.a3_tokens else nan,
            "a4_active_thinking": int(act_t.sum()), "a4_active_non_thinking": int(act_n.sum()),
            "a4_jaccard": _jaccard(act_t, act_n), "a4_jaccard_ever": _jaccard(ever_t, ever_n),
            "a4_reasoning_active_in_non_thinking": float(act_n[r].mean()) if r.size and nothink_n else nan,
            "n_thinking_tokens": think_n, "n_non_thinking_tokens": nothink_n,
        }
        row["a1_verdict"] = verdict(row["a1_mean_cos"], thresholds.a1_mean_cos)
        row["a2_verdict"] = verdict(row["a2_rel_error"], thresholds.a2_rel_error)
        row["a3_verdict"] = verdict(row["a3_mean_abs_cos"], thresholds.a3_abs_cos)
        row["a4_verdict"] = verdict(row["a4_reasoning_active_in_non_thinking"], thresholds.a4_reasoning_in_nonthinking)
        rows.append(row)
    return pd.DataFrame(rows)


def _jaccard(a, b) -> float:
    union = int((a | b).sum())
    return int((a & b).sum()) / union if union else math.nan


def collect_bounds(model: ModelAPI, saes: Mapping[int, SAE], sequences: Sequence[Sequence[int]],
                   masks: Mapping[Any, Mapping[str, Sequence[bool]]], reasoning: Mapping[int, Sequence[int]], *,
                   capture: Mapping[Any, Iterable[int]] | None = None, request_ids: Sequence | None = None,
                   input_scale: float = 1.0, batch_size: int = 16) -> BoundsSums:
    """One teacher-forced pass accumulating :class:`BoundsSums` (shard by calling on prompt subsets, then merge)."""
    from tellnorm.generation import run_forward

    observer = BoundsObserver(model, saes, masks, reasoning, capture, input_scale=input_scale)
    run_forward(model, sequences, request_ids=request_ids, observers=[observer], batch_size=batch_size)
    return observer.sums
