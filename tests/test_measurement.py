"""The LDS measurement m(θ, q): keyed draws that depend on the query alone, and a batched loss
that equals a plain loop over the draws."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diffattr.diffusion.model import build_unet, predict_eps, unet_config
from diffattr.diffusion.schedule import add_noise, build_scheduler
from diffattr.diffusion.task import per_sample_loss
from diffattr.evaluation.measurement import kind_codes, measure, measurement_draws

SHAPE = (1, 8, 8)
KINDS = np.array(["generated"] * 3 + ["heldout"] * 2)
KEYS = np.array([0, 1, 2, 7, 9])


@pytest.fixture(scope="module")
def unet() -> torch.nn.Module:
    return build_unet(unet_config("tiny", SHAPE), seed=0)


@pytest.fixture(scope="module")
def alphas_cumprod() -> torch.Tensor:
    return build_scheduler("linear", 1000).alphas_cumprod


def _images(n: int = 5) -> torch.Tensor:
    return torch.rand(n, *SHAPE, generator=torch.Generator().manual_seed(1)) * 2 - 1


def test_a_querys_draws_depend_on_its_identity_not_its_position():
    draws = measurement_draws(KINDS, KEYS, SHAPE, n_draws=6, seed=3)
    order = np.array([4, 2, 0, 3, 1])
    shuffled = measurement_draws(KINDS[order], KEYS[order], SHAPE, n_draws=6, seed=3)
    np.testing.assert_array_equal(shuffled.t, draws.t[order])
    alone = measurement_draws(KINDS[[3]], KEYS[[3]], SHAPE, n_draws=6, seed=3)
    np.testing.assert_array_equal(alone.t[0], draws.t[3])
    k = np.arange(6)
    torch.testing.assert_close(alone.eps(np.zeros(6, int), k), draws.eps(np.full(6, 3), k))
    torch.testing.assert_close(
        shuffled.eps(np.array([1, 0]), np.array([5, 2])), draws.eps(np.array([2, 4]), [5, 2])
    )


def test_different_queries_and_seeds_get_different_draws():
    draws = measurement_draws(KINDS, KEYS, SHAPE, n_draws=4, seed=3)
    eps = draws.eps(np.repeat(np.arange(5), 4), np.tile(np.arange(4), 5)).reshape(5, 4, -1)
    for a in range(5):
        for b in range(a + 1, 5):
            assert not torch.allclose(eps[a], eps[b])
    # same key, different kind: generated seed 7 is not held-out image 7
    mixed = measurement_draws(["generated", "heldout"], [7, 7], SHAPE, n_draws=4, seed=3)
    assert not torch.allclose(mixed.eps([0], [0]), mixed.eps([1], [0]))
    other = measurement_draws(KINDS, KEYS, SHAPE, n_draws=4, seed=4)
    assert not torch.allclose(other.eps([0], [0]), draws.eps([0], [0]))


def test_stratified_timesteps_fall_one_per_stratum_and_uniform_ones_cover_the_range():
    draws = measurement_draws(KINDS, KEYS, SHAPE, n_draws=10, seed=0, num_train_timesteps=1000)
    strata = draws.t // 100
    np.testing.assert_array_equal(strata, np.tile(np.arange(10), (5, 1)))
    uniform = measurement_draws(
        ["heldout"] * 50, np.arange(50), SHAPE, n_draws=40, seed=0, t_sampling="uniform"
    )
    assert uniform.t.min() >= 0 and uniform.t.max() < 1000
    assert abs(uniform.t.mean() - 499.5) < 20
    assert draws.settings("l2")["t_sampling"] == "stratified"
    assert uniform.settings("l1") == {
        **uniform.settings("l1"),
        "draws": 40,
        "seed": 0,
        "loss": "l1",
    }


def test_measure_equals_a_plain_loop_over_draws_for_any_batch_size(unet, alphas_cumprod):
    images = _images()
    draws = measurement_draws(KINDS, KEYS, SHAPE, n_draws=3, seed=5)
    expected = np.zeros(5)
    with torch.no_grad():
        unet.eval()
        for q in range(5):
            for k in range(3):
                t = torch.tensor([int(draws.t[q, k])])
                eps = draws.eps([q], [k])
                x_t = add_noise(images[q : q + 1], eps, t, alphas_cumprod)
                expected[q] += float(per_sample_loss(predict_eps(unet, x_t, t), eps, "l1")) / 3
    unet.train()
    for batch_size in (1, 4, 15, 64):
        got = measure(unet, images, draws, alphas_cumprod, "l1", batch_size=batch_size)
        assert got.dtype == np.float64 and got.shape == (5,)
        np.testing.assert_allclose(got, expected, rtol=1e-5)
    assert unet.training  # mode restored


def test_measure_of_a_query_does_not_depend_on_the_other_queries(unet, alphas_cumprod):
    images = _images()
    draws = measurement_draws(KINDS, KEYS, SHAPE, n_draws=4, seed=5)
    full = measure(unet, images, draws, alphas_cumprod, "l2", batch_size=7)
    sub = measurement_draws(KINDS[[4, 1]], KEYS[[4, 1]], SHAPE, n_draws=4, seed=5)
    part = measure(unet, images[[4, 1]], sub, alphas_cumprod, "l2", batch_size=3)
    np.testing.assert_allclose(part, full[[4, 1]], rtol=1e-5)


def test_measure_refuses_images_that_do_not_match_the_draws(unet, alphas_cumprod):
    draws = measurement_draws(KINDS, KEYS, SHAPE, n_draws=2, seed=0)
    with pytest.raises(ValueError, match=r"images must be \[Q, C, H, W\] = \[5, 1, 8, 8\]"):
        measure(unet, _images(4), draws, alphas_cumprod)
    with pytest.raises(ValueError, match=r"got \[5, 64\]"):
        measure(unet, _images().flatten(1), draws, alphas_cumprod)
    with pytest.raises(ValueError, match="unknown loss"):
        measure(unet, _images(), draws, alphas_cumprod, "l3")
    with pytest.raises(ValueError, match="T = 1000"):
        measure(unet, _images(), draws, alphas_cumprod[:10])


def test_bad_draw_requests_fail_clearly():
    with pytest.raises(ValueError, match="unknown query kinds"):
        kind_codes(["generated", "sampled"])
    with pytest.raises(ValueError, match="share a"):
        measurement_draws(["heldout", "heldout"], [3, 3], SHAPE, n_draws=2, seed=0)
    with pytest.raises(ValueError, match="t_sampling"):
        measurement_draws(KINDS, KEYS, SHAPE, n_draws=2, seed=0, t_sampling="grid")
    with pytest.raises(ValueError, match="≥ 1 draw"):
        measurement_draws(KINDS, KEYS, SHAPE, n_draws=0, seed=0)
    np.testing.assert_array_equal(kind_codes(KINDS), kind_codes(kind_codes(KINDS)))
