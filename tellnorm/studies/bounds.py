"""The bounds study (PAPER.md §3) on a model: the exact bound per layer, the paired two-sided relation and the four
assumptions, with their tables and figures. The formulas and streaming accumulators are :mod:`tellnorm.bounds`."""

from __future__ import annotations

import math
import warnings
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from tellnorm.bounds import (
    NON_THINKING,
    PAIR_COLORS,
    SUPPORTED_ARCHITECTURES,
    THINKING,
    AssumptionThresholds,
    BandConfig,
    BoundsSums,
    Marker,
    assumptions_table,
    bounds_table,
    collect_bounds,
    pair_frame,
    pair_positions,
    pairs_table,
    problem_pairs,
    reasoning_line,
    sae_geometry,
)
from tellnorm.features import DEFAULT_TOP_K, check_corpus, reasoning_features, select_saes
from tellnorm.io import check_output_dir
from tellnorm.organism.task import ORGANISM_MARKERS
from tellnorm.studies.features import feature_collector
from tellnorm.studies.runners import Replica, Runner, Shard, as_runner, merge_accumulators

if TYPE_CHECKING:
    import pandas as pd
    import plotly.graph_objects as go
    from sae_lens import SAE

    from tellnorm.backends.base import ModelAPI
    from tellnorm.studies.corpus import ContrastCorpus


def bounds_shard(replica: Replica, shard: Shard, items: list[tuple[Hashable, list[int], dict, set[int]]], *,
                 saes: Any, layers: Sequence[int] | None = None,
                 reasoning: Mapping[int, Sequence[int]], input_scale: float = 1.0,
                 batch_size: int = 16) -> BoundsSums:
    """:func:`tellnorm.bounds.collect_bounds` of one shard's ``(request_id, sequence, masks, capture)`` items."""
    capture = {rid: positions for rid, _, _, positions in items if positions}
    return collect_bounds(replica.model, replica.saes(saes, layers), [seq for _, seq, _, _ in items],
                          {rid: masks for rid, _, masks, _ in items}, reasoning, capture=capture,
                          request_ids=[rid for rid, _, _, _ in items], input_scale=input_scale, batch_size=batch_size)


def bounds_sums(runner: Runner, saes: Any, sequences: Sequence[Sequence[int]], masks: Mapping[Hashable, dict],
                reasoning: Mapping[int, Sequence[int]], *, capture: Mapping[Hashable, set[int]] | None = None,
                request_ids: Sequence[Hashable] | None = None, input_scale: float = 1.0,
                batch_size: int = 16) -> BoundsSums:
    """:func:`tellnorm.bounds.collect_bounds` on ``runner``, sharded by sequence and merged with ``BoundsSums.merge``.

    Counts (tokens, checked and active pairs, violations of the three bounds, histogram bins, fire counts) are
    those of one call whenever every sequence's activations are (always at batch size 1; otherwise they can
    differ by float32 batch padding, ~1e-6 relative); float64 sums differ only by the order of additions; the
    scatter sample is chosen by a per-token hash and the paired states are keyed by request, so both are the same.
    ``saes``: the driver's SAEs (a Ray pool's workers load the pool's spec, these layers) or an SAE spec."""
    request_ids = list(request_ids) if request_ids is not None else list(range(len(sequences)))
    capture = capture or {}
    items = [(rid, list(seq), masks.get(rid, {}), set(capture.get(rid, ())))
             for rid, seq in zip(request_ids, sequences)]
    return runner.map(bounds_shard, items, merge=merge_accumulators, saes=runner.sae_source(saes),
                      layers=list(saes) if isinstance(saes, Mapping) else None,
                      reasoning={layer: list(map(int, r)) for layer, r in reasoning.items()},
                      input_scale=input_scale, batch_size=batch_size)


def bounds_study(model: ModelAPI, saes: Mapping[int, SAE], corpus: ContrastCorpus, out: str | Path, *,
                 top_k: int = DEFAULT_TOP_K, layers: Sequence[int] | None = None,
                 markers: Sequence[Marker] = ORGANISM_MARKERS, scope: str = "generated",
                 band: BandConfig = BandConfig(), thresholds: AssumptionThresholds = AssumptionThresholds(),
                 figures: bool = True, batch_size: int = 16, runner: Runner | None = None) -> dict[str, Any]:
    """The bounds check, the paired two-sided relation and the assumptions (PAPER.md §3), per layer; writes
    ``bounds.csv``, ``bounds_assumptions.csv``, ``bounds_pairs.csv``, ``bounds_pair_points.csv`` and the figures
    ``bounds_norm_vs_reasoning`` and ``bounds_pairs`` into ``out``.

    ``runner``: where the feature sums and the bounds sums run (None: here, on ``model``; a Ray pool shards both
    by sequence, with the same sums; see :func:`bounds_sums`). Nothing is written before every sum is merged."""
    from tellnorm import features as F
    from tellnorm.io import write_csv

    runner = as_runner(runner, model)
    out = check_output_dir(out)
    saes = select_saes(model, saes, top_k=top_k, layers=layers, architectures=SUPPORTED_ARCHITECTURES)
    check_corpus(corpus)
    reasoning, _ = reasoning_features(model, saes, corpus, top_k=top_k, scope=scope, batch_size=batch_size,
                                      collect=feature_collector(runner))
    masks = F.contrast_masks(corpus.sequences, corpus.n_prompt, corpus.modes, scope=scope)
    pairs, capture = [], {}
    for problem, (it, inn) in enumerate(problem_pairs(corpus.modes)):
        found = pair_positions(model.token_strings(corpus.sequences[it]), model.token_strings(corpus.sequences[inn]),
                               markers, start_t=corpus.n_prompt[it], start_n=corpus.n_prompt[inn])
        for marker, pt, pn in found:
            pairs.append((problem, marker, it, pt, inn, pn))
            capture.setdefault(it, set()).add(pt)
            capture.setdefault(inn, set()).add(pn)
    if not pairs:
        warnings.warn(f"no marker ({', '.join(m.name for m in markers)}) was found in both responses of any problem: "
                      "the two-sided relation is not measured", stacklevel=2)
    sums = bounds_sums(runner, saes, corpus.sequences, masks, reasoning, capture=capture, batch_size=batch_size)
    geometry = {layer: sae_geometry(sae) for layer, sae in saes.items()}
    layer_list = sorted(saes)
    table = bounds_table(sums, geometry)
    assumptions = assumptions_table(sums, reasoning, thresholds)
    points = pair_frame(sums.states, pairs, layer_list)
    pair_fit = pairs_table(points, layer_list, band)
    out.mkdir(parents=True, exist_ok=True)
    write_csv(table, out / "bounds.csv")
    write_csv(assumptions, out / "bounds_assumptions.csv")
    write_csv(pair_fit, out / "bounds_pairs.csv")
    write_csv(points, out / "bounds_pair_points.csv")
    result = {"bounds": table, "assumptions": assumptions, "pairs": pair_fit, "pair_points": points,
              "reasoning": reasoning, "sums": sums}
    if figures:
        from tellnorm.figures import write_figure

        lines = {layer: reasoning_line(geometry[layer], reasoning[layer]) for layer in layer_list}
        write_figure(norm_bound_figure(sums, lines, top_k), out / "bounds_norm_vs_reasoning")
        write_figure(pairs_figure(points, pair_fit), out / "bounds_pairs")
    return result


# --- figures ------------------------------------------------------------------------------------------------------

def _grid(n: int, cols: int = 4):
    return math.ceil(n / cols), min(cols, n)


def _grid_style(fig, *, title: str, rows: int, width: int = 1100):
    """tellnorm's style for a grid of subplots: the legend in a row of its own between the title and the grid."""
    from tellnorm.figures import style

    height, top, bottom = 300 * rows + 170, 150, 60
    style(fig, title=title, height=height, width=width)
    fig.update_layout(margin={"t": top, "b": bottom},
                      legend={"y": 1 + 45 / (height - top - bottom), "yanchor": "bottom", "font": {"size": 12}})
    fig.update_annotations(font_size=12)  # subplot titles
    return fig


def norm_bound_figure(sums: BoundsSums, lines: Mapping[int, tuple[float, float]], top_k: int) -> go.Figure:
    """Per layer: ‖h‖ against Σ_{i∈R} ã_i (sampled tokens, by mode; log scale, so tokens with Σ = 0 are left out)
    with the exact bound from the norm alone, ``A_R·‖h‖ + B_R`` (PAPER.md §3; ``lines[layer] = (A_R, B_R)``, see
    :func:`tellnorm.bounds.reasoning_line`)."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    from tellnorm.figures import MODE_COLORS, NEUTRAL_COLOR

    layers = sorted(sums.bounds)
    rows, cols = _grid(len(layers))
    fig = make_subplots(rows=rows, cols=cols, subplot_titles=[f"layer {layer}" for layer in layers],
                        horizontal_spacing=0.06, vertical_spacing=0.12)
    for k, layer in enumerate(layers):
        r, c = k // cols + 1, k % cols + 1
        pts = sums.bounds[layer].sample.frame()
        pts = pts[pts["reasoning_sum"] > 0]
        for mode in (THINKING, NON_THINKING):
            g = pts[pts["mode"] == mode]
            fig.add_trace(go.Scatter(x=g["norm"], y=g["reasoning_sum"], mode="markers", name=mode, legendgroup=mode,
                                     showlegend=k == 0, marker={"color": MODE_COLORS[mode], "size": 4, "opacity": 0.5}),
                          row=r, col=c)
        if len(pts):
            slope, offset = lines[layer]
            xs = np.linspace(float(pts["norm"].min()), float(pts["norm"].max()), 50)
            ys = slope * xs + offset
            fig.add_trace(go.Scatter(x=xs, y=ys, mode="lines", name="exact bound A_R·‖h‖ + B_R",
                                     legendgroup="bound", showlegend=k == 0,
                                     line={"color": NEUTRAL_COLOR, "dash": "dash"}), row=r, col=c)
            low, high = float(pts["reasoning_sum"].min()) / 1.5, float(ys.max()) * 1.5
            fig.update_yaxes(type="log", range=[math.log10(low), math.log10(high)], row=r, col=c)
    fig.update_xaxes(title_text="‖h‖", row=rows)
    fig.update_yaxes(title_text=f"Σ top-{top_k} act. (log)", col=1)
    return _grid_style(fig, rows=rows, title=f"Norm vs summed top-{top_k} reasoning-feature activation, with the "
                                             "exact bound from the norm (tokens with Σ = 0 not shown)")


def pairs_figure(points: pd.DataFrame, fit: pd.DataFrame) -> go.Figure:
    """Per layer: Δ = ‖h_T‖² − ‖h_N‖² against S = Σ_{i∈R} Δã_i, with the fitted band and the ideal band (c = 1)
    of the two-sided relation ``c₁·√Δ ≤ S ≤ c₂·√|R_active|·√Δ`` (PAPER.md §3). ``points``:
    :func:`tellnorm.bounds.pair_frame`'s rows; ``fit``: :func:`tellnorm.bounds.pairs_table`'s."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    from tellnorm.figures import NEUTRAL_COLOR

    title = ("Paired states (same problem, both modes): squared-norm gap vs reasoning-feature gap, fitted and ideal "
             "bands")
    if points.empty:
        fig = go.Figure()
        fig.add_annotation(text="no marker position was found in both responses of any problem: no pairs to fit",
                           showarrow=False, xref="paper", yref="paper", x=0.5, y=0.5)
        fig.update_xaxes(visible=False)
        fig.update_yaxes(visible=False)
        return _grid_style(fig, rows=1, title=title)
    markers = list(dict.fromkeys(points.marker))
    layers = list(fit.layer)
    rows, cols = _grid(len(layers))
    fig = make_subplots(rows=rows, cols=cols, horizontal_spacing=0.06, vertical_spacing=0.14,
                        subplot_titles=[_pair_title(f) for f in fit.itertuples()])
    for k, f in enumerate(fit.itertuples()):
        r, c = k // cols + 1, k % cols + 1
        g = points[points.layer == f.layer]
        for m, marker in enumerate(markers):
            gm = g[g.marker == marker]
            fig.add_trace(go.Scatter(x=gm.delta, y=gm.reasoning_delta, mode="markers", name=f"pairs at {marker!r}",
                                     legendgroup=marker, showlegend=k == 0,
                                     marker={"color": PAIR_COLORS[m % len(PAIR_COLORS)], "size": 5, "opacity": 0.7}),
                          row=r, col=c)
        positive = g.delta[g.delta > 0]
        if len(positive) and not math.isnan(f.c1):
            xs = np.linspace(0, float(positive.max()), 60)
            width = math.sqrt(f.median_r_active) if f.median_r_active > 0 else 0.0
            for y, name, dash in ((f.c1 * np.sqrt(xs), "fitted c₁√Δ", "solid"),
                                  (f.c2 * width * np.sqrt(xs), "fitted c₂√(median |R_act|)√Δ", "solid"),
                                  (np.sqrt(xs), "ideal √Δ", "dot"), (width * np.sqrt(xs), "ideal √(median |R_act|)√Δ",
                                                                     "dot")):
                if np.all(np.isfinite(y)):
                    fig.add_trace(go.Scatter(x=xs, y=y, mode="lines", name=name, legendgroup=name, showlegend=k == 0,
                                             line={"color": NEUTRAL_COLOR, "dash": dash, "width": 1.2}), row=r, col=c)
    fig.update_xaxes(title_text="Δ = ‖h_T‖² − ‖h_N‖²", row=rows)
    fig.update_yaxes(title_text="Σ_R Δã", col=1)
    return _grid_style(fig, rows=rows, title=title)


def _pair_title(f) -> str:
    if math.isnan(f.c1):
        return f"layer {f.layer}: n={f.n_pairs}"
    inside = "n/a" if math.isnan(f.in_band) else f"{f.in_band:.0%}"
    return f"L{f.layer}: c₁={f.c1:.2g}, c₂={f.c2:.2g}, in {inside}, n={f.n_pairs}"
