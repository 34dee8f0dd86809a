"""TRAK / D-TRAK: the SVD damping sweep equals a direct solve of (ΦᵀΦ + λI) x = φ."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import method_inputs_of

from diffattr import methods
from diffattr.methods.trak import damped_scores
from diffattr.storage.arrays import load_store


@pytest.mark.parametrize(("n", "k"), [(12, 5), (5, 12)], ids=["more samples", "more features"])
def test_svd_sweep_equals_a_direct_solve(n, k):
    rng = np.random.default_rng(0)
    phi, queries = rng.standard_normal((n, k)), rng.standard_normal((3, k))
    sweep = damped_scores(phi, queries, [1e-3, 0.1, 10.0])
    for lam, got in zip([1e-3, 0.1, 10.0], sweep, strict=True):
        solved = np.linalg.solve(phi.T @ phi + lam * np.eye(k), phi.T)  # [k, N]
        np.testing.assert_allclose(got, queries @ solved, rtol=1e-7, atol=1e-10)


def test_bad_dampings_and_shapes_are_refused():
    phi, queries = np.ones((4, 3)), np.ones((2, 3))
    for bad in ([0.0], [float("inf")], ["a lot"]):
        with pytest.raises(ValueError, match="damping"):
            damped_scores(phi, queries, bad)
    with pytest.raises(ValueError, match="disagree"):
        damped_scores(phi, np.ones((2, 4)), [1.0])


@pytest.mark.parametrize("method", ["trak", "dtrak"])
def test_store_scores_use_grid_averaged_features_of_the_ema_store(smoke_pipeline_ema, method):
    _, _, gradient_dir = smoke_pipeline_ema
    spec = methods.get(method)
    inputs = method_inputs_of(smoke_pipeline_ema)
    scores = spec.sweep_values(inputs, spec.make_args(), [0.5, 2.0])
    single = spec(inputs, spec.make_args({"damping": 2.0}))
    np.testing.assert_array_equal(single.values, scores[1].values)
    _, a = load_store(gradient_dir / "ema_step_0000006")
    suffix = "" if method == "trak" else "_sqnorm"
    phi = a[f"train_grid{suffix}_features"].astype(np.float64).mean(axis=1)
    q = a[f"query{suffix}_features"].astype(np.float64).mean(axis=1)
    for s, lam in zip(scores, [0.5, 2.0], strict=True):
        expected = q @ np.linalg.solve(phi.T @ phi + lam * np.eye(phi.shape[1]), phi.T)
        np.testing.assert_allclose(s.values, expected, rtol=1e-6, atol=1e-12)
        assert s.settings["args"]["damping"] == lam and s.settings["method"] == method


def test_a_gradient_run_without_ema_store_is_refused(smoke_pipeline):
    with pytest.raises(ValueError, match="ema: true"):
        methods.get("trak")(method_inputs_of(smoke_pipeline))
