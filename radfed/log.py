"""The package logger: the library logs here and never prints; applications add handlers."""

from __future__ import annotations

import logging

__all__ = ["logger"]

logger = logging.getLogger("radfed")
logger.addHandler(logging.NullHandler())
