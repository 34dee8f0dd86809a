"""Benchmark: an image's gradient averaged over many (t, ε) draws, two ways, side by side.

K-FAC influence needs, for every training image, the full gradient averaged over M timesteps
(`train_timesteps`, one draw each; 32 on the digits default), and for every query the gradient
of its measurement averaged over K draws (256). Both go through `PerSampleGradients` (layerwise
engine) and this script times, per image, on the same model and draws:

- (a) per cell:  one gradient row per (image, timestep) cell, [b·M, D], then the mean over M
  (what `extraction.mean_gradient_chunks` did before the draws were grouped);
- (b) grouped:   one item per image with a timestep per draw (t [b, M]), so the layerwise engine
  sums the image's draws inside its per-layer products (conv offsets over a stacked layout) and
  writes one [b, D] row per image (what `mean_gradient_chunks` does now).

It checks that (a) and (b) agree (float rounding), then reports min and median ms per image over
--rounds interleaved rounds and the ratio a/b (speed-up of grouping; > 1 is faster). The model
is the run's EMA model when --train-dir holds one (the pipeline's data/train), else a freshly
built one of the same topology.

    .venv/bin/python benchmarks/mean_gradients.py --quick     # validate the script (seconds)
    .venv/bin/python benchmarks/mean_gradients.py             # the numbers in benchmarks/README.md
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

import torch

from diffattr.artifacts.training_run import RUN_FILE, TrainingRun
from diffattr.diffusion.model import build_unet, unet_config
from diffattr.diffusion.schedule import build_scheduler
from diffattr.gradients.engines import PerSampleGradients


def load_model(train_dir: Path) -> tuple[torch.nn.Module, torch.Tensor, str]:
    """(model, alphas_cumprod, where it came from)."""
    if (train_dir / RUN_FILE).exists():
        run = TrainingRun.open(train_dir)
        model, _ = run.load_model(ema=True)
        return model, run.alphas_cumprod(), f"EMA model of {train_dir}"
    model = build_unet(unet_config("tiny", (1, 8, 8)), seed=0).eval()
    return model, build_scheduler().alphas_cumprod, "fresh 'tiny' UNet (no run found)"


def per_cell(grads: PerSampleGradients, x0, t, eps) -> torch.Tensor:
    """(a): [b·M, D] cell gradients, then the mean over each image's M cells."""
    b, m = t.shape
    cells = grads(x0.repeat_interleave(m, 0), t.reshape(-1), eps.reshape(b * m, 1, *x0.shape[1:]))
    return cells.reshape(b, m, -1).mean(1)


def grouped(grads: PerSampleGradients, x0, t, eps) -> torch.Tensor:
    """(b): one item per image, a timestep per draw."""
    return grads(x0, t, eps)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-dir", type=Path, default=Path("data/train"))
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="one small round of each case")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, abar, source = load_model(args.train_dir)
    grads = PerSampleGradients(model, abar, engine="layerwise")
    gen = torch.Generator().manual_seed(0)
    size = model.config.sample_size
    shape = (model.config.in_channels, *((size, size) if isinstance(size, int) else size))
    # (case, images per call, draws per image): K-FAC's training side and its query side
    cases = [("train side, M = 32", 8, 32), ("query side, K = 256", 1, 256)]
    rounds = args.rounds
    if args.quick:
        cases, rounds = [("quick, M = 4", 2, 4)], 1
    print(f"model: {source}; {grads.dim} parameters; {args.threads} threads; {platform.node()}")
    for name, b, m in cases:
        x0 = torch.rand(b, *shape, generator=gen) * 2 - 1
        t = torch.randint(0, len(abar), (b, m), generator=gen)
        eps = torch.randn(b, m, *shape, generator=gen)
        a, g = per_cell(grads, x0, t, eps).clone(), grouped(grads, x0, t, eps).clone()
        torch.testing.assert_close(g, a, rtol=1e-4, atol=1e-7)
        times: dict[str, list[float]] = {"per cell": [], "grouped": []}
        for _ in range(rounds):
            for label, fn in (("per cell", per_cell), ("grouped", grouped)):
                started = time.perf_counter()
                fn(grads, x0, t, eps)
                times[label].append(1000 * (time.perf_counter() - started) / b)
        best = {k: min(v) for k, v in times.items()}
        print(
            f"{name}: per cell {best['per cell']:.1f} ms/image "
            f"(median {statistics.median(times['per cell']):.1f}), grouped "
            f"{best['grouped']:.1f} ms/image (median {statistics.median(times['grouped']):.1f}); "
            f"a/b = {best['per cell'] / best['grouped']:.2f}x"
        )


if __name__ == "__main__":
    main()
