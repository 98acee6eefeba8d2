"""The read-only web dashboard over the run store: runs, curves, sites, verdicts, events."""

from radfed.dashboard.access import TOKEN_ENV
from radfed.dashboard.app import create_app, serve

__all__ = ["TOKEN_ENV", "create_app", "serve"]
