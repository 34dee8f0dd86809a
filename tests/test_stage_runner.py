"""The stage runner (`python -m diffattr.stage`) and the notebook session: misspelt parameters
stop before anything runs, a failed stage prints a short summary and keeps the committed
reports, and a notebook opened from `notebooks/` finds the project and writes under scratch/."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import papermill as pm
import pytest
import yaml

from diffattr.stages.catalog import RUNNER_ENV, STAGES, STUDIES, find_project_root, stage_info
from diffattr.stages.runner import StageParameterError, check_parameter_names, declared_parameters

ROOT = Path(__file__).resolve().parents[1]
SMOKE_PARAMS = {
    "profile": "digits",
    "data": {"max_train": 24},
    "train": {"steps": 4, "batch_size": 8, "checkpoints": 2, "warmup_steps": 1},
    "sample": {
        "num_queries": 2,
        "num_inference_steps": 2,
        "grid_samples": 2,
        "grid_inference_steps": 2,
    },
}


def _git(project: Path, *args: str) -> None:
    subprocess.run(["git", *args], cwd=project, check=True, capture_output=True)


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A git project with dvc.yaml, a smoke-scale params.yaml, stage 1's notebook and a
    committed report (metrics.json and one figure)."""
    shutil.copy(ROOT / "dvc.yaml", tmp_path / "dvc.yaml")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(SMOKE_PARAMS))
    (tmp_path / "notebooks").mkdir()
    shutil.copy(ROOT / "notebooks" / "01_train.ipynb", tmp_path / "notebooks")
    report = tmp_path / "reports" / "01_train"
    (report / "figures").mkdir(parents=True)
    (report / "metrics.json").write_text('{"committed": true}\n')
    (report / "figures" / "loss_curve.png").write_bytes(b"committed figure")
    _git(tmp_path, "init", "-q")
    _git(tmp_path, "add", ".")
    _git(tmp_path, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init")
    return tmp_path


def run_stage(project: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    env.pop(RUNNER_ENV, None)
    command = [sys.executable, "-m", "diffattr.stage", *args]
    return subprocess.run(command, cwd=project, env=env, capture_output=True, text=True)


# ---------------------------------------------------------------------------------------------
# Parameter names, before anything runs


def test_every_stage_has_its_notebook_and_declares_its_folders():
    for info in [*STAGES.values(), *STUDIES.values()]:
        declared = declared_parameters(info.notebook_path(ROOT))
        assert {"params_file", "overrides", *info.inputs, *info.outputs} <= set(declared)


def test_misspelt_parameter_is_an_error_with_did_you_mean():
    info = stage_info("gradients")
    declared = declared_parameters(info.notebook_path(ROOT))
    with pytest.raises(StageParameterError, match="'params_fil' \\(did you mean 'params_file'"):
        check_parameter_names(info, {"params_fil": "params.yaml"}, declared)


def test_runner_refuses_a_misspelt_parameter_before_running_anything(project: Path):
    done = run_stage(project, "train", "-p", "params_fil", "params.yaml")
    assert done.returncode == 2
    assert "did you mean 'params_file'" in done.stderr
    assert not (project / "data").exists()
    assert not list((project / "reports" / "01_train").glob("*.ipynb"))


def test_runner_refuses_an_unknown_stage_with_did_you_mean(project: Path):
    done = run_stage(project, "trian")
    assert done.returncode == 2 and "did you mean 'train'" in done.stderr


# ---------------------------------------------------------------------------------------------
# A failed stage: a short summary, the traceback kept, committed reports restored


def test_failed_stage_prints_a_summary_and_restores_the_committed_reports(project: Path):
    report = project / "reports" / "01_train"
    (report / "metrics.json").unlink()  # as DVC removes a stage's outputs before running it
    (report / "figures" / "half_written.png").write_bytes(b"\x89PNG cut")
    done = run_stage(
        project, "train", "-p", "params_file", "params.yaml",
        "-p", "overrides", "{attribution: {top_k: 1000}}",
    )  # fmt: skip
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    first = next(i for i, line in enumerate(lines) if line.startswith("stage 'train' failed"))
    assert len(lines) - first <= 5, done.stderr  # the summary ends the output ...
    assert len(lines) <= 8, done.stderr  # ... and is short, not a papermill traceback
    assert lines[first].startswith("stage 'train' failed: ValueError: attribution.top_k = 1000")
    failed = report / "01_train.failed.ipynb"
    assert str(failed) in done.stderr and failed.exists()
    assert "Traceback" in failed.read_text() or "ValueError" in failed.read_text()
    assert (report / "metrics.json").read_text() == '{"committed": true}\n'
    assert sorted(p.name for p in (report / "figures").iterdir()) == ["loss_curve.png"]
    assert not (report / "01_train.ipynb").exists() and not (project / "data").exists()


@pytest.mark.notebook
def test_runner_writes_the_pipeline_outputs_and_the_report(project: Path):
    done = run_stage(
        project, "train", "-p", "params_file", "params.yaml", "-p", "out_dir", "data/train",
        "-p", "report_dir", "reports/01_train", "-p", "progress", "false",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    report = project / "reports" / "01_train"
    assert (report / "01_train.ipynb").exists() and not list(report.glob(".*.running.ipynb"))
    assert json.loads((report / "metrics.json").read_text())["steps"] == 4
    assert (project / "data" / "train" / "checkpoints").is_dir()
    assert not (project / "scratch").exists()


def test_runner_writes_a_report_outside_the_project_and_says_where(project: Path, tmp_path):
    """As `make interval` or a study does with its own report folders, but outside the root."""
    elsewhere = tmp_path.parent / f"{tmp_path.name}-elsewhere" / "01_train"
    done = run_stage(
        project, "train", "-p", "params_file", "params.yaml", "-p", "out_dir", "data/train",
        "-p", "report_dir", str(elsewhere), "-p", "progress", "false",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert f"done: {elsewhere.resolve() / '01_train.ipynb'}" in done.stdout
    assert json.loads((elsewhere / "metrics.json").read_text())["steps"] == 4


# ---------------------------------------------------------------------------------------------
# The interactive path: a notebook run from notebooks/ (as JupyterLab does)


def test_project_root_is_found_from_any_subfolder(project: Path):
    (project / "notebooks" / "deep").mkdir()
    assert find_project_root(project / "notebooks" / "deep") == project
    assert find_project_root(project.parent) is None


@pytest.mark.notebook
def test_notebook_run_from_notebooks_folder_uses_params_yaml_and_writes_under_scratch(
    project: Path,
):
    env_before = os.environ.pop(RUNNER_ENV, None)
    try:
        pm.execute_notebook(
            project / "notebooks" / "01_train.ipynb",
            project / "executed.ipynb",
            parameters={"progress": False},
            kernel_name="python3",
            cwd=str(project / "notebooks"),
            progress_bar=False,
        )
    finally:
        if env_before is not None:
            os.environ[RUNNER_ENV] = env_before
    text = "".join(
        "".join(out.get("text", ""))
        for cell in json.loads((project / "executed.ipynb").read_text())["cells"]
        for out in cell.get("outputs", [])
    )
    assert f"parameters: {project / 'params.yaml'}" in text
    assert "scratch/01_train/" in text and "dvc repro" in text
    scratch = project / "scratch" / "01_train"
    assert (scratch / "data" / "train" / "checkpoints").is_dir()
    assert json.loads((scratch / "reports" / "01_train" / "metrics.json").read_text())["steps"] == 4
    assert not (project / "notebooks" / "data").exists()
    assert not (project / "notebooks" / "reports").exists()
    assert not (project / "data").exists()  # the DVC-tracked outputs were not touched
    committed = project / "reports" / "01_train" / "metrics.json"
    assert committed.read_text() == '{"committed": true}\n'
