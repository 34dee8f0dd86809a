"""Each stage notebook, executed by papermill at smoke scale, leaves its outputs behind."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import papermill as pm
import pytest
import yaml

from diffattr.artifacts.scores import Scores
from diffattr.storage.arrays import load_store

ROOT = Path(__file__).resolve().parents[1]
VERDICTS = {"holds", "mixed", "fails", "not run"}

SMOKE = {
    "data": {"max_train": 40},
    "gradients": {
        "query_timesteps": 2,
        "query_draws": 2,
        "heldout_queries": 2,
        "train_timesteps": 2,
        "ema_train_timesteps": 2,
        "profile_timesteps": 3,
        "profile_samples": 2,
        "projection_dim": 32,
    },
    "train": {"steps": 6, "batch_size": 8, "checkpoints": 2, "warmup_steps": 2},
    "sample": {
        "num_queries": 4,
        "num_inference_steps": 4,
        "grid_samples": 4,
        "grid_inference_steps": 2,
    },
    "retrain": {"subsets": 3, "seeds": 2, "steps": 4, "measure_draws": 4, "workers": 1},
    "lds": {
        "methods": ["random", "grad_dot", "tracin", "trak", "ekfac"],
        "dampings": [1e-4, 1e-1, 1e2],
        "removal_queries": 1,
        "removal_methods": ["ekfac"],
    },
}


DVC_STAGES = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def assert_declared_plots(work: Path, stage: str) -> None:
    """Every plot file dvc.yaml declares for the stage was written, with its x and y columns."""
    declared = DVC_STAGES[stage].get("plots", [])
    assert declared, f"dvc.yaml declares no plots for stage {stage!r}"
    for entry in declared:
        ((path, spec),) = entry.items()
        frame = pd.read_csv(work / path)
        assert len(frame) and {spec["x"], spec["y"]} <= set(frame.columns), path


def run_stage(notebook: str, work: Path, parameters: dict | None = None, **paths: str) -> None:
    """Execute notebooks/<notebook>.ipynb at smoke scale with papermill, outputs under work
    (`parameters`: other notebook parameters, e.g. overrides replacing SMOKE)."""
    pm.execute_notebook(
        ROOT / "notebooks" / f"{notebook}.ipynb",
        work / f"{notebook}.ipynb",
        parameters={
            "params_file": str(ROOT / "params.yaml"),
            "overrides": SMOKE,
            "progress": False,
            **{key: str(work / value) for key, value in paths.items()},
            **(parameters or {}),
        },
        kernel_name="python3",
        cwd=str(ROOT),
        progress_bar=False,
    )


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """Stage 1 at smoke scale; returns the folder holding data/ and reports/."""
    work = tmp_path_factory.mktemp("pipeline")
    run_stage("01_train", work, out_dir="data/train", report_dir="reports/01_train")
    return work


@pytest.mark.notebook
def test_train_notebook_writes_checkpoints_queries_figures_and_metrics(trained):
    data, report = trained / "data" / "train", trained / "reports" / "01_train"
    assert sorted(p.name for p in (data / "checkpoints").glob("*.pt")) == [
        "step_0000003.pt",
        "step_0000006.pt",
    ]
    with np.load(data / "queries.npz") as q:
        assert q["images"].shape == (4, 1, 8, 8) and q["seeds"].tolist() == [1000, 1001, 1002, 1003]
    for name in ("training_data", "loss_curve", "samples_per_checkpoint", "queries"):
        assert (report / "figures" / f"{name}.png").stat().st_size > 1000
    metrics = json.loads((report / "metrics.json").read_text())
    assert metrics["steps"] == 6 and metrics["n_train"] == 40 and metrics["n_queries"] == 4
    assert np.isfinite(metrics["final_loss"])
    assert_declared_plots(trained, "train")


@pytest.fixture(scope="module")
def gradients(trained) -> Path:
    """Stage 2 at smoke scale on top of the smoke stage 1."""
    run_stage(
        "02_gradients",
        trained,
        train_dir="data/train",
        out_dir="data/gradients",
        report_dir="reports/02_gradients",
    )
    return trained


@pytest.mark.notebook
def test_gradients_notebook_writes_complete_stores_with_exact_norms(gradients):
    out = gradients / "data" / "gradients"
    index = json.loads((out / "index.json").read_text())
    assert [s["weights"] for s in index["stores"]] == ["raw", "raw", "ema"]
    settings, arrays = load_store(out / index["stores"][-1]["path"])
    assert arrays["query_features"].shape == (4 + 2, 2, 32)  # 4 generated + 2 held out
    assert arrays["train_grid_sqnorm_norm"].shape == (40, 2)
    assert (arrays["query_norm"][:] > 0).all()
    assert settings["projection"]["kind"] == (
        "sparse" if index["device"] == "cpu" else "rademacher"
    )
    raw_settings, raw = load_store(out / index["stores"][0]["path"])
    assert raw["replay_norm"].shape == (len(raw["replay_events"]), 1)
    assert raw["profile_norm"].shape == (2, 3 * 2)
    metrics = json.loads((gradients / "reports" / "02_gradients" / "metrics.json").read_text())
    assert metrics["gradients"] > 0 and metrics["n_params"] == raw_settings["n_params"]
    for name in ("norm_over_t_one_sample", "norm_profile"):
        assert (gradients / "reports" / "02_gradients" / "figures" / f"{name}.png").exists()
    assert_declared_plots(gradients, "gradients")


STAGE_3_4_PATHS = {
    "train_dir": "data/train",
    "gradient_dir": "data/gradients",
    "scores_dir": "data/scores",
}


@pytest.fixture(scope="module")
def bias(gradients) -> Path:
    """Stage 3 at smoke scale on top of the smoke stages 1–2."""
    run_stage(
        "03_timestep_bias", gradients, report_dir="reports/03_timestep_bias", **STAGE_3_4_PATHS
    )
    return gradients


@pytest.mark.notebook
def test_timestep_bias_notebook_saves_scores_figures_and_metrics(bias):
    gradients = bias
    scores = Scores.load(gradients / "data" / "scores" / "tracin")
    assert scores.values.shape == (6, 40) and scores.settings["method"] == "tracin"
    assert Scores.load(gradients / "data" / "scores" / "retrac").settings["method"] == "retrac"
    report = gradients / "reports" / "03_timestep_bias"
    metrics = json.loads((report / "metrics.json").read_text())
    default = ["tracin", "retrac", "calibrated", "grad_cosine", "pixel_cosine", "random"]
    assert metrics["methods"] == default and set(metrics["spearman_norm_vs_topk"]) == set(default)
    assert {row["queries"] for row in metrics["per_query_kind"]} == {"generated", "heldout"}
    claims = [f["claim"] for f in metrics["findings"]]
    assert len(claims) == 4 and all(f["verdict"] in VERDICTS for f in metrics["findings"])
    names = ("norm_profile_band", "norm_vs_topk", "replayed_t_of_proponents", "band_shares")
    for name in names:
        assert (report / "figures" / f"{name}.png").stat().st_size > 1000
    assert_declared_plots(gradients, "timestep_bias")


@pytest.mark.notebook
def test_retrac_notebook_compares_methods_and_writes_metrics(bias):
    gradients = bias
    run_stage("04_retrac", gradients, report_dir="reports/04_retrac", **STAGE_3_4_PATHS)
    report = gradients / "reports" / "04_retrac"
    metrics = json.loads((report / "metrics.json").read_text())
    methods = {row["method"] for row in metrics["specificity"]}
    assert methods == {"tracin", "retrac", "calibrated", "grad_cosine", "pixel_cosine", "random"}
    traced = {row["method"] for row in metrics["image_tracing"]}
    assert traced == {"tracin", "retrac", "calibrated", "grad_cosine", "pixel_cosine"}
    assert all(f["verdict"] in VERDICTS for f in metrics["findings"])
    for name in ("specificity", "top_proponents"):
        assert (report / "figures" / f"{name}.png").stat().st_size > 1000
    assert_declared_plots(gradients, "retrac")


@pytest.fixture(scope="module")
def ground_truth(gradients) -> Path:
    """Stage 5 at smoke scale: 3 subsets × 2 seeds of 4 steps."""
    run_stage(
        "05_ground_truth",
        gradients,
        train_dir="data/train",
        out_dir="data/retrain",
        report_dir="reports/05_ground_truth",
    )
    return gradients


@pytest.mark.notebook
def test_ground_truth_notebook_retrains_measures_and_saves(ground_truth):
    from diffattr.artifacts.ground_truth import GroundTruth

    truth = GroundTruth.load(ground_truth / "data" / "retrain")
    assert truth.masks.shape == (3, 40) and (truth.masks.sum(1) == 20).all()
    assert truth.measurements.shape == (3, 2, 6) and np.isfinite(truth.measurements).all()
    report = ground_truth / "reports" / "05_ground_truth"
    metrics = json.loads((report / "metrics.json").read_text())
    assert metrics["models"] == 6 and metrics["steps_per_model"] == 4
    assert (report / "figures" / "ground_truth_spread.png").stat().st_size > 1000


@pytest.mark.notebook
def test_lds_notebook_scores_every_method_and_retrains_without_top_proponents(ground_truth):
    run_stage(
        "06_lds",
        ground_truth,
        report_dir="reports/06_lds",
        retrain_dir="data/retrain",
        removal_dir="data/removal",
        **{k: v for k, v in STAGE_3_4_PATHS.items() if k != "scores_dir"},
    )
    report = ground_truth / "reports" / "06_lds"
    metrics = json.loads((report / "metrics.json").read_text())
    assert [r["method"] for r in metrics["lds"]] == [
        "random",
        "grad_dot",
        "tracin",
        "trak",
        "ekfac",
    ]
    assert set(metrics["curves"]) == {"trak", "ekfac"}
    assert {r["method"] for r in metrics["removal"]} == {"random", "ekfac"}
    for name in ("lds", "lds_vs_damping", "costs", "removal"):
        assert (report / "figures" / f"{name}.png").stat().st_size > 1000
    assert_declared_plots(ground_truth, "lds")


@pytest.mark.notebook
def test_memorisation_notebook_tabulates_every_method_under_every_protocol(trained):
    """Every generated query counted a copy (ratio 1); the trajectory at the last checkpoint,
    whose epoch window holds every sample (the positive control needs one draw of each)."""
    overrides = {**SMOKE, "gradients": {**SMOKE["gradients"], "checkpoints": "last"}}
    run_stage(
        "07_memorisation",
        trained,
        {"overrides": overrides, "copy_ratio": 1.0},
        train_dir="data/train",
        out_dir="data/memorise",
        report_dir="reports/07_memorisation",
    )
    report = trained / "reports" / "07_memorisation"
    metrics = json.loads((report / "metrics.json").read_text())
    assert metrics["n_copies"] == 4 and metrics["copy_share"] == 1.0
    cells = {(row["method"], row["protocol"]) for row in metrics["table"]}
    assert ("retrac", "positive control") in cells and ("grad_cosine", "interval") in cells
    assert ("pixel_cosine", "epoch") in cells and ("pixel_cosine", "interval") not in cells
    assert ("pixel_cosine", "projection none") in cells
    for name in ("copy_ratios", "copies", "tracing_shares"):
        assert (report / "figures" / f"{name}.png").stat().st_size > 1000
