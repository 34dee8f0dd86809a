"""η per replayed event and per checkpoint window, against hand-computed values."""

from __future__ import annotations

import numpy as np
import pytest

from diffattr.artifacts.gradient_index import GradientIndex
from diffattr.artifacts.learning_rates import EventWeights
from diffattr.artifacts.training_run import TrainingRun

# A 10-step run: warm-up over steps 0-2, then 1.0, decayed to 0.5 for the last two steps.
ETA = np.array([0.1, 0.2, 0.3, 1, 1, 1, 1, 1, 0.5, 0.5])


def _weights(window: str) -> EventWeights:
    """B = 2, N = 4, uneven checkpoints after 3 and 10 steps."""
    return EventWeights(ETA, batch_size=2, n_train=4, checkpoints=(3, 10), window=window)


def test_interval_events_carry_the_rate_of_their_own_step():
    w = _weights("interval")
    assert w.span(3) == (0, 3) and w.span(10) == (3, 10)
    np.testing.assert_allclose(w.events(3, np.array([0, 2, 2])), [0.1, 0.3, 0.3])
    np.testing.assert_allclose(w.events(10, np.array([8, 3])), [0.5, 1.0])


def test_an_epoch_draw_carries_the_rate_its_window_gave_a_sample():
    """One draw stands for the window: H_k, whatever the rate at its own step."""
    w = _weights("epoch")
    np.testing.assert_allclose(w.events(3, np.array([1, 2])), [0.3, 0.3])  # 0.6 · 2/4
    np.testing.assert_allclose(w.events(10, np.array([9, 4])), [3.0, 3.0])  # 6.0 · 2/4


def test_window_mass_is_the_rate_summed_over_the_window_per_sample():
    w = _weights("epoch")
    assert w.window_mass(3) == pytest.approx((0.1 + 0.2 + 0.3) * 2 / 4)
    assert w.window_mass(10) == pytest.approx((5 * 1.0 + 2 * 0.5) * 2 / 4)
    assert w.describe(10)["window_steps"] == [3, 10]


def test_interval_weights_sum_to_the_window_mass_over_a_full_log():
    """Every event of a hand-built log (each step draws B of N samples): the per-sample sums
    of η_e average to H_k, and over all windows give each sample the η of its own steps."""
    rng = np.random.default_rng(0)
    batches = np.stack([rng.permutation(4)[:2] for _ in range(10)])  # [steps, B]
    steps, samples = np.repeat(np.arange(10), 2), batches.ravel()
    w = _weights("interval")
    total = np.zeros(4)
    for k in w.checkpoints:
        first, stop = w.span(k)
        rows = (steps >= first) & (steps < stop)
        per_sample = np.bincount(samples[rows], w.events(k, steps[rows]), minlength=4)
        assert per_sample.mean() == pytest.approx(w.window_mass(k))
        total += per_sample
    direct = [sum(ETA[s] for s in range(10) if j in batches[s]) for j in range(4)]
    np.testing.assert_allclose(total, direct)


def test_bad_windows_and_checkpoints_are_refused():
    with pytest.raises(ValueError, match="unknown replay window"):
        EventWeights(ETA, 2, 4, (3, 10), "epochs")
    with pytest.raises(ValueError, match="outside the run"):
        EventWeights(ETA, 2, 4, (3, 11), "epoch")
    with pytest.raises(ValueError, match="no store at step 5"):
        _weights("epoch").span(5)


def test_the_run_reports_the_rate_of_every_update(smoke_pipeline_warmup):
    """Warm-up over 3 steps, then cosine decay: lr·[1/3, 2/3, 1, 1, 3/4, 1/4]; a checkpoint's
    recorded η_k is the rate of the update that produced it."""
    _, train_dir, gradient_dir = smoke_pipeline_warmup
    run = TrainingRun.open(train_dir)
    expected = 1e-3 * np.array([1 / 3, 2 / 3, 1, 1, 0.75, 0.25])
    np.testing.assert_allclose(run.learning_rates(), expected, rtol=1e-12)
    for step in run.checkpoint_steps:
        assert run.lr(step) == pytest.approx(expected[step - 1])
    w = EventWeights.of(run, GradientIndex.open(gradient_dir))
    assert w.checkpoints == (2, 6) and w.window == "interval"
    assert w.window_mass(6) == pytest.approx(expected[2:6].sum() * 4 / 12)
