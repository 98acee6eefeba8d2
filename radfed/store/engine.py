"""Where the run store is and how to open it: a SQLite file by default, any SQLAlchemy URL.

``RADFED_STORE`` names the store (``sqlite:////path/runs.sqlite`` or
``postgresql+psycopg://user@host/db``; ``none`` turns it off); without it radfed uses
``runs.sqlite`` in ``$XDG_DATA_HOME/radfed`` (``~/.local/share/radfed``). Opening a store
brings its schema to the newest revision in place (Alembic), so an older store keeps its
runs. A URL is never logged with its password.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, NoSuchModuleError

from radfed.errors import ConfigError
from radfed.folders import STORE_ENV

__all__ = [
    "STORE_ENV",
    "default_store_url",
    "head_revision",
    "migrate",
    "open_store",
    "revision_of",
    "shown_url",
    "store_url",
]

#: Seconds a connection attempt to a store server may take before the store counts as down.
_CONNECT_TIMEOUT = 5

_MIGRATIONS = Path(__file__).with_name("migrations")


def default_store_url() -> str:
    """The SQLite file radfed uses when ``RADFED_STORE`` is not set."""
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return f"sqlite:///{Path(base) / 'radfed' / 'runs.sqlite'}"


def store_url(given: str | None = None) -> str | None:
    """The store to use: ``given``, else ``RADFED_STORE``, else the default SQLite file.

    Returns:
        The URL, or None when the store is turned off (``none``).
    """
    url = given or os.environ.get(STORE_ENV) or default_store_url()
    return None if url.strip().lower() in {"none", "off", ""} else url.strip()


def shown_url(url: str) -> str:
    """The URL as logs and messages may show it (password hidden)."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return "(not a URL)"


def open_store(url: str, *, upgrade: bool = True) -> Engine:
    """An engine on the store at ``url``, its schema brought to the newest revision.

    Args:
        url: a SQLAlchemy URL; for SQLite the file's folder is created.
        upgrade: migrate the schema in place (False: open as it is).

    Raises:
        ConfigError: the URL is not one, or names a database radfed has no driver for.
    """
    try:
        parsed = make_url(url)
    except ArgumentError:
        msg = (
            f"the store {url!r} is not a database URL; give e.g. sqlite:////path/runs.sqlite "
            "or postgresql+psycopg://user@host/database"
        )
        raise ConfigError(msg) from None
    options: dict[str, Any] = {"pool_pre_ping": True}
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).expanduser().parent.mkdir(parents=True, exist_ok=True)
        options["connect_args"] = {"timeout": 30}
    elif parsed.get_backend_name() == "postgresql":
        options["connect_args"] = {"connect_timeout": _CONNECT_TIMEOUT}
    try:
        engine = create_engine(parsed, **options)
    except (NoSuchModuleError, ModuleNotFoundError):
        msg = (
            f"no driver for the store {shown_url(url)}; for PostgreSQL install "
            "'radfed[postgresql]' and use postgresql+psycopg://..."
        )
        raise ConfigError(msg) from None
    if parsed.get_backend_name() == "sqlite":
        event.listen(engine, "connect", _sqlite_pragmas)
    if upgrade:
        migrate(engine)
    return engine


def _sqlite_pragmas(connection: Any, _record: Any) -> None:
    """WAL lets the dashboard read while a run writes; foreign keys cascade deletes."""
    cursor = connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def _alembic_config() -> Config:
    config = Config()
    config.set_main_option("script_location", str(_MIGRATIONS))
    return config


def migrate(engine: Engine, revision: str = "head") -> None:
    """Upgrade the store's schema to ``revision`` (the newest by default), in place."""
    config = _alembic_config()
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, revision)


def revision_of(engine: Engine) -> str | None:
    """The schema revision the store is at (None: an empty database)."""
    with engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()


def head_revision() -> str:
    """The newest schema revision this radfed knows."""
    head = ScriptDirectory.from_config(_alembic_config()).get_current_head()
    assert head is not None  # the package ships its migrations
    return head
