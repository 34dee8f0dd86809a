"""The memorisation control: image tracing with a ground truth, for every method and protocol.

Stage 1 under the profile `digits_memorise` trains on a few dozen images until the generated
samples are near-copies; a copy's true source is its pixel nearest neighbour
(`evaluation.tracing`). This stage extracts stage 2's gradients once per extraction variant (a
folder each under out_dir, resumed like stage 2), scores every method of `attribution.methods`
under every protocol, and reports the share of copies whose source ranks first.

Protocols (columns of the table; the TracIn family varies with them, the other methods only
with the projection):

- `epoch` — stage 2's default: the query at the grid timesteps (`gradients.query_timesteps` ×
  `query_draws`); the training side one replayed draw per sample per checkpoint, at a single,
  usually high-noise, t.
- `interval` — every replayed draw since the previous checkpoint (`replay_window: interval`).
- `grid` — the training side at the training timestep grid (`train_side: grid`,
  `gradients.train_timesteps`, 2 by default) at every checkpoint, with its own noise.
- `grid = query grid` — the same with the training grid set to the query's timesteps
  (`train_timesteps = query_timesteps`): query and training side averaged alike, noise apart.
- `positive control` — the epoch window, with each copy's query gradient taken at its source's
  exact replayed (t, ε) at every checkpoint: if a method cannot trace a copy here, no protocol
  on the query side will help it.
- `projection none` — the epoch window with exact inner products instead of the sketch; the one
  protocol that also applies to the methods at the final EMA weights (TRAK, D-TRAK, grad-dot,
  EK-FAC on the stored features): their stage 2 store without the projection.

Normalising the aggregated vector (`aggregate: unit`) is a method argument, so it appears as
methods (`grad_cosine` is TracIn with it; the profile adds ReTrac and calibrated TracIn with it).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from diffattr.artifacts.gradient_index import REPLAY_EVENTS
from diffattr.artifacts.scores import Scores
from diffattr.artifacts.training_run import TrainingRun
from diffattr.devices import resolve_device
from diffattr.diffusion.draws import train_noise
from diffattr.evaluation.tracing import (
    COPY_RATIO,
    Copies,
    find_copies,
    source_ranks,
    tracing_summary,
)
from diffattr.gradients.engines import PerSampleGradients
from diffattr.gradients.projection import projector_from_settings
from diffattr.methods import MethodInputs, MethodSpec
from diffattr.methods.trajectory import Gradients, QueryGradients, TrajectoryArgs
from diffattr.params import Params
from diffattr.stages.gradients import run_gradient_stage
from diffattr.stages.inputs import method_inputs
from diffattr.stages.train import write_metrics
from diffattr.storage.checkpoints import weights_hash

# Stage 2 runs of the study: overrides of the profile's `gradients` section ("query": the
# value of query_timesteps).
EXTRACTIONS: dict[str, dict] = {
    "epoch": {"replay_window": "epoch", "train_grid_at": "all"},
    "interval": {"replay_window": "interval", "ema": False},
    "query_grid": {"train_grid_at": "all", "train_timesteps": "query", "ema": False},
    "exact": {"replay_window": "epoch", "projection": "none"},
}


@dataclass(frozen=True)
class Protocol:
    """One column: which extraction, which training side, whether the queries are taken at
    the source's replayed draws (the positive control), and whether methods without a training
    trajectory are scored under it too (every_method)."""

    name: str
    extraction: str
    train_side: str = "replay"
    replayed_queries: bool = False
    every_method: bool = False


PROTOCOLS = (
    Protocol("epoch", "epoch", every_method=True),
    Protocol("interval", "interval"),
    Protocol("grid", "epoch", train_side="grid"),
    Protocol("grid = query grid", "query_grid", train_side="grid"),
    Protocol("positive control", "epoch", replayed_queries=True),
    Protocol("projection none", "exact", every_method=True),
)
# The default column (stage 2's defaults), where every method has a value.
ANY_PROTOCOL = "epoch"


@dataclass
class MemorisationResult:
    """What the control found (metrics.json holds the same numbers)."""

    copies: Copies
    query_images: torch.Tensor  # [Q, C, H, W] the generated samples
    train_images: torch.Tensor  # [N, C, H, W]
    table: pd.DataFrame  # one row per method × protocol: rank-1 share, interval, median rank
    damping: pd.DataFrame  # methods with a damping λ: rank-1 share at each λ of lds.dampings
    ranks: dict[tuple[str, str], np.ndarray]  # (method, protocol) → [C] source ranks
    findings: pd.DataFrame  # per method: the protocols that trace copies and those that cannot
    metrics: dict


def variant(P: Params, extraction: str) -> Params:
    """The parameters of one extraction: the profile's, with EXTRACTIONS[extraction] applied."""
    changes = {
        key: P.gradients.query_timesteps if value == "query" else value
        for key, value in EXTRACTIONS[extraction].items()
    }
    return dataclasses.replace(P, gradients=dataclasses.replace(P.gradients, **changes))


def replayed_draw_queries(
    inputs: MethodInputs,
    images: torch.Tensor,
    kind: np.ndarray,
    key: np.ndarray,
    source_ids: np.ndarray,
    device: torch.device | str = "cpu",
    batch_size: int = 64,
) -> QueryGradients:
    """The positive control's query gradients: image i at every trajectory checkpoint k taken at
    the exact (t, ε) of source_ids[i]'s replayed draw in k's window, at θ_k, projected with that
    store's projector (exact norms recorded before projecting, as stage 2 does).

    images: [C, ...] the queries; kind, key: [C] who they are (as in Scores); source_ids: [C]
    dataset ids of their sources. The stores must hold exactly one replayed draw of each source
    per checkpoint (the "epoch" window). With the source image itself as the query the features
    equal the store's replayed ones.
    """
    log, run, index = inputs.log, inputs.run, inputs.gradients
    source_ids = np.asarray(source_ids, np.int64)
    if len(images) != len(source_ids):
        raise ValueError(f"{len(images)} query images but {len(source_ids)} sources")
    shape = tuple(images.shape[1:])
    per_step, projection = {}, None
    for entry in index.trajectory():
        settings, arrays = index.load(entry)
        events = _one_draw_each(np.asarray(arrays[REPLAY_EVENTS]), log.sample_id, source_ids)
        model, payload = run.load_model(entry.step)
        if weights_hash(payload["model"]) != settings["weights_hash"]:
            raise ValueError(f"checkpoint {entry.step} differs from the weights its store used")
        grads = PerSampleGradients(
            model, run.alphas_cumprod(), settings["loss"], "loss", None, device, settings["engine"]
        )
        projector = projector_from_settings(settings["projection"])
        t = torch.from_numpy(log.t[events].astype(np.int64))
        seed = int(log.settings["seed"])
        eps = torch.cat(
            [
                train_noise(
                    seed, int(log.step[e]), [int(log.epoch[e])], [int(log.sample_id[e])], shape
                )
                for e in events
            ]
        )
        feats, norms = [], []
        for start in range(0, len(events), batch_size):
            rows = slice(start, start + batch_size)
            g = grads(
                images[rows].to(grads.device),
                t[rows].to(grads.device),
                eps[rows, None].to(grads.device),
            )
            norms.append(torch.linalg.vector_norm(g, dim=1).cpu())
            feats.append(projector(g).cpu())
        per_step[entry.step] = Gradients(
            torch.cat(feats).numpy()[:, None, :],
            torch.cat(norms).numpy()[:, None],
            t.numpy()[:, None],
        )
        projection = settings["projection"]
    return QueryGradients(
        kind=np.asarray(kind),
        key=np.asarray(key, np.int64),
        per_step=per_step,
        projection=projection,
        settings={
            "queries": "positive control: each query at its source's exact replayed (t, ε)",
            "source_ids": source_ids.tolist(),
        },
    )


def _one_draw_each(events: np.ndarray, sample_id: np.ndarray, sources: np.ndarray) -> np.ndarray:
    """The replay-log row of each source's single draw among `events` (ValueError unless every
    source has exactly one: the positive control needs the "epoch" window)."""
    drawn = sample_id[events]
    out = np.empty(len(sources), np.int64)
    for i, source in enumerate(sources):
        mine = events[drawn == source]
        if len(mine) != 1:
            raise ValueError(
                f"training sample {source} has {len(mine)} replayed draws in a checkpoint's "
                "window; the positive control needs exactly one (gradients.replay_window: epoch)"
            )
        out[i] = mine[0]
    return out


def method_label(spec: MethodSpec) -> str:
    """How tables name a method: its label, plus the aggregate when it is not the method's own
    (the TracIn family; the protocol columns vary the rest), or else every argument that differs
    from the method's defaults (damping aside: the sweep covers it)."""
    label = spec.method.label
    own = spec.method.make_args()
    if isinstance(spec.args, TrajectoryArgs):
        if spec.args.aggregate != own.aggregate:
            label += ", unit aggregate" if spec.args.aggregate == "unit" else ", summed"
        return label
    if not dataclasses.is_dataclass(spec.args):
        return label
    given, defaults = dataclasses.asdict(spec.args), dataclasses.asdict(own)
    changed = [f"{k} {v}" for k, v in given.items() if k != "damping" and v != defaults[k]]
    return f"{label} ({', '.join(changed)})" if changed else label


def run(
    P: Params,
    train_dir: str | Path = "data/memorise/train",
    out_dir: str | Path = "data/memorise/gradients",
    report_dir: str | Path = "reports/digits_memorise/07_memorisation",
    copy_ratio: float = COPY_RATIO,
    progress: bool = True,
) -> MemorisationResult:
    """Find the copies, extract every variant's gradients (resuming), score every method under
    every protocol and summarise; writes metrics.json and the scores under out_dir/scores."""
    started = time.perf_counter()
    device = resolve_device(P.device)
    out_dir = Path(out_dir)
    training = TrainingRun.open(train_dir)
    train = P.data.load("train")
    training.check_dataset(train)
    images, seeds, _ = training.generated_queries()
    copies = find_copies(images.numpy(), train.images.numpy(), copy_ratio)
    rows = copies.rows
    inputs, seconds = {}, {}
    for name in EXTRACTIONS:
        began = time.perf_counter()
        run_gradient_stage(variant(P, name), train_dir, out_dir / name, device, progress)
        inputs[name] = method_inputs(variant(P, name), train_dir, out_dir / name)
        seconds[f"gradients_{name}"] = round(time.perf_counter() - began, 1)
    control = None
    if len(rows):
        began = time.perf_counter()
        control = replayed_draw_queries(
            inputs["epoch"],
            images[torch.from_numpy(rows)],
            np.full(len(rows), "generated"),
            np.asarray(seeds)[rows],
            train.ids[copies.source[rows]],
            device,
            P.gradients.batch_size,
        )
        seconds["positive_control"] = round(time.perf_counter() - began, 1)
    table, ranks, damping = [], {}, []
    for spec in P.method_specs():
        began = time.perf_counter()
        trajectory = spec.method.score_gradients is not None
        for protocol in PROTOCOLS if trajectory else [p for p in PROTOCOLS if p.every_method]:
            if protocol.replayed_queries and control is None:
                continue
            scores = _score(spec, protocol, inputs, control)
            scores.save(out_dir / "scores" / protocol.name.replace(" ", "_") / spec.name)
            values = scores.values if protocol.replayed_queries else _copy_rows(scores, rows)
            r = source_ranks(values, copies.source[rows])
            ranks[(spec.name, protocol.name)] = r
            table.append(
                {
                    "method": spec.name,
                    "label": method_label(spec),
                    "protocol": protocol.name,
                    "trajectory": trajectory,
                    **tracing_summary(r),
                }
            )
        if spec.method.swept is not None and len(rows):
            for value, s in zip(
                P.lds.dampings,
                spec.method.sweep_values(inputs["epoch"], spec.args, P.lds.dampings),
                strict=True,
            ):
                r = source_ranks(_copy_rows(s, rows), copies.source[rows])
                damping.append({"method": spec.name, "damping": value, "rank1": (r == 1).mean()})
        seconds[f"scoring_{spec.name}"] = round(time.perf_counter() - began, 1)
    table, damping = pd.DataFrame(table), pd.DataFrame(damping)
    found = findings(table)
    metrics = {
        "copy_criterion": f"‖q − x_(1)‖₂ < {copy_ratio:.4g} · ‖q − x_(2)‖₂ (pixel ℓ2)",
        "copy_ratio": copy_ratio,
        "n_train": int(len(train)),
        "n_generated": int(len(images)),
        "n_copies": int(len(rows)),
        "copy_share": copies.share,
        "distinct_sources": int(len(np.unique(copies.source[rows]))),
        "d1_over_d2_median": float(np.median(copies.d1 / copies.d2)),
        "protocols": [dataclasses.asdict(p) for p in PROTOCOLS],
        "extractions": EXTRACTIONS,
        "table": table.to_dict(orient="records"),
        "damping_sweep": damping.to_dict(orient="records"),
        "findings": found.to_dict(orient="records"),
        "seconds": {**seconds, "total": round(time.perf_counter() - started, 1)},
        "run_id": training.identity,
        "device": str(device),
    }
    write_metrics(report_dir, metrics)
    return MemorisationResult(copies, images, train.images, table, damping, ranks, found, metrics)


def _score(
    spec: MethodSpec,
    protocol: Protocol,
    inputs: dict[str, MethodInputs],
    control: QueryGradients | None,
) -> Scores:
    given = inputs[protocol.extraction]
    if spec.method.score_gradients is None:
        return spec(given)
    args = dataclasses.replace(spec.args, train_side=protocol.train_side)
    if protocol.replayed_queries:
        return spec.method.score_gradients(given, args, control)
    return spec.method(given, args)


def _copy_rows(scores: Scores, rows: np.ndarray) -> np.ndarray:
    """The copies' rows of scores over stage 2's queries (generated samples first)."""
    return scores.select("generated").values[rows]


def findings(table: pd.DataFrame) -> pd.DataFrame:
    """Per method: the protocols under which it traces copies (the 95% interval of its rank-1
    share above one half), those under which it cannot (below), and the rest (unclear)."""
    rows = []
    for method, sub in table.groupby("method", sort=False):
        traces = sub[sub.rank1_low > 0.5].protocol.tolist()
        cannot = sub[sub.rank1_high < 0.5].protocol.tolist()
        rows.append(
            {
                "method": method,
                "label": sub.label.iloc[0],
                "default (epoch)": _share(sub[sub.protocol == ANY_PROTOCOL]),
                "traces most copies under": ", ".join(traces) or "none",
                "cannot under": ", ".join(cannot) or "none",
                "unclear under": ", ".join(sorted(set(sub.protocol) - set(traces) - set(cannot)))
                or "none",
            }
        )
    return pd.DataFrame(rows)


def _share(rows: pd.DataFrame) -> str:
    if rows.empty or np.isnan(rows.rank1.iloc[0]):
        return "n/a"
    r = rows.iloc[0]
    return f"{r.rank1:.0%} [{r.rank1_low:.0%}, {r.rank1_high:.0%}]"


def pivot(table: pd.DataFrame) -> pd.DataFrame:
    """The paper's table: methods × protocols, each cell 'rank-1 share [95% interval]'; methods
    without a trajectory have one value (in the epoch column)."""
    cells = table.assign(
        cell=[
            "n/a" if np.isnan(r.rank1) else f"{r.rank1:.0%} [{r.rank1_low:.0%}, {r.rank1_high:.0%}]"
            for r in table.itertuples()
        ]
    )
    out = cells.pivot(index="label", columns="protocol", values="cell")
    out = out.reindex(index=list(dict.fromkeys(table.label)))
    return out[[p.name for p in PROTOCOLS if p.name in out.columns]].fillna("·")
