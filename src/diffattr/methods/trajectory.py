"""The TracIn family over the training trajectory, from stage 2's stores: one template, with
the per-gradient weighting as the only thing a variant changes.

    score(q, j) = Σ_k ⟨G_k(q), T_k(j)⟩,   G_k(q) = (1/M) Σ_t w(ḡ_k(q, t)) ḡ_k(q, t),
                                           T_k(j) = Σ_{e=(s,t,ε) ∈ R_k(j)} η_e w(g_e) g_e

with w = 1 (Diffusion-TracIn), w = 1/‖g‖ (Diffusion-ReTrac: exact norms recorded before
projection) or w = 1/E‖g(t)‖ (timestep-calibrated TracIn: the checkpoint's mean norm at that
timestep, from stage 2's norm profile). Grad-cosine replaces the inner product by
H_k cos(G_k(q), T_k(j)) (0 for a checkpoint whose window holds no draw of the sample).
η_e is the learning rate in force at event e's step s under the "interval" window (each event
is one update) and H_k under "epoch" (one draw stands for the window), H_k the learning rate
summed over checkpoint k's window per sample, (B/N) Σ_{s in window} lr(s):
`artifacts.learning_rates`. The paper's Σ_k η_k (one rate per checkpoint) is the
special case of a constant rate over each window and evenly spaced checkpoints. Inner products
are taken between projected features (a seeded JL projection preserves them approximately;
`projection: none` is exact).

Training side: "replay" (the exact draws training made in each checkpoint's window, the paper's
method; under the "interval" window a sample drawn several times sums several gradients) or
"grid" (the training images at a uniform timestep grid, averaged over it and weighted by H_k;
stage 2 extracts it at the last checkpoint unless `gradients.train_grid_at: all`).
Checkpoints: "all" or "last".

Aggregate: "sum" (the papers) or "unit": G_k(q) and T_k(j) are each scaled to unit length after
the weighting and the sum over draws, so the score is Σ_k H_k cos(G_k(q), T_k(j)) (the η_e
weights still shape the direction of T_k(j)). Normalising each gradient (ReTrac) does not bound
the *summed* vector: under the "interval" window a sample whose many draws point alike sums to a
long T_k(j) and is a top proponent of every query; "unit" removes that. Grad-cosine is TracIn
with aggregate "unit".

Every method of the family is made by `trajectory_method` from its weighting: scores over the
stage 2 queries (`compute`), image tracing (`trace`) and scores of query gradients the caller
supplies per checkpoint (`score_gradients`, e.g. the memorisation control's queries evaluated at
a training sample's exact replayed draws, `QueryGradients`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from diffattr.artifacts.gradient_index import (
    PROFILE,
    QUERY,
    REPLAY,
    REPLAY_EVENTS,
    TRAIN_GRID,
    StoreEntry,
    features_array,
    norm_array,
)
from diffattr.artifacts.learning_rates import EventWeights
from diffattr.artifacts.scores import Scores
from diffattr.gradients.items import grid_cell
from diffattr.methods.base import Method, MethodInputs

TRAIN_SIDES = ("replay", "grid")
CHECKPOINTS = ("all", "last")
AGGREGATES = ("sum", "unit")


@dataclass(frozen=True)
class TrajectoryArgs:
    """train_side: replay (the exact training draws; the paper) | grid (a uniform timestep grid);
    checkpoints: all trajectory checkpoints | last; aggregate: sum (the papers) | unit (the
    summed query and training vectors scaled to unit length: a cosine per checkpoint)."""

    train_side: str = "replay"
    checkpoints: str = "all"
    aggregate: str = "sum"

    def __post_init__(self) -> None:
        check_options(self.train_side, self.checkpoints, self.aggregate)


@dataclass
class Gradients:
    """Projected gradients [..., k] of one set with their exact norms [...] and timesteps [...]."""

    features: np.ndarray
    norms: np.ndarray
    t: np.ndarray


@dataclass
class Checkpoint:
    """One trajectory store, as a weighting sees it."""

    entry: StoreEntry
    settings: dict
    arrays: dict[str, np.ndarray]
    num_train_timesteps: int
    profile_draws: int

    def mean_norm_at(self, t: np.ndarray) -> np.ndarray:
        """E‖g(θ_k; x, t, ε)‖ [...] at timesteps t [...]: the profile's mean over samples and
        draws in t's grid cell."""
        norms = np.asarray(self.arrays[norm_array(PROFILE)], np.float64)
        cells = norms.shape[1] // self.profile_draws
        profile = norms.reshape(norms.shape[0], cells, self.profile_draws).mean(axis=(0, 2))
        return profile[grid_cell(t, cells, self.num_train_timesteps)]


Weighting = Callable[[Gradients, Checkpoint, str], np.ndarray]  # → weights [...] per gradient


def unit_weights(g: Gradients, checkpoint: Checkpoint, what: str) -> np.ndarray:
    """w = 1: plain gradients (TracIn)."""
    return np.ones_like(g.norms)


def inverse_norm_weights(g: Gradients, checkpoint: Checkpoint, what: str) -> np.ndarray:
    """w = 1/‖g‖ with the exact norms (ReTrac); refuses zero or non-finite norms."""
    return safe_inverse(g.norms, what, "exact gradient norms")


def safe_inverse(values: np.ndarray, what: str, name: str) -> np.ndarray:
    bad = ~np.isfinite(values) | (values <= 0)
    if bad.any():
        rows = np.unique(np.nonzero(bad)[0])[:10].tolist()
        raise ValueError(
            f"{what}: {name} must be finite and positive to normalise; rows {rows} are not (a NaN "
            "or all-zero gradient: check the model and its checkpoint)"
        )
    return 1.0 / values


def check_options(side: str, checkpoints: str, aggregate: str = "sum") -> None:
    if side not in TRAIN_SIDES:
        raise ValueError(f"unknown training side {side!r}; choose one of {list(TRAIN_SIDES)}")
    if checkpoints not in CHECKPOINTS:
        raise ValueError(f"unknown checkpoints {checkpoints!r}; choose one of {list(CHECKPOINTS)}")
    if aggregate not in AGGREGATES:
        raise ValueError(f"unknown aggregate {aggregate!r}; choose one of {list(AGGREGATES)}")


@dataclass
class QueryGradients:
    """Query gradients supplied by the caller instead of stage 2's query set.

    per_step: trajectory checkpoint step → Gradients (features [Q, M, k] projected with that
    store's projector, exact norms [Q, M], timesteps [Q, M]); the M columns are weighted and
    averaged as stage 2's query timesteps are. kind, key: [Q], who the rows are (as in Scores).
    projection: the projector's settings, checked against each store's. settings: how they were
    made (saved into the scores' settings).
    """

    kind: np.ndarray
    key: np.ndarray
    per_step: dict[int, Gradients]
    projection: dict
    settings: dict = field(default_factory=dict)

    def at(self, ckpt: Checkpoint) -> Gradients:
        """The gradients at one store's checkpoint, refused if made for another projection."""
        step = ckpt.entry.step
        if step not in self.per_step:
            raise ValueError(
                f"the supplied query gradients have no checkpoint {step} (they have "
                f"{sorted(self.per_step)})"
            )
        if self.projection != ckpt.settings["projection"]:
            raise ValueError(
                f"the supplied query gradients were projected with {self.projection}, the store "
                f"of checkpoint {step} with {ckpt.settings['projection']}"
            )
        return self.per_step[step]


def _checkpoint(inputs: MethodInputs, entry: StoreEntry) -> Checkpoint:
    settings, arrays = inputs.gradients.load(entry)
    return Checkpoint(
        entry,
        settings,
        arrays,
        int(inputs.run.settings["model"]["num_train_timesteps"]),
        inputs.gradients.profile_draws,
    )


def event_weights(inputs: MethodInputs) -> EventWeights:
    """η per replayed event and per window of the stores' checkpoints (made once per inputs)."""
    return inputs.cached("event_weights", lambda: EventWeights.of(inputs.run, inputs.gradients))


def query_side(
    inputs: MethodInputs,
    ckpt: Checkpoint,
    weighting: Weighting,
    given: QueryGradients | None = None,
) -> np.ndarray:
    """G_k(q) [Q, k]: per-timestep query gradients [Q, M, k], weighted, averaged over t (stage
    2's query set, or the `given` ones)."""
    if given is not None:
        g = given.at(ckpt)
        g = Gradients(np.asarray(g.features, np.float64), np.asarray(g.norms, np.float64), g.t)
    else:
        norms = np.asarray(ckpt.arrays[norm_array(QUERY)], np.float64)
        g = Gradients(
            np.asarray(ckpt.arrays[features_array(QUERY)], np.float64),
            norms,
            np.broadcast_to(inputs.gradients.timesteps("query"), norms.shape),
        )
    w = weighting(g, ckpt, "query gradients")
    return (g.features * w[..., None]).mean(axis=1)


def train_side(
    inputs: MethodInputs, ckpt: Checkpoint, weighting: Weighting, side: str
) -> np.ndarray:
    """T_k(j) [N, k]: the weighted sum of sample j's replayed gradients (or its grid average)."""
    if side == "grid":
        if features_array(TRAIN_GRID) not in ckpt.arrays:
            raise ValueError(
                f"checkpoint {ckpt.entry.step} has no training-grid gradients; use checkpoints "
                "'last' or rerun stage 2 with gradients.train_grid_at: all"
            )
        feats = np.asarray(ckpt.arrays[features_array(TRAIN_GRID)], np.float64)
        norms = np.asarray(ckpt.arrays[norm_array(TRAIN_GRID)], np.float64)
        t = np.broadcast_to(inputs.gradients.timesteps("train"), norms.shape)
        w = weighting(Gradients(feats, norms, t), ckpt, "training-grid gradients")
        return (feats * w[..., None]).mean(axis=1) * event_weights(inputs).window_mass(
            ckpt.entry.step
        )
    events = np.asarray(ckpt.arrays[REPLAY_EVENTS])
    log = inputs.log
    if len(events) and int(events.max()) >= len(log.step):
        raise ValueError("the gradient stores index past the end of the replay log (dvc repro)")
    feats = np.asarray(ckpt.arrays[features_array(REPLAY)][:, 0], np.float64)
    norms = np.asarray(ckpt.arrays[norm_array(REPLAY)][:, 0], np.float64)
    t = log.t[events].astype(np.int64)
    w = weighting(Gradients(feats, norms, t), ckpt, "replayed gradients")
    w = w * event_weights(inputs).events(ckpt.entry.step, log.step[events])
    columns = inputs.gradients.columns(log.sample_id[events])
    total = np.zeros((len(inputs.gradients.train_ids), feats.shape[1]))
    np.add.at(total, columns, feats * w[:, None])
    return total


def cosine_rows(x: np.ndarray) -> np.ndarray:
    """Rows of x [n, k] scaled to unit length (zero rows stay zero)."""
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return np.divide(x, norms, out=np.zeros_like(x), where=norms > 0)


def trajectory_scores(
    inputs: MethodInputs,
    weighting: Weighting,
    side: str = "replay",
    checkpoints: str = "all",
    aggregate: str = "sum",
    queries: QueryGradients | None = None,
) -> Scores:
    """Σ_k ⟨G_k(q), T_k(j)⟩ (aggregate "unit": Σ_k H_k cos) over trajectory checkpoints:
    Scores [Q, N] of stage 2's queries, or of the supplied `queries`."""
    check_options(side, checkpoints, aggregate)
    values, provenance, settings = None, [], {}
    for entry in inputs.gradients.trajectory(checkpoints):
        ckpt = _checkpoint(inputs, entry)
        settings = ckpt.settings
        q = query_side(inputs, ckpt, weighting, queries)
        t = train_side(inputs, ckpt, weighting, side)
        if aggregate == "unit":
            q, t = cosine_rows(q), event_weights(inputs).window_mass(entry.step) * cosine_rows(t)
        term = q @ t.T
        values = term if values is None else values + term
        provenance.append(_checkpoint_provenance(inputs, entry, settings))
    about = {
        "checkpoints": provenance,
        "replay_window": inputs.gradients.replay_window,
        **inputs.gradients.provenance(settings),
    }
    if queries is None:
        return inputs.gradients.scores(values, about)
    about = {**about, "queries": queries.settings}
    about.pop("queries_hash")
    return Scores(values, inputs.gradients.train_ids, queries.kind, queries.key, about)


def training_image_scores(
    inputs: MethodInputs, weighting: Weighting, n_queries: int = 64, aggregate: str = "sum"
) -> Scores:
    """Image tracing: training images as queries, scored at the last checkpoint.

    Query side: the training image's grid gradients at θ_K (weighted per timestep, averaged);
    training side: the replayed draws of θ_K's window. A method that traces images ranks each
    query's own training sample first. Returns [n_queries, N]; query_key holds the training
    ids, query_kind "train", settings["self_columns"] each query's own column.
    """
    if n_queries < 1:
        raise ValueError(f"n_queries must be ≥ 1, got {n_queries}")
    check_options("replay", "last", aggregate)
    train_ids = inputs.gradients.train_ids
    ckpt = _checkpoint(inputs, inputs.gradients.trajectory("last")[0])
    if features_array(TRAIN_GRID) not in ckpt.arrays:
        raise ValueError(f"checkpoint {ckpt.entry.step} has no training-grid gradients")
    rows = np.linspace(0, len(train_ids) - 1, min(n_queries, len(train_ids))).astype(np.int64)
    feats = np.asarray(ckpt.arrays[features_array(TRAIN_GRID)][rows], np.float64)
    norms = np.asarray(ckpt.arrays[norm_array(TRAIN_GRID)][rows], np.float64)
    t = np.broadcast_to(inputs.gradients.timesteps("train"), norms.shape)
    w = weighting(Gradients(feats, norms, t), ckpt, "training-grid gradients")
    q = (feats * w[..., None]).mean(axis=1)
    tr = train_side(inputs, ckpt, weighting, "replay")
    if aggregate == "unit":
        q, tr = cosine_rows(q), cosine_rows(tr)
    return Scores(
        values=q @ tr.T,
        train_ids=train_ids,
        query_kind=np.full(len(rows), "train"),
        query_key=train_ids[rows],
        settings={
            "evaluation": "image tracing (training images as queries)",
            "checkpoints": [_checkpoint_provenance(inputs, ckpt.entry, ckpt.settings)],
            "replay_window": inputs.gradients.replay_window,
            "query_timesteps": inputs.gradients.timesteps("train").tolist(),
            "projection": ckpt.settings["projection"],
            "loss": ckpt.settings["loss"],
            "self_columns": rows.tolist(),
        },
    )


def _checkpoint_provenance(inputs: MethodInputs, entry: StoreEntry, settings: dict) -> dict:
    """What a score records of one checkpoint: its step, weights and η weighting."""
    return {
        "step": entry.step,
        "lr": entry.lr,
        "weights_hash": settings["weights_hash"],
        **event_weights(inputs).describe(entry.step),
    }


def trajectory_method(
    name: str,
    label: str,
    weighting: Weighting,
    summary: str,
    args: type = TrajectoryArgs,
) -> Method:
    """A method of the family: the template with `weighting`, its arguments `args` (a
    TrajectoryArgs; a subclass may change the defaults, as grad-cosine's aggregate "unit")."""

    def compute(inputs: MethodInputs, a: TrajectoryArgs) -> Scores:
        return trajectory_scores(inputs, weighting, a.train_side, a.checkpoints, a.aggregate)

    def trace(inputs: MethodInputs, a: TrajectoryArgs, n_queries: int) -> Scores:
        return training_image_scores(inputs, weighting, n_queries, a.aggregate)

    def score_gradients(inputs: MethodInputs, a: TrajectoryArgs, queries: QueryGradients):
        scores = trajectory_scores(
            inputs, weighting, a.train_side, a.checkpoints, a.aggregate, queries
        )
        scores.settings = {**scores.settings, "method": name, "args": dataclasses.asdict(a)}
        return scores

    return Method(
        name,
        label,
        args,
        compute,
        summary=summary,
        trace=trace,
        score_gradients=score_gradients,
    )
