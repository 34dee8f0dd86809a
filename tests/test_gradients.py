"""Per-sample gradients: both engines equal an autograd loop; replayed gradients are training's."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from diffattr.artifacts.training_run import TrainingRun
from diffattr.diffusion.draws import train_noise
from diffattr.diffusion.model import build_unet, predict_eps, unet_config
from diffattr.diffusion.replay import ReplayLog
from diffattr.diffusion.schedule import add_noise, build_scheduler
from diffattr.diffusion.task import per_sample_loss
from diffattr.diffusion.training import train
from diffattr.gradients.engines import PerSampleGradients
from diffattr.gradients.items import replay_items


@pytest.fixture(scope="module")
def tiny_unet() -> torch.nn.Module:
    """A tiny UNet with attention (AttnDownBlock2D, AttnUpBlock2D and the mid-block)."""
    return build_unet(unet_config("tiny", (1, 8, 8)), seed=3)


def _batch(b: int = 6, draws: int = 1, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.rand(b, 1, 8, 8, generator=g) * 2 - 1
    t = torch.randint(0, 1000, (b,), generator=g)
    eps = torch.randn(b, draws, 1, 8, 8, generator=g)
    return x0, t, eps


ENGINES = ["vmap", "layerwise"]


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize(
    ("loss", "measurement", "draws"), [("l2", "loss", 1), ("l1", "loss", 3), ("l2", "sqnorm", 2)]
)
def test_gradients_match_an_autograd_loop(tiny_unet, loss, measurement, draws, engine):
    grads = PerSampleGradients(
        tiny_unet, build_scheduler().alphas_cumprod, loss, measurement, engine=engine
    )
    assert grads.engine == engine
    x0, t, eps = _batch(draws=draws)
    fast, slow = grads(x0, t, eps), grads.loop(x0, t, eps)
    assert fast.shape == (6, sum(p.numel() for p in tiny_unet.parameters()))
    torch.testing.assert_close(fast, slow, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("engine", ENGINES)
def test_both_paths_equal_plain_autograd_on_the_original_model(tiny_unet, engine):
    """The loop reference and each engine equal module autograd on the unmodified model
    (diffusers' own attention processor), so swapping the processor changes no number."""
    sched = build_scheduler()
    grads = PerSampleGradients(tiny_unet, sched.alphas_cumprod, engine=engine)
    x0, t, eps = _batch(b=2)
    fast, slow = grads(x0, t, eps).clone(), grads.loop(x0, t, eps)
    for i in range(2):
        tiny_unet.zero_grad()
        x_t = add_noise(x0[i : i + 1], eps[i], t[i : i + 1], sched.alphas_cumprod)
        per_sample_loss(predict_eps(tiny_unet, x_t, t[i : i + 1]), eps[i]).sum().backward()
        expected = torch.cat([p.grad.reshape(-1) for p in tiny_unet.parameters()])
        torch.testing.assert_close(slow[i], expected, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(fast[i], expected, rtol=1e-4, atol=1e-6)
    tiny_unet.zero_grad(set_to_none=True)


@pytest.mark.parametrize("engine", ENGINES)
def test_gradients_over_attention_raise_no_warning(tiny_unet, engine):
    grads = PerSampleGradients(
        tiny_unet, build_scheduler().alphas_cumprod, chunk_size=2, engine=engine
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        grads(*_batch(b=4))


@pytest.mark.parametrize("engine", ENGINES)
def test_chunked_equals_unchunked(tiny_unet, engine):
    sched = build_scheduler()
    x0, t, eps = _batch(b=5, draws=2)
    a = PerSampleGradients(tiny_unet, sched.alphas_cumprod, engine=engine)(x0, t, eps).clone()
    b = PerSampleGradients(tiny_unet, sched.alphas_cumprod, chunk_size=2, engine=engine)
    torch.testing.assert_close(a, b(x0, t, eps))


def test_auto_engine_is_layerwise_on_a_unet_and_agrees_with_vmap(tiny_unet):
    sched = build_scheduler()
    auto = PerSampleGradients(tiny_unet, sched.alphas_cumprod)
    assert auto.engine == "layerwise"
    x0, t, eps = _batch(b=4, draws=2)
    vmapped = PerSampleGradients(tiny_unet, sched.alphas_cumprod, engine="vmap")
    torch.testing.assert_close(auto(x0, t, eps), vmapped(x0, t, eps), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("engine", ENGINES)
def test_a_timestep_per_draw_gives_the_mean_of_single_draw_gradients(tiny_unet, engine):
    """t [B, S]: each item's gradient is the mean over its draws, each at its own timestep."""
    grads = PerSampleGradients(tiny_unet, build_scheduler().alphas_cumprod, engine=engine)
    x0, _, eps = _batch(b=3, draws=4)
    t = torch.randint(0, 1000, (3, 4), generator=torch.Generator().manual_seed(5))
    fast = grads(x0, t, eps).clone()
    for i in range(3):
        singles = grads.loop(x0[i].expand(4, -1, -1, -1), t[i], eps[i].unsqueeze(1))
        torch.testing.assert_close(fast[i], singles.mean(0), rtol=1e-4, atol=1e-6)


def test_mismatched_shapes_are_refused(tiny_unet):
    grads = PerSampleGradients(tiny_unet, build_scheduler().alphas_cumprod)
    x0, t, eps = _batch(b=3)
    with pytest.raises(ValueError, match="shapes disagree"):
        grads(x0, t[:2], eps)
    with pytest.raises(ValueError, match="shapes disagree"):
        grads(x0, t.unsqueeze(1).expand(3, 2), eps)  # two timesteps for one draw


def test_replayed_gradient_equals_the_gradient_of_the_logged_training_loss(
    tiny_dataset, model_params, train_params, tmp_path
):
    train(tiny_dataset, model_params, train_params, tmp_path / "run", progress=False)
    log = ReplayLog.load(tmp_path / "run" / "replay_log.npz")
    model, _ = TrainingRun.open(tmp_path / "run").load_model(
        step=4
    )  # θ_4: the weights step 4 was taken with
    sched = build_scheduler()
    events = log.events(4, 4)
    items = replay_items(tiny_dataset, log, events)
    grads = PerSampleGradients(model, sched.alphas_cumprod, "l2")
    replayed = grads(items.x0, items.t[:, 0], items.noise(np.arange(items.n))[:, 0])

    # Independently: the training computation of step 4, by hand, one backward per sample.
    model.train()  # as in training (no dropout here, so only kernel choice could differ)
    ids = log.sample_id[events]
    x0 = tiny_dataset.images[torch.from_numpy(tiny_dataset.positions(ids))]
    t = torch.from_numpy(log.t[events].astype(np.int64))
    eps = train_noise(train_params.seed, 4, log.epoch[events], ids, (1, 8, 8))
    losses = per_sample_loss(
        predict_eps(model, add_noise(x0, eps, t, sched.alphas_cumprod), t), eps, "l2"
    )
    assert torch.equal(losses.detach(), torch.from_numpy(log.loss[events]))
    for i in range(len(events)):
        expected = torch.autograd.grad(losses[i], list(model.parameters()), retain_graph=True)
        torch.testing.assert_close(
            replayed[i], torch.cat([g.reshape(-1) for g in expected]), rtol=1e-4, atol=1e-6
        )
