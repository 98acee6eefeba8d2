"""Fixtures of the run-store tests: a throwaway PostgreSQL server for the session, and a fresh
empty database on it for each test (see ``tests/services.py``)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.services import PostgresServer, running_postgres


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """The session's server on 127.0.0.1 (skipped where PostgreSQL is missing, failed in CI)."""
    with running_postgres() as server:
        yield server


@pytest.fixture(scope="session")
def postgres_url(postgres_server: PostgresServer) -> str:
    """The SQLAlchemy URL of the session's shared database, ``radfed_test``."""
    return postgres_server.url()


@pytest.fixture
def postgres_db(postgres_server: PostgresServer) -> Iterator[str]:
    """The SQLAlchemy URL of a new empty database for this test alone, dropped after it."""
    with postgres_server.fresh_database() as url:
        yield url
