"""Extraction into stores: exact norms, resume after an interruption, refusal of other settings."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from diffattr import params as params_lib
from diffattr.artifacts.training_run import TrainingRun
from diffattr.diffusion.model import build_unet, unet_config
from diffattr.diffusion.replay import ReplayLog
from diffattr.diffusion.sampling import save_queries
from diffattr.diffusion.schedule import build_scheduler
from diffattr.diffusion.training import train
from diffattr.gradients.engines import PerSampleGradients
from diffattr.gradients.extraction import array_specs, extract, mean_gradient_chunks
from diffattr.gradients.items import (
    KIND_GENERATED,
    KIND_TRAIN,
    grid_items,
    replay_window,
    timestep_grid,
)
from diffattr.gradients.projection import make_projector
from diffattr.stages import gradients as stage_mod
from diffattr.stages.gradients import run_gradient_stage
from diffattr.storage.arrays import ArrayStore, load_store
from diffattr.storage.checkpoints import work_folder


@pytest.fixture(scope="module")
def setup():
    model = build_unet(unet_config("tiny", (1, 8, 8)), seed=1)
    grads = PerSampleGradients(model, build_scheduler().alphas_cumprod)
    x0 = torch.rand(6, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    items = grid_items(x0, np.arange(6) + 100, KIND_TRAIN, timestep_grid(2), draws=2, seed=0)
    projector = make_projector("sparse", grads.dim, 64, seed=3)
    return grads, items, projector


def _open(path, items, projector):
    return ArrayStore.open(path, {"test": 1}, array_specs("s", items, projector.dim_out))


def test_stored_norms_are_exact_norms_of_the_full_gradients(setup, tmp_path):
    grads, items, projector = setup
    store = _open(tmp_path / "a", items, projector)
    extract(store, "s", items, grads, projector, batch_size=4, progress=False)
    rows = np.arange(items.n)
    full = grads.loop(
        items.x0.repeat_interleave(2, 0),
        items.t.reshape(-1),
        items.noise(rows).reshape(12, 2, 1, 8, 8),
    )
    expected = torch.linalg.vector_norm(full, dim=1).reshape(6, 2).numpy()
    np.testing.assert_allclose(store.array("s_norm"), expected, rtol=1e-4)
    np.testing.assert_allclose(
        store.array("s_features"), projector(full).reshape(6, 2, -1).numpy(), rtol=1e-3, atol=1e-5
    )


@pytest.mark.parametrize(("rows_per_chunk", "batch_size"), [(6, 64), (4, 2), (1, 1)])
def test_mean_gradient_chunks_average_each_images_cells(setup, rows_per_chunk, batch_size):
    """Each yielded row is the mean of the image's M timesteps × S draws, by an autograd loop
    over its cells, whatever the chunking."""
    grads, items, _ = setup
    rows = np.arange(items.n)
    cells = grads.loop(
        items.x0.repeat_interleave(2, 0),
        items.t.reshape(-1),
        items.noise(rows).reshape(12, 2, 1, 8, 8),
    )
    expected = cells.reshape(6, 2, -1).mean(1)
    seen = []
    for chunk, g in mean_gradient_chunks(items, grads, rows_per_chunk, batch_size):
        assert len(chunk) <= rows_per_chunk
        torch.testing.assert_close(g, expected[chunk], rtol=1e-4, atol=1e-6)
        seen.extend(chunk.tolist())
    assert seen == rows.tolist()


class _Crash(Exception):
    pass


class _CrashAfter:
    """A projector that dies after `n` calls, like a killed run."""

    def __init__(self, inner, n):
        self.inner, self.n, self.dim_out = inner, n, inner.dim_out

    def __call__(self, g):
        if self.n == 0:
            raise _Crash
        self.n -= 1
        return self.inner(g)


def test_interrupted_extraction_resumes_to_the_uninterrupted_result(setup, tmp_path):
    grads, items, projector = setup
    fresh = _open(tmp_path / "fresh", items, projector)
    extract(fresh, "s", items, grads, projector, batch_size=4, progress=False)

    store = _open(tmp_path / "resumed", items, projector)
    with pytest.raises(_Crash):
        extract(store, "s", items, grads, _CrashAfter(projector, 1), batch_size=4, progress=False)
    reopened = _open(tmp_path / "resumed", items, projector)
    assert 0 < len(reopened.pending("s_features")) < items.n
    stats = extract(reopened, "s", items, grads, projector, batch_size=4, progress=False)
    assert stats.gradients < items.n * items.m  # finished rows were not recomputed
    for name in ("s_norm", "s_features"):
        np.testing.assert_array_equal(reopened.array(name), fresh.array(name))


def test_timestep_grid_is_even_and_inside_the_schedule():
    grid = timestep_grid(10, 1000)
    assert grid.tolist() == [50, 150, 250, 350, 450, 550, 650, 750, 850, 950]
    assert timestep_grid(1, 1000).tolist() == [500]
    with pytest.raises(ValueError):
        timestep_grid(0)


def test_grid_noise_is_keyed_by_image_kind_timestep_and_draw():
    x0 = torch.zeros(2, 1, 8, 8)
    a = grid_items(x0, np.array([5, 6]), KIND_TRAIN, np.array([10, 20]), 2, seed=0)
    b = grid_items(x0[:1], np.array([6]), KIND_TRAIN, np.array([10, 20]), 2, seed=0)
    c = grid_items(x0[:1], np.array([6]), KIND_GENERATED, np.array([10, 20]), 2, seed=0)
    na = a.noise(np.array([0, 1]))
    assert na.shape == (2, 2, 2, 1, 8, 8)
    assert torch.equal(na[1], b.noise(np.array([0]))[0])
    assert not torch.equal(na[1], c.noise(np.array([0]))[0])
    assert not torch.equal(na[0, 0, 0], na[0, 0, 1]) and not torch.equal(na[0, 0], na[0, 1])


def test_epoch_window_holds_each_samples_most_recent_draw_once():
    from diffattr.diffusion.draws import batch_rows

    n, b, steps = 10, 4, 12  # batches straddle epochs: 40 % 10 == 0 only every 5 steps
    rows = np.concatenate([batch_rows(s, b, n, seed=0)[0] for s in range(steps)])
    log = ReplayLog(
        np.repeat(np.arange(steps), b).astype(np.int32),
        np.arange(steps * b, dtype=np.int32) // n,
        rows + 100,
        np.zeros(steps * b, np.int16),
        np.zeros(steps * b, np.float32),
        {"batch_size": b},
    )
    for checkpoint in (3, 7, 12):
        events = replay_window(log, checkpoint, previous=0, window="epoch")
        ids = log.sample_id[events]
        assert sorted(ids) == list(range(100, 110))  # every sample exactly once
        for e in events:  # and it is that sample's latest draw before the checkpoint
            later = (log.sample_id == log.sample_id[e]) & (log.step > log.step[e])
            assert not (later & (log.step < checkpoint)).any()


def test_interval_window_spans_the_steps_since_the_previous_checkpoint():
    steps = np.repeat(np.arange(10), 4).astype(np.int32)
    log = ReplayLog(
        steps,
        np.arange(40, dtype=np.int32) // 10,
        np.arange(40),
        np.zeros(40, np.int16),
        np.zeros(40, np.float32),
        {"batch_size": 4},
    )
    interval = replay_window(log, checkpoint=10, previous=5, window="interval")
    assert sorted(set(log.step[interval])) == [5, 6, 7, 8, 9]
    with pytest.raises(ValueError, match="epoch, interval"):
        replay_window(log, 10, 5, "window")


SMOKE = {
    "data": {"max_train": 12},
    "train": {"steps": 3, "batch_size": 4, "checkpoints": [3], "warmup_steps": 1},
    "gradients": {
        "query_timesteps": 1,
        "query_draws": 1,
        "heldout_queries": 1,
        "train_timesteps": 1,
        "ema_train_timesteps": 1,
        "profile_timesteps": 1,
        "profile_samples": 1,
        "profile_draws": 1,
        "projection_dim": 16,
    },
}


@pytest.fixture(scope="module")
def trained_smoke(tmp_path_factory):
    root = tmp_path_factory.mktemp("stage")
    P = params_lib.resolve(SMOKE)
    train(P.data.load(), P.model, P.train, root / "train", progress=False)
    ema_hash = TrainingRun.open(root / "train").summary["final_ema_hash"]
    meta = {"weights_hash": ema_hash}
    save_queries(root / "train" / "queries.npz", torch.zeros(1, 1, 8, 8), [7], meta)
    return root / "train"


def test_a_finished_store_of_other_settings_is_replaced_never_mixed(trained_smoke, tmp_path):
    """data/gradients persists across DVC reruns: a store of earlier parameters is removed."""
    P = params_lib.resolve(SMOKE)
    run_gradient_stage(P, trained_smoke, tmp_path / "grads", torch.device("cpu"), False)
    other = params_lib.resolve(SMOKE, {"gradients": {"projection_seed": 1}})
    index = run_gradient_stage(other, trained_smoke, tmp_path / "grads", torch.device("cpu"), False)
    for store in index["stores"]:
        settings, _ = load_store(tmp_path / "grads" / store["path"])
        assert settings["projection"]["seed"] == 1


def test_stores_record_the_engine_and_never_mix_engines(trained_smoke, tmp_path):
    P = params_lib.resolve(SMOKE)
    index = run_gradient_stage(P, trained_smoke, tmp_path / "grads", torch.device("cpu"), False)
    settings, _ = load_store(tmp_path / "grads" / index["stores"][0]["path"])
    assert index["engine"] == settings["engine"] == "layerwise"
    vmapped = params_lib.resolve(SMOKE, {"gradients": {"engine": "vmap"}})
    run_gradient_stage(vmapped, trained_smoke, tmp_path / "grads", torch.device("cpu"), False)
    settings, _ = load_store(tmp_path / "grads" / index["stores"][0]["path"])
    assert settings["engine"] == "vmap"


def test_stores_of_checkpoints_no_longer_requested_are_removed(trained_smoke, tmp_path):
    P = params_lib.resolve(SMOKE)
    out = tmp_path / "grads"
    run_gradient_stage(P, trained_smoke, out, torch.device("cpu"), False)
    (out / "raw_step_0000001").mkdir()
    (out / "raw_step_0000001" / "meta.json").write_text("{}")
    index = run_gradient_stage(P, trained_smoke, out, torch.device("cpu"), False)
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == sorted(
        s["path"] for s in index["stores"]
    )


def test_killed_stage_keeps_finished_stores_and_recomputes_only_the_unfinished(
    trained_smoke, tmp_path, monkeypatch
):
    """Killed while extracting the EMA store, after the raw store finished: DVC keeps
    data/gradients (persist: true), and the rerun computes only the EMA store."""
    dvc = yaml.safe_load((Path(__file__).parents[1] / "dvc.yaml").read_text())
    assert {"data/gradients": {"persist": True}} in dvc["stages"]["gradients"]["outs"]
    P = params_lib.resolve(SMOKE)
    out = tmp_path / "grads"
    real, seen = stage_mod.extract, []

    def killed_in_the_ema_store(store, set_name, *args, **kwargs):
        seen.append(store.path.name.split("-")[0])
        if store.path.name.startswith("ema_step"):
            raise KeyboardInterrupt  # as SIGINT from a killed dvc repro
        return real(store, set_name, *args, **kwargs)

    monkeypatch.setattr(stage_mod, "extract", killed_in_the_ema_store)
    with pytest.raises(KeyboardInterrupt):
        run_gradient_stage(P, trained_smoke, out, torch.device("cpu"), False)
    finished = out / "raw_step_0000003"
    assert (finished / "meta.json").exists() and not (out / "ema_step_0000003").exists()
    stamps = {f.name: f.stat().st_mtime_ns for f in finished.iterdir()}

    computed: dict[str, int] = {}

    def counted(store, *args, **kwargs):
        stats = real(store, *args, **kwargs)
        name = store.path.name.split("-")[0]
        computed[name] = computed.get(name, 0) + stats.gradients
        return stats

    monkeypatch.setattr(stage_mod, "extract", counted)
    run_gradient_stage(P, trained_smoke, out, torch.device("cpu"), False)
    # the finished raw store was not recomputed, the unfinished EMA store was
    assert computed.get("raw_step_0000003", 0) == 0 and computed["ema_step_0000003"] > 0
    assert {f.name: f.stat().st_mtime_ns for f in finished.iterdir()} == stamps
    load_store(out / "ema_step_0000003")


def test_interrupted_stage_resumes_from_its_work_folder(trained_smoke, tmp_path, monkeypatch):
    P = params_lib.resolve(SMOKE)
    fresh = run_gradient_stage(P, trained_smoke, tmp_path / "fresh", torch.device("cpu"), False)

    real, calls = stage_mod.extract, {"n": 0}

    def dies_on_the_third_set(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(stage_mod, "extract", dies_on_the_third_set)
    out = tmp_path / "grads"
    with pytest.raises(KeyboardInterrupt):
        run_gradient_stage(P, trained_smoke, out, torch.device("cpu"), False)
    assert not (out / "index.json").exists()
    unfinished = list(work_folder(out).iterdir())
    assert len(unfinished) == 1 and unfinished[0].name.startswith("raw_step_0000003-")

    monkeypatch.setattr(stage_mod, "extract", real)
    resumed = run_gradient_stage(P, trained_smoke, out, torch.device("cpu"), False)
    assert resumed["throughput"]["gradients"] < fresh["throughput"]["gradients"]
    assert not work_folder(out).exists()
    for store in fresh["stores"]:
        _, a = load_store(tmp_path / "fresh" / store["path"])
        _, b = load_store(out / store["path"])
        assert a.keys() == b.keys()
        for name in a:
            np.testing.assert_array_equal(a[name], b[name])


def test_gradient_stage_refuses_parameters_that_disagree_with_the_training_run(
    trained_smoke, tmp_path
):
    other = params_lib.resolve(SMOKE, {"model": {"loss": "l1"}})
    with pytest.raises(ValueError, match="loss"):
        run_gradient_stage(other, trained_smoke, tmp_path / "g", torch.device("cpu"), False)
    fewer = params_lib.resolve(SMOKE, {"data": {"max_train": 10}})
    with pytest.raises(ValueError, match="training set .* is not the one of the run"):
        run_gradient_stage(fewer, trained_smoke, tmp_path / "g", torch.device("cpu"), False)
