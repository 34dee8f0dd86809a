"""Diffusion-TracIn ([ReTrac] §3): Σ_k η_k ⟨G_k(q), Σ_{(t,ε)∈R_k(j)} g(θ_k; x_j, t, ε)⟩ over the
trajectory checkpoints, with plain (unnormalised) gradients; see `methods.trajectory`."""

from __future__ import annotations

from dataclasses import dataclass

from diffattr.artifacts.scores import Scores
from diffattr.methods.base import Method, MethodInputs
from diffattr.methods.trajectory import training_image_scores, trajectory_scores, unit_weights


@dataclass(frozen=True)
class TrajectoryArgs:
    """train_side: replay (the exact training draws; the paper) | grid (a uniform timestep grid);
    checkpoints: all trajectory checkpoints | last."""

    train_side: str = "replay"
    checkpoints: str = "all"


def compute(inputs: MethodInputs, args: TrajectoryArgs) -> Scores:
    return trajectory_scores(inputs, unit_weights, args.train_side, args.checkpoints)


def trace(inputs: MethodInputs, args: TrajectoryArgs, n_queries: int) -> Scores:
    return training_image_scores(inputs, unit_weights, n_queries)


METHOD = Method(
    "tracin",
    "TracIn",
    TrajectoryArgs,
    compute,
    summary="Diffusion-TracIn: learning-rate-weighted gradient dot products over checkpoints",
    trace=trace,
)
