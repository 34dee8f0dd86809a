"""Intervals for headline numbers: a percentile bootstrap over queries, and verdicts from them."""

from __future__ import annotations

import numpy as np


def bootstrap_ci(
    values: np.ndarray, n_boot: int = 2000, level: float = 0.95, seed: int = 0
) -> tuple[float, float, float]:
    """(mean, low, high) of values [n] with a percentile bootstrap interval of the mean
    (resampling the n values with replacement, seeded). NaNs are dropped first."""
    v = np.asarray(values, np.float64)
    v = v[~np.isnan(v)]
    if v.size == 0:
        return float("nan"), float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, v.size, (n_boot, v.size))].mean(axis=1)
    alpha = (1 - level) / 2
    low, high = np.quantile(means, [alpha, 1 - alpha])
    return float(v.mean()), float(low), float(high)


def compare_to(reference: float, low: float, high: float) -> str:
    """ "above" / "below" when the interval [low, high] excludes the reference, else "within"."""
    if low > reference:
        return "above"
    if high < reference:
        return "below"
    return "within"


def verdict(hits: int, total: int) -> str:
    """ "holds" when a claim holds at every one of `total` points, "fails" at none, else "mixed"."""
    return "holds" if hits == total else "fails" if hits == 0 else "mixed"
