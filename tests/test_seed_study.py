"""The seed study's summary: values per run, spread over projection seeds, stable verdicts."""

from __future__ import annotations

import json

import pytest

from diffattr.evaluation.seed_study import RUNS, collect, summarise


def _metrics(band: float, gi: int, verdict: str) -> tuple[dict, dict]:
    """Stage 3 and 4 metrics of one run with one method, in the stages' format."""
    m3 = {
        "base_band_share": 0.25,
        "per_query_kind": [
            {
                "method": "tracin",
                "queries": "generated",
                "topk_slots_in_band": band,
                "vs_base_rate": "above",
            }
        ],
        "spearman_norm_vs_topk": {"tracin": 0.3},
        "findings": [{"claim": "TracIn is biased", "verdict": "holds"}],
    }
    m4 = {
        "specificity": [
            {
                "method": "tracin",
                "queries": "generated",
                "unique_ratio": 0.2,
                "generally_influential": gi,
            }
        ],
        "image_tracing": [{"method": "tracin", "rank1_share": 0.0, "median_rank": 300.0}],
        "findings": [{"claim": "ReTrac is more specific", "verdict": verdict}],
    }
    return m3, m4


RESULTS = {
    "proj0": _metrics(0.40, 7, "holds"),
    "proj1": _metrics(0.50, 5, "holds"),
    "proj2": _metrics(0.45, 6, "holds"),
    "train1": _metrics(0.30, 2, "mixed"),
}


def _row(summary: dict, quantity: str) -> dict:
    return next(r for r in summary["numbers"] if r["quantity"] == quantity)


def test_numbers_spread_over_the_projection_seeds_only():
    summary = summarise(RESULTS)
    band = _row(summary, "band_share")
    assert band["values"] == {"proj0": 0.40, "proj1": 0.50, "proj2": 0.45, "train1": 0.30}
    assert band["projection_mean"] == pytest.approx(0.45)
    assert (band["projection_min"], band["projection_max"]) == (0.40, 0.50)
    gi = _row(summary, "generally_influential")
    assert (gi["projection_min"], gi["projection_max"]) == (5, 7)
    assert "projection_mean" not in _row(summary, "band_vs_base")  # text: no mean


def test_a_verdict_is_stable_only_if_every_run_agrees():
    claims = {c["claim"]: c for c in summarise(RESULTS)["claims"]}
    assert claims["TracIn is biased"]["stable"]
    flipped = claims["ReTrac is more specific"]
    assert not flipped["stable"] and flipped["verdicts"]["train1"] == "mixed"


def test_runs_with_other_methods_or_missing_runs_are_refused():
    with pytest.raises(ValueError, match="no results for runs \\['train1'\\]"):
        summarise({k: v for k, v in RESULTS.items() if k != "train1"})
    m3, m4 = _metrics(0.4, 7, "holds")
    m4["specificity"][0]["method"] = "retrac"
    with pytest.raises(ValueError, match="lacks"):
        summarise({**RESULTS, "proj2": (m3, m4)})


def test_collect_writes_the_summary_and_a_markdown_table(tmp_path):
    for name, (m3, m4) in RESULTS.items():
        for folder, metrics in (("03_timestep_bias", m3), ("04_retrac", m4)):
            path = tmp_path / "study" / name / "reports" / folder
            path.mkdir(parents=True)
            (path / "metrics.json").write_text(json.dumps(metrics))
    collect(tmp_path / "study", tmp_path / "out")
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert [r["name"] for r in summary["runs"]] == [r.name for r in RUNS]
    table = (tmp_path / "out" / "README.md").read_text()
    assert "| share of top-k slots in the band | tracin | generated | 40.0% | 50.0% | 45.0% |" in (
        table
    )
    assert "45.0% [40.0%–50.0%] | 30.0% |" in table
    assert "| ReTrac is more specific | holds | holds | holds | mixed | **no** |" in table
    with pytest.raises(FileNotFoundError, match="run stage"):
        collect(tmp_path / "nowhere", tmp_path / "out")
