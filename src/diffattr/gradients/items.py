"""What gradients are taken of: items = (image, timestep, noise draws), keyed and replayable.

An `ItemSet` has N rows (images) and M columns (timesteps); cell (i, m) is the image x0_i at
timestep t[i, m] with S noise draws. Its gradient is the mean over the S draws. Every draw is a
pure function of integer keys, so the same set gives the same numbers at every checkpoint.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from diffattr.data.datasets import ImageDataset
from diffattr.diffusion.draws import train_noise
from diffattr.diffusion.replay import ReplayLog
from diffattr.rng import Tag, keyed_normal

# Who an image is, in grid-noise keys (so a query and a training image never share draws).
REPLAY_WINDOWS = ("epoch", "interval")
KIND_TRAIN = 0
KIND_GENERATED = 1
KIND_HELDOUT = 2


@dataclass
class ItemSet:
    """x0: [N, C, H, W]; t: [N, M] int64; noise(rows) → [len(rows), M, S, C, H, W]."""

    x0: torch.Tensor
    t: torch.Tensor
    draws: int
    noise: Callable[[np.ndarray], torch.Tensor]

    @property
    def n(self) -> int:
        return int(self.x0.shape[0])

    @property
    def m(self) -> int:
        return int(self.t.shape[1])


def timestep_grid(count: int, num_train_timesteps: int = 1000) -> np.ndarray:
    """`count` evenly spaced timesteps covering [0, T) (cell centres). Returns [count] int64."""
    if count < 1:
        raise ValueError(f"a timestep grid needs ≥ 1 timestep, got {count}")
    edges = np.linspace(0, num_train_timesteps, count + 1)
    return np.floor((edges[:-1] + edges[1:]) / 2).astype(np.int64)


def grid_cell(t: np.ndarray, n_cells: int, num_train_timesteps: int) -> np.ndarray:
    """Index [E] of the evenly spaced grid cell of [0, T) each timestep t [E] falls in."""
    return np.minimum((np.asarray(t, np.int64) * n_cells) // num_train_timesteps, n_cells - 1)


def grid_items(
    x0: torch.Tensor,
    keys: np.ndarray,
    kind: int,
    timesteps: np.ndarray,
    draws: int,
    seed: int,
) -> ItemSet:
    """Every image at every grid timestep, `draws` keyed noise draws per cell.

    keys: [N] int, the image ids (dataset ids, or query indices) keying the noise together
    with `kind`, the timestep and the draw index.
    """
    keys = np.asarray(keys, np.int64)
    if len(keys) != len(x0):
        raise ValueError(f"{len(x0)} images but {len(keys)} keys")
    grid = torch.as_tensor(np.asarray(timesteps, np.int64))
    shape = tuple(x0.shape[1:])

    def noise(rows: np.ndarray) -> torch.Tensor:
        cells = [
            (seed, Tag.GRID_EPS, kind, int(keys[r]), int(t), s)
            for r in rows
            for t in grid
            for s in range(draws)
        ]
        return keyed_normal(shape, cells).reshape(len(rows), len(grid), draws, *shape)

    return ItemSet(x0=x0, t=grid.expand(len(x0), -1).clone(), draws=draws, noise=noise)


def replay_items(dataset: ImageDataset, log: ReplayLog, events: np.ndarray) -> ItemSet:
    """The training draws of the given replay-log rows, exactly as training made them
    (same image, t and ε): N = len(events), M = S = 1."""
    seed, shape = log.settings["seed"], tuple(dataset.image_shape)
    sample_ids, steps, epochs = log.sample_id[events], log.step[events], log.epoch[events]
    x0 = dataset.images[torch.from_numpy(dataset.positions(sample_ids))]
    t = torch.from_numpy(log.t[events].astype(np.int64)).unsqueeze(1)

    def noise(rows: np.ndarray) -> torch.Tensor:
        eps = torch.cat(
            [
                train_noise(seed, int(steps[r]), [int(epochs[r])], [int(sample_ids[r])], shape)
                for r in rows
            ]
        )
        return eps.reshape(len(rows), 1, 1, *shape)

    return ItemSet(x0=x0, t=t, draws=1, noise=noise)


def replay_window(log: ReplayLog, checkpoint: int, previous: int, window: str) -> np.ndarray:
    """Replay-log rows that checkpoint `checkpoint` (weights after that many steps) stands for.

    window "epoch": each training sample's most recent draw before the checkpoint — exactly
    one event per sample that was drawn at all, i.e. the last epoch as the paper means it
    (batches cut a stream of shuffles, so a fixed span of steps would miss some samples and
    count others twice); "interval": every draw of the steps since the previous checkpoint
    the stage extracts at (`previous`, 0 for the first). Returns sorted row indices.
    """
    if window == "interval":
        return log.events(previous, checkpoint - 1)
    if window != "epoch":
        raise ValueError(
            f"unknown replay window {window!r}; choose one of {', '.join(REPLAY_WINDOWS)}"
        )
    before = log.events(0, checkpoint - 1)
    # The log is in step order: the last occurrence of an id is its most recent draw.
    reversed_ids = log.sample_id[before][::-1]
    _, first_in_reversed = np.unique(reversed_ids, return_index=True)
    return np.sort(before[len(before) - 1 - first_in_reversed])


def concat_items(parts: list[ItemSet]) -> ItemSet:
    """Rows of several sets (same timesteps and draws) one after another; noise stays keyed
    by each part's own keys."""
    if len(parts) == 1:
        return parts[0]
    sizes = np.cumsum([0] + [p.n for p in parts])

    def noise(rows: np.ndarray) -> torch.Tensor:
        out = []
        for i, part in enumerate(parts):
            sel = rows[(rows >= sizes[i]) & (rows < sizes[i + 1])] - sizes[i]
            if len(sel):
                out.append(part.noise(sel))
        return torch.cat(out)

    return ItemSet(
        torch.cat([p.x0 for p in parts]), torch.cat([p.t for p in parts]), parts[0].draws, noise
    )
