"""Running radfed as its own process in end-to-end tests, and stopping it by PID."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path


def run_simulate(flwr_home: Path, *args: str, env: dict[str, str] | None = None) -> str:
    """Run `radfed simulate` as its own process group; stop the group by PID whatever happens.

    ``env``: variables set for the command on top of this process's environment (e.g. the
    run store, ``RADFED_STORE``).
    """
    full_env = {
        **os.environ,
        "FLWR_HOME": str(flwr_home),
        "FLWR_TELEMETRY_ENABLED": "0",
        "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
        **(env or {}),
    }
    command = [sys.executable, "-m", "radfed", "simulate", *args]
    process = subprocess.Popen(
        command,
        env=full_env,
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


class Background:
    """A radfed command running in its own process group, with its output in a log file.

    ``stop`` ends the group by the PID this object started (SIGTERM, then SIGKILL), so the
    Flower processes it spawned (SuperExec, ServerApp, ClientApp) end with it. A restarted
    command appends to the same log; ``output`` is this process's part of it only.
    """

    def __init__(self, log: Path, *args: str, env: dict[str, str] | None = None) -> None:
        self.log = log
        self._handle = log.open("ab")
        self._start = self._handle.tell()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "radfed", *args],
            env={**os.environ, **(env or {})},
            stdout=self._handle,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.pid = self.process.pid

    def output(self) -> str:
        with self.log.open("rb") as handle:
            handle.seek(self._start)
            return handle.read().decode(errors="replace")

    def wait_for(self, text: str, timeout: float) -> None:
        """Block until ``text`` appears in the output; fail with the output otherwise."""
        deadline = time.monotonic() + timeout
        while text not in self.output():
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"{text!r} not seen; output:\n{self.output()[-4000:]}")
            time.sleep(0.5)

    def wait(self, timeout: float) -> int:
        try:
            return self.process.wait(timeout=timeout)
        finally:
            self.stop()

    def stop(self) -> None:
        for sig, grace in ((signal.SIGTERM, 15.0), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(self.pid, sig)
            except ProcessLookupError:
                break
            deadline = time.monotonic() + grace
            while time.monotonic() < deadline and _group_alive(self.pid):
                self.process.poll()  # reap the leader, or it keeps the group alive as a zombie
                time.sleep(0.2)
            if not _group_alive(self.pid):
                break
        if self.process.poll() is None:
            self.process.wait(timeout=5)
        self._handle.close()


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True
