"""`radfed evaluate` (local per-case outputs and the statistics that would leave) and
`radfed report` (re-render a run's bias report)."""

from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path

from flwr.app import ConfigRecord, MetricRecord
from typer.testing import CliRunner

from radfed.central.run_folder import RunFolder
from radfed.cli import app
from radfed.config import RunConfig
from radfed.data.loading import load_site_for
from radfed.federation.schema import unpack_cells
from radfed.tasks.classification import TASK, build_model

CONFIG = RunConfig(image_size=32, val_fraction=0.25, test_fraction=0.25, min_cell_size=3)
runner = CliRunner()


def test_evaluate_writes_cases_locally_and_the_statistics_a_round_would_send(
    site_copy: Path, tmp_path: Path
) -> None:
    # Prepare: a checkpoint as the server writes it, a site whose policy sets k = 3
    (site_copy / "site-policy.toml").write_text("[policy]\nmin-cell-size = 3\n")
    run = RunFolder.start(tmp_path / "run", CONFIG)
    checkpoint = run.save_checkpoint(0, build_model(CONFIG).state_dict(), CONFIG)
    out = tmp_path / "eval"
    # Execute
    result = runner.invoke(
        app,
        ["evaluate", "--checkpoint", str(checkpoint), "--data", str(site_copy), "--out", str(out)],
    )
    # Assert: one row per validation case, with its manifest line, kept at the site
    assert result.exit_code == 0, result.output
    val = load_site_for(site_copy, CONFIG).splits["val"]
    with (out / "predictions.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == len(val)
    assert [int(r["manifest_line"]) for r in rows] == list(val.lines)
    assert all(0.0 <= float(r["score"]) <= 1.0 for r in rows)
    # Assert: statistics.json parses as a site's reply would, cells and minimum cell size included
    document = json.loads((out / "statistics.json").read_text())
    config = dataclasses.replace(CONFIG, eval_splits=("val",))
    cells = unpack_cells(
        TASK, MetricRecord(document["metrics"]), ConfigRecord(document["cells"]), config
    )
    assert cells["val"][0].stats.n == len(val) and document["min-cell-size"] == 3
    assert all(c.stats.suppressed or c.stats.n >= 3 for c in cells["val"])
    assert "score" not in json.dumps(document)  # no per-case value in what would leave


def test_evaluate_and_report_refuse_what_they_cannot_read(tmp_path: Path) -> None:
    result = runner.invoke(
        app,
        [
            "evaluate",
            "--checkpoint",
            str(tmp_path / "none.pt"),
            "--data",
            str(tmp_path),
            "--out",
            str(tmp_path / "o"),
        ],
    )
    assert result.exit_code == 2 and "not found" in result.output
    result = runner.invoke(app, ["report", str(tmp_path)])
    assert result.exit_code == 2 and "no bias_report.json" in result.output


def test_report_rerenders_the_html_from_the_json(tmp_path: Path) -> None:
    # Prepare: a run folder with a bias report and no HTML
    import numpy as np

    from radfed.bias.report import build_report
    from tests.bias.test_report import CONFIG as REPORT_CONFIG
    from tests.bias.test_report import _cells, _site

    run = RunFolder.start(tmp_path / "run", REPORT_CONFIG)
    cells = {"site-a": {"val": _cells(_site(np.random.default_rng(0), 100), REPORT_CONFIG)}}
    run.write_bias_report(build_report(TASK, REPORT_CONFIG, cells, server_round=1, run=run))
    # Execute
    result = runner.invoke(app, ["report", str(run.path)])
    # Assert
    assert result.exit_code == 0, result.output
    html = (run.path / "bias_report.html").read_text()
    assert "site-a" in html and "data:image/png;base64," in html


def test_evaluate_follows_the_site_policy_as_a_round_would(site_copy: Path, tmp_path: Path) -> None:
    # Prepare: a checkpoint of a run asking for age bands the site does not use
    config = dataclasses.replace(CONFIG, age_bands=(18, 66))
    run = RunFolder.start(tmp_path / "run", config)
    checkpoint = run.save_checkpoint(0, build_model(config).state_dict(), config)

    # Execute
    result = runner.invoke(
        app,
        [
            "evaluate",
            "--checkpoint",
            str(checkpoint),
            "--data",
            str(site_copy),
            "--out",
            str(tmp_path / "e"),
        ],
    )

    # Assert: refused as a round would be, naming the setting and what the site allows
    assert result.exit_code != 0
    assert "age-bands 18,66" in result.output and "18,40,60,80" in result.output
