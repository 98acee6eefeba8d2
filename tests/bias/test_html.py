"""The bias report's HTML page: verdicts first, never a reassurance that the data do not
show, figures embedded, every site string escaped."""

from __future__ import annotations

import base64
import re
from pathlib import Path
from typing import Any

import pytest

from radfed.bias import render_html
from radfed.errors import DataError

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
EXTERNAL = ("http://", "https://", 'src="/', "<script src")


def _est(value: float | None, low: float | None = None, high: float | None = None) -> Any:
    return {"value": value, "low": low, "high": high}


def _cell(site: str, attribute: str, group: str, n: int | None, **metrics: Any) -> Any:
    return {
        "site": site,
        "attribute": attribute,
        "group": group,
        "n": n,
        "suppressed": n is None,
        "positives": None if n is None else n // 3,
        "metrics": {} if n is None else metrics,
    }


def _classification_report() -> dict[str, Any]:
    """Two sites and the pool, sex and age_band, one suppressed cell and one flagged gap."""
    clf = {
        "auc": _est(0.81, 0.69, 0.93),
        "sensitivity": _est(0.71, 0.45, 0.88),
        "specificity": _est(0.77, 0.6, 0.9),
    }
    weak = {**clf, "sensitivity": _est(0.52, 0.33, 0.70)}
    cells = [
        _cell(site, attribute, group, n, **(weak if group == "F" and site == "site-b" else clf))
        for site in ("site-a", "site-b", "ALL")
        for attribute, group, n in (
            ("all", "all", 120),
            ("sex", "F", 52),
            ("sex", "M", 61),
            ("age_band", "40-59", 70),
            ("age_band", "<18", None if site == "site-b" else 12),
        )
    ]
    flagged = {
        "site": "ALL",
        "attribute": "sex",
        "metric": "sensitivity",
        "comparison": "worst vs best",
        "worst": {"group": "F", "value": 0.52, "n": 52},
        "best": {"group": "M", "value": 0.84, "n": 61},
        "difference": _est(-0.32, -0.51, -0.12),
        "ratio": _est(0.62, 0.43, 0.88),
        "verdict": "flagged",
        "flagged": True,
        "reason": "beyond chance and |difference| >= margin 0.05",
        "cases_needed": None,
        "attribution": {
            "sites": [
                {"site": "site-a", "difference": _est(0.01, -0.1, 0.12)},
                {"site": "site-b", "difference": _est(-0.6, -0.8, -0.4)},
            ],
            "heterogeneity": {"q": 30.0, "df": 1, "p_value": 0.00001, "i2": 0.97},
            "heterogeneous": True,
            "drivers": ["site-b"],
        },
    }
    unflagged = {
        "site": "ALL",
        "attribute": "age_band",
        "metric": "specificity",
        "comparison": "one vs rest",
        "group": {"group": "<18", "value": 0.74, "n": 12},
        "rest": {"group": "rest", "value": 0.77, "n": 140},
        "difference": _est(-0.03, -0.2, 0.14),
        "ratio": None,
        "verdict": "inconclusive",
        "flagged": False,
        "reason": "too few cases",
        "cases_needed": {"<18": 530, "rest": 6100},
    }
    rounds = {"auc": [[1, 0.71], [2, 0.78]], "sensitivity": [[1, 0.6], [2, 0.7]]}
    roc = {"fpr": [0.0, 0.2, 1.0], "tpr": [0.0, 0.7, 1.0], "auc": 0.81}
    return {
        "format": "radfed-bias-report",
        "format_version": 2,
        "radfed_version": "0.1.0",
        "task": "classification",
        "round": 2,
        "rounds": 2,
        "settings": {
            "min_cell_size": 10,
            "margin": 0.05,
            "confidence": 0.95,
            "subgroups": ["sex", "age_band"],
        },
        "methods": {"auc": "DeLong variance from the merged score histograms"},
        "splits": {"val": {"role": "internal", "cells": cells, "gaps": [flagged, unflagged]}},
        "composition": [
            {
                "site": "site-a",
                "split": "train",
                "n": 180,
                "positives": 61,
                "prevalence": 0.339,
                "groups": {"sex": {"F": 92, "M": 88}, "age_band": {"40-59": 70}},
                "suppressed_groups": {"age_band": ["<18"]},
            }
        ],
        "confounders": [
            {
                "site": "site-b",
                "attribute": "sex",
                "cramers_v": 0.41,
                "prevalence_by_group": {"F": 0.12, "M": 0.55},
                "risk": "high",
            }
        ],
        "curves": {"val": {"site-a": rounds, "site-b": rounds, "ALL": rounds}},
        "roc": {"val": {"site-a": roc, "site-b": roc, "ALL": roc}},
    }


def _segmentation_report() -> dict[str, Any]:
    """No ROC; a sealed test split whose only subgroup cells are suppressed or undefined."""
    report = _classification_report()
    cells = [
        _cell("site-a", "all", "all", 30, dice_mean=_est(0.8, 0.7, 0.9), hd95_median=_est(4.0)),
        _cell("site-a", "sex", "F", None),
        _cell("ALL", "all", "all", 30, dice_mean=_est(None)),
    ]
    report.update(
        task="segmentation",
        methods={"dice_mean": "bootstrap-free normal interval"},
        splits={"test": {"role": "sealed test", "cells": cells, "gaps": []}},
        curves={"test": {"site-a": {"dice_mean": [[1, 0.5], [2, 0.8]]}}},
    )
    del report["roc"]
    return report


def _section(page: str, section_id: str) -> str:
    match = re.search(rf'<section id="{section_id}">(.*?)</section>', page, re.DOTALL)
    assert match is not None
    return match.group(1)


def _pngs(page: str) -> list[bytes]:
    return [base64.b64decode(data) for data in re.findall(r"data:image/png;base64,([^\"]+)", page)]


@pytest.fixture(scope="module")
def classification_page(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The classification report rendered once (figures take most of a second)."""
    out = tmp_path_factory.mktemp("bias") / "out" / "bias_report.html"
    written = render_html(_classification_report(), out)
    assert written == out
    return out.read_text(encoding="utf-8")


def test_flagged_gaps_come_first_and_suppressed_cells_show_no_number(
    classification_page: str,
) -> None:
    # Prepare / Execute: the fixture renders the classification report
    page = classification_page
    # Assert
    verdicts = _section(page, "verdicts")
    assert page.index('<section id="verdicts">') < page.index('class="split"')
    assert "1 flagged · 0 within margin &plusmn;0.05 · 1 inconclusive" in verdicts
    flagged = verdicts[: verdicts.index("Largest inconclusive")]
    assert "sex" in flagged and "sensitivity" in flagged and "-0.320 [-0.510, -0.120]" in flagged
    assert "driven by site-b" in flagged and "heterogeneous" in flagged
    assert "specificity" not in flagged
    assert "&lt;18 ~530, rest ~6100" in verdicts  # the inconclusive gap, with cases needed
    assert "No gap is flagged" not in page
    assert "<td>suppressed</td>" in page
    assert "internal" in page and "0.810 [0.690, 0.930]" in page
    assert "risk-high" in page and "0.339" in page


def test_figures_are_embedded_valid_pngs_and_nothing_external(classification_page: str) -> None:
    # Prepare / Execute: the fixture renders the classification report
    page = classification_page
    # Assert: forest plot, ROC and curves of the split
    pngs = _pngs(page)
    assert len(pngs) >= 3
    assert all(png.startswith(PNG_SIGNATURE) for png in pngs)
    assert not [marker for marker in EXTERNAL if marker in page]


def test_strings_from_sites_are_escaped(tmp_path: Path) -> None:
    # Prepare: a group and a site name that are markup, and a site name with mathtext
    report = _classification_report()
    split = report["splits"]["val"]
    split["cells"][1]["group"] = "<b>x</b>"
    split["gaps"][0]["worst"]["group"] = "<b>x</b>"
    split["cells"][0]["site"] = "$a_<u>"
    report["composition"][0]["groups"]["sex"] = {"<b>x</b>": 92}
    report["curves"]["val"]["$a_<u>"] = report["curves"]["val"].pop("site-a")
    # Execute
    page = render_html(report, tmp_path / "r.html").read_text(encoding="utf-8")
    # Assert
    assert "<b>x</b>" not in page and "<u>" not in page
    assert "&lt;b&gt;x&lt;/b&gt;" in _section(page, "verdicts")
    assert "$a_&lt;u&gt;" in page


def test_no_flag_is_never_said_alone_while_a_gap_is_inconclusive(tmp_path: Path) -> None:
    # Prepare: the flagged gap becomes inconclusive too
    report = _classification_report()
    gap = report["splits"]["val"]["gaps"][0]
    gap.update(verdict="inconclusive", flagged=False, cases_needed={"F": 90, "M": 110})
    # Execute
    page = render_html(report, tmp_path / "r.html").read_text(encoding="utf-8")
    # Assert: no green box; the caveat and the largest inconclusive gap first
    verdicts = _section(page, "verdicts")
    assert 'class="none"' not in verdicts and 'class="unsure"' in verdicts
    assert "No gap is flagged, but 2 gap(s) are inconclusive" in verdicts
    assert "not evidence that there is no bias" in verdicts
    assert verdicts.index("-0.320") < verdicts.index("-0.030")


def test_only_gaps_within_the_margin_read_as_no_gap(tmp_path: Path) -> None:
    # Prepare
    report = _classification_report()
    for gap in report["splits"]["val"]["gaps"]:
        gap.update(verdict="within margin", flagged=False, difference=_est(0.01, -0.03, 0.04))
    # Execute
    page = render_html(report, tmp_path / "r.html").read_text(encoding="utf-8")
    # Assert
    verdicts = _section(page, "verdicts")
    assert 'class="none"' in verdicts and "Every gap is within the margin" in verdicts
    assert "<table>" not in verdicts


def test_in_sample_warnings_stand_apart_from_held_out_verdicts(tmp_path: Path) -> None:
    # Prepare: a training split whose group fails on its own training cases
    report = _classification_report()
    warning = {**report["splits"]["val"]["gaps"][0], "verdict": "in-sample warning"}
    warning.update(flagged=False, reason="check this group's data and labels", site="site-b")
    report["splits"]["train"] = {"role": "internal", "cells": [], "gaps": [warning]}
    # Execute
    page = render_html(report, tmp_path / "r.html").read_text(encoding="utf-8")
    # Assert: counted apart from the verdicts, in its own table
    verdicts = _section(page, "verdicts")
    assert "1 flagged · 0 within margin" in verdicts
    warnings = verdicts[verdicts.index("In-sample warnings") :]
    assert "check this group&#x27;s data and labels" in warnings and "site-b" in warnings


def test_segmentation_report_without_roc_shows_undefined_values_as_na(tmp_path: Path) -> None:
    # Prepare
    report = _segmentation_report()
    # Execute
    page = render_html(report, tmp_path / "r.html").read_text(encoding="utf-8")
    # Assert: forest plot and curves, no ROC figure
    assert "No ROC curves in this report" in page
    assert len(_pngs(page)) == 2
    assert "sealed test" in page and "dice_mean" in page and "hd95_median" in page
    assert "<td>n/a</td>" in page and "<td>4.000</td>" in page
    assert "<td>suppressed</td>" in page
    assert "No gap could be compared" in page


def test_empty_sections_render_without_figures(tmp_path: Path) -> None:
    # Prepare: a split holding only a suppressed cell and no other section
    report = _classification_report()
    report["splits"] = {"train": {"role": "held-out site", "cells": [_cell("s", "sex", "F", None)]}}
    for key in ("composition", "confounders", "curves", "roc", "settings", "methods"):
        report[key] = None
    # Execute
    page = render_html(report, tmp_path / "r.html").read_text(encoding="utf-8")
    # Assert
    assert _pngs(page) == []
    assert "held-out site" in page and "<td>suppressed</td>" in page
    assert "No composition in this report" in page and "No curves in this report" in page


@pytest.mark.parametrize(("fmt", "version"), [("radfed-bias-report", 1), ("other", 2)])
def test_another_format_is_refused(tmp_path: Path, fmt: str, version: int) -> None:
    # Prepare
    report = {**_classification_report(), "format": fmt, "format_version": version}
    # Execute / Assert
    with pytest.raises(DataError, match=f"format {fmt!r} version {version}"):
        render_html(report, tmp_path / "r.html")
    assert not (tmp_path / "r.html").exists()


def test_cells_show_their_design_effect_and_an_exact_auc(tmp_path: Path) -> None:
    # Prepare
    report = _classification_report()
    cell = report["splits"]["val"]["cells"][0]
    cell.update(design_effect={"sensitivity": 2.1}, exact_auc=True)
    cell["metrics"]["auc"] = _est(None, 0.6, 0.9)  # withheld value, interval kept
    # Execute
    page = render_html(report, tmp_path / "r.html").read_text(encoding="utf-8")
    # Assert
    assert "<td>sensitivity 2.100, AUC exact</td>" in page
    assert "<td>n/a [0.600, 0.900]</td>" in page
    assert "design effect" in page
