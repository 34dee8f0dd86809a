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
import json
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from diffattr.artifacts.queries import load_query_set
from diffattr.data.datasets import ImageDataset
from diffattr.diffusion.model import unet_config
from diffattr.diffusion.replay import ReplayLog
from diffattr.diffusion.schedule import build_scheduler
from diffattr.diffusion.training import load_trained, run_settings
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
from diffattr.storage.arrays import ArrayStore
from diffattr.storage.checkpoints import (
    checkpoint_name,
    settings_diff,
    settings_hash,
    weights_hash,
    work_folder,
)

FORMAT_VERSION = 1


def check_matches_training(P: Params, dataset: ImageDataset, train_dir: Path) -> None:
    """Refuse parameters that disagree with the run in train_dir (data, schedule, loss, T)."""
    summary = train_dir / "run.json"
    if not summary.exists():
        raise FileNotFoundError(f"no finished training run in {train_dir}; run the train stage")
    trained = json.loads(summary.read_text())["settings"]
    config = unet_config(P.model.unet, dataset.image_shape)
    keys = ("dataset", "train_ids_hash", "image_shape", "model")
    expected = run_settings(dataset, P.model, P.train, config)
    requested = {k: expected[k] for k in keys}
    diff = settings_diff({k: trained[k] for k in requested}, requested)
    if diff:
        raise ValueError(
            f"the parameters disagree with the training run in {train_dir}: {diff}. Retrain "
            "(dvc repro) or use the parameters it was trained with."
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
        "format_version": FORMAT_VERSION,
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
    train_dir, out_dir = Path(train_dir), Path(out_dir)
    gp = P.gradients
    dataset, heldout = P.data.load("train"), P.data.load("heldout")
    check_matches_training(P, dataset, train_dir)
    log = ReplayLog.load(train_dir / "replay_log.npz")
    queries = load_query_set(train_dir, heldout, gp.heldout_queries)
    T = P.model.num_train_timesteps
    scheduler = build_scheduler(P.model.schedule, T)
    grids = {
        "query": timestep_grid(gp.query_timesteps, T),
        "train": timestep_grid(gp.train_timesteps, T),
        "profile": timestep_grid(gp.profile_timesteps, T),
    }
    query_items = queries.items(grids["query"], gp.query_draws, gp.seed)
    train_items = grid_items(dataset.images, dataset.ids, KIND_TRAIN, grids["train"], 1, gp.seed)
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
        model, payload = load_trained(train_dir, step)
        previous = max([s for s in steps if s < step], default=0)
        events = replay_window(log, step, previous, gp.replay_window)
        sets = {
            "replay": (replay_items(dataset, log, events), True),
            "query": (query_items, True),
            "profile": (profile_items, False),
        }
        if gp.train_grid_at == "all" or step == steps[-1]:
            sets["train_grid"] = (train_items, True)
        meta = {"replay_events": events}
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
        model, payload = load_trained(train_dir, ema=True)
        sets = {"train_grid": (train_items, True), "query": (query_items, True)}
        sqnorm = {"train_grid_sqnorm": (train_items, True), "query_sqnorm": (query_items, True)}
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
        "format_version": FORMAT_VERSION,
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
    (out_dir / "index.json").write_text(json.dumps(index, indent=1))
    with contextlib.suppress(OSError):  # absent, or holds unfinished stores of other settings
        work_folder(out_dir).rmdir()
    return index


def store_name(weights: str, step: int) -> str:
    """Folder name of a store: `raw_step_0000800`, `ema_step_0000800`."""
    return f"{weights}_{checkpoint_name(step).removesuffix('.pt')}"


def _open_store(
    out_dir: Path, name: str, settings: dict, specs: dict
) -> tuple[ArrayStore, Path | None]:
    """A finished store in out_dir is reopened (and refused if made with other settings);
    otherwise the store is opened, or resumed, in the work folder keyed by its settings.
    Returns the store and where to move it once complete (None: already in place)."""
    final = out_dir / name
    if (final / "meta.json").exists():
        return ArrayStore.open(final, settings, specs), None
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
