"""Grad-cosine: Σ_k H_k cos(G_k(q), T_k(j)) with plain gradients (a baseline of [ReTrac] and of
D-TRAK's comparisons); 0 for a checkpoint whose window holds no draw of the sample. H_k: the
learning rate summed over checkpoint k's window per sample (the paper: η_k), T_k(j) weighted per
event by η_e (`artifacts.learning_rates`)."""

from __future__ import annotations

from diffattr.artifacts.scores import Scores
from diffattr.methods.base import Method, MethodInputs
from diffattr.methods.tracin import TrajectoryArgs
from diffattr.methods.trajectory import training_image_scores, trajectory_scores, unit_weights


def compute(inputs: MethodInputs, args: TrajectoryArgs) -> Scores:
    return trajectory_scores(inputs, unit_weights, args.train_side, args.checkpoints, cosine=True)


def trace(inputs: MethodInputs, args: TrajectoryArgs, n_queries: int) -> Scores:
    return training_image_scores(inputs, unit_weights, n_queries, cosine=True)


METHOD = Method(
    "grad_cosine",
    "Grad-cosine",
    TrajectoryArgs,
    compute,
    summary="cosine of aggregated query and training gradients over checkpoints",
    trace=trace,
)
