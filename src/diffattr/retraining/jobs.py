"""Retraining jobs: which training ids a model trains on, and with which seed.

A job is (family, tag, training ids, seed index); its model is a pure function of the job and
the store's base settings. LDS subsets are the family ``lds`` (``lds/m0003_s01``), removal of
top influences is another (``removal/...``). Random subsets come from the project's keyed RNG:
subset m depends on (subset seed, m) alone, so raising M leaves subsets 0..M-1 unchanged.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np
import torch

from diffattr.rng import Tag, key_seed, keyed_generator

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


@dataclass(frozen=True, eq=False)
class RetrainJob:
    """One model to train: on exactly `train_ids` (sorted, unique), with seed `seed_index`.

    family, tag: folder names (letters, digits, `_.-`); the model lives at `<store>/family/tag`.
    info: small JSON-able extras saved with the model (e.g. ``{"subset_index": 3}``).
    """

    family: str
    tag: str
    train_ids: np.ndarray
    seed_index: int
    info: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        for what, name in (("family", self.family), ("tag", self.tag)):
            if not _NAME.match(name):
                raise ValueError(
                    f"job {what} {name!r} must be letters, digits, '_', '.' or '-' (no '/'), "
                    "starting with a letter or digit"
                )
        ids = np.asarray(self.train_ids, dtype=np.int64)
        unique = np.unique(ids)
        if unique.size != ids.size:
            raise ValueError(f"job {self.family}/{self.tag}: training ids repeat")
        if unique.size == 0:
            raise ValueError(f"job {self.family}/{self.tag}: no training ids")
        if self.seed_index < 0:
            raise ValueError(f"job {self.family}/{self.tag}: seed_index must be >= 0")
        object.__setattr__(self, "train_ids", unique)

    @property
    def key(self) -> str:
        """`family/tag`, the model's name and folder in the store."""
        return f"{self.family}/{self.tag}"


def retrain_seed(base_seed: int, seed_index: int) -> int:
    """Training seed (initialisation, batch order, noise) of a retrained model with seed index r:
    a keyed function of (base seed, r), the same for every subset."""
    return key_seed(base_seed, Tag.RETRAIN_SEED, seed_index)


def subset_size(n_train: int, fraction: float) -> int:
    """round(fraction · n_train), checked to leave a non-empty, proper subset."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"subset fraction must be in (0, 1), got {fraction}")
    k = round(fraction * n_train)
    if not 0 < k < n_train:
        raise ValueError(
            f"fraction {fraction} of {n_train} training samples gives {k}; use a fraction "
            "that keeps at least one sample in and one out"
        )
    return k


def subset_mask(n_train: int, fraction: float, seed: int, index: int) -> np.ndarray:
    """Membership of random subset `index`: bool [n_train], round(fraction·n_train) True.

    Depends on (seed, index) alone (a keyed permutation), never on how many subsets are drawn.
    """
    k = subset_size(n_train, fraction)
    perm = torch.randperm(n_train, generator=keyed_generator(seed, Tag.SUBSET, index))
    mask = np.zeros(n_train, dtype=bool)
    mask[perm[:k].numpy()] = True
    return mask


def lds_jobs(
    train_ids: np.ndarray, n_subsets: int, n_seeds: int, fraction: float = 0.5, seed: int = 0
) -> tuple[list[RetrainJob], np.ndarray]:
    """The LDS ground-truth jobs: M random subsets × R seeds, and the subsets' membership.

    train_ids: [N] ids of the full training set (dataset order). Returns (jobs, masks) with
    masks: bool [M, N], masks[m, i] = train_ids[i] is in subset m. Jobs are ordered seed-major
    (every subset with seed 0 first), so a partly finished store holds whole seeds; job
    ``lds/m{m:04d}_s{r:02d}`` trains on subset m with seed index r.
    """
    train_ids = np.asarray(train_ids, dtype=np.int64)
    if n_subsets < 1 or n_seeds < 1:
        raise ValueError(f"need at least one subset and one seed, got M={n_subsets}, R={n_seeds}")
    if np.unique(train_ids).size != train_ids.size:
        raise ValueError("train_ids repeat; pass the training set's ids")
    masks = np.stack([subset_mask(len(train_ids), fraction, seed, m) for m in range(n_subsets)])
    jobs = [
        RetrainJob(
            family="lds",
            tag=f"m{m:04d}_s{r:02d}",
            train_ids=train_ids[masks[m]],
            seed_index=r,
            info={"subset_index": m},
        )
        for r in range(n_seeds)
        for m in range(n_subsets)
    ]
    return jobs, masks
