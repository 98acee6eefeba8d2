"""The package logger: the library logs here and never prints; applications add handlers."""

from __future__ import annotations

import logging
from collections.abc import Callable

__all__ = ["ProgressFn", "logger"]

#: A progress callback: ``progress(done, total)``; the application decides how to show it.
ProgressFn = Callable[[int, int], None]

logger = logging.getLogger("radfed")
logger.addHandler(logging.NullHandler())
