"""Diffusion-TracIn ([ReTrac] §3): Σ_k η_k ⟨G_k(q), Σ_{(t,ε)∈R_k(j)} g(θ_k; x_j, t, ε)⟩ over the
trajectory checkpoints, with plain (unnormalised) gradients; see `methods.trajectory`."""

from __future__ import annotations

from diffattr.methods.trajectory import TrajectoryArgs, trajectory_method, unit_weights

__all__ = ["METHOD", "TrajectoryArgs"]

METHOD = trajectory_method(
    "tracin",
    "TracIn",
    unit_weights,
    summary="Diffusion-TracIn: learning-rate-weighted gradient dot products over checkpoints",
)
