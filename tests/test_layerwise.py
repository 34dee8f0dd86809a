"""Layerwise per-sample gradients: each layer rule and the hooked backward equal autograd."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from diffattr.gradients.engines import resolve_engine
from diffattr.gradients.layerwise import LayerwiseGradients, layer_gradients, unsupported_modules


def _loop_reference(module: nn.Module, a: torch.Tensor, r: torch.Tensor, group: int):
    """Per-group gradients of Σ_rows ⟨module(a_n), r_n⟩ by one autograd call per row."""
    params = dict(module.named_parameters())
    rows = []
    for n in range(a.shape[0]):
        value = (module(a[n : n + 1]) * r[n : n + 1]).sum()
        rows.append(
            dict(zip(params, torch.autograd.grad(value, list(params.values())), strict=True))
        )
    groups = a.shape[0] // group
    return {
        k: torch.stack([sum(rows[i * group + s][k] for s in range(group)) for i in range(groups)])
        for k in params
    }


CONVS = {
    "3x3 pad 1": dict(in_channels=3, out_channels=4, kernel_size=3, padding=1),
    "3x3 stride 2": dict(in_channels=3, out_channels=4, kernel_size=3, stride=2, padding=1),
    "1x1": dict(in_channels=3, out_channels=5, kernel_size=1),
    "3x3 dilation 2": dict(in_channels=2, out_channels=3, kernel_size=3, padding=2, dilation=2),
    "3x5 no bias": dict(
        in_channels=2, out_channels=3, kernel_size=(3, 5), padding=(1, 2), bias=False
    ),
    "3x3 no padding": dict(in_channels=2, out_channels=3, kernel_size=3),
    "2x2 stride 2": dict(in_channels=2, out_channels=3, kernel_size=2, stride=2),
}


@pytest.mark.parametrize("group", [1, 2, 3])
@pytest.mark.parametrize("name", list(CONVS))
def test_conv2d_rule_matches_an_autograd_loop(name, group):
    torch.manual_seed(0)
    conv = nn.Conv2d(**CONVS[name])
    a = torch.randn(6, conv.in_channels, 7, 9)
    r = torch.randn_like(conv(a))
    parts = layer_gradients(conv, a, r, group)
    expected = _loop_reference(conv, a, r, group)
    assert set(parts) == set(expected)
    for k, want in expected.items():
        torch.testing.assert_close(parts[k].reshape(want.shape), want, rtol=1e-4, atol=1e-5)


def test_conv2d_rule_takes_a_strided_input_and_reuses_its_workspace():
    """A channels-last input (a permuted view) and a second call of another shape through the
    same workspace give the loop's gradients."""
    from diffattr.gradients.layerwise import Workspace

    torch.manual_seed(4)
    conv = nn.Conv2d(3, 4, 3, padding=1)
    workspace = Workspace()
    for n, group, size in ((6, 3, 7), (4, 2, 5)):
        a = torch.randn(n, size, size, 3).permute(0, 3, 1, 2)  # non-contiguous [N, C, H, W]
        r = torch.randn_like(conv(a))
        parts = layer_gradients(conv, a, r, group, workspace)
        for k, want in _loop_reference(conv, a, r, group).items():
            torch.testing.assert_close(parts[k].reshape(want.shape), want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("group", [1, 3])
@pytest.mark.parametrize("shape", [(6, 5), (6, 4, 5)], ids=["vectors", "tokens"])
def test_linear_rule_matches_an_autograd_loop(shape, group):
    torch.manual_seed(1)
    lin = nn.Linear(5, 3)
    a = torch.randn(*shape)
    r = torch.randn_like(lin(a))
    parts = layer_gradients(lin, a, r, group)
    for k, want in _loop_reference(lin, a, r, group).items():
        torch.testing.assert_close(parts[k].reshape(want.shape), want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "shape", [(4, 6, 5, 5), (4, 6, 7), (4, 6)], ids=["image", "sequence", "vector"]
)
def test_group_norm_rule_matches_an_autograd_loop(shape):
    torch.manual_seed(2)
    norm = nn.GroupNorm(3, 6)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.normal_()
    a = torch.randn(*shape) * 3 + 1
    r = torch.randn(*shape)
    parts = layer_gradients(norm, a, r, 2)
    for k, want in _loop_reference(norm, a, r, 2).items():
        torch.testing.assert_close(parts[k].reshape(want.shape), want, rtol=1e-4, atol=1e-5)


class _Net(nn.Module):
    """Conv → GroupNorm → SiLU → shared Linear applied twice, plus a Linear never called."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.norm = nn.GroupNorm(2, 4)
        self.shared = nn.Linear(4, 4)
        self.unused = nn.Linear(4, 4)

    def forward(self, x):
        h = torch.nn.functional.silu(self.norm(self.conv(x)))  # [N, 4, H, W]
        tokens = h.flatten(2).transpose(1, 2)  # [N, HW, 4]
        return self.shared(torch.tanh(self.shared(tokens)))


def test_hooked_backward_matches_a_loop_with_shared_and_unused_layers():
    torch.manual_seed(3)
    net = _Net()
    x = torch.randn(6, 2, 5, 5)
    target = torch.randn(6, 25, 4)
    engine = LayerwiseGradients(net)
    out = torch.full((3, engine.dim), float("nan"))  # stale values must all be overwritten
    engine(lambda: ((net(x) - target) ** 2).sum(), group=2, out=out)
    params = list(net.parameters())
    rows = []
    for i in range(3):
        value = ((net(x[2 * i : 2 * i + 2]) - target[2 * i : 2 * i + 2]) ** 2).sum()
        grads = torch.autograd.grad(value, params, allow_unused=True)
        rows.append(
            torch.cat(
                [
                    (torch.zeros_like(p) if g is None else g).flatten()
                    for p, g in zip(params, grads, strict=True)
                ]
            )
        )
    torch.testing.assert_close(out, torch.stack(rows), rtol=1e-4, atol=1e-5)
    assert not out[:, -20:].any()  # the unused layer's 16 + 4 parameters


def test_in_place_change_of_a_recorded_output_is_refused():
    class InPlace(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 3)

        def forward(self, x):
            y = self.lin(x)
            y.mul_(2.0)
            return y

    net = InPlace()
    engine = LayerwiseGradients(net)
    with pytest.raises(RuntimeError, match="modified in place"):
        engine(lambda: net(torch.randn(4, 3)).sum(), group=1, out=torch.empty(4, engine.dim))


def test_unsupported_layers_are_named_and_auto_falls_back_to_vmap():
    class Scaled(nn.Linear):
        def forward(self, x):
            return 2 * super().forward(x)

    class Free(nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.ones(3))

    model = nn.Sequential(
        nn.Conv2d(4, 4, 3, groups=2), nn.BatchNorm2d(4), Scaled(3, 3), Free(), nn.Linear(3, 3)
    )
    problems = unsupported_modules(model)
    assert [p.split(" ")[0] for p in problems] == ["0", "1", "2", "3"]
    with pytest.raises(ValueError, match="engine 'vmap'"):
        LayerwiseGradients(model)
    assert resolve_engine("auto", model) == "vmap"
    assert resolve_engine("auto", nn.Sequential(nn.Linear(2, 2), nn.GroupNorm(1, 2))) == "layerwise"
    with pytest.raises(ValueError, match="choose one of"):
        resolve_engine("backpack", model)


def test_a_layer_that_sees_other_rows_is_refused():
    class Doubling(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 3)

        def forward(self, x):
            return self.lin(torch.cat([x, x]))  # the layer runs on twice the rows

    net = Doubling()
    engine = LayerwiseGradients(net)
    with pytest.raises(ValueError, match="ran on 8 rows, expected 4"):
        engine(lambda: net(torch.randn(4, 3)).sum(), group=1, out=torch.empty(4, engine.dim))


def test_layers_with_other_parameter_names_are_unsupported():
    lin = nn.Linear(3, 3)
    lin.register_parameter("scale", nn.Parameter(torch.ones(3)))
    assert unsupported_modules(nn.Sequential(lin)) == [
        "0 (Linear with parameters ['bias', 'scale', 'weight'])"
    ]
