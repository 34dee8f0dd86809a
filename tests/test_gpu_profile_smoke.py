"""The GPU profiles' code path on the CPU: stages 1-6 end to end on the `cifar2` profile.

CIFAR-10 files written in the official python-batch format, the profile's real DDPM CIFAR-10
UNet (35.7M parameters, attention at 16×16), and everything else at smoke scale: four training
images, two steps, two checkpoints, one timestep and draw per gradient, two retrained subsets.
Whatever a GPU user runs — the CIFAR loader and the cifar2 draw, the 32×32×3 topology through
training, sampling, per-sample gradients, projection, the attribution methods, retraining and
measurement — runs here first. `device: auto`: on a machine with a GPU this runs on it (with
the determinism flags, restored afterwards).

Stage 6 scores the methods that read stage 2's stores (TRAK and D-TRAK with their damping
sweep included) but not K-FAC / EK-FAC: their float64 Kronecker factors of this UNet (113
layers, input dims up to 4609) and eigenbases take about 6 GiB (a CPU fit passed 8.5 GiB) and
their eigendecompositions about 20 CPU-minutes — a GPU's job, far beyond a CPU test
(`tests/test_kfac*.py` test them on small UNets). About 225 CPU-seconds in all.
"""

from __future__ import annotations

import json
import shutil
import time

import numpy as np
import pytest
import torch
from conftest import kept_determinism, write_cifar10

from diffattr import params as params_lib
from diffattr.artifacts.ground_truth import GroundTruth
from diffattr.artifacts.scores import Scores
from diffattr.diffusion.model import UNET_CONFIGS
from diffattr.retraining import ModelStore
from diffattr.stages import gradients as gradient_stage
from diffattr.stages import ground_truth, lds, retrac, timestep_bias, train

DDPM_CIFAR10_PARAMETERS = 35_746_307  # google/ddpm-cifar10-32's UNet

N_TRAIN = 4
N_QUERIES = 1  # generated; as many held-out images
SUBSETS, SEEDS = 2, 1
LDS_METHODS = ["random", "pixel_cosine", "grad_dot", "tracin", "retrac", "trak", "dtrak"]


def smoke_overrides(root) -> dict:
    """The cifar2 profile cut to a few images and steps; the UNet stays the profile's."""
    return {
        "profile": "cifar2",
        "data": {"root": str(root), "max_train": N_TRAIN},
        "train": {"steps": 2, "batch_size": 2, "checkpoints": [1, 2], "warmup_steps": 1},
        "sample": {
            "num_queries": N_QUERIES,
            "num_inference_steps": 2,
            "grid_samples": 1,
            "grid_inference_steps": 1,
        },
        "gradients": {
            "query_timesteps": 1,
            "query_draws": 1,
            "heldout_queries": N_QUERIES,
            "train_timesteps": 1,
            "ema_train_timesteps": 1,
            "profile_timesteps": 2,
            "profile_samples": 1,
            "profile_draws": 1,
            "projection_dim": 16,
            "batch_size": 4,
        },
        "attribution": {"top_k": 2, "sweep_k": [1, 2], "sweep_tau": [0.5]},
        "retrain": {
            "subsets": SUBSETS,
            "seeds": SEEDS,
            "steps": 1,
            "workers": 1,
            "measure_draws": 2,
        },
        "lds": {"methods": LDS_METHODS, "dampings": [1e-3, 1.0], "removal_queries": 0},
    }


@pytest.fixture(scope="module")
def cifar2_run(tmp_path_factory):
    """Stages 1-6 of the cifar2 profile at smoke scale: (params, data folders, report folders,
    each stage's result). Its 1.5 GB of checkpoints and models are removed afterwards."""
    root = tmp_path_factory.mktemp("cifar2")
    write_cifar10(root / "raw", train_per_class=24, test_per_class=4, seed=0)
    P = params_lib.resolve(smoke_overrides(root / "raw"))
    d = {name: root / name for name in ("train", "gradients", "scores", "retrain", "removal")}
    r = {stage: root / "reports" / stage for stage in "123456"}
    out, seconds = {}, {}

    def timed(name, call, *args, **kw):
        started = time.perf_counter()
        out[name] = call(*args, **kw)
        seconds[name] = round(time.perf_counter() - started, 1)

    with kept_determinism():
        timed("train", train.run, P, d["train"], r["1"], progress=False)
        timed("gradients", gradient_stage.run, P, d["train"], d["gradients"], r["2"], False)
        scored = (d["train"], d["gradients"], d["scores"])
        timed("timestep_bias", timestep_bias.run, P, *scored, r["3"])
        timed("retrac", retrac.run, P, *scored, r["4"])
        timed("ground_truth", ground_truth.run, P, d["train"], d["retrain"], r["5"], False)
        args = (d["train"], d["gradients"], d["retrain"], d["removal"], r["6"])
        timed("lds", lds.run, P, *args, progress=False)
    print(f"cifar2 smoke stages, seconds: {seconds}")
    yield P, d, r, out
    shutil.rmtree(root, ignore_errors=True)


def test_the_run_trains_the_profiles_real_unet_on_cifar2(cifar2_run):
    P, d, r, out = cifar2_run
    assert (P.profile, P.data.dataset, P.model.unet) == ("cifar2", "cifar2", "ddpm_cifar10")
    settings = json.loads((d["train"] / "run.json").read_text())["settings"]
    assert settings["model"]["unet"] == "ddpm_cifar10"
    assert settings["dataset"] == "cifar2" and settings["image_shape"] == [3, 32, 32]
    blocks = UNET_CONFIGS["ddpm_cifar10"]["block_out_channels"]
    assert settings["unet_config"]["block_out_channels"] == list(blocks)
    assert out["train"].metrics["n_parameters"] == DDPM_CIFAR10_PARAMETERS
    assert out["gradients"].metrics["n_params"] == DDPM_CIFAR10_PARAMETERS
    assert set(out["train"].dataset.labels.tolist()) <= {1, 7}  # automobiles and horses


def test_every_stage_writes_finite_artifacts_of_the_right_shapes(cifar2_run):
    P, d, r, out = cifar2_run
    n_query = 2 * N_QUERIES  # generated + held-out
    first = out["train"]
    assert first.queries.shape == (N_QUERIES, 3, 32, 32) and torch.isfinite(first.queries).all()
    assert np.isfinite(first.result.loss_history).all()
    assert out["gradients"].metrics["projection_dim"] == 16
    for name in P.attribution.methods:
        scores = Scores.load(d["scores"] / name)
        assert scores.values.shape == (n_query, N_TRAIN), name
        assert np.isfinite(scores.values).all(), name
    truth = GroundTruth.load(d["retrain"])
    assert truth.measurements.shape == (SUBSETS, SEEDS, n_query)
    assert np.isfinite(truth.measurements).all() and np.isfinite(truth.full).all()
    table = out["lds"].table
    assert list(table.method) == LDS_METHODS
    assert np.isfinite(table.lds).all()


def test_every_stage_and_model_records_its_runtime_and_determinism_flags(cifar2_run):
    P, d, r, out = cifar2_run
    on_gpu = torch.cuda.is_available()  # device: auto
    for stage in "123456":
        runtime = json.loads((r[stage] / "metrics.json").read_text())["runtime"]
        assert runtime["torch"] == torch.__version__, stage
        assert runtime["deterministic_algorithms"] is on_gpu, stage
    store = ModelStore.read(d["retrain"] / ground_truth.LDS_STORE)
    assert len(store.finished()) == SUBSETS * SEEDS
    for key in store.finished():
        assert store.record(key)["runtime"]["torch"] == torch.__version__
