"""Keyed randomness, one module for every random draw of the project.

Every draw is a pure function of integers (a seed, a purpose tag from `Tag`, and keys such as
epoch, step and sample id), so it can be regenerated later, on any device, without storing it.

Two generators, for two needs:

- `keyed_generator` / `keyed_normal`: splitmix64 mixes the keys into the seed of a CPU
  `torch.Generator` (training's timesteps and noise, the grid and measurement draws): one small
  draw per key tuple, moved to the device afterwards.
- `hash_index`: a counter-based 32-bit integer hash of (seed, tag, index) computed with int64
  tensor ops on the tensor's own device (the random projections: millions of entries per block,
  identical on CPU and GPU).
"""

from __future__ import annotations

from collections.abc import Sequence
from enum import IntEnum

import torch


class Tag(IntEnum):
    """The purpose of a draw; distinct tags never share a stream."""

    TRAIN_T = 1  # training timestep of (epoch, step, sample)
    TRAIN_EPS = 2  # training noise of (epoch, step, sample)
    EPOCH_PERMUTATION = 3  # batch order of an epoch
    GRID_EPS = 4  # noise of a grid item (sample, timestep, draw)
    MEASURE = 5  # noise and timestep of a measurement draw (LDS ground truth)
    SUBSET = 6  # random training subsets for retraining (LDS ground truth)
    CURVATURE = 7  # timestep and noise of a K-FAC fitting draw
    QUERY_SPLIT = 8  # halves of the queries for choosing damping without peeking
    RETRAIN_SEED = 9  # initialisation / batch-order seed of a retrained model
    SPARSE_BUCKET = 11  # count-sketch bucket of a coordinate
    SPARSE_SIGN = 12
    RADEMACHER_ROW = 13
    RADEMACHER_COL = 14
    GAUSSIAN_ROW = 15
    GAUSSIAN_COL_U1 = 16
    GAUSSIAN_COL_U2 = 17


# ---- splitmix-keyed torch generators ---------------------------------------------------------
_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def key_seed(*keys: int) -> int:
    """Mix integers into one 63-bit seed (order-sensitive, well spread)."""
    h = 0
    for k in keys:
        h = _splitmix64(h ^ (int(k) & _MASK64))
    return h >> 1


def keyed_generator(*keys: int) -> torch.Generator:
    """A CPU `torch.Generator` seeded from the keys."""
    return torch.Generator().manual_seed(key_seed(*keys))


def keyed_normal(
    shape: Sequence[int], keys_per_row: Sequence[Sequence[int]], device: torch.device | str = "cpu"
) -> torch.Tensor:
    """One standard-normal draw of `shape` per key tuple. Returns [len(keys_per_row), *shape].

    Generated on the CPU from each row's own generator, so a row depends on its key alone (not
    on the batch it is drawn in, nor on the device).
    """
    rows = [torch.randn(tuple(shape), generator=keyed_generator(*k)) for k in keys_per_row]
    if not rows:
        return torch.empty((0, *shape), device=device)
    return torch.stack(rows).to(device)


# ---- counter-based integer hash (device-independent) --------------------------------------

MASK32 = 0xFFFFFFFF
# A 32-bit finaliser from Chris Wellons' hash-prospector (the "[16 21f0aaad 15 735a2d97 15]"
# variant of lowbias32): a bijection of [0, 2^32) with low avalanche bias. Both multipliers are
# below 2^31, so x·c < 2^63 for x < 2^32 and int64 tensor arithmetic never overflows.
_MIX_SHIFTS = (16, 15, 15)
_MIX_MULTIPLIERS = (0x21F0AAAD, 0x735A2D97)
_HASH_INIT = 0x243F6A88  # first digits of pi, the initial state of `hash_prefix`


def mix32_int(x: int) -> int:
    """The 32-bit finaliser on a Python int in [0, 2^32); returns an int in [0, 2^32)."""
    s1, s2, s3 = _MIX_SHIFTS
    c1, c2 = _MIX_MULTIPLIERS
    x ^= x >> s1
    x = (x * c1) & MASK32
    x ^= x >> s2
    x = (x * c2) & MASK32
    x ^= x >> s3
    return x


def mix32_(x: torch.Tensor) -> torch.Tensor:
    """In place 32-bit finaliser on an int64 tensor with values in [0, 2^32); returns ``x``.

    Values stay non-negative and below 2^63, so arithmetic shifts act as logical ones and the
    result is the same on every device.
    """
    if x.dtype != torch.int64:
        raise ValueError(f"mix32_ expects an int64 tensor, got {x.dtype}")
    s1, s2, s3 = _MIX_SHIFTS
    c1, c2 = _MIX_MULTIPLIERS
    tmp = torch.empty_like(x)
    x ^= torch.bitwise_right_shift(x, s1, out=tmp)
    x.mul_(c1).bitwise_and_(MASK32)
    x ^= torch.bitwise_right_shift(x, s2, out=tmp)
    x.mul_(c2).bitwise_and_(MASK32)
    x ^= torch.bitwise_right_shift(x, s3, out=tmp)
    return x


def mix32(x: torch.Tensor) -> torch.Tensor:
    """The 32-bit finaliser of int64 values in [0, 2^32); returns a new int64 tensor, same shape."""
    return mix32_(x.to(torch.int64, copy=True))


def hash_prefix(seed: int, tag: int) -> int:
    """Hash state after absorbing the words (seed low 32 bits, seed high 32 bits, tag).

    The state absorbs a word ``w`` as ``h = mix32(h ^ w)``; ``hash_index`` absorbs the last one.
    """
    h = _HASH_INIT
    for word in (seed & MASK32, seed >> 32, tag):
        h = mix32_int(h ^ word)
    return h


def hash_index(seed: int, tag: int, index: torch.Tensor) -> torch.Tensor:
    """Hash of the words (seed_lo, seed_hi, tag, index) for every element of ``index``.

    index: int tensor of values in [0, 2^32), any shape and device. Returns int64 values in
    [0, 2^32), same shape and device; distinct indices give distinct hashes (a bijection).
    """
    x = index.to(torch.int64, copy=True)
    x ^= hash_prefix(seed, tag)
    return mix32_(x)


def uniform_open01(h: torch.Tensor) -> torch.Tensor:
    """Map 32-bit hashes to float64 uniforms in (0, 1), exactly: (h + 0.5) / 2^32."""
    return (h.to(torch.float64) + 0.5) * 2.0**-32
