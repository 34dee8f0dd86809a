"""Outlier images appended to the digits training split for the outlier study ([ReTrac] §5).

Two kinds, since which way the effect goes may depend on the kind:

- ``photo`` (more complex than digits): grayscale patches of scikit-learn's bundled sample
  photographs, each min/max-scaled to [-1, 1] (texture at every pixel).
- ``flat`` (simpler than digits): constant images, one grey level each, drawn uniformly from
  ``FLAT_LEVELS`` (no structure at all).

Both are float32 [n, 1, size, size] in [-1, 1], a pure function of (n, seed, size).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

OUTLIER_KINDS: tuple[str, ...] = ("photo", "flat")
FLAT_LEVELS: tuple[float, float] = (-0.9, 0.9)  # range of the flat images' grey levels


def outlier_images(kind: str, n: int, seed: int, size: int = 8) -> torch.Tensor:
    """n outlier images of one kind (OUTLIER_KINDS), float32 [n, 1, size, size] in [-1, 1]."""
    if kind == "photo":
        return outlier_patches(n, seed, size)
    if kind == "flat":
        return flat_images(n, seed, size)
    raise ValueError(f"unknown outlier kind {kind!r}; valid: {', '.join(OUTLIER_KINDS)}")


def flat_images(n: int, seed: int, size: int = 8) -> torch.Tensor:
    """n constant images, float32 [n, 1, size, size]: image k is level_k at every pixel.

    Levels are drawn uniformly from FLAT_LEVELS with ``default_rng([2, seed])`` (the photo
    patches use ``[1, seed]``), so they neither repeat one image nor equal the digits'
    background (-1).
    """
    levels = np.random.default_rng([2, seed]).uniform(*FLAT_LEVELS, size=n).astype(np.float32)
    return torch.from_numpy(levels)[:, None, None, None].expand(n, 1, size, size).contiguous()


def outlier_patches(n: int, seed: int, size: int = 8, patch: int = 32) -> torch.Tensor:
    """n grayscale photo patches, float32 [n, 1, size, size], each scaled to [-1, 1].

    Patches of patch x patch pixels are cut at random places (from ``default_rng([1, seed])``)
    out of scikit-learn's bundled china.jpg and flower.jpg (image chosen at random too),
    converted to luma (ITU-R 601), area-downsampled to size x size and min/max-scaled
    per patch (a flat patch becomes all zeros).
    """
    from sklearn.datasets import load_sample_images

    photos = [_luma(img) for img in load_sample_images().images]
    rng = np.random.default_rng([1, seed])
    crops = np.empty((n, patch, patch), dtype=np.float32)
    for k in range(n):
        photo = photos[rng.integers(len(photos))]
        top = rng.integers(photo.shape[0] - patch + 1)
        left = rng.integers(photo.shape[1] - patch + 1)
        crops[k] = photo[top : top + patch, left : left + patch]
    small = F.interpolate(torch.from_numpy(crops)[:, None], size=(size, size), mode="area")
    low = small.amin(dim=(1, 2, 3), keepdim=True)
    span = small.amax(dim=(1, 2, 3), keepdim=True) - low
    scaled = torch.where(span > 1e-6, 2 * (small - low) / span.clamp_min(1e-6) - 1, 0.0)
    return scaled.clamp_(-1.0, 1.0)


def _luma(rgb: np.ndarray) -> np.ndarray:
    """uint8 [H, W, 3] -> float32 [H, W] luma in 0..255 (ITU-R 601 weights)."""
    return rgb.astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
