"""The package logger: the library logs here and never prints; applications add handlers."""

from __future__ import annotations

import logging
from collections.abc import Callable

__all__ = ["ProgressFn", "log_like_flower", "logger"]

#: A progress callback: ``progress(done, total)``; the application decides how to show it.
ProgressFn = Callable[[int, int], None]

logger = logging.getLogger("radfed")
logger.addHandler(logging.NullHandler())


def log_like_flower() -> None:
    """In a process Flower started (ServerApp, ClientApp) with no logging set up, show
    radfed's lines through Flower's console handler, so that they reach the streamed run
    log (``flwr run --stream``, ``radfed launch``) and the SuperNode's output."""
    configured = [h for h in logger.handlers if not isinstance(h, logging.NullHandler)]
    if configured or logging.getLogger().handlers or logger.level != logging.NOTSET:
        return
    from flwr.common.logger import console_handler

    logger.addHandler(console_handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
