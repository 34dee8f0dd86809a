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
from diffattr.artifacts.training_run import TrainingRun
from diffattr.devices import resolve_device
from diffattr.evaluation.lds import LDSResult, seed_vs_rest
from diffattr.evaluation.measurement import measure
from diffattr.params import Params
from diffattr.retraining import ModelStore, SlurmOptions, lds_jobs, retrain, store_settings
from diffattr.stages.inputs import query_measurement
from diffattr.stages.train import write_metrics

LDS_STORE = "lds"


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
    P: Params, dataset, jobs, store_path: Path, family: dict, progress: bool
) -> tuple[ModelStore, list[str], float]:
    """Train the pending `jobs` into the store at store_path; (store, keys trained, seconds)."""
    cfg = recipe(P)
    store = ModelStore.open(store_path, store_settings(dataset, P.model, cfg, **family))
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
    )
    return store, trained, time.perf_counter() - started


def run(
    P: Params,
    train_dir: str | Path = "data/train",
    out_dir: str | Path = "data/retrain",
    report_dir: str | Path = "reports/05_ground_truth",
    progress: bool = True,
) -> GroundTruthResult:
    """Retrain what is missing, measure every model on the queries, save the ground truth."""
    r, out_dir = P.retrain, Path(out_dir)
    run_ = TrainingRun.open(train_dir)
    dataset = P.data.load("train")
    run_.check_dataset(dataset)
    queries = run_.query_set(P.data.load("heldout"), P.gradients.heldout_queries)
    jobs, masks = lds_jobs(dataset.ids, r.subsets, r.seeds, r.fraction, r.subset_seed)
    family = {"fraction": r.fraction, "subset_seed": r.subset_seed}
    store, trained, seconds = retrain_models(
        P, dataset, jobs, out_dir / LDS_STORE, family, progress
    )

    device = resolve_device(P.device)
    model_cfg = run_.settings["model"]
    abar = run_.alphas_cumprod()
    draws = query_measurement(P, run_, queries)

    def measured(model) -> np.ndarray:
        return measure(model, queries.images, draws, abar, model_cfg["loss"], device=device)

    values = np.zeros((r.subsets, r.seeds, len(queries.key)))
    for job in tqdm(jobs, disable=not progress, desc="measuring", mininterval=2.0):
        m, s = job.info["subset_index"], job.seed_index
        values[m, s] = measured(store.load_ema(job, device))
    full = measured(run_.load_model(ema=True)[0].to(device))
    records = [store.record(job) for job in jobs]
    truth = GroundTruth(
        masks=masks,
        measurements=values,
        full=full,
        train_ids=dataset.ids,
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
            "store": str(out_dir / LDS_STORE),
        },
    )
    truth.save(out_dir)
    ceiling = seed_vs_rest(values) if r.seeds > 1 else None
    model_seconds = [rec.get("wall_time_s") for rec in records]
    metrics = {
        "models": len(jobs),
        "trained_now": len(trained),
        "retrain_wall_time_s": round(seconds, 1),
        "mean_model_train_s": float(np.mean([s for s in model_seconds if s is not None] or [0])),
        "steps_per_model": recipe(P).steps,
        "measure_draws": r.measure_draws,
        "n_queries": int(len(queries.key)),
        "seed_vs_rest_lds": None if ceiling is None else ceiling.to_dict() | {"rho": None},
        "full_model_loss": float(full.mean()),
        "subset_model_loss": float(values.mean()),
    }
    write_metrics(report_dir, metrics)
    return GroundTruthResult(truth, ceiling, trained, metrics)
