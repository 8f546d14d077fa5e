"""LRS — ℓ2-guided Response Selection (PAPER §6).

Sample N responses; per response and layer, over its generated tokens with norms ‖x_t‖ and the layer's τ:

    A = Σ_t ‖x_t‖                         the summed norm              ("sum" ablation)
    B = Σ_t max(0, ‖x_t‖ − τ)             the summed excess over τ
    C = #{t : ‖x_t‖ > τ}                  the peak count               ("peak count" ablation)
    D = B over the last LATE_FRAC of the tokens                        (the paper's rule)

and pick the response with the largest statistic summed over the target layers (late layers; "middle layers" is
the third ablation). Sums grow with length, so every statistic also comes per token (``/len``: A, B, C divided by
the response's token count, D by its late-token count). The late part of a response of T tokens is tokens
``int(T·(1 − LATE_FRAC))`` … T−1. Norms come from any :class:`~tellnorm.norms.NormTracer` frame.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from tellnorm.errors import TellnormError

if TYPE_CHECKING:
    import numpy.typing as npt
    import pandas as pd

LATE_FRAC = 0.30  # REFERENCE CODE: LATE_FRAC, D sums the last 30% of the generated tokens
STATISTICS = ("A", "B", "C", "D")
LAYER_SETS = ("late", "middle")


@dataclass(frozen=True)
class LRSConfig:
    """LRS's settings (PAPER.md §6): the statistic (A–D), raw or per token, the layer set and the late fraction."""

    statistic: str = "D"  # PAPER §6 / REFERENCE CODE: the late-excess statistic D
    per_token: bool = False  # REFERENCE CODE: raw sums (TELLNORM: True divides by the token count)
    layers: str = "late"  # REFERENCE CODE: the late layers ("middle" is the paper's ablation)
    late_frac: float = LATE_FRAC  # REFERENCE CODE: LATE_FRAC = 0.30

    def __post_init__(self):
        if self.statistic not in STATISTICS:
            raise TellnormError(f"unknown LRS statistic {self.statistic!r}: choose one of {', '.join(STATISTICS)} "
                                "(D is the paper's rule)")
        if self.layers not in LAYER_SETS:
            raise TellnormError(f"unknown LRS layer set {self.layers!r}: choose 'late' or 'middle'")
        if not (isinstance(self.late_frac, (int, float)) and not isinstance(self.late_frac, bool)
                and 0 < self.late_frac <= 1):
            raise TellnormError(f"LRS late_frac must be in (0, 1], got {self.late_frac!r} (the paper uses 0.3)")

    @property
    def name(self) -> str:
        """The method's name in tables, e.g. ``lrs-D@late`` or ``lrs-B/len@middle``."""
        return f"lrs-{self.statistic}{'/len' if self.per_token else ''}@{self.layers}"


def late_start(n_tokens: int, late_frac: float = LATE_FRAC) -> int:
    """Index of the first token of the late part of a response of ``n_tokens`` tokens."""
    return int(n_tokens * (1 - late_frac))


def response_statistics(norms: npt.ArrayLike, tau: float, late_frac: float = LATE_FRAC) -> dict:
    """A, B, C, D (PAPER.md §6) and the token counts of one response at one layer (``norms`` ``[T]`` in generation
    order)."""
    norms = np.asarray(norms, dtype=np.float64)
    if not math.isfinite(tau):
        raise TellnormError(f"LRS needs a finite threshold, got {tau!r}")
    excess = np.maximum(norms - tau, 0.0)
    start = late_start(len(norms), late_frac)
    return {"A": float(norms.sum()), "B": float(excess.sum()), "C": int((norms > tau).sum()),
            "D": float(excess[start:].sum()), "n_tokens": len(norms), "n_late": len(norms) - start}


def statistics_table(frame: pd.DataFrame, taus: dict, late_frac: float = LATE_FRAC) -> pd.DataFrame:
    """Per (request_id, layer): A, B, C, D, n_tokens, n_late from a norm frame of generated tokens only
    (columns request_id, layer, position, norm); ``taus`` = {layer: τ}."""
    import pandas as pd

    missing = sorted(int(layer) for layer in set(frame.layer.unique()) - set(taus))
    if missing:
        raise TellnormError(f"LRS has no threshold for layer(s) {missing}")
    f = frame.sort_values(["request_id", "layer", "position"])
    tau = f.layer.map(taus).to_numpy(dtype=np.float64)
    norm = f.norm.to_numpy(dtype=np.float64)
    f = f.assign(excess=np.maximum(norm - tau, 0.0), peak=norm > tau)
    group = f.groupby(["request_id", "layer"], sort=False)
    index = group.cumcount().to_numpy()
    n_tokens = group.norm.transform("size").to_numpy()
    f = f.assign(late_excess=np.where(index >= (n_tokens * (1 - late_frac)).astype(int), f.excess, 0.0),
                 is_late=index >= (n_tokens * (1 - late_frac)).astype(int))
    out = f.groupby(["request_id", "layer"], sort=True).agg(
        A=("norm", "sum"), B=("excess", "sum"), C=("peak", "sum"), D=("late_excess", "sum"),
        n_tokens=("norm", "size"), n_late=("is_late", "sum")).reset_index()
    return pd.DataFrame(out)


def scores(table: pd.DataFrame, cfg: LRSConfig, layers: Iterable[int]) -> pd.Series:
    """One score per request: the statistic (per token if asked) summed over ``layers``."""
    t = table[table.layer.isin(list(layers))]
    if t.empty:
        raise TellnormError(f"LRS has no norms at layers {list(layers)}: trace those layers")
    value = t[cfg.statistic].astype(float)
    if cfg.per_token:
        value = value / t["n_late" if cfg.statistic == "D" else "n_tokens"].clip(lower=1)
    return value.groupby(t.request_id).sum()


def pick(scores_of_group: npt.ArrayLike) -> int:
    """Index (0-based, in the given order) of the highest score; the first on ties."""
    values = np.asarray(scores_of_group, dtype=np.float64)
    if len(values) == 0:
        raise TellnormError("LRS needs at least one response to select from")
    return int(np.argmax(values))
