"""Export of a run folder to MLflow, read back from a local SQLite tracking store."""

from __future__ import annotations

import json
import logging
import re
import socket
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from radfed.errors import ConfigError
from radfed.store import open_store, sync_run
from radfed.store.mlflow_export import RUN_FOLDER_TAG, RUN_ID_TAG, export_run, metric_key

# A run-config as config.json holds it: kebab-case keys; text, integers, floats, booleans.
_RUN_CONFIG: dict[str, Any] = {
    "task": "classification",
    "num-server-rounds": 2,
    "data-root": "/tmp/x/data",
    "seed": 3,
    "model": "",
    "image-size": 64,
    "augment": True,
    "learning-rate": 0.001,
    "eval-splits": "train,val",
    "round-timeout": 3600.0,
    "voi-lut": False,
    "strategy": "fedavg",
    "subgroups": "sex,age_band,manufacturer,sex*age_band",
}

# Lines as RunFolder.append_metrics writes them: per site and pooled ("ALL"), a suppressed
# cell (n and metrics null), a metric undefined at one site, DP noise on one line, and a
# site whose name MLflow would not take in a key.
_ODD_SITE = "Klinik Süd/2"
_LINES: list[dict[str, Any]] = [
    {
        "round": 1,
        "site": "site-a",
        "split": "train",
        "n": 22,
        "suppressed": False,
        "metrics": {"auc": 0.205357, "ece": 0.278227, "auc-influence": 0.074013},
    },
    {
        "round": 1,
        "site": _ODD_SITE,
        "split": "train",
        "n": 25,
        "suppressed": False,
        "metrics": {"auc": 0.286667, "ece": None, "auc-influence": 0.128927},
    },
    {
        "round": 1,
        "site": "ALL",
        "split": "train",
        "n": 47,
        "suppressed": False,
        "metrics": {"auc": 0.34332, "ece": 0.171669},
    },
    {
        "round": 1,
        "site": "site-a",
        "split": "val",
        "n": None,
        "suppressed": True,
        "metrics": {"auc": None, "ece": None},
    },
    {
        "round": 2,
        "site": "site-a",
        "split": "train",
        "n": 22,
        "suppressed": False,
        "metrics": {"auc": 0.241071, "ece": 0.25, "auc-influence": 0.07},
        "noise_sd": 0.5,
    },
    {
        "round": 2,
        "site": "ALL",
        "split": "val",
        "n": 12,
        "suppressed": False,
        "metrics": {"auc": 0.1 + 0.2, "ece": 1e-17},
    },
]

pytestmark = pytest.mark.filterwarnings(
    # MLflow's SQL store on SQLAlchemy 2.1 (mlflow/store/tracking/sqlalchemy_store.py).
    "ignore:The ``noload`` loader strategy is deprecated:DeprecationWarning"
)

_ARTIFACTS = {"config.json", "metrics.jsonl", "bias_report.json", "bias_report.html", "curves.png"}


@dataclass(frozen=True)
class _Store:
    uri: str
    artifacts: Path


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[_Store]:
    """One SQLite tracking store for the module (creating its tables takes a second)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
        patch.setenv("DO_NOT_TRACK", "1")
        folder = tmp_path_factory.mktemp("mlflow")
        yield _Store(f"sqlite:///{folder / 'mlflow.db'}", folder / "artifacts")


@pytest.fixture
def experiment() -> str:
    """A new experiment for each test, so that tests share the store but not runs."""
    return f"radfed-test-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    """A small run folder in the formats radfed writes, checkpoints included."""
    return _write_run_folder(tmp_path / "run-2026-01", _RUN_CONFIG)


def _write_run_folder(
    path: Path,
    run_config: dict[str, Any],
    *,
    run_id: object = "",
    curves: bool = True,
) -> Path:
    """A run folder; config.json's ``run-id`` is new unless given (None: none, as before)."""
    (path / "checkpoints").mkdir(parents=True)
    document: dict[str, Any] = {"run-id": run_id or uuid.uuid4().hex} if run_id is not None else {}
    document |= {"run-config": run_config, "radfed-version": "0.1.0", "stats-schema-version": 3}
    (path / "config.json").write_text(json.dumps(document, indent=2) + "\n")
    (path / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in _LINES))
    report = {"format": "radfed-bias-report", "format_version": 2, "task": "classification"}
    (path / "bias_report.json").write_text(json.dumps(report, indent=1) + "\n")
    (path / "bias_report.html").write_text("<!DOCTYPE html>\n<html><body>bias</body></html>\n")
    if curves:
        (path / "curves.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(32))
    for name in ("round-000.pt", "round-001.pt", "round-002.pt", "server-state.pt"):
        (path / "checkpoints" / name).write_bytes(b"weights")
    return path


def _export(store: _Store, run_dir: Path, experiment: str, **options: Any) -> str:
    return export_run(
        run_dir,
        tracking_uri=store.uri,
        experiment=experiment,
        artifact_location=str(store.artifacts / experiment),
        **options,
    )


def _client(store: _Store) -> Any:
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=store.uri)


def _expected_metrics() -> dict[str, list[tuple[int, float]]]:
    expected: dict[str, list[tuple[int, float]]] = {}
    for line in _LINES:
        values = {**line["metrics"], "n": line["n"]}
        if "noise_sd" in line:
            values["noise_sd"] = line["noise_sd"]
        for name, value in values.items():
            if value is not None:
                key = metric_key(line["split"], line["site"], name)
                expected.setdefault(key, []).append((line["round"], value))
    return expected


def _active_runs(client: Any, experiment: str) -> list[Any]:
    experiment_id = client.get_experiment_by_name(experiment).experiment_id
    return list(client.search_runs([experiment_id]))


def test_export_logs_every_value_by_round_without_network(
    store: _Store, run_dir: Path, experiment: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: any attempt to reach the network fails the test
    attempts: list[object] = []

    def refuse(*args: object, **kwargs: object) -> None:
        attempts.append(args)
        raise OSError("network use in a unit test")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)

    # Execute
    run_id = _export(store, run_dir, experiment)

    # Assert: every non-null value, at its round, exactly; nothing else
    client = _client(store)
    run = client.get_run(run_id)
    expected = _expected_metrics()
    assert set(run.data.metrics) == set(expected)
    for key, points in expected.items():
        logged = [(m.step, m.value) for m in client.get_metric_history(run_id, key)]
        assert sorted(logged) == sorted(points), key
    assert expected["val/ALL/auc"] == [(2, 0.1 + 0.2)]
    assert expected["train/site-a/n"] == [(1, 22), (2, 22)]
    assert "train/site-a/noise_sd" in expected
    assert run.info.status == "FINISHED"
    assert attempts == []


def test_metric_keys_take_odd_site_names_apart() -> None:
    # Execute
    odd = metric_key("train", _ODD_SITE, "auc")
    keys = {metric_key("val", site, "auc") for site in ("a/b", "a_b", "a b", ".", "..", "")}
    long_a = metric_key("val", "x" * 300 + "a", "auc")
    long_b = metric_key("val", "x" * 300 + "b", "auc")

    # Assert: allowed characters, three parts, distinct, the same every time
    for key in [odd, *keys, long_a, long_b]:
        assert re.fullmatch(r"[A-Za-z0-9_.\- /]+", key), key
        assert len(key) <= 250
    assert odd.startswith("train/Klinik S_d_2-") and odd.count("/") == 2
    assert odd == metric_key("train", _ODD_SITE, "auc")
    assert len(keys) == 6
    assert long_a != long_b
    assert metric_key("val", "site-a", "auc-influence") == "val/site-a/auc-influence"


def test_export_logs_params_tags_and_reports_but_no_checkpoint(
    store: _Store, run_dir: Path, experiment: str
) -> None:
    # Execute
    run_id = _export(store, run_dir, experiment)

    # Assert
    client = _client(store)
    run = client.get_run(run_id)
    assert run.data.params == {
        key: value if isinstance(value, str) else json.dumps(value)
        for key, value in _RUN_CONFIG.items()
    }
    assert run.data.params["augment"] == "true"
    assert run.data.params["model"] == ""
    tags = run.data.tags
    assert tags["radfed.version"] == "0.1.0"
    assert tags["radfed.task"] == "classification"
    assert tags["radfed.strategy"] == "fedavg"
    assert tags[RUN_FOLDER_TAG] == "run-2026-01"
    assert str(run_dir.parent) not in json.dumps(tags)
    assert tags["mlflow.runName"] == "run-2026-01"
    artifacts = {info.path for info in client.list_artifacts(run_id)}
    assert artifacts == _ARTIFACTS
    assert not any(info.is_dir for info in client.list_artifacts(run_id))
    stored = Path(run.info.artifact_uri.removeprefix("file://"))
    assert sorted(p.name for p in stored.rglob("*")) == sorted(_ARTIFACTS)
    assert (stored / "metrics.jsonl").read_bytes() == (run_dir / "metrics.jsonl").read_bytes()


def test_second_export_is_refused_and_replace_keeps_one_run(
    store: _Store, run_dir: Path, experiment: str
) -> None:
    # Prepare
    first = _export(store, run_dir, experiment)

    # Execute / Assert: a second export names the first run and logs nothing
    with pytest.raises(ConfigError, match=f"already exported.*{first}.*replace=True"):
        _export(store, run_dir, experiment)
    client = _client(store)
    assert [r.info.run_id for r in _active_runs(client, experiment)] == [first]

    # Execute / Assert: replace exports again and deletes the first
    second = _export(store, run_dir, experiment, replace=True)
    runs = _active_runs(client, experiment)
    assert [r.info.run_id for r in runs] == [second]
    assert second != first
    assert runs[0].data.tags[RUN_ID_TAG] == client.get_run(first).data.tags[RUN_ID_TAG]
    assert client.get_run(first).info.lifecycle_stage == "deleted"


def test_run_id_of_config_json_identifies_the_export(
    store: _Store, tmp_path: Path, experiment: str
) -> None:
    # Prepare: two copies of one run (same run-id) in different folders, and another run
    copies = [_write_run_folder(tmp_path / name, _RUN_CONFIG, run_id=4711) for name in "ab"]
    other = _write_run_folder(tmp_path / "c", _RUN_CONFIG, run_id=4712)

    # Execute
    run_id = _export(store, copies[0], experiment)
    other_id = _export(store, other, experiment)

    # Assert
    client = _client(store)
    assert client.get_run(run_id).data.tags[RUN_ID_TAG] == "4711"
    assert client.get_run(other_id).data.tags[RUN_ID_TAG] == "4712"
    with pytest.raises(ConfigError, match="already exported"):
        _export(store, copies[1], experiment)


def test_folder_without_run_id_is_known_by_path_and_config(
    store: _Store, tmp_path: Path, experiment: str
) -> None:
    # Prepare: an older run folder, whose config.json has no run-id; a changed copy of it
    folder = _write_run_folder(tmp_path / "old", _RUN_CONFIG, run_id=None)
    changed = _write_run_folder(tmp_path / "changed", {**_RUN_CONFIG, "seed": 4}, run_id=None)

    # Execute
    first = _export(store, folder, experiment)
    second = _export(store, changed, experiment)

    # Assert: a hash that stays the same for the folder, differs for another, and is the id
    # the run store gives the same folder
    client = _client(store)
    tag = client.get_run(first).data.tags[RUN_ID_TAG]
    assert re.fullmatch(r"[0-9a-f]{32}", tag)
    assert tag == sync_run(open_store(f"sqlite:///{tmp_path / 'runs.sqlite'}"), folder)
    assert client.get_run(second).data.tags[RUN_ID_TAG] != tag
    with pytest.raises(ConfigError, match=f"already exported.*{first}"):
        _export(store, folder, experiment)


def test_long_and_nested_settings_and_a_missing_plot(
    store: _Store, tmp_path: Path, experiment: str, caplog: pytest.LogCaptureFixture
) -> None:
    # Prepare
    run_config = {**_RUN_CONFIG, "sites": "s" * 7000, "extra": {"weights": [1, 2]}}
    run_dir = _write_run_folder(tmp_path / "run", run_config, curves=False)
    caplog.set_level(logging.INFO, logger="radfed")

    # Execute
    run_id = _export(store, run_dir, experiment)

    # Assert: truncated with a warning that names the setting; nested keys dotted
    client = _client(store)
    params = client.get_run(run_id).data.params
    assert params["sites"] == "s" * 6000
    assert params["extra.weights"] == "[1, 2]"
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("'sites' is 7000 characters long" in m for m in warnings), warnings
    assert {info.path for info in client.list_artifacts(run_id)} == _ARTIFACTS - {"curves.png"}
    assert any("curves.png is not in the run folder" in r.getMessage() for r in caplog.records)
    assert any("4 artifacts" in r.getMessage() for r in caplog.records)


def test_failed_export_leaves_no_run_behind(
    store: _Store, run_dir: Path, experiment: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: the artifact store fails after the metrics were logged
    from mlflow.tracking import MlflowClient

    def fail(*args: object, **kwargs: object) -> None:
        raise OSError("artifact store full")

    with monkeypatch.context() as patch:
        patch.setattr(MlflowClient, "log_artifact", fail)

        # Execute
        with pytest.raises(OSError, match="artifact store full"):
            _export(store, run_dir, experiment)

    # Assert: the incomplete run is deleted, so exporting again is not refused
    client = _client(store)
    assert _active_runs(client, experiment) == []
    run_id = _export(store, run_dir, experiment)
    assert [r.info.run_id for r in _active_runs(client, experiment)] == [run_id]


def test_not_a_run_folder(store: _Store, tmp_path: Path, experiment: str) -> None:
    # Execute / Assert
    with pytest.raises(ConfigError, match=r"not a run folder.*config\.json and metrics\.jsonl"):
        _export(store, tmp_path, experiment)


def test_missing_mlflow_names_the_extra(
    monkeypatch: pytest.MonkeyPatch, run_dir: Path, tmp_path: Path
) -> None:
    # Prepare
    monkeypatch.chdir(tmp_path)
    for name in ("mlflow", "mlflow.entities", "mlflow.tracking"):
        monkeypatch.setitem(sys.modules, name, None)

    # Execute / Assert
    with pytest.raises(ConfigError, match=re.escape("pip install 'radfed[mlflow]'")):
        export_run(run_dir, tracking_uri="sqlite:///unused.db")
    assert not Path("unused.db").exists()
