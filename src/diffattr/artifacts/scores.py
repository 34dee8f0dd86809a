"""Attribution scores on disk: an `.npz` of the arrays beside a `.json` of every setting."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass
class Scores:
    """Scores [n_query, n_train] of one method, with who the rows and columns are.

    values: float64 [Q, N], > 0 = proponent. train_ids: int64 [N]. query_kind: [Q] str
    ("generated" | "heldout", or "train" for training images as queries); query_key: int64 [Q]
    (seed of a generated query, dataset id of a held-out or training one). settings: everything
    that made the scores (method, checkpoints, timesteps, draws, projection, …).
    """

    values: np.ndarray
    train_ids: np.ndarray
    query_kind: np.ndarray
    query_key: np.ndarray
    settings: dict

    def __post_init__(self) -> None:
        self.values = np.asarray(self.values, np.float64)
        self.train_ids = np.asarray(self.train_ids, np.int64)
        self.query_kind = np.asarray(self.query_kind).astype(str)
        self.query_key = np.asarray(self.query_key, np.int64)
        q, n = len(self.query_kind), len(self.train_ids)
        if self.values.shape != (q, n) or len(self.query_key) != q:
            raise ValueError(
                f"scores {self.values.shape} disagree with {q} queries × {n} training samples"
            )
        bad = np.flatnonzero(~np.isfinite(self.values).all(axis=1))
        if len(bad):
            raise ValueError(f"non-finite scores in query rows {bad[:10].tolist()}")

    @property
    def method(self) -> str:
        return self.settings.get("method", "?")

    def select(self, kind: str) -> Scores:
        """The rows of one query kind ("generated" | "heldout")."""
        rows = self.query_kind == kind
        if not rows.any():
            raise ValueError(f"no {kind!r} queries; kinds here: {sorted(set(self.query_kind))}")
        return Scores(
            self.values[rows],
            self.train_ids,
            self.query_kind[rows],
            self.query_key[rows],
            {**self.settings, "queries": kind},
        )

    def save(self, path: str | Path) -> None:
        """Write `path.npz` and `path.json` (atomically, each via a temporary file)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp.npz")
        np.savez(
            tmp,
            values=self.values,
            train_ids=self.train_ids,
            query_kind=self.query_kind.astype(str),
            query_key=self.query_key,
        )
        os.replace(tmp, _with(path, ".npz"))
        meta = {"shape": list(self.values.shape), "settings": self.settings}
        tmp_json = path.with_name(path.name + ".tmp.json")
        tmp_json.write_text(json.dumps(meta, indent=1, sort_keys=True))
        os.replace(tmp_json, _with(path, ".json"))

    @classmethod
    def load(cls, path: str | Path) -> Scores:
        path = Path(path)
        arrays_path, meta_path = _with(path, ".npz"), _with(path, ".json")
        if not arrays_path.exists() or not meta_path.exists():
            raise FileNotFoundError(
                f"no scores at {path} (expected {arrays_path.name} and {meta_path.name}); run "
                "the stage that computes them first"
            )
        meta = json.loads(meta_path.read_text())
        with np.load(arrays_path) as z:
            return cls(
                z["values"],
                z["train_ids"],
                z["query_kind"].astype(str),
                z["query_key"],
                meta["settings"],
            )


def _with(path: Path, suffix: str) -> Path:
    """path + suffix, keeping dots in the name (`tracin_tau0.5` → `tracin_tau0.5.npz`)."""
    return path.with_name(path.name + suffix)
