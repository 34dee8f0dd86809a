"""The Linear Datamodelling Score ([KFAC-IF] protocol) as small pure numpy functions.

Sign convention (DESIGN.md): ``scores`` is ``[n_query, n_train]`` and a score > 0 marks a
proponent, a training sample whose removal is predicted to *increase* the query's loss. The
ground truth ``m(θ_S, q)`` is the query's loss (:mod:`diffattr.evaluation.measurement`) under a
model retrained on the subset ``S``, so a good method predicts ``Σ_{j∉S} score(q, j)``.

A stage calls, in order:

1. :func:`ground_truth` on the measurements ``[M subsets, R seeds, Q queries]`` → ``[Q, M]``;
2. :func:`subset_predictions` on each method's scores and the subset masks → ``[Q, M]``;
3. :func:`lds` (one setting), or :func:`split_queries` then :func:`choose_damping` (a sweep
   over damping / λ, chosen on held-out queries);
4. :func:`seed_vs_rest` for the exact-retraining reference.

Every result is a dataclass with ``to_dict()`` (NaN written as ``None``) for the metrics JSON.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from diffattr.evaluation.metrics import check_scores, spearman
from diffattr.rng import Tag, key_seed


def _json_float(x: float) -> float | None:
    return None if math.isnan(x) else float(x)


@dataclass(frozen=True, eq=False)
class LDSResult:
    """LDS of one method / setting: mean ± SEM over the queries whose Spearman is defined.

    rho: [n_query] per-query Spearman across subsets, NaN where undefined (a constant
    prediction or measurement row); n_queries: how many are defined (used); n_dropped: how many
    are NaN. sem uses ddof=1 and is NaN with fewer than two queries; mean is NaN with none.
    """

    mean: float
    sem: float
    rho: np.ndarray
    n_queries: int
    n_dropped: int

    def to_dict(self) -> dict:
        return {
            "mean": _json_float(self.mean),
            "sem": _json_float(self.sem),
            "n_queries": self.n_queries,
            "n_dropped": self.n_dropped,
            "rho": [_json_float(r) for r in self.rho],
        }


def summarise(rho: np.ndarray) -> LDSResult:
    """LDSResult of per-query Spearman values rho [n_query] (NaN = undefined, dropped)."""
    rho = np.asarray(rho, dtype=np.float64)
    if rho.ndim != 1:
        raise ValueError(f"rho must be 1-D [n_query], got shape {rho.shape}")
    kept = rho[~np.isnan(rho)]
    n = int(kept.size)
    mean = float(kept.mean()) if n else float("nan")
    sem = float(kept.std(ddof=1) / math.sqrt(n)) if n > 1 else float("nan")
    return LDSResult(mean=mean, sem=sem, rho=rho.copy(), n_queries=n, n_dropped=int(rho.size) - n)


def _check_pair(predicted: np.ndarray, actual: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    pred = check_scores(predicted, "predicted")
    act = check_scores(actual, "actual")
    if pred.shape != act.shape:
        raise ValueError(
            f"predicted and actual must have the same shape [n_query, n_subsets], got "
            f"{pred.shape} and {act.shape}"
        )
    return pred, act


def per_query_spearman(predicted: np.ndarray, actual: np.ndarray) -> np.ndarray:
    """Spearman of each query's predictions against its measurements across the subsets.

    predicted, actual: [n_query, n_subsets], no NaN. Returns [n_query] float64, NaN where either
    row is constant.
    """
    pred, act = _check_pair(predicted, actual)
    return np.array([spearman(p, a) for p, a in zip(pred, act, strict=True)], dtype=np.float64)


def subset_predictions(scores: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """Predicted change of each query's loss for each subset: Σ_{j∉S} score(q, j).

    scores: [n_query, n_train] (> 0 = proponent); masks: [n_subsets, n_train] bool, True where
    the training sample is in the subset S. Returns [n_query, n_subsets] float64. Leaving a
    proponent out raises the prediction, as it is predicted to raise the query's loss, so the
    prediction ranks subsets like the measured loss m(θ_S, q) (up to a per-query constant,
    which Spearman ignores). This is the one place predictions are formed.
    """
    arr = check_scores(scores).astype(np.float64, copy=False)
    m = np.asarray(masks)
    if m.dtype != bool:
        raise ValueError(f"masks must be a bool array (True = in the subset), got dtype {m.dtype}")
    if m.ndim != 2 or m.shape[1] != arr.shape[1]:
        raise ValueError(
            f"masks must have shape [n_subsets, n_train={arr.shape[1]}] to match the scores, "
            f"got {m.shape}"
        )
    return arr @ (~m).T.astype(np.float64)


def lds(predicted: np.ndarray, actual: np.ndarray) -> LDSResult:
    """Linear Datamodelling Score: per-query Spearman correlation across training subsets.

    predicted: [n_query, n_subsets] (from :func:`subset_predictions`); actual: [n_query,
    n_subsets] measured loss of each query under each subset's model (:func:`ground_truth`).
    Returns an :class:`LDSResult`: mean ± SEM (ddof=1) over the queries whose Spearman is defined;
    queries with a constant row are dropped and counted in ``n_dropped``.
    """
    return summarise(per_query_spearman(predicted, actual))


def _check_measurements(measurements: np.ndarray) -> np.ndarray:
    """Validated float64 [M subsets, R seeds, Q queries]; NaN refused naming the models."""
    arr = np.asarray(measurements, dtype=np.float64)
    if arr.ndim != 3 or 0 in arr.shape:
        raise ValueError(
            f"measurements must be a non-empty 3-D array [n_subsets, n_seeds, n_query], got "
            f"shape {arr.shape}"
        )
    bad = np.argwhere(np.isnan(arr).any(axis=2))
    if bad.size:
        shown = ", ".join(f"(subset {m}, seed {r})" for m, r in bad[:10])
        more = f", ... ({len(bad)} models in all)" if len(bad) > 10 else ""
        raise ValueError(
            f"measurements contain NaN for the models [{shown}{more}]; measure those models "
            "again, or drop their subsets (rows) before computing the LDS"
        )
    return arr


def ground_truth(measurements: np.ndarray) -> np.ndarray:
    """Ground truth m(θ_S, q) per query and subset: the mean over the retraining seeds.

    measurements: [n_subsets, n_seeds, n_query], the query losses of every retrained model.
    Returns [n_query, n_subsets] float64, the layout :func:`lds` takes.
    """
    arr = _check_measurements(measurements)
    return np.ascontiguousarray(arr.mean(axis=1).T)


def seed_vs_rest(measurements: np.ndarray) -> LDSResult:
    """The exact-retraining reference: how well one seed's retrained models predict the others.

    measurements: [n_subsets, n_seeds R ≥ 2, n_query]. For each seed r, the per-query Spearman
    of seed r's measurements against the mean of the other R − 1 seeds across subsets; each
    query's rho is the mean over the seeds r where it is defined (NaN if none is). Returns the
    :class:`LDSResult` of those rhos: an upper reference for any method's LDS at this R.
    """
    arr = _check_measurements(measurements)
    n_seeds = arr.shape[1]
    if n_seeds < 2:
        raise ValueError(
            f"seed_vs_rest needs at least 2 seeds per subset (one against the rest), got "
            f"{n_seeds}; retrain with more seeds"
        )
    total = arr.sum(axis=1)  # [M, Q]
    rhos = np.empty((n_seeds, arr.shape[2]))
    for r in range(n_seeds):
        rest = (total - arr[:, r]) / (n_seeds - 1)
        rhos[r] = per_query_spearman(arr[:, r].T, rest.T)
    defined = ~np.isnan(rhos)
    counts = defined.sum(axis=0)
    sums = np.where(defined, rhos, 0.0).sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        rho = np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)
    return summarise(rho)


# ---- choosing damping / λ without peeking -----------------------------------------------------


def split_queries(query_kind: Sequence | np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Two halves of the queries, stratified by kind, for choosing damping on held-out queries.

    query_kind: [n_query] labels (e.g. "generated" / "heldout", or int codes). Within each kind
    (in sorted order) the queries are shuffled by a generator keyed by (seed, Tag.QUERY_SPLIT)
    and dealt alternately, the odd one of a kind going to the half that is smaller so far.
    Returns (half_a, half_b): sorted int64 query indices, disjoint, covering every query;
    deterministic in (query_kind, seed). Needs ≥ 2 queries.
    """
    kinds = np.asarray(query_kind)
    if kinds.ndim != 1:
        raise ValueError(f"query_kind must be 1-D [n_query], got shape {kinds.shape}")
    if kinds.size < 2:
        raise ValueError(f"splitting queries in two halves needs ≥ 2 queries, got {kinds.size}")
    rng = np.random.default_rng(key_seed(seed, Tag.QUERY_SPLIT))
    halves: list[list[int]] = [[], []]
    for kind in np.unique(kinds):
        rows = rng.permutation(np.flatnonzero(kinds == kind))
        first = 0 if len(halves[0]) <= len(halves[1]) else 1
        halves[first].extend(rows[0::2].tolist())
        halves[1 - first].extend(rows[1::2].tolist())
    a, b = (np.sort(np.asarray(h, dtype=np.int64)) for h in halves)
    return a, b


@dataclass(frozen=True, eq=False)
class DampingChoice:
    """LDS of a method whose damping / λ is chosen on held-out queries (2-fold over halves).

    values: [L] the candidates; value_for_a / value_for_b: the value chosen on half B (used to
    score half A) and on half A (used to score half B); result: the LDS of the combined
    per-query rhos, every query scored by a value chosen without it (the headline number).
    oracle_value / oracle: the value best on all queries and its LDS on those same queries
    (what D-TRAK's and DAS's code report; optimistic). curve: the LDS at every value, on all
    queries, for a plot.
    """

    values: np.ndarray
    half_a: np.ndarray
    half_b: np.ndarray
    value_for_a: float
    value_for_b: float
    result: LDSResult
    oracle_value: float
    oracle: LDSResult
    curve: tuple[LDSResult, ...]

    def to_dict(self) -> dict:
        return {
            "rule": "2-fold over query halves stratified by kind: the value with the best mean "
            "LDS on one half scores the other",
            "values": [float(v) for v in self.values],
            "half_a": self.half_a.tolist(),
            "half_b": self.half_b.tolist(),
            "value_for_a": self.value_for_a,
            "value_for_b": self.value_for_b,
            "lds": self.result.to_dict(),
            "oracle_value": self.oracle_value,
            "oracle": self.oracle.to_dict(),
            "curve": {
                "mean": [_json_float(c.mean) for c in self.curve],
                "sem": [_json_float(c.sem) for c in self.curve],
                "n_queries": [c.n_queries for c in self.curve],
            },
        }


def _best(rho: np.ndarray, rows: np.ndarray) -> int:
    """Index of the value whose mean rho over `rows` is largest (NaN dropped; ties: first)."""
    sub = rho[:, rows]
    defined = ~np.isnan(sub)
    counts = defined.sum(axis=1)
    means = np.where(
        counts > 0, np.where(defined, sub, 0.0).sum(axis=1) / np.maximum(counts, 1), -np.inf
    )
    if not np.isfinite(means).any():
        raise ValueError(
            f"no damping value has a defined LDS on the {len(rows)} queries used to choose it "
            "(every prediction or measurement row is constant there)"
        )
    return int(np.argmax(means))


def choose_damping(
    predicted_by_value: np.ndarray,
    actual: np.ndarray,
    values: Sequence[float] | np.ndarray,
    split: tuple[np.ndarray, np.ndarray],
) -> DampingChoice:
    """Choose a method's damping / λ without scoring a query with a value chosen on it.

    predicted_by_value: [L, n_query, n_subsets], the predictions (:func:`subset_predictions`)
    at each of the L candidate values; actual: [n_query, n_subsets] (:func:`ground_truth`);
    values: [L]; split: (half_a, half_b) from :func:`split_queries`, disjoint and covering all
    queries. Half A is scored with the value best on half B and vice versa.
    """
    preds = np.asarray(predicted_by_value)
    vals = np.asarray(values, dtype=np.float64)
    if preds.ndim != 3:
        raise ValueError(
            f"predicted_by_value must be 3-D [n_values, n_query, n_subsets], got {preds.shape}"
        )
    if vals.shape != (preds.shape[0],):
        raise ValueError(
            f"values must have one entry per slice of predicted_by_value ({preds.shape[0]}), "
            f"got shape {vals.shape}"
        )
    n_query = preds.shape[1]
    half_a, half_b = (np.asarray(h, dtype=np.int64) for h in split)
    both = np.concatenate([half_a, half_b])
    if (
        half_a.size == 0
        or half_b.size == 0
        or not np.array_equal(np.sort(both), np.arange(n_query))
    ):
        raise ValueError(
            f"split must be two non-empty disjoint halves covering the {n_query} queries "
            "(use split_queries)"
        )
    rho = np.empty((len(vals), n_query))
    for i, pred in enumerate(preds):
        try:
            rho[i] = per_query_spearman(pred, actual)
        except ValueError as err:
            raise ValueError(f"at value {vals[i]:g} (index {i}): {err}") from None
    for_a, for_b = _best(rho, half_b), _best(rho, half_a)
    combined = np.empty(n_query)
    combined[half_a] = rho[for_a, half_a]
    combined[half_b] = rho[for_b, half_b]
    oracle = _best(rho, np.arange(n_query))
    return DampingChoice(
        values=vals,
        half_a=half_a,
        half_b=half_b,
        value_for_a=float(vals[for_a]),
        value_for_b=float(vals[for_b]),
        result=summarise(combined),
        oracle_value=float(vals[oracle]),
        oracle=summarise(rho[oracle]),
        curve=tuple(summarise(r) for r in rho),
    )
