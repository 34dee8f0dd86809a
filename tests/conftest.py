"""Shared fixtures and helpers: tiny datasets and models that build in milliseconds, writers of
the real on-disk formats, a guard for torch's process-wide determinism flags."""

from __future__ import annotations

import contextlib
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

from diffattr.data.datasets import ImageDataset  # noqa: E402
from diffattr.params import ModelParams, TrainParams  # noqa: E402


@contextlib.contextmanager
def kept_determinism():
    """Restore torch's determinism flags and CUBLAS_WORKSPACE_CONFIG on exit (they are
    process-wide: a test that switches them on must not change the tests after it)."""
    saved = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
        torch.backends.cudnn.deterministic,
        torch.backends.cudnn.benchmark,
        os.environ.get("CUBLAS_WORKSPACE_CONFIG"),
    )
    try:
        yield
    finally:
        enabled, warn_only, cudnn_deterministic, cudnn_benchmark, cublas = saved
        torch.use_deterministic_algorithms(enabled, warn_only=warn_only)
        torch.backends.cudnn.deterministic = cudnn_deterministic
        torch.backends.cudnn.benchmark = cudnn_benchmark
        if cublas is None:
            os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
        else:
            os.environ["CUBLAS_WORKSPACE_CONFIG"] = cublas


CIFAR10_CLASSES = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)


def write_cifar_batch(path: Path, images: np.ndarray, labels: np.ndarray) -> None:
    """Write uint8 [n, 3, 32, 32] like a CIFAR-10 python batch (pickled dict, bytes keys;
    b"data" uint8 [n, 3072], each row the R, G, B planes row-major)."""
    batch = {
        b"batch_label": b"fake batch",
        b"labels": [int(x) for x in labels],
        b"data": images.reshape(len(images), -1),
        b"filenames": [f"img_{i}.png".encode() for i in range(len(images))],
    }
    with open(path, "wb") as fh:
        pickle.dump(batch, fh, protocol=2)


def write_cifar10(root: Path, train_per_class: int, test_per_class: int, seed: int = 0) -> Path:
    """A fake CIFAR-10 in the layout of the official python tarball: `root/cifar-10-batches-py/`
    with data_batch_1..5 (train_per_class images of each class spread over the five), test_batch
    and batches.meta; random pixels, shuffled labels. Returns the batches folder."""
    folder = Path(root) / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.arange(10 * train_per_class) % 10)
    images = rng.integers(0, 256, (len(labels), 3, 32, 32), dtype=np.uint8)
    for b, rows in enumerate(np.array_split(np.arange(len(labels)), 5)):
        write_cifar_batch(folder / f"data_batch_{b + 1}", images[rows], labels[rows])
    test_labels = rng.permutation(np.arange(10 * test_per_class) % 10)
    test = rng.integers(0, 256, (len(test_labels), 3, 32, 32), dtype=np.uint8)
    write_cifar_batch(folder / "test_batch", test, test_labels)
    meta = {
        b"label_names": [c.encode() for c in CIFAR10_CLASSES],
        b"num_cases_per_batch": int(np.ceil(len(labels) / 5)),
        b"num_vis": 3 * 32 * 32,
    }
    with open(folder / "batches.meta", "wb") as fh:
        pickle.dump(meta, fh, protocol=2)
    return folder


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
