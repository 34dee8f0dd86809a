"""Timestep-calibrated TracIn (ours, beyond the papers): each gradient divided by the expected
gradient norm at its timestep — the checkpoint's mean exact norm in that timestep's cell of
stage 2's norm profile — instead of by its own norm (ReTrac).

ReTrac removes the norm of every gradient, and with it the information that a sample's
gradient is unusually large for its timestep; its proponents then favour draws at large t,
where gradients are generic. Dividing by E‖g(t)‖ removes only the part of the norm the timestep
explains, so a draw's weight no longer depends on where its t fell, on average.
"""

from __future__ import annotations

import numpy as np

from diffattr.methods.trajectory import (
    Checkpoint,
    Gradients,
    safe_inverse,
    trajectory_method,
)


def expected_norm_weights(g: Gradients, checkpoint: Checkpoint, what: str) -> np.ndarray:
    """w = 1/E‖g(t)‖ from the checkpoint's norm profile at each gradient's timestep."""
    return safe_inverse(checkpoint.mean_norm_at(g.t), what, "the profile's mean norms")


METHOD = trajectory_method(
    "calibrated",
    "Calibrated TracIn",
    expected_norm_weights,
    summary="TracIn with each gradient divided by the mean gradient norm at its timestep (ours)",
)
