"""Flower users' way in: `flwr run .` against a local simulation connection runs the radfed app."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from radfed.data.synth import synth_classification
from radfed.folders import find_app_dir

#: Ray-backed simulations run one at a time, on one pytest-xdist worker.
pytestmark = [pytest.mark.e2e, pytest.mark.xdist_group("ray")]
LOCAL_CONTROL_PORT = 39093  # Flower's managed local SuperLink (flwr.cli.constant)


def _port_free(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) != 0


def _superlink_pids(flwr_home: Path) -> list[int]:
    """PIDs of the SuperLink that `flwr run` started for this FLWR_HOME (found by its log path)."""
    found = subprocess.run(
        ["pgrep", "-f", f"flower-superlink.*{flwr_home}"], capture_output=True, text=True
    )
    return [int(pid) for pid in found.stdout.split()]


def test_flwr_run_dot_trains_and_writes_the_run_folder(tmp_path: Path) -> None:
    # Prepare
    assert _port_free(LOCAL_CONTROL_PORT), (
        "another local Flower SuperLink is running; stop it first"
    )
    data, out, home = tmp_path / "data", tmp_path / "run", tmp_path / "flwr-home"
    synth_classification(data, sites=2, cases_per_site=16, seed=4, image_size=32)
    home.mkdir()
    (home / "config.toml").write_text(
        '[superlink]\ndefault = "local"\n\n'
        '[superlink.local]\naddress = ":local:"\noptions.num-supernodes = 2\n'
    )
    bin_dir = str(Path(sys.executable).parent)
    env = {
        **os.environ,
        "FLWR_HOME": str(home),
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
    }
    run_config = (
        f'data-root="{data}" out-dir="{out}" min-sites=2 num-server-rounds=2 '
        "image-size=32 local-epochs=1 min-cell-size=2"
    )
    command = [
        str(Path(bin_dir) / "flwr"),
        "run",
        ".",
        "local",
        "--stream",
        "--run-config",
        run_config,
    ]
    # Execute
    try:
        process = subprocess.run(
            command, cwd=find_app_dir(), env=env, capture_output=True, text=True, timeout=420
        )
    finally:
        for pid in _superlink_pids(home):  # the SuperLink outlives `flwr run`: stop it by PID
            os.killpg(os.getpgid(pid), signal.SIGTERM)
        deadline = time.monotonic() + 20
        while _superlink_pids(home) and time.monotonic() < deadline:
            time.sleep(0.5)
        for pid in _superlink_pids(home):
            os.killpg(os.getpgid(pid), signal.SIGKILL)
    # Assert
    assert process.returncode == 0, process.stdout[-3000:] + process.stderr[-3000:]
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert {(line["round"], line["site"]) for line in lines} == {
        (r, s) for r in (1, 2) for s in ("site-a", "site-b", "ALL")
    }
    assert (out / "checkpoints" / "round-002.pt").is_file()
    assert not _superlink_pids(home)
