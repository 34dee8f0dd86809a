"""Stage 3: the timestep-induced norm bias ([ReTrac] §4) and every method's scores.

Scores every method of `attribution.methods` (saved for stage 4), then measures for each how
its top-k proponents relate to the replayed draws' timesteps: the share of top-k slots whose
replayed draw fell in the large-norm band, against the base rate (all training samples), with
a bootstrap interval over queries, at k = `attribution.top_k` and over the sweep of k
(`attribution.sweep_k`). "Bias removed" = the base rate lies within that interval at every k
and for every query kind.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from diffattr.artifacts.learning_rates import EventWeights
from diffattr.artifacts.scores import Scores
from diffattr.evaluation import metrics
from diffattr.evaluation.timestep_bias import ReplayNorms, band_interval, replay_norms
from diffattr.evaluation.uncertainty import bootstrap_ci, compare_to, verdict
from diffattr.methods import MethodInputs
from diffattr.params import Params
from diffattr.stages.inputs import method_inputs, score_all
from diffattr.stages.train import write_metrics, write_plot_data

QUERY_KINDS = ("generated", "heldout")


def values_by_kind(scores: dict[str, Scores]) -> Iterator[tuple[str, str, np.ndarray]]:
    """(method, query kind, scores [n_query_of_kind, n_train]) for each method and each query
    kind present in its scores, kinds in QUERY_KINDS order."""
    for name, s in scores.items():
        for kind in QUERY_KINDS:
            if kind in set(s.query_kind):
                yield name, kind, s.select(kind).values


@dataclass
class TimestepBiasResult:
    inputs: MethodInputs
    norms: ReplayNorms
    band_spans: list[list[int]]  # the large-norm band at the last checkpoint, [start, stop) in t
    scores: dict[str, Scores]  # method name → [Q, N]
    counts: dict[str, np.ndarray]  # method name → [N] top-k counts over all queries
    table: pd.DataFrame  # one row per method × query kind
    findings: pd.DataFrame  # claim, paper, ours, verdict
    base_rate: float
    metrics: dict


def topk_band_shares(scores: np.ndarray, k: int, band_share: np.ndarray) -> np.ndarray:
    """Per query [Q]: the mean band share of its top-k proponents' replayed draws."""
    top = metrics.top_k(scores, k)
    return np.nan_to_num(band_share)[top].mean(axis=1)


def bias_rows(
    scores: dict[str, Scores], norms: ReplayNorms, k: int, tau: float, base_rate: float
) -> list[dict]:
    """One row per method × query kind: band share of top-k slots with its interval, verdict,
    Spearman(norm mass, top-k count), generally influential count, unique ratio."""
    rows = []
    for name, kind, v in values_by_kind(scores):
        share, low, high = bootstrap_ci(topk_band_shares(v, k, norms.band_share))
        gi = metrics.generally_influential(v, k, tau)
        rows.append(
            {
                "method": name,
                "queries": kind,
                "n_queries": len(v),
                "topk_slots_in_band": share,
                "band_ci_low": low,
                "band_ci_high": high,
                "vs_base_rate": compare_to(base_rate, low, high),
                "spearman_norm_vs_topk": metrics.spearman(
                    norms.norm_mass, metrics.top_k_counts(v, k)
                ),
                "generally_influential": int(gi.sum()),
                "unique_ratio": metrics.unique_ratio(v, k),
            }
        )
    return rows


def band_sweep_rows(
    scores: dict[str, Scores], norms: ReplayNorms, ks: list[int], base_rate: float
) -> list[dict]:
    """One row per method × query kind × k of the sweep: band share of the top-k slots with
    its 95% bootstrap interval over queries and how it stands against the base rate."""
    rows = []
    for name, kind, v in values_by_kind(scores):
        for k in ks:
            share, low, high = bootstrap_ci(topk_band_shares(v, k, norms.band_share))
            rows.append(
                {
                    "method": name,
                    "queries": kind,
                    "k": k,
                    "topk_slots_in_band": share,
                    "band_ci_low": low,
                    "band_ci_high": high,
                    "vs_base_rate": compare_to(base_rate, low, high),
                }
            )
    return rows


def findings(
    table: pd.DataFrame, base_rate: float, sweep: pd.DataFrame | None = None
) -> pd.DataFrame:
    """[ReTrac]'s claims next to this run. Shares are shown at k = top_k (table); verdicts
    count every (k, query kind) point of the sweep when given, else the table's rows."""
    points = table if sweep is None else sweep

    def verdicts(method: str) -> list[str]:
        return points[points.method == method].vs_base_rate.tolist()

    def counted(method: str, wanted: str) -> str:
        found = verdicts(method)
        if sweep is None or not found:
            return ""
        n = sum(v == wanted for v in found)
        return f"; {wanted} at {n} of {len(found)} (k, query kind) points of the sweep"

    def shares(method: str) -> str:
        sub = table[table.method == method]
        return "; ".join(
            f"{r.queries} {r.topk_slots_in_band:.1%} [{r.band_ci_low:.1%}, {r.band_ci_high:.1%}]"
            for r in sub.itertuples()
        )

    def verdict_of(method: str, wanted: str) -> str:
        found = verdicts(method)
        return verdict(sum(v == wanted for v in found), len(found)) if found else "not run"

    rows = []
    methods = set(table.method)
    if "tracin" in methods:
        rows.append(
            {
                "claim": "TracIn's top proponents over-represent large-norm draws",
                "paper": "yes (dominating norm effect, [ReTrac] §4)",
                "ours": f"base rate {base_rate:.1%}; {shares('tracin')}"
                + counted("tracin", "above"),
                "verdict": verdict_of("tracin", "above"),
            }
        )
    if "retrac" in methods:
        found = verdicts("retrac")
        reversed_ = found and all(v == "below" for v in found)
        rows.append(
            {
                "claim": "ReTrac removes the timestep bias",
                "paper": "yes (renormalisation, [ReTrac] §4)",
                "ours": f"{shares('retrac')}"
                + (" — reversed: below the base rate" * reversed_)
                + counted("retrac", "within"),
                "verdict": verdict_of("retrac", "within"),
            }
        )
    if "calibrated" in methods:
        rows.append(
            {
                "claim": "Timestep-calibrated TracIn removes the bias without reversing it",
                "paper": "(ours, not in the paper)",
                "ours": shares("calibrated") + counted("calibrated", "within"),
                "verdict": verdict_of("calibrated", "within"),
            }
        )
    unbiased = [m for m in dict.fromkeys(table.method) if verdict_of(m, "within") == "holds"]
    rows.append(
        {
            "claim": "Methods whose top-k band share matches the base rate for every query kind",
            # (and every k of the sweep, when there is one)
            "paper": "(the success criterion for a debiasing)",
            "ours": ", ".join(unbiased) or "none",
            "verdict": "holds" if unbiased else "fails",
        }
    )
    return pd.DataFrame(rows)


def run(
    P: Params,
    train_dir: str | Path = "data/train",
    gradient_dir: str | Path = "data/gradients",
    scores_dir: str | Path = "data/scores",
    report_dir: str | Path = "reports/03_timestep_bias",
) -> TimestepBiasResult:
    """Score every method, save the scores, measure the bias; writes `report_dir/metrics.json`."""
    A = P.attribution
    specs = P.method_specs()
    inputs = method_inputs(P, train_dir, gradient_dir)
    P.check_dataset_size(len(inputs.train))
    norms = replay_norms(
        inputs.gradients,
        inputs.log,
        EventWeights.of(inputs.run, inputs.gradients),
        A.band_quantile,
    )
    last = max(norms.bands)
    spans = band_interval(
        inputs.gradients.timesteps("profile"),
        norms.bands[last],
        int(inputs.run.settings["model"]["num_train_timesteps"]),
    )
    scores = score_all(specs, inputs, scores_dir)
    counts = {name: metrics.top_k_counts(s.values, A.top_k) for name, s in scores.items()}
    base_rate = float(np.nanmean(norms.band_share))
    table = pd.DataFrame(bias_rows(scores, norms, A.top_k, A.tau, base_rate))
    ks = sorted({k for k in [*A.sweep_k, A.top_k] if k <= len(inputs.train)})
    sweep = pd.DataFrame(band_sweep_rows(scores, norms, ks, base_rate))
    found = findings(table, base_rate, sweep)
    mean = norms.mean_profiles[last]
    out = {
        "top_k": A.top_k,
        "tau": A.tau,
        "band_quantile": A.band_quantile,
        "methods": [s.name for s in specs],
        "band_last_checkpoint": spans,
        "profile_max_over_min": float(mean.max() / mean.min()),
        "base_band_share": base_rate,
        "spearman_norm_vs_topk": {
            name: metrics.spearman(norms.norm_mass, c) for name, c in counts.items()
        },
        "per_query_kind": table.to_dict(orient="records"),
        "band_sweep": sweep.to_dict(orient="records"),
        "findings": found.to_dict(orient="records"),
    }
    write_metrics(report_dir, out)
    write_plot_data(report_dir, "band_shares", band_share_data(out))
    return TimestepBiasResult(inputs, norms, spans, scores, counts, table, found, base_rate, out)


def band_share_data(metrics: dict) -> pd.DataFrame:
    """The band-share figure's data (`dvc plots`), from the stage's metrics: one row per method
    and query kind with the share of its top-k slots in the large-norm band, its bootstrap
    interval and the base rate; `label` ("tracin (generated)") names the bar."""
    rows = pd.DataFrame(metrics["per_query_kind"])
    return pd.DataFrame(
        {
            "label": rows["method"] + " (" + rows["queries"] + ")",
            "method": rows["method"],
            "queries": rows["queries"],
            "band_share": rows["topk_slots_in_band"],
            "ci_low": rows["band_ci_low"],
            "ci_high": rows["band_ci_high"],
            "base_rate": metrics["base_band_share"],
        }
    )
