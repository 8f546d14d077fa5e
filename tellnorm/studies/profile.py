"""``tellnorm profile``: per-layer norm profiles, thinking vs non-thinking, with the paper's figures.

The same prompts run in both modes (greedy); statistics use generated tokens with position 0 excluded, and CIs
resample requests. Writes the per-token table (parquet), the profile (CSV), the "hidden-state L2 norm trend"
figure and a layer × token heatmap of one response.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from tellnorm.errors import TellnormError
from tellnorm.studies.corpus import MODES, load_prompts, organism_prompt_rows, trace_both_modes
from tellnorm.studies.runners import Runner

if TYPE_CHECKING:
    import pandas as pd
    import plotly.graph_objects as go

    from tellnorm.backends.base import ModelAPI
    from tellnorm.norms import NormTrace


@dataclass
class ProfileConfig:
    """Every option of ``tellnorm profile``: the model (a name, path or loaded model), the prompts (a JSONL file,
    or None for ``n_per_difficulty`` organism test problems per level), the output folder, the hook point traced,
    the generation budget and batch size."""

    model: object = "organism"
    prompts: str | None = None  # JSONL with a "prompt" field; default: the organism's test set
    n_per_difficulty: int = 20
    out: str = "figures/profile"
    point: str = "resid_post"
    max_new_tokens: int = 240
    batch_size: int = 40


def norm_trend_figure(profile: pd.DataFrame, *,
                      title: str = "Hidden-state L2 norm by layer (generated tokens)") -> go.Figure:
    """The paper's "hidden-state L2 norm trend" (PAPER.md §1, §4): mean ‖h‖₂ per layer, one line per mode with its
    95% CI band, from :func:`tellnorm.norms.layer_profile`'s rows (columns mode, layer, mean_norm, ci_low, ci_high,
    n_requests)."""
    import plotly.graph_objects as go

    from tellnorm.figures import MODE_COLORS, style

    fig = go.Figure()
    for mode, group in profile.groupby("mode", sort=False):
        color = MODE_COLORS.get(mode, "#555")
        g = group.sort_values("layer")
        fig.add_trace(go.Scatter(x=list(g.layer) + list(g.layer[::-1]), y=list(g.ci_high) + list(g.ci_low[::-1]),
                                 fill="toself", fillcolor=color, opacity=0.18, line={"width": 0},
                                 hoverinfo="skip", showlegend=False))
        fig.add_trace(go.Scatter(x=g.layer, y=g.mean_norm, mode="lines+markers", name=mode, line={"color": color},
                                 customdata=g[["n_requests", "ci_low", "ci_high"]].to_numpy(),
                                 hovertemplate="layer %{x}<br>mean ‖h‖ %{y:.3f}<br>95%% CI "
                                               "[%{customdata[1]:.3f}, %{customdata[2]:.3f}]"
                                               "<br>n = %{customdata[0]} responses<extra></extra>"))
    return style(fig, title=title, x_title="layer (resid_post)", y_title="mean ‖h‖₂ (95% CI over responses)")


# Token sets of the like-with-like comparison: every generated token, then positions both modes' responses have.
MATCHED_TOKEN_SETS = ("all tokens", "answer_word", "answer_value")
TOKEN_SET_TITLES = {"all tokens": "all generated tokens", "answer_word": "the `answer` token",
                    "answer_value": "the answer value X", "answer": "the stated answer (task extractor)"}


def matched_comparison(frame: pd.DataFrame, *, token_sets: Sequence[str] = MATCHED_TOKEN_SETS,
                       seed: int = 0) -> pd.DataFrame:
    """Thinking vs non-thinking norms per layer, paired by problem, on all tokens and on matched positions
    (PAPER.md §4's token-by-token, layer-by-layer comparison).

    ``frame``: statistics rows of a both-modes trace (columns mode, prompt_index, layer, norm, matched_role).
    For "all tokens" a response contributes its mean norm; for a matched role (e.g. ``answer_value``) the norm
    at that one position. Pairs are the problems whose responses have the position in both modes. Per layer:
    n pairs, each mode's mean with a bootstrap 95% CI, the ratio of means, and the mean paired difference
    (thinking − non-thinking) with a bootstrap 95% CI over pairs.
    """
    import pandas as pd

    from tellnorm.stats import bootstrap_ci

    rows = []
    for token_set in token_sets:
        f = frame if token_set == "all tokens" else frame[frame["matched_role"] == token_set]
        per_response = f.groupby(["layer", "prompt_index", "mode"], observed=True)["norm"].mean().unstack("mode")
        for layer, g in per_response.groupby(level="layer"):
            g = g.dropna(subset=[m for m in MODES if m in g.columns])
            if g.empty or any(m not in g.columns for m in MODES):
                continue
            think, nothink = g["thinking"].to_numpy(), g["non-thinking"].to_numpy()
            diff = think - nothink
            row = {"tokens": token_set, "layer": layer, "n_pairs": len(g)}
            for name, values in (("thinking", think), ("non_thinking", nothink), ("difference", diff)):
                lo, hi = bootstrap_ci(values, seed=seed)
                row.update({name: values.mean(), f"{name}_ci_low": lo, f"{name}_ci_high": hi})
            row["ratio"] = think.mean() / nothink.mean()
            rows.append(row)
    return pd.DataFrame(rows)


def format_matched(matched: pd.DataFrame) -> str:
    """The token-matched norm table (one row per token kind and layer; the profile study's ``matched``) as text,
    with the thinking − non-thinking difference and its bootstrap 95% CI in one column."""
    view = matched.assign(
        thinking=matched.thinking.map("{:.3f}".format), non_thinking=matched.non_thinking.map("{:.3f}".format),
        ratio=matched.ratio.map("{:.2f}".format),
        difference=[f"{d:+.3f} [{lo:+.3f}, {hi:+.3f}]" for d, lo, hi in
                    zip(matched.difference, matched.difference_ci_low, matched.difference_ci_high)])
    columns = ["tokens", "layer", "n_pairs", "thinking", "non_thinking", "ratio", "difference"]
    return view[columns].to_string(index=False)


def matched_norm_figure(table: pd.DataFrame) -> go.Figure:
    """Norm by layer per mode, one panel per token set: all tokens beside positions both modes have
    (``table``: :func:`matched_comparison`'s rows)."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    from tellnorm.figures import MODE_COLORS, style

    sets = [s for s in MATCHED_TOKEN_SETS if s in set(table["tokens"])]
    fig = make_subplots(rows=1, cols=len(sets), subplot_titles=[TOKEN_SET_TITLES[s] for s in sets],
                        horizontal_spacing=0.07)
    for col, token_set in enumerate(sets, 1):
        g = table[table["tokens"] == token_set].sort_values("layer")
        for mode, column in (("thinking", "thinking"), ("non-thinking", "non_thinking")):
            fig.add_trace(go.Scatter(
                x=g.layer, y=g[column], name=mode, legendgroup=mode, showlegend=col == 1, mode="lines+markers",
                line={"color": MODE_COLORS[mode]},
                error_y={"type": "data", "symmetric": False, "array": g[f"{column}_ci_high"] - g[column],
                         "arrayminus": g[column] - g[f"{column}_ci_low"]},
                customdata=g[["n_pairs"]].to_numpy(),
                hovertemplate="layer %{x}<br>mean ‖h‖ %{y:.3f}<br>n = %{customdata[0]} problems<extra></extra>"),
                row=1, col=col)
        fig.update_xaxes(title_text="layer (resid_post)", row=1, col=col)
    fig.update_yaxes(title_text="mean ‖h‖₂ (95% CI over problems)", row=1, col=1)
    return style(fig, title="Thinking vs non-thinking norms: all tokens and token-matched positions",
                 width=1100, height=430)


def heatmap_figure(frame: pd.DataFrame, request_id: Hashable, *, title: str | None = None,
                   max_tokens: int = 160) -> go.Figure:
    """Layer × token heatmap of one response, each layer's norms divided by that layer's median (peaks stand out);
    ``frame``: a trace's per-token table, the first ``max_tokens`` generated positions of ``request_id`` shown."""
    import numpy as np
    import plotly.graph_objects as go

    from tellnorm.figures import style

    f = frame[(frame.request_id == request_id) & frame.is_generated]
    if f.empty:
        raise TellnormError(f"request {request_id!r} has no generated tokens to plot")
    grid = f.pivot_table(index="layer", columns="position", values="norm").sort_index()
    grid = grid.iloc[:, :max_tokens]
    tokens = f.drop_duplicates("position").set_index("position").loc[grid.columns, "token"]
    relative = grid.to_numpy() / np.median(grid.to_numpy(), axis=1, keepdims=True)
    labels = [f"{p}:{t!r}"[:14] if t == "\n" else f"{p}:{t}" for p, t in zip(grid.columns, tokens)]
    fig = go.Figure(go.Heatmap(z=relative, x=labels, y=list(grid.index), colorscale="Magma",
                               customdata=grid.to_numpy(), colorbar={"title": "‖h‖ / layer median"},
                               hovertemplate="%{x}<br>layer %{y}<br>‖h‖ %{customdata:.3f} (×%{z:.2f})<extra></extra>"))
    fig.update_xaxes(tickangle=-60, tickfont={"size": 9})
    return style(fig, title=title or f"Per-token norms of response {request_id}", x_title="generated token",
                 y_title="layer", height=460, width=max(720, 9 * len(labels)))


def profile_study(model: ModelAPI | None, rows: list[dict], out: Path, *, point: str = "resid_post",
                  max_new_tokens: int = 240, batch_size: int = 40, trace: NormTrace | None = None,
                  runner: Runner | None = None, token_sets: Sequence[str] = MATCHED_TOKEN_SETS,
                  ) -> tuple[NormTrace, pd.DataFrame, pd.DataFrame | None]:
    """Trace ``rows`` in both modes and write the per-token table, the profile and the figures to ``out``
    (``trace``: an already merged trace of ``rows``; then no generation). ``runner``: where the tracing runs (None:
    here, on ``model``; a Ray pool shards it by prompt). Nothing is written before the trace is complete, so a
    failed shard leaves ``out`` without outputs.

    Returns ``(trace, profile, matched)``; ``matched`` (the like-with-like comparison of
    :func:`matched_comparison` over ``token_sets``) is None for models whose responses have no shared closing to
    match."""
    from tellnorm.figures import write_figure
    from tellnorm.io import check_output_dir, write_csv, write_parquet
    from tellnorm.norms import layer_profile

    out = check_output_dir(out)  # before the slow part
    if trace is None:
        trace = trace_both_modes(model, rows, point=point, max_new_tokens=max_new_tokens, batch_size=batch_size,
                                 runner=runner)
    profile = layer_profile(trace.statistics_rows(), by=["mode"])
    write_parquet(trace.frame, out / "norms_per_token.parquet")
    write_csv(profile, out / "norm_profile.csv")
    write_figure(norm_trend_figure(profile), out / "norm_trend")
    write_figure(heatmap_figure(trace.frame, example_request(trace.frame)), out / "norm_heatmap")
    matched = None
    if trace.frame["matched_role"].notna().any():
        matched = matched_comparison(trace.statistics_rows(), token_sets=token_sets)
        write_csv(matched, out / "norm_profile_matched.csv")
        write_figure(matched_norm_figure(matched), out / "norm_trend_matched")
    return trace, profile, matched


def run_profile(cfg: ProfileConfig, *, runner: Runner | None = None) -> tuple[NormTrace, pd.DataFrame]:
    """``tellnorm profile``: the prompts (a file or the organism's test set) profiled into ``cfg.out``; returns
    ``(trace, profile)``.
    ``runner``: None loads ``cfg.model`` here; a Ray pool (e.g. ``ShardPool(cfg.model, ray_address=...)``) shards
    the tracing over its workers, which load the model themselves."""
    from tellnorm.backends import load_model

    rows = load_prompts(cfg.prompts) if cfg.prompts else organism_prompt_rows(cfg.n_per_difficulty)
    out = Path(cfg.out)
    model = None
    if runner is None:
        model = load_model(cfg.model)  # after the prompts: bad input fails before the slow part
    trace, profile, _ = profile_study(model, rows, out, point=cfg.point, max_new_tokens=cfg.max_new_tokens,
                                      batch_size=cfg.batch_size, runner=runner)
    print(profile.pivot(index="layer", columns="mode", values="mean_norm").round(3).to_string())
    print(f"wrote {cfg.out}/norms_per_token.parquet, norm_profile.csv, norm_trend.(html|png), norm_heatmap.(html|png)")
    return trace, profile


def example_request(frame: pd.DataFrame) -> Hashable:
    """A thinking response to one of the hardest prompts: the most interesting one to look at."""
    thinking = frame[frame["mode"] == "thinking"]
    if "difficulty" in thinking and thinking["difficulty"].notna().any():
        thinking = thinking[thinking["difficulty"] == thinking["difficulty"].max()]
    return thinking["request_id"].iloc[0]
