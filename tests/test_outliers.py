"""The outlier study: each outlier kind seeded and what it claims to be; outlier shares with
intervals over queries and the verdict drawn from them."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from diffattr.data.datasets import load_dataset, outlier_patches
from diffattr.data.outliers import FLAT_LEVELS, OUTLIER_KINDS, flat_images, outlier_images
from diffattr.evaluation import metrics
from diffattr.evaluation.uncertainty import bootstrap_ci
from diffattr.params import resolve
from diffattr.stages import retrac as stage4


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


def test_outlier_share_ci_is_the_share_with_a_bootstrap_interval_over_queries():
    is_outlier = np.array([True, False, False, True])
    scores = np.array(
        [
            [4.0, 1.0, 2.0, 3.0],  # top-2 = {0, 3}: both outliers -> 1
            [4.0, 3.0, 2.0, 1.0],  # {0, 1} -> 1/2
            [1.0, 4.0, 3.0, 2.0],  # {1, 2} -> 0
        ]
    )
    share, low, high = stage4.outlier_share_ci(scores, 2, is_outlier)
    assert share == pytest.approx(0.5)
    assert share == pytest.approx(metrics.outlier_share(scores, 2, is_outlier))
    assert (low, high) == pytest.approx(bootstrap_ci(np.array([1.0, 0.5, 0.0]))[1:])
    assert 0.0 <= low < 0.5 < high <= 1.0
    same = stage4.outlier_share_ci(scores[[0, 0]], 2, is_outlier)
    assert same == (1.0, 1.0, 1.0)  # every query alike: no spread


def test_retrac_has_fewer_outlier_slots_only_where_the_intervals_separate():
    rows = []
    table = {6: ((0.6, 0.5, 0.7), (0.06, 0.02, 0.1)), 10: ((0.3, 0.2, 0.4), (0.25, 0.1, 0.35))}
    for k, per_method in table.items():
        for method, (share, low, high) in zip(("tracin", "retrac"), per_method, strict=True):
            row = dict(method=method, k=k, share=share, share_ci_low=low, share_ci_high=high)
            rows += [{**row, "queries": "held-out inliers"}, {**row, "queries": "generated"}]
    sweep = pd.DataFrame(columns=["method", "k", "tau", "unique_ratio", "generally_influential"])
    found = stage4.findings(sweep, pd.DataFrame(), pd.DataFrame(rows))
    claim = found[found.claim.str.startswith("ReTrac gives outliers")].iloc[0]
    # k=6: ReTrac's high 10% < TracIn's low 50%; k=10: 35% > 20%, the intervals overlap
    assert claim.verdict == "mixed"
    assert claim.ours == "k=6: 60% [50%, 70%]→6% [2%, 10%], k=10: 30% [20%, 40%]→25% [10%, 35%]"
