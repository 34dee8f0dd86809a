"""Training's keyed draws: timesteps, noise and batch order, each a pure function of integers
(seed, epoch, step, sample id), so any draw can be regenerated later on any device.

The epoch is part of every key: when n_train % batch_size ≠ 0 a batch can span two epochs and
hold the same sample twice; its two draws then differ.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from diffattr.rng import Tag, key_seed, keyed_generator, keyed_normal


def train_timesteps(
    seed: int,
    step: int,
    epochs: Sequence[int],
    sample_ids: Sequence[int],
    num_train_timesteps: int,
) -> torch.Tensor:
    """Timestep draws, uniform on [0, T), of each (epoch, sample) at a step. Returns [B] int64."""
    return torch.tensor(
        [
            int(
                torch.randint(
                    num_train_timesteps,
                    (1,),
                    generator=keyed_generator(seed, Tag.TRAIN_T, int(e), step, int(i)),
                )
            )
            for e, i in zip(epochs, sample_ids, strict=True)
        ],
        dtype=torch.long,
    )


def train_noise(
    seed: int,
    step: int,
    epochs: Sequence[int],
    sample_ids: Sequence[int],
    image_shape: Sequence[int],
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """The ε draws of each (epoch, sample) at a step. Returns [B, C, H, W]."""
    keys = [
        (seed, Tag.TRAIN_EPS, int(e), step, int(i)) for e, i in zip(epochs, sample_ids, strict=True)
    ]
    return keyed_normal(image_shape, keys, device)


def epoch_permutation(seed: int, epoch: int, n: int) -> np.ndarray:
    """Order of the n training rows in an epoch. Returns [n] int64 row positions."""
    return np.random.default_rng(key_seed(seed, Tag.EPOCH_PERMUTATION, epoch)).permutation(n)


def batch_rows(step: int, batch_size: int, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Row positions of the batch at `step` and the epoch each belongs to: a stream of seeded
    epoch permutations cut in consecutive batches (each epoch shows every sample once).
    Returns (rows [batch_size] int64, epochs [batch_size] int64)."""
    if n < 1:
        raise ValueError("the training set is empty: no batch can be drawn")
    positions = np.arange(step * batch_size, (step + 1) * batch_size)
    epochs = positions // n
    out = np.empty(batch_size, np.int64)
    for epoch in np.unique(epochs):
        sel = epochs == epoch
        out[sel] = epoch_permutation(seed, int(epoch), n)[positions[sel] % n]
    return out, epochs.astype(np.int64)
