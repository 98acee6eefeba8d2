"""Pooling mergeable statistics: the sum of the cells that were not suppressed."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol, Self, TypeVar

__all__ = ["pool"]


class _Mergeable(Protocol):
    @property
    def suppressed(self) -> bool: ...

    def __add__(self, other: Self, /) -> Self: ...


S = TypeVar("S", bound=_Mergeable)


def pool(parts: Iterable[S], empty: S) -> S:
    """``empty`` plus every part that is not suppressed (a suppressed cell carries no counts
    and stays out of pooled values)."""
    total = empty
    for part in parts:
        if not part.suppressed:
            total = total + part
    return total
