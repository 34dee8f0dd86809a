"""Shared fixtures: tiny datasets and models that build in milliseconds."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

from diffattr.data.datasets import ImageDataset  # noqa: E402
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


# A tiny run of stages 1–2 with unprojected gradients, shared by the attribution tests.
SMOKE_PIPELINE = {
    "data": {"max_train": 12},
    "train": {"steps": 6, "batch_size": 4, "checkpoints": [2, 6], "warmup_steps": 1},
    "sample": {
        "num_queries": 2,
        "num_inference_steps": 4,
        "grid_samples": 2,
        "grid_inference_steps": 2,
    },
    "gradients": {
        "query_timesteps": 2,
        "query_draws": 2,
        "heldout_queries": 2,
        "train_timesteps": 2,
        "ema_train_timesteps": 3,
        "train_grid_at": "all",
        "profile_timesteps": 4,
        "profile_samples": 3,
        "profile_draws": 2,
        "projection": "none",
        "ema": False,
    },
}


@pytest.fixture(scope="session")
def smoke_pipeline(tmp_path_factory):
    """(params, train_dir, gradient_dir) of a 6-step run with 2 checkpoints, 2 generated and 2
    held-out queries, and stores of full (unprojected) gradients."""
    from diffattr import params as params_lib
    from diffattr.stages import train as train_stage
    from diffattr.stages.gradients import run_gradient_stage

    root = tmp_path_factory.mktemp("pipeline")
    P = params_lib.resolve(SMOKE_PIPELINE)
    train_stage.run(P, root / "train", root / "reports", progress=False)
    run_gradient_stage(P, root / "train", root / "gradients", torch.device("cpu"), False)
    return P, root / "train", root / "gradients"


def method_inputs_of(pipeline):
    """MethodInputs of a smoke pipeline (params, train_dir, gradient_dir)."""
    from diffattr.stages.inputs import method_inputs

    P, train_dir, gradient_dir = pipeline
    return method_inputs(P, train_dir, gradient_dir)


@pytest.fixture(scope="session")
def smoke_pipeline_interval(smoke_pipeline):
    """The same run with gradients over the "interval" replay window: every step since the
    previous checkpoint, so samples have 0, 1 or several draws per window."""
    from diffattr import params as params_lib
    from diffattr.stages.gradients import run_gradient_stage

    _, train_dir, gradient_dir = smoke_pipeline
    overrides = {**SMOKE_PIPELINE, "gradients": {**SMOKE_PIPELINE["gradients"]}}
    overrides["gradients"]["replay_window"] = "interval"
    P = params_lib.resolve(overrides)
    out = gradient_dir.parent / "gradients_interval"
    run_gradient_stage(P, train_dir, out, torch.device("cpu"), False)
    return P, train_dir, out


@pytest.fixture(scope="session")
def smoke_pipeline_ema(smoke_pipeline):
    """The same run with the final-EMA store (TRAK / D-TRAK features), projected to 16 dims."""
    from diffattr import params as params_lib
    from diffattr.stages.gradients import run_gradient_stage

    _, train_dir, gradient_dir = smoke_pipeline
    overrides = {**SMOKE_PIPELINE, "gradients": {**SMOKE_PIPELINE["gradients"]}}
    overrides["gradients"].update(ema=True, projection="sparse", projection_dim=16)
    P = params_lib.resolve(overrides)
    out = gradient_dir.parent / "gradients_ema"
    run_gradient_stage(P, train_dir, out, torch.device("cpu"), False)
    return P, train_dir, out


@pytest.fixture(scope="session")
def smoke_pipeline_ema_exact(smoke_pipeline):
    """The same run with the final-EMA store and no projection (exact inner products)."""
    from diffattr import params as params_lib
    from diffattr.stages.gradients import run_gradient_stage

    _, train_dir, gradient_dir = smoke_pipeline
    overrides = {**SMOKE_PIPELINE, "gradients": {**SMOKE_PIPELINE["gradients"]}}
    overrides["gradients"].update(ema=True, projection="none")
    P = params_lib.resolve(overrides)
    out = gradient_dir.parent / "gradients_ema_exact"
    run_gradient_stage(P, train_dir, out, torch.device("cpu"), False)
    return P, train_dir, out


@pytest.fixture(scope="session")
def smoke_pipeline_warmup(tmp_path_factory):
    """The smoke run with a 3-step warm-up and cosine decay (learning rates lr·[1/3, 2/3, 1, 1,
    3/4, 1/4] over its 6 steps), checkpoints at the uneven steps 2 and 6, gradients over the
    "interval" replay window."""
    from diffattr import params as params_lib
    from diffattr.stages import train as train_stage
    from diffattr.stages.gradients import run_gradient_stage

    root = tmp_path_factory.mktemp("pipeline_warmup")
    overrides = {
        **SMOKE_PIPELINE,
        "train": {**SMOKE_PIPELINE["train"], "warmup_steps": 3, "lr_decay": "cosine"},
        "gradients": {**SMOKE_PIPELINE["gradients"], "replay_window": "interval"},
    }
    P = params_lib.resolve(overrides)
    train_stage.run(P, root / "train", root / "reports", progress=False)
    run_gradient_stage(P, root / "train", root / "gradients", torch.device("cpu"), False)
    return P, root / "train", root / "gradients"
