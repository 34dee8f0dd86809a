"""Diffusion-TracIn ([ReTrac] §3): Σ_k ⟨G_k(q), Σ_{e=(s,t,ε)∈R_k(j)} η_e g(θ_k; x_j, t, ε)⟩
over the trajectory checkpoints, with plain (unnormalised) gradients; see `methods.trajectory`.

Differs from the paper's Σ_k η_k ⟨G_k(q), Σ g⟩: a replayed draw that is one update (window
"interval") is weighted by the learning rate in force at its own step, and a draw or grid average
that stands for a whole window (window "epoch", train_side "grid") by the rate summed over that
window, so warm-up, decay and uneven checkpoints count (`artifacts.learning_rates`). Evenly
spaced checkpoints with a constant rate over every window give the paper's ranking exactly."""

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
