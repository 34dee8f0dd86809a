"""`make check-reports` (diffattr.stages.check_reports): a re-executed report must match the
committed one in every number, while timings, paths and addresses may differ; the files a run
writes beside it are compared the same way; and a report edited by hand fails. Most tests run
without the pipeline's data (a small report executed here, the stage notebooks' first cell
in-process); the last one (marker dvc, about 90 s) runs the command itself on stage 1 of a
copy of the project after a smoke-scale `dvc repro train`."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import papermill as pm
import pytest
from dvc_project import copy_project, dvc_env
from nbval.plugin import get_sanitize_patterns

from diffattr.stages import check_reports
from diffattr.stages.catalog import RUNNER_ENV, SCRATCH_ENV

ROOT = Path(__file__).resolve().parents[1]
SANITIZE = ROOT / check_reports.SANITIZE_FILE

# A small report, one kind of output per cell (numbered as nbval numbers code cells; papermill
# adds cell 1, the injected parameters): results (3 a table, 4 a progress bar's count, 6 a
# sentence, 8 a metrics table) and what differs between runs (2 an absolute path — the kernel
# starts in the project root under papermill, in the report's folder under nbval —, 5 a
# progress bar's time and rate, 7 a timing in a sentence, 9 one in a metrics table, 10 an
# object's address). The metrics tables hold a string, as every stage's does (its device): an
# object column prints each value on its own, where an all-float one would print `steps` with
# the timing's decimals ("3.000" or "3.0"). The stage notebooks' first cell is checked
# in-process, further down.
CELLS = [
    'params_file = "params.yaml"',
    "import time\n"
    "from pathlib import Path\n"
    "import pandas as pd\n"
    "from tqdm import tqdm\n"
    "print(f\"parameters: {Path(params_file).resolve()}; profile 'digits'\")",
    'pd.DataFrame({"method": ["tracin", "retrac"], "unique_ratio": [0.184375, 0.390625]})',
    'for _ in tqdm(range(3), desc="scoring"):\n    pass',
    "started = time.perf_counter()\n"
    'for _ in tqdm(range(3), desc="training"):\n'
    "    time.sleep(0.02)",
    'print("3 steps on cpu; final loss 0.0935")',
    'print(f"3 steps in {time.perf_counter() - started:.2f} s on cpu")',
    'pd.Series({"final_loss": 0.093476, "n_train": 40}).to_frame("value")',
    'pd.Series({"steps": 3, "train_wall_time_s": round(time.perf_counter() - started, 3),'
    ' "device": "cpu"}).to_frame("value")',
    "print(object())",
]
NUMBER_CELLS = {3, 4, 6, 8}  # edited by hand in "edited": each must fail
SANITISED_CELLS = {2, 5, 7, 9, 10}  # edited there too, in what the sanitiser equates: must pass


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """A project (dvc.yaml, params.yaml, the sanitize file) holding one report executed as the
    stage runner executes it: papermill from the root, with the runner's variable set."""
    root = _project(tmp_path_factory.mktemp("project"))
    source = nbformat.v4.new_notebook()
    source.cells = [nbformat.v4.new_code_cell(code) for code in CELLS]
    source.cells[0].metadata["tags"] = ["parameters"]
    source.metadata["kernelspec"] = {
        "name": "python3",
        "display_name": "Python 3",
        "language": "python",
    }
    nbformat.write(source, root / "source.ipynb")
    report = root / "reports" / "01_train" / "01_train.ipynb"
    report.parent.mkdir(parents=True)
    os.environ[RUNNER_ENV] = "1"
    try:
        pm.execute_notebook(
            str(root / "source.ipynb"),
            str(report),
            parameters={"params_file": "params.yaml"},
            kernel_name="python3",
            cwd=str(root),
            progress_bar=False,
        )
    finally:
        os.environ.pop(RUNNER_ENV)
    return root


def _project(root: Path) -> Path:
    """dvc.yaml (stage train writing data/train and reports/01_train), params.yaml and the
    sanitize file in root."""
    (root / "dvc.yaml").write_text(
        "stages:\n  train:\n    cmd: echo\n    outs:\n      - data/train\n"
        "      - reports/01_train/01_train.ipynb:\n          cache: false\n"
    )
    shutil.copy(ROOT / "params.yaml", root / "params.yaml")
    (root / "reports").mkdir()
    shutil.copy(SANITIZE, root / check_reports.SANITIZE_FILE)
    return root


def _edited(project: Path, name: str, edit) -> Path:
    """A copy of the executed report with `edit(outputs)` applied to its stored outputs
    (outputs: one list per code cell)."""
    nb = nbformat.read(project / "reports" / "01_train" / "01_train.ipynb", 4)
    edit([c.outputs for c in nb.cells if c.cell_type == "code"])
    path = project / "reports" / "01_train" / f"{name}.ipynb"
    nbformat.write(nb, path)
    return path


def _sub(outputs: list, pattern: str, new: str, keys=("stream", "text/plain", "text/html")) -> int:
    """re.sub in one cell's stored text outputs of the given kinds (streams, text/* data);
    returns how many outputs changed."""
    hits = 0
    for out in outputs:
        if out.output_type == "stream" and "stream" in keys:
            text = re.sub(pattern, new, out.text)
            hits += text != out.text
            out.text = text
        for key, value in out.get("data", {}).items():
            if key in keys:
                text = re.sub(pattern, new, value)
                hits += text != value
                out.data[key] = text
    return hits


def _replace(outputs: list, old: str, new: str, keys=("stream", "text/plain", "text/html")) -> None:
    assert _sub(outputs, re.escape(old), new.replace("\\", "\\\\"), keys), f"{old!r} not found"


@pytest.fixture(scope="module")
def failed_cells(project) -> dict[str, set[int]]:
    """nbval, run as check-reports runs it, on the untouched report and on a copy edited by
    hand (one kernel each): notebook → numbers of the cells whose outputs differ."""
    report = project / "reports" / "01_train" / "01_train.ipynb"
    text = json.dumps([c.get("outputs", []) for c in nbformat.read(report, 4).cells])
    checkout = re.search(r"parameters: (/\S+/)params\.yaml", text).group(1)
    assert checkout == f"{project.resolve()}/"

    def edit(o):
        # results
        _replace(o[3], "0.184375", "0.2", ("text/plain",))  # a table, its text form only
        _replace(o[4], "| 3/3 [", "| 4/4 [")  # a progress bar's count
        _replace(o[6], "final loss 0.0935", "final loss 0.09")  # a sentence
        _replace(o[8], "0.093476", "0.093477")  # a metrics table
        # what differs between two runs anyway
        _replace(o[2], checkout, "/somewhere/else/checkout/")
        assert _sub(o[5], r"\[\d\d:\d\d<[^\]]*\]", "[59:59<00:00, 1.23it/s]")
        assert _sub(o[7], r"in \d+\.\d+ s on cpu", "in 1234.56 s on cpu")
        assert _sub(
            o[9], r"(train_wall_time_s\s+|train_wall_time_s</th>\s*<td>)[\d.]+", r"\g<1>99.5"
        )
        assert _sub(o[10], r"0x[0-9a-f]+", "0xdeadbeef")

    notebooks = [report, _edited(project, "edited", edit)]
    done = check_reports.run_nbval(project, notebooks, check_reports.CHECK_SCRATCH, capture=True)
    failed = {nb.stem: set() for nb in notebooks}
    for match in re.finditer(r"FAILED \S*?/(\w+)(?:\.ipynb|::ipynb)::Cell (\d+)", done.stdout):
        failed[match.group(1)].add(int(match.group(2)))
    assert done.returncode in (0, 1), done.stdout[-3000:] + done.stderr[-3000:]
    # nbval shows the committed and the re-executed output of a failed cell, untruncated
    assert re.search(r"final loss 0\.09(?!\d)", done.stdout) and "final loss 0.0935" in done.stdout
    return failed


@pytest.mark.notebook
def test_untouched_report_passes_when_rerun_elsewhere(failed_cells):
    """The re-execution starts in the report's folder (another absolute path), with other
    timings and another address."""
    assert failed_cells["01_train"] == set()


@pytest.mark.notebook
def test_report_with_numbers_edited_by_hand_fails_at_each_edited_cell(failed_cells):
    """A number edited in a table (its text form only), a progress bar's count, a sentence and
    a metrics table: each of these cells fails."""
    assert failed_cells["edited"] & NUMBER_CELLS == NUMBER_CELLS


@pytest.mark.notebook
def test_timings_paths_and_addresses_edited_in_a_report_still_pass(failed_cells):
    assert failed_cells["edited"] & SANITISED_CELLS == set()
    assert failed_cells["edited"] == NUMBER_CELLS


def test_first_cell_of_a_rerun_matches_the_runners_and_writes_under_the_checks_scratch(
    tmp_path, monkeypatch, capsys
):
    """What every stage notebook's first cell (session.start) prints under the stage runner
    equals, once sanitised, what it prints when nbval re-runs it from the report's folder —
    where its outputs move under scratch/check-reports/ and it says so."""
    from diffattr.stages import session

    root = _project(tmp_path)
    (root / "reports" / "01_train").mkdir()
    args = ("train", "params.yaml", {"data": {"max_train": 40}}, "data/train", "reports/01_train")
    monkeypatch.chdir(root)
    monkeypatch.setenv(RUNNER_ENV, "1")
    assert session.start(*args)[1:] == ("data/train", "reports/01_train")
    by_runner = capsys.readouterr().out
    monkeypatch.chdir(root / "reports" / "01_train")
    monkeypatch.delenv(RUNNER_ENV)
    monkeypatch.setenv(SCRATCH_ENV, check_reports.CHECK_SCRATCH)
    moved = session.start(*args)[1:]
    by_nbval = capsys.readouterr().out
    assert moved == (
        "scratch/check-reports/01_train/data/train",
        "scratch/check-reports/01_train/reports/01_train",
    )
    assert "working directory" in by_nbval and "Interactive run" in by_nbval
    assert _sanitise(by_nbval) == _sanitise(by_runner)


def _sanitise(text: str) -> str:
    for regex, replace in get_sanitize_patterns(SANITIZE.read_text()):
        text = re.sub(regex, replace, text)
    return text


def test_every_sanitize_pattern_is_read_by_nbval():
    """A `replace:` line with nothing after it would silently drop its pattern."""
    lines = SANITIZE.read_text().splitlines()
    assert len(get_sanitize_patterns(SANITIZE.read_text())) == sum(
        line.startswith("regex: ") for line in lines
    )


@pytest.mark.parametrize(
    ("committed", "rerun"),
    [
        (
            "training: 100%|██████████| 800/800 [01:17<00:00, 10.34it/s, loss=0.0951]",
            "training: 100%|██████████| 800/800 [03:02<00:00,  4.38it/s, loss=0.0951]",
        ),
        (
            "measuring: 5%|▌ | 1/20 [00:05<01:43,  5.44s/it]",
            "measuring: 5%|▌ | 1/20 [00:09<02:13,  9.1s/it]",
        ),
        ("800 steps in 77.53 s on cpu; final", "800 steps in 301.2 s on cpu; final"),
        ("(2.045 ms each, engine", "(12.5 ms each, engine"),
        ("train_wall_time_s              77.53\nn_train", "train_wall_time_s   1077.5\nn_train"),
        ("<th>wall_time_s</th>\n      <td>142.36</td>", "<th>wall_time_s</th>\n <td>99.1</td>"),
        ("trained_now                20\nretrain", "trained_now  0\nretrain"),  # run history
        ("<object object at 0x7f3a2b1c0d90>", "<object object at 0x7f00deadbeef>"),
        (
            "parameters: /work/main/params.yaml; profile",
            "parameters: /builds/ci/x/params.yaml; profile",
        ),
        ("made 2026-12-01T10:00:01.5 here", "made 2027-01-02 11:12:13 here"),
    ],
)
def test_sanitiser_equates_timings_paths_addresses_and_dates(committed, rerun):
    assert _sanitise(committed) == _sanitise(rerun)


@pytest.mark.parametrize(
    ("committed", "rerun"),
    [
        ("final loss 0.0935; 32 queries", "final loss 0.0936; 32 queries"),
        ("loss=0.0951]", "loss=0.0952]"),
        ("final_loss 0.093476\n", "final_loss 0.093477\n"),
        (
            "7 trak 0.2386 0.0524 0.2500 0.0534 0 14.03 \n",
            "7 trak 0.2387 0.0524 0.2500 0.0534 0 14.03 \n",
        ),
        ("<td>0.184375</td>", "<td>0.184376</td>"),
        ("models                  20\ntrained_now", "models 19\ntrained_now"),
        ("output out_dir = data/train\n", "output out_dir = data/other\n"),
        ("800/800 [01:17<00:00, 10.34it/s]", "801/801 [01:17<00:00, 10.34it/s]"),
    ],
)
def test_sanitiser_keeps_every_result(committed, rerun):
    assert _sanitise(committed) != _sanitise(rerun)


def test_file_comparison_ignores_timings_and_float_rounding_only(tmp_path):
    """Step 3: metrics.json and plots/*.csv beside the re-executed report may differ in run
    history (timings, models trained in this run) and in floats' last digits (relative RTOL),
    nothing else."""
    committed = tmp_path / "reports" / "01_train"
    fresh = tmp_path / check_reports.CHECK_SCRATCH / "01_train" / "reports" / "01_train"
    for folder, seconds, trained in ((committed, 77.53, 20), (fresh, 301.2, 0)):
        (folder / "plots").mkdir(parents=True)
        metrics = {
            "final_loss": 0.0935,
            "train_wall_time_s": seconds,
            "trained_now": trained,  # models the store lacked: run history
            "lds": [{"seconds": 1}],
        }
        (folder / "metrics.json").write_text(json.dumps(metrics))
        (folder / "plots" / "loss_curve.csv").write_text("step,loss\n1,1.10266\n")
    assert not [
        p for p in check_reports.file_differences(tmp_path) if "01_train" in p.split(":")[0]
    ]
    # another thread count: the last digits of floats
    metrics = json.loads((fresh / "metrics.json").read_text())
    (fresh / "metrics.json").write_text(json.dumps(metrics | {"final_loss": 0.09350001}))
    (fresh / "plots" / "loss_curve.csv").write_text("step,loss\n1,1.10267\n")
    assert not [p for p in check_reports.file_differences(tmp_path) if p.startswith("01_train")]
    # another result: a float in the 4th digit, a count by one
    (committed / "metrics.json").write_text(json.dumps(metrics | {"n_parameters": 284513}))
    (fresh / "metrics.json").write_text(
        json.dumps(metrics | {"final_loss": 0.0936, "n_parameters": 284514})
    )
    (fresh / "plots" / "loss_curve.csv").write_text("step,loss\n2,1.10267\n")
    found = [p for p in check_reports.file_differences(tmp_path) if p.startswith("01_train")]
    assert found == [
        "01_train/metrics.json: .final_loss: committed 0.0935, re-executed 0.0936",
        "01_train/metrics.json: .n_parameters: committed 284513, re-executed 284514",
        "01_train/plots/loss_curve.csv: [0].step: committed 1, re-executed 2",
    ]


def test_committed_reports_are_what_dvc_lock_records():
    """A report file edited by hand (or written outside `dvc repro`) no longer has the hash that
    dvc.lock recorded; this runs in CI without the pipeline's data."""
    if not (ROOT / ".dvc").is_dir():
        pytest.skip("not a DVC checkout")
    try:
        edits = check_reports.report_edits(ROOT)
    except RuntimeError as err:
        if "lock" in str(err).lower():
            pytest.skip(f"DVC is busy in this checkout: {err}")
        raise
    assert edits == [], "report files differ from dvc.lock: " + "; ".join(edits)


def test_report_edited_after_its_stage_ran_is_named(tmp_path):
    """report_edits names a report file that differs from what dvc.lock recorded, and only
    report files: a missing data/ output (a fresh clone) is not one."""
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    dvc = [sys.executable, "-m", "dvc"]
    subprocess.run([*dvc, "init", "--no-scm", "-q"], cwd=tmp_path, env=env, check=True)
    (tmp_path / "dvc.yaml").write_text(
        "stages:\n  s:\n    cmd: mkdir -p data reports && echo 1 > reports/r.txt "
        "&& echo 1 > data/d.txt\n"
        "    outs:\n      - data/d.txt\n      - reports/r.txt:\n          cache: false\n"
    )
    subprocess.run([*dvc, "repro", "-q"], cwd=tmp_path, env=env, check=True)
    (tmp_path / "data" / "d.txt").unlink()
    (tmp_path / "reports" / "r.txt").write_text("2\n")
    assert check_reports.report_edits(tmp_path) == ["s: reports/r.txt (modified)"]
    assert check_reports.bookkeeping_problems(tmp_path, require_data=False) == [
        "s: changed outs: reports/r.txt (modified)"
    ]
    assert check_reports.bookkeeping_problems(tmp_path, False, stages=["other"]) == []


def test_report_file_that_dvc_lock_does_not_list_is_named_so(tmp_path):
    """An output added to dvc.yaml after the stage last ran (dvc.lock has no hash for it) is
    reported as not recorded, not as edited."""
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    dvc = [sys.executable, "-m", "dvc"]
    subprocess.run([*dvc, "init", "--no-scm", "-q"], cwd=tmp_path, env=env, check=True)
    stage = "stages:\n  s:\n    cmd: mkdir -p reports && echo 1 > reports/r.txt\n    outs:\n"
    (tmp_path / "dvc.yaml").write_text(stage + "      - reports/r.txt:\n          cache: false\n")
    subprocess.run([*dvc, "repro", "-q"], cwd=tmp_path, env=env, check=True)
    (tmp_path / "reports" / "new.csv").write_text("x,y\n1,2\n")
    (tmp_path / "dvc.yaml").write_text(
        stage + "      - reports/r.txt:\n          cache: false\n"
        "      - reports/new.csv:\n          cache: false\n"
    )
    assert check_reports.report_edits(tmp_path) == ["s: reports/new.csv (not recorded in dvc.lock)"]


# ---------------------------------------------------------------------------------------------
# The command itself, on stage 1 of a copy of this project after a smoke-scale `dvc repro train`

SMOKE_PARAMS = {
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
    "gradients": {},
    "attribution": {"top_k": 4},
    "retrain": {},
    "lds": {},
}


def _run(project: Path, *command: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", *command],
        cwd=project,
        env=dvc_env(project),
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.fixture(scope="module")
def repro_project(tmp_path_factory) -> Path:
    """A git copy of this project (tracked and untracked, not ignored files) with a smoke-scale
    params.yaml, after `dvc repro train`: its reports/01_train is current."""
    project = tmp_path_factory.mktemp("check") / "project"
    (project / "reports").mkdir(parents=True)
    shutil.copy(SANITIZE, project / check_reports.SANITIZE_FILE)
    copy_project(project, SMOKE_PARAMS, skip=lambda name: name.startswith("reports/"))
    done = _run(project, "dvc", "repro", "train")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return project


@pytest.mark.dvc
def test_check_reports_passes_on_a_current_report_and_fails_on_one_edited_by_hand(repro_project):
    """`python -m diffattr.stages.check_reports --stages train` (what `make check-reports` runs,
    for one stage): the report `dvc repro` just wrote passes; with the final loss in its summary
    line changed by one digit it fails twice over — dvc.lock's hash, and nbval naming the
    notebook and the cell, with the committed and the re-executed text."""
    command = ("diffattr.stages.check_reports", "--stages", "train")
    done = _run(repro_project, *command)
    assert done.returncode == 0, done.stdout[-5000:] + done.stderr[-3000:]
    assert "reports are current" in done.stdout
    assert "1. bookkeeping (dvc status): ok" in done.stdout
    assert "3. metrics.json and plots/*.csv against the re-execution: ok" in done.stdout

    report = repro_project / "reports" / "01_train" / "01_train.ipynb"
    nb = nbformat.read(report, 4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    (cell,) = [i for i, c in enumerate(code) if "final loss" in _stdout(c)]
    (out,) = [o for o in code[cell].outputs if o.get("name") == "stdout"]
    loss = re.search(r"final loss (\d\.\d+)", out.text).group(1)
    edited = loss[:-1] + str((int(loss[-1]) + 1) % 10)
    out.text = out.text.replace(f"final loss {loss}", f"final loss {edited}")
    nbformat.write(nb, report)

    done = _run(repro_project, *command)
    assert done.returncode == 1, done.stdout[-5000:] + done.stderr[-3000:]
    assert "train: changed outs: reports/01_train/01_train.ipynb (modified)" in done.stdout
    failed = re.findall(r"FAILED \S*01_train\.ipynb::Cell (\d+)", done.stdout)
    assert failed == [str(cell)], done.stdout[-5000:]
    shown = done.stdout.replace("\\n", "\n")  # nbval prints the outputs' newlines as \n
    assert f"final loss {edited};" in shown and f"final loss {loss};" in shown, shown[-5000:]
    assert "FAILED re-execution" in done.stderr


def _stdout(cell) -> str:
    return "".join(o.get("text", "") for o in cell.outputs if o.get("name") == "stdout")


def test_only_the_cells_that_retrain_into_a_persisted_store_skip_the_comparison():
    """`nbval-ignore-output` is for logs that depend on what a store already held (stage 5's
    retraining, stage 6's removal retraining), never for a result: each such cell only
    retrains, and every other cell of every stage notebook is compared."""
    ignored = {}
    for path in sorted((ROOT / "notebooks").glob("0*.ipynb")):
        for cell in nbformat.read(path, 4).cells:
            if "nbval-ignore-output" in cell.metadata.get("tags", []):
                ignored.setdefault(path.stem, []).append(cell.source)
    assert ignored == {
        "05_ground_truth": [
            "retrained = stage.retrain_subsets(P, train_dir, out_dir, progress=progress)"
        ],
        "06_lds": ["removal = stage.removal_experiment(P, scored, removal_dir, progress)"],
    }
