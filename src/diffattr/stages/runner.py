"""The stage runner: `python -m diffattr.stage NAME [-p key value ...]`, what `dvc.yaml` calls.

1. Checks every `-p` name against the parameters the notebook declares (papermill inspects its
   `parameters` cell) before anything runs: a misspelt name is an error with a did-you-mean,
   not a warning followed by a run on the defaults. Values are read as YAML (`-p overrides
   "{train: {steps: 20}}"`, `-p progress false`).
2. Runs the notebook with papermill from the project root, with `DIFFATTR_STAGE_RUNNER=1` in the
   kernel's environment (the notebook then writes the pipeline's own outputs, see
   :mod:`diffattr.stages.session`), into a temporary `.<notebook>.running.ipynb` in the report
   folder.
3. On success, moves it to `<report_dir>/<notebook>.ipynb`. On failure (an error in a cell, a
   dead kernel, Ctrl-C), moves it to `<report_dir>/<notebook>.failed.ipynb` (git-ignored; it
   holds the full traceback), removes the report files the failed run wrote (no half-written
   figures), restores the committed ones from git (DVC deleted them before running the stage),
   prints a short summary — the stage, the error, the failed notebook's path — and exits 1.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import difflib
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

from diffattr.stages.catalog import (
    REPORT_FIGURES,
    REPORT_METRICS,
    REPORT_PLOTS,
    RUNNER_ENV,
    STAGES,
    STUDIES,
    StageInfo,
    find_project_root,
    stage_info,
)


class StageParameterError(ValueError):
    """A `-p` name the notebook does not declare."""


@dataclass
class StageFailure(Exception):
    """A stage that stopped; `summary()` is what the terminal shows."""

    stage: str
    error: str  # "ValueError: attribution.top_k = 10 exceeds …"
    notebook: Path | None  # the executed notebook holding the full traceback
    restored: list[str]  # report files restored from git

    def summary(self) -> str:
        lines = [f"stage {self.stage!r} failed: {self.error}"]
        if self.notebook is not None:
            lines.append(f"  full traceback: {self.notebook}")
        if self.restored:
            lines.append(f"  committed reports restored from git: {', '.join(self.restored)}")
        lines.append(
            "  Finished work is kept (stores, checkpoints and models are resumed); fix the "
            "cause and rerun: dvc repro"
        )
        return "\n".join(lines)


def declared_parameters(notebook: Path) -> dict[str, object]:
    """`{name: default value}` of the notebook's `parameters` cell."""
    import papermill as pm

    found = pm.inspect_notebook(str(notebook))
    return {name: _literal(spec["default"]) for name, spec in found.items()}


def _literal(source: str) -> object:
    try:
        return ast.literal_eval(source)
    except (ValueError, SyntaxError):
        return source


def check_parameter_names(info: StageInfo, given: dict, declared: dict) -> None:
    """StageParameterError naming each unknown `-p` name, with the closest declared one."""
    problems = []
    for name in given:
        if name not in declared:
            hint = difflib.get_close_matches(name, list(declared), n=1)
            problems.append(f"{name!r}" + (f" (did you mean {hint[0]!r}?)" if hint else ""))
    if problems:
        raise StageParameterError(
            f"stage {info.name!r}: unknown parameter {', '.join(problems)}; notebook "
            f"notebooks/{info.notebook}.ipynb declares: {', '.join(declared)}"
        )


def report_files(report_dir: Path, info: StageInfo) -> list[Path]:
    """The files and folders of a stage's report (DVC outs with `cache: false`)."""
    return [
        report_dir / f"{info.notebook}.ipynb",
        report_dir / REPORT_FIGURES,
        report_dir / REPORT_METRICS,
        report_dir / REPORT_PLOTS,
    ]


def run_stage(name: str, given: dict, root: Path, kernel: str = "python3") -> Path:
    """Run one stage's notebook (see the module docstring); returns the executed notebook.

    Raises StageParameterError before running anything, StageFailure if the notebook failed.
    """
    info = stage_info(name)
    notebook = info.notebook_path(root)
    declared = declared_parameters(notebook)
    check_parameter_names(info, given, declared)
    report_dir = root / str(given.get("report_dir", declared.get("report_dir")))
    report_dir.mkdir(parents=True, exist_ok=True)
    running = report_dir / f".{info.notebook}.running.ipynb"
    final = report_dir / f"{info.notebook}.ipynb"
    try:
        _execute(notebook, running, given, root, kernel)
    except BaseException as err:  # noqa: BLE001 - a cell error, a dead kernel, Ctrl-C
        failed = _keep_failed(running, report_dir / f"{info.notebook}.failed.ipynb")
        restored = _restore_reports(root, report_files(report_dir, info))
        raise StageFailure(info.name, _describe_error(err), failed, restored) from err
    os.replace(running, final)
    return final


def _execute(notebook: Path, output: Path, given: dict, root: Path, kernel: str) -> None:
    import papermill as pm

    os.environ[RUNNER_ENV] = "1"  # inherited by the kernel
    pm.execute_notebook(
        str(notebook),
        str(output),
        parameters=given,
        kernel_name=kernel,
        cwd=str(root),
        progress_bar=False,
    )


def _describe_error(err: BaseException) -> str:
    """'ValueError: message' of the error raised in the notebook (or of the runner itself)."""
    ename, evalue = getattr(err, "ename", None), getattr(err, "evalue", None)
    if ename:
        return f"{ename}: {evalue}"
    if isinstance(err, KeyboardInterrupt):
        return "interrupted (KeyboardInterrupt)"
    kind = type(err).__name__
    if kind == "DeadKernelError":
        return f"{kind}: the kernel died (out of memory, or killed by a signal): {err}"
    return f"{kind}: {err}"


def _keep_failed(running: Path, failed: Path) -> Path | None:
    if not running.exists():
        return None
    os.replace(running, failed)
    return failed


def _restore_reports(root: Path, paths: list[Path]) -> list[str]:
    """Remove what a failed run wrote at `paths`, then restore the versions committed to git.
    Returns the restored paths (relative to root); [] outside a git repository."""
    for path in paths:
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
    relative = [str(p.relative_to(root)) for p in paths if root in p.resolve().parents]
    with contextlib.suppress(OSError, subprocess.CalledProcessError):
        listed = subprocess.run(
            ["git", "ls-tree", "-r", "--name-only", "HEAD", "--", *relative],
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()
        if not relative:
            return []
        committed = [r for r in relative if any(f == r or f.startswith(r + "/") for f in listed)]
        if committed:
            subprocess.run(
                ["git", "checkout", "HEAD", "--", *committed],
                cwd=root,
                capture_output=True,
                check=True,
            )
        return committed
    return []


def parse_arguments(argv: list[str] | None) -> tuple[str, dict, str]:
    """(stage name, {parameter: value}, kernel) from the command line."""
    parser = argparse.ArgumentParser(
        prog="python -m diffattr.stage",
        description="Run one pipeline stage's notebook with papermill (what dvc.yaml calls).",
    )
    parser.add_argument("stage", help=f"one of: {', '.join([*STAGES, *STUDIES])}")
    parser.add_argument(
        "-p",
        "--parameter",
        nargs=2,
        action="append",
        default=[],
        metavar=("NAME", "VALUE"),
        help="a notebook parameter; VALUE is read as YAML",
    )
    parser.add_argument("--kernel", default="python3")
    args = parser.parse_args(argv)
    given = {}
    for name, value in args.parameter:
        given[name] = yaml.safe_load(value)
    return args.stage, given, args.kernel


def main(argv: list[str] | None = None) -> int:
    """Entry point: 0 on success, 1 on failure (the summary goes to stderr), 2 for bad usage."""
    stage, given, kernel = parse_arguments(argv)
    root = find_project_root() or Path.cwd()
    try:
        executed = run_stage(stage, given, root, kernel)
    except (StageParameterError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except StageFailure as failure:
        print(failure.summary(), file=sys.stderr)
        return 1
    shown = executed.resolve()
    if root.resolve() in shown.parents:  # a report_dir outside the project is shown whole
        shown = shown.relative_to(root.resolve())
    print(f"stage {stage!r} done: {shown}")
    return 0
