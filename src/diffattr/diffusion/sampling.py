"""DDPM ancestral sampling with one seed per sample (reproducible whatever the batching)."""

from __future__ import annotations

import copy
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from diffusers import DDPMScheduler
from tqdm import tqdm


@torch.no_grad()
def generate(
    model: torch.nn.Module,
    scheduler: DDPMScheduler,
    seeds: Sequence[int],
    image_shape: Sequence[int],
    num_inference_steps: int = 1000,
    batch_size: int = 64,
    device: torch.device | str = "cpu",
    progress: bool = True,
) -> torch.Tensor:
    """Samples x0 ∈ [-1, 1] from ε-model `model`, one per seed. Returns [len(seeds), C, H, W] (CPU).

    Sample i starts from, and draws all its ancestral noise from, a CPU generator seeded with
    seeds[i], so it is reproducible alone. num_inference_steps < T strides the timesteps
    (DDPMScheduler.set_timesteps).
    """
    if num_inference_steps < 1:
        raise ValueError(f"num_inference_steps must be ≥ 1, got {num_inference_steps}")
    sched = copy.deepcopy(scheduler)
    sched.set_timesteps(num_inference_steps)
    was_training = model.training
    model.eval()
    out = []
    batches = range(0, len(seeds), batch_size)
    bar = tqdm(
        total=len(seeds) * num_inference_steps,
        disable=not progress,
        desc="sampling",
        mininterval=2.0,
    )
    for start in batches:
        chunk = [int(s) for s in seeds[start : start + batch_size]]
        gens = [torch.Generator().manual_seed(s) for s in chunk]
        x = torch.stack([torch.randn(tuple(image_shape), generator=g) for g in gens]).to(device)
        for t in sched.timesteps:
            eps = model(x, t.to(device).expand(len(chunk))).sample
            x = sched.step(eps, t, x, generator=gens).prev_sample
            bar.update(len(chunk))
        out.append(x.clamp(-1, 1).cpu())
    bar.close()
    model.train(was_training)
    return torch.cat(out) if out else torch.empty((0, *image_shape))


def save_queries(
    path: str | Path, images: torch.Tensor, seeds: Sequence[int], settings: dict
) -> None:
    """Write generated queries: images [N, C, H, W] in [-1, 1], their seeds [N], and the settings
    that made them (checkpoint, sampler) as JSON, in one .npz."""
    if len(images) != len(seeds):
        raise ValueError(f"{len(images)} images but {len(seeds)} seeds")
    np.savez_compressed(
        path,
        images=images.cpu().numpy().astype(np.float32),
        seeds=np.asarray(seeds, np.int64),
        settings=np.array(json.dumps(settings, sort_keys=True, default=str)),
    )


def load_queries(path: str | Path) -> tuple[torch.Tensor, np.ndarray, dict]:
    """(images [N, C, H, W], seeds [N], settings) saved by `save_queries`."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no generated queries at {path}; run the train stage first")
    with np.load(path) as f:
        return torch.from_numpy(f["images"]), f["seeds"], json.loads(str(f["settings"]))
