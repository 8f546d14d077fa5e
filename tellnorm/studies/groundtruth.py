"""Are late-layer norm peaks the critical reasoning steps? Ground truth from the organism's token labels.

Per layer, a token is a *peak* when its norm exceeds ``τ_l = Q3 + k·IQR`` of its own response's generated-token
norms at that layer (k = 1.5, PAPER.md §5; whole-response quantiles, since organism responses are far shorter than
the paper's 500-step warm-up). Against the target "this position computes a step" we report precision, recall and
AUROC of the norm, and two controls that remove confounds the paper could not:
- position: AUROC of the *residual* norm after regressing norm on position (per layer, with a response-level
  intercept), and the AUROC of position alone;
- token identity: AUROC restricted to positions whose *input token* is the same for targets and non-targets.
The target is defined twice: the step-value token itself (``label == "step"``), and the position that *predicts*
it (``next_label == "step"``: the ``=`` whose hidden state must hold the computed value).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from tellnorm.thresholds import ThresholdConfig, exact_threshold

if TYPE_CHECKING:
    import pandas as pd
    import plotly.graph_objects as go
    from numpy.typing import ArrayLike

TARGETS = {"step token": "label", "predicts a step": "next_label"}


def auroc(scores: ArrayLike, positives: ArrayLike) -> float:
    """Mann–Whitney AUROC (ties count ½) of ``scores`` ``[n]`` against the boolean labels ``positives`` ``[n]``;
    NaN when one class is empty."""
    from scipy.stats import rankdata

    scores, positives = np.asarray(scores, dtype=np.float64), np.asarray(positives, dtype=bool)
    n_pos, n_neg = positives.sum(), (~positives).sum()
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(scores)
    return float((ranks[positives].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def peak_mask(frame: pd.DataFrame, cfg: ThresholdConfig | None = None) -> pd.Series:
    """Boolean Series aligned with ``frame`` (columns request_id, layer, norm): the norm is above its response's
    ``τ_l = Q3 + k·IQR`` at that layer (PAPER.md §5, exact whole-response quantiles)."""
    cfg = cfg or ThresholdConfig()
    tau = frame.groupby(["request_id", "layer"])["norm"].transform(lambda v: float(exact_threshold(v.to_numpy(), cfg)))
    return frame["norm"] > tau


def position_residual(frame: pd.DataFrame) -> np.ndarray:
    """Norm minus a per-layer linear fit on position and a per-response intercept (removes drift with length);
    ``[len(frame)]`` float64, in ``frame``'s row order (columns layer, request_id, norm, position)."""
    out = np.empty(len(frame))
    for _, idx in frame.groupby("layer").indices.items():
        g = frame.iloc[idx]
        centred = g["norm"] - g.groupby("request_id")["norm"].transform("mean")
        pos = g["position"] - g.groupby("request_id")["position"].transform("mean")
        slope = float((centred * pos).sum() / max((pos ** 2).sum(), 1e-12))
        out[idx] = centred - slope * pos
    return out


def peak_table(frame: pd.DataFrame, *, mode: str = "thinking", cfg: ThresholdConfig | None = None) -> pd.DataFrame:
    """One row per (target, layer): n, base rate, precision/recall of peaks, AUROC and the two controls.

    ``frame``: the per-token norm table of a traced run with the organism's labels (columns mode, is_generated,
    is_position_zero, label, next_label, request_id, layer, position, token, norm); peaks as in PAPER.md §5."""
    import pandas as pd

    f = frame[(frame["mode"] == mode) & frame["is_generated"] & ~frame["is_position_zero"]].copy()
    f = f[f["next_label"].notna()]
    f["peak"] = peak_mask(f, cfg).to_numpy()
    f["residual"] = position_residual(f)
    rows = []
    for target_name, column in TARGETS.items():
        for layer, g in f.groupby("layer"):
            positive = (g[column] == "step").to_numpy()
            peaks = g["peak"].to_numpy()
            shared_tokens = set(g.loc[positive, "token"]) & set(g.loc[~positive, "token"])
            same_token = g["token"].isin(shared_tokens).to_numpy()
            rows.append({
                "target": target_name, "layer": layer, "n_tokens": len(g), "n_targets": int(positive.sum()),
                "base_rate": positive.mean(), "peak_rate": peaks.mean(),
                "precision": positive[peaks].mean() if peaks.any() else float("nan"),
                "recall": peaks[positive].mean() if positive.any() else float("nan"),
                "auroc_norm": auroc(g["norm"], positive),
                "auroc_position_only": auroc(g["position"], positive),
                "auroc_norm_minus_position": auroc(g["residual"], positive),
                "auroc_same_token": auroc(g["norm"].to_numpy()[same_token], positive[same_token]),
                "same_token_n": int(same_token.sum()),
            })
    return pd.DataFrame(rows)


def peak_figure(table: pd.DataFrame) -> go.Figure:
    """AUROC per layer of the norm and its two controls (position fit removed, same input token) beside position
    alone, one panel per target, from :func:`peak_table`'s rows."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    from tellnorm.figures import NEUTRAL_COLOR, style

    targets = list(dict.fromkeys(table["target"]))
    fig = make_subplots(rows=1, cols=len(targets), subplot_titles=targets, shared_yaxes=True)
    series = [("auroc_norm", "norm", "#c0392b", "solid"), ("auroc_norm_minus_position", "norm − position fit",
              "#8e44ad", "solid"), ("auroc_same_token", "same input token only", "#2471a3", "solid"),
              ("auroc_position_only", "position alone", NEUTRAL_COLOR, "dot")]
    for col, target in enumerate(targets, 1):
        g = table[table["target"] == target].sort_values("layer")
        for key, name, color, dash in series:
            fig.add_trace(go.Scatter(x=g.layer, y=g[key], name=name, legendgroup=name, showlegend=col == 1,
                                     mode="lines+markers", line={"color": color, "dash": dash}), row=1, col=col)
        fig.add_hline(y=0.5, line={"color": "#aaa", "width": 1}, row=1, col=col)
    fig.update_yaxes(range=[0, 1])
    return style(fig, title="Do norm peaks mark the step computations? AUROC per layer (organism, thinking mode)",
                 x_title="layer", y_title="AUROC", width=960)


def peak_composition(frame: pd.DataFrame, *, mode: str = "thinking", cfg: ThresholdConfig | None = None,
                     top_tokens: int = 4) -> pd.DataFrame:
    """Where the peaks are instead: per layer, the number of peaks, their share by label, and the top tokens
    (``frame`` as in :func:`peak_table`)."""
    import pandas as pd

    f = frame[(frame["mode"] == mode) & frame["is_generated"] & ~frame["is_position_zero"]].copy()
    f = f[f["label"].notna()]
    peaks = f[peak_mask(f, cfg).to_numpy()]
    rows = []
    for layer, g in peaks.groupby("layer"):
        shares = g["label"].value_counts(normalize=True)
        tokens = g["token"].value_counts().head(top_tokens)
        rows.append({"layer": layer, "n_peaks": len(g), "peak_rate": len(g) / (f["layer"] == layer).sum(),
                     **{f"share_{label}": float(shares.get(label, 0.0)) for label in ("step", "operand", "reasoning",
                                                                                       "answer", "format")},
                     "top_tokens": ", ".join(f"{t!r}×{n}" for t, n in tokens.items())})
    return pd.DataFrame(rows)
