"""K-FAC / EK-FAC against the dense GGN of the diffusion loss on tiny models."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.func import functional_call, jacrev

from diffattr.diffusion.model import build_unet, unet_config
from diffattr.diffusion.schedule import add_noise, build_scheduler
from diffattr.gradients.kfac import (
    check_dampings,
    curvature_layers,
    fit_kfac,
    fitting_batches,
    influence,
    layer_blocks,
    precondition,
    preconditioned_features,
    streamed_influence,
    weight_matrix,
)
from diffattr.gradients.projection import make_projector


class ConvNet(nn.Module):
    """ε̂ = conv(x) (one conv: K-FAC-expand is exact) or conv2(tanh(conv1(x)))."""

    def __init__(self, depth: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(2, 3, 3, padding=1)
        self.conv2 = nn.Conv2d(3, 2, 3, padding=1) if depth == 2 else None

    def forward(self, x, t):
        h = self.conv1(x)
        return self.conv2(torch.tanh(h)) if self.conv2 is not None else h


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 5), nn.Linear(5, 3)

    def forward(self, x, t):
        return self.fc2(torch.tanh(self.fc1(x)))


def dense_ggn_blocks(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """(1/N) Σ_n (2/D) J_nᵀ J_n per layer, in row-major vec of W = [weight | bias]."""
    params = {k: v.detach() for k, v in model.named_parameters()}

    def outputs(p):
        return functional_call(model, p, (x, None)).flatten(1)  # [N, D]

    jac = jacrev(outputs)(params)
    n, d = outputs(params).shape
    blocks = {}
    for name, layer in curvature_layers(model).items():
        w = jac[f"{name}.weight"].reshape(n, d, layer.weight.shape[0], -1)
        if layer.bias is not None:
            w = torch.cat([w, jac[f"{name}.bias"][..., None]], dim=3)
        flat = w.reshape(n, d, -1).double()
        blocks[name] = (2 / d) * torch.einsum("ndp,ndq->pq", flat, flat) / n
    return blocks


def _batches(x):
    eps = torch.zeros(x.shape[0], 1)  # unused by type2 / mc
    return lambda: [(x[:2], None, eps[:2]), (x[2:], None, eps[2:])]


def test_kfac_expand_is_exact_for_a_single_conv_layer():
    torch.manual_seed(0)
    model, x = ConvNet(1).eval(), torch.randn(4, 2, 5, 5)
    kfac = fit_kfac(model, _batches(x), fisher="type2", eigen_correction=False)
    exact = dense_ggn_blocks(model, x)["conv1"]
    # float32 forward passes on both sides: agreement to float32 rounding
    torch.testing.assert_close(kfac.dense("conv1"), exact, rtol=1e-5, atol=1e-7)


def test_kfac_is_exact_per_layer_for_one_sample_without_weight_sharing():
    torch.manual_seed(1)
    model, x = MLP().eval(), torch.randn(1, 4)
    kfac = fit_kfac(model, lambda: [(x, None, None)], fisher="type2", eigen_correction=False)
    for name, exact in dense_ggn_blocks(model, x).items():
        torch.testing.assert_close(kfac.dense(name), exact, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("approx", ["expand", "reduce"])
def test_ekfac_eigenvalues_are_the_exact_ggn_diagonal_in_the_kfac_eigenbasis(approx):
    torch.manual_seed(2)
    # float64 model: the corrections are then float64 throughout (a float32 model gives them
    # to float32 rounding, as its per-batch products run in float32)
    model, x = ConvNet(2).double().eval(), torch.randn(4, 2, 4, 4, dtype=torch.float64)
    kfac = fit_kfac(model, _batches(x), fisher="type2", approx=approx)
    for name, exact in dense_ggn_blocks(model, x).items():
        _, q_g, _, q_a = kfac.eigenbasis(name)
        basis = torch.kron(q_g, q_a)
        expected = torch.diagonal(basis.T @ exact @ basis).reshape(kfac.corrections[name].shape)
        torch.testing.assert_close(kfac.corrections[name], expected, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("eigen_correction", [False, True])
def test_solve_equals_a_dense_damped_solve(eigen_correction):
    torch.manual_seed(3)
    model, x = ConvNet(2).eval(), torch.randn(4, 2, 4, 4)
    kfac = fit_kfac(model, _batches(x), fisher="type2", eigen_correction=eigen_correction)
    layer = curvature_layers(model)["conv2"]
    v = torch.randn(2, *weight_matrix(layer).shape, dtype=torch.float64)
    got = kfac.solve({"conv2": v}, damping=0.3)["conv2"]
    dense = kfac.dense("conv2") + 0.3 * torch.eye(v[0].numel(), dtype=torch.float64)
    expected = torch.linalg.solve(dense, v.reshape(2, -1).T).T.reshape(v.shape)
    torch.testing.assert_close(got, expected, rtol=1e-8, atol=1e-10)
    with pytest.raises(ValueError, match="damping"):
        kfac.solve({"conv2": v}, damping=0.0)


def test_mc_fisher_is_seeded_and_approaches_the_exact_expectation():
    torch.manual_seed(4)
    model, x = MLP().eval(), torch.randn(6, 4)
    batches = lambda: [(x, None, None)]  # noqa: E731
    exact = fit_kfac(model, batches, "type2", eigen_correction=False).G["fc2"]
    a = fit_kfac(model, batches, "mc", mc_samples=4000, seed=7, eigen_correction=False).G["fc2"]
    b = fit_kfac(model, batches, "mc", mc_samples=4000, seed=7, eigen_correction=False).G["fc2"]
    assert torch.equal(a, b)
    assert (a - exact).norm() < 0.1 * exact.norm()


def test_empirical_fisher_uses_the_loss_gradient():
    torch.manual_seed(5)
    model, x = MLP().eval(), torch.randn(1, 4)
    target = torch.randn(1, 3)
    kfac = fit_kfac(model, lambda: [(x, None, target)], "empirical", eigen_correction=False)
    out = model(x, None)
    loss = ((target - out) ** 2).mean()
    g_out = torch.autograd.grad(loss, out)[0][0].double()
    torch.testing.assert_close(kfac.G["fc2"], torch.outer(g_out, g_out))


def test_fits_every_linear_and_conv_layer_of_a_unet_with_attention():
    model = build_unet(unet_config("tiny", (1, 8, 8)), seed=0).eval()
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(3, 1, 8, 8, generator=g), torch.tensor([10, 500, 900])
    kfac = fit_kfac(model, lambda: [(x, t, None)], "mc", mc_samples=2)
    layers = curvature_layers(model)
    assert set(kfac.G) == set(layers) and not any(
        isinstance(m, nn.GroupNorm) for m in layers.values()
    )
    for name, layer in layers.items():
        dout, din = weight_matrix(layer).shape
        assert kfac.A[name].shape == (din, din) and kfac.G[name].shape == (dout, dout)
        torch.testing.assert_close(kfac.A[name], kfac.A[name].T)
        assert (kfac.corrections[name] >= 0).all()


def test_unknown_names_are_refused():
    with pytest.raises(ValueError, match="choose one of"):
        fit_kfac(MLP().eval(), lambda: [], fisher="hessian")
    with pytest.raises(ValueError, match="choose one of"):
        fit_kfac(MLP().eval(), lambda: [], approx="diagonal")


def test_influence_equals_a_dense_block_diagonal_solve_on_split_gradients():
    torch.manual_seed(6)
    model, x = ConvNet(2).eval(), torch.randn(4, 2, 4, 4)
    kfac = fit_kfac(model, _batches(x), fisher="type2")
    dim = sum(p.numel() for p in model.parameters())
    q_flat, t_flat = torch.randn(3, dim), torch.randn(5, dim)
    q, t = layer_blocks(q_flat, model), layer_blocks(t_flat, model)
    scores = influence(kfac, q, t, damping=0.2)
    expected = torch.zeros(3, 5, dtype=torch.float64)
    for name in kfac.G:
        dense = kfac.dense(name) + 0.2 * torch.eye(q[name][0].numel(), dtype=torch.float64)
        qv, tv = q[name].reshape(3, -1).double(), t[name].reshape(5, -1).double()
        expected += qv @ torch.linalg.solve(dense, tv.T)
    torch.testing.assert_close(scores, expected, rtol=1e-8, atol=1e-10)
    # the split puts each layer's weight and bias where weight_matrix does
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])[None]
    for name, layer in curvature_layers(model).items():
        torch.testing.assert_close(
            layer_blocks(flat, model)[name][0], weight_matrix(layer).detach()
        )


class Tokens(nn.Module):
    """A Linear over L tokens: ε̂ = lin(x) [N, L·dout] ("flat") or Σ_l lin(x)_l [N, dout]."""

    def __init__(self, reduce_tokens: bool):
        super().__init__()
        self.lin, self.reduce_tokens = nn.Linear(3, 2), reduce_tokens

    def forward(self, x, t):
        y = self.lin(x)
        return y.sum(1) if self.reduce_tokens else y.flatten(1)


@pytest.mark.parametrize(("approx", "reduce_tokens"), [("expand", False), ("reduce", True)])
def test_each_weight_sharing_approximation_is_exact_where_it_should_be(approx, reduce_tokens):
    """Expand is exact when every token is its own output; reduce when the tokens are summed
    (Eschenhagen et al., 2023)."""
    torch.manual_seed(8)
    model, x = Tokens(reduce_tokens).eval(), torch.randn(5, 4, 3)
    kfac = fit_kfac(model, lambda: [(x, None, None)], "type2", approx, eigen_correction=False)
    exact = dense_ggn_blocks(model, x)["lin"]
    torch.testing.assert_close(kfac.dense("lin"), exact, rtol=1e-5, atol=1e-7)
    other = "reduce" if approx == "expand" else "expand"
    wrong = fit_kfac(model, lambda: [(x, None, None)], "type2", other, eigen_correction=False)
    assert not torch.allclose(wrong.dense("lin"), exact, rtol=1e-3)


def test_unet_pseudo_gradients_are_the_loss_gradients_of_every_layer():
    """Empirical EK-FAC on one sample: the corrections are (Q_Gᵀ ∇_W ℓ Q_A)² with ∇_W ℓ from
    autograd, for all Linear and Conv2d layers of a UNet with attention (hooks, patches and
    attention reshapes included). The weights are frozen, as EMA copies are."""
    model = build_unet(unet_config("tiny", (1, 8, 8)), seed=0).eval()
    g = torch.Generator().manual_seed(0)
    x, t, eps = (
        torch.randn(1, 1, 8, 8, generator=g),
        torch.tensor([300]),
        torch.randn(1, 1, 8, 8, generator=g),
    )
    model.requires_grad_(False)
    kfac = fit_kfac(model, lambda: [(x, t, eps)], "empirical")
    assert not any(p.requires_grad for p in model.parameters())  # restored
    model.requires_grad_(True)
    loss = ((eps - model(x, t).sample) ** 2).mean()
    layers = curvature_layers(model)
    for name, layer in layers.items():
        w, b = torch.autograd.grad(loss, [layer.weight, layer.bias], retain_graph=True)
        grad = torch.cat([w.reshape(w.shape[0], -1), b[:, None]], dim=1)
        _, q_g, _, q_a = kfac.eigenbasis(name)
        expected = (q_g.T @ grad.double() @ q_a) ** 2
        scale = float(expected.max())  # float32 forward passes: tiny entries carry rounding
        torch.testing.assert_close(kfac.corrections[name], expected, rtol=1e-4, atol=1e-6 * scale)


def test_layers_that_do_not_run_and_changing_batches_are_refused():
    class Skips(nn.Module):
        def __init__(self):
            super().__init__()
            self.used, self.unused = nn.Linear(2, 2), nn.Linear(2, 2)

        def forward(self, x, t):
            return self.used(x)

    x = torch.randn(3, 2)
    with pytest.raises(ValueError, match="did not run"):
        fit_kfac(Skips().eval(), lambda: [(x, None, None)], "type2")
    draws = iter([torch.randn(3, 4), torch.randn(3, 4)])
    with pytest.raises(ValueError, match="other data"):
        fit_kfac(MLP().eval(), lambda: [(next(draws), None, None)], "type2")
    with pytest.raises(ValueError, match="eval mode"):
        fit_kfac(MLP(), lambda: [(x, None, None)], "type2")


def test_in_place_change_of_a_recorded_input_or_output_is_refused():
    class InPlace(nn.Module):
        def __init__(self):
            super().__init__()
            self.first, self.second = nn.Linear(2, 2), nn.Linear(2, 2)

        def forward(self, x, t):
            h = self.first(x)
            out = self.second(h)
            h.mul_(2.0)  # the second layer's recorded input changes after it ran
            return out

    x = torch.randn(3, 2)
    with pytest.raises(RuntimeError, match="second.*modified in place"):
        fit_kfac(InPlace().eval(), lambda: [(x, None, None)], "type2")


# ---- fitting draws ---------------------------------------------------------------------------


def _images(n: int = 5) -> torch.Tensor:
    return torch.rand(n, 1, 4, 4, generator=torch.Generator().manual_seed(0)) * 2 - 1


def test_fitting_draws_are_keyed_by_sample_id_and_draw_whatever_the_batching():
    images, ids = _images(), [10, 11, 12, 13, 14]
    abar = build_scheduler().alphas_cumprod
    one = list(fitting_batches(images, ids, abar, draws=3, seed=7, batch_size=4))
    again = list(fitting_batches(images, ids, abar, draws=3, seed=7, batch_size=4))
    other_batching = list(fitting_batches(images, ids, abar, draws=3, seed=7, batch_size=15))
    assert [len(b[1]) for b in one] == [4, 4, 4, 3]
    for part in range(3):
        cat = torch.cat([b[part] for b in one])
        assert torch.equal(cat, torch.cat([b[part] for b in again]))
        assert torch.equal(cat, other_batching[0][part])
    x_t, t, eps = other_batching[0]
    # image-major items, x_t made by the forward process from the image and its draw
    rows = torch.arange(5).repeat_interleave(3)
    torch.testing.assert_close(x_t, add_noise(images[rows], eps, t, abar))
    # stratified: draw k of 3 lies in [k·T/3, (k+1)·T/3)
    strata = t.reshape(5, 3) // (1000 // 3 + 1)
    assert torch.equal(strata, torch.arange(3).expand(5, 3))
    # keyed by id: the same image under another position keeps its draws; another seed does not
    sub = next(fitting_batches(images[[3, 1]], [13, 11], abar, draws=3, seed=7, batch_size=6))
    torch.testing.assert_close(sub[2], eps.reshape(5, 3, 1, 4, 4)[[3, 1]].reshape(6, 1, 4, 4))
    other_seed = next(fitting_batches(images, ids, abar, draws=3, seed=8, batch_size=15))
    assert not torch.equal(other_seed[2], eps)


def test_fitting_draws_uniform_timesteps_and_refusals():
    images, abar = _images(), build_scheduler().alphas_cumprod
    (_, t, _), *_ = fitting_batches(images, range(5), abar, 40, 0, 200, timesteps="uniform")
    assert t.min() >= 0 and t.max() < 1000 and len(set(t.tolist())) > 30
    with pytest.raises(ValueError, match="choose one of"):
        next(fitting_batches(images, range(5), abar, 1, 0, timesteps="log"))
    with pytest.raises(ValueError, match="one id per image"):
        next(fitting_batches(images, range(4), abar, 1, 0))
    with pytest.raises(ValueError, match="draws must be a positive int"):
        next(fitting_batches(images, range(5), abar, 0, 0))
    with pytest.raises(ValueError, match="stratified draws"):
        next(fitting_batches(images, range(5), abar[:10], 11, 0))


def test_ekfac_fits_on_fitting_draws_and_a_rerun_is_identical():
    model = build_unet(unet_config("tiny", (1, 8, 8)), seed=0).eval()
    images = torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1
    abar = build_scheduler().alphas_cumprod
    batches = lambda: fitting_batches(images, [5, 6, 7], abar, 2, seed=3, batch_size=4)  # noqa: E731
    a = fit_kfac(model, batches, "empirical", "reduce")
    b = fit_kfac(model, batches, "empirical", "reduce")
    assert a.settings["n_samples"] == 6
    for name in a.G:
        assert torch.equal(a.corrections[name], b.corrections[name])


# ---- preconditioning at every scale ------------------------------------------------------------


class NormNet(nn.Module):
    """conv → GroupNorm → tanh → conv: a parameter K-FAC leaves out sits between its layers."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(2, 4, 3, padding=1)
        self.norm = nn.GroupNorm(2, 4)
        self.conv2 = nn.Conv2d(4, 2, 3, padding=1, bias=False)

    def forward(self, x, t):
        return self.conv2(torch.tanh(self.norm(self.conv1(x))))


def _fitted_normnet():
    torch.manual_seed(9)
    model, x = NormNet().double().eval(), torch.randn(4, 2, 4, 4, dtype=torch.float64)
    return model, fit_kfac(model, _batches(x), fisher="type2")


def test_precondition_is_the_layerwise_solve_with_zeros_outside_the_curvature():
    model, kfac = _fitted_normnet()
    dim = sum(p.numel() for p in model.parameters())
    q = torch.randn(3, dim, dtype=torch.float64)
    dampings = [0.05, 1.0, 30.0]
    out = precondition(kfac, model, q, dampings)
    assert out.shape == (3, 3, dim) and out.dtype == torch.float64
    offsets, start = {}, 0
    for name, p in model.named_parameters():
        offsets[name] = slice(start, start + p.numel())
        start += p.numel()
    for i, lam in enumerate(dampings):
        solved = kfac.solve(layer_blocks(q, model), lam)
        torch.testing.assert_close(layer_blocks(out[i], model)["conv1"], solved["conv1"])
        torch.testing.assert_close(layer_blocks(out[i], model)["conv2"], solved["conv2"])
        assert not out[i, :, offsets["norm.weight"]].any()
        assert not out[i, :, offsets["norm.bias"]].any()
    single = precondition(kfac, model, q.float(), 1.0)
    assert single.shape == (1, 3, dim) and single.dtype == torch.float32
    torch.testing.assert_close(single[0], out[1].float())


def test_precondition_then_identity_projection_equals_influence_on_full_gradients():
    model, kfac = _fitted_normnet()
    dim = sum(p.numel() for p in model.parameters())
    q, train = torch.randn(3, dim, dtype=torch.float64), torch.randn(6, dim, dtype=torch.float64)
    identity = make_projector("none", dim, None, seed=0)
    dampings = [0.1, 2.0]
    features = preconditioned_features(kfac, model, q, dampings, identity, chunk_size=2)
    scores = features @ identity.project(train).T  # [L, Q, N]
    for i, lam in enumerate(dampings):
        exact = influence(kfac, layer_blocks(q, model), layer_blocks(train, model), lam)
        torch.testing.assert_close(scores[i], exact, rtol=1e-10, atol=1e-12)


def test_precondition_then_random_projection_approximates_influence_within_jl_error():
    """Count sketch to k dims: ⟨Pu, Pv⟩ − ⟨u, v⟩ has standard deviation ≤ √(2/k)·‖u‖‖v‖;
    every one of the Q·N scores lies within 5 of those (a 1-in-10⁶ event per pair)."""
    model = build_unet(unet_config("tiny", (1, 8, 8)), seed=0).eval()
    gen = torch.Generator().manual_seed(2)
    x, t = torch.randn(4, 1, 8, 8, generator=gen), torch.tensor([5, 200, 600, 950])
    kfac = fit_kfac(model, lambda: [(x, t, None)], "mc", mc_samples=2)
    dim = sum(p.numel() for p in model.parameters())
    q, train = torch.randn(2, dim, generator=gen), torch.randn(4, dim, generator=gen)
    k = 4096
    projector = make_projector("sparse", dim, k, seed=1)
    dampings = [1e-3, 1e-1]
    features = preconditioned_features(kfac, model, q, dampings, projector)
    scores = features.double() @ projector.project(train).double().T
    full = precondition(kfac, model, q, dampings, dtype=torch.float64)
    for i, lam in enumerate(dampings):
        exact = influence(kfac, layer_blocks(q, model), layer_blocks(train, model), lam)
        torch.testing.assert_close(exact, full[i] @ train.double().T, rtol=1e-6, atol=0)
        bound = 5 * (2 / k) ** 0.5 * full[i].norm(dim=1)[:, None] * train.norm(dim=1)[None]
        err = (scores[i] - exact).abs()
        assert (err < bound).all(), (err / bound).max()
        assert (err > 0).any()  # the projection did something


def test_streamed_influence_equals_influence_on_full_gradients_for_every_damping():
    """Training gradients given in uneven, shuffled chunks; GroupNorm coordinates ignored."""
    model, kfac = _fitted_normnet()
    dim = sum(p.numel() for p in model.parameters())
    gen = torch.Generator().manual_seed(4)
    q = torch.randn(3, dim, dtype=torch.float64, generator=gen)
    train = torch.randn(7, dim, dtype=torch.float64, generator=gen)
    dampings = [1e-4, 0.3, 50.0]
    order = [np.array([5, 0, 2]), np.array([6]), np.array([1, 3, 4])]
    out = streamed_influence(kfac, model, q, [(r, train[r]) for r in order], 7, dampings)
    assert out.shape == (3, 3, 7) and out.dtype == torch.float64
    for i, lam in enumerate(dampings):
        exact = influence(kfac, layer_blocks(q, model), layer_blocks(train, model), lam)
        torch.testing.assert_close(out[i], exact, rtol=1e-5, atol=1e-6 * exact.abs().max())
    with pytest.raises(ValueError, match="never given"):
        streamed_influence(kfac, model, q, [(order[0], train[order[0]])], 7, dampings)
    with pytest.raises(ValueError, match="came twice"):
        streamed_influence(kfac, model, q, [(r, train[r]) for r in order + order[:1]], 7, 1.0)


@pytest.mark.parametrize("bad", ["0.1", float("inf"), float("nan"), 0.0, -1.0, True, None])
def test_damping_must_be_a_finite_positive_number(bad):
    model, kfac = _fitted_normnet()
    dim = sum(p.numel() for p in model.parameters())
    with pytest.raises(ValueError, match="damping"):
        precondition(kfac, model, torch.randn(1, dim, dtype=torch.float64), bad)
    with pytest.raises(ValueError, match="damping"):
        precondition(kfac, model, torch.randn(1, dim, dtype=torch.float64), [1.0, bad])
    with pytest.raises(ValueError, match="damping"):
        kfac.solve(layer_blocks(torch.randn(1, dim, dtype=torch.float64), model), bad)


def test_dampings_accept_numbers_arrays_and_tensors():
    import numpy as np

    assert check_dampings(0.5) == [0.5]
    assert check_dampings(np.array([1, 2.5])) == [1.0, 2.5]
    assert check_dampings(torch.tensor([0.1])) == [pytest.approx(0.1)]
    assert check_dampings(torch.tensor(3.0)) == [3.0]
    with pytest.raises(ValueError, match="at least one damping"):
        check_dampings([])
    with pytest.raises(ValueError, match="1-D"):
        check_dampings(np.ones((2, 2)))


def test_precondition_refuses_another_model_or_wrong_shapes():
    model, kfac = _fitted_normnet()
    dim = sum(p.numel() for p in model.parameters())
    with pytest.raises(ValueError, match="parameters"):
        precondition(kfac, model, torch.randn(2, dim + 1), 1.0)
    with pytest.raises(ValueError, match=r"\[Q, D\]"):
        precondition(kfac, model, torch.randn(dim), 1.0)
    with pytest.raises(ValueError, match="differ from those K-FAC was fitted on"):
        other = ConvNet(2)
        precondition(kfac, other, torch.randn(1, sum(p.numel() for p in other.parameters())), 1.0)
    with pytest.raises(ValueError, match="projector takes"):
        preconditioned_features(
            kfac, model, torch.randn(1, dim), 1.0, make_projector("none", 5, None, 0)
        )
