"""K-FAC / EK-FAC influence through the method interface equals the formula evaluated on full
gradients: ∇m(q)ᵀ (K + λI)⁻¹ ∇ℓ(x_j), with the training side averaged over the EMA grid."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import method_inputs_of

from diffattr import methods
from diffattr.diffusion.schedule import build_scheduler
from diffattr.gradients.engines import PerSampleGradients
from diffattr.gradients.extraction import mean_gradients
from diffattr.gradients.items import KIND_TRAIN, ItemSet, grid_items, timestep_grid
from diffattr.gradients.kfac import influence, layer_blocks
from diffattr.methods.kfac import fitted


@pytest.mark.parametrize(
    ("name", "query_side", "train_side"),
    [
        ("kfac", "grid", "stored"),
        ("ekfac", "grid", "stored"),
        ("kfac", "measurement", "streamed"),
        ("ekfac", "measurement", "streamed"),
    ],
)
def test_method_scores_equal_dense_influence_on_full_gradients(
    smoke_pipeline_ema_exact, name, query_side, train_side
):
    P, _, _ = smoke_pipeline_ema_exact
    inputs = method_inputs_of(smoke_pipeline_ema_exact)
    method = methods.get(name)
    args = method.make_args(
        {
            "draws": 2,
            "damping": 1e-3,
            "query_side": query_side,
            "train_side": train_side,
            "train_timesteps": 3,
        }
    )
    scores = method.sweep_values(inputs, args, [1e-3, 1e-1])
    kfac, model = fitted(inputs, args, eigen_correction=name == "ekfac")
    abar = build_scheduler().alphas_cumprod
    grads = PerSampleGradients(model, abar, "l2", "loss")
    index = inputs.gradients
    if query_side == "grid":
        queries = inputs.queries.items(index.timesteps("query"), P.gradients.query_draws, 0)
    else:  # the measurement's own draws: t and ε of every one of its K draws
        draws = inputs.measurement
        assert draws.n_draws == P.retrain.measure_draws
        eps = draws.eps(
            np.repeat(np.arange(draws.n_query), draws.n_draws),
            np.tile(np.arange(draws.n_draws), draws.n_query),
        )
        eps = eps.reshape(draws.n_query, draws.n_draws, 1, *draws.image_shape)
        queries = ItemSet(inputs.queries.images, torch.from_numpy(draws.t), 1, lambda r: eps[r])
    grid = index.timesteps("ema_train") if train_side == "stored" else timestep_grid(3, 1000)
    train = grid_items(inputs.train.images, inputs.train.ids, KIND_TRAIN, grid, 1, 0)
    q_blocks = layer_blocks(mean_gradients(queries, grads).double(), model)
    t_blocks = layer_blocks(mean_gradients(train, grads).double(), model)
    for damping, s in zip([1e-3, 1e-1], scores, strict=True):
        expected = influence(kfac, q_blocks, t_blocks, damping).numpy()
        np.testing.assert_allclose(
            s.values, expected, rtol=2e-3, atol=1e-6 * np.abs(expected).max()
        )
        assert s.settings["args"]["damping"] == damping and s.settings["method"] == name
        assert s.settings["query_side"] == query_side
        assert s.settings["train_side"].startswith(train_side)
    assert not np.allclose(scores[0].values, scores[1].values)


def test_streamed_training_side_equals_the_stored_one_without_projection(
    smoke_pipeline_ema_exact,
):
    """Same draws (the EMA grid's size and keys), no sketch: the two training sides agree."""
    inputs = method_inputs_of(smoke_pipeline_ema_exact)
    method = methods.get("ekfac")
    n_grid = len(inputs.gradients.timesteps("ema_train"))
    common = {"draws": 2, "query_side": "grid", "train_timesteps": n_grid}
    stored = method(inputs, method.make_args({**common, "train_side": "stored"}))
    streamed = method(inputs, method.make_args({**common, "train_side": "streamed"}))
    scale = np.abs(stored.values).max()
    np.testing.assert_allclose(streamed.values, stored.values, rtol=1e-3, atol=1e-5 * scale)


@pytest.mark.parametrize(
    ("key", "value"), [("query_side", "sketch"), ("train_side", "full"), ("train_timesteps", 0)]
)
def test_unknown_sides_and_bad_grid_sizes_are_refused(key, value):
    with pytest.raises(ValueError, match=key):
        methods.get("kfac").make_args({key: value})


def test_kfac_refuses_an_l1_run_with_a_clear_message():
    from diffattr.gradients.kfac import fit_kfac

    model = torch.nn.Sequential(torch.nn.Linear(2, 2)).eval()
    with pytest.raises(ValueError, match="l1"):
        fit_kfac(model, lambda: [], loss_kind="l1")
