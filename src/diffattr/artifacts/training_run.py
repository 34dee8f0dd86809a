"""Stage 1's output, read through one typed reader: the finished training run.

Layout of a run folder (written by `diffattr.diffusion.training.train` and the train stage):
`run.json` (settings, checkpoints with η_k, weight hashes), `checkpoints/step_XXXXXXX.pt`,
`replay_log.npz`, `loss_history.npy`, `final_ema/` (a diffusers folder) and `queries.npz`
(the generated queries). Every read checks that the pieces belong to this run: a replay log,
query set or checkpoint of another run is refused, naming both identities.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from diffattr.artifacts.queries import QuerySet
from diffattr.data.datasets import ImageDataset
from diffattr.diffusion.model import build_unet
from diffattr.diffusion.replay import ReplayLog
from diffattr.diffusion.sampling import load_queries
from diffattr.diffusion.schedule import build_scheduler
from diffattr.diffusion.training import lr_at
from diffattr.storage.checkpoints import checkpoint_name, load_checkpoint, settings_hash

RUN_FILE = "run.json"
LOG_FILE = "replay_log.npz"
QUERIES_FILE = "queries.npz"
LOSS_FILE = "loss_history.npy"
CHECKPOINT_DIR = "checkpoints"
FINAL_EMA_DIR = "final_ema"


def run_identity(settings: dict) -> str:
    """A run's identity: the hash of everything that determines its weights."""
    return settings_hash(settings)


@dataclass
class TrainingRun:
    """A finished training run (stage 1's output folder)."""

    path: Path
    summary: dict

    @classmethod
    def open(cls, path: str | Path) -> TrainingRun:
        path = Path(path)
        summary_path = path / RUN_FILE
        if not summary_path.exists():
            raise FileNotFoundError(
                f"no finished training run in {path} (no {RUN_FILE}); run the train stage first: "
                "dvc repro train"
            )
        return cls(path, json.loads(summary_path.read_text()))

    @property
    def settings(self) -> dict:
        return self.summary["settings"]

    @property
    def identity(self) -> str:
        return run_identity(self.settings)

    @property
    def checkpoint_steps(self) -> list[int]:
        return [int(c["step"]) for c in self.summary["checkpoints"]]

    @property
    def loss_history(self) -> np.ndarray:
        """[steps] mean training loss per step."""
        return np.load(self.path / LOSS_FILE)

    def alphas_cumprod(self) -> torch.Tensor:
        """ᾱ_t [T] of the schedule the run was trained with."""
        model = self.settings["model"]
        return build_scheduler(model["schedule"], model["num_train_timesteps"]).alphas_cumprod

    def lr(self, step: int) -> float:
        """η_k: the learning rate of the update that produced checkpoint `step`."""
        return float(next(c["lr"] for c in self.summary["checkpoints"] if c["step"] == step))

    def learning_rates(self) -> np.ndarray:
        """η [steps]: the learning rate of every update (0-based step), as training set it."""
        cfg = SimpleNamespace(**self.settings["train"])
        return np.array([lr_at(step, cfg) for step in range(int(cfg.steps))], np.float64)

    def load_model(self, step: int | None = None, ema: bool = False):
        """A trained `UNet2DModel` in eval mode from checkpoint `step` (default: the last), raw or
        EMA weights. Returns (model, checkpoint payload). A checkpoint whose stored step or
        settings differ from what its name and this run say is refused."""
        steps = self.checkpoint_steps
        step = steps[-1] if step is None else int(step)
        if step not in steps:
            raise ValueError(f"no checkpoint at step {step} in {self.path}; available: {steps}")
        path = self.path / CHECKPOINT_DIR / checkpoint_name(step)
        payload = load_checkpoint(path, self.settings)
        if int(payload["step"]) != step:
            raise ValueError(
                f"{path} holds the weights of step {payload['step']}, not {step}: the checkpoint "
                "file was renamed or copied over. Retrain (dvc repro -f train)."
            )
        model = build_unet(payload["settings"]["unet_config"])
        model.load_state_dict(payload["ema" if ema else "model"])
        return model.eval(), payload

    def replay_log(self) -> ReplayLog:
        """The run's replay log, refused if it was written by another run."""
        log = ReplayLog.load(self.path / LOG_FILE)
        found = log.settings.get("run_id")
        if found != self.identity:
            raise ValueError(
                f"{self.path / LOG_FILE} belongs to training run {found}, not to this run "
                f"{self.identity}; rerun the train stage so that its outputs match (dvc repro -f "
                "train)"
            )
        return log

    def generated_queries(self) -> tuple[torch.Tensor, np.ndarray, dict]:
        """(images [Q, C, H, W] in [-1, 1], seeds [Q], meta) of the final EMA model's samples,
        refused if they were generated by other weights."""
        images, seeds, meta = load_queries(self.path / QUERIES_FILE)
        expected = self.summary.get("final_ema_hash")
        if meta.get("weights_hash") != expected:
            raise ValueError(
                f"{self.path / QUERIES_FILE} was generated by weights {meta.get('weights_hash')}, "
                f"not by this run's final EMA {expected}; regenerate them: dvc repro -f train"
            )
        return images, seeds, meta

    def query_set(self, heldout: ImageDataset, n_heldout: int) -> QuerySet:
        """The queries later stages attribute: the generated samples, then the first n_heldout
        held-out images."""
        images, seeds, _ = self.generated_queries()
        held = heldout.subset(heldout.ids[: min(n_heldout, len(heldout))])
        return QuerySet(
            images=torch.cat([images, held.images]),
            kind=np.array(["generated"] * len(images) + ["heldout"] * len(held)),
            key=np.concatenate([np.asarray(seeds, np.int64), held.ids]),
        )

    def check_dataset(self, dataset: ImageDataset) -> None:
        """Refuse a training set other than the one this run trained on."""
        want = self.settings["train_ids_hash"]
        have = settings_hash({"ids": dataset.ids.tolist()})
        if have != want or dataset.name != self.settings["dataset"]:
            raise ValueError(
                f"the training set ({dataset.name}, ids {have}) is not the one of the run in "
                f"{self.path} ({self.settings['dataset']}, ids {want}); use the data parameters "
                "it was trained with, or retrain (dvc repro train)"
            )
