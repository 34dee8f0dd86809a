"""Stage 5: the LDS ground truth ([KFAC-IF] protocol) — models retrained on random subsets.

M random subsets (a share α of the training set) × R seeds, each trained with stage 1's recipe
for `retrain.steps` steps, go into a resumable store (`diffattr.retraining`): a rerun trains
only the missing models, so raising M or R trains only the new ones. Every model, and stage 1's
final model, is then measured on the same K (t, ε) draws per query: m(θ, q) is the query's
loss averaged over them. The ground truth of subset m is the mean over its R seeds.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from tqdm import tqdm

from diffattr.artifacts.ground_truth import GroundTruth
from diffattr.artifacts.queries import QuerySet
from diffattr.artifacts.training_run import TrainingRun
from diffattr.devices import resolve_device
from diffattr.evaluation.lds import LDSResult, seed_vs_rest
from diffattr.evaluation.measurement import QueryMeasurement
from diffattr.params import Params
from diffattr.retraining import (
    ModelStore,
    RetrainJob,
    SlurmOptions,
    lds_jobs,
    retrain,
    store_settings,
)
from diffattr.stages.inputs import query_measurement
from diffattr.stages.train import write_metrics

LDS_STORE = "lds"
MEASUREMENTS_DIR = ".measurements"  # in a model store: the saved QueryMeasurement files


@dataclass
class GroundTruthResult:
    truth: GroundTruth
    ceiling: LDSResult  # one seed against the mean of the others (exact retraining)
    trained_now: list[str]  # models trained in this run (the rest were already in the store)
    metrics: dict


def recipe(P: Params):
    """The training recipe of every retrained model: stage 1's, for `retrain.steps` steps."""
    steps = P.retrain_steps()
    warmup = min(P.train.warmup_steps, steps // 2)
    return replace(P.train, steps=steps, warmup_steps=warmup, checkpoints=[steps])


def slurm_options(P: Params, store_path: Path) -> SlurmOptions:
    r = P.retrain
    return SlurmOptions(
        partition=r.slurm_partition,
        gpus_per_job=r.slurm_gpus,
        time_min=r.slurm_time_min,
        array_parallelism=r.slurm_parallelism,
        folder=store_path / ".submitit",
    )


def retrain_models(
    P: Params,
    dataset,
    jobs,
    store_path: Path,
    family: dict,
    progress: bool,
    measurement: QueryMeasurement | None = None,
) -> tuple[ModelStore, list[str], float]:
    """Train the pending `jobs` into the store at store_path; (store, keys trained, seconds).
    With a measurement, each job measures its new model where it trained it (saved once under
    `<store>/.measurements/`)."""
    cfg = recipe(P)
    store = ModelStore.open(store_path, store_settings(dataset, P.model, cfg, **family))
    measurement_file = None
    if measurement is not None:
        measurement_file = measurement.save(store.path / MEASUREMENTS_DIR)
    started = time.perf_counter()
    trained = retrain(
        store,
        jobs,
        dataset,
        P.model,
        cfg,
        executor=P.retrain.executor,
        workers=P.retrain.workers,
        threads=P.retrain.threads,
        device=P.device,
        slurm=slurm_options(P, store_path),
        progress=progress,
        measurement=measurement_file,
    )
    return store, trained, time.perf_counter() - started


@dataclass
class Retrained:
    """Stage 5's models, all finished in the store, and what measuring them needs."""

    run: TrainingRun
    queries: QuerySet
    measurement: QueryMeasurement
    jobs: list[RetrainJob]
    train_ids: np.ndarray  # [N] dataset ids of the training set
    masks: np.ndarray  # [M, N] bool: subset m holds training sample j
    store: ModelStore
    trained_now: list[str]  # models trained in this run (the rest were already in the store)
    seconds: float  # wall time of this run's retraining


def retrain_subsets(
    P: Params,
    train_dir: str | Path = "data/train",
    out_dir: str | Path = "data/retrain",
    progress: bool = True,
) -> Retrained:
    """Train the models of `retrain.subsets` × `retrain.seeds` that the store lacks.

    What it prints (a bar, a line per model as it finishes, in finishing order) depends on what
    the store already held; everything computed from the models does not."""
    r = P.retrain
    run_ = TrainingRun.open(train_dir)
    dataset = P.data.load("train")
    run_.check_dataset(dataset)
    queries = run_.query_set(P.data.load("heldout"), P.gradients.heldout_queries)
    jobs, masks = lds_jobs(dataset.ids, r.subsets, r.seeds, r.fraction, r.subset_seed)
    family = {"fraction": r.fraction, "subset_seed": r.subset_seed}
    measurement = QueryMeasurement(
        queries.images,
        query_measurement(P, run_, queries),
        run_.alphas_cumprod(),
        run_.settings["model"]["loss"],
        queries.content_hash(),
    )
    store, trained, seconds = retrain_models(
        P, dataset, jobs, Path(out_dir) / LDS_STORE, family, progress, measurement
    )
    print(
        f"{len(jobs)} models in {store.path}: {len(trained)} trained in this run "
        f"({seconds:.1f} s), {len(jobs) - len(trained)} from earlier runs"
    )
    return Retrained(run_, queries, measurement, jobs, dataset.ids, masks, store, trained, seconds)


def measure_models(
    P: Params,
    retrained: Retrained,
    out_dir: str | Path = "data/retrain",
    report_dir: str | Path = "reports/05_ground_truth",
    progress: bool = True,
) -> GroundTruthResult:
    """Every retrained model's measurement and stage 1's final model's, on the same draws per
    query; saves the ground truth to out_dir and the metrics to report_dir.

    A model's jobs measured it as they trained it (its record holds the values under the
    measurement's key); a model without them (trained before, or for another measurement) is
    measured here, with a bar over those."""
    r, run_, queries, jobs = P.retrain, retrained.run, retrained.queries, retrained.jobs
    device = resolve_device(P.device)
    measurement, store = retrained.measurement, retrained.store
    draws = measurement.draws
    records = [store.record(job) for job in jobs]
    values = np.zeros((r.subsets, r.seeds, len(queries.key)))
    missing = []
    for job, record in zip(jobs, records, strict=True):
        found = record.get("measurements", {}).get(measurement.key)
        if found is None:
            missing.append(job)
        else:
            values[job.info["subset_index"], job.seed_index] = found
    quiet = not progress or not missing  # no bar when every job measured its model
    for job in tqdm(missing, disable=quiet, desc="measuring", mininterval=2.0):
        model = store.load_ema(job, device)
        values[job.info["subset_index"], job.seed_index] = measurement(model, device)
    full = measurement(run_.load_model(ema=True)[0].to(device), device)
    model_cfg = run_.settings["model"]
    truth = GroundTruth(
        masks=retrained.masks,
        measurements=values,
        full=full,
        train_ids=retrained.train_ids,
        query_kind=queries.kind,
        query_key=queries.key,
        settings={
            "run_id": run_.identity,
            "queries_hash": queries.content_hash(),
            "subsets": r.subsets,
            "seeds": r.seeds,
            "fraction": r.fraction,
            "subset_seed": r.subset_seed,
            "recipe": vars(recipe(P)),
            "measurement": draws.settings(model_cfg["loss"]),
            "store": str(Path(out_dir) / LDS_STORE),
        },
    )
    truth.save(out_dir)
    ceiling = seed_vs_rest(values) if r.seeds > 1 else None
    model_seconds = [rec.get("wall_time_s") for rec in records]
    metrics = {
        "models": len(jobs),
        "trained_now": len(retrained.trained_now),  # run history: check-reports ignores it
        "retrain_wall_time_s": round(retrained.seconds, 1),
        "mean_model_train_s": float(np.mean([s for s in model_seconds if s is not None] or [0])),
        "steps_per_model": recipe(P).steps,
        "measure_draws": r.measure_draws,
        "n_queries": int(len(queries.key)),
        "seed_vs_rest_lds": None if ceiling is None else ceiling.to_dict() | {"rho": None},
        "full_model_loss": float(full.mean()),
        "subset_model_loss": float(values.mean()),
    }
    write_metrics(report_dir, metrics)
    return GroundTruthResult(truth, ceiling, retrained.trained_now, metrics)


def run(
    P: Params,
    train_dir: str | Path = "data/train",
    out_dir: str | Path = "data/retrain",
    report_dir: str | Path = "reports/05_ground_truth",
    progress: bool = True,
) -> GroundTruthResult:
    """The whole stage: retrain what is missing, then measure every model."""
    retrained = retrain_subsets(P, train_dir, out_dir, progress)
    return measure_models(P, retrained, out_dir, report_dir, progress)
