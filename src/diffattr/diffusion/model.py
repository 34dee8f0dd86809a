"""UNet2DModel topologies by name, built from config dicts (no download), and ε-prediction."""

from __future__ import annotations

import copy

import torch
from diffusers import UNet2DModel

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


def predict_eps(model: torch.nn.Module, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """ε_θ(x_t, t) of a `UNet2DModel`. x_t: [B, C, H, W]; t: [B] int. Returns [B, C, H, W]."""
    return model(x_t, t).sample
