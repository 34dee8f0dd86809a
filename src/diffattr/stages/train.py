"""Stage 1: train a DDPM, keep its checkpoints and replay log, generate the queries."""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from diffattr.artifacts.training_run import QUERIES_FILE, TrainingRun
from diffattr.data.datasets import ImageDataset
from diffattr.devices import determinism_settings, resolve_device
from diffattr.diffusion.sampling import generate, save_queries
from diffattr.diffusion.schedule import build_scheduler
from diffattr.diffusion.training import TrainResult, train
from diffattr.params import Params
from diffattr.stages.catalog import REPORT_PLOTS


@dataclass
class TrainStageResult:
    """What stage 1 made (everything is also on disk under out_dir)."""

    dataset: ImageDataset
    result: TrainResult
    run: TrainingRun
    samples_per_checkpoint: dict[int, torch.Tensor]  # step → [grid_samples, C, H, W]
    queries: torch.Tensor  # [num_queries, C, H, W] in [-1, 1]
    metrics: dict


def run(
    P: Params,
    out_dir: str | Path = "data/train",
    report_dir: str | Path = "reports/01_train",
    progress: bool = True,
) -> TrainStageResult:
    """Train (resuming an interrupted run), sample each checkpoint's EMA model on fixed seeds,
    generate the queries from the final EMA model and write `report_dir/metrics.json`."""
    device = resolve_device(P.device)
    dataset = P.data.load("train")
    started = time.perf_counter()
    result = train(dataset, P.model, P.train, out_dir, device=device, progress=progress)
    train_seconds = time.perf_counter() - started
    run_ = TrainingRun.open(out_dir)
    scheduler = build_scheduler(P.model.schedule, P.model.num_train_timesteps)

    grid_seeds = list(range(P.sample.seed, P.sample.seed + P.sample.grid_samples))
    by_step = {}
    for step in run_.checkpoint_steps:
        ema, _ = run_.load_model(step, ema=True)
        by_step[step] = generate(
            ema.to(device),
            scheduler,
            grid_seeds,
            dataset.image_shape,
            P.sample.grid_inference_steps,
            P.sample.batch_size,
            device,
            progress=False,
        )

    query_seeds = list(range(P.sample.seed, P.sample.seed + P.sample.num_queries))
    final_ema, payload = run_.load_model(ema=True)
    started = time.perf_counter()
    queries = generate(
        final_ema.to(device),
        scheduler,
        query_seeds,
        dataset.image_shape,
        P.sample.num_inference_steps,
        P.sample.batch_size,
        device,
        progress=progress,
    )
    sample_seconds = time.perf_counter() - started
    save_queries(
        Path(out_dir) / QUERIES_FILE,
        queries,
        query_seeds,
        {
            "checkpoint_step": int(payload["step"]),
            "weights": "ema",
            "weights_hash": run_.summary["final_ema_hash"],
            "run_id": run_.identity,
            "num_inference_steps": P.sample.num_inference_steps,
            "sampler": "DDPM ancestral",
        },
    )
    tail = max(len(result.loss_history) // 20, 1)
    metrics = {
        "final_loss": float(np.mean(result.loss_history[-tail:])),
        "train_wall_time_s": round(train_seconds, 2),
        "resumed_from_step": int(result.resumed_from_step),
        "sample_wall_time_s": round(sample_seconds, 2),
        "n_parameters": int(sum(p.numel() for p in result.model.parameters())),
        "n_train": int(len(dataset)),
        "steps": int(P.train.steps),
        "n_queries": int(len(queries)),
        "run_id": run_.identity,
        "device": str(device),
    }
    write_metrics(report_dir, metrics)
    write_plot_data(report_dir, "loss_curve", loss_curve_data(result.loss_history))
    return TrainStageResult(dataset, result, run_, by_step, queries, metrics)


def loss_curve_data(loss_history: np.ndarray) -> pd.DataFrame:
    """The loss curve's data (`dvc plots`): columns step (1-based), loss (mean over the batch)."""
    return pd.DataFrame({"step": np.arange(1, len(loss_history) + 1), "loss": loss_history})


def write_metrics(report_dir: str | Path, metrics: dict) -> Path:
    """`report_dir/metrics.json` (tracked by DVC: `dvc metrics show`); NaN written as null.

    Adds `runtime`: the torch / CUDA / cuDNN versions, the GPU and the determinism flags this
    process ran under (`devices.determinism_settings`), what "same numbers" depends on."""
    path = Path(report_dir) / "metrics.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {**metrics, "runtime": determinism_settings()}
    path.write_text(json.dumps(_plain(payload), indent=2, default=str, allow_nan=False))
    return path


def write_plot_data(report_dir: str | Path, name: str, frame: pd.DataFrame) -> Path:
    """`report_dir/plots/<name>.csv`: the data behind one of the report's key figures, declared
    under `plots:` in dvc.yaml (`dvc plots show`, `dvc plots diff` between experiments).
    Floats to 6 significant digits; NaN as an empty field."""
    path = Path(report_dir) / REPORT_PLOTS / f"{name}.csv"
    path.parent.mkdir(parents=True, exist_ok=True)
    frame.to_csv(path, index=False, float_format="%.6g", lineterminator="\n")
    return path


def _plain(value):
    """JSON-ready: NaN / inf → None, numpy scalars → Python numbers, containers recursed."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
