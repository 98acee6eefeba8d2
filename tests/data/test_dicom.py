"""Reading real DICOM files shipped inside pydicom, and radfed's own generated ones."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.pixels import apply_modality_lut

from radfed.data.attributes import normalise_sex
from radfed.data.dicom import read_dicom_image
from radfed.data.image import ImageReadError


def _testfile(name: str) -> Path:
    path = get_testdata_file(name, download=False)
    if path is None:
        pytest.skip(f"{name} is not in this pydicom wheel")
    return Path(str(path))


def test_ct_small_gets_its_rescale_applied() -> None:
    # Prepare
    path = _testfile("CT_small.dcm")
    ds = pydicom.dcmread(path)
    assert float(ds.RescaleIntercept) != 0  # the file really exercises the modality LUT
    # Execute
    image = read_dicom_image(path)
    # Assert
    expected = ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(
        ds.RescaleIntercept
    )
    np.testing.assert_allclose(image.pixels, expected, rtol=0, atol=1e-3)
    assert image.pixels.dtype == np.float32
    assert image.spacing == pytest.approx((0.661468, 0.661468))


@pytest.mark.parametrize("name", ["MR_small_RLE.dcm", "MR_small_bigendian.dcm"])
def test_other_encodings_give_the_same_pixels(name: str) -> None:
    reference = read_dicom_image(_testfile("MR_small.dcm"))
    np.testing.assert_array_equal(read_dicom_image(_testfile(name)).pixels, reference.pixels)
    assert reference.attributes["sex"] == "F"


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("rtstruct.dcm", "non-image"),
        ("waveform_ecg.dcm", "non-image"),
        ("liver_1frame.dcm", "non-image"),  # DICOM SEG: pixel data, but no image
        ("MR_truncated.dcm", "truncated"),
    ],
)
def test_unusable_files_raise_a_clear_reason(name: str, reason: str) -> None:
    with pytest.raises(ImageReadError, match=reason):
        read_dicom_image(_testfile(name))


def test_missing_and_non_dicom_files(tmp_path: Path) -> None:
    (tmp_path / "notes.dcm").write_text("not an image at all\n" * 20)
    with pytest.raises(ImageReadError, match="not a DICOM file"):
        read_dicom_image(tmp_path / "notes.dcm")
    with pytest.raises(ImageReadError, match="file not found"):
        read_dicom_image(tmp_path / "absent.dcm")


def test_monochrome1_is_inverted_so_bright_means_dense(synth_root: Path) -> None:
    # site-c of the generated data is MONOCHROME1 with a bright lesion in positive cases.
    path = next((synth_root / "site-c" / "images").glob("*.dcm"))
    ds = pydicom.dcmread(path)
    assert ds.PhotometricInterpretation == "MONOCHROME1"
    modality = apply_modality_lut(ds.pixel_array, ds).astype(np.float32)
    image = read_dicom_image(path)
    np.testing.assert_allclose(image.pixels, modality.max() + modality.min() - modality)


def test_synthetic_rescale_intercept_round_trips(synth_root: Path) -> None:
    # site-b stores values with slope 0.5 and intercept -1024 (CT-like)
    path = next((synth_root / "site-b" / "images").glob("*.dcm"))
    ds = pydicom.dcmread(path)
    assert float(ds.RescaleIntercept) == -1024 and float(ds.RescaleSlope) == 0.5
    image = read_dicom_image(path)
    assert image.pixels.min() >= -1024 and image.pixels.max() <= -1024 + 0.5 * (2**16 - 1)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("F", "F"),
        ("M", "M"),
        ("O", "other"),
        ("", "unknown"),
        (None, "unknown"),
        ("N/A", "unknown"),
        (" f ", "F"),
    ],
)
def test_sex_values_seen_in_real_headers(value: str | None, expected: str) -> None:
    assert normalise_sex(value) == expected


def test_monochrome1_dense_regions_come_out_bright(tmp_path: Path) -> None:
    # In MONOCHROME1 a low stored value is displayed white: a dense square on a dark field.
    ds = pydicom.dcmread(_testfile("CT_small.dcm"))
    stored = np.full((32, 32), 3000, dtype=np.uint16)
    stored[8:16, 8:16] = 100
    ds.set_pixel_data(stored, "MONOCHROME1", 12)
    ds.RescaleSlope, ds.RescaleIntercept = "1", "0"
    ds.save_as(tmp_path / "mono1.dcm")
    pixels = read_dicom_image(tmp_path / "mono1.dcm").pixels
    assert pixels[8:16, 8:16].min() > pixels[20:, 20:].max()
