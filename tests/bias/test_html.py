"""The bias report's HTML page: flags first, figures embedded, every site string escaped."""

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
        "site": "site-b",
        "attribute": "sex",
        "metric": "sensitivity",
        "worst": {"group": "F", "value": 0.52, "n": 52},
        "best": {"group": "M", "value": 0.84, "n": 61},
        "difference": _est(-0.32, -0.51, -0.12),
        "ratio": _est(0.62, 0.43, 0.88),
        "flagged": True,
        "reason": "interval of the difference excludes 0 and |difference| >= margin 0.05",
    }
    unflagged = {
        "site": "ALL",
        "attribute": "age_band",
        "metric": "specificity",
        "worst": {"group": "<18", "value": 0.74, "n": 12},
        "best": {"group": "40-59", "value": 0.77, "n": 140},
        "difference": _est(-0.03, -0.2, 0.14),
        "ratio": None,
        "flagged": False,
        "reason": "interval of the difference includes 0",
    }
    rounds = {"auc": [[1, 0.71], [2, 0.78]], "sensitivity": [[1, 0.6], [2, 0.7]]}
    roc = {"fpr": [0.0, 0.2, 1.0], "tpr": [0.0, 0.7, 1.0], "auc": 0.81}
    return {
        "format": "radfed-bias-report",
        "format_version": 1,
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
    flags = _section(page, "flags")
    assert page.index('<section id="flags">') < page.index('class="split"')
    assert "site-b" in flags and "sex" in flags and "sensitivity" in flags
    assert "-0.320 [-0.510, -0.120]" in flags
    assert "specificity" not in flags  # the unflagged gap stays in the split's table
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
    assert "&lt;b&gt;x&lt;/b&gt;" in _section(page, "flags")
    assert "$a_&lt;u&gt;" in page


def test_no_flagged_gap_is_said_with_its_criterion(tmp_path: Path) -> None:
    # Prepare
    report = _classification_report()
    for gap in report["splits"]["val"]["gaps"]:
        gap["flagged"] = False
    # Execute
    page = render_html(report, tmp_path / "r.html").read_text(encoding="utf-8")
    # Assert
    flags = _section(page, "flags")
    assert "No gap is flagged" in flags
    assert "margin 0.05" in flags and "excludes 0" in flags
    assert "<table>" not in flags


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
    assert "No gap is flagged" in page


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


@pytest.mark.parametrize(("fmt", "version"), [("radfed-bias-report", 2), ("other", 1)])
def test_another_format_is_refused(tmp_path: Path, fmt: str, version: int) -> None:
    # Prepare
    report = {**_classification_report(), "format": fmt, "format_version": version}
    # Execute / Assert
    with pytest.raises(DataError, match=f"format {fmt!r} version {version}"):
        render_html(report, tmp_path / "r.html")
    assert not (tmp_path / "r.html").exists()
