"""Grad-dot: ⟨φ_q, φ_j⟩ of projected loss gradients at the final EMA weights — TRAK without the
kernel inverse (the identity as curvature), the floor any preconditioner should beat."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from diffattr.artifacts.gradient_index import QUERY, TRAIN_GRID, features_array
from diffattr.artifacts.scores import Scores
from diffattr.methods.base import Method, MethodInputs


@dataclass(frozen=True)
class GradDotArgs:
    pass


def compute(inputs: MethodInputs, args: GradDotArgs) -> Scores:
    entry = inputs.gradients.ema()
    settings, arrays = inputs.gradients.load(entry)
    phi = np.asarray(arrays[features_array(TRAIN_GRID)], np.float64).mean(axis=1)
    queries = np.asarray(arrays[features_array(QUERY)], np.float64).mean(axis=1)
    return inputs.gradients.scores(
        queries @ phi.T,
        {
            "weights": "ema",
            "checkpoint_step": entry.step,
            "weights_hash": settings["weights_hash"],
            **inputs.gradients.provenance(settings),
        },
    )


METHOD = Method(
    "grad_dot",
    "Grad-dot",
    GradDotArgs,
    compute,
    summary="dot products of projected loss gradients at the EMA weights",
)
