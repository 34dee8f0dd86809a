"""Diffusion-TracIn and Diffusion-ReTrac over the training trajectory, from stage 2's stores.

    TracIn(j, q) = Σ_k η_k ⟨G_k(q), T_k(j)⟩,   G_k(q) = (1/M) Σ_t ḡ_k(q, t),
                                                T_k(j) = Σ_{(t,ε) ∈ R_k(j)} g(θ_k; x_j, t, ε)

ReTrac normalises both sides with the exact norms recorded before projection: every replayed
training gradient to unit norm, and every per-timestep query gradient ḡ_k(q, t) to unit norm
before the average over t. "cosine" (grad-cosine) is cos(G_k(q), T_k(j)) in the projected space
(0 for a checkpoint whose window holds no draw of the sample), summed over checkpoints with η_k.
η_k is the learning rate of the update that produced θ_k (draws taken during warm-up inside a
window had a smaller one). Inner products are taken between projected features (a seeded JL
projection preserves them approximately; `projection: none` makes them exact).

Training side: "replay" (the exact draws training made in each checkpoint's window, the paper's
method) or "grid" (the training images at a uniform timestep grid, averaged over it — the
non-replay variant; stage 2 extracts it at the last checkpoint unless
`gradients.train_grid_at: all`). Checkpoints: "all" trajectory checkpoints or "last".
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from diffattr.artifacts.scores import Scores
from diffattr.data.datasets import find_ids
from diffattr.diffusion.replay import ReplayLog
from diffattr.storage.arrays import load_store

METHODS = ("tracin", "retrac", "cosine")
TRAIN_SIDES = ("replay", "grid")
CHECKPOINTS = ("all", "last")


def load_index(gradient_dir: str | Path) -> dict:
    """Stage 2's index.json (stores, train ids, queries, timestep grids)."""
    path = Path(gradient_dir) / "index.json"
    if not path.exists():
        raise FileNotFoundError(f"no {path}; run the gradients stage first (dvc repro gradients)")
    return json.loads(path.read_text())


def index_scores(index: dict, values: np.ndarray, settings: dict) -> Scores:
    """Scores [Q, N] whose rows are the index's queries and columns its training ids."""
    return Scores(
        values=values,
        train_ids=np.asarray(index["train_ids"], np.int64),
        query_kind=np.asarray(index["queries"]["kind"]),
        query_key=np.asarray(index["queries"]["key"], np.int64),
        settings=settings,
    )


def store_provenance(index: dict, store_settings: dict) -> dict:
    """The settings every score made from a store carries: grids, draws, projection, loss and
    the hash of the queries."""
    return {
        "query_timesteps": index["timesteps"]["query"],
        "train_grid_timesteps": index["timesteps"]["train"],
        "query_draws": store_settings["sets"]["query"]["draws"],
        "projection": store_settings["projection"],
        "loss": store_settings["loss"],
        "queries_hash": store_settings["queries_hash"],
    }


def trajectory_stores(index: dict, checkpoints: str = "all") -> list[dict]:
    """The raw-weight stores (one per trajectory checkpoint), in step order."""
    if checkpoints not in CHECKPOINTS:
        raise ValueError(f"unknown checkpoints {checkpoints!r}; choose one of {list(CHECKPOINTS)}")
    raw = sorted((s for s in index["stores"] if s["weights"] == "raw"), key=lambda s: s["step"])
    if not raw:
        raise ValueError("the gradient index lists no raw-weight (trajectory) stores")
    return raw[-1:] if checkpoints == "last" else raw


def _unit(features: np.ndarray, norms: np.ndarray, what: str) -> np.ndarray:
    """features [..., k] divided by their exact norms [...]."""
    bad = ~np.isfinite(norms) | (norms <= 0)
    if bad.any():
        rows = np.unique(np.nonzero(bad)[0])[:10].tolist()
        raise ValueError(
            f"{what}: exact gradient norms must be finite and positive to normalise; rows {rows} "
            "are not (a NaN or all-zero gradient: check the model and its checkpoint)"
        )
    return features / norms[..., None]


def check_log_matches(log: ReplayLog, store_settings: dict, events: np.ndarray) -> None:
    """Refuse a replay log from another training run than the store's (ValueError)."""
    run = store_settings.get("training_run", {})
    expected = {
        "seed": run.get("train", {}).get("seed"),
        "batch_size": run.get("train", {}).get("batch_size"),
        "dataset": run.get("dataset"),
        "num_train_timesteps": run.get("model", {}).get("num_train_timesteps"),
    }
    differ = {
        k: (log.settings.get(k), v)
        for k, v in expected.items()
        if v is not None and log.settings.get(k) != v
    }
    if differ or (len(events) and int(np.max(events)) >= len(log.step)):
        raise ValueError(
            f"the replay log belongs to another training run than the gradient stores (log vs "
            f"stores: {differ or 'the stores index past the end of the log'}); use the replay "
            "log of the run stage 2 extracted from"
        )


def _positions(train_ids: np.ndarray, sample_ids: np.ndarray) -> np.ndarray:
    """Column of each sample id in train_ids."""
    pos, found = find_ids(train_ids, sample_ids)
    bad = ~found
    if bad.any():
        raise ValueError(
            f"replayed sample ids {np.unique(sample_ids[bad])[:10].tolist()} are not among the "
            "training ids of the gradient index: the replay log belongs to another run"
        )
    return pos


def query_side(arrays: dict[str, np.ndarray], method: str) -> np.ndarray:
    """G_k(q) [Q, k] from query_features [Q, M, k] (normalised per timestep for ReTrac)."""
    feats = arrays["query_features"].astype(np.float64)
    if method == "retrac":
        feats = _unit(feats, arrays["query_norm"].astype(np.float64), "query gradients")
    return feats.mean(axis=1)


def train_side(
    arrays: dict[str, np.ndarray],
    method: str,
    side: str,
    log: ReplayLog | None,
    train_ids: np.ndarray,
    step: int,
    settings: dict | None = None,
) -> np.ndarray:
    """T_k(j) [N, k]: the sum of sample j's replayed gradients (or its grid average).

    Under the "interval" replay window a sample drawn several times in the window sums several
    gradients (unit vectors for ReTrac), so its score grows with how often it was drawn, as in
    TracIn's definition; the "epoch" window holds exactly one draw per sample.
    """
    if side == "grid":
        if "train_grid_features" not in arrays:
            raise ValueError(
                f"checkpoint {step} has no training-grid gradients; use checkpoints 'last' or "
                "rerun stage 2 with gradients.train_grid_at: all"
            )
        feats = arrays["train_grid_features"].astype(np.float64)
        if method == "retrac":
            feats = _unit(feats, arrays["train_grid_norm"].astype(np.float64), "train gradients")
        return feats.mean(axis=1)
    if log is None:
        raise ValueError("the replay training side needs the replay log of the training run")
    feats = arrays["replay_features"][:, 0].astype(np.float64)
    if method == "retrac":
        feats = _unit(feats, arrays["replay_norm"][:, 0].astype(np.float64), "replay gradients")
    check_log_matches(log, settings, arrays["replay_events"])
    columns = _positions(train_ids, log.sample_id[arrays["replay_events"]])
    total = np.zeros((len(train_ids), feats.shape[1]))
    np.add.at(total, columns, feats)
    return total


def _cosine_rows(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return np.divide(x, norms, out=np.zeros_like(x), where=norms > 0)


def trajectory_scores(
    gradient_dir: str | Path,
    log: ReplayLog | None,
    method: str = "tracin",
    side: str = "replay",
    checkpoints: str = "all",
) -> Scores:
    """TracIn / ReTrac / grad-cosine scores [Q, N] summed over trajectory checkpoints.

    gradient_dir: stage 2's output folder (index.json + stores); log: the training run's replay
    log (needed for side "replay"). Returns float64 scores, > 0 = proponent.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {list(METHODS)}")
    if side not in TRAIN_SIDES:
        raise ValueError(f"unknown training side {side!r}; choose one of {list(TRAIN_SIDES)}")
    gradient_dir = Path(gradient_dir)
    index = load_index(gradient_dir)
    train_ids = np.asarray(index["train_ids"], np.int64)
    chosen = trajectory_stores(index, checkpoints)
    values = None
    provenance = []
    for store in chosen:
        settings, arrays = load_store(gradient_dir / store["path"])
        q = query_side(arrays, method)
        t = train_side(arrays, method, side, log, train_ids, store["step"], settings)
        if method == "cosine":
            q, t = _cosine_rows(q), _cosine_rows(t)
        term = float(store["lr"]) * (q @ t.T)
        values = term if values is None else values + term
        provenance.append(
            {"step": store["step"], "lr": store["lr"], "weights_hash": settings["weights_hash"]}
        )
    return index_scores(
        index,
        values,
        {
            "method": method,
            "train_side": side,
            "checkpoints": provenance,
            "replay_window": index.get("replay_window"),
            **store_provenance(index, settings),
            "sign": "score > 0: proponent (training on j lowered the query's loss)",
        },
    )


def training_image_scores(
    gradient_dir: str | Path,
    log: ReplayLog,
    method: str = "tracin",
    n_queries: int = 64,
) -> Scores:
    """Image tracing: training images as queries, scored against every training sample at the
    last checkpoint (its only store with training images on a timestep grid by default).

    Query side: the training image's grid gradients at θ_K (averaged over the grid, normalised
    per timestep for ReTrac); training side: the replayed draws of θ_K's window. A method that
    traces images should rank each query's own training sample first. Returns [n_queries, N]
    scores; query_key holds the training ids, query_kind "train".
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {list(METHODS)}")
    if n_queries < 1:
        raise ValueError(f"n_queries must be ≥ 1, got {n_queries}")
    gradient_dir = Path(gradient_dir)
    index = load_index(gradient_dir)
    train_ids = np.asarray(index["train_ids"], np.int64)
    store = trajectory_stores(index, "last")[0]
    settings, arrays = load_store(gradient_dir / store["path"])
    if "train_grid_features" not in arrays:
        raise ValueError(f"checkpoint {store['step']} has no training-grid gradients")
    rows = np.linspace(0, len(train_ids) - 1, min(n_queries, len(train_ids))).astype(np.int64)
    feats = arrays["train_grid_features"][rows].astype(np.float64)
    if method == "retrac":
        norms = arrays["train_grid_norm"][rows].astype(np.float64)
        feats = _unit(feats, norms, "train grid gradients")
    q = feats.mean(axis=1)
    t = train_side(arrays, method, "replay", log, train_ids, store["step"], settings)
    if method == "cosine":
        q, t = _cosine_rows(q), _cosine_rows(t)
    return Scores(
        values=float(store["lr"]) * (q @ t.T),
        train_ids=train_ids,
        query_kind=np.full(len(rows), "train"),
        query_key=train_ids[rows],
        settings={
            "method": method,
            "evaluation": "image tracing (training images as queries)",
            "checkpoints": [
                {"step": store["step"], "lr": store["lr"], "weights_hash": settings["weights_hash"]}
            ],
            "replay_window": index.get("replay_window"),
            "query_timesteps": index["timesteps"]["train"],
            "projection": settings["projection"],
            "loss": settings["loss"],
            "self_columns": rows.tolist(),
        },
    )
