"""Reading a NIfTI case image (through nibabel) into radfed's pixel layout."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import nibabel
import numpy as np
import pydicom

from radfed.data.attributes import attributes_from_header
from radfed.data.image import MAX_VOXELS, DicomImage, ImageReadError, check_voxels

__all__ = ["NIFTI_SUFFIXES", "read_nifti"]

#: File name endings read as NIfTI.
NIFTI_SUFFIXES = (".nii", ".nii.gz")


def read_nifti(path: Path, *, max_voxels: int = MAX_VOXELS) -> DicomImage:
    """NIfTI through nibabel: ``(X, Y[, Z])`` on disk becomes ``(H, W)`` or ``(D, H, W)``.

    An image whose header declares more than ``max_voxels`` voxels is not decoded.
    """
    try:
        image: Any = nibabel.load(str(path))
        shape = tuple(int(n) for n in image.header.get_data_shape())
    except Exception:
        raise ImageReadError("unreadable or truncated NIfTI file") from None
    check_voxels(math.prod(shape), max_voxels)
    try:
        data = np.asarray(image.get_fdata(dtype=np.float32))
        zooms = tuple(float(z) for z in image.header.get_zooms()[: data.ndim])
    except Exception:
        raise ImageReadError("unreadable or truncated NIfTI file") from None
    data = np.squeeze(data)
    if data.ndim not in (2, 3):
        raise ImageReadError(f"expected a 2-D or 3-D NIfTI image, got {data.ndim}-D")
    axes = tuple(reversed(range(data.ndim)))  # (X, Y, Z) -> (Z, Y, X)
    pixels = np.ascontiguousarray(np.transpose(data, axes), dtype=np.float32)
    if not np.isfinite(pixels).all():
        raise ImageReadError("NIfTI image holds non-finite values")
    spacing = tuple(reversed(zooms[: data.ndim])) if len(zooms) >= data.ndim else None
    return DicomImage(
        pixels=pixels, spacing=spacing, attributes=attributes_from_header(pydicom.Dataset())
    )
