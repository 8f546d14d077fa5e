"""Does the norm track SAE reasoning activation across layers, and better than other intrinsic signals? (PAPER.md §4)

Tokens: the generated tokens of thinking-mode responses (prompt and position 0 excluded), at every layer with an
SAE. Each signal's per-layer **profile** is its mean over these tokens, pooled over problems (Σ per-problem sums /
Σ token counts). Signals, per token t and layer l (entropies in nats):

- ``norm``: ‖h_l‖₂, h_l = ``blocks.l.hook_resid_post`` (raw residual stream).
- ``reasoning_activation`` (the reference): ``(1/K)·Σ_{i∈R_l} ã_i(h_l)``, ã_i = a_i·‖d_i‖, R_l the layer's top-K
  features by the paper's contrast Δ (:func:`tellnorm.features.reasoning_features`); on the whole corpus the profile
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

import functools
import math
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from tellnorm.features import DEFAULT_TOP_K
from tellnorm.signals import FINAL, LAYER_SIGNALS, MIN_LAYERS, PROFILE_SIGNALS, REFERENCE, SignalSums, collect_signals
from tellnorm.stats import spearman, spearman_with_ci
from tellnorm.studies.features import feature_collector
from tellnorm.studies.runners import Replica, Runner, Shard, as_runner

if TYPE_CHECKING:
    from pathlib import Path

    import pandas as pd
    import plotly.graph_objects as go
    from sae_lens import SAE

    from tellnorm.backends.base import ModelAPI
    from tellnorm.studies.corpus import ContrastCorpus

# PAPER §4, Spearman ×100 with the per-layer SAE reasoning activation on Qwen3-1.7B / 8B / 14B and
# DeepSeek-R1-Distill-Llama-8B (86.47, 85.15, 87.62, 84.11); only ranges were recovered for the other signals.
PAPER_SPEARMAN_X100 = {"norm": "84.11 to 87.62", FINAL: "52 to 64", "layer_output_entropy": "-72 to -20",
                       "hidden_state_entropy": "-72 to -20", "attention_entropy": "-72 to -20"}


# --- tables -------------------------------------------------------------------------------------------------------

def layer_values(sums: SignalSums) -> pd.DataFrame:
    """One row per layer: the token count and every signal's pooled mean (the profiles ρ is computed from; PAPER.md
    §4), and the ranks of the norm and of the reasoning activation."""
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


def correlation_table(sums: SignalSums, *, attention_layers: Sequence[int] | None = None,
                      seed: int = 0) -> pd.DataFrame:
    """``signal, basis, spearman_x100, ci_low, ci_high, n, n_problems, note``: every signal's Spearman ρ ×100 with
    the reasoning activation and its bootstrap CI (PAPER.md §4; definitions in the module docstring)."""
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
                 "note": "one value per token, not per layer: the profile is constant, rho undefined; "
                         "see basis=problems"})
    safe = np.maximum(counts, 1)
    reason_p = (reference / safe[:, None]).mean(1)
    for signal, values in ((FINAL, final / safe), ("norm", (per_problem["norm"] / safe[:, None]).mean(1))):
        rho, lo, hi = spearman_with_ci(lambda idx, v=values: spearman(v[idx], reason_p[idx]), n, seed=seed)
        rows.append({"signal": signal, "basis": "problems", "spearman_x100": rho, "ci_low": lo, "ci_high": hi,
                     "n": n, "n_problems": n,
                     "note": "across thinking-mode problems: per-problem mean vs mean top-K activation over SAE "
                             "layers"})
    return pd.DataFrame(rows)


def paper_table(table: pd.DataFrame, model_name: str) -> pd.DataFrame:
    """Rows = signals, a column for this model beside the paper's reported range (PAPER.md §4); ``table``:
    :func:`correlation_table`'s rows."""
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


# --- signal sums on a runner --------------------------------------------------------------------------------------

@dataclass
class SignalResult:
    """What :func:`correlation_study` reads from :func:`tellnorm.signals.collect_signals`'s observer: the
    per-problem sums, the layers whose attention pattern was seen, the layers."""

    sums: SignalSums
    attention_seen: set[int]
    layers: list[int]


def signals_shard(replica: Replica, shard: Shard, items: list[tuple[Hashable, list[int], int]], *, saes: Any,
                  layers: Sequence[int] | None = None, reasoning: Mapping[int, Sequence[int]],
                  batch_size: int = 16) -> SignalResult:
    """:func:`tellnorm.signals.collect_signals` of one shard's ``(request_id, sequence, start)`` items."""
    observer = collect_signals(replica.model, replica.saes(saes, layers), reasoning, [seq for _, seq, _ in items],
                               {rid: start for rid, _, start in items}, request_ids=[rid for rid, _, _ in items],
                               batch_size=batch_size)
    return SignalResult(observer.sums, set(observer.attention_seen), list(observer.layers))


def merge_signals(results: Sequence[SignalResult], shards: Sequence[Shard], *,
                  order: Sequence[Hashable] = ()) -> SignalResult:
    """``SignalSums.merge`` in shard order, then the problems in ``order`` (the bootstrap resamples by position);
    one shard's result is returned as is."""
    if len(results) == 1:
        return results[0]
    sums = functools.reduce(lambda a, b: a.merge(b), [r.sums for r in results])
    ranked = [rid for rid in order if rid in sums.problems]
    seen = set(ranked)
    rest = [rid for rid in sums.problems if rid not in seen]
    sums.problems = {rid: sums.problems[rid] for rid in ranked + rest}
    return SignalResult(sums, set().union(*(r.attention_seen for r in results)), results[0].layers)


def signal_sums(runner: Runner, saes: Any, reasoning: Mapping[int, Sequence[int]],
                sequences: Sequence[Sequence[int]], starts: Mapping[Hashable, int], *,
                request_ids: Sequence[Hashable] | None = None,
                batch_size: int = 16) -> SignalResult:
    """:func:`tellnorm.signals.collect_signals` on ``runner``, sharded by problem (each problem's sums come from one
    shard), problems in ``request_ids`` order. ``saes``: the driver's SAEs (a Ray pool's workers load the pool's
    spec, these layers) or an SAE spec."""
    rids = list(request_ids) if request_ids is not None else list(range(len(sequences)))
    items = [(rid, list(seq), starts.get(rid, 1 << 30)) for rid, seq in zip(rids, sequences)]
    return runner.map(signals_shard, items, merge=functools.partial(merge_signals, order=rids),
                      saes=runner.sae_source(saes), layers=list(saes) if isinstance(saes, Mapping) else None,
                      reasoning={layer: list(map(int, r)) for layer, r in reasoning.items()}, batch_size=batch_size)


# --- the study ----------------------------------------------------------------------------------------------------

def correlation_study(model: ModelAPI, saes: Mapping[int, SAE], corpus: ContrastCorpus, out: str | Path, *,
                      top_k: int = DEFAULT_TOP_K, layers: Sequence[int] | None = None, seed: int = 0,
                      figures: bool = True, batch_size: int = 16, runner: Runner | None = None) -> dict[str, Any]:
    """The correlation study (PAPER.md §4): write ``correlation.csv``, ``correlation_table.csv``,
    ``correlation_layers.csv`` and the figure ``correlation_alignment`` into ``out``; returns the tables, R per
    layer, the signal sums and the feature contrast.

    ``runner``: where the feature sums and the signal sums run (None: here, on ``model``; a Ray pool shards them by
    sequence and by problem, with the same sums and the problems in the same order)."""
    from tellnorm.features import check_corpus, reasoning_features, select_saes
    from tellnorm.io import check_output_dir, write_csv

    runner = as_runner(runner, model)
    out = check_output_dir(out)
    saes = select_saes(model, saes, top_k=top_k, layers=layers, min_layers=MIN_LAYERS)
    check_corpus(corpus)
    reasoning, contrast = reasoning_features(model, saes, corpus, top_k=top_k, batch_size=batch_size,
                                             collect=feature_collector(runner))
    thinking = [i for i, m in enumerate(corpus.modes) if m == "thinking"]
    observer = signal_sums(runner, saes, reasoning, [corpus.sequences[i] for i in thinking],
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


def alignment_figure(values: pd.DataFrame, table: pd.DataFrame, top_k: int) -> go.Figure:
    """Per layer, min-max normalised: norm and reasoning activation (left), the competing signals (right), each
    labelled with its ρ×100 (``values``: :func:`layer_values`'s rows; ``table``: :func:`correlation_table`'s)."""
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
