"""EK-FAC influence ([KFAC-IF]): K-FAC's eigenbases with the eigenvalues replaced by the exact
second moments of the per-sample pseudo-gradients in that basis; see `methods.kfac`."""

from __future__ import annotations

from collections.abc import Sequence

from diffattr.artifacts.scores import Scores
from diffattr.methods.base import Method, MethodInputs
from diffattr.methods.kfac import KFACArgs, influence_sweep


def sweep(inputs: MethodInputs, args: KFACArgs, dampings: Sequence[float]) -> list[Scores]:
    return influence_sweep(inputs, args, dampings, eigen_correction=True)


def compute(inputs: MethodInputs, args: KFACArgs) -> Scores:
    return sweep(inputs, args, [args.damping])[0]


METHOD = Method(
    "ekfac",
    "EK-FAC",
    KFACArgs,
    compute,
    summary="influence function with an eigenvalue-corrected K-FAC GGN at the EMA weights",
    swept="damping",
    sweep=sweep,
)
