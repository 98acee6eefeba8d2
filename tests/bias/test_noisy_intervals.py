"""The bias report's intervals under DP statistics: the noise's standard error against
Monte Carlo, and the coverage benchmark run as a user runs it."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from radfed.bias.estimates import compare, estimates, interval
from radfed.bias.html import render_html
from radfed.bias.report import build_report
from radfed.config import RunConfig
from radfed.federation.schema import CellStats
from radfed.metrics.binary import BinaryStats, binary_metrics
from radfed.metrics.intervals import auc_noise_se, proportion_noise_se
from radfed.privacy.statistics_dp import noisy_release
from radfed.tasks.classification import TASK

ROOT = Path(__file__).resolve().parents[2]


def _exact(n: int = 400, seed: int = 0) -> BinaryStats:
    rng = np.random.default_rng(seed)
    labels = rng.random(n) < 0.35
    scores = 1 / (1 + np.exp(-rng.normal(-0.8 + 1.8 * labels, 1.1)))
    return BinaryStats.from_scores(scores, labels, threshold=0.5, bins=20)


def test_the_noise_standard_errors_match_monte_carlo() -> None:
    # Prepare: one cell of 2000 cases (no estimate near the edge of its range, where
    # clipping narrows the spread) released 3000 times with noise 4
    exact, rng = _exact(2000), random.Random(5)
    draws = [noisy_release(exact, 4.0, rng) for _ in range(3000)]

    # Execute: the spread of the noisy estimates, and the delta-method standard errors
    sens = np.array([binary_metrics(d)["sensitivity"] for d in draws], dtype=float)
    aucs = np.array([binary_metrics(d)["auc"] for d in draws], dtype=float)
    above, below = draws[0].count_noise()
    se_sens = proportion_noise_se(exact.tp, exact.fn, above, below)
    se_auc = auc_noise_se(exact.pos_hist, exact.neg_hist, draws[0].noise)

    # Assert: within 10% (the delta method at the exact counts against the simulation)
    assert se_sens is not None and se_auc is not None
    assert sens.std() == pytest.approx(se_sens, rel=0.1)
    assert aucs.std() == pytest.approx(se_auc, rel=0.1)


def test_a_noisy_interval_is_wider_than_the_exact_one_and_holds_the_noisy_value() -> None:
    exact = _exact()
    noisy = noisy_release(exact, 4.0, random.Random(1))
    for metric in ("sensitivity", "specificity", "auc"):
        plain = interval(estimates(exact)[metric].estimate, 0.95)
        fit = interval(estimates(noisy)[metric].estimate, 0.95)
        assert fit.value == pytest.approx(binary_metrics(noisy)[metric], abs=1e-6)
        assert fit.low is not None and fit.high is not None
        assert plain.low is not None and plain.high is not None
        assert fit.low <= fit.value <= fit.high
        assert fit.high - fit.low > plain.high - plain.low
    gap, _ = compare(estimates(noisy)["auc"].estimate, estimates(exact)["auc"].estimate, 0.95)
    assert gap.low is not None and gap.high is not None and gap.low < 0 < gap.high


def test_a_cell_whose_noisy_total_is_not_positive_has_no_value() -> None:
    # noise far larger than a tiny cell: the noisy count of positives may be <= 0
    tiny = BinaryStats.from_scores(np.array([0.7]), np.array([1]), threshold=0.5, bins=20)
    rng = random.Random(3)
    for _ in range(50):
        noisy = noisy_release(tiny, 20.0, rng)
        fit = interval(estimates(noisy)["sensitivity"].estimate, 0.95)
        if noisy.tp + noisy.fn <= 0:
            assert fit.value is None
        else:
            assert fit.value is not None and 0 <= fit.value <= 1


def test_the_coverage_benchmark_writes_coverage_at_the_nominal_level(tmp_path: Path) -> None:
    # Execute: the benchmark as `make bench` runs it, with fewer repetitions
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "bench/dp_coverage.py", "--reps", "100", "--out", str(tmp_path)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )

    # Assert: the noise-free values lie in the 95% intervals in at least 90% of the
    # repetitions for every metric and scenario, while the same intervals without the noise
    # term miss them far more often; a table for people, the numbers for scripts
    assert done.returncode == 0, done.stderr[-2000:]
    document = json.loads((tmp_path / "dp_coverage.json").read_text())
    assert (tmp_path / "dp_coverage.md").read_text().startswith("# Coverage")
    for result in document["results"]:
        assert result["reps"] == 100 and result["coverage"]
        assert min(result["coverage"].values()) >= 0.9, result
    without = [min(r["coverage_without_noise_term"].values()) for r in document["results"]]
    assert min(without) < 0.7


@pytest.mark.parametrize("noise", [2.0, 20.0])
def test_reports_over_small_noisy_cells_are_always_written(noise: float, tmp_path: Path) -> None:
    # Prepare: 40 reports of three sites whose cells hold 0 to 30 cases, released with
    # noise up to far beyond their size (negative totals, empty classes, tiny ratios)
    config = RunConfig(score_bins=20, eval_splits=("train", "val"), subgroups=("sex",))
    rng, source = np.random.default_rng(0), random.Random(0)
    groups = (("all", "all"), ("sex", "F"), ("sex", "M"), ("sex", "unknown"))

    for _ in range(40):
        per_site = {}
        for site in ("a", "b", "c"):
            per_site[site] = {}
            for split in config.eval_splits:
                cells = []
                for attribute, group in groups:
                    n = int(rng.integers(0, 30))
                    exact = BinaryStats.from_scores(rng.random(n), rng.random(n) < 0.4, bins=20)
                    noisy = noisy_release(exact, noise, source)
                    cells.append(CellStats(attribute, group, noisy, noisy.tp + noisy.fn))
                per_site[site][split] = cells

        # Execute
        report = build_report(TASK, config, per_site, server_round=1)

        # Assert: every interval holds its value and stays in range; no gap is flagged
        # on noise alone (these sites share one population)
        for split in report["splits"].values():
            for cell in split["cells"]:
                for metric in cell["metrics"].values():
                    low, value, high = metric["low"], metric["value"], metric["high"]
                    if value is not None and low is not None and high is not None:
                        assert low <= value <= high
            assert not any(gap["flagged"] for gap in split["gaps"])
    assert render_html(report, tmp_path / "report.html").is_file()  # the last, rendered
