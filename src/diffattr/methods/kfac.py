"""K-FAC influence functions for diffusion models ([KFAC-IF], Mlodozeniec et al. 2025).

    IF(q, j) = ∇m(q)ᵀ (Ĝ + λI)⁻¹ ∇ℓ(x_j)

at the final EMA weights, with Ĝ the Kronecker-factored GGN of the diffusion loss over every
Linear and Conv2d layer (GroupNorm left out, its coordinates zeroed), fitted on `draws` noisy
versions of every training image (t stratified over [0, T), ε keyed by the image), GGN^model
("mc", sampled targets, the paper's recommendation) by default. m and ℓ are the loss averaged
over (t, ε): the query side is the full gradient averaged over the query timestep grid and its
noise draws (as the stored query features), preconditioned, then projected with the stored
projector; the training side is the stored projected features of the EMA store's training grid.
With `projection: none` this is exact. EK-FAC (`methods.ekfac`) adds the eigenvalue correction.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from diffattr.artifacts.gradient_index import QUERY, TRAIN_GRID, features_array
from diffattr.artifacts.scores import Scores
from diffattr.gradients.engines import PerSampleGradients
from diffattr.gradients.extraction import mean_gradients
from diffattr.gradients.kfac import KFAC, fit_kfac, fitting_batches, preconditioned_features
from diffattr.gradients.projection import projector_from_settings
from diffattr.methods.base import Method, MethodInputs


@dataclass(frozen=True)
class KFACArgs:
    """damping: λ > 0 added to the curvature's eigenvalues; fisher: mc (GGN^model) | type2
    (exact GGN expectation) | empirical (GGN^loss); approx: expand | reduce (weight sharing);
    mc_samples: sampled targets per draw (mc); draws: fitting draws per training image;
    seed: keys the fitting draws and the sampled targets."""

    damping: float = 1e-6
    fisher: str = "mc"
    approx: str = "expand"
    mc_samples: int = 1
    draws: int = 4
    seed: int = 0


def fitted(inputs: MethodInputs, args: KFACArgs, eigen_correction: bool) -> tuple[KFAC, object]:
    """(factors, EMA model) for these arguments, fitted once per stage run.

    One EK-FAC fit serves both methods: K-FAC is the same factors without the eigenvalue
    correction (one extra pass over the fitting data when only K-FAC is asked for)."""
    key = f"kfac:{args.fisher}:{args.approx}:{args.mc_samples}:{args.draws}:{args.seed}"
    ekfac, model = inputs.cached(key, lambda: _fit(inputs, args))
    if eigen_correction:
        return ekfac, model
    plain = KFAC(ekfac.A, ekfac.G, {**ekfac.settings, "eigen_correction": False})
    return plain, model


def _fit(inputs: MethodInputs, args: KFACArgs) -> tuple[KFAC, object]:
    """EK-FAC factors of the EMA model on `args.draws` keyed draws of every training image."""
    model, _ = inputs.run.load_model(ema=True)
    model = model.to(inputs.device)
    settings = inputs.run.settings["model"]
    abar = inputs.run.alphas_cumprod()

    def batches():
        return fitting_batches(
            inputs.train.images, inputs.train.ids, abar, args.draws, args.seed, device=inputs.device
        )

    kfac = fit_kfac(
        model, batches, args.fisher, args.approx, args.mc_samples, True, args.seed, settings["loss"]
    )
    return kfac, model


def query_gradients(inputs: MethodInputs, model) -> torch.Tensor:
    """∇m(q) [Q, D]: full loss gradients of the queries at the EMA weights, averaged over the
    query grid and draws that made the stored query features."""

    def compute():
        entry = inputs.gradients.ema()
        settings, _ = inputs.gradients.load(entry)
        run = inputs.run.settings["model"]
        abar = inputs.run.alphas_cumprod()
        items = inputs.queries.items(
            inputs.gradients.timesteps("query"),
            settings["sets"][QUERY]["draws"],
            settings["gradients"]["seed"],
        )
        grads = PerSampleGradients(model, abar, run["loss"], "loss", device=inputs.device)
        return mean_gradients(items, grads)

    return inputs.cached("kfac:query_gradients", compute)


def influence_sweep(
    inputs: MethodInputs, args: KFACArgs, dampings: Sequence[float], eigen_correction: bool
) -> list[Scores]:
    kfac, model = fitted(inputs, args, eigen_correction)
    entry = inputs.gradients.ema()
    settings, arrays = inputs.gradients.load(entry)
    projector = projector_from_settings(settings["projection"])
    queries = preconditioned_features(
        kfac, model, query_gradients(inputs, model), dampings, projector
    )
    train = torch.from_numpy(np.asarray(arrays[features_array(TRAIN_GRID)], np.float32).mean(1))
    values = (queries.double() @ train.double().T.to(queries.device)).cpu().numpy()
    common = {
        "measurement": "loss",
        "weights": "ema",
        "checkpoint_step": entry.step,
        "weights_hash": settings["weights_hash"],
        "train_timesteps": inputs.gradients.timesteps("ema_train").tolist(),
        "curvature": kfac.settings,
        **inputs.gradients.provenance(settings),
    }
    return [
        inputs.gradients.scores(v, {**common, "damping": float(lam)})
        for v, lam in zip(values, dampings, strict=True)
    ]


def sweep(inputs: MethodInputs, args: KFACArgs, dampings: Sequence[float]) -> list[Scores]:
    return influence_sweep(inputs, args, dampings, eigen_correction=False)


def compute(inputs: MethodInputs, args: KFACArgs) -> Scores:
    return sweep(inputs, args, [args.damping])[0]


METHOD = Method(
    "kfac",
    "K-FAC",
    KFACArgs,
    compute,
    summary="influence function with a K-FAC GGN at the EMA weights",
    swept="damping",
    sweep=sweep,
)
