"""The outlier kinds of the outlier study: seeded, and what each kind claims to be."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diffattr.data.datasets import load_dataset
from diffattr.data.outliers import FLAT_LEVELS, flat_images, outlier_images
from diffattr.params import resolve


def test_flat_outliers_are_seeded():
    first, again = flat_images(64, seed=0), flat_images(64, seed=0)
    assert torch.equal(first, again) and first.dtype == torch.float32
    assert first.shape == (64, 1, 8, 8)
    assert not torch.equal(flat_images(64, seed=1), first)
    assert torch.equal(outlier_images("flat", 64, 0), first)
    assert flat_images(4, 0, size=16).shape == (4, 1, 16, 16)


def test_flat_outliers_are_near_constant_and_simpler_than_digits():
    """Each flat image is one grey level (pixel std ≤ 0.03) in FLAT_LEVELS, levels differ
    between images; a digit's pixels spread over the range (mean per-image std > 0.5)."""
    flat = flat_images(64, seed=0)
    levels = flat.mean(dim=(1, 2, 3))
    assert flat.std(dim=(1, 2, 3)).max() <= 0.03
    assert levels.min() >= FLAT_LEVELS[0] - 0.01 and levels.max() <= FLAT_LEVELS[1] + 0.01
    assert levels.std() > 0.3  # spread over the range, not one image repeated
    assert flat.min() >= -1 and flat.max() <= 1
    digits = load_dataset("digits").images
    assert digits.std(dim=(1, 2, 3)).mean() > 0.5
    photos = outlier_images("photo", 64, 0)
    assert photos.std(dim=(1, 2, 3)).mean() > 10 * flat.std(dim=(1, 2, 3)).mean()


def test_digits_outliers_flat_appends_64_flagged_flat_images():
    train = load_dataset("digits_outliers", outlier_kind="flat")
    photo = load_dataset("digits_outliers")
    assert train.name == "digits_outliers_flat" and photo.name == "digits_outliers"
    assert len(train) == 1600 + 64 and train.is_outlier.sum() == 64
    np.testing.assert_array_equal(train.ids, photo.ids)
    assert torch.equal(train.images[:1600], photo.images[:1600])
    assert torch.equal(train.subset(100_000 + np.arange(64)).images, flat_images(64, 0))
    held = load_dataset("digits_outliers", "heldout", outlier_kind="flat")
    assert not held.is_outlier.any() and len(held) == 197


def test_the_flat_profile_resolves_and_bad_kinds_are_refused():
    P = resolve({"profile": "digits_outliers_flat"})
    assert (P.data.dataset, P.data.outlier_kind) == ("digits_outliers", "flat")
    assert P.data.load().name == "digits_outliers_flat"
    with pytest.raises(ValueError, match="valid: photo, flat"):
        resolve({"data": {"outlier_kind": "stripes"}})
    with pytest.raises(ValueError, match="digits_outliers only"):
        resolve({"data": {"outlier_kind": "flat"}})
    with pytest.raises(ValueError, match="digits_outliers only"):
        load_dataset("digits", outlier_kind="flat")
    with pytest.raises(ValueError, match="unknown outlier kind"):
        outlier_images("stripes", 4, 0)
