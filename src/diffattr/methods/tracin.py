"""Diffusion-TracIn ([ReTrac] §3): Σ_k ⟨G_k(q), Σ_{e=(s,t,ε)∈R_k(j)} η_e g(θ_k; x_j, t, ε)⟩
over the trajectory checkpoints, with plain (unnormalised) gradients; see `methods.trajectory`.

Differs from the paper's Σ_k η_k ⟨G_k(q), Σ g⟩: a replayed draw that is one update (window
"interval") is weighted by the learning rate in force at its own step, and a draw or grid average
that stands for a whole window (window "epoch", train_side "grid") by the rate summed over that
window, so warm-up, decay and uneven checkpoints count (`artifacts.learning_rates`). Evenly
spaced checkpoints with a constant rate over every window give the paper's ranking exactly."""

from __future__ import annotations

from diffattr.methods.trajectory import TrajectoryArgs, trajectory_method, unit_weights

__all__ = ["METHOD", "TrajectoryArgs"]

METHOD = trajectory_method(
    "tracin",
    "TracIn",
    unit_weights,
    summary="Diffusion-TracIn: learning-rate-weighted gradient dot products over checkpoints",
)
