"""The outlier kinds of the outlier study: seeded, and each what it claims to be."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diffattr.data.datasets import load_dataset, outlier_patches
from diffattr.data.outliers import FLAT_LEVELS, OUTLIER_KINDS, flat_images, outlier_images
from diffattr.params import resolve


def test_flat_images_are_seeded_float32_of_the_requested_size():
    first, again = flat_images(64, seed=0), flat_images(64, seed=0)
    assert torch.equal(first, again) and first.dtype == torch.float32
    assert first.shape == (64, 1, 8, 8)
    assert not torch.equal(flat_images(64, seed=1), first)
    assert flat_images(4, 0, size=16).shape == (4, 1, 16, 16)
    assert torch.equal(outlier_images("flat", 64, 0), first)
    assert torch.equal(outlier_images("photo", 64, 0), outlier_patches(64, 0))
    assert OUTLIER_KINDS == ("photo", "flat")
    with pytest.raises(ValueError, match="unknown outlier kind 'stripes'; valid: photo, flat"):
        outlier_images("stripes", 4, 0)


def test_flat_images_are_constant_and_simpler_than_digits_and_photos():
    """Each flat image is one grey level inside FLAT_LEVELS (pixel std 0), levels spread over
    the range; digits and photo patches vary within an image (mean per-image std > 0.5)."""
    flat = flat_images(64, seed=0)
    levels = flat[:, 0, 0, 0]
    assert torch.equal(flat, levels[:, None, None, None].expand_as(flat))
    assert levels.min() >= FLAT_LEVELS[0] and levels.max() <= FLAT_LEVELS[1]
    assert levels.unique().numel() == 64 and levels.std() > 0.4  # uniform on [-0.9, 0.9]: 0.52
    assert load_dataset("digits").images.std(dim=(1, 2, 3)).mean() > 0.5
    assert outlier_patches(64, 0).std(dim=(1, 2, 3)).mean() > 0.5


def test_digits_outliers_flat_appends_64_flagged_flat_images_to_the_same_digits():
    flat = load_dataset("digits_outliers_flat")
    photo = load_dataset("digits_outliers")
    assert (flat.name, photo.name) == ("digits_outliers_flat", "digits_outliers")
    assert len(flat) == 1600 + 64 and flat.is_outlier.sum() == 64
    np.testing.assert_array_equal(flat.ids, photo.ids)
    assert torch.equal(flat.images[:1600], photo.images[:1600])
    outliers = flat.subset(100_000 + np.arange(64))
    assert outliers.is_outlier.all() and (outliers.labels == -1).all()
    assert torch.equal(outliers.images, flat_images(64, 0))
    assert torch.equal(
        load_dataset("digits_outliers_flat", seed=1).images[-64:], flat_images(64, 1)
    )
    held = load_dataset("digits_outliers_flat", "heldout")
    np.testing.assert_array_equal(held.ids, load_dataset("digits", "heldout").ids)
    assert not held.is_outlier.any()


def test_the_flat_profile_resolves_to_the_flat_dataset():
    P = resolve({"profile": "digits_outliers_flat"})
    assert P.data.dataset == "digits_outliers_flat"
    assert P.data.load().name == "digits_outliers_flat"
    assert resolve({"profile": "digits_outliers"}).train == P.train  # only the data differ
