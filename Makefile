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

.PHONY: removal interval env repro test test-dvc lint notebooks-clean outliers outliers-photo outliers-flat seeds check-reports memorisation memorise

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
# about 9 minutes on two idle CPU cores (525 s measured), so not part of `make test`.
check-reports: env
	$(BIN)/python -m diffattr.stages.check_reports

# Strip outputs from the source notebooks (the executed ones live in reports/).
notebooks-clean: env
	$(BIN)/jupyter nbconvert --clear-output --inplace notebooks/*.ipynb

# The outlier study ([ReTrac] §5) on CPU, for two outlier kinds: stages 1-4 under profile
# digits_outliers (64 photo patches, more complex than digits: data/outliers/, git-ignored, and
# reports/digits_outliers/, committed) and digits_outliers_flat (64 near-constant images,
# simpler: data/outliers_flat/, reports/digits_outliers_flat/).
STAGE := $(BIN)/python -m diffattr.stage
# Stages 1-4 under $(1) a profile, into $(2) a data folder and $(3) a report folder.
define OUTLIER_STUDY
	$(STAGE) train -p params_file params.yaml -p overrides "{profile: $(1)}" \
	  -p out_dir $(2)/train -p report_dir $(3)/01_train
	$(STAGE) gradients -p params_file params.yaml -p overrides "{profile: $(1)}" \
	  -p train_dir $(2)/train -p out_dir $(2)/gradients -p report_dir $(3)/02_gradients
	$(STAGE) timestep_bias -p params_file params.yaml -p overrides "{profile: $(1)}" \
	  -p train_dir $(2)/train -p gradient_dir $(2)/gradients -p scores_dir $(2)/scores \
	  -p report_dir $(3)/03_timestep_bias
	$(STAGE) retrac -p params_file params.yaml -p overrides "{profile: $(1)}" \
	  -p train_dir $(2)/train -p gradient_dir $(2)/gradients -p scores_dir $(2)/scores \
	  -p report_dir $(3)/04_retrac
endef
outliers: outliers-photo outliers-flat
outliers-photo: env
	$(call OUTLIER_STUDY,digits_outliers,data/outliers,reports/digits_outliers)
outliers-flat: env
	$(call OUTLIER_STUDY,digits_outliers_flat,data/outliers_flat,reports/digits_outliers_flat)

# Uncertainty over seeds (issue 9): stages 3-4 of the default run (projection seed 0); stage 2
# rerun with gradients.projection_seed 1 and 2, stages 3-4 on each; a second training seed
# (train.seed 1: stages 1-4). Each run in data/seeds/<run>/ (git-ignored, reports included);
# their stage 3-4 headline numbers, intervals and verdicts collected into reports/seeds/
# (committed: metrics.json, table.csv, README.md, figures/seed_spread.png) by
# diffattr.evaluation.seed_study. About 15 minutes on an idle 2-core machine.
# Reuses the default run's data/train and data/gradients (made by dvc repro when missing).
SEEDS := data/seeds
# Stages 3-4 of one run: $(1) its folder under $(SEEDS), $(2) overrides, $(3) train dir,
# $(4) gradient dir.
define SEED_STAGES_34
	$(STAGE) timestep_bias -p params_file params.yaml -p overrides "$(2)" -p train_dir $(3) \
	  -p gradient_dir $(4) -p scores_dir $(SEEDS)/$(1)/scores \
	  -p report_dir $(SEEDS)/$(1)/reports/03_timestep_bias
	$(STAGE) retrac -p params_file params.yaml -p overrides "$(2)" -p train_dir $(3) \
	  -p gradient_dir $(4) -p scores_dir $(SEEDS)/$(1)/scores \
	  -p report_dir $(SEEDS)/$(1)/reports/04_retrac
endef
seeds: env
	test -f data/gradients/index.json || $(BIN)/dvc repro gradients
	$(call SEED_STAGES_34,proj0,{},data/train,data/gradients)
	for seed in 1 2; do \
	  $(STAGE) gradients -p params_file params.yaml \
	    -p overrides "{gradients: {projection_seed: $$seed}}" -p train_dir data/train \
	    -p out_dir $(SEEDS)/proj$$seed/gradients \
	    -p report_dir $(SEEDS)/proj$$seed/reports/02_gradients || exit 1; \
	done
	$(call SEED_STAGES_34,proj1,{gradients: {projection_seed: 1}},data/train,$(SEEDS)/proj1/gradients)
	$(call SEED_STAGES_34,proj2,{gradients: {projection_seed: 2}},data/train,$(SEEDS)/proj2/gradients)
	$(STAGE) train -p params_file params.yaml -p overrides "{train: {seed: 1}}" \
	  -p out_dir $(SEEDS)/train1/train -p report_dir $(SEEDS)/train1/reports/01_train
	$(STAGE) gradients -p params_file params.yaml -p overrides "{train: {seed: 1}}" \
	  -p train_dir $(SEEDS)/train1/train -p out_dir $(SEEDS)/train1/gradients \
	  -p report_dir $(SEEDS)/train1/reports/02_gradients
	$(call SEED_STAGES_34,train1,{train: {seed: 1}},$(SEEDS)/train1/train,$(SEEDS)/train1/gradients)
	$(BIN)/python -m diffattr.evaluation.seed_study $(SEEDS) reports/seeds

# The TracIn family under the protocol the memorisation control recommends, scored by LDS:
# stage 2 again with `replay_window: interval` (every replayed draw: 92,288 gradients, ~0.7 GB
# in data/interval/; 22 min measured on a shared 2-core machine, ~5 min expected idle at ~3 ms
# a gradient), then stage 6 on the default ground truth (data/retrain) for the TracIn family
# only (a minute; grad-cosine is TracIn with the unit aggregate). Reports in
# reports/digits_interval/ (committed). Not part of `dvc repro`.
INTERVAL_METHODS := [random, pixel_cosine, grad_dot, grad_cosine, tracin, retrac, calibrated, \
  {name: retrac_unit, method: retrac, args: {aggregate: unit}}, \
  {name: calibrated_unit, method: calibrated, args: {aggregate: unit}}]
INTERVAL := -p params_file params.yaml -p overrides "{gradients: {replay_window: interval}, \
  lds: {methods: $(INTERVAL_METHODS), removal_queries: 0}}"
interval: env
	test -f data/retrain/ground_truth.json || $(BIN)/dvc repro ground_truth
	$(BIN)/python -m diffattr.stage gradients $(INTERVAL) -p train_dir data/train \
	  -p out_dir data/interval/gradients -p report_dir reports/digits_interval/02_gradients
	$(BIN)/python -m diffattr.stage lds $(INTERVAL) -p train_dir data/train \
	  -p gradient_dir data/interval/gradients -p retrain_dir data/retrain \
	  -p removal_dir data/interval/removal -p report_dir reports/digits_interval/06_lds

# Retraining without each query's top proponents ([KFAC-IF] §5), off in the default run: stage 6
# on the default run's data with `lds.removal_queries: 8` — every method scored again (3-4
# minutes), then 25 models of `retrain.steps` (the full set once; per query, without EK-FAC's,
# TracIn's and k random proponents): about 10 minutes on 2 idle cores. Models in
# data/removal_study/ (a resumable store, git-ignored), reports in reports/digits_removal/
# (committed). Not part of `dvc repro`.
REMOVAL := -p params_file params.yaml -p overrides "{lds: {removal_queries: 8}}"
removal: env
	test -f data/retrain/ground_truth.json || $(BIN)/dvc repro ground_truth
	test -f data/gradients/index.json || $(BIN)/dvc repro gradients
	$(BIN)/python -m diffattr.stage lds $(REMOVAL) -p train_dir data/train \
	  -p gradient_dir data/gradients -p retrain_dir data/retrain \
	  -p removal_dir data/removal_study -p report_dir reports/digits_removal/06_lds

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
