"""Attribution metrics, checked against brute-force loops, scipy and hand-made cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from diffattr.evaluation.metrics import (
    generally_influential,
    outlier_share,
    self_rank,
    spearman,
    specificity_sweep,
    top_k,
    top_k_counts,
    unique_ratio,
)


def _random_scores(seed: int, n_query: int = 12, n_train: int = 30, ties: bool = True):
    """Random scores; with ties=True, few distinct values so that many scores tie."""
    rng = np.random.default_rng(seed)
    if ties:
        return rng.integers(0, 5, size=(n_query, n_train)).astype(np.float64)
    return rng.normal(size=(n_query, n_train))


def _brute_top_k(scores: np.ndarray, k: int) -> list[list[int]]:
    """Reference: repeatedly take the largest remaining score, lowest column first on ties."""
    result = []
    for row in scores.tolist():
        remaining = list(range(len(row)))
        chosen = []
        for _ in range(k):
            best = remaining[0]
            for j in remaining[1:]:
                if row[j] > row[best]:
                    best = j
            chosen.append(best)
            remaining.remove(best)
        result.append(chosen)
    return result


def _brute_counts(scores: np.ndarray, k: int) -> list[int]:
    counts = [0] * scores.shape[1]
    for chosen in _brute_top_k(scores, k):
        for j in chosen:
            counts[j] += 1
    return counts


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("ties", [True, False])
def test_top_k_matches_brute_force_selection_on_random_matrices(seed, ties):
    scores = _random_scores(seed, ties=ties)
    for k in (1, 3, 7, scores.shape[1]):
        got = top_k(scores, k)
        assert got.shape == (scores.shape[0], k)
        assert got.dtype == np.int64
        assert got.tolist() == _brute_top_k(scores, k)


def test_top_k_breaks_ties_by_lower_column_index():
    scores = np.array([[1.0, 3.0, 3.0, 0.0, 3.0], [2.0, 2.0, 2.0, 2.0, 2.0]])
    assert top_k(scores, 4).tolist() == [[1, 2, 4, 0], [0, 1, 2, 3]]


def test_top_k_lists_best_first():
    scores = np.array([[0.1, 0.9, 0.5, 0.7], [4.0, -1.0, 2.0, 3.0]])
    assert top_k(scores, 3).tolist() == [[1, 3, 2], [0, 3, 2]]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_top_k_counts_match_brute_force_loop(seed):
    scores = _random_scores(seed)
    for k in (1, 4, 10):
        counts = top_k_counts(scores, k)
        assert counts.shape == (scores.shape[1],)
        assert counts.dtype == np.int64
        assert counts.tolist() == _brute_counts(scores, k)
        assert counts.sum() == scores.shape[0] * k


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_unique_ratio_matches_brute_force_set_union(seed):
    scores = _random_scores(seed)
    for k in (1, 4, 10):
        union = set()
        for chosen in _brute_top_k(scores, k):
            union.update(chosen)
        assert unique_ratio(scores, k) == pytest.approx(len(union) / (scores.shape[0] * k))


def test_unique_ratio_is_one_when_no_two_queries_share_a_proponent():
    # Query q's two best samples are columns 2q and 2q+1.
    scores = np.zeros((4, 8))
    for q in range(4):
        scores[q, 2 * q] = 2.0
        scores[q, 2 * q + 1] = 1.0
    assert unique_ratio(scores, 2) == 1.0


def test_unique_ratio_is_one_over_n_query_when_all_queries_share_one_proponent():
    rng = np.random.default_rng(3)
    scores = rng.normal(size=(5, 9))
    scores[:, 6] = 10.0
    assert unique_ratio(scores, 1) == pytest.approx(1 / 5)


def test_shared_proponent_is_the_only_generally_influential_sample():
    rng = np.random.default_rng(4)
    scores = rng.normal(size=(5, 9))
    scores[:, 6] = 10.0
    gi = generally_influential(scores, 1, 1.0)
    assert gi.dtype == bool
    assert gi.shape == (9,)
    assert np.flatnonzero(gi).tolist() == [6]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_generally_influential_matches_brute_force_loop(seed):
    scores = _random_scores(seed, n_query=10)
    n_query = scores.shape[0]
    for k in (1, 5, 12):
        counts = _brute_counts(scores, k)
        for tau in (0.1, 0.25, 0.3, 0.5, 0.7, 1.0):
            # Exact rational threshold: count / n_query >= tau, with tau = p / 100.
            p = round(tau * 100)
            expected = [100 * c >= p * n_query for c in counts]
            assert generally_influential(scores, k, tau).tolist() == expected


def test_generally_influential_threshold_tolerates_float_rounding():
    assert 0.28 * 25 > 7  # the product rounds up; a count of 7 must still qualify

    def scores_with_count(n_query: int, count: int) -> np.ndarray:
        scores = np.zeros((n_query, 3))
        scores[:count, 0] = 1.0  # column 0 is the top-1 of exactly `count` queries
        scores[count:, 1] = 1.0
        return scores

    assert generally_influential(scores_with_count(16, 8), 1, 0.5)[0]
    assert not generally_influential(scores_with_count(16, 7), 1, 0.5)[0]
    assert generally_influential(scores_with_count(25, 7), 1, 0.28)[0]
    assert not generally_influential(scores_with_count(25, 6), 1, 0.28)[0]


def test_specificity_sweep_has_one_entry_per_k_tau_pair_matching_the_single_metrics():
    scores = _random_scores(5)
    ks, taus = [1, 3, 8], [0.2, 0.5]
    rows = specificity_sweep(scores, ks, taus)
    assert [(r["k"], r["tau"]) for r in rows] == [(k, t) for k in ks for t in taus]
    for r in rows:
        assert set(r) == {"k", "tau", "unique_ratio", "generally_influential"}
        assert r["unique_ratio"] == unique_ratio(scores, r["k"])
        expected = int(generally_influential(scores, r["k"], r["tau"]).sum())
        assert r["generally_influential"] == expected
        assert isinstance(r["generally_influential"], int)


def test_outlier_share_counts_outlier_slots_in_selected_queries_top_k():
    # Columns 0 and 1 are outliers. Top-2 per query:
    #   q0: [0, 1] -> 2 outlier slots; q1: [2, 0] -> 1; q2: [3, 2] -> 0. Top-1: 0, 2, 3.
    scores = np.array(
        [
            [5.0, 4.0, 1.0, 0.0],
            [4.0, 0.0, 5.0, 1.0],
            [0.0, 1.0, 4.0, 5.0],
        ]
    )
    is_outlier = np.array([True, True, False, False])
    assert outlier_share(scores, 2, is_outlier) == pytest.approx(3 / 6)
    assert outlier_share(scores, 2, is_outlier, np.array([True, False, True])) == pytest.approx(
        2 / 4
    )
    assert outlier_share(scores, 2, is_outlier, np.array([1])) == pytest.approx(1 / 2)
    assert outlier_share(scores, 2, is_outlier, np.array([2])) == 0.0
    assert outlier_share(scores, 1, is_outlier, np.array([0, 1])) == pytest.approx(1 / 2)
    assert outlier_share(scores, 1, is_outlier, np.array([0, 0])) == 1.0  # repeats count


def test_outlier_share_matches_brute_force_loop():
    scores = _random_scores(6)
    rng = np.random.default_rng(7)
    is_outlier = rng.random(scores.shape[1]) < 0.3
    mask = rng.random(scores.shape[0]) < 0.5
    mask[0] = True
    for k in (1, 4):
        chosen = _brute_top_k(scores, k)
        hits = sum(is_outlier[j] for q in range(len(chosen)) if mask[q] for j in chosen[q])
        expected = hits / (mask.sum() * k)
        assert outlier_share(scores, k, is_outlier, mask) == pytest.approx(expected)
        assert outlier_share(scores, k, is_outlier, np.flatnonzero(mask)) == pytest.approx(expected)


def test_self_rank_counts_strictly_greater_scores_plus_one():
    scores = np.array(
        [
            [0.9, 0.1, 0.5, 0.3],  # self 0: best -> 1
            [0.2, 0.8, 0.9, 0.7],  # self 1: one larger -> 2
            [0.4, 0.4, 0.4, 0.1],  # self 2: tied for first -> 1
            [0.6, 0.6, 0.2, 0.1],  # self 3: three larger -> 4
            [0.5, 0.7, 0.7, 0.9],  # self 2: tied second behind 0.9 -> 2
        ]
    )
    ranks = self_rank(scores, np.array([0, 1, 2, 3, 2]))
    assert ranks.dtype == np.int64
    assert ranks.tolist() == [1, 2, 1, 4, 2]


def test_self_rank_is_one_when_each_training_query_scores_itself_highest():
    rng = np.random.default_rng(8)
    scores = rng.normal(size=(6, 10))
    self_index = rng.permutation(10)[:6]
    scores[np.arange(6), self_index] = 100.0
    assert self_rank(scores, self_index).tolist() == [1] * 6


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_spearman_matches_scipy_spearmanr_on_random_data_with_ties(seed):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 6, size=40).astype(float)
    y = x + rng.integers(-3, 4, size=40)
    assert spearman(x, y) == pytest.approx(stats.spearmanr(x, y).statistic, abs=1e-12)
    z = rng.normal(size=40)
    assert spearman(x, z) == pytest.approx(stats.spearmanr(x, z).statistic, abs=1e-12)


def test_spearman_is_one_for_monotone_and_minus_one_for_reversed_data():
    x = np.array([0.1, 2.0, 3.5, 7.0, 8.0])
    assert spearman(x, np.exp(x)) == pytest.approx(1.0)
    assert spearman(x, -(x**3)) == pytest.approx(-1.0)


def test_spearman_is_nan_when_either_input_is_constant():
    x = np.array([1.0, 2.0, 3.0])
    assert math.isnan(spearman(x, np.full(3, 4.0)))
    assert math.isnan(spearman(np.full(3, 4.0), x))


def test_nan_in_scores_raises_naming_the_query_rows():
    scores = np.zeros((5, 4))
    scores[1, 2] = np.nan
    scores[3, 0] = np.nan
    with pytest.raises(ValueError, match=r"NaN.*rows \[1, 3\]"):
        top_k(scores, 2)
    with pytest.raises(ValueError, match=r"rows \[1, 3\]"):
        unique_ratio(scores, 2)


@pytest.mark.parametrize("k", [0, -1, 5, 1.5])
def test_k_outside_one_to_n_train_raises(k):
    scores = np.zeros((3, 4))
    with pytest.raises(ValueError, match="k must"):
        top_k(scores, k)
    with pytest.raises(ValueError, match="k must"):
        specificity_sweep(scores, [1, k], [0.5])


@pytest.mark.parametrize("tau", [0.0, -0.2, 1.01, float("nan")])
def test_tau_outside_zero_to_one_raises(tau):
    scores = np.zeros((3, 4))
    with pytest.raises(ValueError, match="tau"):
        generally_influential(scores, 1, tau)
    with pytest.raises(ValueError, match="tau"):
        specificity_sweep(scores, [1], [0.5, tau])


@pytest.mark.parametrize("shape", [(4,), (2, 3, 4)])
def test_scores_that_are_not_2d_raise(shape):
    with pytest.raises(ValueError, match="2-D"):
        top_k(np.zeros(shape), 1)


def test_mismatched_lengths_raise():
    scores = np.zeros((3, 4))
    with pytest.raises(ValueError, match="is_outlier"):
        outlier_share(scores, 1, np.zeros(3, bool))
    with pytest.raises(ValueError, match="queries"):
        outlier_share(scores, 1, np.zeros(4, bool), np.array([True, False]))
    with pytest.raises(ValueError, match="self_index"):
        self_rank(scores, np.array([0, 1]))
    with pytest.raises(ValueError, match="equal lengths"):
        spearman(np.zeros(3), np.zeros(4))
