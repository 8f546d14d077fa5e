"""What a feature dashboard shows, computed in one streaming pass and kept apart from its HTML (like sae_vis).

``collect_dashboard_data(model, sae, layer, feature_ids, sequences, ...)`` runs teacher-forced forward passes
(:func:`tellnorm.generation.run_forward`) with an observer hooked at ``model.hook_name(layer)``. Inside the hook it
encodes the real tokens with the SAE, a bounded chunk of tokens at a time, and keeps only the chosen features:

* the running top-k activating tokens of each feature, with the feature's activations on a context window around
  each (filled in when the example enters the top-k, so no per-token history is stored); a token whose whole
  prefix repeats one already kept (e.g. inside a chat template every sequence shares) is kept once, since a causal
  model gives it the same activation;
* an exact histogram of the positive activations over fixed-width bins whose width doubles (merging bins pairwise)
  when a larger value arrives, so memory stays ``n_bins`` counts per feature whatever the data;
* co-moments of (activation, ‖h‖₂) merged batch by batch (Chan et al.), for the Pearson correlation of the feature
  with the norm of the very vector the SAE reads.

Left padding and position 0 (massive activations, PAPER.md §1) never enter examples or statistics; position-0
tokens inside a context window are shown with no activation.

Logit effects are the decoder direction through the unembedding, ``W_dec[f] @ W_U`` with
``W_U = lm_head.weight.T``; the final RMSNorm (and its learned scale) is ignored, as usual for such logit-lens views.
Encoding, logit effects, the correlation and the means come from :mod:`tellnorm.apps.feature_stats`, shared with
the explorer.

Results are :class:`FeatureDashboardData` dataclasses that round-trip through JSON (``to_json`` / ``from_json``);
:mod:`tellnorm.apps.dashboards.html` renders them.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tellnorm.apps.feature_stats import (
    display_tokens,
    encode_chunks,
    logit_tops,
    norm_correlation,
    optional,
    sae_name,
    safe_mean,
    unembedding,
)
from tellnorm.errors import TellnormError
from tellnorm.generation import LayerHooks, run_forward
from tellnorm.norms import l2_norm

SCHEMA_VERSION = 1
DEFAULT_BINS = 40
ENCODE_BUDGET = 2**25  # elements of the [tokens, d_sae] SAE output alive at once (128 MiB in float32)


# ----------------------------------------------------------------------------------------------- data classes


@dataclass
class ContextExample:
    """One top-activating token and the feature's activations on the tokens around it."""

    sequence: int  # index of the sequence in the ``sequences`` given to collect_dashboard_data
    position: int  # position of the token within its sequence
    activation: float
    tokens: list[str]  # display text of the context tokens
    token_ids: list[int]
    activations: list[float | None]  # per context token; None where excluded (position 0)
    center: int  # index of the example token in ``tokens``

    @property
    def start(self) -> int:
        """Position of the first context token in its sequence."""
        return self.position - self.center


@dataclass
class Histogram:
    """Counts of positive activations in ``[edges[i], edges[i+1])``; ``n_zero`` tokens where the feature is off."""

    edges: list[float]
    counts: list[int]
    n_zero: int

    @property
    def total(self) -> int:
        """Every token counted: active ones in the bins plus ``n_zero``."""
        return self.n_zero + sum(self.counts)


@dataclass
class LogitEffect:
    """A token the feature's decoder direction promotes or suppresses, and its logit effect."""

    token: str
    token_id: int
    value: float


@dataclass
class NormCorrelation:
    """Pearson r between the feature's activation and ‖h‖₂ at the hook, over ``n`` tokens (None if undefined)."""

    r: float | None
    n: int
    mean_norm_active: float | None  # mean ‖h‖₂ over tokens where the feature fires
    mean_norm_inactive: float | None


@dataclass
class FeatureDashboardData:
    """Everything one feature's dashboard card shows; round-trips through JSON."""

    layer: int
    feature: int
    d_sae: int
    hook_name: str
    model_name: str
    sae_name: str
    n_sequences: int
    n_tokens: int  # eligible tokens seen (no padding, no position 0)
    n_active: int  # of which the feature is > 0
    max_activation: float
    mean_activation_when_active: float | None
    examples: list[ContextExample]
    histogram: Histogram
    promoted: list[LogitEffect]
    suppressed: list[LogitEffect]
    norm_correlation: NormCorrelation
    scores: dict[str, float] = field(default_factory=dict)
    version: int = SCHEMA_VERSION

    @property
    def density(self) -> float:
        """Share of the eligible tokens where the feature fires."""
        return self.n_active / self.n_tokens if self.n_tokens else 0.0

    @property
    def key(self) -> str:
        """``L<layer>-F<feature>``."""
        return f"L{self.layer}-F{self.feature}"

    def to_dict(self) -> dict:
        """A JSON-ready dict (NaN and inf as None)."""
        return _finite(asdict(self))

    def to_json(self, path: str | Path | None = None, *, indent: int | None = None) -> str:
        """The JSON text; also written atomically to ``path`` when given."""
        text = json.dumps(self.to_dict(), indent=indent, allow_nan=False)
        if path is not None:
            _write_text(path, text + "\n")
        return text

    @classmethod
    def from_dict(cls, d: dict) -> FeatureDashboardData:
        """The data back from :meth:`to_dict`'s dict; checks the schema version."""
        d = dict(d)
        version = d.get("version", SCHEMA_VERSION)
        if version != SCHEMA_VERSION:
            raise TellnormError(f"dashboard data has schema version {version}; this tellnorm reads version "
                                f"{SCHEMA_VERSION}: recompute it with collect_dashboard_data")
        try:
            d["examples"] = [ContextExample(**e) for e in d["examples"]]
            d["histogram"] = Histogram(**d["histogram"])
            d["promoted"] = [LogitEffect(**e) for e in d["promoted"]]
            d["suppressed"] = [LogitEffect(**e) for e in d["suppressed"]]
            d["norm_correlation"] = NormCorrelation(**d["norm_correlation"])
            return cls(**d)
        except (KeyError, TypeError) as err:
            raise TellnormError(f"not feature dashboard data ({type(err).__name__}: {err})") from None

    @classmethod
    def from_json(cls, text_or_path: str | Path) -> FeatureDashboardData:
        """Parse JSON text, or read a ``.json`` file written by :meth:`to_json`."""
        return cls.from_dict(_read_json(text_or_path))


def save_dashboard_data(data_list: Sequence[FeatureDashboardData], path: str | Path) -> Path:
    """Write several features' data to one JSON file (a list), atomically."""
    text = json.dumps([d.to_dict() for d in data_list], allow_nan=False)
    return _write_text(path, text + "\n")


def load_dashboard_data(text_or_path: str | Path) -> list[FeatureDashboardData]:
    """Several features' data from JSON text or a file written by :func:`save_dashboard_data` (or ``to_json``)."""
    obj = _read_json(text_or_path)
    items = obj if isinstance(obj, list) else [obj]
    return [FeatureDashboardData.from_dict(d) for d in items]


def _write_text(path, text: str) -> Path:
    from tellnorm.io import atomic_path

    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def _read_json(text_or_path):
    is_text = isinstance(text_or_path, str) and text_or_path.lstrip().startswith(("{", "["))
    if not is_text:
        path = Path(text_or_path)
        if not path.is_file():
            raise TellnormError(f"{path} does not exist: pass dashboard JSON text or a file written by to_json")
        text_or_path = path.read_text(encoding="utf-8")
    try:
        return json.loads(text_or_path)
    except json.JSONDecodeError as err:
        raise TellnormError(f"dashboard data is not valid JSON ({err.msg} at line {err.lineno})") from None


def _finite(obj):
    """NaN/inf -> None so the JSON is standard (JSON has no NaN)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


# ----------------------------------------------------------------------------------------------- selection


def top_feature_ids(scores: dict[int, dict[str, float]], k: int = 10, key: str = "reason_score") -> list[int]:
    """The ``k`` features with the largest ``scores[f][key]`` (e.g. the top reasoning features of a layer)."""
    ranked = [(v[key], f) for f, v in scores.items() if v.get(key) is not None and math.isfinite(v[key])]
    if not ranked:
        raise TellnormError(f"no feature has a finite {key!r} score: compute scores first or pass feature ids")
    return [int(f) for _, f in sorted(ranked, key=lambda t: (-t[0], t[1]))[:k]]


def _check_features(feature_ids, d_sae: int) -> list[int]:
    import numbers

    ids = list(feature_ids) if feature_ids is not None else []
    if not ids:
        raise TellnormError("no features chosen: pass at least one feature id (or scores to pick the top ones)")
    out: list[int] = []
    for f in ids:
        if isinstance(f, bool) or not isinstance(f, numbers.Integral):
            raise TellnormError(f"feature id {f!r} is not an integer: feature ids index the SAE's d_sae={d_sae} "
                                "latents")
        if not 0 <= int(f) < d_sae:
            raise TellnormError(f"feature id {int(f)} is out of range: the SAE has d_sae={d_sae} features "
                                f"(ids 0..{d_sae - 1})")
        if int(f) not in out:
            out.append(int(f))
    return out


# ----------------------------------------------------------------------------------------------- collection


class _DoublingHistogram:
    """Exact histogram of positive values over ``n_bins`` bins ``[k*w, (k+1)*w)``; ``w`` doubles when needed.

    Doubling merges bins pairwise, which keeps every count exact: floor(v / 2w) == floor(floor(v / w) / 2), and
    multiplying by 2 is exact in floating point.
    """

    def __init__(self, n_features: int, n_bins: int):
        import torch

        self.n_bins = n_bins + n_bins % 2  # even, so bins merge pairwise
        n_bins = self.n_bins
        self.width = torch.zeros(n_features, dtype=torch.float64)  # 0 until the first positive value
        self.counts = torch.zeros(n_features, n_bins, dtype=torch.int64)
        self.n_zero = torch.zeros(n_features, dtype=torch.int64)

    def add(self, acts) -> None:
        """``acts``: ``[tokens, n_features]`` float."""
        import torch

        acts = acts.double()
        positive = acts > 0
        self.n_zero += (~positive).sum(0)
        vmax = torch.where(positive, acts, torch.zeros_like(acts)).amax(0) if len(acts) else None
        for j in range(self.counts.shape[0]):
            values = acts[positive[:, j], j]
            if values.numel() == 0:
                continue
            top = float(vmax[j])
            if self.width[j] == 0:
                # A power of two just above max / n_bins: bins stay aligned as they double.
                self.width[j] = 2.0 ** math.ceil(math.log2(top / self.n_bins)) if top > 0 else 1.0
                while top >= self.width[j] * self.n_bins:
                    self.width[j] *= 2
            while top >= self.width[j] * self.n_bins:
                merged = self.counts[j].view(-1, 2).sum(1)
                self.counts[j] = torch.cat([merged, torch.zeros_like(merged)])
                self.width[j] *= 2
            index = torch.floor(values / self.width[j]).long().clamp_(0, self.n_bins - 1)
            self.counts[j] += torch.bincount(index, minlength=self.n_bins)

    def result(self, j: int) -> Histogram:
        w = float(self.width[j])
        counts = self.counts[j].tolist()
        if w == 0:  # never active
            return Histogram(edges=[], counts=[], n_zero=int(self.n_zero[j]))
        last = max(i for i, c in enumerate(counts) if c) + 1  # drop the empty upper bins
        return Histogram(edges=[i * w for i in range(last + 1)], counts=counts[:last], n_zero=int(self.n_zero[j]))


class _CoMoments:
    """Running mean / M2 / co-moment of (activation_j, norm) for every feature j, merged batch by batch."""

    def __init__(self, n_features: int):
        import torch

        self.n = 0
        self.mean_y = 0.0
        self.m2_y = 0.0
        self.mean_x = torch.zeros(n_features, dtype=torch.float64)
        self.m2_x = torch.zeros(n_features, dtype=torch.float64)
        self.c_xy = torch.zeros(n_features, dtype=torch.float64)
        self.norm_sum_active = torch.zeros(n_features, dtype=torch.float64)
        self.n_active = torch.zeros(n_features, dtype=torch.int64)
        self.norm_sum = 0.0

    def add(self, acts, norms) -> None:
        nb = len(norms)
        if nb == 0:
            return
        x, y = acts.double(), norms.double()
        mx, my = x.mean(0), float(y.mean())
        dx, dy = x - mx, y - my
        m2x, m2y, cxy = (dx * dx).sum(0), float((dy * dy).sum()), (dx * dy[:, None]).sum(0)
        n = self.n + nb
        delta_x, delta_y = mx - self.mean_x, my - self.mean_y
        self.c_xy += cxy + delta_x * delta_y * self.n * nb / n
        self.m2_x += m2x + delta_x**2 * self.n * nb / n
        self.m2_y += m2y + delta_y**2 * self.n * nb / n
        self.mean_x += delta_x * nb / n
        self.mean_y += delta_y * nb / n
        self.n = n
        active = x > 0
        self.norm_sum_active += (active * y[:, None]).sum(0)
        self.n_active += active.sum(0)
        self.norm_sum += float(y.sum())

    def result(self, j: int) -> NormCorrelation:
        n_act = int(self.n_active[j])
        norm_sum_active = float(self.norm_sum_active[j])
        return NormCorrelation(
            r=optional(norm_correlation(float(self.c_xy[j]), float(self.m2_x[j]), self.m2_y)),
            n=self.n,
            mean_norm_active=optional(safe_mean(norm_sum_active, n_act)),
            mean_norm_inactive=optional(safe_mean(self.norm_sum - norm_sum_active, self.n - n_act)),
        )


class FeatureActivationObserver(LayerHooks):
    """Observer for :func:`run_forward`: streams the chosen features' statistics at one hook (module docstring)."""

    def __init__(self, model: Any, sae: Any, layer: int, feature_ids: Sequence[int], *, n_examples: int = 10,
                 context: tuple[int, int] = (12, 4), n_bins: int = DEFAULT_BINS, point: str = "resid_post",
                 encode_chunk: int | None = None, sequences: Sequence[Sequence[int]] | None = None):
        import torch

        super().__init__(model, [layer], point)
        self.hook = self.hook_names[0]
        self.sae = sae
        self.features = list(feature_ids)
        self.index = torch.tensor(self.features, dtype=torch.long)
        self.n_examples = n_examples
        self.left, self.right = context
        self.encode_chunk = encode_chunk or max(1, min(4096, ENCODE_BUDGET // int(sae.cfg.d_sae)))
        self.hist = _DoublingHistogram(len(self.features), n_bins)
        self.moments = _CoMoments(len(self.features))
        self.max_act = torch.zeros(len(self.features), dtype=torch.float64)
        self.sum_active = torch.zeros(len(self.features), dtype=torch.float64)
        # Per feature: (activation, request_id, position, context activations, context start, prefix hash)
        self.top: list[list[tuple]] = [[] for _ in self.features]
        # Token ids by request id, to show identical prefixes (e.g. a shared chat template) once; None: no dedup.
        self.sequences = sequences

    def hook_for(self, layer: int) -> Callable:
        """The hook recording the chosen features at the (one) observed layer."""
        return self._record

    def _encode(self, h):
        """Chosen-feature activations of ``h`` ``[tokens, d_model]``, encoding ``encode_chunk`` tokens at a time."""
        import torch

        parts = [acts for _, acts in encode_chunks(self.sae, h, self.encode_chunk, self.index)]
        return torch.cat(parts) if parts else torch.zeros(0, len(self.features))

    def _record(self, activation, hook):
        import torch

        info = self.info
        if info is None:
            raise TellnormError("FeatureActivationObserver needs run_forward/generate to tell it what the rows are")
        with torch.no_grad():
            valid, positions = info.valid.cpu(), info.positions.cpu()
            eligible = valid & (positions > 0)
            h = activation.detach()
            batch, seq = eligible.shape
            rows, cols = eligible.nonzero(as_tuple=True)
            acts = self._encode(h[rows.to(h.device), cols.to(h.device)])  # [n_eligible, F]
            norms = l2_norm(h[rows.to(h.device), cols.to(h.device)]).cpu()
            if not torch.isfinite(acts).all() or not torch.isfinite(norms).all():
                raise TellnormError(f"non-finite activation or SAE output at {self.hook}: check the model's and "
                                    "SAE's dtype and weights")
            self.hist.add(acts)
            self.moments.add(acts, norms)
            if len(acts):
                self.max_act = torch.maximum(self.max_act, acts.double().amax(0))
                self.sum_active += torch.where(acts > 0, acts, torch.zeros_like(acts)).double().sum(0)
            # The batch's activations laid out as [batch, seq, F], NaN where not eligible, for context windows.
            grid = torch.full((batch, seq, len(self.features)), float("nan"))
            grid[rows, cols] = acts
            self._update_top(acts, rows, cols, grid, valid, positions, info.request_ids)
        return activation

    def _update_top(self, acts, rows, cols, grid, valid, positions, request_ids) -> None:
        import torch

        k = self.n_examples
        if len(acts) == 0 or k == 0:
            return
        for j in range(len(self.features)):
            current = self.top[j]
            floor = current[-1][0] if len(current) >= k else 0.0
            candidates = (acts[:, j] > floor).nonzero().squeeze(1)
            if candidates.numel() == 0:
                continue
            vals, order = torch.sort(acts[candidates, j], descending=True)
            accepted = 0
            # Walk down the batch's tokens until k new examples entered: repeats are skipped, not counted.
            for v, i in zip(vals.tolist(), candidates[order].tolist()):
                if accepted == k:
                    break
                r, c = int(rows[i]), int(cols[i])
                pos = int(positions[r, c])
                if self.sequences is not None:
                    # Same prefix, same activation (causal model): a repeat adds nothing to the dashboard.
                    prefix = hash(tuple(self.sequences[request_ids[r]][: pos + 1]))
                    if any(prefix == t[5] for t in current):
                        continue
                else:
                    prefix = None
                lo, hi = max(c - self.left, 0), min(c + self.right + 1, grid.shape[1])
                real = valid[r, lo:hi]
                lo_real = lo + int((~real).sum()) if not real.all() else lo  # left padding is contiguous
                window = grid[r, lo_real:hi, j].tolist()
                current.append((v, request_ids[r], pos, window, int(positions[r, lo_real]), prefix))
                accepted += 1
            current.sort(key=lambda t: -t[0])
            del current[k:]

    def feature_results(self, j: int) -> dict:
        """Feature ``j``'s counts, max, mean when active, histogram, norm correlation and top examples."""
        hist = self.hist.result(j)
        n_active = sum(hist.counts)
        return {
            "n_tokens": hist.total,
            "n_active": n_active,
            "max_activation": float(self.max_act[j]),
            "mean_activation_when_active": optional(safe_mean(float(self.sum_active[j]), n_active)),
            "histogram": hist,
            "norm_correlation": self.moments.result(j),
            "top": self.top[j],
        }


def logit_effects(model: Any, sae: Any, feature: int, k: int = 10) -> tuple[list[LogitEffect], list[LogitEffect]]:
    """Top promoted / suppressed tokens of ``W_dec[feature] @ W_U`` (final RMSNorm ignored)."""
    up_ids, up_values, down_ids, down_values = (a.tolist() for a in logit_tops(sae.W_dec[feature],
                                                                                unembedding(model), k))
    promoted = [LogitEffect(t, i, v) for t, i, v in zip(display_tokens(model, up_ids), up_ids, up_values)]
    suppressed = [LogitEffect(t, i, v) for t, i, v in zip(display_tokens(model, down_ids), down_ids, down_values)]
    return promoted, suppressed


def collect_dashboard_data(
    model: Any,
    sae: Any,
    layer: int,
    feature_ids: Sequence[int] | None,
    sequences: Sequence[Sequence[int]],
    *,
    scores: dict[int, dict[str, float]] | None = None,
    n_examples: int = 10,
    context: tuple[int, int] = (12, 4),
    batch_size: int = 8,
    n_logits: int = 10,
    n_bins: int = DEFAULT_BINS,
    point: str = "resid_post",
    n_default_features: int = 10,
    score_key: str = "reason_score",
) -> list[FeatureDashboardData]:
    """Dashboard data of ``feature_ids`` of ``sae`` (read at ``model.hook_name(layer, point)``) over ``sequences``.

    ``sequences`` are lists of token ids (e.g. prompt + reasoning trace); they are run teacher-forced in left-padded
    batches of ``batch_size``. ``feature_ids=None`` picks the ``n_default_features`` features with the largest
    ``scores[f][score_key]`` (the top reasoning features). ``scores`` maps a feature id to numbers shown on its card,
    e.g. ``{"differential": ..., "reason_score": ...}``. ``context=(left, right)``: tokens shown around each example.
    """
    import torch

    from tellnorm.backends import load_model

    model = load_model(model)
    d_sae, d_in = int(sae.cfg.d_sae), int(sae.cfg.d_in)
    if d_in != model.d_model:
        raise TellnormError(f"the SAE reads vectors of size d_in={d_in} but {model.name} has d_model="
                            f"{model.d_model}: use an SAE trained on this model")
    hook = model.hook_name(layer, point)  # validates layer and point
    sae_hook = getattr(sae.cfg.metadata, "hook_name", None)
    if sae_hook and sae_hook != hook:
        raise TellnormError(f"the SAE was trained on {sae_hook!r} but the dashboard reads {hook!r}: pass the layer "
                            "and point the SAE was trained on")
    if feature_ids is None and scores:
        feature_ids = top_feature_ids(scores, n_default_features, score_key)
    features = _check_features(feature_ids, d_sae)
    sequences = [list(map(int, s)) for s in sequences]
    if not sequences:
        raise TellnormError("no sequences: pass token-id lists (e.g. prompts with their reasoning traces)")
    left, right = context
    if min(left, right) < 0 or n_examples < 0 or batch_size < 1 or n_bins < 2:
        raise TellnormError("need context=(left, right) ≥ 0, n_examples ≥ 0, batch_size ≥ 1 and n_bins ≥ 2")

    observer = FeatureActivationObserver(model, sae, layer, features, n_examples=n_examples, context=context,
                                         n_bins=n_bins, point=point, sequences=sequences)
    was_training = sae.training
    sae.eval()
    try:
        with torch.no_grad():
            run_forward(model, sequences, batch_size=batch_size, observers=[observer])
    finally:
        sae.train(was_training)

    name = sae_name(sae)
    scores = scores or {}
    out = []
    for j, f in enumerate(features):
        res = observer.feature_results(j)
        examples = []
        for value, rid, pos, window, start, _ in res["top"]:
            ids = sequences[rid][start : start + len(window)]
            examples.append(ContextExample(
                sequence=int(rid), position=pos, activation=float(value), tokens=display_tokens(model, ids),
                token_ids=ids, activations=[None if math.isnan(a) else float(a) for a in window], center=pos - start,
            ))
        promoted, suppressed = logit_effects(model, sae, f, n_logits)
        feature_scores = scores.get(f, scores.get(str(f), {})) or {}
        out.append(FeatureDashboardData(
            layer=layer, feature=f, d_sae=d_sae, hook_name=hook, model_name=str(model.name),
            sae_name=name, n_sequences=len(sequences),
            n_tokens=res["n_tokens"], n_active=res["n_active"], max_activation=res["max_activation"],
            mean_activation_when_active=res["mean_activation_when_active"], examples=examples,
            histogram=res["histogram"], promoted=promoted, suppressed=suppressed,
            norm_correlation=res["norm_correlation"],
            scores={str(k): float(v) for k, v in feature_scores.items() if v is not None},
        ))
    return out
