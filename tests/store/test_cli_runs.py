"""``radfed store import``, ``radfed runs list/show`` and ``radfed runs export-mlflow`` as a
user runs them: each in a fresh process, over SQLite and a real PostgreSQL server."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.store import run_folders as rf


def _radfed(*args: str, store: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(Path(sys.executable).parent / "radfed"), *args],
        env={**os.environ, "RADFED_STORE": store, "COLUMNS": "200"},
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'runs.sqlite'}"
    return str(request.getfixturevalue("postgres_db"))


def test_import_list_and_show(store_url: str, tmp_path: Path) -> None:
    # Prepare: a finished run whose site-c refused by policy, and a run still going
    done = rf.start(tmp_path / "finished", run_id="d" * 32)
    rf.event(done, "site-error", round_=1, site="site-c", code=3005, message="error code 3005")
    rf.round_(done, 1, replied=("site-a", "site-b"), dropped={"site-c": "error code 3005"})
    rf.event(done, "run-finished")
    going = rf.start(tmp_path / "going", run_id="e" * 32, rounds=5)
    rf.round_(going, 1)

    # Execute
    imported = _radfed("store", "import", str(done), str(going), store=store_url)
    listed = _radfed("runs", "list", "--json", store=store_url)
    table = _radfed("runs", "list", store=store_url)
    shown = _radfed("runs", "show", "finished", store=store_url)
    as_json = _radfed("runs", "show", "eee", "--json", store=store_url)

    # Assert
    for done_ in (imported, listed, table, shown, as_json):
        assert done_.returncode == 0, done_.stderr
    assert f"run {'d' * 32}" in imported.stdout and f"run {'e' * 32}" in imported.stdout
    runs = {r["name"]: r for r in json.loads(listed.stdout)}
    assert runs["finished"]["status"] == "finished" and runs["going"]["status"] == "running"
    assert runs["going"]["rounds_done"] == 1 and runs["going"]["rounds_planned"] == 5
    assert "finished" in table.stdout and "1/5" in table.stdout
    assert "site-c: refused (error code 3005)" in shown.stdout
    assert "1 flagged, 1 inconclusive (too few cases), 0 within margin" in shown.stdout
    assert "flagged: val site-b sex sensitivity: F vs M -0.400 [-0.550, -0.250]" in shown.stdout
    assert json.loads(as_json.stdout)["id"] == "e" * 32


def test_import_is_idempotent_and_catches_up(tmp_path: Path) -> None:
    # Prepare
    store = f"sqlite:///{tmp_path / 'runs.sqlite'}"
    run = rf.start(tmp_path / "run", rounds=2)
    rf.round_(run, 1)
    _radfed("store", "import", str(run), store=store)

    # Execute: the store missed round 2 (it was down): importing again catches up
    rf.round_(run, 2)
    again = _radfed("store", "import", str(run), str(run), store=store)
    shown = json.loads(_radfed("runs", "show", "run", "--json", store=store).stdout)

    # Assert
    assert again.returncode == 0
    assert shown["rounds_done"] == 2
    assert [p for p in shown["curves"]["val"]["ALL"]] == [[1, 0.68], [2, 0.73]]


def test_export_to_mlflow(tmp_path: Path) -> None:
    # Prepare
    run = rf.start(tmp_path / "run", rounds=1)
    rf.round_(run, 1)
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"

    # Execute
    first = _export(run, tracking, tmp_path)
    again = _export(run, tracking, tmp_path)

    # Assert
    assert first.returncode == 0, first.stderr
    assert "exported" in first.stdout and "MLflow run" in first.stdout
    assert again.returncode == 2 and "already exported" in again.stderr.splitlines()[-1]
    assert "Traceback" not in again.stderr


def _export(run: Path, tracking: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """`radfed runs export-mlflow RUN --tracking-uri TRACKING` in a fresh process."""
    return subprocess.run(
        [
            str(Path(sys.executable).parent / "radfed"),
            *("runs", "export-mlflow", str(run), "--tracking-uri", tracking),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=cwd,
        env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "1"},
    )
