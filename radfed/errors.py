"""radfed's exceptions: every message names the bad value and the fix."""

from __future__ import annotations

__all__ = ["ConfigError", "DataError", "RadfedError"]


class RadfedError(Exception):
    """Base class of errors radfed raises on purpose, with a message safe to show."""


class ConfigError(RadfedError, ValueError):
    """A run or site setting is invalid."""


class DataError(RadfedError):
    """A site folder, manifest or image cannot be used."""
