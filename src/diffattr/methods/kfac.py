"""K-FAC influence functions for diffusion models ([KFAC-IF], Mlodozeniec et al. 2025).

    IF(q, j) = ∇m(q)ᵀ (Ĝ + λI)⁻¹ ∇ℓ(x_j)

at the final EMA weights, with Ĝ the Kronecker-factored GGN of the diffusion loss over every
Linear and Conv2d layer (GroupNorm left out, its coordinates zeroed), fitted on `draws` noisy
versions of every training image (t stratified over [0, T), ε keyed by the image), GGN^model
("mc", sampled targets, the paper's recommendation) by default. EK-FAC (`methods.ekfac`) adds
the eigenvalue correction.

The two gradients (defaults first):
- query side "measurement": ∇m(θ, q) of the very measurement the LDS scores — the query's loss
  averaged over its K keyed (t, ε) measurement draws (`retrain.measure_*`); "grid": the mean
  over the stored query grid (query_timesteps × query_draws).
- training side "streamed": full per-sample gradients at the EMA weights averaged over
  `train_timesteps` evenly spaced timesteps (one keyed draw each, keyed like stage 2's EMA
  grid), streamed through the eigenbasis and never stored — exact at any λ, memory independent
  of N; "stored": stage 2's projected EMA-grid features, with the preconditioned query gradients
  projected by the stored projector (exact only with `projection: none`).

Why "streamed" is the default: a random projection preserves ⟨Pu, Pv⟩ only up to an error of
order ‖u‖‖v‖/√k, and at small λ the preconditioned query's norm is dominated by directions
where the training gradients are tiny — on the digits default the sketch (k = 2048) cost
EK-FAC its LDS at every λ below 1e-3 (0.17 → 0.43 exact; README, "What the LDS shows").
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from diffattr.artifacts.gradient_index import QUERY, TRAIN_GRID, features_array
from diffattr.artifacts.scores import Scores
from diffattr.gradients.engines import PerSampleGradients
from diffattr.gradients.extraction import mean_gradient_chunks, mean_gradients
from diffattr.gradients.items import KIND_TRAIN, grid_items, timestep_grid
from diffattr.gradients.kfac import (
    KFAC,
    fit_kfac,
    fitting_batches,
    preconditioned_features,
    streamed_influence,
)
from diffattr.gradients.projection import projector_from_settings
from diffattr.methods.base import Method, MethodInputs


@dataclass(frozen=True)
class KFACArgs:
    """damping: λ > 0 added to the curvature's eigenvalues; fisher: mc (GGN^model) | type2
    (exact GGN expectation) | empirical (GGN^loss); approx: expand | reduce (weight sharing);
    mc_samples: sampled targets per draw (mc); draws: fitting draws per training image;
    seed: keys the fitting draws and the sampled targets; query_side: measurement | grid;
    train_side: streamed | stored; train_timesteps: the streamed training side's grid size."""

    damping: float = 1e-6
    fisher: str = "mc"
    approx: str = "expand"
    mc_samples: int = 1
    draws: int = 1
    seed: int = 0
    query_side: str = "measurement"
    train_side: str = "streamed"
    train_timesteps: int = 32

    def __post_init__(self) -> None:
        for key, value, choices in (
            ("query_side", self.query_side, QUERY_SIDES),
            ("train_side", self.train_side, TRAIN_SIDES),
        ):
            if value not in choices:
                raise ValueError(f"unknown {key} {value!r}; choose one of {list(choices)}")
        if isinstance(self.train_timesteps, bool) or not isinstance(self.train_timesteps, int):
            raise ValueError(f"train_timesteps must be an int ≥ 1, got {self.train_timesteps!r}")
        if self.train_timesteps < 1:
            raise ValueError(f"train_timesteps must be ≥ 1, got {self.train_timesteps}")


QUERY_SIDES = ("measurement", "grid")
TRAIN_SIDES = ("streamed", "stored")


def fitted(inputs: MethodInputs, args: KFACArgs, eigen_correction: bool) -> tuple[KFAC, object]:
    """(factors, EMA model) for these arguments, fitted once per stage run.

    One EK-FAC fit serves both methods: K-FAC is the same factors without the eigenvalue
    correction (one extra pass over the fitting data when only K-FAC is asked for)."""
    ekfac, plain, model = both_fits(inputs, args)
    return (ekfac if eigen_correction else plain), model


def both_fits(inputs: MethodInputs, args: KFACArgs) -> tuple[KFAC, KFAC, object]:
    """(EK-FAC, K-FAC, EMA model): one fit, two curvatures sharing the eigenbasis."""
    key = f"kfac:{args.fisher}:{args.approx}:{args.mc_samples}:{args.draws}:{args.seed}"

    def make():
        ekfac, model = _fit(inputs, args)
        plain = KFAC(ekfac.A, ekfac.G, {**ekfac.settings, "eigen_correction": False})
        return ekfac, plain, model

    return inputs.cached(key, make)


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


def query_gradients(inputs: MethodInputs, model, side: str) -> torch.Tensor:
    """∇m(q) [Q, D]: full gradients of the queries at the EMA weights, averaged over the
    measurement's K draws (side "measurement") or the stored query grid's draws ("grid")."""
    run = inputs.run.settings["model"]
    grads = PerSampleGradients(
        model, inputs.run.alphas_cumprod(), run["loss"], "loss", device=inputs.device
    )

    def from_measurement():
        if inputs.measurement is None:
            raise ValueError(
                "query_side 'measurement' needs the measurement draws (MethodInputs.measurement, "
                "set by stages.inputs.method_inputs from retrain.measure_*); or use query_side "
                "'grid'"
            )
        return mean_gradients(inputs.measurement.items(inputs.queries.images), grads, 256)

    def from_grid():
        settings, _ = inputs.gradients.load(inputs.gradients.ema())
        items = inputs.queries.items(
            inputs.gradients.timesteps("query"),
            settings["sets"][QUERY]["draws"],
            settings["gradients"]["seed"],
        )
        return mean_gradients(items, grads)

    make = from_measurement if side == "measurement" else from_grid
    return inputs.cached(f"kfac:query_gradients:{side}", make)


def streamed_training_side(inputs: MethodInputs, model, timesteps: int):
    """(chunks of exact mean training gradients at the EMA weights, their provenance)."""
    settings, _ = inputs.gradients.load(inputs.gradients.ema())
    seed = settings["gradients"]["seed"]
    T = int(inputs.run.settings["model"]["num_train_timesteps"])
    grid = timestep_grid(timesteps, T)
    items = grid_items(inputs.train.images, inputs.train.ids, KIND_TRAIN, grid, 1, seed)
    grads = PerSampleGradients(
        model,
        inputs.run.alphas_cumprod(),
        inputs.run.settings["model"]["loss"],
        "loss",
        device=inputs.device,
    )
    chunks = mean_gradient_chunks(items, grads, 256, 256, progress=True, desc="K-FAC train side")
    return chunks, {"train_timesteps": grid.tolist(), "train_draws": 1, "train_noise_seed": seed}


def influence_sweep(
    inputs: MethodInputs, args: KFACArgs, dampings: Sequence[float], eigen_correction: bool
) -> list[Scores]:
    kfac, model = fitted(inputs, args, eigen_correction)
    entry = inputs.gradients.ema()
    settings, arrays = inputs.gradients.load(entry)
    queries = query_gradients(inputs, model, args.query_side)
    if args.train_side == "streamed":
        ekfac, plain, _ = both_fits(inputs, args)
        fit_key = f"{args.fisher}:{args.approx}:{args.mc_samples}:{args.draws}:{args.seed}"
        key = f"kfac:streamed:{fit_key}:{args.train_timesteps}:{args.query_side}"
        n_train = len(inputs.train.ids)

        def stream(lambdas):
            chunks, side = streamed_training_side(inputs, model, args.train_timesteps)
            out = streamed_influence([ekfac, plain], model, queries, chunks, n_train, lambdas)
            return {
                (corrected, lam): out[0 if corrected else 1, i].numpy()
                for corrected in (True, False)
                for i, lam in enumerate(lambdas)
            }, side

        # One pass over the training set serves K-FAC and EK-FAC at every λ asked for together
        # (a sweep); a later call with new λ values streams again for those only.
        by_lambda, side = inputs.cached(key, lambda: stream(list(dampings)))
        missing = [lam for lam in dampings if (eigen_correction, lam) not in by_lambda]
        if missing:
            by_lambda.update(stream(missing)[0])
        values = [by_lambda[(eigen_correction, lam)] for lam in dampings]
        train_side = {"train_side": "streamed (exact, full gradients)", **side}
    else:
        projector = projector_from_settings(settings["projection"])
        pre = preconditioned_features(kfac, model, queries, dampings, projector)
        train = np.asarray(arrays[features_array(TRAIN_GRID)], np.float32).mean(1)
        train = torch.from_numpy(train).double().to(pre.device)
        values = list((pre.double() @ train.T).cpu().numpy())
        train_side = {
            "train_side": "stored (projected EMA-grid features)",
            "train_timesteps": inputs.gradients.timesteps("ema_train").tolist(),
            **inputs.gradients.provenance(settings),
        }
    common = {
        "measurement": "loss",
        "weights": "ema",
        "checkpoint_step": entry.step,
        "weights_hash": settings["weights_hash"],
        "query_side": args.query_side,
        "measurement_draws": None
        if args.query_side != "measurement"
        else inputs.measurement.settings(inputs.run.settings["model"]["loss"]),
        "curvature": kfac.settings,
        **train_side,
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
