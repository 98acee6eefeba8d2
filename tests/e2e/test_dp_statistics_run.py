"""`radfed simulate` over sites with DP statistics, end to end: real Flower, generated DICOM,
each site's own policy; the server reads the noisy replies and its report says so."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from radfed.data.synth import synth_sites
from radfed.privacy.accountant import PrivacyLedger
from tests.e2e.processes import run_simulate

#: Ray-backed simulations run one at a time, on one pytest-xdist worker.
pytestmark = [pytest.mark.e2e, pytest.mark.xdist_group("ray")]
SITES = ("site-a", "site-b", "site-c")
NOISE = 2.0


def test_a_run_over_sites_with_dp_statistics_reports_noisy_numbers(tmp_path: Path) -> None:
    # Prepare: three generated sites, each with a policy that turns DP statistics on
    data, out = tmp_path / "data", tmp_path / "run"
    synth_sites(
        data, task="classification", sites=len(SITES), cases_per_site=80, seed=2, image_size=32
    )
    for site in SITES:
        (data / site / "site-policy.toml").write_text(f"[policy.dp-statistics]\nnoise = {NOISE}\n")

    # Execute
    output = run_simulate(
        tmp_path / "flwr-home",
        "--data",
        str(data),
        "--out",
        str(out),
        "--rounds",
        "1",
        "--run-config",
        "image-size=32 local-epochs=1 batch-size=16 score-bins=20",
    )

    # Assert: the round's pooled AUC came from the noisy replies; every cell of the bias
    # report states the noise on its counts (the pool's adds the sites' variances); each
    # site accounted its releases (the survey and round 1's evaluations, round 1's training
    # count) and its audit says so
    assert "round 1/1 val auc" in output and "Traceback" not in output
    report = json.loads((out / "bias_report.json").read_text())
    cells = report["splits"]["val"]["cells"]
    assert {c["noise_sd"] for c in cells if c["site"] in SITES} == {NOISE}
    pooled = [c["noise_sd"] for c in cells if c["site"] not in SITES]  # three sites' noise
    assert pooled and all(v == pytest.approx(NOISE * 3**0.5, abs=1e-5) for v in pooled)
    assert not any(c["suppressed"] for c in cells)
    assert "noise" in report["methods"]
    cells_per_case = 5  # all, sex, age_band, manufacturer, sex*age_band
    rho = (2 * cells_per_case + 1) / (2 * NOISE**2)  # two evaluations, one training count
    for site in SITES:
        spent = PrivacyLedger(data / site / ".radfed" / "privacy.jsonl").spent("statistics")
        assert spent.rounds == 3 and spent.rho == pytest.approx(rho)
    audit = subprocess.run(
        [sys.executable, "-m", "radfed", "site", "audit", str(data / SITES[0])],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert "3 DP statistics releases" in audit.stdout, audit.stdout + audit.stderr
