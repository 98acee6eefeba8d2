"""Shared fixtures: an isolated Flower home, and small synthetic sites written as real DICOM."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from radfed.data.synth import synth_classification


def pytest_configure(config: pytest.Config) -> None:
    """Runs started by module- and session-scoped fixtures write to a store of the test
    session's, never the user's (each test gets its own below)."""
    folder = Path(tempfile.mkdtemp(prefix="radfed-test-store-"))
    os.environ["RADFED_STORE"] = f"sqlite:///{folder / 'runs.sqlite'}"


@pytest.fixture(autouse=True)
def _isolated_flower_home(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FLWR_HOME", str(tmp_path_factory.mktemp("flwr-home")))
    # every run a test starts writes to a store of its own, never the user's
    store = tmp_path_factory.mktemp("store") / "runs.sqlite"
    monkeypatch.setenv("RADFED_STORE", f"sqlite:///{store}")
    monkeypatch.setenv("FLWR_TELEMETRY_ENABLED", "0")
    monkeypatch.setenv("FLWR_DISABLE_UPDATE_CHECK", "1")


@pytest.fixture(autouse=True)
def _restore_log_levels() -> Iterator[None]:
    """CLI tests configure logging as the application would; undo it after each test."""
    loggers = [logging.getLogger(name) for name in ("radfed", "flwr")]
    levels = [log.level for log in loggers]
    yield
    for log, level in zip(loggers, levels, strict=True):
        log.setLevel(level)


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three generated sites (read-only for tests: copy before changing)."""
    root = tmp_path_factory.mktemp("synth") / "data"
    synth_classification(root, sites=3, cases_per_site=24, seed=11, image_size=32)
    return root


@pytest.fixture
def site_copy(synth_root: Path, tmp_path: Path) -> Path:
    """A private, writable copy of site-a, without the state other tests may have left in
    the shared synth_root (audit log, cache, splits)."""
    target = tmp_path / "site-a"
    shutil.copytree(synth_root / "site-a", target, ignore=shutil.ignore_patterns(".radfed"))
    return target
