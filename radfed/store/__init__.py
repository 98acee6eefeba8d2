"""The run store: every run's facts in one database (SQLite by default, PostgreSQL by URL)."""

from radfed.store.engine import STORE_ENV, default_store_url, open_store, shown_url, store_url
from radfed.store.feed import StoreFeed
from radfed.store.queries import (
    find_run,
    list_runs,
    report_html,
    run_curves,
    run_detail,
    run_events,
)
from radfed.store.sync import sync_run

__all__ = [
    "STORE_ENV",
    "StoreFeed",
    "default_store_url",
    "find_run",
    "list_runs",
    "open_store",
    "report_html",
    "run_curves",
    "run_detail",
    "run_events",
    "shown_url",
    "store_url",
    "sync_run",
]
