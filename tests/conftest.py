"""Shared fixtures: tiny datasets and models that build in milliseconds."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

from diffattr.data import ImageDataset  # noqa: E402
from diffattr.params import ModelParams, TrainParams  # noqa: E402


@pytest.fixture
def tiny_dataset() -> ImageDataset:
    """40 random 8×8 grayscale images in [-1, 1] with non-contiguous ids."""
    g = torch.Generator().manual_seed(0)
    images = torch.rand(40, 1, 8, 8, generator=g) * 2 - 1
    ids = np.arange(40, dtype=np.int64) * 3 + 7
    return ImageDataset(
        name="tiny",
        images=images,
        ids=ids,
        labels=np.zeros(40, np.int64),
        is_outlier=np.zeros(40, bool),
    )


@pytest.fixture
def model_params() -> ModelParams:
    return ModelParams(unet="tiny")


@pytest.fixture
def train_params() -> TrainParams:
    return TrainParams(
        steps=8, batch_size=8, lr=1e-3, warmup_steps=2, checkpoints=[4, 8], resume_every=2
    )
