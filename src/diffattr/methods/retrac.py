"""Diffusion-ReTrac ([ReTrac] §4): TracIn with every replayed training gradient and every
per-timestep query gradient normalised to unit length (exact norms, recorded before projection)
before they are summed; see `methods.trajectory`."""

from __future__ import annotations

from diffattr.methods.trajectory import inverse_norm_weights, trajectory_method

METHOD = trajectory_method(
    "retrac",
    "ReTrac",
    inverse_norm_weights,
    summary="Diffusion-ReTrac: TracIn with every gradient normalised to unit length",
)
