"""K-FAC and EK-FAC approximations of the generalised Gauss-Newton of the diffusion loss
([KFAC-IF]), over every `Linear` and `Conv2d` layer (GroupNorm excluded, as in the paper).

For L(θ) = (1/N) Σ_n ℓ_n with ℓ_n = mean((ε − ε_θ(x_t, t))²) over its D outputs, the GGN is
(1/N) Σ_n J_nᵀ (2/D · I) J_n. Write a layer's weights with its bias as the last column,
W ∈ R^{dout × din}; its GGN block is approximated by a Kronecker product acting as V ↦ G V A
(row-major: G ⊗ A), with A from the layer inputs a and G from output gradients g obtained by
backpropagating vectors v through ε_θ:

- fisher "type2": v = √(2/D) e_d for every output d — the exact expectation (D backward passes);
- fisher "mc":    v = √(2/D) z, z ~ N(0, I), `mc_samples` times — GGN^model with sampled targets,
                  independent of ε (the paper's recommended one);
- fisher "empirical": v = ∂ℓ/∂ε_θ — GGN^loss, the empirical Fisher.

Weight sharing (conv positions, attention tokens), following Eschenhagen et al. (2023):
"expand" A = Σ_{n,l} a aᵀ / (N L), G = Σ_{n,l} g gᵀ / N (positions as extra examples); "reduce"
A = Σ_n ā ā ᵀ / N with ā the mean over positions, G = Σ_n g̃ g̃ᵀ / N with g̃ the sum.

EK-FAC keeps K-FAC's eigenbases Q_G, Q_A and replaces the eigenvalue products by the exact
second moments of the per-sample pseudo-gradients Σ_l g_l a_lᵀ in that basis.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from diffattr.diffusion.task import FISHER_TYPES, ggn_backprop_vectors, output_hessian_scale
from diffattr.gradients.layerwise import conv_patches, plain_conv2d, stock_layer_type

APPROXIMATIONS = ("expand", "reduce")


def curvature_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The model's Linear and Conv2d layers by name (stock forward, groups = 1, zero padding)."""
    layers = {}
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear | nn.Conv2d):
            continue
        kind = stock_layer_type(module)
        if kind is None:
            raise ValueError(
                f"{name}: {type(module).__name__} overrides forward; K-FAC's factors assume the "
                "stock Linear / Conv2d computation"
            )
        if kind is nn.Conv2d and not plain_conv2d(module):
            raise ValueError(f"{name}: K-FAC supports Conv2d with groups=1 and zero padding")
        layers[name] = module
    if not layers:
        raise ValueError("the model has no Linear or Conv2d layer to approximate")
    return layers


def layer_inputs(module: nn.Module, a: torch.Tensor) -> torch.Tensor:
    """[N, L, din]: the inputs each output position of the layer sees, with a ones column for
    the bias (L = tokens of a Linear, output pixels of a Conv2d)."""
    if isinstance(module, nn.Conv2d):
        x = conv_patches(module, a).transpose(1, 2)
    else:
        x = a.reshape(a.shape[0], -1, a.shape[-1])
    if module.bias is not None:
        x = torch.cat([x, x.new_ones(*x.shape[:2], 1)], dim=2)
    return x


def layer_output_grads(module: nn.Module, g: torch.Tensor) -> torch.Tensor:
    """[N, L, dout]: gradients at the layer's output positions."""
    if isinstance(module, nn.Conv2d):
        return g.flatten(2).transpose(1, 2)
    return g.reshape(g.shape[0], -1, g.shape[-1])


def weight_matrix(module: nn.Module) -> torch.Tensor:
    """The layer's parameters as W [dout, din] (bias as the last column)."""
    w = module.weight.reshape(module.weight.shape[0], -1)
    return torch.cat([w, module.bias[:, None]], dim=1) if module.bias is not None else w


@dataclass
class KFAC:
    """Kronecker factors per layer: A [din, din], G [dout, dout]; optional EK-FAC second moments
    `corrections` [dout, din] in the eigenbasis. `solve` applies (K + λI)⁻¹."""

    A: dict[str, torch.Tensor]
    G: dict[str, torch.Tensor]
    settings: dict
    corrections: dict[str, torch.Tensor] | None = None
    _eig: dict[str, tuple] = field(default_factory=dict, repr=False)

    def eigenbasis(
        self, name: str
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(eigenvalues of G, Q_G, eigenvalues of A, Q_A) of one layer, cached."""
        if name not in self._eig:
            g_val, g_vec = torch.linalg.eigh(self.G[name])
            a_val, a_vec = torch.linalg.eigh(self.A[name])
            self._eig[name] = (g_val.clamp_min(0), g_vec, a_val.clamp_min(0), a_vec)
        return self._eig[name]

    def eigenvalues(self, name: str) -> torch.Tensor:
        """[dout, din] curvature in the eigenbasis: EK-FAC's corrections, else λ_G λ_Aᵀ."""
        if self.corrections is not None:
            return self.corrections[name]
        g_val, _, a_val, _ = self.eigenbasis(name)
        return g_val[:, None] * a_val[None, :]

    def solve(self, vectors: dict[str, torch.Tensor], damping: float) -> dict[str, torch.Tensor]:
        """(K + λI)⁻¹ V per layer; V: [..., dout, din] (leading batch dims allowed)."""
        if not damping > 0:
            raise ValueError(f"damping must be > 0, got {damping}")
        out = {}
        for name, v in vectors.items():
            _, q_g, _, q_a = self.eigenbasis(name)
            rotated = q_g.T @ v.to(q_g) @ q_a
            out[name] = q_g @ (rotated / (self.eigenvalues(name) + damping)) @ q_a.T
        return out

    def dense(self, name: str) -> torch.Tensor:
        """The layer's [dout·din, dout·din] matrix in row-major vec(W) (for tests, tiny models)."""
        _, q_g, _, q_a = self.eigenbasis(name)
        basis = torch.kron(q_g, q_a)
        return basis @ torch.diag(self.eigenvalues(name).reshape(-1)) @ basis.T


Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # x_t [N, C, H, W], t [N], eps [N, ...]


def _vector_count(fisher: str, d: int, mc_samples: int) -> int:
    return d if fisher == "type2" else mc_samples if fisher == "mc" else 1


def _fingerprint(x_t: torch.Tensor, eps: torch.Tensor | None) -> tuple:
    """A cheap identity of a batch, to check that EK-FAC's second pass sees the same data."""
    parts = [tuple(x_t.shape), float(x_t.double().sum()), float(x_t.double().square().sum())]
    if eps is not None:
        parts += [float(eps.double().sum()), float(eps.double().square().sum())]
    return tuple(parts)


def _layer_passes(
    model: nn.Module,
    layers: dict[str, nn.Module],
    batches: Iterable[Batch],
    fisher: str,
    mc_samples: int,
    seed: int,
    loss_kind: str,
) -> Iterator[tuple[tuple, dict[str, torch.Tensor], Iterator[dict[str, torch.Tensor]]]]:
    """Per batch: (fingerprint, layer inputs {name: [N, L, din]}, output grads per vector
    {name: [N, L, dout]}, zeros for a layer the vector does not reach)."""
    gen = torch.Generator().manual_seed(seed)
    for x_t, t, eps in batches:
        recorded: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

        def hook(name, recorded=recorded):
            def record(module, args, output):
                if name in recorded:
                    raise ValueError(f"layer {name} ran twice in one forward; K-FAC needs one call")
                recorded[name] = (args[0].detach(), output)

            return record

        handles = [m.register_forward_hook(hook(n)) for n, m in layers.items()]
        try:
            with torch.enable_grad():
                out = model(x_t, t)
                eps_pred = getattr(out, "sample", out).flatten(1)  # diffusers output or tensor
        finally:
            for h in handles:
                h.remove()
        skipped = [n for n in layers if n not in recorded]
        if skipped:
            raise ValueError(
                f"layers {skipped[:5]} did not run in the forward pass: K-FAC would leave them "
                "out of the curvature"
            )
        names = list(layers)
        inputs = {n: layer_inputs(layers[n], recorded[n][0]) for n in names}
        outputs = [recorded[n][1] for n in names]
        count = _vector_count(fisher, eps_pred.shape[1], mc_samples)

        def grads(eps_pred=eps_pred, eps=eps, outputs=outputs, count=count, names=names):
            vectors = ggn_backprop_vectors(eps_pred, eps, loss_kind, fisher, mc_samples, gen)
            for i, v in enumerate(vectors):
                g = torch.autograd.grad(
                    eps_pred, outputs, v, retain_graph=i < count - 1, allow_unused=True
                )
                yield {
                    n: layer_output_grads(layers[n], torch.zeros_like(y) if gi is None else gi)
                    for n, y, gi in zip(names, outputs, g, strict=True)
                }

        yield _fingerprint(x_t, eps), inputs, grads()


def fit_kfac(
    model: nn.Module,
    batches: Callable[[], Iterable[Batch]],
    fisher: str = "mc",
    approx: str = "expand",
    mc_samples: int = 1,
    eigen_correction: bool = True,
    seed: int = 0,
    loss_kind: str = "l2",
) -> KFAC:
    """K-FAC (and, with eigen_correction, EK-FAC) factors of an ε-prediction UNet's GGN.

    model: in eval mode (no dropout: both EK-FAC passes must see the same function); frozen
    parameters are fine. batches: a callable returning an iterable of (x_t [N, C, H, W], t [N],
    ε [N, C, H, W] or None for type2 / mc) — called twice for EK-FAC (factors, then corrections
    in their eigenbasis), and it must yield the same batches each time (checked). Factors are
    float64. The corrections use each sample's exact pseudo-gradient Σ_l g_l a_lᵀ, for both
    weight-sharing approximations. loss_kind: the run's loss; "l1" is refused (its GGN is zero,
    `diffusion.task.output_hessian_scale`).
    """
    output_hessian_scale(loss_kind, 1)  # refuses l1 before any work
    if fisher not in FISHER_TYPES:
        raise ValueError(f"unknown fisher type {fisher!r}; choose one of {list(FISHER_TYPES)}")
    if approx not in APPROXIMATIONS:
        raise ValueError(f"unknown approximation {approx!r}; choose one of {list(APPROXIMATIONS)}")
    if model.training:
        raise ValueError("put the model in eval mode (model.eval()) before fitting K-FAC")
    layers = curvature_layers(model)
    flags = [p.requires_grad for p in model.parameters()]
    model.requires_grad_(True)  # output gradients need a graph, even through frozen weights
    try:
        a_sum: dict[str, torch.Tensor] = {}
        g_sum: dict[str, torch.Tensor] = {}
        fingerprints, count = [], 0
        for fingerprint, inputs, grads in _layer_passes(
            model, layers, batches(), fisher, mc_samples, seed, loss_kind
        ):
            fingerprints.append(fingerprint)
            n = next(iter(inputs.values())).shape[0]
            for name, x in inputs.items():
                x = x.double()
                if approx == "expand":
                    term = torch.einsum("nli,nlj->ij", x, x) / x.shape[1]
                else:
                    mean = x.mean(1)
                    term = mean.T @ mean
                a_sum[name] = a_sum.get(name, 0) + term
            for per_vector in grads:
                for name, g in per_vector.items():
                    g = g.double()
                    if approx == "expand":
                        term = torch.einsum("nli,nlj->ij", g, g)
                    else:
                        total = g.sum(1)
                        term = total.T @ total
                    g_sum[name] = g_sum.get(name, 0) + term
            count += n
        if not count:
            raise ValueError("no batches to fit K-FAC on")
        kfac = KFAC(
            A={k: v / count for k, v in a_sum.items()},
            G={k: v / count for k, v in g_sum.items()},
            settings={
                "fisher": fisher,
                "approx": approx,
                "mc_samples": mc_samples if fisher == "mc" else None,
                "seed": seed,
                "layers": list(layers),
                "n_samples": count,
                "eigen_correction": eigen_correction,
                "loss": loss_kind,
            },
        )
        if eigen_correction:
            kfac.corrections = _eigen_corrections(
                kfac, model, layers, batches, fisher, mc_samples, seed, loss_kind, fingerprints
            )
    finally:
        for p, flag in zip(model.parameters(), flags, strict=True):
            p.requires_grad_(flag)
    return kfac


def _eigen_corrections(
    kfac, model, layers, batches, fisher, mc_samples, seed, loss_kind, fingerprints
):
    """E[(Q_Gᵀ (Σ_l g_l a_lᵀ) Q_A)²] over samples and backprop vectors: [dout, din] per layer."""
    sums: dict[str, torch.Tensor] = {}
    count = 0
    passes = _layer_passes(model, layers, batches(), fisher, mc_samples, seed, loss_kind)
    for i, (fingerprint, inputs, grads) in enumerate(passes):
        if i >= len(fingerprints) or fingerprint != fingerprints[i]:
            raise ValueError(
                "batches() yielded other data on EK-FAC's second pass; make it deterministic "
                "(seeded t and ε, the same order)"
            )
        n = next(iter(inputs.values())).shape[0]
        for per_vector in grads:
            for name, g in per_vector.items():
                _, q_g, _, q_a = kfac.eigenbasis(name)
                pseudo = torch.einsum("nlo,nli->noi", g.double(), inputs[name].double())
                sums[name] = sums.get(name, 0) + (q_g.T @ pseudo @ q_a).pow(2).sum(0)
        count += n
    if count != kfac.settings["n_samples"]:
        raise ValueError("batches() yielded fewer samples on EK-FAC's second pass")
    return {k: v / count for k, v in sums.items()}


def layer_blocks(flat: torch.Tensor, model: nn.Module) -> dict[str, torch.Tensor]:
    """Split flattened per-sample gradients [B, dim] (named_parameters order, as
    `PerSampleGradients` returns them) into each curvature layer's W layout [B, dout, din];
    parameters of other layers (GroupNorm) are dropped."""
    offsets, start = {}, 0
    for name, p in model.named_parameters():
        offsets[name] = (start, start + p.numel())
        start += p.numel()
    if flat.shape[-1] != start:
        raise ValueError(f"gradients have {flat.shape[-1]} columns, the model {start} parameters")
    blocks = {}
    for name, layer in curvature_layers(model).items():
        lo, hi = offsets[f"{name}.weight"]
        parts = [flat[:, lo:hi].reshape(len(flat), layer.weight.shape[0], -1)]
        if layer.bias is not None:
            lo, hi = offsets[f"{name}.bias"]
            parts.append(flat[:, lo:hi, None])
        blocks[name] = torch.cat(parts, dim=2)
    return blocks


def influence(
    kfac: KFAC,
    query_grads: dict[str, torch.Tensor],
    train_grads: dict[str, torch.Tensor],
    damping: float,
) -> torch.Tensor:
    """IF(j, q) = ∇m(q)ᵀ (K + λI)⁻¹ ∇ℓ(x_j) summed over layers: query_grads [Q, dout, din],
    train_grads [N, dout, din] per layer (pass the training set in chunks: these are full
    per-sample gradients). Returns [Q, N] float64 (> 0: proponent)."""
    missing = (set(kfac.G) - set(query_grads)) | (set(kfac.G) - set(train_grads))
    if missing:
        raise ValueError(f"gradients missing for layers {sorted(missing)[:5]}")
    preconditioned = kfac.solve({n: query_grads[n] for n in kfac.G}, damping)
    return sum(
        torch.einsum("qoi,noi->qn", preconditioned[n], train_grads[n].double()) for n in kfac.G
    )
