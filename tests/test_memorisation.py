"""The memorisation control: the positive control's construction and the study on a smoke run."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import SMOKE_PIPELINE, method_inputs_of

from diffattr import methods
from diffattr import params as params_lib
from diffattr.diffusion.draws import train_noise
from diffattr.evaluation.tracing import source_ranks
from diffattr.gradients.items import replay_window
from diffattr.stages import memorisation


def _drawn_before(log, step: int, n: int) -> np.ndarray:
    """n training ids drawn in steps [0, step): each has a draw in every epoch window."""
    return np.unique(log.sample_id[log.step < step])[:n]


def _control(inputs, sources):
    images = inputs.train.images[torch.from_numpy(inputs.train.positions(sources))]
    kind = np.full(len(sources), "train")
    return memorisation.replayed_draw_queries(inputs, images, kind, sources, sources)


def test_positive_control_of_the_source_itself_reproduces_its_replayed_gradients(
    smoke_pipeline,
):
    inputs = method_inputs_of(smoke_pipeline)
    log = inputs.log
    sources = _drawn_before(log, 2, 3)
    control = _control(inputs, sources)
    for entry in inputs.gradients.trajectory():
        _, a = inputs.gradients.load(entry)
        events = np.asarray(a["replay_events"])
        rows = [int(np.flatnonzero(log.sample_id[events] == s)[0]) for s in sources]
        got = control.per_step[entry.step]
        assert got.features.shape == (3, 1, a["replay_features"].shape[-1])
        assert got.t[:, 0].tolist() == log.t[events[rows]].tolist()
        np.testing.assert_allclose(got.norms[:, 0], a["replay_norm"][rows, 0], rtol=1e-5)
        expected = a["replay_features"][rows, 0]
        scale = np.abs(expected).max()
        np.testing.assert_allclose(got.features[:, 0], expected, rtol=1e-4, atol=1e-6 * scale)


@pytest.mark.parametrize("name", ["retrac", "grad_cosine"])
def test_positive_control_of_the_source_itself_ranks_the_source_first(smoke_pipeline, name):
    """At the exact replayed draw the query's unit vector is the source's: cosine 1, the most
    any training sample can score."""
    inputs = method_inputs_of(smoke_pipeline)
    sources = _drawn_before(inputs.log, 2, 4)
    method = methods.get(name)
    scores = method.score_gradients(inputs, method.make_args(), _control(inputs, sources))
    assert scores.values.shape == (4, len(inputs.train))
    assert scores.settings["method"] == name and scores.query_key.tolist() == sources.tolist()
    assert "positive control" in scores.settings["queries"]["queries"]
    columns = inputs.gradients.columns(sources)
    assert source_ranks(scores.values, columns).tolist() == [1, 1, 1, 1]


def _autograd_gradient(model, abar, x0, t, eps) -> torch.Tensor:
    """∇_θ mean((ε − ε_θ(√ᾱ_t x0 + √(1−ᾱ_t) ε, t))²) of one image by plain autograd: [D]."""
    a = abar[t].to(torch.float32)
    x_t = a.sqrt() * x0[None] + (1 - a).sqrt() * eps[None]
    pred = model(x_t, torch.tensor([t])).sample
    loss = (eps[None] - pred).pow(2).mean()
    grads = torch.autograd.grad(loss, [p for p in model.parameters()])
    return torch.cat([g.reshape(-1) for g in grads]).double()


@pytest.mark.parametrize("name", ["tracin", "retrac"])
def test_positive_control_scores_equal_autograd_by_brute_force(smoke_pipeline, name):
    """Other images as queries at the sources' replayed draws: Σ_k Σ_{e∈R_k(j)} H_k w w' ⟨g_q,
    g_e⟩ with every gradient recomputed by autograd from the replay log (epoch window: each
    sample's latest draw before θ_k; H_k = (B/N)·Σ_window lr, lr = 1e-3 here, B = 4, N = 12)."""
    inputs = method_inputs_of(smoke_pipeline)
    log, run = inputs.log, inputs.run
    sources = _drawn_before(log, 2, 2)
    others = np.setdiff1d(inputs.train.ids, sources)[:2]  # the queries: not the sources
    images = inputs.train.images[torch.from_numpy(inputs.train.positions(others))]
    method = methods.get(name)
    control = memorisation.replayed_draw_queries(
        inputs, images, np.full(2, "train"), others, sources
    )
    scores = method.score_gradients(inputs, method.make_args(), control).values
    seed, shape = int(log.settings["seed"]), tuple(images.shape[1:])
    abar = run.alphas_cumprod()
    ids = inputs.gradients.train_ids.tolist()
    x = {i: inputs.train.images[inputs.train.positions(np.array([i]))[0]] for i in ids}

    def gradient(model, image, event):
        step, epoch, sample = int(log.step[event]), int(log.epoch[event]), int(log.sample_id[event])
        eps = train_noise(seed, step, [epoch], [sample], shape)[0]
        g = _autograd_gradient(model, abar, image, int(log.t[event]), eps)
        return g / g.norm() if name == "retrac" else g

    expected = np.zeros((2, len(ids)))
    for checkpoint, previous in ((2, 0), (6, 2)):
        model, _ = run.load_model(checkpoint)
        mass = 4 / 12 * 1e-3 * (checkpoint - previous)
        events = replay_window(log, checkpoint, previous, "epoch")
        for q, source in enumerate(sources):
            (own,) = [e for e in events if log.sample_id[e] == source]
            g_q = gradient(model, images[q], own)
            for e in events:
                col = ids.index(int(log.sample_id[e]))
                expected[q, col] += mass * float(g_q @ gradient(model, x[int(log.sample_id[e])], e))
    np.testing.assert_allclose(scores, expected, rtol=1e-4, atol=1e-6 * np.abs(expected).max())


def test_positive_control_needs_one_draw_per_window_and_the_stores_projection(
    smoke_pipeline, smoke_pipeline_interval
):
    interval = method_inputs_of(smoke_pipeline_interval)
    log = interval.log
    # drawn 0 times before the first checkpoint, or twice or more in the second window
    counts = np.bincount(log.sample_id[log.step < 2], minlength=log.sample_id.max() + 1)
    never = np.setdiff1d(np.unique(log.sample_id), np.flatnonzero(counts))[:1]
    with pytest.raises(ValueError, match="exactly one"):
        _control(interval, never)
    inputs = method_inputs_of(smoke_pipeline)
    control = _control(inputs, _drawn_before(inputs.log, 2, 2))
    control.projection = {**control.projection, "seed": 99}
    retrac = methods.get("retrac")
    with pytest.raises(ValueError, match="projected with"):
        retrac.score_gradients(inputs, retrac.make_args(), control)


def test_the_study_scores_every_method_under_every_protocol(smoke_pipeline, tmp_path):
    """End to end on the smoke run, every generated query counted a copy (ratio 1), the
    trajectory at the last checkpoint only (whose epoch window holds every sample)."""
    _, train_dir, _ = smoke_pipeline
    overrides = {**SMOKE_PIPELINE, "gradients": {**SMOKE_PIPELINE["gradients"]}}
    overrides["gradients"]["checkpoints"] = [6]
    P = params_lib.resolve(overrides)
    report = tmp_path / "report"
    result = memorisation.run(P, train_dir, tmp_path / "out", report, 1.0, progress=False)
    trajectory = ["tracin", "retrac", "calibrated", "grad_cosine"]
    protocols = [p.name for p in memorisation.PROTOCOLS]
    table = result.table.set_index(["method", "protocol"])
    for name in trajectory:
        assert [table.loc[(name, p)].n_copies for p in protocols] == [2] * len(protocols)
    for name in ("pixel_cosine", "random"):  # no trajectory: the default and the projection
        assert table.loc[name].index.tolist() == [memorisation.ANY_PROTOCOL, "projection none"]
    for ranks in result.ranks.values():
        assert ranks.min() >= 1 and ranks.max() <= 12
    metrics = json.loads((report / "metrics.json").read_text())
    assert metrics["n_copies"] == 2 and len(metrics["table"]) == len(result.table)
    assert set(memorisation.pivot(result.table).columns) == set(protocols)
    grid = np.load(tmp_path / "out" / "scores" / "grid" / "tracin.npz")["values"]
    assert grid.shape == (4, 12)  # 2 generated + 2 held-out queries of the smoke run


def test_the_memorisation_profile_resolves():
    P = params_lib.resolve({"profile": "digits_memorise"})
    assert P.data.max_train == 32 and P.gradients.replay_window == "epoch"
    assert P.gradients.projection == "auto" and P.gradients.query_timesteps == 8
    names = [s.name for s in P.method_specs()]
    assert {"tracin", "retrac", "retrac_unit", "calibrated_unit", "pixel_cosine"} <= set(names)
    unit = next(s for s in P.method_specs() if s.name == "retrac_unit")
    assert unit.args.aggregate == "unit" and memorisation.method_label(unit) == (
        "ReTrac, unit aggregate"
    )
    projected = next(s for s in P.method_specs() if s.name == "ekfac_projected")
    assert memorisation.method_label(projected) == (
        "EK-FAC (draws 4, query_side grid, train_side stored)"
    )
    labels = [memorisation.method_label(s) for s in P.method_specs()]
    assert len(set(labels)) == len(labels)  # the table's rows
    P.check_dataset_size(32)
    for extraction in memorisation.EXTRACTIONS:
        memorisation.variant(P, extraction)
