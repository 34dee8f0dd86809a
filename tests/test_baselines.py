"""Baseline scores: raw-pixel cosine against a direct computation; random scores are seeded."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import method_inputs_of

from diffattr import methods
from diffattr.methods.pixel_cosine import pixel_cosine


def test_pixel_cosine_equals_the_cosine_of_flattened_images():
    g = torch.Generator().manual_seed(0)
    queries, train = (
        torch.rand(3, 1, 4, 4, generator=g) * 2 - 1,
        torch.rand(5, 1, 4, 4, generator=g) * 2 - 1,
    )
    scores = pixel_cosine(queries, train).numpy()
    for i in range(3):
        for j in range(5):
            a, b = queries[i].flatten().double(), train[j].flatten().double()
            assert scores[i, j] == pytest.approx(float(a @ b / (a.norm() * b.norm())), rel=1e-12)
    assert pixel_cosine(train, train).numpy().diagonal() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="differ in shape"):
        pixel_cosine(queries, train[:, :, :2])


def test_baselines_run_through_the_interface_seeded_and_shaped(smoke_pipeline):
    inputs = method_inputs_of(smoke_pipeline)
    rand = methods.get("random")
    a, b = rand(inputs), rand(inputs)
    c = rand(inputs, rand.make_args({"seed": 2}))
    assert a.values.shape == (4, 12) and np.array_equal(a.values, b.values)
    assert not np.array_equal(a.values, c.values) and a.settings["args"] == {"seed": 0}
    pixels = methods.get("pixel_cosine")(inputs)
    expected = pixel_cosine(inputs.queries.images, inputs.train.images).numpy()
    np.testing.assert_array_equal(pixels.values, expected)
