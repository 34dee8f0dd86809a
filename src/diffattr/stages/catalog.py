"""The pipeline's stages: each one's notebook, the folders it reads and the folders it writes.

Shared by the stage runner (`python -m diffattr.stage NAME`, what `dvc.yaml` calls) and by the
notebooks' first cell (:mod:`diffattr.stages.session`). The folder names are the notebooks'
parameter names; their values come from the notebook (defaults) or from `-p` on the command.
"""

from __future__ import annotations

import difflib
import os
from dataclasses import dataclass
from pathlib import Path

# Set (to "1") by the stage runner in the kernel's environment: outputs are the pipeline's own.
RUNNER_ENV = "DIFFATTR_STAGE_RUNNER"
SCRATCH = "scratch"  # where an interactive run writes instead of DVC-tracked outputs
# Moves that folder (relative to the project root), e.g. `make check-reports` uses its own.
SCRATCH_ENV = "DIFFATTR_SCRATCH"


@dataclass(frozen=True)
class StageInfo:
    """One stage: `notebooks/<notebook>.ipynb`, its input and output folder parameters."""

    name: str
    notebook: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]

    def notebook_path(self, root: Path) -> Path:
        return root / "notebooks" / f"{self.notebook}.ipynb"


STAGES: dict[str, StageInfo] = {
    s.name: s
    for s in (
        StageInfo("train", "01_train", (), ("out_dir", "report_dir")),
        StageInfo("gradients", "02_gradients", ("train_dir",), ("out_dir", "report_dir")),
        StageInfo(
            "timestep_bias",
            "03_timestep_bias",
            ("train_dir", "gradient_dir"),
            ("scores_dir", "report_dir"),
        ),
        StageInfo(
            "retrac", "04_retrac", ("train_dir", "gradient_dir", "scores_dir"), ("report_dir",)
        ),
        StageInfo("ground_truth", "05_ground_truth", ("train_dir",), ("out_dir", "report_dir")),
        StageInfo(
            "lds",
            "06_lds",
            ("train_dir", "gradient_dir", "retrain_dir"),
            ("removal_dir", "report_dir"),
        ),
    )
}
# Studies the runner runs but dvc.yaml does not (a profile's own Makefile target, reports under
# reports/<profile>/, so `make check-reports` and the dvc.yaml tests leave them out).
STUDIES: dict[str, StageInfo] = {
    s.name: s
    for s in (
        # The memorisation control (profile digits_memorise; `make memorisation`): its own
        # stage 2 extractions under out_dir, on a stage 1 run of the same profile.
        StageInfo("memorisation", "07_memorisation", ("train_dir",), ("out_dir", "report_dir")),
    )
}

# Files and folders a stage writes into its report folder (DVC outs with `cache: false`):
# figures, metrics.json, and plots/ (CSV data behind the key figures, `dvc plots show`).
REPORT_FIGURES, REPORT_METRICS, REPORT_PLOTS = "figures", "metrics.json", "plots"


def scratch_folder() -> str:
    """Where interactive runs write instead of DVC-tracked outputs: `$DIFFATTR_SCRATCH`, or
    `scratch` (both relative to the project root)."""
    return os.environ.get(SCRATCH_ENV) or SCRATCH


def stage_info(name: str) -> StageInfo:
    """The stage or study called `name` (or whose notebook is `name`); ValueError with
    did-you-mean."""
    known = {**STAGES, **STUDIES}
    for info in known.values():
        if name in (info.name, info.notebook):
            return info
    hint = difflib.get_close_matches(name, list(known), n=1)
    did_you_mean = f" (did you mean {hint[0]!r}?)" if hint else ""
    raise ValueError(f"unknown stage {name!r}{did_you_mean}; stages: {', '.join(known)}")


def find_project_root(start: str | Path | None = None) -> Path | None:
    """The nearest folder at or above `start` (default: the working directory) holding both
    `dvc.yaml` and `params.yaml`; None if there is none."""
    here = Path(start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        if (folder / "dvc.yaml").is_file() and (folder / "params.yaml").is_file():
            return folder
    return None
