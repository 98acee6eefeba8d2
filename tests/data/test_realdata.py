"""Full-size real images from the optional ``pydicom-data`` package (marker: ``realdata``).

pydicom finds ``pydicom-data`` through the ``pydicom.data.external_sources`` entry point named
``pydicom-data`` (its import package is ``data_store``, not ``pydicom_data``), so that entry
point is what these tests look for. Without it every test here skips with that reason; with it,
``get_testdata_file(name, download=False)`` resolves the files offline.

Each file is read by radfed and by pydicom on its own, and the two must agree: shape from
Rows/Columns (and NumberOfFrames for the enhanced CT), pixels in modality units (MONOCHROME1
inverted, as radfed documents), and the subgroup attributes the header states.
"""

from __future__ import annotations

import re
from importlib.metadata import entry_points
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.pixels import apply_modality_lut

from radfed.data.attributes import UNKNOWN, attributes_from_header
from radfed.data.image import DicomImage
from radfed.data.reader import read_image


def _pydicom_data_installed() -> bool:
    """Whether pydicom can see pydicom-data (the way pydicom itself looks for it)."""
    sources = entry_points(group="pydicom.data.external_sources")
    return any(source.name == "pydicom-data" for source in sources)


pytestmark = [
    pytest.mark.realdata,
    pytest.mark.skipif(
        not _pydicom_data_installed(),
        reason="pydicom-data is not installed (pip install pydicom-data): no full-size images",
    ),
]

#: Single-frame files, with the (rows, columns) pydicom's own tests state for them.
SINGLE_FRAME = {
    "RG1_UNCR.dcm": (1955, 1841),  # chest CR, MONOCHROME1, 15 bits stored
    "RG3_UNCR.dcm": None,  # CR, MONOCHROME1, 10 bits stored
    "MR2_UNCR.dcm": (1024, 1024),  # MR, MONOCHROME2, 12 bits stored
}
ENHANCED = "eCT_Supplemental.dcm"  # enhanced CT, 2 frames, rescale in functional groups
ALL_FILES = (*SINGLE_FRAME, ENHANCED)

_SEX = {"F": "F", "M": "M", "O": "other"}
_AGE = re.compile(r"^(\d{3})Y$")


def _realfile(name: str) -> Path:
    path = get_testdata_file(name, download=False)
    if path is None:
        pytest.skip(f"{name} is not in the installed pydicom-data (or its hash does not match)")
    return Path(str(path))


def _read(path: Path) -> tuple[DicomImage, Dataset]:
    image = read_image(path)
    assert isinstance(image, DicomImage)
    assert image.pixels.dtype == np.float32
    assert np.isfinite(image.pixels).all()
    return image, pydicom.dcmread(path)


def _invert_if_monochrome1(pixels: np.ndarray, ds: Dataset) -> np.ndarray:
    if str(ds.get("PhotometricInterpretation", "")).strip() == "MONOCHROME1":
        return pixels.max() + pixels.min() - pixels
    return pixels


def _frame_rescale(ds: Dataset, index: int) -> tuple[float, float]:
    """Slope and intercept of one frame: per-frame group, else shared group, else top level."""
    groups = []
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if per_frame is not None and index < len(per_frame):
        groups.append(per_frame[index])
    shared = ds.get("SharedFunctionalGroupsSequence")
    if shared:
        groups.append(shared[0])
    for group in groups:
        transform = group.get("PixelValueTransformationSequence")
        if transform:
            item = transform[0]
            return float(item.get("RescaleSlope", 1)), float(item.get("RescaleIntercept", 0))
    return float(ds.get("RescaleSlope", 1)), float(ds.get("RescaleIntercept", 0))


def _check_single_frame(path: Path, size: tuple[int, int] | None) -> None:
    image, ds = _read(path)
    assert image.pixels.shape == (int(ds.Rows), int(ds.Columns))
    if size is not None:
        assert image.pixels.shape == size
    expected = apply_modality_lut(ds.pixel_array, ds).astype(np.float64)
    expected = _invert_if_monochrome1(expected, ds)
    np.testing.assert_allclose(image.pixels, expected, rtol=1e-6, atol=1e-3)
    assert float(image.pixels.std()) > 0  # a real image, not a constant


def _check_enhanced_volume(path: Path) -> None:
    image, ds = _read(path)
    frames = int(ds.NumberOfFrames)
    assert frames > 1
    assert image.pixels.ndim == 3
    assert image.pixels.shape == (frames, int(ds.Rows), int(ds.Columns))
    raw = ds.pixel_array.astype(np.float64)
    assert raw.shape == image.pixels.shape
    rescales = [_frame_rescale(ds, index) for index in range(frames)]
    pairs = zip(raw, rescales, strict=True)
    expected = np.stack([frame * slope + intercept for frame, (slope, intercept) in pairs])
    expected = _invert_if_monochrome1(expected, ds)
    np.testing.assert_allclose(image.pixels, expected, rtol=1e-6, atol=1e-3)


def _check_attributes(path: Path) -> dict[str, str]:
    image = read_image(path)
    header = pydicom.dcmread(path, stop_before_pixels=True)
    attributes = image.attributes
    assert attributes == attributes_from_header(header)
    raw_sex = str(header.get("PatientSex", "") or "").strip().upper()
    assert attributes["sex"] == _SEX.get(raw_sex, UNKNOWN)
    modality = str(header.get("Modality", "") or "").strip().upper()
    assert attributes["modality"] == (modality or UNKNOWN)
    match = _AGE.match(str(header.get("PatientAge", "") or "").strip())
    if match and int(match.group(1)) > 0:
        assert attributes["age"] == str(int(match.group(1)))
    return attributes


@pytest.mark.parametrize(("name", "size"), list(SINGLE_FRAME.items()))
def test_single_frame_pixels_match_pydicom(name: str, size: tuple[int, int] | None) -> None:
    _check_single_frame(_realfile(name), size)


def test_enhanced_multiframe_ct_is_a_volume_in_modality_units() -> None:
    _check_enhanced_volume(_realfile(ENHANCED))


@pytest.mark.parametrize("name", ALL_FILES)
def test_attributes_match_the_header(name: str) -> None:
    attributes = _check_attributes(_realfile(name))
    if name == "RG1_UNCR.dcm":
        assert attributes["sex"] == "F"
        assert attributes["modality"] == "CR"
