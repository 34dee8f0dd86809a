"""The one job function: train one model of a store with stage 1's `train`, then commit it.

Every executor (in-process, local worker pool, SLURM array through submitit) calls
`train_job`. It skips a finished model, resumes an interrupted one from its work folder
(`<store>/.work/<family>/<tag>/`, kept until the model is committed) and raises RetrainJobError
naming the job and that folder on any failure.
"""

from __future__ import annotations

import datetime
import json
import pickle
import shutil
import socket
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from diffattr.data.datasets import ImageDataset
from diffattr.devices import determinism_settings, resolve_device
from diffattr.diffusion.training import train
from diffattr.evaluation.measurement import QueryMeasurement
from diffattr.retraining.jobs import RetrainJob, retrain_seed
from diffattr.retraining.store import ModelStore, StoreMismatchError, ids_hash, store_settings
from diffattr.storage.arrays import setting_differences

if TYPE_CHECKING:  # params imports this package (for its vocabulary)
    from diffattr.params import ModelParams, TrainParams

# A dataset, or a picklable zero-argument loader of it (e.g. `DataParams(...).load`): workers
# on other machines load the data themselves instead of receiving it pickled with every job.
DataSource = ImageDataset | Callable[[], ImageDataset]

_LOADED: dict[bytes, ImageDataset] = {}  # one loaded dataset per process, keyed by its loader
_MEASUREMENTS: dict[str, QueryMeasurement] = {}  # one loaded measurement per process, by path


def load_measurement(path: str | Path) -> QueryMeasurement:
    """A saved QueryMeasurement, read once per process (the last one is cached)."""
    key = str(Path(path).resolve())
    if key not in _MEASUREMENTS:
        _MEASUREMENTS.clear()
        _MEASUREMENTS[key] = QueryMeasurement.load(path)
    return _MEASUREMENTS[key]


class RetrainJobError(RuntimeError):
    """A retraining job failed; the message names the job and its partial output."""


def resolve_data(data: DataSource) -> ImageDataset:
    """The dataset of a DataSource; a loader runs once per process (the last one is cached)."""
    if isinstance(data, ImageDataset):
        return data
    key = pickle.dumps(data)
    if key not in _LOADED:
        _LOADED.clear()
        _LOADED[key] = data()
    return _LOADED[key]


def job_train_params(train_cfg: TrainParams, job: RetrainJob) -> TrainParams:
    """The recipe with the job's seed; one checkpoint (the last step) instead of the trajectory."""
    return replace(
        train_cfg, seed=retrain_seed(train_cfg.seed, job.seed_index), checkpoints=[train_cfg.steps]
    )


def train_job(
    store_path: str | Path,
    job: RetrainJob,
    data: DataSource,
    model_cfg: ModelParams,
    train_cfg: TrainParams,
    device: str = "auto",
    threads: int | None = None,
    measurement: str | Path | None = None,
) -> dict:
    """Train `job`'s model into the store at `store_path` and return its record (model.json).

    A finished model is not retrained (its record is returned). data must be the store's full
    training set; model_cfg and train_cfg the store's recipe (train_cfg.seed is the base seed).
    threads: torch CPU threads while training (restored after); on the CPU the weights depend on
    it, so it is recorded. measurement: a saved `QueryMeasurement` file; the new model's EMA
    weights are measured on it where they were trained (in parallel with the other jobs) and
    the [Q] values recorded under `measurements.<its key>`. Raises RetrainJobError naming the
    job and its work folder.
    """
    store = ModelStore.read(store_path)
    if store.is_finished(job):
        record = store.record(job)
        store.check_record(job, record)
        return record
    work = store.work_folder(job)
    saved_threads = torch.get_num_threads()
    try:
        if threads is not None:
            torch.set_num_threads(threads)
        measure = None if measurement is None else load_measurement(measurement)
        dataset = resolve_data(data)
        return _train_and_commit(store, job, dataset, model_cfg, train_cfg, device, measure)
    except Exception as err:
        raise RetrainJobError(
            f"retraining job {job.key} failed: {type(err).__name__}: {err}\n"
            f"Its partial training is in {work} (a rerun resumes from its last checkpoint); "
            f"finished models stay in {store.path}."
        ) from err
    finally:
        torch.set_num_threads(saved_threads)


def _train_and_commit(
    store: ModelStore,
    job: RetrainJob,
    dataset: ImageDataset,
    model_cfg: ModelParams,
    train_cfg: TrainParams,
    device: str,
    measure: QueryMeasurement | None,
) -> dict:
    started = time.perf_counter()
    expected = store_settings(dataset, model_cfg, train_cfg, **store.settings["jobs"])
    lines = setting_differences(store.settings, expected, "settings")
    if lines:
        raise StoreMismatchError(
            "the data or recipe given to the job differ from the store's:\n" + "\n".join(lines)
        )
    subset = dataset.subset(job.train_ids)  # KeyError for ids not in the set (named above)
    cfg = job_train_params(train_cfg, job)
    work = store.work_folder(job)
    out = work / "out"
    result = train(
        subset, model_cfg, cfg, out, resolve_device(device), work_dir=work / "run", progress=False
    )
    measured = {}
    if measure is not None:
        measure_started = time.perf_counter()
        values = measure(result.ema, next(result.ema.parameters()).device)
        measured = {
            "measurements": {measure.key: values.tolist()},
            "measure_s": time.perf_counter() - measure_started,
        }
    record = {
        **measured,
        "key": job.key,
        "family": job.family,
        "tag": job.tag,
        "seed_index": job.seed_index,
        "seed": cfg.seed,
        "info": job.info,
        "n_train": len(job.train_ids),
        "train_ids_hash": ids_hash(job.train_ids),
        "train_ids": job.train_ids.tolist(),
        "training": result.settings,
        "ema_hash": json.loads((out / "run.json").read_text())["final_ema_hash"],
        "train_time_s": result.wall_time_s,
        "resumed_from_step": result.resumed_from_step,
        "wall_time_s": time.perf_counter() - started,
        "device": str(next(result.ema.parameters()).device),
        "torch_threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "runtime": determinism_settings(),  # CUDA / cuDNN versions, GPU, determinism flags
        "host": socket.gethostname(),
        "finished_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    store.commit(job, out / "final_ema", record)
    shutil.rmtree(work, ignore_errors=True)
    return record
