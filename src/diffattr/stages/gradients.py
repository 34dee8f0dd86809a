"""Stage 2: every gradient the attribution methods need, per checkpoint, in resumable stores.

Layout under out_dir:
- `raw_step_XXXXXXX/` (one per trajectory checkpoint, raw weights θ_k — TracIn / ReTrac):
  `replay_*` (the training draws of the window checkpoint k stands for, M = 1),
  `query_*` (queries × M grid timesteps, S draws averaged, kept per timestep),
  `profile_norm` (norms on a fine timestep grid, one column per (t, draw)),
  `train_grid_*` (training images × grid timesteps; at the last checkpoint by default);
- `ema_step_XXXXXXX/` (final EMA weights — influence functions, TRAK / D-TRAK):
  `train_grid_*`, `query_*` (loss) and `train_grid_sqnorm_*`, `query_sqnorm_*` (D-TRAK);
- `index.json`: which stores exist, the query list, the timestep grids, the learning rates η_k
  and the measured throughput.
"""

from __future__ import annotations

import contextlib
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from diffattr.artifacts.gradient_index import (
    INDEX_FILE,
    QUERY,
    QUERY_SQNORM,
    REPLAY,
    REPLAY_EVENTS,
    TRAIN_GRID,
    TRAIN_GRID_SQNORM,
    GradientIndex,
    norm_array,
)
from diffattr.artifacts.training_run import TrainingRun
from diffattr.data.datasets import ImageDataset
from diffattr.devices import resolve_device
from diffattr.diffusion.schedule import build_scheduler
from diffattr.evaluation.timestep_bias import profile_norms
from diffattr.gradients.engines import PerSampleGradients, resolve_engine
from diffattr.gradients.extraction import Throughput, array_specs, extract
from diffattr.gradients.items import (
    KIND_TRAIN,
    ItemSet,
    grid_items,
    replay_items,
    replay_window,
    timestep_grid,
)
from diffattr.gradients.projection import Projector, make_projector
from diffattr.params import Params
from diffattr.stages.train import write_metrics, write_plot_data
from diffattr.storage.arrays import ArrayStore, StoreMismatchError
from diffattr.storage.checkpoints import (
    checkpoint_name,
    settings_diff,
    settings_hash,
    weights_hash,
    work_folder,
)


def check_matches_training(P: Params, dataset: ImageDataset, run: TrainingRun) -> None:
    """Refuse parameters that disagree with the training run (data, schedule, loss, T)."""
    run.check_dataset(dataset)
    requested = vars(P.model).copy()
    diff = settings_diff(run.settings["model"], requested)
    if diff:
        raise ValueError(
            f"the model parameters disagree with the training run in {run.path}: {diff}. "
            "Retrain (dvc repro) or use the parameters it was trained with."
        )


def make_stage_projector(P: Params, dim: int, device: torch.device) -> Projector:
    kind = P.gradients.projection
    if kind == "auto":
        kind = "rademacher" if device.type == "cuda" else "sparse"
    if kind == "none":
        return make_projector("none", dim, None, P.gradients.projection_seed)
    return make_projector(kind, dim, P.gradients.projection_dim, P.gradients.projection_seed)


def _store_settings(
    P: Params, label: str, payload: dict, projector: Projector, extra: dict
) -> dict:
    return {
        "weights": label,
        "checkpoint_step": int(payload["step"]),
        "weights_hash": weights_hash(payload["ema" if label == "ema" else "model"]),
        "training_run": payload["settings"],
        "projection": projector.settings(),
        "gradients": {
            k: v
            for k, v in vars(P.gradients).items()
            if k not in ("batch_size", "chunk_size", "train_grid_at", "engine")
        },
        **extra,
    }


def run_gradient_stage(
    P: Params,
    train_dir: str | Path,
    out_dir: str | Path,
    device: torch.device,
    progress: bool = True,
) -> dict:
    """Extract every store of the stage (resuming finished rows) and write index.json."""
    out_dir = Path(out_dir)
    gp = P.gradients
    # index.json is written last: while stores change, no reader may take the old one as valid.
    (out_dir / INDEX_FILE).unlink(missing_ok=True)
    run = TrainingRun.open(train_dir)
    dataset, heldout = P.data.load("train"), P.data.load("heldout")
    check_matches_training(P, dataset, run)
    log = run.replay_log()
    queries = run.query_set(heldout, gp.heldout_queries)
    T = P.model.num_train_timesteps
    scheduler = build_scheduler(P.model.schedule, T)
    grids = {
        "query": timestep_grid(gp.query_timesteps, T),
        "train": timestep_grid(gp.train_timesteps, T),
        "profile": timestep_grid(gp.profile_timesteps, T),
        "ema_train": timestep_grid(gp.ema_train_timesteps, T),
    }
    query_items = queries.items(grids["query"], gp.query_draws, gp.seed)
    train_items = grid_items(dataset.images, dataset.ids, KIND_TRAIN, grids["train"], 1, gp.seed)
    ema_train_items = grid_items(
        dataset.images, dataset.ids, KIND_TRAIN, grids["ema_train"], 1, gp.seed
    )
    profile_rows = np.linspace(0, len(dataset) - 1, min(gp.profile_samples, len(dataset))).astype(
        int
    )
    profile_items = _profile_items(
        dataset, profile_rows, grids["profile"], gp.profile_draws, gp.seed
    )

    steps = P.gradient_checkpoint_steps()
    query_hash = queries.content_hash()
    total = Throughput()
    stores: list[dict] = []
    started = time.perf_counter()
    for step in steps:
        model, payload = run.load_model(step)
        previous = max([s for s in steps if s < step], default=0)
        events = replay_window(log, step, previous, gp.replay_window)
        sets = {
            REPLAY: (replay_items(dataset, log, events), True),
            QUERY: (query_items, True),
            "profile": (profile_items, False),
        }
        if gp.train_grid_at == "all" or step == steps[-1]:
            sets[TRAIN_GRID] = (train_items, True)
        meta = {REPLAY_EVENTS: events}
        name = store_name("raw", step)
        stats = _extract_store(
            P,
            out_dir,
            name,
            "raw",
            model,
            payload,
            scheduler,
            sets,
            meta,
            device,
            progress,
            query_hash,
        )
        total.add(stats)
        stores.append(
            {
                "weights": "raw",
                "step": step,
                "lr": float(payload["lr"]),
                "path": name,
                "sets": sorted(sets),
                "n_replay_events": int(len(events)),
            }
        )
    if gp.ema:
        model, payload = run.load_model(ema=True)
        sets = {TRAIN_GRID: (ema_train_items, True), QUERY: (query_items, True)}
        sqnorm = {TRAIN_GRID_SQNORM: (ema_train_items, True), QUERY_SQNORM: (query_items, True)}
        name = store_name("ema", int(payload["step"]))
        stats = _extract_store(
            P,
            out_dir,
            name,
            "ema",
            model,
            payload,
            scheduler,
            sets,
            {},
            device,
            progress,
            query_hash,
            sqnorm_sets=sqnorm,
        )
        total.add(stats)
        stores.append(
            {
                "weights": "ema",
                "step": int(payload["step"]),
                "path": name,
                "sets": sorted(sets) + sorted(sqnorm),
            }
        )
    index = {
        "run_id": run.identity,
        "stores": stores,
        "train_ids": dataset.ids.tolist(),
        "queries": {"kind": queries.kind.tolist(), "key": queries.key.tolist()},
        "timesteps": {k: v.tolist() for k, v in grids.items()},
        "profile_train_ids": dataset.ids[profile_rows].tolist(),
        "profile_draws": gp.profile_draws,
        "replay_window": gp.replay_window,
        "throughput": total.as_dict(),
        "engine": resolve_engine(gp.engine, model),
        "wall_time_s": round(time.perf_counter() - started, 2),
        "device": str(device),
    }
    _remove_unrequested_stores(out_dir, {entry["path"] for entry in stores})
    GradientIndex.write(out_dir, index)
    with contextlib.suppress(OSError):  # absent, or holds unfinished stores of other settings
        work_folder(out_dir).rmdir()
    return index


def _remove_unrequested_stores(out_dir: Path, requested: set[str]) -> None:
    """Remove stores of out_dir that this run did not ask for (out_dir persists across DVC
    reruns: a store of a checkpoint no longer extracted would otherwise stay in the output)."""
    for folder in sorted(out_dir.iterdir()):
        if folder.is_dir() and folder.name not in requested and (folder / "meta.json").exists():
            print(f"removing {folder}: not a store of these parameters")
            shutil.rmtree(folder)


def store_name(weights: str, step: int) -> str:
    """Folder name of a store: `raw_step_0000800`, `ema_step_0000800`."""
    return f"{weights}_{checkpoint_name(step).removesuffix('.pt')}"


def _open_store(
    out_dir: Path, name: str, settings: dict, specs: dict
) -> tuple[ArrayStore, Path | None]:
    """A finished store in out_dir is reopened; one made with other settings is removed (out_dir
    persists across DVC reruns, so it may hold a store of earlier parameters). Otherwise the
    store is opened, or resumed, in the work folder keyed by its settings.
    Returns the store and where to move it once complete (None: already in place)."""
    final = out_dir / name
    if (final / "meta.json").exists():
        try:
            return ArrayStore.open(final, settings, specs), None
        except StoreMismatchError as err:
            print(f"removing {final}: made with other settings ({str(err).splitlines()[1]} …)")
            shutil.rmtree(final)
    work = work_folder(out_dir) / f"{name}-{settings_hash(settings)}"
    return ArrayStore.open(work, settings, specs), final


def _profile_items(
    dataset: ImageDataset, rows: np.ndarray, grid: np.ndarray, draws: int, seed: int
) -> ItemSet:
    """Each draw its own column (norms are needed per draw, not averaged): M = len(grid)·draws,
    columns ordered timestep-major."""
    base = grid_items(
        dataset.images[torch.from_numpy(rows)], dataset.ids[rows], KIND_TRAIN, grid, draws, seed
    )
    t = base.t.repeat_interleave(draws, dim=1)

    def noise(r: np.ndarray) -> torch.Tensor:
        eps = base.noise(r)  # [b, M, S, C, H, W]
        return eps.reshape(len(r), len(grid) * draws, 1, *eps.shape[3:])

    return ItemSet(base.x0, t, 1, noise)


def _extract_store(
    P: Params,
    out_dir: Path,
    name: str,
    label: str,
    model: torch.nn.Module,
    payload: dict,
    scheduler,
    sets: dict[str, tuple[ItemSet, bool]],
    meta: dict[str, np.ndarray],
    device: torch.device,
    progress: bool,
    query_hash: str,
    sqnorm_sets: dict[str, tuple[ItemSet, bool]] | None = None,
) -> Throughput:
    """Extract the loss-gradient `sets` (and D-TRAK `sqnorm_sets`) of one model into store
    `name` of out_dir. Each set maps to (items, keep projected features?)."""
    gp = P.gradients
    measures = {"loss": sets, "sqnorm": sqnorm_sets or {}}
    grads = {
        m: PerSampleGradients(
            model, scheduler.alphas_cumprod, P.model.loss, m, gp.chunk_size, device, gp.engine
        )
        for m, chosen in measures.items()
        if chosen
    }
    projector = make_stage_projector(P, grads["loss"].dim, device)
    all_sets = {**sets, **(sqnorm_sets or {})}
    specs: dict[str, tuple[tuple[int, ...], str]] = {}
    for set_name, (items, features) in all_sets.items():
        specs.update(array_specs(set_name, items, projector.dim_out if features else None))
    for array_name, values in meta.items():
        specs[array_name] = ((len(values),), "int64")
    described = {s: {"n": it.n, "m": it.m, "draws": it.draws} for s, (it, _) in all_sets.items()}
    extra = {
        "sets": described,
        "n_params": grads["loss"].dim,
        "engine": grads["loss"].engine,  # the engine in use: its float rounding is its own
        "loss": P.model.loss,
        "queries_hash": query_hash,
    }
    settings = _store_settings(P, label, payload, projector, extra)
    store, destination = _open_store(out_dir, name, settings, specs)
    for array_name, values in meta.items():
        if len(store.pending(array_name)):
            store.write(array_name, 0, np.asarray(values, np.int64))
    stats = Throughput()
    for measurement, chosen in measures.items():
        for set_name, (items, features) in chosen.items():
            keep = projector if features else None
            stats.add(
                extract(store, set_name, items, grads[measurement], keep, gp.batch_size, progress)
            )
    store.mark_complete()
    if destination is not None:
        destination.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(store.path, destination)
    return stats


@dataclass
class GradientStageResult:
    """What stage 2 made, with the views its report shows."""

    index: GradientIndex
    profile_grid: np.ndarray  # [M] the fine timestep grid of the norm profile
    profiles: dict[int, np.ndarray]  # step → [n_samples, M, draws] exact norms
    one_sample: dict  # one training sample's profile at the last checkpoint, with its replays
    metrics: dict


def run(
    P: Params,
    train_dir: str | Path = "data/train",
    out_dir: str | Path = "data/gradients",
    report_dir: str | Path = "reports/02_gradients",
    progress: bool = True,
) -> GradientStageResult:
    """Extract every store (resuming), then read back the norm profiles; writes metrics.json."""
    device = resolve_device(P.device)
    run_gradient_stage(P, train_dir, out_dir, device, progress=progress)
    index = GradientIndex.open(out_dir)
    log = TrainingRun.open(train_dir).replay_log()
    grid = index.timesteps("profile")
    profiles, last = {}, None
    for entry in index.trajectory():
        settings, arrays = index.load(entry)
        profiles[entry.step] = profile_norms(arrays, len(grid), index.profile_draws)
        last = (entry, settings, arrays)
    entry, settings, arrays = last
    sample_id = int(index.profile_train_ids[0])
    events = np.asarray(arrays[REPLAY_EVENTS])
    mine = np.flatnonzero(log.sample_id[events] == sample_id)
    replay_norms = arrays[norm_array(REPLAY)][:, 0]
    one = {
        "sample_id": sample_id,
        "step": entry.step,
        "norms": profiles[entry.step][0],
        "replayed": [(int(log.t[events[i]]), float(replay_norms[i])) for i in mine],
    }
    thr = index.data["throughput"]
    metrics = {
        "wall_time_s": index.data["wall_time_s"],
        "gradients": thr["gradients"],
        "sample_gradients": thr["sample_gradients"],
        "ms_per_gradient": thr["ms_per_gradient"],
        "ms_per_projection": thr["ms_per_projection"],
        "n_params": settings["n_params"],
        "engine": settings["engine"],
        "projection": settings["projection"]["kind"],
        "projection_dim": settings["projection"]["dim_out"],
        "n_stores": len(index.stores()),
        "norm_max_over_min": float(
            profiles[entry.step].mean(axis=(0, 2)).max()
            / profiles[entry.step].mean(axis=(0, 2)).min()
        ),
        "run_id": index.run_id,
        "device": index.data["device"],
    }
    write_metrics(report_dir, metrics)
    write_plot_data(report_dir, "norm_profile", norm_profile_data(grid, profiles))
    return GradientStageResult(index, grid, profiles, one, metrics)


def norm_profile_data(grid: np.ndarray, profiles: dict[int, np.ndarray]) -> pd.DataFrame:
    """The norm profile's data at the last checkpoint (`dvc plots`; the band of stage 3 is
    defined there): one row per grid timestep t with the mean exact gradient norm over samples
    and draws and its 10% / 90% quantiles. profiles: step → norms [n_samples, M, draws]."""
    step = max(profiles)
    norms = profiles[step].transpose(1, 0, 2).reshape(len(grid), -1)  # [M, n_samples·draws]
    return pd.DataFrame(
        {
            "checkpoint": step,
            "t": np.asarray(grid),
            "mean_norm": norms.mean(axis=1),
            "q10_norm": np.quantile(norms, 0.1, axis=1),
            "q90_norm": np.quantile(norms, 0.9, axis=1),
        }
    )
