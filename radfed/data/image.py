"""A case image as radfed reads it (pixels in modality units, spacing, attributes), and the
error of an image that cannot be read."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from radfed.errors import DataError

__all__ = ["DicomImage", "ImageReadError"]


class ImageReadError(DataError):
    """An image cannot be read; ``reason`` is a short, header-free description."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class DicomImage:
    """Pixels of one image or volume in modality units, with their spacing.

    Attributes:
        pixels: float32 array of shape ``(H, W)`` or ``(D, H, W)``; higher means brighter.
        spacing: spacing in mm per axis (same order as ``pixels``), or None when unknown.
        attributes: subgroup attributes from the header (``radfed.data.attributes``); they
            stay in site memory and in aggregate cell keys, never in logs.
    """

    pixels: np.ndarray
    spacing: tuple[float, ...] | None
    attributes: dict[str, str]
