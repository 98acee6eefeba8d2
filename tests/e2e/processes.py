"""Running radfed as its own process in end-to-end tests, and stopping it by PID."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path


def run_simulate(flwr_home: Path, *args: str) -> str:
    """Run `radfed simulate` as its own process group; stop the group by PID whatever happens."""
    env = {
        **os.environ,
        "FLWR_HOME": str(flwr_home),
        "FLWR_TELEMETRY_ENABLED": "0",
        "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
    }
    command = [sys.executable, "-m", "radfed", "simulate", *args]
    process = subprocess.Popen(
        command,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        output, _ = process.communicate(timeout=420)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)  # the simulation and everything it started
            process.wait()
    assert process.returncode == 0, output
    return output
