"""The diffusion model: UNet configurations, noise schedule, the loss, replayable (t, ε) draws.

Every random draw of training and attribution is keyed: it is a pure function of integers such
as (seed, step, sample id), generated on the CPU and then moved, so any draw can be regenerated
later, on any device, without storing the noise.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import numpy as np
import torch
from diffusers import DDPMScheduler, UNet2DModel

LOSS_KINDS = ("l2", "l1")
SCHEDULES = ("linear", "cosine")

# Purposes of keyed draws: one integer tag each, so that draws for different uses never collide.
TAG_TRAIN_T = 1
TAG_TRAIN_EPS = 2
TAG_EPOCH_PERMUTATION = 3
TAG_GRID_EPS = 4
TAG_MEASURE = 5

_ATTN_UNET = {
    "down_block_types": ("DownBlock2D", "AttnDownBlock2D"),
    "up_block_types": ("AttnUpBlock2D", "UpBlock2D"),
}

# Settings of the DDPM reference UNets (google/ddpm-cifar10-32) beyond their widths and blocks.
_DDPM_COMMON = {
    "norm_num_groups": 32,
    "norm_eps": 1e-6,
    "attention_head_dim": None,
    "downsample_padding": 0,
    "flip_sin_to_cos": False,
    "freq_shift": 1,
}

# UNet2DModel topologies by name. `sample_size` and channels come from the data at build time.
UNET_CONFIGS: dict[str, dict] = {
    # Digits at 8×8 on two CPU cores: two levels (8→4), attention at 4×4, 0.28M parameters.
    "tiny": {
        "block_out_channels": (32, 32),
        "layers_per_block": 1,
        "norm_num_groups": 8,
        "attention_head_dim": 16,
        **_ATTN_UNET,
    },
    # The DDPM CIFAR-10 topology (Ho et al. 2020; google/ddpm-cifar10-32): ~35.7M parameters.
    "ddpm_cifar10": {
        "block_out_channels": (128, 256, 256, 256),
        "layers_per_block": 2,
        "down_block_types": ("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
        "up_block_types": ("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        **_DDPM_COMMON,
    },
    # The same topology with one more level, for 64×64 CelebA.
    "ddpm_64": {
        "block_out_channels": (128, 128, 256, 256, 512),
        "layers_per_block": 2,
        "down_block_types": (
            "DownBlock2D",
            "DownBlock2D",
            "AttnDownBlock2D",
            "DownBlock2D",
            "DownBlock2D",
        ),
        "up_block_types": ("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
        **_DDPM_COMMON,
    },
}


def unet_config(name: str, image_shape: tuple[int, int, int]) -> dict:
    """Full `UNet2DModel` config dict for a named topology and an image shape (C, H, W)."""
    if name not in UNET_CONFIGS:
        raise ValueError(f"unknown UNet {name!r}; choose one of {sorted(UNET_CONFIGS)}")
    channels, height, width = image_shape
    if height != width:
        raise ValueError(f"square images expected, got {height}×{width}")
    config = {k: list(v) if isinstance(v, tuple) else v for k, v in UNET_CONFIGS[name].items()}
    levels = len(config["block_out_channels"]) - 1
    if height % (2**levels):
        raise ValueError(
            f"UNet {name!r} halves the resolution {levels} times; image size {height} must be "
            f"divisible by {2**levels}"
        )
    config.update(sample_size=height, in_channels=channels, out_channels=channels)
    return config


def build_unet(config: dict, seed: int = 0) -> UNet2DModel:
    """A freshly initialised `UNet2DModel` from a config dict (no download), seeded."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return UNet2DModel(**copy.deepcopy(config))


def build_scheduler(schedule: str = "linear", num_train_timesteps: int = 1000) -> DDPMScheduler:
    """DDPM noise schedule: linear β from 1e-4 to 0.02 (Ho et al.) or cosine (Nichol & Dhariwal)."""
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; choose one of {list(SCHEDULES)}")
    beta_schedule = "linear" if schedule == "linear" else "squaredcos_cap_v2"
    return DDPMScheduler(
        num_train_timesteps=num_train_timesteps,
        beta_start=1e-4,
        beta_end=0.02,
        beta_schedule=beta_schedule,
        prediction_type="epsilon",
        clip_sample=True,
    )


def add_noise(
    x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor, alphas_cumprod: torch.Tensor
) -> torch.Tensor:
    """x_t = √ᾱ_t x0 + √(1-ᾱ_t) ε. x0, eps: [B, C, H, W]; t: [B] int; alphas_cumprod: [T]."""
    abar = alphas_cumprod.to(device=x0.device, dtype=x0.dtype)[t].view(-1, 1, 1, 1)
    return abar.sqrt() * x0 + (1 - abar).sqrt() * eps


def per_sample_loss(eps_pred: torch.Tensor, eps: torch.Tensor, kind: str = "l2") -> torch.Tensor:
    """mean((ε − ε̂)²) (l2) or mean(|ε − ε̂|) (l1) over C, H, W. Returns [B]."""
    if kind == "l2":
        err = (eps - eps_pred).pow(2)
    elif kind == "l1":
        err = (eps - eps_pred).abs()
    else:
        raise ValueError(f"unknown loss {kind!r}; choose one of {list(LOSS_KINDS)}")
    return err.flatten(1).mean(1)


def predict_eps(model: torch.nn.Module, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """ε_θ(x_t, t) of a `UNet2DModel`. x_t: [B, C, H, W]; t: [B] int. Returns [B, C, H, W]."""
    return model(x_t, t).sample


# ---- keyed randomness ------------------------------------------------------------------------

_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def key_seed(*keys: int) -> int:
    """Mix integers into one 63-bit seed (order-sensitive, well spread)."""
    h = 0
    for k in keys:
        h = _splitmix64(h ^ (int(k) & _MASK64))
    return h >> 1


def keyed_generator(*keys: int) -> torch.Generator:
    """A CPU `torch.Generator` seeded from the keys."""
    return torch.Generator().manual_seed(key_seed(*keys))


def keyed_normal(
    shape: Sequence[int], keys_per_row: Sequence[Sequence[int]], device: torch.device | str = "cpu"
) -> torch.Tensor:
    """One standard-normal draw of `shape` per key tuple. Returns [len(keys_per_row), *shape].

    Generated on the CPU from each row's own generator, so a row depends on its key alone (not
    on the batch it is drawn in, nor on the device).
    """
    rows = [torch.randn(tuple(shape), generator=keyed_generator(*k)) for k in keys_per_row]
    if not rows:
        return torch.empty((0, *shape), device=device)
    return torch.stack(rows).to(device)


def train_timesteps(
    seed: int, step: int, sample_ids: Sequence[int], num_train_timesteps: int
) -> torch.Tensor:
    """Timestep training draws for each sample at a step, uniform on [0, T). Returns [B] int64."""
    return torch.tensor(
        [
            int(
                torch.randint(
                    num_train_timesteps, (1,), generator=keyed_generator(seed, TAG_TRAIN_T, step, i)
                )
            )
            for i in sample_ids
        ],
        dtype=torch.long,
    )


def train_noise(
    seed: int,
    step: int,
    sample_ids: Sequence[int],
    image_shape: Sequence[int],
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """The ε training draws for each sample at a step. Returns [B, C, H, W]."""
    keys = [(seed, TAG_TRAIN_EPS, step, int(i)) for i in sample_ids]
    return keyed_normal(image_shape, keys, device)


def epoch_permutation(seed: int, epoch: int, n: int) -> np.ndarray:
    """Order of the n training rows in an epoch. Returns [n] int64 row positions."""
    return np.random.default_rng(key_seed(seed, TAG_EPOCH_PERMUTATION, epoch)).permutation(n)
