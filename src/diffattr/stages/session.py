"""The first cell of every stage notebook: where the project is, which parameters and inputs the
notebook uses, and where it writes.

- **Any working directory.** JupyterLab starts a notebook's kernel in `notebooks/`; the session
  finds the project root (the folder with `dvc.yaml` and `params.yaml`) above it and makes it
  the working directory, so relative paths — `params.yaml`, `data/raw`, `data/train` — mean what
  they mean under `dvc repro`.
- **Says what it uses.** It prints the parameters file, the overrides, the input folders and the
  output folders.
- **Never silently overwrites the pipeline's outputs.** Outside the stage runner (the one that
  `dvc repro` calls, which sets `DIFFATTR_STAGE_RUNNER=1`), an output folder that is a
  DVC-tracked output of `dvc.yaml` is replaced by the same path under `scratch/<notebook>/`
  (git-ignored; `$DIFFATTR_SCRATCH` moves it), and the notebook says so. Folders given
  explicitly elsewhere are kept.
- **Checks up front.** The parameters are resolved and checked against the training-set size
  (`attribution.top_k` ≤ n_train after `data.max_train`) before any work.
"""

from __future__ import annotations

import os
from pathlib import Path

import yaml

from diffattr import params as params_lib
from diffattr.data.datasets import dataset_size
from diffattr.params import Params
from diffattr.stages.catalog import RUNNER_ENV, find_project_root, scratch_folder, stage_info


def start(stage: str, params_file: str | None, overrides: dict | None, *folders: str) -> tuple:
    """Resolve the stage's parameters and folders; returns `(P, *folders)`.

    stage: a stage name of dvc.yaml (`train`, `gradients`, …). params_file: the parameters file
    (relative to the project root; None = all defaults). folders: the notebook's folder
    parameters in the catalog's order, inputs then outputs (e.g. `train_dir, out_dir,
    report_dir` for stage 2).
    """
    info = stage_info(stage)
    names = (*info.inputs, *info.outputs)
    if len(folders) != len(names):
        raise TypeError(f"stage {stage!r} takes the folders {', '.join(names)}; got {folders}")
    root = find_project_root()
    if root is not None and root != Path.cwd().resolve():
        os.chdir(root)
        print(f"working directory: {root} (the project root)")
    P = params_lib.load(params_file, overrides)
    P.check_dataset_size(_n_train(P))
    under_runner = os.environ.get(RUNNER_ENV) == "1"
    tracked = _dvc_outputs(root) if root is not None and not under_runner else []
    resolved, redirected = {}, []
    for key, value in zip(names, folders, strict=True):
        path = value
        if key in info.outputs and _overlaps(Path(value), tracked):
            path = str(Path(scratch_folder()) / info.notebook / _relative(Path(value), root))
            redirected.append(key)
        resolved[key] = path
    _describe(info.notebook, params_file, overrides, P, resolved, info.inputs, redirected)
    return (P, *resolved.values())


def _n_train(P: Params) -> int:
    d = P.data
    return dataset_size(d.dataset, "train", d.root, seed=d.split_seed, limit=d.max_train)


def _dvc_outputs(root: Path) -> list[Path]:
    """Absolute paths of every output (outs, metrics, plots) of the stages in root/dvc.yaml."""
    stages = (yaml.safe_load((root / "dvc.yaml").read_text()) or {}).get("stages", {})
    found = []
    for stage in stages.values():
        for kind in ("outs", "metrics", "plots"):
            for entry in stage.get(kind, []):
                name = next(iter(entry)) if isinstance(entry, dict) else entry
                found.append((root / name).resolve())
    return found


def _overlaps(folder: Path, tracked: list[Path]) -> bool:
    """Whether folder is a tracked output, lies inside one, or holds one."""
    folder = folder.resolve()
    return any(folder == t or t in folder.parents or folder in t.parents for t in tracked)


def _relative(path: Path, root: Path | None) -> Path:
    absolute = path.resolve()
    return absolute.relative_to(root) if root and root in absolute.parents else Path(path.name)


def _describe(
    notebook: str,
    params_file: str | None,
    overrides: dict | None,
    P: Params,
    folders: dict[str, str],
    inputs: tuple[str, ...],
    redirected: list[str],
) -> None:
    """Print which parameters, inputs and outputs this run uses."""
    source = Path(params_file).resolve() if params_file is not None else "none (all defaults)"
    print(f"parameters: {source}; profile {P.profile!r}; overrides: {overrides or 'none'}")
    for key, value in folders.items():
        role = "input " if key in inputs else "output"
        print(f"{role} {key} = {value}")
    if redirected:
        moved = f"{scratch_folder()}/{notebook}/"
        print(
            f"Interactive run: {', '.join(redirected)} moved under {moved} so that the "
            "DVC-tracked outputs stay as dvc repro made them. To update those, run "
            "`dvc repro` (or `python -m diffattr.stage <name>`)."
        )
