"""The method interface: a new method is one file plus one registry line, and then flows
through stage 3's scoring and stage 4's metrics with no other edit."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
from conftest import SMOKE_PIPELINE, method_inputs_of

from diffattr import methods
from diffattr import params as params_lib
from diffattr.methods.base import Method
from diffattr.stages import retrac as stage4
from diffattr.stages import timestep_bias as stage3


@dataclass(frozen=True)
class NearestArgs:
    scale: float = 1.0


def nearest_pixels(inputs, args: NearestArgs):
    """−scale · squared pixel distance: a toy method written against the interface only."""
    q = inputs.queries.images.flatten(1).double()
    t = inputs.train.images.flatten(1).double()
    return inputs.gradients.scores(-args.scale * np.asarray(np.square(q[:, None] - t).sum(-1)), {})


TOY = Method("toy_nearest", "Toy nearest", NearestArgs, nearest_pixels)


@pytest.fixture
def registered_toy():
    methods.register(TOY)
    yield TOY
    methods.unregister(TOY.name)


def test_a_registered_method_flows_through_stages_3_and_4(smoke_pipeline, registered_toy, tmp_path):
    _, train_dir, gradient_dir = smoke_pipeline
    variant = {"name": "toy_half", "method": "toy_nearest", "args": {"scale": 0.5}}
    raw = {
        **SMOKE_PIPELINE,
        "attribution": {"top_k": 3, "methods": ["tracin", "toy_nearest", variant]},
    }
    P = params_lib.resolve(raw)
    scores = tmp_path / "scores"
    bias = stage3.run(P, train_dir, gradient_dir, scores, tmp_path / "r3")
    assert set(bias.table.method) == {"tracin", "toy_nearest", "toy_half"}
    assert bias.scores["toy_half"].settings["args"] == {"scale": 0.5}
    np.testing.assert_allclose(
        bias.scores["toy_half"].values, bias.scores["toy_nearest"].values / 2
    )
    evaluation = stage4.run(P, train_dir, gradient_dir, scores, tmp_path / "r4", tracing_queries=4)
    assert set(evaluation.specificity.method) == {"tracin", "toy_nearest", "toy_half"}
    assert set(evaluation.sweep.method) == {"tracin", "toy_nearest", "toy_half"}


def test_saved_scores_of_other_arguments_are_refused(smoke_pipeline, registered_toy, tmp_path):
    _, train_dir, gradient_dir = smoke_pipeline
    raw = {**SMOKE_PIPELINE, "attribution": {"top_k": 3, "methods": ["toy_nearest"]}}
    stage3.run(params_lib.resolve(raw), train_dir, gradient_dir, tmp_path / "s", tmp_path / "r")
    other = {"name": "toy_nearest", "method": "toy_nearest", "args": {"scale": 2.0}}
    P = params_lib.resolve({**raw, "attribution": {"top_k": 3, "methods": [other]}})
    with pytest.raises(ValueError, match="arguments"):
        stage4.run(P, train_dir, gradient_dir, tmp_path / "s", tmp_path / "r4")


def test_a_method_returning_the_wrong_orientation_is_refused(smoke_pipeline):
    inputs = method_inputs_of(smoke_pipeline)
    transposed = Method(
        "transposed",
        "Transposed",
        NearestArgs,
        lambda i, a: methods.get("random")(i).__class__(
            np.zeros((12, 4)), np.arange(4), np.array(["generated"] * 12), np.arange(12), {}
        ),
    )
    with pytest.raises(ValueError, match=r"expected \[n_query, n_train\]"):
        transposed(inputs)


def test_every_built_in_method_has_documented_defaults():
    for name, method in methods.REGISTRY.items():
        assert method.make_args() is not None and method.summary, name
