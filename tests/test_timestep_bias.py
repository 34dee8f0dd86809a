"""The large-norm band and per-sample replayed-norm bookkeeping against direct computations."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from diffattr.artifacts.gradient_index import GradientIndex
from diffattr.artifacts.learning_rates import EventWeights
from diffattr.artifacts.training_run import TrainingRun
from diffattr.diffusion.replay import ReplayLog
from diffattr.evaluation.timestep_bias import band_interval, large_norm_band, replay_norms
from diffattr.gradients.items import grid_cell
from diffattr.stages.timestep_bias import findings
from diffattr.storage.arrays import load_store


def test_band_is_the_top_quartile_of_the_mean_profile():
    mean = np.array([8.0, 4.0, 2.0, 1.0, 0.5, 0.4, 0.3, 0.2])
    assert large_norm_band(mean, 0.75).tolist() == [True, True] + [False] * 6
    assert large_norm_band(mean[::-1], 0.5).sum() == 4
    with pytest.raises(ValueError, match=r"\(0, 1\)"):
        large_norm_band(mean, 1.0)


def test_timesteps_map_to_their_grid_cells_and_cells_to_intervals():
    assert grid_cell(np.array([0, 49, 50, 999]), 20, 1000).tolist() == [0, 0, 1, 19]
    grid = np.arange(20) * 50 + 25
    band = np.zeros(20, bool)
    band[[0, 1, 2, 7, 19]] = True
    assert band_interval(grid, band, 1000) == [[0, 150], [350, 400], [950, 1000]]


@pytest.mark.parametrize(
    ("fixture", "lrs"),
    [
        ("smoke_pipeline", [1e-3] * 6),
        ("smoke_pipeline_interval", [1e-3] * 6),
        ("smoke_pipeline_warmup", [1e-3 / 3, 2e-3 / 3, 1e-3, 1e-3, 0.75e-3, 0.25e-3]),
    ],
)
def test_replay_norms_match_a_per_event_loop(request, fixture, lrs):
    """norm_mass weights each draw by η at its step ("interval") or its window's H_k ("epoch")."""
    _, train_dir, gradient_dir = request.getfixturevalue(fixture)
    log = ReplayLog.load(train_dir / "replay_log.npz")
    index = GradientIndex.open(gradient_dir)
    weights = EventWeights.of(TrainingRun.open(train_dir), index)
    result = replay_norms(index, log, weights, 0.5)
    index = json.loads((gradient_dir / "index.json").read_text())
    starts = dict(zip([2, 6], [0, 2], strict=True))
    grid = index["timesteps"]["profile"]
    ids = index["train_ids"]
    mass, hits, seen = {j: 0.0 for j in ids}, {j: 0 for j in ids}, {j: 0 for j in ids}
    last = {}
    for store in [s for s in index["stores"] if s["weights"] == "raw"]:
        _, a = load_store(gradient_dir / store["path"])
        per_t = a["profile_norm"].reshape(-1, len(grid), index["profile_draws"]).mean(axis=(0, 2))
        band = per_t >= np.median(per_t)
        for row, event in enumerate(a["replay_events"]):
            j, t = int(log.sample_id[event]), int(log.t[event])
            norm = float(a["replay_norm"][row, 0])
            first, stop = starts[store["step"]], store["step"]
            window_mass = sum(lrs[first:stop]) * 4 / 12
            eta = lrs[log.step[event]] if index["replay_window"] == "interval" else window_mass
            mass[j] += eta * norm
            hits[j] += bool(band[min(t * len(grid) // 1000, len(grid) - 1)])
            seen[j] += 1
            if j not in last or log.step[event] >= last[j][2]:
                last[j] = (t, norm, int(log.step[event]))
    np.testing.assert_allclose(result.norm_mass, [mass[j] for j in ids], rtol=1e-12)
    expected_share = [hits[j] / seen[j] if seen[j] else np.nan for j in ids]
    np.testing.assert_allclose(result.band_share, expected_share, rtol=1e-12)
    assert result.last_t.tolist() == [last[j][0] if j in last else -1 for j in ids]
    np.testing.assert_allclose(
        result.last_norm, [last[j][1] if j in last else np.nan for j in ids], rtol=1e-12
    )
    np.testing.assert_array_equal(result.draws, [seen[j] for j in ids])
    assert sorted(result.bands) == [2, 6]


def test_stage3_verdicts_count_every_k_of_the_band_sweep():
    """A method within the base rate at k = top_k but below it at another k of the sweep is
    mixed, not holds; the shares shown stay those at top_k."""

    def row(method, kind, vs, k=10):
        return dict(method=method, queries=kind, k=k, topk_slots_in_band=0.25, band_ci_low=0.2,
                    band_ci_high=0.3, vs_base_rate=vs)  # fmt: skip

    table = pd.DataFrame([row(m, q, "within") for m in ("calibrated", "random")
                          for q in ("generated", "heldout")])  # fmt: skip
    sweep = pd.DataFrame(
        [*table.to_dict(orient="records"), row("calibrated", "generated", "below", k=1),
         row("calibrated", "heldout", "within", k=1), row("random", "generated", "within", k=1),
         row("random", "heldout", "within", k=1)]
    )  # fmt: skip
    at_top_k = findings(table, 0.25).set_index("claim").verdict
    assert at_top_k["Timestep-calibrated TracIn removes the bias without reversing it"] == "holds"
    found = findings(table, 0.25, sweep).set_index("claim")
    claim = found.loc["Timestep-calibrated TracIn removes the bias without reversing it"]
    assert claim.verdict == "mixed"
    assert claim.ours.startswith("generated 25.0% [20.0%, 30.0%]; heldout 25.0%")
    assert claim.ours.endswith("; within at 3 of 4 (k, query kind) points of the sweep")
    unbiased = found.loc[
        "Methods whose top-k band share matches the base rate for every query kind"
    ]
    assert unbiased.ours == "random"
