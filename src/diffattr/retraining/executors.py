"""Running the pending jobs of a store: local worker processes (default) or a SLURM array.

Both executors run the same `train_job`; each first drops the jobs already finished in the
store, so a rerun (after a crash, or with a larger M or R) trains only what is missing. A tqdm
bar counts finished models and each model gets a log line. On a failure no new job starts, the
jobs in flight finish, and RetrainJobError names the failed job(s) and their partial output.
"""

from __future__ import annotations

import multiprocessing
import os
import time
import warnings
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from tqdm import tqdm

from diffattr.retraining.jobs import RetrainJob
from diffattr.retraining.store import ModelStore
from diffattr.retraining.worker import DataSource, RetrainJobError, resolve_data, train_job

if TYPE_CHECKING:  # params imports this package (for its vocabulary)
    from diffattr.params import ModelParams, TrainParams

EXECUTORS = ("local", "slurm")
# How local workers start: "spawn" is safe with CUDA and with torch's thread pools.
START_METHOD = "spawn"


@dataclass
class SlurmOptions:
    """Where and how the SLURM array runs (submitit's AutoExecutor parameters).

    cluster: None picks SLURM when `sbatch` is there; "local" (one process per job, all at
    once) and "debug" (in-process) run the same path without a cluster, for testing.
    extra: further AutoExecutor parameters, e.g. ``{"slurm_account": "proj"}``.
    """

    partition: str | None = None
    gpus_per_job: int = 1
    cpus_per_job: int = 4
    mem_gb: float | None = None
    time_min: int = 120  # per job
    array_parallelism: int = 32  # jobs of the array running at once
    cluster: str | None = None
    folder: str | Path | None = None  # submitit's logs and pickles; default <store>/.submitit
    poll_s: float = 10.0  # how often the job states are checked
    extra: dict = field(default_factory=dict)


def retrain(
    store: ModelStore,
    jobs: list[RetrainJob],
    data: DataSource,
    model_cfg: ModelParams,
    train_cfg: TrainParams,
    executor: str = "local",
    workers: int = 1,
    threads: int | None = None,
    device: str = "auto",
    slurm: SlurmOptions | None = None,
    progress: bool = True,
    measurement: str | Path | None = None,
) -> list[str]:
    """Train every job of `jobs` not yet finished in `store`; returns the keys trained now.

    data: the store's full training set, or a picklable loader of it (better for SLURM: each job
    then loads the data instead of carrying it). executor: "local" (`workers` processes with
    `threads` torch threads each, default 1; 1 worker runs in this process) or "slurm" (a
    submitit array, see SlurmOptions; on a real cluster `threads` defaults to cpus_per_job).
    On the CPU the weights depend on `threads`: keep it fixed for byte-identical reruns.
    measurement: a saved `QueryMeasurement` each job applies to its new model (recorded in
    model.json; models already finished are not measured here).
    """
    if executor not in EXECUTORS:
        raise ValueError(f"unknown executor {executor!r}; use one of {EXECUTORS}")
    todo = store.pending(jobs)
    tracker = _Progress(len(jobs), len(jobs) - len(todo), progress)
    try:
        if not todo:
            return []
        if executor == "local":
            threads = 1 if threads is None else threads
            args = (workers, threads, device, tracker, measurement)
            return _run_local(store, todo, data, model_cfg, train_cfg, *args)
        args = (slurm or SlurmOptions(), threads, device, tracker, measurement)
        return _run_submitit(store, todo, data, model_cfg, train_cfg, *args)
    finally:
        tracker.close()


class _Progress:
    """A bar over models (finished / total) and one line per finished model."""

    def __init__(self, total: int, finished: int, enabled: bool):
        self.bar = tqdm(
            total=total, initial=finished, desc="retraining", unit="model", disable=not enabled
        )
        self.enabled = enabled

    def done(self, record: dict) -> None:
        self.bar.update(1)
        line = (
            f"{record['key']}: {record['n_train']} samples, {record['training']['train']['steps']} "
            f"steps in {record['wall_time_s']:.1f} s on {record['device']} "
            f"({self.bar.n}/{self.bar.total} models)"
        )
        if self.enabled:
            tqdm.write(line)

    def close(self) -> None:
        self.bar.close()


def _failure(failures: list[RetrainJobError], store: ModelStore) -> RetrainJobError:
    head = "\n\n".join(str(f) for f in failures)
    return RetrainJobError(
        f"{len(failures)} retraining job(s) failed:\n{head}\n\n"
        f"{len(store.finished())} finished models are kept in {store.path}; fix the cause and "
        "rerun: finished models are skipped, interrupted ones resume."
    )


# ---- local: worker processes on this machine ---------------------------------------------

_WORKER_DATA = None  # the dataset of a pool worker, loaded once by its initialiser


def _init_worker(data: DataSource, threads: int) -> None:
    global _WORKER_DATA
    torch.set_num_threads(threads)
    _WORKER_DATA = resolve_data(data)


def _pool_task(
    store_path: Path, job: RetrainJob, model_cfg, train_cfg, device, threads, measurement
) -> dict:
    data = _WORKER_DATA
    return train_job(store_path, job, data, model_cfg, train_cfg, device, threads, measurement)


def _run_local(
    store: ModelStore,
    todo: list[RetrainJob],
    data: DataSource,
    model_cfg: ModelParams,
    train_cfg: TrainParams,
    workers: int,
    threads: int,
    device: str,
    tracker: _Progress,
    measurement: str | Path | None,
) -> list[str]:
    if workers < 1 or threads < 1:
        raise ValueError(f"workers and threads must be >= 1, got {workers} and {threads}")
    cores = os.cpu_count() or 1
    if workers * threads > cores:
        warnings.warn(
            f"{workers} workers × {threads} threads exceed the {cores} CPU cores; they will "
            "slow each other down",
            stacklevel=3,
        )
    trained: list[str] = []
    if workers == 1:
        for job in todo:
            args = (device, threads, measurement)
            record = train_job(store.path, job, data, model_cfg, train_cfg, *args)
            trained.append(job.key)
            tracker.done(record)
        return trained

    context = multiprocessing.get_context(START_METHOD)
    failures: list[RetrainJobError] = []
    queue = iter(todo)
    in_flight: dict[Future, RetrainJob] = {}
    pool = ProcessPoolExecutor(
        workers, mp_context=context, initializer=_init_worker, initargs=(data, threads)
    )
    with pool:

        def fill() -> None:
            while len(in_flight) < workers and not failures:
                job = next(queue, None)
                if job is None:
                    return
                args = (store.path, job, model_cfg, train_cfg, device, threads, measurement)
                try:
                    in_flight[pool.submit(_pool_task, *args)] = job
                except BrokenProcessPool as err:  # a worker died before this job could start
                    lost = [*in_flight.values(), job]
                    raise _failure([_died(store, j) for j in lost], store) from err

        fill()
        while in_flight:
            done, _ = wait(in_flight, return_when=FIRST_COMPLETED)
            for future in done:
                job = in_flight.pop(future)
                try:
                    record = future.result()
                except RetrainJobError as err:
                    failures.append(err)
                except BrokenProcessPool as err:
                    lost = [job, *in_flight.values()]
                    raise _failure([_died(store, j) for j in lost], store) from err
                else:
                    trained.append(job.key)
                    tracker.done(record)
            fill()
    if failures:
        raise _failure(failures, store)
    return trained


def _died(store: ModelStore, job: RetrainJob) -> RetrainJobError:
    return RetrainJobError(
        f"retraining job {job.key} was in flight or next when a worker process died (killed, or "
        f"out of memory?); any partial training is in {store.work_folder(job)} (a rerun resumes "
        "it)."
    )


# ---- slurm: a job array through submitit --------------------------------------------------


def _run_submitit(
    store: ModelStore,
    todo: list[RetrainJob],
    data: DataSource,
    model_cfg: ModelParams,
    train_cfg: TrainParams,
    opts: SlurmOptions,
    threads: int | None,
    device: str,
    tracker: _Progress,
    measurement: str | Path | None,
) -> list[str]:
    import submitit

    folder = Path(opts.folder) if opts.folder is not None else store.path / ".submitit"
    executor = submitit.AutoExecutor(folder=folder / "%j", cluster=opts.cluster)
    params = {
        "name": f"retrain-{store.path.name}",
        "timeout_min": opts.time_min,
        "gpus_per_node": opts.gpus_per_job,
        "cpus_per_task": opts.cpus_per_job,
        "slurm_array_parallelism": opts.array_parallelism,
        **opts.extra,
    }
    if opts.partition is not None:
        params["slurm_partition"] = opts.partition
    if opts.mem_gb is not None:
        params["mem_gb"] = opts.mem_gb
    executor.update_parameters(**params)
    n = len(todo)
    if threads is None:
        threads = opts.cpus_per_job if executor.cluster == "slurm" else 1
    sjobs = executor.map_array(
        train_job,
        [store.path] * n,
        todo,
        [data] * n,
        [model_cfg] * n,
        [train_cfg] * n,
        [device] * n,
        [threads] * n,
        [measurement] * n,
    )
    pending = dict(zip(sjobs, todo, strict=True))
    in_process = executor.cluster == "debug"  # runs when asked; never block on done() there
    failures: list[RetrainJobError] = []
    trained: list[str] = []
    while pending:
        for sjob in list(pending):
            if not in_process and not sjob.done():
                continue
            job = pending.pop(sjob)
            err = sjob.exception()
            if err is None:
                trained.append(job.key)
                tracker.done(sjob.result())
                continue
            failures.append(
                RetrainJobError(
                    f"retraining job {job.key} (submitit job {sjob.job_id}) failed: {err}\n"
                    f"Logs: {sjob.paths.stdout} and {sjob.paths.stderr}; its partial training "
                    f"is in {store.work_folder(job)} (a rerun resumes it)."
                )
            )
        if pending:
            time.sleep(opts.poll_s)
    if failures:
        raise _failure(failures, store)
    return trained
