"""The diffusion task, defined once: the training loss, the measurements attributed, and the
output-space curvature that K-FAC's generalised Gauss-Newton needs.

Every per-sample function maps ε-predictions ε̂ [B, C, H, W] and the noise ε [B, C, H, W] to
one value per sample [B], averaged over its D = C·H·W outputs:

- loss "l2": mean((ε − ε̂)²) (the DDPM loss, our default);
- loss "l1": mean(|ε − ε̂|) ([ReTrac]'s released code trains and attributes with it);
- measurement "loss": the training loss of the run (l2 or l1);
- measurement "sqnorm": D-TRAK's mean(ε̂²), independent of ε.

Output-space curvature (the GGN's middle factor ∂²ℓ/∂ε̂²): (2/D)·I for l2. For l1 the second
derivative is zero almost everywhere (and undefined at ε̂ = ε), so the GGN of the l1 loss is
zero: K-FAC refuses `loss: l1` rather than fit a meaningless matrix (`output_hessian_scale`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import torch

LOSS_KINDS = ("l2", "l1")
MEASUREMENTS = ("loss", "sqnorm")
FISHER_TYPES = ("type2", "mc", "empirical")


def per_sample_loss(eps_pred: torch.Tensor, eps: torch.Tensor, kind: str = "l2") -> torch.Tensor:
    """mean((ε − ε̂)²) (l2) or mean(|ε − ε̂|) (l1) over C, H, W. Returns [B]."""
    if kind == "l2":
        err = (eps - eps_pred).pow(2)
    elif kind == "l1":
        err = (eps - eps_pred).abs()
    else:
        raise ValueError(f"unknown loss {kind!r}; choose one of {list(LOSS_KINDS)}")
    return err.flatten(1).mean(1)


def measurement_fn(
    measurement: str, loss_kind: str
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """f(ε̂ [S, C, H, W], ε [S, C, H, W]) → [S] for a named measurement."""
    if loss_kind not in LOSS_KINDS:
        raise ValueError(f"unknown loss {loss_kind!r}; choose one of {list(LOSS_KINDS)}")
    if measurement == "loss":
        return lambda eps_pred, eps: per_sample_loss(eps_pred, eps, loss_kind)
    if measurement == "sqnorm":
        return lambda eps_pred, eps: eps_pred.pow(2).flatten(1).mean(1)
    raise ValueError(f"unknown measurement {measurement!r}; choose one of {list(MEASUREMENTS)}")


def output_hessian_scale(loss_kind: str, d: int) -> float:
    """c with ∂²ℓ/∂ε̂² = c·I for a per-sample loss over d outputs (2/d for l2).

    Raises ValueError for l1, whose Hessian in ε̂ is zero almost everywhere: its GGN carries no
    curvature, so K-FAC / EK-FAC influence is undefined (train with `model.loss: l2`).
    """
    if loss_kind == "l2":
        return 2.0 / d
    if loss_kind == "l1":
        raise ValueError(
            "K-FAC / EK-FAC need the GGN of the loss, and the l1 loss has zero curvature in ε̂ "
            "almost everywhere (its GGN is 0); use model.loss: l2 for influence functions, or the "
            "gradient methods (TracIn, ReTrac, TRAK), which are defined for l1"
        )
    raise ValueError(f"unknown loss {loss_kind!r}; choose one of {list(LOSS_KINDS)}")


def loss_gradient_wrt_output(
    eps_pred: torch.Tensor, eps: torch.Tensor, loss_kind: str
) -> torch.Tensor:
    """∂ℓ/∂ε̂ per sample, [B, D] for flattened ε̂, ε [B, D] (l2: 2(ε̂ − ε)/D; l1: sign(ε̂ − ε)/D)."""
    d = eps_pred.shape[1]
    diff = eps_pred - eps.reshape(eps_pred.shape).to(eps_pred)
    if loss_kind == "l2":
        return (2.0 / d) * diff.detach()
    if loss_kind == "l1":
        return diff.detach().sign() / d
    raise ValueError(f"unknown loss {loss_kind!r}; choose one of {list(LOSS_KINDS)}")


def ggn_backprop_vectors(
    eps_pred: torch.Tensor,
    eps: torch.Tensor | None,
    loss_kind: str,
    fisher: str,
    mc_samples: int,
    gen: torch.Generator,
) -> Iterator[torch.Tensor]:
    """Vectors v [B, D], one at a time, whose outer products v vᵀ average to each sample's
    output-space factor of the GGN (eps_pred flattened to [B, D]):

    - "type2": v = √c e_d for every output d, with c = output_hessian_scale (exact, D passes);
    - "mc":    v = √c z / √mc_samples, z ~ N(0, I) from `gen` (GGN^model, sampled targets);
    - "empirical": v = ∂ℓ/∂ε̂ (GGN^loss, the empirical Fisher; needs ε).
    """
    if fisher not in FISHER_TYPES:
        raise ValueError(f"unknown fisher type {fisher!r}; choose one of {list(FISHER_TYPES)}")
    n, d = eps_pred.shape
    scale = math.sqrt(output_hessian_scale(loss_kind, d))
    if fisher == "type2":
        for k in range(d):
            v = torch.zeros_like(eps_pred)
            v[:, k] = scale
            yield v
    elif fisher == "mc":
        for _ in range(mc_samples):
            z = torch.randn(n, d, generator=gen, dtype=eps_pred.dtype).to(eps_pred.device)
            yield scale * z / math.sqrt(mc_samples)
    else:
        if eps is None:
            raise ValueError("the empirical Fisher needs the noise ε of every batch")
        yield loss_gradient_wrt_output(eps_pred, eps, loss_kind)
