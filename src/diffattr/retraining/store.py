"""The store of retrained models: one folder per finished model, resumable, settings-checked.

Layout::

    store.json                  {"format_version", "settings"}: dataset, model, training recipe,
                                and the job family's settings (fraction, subset seed, …)
    <family>/<tag>/model.json   the job's record: ids, seed, training settings, wall time, hash
    <family>/<tag>/final_ema/   the final EMA weights (a diffusers `UNet2DModel` folder)
    .tmp/                       models being committed (a crash leaves only debris here)
    .work/<family>/<tag>/       resumable training of models in flight

A model folder appears by one atomic rename of a complete temporary folder whose `model.json`
was written last, so a folder with `model.json` is a finished model and nothing else is.
Reopening with other settings is refused with StoreMismatchError listing every differing key.
Run one process per job at a time: two training the same job would share its work folder.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from diffusers import UNet2DModel

from diffattr.data.datasets import ImageDataset
from diffattr.diffusion.model import unet_config
from diffattr.retraining.jobs import RetrainJob
from diffattr.storage.arrays import (
    StoreMismatchError,
    normalise_settings,
    setting_differences,
    write_json_atomic,
)
from diffattr.storage.checkpoints import settings_hash

if TYPE_CHECKING:  # params imports this package (for its vocabulary)
    from diffattr.params import ModelParams, TrainParams

FORMAT_VERSION = 1
SETTINGS_FILE = "store.json"
MODEL_FILE = "model.json"
EMA_DIR = "final_ema"
TMP_DIR = ".tmp"
WORK_DIR = ".work"
# Training knobs that do not change the weights: not part of the store's identity.
_NOT_RECIPE = ("checkpoints", "resume_every")


def ids_hash(ids: np.ndarray) -> str:
    """Hash of a list of training ids, as `run_settings` computes `train_ids_hash`."""
    return settings_hash({"ids": np.asarray(ids, dtype=np.int64).tolist()})


def dataset_identity(dataset: ImageDataset) -> dict:
    """What identifies the full training set: name, size, image shape, hash of its ids."""
    return {
        "name": dataset.name,
        "n_train": len(dataset),
        "image_shape": list(dataset.image_shape),
        "train_ids_hash": ids_hash(dataset.ids),
    }


def store_settings(
    dataset: ImageDataset, model_cfg: ModelParams, train_cfg: TrainParams, **family: object
) -> dict:
    """A store's settings: the full training set, model, training recipe (base seed included;
    checkpoints and resume interval left out) and the job family's settings, e.g.
    ``fraction=0.5, subset_seed=0`` for LDS."""
    recipe = {k: v for k, v in vars(train_cfg).items() if k not in _NOT_RECIPE}
    return normalise_settings(
        {
            "dataset": dataset_identity(dataset),
            "model": {
                **vars(model_cfg),
                "unet_config": unet_config(model_cfg.unet, dataset.image_shape),
            },
            "train": recipe,
            "jobs": dict(family),
        }
    )


class ModelStore:
    """A folder of retrained models, one per job key `family/tag`."""

    def __init__(self, path: Path, settings: dict):
        self.path = path
        self.settings = settings

    @classmethod
    def open(cls, path: str | Path, settings: dict) -> ModelStore:
        """Create the store, or reopen it if it was made with the same settings.

        Raises StoreMismatchError listing each differing key, and saying what to do.
        """
        path = Path(path)
        settings = normalise_settings(settings)
        file = path / SETTINGS_FILE
        if file.exists():
            stored = cls.read(path).settings
            lines = setting_differences(stored, settings, "settings")
            if lines:
                raise StoreMismatchError(
                    f"the model store at {path} was made with other settings than requested:\n"
                    + "\n".join(lines)
                    + f"\nUse the stored settings to add models to it, or delete {path} (or "
                    "choose another path) to retrain from scratch."
                )
            return cls(path, settings)
        if path.is_dir() and any(p.name not in (TMP_DIR, WORK_DIR) for p in path.iterdir()):
            raise FileExistsError(
                f"{path} exists without {SETTINGS_FILE} and is not empty; it is not a model "
                "store: delete it or choose another path"
            )
        path.mkdir(parents=True, exist_ok=True)
        write_json_atomic(file, {"format_version": FORMAT_VERSION, "settings": settings})
        return cls(path, settings)

    @classmethod
    def read(cls, path: str | Path) -> ModelStore:
        """An existing store, as it is (for readers: no settings to compare)."""
        path = Path(path)
        file = path / SETTINGS_FILE
        if not file.exists():
            raise FileNotFoundError(
                f"no model store at {path} (no {SETTINGS_FILE}); run retraining"
            )
        meta = json.loads(file.read_text())
        if meta.get("format_version") != FORMAT_VERSION:
            raise ValueError(
                f"{file} has format {meta.get('format_version')}, this code reads "
                f"{FORMAT_VERSION}; delete the store and retrain"
            )
        return cls(path, meta["settings"])

    # ---- paths

    def folder(self, job: RetrainJob | str) -> Path:
        """Where the finished model of a job (or job key `family/tag`) lives."""
        return self.path / (job.key if isinstance(job, RetrainJob) else job)

    def work_folder(self, job: RetrainJob | str) -> Path:
        """Where a job's training in flight keeps its resumable state."""
        return self.path / WORK_DIR / (job.key if isinstance(job, RetrainJob) else job)

    # ---- state

    def is_finished(self, job: RetrainJob | str) -> bool:
        return (self.folder(job) / MODEL_FILE).exists()

    def finished(self, family: str | None = None) -> list[str]:
        """Keys `family/tag` of the finished models (of one family, or all), sorted."""
        families = [family] if family else [p.name for p in self.path.iterdir() if p.is_dir()]
        keys = [
            f"{fam}/{p.name}"
            for fam in families
            if not fam.startswith(".") and (self.path / fam).is_dir()
            for p in (self.path / fam).iterdir()
            if (p / MODEL_FILE).exists()
        ]
        return sorted(keys)

    def pending(self, jobs: list[RetrainJob]) -> list[RetrainJob]:
        """The jobs without a finished model, in order. A finished model made for another job
        of the same key (other ids or seed) raises StoreMismatchError."""
        dup = sorted(k for k, n in Counter(job.key for job in jobs).items() if n > 1)
        if dup:
            raise ValueError(f"job keys repeat: {dup[:5]}; give each job its own tag")
        todo = []
        for job in jobs:
            if self.is_finished(job):
                self.check_record(job, self.record(job))
            else:
                todo.append(job)
        return todo

    def check_record(self, job: RetrainJob, record: dict) -> None:
        """StoreMismatchError unless a model's record was made by this job."""
        expected = {"train_ids_hash": ids_hash(job.train_ids), "seed_index": job.seed_index}
        found = {k: record.get(k) for k in expected}
        if found != expected:
            lines = setting_differences(found, expected, job.key)
            raise StoreMismatchError(
                f"the finished model {self.folder(job)} was trained for another job:\n"
                + "\n".join(lines)
                + "\nGive the new job another tag, or delete that folder to retrain it."
            )

    # ---- reading and writing models

    def record(self, job: RetrainJob | str) -> dict:
        """A finished model's record (model.json): ids, seeds, training settings, wall time."""
        file = self.folder(job) / MODEL_FILE
        if not file.exists():
            raise FileNotFoundError(f"no finished model at {file.parent}; run the retraining")
        return json.loads(file.read_text())

    def load_ema(self, job: RetrainJob | str, device: torch.device | str = "cpu") -> UNet2DModel:
        """A finished model's final EMA weights, in eval mode on `device`."""
        folder = self.folder(job) / EMA_DIR
        if not (self.folder(job) / MODEL_FILE).exists():
            raise FileNotFoundError(f"no finished model at {folder.parent}; run the retraining")
        return UNet2DModel.from_pretrained(folder, low_cpu_mem_usage=False).to(device).eval()

    def commit(self, job: RetrainJob, ema_folder: Path, record: dict) -> Path:
        """Move a finished run's EMA folder into the store with its record, atomically.

        If another process finished the same job first, keeps that one. Returns the folder.
        """
        dest = self.folder(job)
        tmp = self.path / TMP_DIR / f"{job.family}__{job.tag}.{uuid.uuid4().hex[:8]}"
        tmp.mkdir(parents=True)
        shutil.move(str(ema_folder), str(tmp / EMA_DIR))
        with open(tmp / MODEL_FILE, "w") as f:
            json.dump(normalise_settings(record), f, indent=2, sort_keys=True)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        dest.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.rename(tmp, dest)
        except OSError:
            if not self.is_finished(job):
                raise
            shutil.rmtree(tmp, ignore_errors=True)
        return dest

    def __repr__(self) -> str:
        return f"ModelStore({str(self.path)!r}, {len(self.finished())} finished models)"
