"""The test PostgreSQL server itself: reachable through SQLAlchemy, on loopback only."""

from __future__ import annotations

import sqlalchemy as sa

from tests.services import PostgresServer


def test_a_row_written_is_read_back(postgres_db: str) -> None:
    # Prepare
    engine = sa.create_engine(postgres_db)
    table = sa.Table(
        "runs",
        sa.MetaData(),
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("name", sa.Text),
    )

    # Execute
    try:
        with engine.begin() as conn:
            table.create(conn)
            conn.execute(table.insert().values(id=1, name="round-1"))
        with engine.connect() as conn:
            rows = conn.execute(sa.select(table.c.id, table.c.name)).all()
    finally:
        engine.dispose()

    # Assert
    assert [tuple(row) for row in rows] == [(1, "round-1")]


def test_each_test_gets_its_own_empty_database(postgres_db: str, postgres_url: str) -> None:
    # Execute
    engine = sa.create_engine(postgres_db)
    try:
        with engine.connect() as conn:
            name = conn.execute(sa.text("SELECT current_database()")).scalar_one()
            tables = sa.inspect(conn).get_table_names()
    finally:
        engine.dispose()

    # Assert
    assert name != sa.make_url(postgres_url).database
    assert tables == []


def test_the_server_listens_on_loopback_only(postgres_server: PostgresServer) -> None:
    # Execute
    engine = sa.create_engine(postgres_server.url())
    try:
        with engine.connect() as conn:
            listen = conn.execute(sa.text("SHOW listen_addresses")).scalar_one()
            port = conn.execute(sa.text("SHOW port")).scalar_one()
    finally:
        engine.dispose()

    # Assert
    assert listen == "127.0.0.1"
    assert int(port) == postgres_server.port
