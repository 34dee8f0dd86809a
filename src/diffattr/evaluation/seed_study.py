"""Uncertainty over seeds: stages 3-4's headline numbers and verdicts across runs that differ
only in stage 2's projection seed (`gradients.projection_seed`) or stage 1's training seed
(`train.seed`).

Reads each run's `<run>/reports/03_timestep_bias/metrics.json` and
`<run>/reports/04_retrac/metrics.json` and writes, into the output folder, `metrics.json` (every
number per run, mean / min / max over the projection seeds, each claim's verdict per run),
`table.csv`, `README.md` (the tables in markdown) and `figures/seed_spread.png`. `make seeds`
makes the runs, then calls

    python -m diffattr.evaluation.seed_study data/seeds reports/seeds

Runs that were not made are listed as `not_run`; the default run (`proj0`) is required.
"""

from __future__ import annotations

import csv
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from diffattr.evaluation.uncertainty import verdict

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

# quantity: (label, format); pct = share, num = 3 decimals, int = count, text = as is
LABELS = {
    "base_rate": ("base rate of the large-norm band (t < band edge)", "pct"),
    "profile_max_over_min": ("norm profile: max / min over t of the mean gradient norm", "num"),
    "band_share": ("top-k slots in the large-norm band [95% CI] (vs base rate)", "pct"),
    "spearman": ("Spearman(norm mass, top-k count)", "num"),
    "unique_ratio": ("unique ratio at k = top_k [95% CI]", "num"),
    "generally_influential": ("generally influential at (top_k, τ)", "int"),
    "retrac_more_unique": ("k of the sweep where ReTrac's unique ratio > TracIn's", "int"),
    "retrac_fewer_gi": ("(k, τ) of the sweep where ReTrac has fewer gen. influential", "int"),
    "rank1_share": ("image tracing: rank-1 share", "pct"),
    "median_rank": ("image tracing: median self-rank", "int"),
}
Key = tuple[str, str, str]  # (quantity, method, queries)


def read_metrics(run_dir: Path) -> tuple[dict, dict]:
    """(stage 3, stage 4) metrics of one run folder (`<run>/reports/0N_*/metrics.json`)."""
    out = []
    for stage, folder in REPORTS.items():
        path = run_dir / "reports" / folder / METRICS
        if not path.is_file():
            raise FileNotFoundError(f"no {path}: run stage {stage} of this run first (make seeds)")
        out.append(json.loads(path.read_text()))
    return out[0], out[1]


def sweep_counts(sweep: list[dict]) -> dict[str, tuple[int, int]]:
    """ReTrac against TracIn over stage 4's sweep rows {method, k, tau, unique_ratio,
    generally_influential}: {"retrac_more_unique": (k with a higher unique ratio, number of k),
    "retrac_fewer_gi": ((k, τ) with fewer generally influential samples, number of (k, τ))}.
    Ties count as not better, as in stage 4's findings."""
    by = {(r["method"], r["k"], r["tau"]): r for r in sweep}
    points = sorted({(k, tau) for m, k, tau in by if m == "tracin"})
    first_tau = {k: min(t for kk, t in points if kk == k) for k, _ in points}

    def value(method: str, k: int, tau: float, quantity: str) -> float:
        return by[(method, k, tau)][quantity]

    more = sum(
        value("retrac", k, t, "unique_ratio") > value("tracin", k, t, "unique_ratio")
        for k, t in first_tau.items()
    )
    fewer = sum(
        value("retrac", k, t, "generally_influential")
        < value("tracin", k, t, "generally_influential")
        for k, t in points
    )
    return {
        "retrac_more_unique": (int(more), len(first_tau)),
        "retrac_fewer_gi": (int(fewer), len(points)),
    }


def headline(m3: dict, m4: dict) -> dict[Key, dict]:
    """{(quantity, method, queries): {value[, low, high, of]}} of one run's stage 3-4 metrics."""
    rows: dict[Key, dict] = {("base_rate", "", ""): {"value": m3["base_band_share"]}}
    rows[("profile_max_over_min", "", "")] = {"value": m3["profile_max_over_min"]}
    for r in m3["per_query_kind"]:
        key = (r["method"], r["queries"])
        rows[("band_share", *key)] = {
            "value": r["topk_slots_in_band"],
            "low": r["band_ci_low"],
            "high": r["band_ci_high"],
            "vs_base": r["vs_base_rate"],
        }
    for method, rho in m3["spearman_norm_vs_topk"].items():
        rows[("spearman", method, "all")] = {"value": rho}
    for r in m4["specificity"]:
        key = (r["method"], r["queries"])
        rows[("unique_ratio", *key)] = {
            "value": r["unique_ratio"],
            "low": r["unique_ci_low"],
            "high": r["unique_ci_high"],
        }
        rows[("generally_influential", *key)] = {"value": r["generally_influential"]}
    if {"tracin", "retrac"} <= {r["method"] for r in m4["sweep"]}:
        for quantity, (hits, total) in sweep_counts(m4["sweep"]).items():
            rows[(quantity, "retrac vs tracin", "all")] = {"value": hits, "of": total}
    for r in m4["image_tracing"]:
        key = (r["method"], "training images")
        rows[("rank1_share", *key)] = {"value": r["rank1_share"]}
        rows[("median_rank", *key)] = {"value": r["median_rank"]}
    return rows


def verdicts(m3: dict, m4: dict) -> dict[str, tuple[str, str]]:
    """{claim: (holds | mixed | fails, what the run found)} of one run: stages 3-4's findings,
    then one claim per method, "<method>'s band share matches the base rate" (holds when its
    interval contains the base rate at every (k, query kind) point of stage 3's band sweep, or
    for every query kind at top_k when the run has no sweep)."""
    found = {f["claim"]: (f["verdict"], f["ours"]) for f in [*m3["findings"], *m4["findings"]]}
    per_method: dict[str, list[str]] = {}
    for r in m3.get("band_sweep", m3["per_query_kind"]):
        per_method.setdefault(r["method"], []).append(r["vs_base_rate"])
    for method, found_vs in per_method.items():
        hits = sum(v == "within" for v in found_vs)
        counts = ", ".join(f"{v} {found_vs.count(v)}" for v in dict.fromkeys(found_vs))
        found[f"{method}'s top-k band share matches the base rate"] = (
            verdict(hits, len(found_vs)),
            f"{counts} of {len(found_vs)} (k, query kind) points",
        )
    return found


def across_runs(found: dict[str, str]) -> str:
    """One verdict from the runs' verdicts: the common one when all agree, else "mixed"."""
    values = set(found.values())
    return values.pop() if len(values) == 1 else "mixed"


def summarise(results: dict[str, tuple[dict, dict]], runs: tuple[SeedRun, ...] = RUNS) -> dict:
    """The study's summary from {run name: (stage 3 metrics, stage 4 metrics)}.

    Uses the runs of `runs` present in results (the first, the default run, is required).
    numbers: one row per quantity × method × query kind with each run's value (and 95% CI or
    count of points) and, for numbers, mean / min / max over the runs that share the first
    run's training seed (the projection seeds). claims: each claim's verdict per run and
    `across_seeds` (the common verdict, or mixed when runs disagree), and what each run found.
    """
    present = tuple(r for r in runs if r.name in results)
    if not present or present[0] != runs[0]:
        raise ValueError(f"no results for the default run {runs[0].name!r}")
    names = [r.name for r in present]
    projection = [r.name for r in present if r.train_seed == runs[0].train_seed]
    per_run = {name: headline(*results[name]) for name in names}
    numbers = []
    for key in per_run[names[0]]:
        lacking = [n for n in names if key not in per_run[n]]
        if lacking:
            raise ValueError(f"runs {lacking} lack {key}: their stages ran other methods")
        entry = {"quantity": key[0], "method": key[1], "queries": key[2]}
        entry["runs"] = {n: per_run[n][key] for n in names}
        values = [per_run[n][key]["value"] for n in projection]
        if all(isinstance(v, int | float) for v in values):
            seeds = np.array(values, np.float64)
            entry["projection"] = {
                "mean": float(seeds.mean()),
                "min": float(seeds.min()),
                "max": float(seeds.max()),
            }
        numbers.append(entry)
    per_run_verdicts = {name: verdicts(*results[name]) for name in names}
    claims = []
    for claim in per_run_verdicts[names[0]]:
        runs_ = {name: per_run_verdicts[name].get(claim, ("absent", "")) for name in names}
        found = {name: v for name, (v, _) in runs_.items()}
        claims.append(
            {
                "claim": claim,
                "verdicts": found,
                "across_seeds": across_runs(found),
                "agree": len(set(found.values())) == 1,
                "ours": {name: ours for name, (_, ours) in runs_.items()},
            }
        )
    return {
        "runs": [asdict(r) for r in present],
        "not_run": [r.name for r in runs if r.name not in results],
        "projection_runs": projection,
        "numbers": numbers,
        "claims": claims,
    }


def _fmt(value: object, kind: str) -> str:
    """One number as text: pct 45.2%, num 0.133, int 7, mean 6.5; other values as str."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return str(value)
    if np.isnan(value):
        return "–"
    formats = {"pct": f"{value:.1%}", "num": f"{value:.3f}", "int": f"{value:.0f}"}
    return formats.get(kind, f"{value:.1f}" if kind == "mean" else str(value))


def _cell(run: dict, kind: str) -> str:
    """A run's value with its interval ([low, high]) or its number of points (of n)."""
    text = _fmt(run["value"], kind)
    if "low" in run:
        text += f" [{_fmt(run['low'], kind)}, {_fmt(run['high'], kind)}]"
    if "of" in run:
        text += f" of {run['of']}"
    if "vs_base" in run:
        text += f" ({run['vs_base']})"
    return text


def _title(run: dict) -> str:
    return f"train {run['train_seed']} / proj {run['projection_seed']}"


def to_markdown(summary: dict) -> str:
    """The summary as markdown: a table of numbers, then a table of claims."""
    runs = {r["name"]: r for r in summary["runs"]}
    projection = summary["projection_runs"]
    others = [n for n in runs if n not in projection]
    order = [*projection, *others]
    not_run = ", ".join(summary["not_run"]) or "none"
    lines = [
        "# Stages 3-4 across seeds",
        "",
        "Made by `make seeds` (`python -m diffattr.evaluation.seed_study data/seeds "
        "reports/seeds`): the default run (training seed 0) with projection seeds "
        + ", ".join(str(runs[n]["projection_seed"]) for n in projection)
        + " (stage 2 rerun with `gradients.projection_seed`, stages 3-4 on each)"
        + (
            ", and training seed "
            + ", ".join(str(runs[n]["train_seed"]) for n in others)
            + " (`train.seed`, stages 1-4)"
            if others
            else ""
        )
        + f". Runs not made: {not_run}. Shares and unique ratios are per query kind at "
        "k = `attribution.top_k`, with 95% bootstrap intervals over queries; the spread column "
        "is mean [min–max] over the projection seeds. Every number is in "
        "[`metrics.json`](metrics.json) and [`table.csv`](table.csv).",
        "",
        "![band share and unique ratio per run](figures/seed_spread.png)",
        "",
        "| "
        + " | ".join(
            ["quantity", "method", "queries"]
            + [_title(runs[n]) for n in projection]
            + ["spread over projection seeds"]
            + [_title(runs[n]) for n in others]
        )
        + " |",
        "|---|---|---|" + "---|" * (len(order) + 1),
    ]
    for row in summary["numbers"]:
        label, kind = LABELS[row["quantity"]]
        cells = [_cell(row["runs"][n], kind) for n in projection]
        spread = "–"
        if "projection" in row:
            p = row["projection"]
            mean_kind = "mean" if kind == "int" else kind
            spread = f"{_fmt(p['mean'], mean_kind)} [{_fmt(p['min'], kind)}–{_fmt(p['max'], kind)}]"
        tail = [_cell(row["runs"][n], kind) for n in others]
        lines.append(
            f"| {label} | {row['method']} | {row['queries']} | "
            + " | ".join([*cells, spread, *tail])
            + " |"
        )
    lines += [
        "",
        "## Verdicts",
        "",
        "Each run's verdict is its stage's (stage 3: the interval against the base rate for "
        "each query kind; stage 4: the whole sweep of k and τ). Across seeds: the common "
        "verdict, or mixed when runs disagree.",
        "",
        "| claim | " + " | ".join(_title(runs[n]) for n in order) + " | across seeds |",
        "|---|" + "---|" * (len(order) + 1),
    ]
    for c in summary["claims"]:
        found = " | ".join(c["verdicts"][n] for n in order)
        lines.append(f"| {c['claim']} | {found} | **{c['across_seeds']}** |")
    lines += ["", "## What each run found", ""]
    lines += ["| claim | " + " | ".join(_title(runs[n]) for n in order) + " |"]
    lines += ["|---|" + "---|" * len(order)]
    for c in summary["claims"]:
        lines.append(f"| {c['claim']} | " + " | ".join(c["ours"][n] for n in order) + " |")
    return "\n".join(lines) + "\n"


def write_csv(summary: dict, path: Path) -> None:
    """One line per number: quantity, method, queries, each run's value (then low / high)."""
    names = [r["name"] for r in summary["runs"]]
    header = ["quantity", "method", "queries"]
    header += [f"{n}_{part}" for n in names for part in ("value", "low", "high")]
    header += ["projection_mean", "projection_min", "projection_max"]
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        for row in summary["numbers"]:
            line = [row["quantity"], row["method"], row["queries"]]
            for n in names:
                run = row["runs"][n]
                line += [run["value"], run.get("low", ""), run.get("high", "")]
            p = row.get("projection", {})
            line += [p.get("mean", ""), p.get("min", ""), p.get("max", "")]
            writer.writerow(line)


def plot(summary: dict, path: Path) -> None:
    """Band share (generated queries, 95% CI) and unique ratio per method, one marker per run,
    the base rate of each run as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["name"] for r in summary["runs"]]
    panels = [
        ("band_share", "top-k slots in the large-norm band"),
        ("unique_ratio", "unique ratio"),
    ]
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.6))
    for ax, (quantity, title) in zip(axes, panels, strict=True):
        rows = [
            r
            for r in summary["numbers"]
            if r["quantity"] == quantity and r["queries"] == "generated"
        ]
        x = np.arange(len(rows))
        for i, name in enumerate(names):
            runs = [r["runs"][name] for r in rows]
            y = np.array([r["value"] for r in runs])
            err = np.array([[r["value"] - r["low"], r["high"] - r["value"]] for r in runs]).T
            offset = (i - (len(names) - 1) / 2) * 0.15
            ax.errorbar(x + offset, y, yerr=err, fmt="o", ms=4, capsize=2, label=name)
        if quantity == "band_share":
            base = next(r for r in summary["numbers"] if r["quantity"] == "base_rate")
            for v in {b["value"] for b in base["runs"].values()}:
                ax.axhline(v, color="grey", ls="--", lw=1)
        ax.set_xticks(x, [r["method"] for r in rows], rotation=20)
        ax.set_title(f"{title} (generated queries)", fontsize=10)
    axes[0].legend(fontsize=8, title="run", title_fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def collect(study_dir: str | Path, out_dir: str | Path, runs: tuple[SeedRun, ...] = RUNS) -> dict:
    """Read the runs under study_dir that have both stages' metrics; write out_dir/metrics.json,
    table.csv, README.md and figures/seed_spread.png. Returns the summary."""
    study_dir, out_dir = Path(study_dir), Path(out_dir)

    def finished(run: SeedRun) -> bool:
        folders = [study_dir / run.name / "reports" / f / METRICS for f in REPORTS.values()]
        return all(p.is_file() for p in folders)

    done = {r.name: read_metrics(study_dir / r.name) for r in runs if r == runs[0] or finished(r)}
    summary = summarise(done, runs)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "metrics.json").write_text(json.dumps(summary, indent=1) + "\n")
    write_csv(summary, out_dir / "table.csv")
    (out_dir / "README.md").write_text(to_markdown(summary))
    plot(summary, out_dir / "figures" / "seed_spread.png")
    return summary


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print("usage: python -m diffattr.evaluation.seed_study STUDY_DIR OUT_DIR", file=sys.stderr)
        return 2
    summary = collect(*args)
    flips = [c["claim"] for c in summary["claims"] if not c["agree"]]
    print(
        f"wrote {args[1]}: runs {[r['name'] for r in summary['runs']]}, not run "
        f"{summary['not_run']}; verdicts that differ between runs: {flips or 'none'}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
