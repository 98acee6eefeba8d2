"""The command line: parses, calls the library, and fails early with a clear message."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from radfed.cli import app
from radfed.cli.output import print_summary
from radfed.tasks import get_task

runner = CliRunner()


def test_synth_writes_sites_and_reports_counts(tmp_path: Path) -> None:
    result = runner.invoke(
        app,
        [
            "synth",
            "--out",
            str(tmp_path / "d"),
            "--sites",
            "2",
            "--cases-per-site",
            "8",
            "--image-size",
            "32",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "site-b" in result.output
    assert sorted(p.name for p in (tmp_path / "d").iterdir() if p.is_dir()) == ["site-a", "site-b"]


def test_simulate_refuses_a_data_root_without_sites_before_flower_starts(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    result = runner.invoke(
        app, ["simulate", "--data", str(tmp_path / "empty"), "--out", str(tmp_path / "r")]
    )
    assert result.exit_code == 2
    assert "no site folders" in result.output
    assert not (tmp_path / "r").exists()


def test_simulate_refuses_a_site_without_manifest_column(tmp_path: Path) -> None:
    site = tmp_path / "data" / "site-a"
    site.mkdir(parents=True)
    (site / "manifest.csv").write_text("image,label\na.dcm,1\n")
    result = runner.invoke(
        app, ["simulate", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "r")]
    )
    assert result.exit_code == 2
    assert "site-a/manifest.csv: missing required column(s) patient_id" in result.output


def test_simulate_refuses_an_unknown_run_config_key(synth_root: Path, tmp_path: Path) -> None:
    result = runner.invoke(
        app,
        [
            "simulate",
            "--data",
            str(synth_root),
            "--out",
            str(tmp_path / "r"),
            "--run-config",
            "no-such-key=1",
        ],
    )
    assert result.exit_code == 2
    assert "no-such-key" in result.output


def test_simulate_refuses_a_model_the_task_does_not_have(synth_root: Path, tmp_path: Path) -> None:
    result = runner.invoke(
        app,
        [
            "simulate",
            "--data",
            str(synth_root),
            "--out",
            str(tmp_path / "r"),
            "--run-config",
            'model="unet"',
        ],
    )
    assert result.exit_code == 2
    assert "'model' for classification must be one of cnn, resnet18" in result.output
    assert not (tmp_path / "r").exists()


def test_simulate_refuses_an_unreachable_ray_cluster_without_a_traceback(
    synth_root: Path, tmp_path: Path
) -> None:
    # Prepare: a loopback port nothing listens on
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]

    # Execute
    result = runner.invoke(
        app,
        [
            "simulate",
            "--data",
            str(synth_root),
            "--out",
            str(tmp_path / "r"),
            "--ray-address",
            f"127.0.0.1:{port}",
        ],
    )

    # Assert
    assert result.exit_code == 2
    assert f"--ray-address 127.0.0.1:{port}: no Ray cluster can be reached there" in result.output
    assert f"ray start --head --port={port}" in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "r").exists()


def test_simulate_refuses_a_ray_address_that_is_not_host_and_port(tmp_path: Path) -> None:
    result = runner.invoke(
        app,
        ["simulate", "--data", str(tmp_path), "--out", str(tmp_path / "r"), "--ray-address", "x"],
    )
    assert result.exit_code == 2
    assert "--ray-address must be HOST:PORT" in result.output


def _run_folder(folder: Path, sites: list[str], rounds: int = 2) -> Path:
    """A run folder as the server writes it: config.json and metrics.jsonl (binary task)."""
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"run-config": {"num-server-rounds": rounds}}))
    lines = []
    for round_ in range(1, rounds + 1):
        for site in [*sites, "ALL"]:
            metrics = {"auc": 0.8, "sensitivity": 0.7, "specificity": 0.9, "accuracy": 0.8}
            line = {"round": round_, "site": site, "split": "val", "n": 40, "metrics": metrics}
            lines.append(json.dumps({**line, "suppressed": False}))
    (folder / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def test_the_summary_shows_only_metrics_the_task_computed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "200")
    run = _run_folder(tmp_path / "run", ["site-a", "site-b"])

    print_summary(run, get_task("classification").summary)

    out = capsys.readouterr().out
    assert "round 2 (pooled = ALL" in out and "specificity" in out
    assert "balanced_accuracy" not in out and "n/a" not in out


def test_the_summary_never_cuts_a_site_name_in_a_narrow_log(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "80")
    sites = ["university-hospital-north", "regional-clinic-south"]
    run = _run_folder(tmp_path / "run", sites)

    print_summary(run, get_task("classification").summary)

    out = capsys.readouterr().out
    assert "…" not in out
    for site in [*sites, "ALL"]:
        assert f"  {site} val: n 40; auc 0.800, sensitivity 0.700" in out


def test_a_run_with_no_completed_round_says_so_and_how_to_resume(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = _run_folder(tmp_path / "run", ["a"], rounds=0)

    with pytest.raises(typer.Exit) as ended:
        print_summary(run, get_task("classification").summary, resume_hint="radfed launch --resume")

    assert ended.value.exit_code == 1
    assert capsys.readouterr().err.strip() == (
        f"error: no round completed in {run}; nothing to summarise; "
        "continue with radfed launch --resume"
    )


def test_a_run_that_stopped_early_says_how_to_continue(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    run = _run_folder(tmp_path / "run", ["a"], rounds=3)
    lines = (run / "metrics.jsonl").read_text().splitlines()
    (run / "metrics.jsonl").write_text("\n".join(lines[:2]) + "\n")  # round 1 only

    print_summary(run, get_task("classification").summary, resume_hint="radfed launch --resume")

    out = capsys.readouterr().out
    assert "round 1 (pooled" in out
    assert "the run stopped after round 1 of 3; continue with radfed launch --resume" in out


def _with_report(run: Path, per_site: dict[str, list[object]]) -> None:
    from tests.bias.test_gaps import _report

    (run / "bias_report.json").write_text(json.dumps(_report(per_site)))  # type: ignore[arg-type]


def test_closing_lines_never_say_no_gap_alone_while_gaps_are_inconclusive(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: a 0.3 sensitivity gap at a site of 40 cases: too few to tell
    from tests.bias.test_gaps import _site

    monkeypatch.setenv("COLUMNS", "200")
    run = _run_folder(tmp_path / "run", ["a"])
    _with_report(run, {"a": _site({"F": (10, 0.6, 10, 0.8), "M": (10, 0.9, 10, 0.8)})})
    # Execute
    print_summary(run, get_task("classification").summary)
    # Assert
    out = capsys.readouterr().out
    assert "bias report: 0 gap(s) flagged, 0 within margin ±0.05," in out
    assert "inconclusive (too few cases)" in out
    assert "not evidence of no bias" in out
    assert "a sex sensitivity: F 0.600 (n 20) vs M 0.900 (n 20), difference -0.300" in out
    assert "resolved at about" in out


def test_closing_lines_name_the_site_that_drives_a_pooled_flag(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from tests.bias.test_gaps import _two_sites_one_failing

    monkeypatch.setenv("COLUMNS", "200")
    run = _run_folder(tmp_path / "run", ["site-a", "site-b", "site-c"])
    _with_report(run, _two_sites_one_failing())  # type: ignore[arg-type]

    print_summary(run, get_task("classification").summary)

    out = capsys.readouterr().out
    assert "flagged, largest first:" in out
    pooled = next(line for line in out.splitlines() if "val ALL sex sensitivity" in line)
    assert "driven by site-b (heterogeneous across sites)" in pooled
    assert "not evidence of no bias" not in out
