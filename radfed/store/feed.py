"""The live feed from a running server to the store: never allowed to fail a round."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError

from radfed.errors import ConfigError
from radfed.log import logger
from radfed.store.engine import open_store, shown_url, store_url
from radfed.store.sync import sync_run

__all__ = ["StoreFeed"]

#: Seconds to wait before trying a store that was down again.
RETRY_AFTER = 30.0


class StoreFeed:
    """Syncs one run folder into the store after each event, and at the end.

    A store that cannot be reached (or fails a write) is logged once, retried at most every
    ``RETRY_AFTER`` seconds, and caught up from the run folder when it is back: the run
    folder is written first, so nothing is lost.
    """

    def __init__(
        self, url: str, run_dir: Path, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.url, self.run_dir, self.clock = url, run_dir, clock
        self.engine: Engine | None = None
        self.down_since: float | None = None
        self.retry_at = 0.0

    @classmethod
    def from_environment(cls, run_dir: Path) -> StoreFeed | None:
        """The feed to the store ``RADFED_STORE`` names (or the default); None when off."""
        url = store_url()
        return None if url is None else cls(url, run_dir)

    def __call__(self) -> None:
        self.sync()

    def sync(self, *, force: bool = False) -> bool:
        """Bring the store up to date; True when it is. Never raises."""
        if not force and self.clock() < self.retry_at:
            return False
        try:
            if self.engine is None:
                self.engine = open_store(self.url)
            sync_run(self.engine, self.run_dir)
        except (SQLAlchemyError, OSError, ConfigError) as err:
            self.retry_at = self.clock() + RETRY_AFTER
            if self.down_since is None:
                self.down_since = self.clock()
                logger.warning(
                    "run store %s unavailable (%s); the run goes on and the store catches up "
                    "from the run folder when it is back",
                    shown_url(self.url),
                    type(err).__name__,
                )
            self.engine = None if isinstance(err, ConfigError) else self.engine
            return False
        if self.down_since is not None:
            logger.info(
                "run store %s is back after %.0f s; caught up",
                shown_url(self.url),
                self.clock() - self.down_since,
            )
            self.down_since = None
        return True
