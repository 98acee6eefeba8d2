"""The run store on SQLite and on a real PostgreSQL server: sync, catch-up, queries."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Engine, func, select, text

from radfed.store import StoreFeed, find_run, list_runs, open_store, run_detail, run_events
from radfed.store.engine import head_revision, migrate, revision_of
from radfed.store.schema import cells, events, gaps, metadata, metrics, reports, runs
from radfed.store.sync import sync_run
from tests.store import run_folders as rf


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Engine:
    """An empty store of each kind (PostgreSQL: a fresh database on the session's server)."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'runs.sqlite'}"
    else:
        url = request.getfixturevalue("postgres_db")
    engine = open_store(url)
    request.addfinalizer(engine.dispose)
    return engine


def _count(engine: Engine, table: object, run_id: str = "f" * 32) -> int:
    with engine.connect() as conn:
        return int(
            conn.execute(
                select(func.count()).select_from(table).where(table.c.run_id == run_id)
            ).scalar_one()
        )  # type: ignore[attr-defined]


def test_schema_of_the_newest_revision_is_the_metadata(store: Engine) -> None:
    # Execute
    with store.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), metadata)

    # Assert
    assert diff == []
    assert revision_of(store) == head_revision()


def test_sync_reads_only_what_is_new_and_rereads_a_truncated_file(
    store: Engine, tmp_path: Path
) -> None:
    # Prepare
    run = rf.start(tmp_path / "run")
    rf.round_(run, 1)

    # Execute
    run_id = sync_run(store, run)
    first = _count(store, metrics), _count(store, events)
    rf.round_(run, 2, replied=("site-a", "site-b"), dropped={"site-c": "update dropped: bad"})
    sync_run(store, run)
    sync_run(store, run)  # nothing new: nothing changes
    second = _count(store, metrics), _count(store, events)
    # a resumed run cuts metrics.jsonl back to its last completed round (1)
    kept = [
        line for line in (run / "metrics.jsonl").read_text().splitlines() if '"round": 1' in line
    ]
    (run / "metrics.jsonl").write_text("\n".join(kept) + "\n")
    sync_run(store, run)

    # Assert
    assert run_id == "f" * 32
    assert first == (4, 7)
    assert second == (8, 13)
    assert _count(store, metrics) == 4
    with store.connect() as conn:
        rounds_in = {
            r[0] for r in conn.execute(select(metrics.c.round).where(metrics.c.run_id == run_id))
        }
        stored = [r[0] for r in conn.execute(select(metrics.c["values"]))]
    assert rounds_in == {1}
    # NaN (an undefined metric) is kept as null: PostgreSQL's JSONB refuses NaN
    assert stored and all(v["ece"] is None and v["auc"] > 0 for v in stored)


def test_every_report_version_is_kept_with_its_cells_and_gaps(
    store: Engine, tmp_path: Path
) -> None:
    # Prepare
    run = rf.start(tmp_path / "run")

    # Execute: a live sync after each round's report
    for number in (1, 2, 3):
        rf.round_(run, number)
        sync_run(store, run)
    (run / "bias_report.html").write_text("<!DOCTYPE html><title>report</title>")
    rf.event(run, "run-finished")
    sync_run(store, run)

    # Assert
    with store.connect() as conn:
        versions = [r[0] for r in conn.execute(select(reports.c.round).order_by(reports.c.round))]
        verdicts = sorted(
            r[0] for r in conn.execute(select(gaps.c.verdict).where(gaps.c.round == 2))
        )
    assert versions == [1, 2, 3]
    assert _count(store, cells) == 3 * 4
    assert verdicts == ["flagged", "inconclusive"]
    detail = run_detail(store, "f" * 32)
    assert detail["status"] == "finished" and detail["rounds_done"] == 3
    assert detail["report"]["versions"] == [1, 2, 3]
    assert detail["report"]["counts"] == {"flagged": 1, "within margin": 0, "inconclusive": 1}
    assert [g["site"] for g in detail["report"]["gaps"] if g["verdict"] == "flagged"] == ["site-b"]
    assert detail["report"]["has_html"] is True


def test_sites_rounds_and_events_follow_what_happened(store: Engine, tmp_path: Path) -> None:
    # Prepare: site-c refuses by policy in round 1, is silent in round 2; site-b's update is
    # dropped in round 2; a node with an unregistered key is a security event
    run = rf.start(tmp_path / "run")
    rf.event(run, "waiting", round_=1, missing=["site-c"], connected=2)
    rf.event(
        run,
        "site-error",
        round_=1,
        site="site-c",
        code=3005,
        level="warning",
        message="error code 3005: policy",
    )
    rf.round_(run, 1, replied=("site-a", "site-b"), dropped={"site-c": "error code 3005"})
    rf.event(
        run,
        "dropped",
        round_=2,
        site="site-b",
        what="update",
        level="warning",
        message="dropped update: num-examples must be a positive integer",
    )
    rf.event(
        run,
        "security",
        round_=2,
        level="warning",
        node=99,
        message="dropped update from node 99: its key was not registered from the PKI",
    )
    rf.round_(run, 2, replied=("site-a",), dropped={"site-b": "update dropped"}, silent=("site-c",))

    # Execute
    sync_run(store, run)
    detail = run_detail(store, "f" * 32)

    # Assert
    states = {
        s["name"]: (s["state"], s["replies"], s["failures"], s["refusals"]) for s in detail["sites"]
    }
    assert states["site-a"] == ("connected", 4, 0, {})
    assert states["site-b"][1:3] == (2, 1)
    assert states["site-c"] == ("late", 0, 2, {"3005": 1})
    train2 = next(r for r in detail["rounds"] if r["round"] == 2 and r["phase"] == "train")
    assert train2["asked"] == 3 and train2["replied"] == 1
    assert set(train2["dropped"]) == {"site-b"}
    kinds = [e["kind"] for e in run_events(store, "f" * 32)]
    assert kinds.count("security") == 1 and kinds[0] == "run-started"
    later = run_events(store, "f" * 32, after=run_events(store, "f" * 32)[-3]["seq"])
    assert len(later) == 2
    assert detail["curves"]["val"]["ALL"] == [[1, 0.68], [2, 0.73]]
    assert {r["site"] for r in detail["latest"]["val"]} == {*rf.SITES, "ALL"}


def test_lists_and_finds_runs_by_id_prefix_and_name(store: Engine, tmp_path: Path) -> None:
    # Prepare
    rf.round_(rf.start(tmp_path / "alpha", run_id="a1" + "0" * 30), 1)
    rf.start(tmp_path / "beta", run_id="b2" + "0" * 30)
    for name in ("alpha", "beta"):
        sync_run(store, tmp_path / name)

    # Execute
    listed = {r["name"]: r for r in list_runs(store)}

    # Assert
    assert listed["alpha"]["pooled"]["value"] == pytest.approx(0.68)
    assert listed["alpha"]["verdicts"]["flagged"] == 1
    assert listed["beta"]["pooled"] is None and listed["beta"]["status"] == "running"
    assert find_run(store, "a1") == "a1" + "0" * 30
    assert find_run(store, "beta") == "b2" + "0" * 30
    with pytest.raises(Exception, match="no run 'gamma'"):
        find_run(store, "gamma")


def test_a_folder_from_before_events_is_imported_by_its_rounds(
    store: Engine, tmp_path: Path
) -> None:
    # Prepare: no run-id, no events.jsonl (radfed before the store)
    run = rf.start(tmp_path / "old", rounds=2)
    config = json.loads((run / "config.json").read_text())
    del config["run-id"]
    (run / "config.json").write_text(json.dumps(config))
    (run / "events.jsonl").unlink()
    rf.metrics(run, 1)
    rf.metrics(run, 2)

    # Execute
    first, again = sync_run(store, run), sync_run(store, run)

    # Assert
    assert first == again and len(first) == 32
    detail = run_detail(store, first)
    assert detail["status"] == "finished" and detail["rounds_done"] == 2


def test_a_store_that_is_down_is_caught_up_and_never_raises(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Prepare: a PostgreSQL URL nothing listens on (connection refused), then a working store
    run = rf.start(tmp_path / "run")
    rf.round_(run, 1)
    feed = StoreFeed("postgresql+psycopg://radfed:secret@127.0.0.1:9/none", run)

    # Execute
    with caplog.at_level(logging.INFO, logger="radfed"):
        down = [feed.sync(force=True), feed.sync(force=True), feed.sync()]
        rf.round_(run, 2)
        feed.url = f"sqlite:///{tmp_path / 'runs.sqlite'}"  # the store is back
        back = feed.sync(force=True)

    # Assert
    assert down == [False, False, False]
    warnings = [r.getMessage() for r in caplog.records if "unavailable" in r.getMessage()]
    assert len(warnings) == 1 and "OperationalError" in warnings[0]
    assert "secret" not in warnings[0] and "radfed:***@127.0.0.1:9" in warnings[0]
    assert back is True
    assert any("is back" in r.getMessage() for r in caplog.records)
    engine = open_store(feed.url)
    assert _count(engine, metrics) == 8
    assert run_detail(engine, "f" * 32)["rounds_done"] == 2


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
def test_a_store_of_the_first_schema_is_upgraded_in_place(
    kind: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    # Prepare: a store created by revision 0001, holding a run
    url = (
        f"sqlite:///{tmp_path / 'old.sqlite'}"
        if kind == "sqlite"
        else request.getfixturevalue("postgres_db")
    )
    old = open_store(url, upgrade=False)
    migrate(old, "0001")
    with old.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO runs (id, name, folder, task, strategy, headline, status, "
                "rounds_planned, rounds_done, config, radfed_version, updated_at, "
                "metrics_offset, events_offset) VALUES ('r1', 'old', '/x', 'classification', "
                "'fedavg', 'auc', 'finished', 3, 3, '{}', '0.0.9', '2026-01-01 00:00:00', 0, 0)"
            )
        )
    columns_before = {c["name"] for c in _columns(old, "runs")}
    old.dispose()

    # Execute
    engine = open_store(url)

    # Assert
    assert revision_of(engine) == head_revision() == "0002"
    assert "html_report" not in columns_before
    assert {"html_report", "html_mtime"} <= {c["name"] for c in _columns(engine, "runs")}
    with engine.connect() as conn:
        kept = conn.execute(select(runs.c.name, runs.c.html_report).where(runs.c.id == "r1")).one()
    assert tuple(kept) == ("old", None)
    engine.dispose()


def _columns(engine: Engine, table: str) -> list[dict[str, object]]:
    from sqlalchemy import inspect

    return list(inspect(engine).get_columns(table))  # type: ignore[arg-type]
