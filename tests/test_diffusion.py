"""The diffusion model: configs, schedule, noising, loss, keyed draws."""

from __future__ import annotations

import pytest
import torch

from diffattr.diffusion.draws import train_noise, train_timesteps
from diffattr.diffusion.model import UNET_CONFIGS, build_unet, unet_config
from diffattr.diffusion.schedule import add_noise, build_scheduler
from diffattr.diffusion.task import per_sample_loss
from diffattr.rng import keyed_normal


def test_linear_schedule_matches_ddpm_betas():
    s = build_scheduler("linear", 1000)
    assert s.betas[0].item() == pytest.approx(1e-4)
    assert s.betas[-1].item() == pytest.approx(0.02)
    assert torch.allclose(s.alphas_cumprod, torch.cumprod(1 - s.betas, 0))


def test_cosine_schedule_is_selectable_and_differs():
    lin, cos = build_scheduler("linear"), build_scheduler("cosine")
    assert not torch.allclose(lin.alphas_cumprod, cos.alphas_cumprod)
    with pytest.raises(ValueError, match="linear"):
        build_scheduler("quadratic")


def test_add_noise_follows_the_closed_form():
    s = build_scheduler()
    x0, eps = torch.randn(3, 1, 8, 8), torch.randn(3, 1, 8, 8)
    t = torch.tensor([0, 500, 999])
    abar = s.alphas_cumprod[t].view(-1, 1, 1, 1)
    assert torch.allclose(
        add_noise(x0, eps, t, s.alphas_cumprod), abar.sqrt() * x0 + (1 - abar).sqrt() * eps
    )
    assert torch.allclose(add_noise(x0, eps, t, s.alphas_cumprod), s.add_noise(x0, eps, t))


def test_loss_kinds_average_over_pixels_per_sample():
    a, b = torch.randn(4, 3, 2, 2), torch.randn(4, 3, 2, 2)
    assert torch.allclose(per_sample_loss(a, b, "l2"), ((a - b) ** 2).mean((1, 2, 3)))
    assert torch.allclose(per_sample_loss(a, b, "l1"), (a - b).abs().mean((1, 2, 3)))
    with pytest.raises(ValueError, match="l2"):
        per_sample_loss(a, b, "huber")


def test_keyed_draws_depend_on_the_key_alone_not_the_batch():
    together = train_noise(0, 5, [1, 1, 1], [3, 9, 11], (1, 8, 8))
    alone = train_noise(0, 5, [1], [9], (1, 8, 8))
    assert torch.equal(together[1], alone[0])
    assert not torch.equal(together[0], together[1])
    assert not torch.equal(train_noise(1, 5, [1], [9], (1, 8, 8)), alone)
    assert not torch.equal(train_noise(0, 6, [1], [9], (1, 8, 8)), alone)
    t = train_timesteps(0, 5, [1, 1, 1], [3, 9, 11], 1000)
    assert t[1] == train_timesteps(0, 5, [1], [9], 1000)[0]
    assert ((t >= 0) & (t < 1000)).all()
    assert keyed_normal((2,), []).shape == (0, 2)


def test_a_sample_twice_in_one_batch_gets_two_different_draws():
    # n_train % batch_size != 0: the batch spanning epochs 0 and 1 may hold a sample twice.
    eps = train_noise(0, 7, [0, 1], [4, 4], (1, 8, 8))
    t = train_timesteps(0, 7, [0, 1], [4, 4] * 1, 1000)
    assert not torch.equal(eps[0], eps[1])
    assert t.shape == (2,)


def test_keyed_timesteps_are_uniform():
    t = train_timesteps(0, 0, [0] * 4000, range(4000), 10)
    counts = torch.bincount(t, minlength=10).float()
    assert (counts - 400).abs().max() < 80  # ±4 sd of a binomial(4000, 0.1)


def test_unet_configs_build_and_are_seeded():
    cfg = unet_config("tiny", (1, 8, 8))
    a, b, c = build_unet(cfg, 0), build_unet(cfg, 0), build_unet(cfg, 1)
    pa, pb, pc = (torch.nn.utils.parameters_to_vector(m.parameters()) for m in (a, b, c))
    assert torch.equal(pa, pb) and not torch.equal(pa, pc)
    out = a(torch.randn(2, 1, 8, 8), torch.tensor([1, 500])).sample
    assert out.shape == (2, 1, 8, 8)


def test_cifar_topology_has_the_ddpm_parameter_count():
    with torch.device("meta"):
        model = build_unet(unet_config("ddpm_cifar10", (3, 32, 32)))
    n = sum(p.numel() for p in model.parameters())
    assert 35.5e6 < n < 36e6  # DDPM CIFAR-10: 35.7M


def test_bad_unet_requests_fail_clearly():
    with pytest.raises(ValueError, match="tiny"):
        unet_config("huge", (1, 8, 8))
    with pytest.raises(ValueError, match="divisible"):
        unet_config("ddpm_cifar10", (3, 12, 12))
    assert set(UNET_CONFIGS) >= {"tiny", "ddpm_cifar10", "ddpm_64"}
