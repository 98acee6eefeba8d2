"""The bias report from subgroup cells: numbers against scikit-learn and fairlearn on the
pooled per-case data, flags, suppression, composition and the confounder screen."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
from fairlearn.metrics import MetricFrame
from sklearn.metrics import recall_score, roc_auc_score

from radfed.bias.html import render_html
from radfed.bias.report import build_report, cramers_v
from radfed.config import RunConfig
from radfed.federation.schema import CellStats
from radfed.metrics.binary import BinaryStats
from radfed.metrics.cells import SMALL_GROUPS, parse_cell_name, subgroup_cells
from radfed.tasks.classification import TASK

CONFIG = RunConfig(
    eval_splits=("val",), score_bins=1000, min_cell_size=1, subgroups=("sex", "manufacturer")
)


def _site(rng: np.random.Generator, n: int, weak_sex: str | None = None) -> dict[str, object]:
    sex = rng.choice(["F", "M"], n)
    vendor = rng.choice(["GE", "Siemens"], n)
    labels = rng.integers(0, 2, n)
    signal = np.where(sex == weak_sex, 0.2, 2.5)  # the weak group's lesions barely show
    scores = 1 / (1 + np.exp(-(labels * signal - signal / 2 + rng.normal(0, 1, n))))
    return {"sex": sex, "vendor": vendor, "labels": labels, "scores": scores}


def _cells(site: dict[str, object], config: RunConfig) -> list[CellStats]:
    """What the site's client computes: statistics of each cell under its cell size."""
    attributes = [
        {"sex": s, "manufacturer": v}
        for s, v in zip(site["sex"], site["vendor"], strict=True)  # type: ignore[call-overload]
    ]
    scores, labels = np.asarray(site["scores"]), np.asarray(site["labels"])
    out = []
    for cell in subgroup_cells(attributes, config.subgroups, config.min_cell_size):
        index = list(cell.index)
        stats = BinaryStats.from_scores(scores[index], labels[index], bins=config.score_bins)
        k = config.min_cell_size
        out.append(
            CellStats(cell.attribute, cell.group, stats.with_min_cell(k), int(labels[index].sum()))
        )
    return out


def _value(report: dict[str, object], site: str, attribute: str, group: str, metric: str) -> float:
    cells = report["splits"]["val"]["cells"]  # type: ignore[index]
    cell = next(
        c for c in cells if (c["site"], c["attribute"], c["group"]) == (site, attribute, group)
    )
    return float(cell["metrics"][metric]["value"])


def test_pooled_subgroup_numbers_equal_sklearn_and_fairlearn_on_pooled_cases() -> None:
    # Prepare: two sites; the pooled per-case data a central team could never see
    rng = np.random.default_rng(0)
    sites = {"site-a": _site(rng, 400), "site-b": _site(rng, 300)}
    per_site = {name: {"val": _cells(site, CONFIG)} for name, site in sites.items()}
    # Execute
    report = build_report(TASK, CONFIG, per_site, server_round=1)
    # Assert: per pooled group, against independent references on the pooled cases
    pooled = {
        k: np.concatenate([np.asarray(s[k]) for s in sites.values()]) for k in sites["site-a"]
    }
    predicted = (pooled["scores"] >= CONFIG.threshold).astype(int)
    frame = MetricFrame(
        metrics=recall_score,
        y_true=pooled["labels"],
        y_pred=predicted,
        sensitive_features=pooled["sex"],
    )
    for group in ("F", "M"):
        assert _value(report, "ALL", "sex", group, "sensitivity") == pytest.approx(
            frame.by_group[group], abs=1e-6
        )
        members = pooled["sex"] == group
        exact = roc_auc_score(pooled["labels"][members], pooled["scores"][members])
        assert _value(report, "ALL", "sex", group, "auc") == pytest.approx(exact, abs=0.002)
    assert _value(report, "ALL", "all", "all", "sensitivity") == pytest.approx(
        recall_score(pooled["labels"], predicted), abs=1e-6
    )


def test_the_weak_group_is_flagged_at_its_site_and_nothing_without_it() -> None:
    # Prepare: site-b's women get a poor model; the same sites without that effect
    biased = {
        "site-a": {"val": _cells(_site(np.random.default_rng(1), 400), CONFIG)},
        "site-b": {"val": _cells(_site(np.random.default_rng(2), 400, weak_sex="F"), CONFIG)},
    }
    fair = {
        "site-a": {"val": _cells(_site(np.random.default_rng(1), 400), CONFIG)},
        "site-b": {"val": _cells(_site(np.random.default_rng(2), 400), CONFIG)},
    }
    # Execute
    flagged = [
        g
        for g in build_report(TASK, CONFIG, biased, server_round=1)["splits"]["val"]["gaps"]
        if g["flagged"]
    ]
    clean = [
        g
        for g in build_report(TASK, CONFIG, fair, server_round=1)["splits"]["val"]["gaps"]
        if g["flagged"]
    ]
    # Assert
    assert any(
        (g["site"], g["attribute"], g["metric"], g["worst"]["group"])
        == ("site-b", "sex", "auc", "F")
        for g in flagged
    )
    assert all(g["worst"]["group"] == "F" and g["site"] in ("site-b", "ALL") for g in flagged)
    assert clean == []


def test_suppressed_cells_are_shown_as_such_and_left_out_of_the_pool() -> None:
    # Prepare: k=30 suppresses site-b's small manufacturer group
    config = dataclasses.replace(CONFIG, min_cell_size=30)
    rng = np.random.default_rng(3)
    small = _site(rng, 40)
    small["vendor"] = np.array(["Philips"] * 5 + ["GE"] * 35)
    per_site = {
        "site-a": {"val": _cells(_site(rng, 200), config)},
        "site-b": {"val": _cells(small, config)},
    }
    # Execute
    report = build_report(TASK, config, per_site, server_round=2)
    cells = report["splits"]["val"]["cells"]
    # Assert: a free-text group below k is pooled at the site; a small closed group suppressed
    site_b = {(c["attribute"], c["group"]): c for c in cells if c["site"] == "site-b"}
    assert ("manufacturer", "Philips") not in site_b
    assert site_b[("manufacturer", SMALL_GROUPS)]["suppressed"] is True
    assert site_b[("manufacturer", SMALL_GROUPS)]["n"] is None
    pooled_ge = next(c for c in cells if (c["site"], c["group"]) == ("ALL", "GE"))
    site_ge = [c for c in cells if c["group"] == "GE" and c["site"] != "ALL"]
    assert pooled_ge["n"] == sum(c["n"] for c in site_ge if not c["suppressed"])
    composition = {(c["site"], c["split"]): c for c in report["composition"]}
    assert composition[("site-b", "val")]["suppressed_groups"]["manufacturer"] == [SMALL_GROUPS]


def test_confounder_screen_measures_how_well_a_group_predicts_the_label() -> None:
    # Cramér's V: independent table 0, a group that decides the label 1
    assert cramers_v(np.array([[10, 10], [20, 20]])) == pytest.approx(0.0)
    assert cramers_v(np.array([[30, 0], [0, 30]])) == pytest.approx(1.0)
    assert cramers_v(np.array([[5, 5]])) is None
    # on cells: a site where men are mostly positive
    rng = np.random.default_rng(4)
    site = _site(rng, 200)
    site["labels"] = (np.asarray(site["sex"]) == "M").astype(int)
    config = dataclasses.replace(CONFIG, eval_splits=("train",))
    report = build_report(TASK, config, {"site-a": {"train": _cells(site, config)}}, server_round=1)
    screen = {c["attribute"]: c for c in report["confounders"]}
    assert screen["sex"]["risk"] == "high" and screen["sex"]["cramers_v"] == pytest.approx(1.0)
    assert screen["manufacturer"]["risk"] == "low"


def test_cell_names_are_checked_against_the_run_subgroups() -> None:
    assert parse_cell_name("sex=F", ("sex",)) == ("sex", "F")
    assert parse_cell_name("sex*age_band=F|60-79", ("sex*age_band",)) == ("sex*age_band", "F|60-79")
    for bad in ("age=54", "sex", "sex=", "sex*age_band=F", f"sex={'x' * 65}", "sex=\x00"):
        with pytest.raises(ValueError):
            parse_cell_name(bad, ("sex", "sex*age_band"))


def test_a_held_out_site_is_labelled_and_kept_out_of_the_pool() -> None:
    config = dataclasses.replace(CONFIG, holdout_site="site-b")
    rng = np.random.default_rng(5)
    per_site = {name: {"val": _cells(_site(rng, 100), config)} for name in ("site-a", "site-b")}
    cells = build_report(TASK, config, per_site, server_round=1)["splits"]["val"]["cells"]
    every = {(c["site"], c["attribute"]): c for c in cells if c["group"] == "all"}
    assert every[("ALL", "all")]["n"] == every[("site-a", "all")]["n"] == 100
    assert every[("site-b", "all")]["role"] == "held-out site"
    assert every[("site-a", "all")]["role"] == "internal"


def test_before_training_the_report_holds_composition_and_no_metric(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    site = _site(rng, 200)
    per_site = {"site-a": {"val": _cells(site, CONFIG)}}
    report = build_report(TASK, CONFIG, per_site, server_round=0)
    assert report["round"] == 0 and report["splits"] == {} and report["roc"] == {}
    (entry,) = report["composition"]
    labels = np.asarray(site["labels"])
    assert entry["n"] == len(labels) and entry["positives"] == int(labels.sum())
    assert {c["attribute"] for c in report["confounders"]} >= {"sex", "manufacturer"}
    html = render_html(report, tmp_path / "report.html").read_text()
    assert "site-a" in html


def test_site_cells_show_the_exact_auc_and_the_design_effect_of_repeat_images() -> None:
    # Prepare: 150 patients with 3 images each; a patient's images share most of their
    # score (a patient effect), so the images are far from independent
    rng = np.random.default_rng(8)
    patients = np.repeat(np.arange(150), 3)
    labels = np.repeat(rng.integers(0, 2, 150), 3)
    effect = np.repeat(rng.normal(0, 1.5, 150), 3)
    scores = 1 / (1 + np.exp(-(2 * labels - 1 + effect + rng.normal(0, 0.3, 450))))
    keys = [f"p{p}" for p in patients]
    stats = BinaryStats.from_scores(scores, labels, bins=100, exact=True, patients=keys)
    config = dataclasses.replace(CONFIG, score_bins=100, min_cell_size=10, subgroups=("sex",))
    cell = CellStats("all", "all", stats.with_min_cell(10), int(labels.sum()))
    # Execute
    report = build_report(TASK, config, {"site-a": {"val": [cell]}}, server_round=1)
    site = next(c for c in report["splits"]["val"]["cells"] if c["site"] == "site-a")
    # Assert: the AUC is the exact one of the cases, not the merged histogram's
    assert site["exact_auc"] is True
    assert site["metrics"]["auc"]["value"] == pytest.approx(roc_auc_score(labels, scores), abs=1e-6)
    # three nearly identical images per patient: close to 3 times the variance
    assert site["design_effect"]["sensitivity"] > 2
    assert site["design_effect"]["auc"] > 2
    naive = BinaryStats.from_scores(scores, labels, bins=100, exact=True).with_min_cell(10)
    alone = CellStats("all", "all", naive, int(labels.sum()))
    unclustered = build_report(TASK, config, {"site-a": {"val": [alone]}}, server_round=1)
    plain = next(c for c in unclustered["splits"]["val"]["cells"] if c["site"] == "site-a")
    width = site["metrics"]["sensitivity"]["high"] - site["metrics"]["sensitivity"]["low"]
    narrow = plain["metrics"]["sensitivity"]["high"] - plain["metrics"]["sensitivity"]["low"]
    assert width > 1.3 * narrow
