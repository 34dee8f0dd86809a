"""The timestep-induced norm bias ([ReTrac] §4): where gradient norms are large, and which
training samples' replayed draws fell there.

The norm profile of a checkpoint is the mean exact ‖g(θ_k; x, t, ε)‖ over profile samples and
noise draws at each timestep of a fine grid; its *large-norm band* is the set of grid timesteps
whose mean norm is in the top quartile (`quantile` 0.75) of the profile. A replayed draw is in
the band when its t falls in a band cell (cells are the grid's evenly spaced bins of [0, T)).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from diffattr.artifacts.gradient_index import (
    PROFILE,
    REPLAY,
    REPLAY_EVENTS,
    GradientIndex,
    norm_array,
)
from diffattr.artifacts.learning_rates import EventWeights
from diffattr.diffusion.replay import ReplayLog
from diffattr.gradients.items import grid_cell, timestep_grid


def profile_norms(arrays: dict[str, np.ndarray], n_timesteps: int, draws: int) -> np.ndarray:
    """A store's `profile_norm` [n_samples, M·draws] as [n_samples, M, draws]."""
    norms = np.asarray(arrays[norm_array(PROFILE)], np.float64)
    return norms.reshape(norms.shape[0], n_timesteps, draws)


def large_norm_band(mean_norm: np.ndarray, quantile: float = 0.75) -> np.ndarray:
    """[M] bool: grid timesteps whose mean norm [M] is at or above the profile's quantile."""
    if not 0 < quantile < 1:
        raise ValueError(f"quantile must lie in (0, 1), got {quantile}")
    return mean_norm >= np.quantile(mean_norm, quantile)


def band_interval(grid: np.ndarray, band: np.ndarray, num_train_timesteps: int) -> list[list[int]]:
    """The band as sorted, merged [start, stop) timestep intervals of its grid cells (the
    integer timesteps `grid_cell` puts in each cell)."""
    edges = np.ceil(np.arange(len(grid) + 1) * num_train_timesteps / len(grid)).astype(int)
    spans: list[list[int]] = []
    for cell in np.flatnonzero(band):
        start, stop = int(edges[cell]), int(edges[cell + 1])
        if spans and spans[-1][1] == start:
            spans[-1][1] = stop
        else:
            spans.append([start, stop])
    return spans


@dataclass
class ReplayNorms:
    """Per training sample, over the trajectory checkpoints used (each with its own band).

    norm_mass: [N] Σ_k Σ_{e ∈ R_k(j)} η_e ‖g_e‖ — the weight TracIn's sum gives sample j's norms
      (η_e: `artifacts.learning_rates`)
      (under the "interval" window it also grows with how often j was drawn; see draws).
    draws: [N] replayed draws of j over the checkpoints' windows; mean_norm: [N] their mean ‖g‖.
    band_share: [N] share of j's replayed draws whose t was in its checkpoint's large-norm band
      (nan for a sample with no draw in any window).
    last_t, last_norm: [N] the timestep and exact norm of j's last replayed draw before the last
      checkpoint (−1 and nan if none).
    bands: checkpoint step → [M] bool band on the profile grid; profiles: step → the norm
    profile [n_profile_samples, M, draws] the band comes from.
    """

    train_ids: np.ndarray
    norm_mass: np.ndarray
    draws: np.ndarray
    mean_norm: np.ndarray
    band_share: np.ndarray
    last_t: np.ndarray
    last_norm: np.ndarray
    bands: dict[int, np.ndarray]
    profiles: dict[int, np.ndarray]

    @property
    def mean_profiles(self) -> dict[int, np.ndarray]:
        """Checkpoint step → mean norm [M] over profile samples and draws."""
        return {step: p.mean(axis=(0, 2)) for step, p in self.profiles.items()}


def replay_norms(
    index: GradientIndex,
    log: ReplayLog,
    weights: EventWeights,
    quantile: float = 0.75,
    checkpoints: str = "all",
) -> ReplayNorms:
    """Exact replayed-gradient norms and band membership per training sample (see ReplayNorms).

    log: the replay log of the run the index was extracted from (`TrainingRun.replay_log`);
    weights: η per replayed event (`EventWeights.of(run, index)`)."""
    if log.settings.get("run_id") != index.run_id:
        raise ValueError(
            f"the replay log belongs to run {log.settings.get('run_id')}, the gradients to "
            f"{index.run_id}; rerun the stages in order (dvc repro)"
        )
    train_ids = index.train_ids
    grid = index.timesteps("profile")
    num_train_timesteps = int(log.settings["num_train_timesteps"])
    if not np.array_equal(timestep_grid(len(grid), num_train_timesteps), grid):
        raise ValueError(
            f"the profile grid {grid.tolist()} is not the even grid of T = {num_train_timesteps} "
            "the replay log was trained with: the log and the gradient stores disagree"
        )
    draws = index.profile_draws
    n = len(train_ids)
    norm_mass, total_norm, in_band, events_seen = np.zeros(n), np.zeros(n), np.zeros(n), np.zeros(n)
    last_t, last_norm = np.full(n, -1, np.int64), np.full(n, np.nan)
    bands, profiles = {}, {}
    for store in index.trajectory(checkpoints):
        _, arrays = index.load(store)
        profile = profile_norms(arrays, len(grid), draws)
        band = large_norm_band(profile.mean(axis=(0, 2)), quantile)
        bands[store.step], profiles[store.step] = band, profile
        events = np.asarray(arrays[REPLAY_EVENTS])
        columns = index.columns(log.sample_id[events])
        norms = np.asarray(arrays[norm_array(REPLAY)][:, 0], np.float64)
        t = log.t[events].astype(np.int64)
        np.add.at(norm_mass, columns, weights.events(store.step, log.step[events]) * norms)
        np.add.at(total_norm, columns, norms)
        np.add.at(in_band, columns, band[grid_cell(t, len(grid), num_train_timesteps)])
        np.add.at(events_seen, columns, 1)
        # Each sample's latest draw so far (later checkpoints' windows come later).
        latest = np.argsort(log.step[events], kind="stable")[::-1]
        cols, first = np.unique(columns[latest], return_index=True)
        last_t[cols] = t[latest][first]
        last_norm[cols] = norms[latest][first]
    with np.errstate(invalid="ignore", divide="ignore"):
        band_share = np.where(events_seen > 0, in_band / events_seen, np.nan)
        mean_norm = np.where(events_seen > 0, total_norm / events_seen, np.nan)
    return ReplayNorms(
        train_ids, norm_mass, events_seen, mean_norm, band_share, last_t, last_norm, bands, profiles
    )
