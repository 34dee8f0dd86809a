"""Per-sample gradients from one batched backward, layer by layer (the BackPACK / Opacus idea).

For a layer y = W a + b applied to every row n of a batch, the gradient of Σ_n f_n is
Σ_n (∂f_n/∂y_n) a_nᵀ, and row n's own term is its per-sample gradient. So one forward pass that
records each layer's input a_n and one backward pass to the layer outputs (∂f/∂y_n, no weight
gradients) give every per-sample weight gradient by a batched matrix product:

- `Linear`:    ∂W_n = Σ_tokens g_n a_nᵀ, ∂b_n = Σ_tokens g_n;
- `Conv2d`:    ∂W_n[o, c, i, j] = Σ_pixels g_n[o, p] a_n[c, p + offset(i, j)], one bmm per kernel
  offset over a flattened, padded input (no im2col copy), ∂b_n = Σ_pixels g_n;
- `GroupNorm`: ∂γ_n = Σ_pixels g_n â_n with â_n the normalised input, ∂β_n = Σ_pixels g_n.

It needs rows that do not interact (no batch statistics, eval mode) and layers whose forward is
exactly the stock `torch.nn` one; `unsupported_modules` names those that are not, and the
`vmap` engine covers any model. On a diffusers `UNet2DModel` every parameter lives in one of
the three layer kinds.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

SUPPORTED = (nn.Linear, nn.Conv2d, nn.GroupNorm)


def stock_layer_type(module: nn.Module) -> type[nn.Module] | None:
    """The `torch.nn` class among SUPPORTED whose unmodified forward `module` runs, else None
    (also for a subclass that overrides forward)."""
    kind = next((k for k in SUPPORTED if type(module).forward is k.forward), None)
    return kind if kind is not None and isinstance(module, kind) else None


def plain_conv2d(conv: nn.Conv2d) -> bool:
    """groups = 1 and numeric zero padding: the convolutions the per-layer rules cover."""
    return conv.groups == 1 and conv.padding_mode == "zeros" and not isinstance(conv.padding, str)


def unsupported_modules(model: nn.Module) -> list[str]:
    """Names (with reasons) of modules that own parameters the layerwise engine cannot handle."""
    problems = []
    for name, module in model.named_modules():
        if not any(True for _ in module.parameters(recurse=False)):
            continue
        kind = stock_layer_type(module)
        names = {n for n, _ in module.named_parameters(recurse=False)}
        if kind is None:
            problems.append(f"{name or '<root>'} ({type(module).__name__})")
        elif not names <= {"weight", "bias"}:
            problems.append(f"{name} ({type(module).__name__} with parameters {sorted(names)})")
        elif kind is nn.Conv2d and not plain_conv2d(module):
            problems.append(f"{name} (Conv2d with groups, padding mode or string padding)")
    return problems


class Workspace:
    """Scratch tensors reused across layers and calls: on the CPU, fresh multi-megabyte
    temporaries for every layer cost page faults on each call."""

    def __init__(self) -> None:
        self._buffers: dict[str, torch.Tensor] = {}

    def get(self, name: str, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        """An uninitialised tensor of `shape` with `like`'s dtype and device."""
        numel = math.prod(shape)
        buf = self._buffers.get(name)
        if (
            buf is None
            or buf.numel() < numel
            or buf.device != like.device
            or buf.dtype != like.dtype
        ):
            buf = self._buffers[name] = torch.empty(numel, dtype=like.dtype, device=like.device)
        return buf[:numel].view(shape)


def _fresh(name: str, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
    return torch.empty(shape, dtype=like.dtype, device=like.device)


class LayerwiseGradients:
    """Per-row-group gradients of Σ_rows value(model output) for a model of supported layers.

    model: used as is (keep it in eval mode, parameters requiring grad). Rows come in groups of
    `group` consecutive rows (the noise draws of one item); each group's gradient is the sum of
    its rows'. Output columns follow `named_parameters` order.
    """

    def __init__(self, model: nn.Module):
        problems = unsupported_modules(model)
        if problems:
            raise ValueError(
                "the layerwise gradient engine supports only stock Linear, Conv2d (groups=1, "
                f"zero padding) and GroupNorm layers; unsupported: {', '.join(problems)}. "
                "Use engine 'vmap' for this model."
            )
        offsets, start = {}, 0
        for p in model.parameters():  # deduplicated, in named_parameters order
            offsets[id(p)] = (start, start + p.numel())
            start += p.numel()
        self.model = model
        self.dim = start
        self.workspace = Workspace()
        self.layers = [
            (m, {attr: slice(*offsets[id(p)]) for attr, p in m.named_parameters(recurse=False)})
            for m in model.modules()
            if any(True for _ in m.parameters(recurse=False))
        ]

    def __call__(self, total_value: Callable[[], torch.Tensor], group: int, out: torch.Tensor):
        """Fill out [rows / group, dim] with per-group gradients of the scalar `total_value()`,
        which runs the model on all rows and returns Σ over rows of their values."""
        calls: list[tuple[nn.Module, torch.Tensor, torch.Tensor, int, int]] = []

        def record(module, args, output):
            if not args or not isinstance(args[0], torch.Tensor):
                raise ValueError(f"{type(module).__name__} was called without a tensor input")
            a = args[0].detach()
            calls.append((module, a, output, a._version, output._version))

        handles = [m.register_forward_hook(record) for m, _ in self.layers]
        try:
            with torch.enable_grad():
                total = total_value()
                outputs = [c[2] for c in calls]
                grads = torch.autograd.grad(total, outputs, allow_unused=True)
        finally:
            for h in handles:
                h.remove()
        for module, a, y, a_version, y_version in calls:
            if a._version != a_version or y._version != y_version:
                raise RuntimeError(
                    f"a {type(module).__name__} layer's input or output was modified in place "
                    "after the layer ran, so its recorded activations are stale; use engine 'vmap'"
                )
        slices = {id(m): s for m, s in self.layers}
        written: set[tuple[int, int]] = set()
        rows = out.shape[0] * group
        if out.shape[1] != self.dim:
            raise ValueError(f"out has {out.shape[1]} columns, expected {self.dim}")
        for (module, a, _, _, _), g in zip(calls, grads, strict=True):
            if g is None:
                continue
            if a.shape[0] != rows:
                raise ValueError(
                    f"a {type(module).__name__} layer ran on {a.shape[0]} rows, expected {rows} "
                    f"({out.shape[0]} items × {group} draws): rows must pass through every "
                    "layer one for one; use engine 'vmap' for this model"
                )
            parts = layer_gradients(module, a, g, group, self.workspace)
            for attr, value in parts.items():
                sl = slices[id(module)][attr]
                target = out[:, sl].view_as(value)
                if (sl.start, sl.stop) in written:
                    target.add_(value)
                else:
                    target.copy_(value)
                    written.add((sl.start, sl.stop))
        for _, attrs in self.layers:
            for sl in attrs.values():
                if (sl.start, sl.stop) not in written:
                    out[:, sl].zero_()  # a parameter the value does not depend on


def layer_gradients(
    module: nn.Module,
    a: torch.Tensor,
    g: torch.Tensor,
    group: int = 1,
    workspace: Workspace | None = None,
) -> dict[str, torch.Tensor]:
    """Per-group gradients of one layer's parameters.

    a: the layer's input [N, ...]; g: ∂(Σ values)/∂output [N, ...]; N = groups × `group`.
    Returns {parameter name: [N / group, *parameter shape] or a layout viewable as
    [N / group, parameter numel]}; with a `workspace`, results may live in its buffers and are
    valid until the next call that uses it.
    """
    if isinstance(module, nn.Linear):
        return linear_gradients(a, g, group, module.bias is not None)
    if isinstance(module, nn.Conv2d):
        return conv2d_gradients(module, a, g, group, workspace)
    if isinstance(module, nn.GroupNorm):
        return group_norm_gradients(module, a, g, group)
    raise TypeError(f"no per-sample gradient rule for {type(module).__name__}")


def _sum_groups(x: torch.Tensor, group: int) -> torch.Tensor:
    """[N, ...] → [N / group, ...], summing consecutive rows."""
    return x if group == 1 else x.view(-1, group, *x.shape[1:]).sum(1)


def linear_gradients(
    a: torch.Tensor, g: torch.Tensor, group: int, bias: bool
) -> dict[str, torch.Tensor]:
    """a [N, *, in], g [N, *, out] → weight [N / group, out, in], bias [N / group, out]."""
    groups = a.shape[0] // group
    a2 = a.reshape(groups, -1, a.shape[-1])  # the group's rows and tokens in one axis (a view)
    g2 = g.reshape(groups, -1, g.shape[-1])
    parts = {"weight": torch.bmm(g2.transpose(1, 2), a2)}
    if bias:
        parts["bias"] = g2.sum(1)
    return parts


def conv2d_gradients(
    conv: nn.Conv2d,
    a: torch.Tensor,
    g: torch.Tensor,
    group: int,
    workspace: Workspace | None = None,
) -> dict[str, torch.Tensor]:
    """a [N, C, H, W], g [N, O, Ho, Wo] → weight [N / group, O, C, kh·kw] (viewable as the
    weight's [O, C, kh, kw]), bias [N / group, O]."""
    if conv.stride == (1, 1) and conv.kernel_size != (1, 1):
        scratch = workspace.get if workspace else _fresh
        weight = _conv_weight_by_offsets(conv, a, g, group, scratch)
    else:
        patches = conv_patches(conv, a)  # [N, C·kh·kw, Ho·Wo]
        weight = torch.bmm(g.flatten(2), patches.transpose(1, 2))
        weight = _sum_groups(weight.view(*weight.shape[:2], conv.in_channels, -1), group)
    parts = {"weight": weight}
    if conv.bias is not None:
        parts["bias"] = _sum_groups(g.flatten(2).sum(2), group)
    return parts


def _conv_weight_by_offsets(
    conv: nn.Conv2d, a: torch.Tensor, g: torch.Tensor, group: int = 1, scratch: Callable = _fresh
) -> torch.Tensor:
    """Stride-1 conv weight gradients summed over groups of `group` batch rows,
    [N / group, O, C, kh·kw], without an im2col copy.

    A group's input images are stacked vertically, each R = max(H + ph, Ho) pixel rows below the
    previous one (neighbours share their zero padding), and flattened row-major with row length
    Wp; the output gradients are laid out the same way, zero outside each image's Ho × Wo
    pixels. For kernel offset (i, j) the inputs that every output pixel of the group reads are
    then one contiguous window of the flat input, starting at i·dh·Wp + j·dw, and the offset's
    gradient, summed over the group, is one bmm of the flat output gradient with that window.
    """
    kh, kw = conv.kernel_size
    dh, dw = conv.dilation
    ph, pw = conv.padding
    n, channels, height, width = a.shape
    out_channels, ho, wo = g.shape[1:]
    groups = n // group
    wp = width + 2 * pw
    slot = max(height + ph, ho)  # pixel rows per image in the stacked layout
    length = group * slot * wp  # the bmm's inner dimension
    # ph top padding rows, the stacked images, then enough zeros for the last window to fit
    total = (ph + group * slot + (kh - 1) * dh + 1) * wp
    flat_a = scratch("conv_a", (groups, channels, total), a)
    flat_a.zero_()
    stacked_a = flat_a[:, :, ph * wp : (ph + group * slot) * wp].view(
        groups, channels, group, slot, wp
    )
    stacked_a[..., :height, pw : pw + width] = a.unflatten(0, (groups, group)).transpose(1, 2)
    flat_g = scratch("conv_g", (groups, out_channels, length), g)
    flat_g.zero_()
    stacked_g = flat_g.view(groups, out_channels, group, slot, wp)
    stacked_g[..., :ho, :wo] = g.unflatten(0, (groups, group)).transpose(1, 2)
    per_offset = scratch("conv_w", (kh * kw, groups, out_channels, channels), a)
    for i in range(kh):
        for j in range(kw):
            start = i * dh * wp + j * dw
            window = flat_a[:, :, start : start + length]
            torch.bmm(flat_g, window.transpose(1, 2), out=per_offset[i * kw + j])
    return per_offset.permute(1, 2, 3, 0)


def conv_patches(conv: nn.Conv2d, a: torch.Tensor) -> torch.Tensor:
    """The conv's input patches [N, C·kh·kw, Ho·Wo] via a strided view (faster than F.unfold)."""
    view = conv_patch_view(conv, a)
    n, c, kh, kw, ho, wo = view.shape
    return view.reshape(n, c * kh * kw, ho * wo)


def conv_patch_view(conv: nn.Conv2d, a: torch.Tensor) -> torch.Tensor:
    """[N, C, kh, kw, Ho, Wo]: a strided view of the (padded) input, [n, c, i, j, y, x] the
    input pixel that kernel offset (i, j) of output pixel (y, x) reads; no copy beyond padding."""
    kh, kw = conv.kernel_size
    sh, sw = conv.stride
    dh, dw = conv.dilation
    ph, pw = conv.padding
    padded = F.pad(a, (pw, pw, ph, ph)) if ph or pw else a
    n, c, h, w = padded.shape
    ho, wo = (h - dh * (kh - 1) - 1) // sh + 1, (w - dw * (kw - 1) - 1) // sw + 1
    s_n, s_c, s_h, s_w = padded.stride()
    return padded.as_strided(
        (n, c, kh, kw, ho, wo), (s_n, s_c, s_h * dh, s_w * dw, s_h * sh, s_w * sw)
    )


def group_norm_gradients(
    norm: nn.GroupNorm, a: torch.Tensor, g: torch.Tensor, group: int
) -> dict[str, torch.Tensor]:
    """a, g [N, C, *] → weight and bias [N / group, C]."""
    n, channels = a.shape[:2]
    normalised = F.group_norm(a, norm.num_groups, eps=norm.eps)
    weight = (g * normalised).reshape(n, channels, -1).sum(2)
    return {
        "weight": _sum_groups(weight, group),
        "bias": _sum_groups(g.reshape(n, channels, -1).sum(2), group),
    }
