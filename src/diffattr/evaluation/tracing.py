"""Image tracing with a ground truth: the memorisation control's metrics (plain arrays in and out).

A model trained on a few dozen images until its samples are near-copies gives each copy a true
source, its pixel nearest neighbour. A method traces a copy when that source ranks first among
the training images in the copy's row of scores.

Copy criterion (Gu et al. 2023, *On Memorization in Diffusion Models*; Yoon et al. 2023): a
generated sample q is a copy when ‖q − x_(1)‖₂ < ratio · ‖q − x_(2)‖₂, with x_(1), x_(2) its
nearest and second-nearest training images in pixel space and ratio = 1/3 by default: q is three
times closer to one training image than to any other.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

COPY_RATIO = 1 / 3


@dataclass
class Copies:
    """Each query's two nearest training images in pixel ℓ2 and whether it is a copy.

    source: [Q] column of the nearest training image; d1, d2: [Q] distances to the nearest and
    second-nearest; is_copy: [Q] d1 < ratio · d2.
    """

    source: np.ndarray
    d1: np.ndarray
    d2: np.ndarray
    is_copy: np.ndarray
    ratio: float

    @property
    def rows(self) -> np.ndarray:
        """[C] query rows that are copies."""
        return np.flatnonzero(self.is_copy)

    @property
    def share(self) -> float:
        """Share of the queries that are copies."""
        return float(self.is_copy.mean()) if len(self.is_copy) else float("nan")


def find_copies(queries: np.ndarray, train: np.ndarray, ratio: float = COPY_RATIO) -> Copies:
    """Copies among the queries. queries: [Q, ...], train: [N, ...] images (same shape, N ≥ 2).

    A copy's source is its nearest training image (`Copies.source`); see the module docstring
    for the criterion."""
    q = np.asarray(queries, np.float64).reshape(len(queries), -1)
    x = np.asarray(train, np.float64).reshape(len(train), -1)
    if q.shape[1] != x.shape[1]:
        raise ValueError(f"queries of {q.shape[1]} values and training images of {x.shape[1]}")
    if len(x) < 2:
        raise ValueError("a copy is judged against the second-nearest image: need ≥ 2 images")
    if not 0 < ratio <= 1:
        raise ValueError(f"the copy ratio must lie in (0, 1], got {ratio}")
    sq = (q**2).sum(1)[:, None] + (x**2).sum(1)[None, :] - 2 * q @ x.T
    dist = np.sqrt(np.maximum(sq, 0.0))
    order = np.argsort(dist, axis=1, kind="stable")
    rows = np.arange(len(q))
    d1, d2 = dist[rows, order[:, 0]], dist[rows, order[:, 1]]
    return Copies(order[:, 0], d1, d2, d1 < ratio * d2, float(ratio))


def source_ranks(scores: np.ndarray, source: np.ndarray) -> np.ndarray:
    """1-based rank of each row's source among its training columns, ties counted against it.

    scores: [Q, N], larger = more proponent; source: [Q] int columns. rank = 1 + #{j ≠ source:
    score_j ≥ score_source}, so rank 1 means strictly first: a method that gives every training
    image the same score ranks no source first. Returns [Q] int64."""
    s = np.asarray(scores, np.float64)
    src = np.asarray(source)
    if s.ndim != 2 or src.shape != (len(s),):
        raise ValueError(f"scores [Q, N] and sources [Q] expected, got {s.shape} and {src.shape}")
    if not np.issubdtype(src.dtype, np.integer) or (
        len(src) and not 0 <= src.min() <= src.max() < s.shape[1]
    ):
        raise ValueError(f"sources must be integer columns in [0, {s.shape[1]})")
    if not np.isfinite(s).all():
        raise ValueError("scores must be finite")
    own = s[np.arange(len(s)), src]
    return (np.count_nonzero(s >= own[:, None], axis=1)).astype(np.int64)


def wilson_interval(successes: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a binomial share successes / n (NaN, NaN for n = 0)."""
    if n == 0:
        return float("nan"), float("nan")
    if not 0 <= successes <= n:
        raise ValueError(f"successes must lie in [0, {n}], got {successes}")
    z = _normal_quantile(0.5 + level / 2)
    p = successes / n
    centre = (p + z**2 / (2 * n)) / (1 + z**2 / n)
    half = z / (1 + z**2 / n) * math.sqrt(p * (1 - p) / n + z**2 / (4 * n**2))
    return max(0.0, min(p, centre - half)), min(1.0, max(p, centre + half))  # p inside, exactly


def _normal_quantile(p: float) -> float:
    """Φ⁻¹(p) by bisection on math.erf (no scipy needed; 1e-12 accurate)."""
    low, high = -10.0, 10.0
    for _ in range(100):
        mid = (low + high) / 2
        if 0.5 * (1 + math.erf(mid / math.sqrt(2))) < p:
            low = mid
        else:
            high = mid
    return (low + high) / 2


def tracing_summary(ranks: np.ndarray, n_boot: int = 2000, seed: int = 0) -> dict:
    """The tracing numbers of one method and protocol over the copies.

    ranks: [C] source ranks (`source_ranks`). Returns n_copies; rank1, the share of copies
    whose source ranks first, with its 95% Wilson interval (rank1_low, rank1_high; copies taken
    as independent trials); median_rank with a 95% percentile bootstrap interval over copies
    (median_low, median_high)."""
    r = np.asarray(ranks, np.int64)
    n = len(r)
    if n == 0:
        nan = float("nan")
        return dict.fromkeys(
            ("rank1", "rank1_low", "rank1_high", "median_rank", "median_low", "median_high"), nan
        ) | {"n_copies": 0}
    hits = int((r == 1).sum())
    low, high = wilson_interval(hits, n)
    rng = np.random.default_rng(seed)
    medians = np.median(r[rng.integers(0, n, (n_boot, n))], axis=1)
    m_low, m_high = np.quantile(medians, [0.025, 0.975])
    return {
        "n_copies": n,
        "rank1": hits / n,
        "rank1_low": low,
        "rank1_high": high,
        "median_rank": float(np.median(r)),
        "median_low": float(m_low),
        "median_high": float(m_high),
    }
