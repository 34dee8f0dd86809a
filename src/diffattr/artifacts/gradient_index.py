"""Stage 2's output, read through one typed reader: the gradient index and its stores.

Layout under the gradients folder: `index.json` (stores, training ids, queries, timestep grids,
η_k, the training run's identity) and one folder per store (`raw_step_XXXXXXX/`,
`ema_step_XXXXXXX/`): memory-mapped arrays with a `meta.json` of every setting
(`diffattr.storage.arrays`). Array names are built from the set names below by
`features_array` / `norm_array`; the format version is checked on read.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from diffattr.artifacts.scores import Scores
from diffattr.artifacts.training_run import TrainingRun, run_identity
from diffattr.data.datasets import find_ids
from diffattr.storage.arrays import load_store

INDEX_FILE = "index.json"
# 2: the index and every store name the training run they come from (run_id).
FORMAT_VERSION = 2

# Sets of items whose gradients a store holds (row = image, column = timestep).
REPLAY = "replay"  # the training draws of the window a trajectory checkpoint stands for (M = 1)
QUERY = "query"  # queries × the query timestep grid (S draws averaged)
PROFILE = "profile"  # norms only, on the fine profile grid, one column per (t, draw)
TRAIN_GRID = "train_grid"  # training images × the training timestep grid
TRAIN_GRID_SQNORM = "train_grid_sqnorm"  # D-TRAK's measurement, EMA store
QUERY_SQNORM = "query_sqnorm"
REPLAY_EVENTS = "replay_events"  # [E] replay-log rows of the REPLAY set


def features_array(set_name: str) -> str:
    """Name of a set's projected features [N, M, k]."""
    return f"{set_name}_features"


def norm_array(set_name: str) -> str:
    """Name of a set's exact gradient norms [N, M] (before projection)."""
    return f"{set_name}_norm"


def check_format(found: object, path: Path) -> None:
    """Refuse an index of another format version (ValueError saying what to do)."""
    if found != FORMAT_VERSION:
        newer = isinstance(found, int) and found > FORMAT_VERSION
        raise ValueError(
            f"{path} has format {found}, this code reads format {FORMAT_VERSION}: "
            + (
                "update diffattr to read it"
                if newer
                else "recompute the gradients (dvc repro gradients)"
            )
        )


@dataclass(frozen=True)
class StoreEntry:
    """One store of the index: raw weights of a trajectory checkpoint, or the final EMA."""

    weights: str  # "raw" | "ema"
    step: int
    path: str  # folder name under the gradients folder
    sets: tuple[str, ...]
    lr: float | None = None  # η_k (raw stores)


@dataclass
class GradientIndex:
    """Stage 2's index.json with typed access to its stores."""

    path: Path
    data: dict

    @classmethod
    def open(cls, path: str | Path) -> GradientIndex:
        path = Path(path)
        file = path / INDEX_FILE
        if not file.exists():
            raise FileNotFoundError(
                f"no {file}; run the gradients stage first (dvc repro gradients)"
            )
        data = json.loads(file.read_text())
        check_format(data.get("format_version"), file)
        return cls(path, data)

    @staticmethod
    def write(path: str | Path, data: dict) -> None:
        """Write index.json (the format version is set here)."""
        file = Path(path) / INDEX_FILE
        file.write_text(json.dumps({**data, "format_version": FORMAT_VERSION}, indent=1))

    # ---- what the index says ---------------------------------------------------------------

    @property
    def run_id(self) -> str:
        return self.data["run_id"]

    @property
    def train_ids(self) -> np.ndarray:
        """[N] int64 dataset ids of the training samples (the scores' columns)."""
        return np.asarray(self.data["train_ids"], np.int64)

    @property
    def query_kind(self) -> np.ndarray:
        """[Q] "generated" | "heldout"."""
        return np.asarray(self.data["queries"]["kind"])

    @property
    def query_key(self) -> np.ndarray:
        """[Q] int64: seed of a generated query, dataset id of a held-out one."""
        return np.asarray(self.data["queries"]["key"], np.int64)

    def timesteps(self, grid: str) -> np.ndarray:
        """The timestep grid named "query" | "train" | "profile" | "ema_train"."""
        return np.asarray(self.data["timesteps"][grid], np.int64)

    @property
    def replay_window(self) -> str:
        return self.data["replay_window"]

    @property
    def profile_train_ids(self) -> np.ndarray:
        return np.asarray(self.data["profile_train_ids"], np.int64)

    @property
    def profile_draws(self) -> int:
        return int(self.data["profile_draws"])

    def stores(self) -> list[StoreEntry]:
        return [
            StoreEntry(s["weights"], int(s["step"]), s["path"], tuple(s["sets"]), s.get("lr"))
            for s in self.data["stores"]
        ]

    def trajectory(self, checkpoints: str = "all") -> list[StoreEntry]:
        """The raw-weight stores (one per trajectory checkpoint) in step order; "last": only the
        final one."""
        if checkpoints not in ("all", "last"):
            raise ValueError(f"unknown checkpoints {checkpoints!r}; choose all or last")
        raw = sorted((s for s in self.stores() if s.weights == "raw"), key=lambda s: s.step)
        if not raw:
            raise ValueError("the gradient index lists no raw-weight (trajectory) stores")
        return raw[-1:] if checkpoints == "last" else raw

    def ema(self) -> StoreEntry:
        """The final-EMA store (ValueError if stage 2 ran with gradients.ema: false)."""
        ema = [s for s in self.stores() if s.weights == "ema"]
        if not ema:
            raise ValueError(
                "the gradient index has no EMA store; rerun stage 2 with gradients.ema: true"
            )
        return ema[-1]

    def load(self, entry: StoreEntry) -> tuple[dict, dict[str, np.ndarray]]:
        """(settings, memory-mapped arrays) of one store, checked to come from the index's run."""
        settings, arrays = load_store(self.path / entry.path)
        found = run_identity(settings["training_run"])
        if found != self.run_id:
            raise ValueError(
                f"store {entry.path} was extracted from training run {found}, the index from "
                f"{self.run_id}; recompute the gradients (dvc repro -f gradients)"
            )
        return settings, arrays

    # ---- reading it together with other stages' outputs ------------------------------------

    def check_run(self, run: TrainingRun) -> None:
        """Refuse a training run other than the one these gradients were extracted from."""
        if run.identity != self.run_id:
            raise ValueError(
                f"the gradients in {self.path} come from training run {self.run_id}, the training "
                f"folder {run.path} holds run {run.identity}; rerun the stages in order "
                "(dvc repro)"
            )

    def columns(self, sample_ids: np.ndarray) -> np.ndarray:
        """Column of each sample id among the index's training ids (ValueError if absent)."""
        pos, found = find_ids(self.train_ids, np.asarray(sample_ids, np.int64))
        if not found.all():
            missing = np.unique(np.asarray(sample_ids)[~found])[:10].tolist()
            raise ValueError(
                f"sample ids {missing} are not among the training ids of the gradient index: "
                "the replay log belongs to another run"
            )
        return pos

    def scores(self, values: np.ndarray, settings: dict) -> Scores:
        """Scores [Q, N] whose rows are the index's queries and columns its training ids."""
        return Scores(values, self.train_ids, self.query_kind, self.query_key, settings)

    def provenance(self, store_settings: dict) -> dict:
        """The settings every score made from a store carries: grids, draws, projection, loss,
        the queries' hash and the training run."""
        return {
            "query_timesteps": self.data["timesteps"]["query"],
            "train_grid_timesteps": self.data["timesteps"]["train"],
            "query_draws": store_settings["sets"][QUERY]["draws"],
            "projection": store_settings["projection"],
            "loss": store_settings["loss"],
            "queries_hash": store_settings["queries_hash"],
            "run_id": self.run_id,
        }
