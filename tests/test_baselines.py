"""Baseline scores: raw-pixel cosine against a direct computation; random scores are seeded."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diffattr.artifacts.scores import Scores
from diffattr.methods.baselines import pixel_cosine_scores, random_scores


def _like(q: int, n: int) -> Scores:
    return Scores(
        np.zeros((q, n)), np.arange(n) + 100, np.array(["generated"] * q), np.arange(q), {}
    )


def test_pixel_cosine_equals_the_cosine_of_flattened_images():
    g = torch.Generator().manual_seed(0)
    queries, train = (
        torch.rand(3, 1, 4, 4, generator=g) * 2 - 1,
        torch.rand(5, 1, 4, 4, generator=g) * 2 - 1,
    )
    scores = pixel_cosine_scores(queries, train, _like(3, 5))
    for i in range(3):
        for j in range(5):
            a, b = queries[i].flatten().double(), train[j].flatten().double()
            assert scores.values[i, j] == pytest.approx(
                float(a @ b / (a.norm() * b.norm())), rel=1e-12
            )
    assert pixel_cosine_scores(train, train, _like(5, 5)).values.diagonal() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="query and"):
        pixel_cosine_scores(queries, train, _like(2, 5))


def test_random_scores_are_seeded_and_shaped_like_their_reference():
    like = _like(4, 6)
    a, b, c = random_scores(like, 1), random_scores(like, 1), random_scores(like, 2)
    assert a.values.shape == (4, 6) and np.array_equal(a.values, b.values)
    assert not np.array_equal(a.values, c.values) and a.settings == {"method": "random", "seed": 1}
