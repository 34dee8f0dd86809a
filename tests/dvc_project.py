"""A git copy of this project with its own params.yaml, and the environment `make` gives dvc:
shared by the tests that run real `dvc repro` commands (test_dvc_interrupt, test_check_reports).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch
import yaml

from diffattr.stages.catalog import RUNNER_ENV, SCRATCH_ENV

ROOT = Path(__file__).resolve().parents[1]


def git(project: Path, *args: str) -> str:
    """stdout of `git args` run in `project` (raises on failure)."""
    done = subprocess.run(["git", *args], cwd=project, check=True, capture_output=True)
    return done.stdout.decode()


def dvc_env(project: Path) -> dict[str, str]:
    """The environment of a `dvc repro` in `project`: its own sources, this venv's `python`
    (what dvc.yaml's commands call) first on PATH, no analytics, PYTHONHASHSEED as the Makefile
    sets it, no stage-runner or check-reports markers inherited from this process, and the
    test's torch thread count (so that the kernel rounds as the in-process runs do)."""
    env = {k: v for k, v in os.environ.items() if k not in (RUNNER_ENV, SCRATCH_ENV)}
    return env | {
        "PATH": os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")]),
        "PYTHONPATH": str(project / "src"),
        "DVC_NO_ANALYTICS": "1",
        "DVC_SITE_CACHE_DIR": str(project.parent / "dvc-site-cache"),
        "HF_HUB_OFFLINE": "1",
        "PYTHONHASHSEED": "0",
        "OMP_NUM_THREADS": str(torch.get_num_threads()),
    }


def copy_project(project: Path, params: dict, skip=lambda name: False) -> Path:
    """This project's tracked and untracked (not ignored) files copied to `project`, minus
    those `skip(relative name)` refuses, with `params` as its params.yaml, committed to a fresh
    git repository. A file deleted in the working tree is left out."""
    listed = git(ROOT, "ls-files", "-z", "--cached", "--others", "--exclude-standard")
    for name in filter(None, listed.split("\0")):
        if (ROOT / name).is_file() and not skip(name):
            (project / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, project / name)
    project.mkdir(parents=True, exist_ok=True)
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    git(project, "init", "-q")
    git(project, "add", "-A")
    git(project, "-c", "user.name=test", "-c", "user.email=test@test", "commit", "-qm", "copy")
    return project
