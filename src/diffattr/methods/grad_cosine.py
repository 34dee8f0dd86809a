"""Grad-cosine: Σ_k H_k cos(G_k(q), T_k(j)) with plain gradients (a baseline of [ReTrac] and of
D-TRAK's comparisons); 0 for a checkpoint whose window holds no draw of the sample. H_k: the
learning rate summed over checkpoint k's window per sample (the paper: η_k), T_k(j) weighted per
event by η_e (`artifacts.learning_rates`). It is TracIn with `aggregate: unit` (see
`methods.trajectory`)."""

from __future__ import annotations

from dataclasses import dataclass

from diffattr.methods.trajectory import TrajectoryArgs, trajectory_method, unit_weights


@dataclass(frozen=True)
class CosineArgs(TrajectoryArgs):
    """As TracIn's arguments, with the aggregated vectors scaled to unit length by default."""

    aggregate: str = "unit"


METHOD = trajectory_method(
    "grad_cosine",
    "Grad-cosine",
    unit_weights,
    summary="cosine of aggregated query and training gradients over checkpoints",
    args=CosineArgs,
)
