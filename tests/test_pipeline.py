"""dvc.yaml: every stage depends on exactly the `diffattr` modules its notebook runs, so editing
one reruns the stages that use it and no other."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "diffattr"


def _diffattr_imports(source: str) -> set[str]:
    """Module names `diffattr.X` imported by Python source (absolute imports only)."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("diffattr"):
            if node.module != "diffattr":
                found.add(node.module)
            for alias in node.names:  # `from diffattr.stages import train`: a submodule
                name = f"{node.module}.{alias.name}"
                if _module_path(name).exists():
                    found.add(name)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("diffattr.")}
    return found


def _module_path(name: str) -> Path:
    """src/diffattr/... file of module `diffattr.X.Y` (a package's __init__.py)."""
    relative = Path(*name.split(".")[1:])
    package = PACKAGE / relative / "__init__.py"
    return package if package.exists() else PACKAGE / relative.with_suffix(".py")


def _closure(modules: set[str]) -> set[str]:
    """The modules and every diffattr module they import, transitively."""
    todo, seen = list(modules), set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        todo.extend(_diffattr_imports(_module_path(name).read_text()))
        if "." in name.split(".", 1)[1]:  # a submodule runs its package's __init__ too
            todo.append(name.rsplit(".", 1)[0])
    return seen


def _notebook_source(path: Path) -> str:
    cells = json.loads(path.read_text())["cells"]
    lines = ["".join(c["source"]) for c in cells if c["cell_type"] == "code"]
    return "\n".join(
        line for line in "\n".join(lines).splitlines() if not line.startswith(("%", "!"))
    )


STAGES = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


# Subpackages a stage depends on as a whole (any stage using one uses most of it); modules of
# `stages/` and `evaluation/` are listed one by one, so editing one stage's code reruns only it.
FOLDER_DEPS = {"artifacts", "data", "diffusion", "gradients", "methods", "retraining", "storage"}


def _dep_of(module_file: Path) -> str:
    """The dvc dep that covers a module: its subpackage folder, or the file itself."""
    relative = module_file.relative_to(PACKAGE)
    folder = len(relative.parts) > 1 and relative.parts[0] in FOLDER_DEPS
    target = PACKAGE / relative.parts[0] if folder else module_file
    return str(target.relative_to(ROOT))


def _command_modules(cmd: str) -> set[str]:
    """Modules a stage's command runs with `python -m diffattr.X` (the stage runner)."""
    words = cmd.split()
    return {
        words[i + 1] for i, w in enumerate(words[:-1]) if w == "-m" and "diffattr" in words[i + 1]
    }


def needed_deps(notebook: Path, cmd: str = "") -> set[str]:
    """The src/ deps (subpackage folders and top-level modules) a notebook's imports run, and
    those of the module the stage's command runs."""
    used = _closure(_diffattr_imports(_notebook_source(notebook)) | _command_modules(cmd))
    return {_dep_of(_module_path(m)) for m in used}


@pytest.mark.parametrize("stage", list(STAGES))
def test_stage_deps_are_exactly_the_modules_its_notebook_imports(stage):
    deps = STAGES[stage]["deps"]
    notebooks = [d for d in deps if d.startswith("notebooks/")]
    assert len(notebooks) == 1, f"stage {stage} should depend on exactly one notebook"
    needed = needed_deps(ROOT / notebooks[0], STAGES[stage]["cmd"])
    missing = sorted(needed - set(deps))
    assert not missing, f"stage {stage} runs {missing} but does not list them under deps"
    extra = sorted({d for d in deps if d.startswith("src/")} - needed)
    assert not extra, f"stage {stage} lists {extra} under deps but never runs them"


@pytest.mark.parametrize("stage", list(STAGES))
def test_every_stage_runs_through_the_stage_runner(stage):
    assert STAGES[stage]["cmd"].startswith(f"python -m diffattr.stage {stage} ")
    assert "src/diffattr/stages/runner.py" in STAGES[stage]["deps"]
