"""The interface every attribution method implements.

A method is one file: an arguments dataclass (its knobs, with defaults, saved into its scores'
settings) and one entry point `compute(inputs, args) -> Scores [n_query, n_train]` that reads
what it needs from `MethodInputs` (stage outputs, through the artifacts layer). Sign convention
for every method: a score > 0 means the training sample is a proponent of the query — removing
it is predicted to increase the query's loss or measurement.

A method with a hyper-parameter that evaluations sweep (TRAK's and K-FAC's damping λ) names it
in `swept` and may give a `sweep` that computes every value at once (one eigendecomposition).
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Any

from diffattr.artifacts.gradient_index import GradientIndex
from diffattr.artifacts.queries import QuerySet
from diffattr.artifacts.scores import Scores
from diffattr.artifacts.training_run import TrainingRun
from diffattr.data.datasets import ImageDataset
from diffattr.diffusion.replay import ReplayLog

if TYPE_CHECKING:  # evaluation sits above methods; only the type is needed here
    from diffattr.evaluation.measurement import MeasurementDraws


@dataclass
class MethodInputs:
    """Everything a method may read, each piece checked to belong to the same run.

    gradients: stage 2's index (its queries are the scores' rows, its training ids the columns);
    run: stage 1's training run; train: the training set (images in the columns' order);
    queries: the query images in the rows' order. `device` for methods that compute gradients.
    measurement: the K (t, ε) draws of m(θ, q) per query (stage 5's measurement), for methods
    that take the measurement's own gradient (K-FAC); None where not defined.
    """

    gradients: GradientIndex
    run: TrainingRun
    train: ImageDataset
    queries: QuerySet
    device: str = "cpu"
    measurement: MeasurementDraws | None = None
    _cache: dict = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self.gradients.check_run(self.run)
        if (
            len(self.train) != len(self.gradients.train_ids)
            or not (self.train.ids == self.gradients.train_ids).all()
        ):
            raise ValueError(
                "the training set's ids differ from the gradient index's columns; load the data "
                "with the parameters stage 2 ran with (dvc repro)"
            )
        if not (
            (self.queries.kind == self.gradients.query_kind).all()
            and (self.queries.key == self.gradients.query_key).all()
        ):
            raise ValueError("the query set differs from the gradient index's rows (dvc repro)")

    @cached_property
    def log(self) -> ReplayLog:
        """The training run's replay log (loaded once)."""
        return self.run.replay_log()

    def cached(self, key: str, make: Callable[[], Any]) -> Any:
        """A value shared by the methods of one stage run (e.g. loaded features), made once."""
        if key not in self._cache:
            self._cache[key] = make()
        return self._cache[key]


@dataclass(frozen=True)
class Method:
    """One attribution method: a name, its arguments dataclass and its entry point."""

    name: str
    label: str  # how figures and tables name it
    args: type  # a dataclass; every field has a default
    compute: Callable[[MethodInputs, Any], Scores]
    summary: str = ""
    swept: str | None = None  # the argument evaluations sweep (damping), if any
    sweep: Callable[[MethodInputs, Any, Sequence[float]], list[Scores]] | None = None
    # Image tracing (training images as queries, [n, N]) for methods that can score them.
    trace: Callable[[MethodInputs, Any, int], Scores] | None = None
    # Scores of query gradients the caller supplies per trajectory checkpoint (the TracIn
    # family: `methods.trajectory.QueryGradients`), e.g. queries at a training sample's exact
    # replayed draws (the memorisation control's positive control).
    score_gradients: Callable[[MethodInputs, Any, Any], Scores] | None = None

    def make_args(self, overrides: dict | None = None) -> Any:
        """The arguments dataclass with `overrides` applied (unknown keys refused)."""
        names = [f.name for f in dataclasses.fields(self.args)]
        for key in overrides or {}:
            if key not in names:
                hint = difflib.get_close_matches(key, names, n=1)
                mean = f" (did you mean {hint[0]!r}?)" if hint else ""
                raise ValueError(
                    f"unknown argument {key!r} of method {self.name!r}{mean}; valid: "
                    f"{', '.join(names) or 'none'}"
                )
        return self.args(**(overrides or {}))

    def __call__(self, inputs: MethodInputs, args: Any = None) -> Scores:
        """Scores [n_query, n_train] with the method and its arguments in the settings."""
        args = self.make_args() if args is None else args
        scores = self.compute(inputs, args)
        return _stamped(self, args, scores, inputs)

    def sweep_values(
        self, inputs: MethodInputs, args: Any, values: Sequence[float]
    ) -> list[Scores]:
        """Scores for each value of the swept argument (one call where the method allows)."""
        if self.swept is None:
            raise ValueError(f"method {self.name!r} has no hyper-parameter to sweep")
        if self.sweep is not None:
            out = self.sweep(inputs, args, values)
        else:
            out = [
                self.compute(inputs, dataclasses.replace(args, **{self.swept: v})) for v in values
            ]
        return [
            _stamped(self, dataclasses.replace(args, **{self.swept: v}), s, inputs)
            for v, s in zip(values, out, strict=True)
        ]


def _stamped(method: Method, args: Any, scores: Scores, inputs: MethodInputs) -> Scores:
    expected = (len(inputs.gradients.query_key), len(inputs.gradients.train_ids))
    if scores.values.shape != expected:
        raise ValueError(
            f"method {method.name!r} returned scores of shape {scores.values.shape}, expected "
            f"[n_query, n_train] = {list(expected)}"
        )
    scores.settings = {
        **scores.settings,
        "method": method.name,
        "args": dataclasses.asdict(args),
        "run_id": inputs.gradients.run_id,
        "sign": "score > 0: proponent (removing it is predicted to raise the query's loss)",
    }
    return scores
