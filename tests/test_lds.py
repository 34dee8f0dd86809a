"""The Linear Datamodelling Score: a synthetic linear datamodel with a known LDS, brute-force
loops with scipy, and the damping protocol that never chooses on the queries it scores."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from diffattr.evaluation.lds import (
    choose_damping,
    ground_truth,
    lds,
    seed_vs_rest,
    split_queries,
    subset_predictions,
)
from diffattr.stages.lds import removal_findings


def _linear_datamodel(seed: int, n_query=9, n_train=40, n_subsets=30, noise=0.0, n_seeds=1):
    """Weights w [Q, N], masks [M, N] (50% subsets) and measurements [M, R, Q] with
    loss_S(q) = b_q + Σ_{j∉S} w_qj (+ Gaussian noise per model)."""
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(n_query, n_train))
    b = rng.normal(size=n_query)
    masks = rng.random((n_subsets, n_train)) < 0.5
    clean = b[None, :] + (~masks).astype(float) @ w.T  # [M, Q]
    meas = clean[:, None, :] + noise * rng.normal(size=(n_subsets, n_seeds, n_query))
    return w, masks, meas


def test_exact_scores_of_a_linear_datamodel_give_lds_one():
    w, masks, meas = _linear_datamodel(0)
    result = lds(subset_predictions(w, masks), ground_truth(meas))
    assert result.mean == pytest.approx(1.0, abs=1e-12)
    assert result.sem == pytest.approx(0.0, abs=1e-12)
    assert result.n_queries == 9 and result.n_dropped == 0


def test_flipped_scores_give_minus_the_lds():
    w, masks, meas = _linear_datamodel(1)
    assert lds(subset_predictions(-w, masks), ground_truth(meas)).mean == pytest.approx(-1.0)
    w, masks, meas = _linear_datamodel(2, noise=3.0, n_seeds=2)
    actual = ground_truth(meas)
    plus = lds(subset_predictions(w, masks), actual)
    minus = lds(subset_predictions(-w, masks), actual)
    assert 0 < plus.mean < 1
    assert minus.mean == pytest.approx(-plus.mean, abs=1e-12)
    np.testing.assert_allclose(minus.rho, -plus.rho, atol=1e-12)


def test_subset_predictions_sum_the_scores_left_out():
    rng = np.random.default_rng(3)
    scores = rng.normal(size=(4, 6))
    masks = rng.random((5, 6)) < 0.5
    expected = np.array([[scores[q, ~masks[m]].sum() for m in range(5)] for q in range(4)])
    np.testing.assert_allclose(subset_predictions(scores, masks), expected, atol=1e-12)


def test_noisy_linear_datamodel_matches_brute_force_scipy():
    w, masks, meas = _linear_datamodel(4, noise=2.0, n_seeds=3)
    scores = w + np.random.default_rng(5).normal(scale=0.5, size=w.shape)
    actual = meas.mean(axis=1).T
    pred = np.array([[scores[q, ~m].sum() for m in masks] for q in range(len(w))])
    rhos = [stats.spearmanr(p, a).statistic for p, a in zip(pred, actual, strict=True)]
    result = lds(subset_predictions(scores, masks), ground_truth(meas))
    np.testing.assert_allclose(result.rho, rhos, atol=1e-12)
    assert result.mean == pytest.approx(np.mean(rhos), abs=1e-12)
    assert result.sem == pytest.approx(stats.sem(rhos), abs=1e-12)


def test_lds_matches_loop_over_queries_with_scipy_spearmanr():
    rng = np.random.default_rng(9)
    actual = rng.normal(size=(7, 25))
    predicted = actual + rng.normal(scale=1.5, size=actual.shape)
    predicted[2] = np.round(predicted[2])  # ties
    rhos = [stats.spearmanr(p, a).statistic for p, a in zip(predicted, actual, strict=True)]
    result = lds(predicted, actual)
    assert result.mean == pytest.approx(np.mean(rhos), abs=1e-12)
    assert result.sem == pytest.approx(stats.sem(rhos), abs=1e-12)


def test_queries_with_constant_rows_are_dropped_and_counted():
    rng = np.random.default_rng(10)
    actual = rng.normal(size=(5, 20))
    predicted = actual + rng.normal(size=actual.shape)
    predicted[1] = 3.0  # constant prediction: Spearman undefined
    actual[3] = -1.0  # constant measurement: Spearman undefined
    keep = [0, 2, 4]
    rhos = [stats.spearmanr(predicted[q], actual[q]).statistic for q in keep]
    result = lds(predicted, actual)
    assert result.mean == pytest.approx(np.mean(rhos), abs=1e-12)
    assert result.sem == pytest.approx(stats.sem(rhos), abs=1e-12)
    assert result.n_queries == 3 and result.n_dropped == 2
    assert np.isnan(result.rho[[1, 3]]).all() and not np.isnan(result.rho[keep]).any()
    # a query whose training scores are all equal predicts the same for every subset of equal
    # size: it is dropped too
    masks = np.zeros((6, 4), bool)
    masks[np.arange(6), np.arange(6) % 4] = True
    pred = subset_predictions(np.ones((2, 4)), masks)
    assert lds(pred, rng.normal(size=(2, 6))).n_dropped == 2


def test_lds_is_nan_when_every_query_is_undefined_and_json_has_no_nan():
    predicted = np.ones((3, 6))
    actual = np.random.default_rng(11).normal(size=(3, 6))
    result = lds(predicted, actual)
    assert math.isnan(result.mean) and math.isnan(result.sem)
    assert result.n_queries == 0 and result.n_dropped == 3
    text = json.dumps(result.to_dict(), allow_nan=False)
    assert json.loads(text)["mean"] is None


def test_nan_inputs_are_refused_naming_the_rows():
    scores = np.zeros((5, 4))
    scores[1, 2] = np.nan
    scores[3, 0] = np.nan
    with pytest.raises(ValueError, match=r"predicted.*rows \[1, 3\]"):
        lds(scores, np.zeros((5, 4)))
    with pytest.raises(ValueError, match=r"actual.*rows \[1, 3\]"):
        lds(np.zeros((5, 4)), scores)
    with pytest.raises(ValueError, match=r"scores.*rows \[1, 3\]"):
        subset_predictions(scores, np.zeros((2, 4), bool))
    meas = np.zeros((3, 2, 4))
    meas[2, 1, 0] = np.nan
    with pytest.raises(ValueError, match=r"\(subset 2, seed 1\)"):
        ground_truth(meas)
    with pytest.raises(ValueError, match=r"\(subset 2, seed 1\)"):
        seed_vs_rest(meas)


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match="same shape"):
        lds(np.zeros((3, 5)), np.zeros((3, 6)))
    with pytest.raises(ValueError, match="bool"):
        subset_predictions(np.zeros((2, 4)), np.zeros((3, 4)))
    with pytest.raises(ValueError, match="n_train=4"):
        subset_predictions(np.zeros((2, 4)), np.zeros((3, 5), bool))
    with pytest.raises(ValueError, match="3-D"):
        ground_truth(np.zeros((3, 4)))


def test_ground_truth_is_the_mean_over_seeds_as_query_by_subset():
    meas = np.random.default_rng(12).normal(size=(6, 3, 4))
    gt = ground_truth(meas)
    assert gt.shape == (4, 6)
    np.testing.assert_allclose(gt[2, 5], meas[5, :, 2].mean())


def test_seed_vs_rest_matches_a_brute_force_loop():
    _, _, meas = _linear_datamodel(13, noise=1.5, n_seeds=4)
    meas[:, 2, 0] = 7.0  # seed 2 constant for query 0: that seed is skipped for that query
    n_subsets, n_seeds, n_query = meas.shape
    rho = np.empty(n_query)
    for q in range(n_query):
        per_seed = []
        for r in range(n_seeds):
            rest = [s for s in range(n_seeds) if s != r]
            x = meas[:, r, q]
            y = meas[:, rest, q].mean(axis=1)
            if np.ptp(x) > 0 and np.ptp(y) > 0:
                per_seed.append(stats.spearmanr(x, y).statistic)
        rho[q] = np.mean(per_seed)
    result = seed_vs_rest(meas)
    np.testing.assert_allclose(result.rho, rho, atol=1e-12)
    assert result.mean == pytest.approx(rho.mean(), abs=1e-12)
    assert result.sem == pytest.approx(stats.sem(rho), abs=1e-12)
    assert 0 < result.mean < 1


def test_seed_vs_rest_needs_two_seeds():
    with pytest.raises(ValueError, match="at least 2 seeds"):
        seed_vs_rest(np.zeros((5, 1, 3)))


def test_split_queries_is_deterministic_stratified_and_covers_every_query():
    kind = np.array(["generated"] * 7 + ["heldout"] * 6)
    a, b = split_queries(kind, seed=0)
    a2, b2 = split_queries(kind, seed=0)
    np.testing.assert_array_equal(a, a2)
    np.testing.assert_array_equal(b, b2)
    assert np.array_equal(np.sort(np.concatenate([a, b])), np.arange(13))
    assert abs(len(a) - len(b)) <= 1
    for k in ("generated", "heldout"):
        na, nb = np.sum(kind[a] == k), np.sum(kind[b] == k)
        assert abs(na - nb) <= 1
    others = [split_queries(kind, seed=s)[0] for s in range(1, 6)]
    assert any(not np.array_equal(a, o) for o in others)
    with pytest.raises(ValueError, match="≥ 2 queries"):
        split_queries(["generated"], seed=0)


def _damping_case():
    """Two values: value 0 predicts half A perfectly and half B backwards; value 1 predicts
    half A a little worse and half B mostly right. Value 0 wins on half A alone and on all
    queries together (the oracle); on half B, value 1 wins."""
    rng = np.random.default_rng(14)
    n_query, n_subsets = 8, 40
    actual = rng.normal(size=(n_query, n_subsets))
    half_a, half_b = np.arange(0, 8, 2), np.arange(1, 8, 2)
    pred = np.empty((2, n_query, n_subsets))
    pred[0, half_a] = actual[half_a]  # rho = 1
    pred[0, half_b] = actual[half_b] + rng.normal(scale=0.3, size=(4, n_subsets))  # rho ~ 0.95
    pred[1, half_a] = actual[half_a] + rng.normal(scale=1.0, size=(4, n_subsets))  # rho ~ 0.7
    pred[1, half_b] = actual[half_b] + rng.normal(scale=0.05, size=(4, n_subsets))  # rho ~ 1
    return pred, actual, (half_a, half_b)


def test_damping_is_chosen_on_the_other_half_and_differs_from_the_oracle():
    pred, actual, split = _damping_case()
    half_a, half_b = split
    rho = np.array(
        [[stats.spearmanr(p, a).statistic for p, a in zip(pv, actual, strict=True)] for pv in pred]
    )
    # the construction: value 0 best on A and overall, value 1 best on B
    assert rho[0, half_a].mean() > rho[1, half_a].mean()
    assert rho[1, half_b].mean() > rho[0, half_b].mean()
    assert rho[0].mean() > rho[1].mean()
    choice = choose_damping(pred, actual, [0.1, 10.0], split)
    # half A is scored with the value best on B (10.0), half B with the value best on A (0.1)
    assert choice.value_for_a == 10.0 and choice.value_for_b == 0.1
    expected = np.empty(8)
    expected[half_a] = rho[1, half_a]
    expected[half_b] = rho[0, half_b]
    np.testing.assert_allclose(choice.result.rho, expected, atol=1e-12)
    assert choice.result.mean == pytest.approx(expected.mean(), abs=1e-12)
    # the oracle: best on all queries, scored on the same queries (optimistic)
    assert choice.oracle_value == 0.1
    np.testing.assert_allclose(choice.oracle.rho, rho[0], atol=1e-12)
    assert choice.oracle.mean > choice.result.mean
    assert [c.mean for c in choice.curve] == pytest.approx(rho.mean(axis=1), abs=1e-12)
    json.dumps(choice.to_dict(), allow_nan=False)


def test_choice_for_a_half_does_not_depend_on_that_half():
    pred, actual, split = _damping_case()
    half_a, _ = split
    tampered = pred.copy()
    # ruin value 10.0 on half A: a choice that peeked at half A would score it with 0.1; the
    # value that scores half A is chosen on half B alone, so it stays 10.0 (and scores -1)
    tampered[1, half_a] = -actual[half_a]
    before = choose_damping(pred, actual, [0.1, 10.0], split)
    after = choose_damping(tampered, actual, [0.1, 10.0], split)
    assert after.value_for_a == before.value_for_a == 10.0
    np.testing.assert_allclose(after.result.rho[half_a], -1.0)


def test_choose_damping_refuses_a_bad_split_or_values():
    pred, actual, (half_a, half_b) = _damping_case()
    with pytest.raises(ValueError, match="split"):
        choose_damping(pred, actual, [1.0, 2.0], (half_a, half_b[:-1]))
    with pytest.raises(ValueError, match="values"):
        choose_damping(pred, actual, [1.0], (half_a, half_b))
    bad = pred.copy()
    bad[1, 3, 0] = np.nan
    with pytest.raises(ValueError, match=r"index 1.*rows \[3\]"):
        choose_damping(bad, actual, [1.0, 2.0], (half_a, half_b))


def _removal(changes: dict[str, list[float]]) -> pd.DataFrame:
    return pd.DataFrame(
        [
            {"query": q, "method": m, "k": 32, "loss_change": v}
            for m, values in changes.items()
            for q, v in enumerate(values)
        ]
    )


def test_removal_claims_are_paired_over_queries_with_an_interval():
    method = [0.004, 0.006, 0.005, 0.007]
    random = [0.001, 0.002, 0.0, 0.001]
    (row,) = removal_findings(_removal({"ekfac": method, "random": random}))
    diff = np.subtract(method, random)
    sem = diff.std(ddof=1) / math.sqrt(len(diff))
    assert f"{diff.mean():+.4f} ± {sem:.4f}" in row["ours"]
    assert row["verdict"] == "holds"  # z = 0.00425 / 0.00048 ≈ 8.9
    (flipped,) = removal_findings(_removal({"ekfac": random, "random": method}))
    assert flipped["verdict"] == "fails"
    noisy = removal_findings(_removal({"ekfac": [0.01, -0.01, 0.0], "random": [0, 0, 0.001]}))
    assert noisy[0]["verdict"] == "mixed"


def test_removal_claims_on_two_queries_are_not_resolved():
    (row,) = removal_findings(_removal({"ekfac": [0.002, 0.001], "random": [0.0, 0.001]}))
    assert row["verdict"] == "not resolved (2 queries)"
    assert "over 2 queries" in row["ours"]
    assert removal_findings(_removal({"ekfac": [0.1, 0.2]})) == []  # no random baseline
