# diffattr: `make repro` (set up + run the whole pipeline) and `make test` (set up + tests).
# TORCH_SPEC picks the PyTorch build installed first, e.g. for a CUDA 12.4 GPU:
#   make repro TORCH_SPEC="torch --index-url https://download.pytorch.org/whl/cu124"
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.diffattr-installed
export DVC_NO_ANALYTICS := 1
export HF_HUB_OFFLINE := 1
export PYTHONHASHSEED := 0
# dvc runs stage commands in a shell: put the environment first on its PATH.
export PATH := $(abspath $(VENV))/bin:$(PATH)

# Quiet the kernel's "running over TCP without encryption" warning on every notebook run.
define SILENCE_KERNEL
import json, pathlib, sys
spec = pathlib.Path(sys.prefix, "share/jupyter/kernels/python3/kernel.json")
k = json.loads(spec.read_text())
flag = "--IPKernelApp.log_level=ERROR"
k["argv"] += [] if flag in k["argv"] else [flag]
spec.write_text(json.dumps(k, indent=1))
endef
export SILENCE_KERNEL

# The dev extra of pyproject.toml, split: curvlinops-for-pytorch and backpack-for-pytorch
# declare torchvision (it breaks `import diffusers` next to our torch build; neither needs it),
# so they go in with --no-deps; every other entry, their real runtime deps included, normally.
define DEV_REQUIREMENTS
import re, sys
try:
    import tomllib
except ImportError:  # Python 3.10
    from pip._vendor import tomli as tomllib
with open("pyproject.toml", "rb") as f:
    dev = tomllib.load(f)["project"]["optional-dependencies"]["dev"]
no_deps = {"curvlinops-for-pytorch", "backpack-for-pytorch"}
want = sys.argv[1] == "no-deps"
print(" ".join(f'"{r}"' for r in dev if (re.split(r"[ <>=!~;\[]", r)[0].lower() in no_deps) == want))
endef
export DEV_REQUIREMENTS

.PHONY: env repro test test-dvc lint notebooks-clean outliers check-reports memorisation memorise

env: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(TORCH_SPEC)
	$(BIN)/pip install --quiet -e .
	$(BIN)/python -c "$$DEV_REQUIREMENTS" deps | xargs $(BIN)/pip install --quiet
	$(BIN)/python -c "$$DEV_REQUIREMENTS" no-deps | xargs $(BIN)/pip install --quiet --no-deps
	$(BIN)/python -c "import importlib.util as u, sys; sys.exit(u.find_spec('torchvision') is not None and 'torchvision got installed: it breaks import diffusers here')"
	$(BIN)/python -m ipykernel install --sys-prefix --name python3 --display-name "Python 3 (diffattr)"
	$(BIN)/python -c "$$SILENCE_KERNEL"
	$(BIN)/dvc config core.analytics false
	$(BIN)/dvc config core.check_update false
	touch $(STAMP)

repro: env
	$(BIN)/dvc repro

test: env
	$(BIN)/ruff check src tests benchmarks notebooks
	$(BIN)/pytest -q

# `dvc repro` killed during stage 2 and failing, and check-reports passing on stage 1 then
# failing once its report is edited by hand, on copies of the project (a few minutes).
test-dvc: env
	$(BIN)/pytest -q -m dvc

lint: env
	$(BIN)/ruff check src tests benchmarks notebooks
	$(BIN)/ruff format --check src tests benchmarks notebooks

# Are the committed reports of the default run current? dvc status against dvc.lock, then nbval
# re-executes every reports/0N_*/0N_*.ipynb against data/ (writing under scratch/check-reports/,
# never to DVC's outputs) and compares every output but timings, paths and addresses
# (reports/nbval-sanitize.cfg), then metrics.json and plots/*.csv. Needs data/ from `dvc repro`;
# about 10 minutes on two idle CPU cores (the six notebooks' run time), so not part of `make test`.
check-reports: env
	$(BIN)/python -m diffattr.stages.check_reports

# Strip outputs from the source notebooks (the executed ones live in reports/).
notebooks-clean: env
	$(BIN)/jupyter nbconvert --clear-output --inplace notebooks/*.ipynb

# The outlier study ([ReTrac] §5) on CPU: stages 1-4 under `profile: digits_outliers`, outputs
# in data/outliers/ (git-ignored) and reports/digits_outliers/ (committed).
OUTLIERS := -p params_file params.yaml -p overrides "{profile: digits_outliers}"
outliers: env
	$(BIN)/python -m diffattr.stage train $(OUTLIERS) -p out_dir data/outliers/train \
	  -p report_dir reports/digits_outliers/01_train
	$(BIN)/python -m diffattr.stage gradients $(OUTLIERS) -p train_dir data/outliers/train \
	  -p out_dir data/outliers/gradients -p report_dir reports/digits_outliers/02_gradients
	$(BIN)/python -m diffattr.stage timestep_bias $(OUTLIERS) -p train_dir data/outliers/train \
	  -p gradient_dir data/outliers/gradients -p scores_dir data/outliers/scores \
	  -p report_dir reports/digits_outliers/03_timestep_bias
	$(BIN)/python -m diffattr.stage retrac $(OUTLIERS) -p train_dir data/outliers/train \
	  -p gradient_dir data/outliers/gradients -p scores_dir data/outliers/scores \
	  -p report_dir reports/digits_outliers/04_retrac

# The memorisation control (image tracing with a ground truth) on CPU: stage 1 under
# `profile: digits_memorise`, then the study (every method under every protocol, its own stage 2
# extractions); outputs in data/memorise/ (git-ignored, ~3.5 GB) and reports/digits_memorise/
# (committed). 15-30 minutes on a 2-core CPU (idle / shared): training 2-8 min, the stage 2
# extractions 17 min shared (the interval window's, every replayed draw, 11 of them), scoring
# 4-6 min. Not part of `dvc repro`.
memorise: memorisation
MEMORISE := -p params_file params.yaml -p overrides "{profile: digits_memorise}"
memorisation: env
	$(BIN)/python -m diffattr.stage train $(MEMORISE) -p out_dir data/memorise/train \
	  -p report_dir reports/digits_memorise/01_train
	$(BIN)/python -m diffattr.stage memorisation $(MEMORISE) -p train_dir data/memorise/train \
	  -p out_dir data/memorise/gradients -p report_dir reports/digits_memorise/07_memorisation
