"""TRAK and D-TRAK scores from stage 2's store at the final EMA weights, for a sweep of damping.

    score_λ(q, j) = φ_qᵀ (ΦᵀΦ + λI)⁻¹ φ_j

φ = P g are projected per-sample gradients averaged over the training timestep grid
(`gradients.train_timesteps`) for training images and over the query grid for queries: of the
training loss for TRAK, of D-TRAK's measurement mean(ε_θ(x_t, t)²) for D-TRAK (on both sides,
as in D-TRAK's code). Φ [N, k] stacks the training features.

The whole damping sweep costs one thin SVD Φ = U S Vᵀ: since every φ_j lies in the row space of
Φ, score_λ = (φ_q V) diag(s / (s² + λ)) Uᵀ, with no k × k inverse per λ.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from diffattr.artifacts.scores import Scores
from diffattr.methods.tracin import index_scores, load_index, store_provenance
from diffattr.storage.arrays import load_store

FEATURES = {
    "trak": ("train_grid_features", "query_features"),
    "dtrak": ("train_grid_sqnorm_features", "query_sqnorm_features"),
}


def ema_store(index: dict) -> dict:
    """The final-EMA store of a gradient index (ValueError if stage 2 ran with ema: false)."""
    ema = [s for s in index["stores"] if s["weights"] == "ema"]
    if not ema:
        raise ValueError(
            "the gradient index has no EMA store; rerun stage 2 with gradients.ema: true"
        )
    return ema[-1]


def damped_scores(
    train_features: np.ndarray, query_features: np.ndarray, dampings: Sequence[float]
) -> np.ndarray:
    """φ_qᵀ (ΦᵀΦ + λI)⁻¹ φ_j for each λ.

    train_features Φ: [N, k]; query_features: [Q, k]; dampings: λ > 0. Returns [L, Q, N] float64.
    """
    lambdas = np.asarray(dampings, np.float64)
    if lambdas.ndim != 1 or not len(lambdas) or np.any(~np.isfinite(lambdas) | (lambdas <= 0)):
        raise ValueError(f"dampings must be a non-empty list of positive numbers, got {dampings}")
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


def trak_scores(
    gradient_dir: str | Path, method: str = "trak", dampings: Sequence[float] = (1e-2,)
) -> list[Scores]:
    """TRAK or D-TRAK scores [Q, N] of the EMA store, one `Scores` per damping λ."""
    if method not in FEATURES:
        raise ValueError(f"unknown method {method!r}; choose one of {list(FEATURES)}")
    gradient_dir = Path(gradient_dir)
    index = load_index(gradient_dir)
    store = ema_store(index)
    settings, arrays = load_store(gradient_dir / store["path"])
    train_name, query_name = FEATURES[method]
    phi = np.asarray(arrays[train_name], np.float64).mean(axis=1)
    queries = np.asarray(arrays[query_name], np.float64).mean(axis=1)
    values = damped_scores(phi, queries, dampings)
    common = {
        "method": method,
        "measurement": "loss" if method == "trak" else "mean(eps_pred^2)",
        "weights": "ema",
        "checkpoint_step": store["step"],
        "weights_hash": settings["weights_hash"],
        **store_provenance(index, settings),
    }
    return [
        index_scores(index, v, {**common, "damping": float(lam)})
        for v, lam in zip(values, dampings, strict=True)
    ]
