"""Stage 5's output, read through one typed reader: the LDS ground truth.

`ground_truth.npz` + `ground_truth.json` in the retraining folder: the subsets' membership
masks [M, N], the measurements m(θ, q) of every retrained model [M, R, Q] and of the full
model [Q], who the rows and columns are, and every setting (recipe, draws, run identity).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

GROUND_TRUTH = "ground_truth"
# 1: masks, measurements, full-model measurements, train ids, query kind / key.
FORMAT_VERSION = 1


@dataclass
class GroundTruth:
    """masks: bool [M, N] (True = in subset m); measurements: float64 [M, R, Q] (the query's
    loss under model (m, r)); full: float64 [Q] (stage 1's final EMA model, same draws);
    train_ids [N]; query_kind, query_key [Q]; settings: everything that made them."""

    masks: np.ndarray
    measurements: np.ndarray
    full: np.ndarray
    train_ids: np.ndarray
    query_kind: np.ndarray
    query_key: np.ndarray
    settings: dict

    def save(self, folder: str | Path) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".{GROUND_TRUTH}.tmp.npz"
        np.savez(
            tmp,
            masks=self.masks,
            measurements=self.measurements,
            full=self.full,
            train_ids=self.train_ids,
            query_kind=np.asarray(self.query_kind).astype(str),
            query_key=self.query_key,
        )
        os.replace(tmp, folder / f"{GROUND_TRUTH}.npz")
        meta = {"format_version": FORMAT_VERSION, "settings": self.settings}
        (folder / f"{GROUND_TRUTH}.json").write_text(json.dumps(meta, indent=1, default=str))

    @classmethod
    def load(cls, folder: str | Path) -> GroundTruth:
        folder = Path(folder)
        arrays, meta = folder / f"{GROUND_TRUTH}.npz", folder / f"{GROUND_TRUTH}.json"
        if not arrays.exists() or not meta.exists():
            raise FileNotFoundError(
                f"no LDS ground truth in {folder}; run the retraining stage first "
                "(dvc repro ground_truth)"
            )
        info = json.loads(meta.read_text())
        if info.get("format_version") != FORMAT_VERSION:
            raise ValueError(
                f"{meta} has format {info.get('format_version')}, this code reads "
                f"{FORMAT_VERSION}: rerun the retraining stage (dvc repro ground_truth)"
            )
        with np.load(arrays) as z:
            return cls(
                z["masks"],
                z["measurements"],
                z["full"],
                z["train_ids"],
                z["query_kind"].astype(str),
                z["query_key"],
                info["settings"],
            )
