"""The programs a site's SuperExec may start, attacked: a server that asks for another kind
of task than a ClientApp (an agent app installs and imports the bundle's own code), and a
``radfed`` planted in the folder the site administrator starts from."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from flwr.proto.runtime_pb2 import AcquireTaskRequest, AcquireTaskResponse
from flwr.supercore.constant import TASK_TYPE_TO_COMMAND

from radfed.deployment.supernode import (
    CLIENTAPP_PROGRAM,
    REFUSED_PROGRAMS,
    install_site_programs,
    superexec_command,
)
from radfed.flower_private import SUPEREXEC_POLL_S
from radfed.folders import SiteFolder

_POLL_ENV = "FLWR_SUPEREXEC_TASK_POLL_INTERVAL"


def test_every_program_flower_may_start_is_the_sites_own() -> None:
    assert {CLIENTAPP_PROGRAM, *REFUSED_PROGRAMS} == set(TASK_TYPE_TO_COMMAND.values())


def test_the_other_programs_refuse_and_the_state_folder_is_private(tmp_path: Path) -> None:
    # Prepare: a state folder made earlier with the umask's mode (as `site index` does)
    state = SiteFolder(tmp_path / "site").state
    state.path.mkdir(parents=True, mode=0o755)
    state.path.chmod(0o755)

    # Execute
    program = install_site_programs(state)
    runs = {
        name: subprocess.run(
            [str(state.programs / name), "--token", "t"], capture_output=True, text=True
        )
        for name in REFUSED_PROGRAMS
    }

    # Assert
    assert stat.S_IMODE(state.path.stat().st_mode) == 0o700
    assert stat.S_IMODE(state.superexec_secret.stat().st_mode) == 0o600
    assert program.read_text().splitlines()[0] == f"#!{sys.executable} -P"
    for name, done in runs.items():
        assert done.returncode == 1 and f"{name} refused" in done.stderr, name


class _RuntimeApi(BaseHTTPRequestHandler):
    """A SuperNode's Runtime API that records what the SuperExec asks for."""

    asked: list[AcquireTaskRequest]
    got = threading.Event()

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        if self.path == "/v1/runtime/acquire-task":
            self.asked.append(AcquireTaskRequest.FromString(body))
            self.got.set()
        reply = AcquireTaskResponse().SerializeToString()
        self.send_response(200)
        self.send_header("Content-Type", "application/protobuf")
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)

    def log_message(self, *_: object) -> None:
        pass


@pytest.fixture
def runtime_api() -> Iterator[tuple[int, type[_RuntimeApi]]]:
    handler = type("Handler", (_RuntimeApi,), {"asked": [], "got": threading.Event()})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1], handler
    finally:
        server.shutdown()
        server.server_close()


def _asks(
    argv: list[str], env: dict[str, str], handler: type[_RuntimeApi], listen: float = 0.0
) -> list[AcquireTaskRequest]:
    """The SuperExec's asks for a task: the first, and those in ``listen`` seconds after."""
    process = subprocess.Popen(
        argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    try:
        assert handler.got.wait(timeout=60), "the SuperExec never asked for a task"
        time.sleep(listen)
        asked = list(handler.asked)
    finally:
        process.kill()
        _, err = process.communicate(timeout=30)
    assert asked, err
    return asked


def _first_request(argv: list[str], env: dict[str, str], handler: type[_RuntimeApi]) -> list[str]:
    return sorted(_asks(argv, env, handler)[0].supported_task_types)


def _superexec(program: str, data: Path, port: int) -> tuple[list[str], dict[str, str]]:
    """The command and environment of the site's SuperExec as `radfed site join` starts it
    (``program`` "site"), or of Flower's own flower-superexec with the same arguments."""
    install_site_programs(SiteFolder(data).state)
    command = superexec_command(data=data, port=port)
    argv = command.argv
    if program == "flower":
        argv = [str(Path(sys.executable).parent / "flower-superexec"), *argv[4:]]
    return argv, {**os.environ, **command.environ()}


@pytest.mark.parametrize("program", ["site", "flower"])
def test_the_sites_superexec_asks_for_clientapp_tasks_only(
    runtime_api: tuple[int, type[_RuntimeApi]], tmp_path: Path, program: str
) -> None:
    # Prepare: the site's SuperExec, as `radfed site join` starts it, against the Runtime
    # API; and, as the control, Flower's own flower-superexec with the same arguments
    port, handler = runtime_api
    argv, env = _superexec(program, tmp_path / "site", port)

    # Execute
    asked = _first_request(argv, env, handler)

    # Assert: the site's never takes a task of another type (an agent app runs the bundle's
    # code); Flower's would
    if program == "site":
        assert asked == ["flwr-clientapp"]
    else:
        assert "flwr-agentapp" in asked


@pytest.mark.parametrize("guarded", [True, False], ids=["site-command", "plain-python-m"])
def test_a_radfed_planted_in_the_working_folder_is_not_imported(
    guarded: bool, tmp_path: Path
) -> None:
    # Prepare: a local user's radfed package in the folder `radfed site join` is started from
    planted = tmp_path / "radfed"
    (planted / "site").mkdir(parents=True)
    marker = tmp_path / "planted-ran"
    (planted / "__init__.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    (planted / "site" / "__init__.py").write_text("")
    (planted / "site" / "superexec.py").write_text("")
    argv = superexec_command(data=tmp_path / "site", port=1).argv[:4]
    if not guarded:
        argv.remove("-P")

    # Execute
    subprocess.run([*argv, "--help"], cwd=tmp_path, capture_output=True, timeout=120)

    # Assert: the site's command imports the installed radfed; plain `python -m` would not
    assert marker.exists() is not guarded


@pytest.mark.parametrize(
    ("program", "interval", "most"),
    [("site", None, None), ("site", "1.0", 4), ("flower", None, 4)],
    ids=["site", "site-administrator-setting", "flower"],
)
def test_the_sites_superexec_asks_for_a_task_ten_times_a_second(
    runtime_api: tuple[int, type[_RuntimeApi]],
    tmp_path: Path,
    program: str,
    interval: str | None,
    most: int | None,
) -> None:
    # Prepare: the site's SuperExec (and, as the control, Flower's: one ask a second, so a
    # message waited half a second on average before its task started); an administrator
    # may set Flower's own variable
    port, handler = runtime_api
    argv, env = _superexec(program, tmp_path / "site", port)
    env.pop(_POLL_ENV, None)
    if interval is not None:
        env[_POLL_ENV] = interval

    # Execute: count the asks in 2 s after the first
    asked = len(_asks(argv, env, handler, listen=2.0))

    # Assert: every SUPEREXEC_POLL_S (0.1 s: some 20 asks; a busy machine may lose many,
    # and a 1 s poll makes at most 3)
    if most is None:
        assert asked >= 2.0 / SUPEREXEC_POLL_S / 4
    else:
        assert 2 <= asked <= most
