"""Does the norm track SAE reasoning activation across layers, and better than other intrinsic signals? (PAPER.md §4)

Tokens: the generated tokens of thinking-mode responses (prompt and position 0 excluded), at every layer with an
SAE. Each signal's per-layer **profile** is its mean over these tokens, pooled over problems (Σ per-problem sums /
Σ token counts). Signals, per token t and layer l (entropies in nats):

- ``norm``: ‖h_l‖₂, h_l = ``blocks.l.hook_resid_post`` (raw residual stream).
- ``reasoning_activation`` (the reference): ``(1/K)·Σ_{i∈R_l} ã_i(h_l)``, ã_i = a_i·‖d_i‖, R_l the layer's top-K
  features by the paper's contrast Δ (:func:`tellnorm.bounds.reasoning_features`); on the whole corpus the profile
  equals :func:`tellnorm.features.top_k_scores`'s ``thinking`` column.
- ``layer_output_entropy`` (logit lens): ``H(softmax(unembed(final_norm(h_l))))`` with the model's own final norm
  and unembedding (bias included).
- ``hidden_state_entropy``: ``H(p)``, ``p_j = h_{l,j}² / ‖h_l‖²`` — the entropy of the energy distribution over the
  d_model coordinates. Chosen over ``softmax(h_l)``, which depends on the scale of h (so partly re-expresses the
  norm) and is dominated by a few massive coordinates; this one is scale-free.
- ``attention_entropy``: mean over heads of ``H(A_l[head, t, :])``, the entropy of token t's attention row
  (``blocks.l.attn.hook_pattern``). Rows cover the t+1 tokens ≤ t, so the maximum entropy grows with position (a
  position confound; the prompt prefix keeps it mild).
- ``final_output_entropy``: ``H(softmax(logits_t))``, the model's next-token distribution (= the logit lens at the
  last layer). It is one number per token, **not per layer**: its per-layer profile is constant, so a Spearman
  across layers is undefined and is reported as NaN with that reason. Following the paper's question (does the
  signal track reasoning?) it is correlated **across problems** instead (basis ``problems``): per thinking-mode
  problem, its mean final entropy against its reasoning activation (mean over the SAE layers of the problem's
  per-layer top-K activation). The norm is reported on that basis too (mean over the same layers), for comparison.

Spearman ρ (×100) = the Pearson correlation of average ranks (scipy's definition; NaN for a constant input). CI:
percentile bootstrap over problems (:func:`tellnorm.stats.bootstrap_ci`, its resamples and seed, the same resamples
for every signal): resample problems, recompute both profiles from the per-problem sums, recompute ρ. R stays fixed
(chosen once on the whole corpus, as in the paper): the CI is conditional on R.

With L layers a rank correlation is coarse: swapping two adjacent ranks moves ρ by 1200/(L(L²−1)) points (2.4 for
L = 8), so ``correlation_layers.csv`` gives the per-layer values every ρ is computed from.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np

from tellnorm.errors import TellnormError
from tellnorm.features import DEFAULT_TOP_K
from tellnorm.generation import LayerHooks

REFERENCE = "reasoning_activation"
LAYER_SIGNALS = ("norm", "layer_output_entropy", "hidden_state_entropy", "attention_entropy")
FINAL = "final_output_entropy"
PROFILE_SIGNALS = (REFERENCE,) + LAYER_SIGNALS
MIN_LAYERS = 3  # a rank correlation across fewer layers says nothing
ENTROPY_CHUNK = 256  # tokens per chunk of SAE encoding and float64 softmax (a real vocabulary is ~150k wide)
# PAPER §4, Spearman ×100 with the per-layer SAE reasoning activation on Qwen3-1.7B / 8B / 14B and
# DeepSeek-R1-Distill-Llama-8B (86.47, 85.15, 87.62, 84.11); only ranges were recovered for the other signals.
PAPER_SPEARMAN_X100 = {"norm": "84.11 to 87.62", FINAL: "52 to 64", "layer_output_entropy": "-72 to -20",
                       "hidden_state_entropy": "-72 to -20", "attention_entropy": "-72 to -20"}


# --- pure core: entropies and Spearman ----------------------------------------------------------------------------

def entropy_from_logits(logits, chunk: int = ENTROPY_CHUNK):
    """``H(softmax(logits))`` per row in nats, float64 ``[T]`` (computed in float64, ``chunk`` rows at a time)."""
    import torch

    out = []
    for start in range(0, logits.shape[0], chunk):
        logp = torch.log_softmax(logits[start : start + chunk].double(), dim=-1)
        out.append(-(logp.exp() * logp).sum(-1))
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.float64)


def distribution_entropy(p, dim: int = -1):
    """``−Σ p log p`` along ``dim`` (0·log 0 = 0), float64."""
    import torch

    p = p.double()
    return -torch.special.xlogy(p, p).sum(dim)


def hidden_state_entropy(h):
    """Entropy of ``h_j² / ‖h‖²`` over the coordinates, per row (float64 ``[T]``; 0 for a zero vector)."""
    sq = h.double() ** 2
    return distribution_entropy(sq / sq.sum(-1, keepdim=True).clamp_min(1e-300))


def attention_entropy(rows):
    """Mean over heads of the entropy of each attention row: ``rows`` ``[T, heads, keys]`` → float64 ``[T]``."""
    return distribution_entropy(rows).mean(-1)


def spearman(x, y) -> float:
    """Spearman's ρ: Pearson correlation of average ranks; NaN when fewer than 2 points or an input is constant."""
    from scipy.stats import rankdata

    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if x.size != y.size:
        raise TellnormError(f"Spearman needs paired values, got {x.size} and {y.size}")
    if x.size < 2 or np.ptp(x) == 0 or np.ptp(y) == 0 or not (np.isfinite(x).all() and np.isfinite(y).all()):
        return math.nan
    rx, ry = rankdata(x) - (x.size + 1) / 2, rankdata(y) - (y.size + 1) / 2
    return float((rx * ry).sum() / math.sqrt((rx ** 2).sum() * (ry ** 2).sum()))


def spearman_with_ci(statistic_of, n: int, *, seed: int = 0) -> tuple[float, float, float]:
    """``statistic_of(indices)`` on all problems and its bootstrap 95% CI over problems (×100 all three)."""
    from tellnorm.stats import bootstrap_ci

    point = statistic_of(np.arange(n))
    if n < 2 or math.isnan(point):
        return 100 * point, math.nan, math.nan
    lo, hi = bootstrap_ci(np.arange(n, dtype=np.float64), lambda idx: statistic_of(idx.astype(np.int64)), seed=seed)
    return 100 * point, 100 * lo, 100 * hi


# --- streaming per-problem sums -----------------------------------------------------------------------------------

@dataclass
class SignalSums:
    """Per problem: its token count, and per signal the sum over its tokens (per layer; final entropy: one sum).

    Mergeable over shards of problems (a problem seen in two shards adds up)."""

    layers: list
    problems: dict = field(default_factory=dict)  # problem id -> {"count": int, FINAL: float, signal: ndarray[L]}

    def entry(self, problem) -> dict:
        if problem not in self.problems:
            self.problems[problem] = {"count": 0, FINAL: 0.0,
                                      **{s: np.zeros(len(self.layers)) for s in PROFILE_SIGNALS}}
        return self.problems[problem]

    def merge(self, other: "SignalSums") -> "SignalSums":
        if list(other.layers) != list(self.layers):
            raise TellnormError("cannot merge signal sums over different layers")
        out = SignalSums(list(self.layers))
        for source in (self, other):
            for problem, e in source.problems.items():
                mine = out.entry(problem)
                for key, value in e.items():
                    mine[key] = mine[key] + value
        return out

    def arrays(self):
        """``(problem ids, counts [P], {signal: sums [P, L]}, final sums [P])`` over problems with tokens."""
        ids = [p for p in self.problems if self.problems[p]["count"] > 0]
        counts = np.array([self.problems[p]["count"] for p in ids], dtype=np.float64)
        sums = {s: np.array([self.problems[p][s] for p in ids]).reshape(len(ids), len(self.layers))
                for s in PROFILE_SIGNALS}
        return ids, counts, sums, np.array([self.problems[p][FINAL] for p in ids], dtype=np.float64)


def _original(module):
    """The HF module under a TransformerBridge wrapper (calling the wrapper would fire its hooks again)."""
    return getattr(module, "_original_component", module)


def lens_logits(model, h):
    """The logit lens: ``h`` through the model's own final norm, unembedding and HF's post-unembedding steps
    (Granite's ``logits_scaling``, Gemma 2/3's final-logit soft cap), so at the last layer it is the model's output."""
    import torch

    config = model.hf_model.config
    logits = _original(model.hf_model.lm_head)(_original(model.hf_model.model.norm)(h))
    scaling = getattr(config, "logits_scaling", None)
    if scaling is not None and scaling != 1:
        logits = logits / scaling
    cap = getattr(config, "final_logit_softcapping", None)
    if cap is not None:
        logits = torch.tanh(logits / cap) * cap
    return logits


class SignalObserver(LayerHooks):
    """Observer for :func:`tellnorm.generation.run_forward`: adds every signal of the selected tokens (those at or
    after ``starts[request_id]``, position 0 never) to per-problem :class:`SignalSums`."""

    def __init__(self, model, saes: Mapping[int, Any], reasoning: Mapping[int, Sequence[int]],
                 starts: Mapping[Any, int]):
        import torch

        super().__init__(model, saes)
        self.saes = dict(saes)
        self.reasoning = {layer: torch.as_tensor(list(reasoning[layer]), dtype=torch.long) for layer in self.saes}
        self.fold = {layer: sae.W_dec.detach().norm(dim=-1)[self.reasoning[layer]].double()
                     for layer, sae in self.saes.items()}
        self.starts = dict(starts)
        self.sums = SignalSums(list(self.layers))
        self.attention_seen = set()
        self._select = None
        self._slot_ids: list = []  # request ids of this batch's selected tokens, in first-seen order
        self._slot = np.zeros(0, dtype=np.int64)  # per selected token: index into _slot_ids

    def hooks(self, model=None):
        patterns = [(f"blocks.{layer}.attn.hook_pattern", self._pattern_hook(i)) for i, layer in enumerate(self.layers)]
        return super().hooks(model) + patterns + [("unembed.hook_out", self._logits_hook)]

    def on_step(self, info) -> None:
        import torch

        super().on_step(info)
        start = torch.tensor([max(1, self.starts.get(rid, 1 << 30)) for rid in info.request_ids])
        self._select = info.valid & (info.positions >= start[:, None])
        rows = self._select.nonzero(as_tuple=True)[0].numpy()
        self._slot_ids = list(dict.fromkeys(info.request_ids[r] for r in rows))
        slot_of = {rid: k for k, rid in enumerate(self._slot_ids)}
        self._slot = np.array([slot_of[info.request_ids[r]] for r in rows], dtype=np.int64)
        for rid, n in zip(self._slot_ids, np.bincount(self._slot, minlength=len(self._slot_ids))):
            self.sums.entry(rid)["count"] += int(n)

    def _add(self, signal: str, index: int | None, values) -> None:
        totals = np.bincount(self._slot, weights=values.double().cpu().numpy(), minlength=len(self._slot_ids))
        for rid, total in zip(self._slot_ids, totals):
            e = self.sums.entry(rid)
            if index is None:
                e[signal] += float(total)
            else:
                e[signal][index] += float(total)

    def _selected(self, tensor):
        return tensor[self._select.to(tensor.device)]

    def hook_for(self, layer: int):
        import torch

        i = self.layers.index(layer)

        def hook(x, hook):
            if self._select is None or not self._slot_ids:
                return x
            with torch.no_grad():
                h = self._selected(x).float()
                R, sae = self.reasoning[layer], self.saes[layer]
                reason = torch.cat([(sae.encode(h[s : s + ENTROPY_CHUNK])[:, R].double() * self.fold[layer]).sum(-1)
                                    for s in range(0, h.shape[0], ENTROPY_CHUNK)]) / len(R)
                self._add("norm", i, torch.linalg.vector_norm(h.double(), dim=-1))
                self._add(REFERENCE, i, reason)
                self._add("layer_output_entropy", i, self.logit_lens_entropy(h))
                self._add("hidden_state_entropy", i, hidden_state_entropy(h))
            return x
        return hook

    def logit_lens_entropy(self, h):
        """``H(softmax(lens_logits(h)))`` per row, ``ENTROPY_CHUNK`` rows at a time."""
        import torch

        parts = [entropy_from_logits(lens_logits(self.model, h[s : s + ENTROPY_CHUNK]))
                 for s in range(0, h.shape[0], ENTROPY_CHUNK)]
        return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64)

    def _pattern_hook(self, i: int):
        def hook(pattern, hook):
            if self._select is not None and self._slot_ids:
                rows = self._selected(pattern.transpose(1, 2))  # [T, heads, keys]
                self._add("attention_entropy", i, attention_entropy(rows))
                self.attention_seen.add(i)
            return pattern
        return hook

    def _logits_hook(self, logits, hook):
        if self._select is not None and self._slot_ids:
            self._add(FINAL, None, entropy_from_logits(self._selected(logits)))
        return logits


def collect_signals(model, saes, reasoning, sequences, starts, *, request_ids=None, batch_size: int = 16):
    """One teacher-forced pass; returns the observer (its ``sums``, and which layers exposed attention)."""
    from tellnorm.generation import run_forward

    observer = SignalObserver(model, saes, reasoning, starts)
    run_forward(model, sequences, request_ids=request_ids, observers=[observer], batch_size=batch_size)
    return observer


# --- tables -------------------------------------------------------------------------------------------------------

def layer_values(sums: SignalSums):
    """One row per layer: the token count and every signal's pooled mean (the profiles ρ is computed from)."""
    import pandas as pd

    _, counts, per_problem, final = sums.arrays()
    total = counts.sum()
    frame = pd.DataFrame({"layer": sums.layers, "n_tokens": int(total)})
    for signal in PROFILE_SIGNALS:
        frame[signal] = per_problem[signal].sum(0) / total if total else math.nan
    frame[FINAL] = final.sum() / total if total else math.nan  # constant: one value per token, not per layer
    frame["norm_rank"] = frame["norm"].rank()
    frame[REFERENCE + "_rank"] = frame[REFERENCE].rank()
    return frame


def correlation_table(sums: SignalSums, *, attention_layers: Sequence[int] | None = None, seed: int = 0):
    """``signal, basis, spearman_x100, ci_low, ci_high, n, note`` (definitions in the module docstring)."""
    import pandas as pd

    ids, counts, per_problem, final = sums.arrays()
    n_layers = len(sums.layers)
    n = len(ids)
    step = 1200 / (n_layers * (n_layers ** 2 - 1)) if n_layers > 1 else math.nan
    coarse = (f"across {n_layers} layers: one swap of adjacent ranks moves rho by {step:.1f}; "
              "per-layer values in correlation_layers.csv")
    reference = per_problem[REFERENCE]

    def across_layers(values):
        return lambda idx: spearman(values[idx].sum(0) / counts[idx].sum(), reference[idx].sum(0) / counts[idx].sum())

    rows = []
    for signal in LAYER_SIGNALS:
        note = coarse
        if signal == "attention_entropy" and attention_layers is not None and len(attention_layers) < n_layers:
            rho = lo = hi = math.nan
            note = "the model exposed no attention pattern (blocks.L.attn.hook_pattern) at some layers"
        else:
            rho, lo, hi = spearman_with_ci(across_layers(per_problem[signal]), n, seed=seed)
        rows.append({"signal": signal, "basis": "layers", "spearman_x100": rho, "ci_low": lo, "ci_high": hi,
                     "n": n_layers, "n_problems": n, "note": note})
    rows.append({"signal": FINAL, "basis": "layers", "spearman_x100": math.nan, "ci_low": math.nan,
                 "ci_high": math.nan, "n": n_layers, "n_problems": n,
                 "note": "one value per token, not per layer: the profile is constant, rho undefined; see basis=problems"})
    safe = np.maximum(counts, 1)
    reason_p = (reference / safe[:, None]).mean(1)
    for signal, values in ((FINAL, final / safe), ("norm", (per_problem["norm"] / safe[:, None]).mean(1))):
        rho, lo, hi = spearman_with_ci(lambda idx, v=values: spearman(v[idx], reason_p[idx]), n, seed=seed)
        rows.append({"signal": signal, "basis": "problems", "spearman_x100": rho, "ci_low": lo, "ci_high": hi,
                     "n": n, "n_problems": n,
                     "note": "across thinking-mode problems: per-problem mean vs mean top-K activation over SAE layers"})
    return pd.DataFrame(rows)


def paper_table(table, model_name: str):
    """Rows = signals, a column for this model beside the paper's reported range (PAPER.md §4)."""
    import pandas as pd

    rows = []
    for signal in LAYER_SIGNALS + (FINAL,):
        basis = "problems" if signal == FINAL else "layers"
        hit = table[(table.signal == signal) & (table.basis == basis)].iloc[0]
        rows.append({"signal": signal, "basis": basis, model_name: hit.spearman_x100,
                     f"{model_name}_ci": _ci_text(hit.ci_low, hit.ci_high), "paper": PAPER_SPEARMAN_X100[signal]})
    return pd.DataFrame(rows)


def _ci_text(lo: float, hi: float) -> str:
    return "" if math.isnan(lo) else f"[{lo:.1f}, {hi:.1f}]"


# --- the study ----------------------------------------------------------------------------------------------------

def correlation_study(model, saes: Mapping[int, Any], corpus, out, *, top_k: int = DEFAULT_TOP_K,
                      layers: Sequence[int] | None = None, seed: int = 0, figures: bool = True,
                      batch_size: int = 16, collect=None, collect_features=None) -> dict:
    """Write ``correlation.csv``, ``correlation_table.csv``, ``correlation_layers.csv`` and the figure
    ``correlation_alignment`` into ``out``.

    ``collect`` / ``collect_features``: stand-ins for :func:`collect_signals` (anything with its result's ``sums``,
    ``attention_seen`` and ``layers``) and :func:`tellnorm.features.collect_feature_sums`, e.g.
    :func:`tellnorm.distributed.signal_collector` and :func:`tellnorm.distributed.feature_collector` (sharded)."""
    from tellnorm.bounds import check_corpus, reasoning_features, select_saes
    from tellnorm.io import check_output_dir
    from tellnorm.io import write_csv

    out = check_output_dir(out)
    saes = select_saes(model, saes, top_k=top_k, layers=layers, min_layers=MIN_LAYERS)
    check_corpus(corpus)
    reasoning, contrast = reasoning_features(model, saes, corpus, top_k=top_k, batch_size=batch_size,
                                             collect=collect_features)
    thinking = [i for i, m in enumerate(corpus.modes) if m == "thinking"]
    observer = (collect or collect_signals)(model, saes, reasoning, [corpus.sequences[i] for i in thinking],
                               {i: corpus.n_prompt[i] for i in thinking}, request_ids=thinking, batch_size=batch_size)
    attention_layers = sorted(observer.attention_seen)
    table = correlation_table(observer.sums, attention_layers=attention_layers, seed=seed)
    values = layer_values(observer.sums)
    if len(attention_layers) < len(observer.layers):
        values["attention_entropy"] = math.nan
    shaped = paper_table(table, model.name)
    out.mkdir(parents=True, exist_ok=True)
    write_csv(table, out / "correlation.csv")
    write_csv(shaped, out / "correlation_table.csv")
    write_csv(values, out / "correlation_layers.csv")
    if figures:
        from tellnorm.figures import write_figure

        write_figure(alignment_figure(values, table, top_k), out / "correlation_alignment")
    return {"correlation": table, "table": shaped, "layers": values, "reasoning": reasoning, "sums": observer.sums,
            "contrast": contrast}


def _minmax(values):
    v = np.asarray(values, dtype=np.float64)
    span = np.nanmax(v) - np.nanmin(v) if np.isfinite(v).any() else math.nan
    return (v - np.nanmin(v)) / span if span and span > 0 else np.zeros_like(v)


def alignment_figure(values, table, top_k: int):
    """Per layer, min-max normalised: norm and reasoning activation (left), the competing signals (right)."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    from tellnorm.figures import NEUTRAL_COLOR, NON_THINKING_COLOR, THINKING_COLOR, style

    rho = {row.signal: row.spearman_x100 for row in table[table.basis == "layers"].itertuples()}
    fig = make_subplots(rows=1, cols=2, horizontal_spacing=0.1, subplot_titles=(
        f"norm vs top-{top_k} activation (ρ×100 = {rho['norm']:.0f})", "competing signals (ρ×100 vs activation)"))
    reference = _minmax(values[REFERENCE])
    for col in (1, 2):
        fig.add_trace(go.Scatter(x=values.layer, y=reference, name=f"mean top-{top_k} reasoning activation",
                                 mode="lines+markers", line={"color": THINKING_COLOR, "width": 3}, legendgroup="ref",
                                 showlegend=col == 1), row=1, col=col)
    fig.add_trace(go.Scatter(x=values.layer, y=_minmax(values["norm"]), name="‖h‖ (thinking tokens)",
                             mode="lines+markers", line={"color": NON_THINKING_COLOR, "width": 3}), row=1, col=1)
    for signal, dash in (("layer_output_entropy", "dash"), ("hidden_state_entropy", "dot"),
                         ("attention_entropy", "dashdot")):
        fig.add_trace(go.Scatter(x=values.layer, y=_minmax(values[signal]), mode="lines+markers",
                                 name=f"{signal.replace('_', ' ')} ({rho[signal]:.0f})",
                                 line={"color": NEUTRAL_COLOR, "dash": dash}), row=1, col=2)
    fig.update_xaxes(title_text="layer", dtick=1)
    fig.update_yaxes(title_text="min-max normalised", col=1)
    return style(fig, title="Layer-wise alignment with SAE reasoning activation (thinking-mode tokens)", width=1100,
                 height=460)
