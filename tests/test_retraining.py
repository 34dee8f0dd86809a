"""Retraining: deterministic jobs, a resumable store, and two executors that agree."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from diffattr.diffusion.schedule import build_scheduler
from diffattr.evaluation.measurement import QueryMeasurement, measurement_draws
from diffattr.params import TrainParams
from diffattr.retraining import (
    ModelStore,
    RetrainJob,
    RetrainJobError,
    SlurmOptions,
    StoreMismatchError,
    executors,
    lds_jobs,
    retrain,
    store_settings,
    subset_mask,
)
from diffattr.retraining import worker as train_job_mod
from diffattr.retraining.store import EMA_DIR, MODEL_FILE

WEIGHTS = f"{EMA_DIR}/diffusion_pytorch_model.safetensors"


@pytest.fixture
def recipe() -> TrainParams:
    return TrainParams(steps=4, batch_size=8, lr=1e-3, warmup_steps=1, resume_every=2, seed=3)


@pytest.fixture
def count_trainings(monkeypatch) -> list[str]:
    """Keys of the models trained in this process (jobs run in-process with 1 worker)."""
    trained: list[str] = []
    real = train_job_mod.train

    def counting(dataset, *args, **kwargs):
        trained.append(str(args[2]))  # out_dir, inside the job's work folder
        return real(dataset, *args, **kwargs)

    monkeypatch.setattr(train_job_mod, "train", counting)
    return trained


def _store(path: Path, dataset, model_params, recipe, fraction=0.5, seed=0) -> ModelStore:
    settings = store_settings(dataset, model_params, recipe, fraction=fraction, subset_seed=seed)
    return ModelStore.open(path, settings)


def _snapshot(store: ModelStore) -> dict[str, tuple[int, bytes]]:
    """key → (mtime of model.json in ns, weight file bytes) of every finished model."""
    return {
        key: (
            (store.folder(key) / MODEL_FILE).stat().st_mtime_ns,
            (store.folder(key) / WEIGHTS).read_bytes(),
        )
        for key in store.finished()
    }


def test_subsets_depend_on_seed_and_index_only_and_have_round_alpha_n_samples(tiny_dataset):
    ids = tiny_dataset.ids
    jobs3, masks3 = lds_jobs(ids, n_subsets=3, n_seeds=2, fraction=0.3, seed=5)
    jobs5, masks5 = lds_jobs(ids, n_subsets=5, n_seeds=2, fraction=0.3, seed=5)
    assert masks3.shape == (3, 40) and masks5.shape == (5, 40)
    assert np.array_equal(masks3, masks5[:3])  # raising M keeps earlier subsets
    assert (masks5.sum(1) == round(0.3 * 40)).all()
    assert len({m.tobytes() for m in masks5}) == 5
    assert not np.array_equal(subset_mask(40, 0.3, 6, 0), masks5[0])  # the seed matters
    assert [j.key for j in jobs3[:4]] == ["lds/m0000_s00", "lds/m0001_s00", "lds/m0002_s00"] + [
        "lds/m0000_s01"
    ]
    by_key = {j.key: j for j in jobs5}
    for job in jobs3:
        assert np.array_equal(job.train_ids, by_key[job.key].train_ids)
        m = job.info["subset_index"]
        assert np.array_equal(job.train_ids, np.sort(ids[masks3[m]]))
    with pytest.raises(ValueError, match="fraction"):
        lds_jobs(ids, 2, 1, fraction=1.0)


def test_same_job_gives_byte_identical_ema_weights(tiny_dataset, model_params, recipe, tmp_path):
    jobs, _ = lds_jobs(tiny_dataset.ids, n_subsets=1, n_seeds=2)
    a = _store(tmp_path / "a", tiny_dataset, model_params, recipe)
    b = _store(tmp_path / "b", tiny_dataset, model_params, recipe)
    retrain(a, jobs, tiny_dataset, model_params, recipe, device="cpu", progress=False)
    retrain(b, jobs[:1], tiny_dataset, model_params, recipe, device="cpu", progress=False)
    key0, key1 = jobs[0].key, jobs[1].key
    assert (a.folder(key0) / WEIGHTS).read_bytes() == (b.folder(key0) / WEIGHTS).read_bytes()
    assert a.record(key0)["ema_hash"] == b.record(key0)["ema_hash"]
    assert a.record(key0)["ema_hash"] != a.record(key1)["ema_hash"]  # another seed index
    record = a.record(key0)
    assert record["train_ids"] == jobs[0].train_ids.tolist()
    assert record["n_train"] == 20 and record["seed_index"] == 0
    assert record["training"]["train"]["steps"] == recipe.steps
    assert not (a.path / ".work" / "lds").exists() or not any((a.path / ".work/lds").iterdir())
    model = a.load_ema(key0)
    assert sum(p.numel() for p in model.parameters()) > 0


def test_raising_m_or_r_trains_only_the_new_models(
    tiny_dataset, model_params, recipe, tmp_path, count_trainings
):
    store = _store(tmp_path / "s", tiny_dataset, model_params, recipe)
    jobs, _ = lds_jobs(tiny_dataset.ids, n_subsets=2, n_seeds=1)
    assert retrain(store, jobs, tiny_dataset, model_params, recipe, progress=False) == [
        "lds/m0000_s00",
        "lds/m0001_s00",
    ]
    before = _snapshot(store)
    more, _ = lds_jobs(tiny_dataset.ids, n_subsets=3, n_seeds=2)
    trained = retrain(store, more, tiny_dataset, model_params, recipe, progress=False)
    assert sorted(trained) == ["lds/m0000_s01", "lds/m0001_s01", "lds/m0002_s00", "lds/m0002_s01"]
    assert len(count_trainings) == 6
    after = _snapshot(store)
    assert {k: after[k] for k in before} == before  # finished models untouched
    assert retrain(store, more, tiny_dataset, model_params, recipe, progress=False) == []
    assert len(count_trainings) == 6


def test_store_with_other_settings_is_refused_naming_the_keys(
    tiny_dataset, model_params, recipe, tmp_path
):
    _store(tmp_path / "s", tiny_dataset, model_params, recipe, fraction=0.5)
    other = TrainParams(**{**vars(recipe), "steps": 5})
    with pytest.raises(StoreMismatchError) as err:
        _store(tmp_path / "s", tiny_dataset, model_params, other, fraction=0.4)
    message = str(err.value)
    assert "settings.jobs.fraction: stored 0.5 vs requested 0.4" in message
    assert "settings.train.steps: stored 4 vs requested 5" in message
    assert "delete" in message
    # knobs that do not change the weights are not part of the store's identity
    _store(
        tmp_path / "s",
        tiny_dataset,
        model_params,
        TrainParams(**{**vars(recipe), "resume_every": 7}),
    )


def test_a_finished_key_made_for_other_ids_is_refused(tiny_dataset, model_params, recipe, tmp_path):
    store = _store(tmp_path / "s", tiny_dataset, model_params, recipe)
    ids = tiny_dataset.ids
    first = RetrainJob("removal", "q0_k5", ids[5:], seed_index=0)
    retrain(store, [first], tiny_dataset, model_params, recipe, progress=False)
    clash = RetrainJob("removal", "q0_k5", ids[6:], seed_index=0)
    with pytest.raises(StoreMismatchError, match="removal/q0_k5.train_ids_hash"):
        retrain(store, [clash], tiny_dataset, model_params, recipe, progress=False)


def test_a_failed_job_names_itself_and_its_partial_output_and_keeps_finished_models(
    tiny_dataset, model_params, recipe, tmp_path, monkeypatch
):
    store = _store(tmp_path / "s", tiny_dataset, model_params, recipe)
    jobs, _ = lds_jobs(tiny_dataset.ids, n_subsets=3, n_seeds=1)
    real = train_job_mod.train

    def failing(dataset, model_cfg, cfg, out_dir, *args, **kwargs):
        if "m0001" in str(out_dir):
            raise FloatingPointError("boom")
        return real(dataset, model_cfg, cfg, out_dir, *args, **kwargs)

    monkeypatch.setattr(train_job_mod, "train", failing)
    with pytest.raises(RetrainJobError) as err:
        retrain(store, jobs, tiny_dataset, model_params, recipe, progress=False)
    assert "lds/m0001_s00" in str(err.value) and "boom" in str(err.value)
    assert str(store.work_folder("lds/m0001_s00")) in str(err.value)
    assert store.finished() == ["lds/m0000_s00"]


def test_local_worker_pool_and_submitit_give_the_weights_of_the_in_process_run(
    tiny_dataset, model_params, recipe, tmp_path
):
    jobs, _ = lds_jobs(tiny_dataset.ids, n_subsets=2, n_seeds=1)
    runs = {
        "inproc": {"executor": "local", "workers": 1},
        "pool": {"executor": "local", "workers": 2},
        "debug": {"executor": "slurm", "slurm": SlurmOptions(cluster="debug", poll_s=0.1)},
        "local": {"executor": "slurm", "slurm": SlurmOptions(cluster="local", poll_s=0.2)},
    }
    hashes = {}
    for name, how in runs.items():
        store = _store(tmp_path / name, tiny_dataset, model_params, recipe)
        todo = jobs if name != "local" else jobs[:1]  # one subprocess is enough there
        trained = retrain(store, todo, tiny_dataset, model_params, recipe, progress=False, **how)
        assert sorted(trained) == [j.key for j in todo]
        hashes[name] = {k: (store.folder(k) / WEIGHTS).read_bytes() for k in store.finished()}
    assert hashes["pool"] == hashes["inproc"]
    assert hashes["debug"] == hashes["inproc"]
    assert hashes["local"][jobs[0].key] == hashes["inproc"][jobs[0].key]


def _dying_loader():
    os._exit(3)  # a worker process that dies (as if killed) before training anything


def test_a_dead_worker_names_the_jobs_in_flight(
    tiny_dataset, model_params, recipe, tmp_path, monkeypatch
):
    monkeypatch.setattr(executors, "START_METHOD", "fork")  # no imports in the workers: fast
    store = _store(tmp_path / "s", tiny_dataset, model_params, recipe)
    jobs, _ = lds_jobs(tiny_dataset.ids, n_subsets=2, n_seeds=1)
    # the store's settings are checked in the worker, which dies first
    with pytest.raises(RetrainJobError, match="worker process died") as err:
        retrain(store, jobs, _dying_loader, model_params, recipe, workers=2, progress=False)
    assert "lds/m0000_s00" in str(err.value)


KILLED_RUN = """
import numpy as np, torch
from diffattr.data.datasets import ImageDataset
from diffattr.params import ModelParams, TrainParams
from diffattr.retraining import ModelStore, lds_jobs, retrain, store_settings

g = torch.Generator().manual_seed(0)
dataset = ImageDataset(
    name="tiny", images=torch.rand(40, 1, 8, 8, generator=g) * 2 - 1,
    ids=np.arange(40, dtype=np.int64) * 3 + 7, labels=np.zeros(40, np.int64),
    is_outlier=np.zeros(40, bool),
)
model = ModelParams(unet="tiny")
recipe = TrainParams(steps={steps}, batch_size=8, warmup_steps=1, resume_every=5, seed=3)
settings = store_settings(dataset, model, recipe, fraction=0.5, subset_seed=0)
store = ModelStore.open({path!r}, settings)
jobs, _ = lds_jobs(dataset.ids, n_subsets={m}, n_seeds=1)
retrain(store, jobs, dataset, model, recipe, device="cpu", progress=False)
"""


def test_killing_a_run_loses_only_the_models_in_flight(
    tiny_dataset, model_params, tmp_path, count_trainings
):
    steps, m = 24, 4
    path = tmp_path / "s"
    script = tmp_path / "run.py"
    script.write_text(textwrap.dedent(KILLED_RUN.format(steps=steps, path=str(path), m=m)))
    proc = subprocess.Popen([sys.executable, str(script)], start_new_session=True)
    store = None
    deadline = time.time() + 60
    try:
        while time.time() < deadline and proc.poll() is None:
            if (path / "store.json").exists():
                store = ModelStore.read(path)
                if len(store.finished()) >= 2:
                    break
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert store is not None and proc.returncode == -signal.SIGKILL
    before = _snapshot(store)
    assert 2 <= len(before) < m, "the run finished before it could be killed; raise steps"
    recipe = TrainParams(steps=steps, batch_size=8, warmup_steps=1, resume_every=5, seed=3)
    store = _store(path, tiny_dataset, model_params, recipe)
    jobs, _ = lds_jobs(tiny_dataset.ids, n_subsets=m, n_seeds=1)
    trained = retrain(store, jobs, tiny_dataset, model_params, recipe, device="cpu", progress=False)
    assert len(trained) == len(count_trainings) == m - len(before)
    after = _snapshot(store)
    assert {k: after[k] for k in before} == before
    assert len(after) == m
    # the model in flight resumed (or restarted) to the same weights as a fresh run
    fresh = _store(tmp_path / "fresh", tiny_dataset, model_params, recipe)
    retrain(fresh, [jobs[len(before)]], tiny_dataset, model_params, recipe, progress=False)
    key = jobs[len(before)].key
    assert (fresh.folder(key) / WEIGHTS).read_bytes() == after[key][1]


def _query_measurement(dataset, draws: int = 6) -> QueryMeasurement:
    """Five of the dataset's images as held-out queries, `draws` draws each."""
    keys = dataset.ids[:5]
    return QueryMeasurement(
        dataset.images[:5],
        measurement_draws(["heldout"] * 5, keys, (1, 8, 8), draws, seed=2),
        build_scheduler("linear", 1000).alphas_cumprod,
        "l2",
        queries_hash="five-images",
    )


def test_jobs_measure_their_model_as_the_store_would_afterwards(
    tiny_dataset, model_params, recipe, tmp_path
):
    """Each executor's jobs record m(θ, q) of the model they trained; the same values as
    measuring the stored EMA weights afterwards in this process."""
    jobs, _ = lds_jobs(tiny_dataset.ids, n_subsets=2, n_seeds=1)
    measurement = _query_measurement(tiny_dataset)
    runs = {
        "inproc": {"executor": "local", "workers": 1},
        "pool": {"executor": "local", "workers": 2},
        "debug": {"executor": "slurm", "slurm": SlurmOptions(cluster="debug", poll_s=0.1)},
    }
    for name, how in runs.items():
        store = _store(tmp_path / name, tiny_dataset, model_params, recipe)
        path = measurement.save(tmp_path / name / ".measurements")
        retrain(
            store, jobs, tiny_dataset, model_params, recipe, progress=False,
            measurement=path, **how,
        )  # fmt: skip
        for job in jobs:
            recorded = store.record(job)["measurements"][measurement.key]
            afterwards = measurement(store.load_ema(job))
            np.testing.assert_allclose(recorded, afterwards, rtol=1e-6, err_msg=name)
            assert len(recorded) == 5 and np.all(np.asarray(recorded) > 0)


def test_a_saved_measurement_loads_with_its_key_and_other_draws_get_another_key(
    tiny_dataset, tmp_path
):
    measurement = _query_measurement(tiny_dataset)
    path = measurement.save(tmp_path)
    assert path.name == f"{measurement.key}.pt"
    loaded = QueryMeasurement.load(path)
    assert loaded.key == measurement.key
    assert np.array_equal(loaded.draws.t, measurement.draws.t)
    assert torch.equal(loaded.draws.eps([0, 4], [1, 5]), measurement.draws.eps([0, 4], [1, 5]))
    assert _query_measurement(tiny_dataset, draws=7).key != measurement.key
    path.rename(tmp_path / "0123456789abcdef.pt")
    with pytest.raises(ValueError, match="holds measurement"):
        QueryMeasurement.load(tmp_path / "0123456789abcdef.pt")
