"""What stages 3-5 read from the stages before them, opened and cross-checked in one place."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from diffattr.artifacts.gradient_index import GradientIndex
from diffattr.artifacts.queries import QuerySet
from diffattr.artifacts.scores import Scores
from diffattr.artifacts.training_run import TrainingRun
from diffattr.devices import resolve_device
from diffattr.evaluation.measurement import MeasurementDraws, measurement_draws
from diffattr.methods import MethodInputs, MethodSpec
from diffattr.params import Params


def method_inputs(P: Params, train_dir: str | Path, gradient_dir: str | Path) -> MethodInputs:
    """Stage 1's run, stage 2's index, the training set and the queries, checked to agree."""
    run = TrainingRun.open(train_dir)
    index = GradientIndex.open(gradient_dir)
    train = P.data.load("train")
    run.check_dataset(train)
    queries = run.query_set(P.data.load("heldout"), P.gradients.heldout_queries)
    device = str(resolve_device(P.device))
    return MethodInputs(index, run, train, queries, device, query_measurement(P, run, queries))


def query_measurement(P: Params, run: TrainingRun, queries: QuerySet) -> MeasurementDraws:
    """The K (t, ε) draws of m(θ, q) for each query (`retrain.measure_*`): what stage 5
    measures every model on, and what K-FAC's query side differentiates."""
    r = P.retrain
    return measurement_draws(
        queries.kind,
        queries.key,
        tuple(queries.images.shape[1:]),
        r.measure_draws,
        r.measure_seed,
        run.settings["model"]["num_train_timesteps"],
        r.t_sampling,
    )


def score_all(
    specs: list[MethodSpec], inputs: MethodInputs, scores_dir: str | Path | None = None
) -> dict[str, Scores]:
    """Each method's scores [Q, N], saved as `scores_dir/<name>.npz` + `.json` when given."""
    out = {}
    for spec in specs:
        out[spec.name] = spec(inputs)
        if scores_dir is not None:
            out[spec.name].save(Path(scores_dir) / spec.name)
    return out


def load_scores(
    specs: list[MethodSpec], inputs: MethodInputs, scores_dir: str | Path
) -> dict[str, Scores]:
    """Saved scores of each method, refused if made for other queries, data or arguments."""
    out = {}
    queries_hash = inputs.queries.content_hash()
    for spec in specs:
        scores = Scores.load(Path(scores_dir) / spec.name)
        settings = scores.settings
        problems = []
        if settings.get("method") != spec.method.name:
            problems.append(f"method {settings.get('method')} ≠ {spec.method.name}")
        if settings.get("args") != dataclasses.asdict(spec.args):
            problems.append(f"arguments {settings.get('args')} ≠ {dataclasses.asdict(spec.args)}")
        if settings.get("run_id") != inputs.gradients.run_id:
            problems.append("another training run")
        if "queries_hash" in settings and settings["queries_hash"] != queries_hash:
            problems.append("other queries")
        if not np.array_equal(scores.train_ids, inputs.gradients.train_ids):
            problems.append("other training samples")
        if problems:
            raise ValueError(
                f"saved scores {Path(scores_dir) / spec.name} do not match this run "
                f"({'; '.join(problems)}); recompute them: dvc repro timestep_bias"
            )
        out[spec.name] = scores
    return out
