"""Reading one DICOM file into float pixels in modality units, quietly (no header in a log)."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pydicom
from pydicom import config as pydicom_config
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_modality_lut, apply_voi_lut
from pydicom.uid import UID

from radfed.data.attributes import STANDARD_BANDS, AgeBands, attributes_from_header
from radfed.data.image import MAX_VOXELS, DicomImage, ImageReadError, check_voxels

__all__ = [
    "NON_IMAGE_MODALITIES",
    "declared_voxels",
    "pixels_of",
    "quiet_pydicom",
    "read_dataset",
    "read_dicom_image",
]

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


def read_dicom_image(
    path: Path,
    bands: AgeBands = STANDARD_BANDS,
    *,
    voi: bool = False,
    max_voxels: int = MAX_VOXELS,
) -> DicomImage:
    """Read a DICOM image file: single-frame 2-D, or multi-frame as a ``(D, H, W)`` volume.

    Args:
        path: a DICOM file (Part 10, or a bare dataset without preamble).
        bands: age bands of the ``age_band`` attribute.
        voi: apply the header's VOI LUT or window after the modality LUT.

    Returns:
        The image with rescale slope/intercept applied and MONOCHROME1 inverted.

    Raises:
        ImageReadError: the file is missing, not DICOM, not an image, truncated, in colour,
            or compressed without a codec. The reason never quotes header values.
    """
    with quiet_pydicom():
        ds = read_dataset(path)
        pixels = pixels_of(ds, voi=voi, max_voxels=max_voxels)
        try:
            spacing = _spacing(ds, pixels.ndim)
            attributes = attributes_from_header(ds, bands)
        except Exception:
            raise ImageReadError("malformed header elements") from None
    return DicomImage(pixels=pixels, spacing=spacing, attributes=attributes)


def declared_voxels(ds: pydicom.Dataset) -> int:
    """Rows x columns x frames as the header declares them (0 when it declares none)."""
    try:
        rows, columns = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
        frames = int(ds.get("NumberOfFrames", 1) or 1)
    except (TypeError, ValueError):
        raise ImageReadError("malformed image size elements (Rows, Columns, frames)") from None
    return max(rows, 0) * max(columns, 0) * max(frames, 1)


def pixels_of(
    ds: pydicom.Dataset, *, voi: bool = False, max_voxels: int = MAX_VOXELS
) -> np.ndarray:
    """Grayscale pixels of a dataset in modality units (MONOCHROME1 inverted), float32.

    An image whose header declares more than ``max_voxels`` voxels is not decoded.
    """
    modality = str(ds.get("Modality", "")).strip().upper()
    if modality in NON_IMAGE_MODALITIES:
        raise ImageReadError("non-image object (no image pixel data): not an image to train on")
    if "PixelData" not in ds:
        if _is_image_storage(ds):  # an image whose end was cut off
            raise ImageReadError("truncated DICOM file: the pixel data is missing")
        raise ImageReadError("non-image object (no image pixel data): not an image to train on")
    if int(ds.get("SamplesPerPixel", 1) or 1) != 1:
        raise ImageReadError("colour image: radfed trains on grayscale images; export grayscale")
    check_voxels(declared_voxels(ds), max_voxels)
    try:
        raw = ds.pixel_array
    except Exception:
        if _missing_codec(ds):
            raise ImageReadError(
                "compressed pixel data needs a codec: install radfed's 'codecs' extra "
                "(pip install 'radfed[codecs]')"
            ) from None
        raise ImageReadError("pixel data is truncated or inconsistent with the header") from None
    if raw.ndim not in (2, 3):
        raise ImageReadError(f"expected 2-D or 3-D grayscale pixel data, got {raw.ndim}-D")
    try:
        values = np.asarray(_modality(raw, ds), dtype=np.float64)
        if voi:
            values = np.asarray(apply_voi_lut(values, ds), dtype=np.float64)
    except (ValueError, TypeError, AttributeError, IndexError, KeyError):
        raise ImageReadError("invalid modality or VOI LUT attributes") from None
    if str(ds.get("PhotometricInterpretation", "")).strip() == "MONOCHROME1":
        values = values.max() + values.min() - values
    with np.errstate(over="ignore", invalid="ignore"):
        pixels = values.astype(np.float32)
    if not np.isfinite(pixels).all():  # checked last: float32 overflows too
        raise ImageReadError("pixel values are not finite (or too large) after the modality LUT")
    return pixels


def _modality(raw: np.ndarray, ds: pydicom.Dataset) -> np.ndarray:
    """Modality LUT; enhanced multi-frame files keep rescale values in functional groups."""
    if "RescaleSlope" in ds or "ModalityLUTSequence" in ds or raw.ndim == 2:
        return np.asarray(apply_modality_lut(raw, ds))
    shared = _first(ds, "SharedFunctionalGroupsSequence", "PixelValueTransformationSequence")
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    out = raw.astype(np.float64)
    for index in range(raw.shape[0]):
        item = shared
        if per_frame is not None and index < len(per_frame):
            item = _first(per_frame[index], "PixelValueTransformationSequence") or shared
        if item is not None:
            slope = float(item.get("RescaleSlope", 1) or 1)
            intercept = float(item.get("RescaleIntercept", 0) or 0)
            out[index] = out[index] * slope + intercept
    return out


def _missing_codec(ds: pydicom.Dataset) -> bool:
    """Whether the transfer syntax is compressed and no installed plugin can decode it."""
    from pydicom.pixels import get_decoder

    meta = getattr(ds, "file_meta", None)
    syntax = meta.get("TransferSyntaxUID") if meta is not None else None
    if syntax is None or not UID(str(syntax)).is_compressed:
        return False
    try:
        return not get_decoder(UID(str(syntax))).is_available
    except NotImplementedError:  # no decoder exists at all for this syntax
        return True


def _first(ds: pydicom.Dataset, *keywords: str) -> pydicom.Dataset | None:
    """The first item down a chain of sequences, or None."""
    item: pydicom.Dataset | None = ds
    for keyword in keywords:
        sequence = item.get(keyword) if item is not None else None
        if not sequence:
            return None
        item = sequence[0]
    return item


def _is_image_storage(ds: pydicom.Dataset) -> bool:
    """Whether the object's SOP class is an image storage class, or it has image attributes."""
    meta = getattr(ds, "file_meta", None)
    sop_class = ds.get("SOPClassUID") or (meta.get("MediaStorageSOPClassUID") if meta else None)
    name = UID(str(sop_class)).name if sop_class else ""
    return "Image Storage" in name or ("Rows" in ds and "Columns" in ds)


def read_dataset(path: Path) -> pydicom.Dataset:
    """Part 10 files, and bare datasets without preamble or file meta."""
    try:
        return pydicom.dcmread(path)
    except FileNotFoundError:
        raise ImageReadError("file not found") from None
    except InvalidDicomError:
        pass
    except Exception:
        raise ImageReadError("unreadable or truncated DICOM file") from None
    try:
        ds = pydicom.dcmread(path, force=True)
        # A forced read of a non-DICOM file yields nonsense: demand the identifying elements.
        if "SOPClassUID" not in ds and "Modality" not in ds:
            raise ValueError
        return ds
    except Exception:
        raise ImageReadError("not a DICOM file") from None


@contextmanager
def quiet_pydicom() -> Iterator[None]:
    """Read without pydicom's warnings or log records: they quote header values."""
    before = pydicom_config.settings.reading_validation_mode
    pydicom_log = logging.getLogger("pydicom")
    level = pydicom_log.level
    pydicom_config.settings.reading_validation_mode = pydicom_config.IGNORE
    pydicom_log.setLevel(logging.CRITICAL + 1)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        pydicom_config.settings.reading_validation_mode = before
        pydicom_log.setLevel(level)


def _spacing(ds: pydicom.Dataset, ndim: int) -> tuple[float, ...] | None:
    """Spacing per axis of ``pixels`` (row, column; slice first for volumes)."""
    try:
        measures = _first(ds, "SharedFunctionalGroupsSequence", "PixelMeasuresSequence")
        source = measures if measures is not None and "PixelSpacing" in measures else ds
        value = source.get("PixelSpacing") or source.get("ImagerPixelSpacing")
        row, col = (float(v) for v in value)
        if ndim == 2:
            return (row, col)
        between = source.get("SpacingBetweenSlices") or source.get("SliceThickness")
        return (float(between), row, col) if between else None
    except (TypeError, ValueError, AttributeError):
        return None
