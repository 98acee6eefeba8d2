"""Gap verdicts: flagged, within margin or inconclusive; the false-discovery screen against
statsmodels; one-vs-rest power; site attribution; in-sample warnings."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import pytest
from statsmodels.stats.multitest import multipletests

from radfed.bias import gaps
from radfed.bias.estimates import Proportion
from radfed.bias.gaps import GroupCell, Verdict, judge, summarise
from radfed.bias.report import build_report
from radfed.config import RunConfig
from radfed.federation.schema import CellStats
from radfed.metrics.binary import BinaryStats
from radfed.tasks.classification import TASK

CONFIG = RunConfig(eval_splits=("val",), score_bins=100, min_cell_size=1, subgroups=("sex",))


def _stats(positives: int, sensitivity: float, negatives: int, specificity: float) -> BinaryStats:
    """Cases whose decisions give the sensitivity and specificity exactly (rounded)."""
    tp, tn = round(positives * sensitivity), round(negatives * specificity)
    scores = np.concatenate(
        [
            np.linspace(0.55, 0.95, tp),
            np.linspace(0.05, 0.45, positives - tp),
            np.linspace(0.05, 0.45, tn),
            np.linspace(0.55, 0.95, negatives - tn),
        ]
    )
    labels = np.concatenate([np.ones(positives), np.zeros(negatives)])
    return BinaryStats.from_scores(scores, labels, bins=CONFIG.score_bins)


def _site(groups: dict[str, tuple[int, float, int, float]], attribute: str = "sex") -> list[Any]:
    cells = []
    for group, shape in groups.items():
        stats = _stats(*shape)
        cells.append(CellStats(attribute, group, stats, stats.tp + stats.fn))
    total = cells[0].stats
    for cell in cells[1:]:
        total = total + cell.stats
    return [CellStats("all", "all", total, total.tp + total.fn), *cells]


def _report(per_site: dict[str, list[Any]], config: RunConfig = CONFIG, split: str = "val") -> Any:
    config = dataclasses.replace(config, eval_splits=(split,))
    sites = {name: {split: cells} for name, cells in per_site.items()}
    return build_report(TASK, config, sites, server_round=1)


def _gap(
    report: Any, site: str, metric: str, kind: str = "worst vs best", split: str = "val"
) -> Any:
    return next(
        g
        for g in report["splits"][split]["gaps"]
        if (g["site"], g["metric"], g["comparison"]) == (site, metric, kind)
    )


def test_a_large_failure_is_flagged_small_sites_are_inconclusive_never_within_margin() -> None:
    # Prepare: women's sensitivity 0.6 against 0.9 for men, at two sizes
    large = {"F": (200, 0.6, 200, 0.8), "M": (200, 0.9, 200, 0.8)}
    small = {"F": (10, 0.6, 10, 0.8), "M": (10, 0.9, 10, 0.8)}
    # Execute
    big = _gap(_report({"a": _site(large)}), "a", "sensitivity")
    little = _gap(_report({"a": _site(small)}), "a", "sensitivity")
    # Assert
    assert big["verdict"] == Verdict.FLAGGED and big["flagged"] is True
    assert big["worst"]["group"] == "F" and big["difference"]["value"] == pytest.approx(-0.3)
    assert little["verdict"] == Verdict.INCONCLUSIVE and little["flagged"] is False
    assert little["cases_needed"]["F"] > 20 and little["cases_needed"]["M"] > 20


def test_cases_needed_resolve_the_observed_gap_at_that_size() -> None:
    # Prepare: an inconclusive gap of 0.3 in sensitivity
    small = {"F": (12, 0.6, 12, 0.8), "M": (12, 0.9, 12, 0.8)}
    needed = _gap(_report({"a": _site(small)}), "a", "sensitivity")["cases_needed"]
    # Execute: the same proportions at the suggested number of cases (positives and
    # negatives in the same mix)
    scale = needed["F"] / 24
    grown = {g: (round(12 * scale), s, round(12 * scale), 0.8) for g, s in (("F", 0.6), ("M", 0.9))}
    resolved = _gap(_report({"a": _site(grown)}), "a", "sensitivity")
    # Assert: now flagged; half that size stays inconclusive (the estimate is not loose)
    assert resolved["verdict"] == Verdict.FLAGGED
    half = {g: (round(6 * scale), s, round(6 * scale), 0.8) for g, s in (("F", 0.6), ("M", 0.9))}
    assert _gap(_report({"a": _site(half)}), "a", "sensitivity")["verdict"] == (
        Verdict.INCONCLUSIVE
    )


def test_no_gap_at_a_large_site_is_within_margin() -> None:
    # Prepare: equal groups of 2000 cases
    fair = {"F": (1000, 0.8, 1000, 0.8), "M": (1000, 0.8, 1000, 0.8)}
    # Execute
    report = _report({"a": _site(fair)})
    gap = _gap(report, "a", "sensitivity")
    # Assert
    assert gap["verdict"] == Verdict.WITHIN_MARGIN
    assert gap["difference"]["low"] > -0.05 and gap["difference"]["high"] < 0.05
    assert report["summary"]["counts"]["flagged"] == 0


def test_one_vs_rest_finds_the_failing_group_that_worst_vs_best_cannot() -> None:
    # Prepare: six groups of 120 positives; one fails moderately (0.6 against 0.8)
    groups = {f"g{i}": (120, 0.8, 120, 0.8) for i in range(6)}
    groups["g0"] = (120, 0.6, 120, 0.8)
    config = dataclasses.replace(CONFIG, subgroups=("manufacturer",))
    # Execute
    report = _report({"a": _site(groups, "manufacturer")}, config)
    gaps_a = [g for g in report["splits"]["val"]["gaps"] if g["site"] == "a"]
    worst_best = next(
        g for g in gaps_a if (g["metric"], g["comparison"]) == ("sensitivity", "worst vs best")
    )
    one_rest = [
        g
        for g in gaps_a
        if (g["metric"], g["comparison"]) == ("sensitivity", "one vs rest")
        and g["verdict"] == Verdict.FLAGGED
    ]
    # Assert: the worst-best pair pays for 15 possible pairs; g0 against the rest does not
    assert worst_best["worst"]["group"] == "g0" and worst_best["verdict"] != Verdict.FLAGGED
    assert [g["group"]["group"] for g in one_rest] == ["g0"]
    assert one_rest[0]["rest"] == {"group": "rest", "value": pytest.approx(0.8), "n": 1200}


def test_two_groups_are_compared_once() -> None:
    report = _report({"a": _site({"F": (50, 0.8, 50, 0.8), "M": (50, 0.8, 50, 0.8)})})
    kinds = {g["comparison"] for g in report["splits"]["val"]["gaps"]}
    assert kinds == {"worst vs best"}


def test_screen_equals_statsmodels_benjamini_hochberg() -> None:
    # Prepare: comparisons with known p-values in one family
    rng = np.random.default_rng(0)
    p_values = np.concatenate([rng.uniform(0, 0.01, 5), rng.uniform(0, 1, 25)])
    estimate = Proportion(1, 2)
    side = gaps._Side("x", 0.5, 2, estimate)
    members = [
        gaps._Comparison("a", "sex", "m", "one vs rest", side, side, 1, "f", 0.0, p_value=float(p))
        for p in p_values
    ]
    # Execute
    gaps._screen(members)
    # Assert
    expected, *_ = multipletests(p_values, alpha=0.05, method="fdr_bh")
    assert [c.discovered for c in members] == expected.tolist()
    found = int(expected.sum())
    assert {round(c.level, 12) for c in members} == {round(1 - 0.05 * found / 30, 12)}


@pytest.mark.parametrize("alpha", [0.2, 0.05, 0.01, 0.001])
def test_p_values_agree_with_the_intervals(alpha: float) -> None:
    # A p-value at or below alpha exactly when the 1 - alpha interval excludes 0
    cases = [
        (Proportion(30, 50), Proportion(45, 50)),
        (Proportion(40, 50), Proportion(44, 50)),
        (Proportion(5, 9), Proportion(8, 9)),
        (Proportion(400, 1000), Proportion(470, 1000)),
    ]
    for first, second in cases:
        p = gaps._p_value(first, second)
        assert p is not None
        fit = gaps._difference(first, second, 1 - alpha)
        excludes = fit.low is not None and fit.high is not None and (fit.low > 0 or fit.high < 0)
        if abs(p - alpha) / alpha > 0.02:  # away from the bisection's resolution
            assert (p <= alpha) == excludes


def test_unbiased_sites_raise_no_flag_over_many_seeds() -> None:
    # Prepare: three sites of 300 cases, every group the same model; 20 repetitions
    reports_with_flags = 0
    for seed in range(20):
        rng = np.random.default_rng(seed)
        per_site = {}
        for site in ("a", "b", "c"):
            sex = rng.choice(["F", "M"], 300)
            vendor = rng.choice(["GE", "Siemens", "Philips"], 300)
            labels = rng.integers(0, 2, 300)
            scores = 1 / (1 + np.exp(-(2 * labels - 1 + rng.normal(0, 1, 300))))
            cells = []
            for attribute, values in (("sex", sex), ("manufacturer", vendor)):
                for group in sorted(set(values)):
                    idx = values == group
                    stats = BinaryStats.from_scores(scores[idx], labels[idx], bins=100)
                    cells.append(CellStats(attribute, group, stats, int(labels[idx].sum())))
            total = BinaryStats.from_scores(scores, labels, bins=100)
            per_site[site] = [CellStats("all", "all", total, int(labels.sum())), *cells]
        config = dataclasses.replace(CONFIG, subgroups=("sex", "manufacturer"))
        reports_with_flags += _report(per_site, config)["summary"]["counts"]["flagged"] > 0
    # Assert: the screen keeps any flag at all near 5% per report (about 1 in 20; without
    # it, 48 comparisons at 5% each flag in most reports); bench/bias_power.py measures it
    assert reports_with_flags <= 2


def _two_sites_one_failing() -> dict[str, list[Any]]:
    fine = {"F": (150, 0.9, 150, 0.8), "M": (150, 0.9, 150, 0.8)}
    failing = {"F": (150, 0.5, 150, 0.8), "M": (150, 0.9, 150, 0.8)}
    return {"site-a": _site(fine), "site-b": _site(failing), "site-c": _site(fine)}


def test_a_pooled_gap_names_the_site_that_drives_it() -> None:
    # Execute
    report = _report(_two_sites_one_failing())
    pooled = _gap(report, "ALL", "sensitivity")
    # Assert: flagged in the pool, but heterogeneous and driven by site-b alone
    attribution = pooled["attribution"]
    assert pooled["verdict"] == Verdict.FLAGGED
    assert attribution["drivers"] == ["site-b"] and attribution["heterogeneous"] is True
    assert attribution["heterogeneity"]["p_value"] < 0.001
    by_site = {row["site"]: row["difference"]["value"] for row in attribution["sites"]}
    assert by_site == pytest.approx({"site-a": 0.0, "site-b": -0.4, "site-c": 0.0})
    assert _gap(report, "site-a", "sensitivity")["verdict"] != Verdict.FLAGGED


def test_a_consistent_gap_is_not_called_heterogeneous() -> None:
    failing = {"F": (150, 0.6, 150, 0.8), "M": (150, 0.9, 150, 0.8)}
    report = _report({"site-a": _site(failing), "site-b": _site(failing)})
    attribution = _gap(report, "ALL", "sensitivity")["attribution"]
    assert attribution["heterogeneous"] is False
    assert attribution["drivers"] == ["site-a", "site-b"]


def test_failure_on_training_cases_is_a_warning_never_a_verdict() -> None:
    # Prepare: a group fails on its own training cases
    failing = {"F": (100, 0.1, 100, 0.8), "M": (100, 1.0, 100, 0.8)}
    # Execute
    report = _report({"a": _site(failing)}, split="train")
    gap = _gap(report, "a", "sensitivity", split="train")
    # Assert
    assert gap["verdict"] == Verdict.IN_SAMPLE_WARNING and gap["flagged"] is False
    assert "attribution" not in _gap(report, "ALL", "sensitivity", split="train")
    summary = report["summary"]
    assert summary["counts"] == {"flagged": 0, "within margin": 0, "inconclusive": 0}
    assert {w["site"] for w in summary["in_sample_warnings"]} == {"a", "ALL"}
    mild = {"F": (100, 0.85, 100, 0.8), "M": (100, 0.9, 100, 0.8)}
    quiet = _gap(_report({"a": _site(mild)}, split="train"), "a", "sensitivity", split="train")
    assert quiet["verdict"] == Verdict.IN_SAMPLE


def test_a_held_out_site_gets_verdicts_on_its_training_split() -> None:
    # The held-out site never trained: its train split is held-out evidence
    failing = {"F": (200, 0.5, 200, 0.8), "M": (200, 0.9, 200, 0.8)}
    config = dataclasses.replace(CONFIG, holdout_site="b")
    report = _report({"a": _site(failing), "b": _site(failing)}, config, split="train")
    assert _gap(report, "a", "sensitivity", split="train")["verdict"] == Verdict.IN_SAMPLE_WARNING
    assert _gap(report, "b", "sensitivity", split="train")["verdict"] == Verdict.FLAGGED


def test_primary_attributes_form_a_family_of_their_own() -> None:
    config = dataclasses.replace(
        CONFIG, subgroups=("sex", "manufacturer"), primary_subgroups=("sex",)
    )
    cells = [
        *_site({"F": (40, 0.8, 40, 0.8), "M": (40, 0.8, 40, 0.8)}),
        *_site({"GE": (40, 0.8, 40, 0.8), "Siemens": (40, 0.8, 40, 0.8)}, "manufacturer")[1:],
    ]
    report = _report({"a": cells}, config)
    families = {(g["attribute"], g["family"]) for g in report["splits"]["val"]["gaps"]}
    assert ("sex", "worst vs best, primary") in families
    assert ("manufacturer", "worst vs best, secondary") in families


def test_summary_lists_the_largest_inconclusive_gaps_first() -> None:
    splits = {
        "val": {
            "gaps": [
                {"verdict": v, "difference": {"value": d}, "comparison": "worst vs best"}
                for v, d in (("inconclusive", -0.1), ("inconclusive", 0.3), ("flagged", 0.5))
            ]
        }
    }
    summary = summarise(splits)
    assert summary["counts"] == {"flagged": 1, "within margin": 0, "inconclusive": 2}
    assert [g["difference"]["value"] for g in summary["largest_inconclusive"]] == [0.3, -0.1]


def test_judge_skips_suppressed_and_all_cells() -> None:
    stats = _stats(20, 0.8, 20, 0.8)
    cells = [
        GroupCell("a", "all", "all", stats, 20),
        GroupCell("a", "sex", "F", stats, 20),
        GroupCell("a", "sex", "M", BinaryStats.empty(100, suppressed=True), 0),
    ]
    assert judge(cells, merge=lambda parts: parts[0], margin=0.05) == []


def test_a_gap_no_site_holds_both_groups_of_is_confounded_with_site() -> None:
    # Prepare: one scanner per site, as synth writes them; site-b's scanner fails
    config = dataclasses.replace(CONFIG, subgroups=("manufacturer",))
    per_site = {
        "site-a": _site({"Siemens": (200, 0.9, 200, 0.8)}, "manufacturer"),
        "site-b": _site({"GE": (200, 0.5, 200, 0.8)}, "manufacturer"),
        "site-c": _site({"Philips": (200, 0.9, 200, 0.8)}, "manufacturer"),
    }
    # Execute
    report = _report(per_site, config)
    pooled = [
        g
        for g in report["splits"]["val"]["gaps"]
        if g["site"] == "ALL" and g["metric"] == "sensitivity"
    ]
    # Assert: a comparison of sites, not of scanners: never flagged, driven by site-b
    assert pooled and not any(g["flagged"] for g in pooled)
    for gap in pooled:
        attribution = gap["attribution"]
        assert attribution["confounded_with_site"] is True
        assert attribution["heterogeneity"] is None and attribution["within_sites"] is None
    one_rest = next(
        g for g in pooled if g["comparison"] == "one vs rest" and g["group"]["group"] == "GE"
    )
    assert "confounded with site" in one_rest["reason"]
    assert one_rest["attribution"]["drivers"] == ["site-b"]
    without_b = next(r for r in one_rest["attribution"]["sites"] if r["site"] == "site-b")
    assert without_b["without_site"] is None and without_b["first"]["value"] == pytest.approx(0.5)


def test_the_gap_without_a_site_is_the_pooled_gap_of_the_other_sites() -> None:
    # Prepare: five sites of different sizes and gaps, one holding only women
    shapes = {
        "site-a": {"F": (60, 0.6, 50, 0.8), "M": (40, 0.9, 70, 0.7)},
        "site-b": {"F": (30, 0.7, 90, 0.85), "M": (80, 0.8, 20, 0.8)},
        "site-c": {"F": (120, 0.5, 40, 0.9), "M": (10, 0.9, 10, 0.6)},
        "site-d": {"F": (25, 0.8, 25, 0.75)},
        "site-e": {"F": (70, 0.65, 60, 0.7), "M": (90, 0.85, 45, 0.9)},
    }
    per_site = {name: _site(groups) for name, groups in shapes.items()}
    # Execute: the report of all five, and one report per site of the four others
    gap = _gap(_report(per_site), "ALL", "sensitivity")
    rows = {row["site"]: row for row in gap["attribution"]["sites"]}
    # Assert: each site's "without" difference is the pooled difference of the rest (the
    # intervals differ: each report's false-discovery screen sets its own level)
    assert set(rows) == set(shapes)
    for left_out in shapes:
        others = {name: cells for name, cells in per_site.items() if name != left_out}
        expected = _gap(_report(others), "ALL", "sensitivity")["difference"]
        without = rows[left_out]["without_site"]
        assert without["value"] == pytest.approx(expected["value"], abs=1e-9)
        assert without["low"] < without["value"] < without["high"]  # (at the gap's level)


def test_a_site_effect_does_not_pass_for_a_group_gap_in_the_pool() -> None:
    # Prepare: Simpson's paradox. Within each site women and men do equally well; site-b
    # does worse and sees mostly women
    per_site = {
        "site-a": _site({"F": (40, 0.9, 40, 0.8), "M": (600, 0.9, 600, 0.8)}),
        "site-b": _site({"F": (600, 0.6, 600, 0.8), "M": (40, 0.6, 40, 0.8)}),
    }
    # Execute
    gap = _gap(_report(per_site), "ALL", "sensitivity")
    # Assert: the crude pooled gap is large, but it is a gap between sites
    assert gap["difference"]["value"] == pytest.approx(-0.263, abs=0.01)
    attribution = gap["attribution"]
    assert attribution["within_sites"]["value"] == pytest.approx(0.0, abs=1e-9)
    assert attribution["confounded_with_site"] is True
    assert gap["verdict"] == Verdict.INCONCLUSIVE and gap["flagged"] is False


def test_within_margin_needs_every_pair_not_only_the_extremes() -> None:
    # Prepare: two large groups agree; a small group between them is far off in truth
    # but its estimate lands between them
    groups = {
        "A": (2000, 0.80, 2000, 0.8),
        "B": (2000, 0.81, 2000, 0.8),
        "C": (10, 0.80, 10, 0.8),
    }
    config = dataclasses.replace(CONFIG, subgroups=("manufacturer",))
    # Execute
    report = _report({"a": _site(groups, "manufacturer")}, config)
    gap = _gap(report, "a", "sensitivity")
    # Assert: the extremes A and B are inside the margin, C against them is not shown
    assert {gap["worst"]["group"], gap["best"]["group"]} == {"A", "B"}
    assert gap["verdict"] == Verdict.INCONCLUSIVE
    assert "C" in gap["reason"]


def test_a_small_group_with_a_perfect_auc_is_not_a_flag() -> None:
    # Prepare: a 10+10 group perfectly separated, against a large group at AUC 0.85
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 2, 800)
    scores = 1 / (1 + np.exp(-(1.5 * (2 * labels - 1) + rng.normal(0, 1, 800))))
    big = BinaryStats.from_scores(scores, labels, bins=100, exact=True)
    small = BinaryStats.from_scores(
        np.r_[np.full(10, 0.9), np.full(10, 0.1)],
        np.r_[np.ones(10), np.zeros(10)],
        bins=100,
        exact=True,
    )
    cells = [
        GroupCell("a", "sex", "F", small, 10),
        GroupCell("a", "sex", "M", big, int(labels.sum())),
    ]
    # Execute
    (auc,) = [
        g for g in judge(cells, merge=lambda parts: parts[0], margin=0.05) if g["metric"] == "auc"
    ]
    # Assert: an AUC of 1 has no variance: no test, no flag
    assert auc["verdict"] == Verdict.INCONCLUSIVE and auc["p_value"] is None


def test_a_gap_below_the_margin_is_rarely_flagged() -> None:
    # Prepare: a true gap of 0.03 (below the margin 0.05), 1500 positives a group
    rng = np.random.default_rng(5)
    flags = 0
    for _ in range(100):
        f_tp, m_tp = rng.binomial(1500, 0.77), rng.binomial(1500, 0.80)
        groups = {"F": (1500, f_tp / 1500, 50, 0.8), "M": (1500, m_tp / 1500, 50, 0.8)}
        flags += _gap(_report({"a": _site(groups)}), "a", "sensitivity")["flagged"]
    # Assert: a flag claims a gap beyond the margin; it holds at the 5% level
    assert flags <= 5


def test_cases_needed_gives_the_power_it_plans_for() -> None:
    # Prepare: the suggested size for a gap observed as 0.6 against 0.9 at 12 positives
    needed = _gap(
        _report({"a": _site({"F": (12, 0.6, 12, 0.8), "M": (12, 0.9, 12, 0.8)})}),
        "a",
        "sensitivity",
    )["cases_needed"]
    size = needed["F"] // 2  # positives: half the cases
    rng = np.random.default_rng(6)
    flagged = 0
    for _ in range(100):
        f, m = rng.binomial(size, 0.6) / size, rng.binomial(size, 0.9) / size
        groups = {"F": (size, f, size, 0.8), "M": (size, m, size, 0.8)}
        flagged += _gap(_report({"a": _site(groups)}), "a", "sensitivity")["flagged"]
    # Assert: about 80% power for the true gap of 0.3 (binomial noise around it)
    assert flagged >= 70
