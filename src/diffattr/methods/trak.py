"""TRAK (Park et al. 2023) on the diffusion loss, from stage 2's store at the final EMA weights.

    score_λ(q, j) = φ_qᵀ (ΦᵀΦ + λI)⁻¹ φ_j

φ = P g are projected per-sample gradients of the training loss, averaged over the EMA store's
own training timestep grid (`gradients.ema_train_timesteps`) for training images and over the
query grid for queries. Φ [N, k] stacks the training features.

The whole damping sweep costs one thin SVD Φ = U S Vᵀ: since every φ_j lies in the row space of
Φ, score_λ = (φ_q V) diag(s / (s² + λ)) Uᵀ, with no k × k inverse per λ.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from diffattr.artifacts.gradient_index import QUERY, TRAIN_GRID, features_array
from diffattr.artifacts.scores import Scores
from diffattr.gradients.kfac import check_dampings
from diffattr.methods.base import Method, MethodInputs


@dataclass(frozen=True)
class DampedArgs:
    """damping: λ > 0, added to the kernel's eigenvalues (scale: that of ΦᵀΦ)."""

    damping: float = 1e-2


def damped_scores(
    train_features: np.ndarray, query_features: np.ndarray, dampings: Sequence[float]
) -> np.ndarray:
    """φ_qᵀ (ΦᵀΦ + λI)⁻¹ φ_j for each λ.

    train_features Φ: [N, k]; query_features: [Q, k]; dampings: λ > 0. Returns [L, Q, N] float64.
    """
    lambdas = np.asarray(check_dampings(dampings), np.float64)
    phi = np.asarray(train_features, np.float64)
    queries = np.asarray(query_features, np.float64)
    if phi.ndim != 2 or queries.ndim != 2 or phi.shape[1] != queries.shape[1]:
        raise ValueError(
            f"features disagree: training {phi.shape}, queries {queries.shape} (expected [N, k] "
            "and [Q, k])"
        )
    u, s, vt = np.linalg.svd(phi, full_matrices=False)
    projected = queries @ vt.T  # [Q, r]
    weights = s[None, :] / (s[None, :] ** 2 + lambdas[:, None])  # [L, r]
    return (projected[None] * weights[:, None]) @ u.T  # [L, Q, r] @ [r, N]


def kernel_scores(
    inputs: MethodInputs, train_set: str, query_set: str, dampings: Sequence[float], what: str
) -> list[Scores]:
    """Scores [Q, N] per damping from the EMA store's features of two sets."""
    entry = inputs.gradients.ema()
    settings, arrays = inputs.gradients.load(entry)
    phi = np.asarray(arrays[features_array(train_set)], np.float64).mean(axis=1)
    queries = np.asarray(arrays[features_array(query_set)], np.float64).mean(axis=1)
    common = {
        "measurement": what,
        "weights": "ema",
        "checkpoint_step": entry.step,
        "weights_hash": settings["weights_hash"],
        "train_timesteps": inputs.gradients.timesteps("ema_train").tolist(),
        **inputs.gradients.provenance(settings),
    }
    values = damped_scores(phi, queries, dampings)
    return [
        inputs.gradients.scores(v, {**common, "damping": float(lam)})
        for v, lam in zip(values, dampings, strict=True)
    ]


def sweep(inputs: MethodInputs, args: DampedArgs, dampings: Sequence[float]) -> list[Scores]:
    return kernel_scores(inputs, TRAIN_GRID, QUERY, dampings, "loss")


def compute(inputs: MethodInputs, args: DampedArgs) -> Scores:
    return sweep(inputs, args, [args.damping])[0]


METHOD = Method(
    "trak",
    "TRAK",
    DampedArgs,
    compute,
    summary="projected loss gradients at the EMA weights through the damped kernel inverse",
    swept="damping",
    sweep=sweep,
)
