"""`dvc repro` interrupted for real, on a copy of the project: a killed stage 2 keeps the stores it
finished (data/gradients is `persist: true`) and the rerun computes only what was unfinished; a
failed stage leaves the committed reports as they were.

Each test runs `dvc repro` in a git copy of this project (tracked and untracked, not ignored
files) at smoke scale: a few minutes on two cores. They run with the rest (`make test`, CI);
`pytest -m dvc` or `make test-dvc` runs only them, `-m "not dvc"` skips them.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from dvc_project import copy_project, dvc_env, git

from diffattr import params as params_lib
from diffattr.stages.gradients import run_gradient_stage
from diffattr.storage.arrays import load_store
from diffattr.storage.checkpoints import work_folder

pytest.importorskip("dvc", reason="dvc is not installed: these tests run `dvc repro`")
psutil = pytest.importorskip("psutil", reason="psutil (a dependency of dvc) is not installed")

pytestmark = pytest.mark.dvc

TIMEOUT_S = 600  # per dvc command; a smoke-scale stage takes seconds to a minute

# Two checkpoints (steps 3 and 6), so stage 2 makes two stores: raw_step_0000003 (24 gradients)
# and raw_step_0000006 (88, most of them in 8 batches of its training-grid set), the one
# interrupted.
PARAMS = {
    "profile": "digits",
    "device": "cpu",
    "data": {"max_train": 8},
    "model": {},
    "train": {"steps": 6, "batch_size": 4, "checkpoints": 2, "warmup_steps": 1},
    "sample": {
        "num_queries": 2,
        "num_inference_steps": 2,
        "grid_samples": 2,
        "grid_inference_steps": 2,
    },
    "gradients": {
        "query_timesteps": 2,
        "query_draws": 1,
        "heldout_queries": 1,
        "train_timesteps": 8,
        "profile_timesteps": 3,
        "profile_samples": 2,
        "profile_draws": 1,
        "projection_dim": 16,
        "batch_size": 8,
        "ema": False,
    },
    "attribution": {"top_k": 4},
    "retrain": {},
    "lds": {},
}


# ---------------------------------------------------------------------------------------------
# A copy of the project, and dvc run in it


def _dvc_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "dvc", *args]


def dvc(project: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        _dvc_command(*args),
        cwd=project,
        env=dvc_env(project),
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )


def _copy(source: Path, project: Path) -> Path:
    """A copy of a project folder (git, DVC cache and workspace), without DVC's locks."""
    shutil.copytree(source, project, ignore=lambda d, _: ["tmp"] if Path(d).name == ".dvc" else [])
    return project


@pytest.fixture(scope="module")
def trained_project(tmp_path_factory) -> Path:
    """A git copy of this project with a smoke-scale params.yaml, after `dvc repro train`."""
    project = copy_project(tmp_path_factory.mktemp("dvc") / "project", PARAMS)
    done = dvc(project, "repro", "train")
    assert done.returncode == 0, done.stdout + done.stderr
    return project


@pytest.fixture(scope="module")
def uninterrupted(trained_project, tmp_path_factory) -> Path:
    """Stage 2 of the trained project run in one go (in this process): the reference."""
    P = params_lib.load(trained_project / "params.yaml")
    out = tmp_path_factory.mktemp("uninterrupted") / "gradients"
    run_gradient_stage(P, trained_project / "data" / "train", out, torch.device("cpu"), False)
    return out


# ---------------------------------------------------------------------------------------------
# Reading stores while a stage writes them


def _meta(store: Path) -> dict:
    return json.loads((store / "meta.json").read_text())


def _finished_stores(out: Path) -> list[Path]:
    """Complete stores moved into the stage's output folder."""
    if not out.is_dir():
        return []
    return sorted(p for p in out.iterdir() if (p / "meta.json").exists() and _meta(p)["complete"])


def _done_rows(store: Path, set_name: str) -> int:
    """Rows of one gradient set a store holds: norm (and features, if kept) written."""
    done = None
    for array in (f"{set_name}_norm", f"{set_name}_features"):
        mask = store / f"{array}.done.npy"
        if mask.exists():
            rows = np.load(mask).astype(bool)
            done = rows if done is None else done & rows
    return 0 if done is None else int(done.sum())


def _work_store(out: Path, name: str) -> Path | None:
    """The unfinished store `name` in the stage's work folder (named `<name>-<settings hash>`)."""
    found = [p for p in work_folder(out).glob(f"{name}-*") if (p / "meta.json").exists()]
    assert len(found) <= 1, found
    return found[0] if found else None


def _in_progress(out: Path) -> list[Path]:
    """Unfinished stores in the work folder that hold at least one computed row."""
    if not work_folder(out).is_dir():
        return []
    found = []
    for store in work_folder(out).iterdir():
        if not (store / "meta.json").exists():
            continue
        sets = _meta(store)["settings"]["sets"]
        if any(_done_rows(store, s) for s in sets):
            found.append(store)
    return found


def _interruptible(out: Path) -> bool:
    """Whether a store is finished and another holds computed rows. Read while the stage
    writes: a store moved away between two reads counts as not yet."""
    try:
        return bool(_finished_stores(out) and _in_progress(out))
    except (OSError, ValueError):  # FileNotFoundError of a moved store
        return False


def _gradients_left(out: Path, name: str, sets: dict) -> int:
    """Gradients (image × timestep cells) store `name` still needs: all of its sets' cells
    but the rows its unfinished copy in the work folder holds."""
    work = _work_store(out, name)
    return sum(
        (s["n"] - (_done_rows(work, set_name) if work else 0)) * s["m"]
        for set_name, s in sets.items()
    )


def _snapshot(store: Path) -> dict[str, tuple]:
    """(inode, mtime, size, sha256) of every file of a store: a rewrite changes one."""
    return {
        f.name: (f.stat().st_ino, f.stat().st_mtime_ns, f.stat().st_size, _sha256(f))
        for f in sorted(store.iterdir())
    }


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _wait_for(condition, process: subprocess.Popen, log: Path, timeout: float) -> None:
    """Poll `condition()` every 20 ms until it holds; fail if the process ends first."""
    deadline = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None:
            pytest.fail(
                f"dvc repro ended (exit {process.returncode}) before the state to interrupt "
                f"was reached:\n{log.read_text()[-3000:]}"
            )
        if time.monotonic() > deadline:
            pytest.fail(
                f"state to interrupt not reached in {timeout} s:\n{log.read_text()[-3000:]}"
            )
        time.sleep(0.02)


def _wait_gone(processes: list, timeout: float) -> None:
    """Wait until every process has exited (a zombie left to its new parent counts)."""
    deadline = time.monotonic() + timeout
    alive = list(processes)
    while alive and time.monotonic() < deadline:
        alive = [p for p in alive if _alive(p)]
        time.sleep(0.05)
    for p in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    assert not alive, f"processes of the interrupted dvc repro still ran after {timeout} s: {alive}"


def _alive(process) -> bool:
    try:
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _as_typed_in_a_terminal() -> None:
    """In the child before exec: Ctrl-C's default action, as in an interactive shell. A command
    started in the background by a shell without job control (`make test &` in a script, some
    CI runners) inherits SIGINT *ignored*, and so would dvc and its stage runner: the Ctrl-C
    would do nothing and the stage would finish (three such full-suite runs here)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _interrupt_repro(project: Path, out: Path, log: Path, how: str):
    """Start `dvc repro gradients` in project, interrupt it (`how`: ctrl-c or kill-9) once a
    store is finished and the next holds computed rows; (process, its log)."""
    with log.open("w") as sink:
        process = subprocess.Popen(
            _dvc_command("repro", "gradients"),
            cwd=project,
            env=dvc_env(project),
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group, as a command typed in a terminal
            preexec_fn=_as_typed_in_a_terminal,
        )
    try:
        _wait_for(lambda: _interruptible(out), process, log, TIMEOUT_S)
        tree = psutil.Process(process.pid).children(recursive=True)
        if how == "ctrl-c":
            os.killpg(process.pid, signal.SIGINT)
        else:
            os.killpg(process.pid, signal.SIGKILL)
            for child in tree:  # the kernel runs in a session of its own
                with contextlib.suppress(psutil.NoSuchProcess):
                    child.kill()
        process.wait(timeout=TIMEOUT_S)
        _wait_gone(tree, timeout=120)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    return process, log.read_text()


def _committed_reports_intact(project: Path, report: str) -> None:
    """The report folder holds exactly its committed files (a failed notebook aside, which is
    git-ignored)."""
    changed = git(project, "status", "--porcelain", "--untracked-files=all", "--", report)
    assert changed == "", f"{report} differs from the committed reports:\n{changed}"
    committed = git(project, "ls-files", "--", report).split()
    assert committed, f"nothing of {report} is committed in the copy"
    for name in committed:
        assert (project / name).read_bytes() == subprocess.run(
            ["git", "show", f"HEAD:{name}"], cwd=project, capture_output=True, check=True
        ).stdout, name


# ---------------------------------------------------------------------------------------------
# Killed during stage 2


@pytest.mark.parametrize("how", ["ctrl-c", "kill-9"])
def test_killed_dvc_repro_recomputes_only_the_unfinished_store(
    trained_project, uninterrupted, tmp_path, how
):
    """`dvc repro gradients` is interrupted once a store is finished and the next one holds
    computed rows: by Ctrl-C (SIGINT to dvc's process group, as a terminal sends it; the stage
    runner shuts the notebook's kernel down) or by SIGKILL to the whole process tree, kernel
    included (a preempted job). The rerun leaves the finished stores' files untouched, computes
    exactly the cells that were missing, and ends with the stores of an uninterrupted run."""
    project = _copy(trained_project, tmp_path / "project")
    out = project / "data" / "gradients"
    process, interrupted_log = _interrupt_repro(project, out, tmp_path / "run.log", how)
    assert process.returncode != 0, interrupted_log[-3000:]

    # What the interruption left: finished stores in data/gradients, the rest unfinished.
    stores = {
        p.name: _meta(p)["settings"]["sets"] for p in sorted(uninterrupted.iterdir()) if p.is_dir()
    }
    finished = {p.name: _snapshot(p) for p in _finished_stores(out)}
    unfinished = sorted(set(stores) - set(finished))
    assert finished and unfinished, (finished.keys(), unfinished, interrupted_log[-3000:])
    assert not (out / "index.json").exists()
    left = sum(_gradients_left(out, name, stores[name]) for name in unfinished)
    total = sum(s["n"] * s["m"] for sets in stores.values() for s in sets.values())
    assert 0 < left < total
    if how == "ctrl-c":  # the stage runner restored the reports DVC had removed
        assert "stage 'gradients' failed" in interrupted_log, interrupted_log[-3000:]
        _committed_reports_intact(project, "reports/02_gradients")

    rerun = dvc(project, "repro", "gradients")
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr

    # The finished stores were kept as they were, and only the missing cells were computed.
    for name, files in finished.items():
        assert _snapshot(out / name) == files, f"finished store {name} was rewritten"
    index = json.loads((out / "index.json").read_text())
    assert index["throughput"]["gradients"] == left, (left, total, index["throughput"])
    assert not work_folder(out).exists()
    assert dvc(project, "status", "gradients").stdout.strip().endswith("up to date.")

    # ... and the result is the uninterrupted run's.
    reference = json.loads((uninterrupted / "index.json").read_text())
    assert reference["throughput"]["gradients"] == total
    for varying in ("throughput", "wall_time_s"):
        index.pop(varying), reference.pop(varying)
    assert index == reference
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in uninterrupted.iterdir())
    for name in stores:
        settings, arrays = load_store(out / name)
        expected_settings, expected = load_store(uninterrupted / name)
        assert settings == expected_settings
        assert arrays.keys() == expected.keys()
        for array in arrays:
            np.testing.assert_array_equal(arrays[array], expected[array], err_msg=array)


# ---------------------------------------------------------------------------------------------
# A failed stage


def test_failed_stage_under_dvc_repro_keeps_the_committed_reports(trained_project, tmp_path):
    """A value that only the notebook refuses (a misspelt projection kind): DVC removes the
    stage's report outputs before running it, the stage fails, and the report folder is back to
    its committed files; the failed notebook is kept beside them (git-ignored)."""
    project = _copy(trained_project, tmp_path / "project")
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["gradients"]["projection"] = "sprase"
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    lock = (project / "dvc.lock").read_text()
    done = dvc(project, "repro", "gradients")
    assert done.returncode != 0
    assert "stage 'gradients' failed: ValueError" in done.stderr, done.stderr
    assert "sprase" in done.stderr and "sparse" in done.stderr, done.stderr
    _committed_reports_intact(project, "reports/02_gradients")
    assert (project / "reports" / "02_gradients" / "02_gradients.failed.ipynb").exists()
    assert (project / "dvc.lock").read_text() == lock  # nothing recorded of the failed run
