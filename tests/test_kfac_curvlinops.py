"""Our K-FAC / EK-FAC factors against curvlinops-for-pytorch 3.0.1 on a diffusers UNet.

Conventions (derived from curvlinops 3.0.1's `KFACLinearOperator`, checked below): the UNet is
wrapped to take a dict {x_t, t} and return ε̂ flattened to (B, D), D = C·H·W; the loss is
`MSELoss(reduction="mean")`, which averages over B·D. curvlinops scales that loss back per sample
(Hessian square roots divided by B for type-2, the loss times √D for mc / empirical, and the
gradient covariance times B²/N), so that:

- type-2 ("type-2" there): its G equals ours exactly, (1/N) Σ_n Jᵀ (2/D) J — scale factor 1;
- empirical: its G is D times ours (its per-sample loss is D·mean, ours the mean);
- A (inputs, with the bias as a ones column: separate_weight_and_bias=False) is the same for
  every Fisher type: expand Σ a aᵀ / (N·L), reduce Σ ā āᵀ / N.

The model runs in float64 on both sides, so agreement is to float64 rounding.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util

import pytest
import torch
from torch import nn

from diffattr.diffusion.model import build_unet, unet_config
from diffattr.gradients.kfac import curvature_layers, fit_kfac


def test_torchvision_is_not_installed():
    """torchvision from the index breaks `import diffusers` next to our torch build
    (MACHINE-NOTES, "Curvature libraries"): curvlinops and backpack go in with --no-deps."""
    assert importlib.util.find_spec("torchvision") is None
    with pytest.raises(importlib.metadata.PackageNotFoundError):
        importlib.metadata.version("torchvision")


curvlinops = pytest.importorskip(
    "curvlinops",
    reason="curvlinops-for-pytorch is not installed (make env installs it, see the Makefile)",
)


def test_curvlinops_is_the_pinned_version():
    assert importlib.metadata.version("curvlinops-for-pytorch") == "3.0.1"


class DictUNet(nn.Module):
    """ε̂ flattened to (B, C·H·W) from a dict {x_t, t}: the shape curvlinops' MSELoss expects."""

    def __init__(self, unet: nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.unet(inputs["x_t"], inputs["t"]).sample.flatten(1)


@pytest.fixture(scope="module")
def setup():
    # 4×4 images: D = 16 backpropagated vectors per batch for type-2, on both sides
    unet = build_unet(unet_config("tiny", (1, 4, 4)), seed=0).double().eval()
    gen = torch.Generator().manual_seed(0)
    batches = [
        (
            torch.randn(n, 1, 4, 4, generator=gen, dtype=torch.float64),
            torch.randint(1000, (n,), generator=gen),
            torch.randn(n, 1, 4, 4, generator=gen, dtype=torch.float64),
        )
        for n in (3, 2)
    ]
    return unet, batches


def _curvlinops_factors(unet, batches, fisher_type: str, approx: str, ekfac: bool = False):
    """curvlinops' A and G per layer (our layer names), and the operator."""
    from curvlinops import EKFACLinearOperator, KFACLinearOperator

    model = DictUNet(unet).eval()
    layers = curvature_layers(unet)
    params = [p for layer in layers.values() for p in layer.parameters()]
    data = [({"x_t": x, "t": t}, eps.flatten(1)) for x, t, eps in batches]
    cls = EKFACLinearOperator if ekfac else KFACLinearOperator
    op = cls(
        model,
        nn.MSELoss(reduction="mean"),
        params,
        data,
        fisher_type=fisher_type,
        kfac_approx=approx,
        check_deterministic=False,
        separate_weight_and_bias=False,
        num_data=sum(len(x) for x, _, _ in batches),
        num_per_example_loss_terms=1,
        batch_size_fn=lambda inputs: inputs["x_t"].shape[0],
    )
    op.compute_kronecker_factors()
    names = {f"unet.{name}": name for name in layers}
    assert set(op._mapping) == set(names)
    a = {names[k]: v.clone() for k, v in op._input_covariances.items()}
    g = {names[k]: v.clone() for k, v in op._gradient_covariances.items()}
    return a, g, op, names


@pytest.mark.parametrize("approx", ["expand", "reduce"])
def test_type2_factors_equal_curvlinops(setup, approx):
    unet, batches = setup
    ours = fit_kfac(unet, lambda: batches, "type2", approx, eigen_correction=False)
    a, g, _, _ = _curvlinops_factors(unet, batches, "type-2", approx)
    assert set(a) == set(ours.A) and set(g) == set(ours.G)
    for name in ours.A:
        # scale factor 1 for both factors (see the module docstring)
        torch.testing.assert_close(ours.A[name], a[name], rtol=1e-10, atol=1e-14)
        torch.testing.assert_close(ours.G[name], g[name], rtol=1e-10, atol=1e-14)


def test_empirical_fisher_gradient_factor_is_d_times_ours(setup):
    unet, batches = setup
    ours = fit_kfac(unet, lambda: batches, "empirical", "expand", eigen_correction=False)
    a, g, _, _ = _curvlinops_factors(unet, batches, "empirical", "expand")
    d = batches[0][0][0].numel()  # C·H·W = 16
    for name in ours.A:
        torch.testing.assert_close(ours.A[name], a[name], rtol=1e-10, atol=1e-14)
        torch.testing.assert_close(d * ours.G[name], g[name], rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("approx", ["expand", "reduce"])
def test_type2_ekfac_corrections_equal_curvlinops_in_the_same_eigenbasis(setup, approx):
    """EK-FAC: curvlinops' corrected eigenvalues, computed in our eigenbases, equal ours. (The
    factors agree to rounding, but a few samples leave them rank-deficient, and eigh may pick
    different bases of a repeated eigenvalue's eigenspace; handing curvlinops our bases makes
    the comparison exact.)"""
    unet, batches = setup
    ours = fit_kfac(unet, lambda: batches, "type2", approx)
    _, _, op, names = _curvlinops_factors(unet, batches, "type-2", approx, ekfac=True)
    for long_name, name in names.items():
        _, q_g, _, q_a = ours.eigenbasis(name)
        op._gradient_covariances_eigenvectors[long_name] = q_g.clone()
        op._input_covariances_eigenvectors[long_name] = q_a.clone()
    op.compute_eigenvalue_correction()
    for long_name, name in names.items():
        theirs = op._corrected_eigenvalues[long_name]
        torch.testing.assert_close(
            ours.corrections[name], theirs, rtol=1e-10, atol=1e-14 * float(theirs.max())
        )
