"""The seed study: values per run, spread over projection seeds, sweep counts, verdicts."""

from __future__ import annotations

import csv
import json

import pytest

from diffattr.evaluation.seed_study import (
    RUNS,
    across_runs,
    collect,
    summarise,
    sweep_counts,
)


def _sweep(retrac_gi: int) -> list[dict]:
    """TracIn and ReTrac at k = 1, 5 and τ = 0.25, 0.5 (the unique ratio depends on k only)."""
    rows = []
    for k, (u_t, u_r) in {1: (0.5, 0.5), 5: (0.2, 0.4)}.items():
        for tau, gi_t in ((0.25, 4), (0.5, 2)):
            rows.append(dict(method="tracin", k=k, tau=tau, unique_ratio=u_t,
                             generally_influential=gi_t))  # fmt: skip
            rows.append(dict(method="retrac", k=k, tau=tau, unique_ratio=u_r,
                             generally_influential=retrac_gi))  # fmt: skip
    return rows


def _metrics(band: float, gi: int, verdict: str, retrac_gi: int = 3) -> tuple[dict, dict]:
    """Stage 3 and 4 metrics of one run with one method (tracin), in the stages' format."""
    m3 = {
        "base_band_share": 0.25,
        "profile_max_over_min": 10.0 + band,
        "per_query_kind": [
            {
                "method": "tracin",
                "queries": "generated",
                "topk_slots_in_band": band,
                "band_ci_low": band - 0.02,
                "band_ci_high": band + 0.02,
                "vs_base_rate": "above",
            }
        ],
        "spearman_norm_vs_topk": {"tracin": 0.3},
        "findings": [{"claim": "TracIn is biased", "verdict": "holds", "ours": f"{band:.0%}"}],
    }
    m4 = {
        "specificity": [
            {
                "method": "tracin",
                "queries": "generated",
                "unique_ratio": 0.2,
                "unique_ci_low": 0.1,
                "unique_ci_high": 0.3,
                "generally_influential": gi,
            }
        ],
        "sweep": _sweep(retrac_gi),
        "image_tracing": [{"method": "tracin", "rank1_share": 0.0, "median_rank": 300.0}],
        "findings": [{"claim": "ReTrac is more specific", "verdict": verdict, "ours": "k=1"}],
    }
    return m3, m4


RESULTS = {
    "proj0": _metrics(0.40, 7, "holds"),
    "proj1": _metrics(0.50, 5, "holds"),
    "proj2": _metrics(0.45, 6, "holds"),
    "train1": _metrics(0.30, 2, "mixed", retrac_gi=5),
}


def _row(summary: dict, quantity: str) -> dict:
    return next(r for r in summary["numbers"] if r["quantity"] == quantity)


def test_sweep_counts_compare_retrac_with_tracin_at_every_k_and_tau():
    # unique ratio: k=1 tie (not better), k=5 higher -> 1 of 2 k
    # generally influential, ReTrac 3 against TracIn 4, 2, 4, 2 -> fewer at 2 of 4 points
    assert sweep_counts(_sweep(3)) == {"retrac_more_unique": (1, 2), "retrac_fewer_gi": (2, 4)}
    assert sweep_counts(_sweep(0))["retrac_fewer_gi"] == (4, 4)
    assert sweep_counts(_sweep(4))["retrac_fewer_gi"] == (0, 4)


def test_numbers_spread_over_the_projection_seeds_only():
    summary = summarise(RESULTS)
    band = _row(summary, "band_share")
    assert {n: r["value"] for n, r in band["runs"].items()} == {
        "proj0": 0.40,
        "proj1": 0.50,
        "proj2": 0.45,
        "train1": 0.30,
    }
    assert band["runs"]["proj1"]["low"] == pytest.approx(0.48)
    assert band["projection"]["mean"] == pytest.approx(0.45)  # train1's 0.30 left out
    assert (band["projection"]["min"], band["projection"]["max"]) == (0.40, 0.50)
    assert _row(summary, "profile_max_over_min")["projection"]["max"] == pytest.approx(10.5)
    gi = _row(summary, "generally_influential")
    assert gi["projection"] == {"mean": 6.0, "min": 5.0, "max": 7.0}
    fewer = _row(summary, "retrac_fewer_gi")
    assert fewer["runs"]["proj0"] == {"value": 2, "of": 4}
    assert fewer["runs"]["train1"] == {"value": 0, "of": 4}  # ReTrac 5 > TracIn 4, 2
    assert summary["projection_runs"] == ["proj0", "proj1", "proj2"]


def test_a_claim_holds_across_seeds_only_if_every_run_says_so():
    assert across_runs({"a": "holds", "b": "holds"}) == "holds"
    assert across_runs({"a": "holds", "b": "fails"}) == "mixed"
    assert across_runs({"a": "fails", "b": "fails"}) == "fails"
    claims = {c["claim"]: c for c in summarise(RESULTS)["claims"]}
    assert claims["TracIn is biased"]["across_seeds"] == "holds"
    assert claims["TracIn is biased"]["agree"]
    flipped = claims["ReTrac is more specific"]
    assert flipped["across_seeds"] == "mixed" and not flipped["agree"]
    assert flipped["verdicts"]["train1"] == "mixed"
    per_method = claims["tracin's top-k band share matches the base rate"]
    assert per_method["verdicts"]["proj0"] == "fails"
    assert per_method["ours"]["proj0"] == "above 1 of 1 (k, query kind) points"
    m3, m4 = _metrics(0.25, 2, "holds")
    m3["per_query_kind"].append({**m3["per_query_kind"][0], "queries": "heldout"})
    m3["per_query_kind"][0]["vs_base_rate"] = "within"  # within for one query kind of two
    derived = {c["claim"]: c for c in summarise({**RESULTS, "train1": (m3, m4)})["claims"]}
    per_method = derived["tracin's top-k band share matches the base rate"]
    assert per_method["verdicts"]["train1"] == "mixed" and per_method["across_seeds"] == "mixed"
    assert per_method["ours"]["train1"] == "within 1, above 1 of 2 (k, query kind) points"
    m3["band_sweep"] = [{"method": "tracin", "k": k, "vs_base_rate": "within"} for k in (1, 5)]
    swept = {c["claim"]: c for c in summarise({**RESULTS, "train1": (m3, m4)})["claims"]}
    per_method = swept["tracin's top-k band share matches the base rate"]
    assert per_method["verdicts"]["train1"] == "holds"  # the sweep, when there is one, counts
    assert claims["TracIn is biased"]["ours"] == {  # same verdict, each run's own finding
        "proj0": "40%",
        "proj1": "50%",
        "proj2": "45%",
        "train1": "30%",
    }


def test_missing_runs_are_listed_and_the_default_run_is_required():
    partial = summarise({k: v for k, v in RESULTS.items() if k in ("proj0", "proj2")})
    assert partial["not_run"] == ["proj1", "train1"]
    assert [r["name"] for r in partial["runs"]] == ["proj0", "proj2"]
    assert _row(partial, "band_share")["projection"]["mean"] == pytest.approx(0.425)
    with pytest.raises(ValueError, match="default run 'proj0'"):
        summarise({"proj1": RESULTS["proj1"]})


def test_runs_that_ran_other_methods_are_refused():
    m3, m4 = _metrics(0.4, 7, "holds")
    m4["specificity"][0]["method"] = "retrac"
    with pytest.raises(ValueError, match="lack"):
        summarise({**RESULTS, "proj2": (m3, m4)})


def test_collect_writes_metrics_a_csv_a_markdown_table_and_a_figure(tmp_path):
    for name, (m3, m4) in RESULTS.items():
        if name == "proj2":  # a run whose stage 4 did not finish is left out
            m4 = None
        for folder, metrics in (("03_timestep_bias", m3), ("04_retrac", m4)):
            path = tmp_path / "study" / name / "reports" / folder
            path.mkdir(parents=True)
            if metrics is not None:
                (path / "metrics.json").write_text(json.dumps(metrics))
    out = tmp_path / "out"
    collect(tmp_path / "study", out)
    summary = json.loads((out / "metrics.json").read_text())
    assert [r["name"] for r in summary["runs"]] == ["proj0", "proj1", "train1"]
    assert summary["not_run"] == ["proj2"] and len(RUNS) == 4
    table = (out / "README.md").read_text()
    assert (
        "| tracin | generated | 40.0% [38.0%, 42.0%] (above) | 50.0% [48.0%, 52.0%] (above) "
        "| 45.0% [40.0%–50.0%] | 30.0% [28.0%, 32.0%] (above) |" in table
    )
    assert "| retrac vs tracin | all | 2 of 4 | 2 of 4 | 2.0 [2–2] | 0 of 4 |" in table
    assert "| ReTrac is more specific | holds | holds | mixed | **mixed** |" in table
    assert "| TracIn is biased | 40% | 50% | 30% |" in table.split("## What each run found")[1]
    with (out / "table.csv").open() as f:
        rows = list(csv.DictReader(f))
    band = next(r for r in rows if r["quantity"] == "band_share")
    assert float(band["proj1_value"]) == 0.5 and float(band["projection_mean"]) == 0.45
    assert (out / "figures" / "seed_spread.png").stat().st_size > 1000
    with pytest.raises(FileNotFoundError, match="run stage"):
        collect(tmp_path / "nowhere", out)
