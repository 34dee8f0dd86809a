"""The memorisation control's metrics against hand-built cases."""

from __future__ import annotations

import math

import numpy as np
import pytest

from diffattr.evaluation.tracing import (
    find_copies,
    source_ranks,
    tracing_summary,
    wilson_interval,
)


def test_a_copy_is_three_times_closer_to_its_source_than_to_any_other_image():
    train = np.zeros((3, 1, 2, 2))
    train[1] += 1.0  # distance 2 from image 0 (4 pixels differ by 1)
    train[2] -= 1.0
    queries = np.stack([train[1] + 0.1, train[0] + 0.5, train[2] - 0.2])
    copies = find_copies(queries, train)
    # query 0: d1 = 0.2, d2 = 2.2 (image 0) → a copy of image 1
    # query 1: d1 = 1.0 (image 0), d2 = 1.0 (image 1) → not a copy
    # query 2: d1 = 0.4 (image 2), d2 = 2.4 (image 0) → a copy of image 2
    np.testing.assert_array_equal(copies.source, [1, 0, 2])
    np.testing.assert_allclose(copies.d1, [0.2, 1.0, 0.4])
    np.testing.assert_allclose(copies.d2, [2.2, 1.0, 2.4])
    np.testing.assert_array_equal(copies.is_copy, [True, False, True])
    assert copies.rows.tolist() == [0, 2] and copies.share == pytest.approx(2 / 3)
    assert find_copies(queries, train, ratio=1.0).rows.tolist() == [0, 2]  # 1.0 < 1.0 is false
    with pytest.raises(ValueError, match="second-nearest"):
        find_copies(queries, train[:1])


def test_source_rank_counts_ties_against_the_source():
    scores = np.array([[3.0, 1.0, 2.0], [1.0, 1.0, 0.0], [0.0, 5.0, 5.0], [2.0, 2.0, 2.0]])
    ranks = source_ranks(scores, np.array([0, 0, 1, 2]))
    assert ranks.tolist() == [1, 2, 2, 3]  # a method that scores all alike ranks no source first
    with pytest.raises(ValueError, match="columns"):
        source_ranks(scores, np.array([0, 0, 1, 3]))


@pytest.mark.parametrize(
    ("successes", "n", "low", "high"),
    [(5, 10, 0.23659, 0.76341), (0, 10, 0.0, 0.27753), (10, 10, 0.72247, 1.0)],
)
def test_wilson_interval_matches_the_textbook_values(successes, n, low, high):
    got = wilson_interval(successes, n)
    np.testing.assert_allclose(got, (low, high), atol=1e-5)


def test_tracing_summary_gives_the_rank1_share_its_interval_and_the_median_rank():
    summary = tracing_summary(np.array([1, 1, 1, 2, 5]))
    assert summary["n_copies"] == 5 and summary["rank1"] == pytest.approx(0.6)
    assert (summary["rank1_low"], summary["rank1_high"]) == pytest.approx(wilson_interval(3, 5))
    assert summary["median_rank"] == 1.0
    assert summary["median_low"] <= 1.0 <= summary["median_high"] <= 5.0
    empty = tracing_summary(np.array([], np.int64))
    assert empty["n_copies"] == 0 and math.isnan(empty["rank1"])
