"""Training: exact replay from the log, bit-for-bit resume after a kill, clear failures."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from diffattr.artifacts.training_run import TrainingRun
from diffattr.diffusion import training as train_mod
from diffattr.diffusion.draws import batch_rows, train_noise
from diffattr.diffusion.model import predict_eps
from diffattr.diffusion.replay import ReplayLog
from diffattr.diffusion.schedule import add_noise, build_scheduler
from diffattr.diffusion.task import per_sample_loss
from diffattr.diffusion.training import NonFiniteLossError, lr_at, run_settings, train
from diffattr.params import TrainParams
from diffattr.storage.checkpoints import checkpoint_name, load_checkpoint, settings_hash


def test_batches_show_every_sample_once_per_epoch():
    n, b = 10, 4
    parts = [batch_rows(s, b, n, seed=3) for s in range(5)]  # 2 epochs
    rows = np.concatenate([r for r, _ in parts])
    epochs = np.concatenate([e for _, e in parts])
    assert sorted(rows[:n]) == list(range(n))
    assert sorted(rows[n : 2 * n]) == list(range(n))
    assert np.array_equal(epochs, np.arange(5 * b) // n)
    assert not np.array_equal(rows[:n], rows[n : 2 * n])  # a new order each epoch
    assert np.array_equal(batch_rows(2, b, n, seed=3)[0], batch_rows(2, b, n, seed=3)[0])


def test_lr_warms_up_linearly_then_decays_to_zero_by_cosine():
    cfg = TrainParams(steps=110, lr=1.0, warmup_steps=10, lr_decay="cosine")
    assert lr_at(0, cfg) == pytest.approx(0.1)
    assert lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(10, cfg) == pytest.approx(1.0)
    assert lr_at(60, cfg) == pytest.approx(0.5)
    assert lr_at(109, cfg) < 0.001
    const = TrainParams(steps=110, lr=1.0, warmup_steps=10, lr_decay="constant")
    assert lr_at(100, const) == 1.0


def test_logged_losses_are_recomputed_exactly_from_the_log_alone(
    tiny_dataset, model_params, train_params, tmp_path
):
    result = train(tiny_dataset, model_params, train_params, tmp_path / "run", progress=False)
    log = ReplayLog.load(tmp_path / "run" / "replay_log.npz")
    assert len(log) == train_params.steps * train_params.batch_size
    scheduler = build_scheduler(log.settings["schedule"], log.settings["num_train_timesteps"])
    for step in (4,):  # the batch taken with the weights of checkpoint 4
        model, payload = TrainingRun.open(tmp_path / "run").load_model(step)
        model.train()
        rows = log.events(step, step)
        ids = log.sample_id[rows]
        t = torch.from_numpy(log.t[rows].astype(np.int64))
        eps = train_noise(
            log.settings["seed"], step, log.epoch[rows], ids, log.settings["image_shape"]
        )
        x0 = tiny_dataset.images[torch.from_numpy(tiny_dataset.positions(ids))]
        x_t = add_noise(x0, eps, t, scheduler.alphas_cumprod)
        with torch.no_grad():
            loss = per_sample_loss(predict_eps(model, x_t, t), eps, log.settings["loss"])
        assert torch.equal(loss, torch.from_numpy(log.loss[rows]))
        assert payload["step"] == step
    assert np.allclose(result.loss_history, log.loss.reshape(train_params.steps, -1).mean(1))


def test_checkpoint_records_lr_in_force_and_optimizer_state(tiny_dataset, model_params, tmp_path):
    cfg = TrainParams(steps=8, batch_size=8, lr=1e-3, warmup_steps=6, checkpoints=[4, 8])
    train(tiny_dataset, model_params, cfg, tmp_path / "run", progress=False)
    payload = load_checkpoint(tmp_path / "run" / "checkpoints" / checkpoint_name(4))
    # θ_4 came out of the update at step 3, taken with lr_at(3) = 4/6 of the peak in warm-up.
    assert payload["lr"] == pytest.approx(1e-3 * 4 / 6)
    assert payload["optimizer"]["state"]  # Adam moments are there
    assert set(payload["ema"]) == set(payload["model"])
    summary = json.loads((tmp_path / "run" / "run.json").read_text())
    assert [c["step"] for c in summary["checkpoints"]] == [4, 8]
    assert summary["checkpoints"][0]["lr"] == pytest.approx(payload["lr"])


_KILLABLE_RUN = """
import sys, torch
torch.set_num_threads(1)
import numpy as np
from diffattr.data.datasets import ImageDataset
from diffattr.params import ModelParams, TrainParams
from diffattr.diffusion.training import train
g = torch.Generator().manual_seed(0)
ds = ImageDataset("tiny", torch.rand(40, 1, 8, 8, generator=g) * 2 - 1,
                  np.arange(40) * 3 + 7, np.zeros(40, np.int64), np.zeros(40, bool))
cfg = TrainParams(steps=int(sys.argv[3]), batch_size=8, lr=1e-3, warmup_steps=2,
                  checkpoints=[int(sys.argv[3])], resume_every=2)
train(ds, ModelParams(), cfg, sys.argv[1], work_dir=sys.argv[2], progress=False)
"""


def test_killed_run_resumes_to_the_same_weights_as_an_uninterrupted_one(
    tiny_dataset, model_params, tmp_path
):
    steps = 60
    cfg = TrainParams(
        steps=steps, batch_size=8, lr=1e-3, warmup_steps=2, checkpoints=[steps], resume_every=2
    )
    work = tmp_path / "work"
    script = tmp_path / "run.py"
    script.write_text(_KILLABLE_RUN)
    env = {**os.environ, "PYTHONPATH": str(Path(train_mod.__file__).parents[1])}
    proc = subprocess.Popen(
        [sys.executable, str(script), str(tmp_path / "killed"), str(work), str(steps)], env=env
    )
    deadline = time.time() + 120
    while not (work / "resume.pt").exists() and time.time() < deadline:
        assert proc.poll() is None, "the training subprocess ended before it could be killed"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    payload = load_checkpoint(work / "resume.pt")
    killed_at = payload["step"]
    assert 0 < killed_at < steps
    assert "log" not in payload  # the log lives once, memory-mapped in the work folder
    assert ReplayLog.empty(steps, 8, {"batch_size": 8}, folder=work).complete_until(killed_at)
    assert not (tmp_path / "killed" / "run.json").exists()

    torch.set_num_threads(1)
    try:
        resumed = train(
            tiny_dataset, model_params, cfg, tmp_path / "killed", work_dir=work, progress=False
        )
        fresh = train(tiny_dataset, model_params, cfg, tmp_path / "fresh", progress=False)
    finally:
        torch.set_num_threads(2)
    assert resumed.resumed_from_step >= killed_at
    assert fresh.resumed_from_step == 0
    for a, b in zip(
        resumed.model.state_dict().values(), fresh.model.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b)
    for a, b in zip(
        resumed.ema.state_dict().values(), fresh.ema.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b)
    assert np.array_equal(resumed.log.sample_id, fresh.log.sample_id)
    assert np.array_equal(resumed.log.t, fresh.log.t)

    again = train(
        tiny_dataset, model_params, cfg, tmp_path / "again", work_dir=work, progress=False
    )
    assert again.resumed_from_step == steps  # a finished run is reused, no step retrained
    assert (tmp_path / "again" / "checkpoints" / checkpoint_name(steps)).exists()


def test_non_finite_loss_stops_naming_step_and_sample_ids(
    tiny_dataset, model_params, train_params, tmp_path, monkeypatch
):
    real = train_mod.per_sample_loss
    calls = {"n": 0}

    def poisoned(eps_pred, eps, kind):
        loss = real(eps_pred, eps, kind)
        calls["n"] += 1
        if calls["n"] == 3:  # step 2
            loss = loss.clone()
            loss[1] = float("nan")
        return loss

    monkeypatch.setattr(train_mod, "per_sample_loss", poisoned)
    with pytest.raises(NonFiniteLossError) as err:
        train(tiny_dataset, model_params, train_params, tmp_path / "run", progress=False)
    bad_id = tiny_dataset.ids[batch_rows(2, train_params.batch_size, len(tiny_dataset), 0)[0][1]]
    assert "step 2" in str(err.value) and str(bad_id) in str(err.value)


def test_corrupt_checkpoint_is_refused_with_a_clear_error(tmp_path):
    path = tmp_path / checkpoint_name(3)
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="corrupt"):
        load_checkpoint(path)


def test_corrupt_resume_file_is_skipped_and_training_restarts_cleanly(
    tiny_dataset, model_params, train_params, tmp_path
):
    settings = run_settings(
        tiny_dataset,
        model_params,
        train_params,
        train_mod.unet_config(model_params.unet, tiny_dataset.image_shape),
    )
    work = tmp_path / "work"
    work.mkdir()
    (work / "resume.pt").write_bytes(b"garbage")
    with pytest.warns(UserWarning, match="corrupt"):
        result = train(
            tiny_dataset,
            model_params,
            train_params,
            tmp_path / "run",
            work_dir=work,
            progress=False,
        )
    assert result.resumed_from_step == 0
    assert settings_hash(settings) == settings_hash(result.settings)


def test_checkpoint_of_other_settings_is_refused(
    tiny_dataset, model_params, train_params, tmp_path
):
    train(tiny_dataset, model_params, train_params, tmp_path / "run", progress=False)
    path = tmp_path / "run" / "checkpoints" / checkpoint_name(4)
    other = {**load_checkpoint(path)["settings"], "dataset": "other"}
    with pytest.raises(ValueError, match="dataset"):
        load_checkpoint(path, other)
    with pytest.raises(ValueError, match=r"available: \[4, 8\]"):
        TrainingRun.open(tmp_path / "run").load_model(step=5)


def test_training_on_a_subset_logs_only_its_ids(tiny_dataset, model_params, train_params, tmp_path):
    keep = tiny_dataset.ids[::2]
    result = train(
        tiny_dataset.subset(keep), model_params, train_params, tmp_path / "sub", progress=False
    )
    assert set(np.unique(result.log.sample_id)) <= set(keep.tolist())
    assert result.settings["n_train"] == len(keep)


def test_same_seed_gives_byte_identical_outputs(tiny_dataset, model_params, train_params, tmp_path):
    torch.rand(3)  # whatever ran before in the process must not matter
    train(tiny_dataset, model_params, train_params, tmp_path / "a", progress=False)
    torch.rand(5)
    train(tiny_dataset, model_params, train_params, tmp_path / "b", progress=False)
    files = sorted(
        p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file()
    )
    assert len(files) >= 6
    for rel in files:
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes(), rel


def test_a_checkpoint_copied_over_another_step_is_refused_naming_both(
    tiny_dataset, model_params, train_params, tmp_path
):
    import shutil

    train(tiny_dataset, model_params, train_params, tmp_path / "run", progress=False)
    ckpts = tmp_path / "run" / "checkpoints"
    shutil.copyfile(ckpts / checkpoint_name(4), ckpts / checkpoint_name(8))
    with pytest.raises(ValueError, match="holds the weights of step 4, not 8"):
        TrainingRun.open(tmp_path / "run").load_model(8)


def test_queries_generated_by_other_weights_are_refused(
    tiny_dataset, model_params, train_params, tmp_path
):
    from diffattr.diffusion.sampling import save_queries

    train(tiny_dataset, model_params, train_params, tmp_path / "run", progress=False)
    meta = {"weights_hash": "0000000000000000"}
    save_queries(tmp_path / "run" / "queries.npz", torch.zeros(2, 1, 8, 8), [1, 2], meta)
    with pytest.raises(ValueError, match="not by this run's final EMA"):
        TrainingRun.open(tmp_path / "run").generated_queries()
