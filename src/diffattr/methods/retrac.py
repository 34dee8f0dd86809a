"""Diffusion-ReTrac ([ReTrac] §4): TracIn with every replayed training gradient and every
per-timestep query gradient normalised to unit length (exact norms, recorded before projection)
before they are summed; see `methods.trajectory`."""

from __future__ import annotations

from diffattr.artifacts.scores import Scores
from diffattr.methods.base import Method, MethodInputs
from diffattr.methods.tracin import TrajectoryArgs
from diffattr.methods.trajectory import (
    inverse_norm_weights,
    training_image_scores,
    trajectory_scores,
)


def compute(inputs: MethodInputs, args: TrajectoryArgs) -> Scores:
    return trajectory_scores(inputs, inverse_norm_weights, args.train_side, args.checkpoints)


def trace(inputs: MethodInputs, args: TrajectoryArgs, n_queries: int) -> Scores:
    return training_image_scores(inputs, inverse_norm_weights, n_queries)


METHOD = Method(
    "retrac",
    "ReTrac",
    TrajectoryArgs,
    compute,
    summary="Diffusion-ReTrac: TracIn with every gradient normalised to unit length",
    trace=trace,
)
