"""Random scores: standard-normal, seeded — what every method must beat (an LDS near 0)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from diffattr.artifacts.scores import Scores
from diffattr.methods.base import Method, MethodInputs


@dataclass(frozen=True)
class RandomArgs:
    seed: int = 0


def compute(inputs: MethodInputs, args: RandomArgs) -> Scores:
    shape = (len(inputs.gradients.query_key), len(inputs.gradients.train_ids))
    values = np.random.default_rng(args.seed).standard_normal(shape)
    return inputs.gradients.scores(values, {"run_id": inputs.gradients.run_id})


METHOD = Method("random", "Random", RandomArgs, compute, summary="standard-normal scores, seeded")
