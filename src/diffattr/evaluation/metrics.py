"""Metrics that evaluate training-data attribution scores, as small pure numpy functions.

Convention throughout: ``scores`` is a float array ``[n_query, n_train]``; a larger score means a
stronger proponent (the training sample is credited more for the query). Rankings are
deterministic: among equal scores the lower training (column) index ranks first.

- Top-k proponents and how queries share them: :func:`top_k`, :func:`top_k_counts`,
  :func:`unique_ratio`, :func:`generally_influential`, :func:`specificity_sweep`.
- Where the top-k comes from: :func:`outlier_share`; sanity of self-retrieval: :func:`self_rank`.
- Counterfactual agreement: :func:`spearman` (the Linear Datamodelling Score is in
  :mod:`diffattr.evaluation.lds`).
"""

from __future__ import annotations

import math
import operator
from collections.abc import Iterable

import numpy as np
from scipy import stats

# Slack when comparing a count with ``tau * n_query``, so that float rounding of the product
# (0.28 * 25 == 7.000000000000001) does not raise the threshold by one.
_TAU_TOLERANCE = 1e-9


def _nan_rows_message(name: str, rows: np.ndarray) -> str:
    shown = ", ".join(str(int(r)) for r in rows[:10])
    more = f", ... ({len(rows)} rows in all)" if len(rows) > 10 else ""
    return f"{name} contain NaN in query rows [{shown}{more}]"


def check_scores(scores: np.ndarray, name: str = "scores") -> np.ndarray:
    """Validated 2-D float view of ``scores``: non-empty, no NaN (error names the rows)."""
    arr = np.asarray(scores)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be 2-D [n_query, n_train], got shape {arr.shape}")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"{name} must have at least one row and one column, got {arr.shape}")
    if not np.issubdtype(arr.dtype, np.floating):
        arr = arr.astype(np.float64)
    nan_rows = np.flatnonzero(np.isnan(arr).any(axis=1))
    if nan_rows.size:
        raise ValueError(_nan_rows_message(name, nan_rows))
    return arr


def _check_k(k: int, n_train: int) -> int:
    if isinstance(k, bool):
        raise ValueError(f"k must be an integer, got {k!r}")
    try:
        k = operator.index(k)
    except TypeError:
        raise ValueError(f"k must be an integer, got {k!r}") from None
    if not 1 <= k <= n_train:
        raise ValueError(f"k must satisfy 1 <= k <= n_train = {n_train}, got {k}")
    return k


def _check_tau(tau: float) -> float:
    tau = float(tau)
    if not 0.0 < tau <= 1.0:  # also rejects NaN
        raise ValueError(f"tau must satisfy 0 < tau <= 1, got {tau}")
    return tau


def _gi_threshold(tau: float, n_query: int) -> int:
    """Smallest count that is >= tau * n_query, up to float rounding of the product."""
    return max(1, math.ceil(tau * n_query - _TAU_TOLERANCE * max(1, n_query)))


def top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Column indices of each query's k largest scores, best first.

    scores: [n_query, n_train]; 1 <= k <= n_train. Returns [n_query, k] int64; ties are broken
    by the lower column index (stable sort on -scores).
    """
    arr = check_scores(scores)
    k = _check_k(k, arr.shape[1])
    order = np.argsort(-arr, axis=1, kind="stable")
    return np.ascontiguousarray(order[:, :k], dtype=np.int64)


def top_k_counts(scores: np.ndarray, k: int) -> np.ndarray:
    """How many queries have each training sample among their top-k proponents.

    scores: [n_query, n_train]. Returns [n_train] int64 counts in [0, n_query], summing to
    n_query * k.
    """
    top = top_k(scores, k)
    n_train = np.asarray(scores).shape[1]
    return np.bincount(top.ravel(), minlength=n_train).astype(np.int64)


def unique_ratio(scores: np.ndarray, k: int) -> float:
    """Share of distinct training samples among all queries' top-k proponents.

    scores: [n_query, n_train], larger = more proponent. Returns |union of top-k| /
    (n_query * k), a value in (0, 1]; 1.0 means no two queries share a proponent.
    """
    top = top_k(scores, k)
    return float(np.unique(top).size / top.size)


def generally_influential(scores: np.ndarray, k: int, tau: float) -> np.ndarray:
    """Training samples in the top-k of at least a fraction tau of the queries.

    scores: [n_query, n_train]; 0 < tau <= 1. Returns [n_train] bool, True where
    count >= tau * n_query (with a float tolerance: tau=0.5 over 16 queries means >= 8).
    """
    tau = _check_tau(tau)
    counts = top_k_counts(scores, k)
    return counts >= _gi_threshold(tau, np.asarray(scores).shape[0])


def specificity_sweep(scores: np.ndarray, ks: Iterable[int], taus: Iterable[float]) -> list[dict]:
    """Unique ratio and generally-influential count for every (k, tau) pair.

    scores: [n_query, n_train]; ks: top-k sizes; taus: query fractions in (0, 1]. Returns one
    dict per pair, k-major: {"k": int, "tau": float, "unique_ratio": float,
    "generally_influential": int (number of such training samples)}.
    """
    arr = check_scores(scores)
    n_query, n_train = arr.shape
    ks = [_check_k(k, n_train) for k in ks]
    taus = [_check_tau(tau) for tau in taus]
    order = np.argsort(-arr, axis=1, kind="stable")
    rows = []
    for k in ks:
        top = order[:, :k]
        counts = np.bincount(top.ravel(), minlength=n_train)
        ratio = float(np.unique(top).size / top.size)
        for tau in taus:
            n_gi = int(np.count_nonzero(counts >= _gi_threshold(tau, n_query)))
            rows.append({"k": k, "tau": tau, "unique_ratio": ratio, "generally_influential": n_gi})
    return rows


def _select_queries(queries: np.ndarray | None, n_query: int) -> np.ndarray:
    """Row indices from None (all), a [n_query] bool mask, or an int index array."""
    if queries is None:
        return np.arange(n_query)
    sel = np.asarray(queries)
    if sel.dtype == bool:
        if sel.shape != (n_query,):
            raise ValueError(
                f"queries mask must have shape ({n_query},) to match n_query, got {sel.shape}"
            )
        return np.flatnonzero(sel)
    if sel.ndim != 1 or (sel.size and not np.issubdtype(sel.dtype, np.integer)):
        raise ValueError("queries must be None, a [n_query] bool mask or a 1-D int index array")
    sel = sel.astype(np.int64)
    if sel.size and (sel.min() < 0 or sel.max() >= n_query):
        raise ValueError(
            f"queries indices must lie in [0, {n_query}), got {sel.min()}..{sel.max()}"
        )
    return sel


def outlier_share(
    scores: np.ndarray, k: int, is_outlier: np.ndarray, queries: np.ndarray | None = None
) -> float:
    """Share of the selected queries' top-k slots taken by outlier training samples.

    scores: [n_query, n_train]; is_outlier: [n_train] bool; queries: None (all), a [n_query]
    bool mask or a 1-D index array (repeated indices count repeatedly). Returns a value in
    [0, 1]: (outlier slots) / (n_selected * k).
    """
    arr = check_scores(scores)
    n_query, n_train = arr.shape
    flags = np.asarray(is_outlier)
    if flags.dtype != bool:
        raise ValueError(f"is_outlier must be a bool array, got dtype {flags.dtype}")
    if flags.shape != (n_train,):
        raise ValueError(
            f"is_outlier must have shape ({n_train},) to match n_train, got {flags.shape}"
        )
    sel = _select_queries(queries, n_query)
    if sel.size == 0:
        raise ValueError("queries selects no query; the outlier share is undefined")
    top = top_k(arr[sel], k)
    return float(flags[top].mean())


def self_rank(scores: np.ndarray, self_index: np.ndarray) -> np.ndarray:
    """1-based rank of each query's own training sample within its row of scores.

    scores: [n_query, n_train]; self_index: [n_query] int, the column of query q itself.
    Returns [n_query] int64; rank = 1 + (number of strictly larger scores in the row), so a
    tie for first place is rank 1.
    """
    arr = check_scores(scores)
    n_query, n_train = arr.shape
    idx = np.asarray(self_index)
    if idx.shape != (n_query,):
        raise ValueError(
            f"self_index must have shape ({n_query},) to match n_query, got {idx.shape}"
        )
    if not np.issubdtype(idx.dtype, np.integer):
        raise ValueError(f"self_index must be integer, got dtype {idx.dtype}")
    if idx.min() < 0 or idx.max() >= n_train:
        raise ValueError(f"self_index must lie in [0, {n_train}), got {idx.min()}..{idx.max()}")
    own = arr[np.arange(n_query), idx]
    return (np.count_nonzero(arr > own[:, None], axis=1) + 1).astype(np.int64)


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman rank correlation: Pearson correlation of the average ranks (ties averaged).

    x, y: [n] 1-D, equal lengths, no NaN. Returns a float in [-1, 1], or nan when either input
    is constant (including n < 2).
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if x.ndim != 1 or y.ndim != 1:
        raise ValueError(f"x and y must be 1-D, got shapes {x.shape} and {y.shape}")
    if x.shape != y.shape:
        raise ValueError(f"x and y must have equal lengths, got {x.size} and {y.size}")
    if np.isnan(x).any() or np.isnan(y).any():
        raise ValueError("x and y must not contain NaN")
    if x.size < 2 or np.all(x == x[0]) or np.all(y == y[0]):
        return float("nan")
    rx = stats.rankdata(x)
    ry = stats.rankdata(y)
    dx = rx - rx.mean()
    dy = ry - ry.mean()
    r = float(np.dot(dx, dy) / math.sqrt(np.dot(dx, dx) * np.dot(dy, dy)))
    return min(1.0, max(-1.0, r))
