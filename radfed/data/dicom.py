"""Reading one DICOM image into float pixel values (modality LUT applied, MONOCHROME1 inverted)."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom import config as pydicom_config
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_modality_lut
from pydicom.uid import UID

from radfed.data.attributes import STANDARD_BANDS, AgeBands, attributes_from_header
from radfed.errors import DataError

__all__ = ["NON_IMAGE_MODALITIES", "DicomImage", "ImageReadError", "read_dicom_image"]

#: Modalities of objects that hold no image to train on, even when they carry pixel data.
NON_IMAGE_MODALITIES = frozenset(
    {
        "SEG",
        "RTSTRUCT",
        "RTPLAN",
        "RTDOSE",
        "RTRECORD",
        "SR",
        "KO",
        "PR",
        "ECG",
        "HD",
        "AU",
        "DOC",
        "REG",
        "FID",
        "PLAN",
    }
)


class ImageReadError(DataError):
    """An image cannot be read; ``reason`` is a short, header-free description."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class DicomImage:
    """Pixels of one 2-D image in modality units, with their pixel spacing.

    Attributes:
        pixels: array of shape ``(H, W)``, float32; higher means brighter (MONOCHROME2).
        spacing: (row, column) spacing in mm, or None when the header has none.
        attributes: subgroup attributes from the header (``radfed.data.attributes``); they
            stay on site memory and in aggregate cell keys, never in logs.
    """

    pixels: np.ndarray
    spacing: tuple[float, float] | None
    attributes: dict[str, str]


def read_dicom_image(path: Path, bands: AgeBands = STANDARD_BANDS) -> DicomImage:
    """Read a single-frame 2-D DICOM image.

    Args:
        path: a DICOM file (Part 10, or a bare dataset without preamble).

    Returns:
        The image with rescale slope/intercept applied and MONOCHROME1 inverted.

    Raises:
        ImageReadError: the file is missing, not DICOM, not an image, truncated,
            compressed without a codec, or not 2-D. The reason never quotes header values.
    """
    with _quiet_pydicom():
        ds = _read_dataset(path)
        modality = str(ds.get("Modality", "")).strip().upper()
        if modality in NON_IMAGE_MODALITIES:
            raise ImageReadError("non-image object (no image pixel data): not an image to train on")
        if "PixelData" not in ds:
            if _is_image_storage(ds):  # an image whose end was cut off
                raise ImageReadError("truncated DICOM file: the pixel data is missing")
            raise ImageReadError("non-image object (no image pixel data): not an image to train on")
        try:
            raw = ds.pixel_array
        except NotImplementedError:
            raise ImageReadError(
                "compressed pixel data needs a codec: install radfed's 'codecs' extra"
            ) from None
        except (ValueError, AttributeError, KeyError, TypeError, OSError, RuntimeError):
            raise ImageReadError(
                "pixel data is truncated or inconsistent with the header"
            ) from None
        if raw.ndim != 2:
            raise ImageReadError(f"expected a single-frame 2-D image, got {raw.ndim}-D pixel data")
        try:
            pixels = np.asarray(apply_modality_lut(raw, ds), dtype=np.float32)
        except (ValueError, TypeError, AttributeError):
            raise ImageReadError("invalid modality LUT or rescale attributes") from None
    if not np.isfinite(pixels).all():
        raise ImageReadError("pixel values are not finite after the modality LUT")
    if str(ds.get("PhotometricInterpretation", "")).strip() == "MONOCHROME1":
        pixels = pixels.max() + pixels.min() - pixels
    return DicomImage(
        pixels=pixels, spacing=_spacing(ds), attributes=attributes_from_header(ds, bands)
    )


def _is_image_storage(ds: pydicom.Dataset) -> bool:
    """Whether the object's SOP class is an image storage class, or it has image attributes."""
    meta = getattr(ds, "file_meta", None)
    sop_class = ds.get("SOPClassUID") or (meta.get("MediaStorageSOPClassUID") if meta else None)
    name = UID(str(sop_class)).name if sop_class else ""
    return "Image Storage" in name or ("Rows" in ds and "Columns" in ds)


def _read_dataset(path: Path) -> pydicom.Dataset:
    """Part 10 files, and bare datasets without preamble or file meta."""
    try:
        return pydicom.dcmread(path)
    except FileNotFoundError:
        raise ImageReadError("file not found") from None
    except InvalidDicomError:
        pass
    except (OSError, ValueError, EOFError, KeyError, TypeError, AttributeError):
        raise ImageReadError("unreadable or truncated DICOM file") from None
    try:
        ds = pydicom.dcmread(path, force=True)
        # A forced read of a non-DICOM file yields nonsense: demand the identifying elements.
        if "SOPClassUID" not in ds and "Modality" not in ds:
            raise ValueError
        return ds
    except (OSError, ValueError, EOFError, KeyError, TypeError, AttributeError, InvalidDicomError):
        raise ImageReadError("not a DICOM file") from None


@contextmanager
def _quiet_pydicom() -> Iterator[None]:
    """Read without pydicom's validation warnings: they quote header values into logs."""
    before = pydicom_config.settings.reading_validation_mode
    pydicom_config.settings.reading_validation_mode = pydicom_config.IGNORE
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        pydicom_config.settings.reading_validation_mode = before


def _spacing(ds: pydicom.Dataset) -> tuple[float, float] | None:
    try:
        value = ds.get("PixelSpacing") or ds.get("ImagerPixelSpacing")
        row, col = (float(v) for v in value)
    except (TypeError, ValueError, AttributeError):
        return None
    return (row, col)
