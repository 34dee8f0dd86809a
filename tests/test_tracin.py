"""TracIn / ReTrac / grad-cosine scores equal the paper's formulas evaluated by brute force."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import method_inputs_of

from diffattr import methods
from diffattr.artifacts.scores import Scores
from diffattr.diffusion.replay import ReplayLog
from diffattr.methods.trajectory import inverse_norm_weights, trajectory_scores, unit_weights
from diffattr.storage.arrays import load_store

NAMES = {"tracin": "tracin", "retrac": "retrac", "cosine": "grad_cosine", "retrac_unit": "retrac"}
NORMALISED = {"retrac", "retrac_unit"}  # every gradient scaled to unit length
COSINE = {"cosine", "retrac_unit"}  # the aggregated vectors too


def _scores(pipeline, method, side="replay", checkpoints="all"):
    spec = methods.get(NAMES[method])
    args = {"train_side": side, "checkpoints": checkpoints}
    if method == "retrac_unit":
        args["aggregate"] = "unit"
    return spec(method_inputs_of(pipeline), spec.make_args(args))


# The learning rate of each of the smoke runs' 6 updates, written out by hand (lr = 1e-3):
# warm-up 1 and constant; warm-up 3, then cosine decay over steps 3-5.
LEARNING_RATES = {
    "smoke_pipeline": [1e-3] * 6,
    "smoke_pipeline_interval": [1e-3] * 6,
    "smoke_pipeline_warmup": [1e-3 / 3, 2e-3 / 3, 1e-3, 1e-3, 0.75e-3, 0.25e-3],
}


def _brute_force(gradient_dir, log, method, side, lrs, last_only=False):
    """Σ_k ⟨G_k(q), T_k(j)⟩ (grad-cosine: Σ_k H_k cos) by explicit loops over full
    (unprojected) gradients, with η per event: lrs[step] under the "interval" window, the
    window's H_k = (B/N)·Σ_{window} lrs under "epoch" and on the grid side."""
    index = json.loads((gradient_dir / "index.json").read_text())
    ids = index["train_ids"]
    batch, n_train = 4, len(ids)
    stores = [s for s in index["stores"] if s["weights"] == "raw"]
    starts = {s["step"]: ([0] + [p["step"] for p in stores])[i] for i, s in enumerate(stores)}
    stores = stores[-1:] if last_only else stores
    n_query = len(index["queries"]["kind"])
    out = np.zeros((n_query, len(ids)))
    for store in stores:
        _, a = load_store(gradient_dir / store["path"])
        first, stop = starts[store["step"]], store["step"]
        mass = batch / n_train * sum(lrs[first:stop])
        for q in range(n_query):
            per_t = [
                a["query_features"][q, m].astype(np.float64)
                for m in range(a["query_features"].shape[1])
            ]
            if method in NORMALISED:
                per_t = [v / np.linalg.norm(v) for v in per_t]
            g_q = sum(per_t) / len(per_t)
            for col, sample in enumerate(ids):
                if side == "replay":
                    rows = [
                        r for r, e in enumerate(a["replay_events"]) if log.sample_id[e] == sample
                    ]
                    vecs = [a["replay_features"][r, 0].astype(np.float64) for r in rows]
                    if method in NORMALISED:
                        vecs = [v / np.linalg.norm(v) for v in vecs]
                    etas = [
                        lrs[log.step[a["replay_events"][r]]]
                        if index["replay_window"] == "interval"
                        else mass
                        for r in rows
                    ]
                    weighted = [e * v for e, v in zip(etas, vecs, strict=True)]
                    t_j = sum(weighted) if vecs else np.zeros_like(g_q)
                else:
                    vecs = [a["train_grid_features"][col, m].astype(np.float64) for m in range(2)]
                    if method in NORMALISED:
                        vecs = [v / np.linalg.norm(v) for v in vecs]
                    t_j = mass * sum(vecs) / len(vecs)
                if method in COSINE:  # a sample without a draw in the window adds 0
                    denominator = np.linalg.norm(g_q) * np.linalg.norm(t_j)
                    value = mass * g_q @ t_j / denominator if denominator else 0.0
                else:
                    value = g_q @ t_j
                out[q, col] += value
    return out


@pytest.mark.parametrize(
    ("method", "side", "last_only"),
    [
        ("tracin", "replay", False),
        ("retrac", "replay", False),
        ("cosine", "replay", False),
        ("tracin", "grid", True),
        ("retrac", "grid", False),
        ("retrac_unit", "replay", False),
        ("retrac_unit", "grid", False),
    ],
)
@pytest.mark.parametrize("fixture", list(LEARNING_RATES))
def test_scores_equal_the_formula_by_brute_force(request, fixture, method, side, last_only):
    """Epoch and interval windows, uneven checkpoints (steps 2 and 6), warm-up and decay."""
    pipeline = request.getfixturevalue(fixture)
    _, train_dir, gradient_dir = pipeline
    log = ReplayLog.load(train_dir / "replay_log.npz")
    scores = _scores(pipeline, method, side, "last" if last_only else "all")
    lrs = LEARNING_RATES[fixture]
    expected = _brute_force(gradient_dir, log, method, side, lrs, last_only)
    # ReTrac divides by the float32 norms recorded at extraction (exact up to float32 rounding,
    # ~1e-5 relative), the reference by float64 norms of the stored vectors.
    rtol = 1e-4 if method in NORMALISED else 1e-9
    np.testing.assert_allclose(scores.values, expected, rtol=rtol, atol=1e-12)
    assert scores.values.shape == (4, 12)
    assert [c["step"] for c in scores.settings["checkpoints"]] == ([6] if last_only else [2, 6])


def test_retrac_uses_the_exact_norms_recorded_before_projection(smoke_pipeline):
    """With projection none, the stored norms are the feature vectors' own norms."""
    _, _, gradient_dir = smoke_pipeline
    _, a = load_store(gradient_dir / "raw_step_0000006")
    np.testing.assert_allclose(
        np.linalg.norm(a["query_features"], axis=-1), a["query_norm"], rtol=1e-5
    )
    np.testing.assert_allclose(
        np.linalg.norm(a["replay_features"], axis=-1), a["replay_norm"], rtol=1e-5
    )


def test_unknown_names_and_a_foreign_replay_log_are_refused(smoke_pipeline):
    inputs = method_inputs_of(smoke_pipeline)
    with pytest.raises(ValueError, match="did you mean 'tracin'"):
        methods.get("tracn")
    with pytest.raises(ValueError, match="choose one of"):
        trajectory_scores(inputs, unit_weights, "uniform")
    with pytest.raises(ValueError, match="unknown argument 'side'"):
        methods.get("tracin").make_args({"side": "grid"})
    inputs.log.sample_id = inputs.log.sample_id + 10_000
    with pytest.raises(ValueError, match="another run"):
        methods.get("tracin")(inputs)


def test_scores_round_trip_with_their_settings(smoke_pipeline, tmp_path):
    scores = _scores(smoke_pipeline, "tracin")
    scores.save(tmp_path / "tracin")
    back = Scores.load(tmp_path / "tracin")
    np.testing.assert_array_equal(back.values, scores.values)
    np.testing.assert_array_equal(back.train_ids, scores.train_ids)
    assert back.query_kind.tolist() == ["generated"] * 2 + ["heldout"] * 2
    assert back.settings == json.loads(json.dumps(scores.settings))
    assert back.select("heldout").values.shape == (2, 12)


def test_scores_with_nan_or_wrong_shape_are_refused():
    ids, kinds, keys = np.arange(3), np.array(["generated"] * 2), np.arange(2)
    with pytest.raises(ValueError, match="rows \\[1\\]"):
        Scores(np.array([[0.0, 1, 2], [np.nan, 0, 0]]), ids, kinds, keys, {})
    with pytest.raises(ValueError, match="disagree"):
        Scores(np.zeros((2, 2)), ids, kinds, keys, {})


@pytest.mark.parametrize("method", ["tracin", "retrac"])
def test_image_tracing_scores_equal_the_formula_at_the_last_checkpoint(smoke_pipeline, method):
    _, train_dir, gradient_dir = smoke_pipeline
    log = ReplayLog.load(train_dir / "replay_log.npz")
    spec = methods.get(method)
    scores = spec.trace(method_inputs_of(smoke_pipeline), spec.make_args(), 5)
    _, a = load_store(gradient_dir / "raw_step_0000006")
    index = json.loads((gradient_dir / "index.json").read_text())
    lr = next(s["lr"] for s in index["stores"] if s["path"] == "raw_step_0000006")
    lr *= 4 * (6 - 2) / 12  # "epoch" window, constant rate: H_k = lr·B·L_k/N
    ids = scores.train_ids.tolist()
    rows = scores.settings["self_columns"]
    assert scores.query_key.tolist() == [ids[r] for r in rows] and len(rows) == 5
    for qi, row in enumerate(rows):
        per_t = [a["train_grid_features"][row, m].astype(np.float64) for m in range(2)]
        if method == "retrac":
            per_t = [v / np.linalg.norm(v) for v in per_t]
        g_q = sum(per_t) / 2
        for col, sample in enumerate(ids):
            vecs = [
                a["replay_features"][r, 0].astype(np.float64)
                for r, e in enumerate(a["replay_events"])
                if log.sample_id[e] == sample
            ]
            if method == "retrac":
                vecs = [v / np.linalg.norm(v) for v in vecs]
            expected = lr * g_q @ sum(vecs)
            # float32 features: allow rounding relative to the terms, not to a cancelled sum
            scale = lr * np.linalg.norm(g_q) * sum(np.linalg.norm(v) for v in vecs)
            np.testing.assert_allclose(
                scores.values[qi, col], expected, rtol=1e-4, atol=1e-6 * scale
            )


def test_the_interval_window_gives_samples_several_draws_or_none(smoke_pipeline_interval):
    _, train_dir, gradient_dir = smoke_pipeline_interval
    log = ReplayLog.load(train_dir / "replay_log.npz")
    _, a = load_store(gradient_dir / "raw_step_0000002")
    ids = np.unique(log.sample_id)
    first = np.bincount(log.sample_id[a["replay_events"]], minlength=ids.max() + 1)[ids]
    assert len(a["replay_events"]) == 2 * 4 and (first == 0).any()  # steps 0-1 of batch 4
    _, b = load_store(gradient_dir / "raw_step_0000006")
    second = np.bincount(log.sample_id[b["replay_events"]], minlength=ids.max() + 1)[ids]
    assert len(b["replay_events"]) == 4 * 4 and second.max() >= 2  # steps 2-5: over an epoch


def test_a_replay_log_of_another_run_is_refused(smoke_pipeline, tmp_path):
    import shutil

    from diffattr.artifacts.training_run import TrainingRun

    _, train_dir, _ = smoke_pipeline
    copy = tmp_path / "train"
    shutil.copytree(train_dir, copy)
    log = ReplayLog.load(copy / "replay_log.npz")
    log.settings = {**log.settings, "run_id": "0123456789abcdef"}
    log.save(copy / "replay_log.npz")
    with pytest.raises(ValueError, match="belongs to training run 0123456789abcdef"):
        TrainingRun.open(copy).replay_log()


def test_grad_cosine_is_tracin_with_the_aggregated_vectors_normalised(smoke_pipeline_interval):
    inputs = method_inputs_of(smoke_pipeline_interval)
    tracin = methods.get("tracin")
    unit = tracin(inputs, tracin.make_args({"aggregate": "unit"}))
    np.testing.assert_array_equal(unit.values, methods.get("grad_cosine")(inputs).values)
    with pytest.raises(ValueError, match="unknown aggregate 'norm'"):
        tracin.make_args({"aggregate": "norm"})


def test_normalising_the_aggregate_stops_a_sample_with_a_long_sum_winning_every_query(
    smoke_pipeline_interval,
):
    """Under the interval window ReTrac's T_k(j) is a sum of unit vectors, each weighted by
    η_e = lr (1e-3, constant in this run), whose length grows with the number of draws; with
    aggregate unit every training vector has length 1 and every score is bounded by Σ_k H_k."""
    from diffattr.methods.retrac import METHOD as retrac
    from diffattr.methods.trajectory import _checkpoint, cosine_rows, train_side

    inputs = method_inputs_of(smoke_pipeline_interval)
    entry = inputs.gradients.trajectory()[-1]
    summed = train_side(inputs, _checkpoint(inputs, entry), inverse_norm_weights, "replay")
    lengths = np.linalg.norm(summed, axis=1)
    assert lengths.max() / 1e-3 > 1.5  # a sample drawn twice or more in the window
    np.testing.assert_allclose(np.linalg.norm(cosine_rows(summed)[lengths > 0], axis=1), 1.0)
    unit = retrac(inputs, retrac.make_args({"aggregate": "unit"}))
    assert unit.settings["args"]["aggregate"] == "unit"
    bound = sum(c["eta_mass"] for c in unit.settings["checkpoints"])
    assert np.abs(unit.values).max() <= bound * (1 + 1e-12)
