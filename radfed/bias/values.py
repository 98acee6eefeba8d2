"""Tolerant readers of a parsed ``bias_report.json``: a missing or malformed value reads as
absent, so a page or figure says "n/a" instead of failing."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

__all__ = ["as_float", "as_floats", "as_list", "as_mapping", "as_point"]


def as_float(value: Any) -> float | None:
    """A finite number as float, else None (bools are not numbers here)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def as_floats(values: Any) -> list[float]:
    """A list of finite numbers, or ``[]`` when any item is not one."""
    numbers = [as_float(v) for v in as_list(values)]
    return [v for v in numbers if v is not None] if None not in numbers else []


def as_point(point: Any) -> tuple[float | None, float | None]:
    """An ``[x, y]`` pair of numbers."""
    pair = as_list(point)
    return (as_float(pair[0]), as_float(pair[1])) if len(pair) == 2 else (None, None)


def as_mapping(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def as_list(value: Any) -> list[Any]:
    return list(value) if isinstance(value, list | tuple) else []
