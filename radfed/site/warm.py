"""A warm interpreter for the site's tasks: torch and radfed imported once, a fork per task.

Flower's SuperExec starts a fresh ``flwr-clientapp`` process for every message the server
sends, and each one imports torch, MONAI and radfed again: seconds per message, most of a
deployed round. ``WarmStarter`` (used by the site's SuperExec, ``radfed.site.superexec``)
keeps one process that has imported them and forks it for each task: the child runs exactly
what the site's ``flwr-clientapp`` runs (``radfed.site.runtime``, the radfed installed
here), with the task's arguments.

The two talk over a socket pair that only they hold (no file, no port: no other process
can ask for a task), one JSON line each way. The task's token travels over it and never on
a command line, where other local users could read it. The warm process imports libraries
but runs no model and never touches CUDA (a CUDA context does not survive a fork); it dies
with the SuperExec that started it. Should it be missing or fail, the SuperExec starts the
site's program as before (``start`` returns False) and a later check starts a new one.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import IO, Any

from radfed.log import logger

__all__ = ["PRELOAD", "WARM_TASKS_ENV", "WarmStarter", "serve"]

#: Set to ``0`` to start every task cold, as Flower does.
WARM_TASKS_ENV = "RADFED_WARM_TASKS"
#: What the warm process imports before its first fork: everything a task imports.
PRELOAD = (
    "torch",
    "monai.transforms",
    "flwr.supernode.cli.flwr_clientapp",
    "flwr.supernode.runtime.run_clientapp",
    "httpcore",  # Flower's runtime client imports it (and trio, h11) on first use: 98 modules
    "radfed.site.runtime",
    "radfed.site.handlers",
    "radfed.tasks",
)
#: The task's entry point in the forked child: ``module:function``.
_TARGET = "radfed.site.runtime:main"
#: How long a task waits for the warm process to finish importing before starting cold.
_READY_TIMEOUT = 180.0
#: How long the warm process may take to say it forked.
_REPLY_TIMEOUT = 10.0
_PR_SET_PDEATHSIG = 1


class WarmStarter:
    """The SuperExec's side: starts the warm process and asks it to fork a task.

    Attributes:
        preload: modules the warm process imports before its first fork.
        target: ``module:function`` the child runs (the site's ``flwr-clientapp``).
    """

    def __init__(self, *, preload: Sequence[str] = PRELOAD, target: str = _TARGET) -> None:
        self.preload, self.target = tuple(preload), target
        self._process: subprocess.Popen[bytes] | None = None
        self._socket: socket.socket | None = None
        self._reader: IO[str] | None = None
        self._ready = False
        self.ready_info: dict[str, Any] = {}

    @property
    def pid(self) -> int | None:
        """The warm process's PID while it runs."""
        if self._process is None or self._process.poll() is not None:
            return None
        return self._process.pid

    def check(self) -> None:
        """Start the warm process if there is none, or a new one if it has ended."""
        if self._process is not None and self._process.poll() is None:
            return
        if self._process is not None:
            logger.warning(
                "the warm task process ended (exit code %s); starting a new one",
                self._process.returncode,
            )
        self.close()
        ours, theirs = socket.socketpair()
        self._process = subprocess.Popen(
            [
                *(sys.executable, "-P", "-m", "radfed.site.warm"),
                *(str(theirs.fileno()), self.target, *self.preload),
            ],
            stdin=subprocess.DEVNULL,
            pass_fds=(theirs.fileno(),),
        )
        theirs.close()
        self._socket, self._reader = ours, ours.makefile("r", encoding="utf-8")
        self._ready = False

    def start(self, argv: Sequence[str]) -> bool:
        """Fork a task that runs with ``argv`` (the site's ``flwr-clientapp`` arguments).

        Returns:
            Whether the task was started; False: start it cold instead.
        """
        try:
            self.check()
            if not self._ready and not self._await_ready():
                return False
            assert self._socket is not None
            self._socket.settimeout(_REPLY_TIMEOUT)
            self._socket.sendall(json.dumps({"argv": list(argv)}).encode() + b"\n")
            reply = self._read()
        except (OSError, ValueError) as err:
            logger.warning("the warm task process failed (%s); starting the task cold", err)
            self.close()
            return False
        if "pid" not in reply:
            logger.warning("the warm task process could not fork; starting the task cold")
            return False
        return True

    def close(self) -> None:
        """Stop the warm process (tasks it forked go on: they are their own processes)."""
        for closable in (self._reader, self._socket):
            if closable is not None:
                with contextlib.suppress(OSError):
                    closable.close()
        self._reader = self._socket = None
        if self._process is not None and self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        self._ready = False

    def _await_ready(self) -> bool:
        assert self._socket is not None
        self._socket.settimeout(_READY_TIMEOUT)
        try:
            info = self._read()
        except (OSError, ValueError) as err:
            logger.warning("the warm task process did not start (%s); tasks start cold", err)
            self.close()
            return False
        self._ready = bool(info.get("ready"))
        self.ready_info = info
        if self._ready:
            logger.info(
                "warm task process ready: imports took %.1f s, once for every task",
                float(info.get("import_s", 0.0)),
            )
        return self._ready

    def _read(self) -> dict[str, Any]:
        assert self._reader is not None
        line = self._reader.readline()
        if not line:
            raise OSError("the warm task process closed its end")
        found = json.loads(line)
        if not isinstance(found, dict):
            raise ValueError("the warm task process sent something other than a JSON object")
        return found


def serve(channel: socket.socket, target: str, preload: Sequence[str]) -> None:
    """The warm process: import ``preload``, then fork a child per request on ``channel``.

    Each request is a JSON line ``{"argv": [...]}``; the reply is ``{"pid": N}`` once the
    child runs, or ``{"error": "..."}``. Returns when the SuperExec closes its end.
    """
    began = time.perf_counter()
    for name in preload:
        importlib.import_module(name)
    module, _, function = target.partition(":")
    entry = getattr(importlib.import_module(module), function)
    imported = time.perf_counter() - began
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # ended children are reaped by the kernel
    reader = channel.makefile("r", encoding="utf-8")
    _reply(channel, {"ready": True, "import_s": round(imported, 3), "threads": _threads()})
    for line in reader:
        try:
            argv = json.loads(line)["argv"]
            if not isinstance(argv, list) or not all(isinstance(a, str) for a in argv):
                raise TypeError("argv is not a list of strings")
        except (ValueError, KeyError, TypeError) as err:
            _reply(channel, {"error": f"bad request: {type(err).__name__}"})
            continue
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            reader.close()
            channel.close()
            _run_task(entry, argv)  # never returns
        _reply(channel, {"pid": pid})


def _run_task(entry: Any, argv: list[str]) -> None:
    """In the forked child: be the task's ``flwr-clientapp``, then exit with its code."""
    code = 1
    try:
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # the task may wait for its own children
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        sys.argv = list(argv)
        result = entry()
        code = result if isinstance(result, int) else 0
    except SystemExit as done:
        code = done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
    except BaseException as err:  # the type only: its text may hold data
        with contextlib.suppress(Exception):
            sys.stderr.write(f"radfed: the task ended with {type(err).__name__}\n")
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)


def _reply(channel: socket.socket, message: dict[str, Any]) -> None:
    channel.sendall(json.dumps(message).encode() + b"\n")


def _threads() -> int:
    """The process's OS threads (the libraries' own pools count too)."""
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:
        return 0


def _die_with_parent() -> None:
    """Linux: end this process when the SuperExec that started it ends, however it ends."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def main() -> None:
    """``python -P -m radfed.site.warm FD TARGET [MODULE ...]``: the warm process."""
    _die_with_parent()
    if os.getppid() == 1:  # the SuperExec ended before prctl took effect
        sys.exit(0)
    fd, target, *preload = sys.argv[1:]
    channel = socket.socket(fileno=int(fd))
    try:
        serve(channel, target, preload)
    except (BrokenPipeError, ConnectionResetError):
        pass  # the SuperExec went away
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
