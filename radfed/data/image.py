"""A case image as radfed reads it (pixels in modality units, spacing, attributes), and the
error of an image that cannot be read."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from radfed.errors import DataError

__all__ = ["MAX_VOXELS", "DicomImage", "ImageReadError", "check_voxels"]

#: The largest case image decoded unless the site policy says otherwise (``decoded-voxels``):
#: 2**28 voxels, a 512 x 512 x 1024 volume; decoding takes about 14 bytes per voxel.
MAX_VOXELS = 2**28


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


def check_voxels(declared: int, limit: int) -> None:
    """Refuse to decode an image whose header declares more voxels than ``limit``.

    Raises:
        ImageReadError: naming both numbers and the policy key that raises the limit.
    """
    if declared > limit:
        raise ImageReadError(
            f"the image declares {declared} voxels, more than the {limit} this site decodes "
            "(site policy limits.decoded-voxels); not decoded"
        )
