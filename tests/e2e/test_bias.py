"""The bias report end to end: sites generated with and without a planted subgroup effect,
trained federatedly in a real Flower simulation, and the report read back."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from radfed.data.synth import synth_sites
from tests.e2e.processes import run_simulate

#: Ray-backed simulations run one at a time, on one pytest-xdist worker.
pytestmark = [pytest.mark.e2e, pytest.mark.xdist_group("ray")]

#: The planted effect of ``--bias contrast``: fainter lesions for women aged 60 and over at
#: site-b (radfed.data.synth), so the model misses them there.
PLANTED_SITE = "site-b"
PLANTED_GROUPS = {"F|60-79", "F|80+"}


#: Sites large enough that the planted failure is flagged whatever CPU computes the rounds:
#: at 500 cases a site its sex*age_band gap was flagged on one machine and not on another
#: (floating-point kernels differ by instruction set, so training trajectories differ).
#: At 800 it was flagged for seeds 3, 7 and 11 here, and the unplanted data flagged nothing.
CASES_PER_SITE, SEED = 800, 11


def _run(root: Path, bias: str) -> dict[str, object]:
    data, out = root / bias / "data", root / bias / "run"
    # small-sites keeps its own size (radfed.data.synth.SMALL_SITE_CASES)
    size = None if bias == "small-sites" else CASES_PER_SITE
    synth_sites(data, sites=3, cases_per_site=size, seed=SEED, bias=bias)
    output = run_simulate(
        root / "flwr-home",
        "--data",
        str(data),
        "--out",
        str(out),
        "--rounds",
        "4",
        "--seed",
        str(SEED),
        "--run-config",
        "val-fraction=0.4 test-fraction=0.1 local-epochs=2",
    )
    assert "bias report:" in output
    assert (out / "bias_report.html").read_text().startswith("<!DOCTYPE html>")
    report: dict[str, object] = json.loads((out / "bias_report.json").read_text())
    report["output"] = output
    return report


@pytest.fixture(scope="module")
def reports(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, object]]:
    root = tmp_path_factory.mktemp("bias")
    out = {bias: _run(root, bias) for bias in ("contrast", "none", "small-sites")}
    planted = json.loads((root / "contrast" / "data" / "synth.json").read_text())["bias"]
    assert planted["site"] == PLANTED_SITE and planted["group"] == {"sex": "F", "min_age": 60}
    return out


def _flags(report: dict[str, object]) -> list[dict[str, object]]:
    splits = report["splits"]
    assert isinstance(splits, dict)
    return [gap for body in splits.values() for gap in body["gaps"] if gap["flagged"]]


def _group(gap: dict[str, object]) -> str:
    """The group a gap is about: the worst of worst-vs-best, the group of one-vs-rest."""
    side = gap["worst"] if gap["comparison"] == "worst vs best" else gap["group"]
    assert isinstance(side, dict)
    return str(side["group"])


def _planted(gap: dict[str, object]) -> bool:
    return gap["site"] == PLANTED_SITE and _group(gap) in PLANTED_GROUPS


def test_the_planted_group_is_flagged_at_the_planted_site(
    reports: dict[str, dict[str, object]],
) -> None:
    flags = _flags(reports["contrast"])
    flagged = [g for g in flags if _planted(g)]
    assert flagged, "the planted group at the planted site is not flagged"
    assert {g["metric"] for g in flagged} & {"auc", "sensitivity"}
    # every flag is about women (or the old) at the planted site, or a pool it drives
    for gap in flags:
        assert gap["site"] in (PLANTED_SITE, "ALL"), gap
        if gap["site"] == "ALL":
            attribution = gap["attribution"]
            assert isinstance(attribution, dict) and PLANTED_SITE in attribution["drivers"]
    assert "gap(s) flagged" in str(reports["contrast"]["output"])


def test_at_small_sites_the_planted_gap_is_never_called_within_margin(
    reports: dict[str, dict[str, object]],
) -> None:
    # Prepare: the same effect at the sizes of small real sites (240 cases a site)
    report = reports["small-sites"]
    splits = report["splits"]
    assert isinstance(splits, dict)
    planted = [g for g in splits["val"]["gaps"] if _planted(g)]
    # Assert: each planted gap is flagged or inconclusive; the headline says which
    assert planted and all(g["verdict"] in ("flagged", "inconclusive") for g in planted)
    summary = report["summary"]
    assert isinstance(summary, dict)
    if not summary["counts"]["flagged"]:
        assert summary["counts"]["inconclusive"] > 0
        assert "inconclusive gaps are not evidence of no bias" in str(report["output"])


def test_without_the_planted_effect_nothing_is_flagged(
    reports: dict[str, dict[str, object]],
) -> None:
    # synth makes cases equally hard at every site and in every group unless a bias is planted
    flagged = [(g["site"], g["attribute"], g["metric"]) for g in _flags(reports["none"])]
    assert not flagged, f"flags on data without a planted bias: {flagged}"
    # no cell below the minimum cell size reached the report
    cells = reports["none"]["splits"]["val"]["cells"]  # type: ignore[index]
    assert all(c["n"] is None or c["n"] >= 10 for c in cells)
