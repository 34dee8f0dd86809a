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
from diffattr.gradients.items import KIND_TRAIN, grid_items
from diffattr.gradients.kfac import influence, layer_blocks
from diffattr.methods.kfac import fitted


@pytest.mark.parametrize("name", ["kfac", "ekfac"])
def test_method_scores_equal_dense_influence_on_full_gradients(smoke_pipeline_ema_exact, name):
    P, _, _ = smoke_pipeline_ema_exact
    inputs = method_inputs_of(smoke_pipeline_ema_exact)
    method = methods.get(name)
    args = method.make_args({"draws": 2, "damping": 1e-3})
    scores = method.sweep_values(inputs, args, [1e-3, 1e-1])
    kfac, model = fitted(inputs, args, eigen_correction=name == "ekfac")
    abar = build_scheduler().alphas_cumprod
    grads = PerSampleGradients(model, abar, "l2", "loss")
    index = inputs.gradients
    queries = inputs.queries.items(index.timesteps("query"), P.gradients.query_draws, 0)
    train = grid_items(
        inputs.train.images, inputs.train.ids, KIND_TRAIN, index.timesteps("ema_train"), 1, 0
    )
    q_blocks = layer_blocks(mean_gradients(queries, grads).double(), model)
    t_blocks = layer_blocks(mean_gradients(train, grads).double(), model)
    for damping, s in zip([1e-3, 1e-1], scores, strict=True):
        expected = influence(kfac, q_blocks, t_blocks, damping).numpy()
        np.testing.assert_allclose(
            s.values, expected, rtol=2e-3, atol=1e-6 * np.abs(expected).max()
        )
        assert s.settings["args"]["damping"] == damping and s.settings["method"] == name
    assert not np.allclose(scores[0].values, scores[1].values)


def test_kfac_refuses_an_l1_run_with_a_clear_message():
    from diffattr.gradients.kfac import fit_kfac

    model = torch.nn.Sequential(torch.nn.Linear(2, 2)).eval()
    with pytest.raises(ValueError, match="l1"):
        fit_kfac(model, lambda: [], loss_kind="l1")
