"""Uncertainty over seeds: stages 3-4's headline numbers and verdicts across runs that differ
only in stage 2's projection seed or stage 1's training seed.

Reads each run's `reports/03_timestep_bias/metrics.json` and `reports/04_retrac/metrics.json`
and writes `summary.json` and `README.md` (a markdown table: each number per run, its mean and
min–max over the projection seeds, the second training seed beside it; each claim's verdict per
run and whether it is stable). `make seeds` makes the runs and then calls

    python -m diffattr.evaluation.seed_study data/seeds reports/seeds
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

REPORTS = {"timestep_bias": "03_timestep_bias", "retrac": "04_retrac"}
METRICS = "metrics.json"


@dataclass(frozen=True)
class SeedRun:
    """One run of the study: its folder name under the study folder and its two seeds."""

    name: str
    train_seed: int
    projection_seed: int


RUNS = (
    SeedRun("proj0", 0, 0),
    SeedRun("proj1", 0, 1),
    SeedRun("proj2", 0, 2),
    SeedRun("train1", 1, 0),
)

# (key, label, format) of the quantities collected; a key is (quantity, method, queries).
LABELS = {
    "base_rate": ("base rate of the large-norm band", "pct"),
    "band_share": ("share of top-k slots in the band", "pct"),
    "band_vs_base": ("band share vs base rate (95% CI)", "text"),
    "spearman": ("Spearman(norm mass, top-k count)", "num"),
    "unique_ratio": ("unique ratio (k = top_k)", "num"),
    "generally_influential": ("generally influential (k = top_k, τ)", "int"),
    "rank1_share": ("image tracing: rank-1 share", "pct"),
    "median_rank": ("image tracing: median self-rank", "int"),
}


def read_metrics(run_dir: Path) -> tuple[dict, dict]:
    """(stage 3, stage 4) metrics of one run folder (`<run>/reports/0N_*/metrics.json`)."""
    out = []
    for stage, folder in REPORTS.items():
        path = run_dir / "reports" / folder / METRICS
        if not path.is_file():
            raise FileNotFoundError(
                f"no {path}: run stage {stage} of this run first (make seeds runs every stage)"
            )
        out.append(json.loads(path.read_text()))
    return out[0], out[1]


def headline(m3: dict, m4: dict) -> list[dict]:
    """Rows {quantity, method, queries, value} of one run's stage 3 and 4 metrics."""
    rows = [{"quantity": "base_rate", "method": "", "queries": "", "value": m3["base_band_share"]}]
    for r in m3["per_query_kind"]:
        key = {"method": r["method"], "queries": r["queries"]}
        rows.append({"quantity": "band_share", **key, "value": r["topk_slots_in_band"]})
        rows.append({"quantity": "band_vs_base", **key, "value": r["vs_base_rate"]})
    for method, rho in m3["spearman_norm_vs_topk"].items():
        rows.append({"quantity": "spearman", "method": method, "queries": "all", "value": rho})
    for r in m4["specificity"]:
        key = {"method": r["method"], "queries": r["queries"]}
        rows.append({"quantity": "unique_ratio", **key, "value": r["unique_ratio"]})
        gi = r["generally_influential"]
        rows.append({"quantity": "generally_influential", **key, "value": gi})
    for r in m4["image_tracing"]:
        key = {"method": r["method"], "queries": "training images"}
        rows.append({"quantity": "rank1_share", **key, "value": r["rank1_share"]})
        rows.append({"quantity": "median_rank", **key, "value": r["median_rank"]})
    return rows


def verdicts(m3: dict, m4: dict) -> dict[str, str]:
    """{claim: holds | mixed | fails} of one run's findings (stages 3 and 4)."""
    return {f["claim"]: f["verdict"] for f in [*m3["findings"], *m4["findings"]]}


def summarise(results: dict[str, tuple[dict, dict]], runs: tuple[SeedRun, ...] = RUNS) -> dict:
    """The study's summary from {run name: (stage 3 metrics, stage 4 metrics)}.

    numbers: one row per quantity × method × query kind with each run's value and, for numeric
    quantities, mean / min / max over the runs that share training seed 0 (the projection
    seeds). claims: each claim's verdict per run and `stable` (the same verdict in every run).
    """
    names = [r.name for r in runs]
    missing = [n for n in names if n not in results]
    if missing:
        raise ValueError(f"no results for runs {missing}; the study needs {names}")
    projection = [r.name for r in runs if r.train_seed == runs[0].train_seed]
    per_run = {name: headline(*results[name]) for name in names}
    numbers = []
    for i, row in enumerate(per_run[names[0]]):
        key = (row["quantity"], row["method"], row["queries"])
        values = {}
        for name in names:
            other = per_run[name][i] if i < len(per_run[name]) else None
            if other is None or (other["quantity"], other["method"], other["queries"]) != key:
                raise ValueError(f"run {name} lacks {key}: its stages ran other methods")
            values[name] = other["value"]
        entry = {"quantity": key[0], "method": key[1], "queries": key[2], "values": values}
        if all(isinstance(values[n], int | float) for n in projection):
            seeds = np.array([values[n] for n in projection], np.float64)
            entry.update(
                projection_mean=float(seeds.mean()),
                projection_min=float(seeds.min()),
                projection_max=float(seeds.max()),
            )
        numbers.append(entry)
    claims = []
    per_run_verdicts = {name: verdicts(*results[name]) for name in names}
    for claim in per_run_verdicts[names[0]]:
        found = {name: per_run_verdicts[name].get(claim, "absent") for name in names}
        claims.append({"claim": claim, "verdicts": found, "stable": len(set(found.values())) == 1})
    return {
        "runs": [asdict(r) for r in runs],
        "projection_runs": projection,
        "numbers": numbers,
        "claims": claims,
    }


def _fmt(value: object, kind: str) -> str:
    if not isinstance(value, int | float):
        return str(value)
    if isinstance(value, float) and np.isnan(value):
        return "–"
    formats = {"pct": f"{value:.1%}", "num": f"{value:.3f}", "int": f"{value:.0f}"}
    return formats.get(kind, str(value))


def to_markdown(summary: dict) -> str:
    """The summary as markdown: a table of numbers, then a table of claims."""
    runs = [r["name"] for r in summary["runs"]]
    projection = summary["projection_runs"]
    others = [n for n in runs if n not in projection]
    seeds = {r["name"]: r for r in summary["runs"]}

    def title(name: str) -> str:
        r = seeds[name]
        return f"train {r['train_seed']} / proj {r['projection_seed']}"

    lines = [
        "# Stages 3-4 across seeds",
        "",
        "Made by `make seeds` (`diffattr.evaluation.seed_study`): the default run with "
        f"projection seeds {', '.join(str(seeds[n]['projection_seed']) for n in projection)} "
        "(stage 2 rerun with `gradients.projection_seed`), and training seed "
        + ", ".join(str(seeds[n]["train_seed"]) for n in others)
        + " (`train.seed`, stages 1-4). Shares of the top-k slots are per query kind; "
        "the range is min–max over the projection seeds. Every number is in "
        "[`summary.json`](summary.json).",
        "",
        "| quantity | method | queries | "
        + " | ".join(title(n) for n in projection)
        + " | mean [min–max] over projection seeds | "
        + " | ".join(title(n) for n in others)
        + " |",
        "|---|---|---|" + "---|" * (len(projection) + 1 + len(others)),
    ]
    for row in summary["numbers"]:
        label, kind = LABELS[row["quantity"]]
        cells = [_fmt(row["values"][n], kind) for n in projection]
        spread = "–"
        if "projection_mean" in row:
            spread = (
                f"{_fmt(row['projection_mean'], kind if kind != 'int' else 'num')} "
                f"[{_fmt(row['projection_min'], kind)}–{_fmt(row['projection_max'], kind)}]"
            )
        tail = [_fmt(row["values"][n], kind) for n in others]
        lines.append(
            f"| {label} | {row['method']} | {row['queries']} | "
            + " | ".join([*cells, spread, *tail])
            + " |"
        )
    lines += [
        "",
        "## Verdicts",
        "",
        "| claim | " + " | ".join(title(n) for n in runs) + " | stable |",
        "|---|" + "---|" * (len(runs) + 1),
    ]
    for c in summary["claims"]:
        stable = f"yes ({c['verdicts'][runs[0]]} in every run)" if c["stable"] else "**no**"
        lines.append(
            f"| {c['claim']} | " + " | ".join(c["verdicts"][n] for n in runs) + f" | {stable} |"
        )
    return "\n".join(lines) + "\n"


def collect(study_dir: str | Path, out_dir: str | Path, runs: tuple[SeedRun, ...] = RUNS) -> dict:
    """Read every run under study_dir, write out_dir/summary.json and out_dir/README.md."""
    study_dir, out_dir = Path(study_dir), Path(out_dir)
    summary = summarise({r.name: read_metrics(study_dir / r.name) for r in runs}, runs)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    (out_dir / "README.md").write_text(to_markdown(summary))
    return summary


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print("usage: python -m diffattr.evaluation.seed_study STUDY_DIR OUT_DIR", file=sys.stderr)
        return 2
    summary = collect(*args)
    unstable = [c["claim"] for c in summary["claims"] if not c["stable"]]
    print(f"wrote {args[1]}/summary.json and README.md; verdicts that flip: {unstable or 'none'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
