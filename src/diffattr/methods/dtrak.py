"""D-TRAK (Zheng et al. 2024): TRAK's kernel on gradients of the measurement mean(ε_θ(x_t, t)²)
instead of the loss, on both sides (as in D-TRAK's code); see `methods.trak`."""

from __future__ import annotations

from collections.abc import Sequence

from diffattr.artifacts.gradient_index import QUERY_SQNORM, TRAIN_GRID_SQNORM
from diffattr.artifacts.scores import Scores
from diffattr.methods.base import Method, MethodInputs
from diffattr.methods.trak import DampedArgs, kernel_scores


def sweep(inputs: MethodInputs, args: DampedArgs, dampings: Sequence[float]) -> list[Scores]:
    return kernel_scores(inputs, TRAIN_GRID_SQNORM, QUERY_SQNORM, dampings, "mean(eps_pred^2)")


def compute(inputs: MethodInputs, args: DampedArgs) -> Scores:
    return sweep(inputs, args, [args.damping])[0]


METHOD = Method(
    "dtrak",
    "D-TRAK",
    DampedArgs,
    compute,
    summary="TRAK on gradients of mean(eps_pred^2) at the EMA weights",
    swept="damping",
    sweep=sweep,
)
