"""The replay log: which sample training drew at which step, and with which timestep.

Noise is not stored: ε of an event is regenerated from the key (seed, epoch, step, sample id)
(`diffusion.draws.train_noise`), so every gradient training took can be recomputed exactly.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from diffattr.storage.arrays import create_memmap

# 2: every event records its epoch, part of its draw's key.
FORMAT_VERSION = 2


@dataclass
class ReplayLog:
    """One row per (step, sample) event of training.

    step: int32 [E] (the update it contributed to, 0-based; weights before it are θ_step);
    epoch: int32 [E] (the pass over the data the draw belongs to; part of the draw's key);
    sample_id: int64 [E]; t: int16 [E]; loss: float32 [E], the per-sample loss training computed;
    settings: seed, T, loss kind, batch size, … needed to regenerate the draws.
    """

    step: np.ndarray
    epoch: np.ndarray
    sample_id: np.ndarray
    t: np.ndarray
    loss: np.ndarray
    settings: dict

    @classmethod
    def empty(
        cls, steps: int, batch_size: int, settings: dict, folder: str | Path | None = None
    ) -> ReplayLog:
        """A log with room for every event of a run; unwritten rows have step −1.

        folder: keep the arrays as memory-mapped `replay_<field>.npy` files there (reopened if
        present with the right length), so a long run neither holds the log in memory nor
        copies it into every checkpoint. None: in memory.
        """
        n = steps * batch_size
        fields = {
            "step": (np.int32, -1),
            "epoch": (np.int32, -1),
            "sample_id": (np.int64, -1),
            "t": (np.int16, 0),
            "loss": (np.float32, np.nan),
        }
        arrays = {}
        for name, (dtype, fill) in fields.items():
            if folder is None:
                arrays[name] = np.full(n, fill, dtype)
                continue
            path = Path(folder) / f"replay_{name}.npy"
            if path.exists():
                existing = np.load(path, mmap_mode="r+")
                if existing.shape == (n,) and existing.dtype == dtype:
                    arrays[name] = existing
                    continue
            arrays[name] = create_memmap(path, (n,), dtype)  # blocks reserved: no SIGBUS
            arrays[name][:] = fill
        return cls(**arrays, settings=dict(settings))

    def flush(self) -> None:
        """Write memory-mapped arrays to disk (no-op in memory)."""
        for array in (self.step, self.epoch, self.sample_id, self.t, self.loss):
            if isinstance(array, np.memmap):
                array.flush()

    def complete_until(self, steps_done: int) -> bool:
        """Whether every event of steps [0, steps_done) is recorded."""
        b = int(self.settings["batch_size"])
        return bool((self.step[: steps_done * b] == np.repeat(np.arange(steps_done), b)).all())

    def record(
        self,
        step: int,
        epochs: np.ndarray,
        sample_ids: np.ndarray,
        t: np.ndarray,
        loss: np.ndarray,
    ) -> None:
        """Store the events of one step (rows step·B … step·B + B − 1)."""
        b = len(sample_ids)
        rows = slice(step * b, step * b + b)
        self.step[rows] = step
        self.epoch[rows] = epochs
        self.sample_id[rows] = sample_ids
        self.t[rows] = t
        self.loss[rows] = loss

    def truncated(self, steps_done: int) -> ReplayLog:
        """The events of steps [0, steps_done) only."""
        keep = (self.step >= 0) & (self.step < steps_done)
        return ReplayLog(
            self.step[keep],
            self.epoch[keep],
            self.sample_id[keep],
            self.t[keep],
            self.loss[keep],
            self.settings,
        )

    def events(self, first_step: int, last_step: int) -> np.ndarray:
        """Row indices of events with first_step ≤ step ≤ last_step."""
        return np.flatnonzero((self.step >= first_step) & (self.step <= last_step))

    def __len__(self) -> int:
        return int((self.step >= 0).sum())

    def save(self, path: str | Path) -> None:
        keep = self.step >= 0
        np.savez_compressed(
            path,
            step=self.step[keep],
            epoch=self.epoch[keep],
            sample_id=self.sample_id[keep],
            t=self.t[keep],
            loss=self.loss[keep],
            settings=np.array(json.dumps(self.settings, sort_keys=True)),
        )

    @classmethod
    def load(cls, path: str | Path) -> ReplayLog:
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"no replay log at {path}; run the training stage first")
        with np.load(path) as f:
            settings = json.loads(str(f["settings"]))
            check_format(settings.get("format_version"), path)
            return cls(f["step"], f["epoch"], f["sample_id"], f["t"], f["loss"], settings)


def check_format(found: object, path: Path) -> None:
    """Refuse a replay log written in another format (ValueError saying what to do)."""
    if found != FORMAT_VERSION:
        newer = isinstance(found, int) and found > FORMAT_VERSION
        raise ValueError(
            f"{path} is a replay log of format {found or 1}, this code reads format "
            f"{FORMAT_VERSION}: "
            + (
                "update diffattr (git pull) to read it"
                if newer
                else "it predates the epoch-keyed draws; retrain with `dvc repro train`"
            )
        )
