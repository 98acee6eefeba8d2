"""The command line: parses, calls the library, and fails early with a clear message."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from radfed.cli import app

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
