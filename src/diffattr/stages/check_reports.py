"""`make check-reports`: are the committed reports of the default run current?

Three checks, run in this order; each prints what it found and all must pass.

1. **Bookkeeping** (seconds, `dvc status`): every report file is the one `dvc.lock` recorded (a
   hand edit changes its hash), and no stage has changed code, notebook or parameters since its
   reports were made. Outputs under `data/` that are only missing from the DVC cache are fine;
   missing or modified ones are not (the re-execution would compare against other data).
2. **Re-execution** (minutes): nbval re-runs every cell of each committed report notebook
   `reports/0N_*/0N_*.ipynb` against the current `data/`, and every cell's text outputs — numbers,
   tables, verdicts, stdout and stderr — must equal the committed ones once
   `reports/nbval-sanitize.cfg` has replaced what legitimately differs between two runs (timings,
   progress-bar rates, absolute paths, memory addresses, dates, where the run writes). Figures
   (PNG) are not compared; the data behind the key ones is, in step 3. The kernel runs outside
   the stage runner, so the notebooks write under `scratch/check-reports/<notebook>/` (see
   :mod:`diffattr.stages.session`), never to DVC-tracked outputs. The retrained-model stores of
   stages 5 and 6 are copied there first, as DVC keeps them between runs (`persist: true`);
   everything else is recomputed (stage 1 retrains, stage 2 re-extracts every gradient). The
   cells that retrain into those stores are tagged `nbval-ignore-output`: their log depends on
   what the store held and on the order workers finish; every cell after them, and the files,
   are compared.
3. **Files**: the re-executed run's `metrics.json` (run history aside: timings, the thread count,
   `trained_now`) and `plots/*.csv` equal the committed ones, floats to a relative `RTOL`.

`python -m diffattr.stages.check_reports [--bookkeeping-only] [--stages STAGE ...]`; exit
status 0 when all pass. Cost: about 9 minutes on two idle CPU cores (525 s measured for all six
notebooks, stages 5-6 finding their models in the copied stores).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from diffattr.stages.catalog import (
    REPORT_METRICS,
    REPORT_PLOTS,
    RUNNER_ENV,
    SCRATCH_ENV,
    STAGES,
    find_project_root,
)

SANITIZE_FILE = "reports/nbval-sanitize.cfg"
CHECK_SCRATCH = "scratch/check-reports"
# Stores copied into the check's scratch before the re-execution (notebook → store): models
# retrained on subsets (stage 5) and without top proponents (stage 6), about 30 minutes of
# training that DVC keeps between runs; the committed reports were made with them in place.
COPIED_STORES = {"05_ground_truth": "data/retrain", "06_lds": "data/removal"}
# metrics.json keys that hold run history, left out of the comparison: timings (seconds or ms),
# the CPU thread count (runtime block), and how many models a run trained (`trained_now`: the
# rest were in the store already).
RUN_HISTORY_KEY = re.compile(
    r"^(?:\w*wall_time_s|mean_model_train_s|ms_per_\w+|seconds|cpu_threads|trained_now)$"
)
# Floats in metrics.json and plots/*.csv may differ by this much (relative): another thread count
# sums in another order (stage 1's loss: up to 1e-5 after 800 steps); a real change moves more.
RTOL = 1e-4
CELL_TIMEOUT_S = 7200  # stage 1 retrains in one cell: minutes, more on a busy machine


def report_notebooks(root: Path, stages: list[str] | None = None) -> list[Path]:
    """The default run's executed notebooks, `reports/<notebook>/<notebook>.ipynb`, in pipeline
    order (stages: dvc.yaml stage names; None = all)."""
    return [
        root / "reports" / s.notebook / f"{s.notebook}.ipynb"
        for s in STAGES.values()
        if stages is None or s.name in stages
    ]


# --- 1. bookkeeping -------------------------------------------------------------------------


def bookkeeping_problems(
    root: Path, require_data: bool = True, stages: list[str] | None = None
) -> list[str]:
    """What `dvc status` says is out of date for `stages` (None = all), one line each
    ([] = current).

    Ignored: outputs that are only absent from the DVC cache; with `require_data=False` also
    missing outputs under `data/` (a fresh clone, CI). Report files that differ from dvc.lock,
    changed dependencies and parameters are always problems.
    """
    return [
        f"{stage}: {kind}" + (f": {path} ({state})" if path else "")
        for stage, kind, path, state in dvc_status(root)
        if (stages is None or stage in stages) and not _harmless(kind, path, state, require_data)
    ]


def report_edits(root: Path) -> list[str]:
    """Report files (under reports/) that differ from what dvc.lock recorded when a stage wrote
    them: a hand edit, or a run outside DVC. Needs no data (seconds; what CI checks)."""
    return [
        f"{stage}: {path} ({state})"
        for stage, kind, path, state in dvc_status(root)
        if kind == "changed outs" and path.startswith("reports/") and state != "not in cache"
    ]


def dvc_status(root: Path) -> list[tuple[str, str, str, str]]:
    """`dvc status` of root's pipeline as (stage, kind, path, state) rows, e.g. ("train",
    "changed outs", "reports/01_train/01_train.ipynb", "modified"); path and state are "" for
    a change without one ("always changed"). An output that dvc.lock does not list at all (a new
    one) has the state "not recorded in dvc.lock". RuntimeError if dvc fails."""
    found = subprocess.run(
        [sys.executable, "-m", "dvc", "status", "--json"],
        cwd=root,
        capture_output=True,
        text=True,
        env={**os.environ, "DVC_NO_ANALYTICS": "1"},
    )
    if found.returncode != 0:
        raise RuntimeError(f"dvc status failed: {found.stderr.strip() or found.stdout.strip()}")
    recorded = _locked_outputs(root)
    rows = []
    for stage, changes in json.loads(found.stdout or "{}").items():
        for change in changes:
            if isinstance(change, str):
                rows.append((stage, change, "", ""))
                continue
            for kind, entries in change.items():
                if not isinstance(entries, dict):
                    rows.append((stage, kind, "", ""))
                    continue
                for path, state in entries.items():
                    text = state if isinstance(state, str) else json.dumps(state)
                    if kind == "changed outs" and path not in recorded.get(stage, set()):
                        text = "not recorded in dvc.lock"
                    rows.append((stage, kind, path, text))
    return rows


def _locked_outputs(root: Path) -> dict[str, set[str]]:
    """Stage → the output paths dvc.lock records for it ({} without a dvc.lock)."""
    lock = root / "dvc.lock"
    stages = (yaml.safe_load(lock.read_text()) or {}).get("stages", {}) if lock.exists() else {}
    return {name: {out["path"] for out in s.get("outs", [])} for name, s in stages.items()}


def _harmless(kind: str, path: str, state: str, require_data: bool) -> bool:
    if kind != "changed outs":
        return False
    if state == "not in cache":
        return True
    return not require_data and state == "deleted" and path.startswith("data/")


# --- 2. re-execution -------------------------------------------------------------------------


def prepare_scratch(
    root: Path, scratch: str = CHECK_SCRATCH, stages: list[str] | None = None
) -> None:
    """Empty the check's scratch folder, then copy the persisted model stores into it (where
    the re-executed notebooks of stages 5 and 6 will look for them), for `stages` (None = all)."""
    target = root / scratch
    if target.exists():
        shutil.rmtree(target)
    notebooks = {p.stem for p in report_notebooks(root, stages)}
    for notebook, store in COPIED_STORES.items():
        if notebook not in notebooks:
            continue
        source = root / store
        if not source.is_dir():
            raise FileNotFoundError(f"{store} is missing: run `dvc repro` (or `dvc pull`) first")
        shutil.copytree(source, target / notebook / store, symlinks=True)


def nbval_command(notebooks: list[Path], sanitize: Path, *extra: str) -> list[str]:
    """The pytest command that re-executes `notebooks` and compares their outputs."""
    return [
        sys.executable,
        "-m",
        "pytest",
        "-p",
        "no:cacheprovider",
        "-vv",  # a line per cell as it passes; a failure shows both outputs whole, untruncated
        "--nbval",
        "--nbval-sanitize-with",
        str(sanitize),
        "--nbval-cell-timeout",
        str(CELL_TIMEOUT_S),
        *extra,
        *map(str, notebooks),
    ]


def run_nbval(
    root: Path,
    notebooks: list[Path] | None = None,
    scratch: str = CHECK_SCRATCH,
    *extra: str,
    capture: bool = False,
) -> subprocess.CompletedProcess:
    """Re-execute and compare `notebooks` (default: the default run's reports) with nbval, from
    `root`, writing under `root/scratch`; returns pytest's completed process."""
    env = {**os.environ, SCRATCH_ENV: scratch, "PYTHONHASHSEED": "0", "HF_HUB_OFFLINE": "1"}
    env.pop(RUNNER_ENV, None)  # outside the stage runner: DVC-tracked outputs move to scratch
    notebooks = report_notebooks(root) if notebooks is None else notebooks
    command = nbval_command(notebooks, root / SANITIZE_FILE, *extra)
    return subprocess.run(command, cwd=root, env=env, capture_output=capture, text=True)


# --- 3. files --------------------------------------------------------------------------------


def file_differences(
    root: Path, scratch: str = CHECK_SCRATCH, stages: list[str] | None = None
) -> list[str]:
    """Where the re-executed run's metrics.json (run history aside) and plots/*.csv differ from the
    committed ones (floats: by more than a relative RTOL), for `stages` (None = all), one line
    each, at most five per CSV ([] = the same)."""
    problems = []
    for stage in STAGES.values():
        if stages is not None and stage.name not in stages:
            continue
        committed = root / "reports" / stage.notebook
        fresh = root / scratch / stage.notebook / "reports" / stage.notebook
        if not fresh.is_dir():
            problems.append(f"{stage.notebook}: the re-execution wrote no report ({fresh})")
            continue
        old, new = (_load_json(d / REPORT_METRICS) for d in (committed, fresh))
        for where in _json_differences(_drop_run_history(old), _drop_run_history(new)):
            problems.append(f"{stage.notebook}/{REPORT_METRICS}: {where}")
        old_plots, new_plots = (_files(d / REPORT_PLOTS) for d in (committed, fresh))
        for name in sorted(old_plots.keys() | new_plots.keys()):
            where = f"{stage.notebook}/{REPORT_PLOTS}/{name}"
            if name not in old_plots or name not in new_plots:
                problems.append(
                    f"{where}: only in the {'committed' if name in old_plots else 're-execution'}"
                )
                continue
            rows = [_csv_rows(files[name]) for files in (old_plots, new_plots)]
            problems += [f"{where}: {d}" for d in _json_differences(*rows)][:5]
    return problems


def _csv_rows(text: bytes) -> list[dict]:
    """A CSV's rows as dicts (header → value); numeric fields as int or float."""
    return [
        {key: _number(value) for key, value in row.items()}
        for row in csv.DictReader(io.StringIO(text.decode()))
    ]


def _number(text: str):
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def _load_json(path: Path):
    return json.loads(path.read_text()) if path.exists() else None


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*"))} if folder.is_dir() else {}


def _drop_run_history(value):
    if isinstance(value, dict):
        kept = {k: v for k, v in value.items() if not RUN_HISTORY_KEY.match(str(k))}
        return {k: _drop_run_history(v) for k, v in kept.items()}
    if isinstance(value, list):
        return [_drop_run_history(v) for v in value]
    return value


def _json_differences(old, new, path: str = "") -> list[str]:
    """Paths (`sweep[3].unique_ratio`) where two JSON values differ, with both values; numbers
    within a relative RTOL are equal."""
    if isinstance(old, dict) and isinstance(new, dict):
        found = []
        for key in list(old) + [k for k in new if k not in old]:
            if key not in old or key not in new:
                found.append(
                    f"{path}.{key}: only in the {'re-execution' if key in new else 'committed'}"
                )
            else:
                found += _json_differences(old[key], new[key], f"{path}.{key}")
        return found
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        return [
            d
            for i, (a, b) in enumerate(zip(old, new, strict=True))
            for d in _json_differences(a, b, f"{path}[{i}]")
        ]
    floats = isinstance(old, float) and isinstance(new, float)
    same = old == new or (floats and math.isclose(old, new, rel_tol=RTOL))
    return [] if same else [f"{path or '(whole file)'}: committed {old!r}, re-executed {new!r}"]


# --- the command -----------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    """The command; returns the exit status (0: every check passed)."""
    parser = argparse.ArgumentParser(
        prog="python -m diffattr.stages.check_reports",
        description="Check that the committed reports of the default run are current.",
    )
    parser.add_argument(
        "--bookkeeping-only",
        action="store_true",
        help="only step 1 (dvc status; seconds, no data needed)",
    )
    parser.add_argument(
        "--stages",
        nargs="+",
        choices=list(STAGES),
        metavar="STAGE",
        help=f"check only these dvc.yaml stages (default: all of {', '.join(STAGES)})",
    )
    args = parser.parse_args(argv)
    root = find_project_root() or Path.cwd()
    stages = args.stages
    failed = []
    try:
        problems = bookkeeping_problems(root, not args.bookkeeping_only, stages)
    except RuntimeError as err:
        problems = [str(err)]
    _say("1. bookkeeping (dvc status)", problems)
    if problems:
        failed.append(
            "bookkeeping: the reports are not what dvc.lock records for the current code and "
            "parameters. If step 2 passes, the reports are still what the code produces: record "
            "that with `dvc commit`; otherwise refresh them with `dvc repro`."
        )
    missing = [p for p in problems if "changed outs: data/" in p and "(deleted)" in p]
    if missing and not args.bookkeeping_only:
        failed.append("the pipeline's outputs are missing from data/: run `dvc repro` first.")
    elif not args.bookkeeping_only:
        prepare_scratch(root, stages=stages)
        print(f"2. re-execution: nbval, outputs under {CHECK_SCRATCH}/", flush=True)
        if run_nbval(root, report_notebooks(root, stages)).returncode != 0:
            failed.append(
                "re-execution: a committed report's outputs differ from a re-run (above: the "
                "notebook, the cell, the committed output and the new one). Refresh with "
                "`dvc repro`."
            )
        problems = file_differences(root, stages=stages)
        _say("3. metrics.json and plots/*.csv against the re-execution", problems)
        if problems:
            failed.append("files: metrics or plot data differ from a re-run (`dvc repro`).")
    for line in failed:
        print(f"FAILED {line}", file=sys.stderr)
    if not failed:
        print(
            "dvc.lock matches the reports, code and parameters (re-execution not run)"
            if args.bookkeeping_only
            else "reports are current"
        )
    return 1 if failed else 0


def _say(title: str, problems: list[str]) -> None:
    print(f"{title}: {'ok' if not problems else f'{len(problems)} problem(s)'}", flush=True)
    for line in problems:
        print(f"  {line}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
