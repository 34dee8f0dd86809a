"""Sampling: one seed per sample, reproducible whatever the batching; queries round-trip."""

from __future__ import annotations

import torch

from diffattr.diffusion.model import build_unet, unet_config
from diffattr.diffusion.sampling import generate, load_queries, save_queries
from diffattr.diffusion.schedule import build_scheduler


def test_a_sample_depends_on_its_seed_alone(tmp_path):
    model = build_unet(unet_config("tiny", (1, 8, 8)))
    sched = build_scheduler()
    batch = generate(model, sched, [5, 6, 7], (1, 8, 8), 10, batch_size=3, progress=False)
    alone = generate(model, sched, [6], (1, 8, 8), 10, batch_size=1, progress=False)
    assert batch.shape == (3, 1, 8, 8)
    assert torch.allclose(batch[1], alone[0], atol=1e-5)
    assert not torch.allclose(batch[0], batch[1])
    assert batch.min() >= -1 and batch.max() <= 1
    save_queries(tmp_path / "q.npz", batch, [5, 6, 7], {"step": 3})
    images, seeds, settings = load_queries(tmp_path / "q.npz")
    assert torch.equal(images, batch) and seeds.tolist() == [5, 6, 7] and settings == {"step": 3}


def test_sampler_matches_the_diffusers_ddpm_pipeline_math():
    """Our loop equals a hand-written DDPM ancestral loop with the same per-sample noise."""
    model = build_unet(unet_config("tiny", (1, 8, 8)))
    sched = build_scheduler()
    ours = generate(model, sched, [11], (1, 8, 8), 5, progress=False)
    g = torch.Generator().manual_seed(11)
    x = torch.randn((1, 1, 8, 8), generator=g)
    ts = [800, 600, 400, 200, 0]
    abar = sched.alphas_cumprod
    with torch.no_grad():
        for i, t in enumerate(ts):
            eps = model(x, torch.tensor([t])).sample
            prev = ts[i + 1] if i + 1 < len(ts) else -1
            a_t, a_p = abar[t], abar[prev] if prev >= 0 else torch.tensor(1.0)
            beta = 1 - a_t / a_p
            x0 = ((x - (1 - a_t).sqrt() * eps) / a_t.sqrt()).clamp(-1, 1)
            mean = (
                a_p.sqrt() * beta / (1 - a_t) * x0 + (1 - beta).sqrt() * (1 - a_p) / (1 - a_t) * x
            )
            if t > 0:
                noise = torch.randn((1, 1, 8, 8), generator=g)
                x = mean + ((1 - a_p) / (1 - a_t) * beta).sqrt() * noise
            else:
                x = mean
    assert torch.allclose(ours, x.clamp(-1, 1), atol=1e-5)
