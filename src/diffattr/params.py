"""Typed, validated parameters: one source of defaults, scale profiles, `params.yaml` overrides.

`params.yaml` names a `profile` (a scale: digits, cifar2, …) and may override any key of any
section; the profile supplies everything else. A misspelt section, key or choice fails at once
with the valid options.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from diffattr import methods
from diffattr.data.datasets import DATASET_NAMES, ImageDataset, load_dataset
from diffattr.diffusion.model import UNET_CONFIGS
from diffattr.diffusion.schedule import SCHEDULES
from diffattr.diffusion.task import LOSS_KINDS
from diffattr.diffusion.training import LR_DECAYS, resolve_checkpoint_steps
from diffattr.evaluation.measurement import T_SAMPLINGS
from diffattr.gradients.engines import ENGINES
from diffattr.gradients.items import REPLAY_WINDOWS
from diffattr.gradients.projection import PROJECTION_KINDS
from diffattr.retraining.executors import EXECUTORS


@dataclass
class DataParams:
    dataset: str = "digits"
    root: str = "data/raw"  # where user-provided datasets live (CIFAR-10, MNIST, CelebA)
    image_size: int | None = None  # None = the dataset's native working size
    split_seed: int = 0  # train / held-out split and subset draws
    max_train: int | None = None  # keep only the first N training images (smoke runs)

    def load(self, split: str = "train") -> ImageDataset:
        """The configured dataset split (max_train applies to the training split only)."""
        limit = self.max_train if split == "train" else None
        return load_dataset(
            self.dataset,
            split,
            self.root,
            image_size=self.image_size,
            seed=self.split_seed,
            limit=limit,
        )


@dataclass
class ModelParams:
    unet: str = "tiny"
    schedule: str = "linear"
    num_train_timesteps: int = 1000
    loss: str = "l2"  # [ReTrac]'s released code trains and attributes with l1


@dataclass
class TrainParams:
    steps: int = 800
    batch_size: int = 64
    lr: float = 1e-3
    warmup_steps: int = 100
    lr_decay: str = "constant"  # constant (as DDPM) | cosine (to ~0 by the last step, so late
    #                             checkpoints get little weight in TracIn: artifacts.learning_rates)
    weight_decay: float = 0.0
    ema_decay: float = 0.995
    grad_clip: float = 1.0  # max global gradient norm; 0 disables clipping
    checkpoints: int | list[int] = 5  # a count (evenly spaced, the last at `steps`) or steps
    resume_every: int = 250  # steps between resume checkpoints
    seed: int = 0  # initialisation, batch order, timesteps and noise of every step


@dataclass
class SampleParams:
    num_queries: int = 32  # generated samples of the final EMA model, attributed later
    num_inference_steps: int = 250  # DDPM ancestral steps (strided from T)
    seed: int = 1000  # query i is generated from seed + i
    batch_size: int = 64
    grid_samples: int = 16  # samples shown per checkpoint in the notebook
    grid_inference_steps: int = 100  # DDPM steps for those (a quick look, not the queries)


@dataclass
class GradientParams:
    checkpoints: str | list[int] = "all"  # trajectory checkpoints (raw weights): all | last | steps
    replay_window: str = "epoch"  # epoch: the last epoch before each checkpoint | interval: all
    #                               steps since the previous checkpoint
    query_timesteps: int = 8  # M: evenly spaced grid of timesteps for queries
    query_draws: int = 2  # S: noise draws per query timestep (averaged, kept per timestep)
    heldout_queries: int = 16  # held-out images attributed beside the generated queries
    train_timesteps: int = 2  # grid for training samples at raw checkpoints (grid-side TracIn)
    ema_train_timesteps: int = 10  # grid for training samples at the final EMA weights (TRAK,
    #                                D-TRAK, influence functions: their own draws)
    train_grid_at: str = "last"  # raw checkpoints with training-grid features: last | all
    ema: bool = True  # also extract at the final EMA weights (influence functions, TRAK)
    profile_timesteps: int = 20  # fine grid for the norm-vs-timestep profile
    profile_samples: int = 16  # training samples in the profile
    profile_draws: int = 2  # noise draws per (sample, timestep) in the profile
    projection: str = "auto"  # auto (sparse on CPU, rademacher on GPU) | sparse | gaussian |
    #                           rademacher | none
    projection_dim: int = 2048
    projection_seed: int = 0
    engine: str = "auto"  # per-sample gradients: auto (layerwise where the model allows) |
    #                       layerwise | vmap (torch.func); same numbers to float rounding
    batch_size: int = 64  # items per gradient call
    chunk_size: int | None = None  # items per engine pass (None = the whole batch at once)
    seed: int = 0  # keys the grid noise draws


@dataclass
class AttributionParams:
    top_k: int = 10  # proponents per query counted by the specificity metrics
    tau: float = 0.5  # "generally influential": in the top-k of at least this share of queries
    band_quantile: float = 0.75  # the large-norm band: timesteps whose mean ‖g‖ is above this
    #                              quantile of the norm profile (the top quartile)
    # Methods scored in stages 3-4: registered names (python -m diffattr.params --methods) or
    # variants {name, method, args}, e.g. {name: retrac_grid, method: retrac,
    # args: {train_side: grid, checkpoints: last}}.
    methods: list = field(
        default_factory=lambda: [
            "tracin",
            "retrac",
            "calibrated",
            "grad_cosine",
            "pixel_cosine",
            "random",
        ]
    )
    sweep_k: list[int] = field(default_factory=lambda: [1, 5, 10, 20, 50])
    sweep_tau: list[float] = field(default_factory=lambda: [0.25, 0.5, 0.75])


@dataclass
class RetrainParams:
    """Ground truth for the LDS: models retrained on random subsets of the training set."""

    subsets: int = 10  # M random subsets
    seeds: int = 2  # R training seeds per subset (the ground truth is their mean)
    fraction: float = 0.5  # α: share of the training set in each subset
    steps: int | None = None  # training steps per model (None: half of train.steps)
    subset_seed: int = 0  # keys the subsets
    executor: str = "local"  # local (worker processes) | slurm (a submitit array)
    workers: int = 2  # local worker processes
    threads: int = 1  # torch CPU threads per worker (the weights depend on it: keep it fixed)
    slurm_partition: str | None = None
    slurm_gpus: int = 1  # GPUs per job
    slurm_time_min: int = 120  # time limit per job
    slurm_parallelism: int = 32  # array jobs running at once
    # K (t, ε) draws per query for m(θ, q), the same for every model. On the digits default 128
    # and 256 gave the same verdicts and LDS within 0.03 (one seed vs the rest 0.278 / 0.281):
    # the draws are shared, so their noise mostly cancels between models (README).
    measure_draws: int = 128
    measure_seed: int = 0
    t_sampling: str = "stratified"  # stratified | uniform timesteps of the measurement draws


@dataclass
class LDSParams:
    """Stage 6: every method scored by the LDS on the retrained ground truth."""

    methods: list = field(
        default_factory=lambda: [
            "random",
            "pixel_cosine",
            "grad_dot",
            "grad_cosine",
            "tracin",
            "retrac",
            "calibrated",
            "trak",
            "dtrak",
            "kfac",
            "ekfac",
            # EK-FAC as [KFAC-IF]'s code scores at scale: the stored projected training
            # features and the query grid — shows what the random projection costs.
            {
                "name": "ekfac_projected",
                "method": "ekfac",
                "args": {"query_side": "grid", "train_side": "stored"},
            },
        ]
    )
    # Values of each swept method's damping λ (absolute; the best lies where λ is comparable to
    # the curvature's small eigenvalues, which differ by method: hence a wide grid).
    dampings: list[float] = field(default_factory=lambda: [10.0**k for k in range(-10, 4)])
    split_seed: int = 0  # halves of the queries: one picks λ, the other is scored
    # Queries for retraining without their top proponents: 1 + queries × (methods + 1) models.
    # Off by default (the default run's 20-minute budget; a few queries resolve nothing):
    # `make removal` runs 8 queries (25 models) into reports/digits_removal/.
    removal_queries: int = 0
    removal_fraction: float = 0.02  # k = fraction · n_train proponents removed per query
    removal_methods: list = field(default_factory=lambda: ["ekfac", "tracin"])  # + random


@dataclass
class Params:
    profile: str = "digits"
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    data: DataParams = field(default_factory=DataParams)
    model: ModelParams = field(default_factory=ModelParams)
    train: TrainParams = field(default_factory=TrainParams)
    sample: SampleParams = field(default_factory=SampleParams)
    gradients: GradientParams = field(default_factory=GradientParams)
    attribution: AttributionParams = field(default_factory=AttributionParams)
    retrain: RetrainParams = field(default_factory=RetrainParams)
    lds: LDSParams = field(default_factory=LDSParams)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def check_dataset_size(self, n_train: int) -> None:
        """Checks that need the training-set size (after `data.max_train`), made before any
        stage works: `attribution.top_k` proponents per query must exist."""
        if self.attribution.top_k > n_train:
            raise ValueError(
                f"attribution.top_k = {self.attribution.top_k} exceeds the {n_train} training "
                f"images of {self.data.dataset!r}"
                + (f" (data.max_train = {self.data.max_train})" if self.data.max_train else "")
                + f"; set attribution.top_k ≤ {n_train}"
            )

    def method_specs(self) -> list[methods.MethodSpec]:
        """The methods of `attribution.methods`, each with its resolved arguments."""
        return methods.resolve_specs(self.attribution.methods)

    def retrain_steps(self) -> int:
        """Training steps of each retrained model (`retrain.steps`, default half the run)."""
        return self.retrain.steps or max(1, self.train.steps // 2)

    def checkpoint_steps(self) -> list[int]:
        """Sorted training steps at which attribution checkpoints are kept."""
        return resolve_checkpoint_steps(self.train.checkpoints, self.train.steps)

    def gradient_checkpoint_steps(self) -> list[int]:
        """Trajectory checkpoints the gradient stage extracts at (a subset of the kept ones)."""
        kept = self.checkpoint_steps()
        chosen = self.gradients.checkpoints
        if chosen == "all":
            return kept
        if chosen == "last":
            return kept[-1:]
        if isinstance(chosen, list) and chosen and set(chosen) <= set(kept):
            return sorted(set(chosen))
        raise ValueError(
            f"gradients.checkpoints must be all, last or a list of kept training checkpoints "
            f"{kept}; got {chosen!r}"
        )


SECTIONS = {
    "data": DataParams,
    "model": ModelParams,
    "train": TrainParams,
    "sample": SampleParams,
    "gradients": GradientParams,
    "attribution": AttributionParams,
    "retrain": RetrainParams,
    "lds": LDSParams,
}

CHOICES: dict[tuple[str, str], tuple[str, ...]] = {
    ("data", "dataset"): DATASET_NAMES,
    ("model", "unet"): tuple(UNET_CONFIGS),
    ("model", "schedule"): SCHEDULES,
    ("model", "loss"): LOSS_KINDS,
    ("train", "lr_decay"): LR_DECAYS,
    ("gradients", "replay_window"): REPLAY_WINDOWS,
    ("gradients", "train_grid_at"): ("last", "all"),
    ("gradients", "projection"): ("auto", *PROJECTION_KINDS),
    ("gradients", "engine"): ENGINES,
    ("retrain", "executor"): EXECUTORS,
    ("retrain", "t_sampling"): T_SAMPLINGS,
}

_CIFAR_TRAIN = {
    "batch_size": 128,
    "lr": 2e-4,
    "warmup_steps": 5000,
    "ema_decay": 0.9999,
    "checkpoints": 10,
    "resume_every": 5000,
}

# Scales: overrides of the defaults above. Model sizes and step counts follow the papers.
PROFILES: dict[str, dict[str, dict[str, Any]]] = {
    "digits": {},
    "digits_outliers": {"data": {"dataset": "digits_outliers"}},
    "digits_outliers_flat": {"data": {"dataset": "digits_outliers_flat"}},
    # The memorisation control (`make memorisation`): a few dozen images, trained until the
    # generated samples are near-copies, so that each copy's pixel nearest neighbour is its true
    # source. Stage 2's settings stay the digits defaults (the protocol under test); the extra
    # methods normalise the aggregated vector as well as each gradient.
    "digits_memorise": {
        "data": {"max_train": 32},
        "train": {"steps": 1500, "batch_size": 32, "checkpoints": 5},
        "sample": {"num_queries": 64, "grid_samples": 8},
        "gradients": {"heldout_queries": 0},
        "attribution": {
            "methods": [
                "tracin",
                "retrac",
                "calibrated",
                "grad_cosine",
                {"name": "retrac_unit", "method": "retrac", "args": {"aggregate": "unit"}},
                {"name": "calibrated_unit", "method": "calibrated", "args": {"aggregate": "unit"}},
                "grad_dot",
                "trak",
                "dtrak",
                # 4 fitting draws per image, as the committed reports/digits_memorise was made
                # (the default became 2 later; on 32 images either costs seconds).
                {"name": "kfac", "method": "kfac", "args": {"draws": 4}},
                {"name": "ekfac", "method": "ekfac", "args": {"draws": 4}},
                # EK-FAC on what TRAK sees (the stored sketch of the EMA grid, the query grid):
                # tells the curvature from the exact, many-draw gradients.
                {
                    "name": "ekfac_projected",
                    "method": "ekfac",
                    "args": {"query_side": "grid", "train_side": "stored", "draws": 4},
                },
                "pixel_cosine",
                "random",
            ]
        },
    },
    "cifar2": {
        "data": {"dataset": "cifar2"},
        "model": {"unet": "ddpm_cifar10"},
        "train": {**_CIFAR_TRAIN, "steps": 160_000},
        "sample": {"num_queries": 100, "num_inference_steps": 1000},
    },
    "cifar10": {
        "data": {"dataset": "cifar10"},
        "model": {"unet": "ddpm_cifar10"},
        "train": {**_CIFAR_TRAIN, "steps": 800_000, "resume_every": 10_000},
        "sample": {"num_queries": 100, "num_inference_steps": 1000},
    },
    "cifar_mnist": {
        "data": {"dataset": "cifar_mnist"},
        "model": {"unet": "ddpm_cifar10"},
        "train": {**_CIFAR_TRAIN, "steps": 160_000},
        "sample": {"num_queries": 100, "num_inference_steps": 1000},
    },
    "celeba": {
        "data": {"dataset": "celeba", "image_size": 64},
        "model": {"unet": "ddpm_64"},
        "train": {**_CIFAR_TRAIN, "batch_size": 64, "steps": 500_000, "resume_every": 10_000},
        "sample": {"num_queries": 100, "num_inference_steps": 1000, "batch_size": 32},
    },
}

TOP_LEVEL = ("profile", "device", *SECTIONS)


def _unknown(kind: str, name: object, valid: tuple[str, ...] | list[str]) -> ValueError:
    hint = difflib.get_close_matches(str(name), [str(v) for v in valid], n=1)
    did_you_mean = f" (did you mean {hint[0]!r}?)" if hint else ""
    return ValueError(f"unknown {kind} {name!r}{did_you_mean}; valid: {', '.join(map(str, valid))}")


def _merge(base: dict, overrides: dict, where: str) -> dict:
    merged = copy.deepcopy(base)
    for key, value in (overrides or {}).items():
        if key not in merged:
            raise _unknown(f"parameter in {where}", key, list(merged))
        if isinstance(merged[key], dict):
            if not isinstance(value, dict):
                raise ValueError(f"{where}.{key} must be a mapping, got {value!r}")
            merged[key] = _merge(merged[key], value, f"{where}.{key}")
        else:
            merged[key] = value
    return merged


# Integer parameters that may be 0 (all others must be ≥ 1); seeds may be any integer ≥ 0.
_MAY_BE_ZERO = {
    "warmup_steps",
    "heldout_queries",
    "split_seed",
    "seed",
    "projection_seed",
    "subset_seed",
    "measure_seed",
    "removal_queries",
    "slurm_gpus",
}
_OPTIONAL = {"image_size", "max_train", "chunk_size", "steps", "slurm_partition"}  # None allowed


def _check_types(section: str, values: dict) -> None:
    """Check (and normalise in place) one section's values against its dataclass."""
    for f in dataclasses.fields(SECTIONS[section]):
        where, value = f"{section}.{f.name}", values[f.name]
        default = f.default if f.default is not dataclasses.MISSING else None
        if f.default_factory is not dataclasses.MISSING and not isinstance(value, list):
            raise ValueError(f"{where} must be a list, got {value!r}")
        if f.name == "checkpoints" and isinstance(value, list):
            _check_int_list(where, value)
        if isinstance(default, bool):
            if not isinstance(value, bool):
                raise ValueError(f"{where} must be true/false, got {value!r}")
        elif isinstance(default, float):
            values[f.name] = value = _as_float(where, value)
            if value < 0 or (f.name == "ema_decay" and value >= 1):
                raise ValueError(
                    f"{where} must be ≥ 0{' and < 1' if f.name == 'ema_decay' else ''}"
                    f", got {value!r}"
                )
        elif isinstance(default, int) or f.name in _OPTIONAL:
            if value is None and f.name in _OPTIONAL:
                continue
            if f.name == "checkpoints" and isinstance(value, list):
                continue
            if not isinstance(value, int) or isinstance(value, bool):
                raise ValueError(f"{where} must be an integer, got {value!r}")
            lowest = 0 if f.name in _MAY_BE_ZERO else 1
            if value < lowest:
                raise ValueError(f"{where} must be ≥ {lowest}, got {value}")
        if (section, f.name) in CHOICES and value not in CHOICES[(section, f.name)]:
            raise _unknown(where, value, CHOICES[(section, f.name)])


def _check_int_list(where: str, values: list) -> None:
    """A list of positive integers (training steps), naming the first bad entry."""
    for i, value in enumerate(values):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{where}[{i}] must be a positive integer (a step), got {value!r}")


def _as_float(where: str, value: object) -> float:
    """A number; also a string such as '2e-4', which YAML 1.1 reads as text."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ValueError(f"{where} must be a number, got {value!r}")
    try:
        return float(value)
    except ValueError:
        raise ValueError(f"{where} must be a number, got {value!r}") from None


def resolve(raw: dict | None = None, overrides: dict | None = None) -> Params:
    """Profile defaults ← `raw` (the contents of params.yaml) ← `overrides` (e.g. smoke scale).

    Raises ValueError naming the valid choices for an unknown profile, section, key or value.
    """
    layers = [raw or {}, overrides or {}]
    for layer in layers:
        for key in layer:
            if key not in TOP_LEVEL:
                raise _unknown("top-level parameter", key, TOP_LEVEL)
    profile = next((lay["profile"] for lay in reversed(layers) if "profile" in lay), "digits")
    if profile not in PROFILES:
        raise _unknown("profile", profile, tuple(PROFILES))
    values = Params().to_dict()
    values = _merge(values, {"profile": profile, **PROFILES[profile]}, "profile")
    for layer in layers:
        values = _merge(values, layer, "params")
    for section in SECTIONS:
        _check_types(section, values[section])
    params = Params(
        profile=values["profile"],
        device=values["device"],
        **{name: cls(**values[name]) for name, cls in SECTIONS.items()},
    )
    params.gradient_checkpoint_steps()  # validates both checkpoint lists
    _check_attribution(params.attribution)
    _check_stage5(params)
    return params


def _check_stage5(P: Params) -> None:
    """Shares in (0, 1), dampings finite and > 0, method names known."""
    r, lds = P.retrain, P.lds
    for where, value in (
        ("retrain.fraction", r.fraction),
        ("lds.removal_fraction", lds.removal_fraction),
    ):
        if not 0 < value < 1:
            raise ValueError(f"{where} must lie in (0, 1), got {value!r}")
    lds.dampings = [_as_float(f"lds.dampings[{i}]", v) for i, v in enumerate(lds.dampings)]
    bad = [v for v in lds.dampings if not (math.isfinite(v) and v > 0)]
    if not lds.dampings or bad:
        raise ValueError(f"lds.dampings must be finite numbers > 0, got {bad or 'none'}")
    methods.resolve_specs(lds.methods)
    methods.resolve_specs(lds.removal_methods)


def _check_attribution(a: AttributionParams) -> None:
    """Shares in (0, 1], quantile in (0, 1), sweep lists of positive ints / shares."""
    for name, value in (
        ("tau", a.tau),
        *((f"sweep_tau[{i}]", v) for i, v in enumerate(a.sweep_tau)),
    ):
        if not 0 < _as_float(f"attribution.{name}", value) <= 1:
            raise ValueError(f"attribution.{name} must be a share in (0, 1], got {value!r}")
    if not 0 < a.band_quantile < 1:
        raise ValueError(f"attribution.band_quantile must lie in (0, 1), got {a.band_quantile!r}")
    a.sweep_tau = [float(v) for v in a.sweep_tau]
    methods.resolve_specs(a.methods)
    if not a.sweep_k or not all(
        isinstance(k, int) and not isinstance(k, bool) and k > 0 for k in a.sweep_k
    ):
        raise ValueError(
            f"attribution.sweep_k must be a list of positive integers, got {a.sweep_k!r}"
        )
    if not a.sweep_tau:
        raise ValueError("attribution.sweep_tau must list at least one share")


def load(path: str | Path | None = "params.yaml", overrides: dict | None = None) -> Params:
    """Read a parameters file and resolve it; `path=None` means all defaults (no file).

    A named file that does not exist raises FileNotFoundError (never silently the defaults).
    """
    if path is None:
        return resolve({}, overrides)
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"no parameters file at {path.resolve()}; give the path of the project's "
            "params.yaml (relative paths are read from the working directory, "
            f"{Path.cwd()}), or pass None for the defaults"
        )
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ValueError(f"{path} is not valid YAML: {err}") from err
    if raw is not None and not isinstance(raw, dict):
        raise ValueError(f"{path} must hold a mapping of parameters, got {type(raw).__name__}")
    return resolve(raw, overrides)


def main() -> None:
    """`python -m diffattr.params [params.yaml]`: print the fully resolved parameters."""
    import sys

    print(json.dumps(load(*sys.argv[1:2]).to_dict(), indent=2))


if __name__ == "__main__":
    main()
