"""Throwaway servers for tests: radfed's nginx edge (``running_edge``) and a PostgreSQL server
from the operating system's package, for tests of the run store.

``PostgresServer.start()`` runs ``initdb`` into a fresh temporary directory and ``postgres`` on a
free port of 127.0.0.1 (never another address), with trust authentication for the role
``radfed``; ``stop()`` ends it by its PID and removes the directory. PostgreSQL refuses to run as
root: when the tests run as root (CI does), both run as the ``postgres`` OS user, which the Debian
package creates.

Where the server cannot start, ``require_postgres`` skips the test with the reason and the fix,
unless ``RADFED_REQUIRE_SERVICES`` is set (``.ci/run`` sets it after installing the package):
there the test fails, so CI never skips it silently.
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import pytest

#: The role that ``initdb`` creates as superuser, and the database the session fixture creates.
ROLE = "radfed"
DATABASE = "radfed_test"

_HOST = "127.0.0.1"
_OS_USER = "postgres"
_INSTALL = "`apt-get install postgresql`"
_START_TIMEOUT_S = 30.0
_STOP_TIMEOUT_S = 30.0
_START_ATTEMPTS = 3  # a new port each time, in case another process took the free one


class ServiceUnavailable(RuntimeError):
    """The service cannot run here; the message says what is missing and how to get it."""


def services_required() -> bool:
    """Whether a missing service fails the test rather than skips it (CI: ``.ci/run``)."""
    return bool(os.environ.get("RADFED_REQUIRE_SERVICES"))


def unavailable(reason: str) -> NoReturn:
    """Skip the test with ``reason``, or fail it where ``RADFED_REQUIRE_SERVICES`` is set."""
    if services_required():
        pytest.fail(f"{reason} (RADFED_REQUIRE_SERVICES is set, so this fails)", pytrace=False)
    pytest.skip(reason)


def _has_server(bindir: Path) -> bool:
    return all(os.access(bindir / name, os.X_OK) for name in ("initdb", "pg_ctl", "postgres"))


def _version_key(path: Path) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", path.parent.name))


def postgres_bindir() -> Path:
    """The directory of ``initdb`` and ``postgres``: ``pg_config --bindir``, else the newest
    ``/usr/lib/postgresql/*/bin`` (Debian's place; ``pg_config`` may come from libpq-dev only).
    """
    pg_config = shutil.which("pg_config")
    if pg_config is not None:
        try:
            out = subprocess.run(
                [pg_config, "--bindir"], capture_output=True, text=True, check=True, timeout=10
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            out = ""
        if out and _has_server(Path(out)):
            return Path(out)
    candidates = [p for p in Path("/usr/lib/postgresql").glob("*/bin") if _has_server(p)]
    if not candidates:
        msg = f"PostgreSQL server binaries (initdb, pg_ctl, postgres) not found; {_INSTALL}"
        raise ServiceUnavailable(msg)
    return max(candidates, key=_version_key)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((_HOST, 0))
        return int(sock.getsockname()[1])


def _traversable_by_others(path: Path) -> bool:
    return all(p.stat().st_mode & stat.S_IXOTH for p in [path, *path.parents])


@dataclass
class _RunAs:
    """How to run the server's programs: as ourselves, or (when root) as the ``postgres`` user."""

    user: pwd.struct_passwd | None

    @classmethod
    def for_this_process(cls) -> _RunAs:
        if os.geteuid() != 0:
            return cls(user=None)
        try:
            return cls(user=pwd.getpwnam(_OS_USER))
        except KeyError:
            msg = (
                f"the tests run as root and PostgreSQL refuses to; the {_OS_USER!r} OS user to "
                f"run it as does not exist (the Debian package creates it: {_INSTALL})"
            )
            raise ServiceUnavailable(msg) from None

    def popen_kwargs(self) -> dict[str, Any]:
        if self.user is None:
            return {}
        return {"user": self.user.pw_uid, "group": self.user.pw_gid, "extra_groups": []}

    def give(self, path: Path) -> None:
        if self.user is not None:
            os.chown(path, self.user.pw_uid, self.user.pw_gid)


def _log_tail(log: Path, lines: int = 15) -> str:
    try:
        text = log.read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:]) or "(empty log)"


@dataclass
class PostgresServer:
    """One ``postgres`` process on 127.0.0.1 over a temporary data directory, held by its PID."""

    bindir: Path
    root: Path
    run_as: _RunAs
    port: int = 0
    process: subprocess.Popen[bytes] | None = None

    @classmethod
    def start(cls) -> PostgresServer:
        """Initialise and start a server; raise ``ServiceUnavailable`` saying why it cannot."""
        bindir = postgres_bindir()
        run_as = _RunAs.for_this_process()
        base = Path(tempfile.gettempdir())
        if run_as.user is not None and not _traversable_by_others(base):
            msg = f"the {_OS_USER!r} user cannot reach the temporary directory {str(base)!r}"
            raise ServiceUnavailable(msg)
        root = Path(tempfile.mkdtemp(prefix="radfed-pg-", dir=base))
        server = cls(bindir=bindir, root=root, run_as=run_as)
        try:
            server._initdb()
            server._launch()
            server._create_database(DATABASE)
        except BaseException:
            server.stop()
            raise
        return server

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @property
    def socket_dir(self) -> Path:
        return self.root / "socket"

    @property
    def log_path(self) -> Path:
        return self.root / "postgres.log"

    def url(self, database: str = DATABASE) -> str:
        """The SQLAlchemy URL of ``database`` on this server."""
        return f"postgresql+psycopg://{ROLE}@{_HOST}:{self.port}/{database}"

    def _initdb(self) -> None:
        self.run_as.give(self.root)
        self.socket_dir.mkdir()
        self.run_as.give(self.socket_dir)
        cmd = [
            str(self.bindir / "initdb"),
            "--pgdata",
            str(self.data_dir),
            "--auth=trust",
            f"--username={ROLE}",
            "--encoding=UTF8",
            "--no-locale",
            "--no-sync",
        ]
        result = subprocess.run(
            cmd,
            cwd=self.root,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
            **self.run_as.popen_kwargs(),
        )
        if result.returncode != 0:
            msg = f"initdb failed (exit {result.returncode}): {result.stderr.strip()[-2000:]}"
            raise ServiceUnavailable(msg)

    def _launch(self) -> None:
        for attempt in range(1, _START_ATTEMPTS + 1):
            self.port = _free_port()
            cmd = [
                str(self.bindir / "postgres"),
                "-D",
                str(self.data_dir),
                "-h",
                _HOST,
                "-p",
                str(self.port),
                "-k",
                str(self.socket_dir),
                # A throwaway server: durability buys nothing and costs time.
                "-c",
                "fsync=off",
                "-c",
                "synchronous_commit=off",
                "-c",
                "full_page_writes=off",
            ]
            with self.log_path.open("ab") as log:
                self.process = subprocess.Popen(
                    cmd,
                    cwd=self.root,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,  # Ctrl-C in the terminal reaches pytest only
                    **self.run_as.popen_kwargs(),
                )
            try:
                self._wait_ready()
                return
            except ServiceUnavailable:
                self._terminate()
                if attempt == _START_ATTEMPTS:
                    raise

    def _wait_ready(self) -> None:
        psycopg = _import_psycopg()
        assert self.process is not None
        deadline = time.monotonic() + _START_TIMEOUT_S
        last_error = ""
        while time.monotonic() < deadline:
            code = self.process.poll()
            if code is not None:
                msg = f"postgres exited with {code} at start:\n{_log_tail(self.log_path)}"
                raise ServiceUnavailable(msg)
            try:
                with socket.create_connection((_HOST, self.port), timeout=1):
                    pass
                with psycopg.connect(self._dsn("postgres"), connect_timeout=2):
                    return
            except (OSError, psycopg.Error) as exc:
                last_error = str(exc).strip()
            time.sleep(0.1)
        msg = (
            f"postgres did not accept connections on {_HOST}:{self.port} within "
            f"{_START_TIMEOUT_S:.0f} s ({last_error}):\n{_log_tail(self.log_path)}"
        )
        raise ServiceUnavailable(msg)

    def _dsn(self, database: str) -> str:
        return f"host={_HOST} port={self.port} user={ROLE} dbname={database}"

    def _execute(self, sql: str) -> None:
        psycopg = _import_psycopg()
        with psycopg.connect(self._dsn("postgres"), autocommit=True) as conn:
            conn.execute(sql)

    def _create_database(self, name: str) -> None:
        self._execute(f'CREATE DATABASE "{name}"')

    def _drop_database(self, name: str) -> None:
        # End the connections a test's engine pool still holds (DROP ... WITH (FORCE) needs 13+).
        self._execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            f"WHERE datname = '{name}' AND pid <> pg_backend_pid()"
        )
        self._execute(f'DROP DATABASE IF EXISTS "{name}"')

    @contextmanager
    def fresh_database(self) -> Iterator[str]:
        """A new empty database for one test; yields its URL and drops it afterwards."""
        name = f"radfed_t_{uuid.uuid4().hex[:16]}"
        self._create_database(name)
        try:
            yield self.url(name)
        finally:
            self._drop_database(name)

    def _terminate(self) -> None:
        """Fast shutdown (SIGINT) by PID; SIGKILL if it has not ended in time."""
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=_STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=_STOP_TIMEOUT_S)

    def stop(self) -> None:
        """End the server and remove its directory."""
        try:
            self._terminate()
        finally:
            shutil.rmtree(self.root, ignore_errors=True)


def _import_psycopg() -> Any:
    try:
        import psycopg
    except ImportError:
        msg = "psycopg is not installed; `pip install 'psycopg[binary]>=3.1'` (radfed's dev extra)"
        raise ServiceUnavailable(msg) from None
    return psycopg


@contextmanager
def running_postgres() -> Iterator[PostgresServer]:
    """A started server for the ``with`` block (a session fixture's body); skips or fails the
    test (see ``unavailable``) where it cannot start."""
    server: PostgresServer | None = None
    try:
        server = PostgresServer.start()
    except ServiceUnavailable as exc:
        reason = str(exc)
    if server is None:
        unavailable(f"no PostgreSQL server for the tests: {reason}")  # outside `except`: no chain
    try:
        yield server
    finally:
        server.stop()


@contextmanager
def running_edge(state: Path, pki: Any, superlink_port: int) -> Iterator[int]:
    """nginx with radfed's edge configuration (``radfed.deployment.edge.Edge``) on a free port
    of 127.0.0.1, forwarding to ``superlink_port``, with the server's TLS pair of ``pki``;
    yields the port once it listens and stops nginx by its PID."""
    from radfed.deployment.edge import Edge
    from radfed.deployment.process import wait_for_port
    from radfed.folders import ServerState

    port = _free_port()
    command = Edge.of(pki, host=_HOST, port=port, superlink_port=superlink_port).command(
        ServerState(state)
    )
    process = subprocess.Popen(command.argv, env=command.environ(), start_new_session=True)
    try:
        wait_for_port(_HOST, port, timeout=30)
        yield port
    finally:
        process.terminate()
        process.wait(timeout=30)
