"""Benchmark: our EK-FAC fit against curvlinops-for-pytorch 3.0.1's `EKFACLinearOperator`.

On the default model (the "tiny" UNet on 8×8×1 digits, 0.28M parameters; 50 Linear / Conv2d
layers) and the digits training set (1600 images), both fit EK-FAC (GGN^model: fisher "mc",
one sampled vector per item; K-FAC-expand) from the same fitting draws
(`diffattr.gradients.kfac.fitting_batches`: `--draws` per image, stratified timesteps, keyed by
(seed, CURVATURE, sample id, draw)), batched `--batch` at a time. Timed, per fit:

- ours:       `fit_kfac(model, batches, "mc", "expand", eigen_correction=True)` — the factors
              pass, the eigendecompositions (float64) and the eigenvalue-correction pass;
- curvlinops: constructing `EKFACLinearOperator(..., fisher_type="mc", kfac_approx="expand",
              separate_weight_and_bias=False)` (num_data and num_per_example_loss_terms given,
              check_deterministic off, so it makes no extra data pass), then
              `compute_kronecker_factors()` and `compute_eigenvalue_correction()` (the same three
              steps; its eigendecompositions run in the model's float32).

The model is wrapped for curvlinops to take a dict {x_t, t} and return ε̂ flattened (B, C·H·W),
with `MSELoss(reduction="mean")`, over the parameters of Linear / Conv2d layers only. Both fits
run in one process, after one warm-up each on a few batches, in `--repeats` interleaved rounds
(the order alternates between rounds, so a slow spell of a shared machine hits both alike); the
minimum over rounds is the headline, the median and the process CPU time (less sensitive to
other jobs on a shared machine) are printed beside it. The input factors A do
not depend on the sampled vectors and are compared as a cross-check.

    .venv/bin/python benchmarks/kfac.py --quick     # check the script (seconds)
    .venv/bin/python benchmarks/kfac.py --json reports/kfac-bench.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
from torch import nn

from diffattr.data.datasets import load_dataset
from diffattr.diffusion.model import build_unet, unet_config
from diffattr.diffusion.schedule import build_scheduler
from diffattr.gradients.kfac import curvature_layers, fit_kfac, fitting_batches


class DictUNet(nn.Module):
    """ε̂ flattened to (B, C·H·W) from a dict {x_t, t}, the shape curvlinops' MSELoss expects."""

    def __init__(self, unet: nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.unet(inputs["x_t"], inputs["t"]).sample.flatten(1)


def fit_ours(model: nn.Module, batches: list) -> dict[str, torch.Tensor]:
    """Our EK-FAC fit; returns the input factors A per layer."""
    return fit_kfac(model, lambda: batches, "mc", "expand", mc_samples=1).A


def fit_curvlinops(model: nn.Module, batches: list) -> dict[str, torch.Tensor]:
    """curvlinops' EK-FAC fit; returns its input factors A per layer (our names)."""
    from curvlinops import EKFACLinearOperator

    layers = curvature_layers(model)
    op = EKFACLinearOperator(
        DictUNet(model).eval(),
        nn.MSELoss(reduction="mean"),
        [p for layer in layers.values() for p in layer.parameters()],
        [({"x_t": x, "t": t}, eps.flatten(1)) for x, t, eps in batches],
        fisher_type="mc",
        mc_samples=1,
        kfac_approx="expand",
        check_deterministic=False,
        separate_weight_and_bias=False,
        num_data=sum(len(x) for x, _, _ in batches),
        num_per_example_loss_terms=1,
        batch_size_fn=lambda inputs: inputs["x_t"].shape[0],
    )
    op.compute_kronecker_factors()
    a = {k.removeprefix("unet."): v.clone() for k, v in op._input_covariances.items()}
    op.compute_eigenvalue_correction()  # pops the factors, keeps eigenvectors and corrections
    return a


METHODS = {"ours": fit_ours, "curvlinops": fit_curvlinops}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=None, help="first N images (default all)")
    parser.add_argument("--draws", type=int, default=1, help="fitting draws per image")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--quick", action="store_true", help="128 images, 1 round")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    if args.quick:
        args.images, args.repeats = 128, 1
    if args.threads:
        torch.set_num_threads(args.threads)

    data = load_dataset("digits", "train", "data/raw")
    images, ids = data.images, data.ids
    if args.images:
        images, ids = images[: args.images], ids[: args.images]
    model = build_unet(unet_config("tiny", tuple(images.shape[1:])), seed=0).eval()
    abar = build_scheduler().alphas_cumprod
    batches = list(fitting_batches(images, ids, abar, args.draws, seed=0, batch_size=args.batch))
    n_items = sum(len(x) for x, _, _ in batches)
    n_params = sum(p.numel() for p in model.parameters())
    print(
        f"tiny UNet {n_params / 1e6:.2f}M params, {len(curvature_layers(model))} layers; "
        f"{n_items} items ({len(images)} images × {args.draws} draws), batch {args.batch}; "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads"
    )

    for fit in METHODS.values():  # warm-up
        fit(model, batches[:2])
    times: dict[str, list[float]] = {name: [] for name in METHODS}
    cpu: dict[str, list[float]] = {name: [] for name in METHODS}
    factors = {}
    for r in range(args.repeats):
        order = list(METHODS) if r % 2 == 0 else list(reversed(METHODS))
        for name in order:
            start, start_cpu = time.perf_counter(), time.process_time()
            factors[name] = METHODS[name](model, batches)
            times[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - start_cpu)
            print(
                f"  round {r + 1}: {name:<10} {times[name][-1]:7.2f} s wall "
                f"{cpu[name][-1]:7.2f} s CPU",
                flush=True,
            )

    a_diff = max(
        float(
            (factors["ours"][k] - factors["curvlinops"][k].double()).norm()
            / factors["ours"][k].norm()
        )
        for k in factors["ours"]
    )
    best = {k: min(v) for k, v in times.items()}
    med = {k: statistics.median(v) for k, v in times.items()}
    best_cpu = {k: min(v) for k, v in cpu.items()}
    print(f"\n{'method':<12}{'min s':>9}{'median s':>10}{'ms/item':>9}{'min CPU s':>11}")
    for name in METHODS:
        print(
            f"{name:<12}{best[name]:9.2f}{med[name]:10.2f}{1e3 * best[name] / n_items:9.2f}"
            f"{best_cpu[name]:11.2f}"
        )
    ratio, ratio_med = best["ours"] / best["curvlinops"], med["ours"] / med["curvlinops"]
    ratio_cpu = best_cpu["ours"] / best_cpu["curvlinops"]
    print(
        f"ours / curvlinops: {ratio:.2f} (min wall), {ratio_med:.2f} (median wall), "
        f"{ratio_cpu:.2f} (min CPU time); target ≤ 1"
    )
    print(f"input factors A: max relative difference {a_diff:.1e} (float32 products)")
    if args.json:
        result = {
            "model": "tiny",
            "params": n_params,
            "items": n_items,
            "images": len(images),
            "draws": args.draws,
            "batch": args.batch,
            "fisher": "mc",
            "approx": "expand",
            "seconds": times,
            "cpu_seconds": cpu,
            "ratio_min": ratio,
            "ratio_cpu_min": ratio_cpu,
            "ratio_median": ratio_med,
            "a_max_relative_difference": a_diff,
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "machine": platform.machine(),
            "processor": platform.processor(),
            "python": platform.python_version(),
        }
        args.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
