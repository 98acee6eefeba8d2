"""One entry point for reading a case image, whatever the manifest names: a DICOM file, a
folder holding one DICOM series, or a NIfTI file."""

from __future__ import annotations

from pathlib import Path

from radfed.data.attributes import STANDARD_BANDS, AgeBands
from radfed.data.dicom import read_dicom_image
from radfed.data.image import MAX_VOXELS, DicomImage, ImageReadError
from radfed.data.nifti import NIFTI_SUFFIXES, read_nifti
from radfed.data.series import read_series

__all__ = ["read_image"]


def read_image(
    path: Path,
    bands: AgeBands = STANDARD_BANDS,
    *,
    voi: bool = False,
    max_voxels: int = MAX_VOXELS,
) -> DicomImage:
    """Read a case image: a DICOM file, a directory holding one DICOM series, or NIfTI.

    Args:
        path: the image named by the manifest.
        bands: age bands of the ``age_band`` attribute.
        voi: apply the header's VOI LUT or window (DICOM only) after the modality LUT.
        max_voxels: an image whose header declares more voxels is refused, not decoded.

    Raises:
        ImageReadError: with a reason that never quotes a header value.
    """
    try:
        if path.is_dir():
            return read_series(path, bands, voi=voi, max_voxels=max_voxels)
        if path.name.lower().endswith(NIFTI_SUFFIXES):
            return read_nifti(path, max_voxels=max_voxels)
        return read_dicom_image(path, bands, voi=voi, max_voxels=max_voxels)
    except ImageReadError:
        raise
    except Exception:
        raise ImageReadError("unreadable image file (malformed structure)") from None
