"""Overhead of the retraining store and executor over plain `train()` calls.

Trains the same K LDS models (digits, tiny UNet, half of the training set each) four ways, in
one run, on the CPU with 1 torch thread per worker:

- direct ×1: `train()` in a loop in this process;
- store ×1: `retrain(store, jobs, workers=1)` (in this process);
- direct ×W: `train()` mapped over a spawn process pool of W workers;
- store ×W: `retrain(store, jobs, workers=W)`;

each in a fresh folder, in interleaved rounds (min over rounds); then, once more in this
process, model by model, `train()` and `retrain()` of the same job alternately ("paired", the
estimate least hurt by a shared machine's changing load). Prints store/direct (target ≤ 1.1×)
and the speed-up of W workers over 1.

    .venv/bin/python benchmarks/retraining.py --quick          # check the script, seconds
    .venv/bin/python benchmarks/retraining.py --json out.json  # the recorded numbers
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

from diffattr.data.datasets import ImageDataset
from diffattr.diffusion.training import train
from diffattr.params import DataParams, ModelParams, TrainParams
from diffattr.retraining import ModelStore, RetrainJob, lds_jobs, retrain, store_settings
from diffattr.retraining.worker import job_train_params

_DATA: ImageDataset | None = None


def _init(data: DataParams) -> None:
    global _DATA
    torch.set_num_threads(1)
    _DATA = data.load()


def _direct(args: tuple[RetrainJob, ModelParams, TrainParams, Path]) -> None:
    job, model_cfg, train_cfg, out = args
    assert _DATA is not None
    cfg = job_train_params(train_cfg, job)
    train(_DATA.subset(job.train_ids), model_cfg, cfg, out, "cpu", progress=False)


def run_direct(jobs, data, model_cfg, train_cfg, root: Path, workers: int) -> float:
    started = time.perf_counter()
    tasks = [(job, model_cfg, train_cfg, root / job.tag) for job in jobs]
    if workers == 1:
        _init(data)
        for task in tasks:
            _direct(task)
    else:
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(workers, context, _init, (data,)) as pool:
            list(pool.map(_direct, tasks))
    return time.perf_counter() - started


def run_store(jobs, data, model_cfg, train_cfg, root: Path, workers: int) -> float:
    started = time.perf_counter()
    dataset = data.load()
    store = ModelStore.open(root, store_settings(dataset, model_cfg, train_cfg, fraction=0.5))
    retrain(store, jobs, data.load, model_cfg, train_cfg, workers=workers, threads=1,
            device="cpu", progress=False)  # fmt: skip
    return time.perf_counter() - started


def run_paired(jobs, data, model_cfg, train_cfg, root: Path) -> tuple[float, float]:
    """In this process, model by model: `train()` then `retrain()` of the same job, so that a
    shared machine's changing load hits both alike. Returns (direct s, store s), summed."""
    _init(data)
    assert _DATA is not None
    settings = store_settings(_DATA, model_cfg, train_cfg, fraction=0.5)
    store = ModelStore.open(root / "store", settings)
    direct = via_store = 0.0
    for job in jobs:
        started = time.perf_counter()
        _direct((job, model_cfg, train_cfg, root / "direct" / job.tag))
        direct += time.perf_counter() - started
        started = time.perf_counter()
        retrain(store, [job], _DATA, model_cfg, train_cfg, threads=1, device="cpu", progress=False)
        via_store += time.perf_counter() - started
    return direct, via_store


def machine() -> str:
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, {platform.system()}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=int, default=4, help="K models per way")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="tiny sizes, one round")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    if args.quick:
        args.models, args.steps, args.batch, args.rounds = 2, 5, 8, 1
    torch.set_num_threads(1)
    data = DataParams(dataset="digits")
    model_cfg = ModelParams(unet="tiny")
    train_cfg = TrainParams(steps=args.steps, batch_size=args.batch, warmup_steps=1)
    jobs, _ = lds_jobs(data.load().ids, n_subsets=args.models, n_seeds=1)
    ways = {
        "direct x1": (run_direct, 1),
        "store x1": (run_store, 1),
        f"direct x{args.workers}": (run_direct, args.workers),
        f"store x{args.workers}": (run_store, args.workers),
    }
    times: dict[str, list[float]] = {name: [] for name in ways}
    for r in range(args.rounds):
        for name, (fn, workers) in ways.items():
            with tempfile.TemporaryDirectory() as tmp:
                seconds = fn(jobs, data, model_cfg, train_cfg, Path(tmp) / "out", workers)
            times[name].append(seconds)
            print(f"round {r}: {name:10s} {seconds:7.2f} s", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        paired = run_paired(jobs, data, model_cfg, train_cfg, Path(tmp))
    print(f"paired x1: direct {paired[0]:.2f} s, store {paired[1]:.2f} s", flush=True)
    best = {name: min(t) for name, t in times.items()}
    w = args.workers
    result = {
        "machine": machine(),
        "models": args.models,
        "steps": args.steps,
        "batch": args.batch,
        "n_train_per_model": len(jobs[0].train_ids),
        "rounds": args.rounds,
        "seconds": times,
        "min_seconds": best,
        "paired_x1_seconds": {"direct": paired[0], "store": paired[1]},
        "store_over_direct_paired_x1": paired[1] / paired[0],
        "store_over_direct_x1": best["store x1"] / best["direct x1"],
        f"store_over_direct_x{w}": best[f"store x{w}"] / best[f"direct x{w}"],
        f"speedup_store_x{w}_over_x1": best["store x1"] / best[f"store x{w}"],
    }
    print(f"\n{result['machine']}")
    print(f"K={args.models} models, {args.steps} steps × batch {args.batch}, min of {args.rounds}")
    for name, seconds in best.items():
        print(f"  {name:10s} {seconds:7.2f} s  ({seconds / args.models:.2f} s/model)")
    for key in list(result)[-4:]:
        print(f"  {key}: {result[key]:.3f}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
