"""Reading a directory that holds one DICOM series into a ``(D, H, W)`` volume."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom

from radfed.data.attributes import STANDARD_BANDS, AgeBands, attributes_from_header
from radfed.data.dicom import declared_voxels, pixels_of, quiet_pydicom, read_dataset
from radfed.data.image import MAX_VOXELS, DicomImage, ImageReadError, check_voxels

__all__ = ["read_series"]


def read_series(
    folder: Path,
    bands: AgeBands = STANDARD_BANDS,
    *,
    voi: bool = False,
    max_voxels: int = MAX_VOXELS,
) -> DicomImage:
    """Stack the slices of one series, ordered along the slice normal.

    Slices are ordered by ImagePositionPatient projected on the normal of
    ImageOrientationPatient, else by InstanceNumber. The slice spacing is the median
    distance between positions, else SliceThickness.

    Raises:
        ImageReadError: no DICOM file, more than one series, slices of different sizes, or
            an unreadable slice (the whole case is skipped; the reason names which check).
    """
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.name.upper() != "DICOMDIR")
    with quiet_pydicom():
        slices = []
        for path in files:
            try:
                slices.append(read_dataset(path))
            except ImageReadError:
                continue  # not DICOM: ignored inside a series folder
        if not slices:
            raise ImageReadError("series folder holds no DICOM file")
        series = {str(ds.get("SeriesInstanceUID", "")) for ds in slices}
        if len(series) > 1:
            raise ImageReadError(f"series folder holds {len(series)} series; keep one per folder")
        slices = [ds for ds in slices if "PixelData" in ds]
        if not slices:
            raise ImageReadError("series folder holds no image")
        check_voxels(sum(declared_voxels(ds) for ds in slices), max_voxels)
        order, spacing_z = _order(slices)
        planes = [pixels_of(slices[i], voi=voi, max_voxels=max_voxels) for i in order]
        if any(p.ndim != 2 for p in planes) or len({p.shape for p in planes}) > 1:
            raise ImageReadError("series slices differ in size or are not single-frame")
        volume = np.stack(planes)
        first = slices[order[0]]
        try:
            row, col = (float(v) for v in first.get("PixelSpacing"))
            spacing: tuple[float, ...] | None = (spacing_z, row, col) if spacing_z else None
        except (TypeError, ValueError):
            spacing = None
        attributes = attributes_from_header(first, bands)
    return DicomImage(pixels=volume, spacing=spacing, attributes=attributes)


def _order(slices: list[pydicom.Dataset]) -> tuple[list[int], float | None]:
    """Slice order and slice spacing (None when unknown)."""
    try:
        orientation = np.array([float(v) for v in slices[0].ImageOrientationPatient])
        normal = np.cross(orientation[:3], orientation[3:])
        where = [
            float(np.dot(normal, [float(v) for v in ds.ImagePositionPatient])) for ds in slices
        ]
        order = sorted(range(len(slices)), key=lambda i: where[i])
        steps = np.diff(sorted(where))
        spacing = float(np.median(steps)) if len(steps) and np.median(steps) > 0 else None
        return order, spacing
    except (AttributeError, TypeError, ValueError):
        pass
    numbers = []
    for ds in slices:
        try:
            numbers.append(int(ds.get("InstanceNumber")))
        except (TypeError, ValueError):
            numbers.append(0)
    thickness = slices[0].get("SliceThickness")
    try:
        spacing_z = float(thickness) if thickness else None
    except (TypeError, ValueError):
        spacing_z = None
    return sorted(range(len(slices)), key=lambda i: numbers[i]), spacing_z
