"""The learning rate η each replayed event (and each checkpoint's window) carries in the TracIn
family's sum, from stage 1's schedule and stage 2's checkpoint windows.

TracIn approximates what training did to a query's loss as Σ over updates s of
η_s ⟨g_q, g_{j,s}⟩ (j in batch s). The paper writes Σ_k η_k, one rate per checkpoint, the rate
of the update that produced θ_k. Here a gradient that *is* one update carries that update's
rate, and a gradient that *stands for* a window carries the rate the window gave a sample,
H_k = (B/N) Σ_{s in window} lr(s) (the official code's `lr·B·interval/N`, with the rate summed
over the window instead of read at its end), so that warm-up, decay and unevenly spaced
checkpoints count for what the updates really moved:

- replay, window "interval" (every draw since the previous checkpoint): η_e = lr(step_e);
  the window's length is in how many events there are.
- replay, window "epoch" (each sample's latest draw): η_e = H_k — one draw stands for the
  B·L_k/N draws of the sample expected in the window's L_k steps, whatever the rate at its step.
- grid, and the per-checkpoint weight of the cosine variant: H_k.

With evenly spaced checkpoints and a constant rate over every window, all three are η_k times
the constant B·L/N, and rankings equal the paper's Σ_k η_k. They differ where a window holds
warm-up or decay steps (the default's first window, [0, 160), holds the 100 warm-up steps).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from diffattr.artifacts.gradient_index import GradientIndex
from diffattr.artifacts.training_run import TrainingRun
from diffattr.gradients.items import REPLAY_WINDOWS


@dataclass(frozen=True)
class EventWeights:
    """η per replayed event and per checkpoint window (see the module docstring).

    eta: [steps] learning rate of every update (0-based step); batch_size B; n_train N;
    checkpoints: the steps of the stores stage 2 extracted, ascending (each one's window runs
    from the previous one, 0 for the first, as `gradients.items.replay_window` cut it);
    window: "epoch" | "interval", the replay window stage 2 used.
    """

    eta: np.ndarray
    batch_size: int
    n_train: int
    checkpoints: tuple[int, ...]
    window: str

    def __post_init__(self) -> None:
        if self.window not in REPLAY_WINDOWS:
            raise ValueError(f"unknown replay window {self.window!r}; one of {REPLAY_WINDOWS}")
        if list(self.checkpoints) != sorted(set(self.checkpoints)) or not self.checkpoints:
            raise ValueError(f"checkpoint steps must be ascending, got {list(self.checkpoints)}")
        if self.checkpoints[0] < 1 or self.checkpoints[-1] > len(self.eta):
            raise ValueError(
                f"checkpoint steps {list(self.checkpoints)} lie outside the run's "
                f"{len(self.eta)} steps: the gradients and the training run disagree"
            )

    @classmethod
    def of(cls, run: TrainingRun, index: GradientIndex) -> EventWeights:
        """The weights of the stores in `index`, extracted from `run`."""
        index.check_run(run)
        return cls(
            eta=run.learning_rates(),
            batch_size=int(run.settings["train"]["batch_size"]),
            n_train=int(run.settings["n_train"]),
            checkpoints=tuple(s.step for s in index.trajectory("all")),
            window=index.replay_window,
        )

    def span(self, checkpoint: int) -> tuple[int, int]:
        """[first, stop): the steps checkpoint `checkpoint`'s window stands for."""
        if checkpoint not in self.checkpoints:
            raise ValueError(f"no store at step {checkpoint}; stores: {list(self.checkpoints)}")
        i = self.checkpoints.index(checkpoint)
        return (self.checkpoints[i - 1] if i else 0), checkpoint

    def events(self, checkpoint: int, steps: np.ndarray) -> np.ndarray:
        """η_e [E] of the replayed events at training steps `steps` [E] of that window: lr(step)
        under the "interval" window, H_k under "epoch"."""
        steps = np.asarray(steps, np.int64)
        if self.window == "interval":
            return self.eta[steps]
        return np.full(len(steps), self.window_mass(checkpoint))

    def window_mass(self, checkpoint: int) -> float:
        """H_k = (B/N) Σ_{s in window} lr(s): the learning rate one sample sees in the window."""
        first, stop = self.span(checkpoint)
        return float(self.eta[first:stop].sum()) * self.batch_size / self.n_train

    def describe(self, checkpoint: int) -> dict:
        """What a score's settings record about checkpoint `checkpoint`'s weighting."""
        first, stop = self.span(checkpoint)
        return {
            "window_steps": [first, stop],
            "eta_mass": self.window_mass(checkpoint),
            "eta_per_event": "lr(step_e)" if self.window == "interval" else "eta_mass",
        }
