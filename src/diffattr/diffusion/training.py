"""DDPM training: AdamW, warm-up, optional cosine decay, EMA, clipping, checkpoints, replay log,
resume.

Everything random is keyed by (seed, epoch, step, sample id), so a run interrupted at any point and
resumed from its last checkpoint ends with exactly the weights of an uninterrupted run.
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING

import numpy as np
import torch
from tqdm import tqdm

from diffattr.data.datasets import ImageDataset
from diffattr.diffusion.draws import batch_rows, train_noise, train_timesteps
from diffattr.diffusion.model import build_unet, predict_eps, unet_config
from diffattr.diffusion.replay import FORMAT_VERSION, ReplayLog
from diffattr.diffusion.schedule import add_noise, build_scheduler
from diffattr.diffusion.task import per_sample_loss
from diffattr.storage.checkpoints import (
    checkpoint_name,
    load_checkpoint,
    save_checkpoint,
    settings_hash,
    weights_hash,
    work_folder,
)

if TYPE_CHECKING:
    from diffattr.params import ModelParams, TrainParams

RESUME_FILE = "resume.pt"
LR_DECAYS = ("constant", "cosine")


class NonFiniteLossError(FloatingPointError):
    """Training produced a NaN or infinite loss."""


@dataclass
class TrainResult:
    """What a finished run leaves behind (all also on disk under `out_dir`)."""

    out_dir: Path
    model: torch.nn.Module  # raw weights after the last step
    ema: torch.nn.Module  # EMA weights after the last step
    log: ReplayLog
    loss_history: np.ndarray  # [steps] mean training loss per step
    checkpoint_steps: list[int]
    wall_time_s: float  # time spent training in this process (a resumed run counts its part)
    settings: dict
    resumed_from_step: int  # 0 for a fresh run


def resolve_checkpoint_steps(checkpoints: int | list[int], steps: int) -> list[int]:
    """A count → evenly spaced steps ending at `steps`; a list → validated, sorted, unique."""
    if isinstance(checkpoints, int):
        if checkpoints < 1:
            raise ValueError(f"train.checkpoints must be ≥ 1, got {checkpoints}")
        count = min(checkpoints, steps)
        return sorted({round(steps * (i + 1) / count) for i in range(count)})
    out = sorted({int(s) for s in checkpoints})
    if not out or out[0] < 1 or out[-1] > steps:
        raise ValueError(f"train.checkpoints must be steps in [1, {steps}], got {checkpoints}")
    return out


def lr_at(step: int, cfg: TrainParams) -> float:
    """Learning rate in force for the update at `step` (0-based): linear warm-up, then decay."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.lr_decay == "constant":
        return cfg.lr
    span = max(cfg.steps - cfg.warmup_steps, 1)
    progress = (step - cfg.warmup_steps) / span
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * progress))


def run_settings(
    dataset: ImageDataset, model_cfg: ModelParams, train_cfg: TrainParams, config: dict
) -> dict:
    """Everything that determines the trained weights; a resume must match it exactly. The
    replay-log format is part of it: a work folder of an older format (other draw keys) is
    never resumed."""
    return {
        "replay_format": FORMAT_VERSION,
        "dataset": dataset.name,
        "train_ids_hash": settings_hash({"ids": dataset.ids.tolist()}),
        "n_train": len(dataset),
        "image_shape": list(dataset.image_shape),
        "unet_config": config,
        "model": vars(model_cfg).copy(),
        "train": {
            **vars(train_cfg),
            "checkpoints": list(resolve_checkpoint_steps(train_cfg.checkpoints, train_cfg.steps)),
        },
    }


def _ema_update(ema: list[torch.Tensor], model: list[torch.Tensor], decay: float) -> None:
    """ema ← decay·ema + (1 − decay)·model over matching parameter lists, in one multi-tensor
    kernel."""
    with torch.no_grad():
        torch._foreach_lerp_(ema, model, 1 - decay)


class _Run:
    """Mutable state of one training run, savable and restorable as a whole."""

    def __init__(
        self, settings: dict, dataset: ImageDataset, device: torch.device, seed: int, work: Path
    ):
        self.settings = settings
        self.model = build_unet(settings["unet_config"], seed).to(device)
        self.ema = copy.deepcopy(self.model).requires_grad_(False)
        tc = settings["train"]
        # foreach: one multi-tensor kernel per update instead of one per parameter (PyTorch
        # picks it on CUDA only; on CPU the small UNets' ~200 tensors make it ~10% of a step).
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(), lr=tc["lr"], weight_decay=tc["weight_decay"], foreach=True
        )
        self.log = ReplayLog.empty(
            tc["steps"], tc["batch_size"], self.log_settings(dataset), folder=work
        )
        self.loss_history = np.full(tc["steps"], np.nan, np.float32)
        self.step = 0
        self.lr = 0.0

    def log_settings(self, dataset: ImageDataset) -> dict:
        tc, mc = self.settings["train"], self.settings["model"]
        return {
            "format_version": FORMAT_VERSION,
            "run_id": settings_hash(self.settings),  # the run's identity (artifacts.TrainingRun)
            "seed": tc["seed"],
            "batch_size": tc["batch_size"],
            "num_train_timesteps": mc["num_train_timesteps"],
            "schedule": mc["schedule"],
            "loss": mc["loss"],
            "dataset": dataset.name,
            "image_shape": list(dataset.image_shape),
        }

    def save(self, path: Path) -> None:
        """Flush the replay log first, so it is never behind a checkpoint on disk."""
        self.log.flush()
        save_checkpoint(path, self.payload())

    def payload(self) -> dict:
        return {
            "step": self.step,
            "lr": self.lr,
            "settings": self.settings,
            "model": self.model.state_dict(),
            "ema": self.ema.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "loss_history": self.loss_history[: self.step].copy(),
            "rng": {"torch": torch.get_rng_state()},
            "weights_hash": weights_hash(self.model.state_dict()),
        }

    def restore(self, payload: dict) -> None:
        self.step = int(payload["step"])
        self.lr = float(payload["lr"])
        self.model.load_state_dict(payload["model"])
        self.ema.load_state_dict(payload["ema"])
        self.optimizer.load_state_dict(payload["optimizer"])
        self.loss_history[: self.step] = payload["loss_history"]
        torch.set_rng_state(payload["rng"]["torch"])


def _latest_checkpoint(work_dir: Path, settings: dict, log: ReplayLog) -> dict | None:
    """The most advanced usable checkpoint of this run in work_dir, or None.

    Unreadable checkpoints, and ones the replay log on disk does not reach, are skipped with a
    warning. Step files are tried newest first, so only what is needed is loaded.
    """
    steps = sorted(work_dir.glob("step_*.pt"), reverse=True)
    best = None
    for path in [work_dir / RESUME_FILE, *steps]:
        if not path.exists():
            continue
        if best is not None and path != work_dir / RESUME_FILE:
            if int(path.stem.removeprefix("step_")) <= best["step"]:
                break
        try:
            payload = load_checkpoint(path, settings)
        except ValueError as err:
            warnings.warn(f"skipping unusable checkpoint: {err}", stacklevel=3)
            continue
        if not log.complete_until(int(payload["step"])):
            warnings.warn(f"skipping {path}: the replay log does not reach it", stacklevel=3)
            continue
        if best is None or payload["step"] > best["step"]:
            best = payload
    return best


def default_work_dir(out_dir: Path, settings: dict) -> Path:
    """A run's work folder, keyed by its settings."""
    return work_folder(out_dir) / settings_hash(settings)


def train(
    dataset: ImageDataset,
    model_cfg: ModelParams,
    train_cfg: TrainParams,
    out_dir: str | Path,
    device: torch.device | str = "cpu",
    work_dir: str | Path | None = None,
    progress: bool = True,
) -> TrainResult:
    """Train a DDPM on `dataset` (all of it: pass `dataset.subset(ids)` to train on a subset).

    Writes to out_dir: checkpoints `step_XXXXXXX.pt` (model, EMA, optimizer, learning rate in
    force, RNG state, replay log so far), `replay_log.npz`, `loss_history.npy`, `final_ema/`
    (a diffusers `UNet2DModel` folder) and `run.json`. An interrupted run resumes from the last
    checkpoint in work_dir. Raises NonFiniteLossError naming the step and sample ids.
    """
    out_dir, device = Path(out_dir), torch.device(device)
    config = unet_config(model_cfg.unet, dataset.image_shape)
    settings = run_settings(dataset, model_cfg, train_cfg, config)
    work = Path(work_dir) if work_dir is not None else default_work_dir(out_dir, settings)
    work.mkdir(parents=True, exist_ok=True)
    (work / "settings.json").write_text(json.dumps(settings, indent=2, default=str))

    # Every draw of training is keyed; seeding the global generator too makes the RNG state
    # saved in checkpoints (and so the checkpoint files) the same on every run.
    torch.manual_seed(train_cfg.seed)
    run = _Run(settings, dataset, device, train_cfg.seed, work)
    latest = _latest_checkpoint(work, settings, run.log)
    if latest is not None:
        run.restore(latest)
    resumed_from = run.step
    scheduler = build_scheduler(model_cfg.schedule, model_cfg.num_train_timesteps)
    alphas_cumprod = scheduler.alphas_cumprod.to(device)
    images = dataset.images.to(device)
    keep_steps = set(settings["train"]["checkpoints"])
    started = time.perf_counter()

    bar = tqdm(
        total=train_cfg.steps,
        initial=run.step,
        disable=not progress,
        desc="training",
        mininterval=2.0,
    )
    run.model.train()
    # Walking the module tree for .parameters() at every step costs ~3% of a small UNet's step.
    params, ema_params = list(run.model.parameters()), list(run.ema.parameters())
    while run.step < train_cfg.steps:
        step = run.step
        rows, epochs = batch_rows(step, train_cfg.batch_size, len(dataset), train_cfg.seed)
        ids = dataset.ids[rows]
        t = train_timesteps(train_cfg.seed, step, epochs, ids, model_cfg.num_train_timesteps)
        t = t.to(device)
        eps = train_noise(train_cfg.seed, step, epochs, ids, dataset.image_shape, device)
        x_t = add_noise(images[rows], eps, t, alphas_cumprod)
        losses = per_sample_loss(predict_eps(run.model, x_t, t), eps, model_cfg.loss)
        finite = torch.isfinite(losses)
        if not bool(finite.all()):
            bad = ids[~finite.cpu().numpy()].tolist()
            raise NonFiniteLossError(
                f"non-finite loss at step {step} for sample ids {bad[:20]}; the last good "
                f"checkpoint is in {work}. Lower train.lr or check these samples."
            )
        run.lr = lr_at(step, train_cfg)
        for group in run.optimizer.param_groups:
            group["lr"] = run.lr
        run.optimizer.zero_grad(set_to_none=True)
        losses.mean().backward()
        if train_cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, train_cfg.grad_clip, foreach=True)
        run.optimizer.step()
        _ema_update(ema_params, params, min(train_cfg.ema_decay, (1 + step) / (10 + step)))
        loss_values = losses.detach().cpu().numpy()
        run.log.record(step, epochs, ids, t.cpu().numpy(), loss_values)
        run.loss_history[step] = loss_values.mean()
        run.step = step + 1
        if run.step in keep_steps:
            run.save(work / checkpoint_name(run.step))
        elif run.step % train_cfg.resume_every == 0:
            run.save(work / RESUME_FILE)
        bar.update(1)
        if step % 10 == 0:
            recent = run.loss_history[max(0, step - 49) : step + 1].mean()
            bar.set_postfix(loss=f"{recent:.4f}", refresh=False)
    bar.close()
    wall = time.perf_counter() - started
    log = run.log.truncated(run.step)  # in memory: the work folder goes next
    _finish(out_dir, work, run, log)
    return TrainResult(
        out_dir=out_dir,
        model=run.model,
        ema=run.ema,
        log=log,
        loss_history=run.loss_history,
        checkpoint_steps=settings["train"]["checkpoints"],
        wall_time_s=wall,
        settings=settings,
        resumed_from_step=resumed_from,
    )


def _finish(out_dir: Path, work: Path, run: _Run, log: ReplayLog) -> None:
    """Link (or copy) the checkpoints of a finished run into out_dir and write its summary files.

    The work folder stays: a rerun with the same training settings (say, after changing only
    the sampling parameters, when DVC has cleared out_dir) finds the run finished and trains
    no step. Delete `data/.train-work/` to reclaim the space."""
    out_dir.mkdir(parents=True, exist_ok=True)
    ckpt_dir = out_dir / "checkpoints"
    ckpt_dir.mkdir(exist_ok=True)
    for step in run.settings["train"]["checkpoints"]:
        src = work / checkpoint_name(step)
        if src.exists():
            _link_or_copy(src, ckpt_dir / src.name)
    log.save(out_dir / "replay_log.npz")
    np.save(out_dir / "loss_history.npy", run.loss_history)
    run.ema.save_pretrained(out_dir / "final_ema")
    train_cfg = SimpleNamespace(**run.settings["train"])
    summary = {
        "settings": run.settings,
        "steps": run.step,
        "checkpoints": [
            {"step": s, "file": f"checkpoints/{checkpoint_name(s)}", "lr": lr_at(s - 1, train_cfg)}
            for s in run.settings["train"]["checkpoints"]
        ],
        "final_weights_hash": weights_hash(run.model.state_dict()),
        "final_ema_hash": weights_hash(run.ema.state_dict()),
    }
    (out_dir / "run.json").write_text(json.dumps(summary, indent=2, default=str))


def _link_or_copy(src: Path, dst: Path) -> None:
    """Hard-link src to dst (no second copy on disk), copying where links are not possible."""
    dst.unlink(missing_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
