"""Statistics every reported number carries: n, and a seeded bootstrap 95% CI (percentile method)."""

from __future__ import annotations

import numpy as np

BOOTSTRAP_RESAMPLES = 2000  # enough for stable 2.5/97.5 percentiles of a mean
CI_LEVEL = 0.95


def resample_indices(n: int, *, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0) -> np.ndarray:
    """``[resamples, n]`` indices of units drawn with replacement: one bootstrap resample per row."""
    return np.random.default_rng(seed).integers(0, n, size=(resamples, n))


def percentile_interval(samples, *, level: float = CI_LEVEL) -> tuple[float, float]:
    alpha = (1 - level) / 2
    return float(np.quantile(samples, alpha)), float(np.quantile(samples, 1 - alpha))


def bootstrap_ci(values, statistic=np.mean, *, resamples: int = BOOTSTRAP_RESAMPLES, level: float = CI_LEVEL,
                 seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of ``statistic`` over ``values`` (1-D); (nan, nan) when empty."""
    values = np.asarray(values, dtype=np.float64)
    if values.size == 0:
        return float("nan"), float("nan")
    idx = resample_indices(values.size, resamples=resamples, seed=seed)
    stats = statistic(values[idx], axis=1) if statistic in (np.mean, np.median) else np.apply_along_axis(statistic, 1, values[idx])
    return percentile_interval(stats, level=level)


def mean_with_ci(values, *, seed: int = 0) -> dict:
    values = np.asarray(values, dtype=np.float64)
    lo, hi = bootstrap_ci(values, seed=seed)
    return {"n": int(values.size), "mean": float(values.mean()) if values.size else float("nan"), "ci_low": lo, "ci_high": hi}


def grouped_mean_with_ci(df, by: list[str], column: str, *, seed: int = 0):
    """One row per group: n, mean of ``column`` and its bootstrap 95% CI."""
    import pandas as pd

    rows = []
    for key, group in df.groupby(by, sort=True):
        key = key if isinstance(key, tuple) else (key,)
        rows.append({**dict(zip(by, key)), **mean_with_ci(group[column].to_numpy(), seed=seed)})
    return pd.DataFrame(rows)
