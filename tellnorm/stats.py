"""Statistics every reported number carries: n, and a seeded bootstrap 95% CI (percentile method)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import numpy as np

from tellnorm.errors import TellnormError

if TYPE_CHECKING:
    import pandas as pd

BOOTSTRAP_RESAMPLES = 2000  # enough for stable 2.5/97.5 percentiles of a mean
CI_LEVEL = 0.95


def resample_indices(n: int, *, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0) -> np.ndarray:
    """``[resamples, n]`` indices of units drawn with replacement: one bootstrap resample per row."""
    return np.random.default_rng(seed).integers(0, n, size=(resamples, n))


def percentile_interval(samples: np.ndarray | Sequence[float], *, level: float = CI_LEVEL) -> tuple[float, float]:
    """The central ``level`` interval of ``samples`` (e.g. bootstrap statistics): its two percentiles."""
    alpha = (1 - level) / 2
    return float(np.quantile(samples, alpha)), float(np.quantile(samples, 1 - alpha))


def bootstrap_ci(values: np.ndarray | Sequence[float], statistic: Callable[..., float] = np.mean, *,
                 resamples: int = BOOTSTRAP_RESAMPLES, level: float = CI_LEVEL, seed: int = 0,
                 ) -> tuple[float, float]:
    """Percentile bootstrap interval of ``statistic`` over ``values`` (1-D); (nan, nan) when empty."""
    values = np.asarray(values, dtype=np.float64)
    if values.size == 0:
        return float("nan"), float("nan")
    idx = resample_indices(values.size, resamples=resamples, seed=seed)
    if statistic in (np.mean, np.median):
        stats = statistic(values[idx], axis=1)
    else:
        stats = np.apply_along_axis(statistic, 1, values[idx])
    return percentile_interval(stats, level=level)


def mean_with_ci(values: np.ndarray | Sequence[float], *, seed: int = 0) -> dict:
    """``{"n", "mean", "ci_low", "ci_high"}`` of ``values`` (1-D): the mean and its bootstrap 95% CI."""
    values = np.asarray(values, dtype=np.float64)
    lo, hi = bootstrap_ci(values, seed=seed)
    return {"n": int(values.size), "mean": float(values.mean()) if values.size else float("nan"), "ci_low": lo,
            "ci_high": hi}


def grouped_mean_with_ci(df: pd.DataFrame, by: list[str], column: str, *, seed: int = 0) -> pd.DataFrame:
    """One row per group: n, mean of ``column`` and its bootstrap 95% CI."""
    import pandas as pd

    rows = []
    for key, group in df.groupby(by, sort=True):
        key = key if isinstance(key, tuple) else (key,)
        rows.append({**dict(zip(by, key)), **mean_with_ci(group[column].to_numpy(), seed=seed)})
    return pd.DataFrame(rows)


def spearman(x: np.ndarray | Sequence[float], y: np.ndarray | Sequence[float]) -> float:
    """Spearman's ρ (PAPER.md §4): Pearson correlation of average ranks of paired 1-D ``x``, ``y`` ``[n]``; NaN when
    fewer than 2 points or an input is constant."""
    from scipy.stats import rankdata

    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if x.size != y.size:
        raise TellnormError(f"Spearman needs paired values, got {x.size} and {y.size}")
    if x.size < 2 or np.ptp(x) == 0 or np.ptp(y) == 0 or not (np.isfinite(x).all() and np.isfinite(y).all()):
        return math.nan
    rx, ry = rankdata(x) - (x.size + 1) / 2, rankdata(y) - (y.size + 1) / 2
    return float((rx * ry).sum() / math.sqrt((rx ** 2).sum() * (ry ** 2).sum()))


def spearman_with_ci(statistic_of: Callable[[np.ndarray], float], n: int, *, seed: int = 0,
                     ) -> tuple[float, float, float]:
    """``statistic_of(indices)`` on all problems and its bootstrap 95% CI over problems (×100 all three)."""
    point = statistic_of(np.arange(n))
    if n < 2 or math.isnan(point):
        return 100 * point, math.nan, math.nan
    lo, hi = bootstrap_ci(np.arange(n, dtype=np.float64), lambda idx: statistic_of(idx.astype(np.int64)), seed=seed)
    return 100 * point, 100 * lo, 100 * hi
