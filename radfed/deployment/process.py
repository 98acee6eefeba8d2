"""Starting Flower's processes as radfed runs them: the environment every deployment sets,
the command line type, and running one in the foreground with signals passed on.

Flower defaults that every deployment changes (see FLOWER.md): no runtime dependency
installation, no telemetry, no update checks.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from radfed.errors import ConfigError
from radfed.log import logger

__all__ = [
    "HARDENED_ENV",
    "Command",
    "flower_tool",
    "port_is_free",
    "run_foreground",
    "wait_for_port",
]

#: Environment of every Flower process radfed starts.
HARDENED_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
}


@dataclass(frozen=True)
class Command:
    """A command line and the environment it needs on top of the caller's.

    Attributes:
        argv: the command line.
        env: variables set on top of the caller's environment.
        path_first: folders searched before all others for the programs the process
            starts by name (then this Python's ``bin`` folder: Flower starts
            ``flower-superexec`` and the app processes by name).
    """

    argv: list[str]
    env: dict[str, str]
    path_first: tuple[Path, ...] = ()

    def environ(self) -> dict[str, str]:
        """The caller's environment with ``env`` over it, and ``path_first`` and this
        Python's ``bin`` folder first on PATH."""
        merged = {**os.environ, **self.env}
        first = [*map(str, self.path_first), str(Path(sys.executable).parent)]
        merged["PATH"] = os.pathsep.join([*first, merged.get("PATH", "")])
        return merged


def flower_tool(name: str) -> str:
    """A Flower executable of this environment (beside the running Python first)."""
    local = Path(sys.executable).parent / name
    found = str(local) if local.exists() else shutil.which(name)
    if not found:
        raise ConfigError(f"{name} not found; install radfed with its flwr dependency")
    return found


def port_is_free(host: str, port: int) -> bool:
    """Whether nothing listens on ``host:port``, so that a new server may.

    A port left in TIME_WAIT by a process that just ended counts as free, as it does for
    the server that reuses it (a restarted SuperNode).

    Raises:
        ConfigError: ``port`` is not a TCP port number.
    """
    if not 1 <= port <= 65535:
        raise ConfigError(f"port {port} is not a TCP port; give one in 1..65535")
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def wait_for_port(host: str, port: int, timeout: float = 60.0) -> None:
    """Block until something accepts TCP connections at ``host:port``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            sock.settimeout(1.0)
            if sock.connect_ex((host, port)) == 0:
                return
        time.sleep(0.2)
    raise ConfigError(f"nothing listens at {host}:{port} after {timeout:.0f} s")


def run_foreground(*commands: Command, then: Sequence[Command | Callable[[], None]] = ()) -> int:
    """Run ``commands`` side by side, passing SIGINT/SIGTERM on to them, until one ends;
    then stop the others. Returns the exit code of the one that ended first.

    Once ``commands`` are started, the steps of ``then`` run in order: a command is started
    beside them, a callable is called (and must return before the next step), so that what
    a step prepares (the server's site keys) is in place before a later process accepts
    anyone. An exception from a step stops everything started.
    """
    processes = [subprocess.Popen(c.argv, env=c.environ()) for c in commands]

    def forward(signum: int, _frame: object) -> None:
        for process in processes:
            if process.poll() is None:
                process.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        for step in then:
            if isinstance(step, Command):
                processes.append(subprocess.Popen(step.argv, env=step.environ()))
            else:
                step()
        while True:
            for process in processes:
                code = process.poll()
                if code is not None:
                    return code
            time.sleep(0.2)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        for process in processes:
            if process.poll() is None:
                process.terminate()
        for process in processes:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            logger.debug("process %d ended", process.pid)
