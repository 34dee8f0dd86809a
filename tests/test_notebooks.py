"""Each stage notebook, executed by papermill at smoke scale, leaves its outputs behind."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import papermill as pm
import pytest

ROOT = Path(__file__).resolve().parents[1]

SMOKE = {
    "train": {"steps": 6, "batch_size": 8, "checkpoints": 2, "warmup_steps": 2},
    "sample": {"num_queries": 4, "num_inference_steps": 4, "grid_samples": 4,
               "grid_inference_steps": 2},
}


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """Stage 1 at smoke scale; returns the folder holding data/ and reports/."""
    work = tmp_path_factory.mktemp("pipeline")
    pm.execute_notebook(
        ROOT / "notebooks" / "01_train.ipynb",
        work / "01_train.ipynb",
        parameters={
            "params_file": str(ROOT / "params.yaml"),
            "overrides": SMOKE,
            "out_dir": str(work / "data" / "train"),
            "report_dir": str(work / "reports" / "01_train"),
            "progress": False,
        },
        kernel_name="python3",
        cwd=str(ROOT),
        progress_bar=False,
    )
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
    assert metrics["steps"] == 6 and metrics["n_train"] == 1600 and metrics["n_queries"] == 4
    assert np.isfinite(metrics["final_loss"])
