"""Volumes and other formats: series folders, multi-frame files, NIfTI, VOI, spacing, colour."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import nibabel
import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from radfed.data.image import ImageReadError
from radfed.data.loading import load_site
from radfed.data.reader import read_image

TEST_FILES = Path(str(get_testdata_file("CT_small.dcm", download=False))).parent


def test_series_folder_is_ordered_along_the_slice_normal(tmp_path: Path) -> None:
    # Prepare: a copy of a real CT series with its files renamed in reverse position order
    source = TEST_FILES / "dicomdirtests" / "77654033" / "CT2"
    slices = sorted(
        source.iterdir(), key=lambda p: float(pydicom.dcmread(p).ImagePositionPatient[2])
    )
    folder = tmp_path / "series"
    folder.mkdir()
    for index, path in enumerate(reversed(slices)):
        shutil.copy(path, folder / f"{index:02d}.dcm")
    # Execute
    volume = read_image(folder)
    # Assert: slice k is the k-th slice by position, whatever the file names
    assert volume.pixels.shape == (len(slices), 16, 16)
    for k, path in enumerate(slices):
        ds = pydicom.dcmread(path)
        expected = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        np.testing.assert_allclose(volume.pixels[k], expected)
    assert volume.spacing is not None and volume.spacing[0] == pytest.approx(1.25, abs=1e-3)
    assert volume.attributes["modality"] == "CT"


def test_folder_with_two_series_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "mixed"
    shutil.copytree(TEST_FILES / "dicomdirtests" / "77654033" / "CT2", folder)
    shutil.copy(str(get_testdata_file("CT_small.dcm", download=False)), folder / "other.dcm")
    with pytest.raises(ImageReadError, match="2 series"):
        read_image(folder)


def _multiframe(path: Path, volume: np.ndarray, slope: float, intercept: float) -> None:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = pydicom.uid.UID("1.2.840.10008.5.1.4.1.1.2.1")  # Enhanced CT
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = (
        meta.MediaStorageSOPClassUID,
        meta.MediaStorageSOPInstanceUID,
    )
    ds.Modality, ds.PatientSex = "CT", "F"
    shared = Dataset()
    transform, measures = Dataset(), Dataset()
    transform.RescaleSlope, transform.RescaleIntercept = f"{slope:g}", f"{intercept:g}"
    measures.PixelSpacing, measures.SliceThickness = [0.8, 0.8], "2.5"
    shared.PixelValueTransformationSequence = [transform]
    shared.PixelMeasuresSequence = [measures]
    ds.SharedFunctionalGroupsSequence = [shared]
    ds.NumberOfFrames = volume.shape[0]
    ds.set_pixel_data(volume, "MONOCHROME2", 12)
    ds.save_as(path, enforce_file_format=True)


def test_multiframe_file_is_a_volume_with_functional_group_rescale(tmp_path: Path) -> None:
    stored = np.arange(4 * 8 * 8, dtype=np.uint16).reshape(4, 8, 8)
    _multiframe(tmp_path / "enhanced.dcm", stored, slope=2.0, intercept=-1000.0)
    image = read_image(tmp_path / "enhanced.dcm")
    np.testing.assert_allclose(image.pixels, stored * 2.0 - 1000.0)
    assert image.spacing == (2.5, 0.8, 0.8)
    assert image.attributes["sex"] == "F"


def test_nifti_volume_in_slice_row_column_order(tmp_path: Path) -> None:
    data = np.random.default_rng(0).random((6, 5, 4)).astype(np.float32)  # (X, Y, Z) on disk
    affine = np.diag([0.5, 0.7, 3.0, 1.0])
    nibabel.save(nibabel.Nifti1Image(data, affine), tmp_path / "ct.nii.gz")
    image = read_image(tmp_path / "ct.nii.gz")
    np.testing.assert_allclose(image.pixels, np.transpose(data, (2, 1, 0)))
    assert image.spacing == pytest.approx((3.0, 0.7, 0.5))
    assert image.attributes["sex"] == "unknown"


def test_voi_window_is_applied_only_on_request(tmp_path: Path) -> None:
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    ds = pydicom.dcmread(str(get_testdata_file("CT_small.dcm", download=False)))
    ds.WindowCenter, ds.WindowWidth = "40", "400"  # a soft-tissue window
    ds.save_as(tmp_path / "windowed.dcm")
    plain = read_image(tmp_path / "windowed.dcm")
    windowed = read_image(tmp_path / "windowed.dcm", voi=True)
    modality = apply_modality_lut(ds.pixel_array, ds)
    np.testing.assert_allclose(plain.pixels, modality)
    np.testing.assert_allclose(windowed.pixels, apply_voi_lut(modality, ds), rtol=1e-5)
    assert not np.allclose(plain.pixels, windowed.pixels)


def test_colour_images_are_skipped_with_a_reason() -> None:
    path = get_testdata_file("SC_rgb_rle_2frame.dcm", download=False)
    if path is None:
        pytest.skip("SC_rgb_rle_2frame.dcm is not in this pydicom wheel")
    with pytest.raises(ImageReadError, match="colour image"):
        read_image(Path(str(path)))


@pytest.mark.skipif(importlib.util.find_spec("jpeg_ls") is not None, reason="pyjpegls is installed")
def test_compressed_without_codec_names_the_extra() -> None:
    path = get_testdata_file("JPEGLSNearLossless_08.dcm", download=False)
    if path is None:
        pytest.skip("JPEGLSNearLossless_08.dcm is not in this pydicom wheel")
    with pytest.raises(ImageReadError, match=r"codecs' extra"):
        read_image(Path(str(path)))


def _volume_site(tmp_path: Path) -> Path:
    site = tmp_path / "site-v"
    (site / "vols").mkdir(parents=True)
    rows = ["image,patient_id,label"]
    for index in range(6):
        stored = np.random.default_rng(index).integers(0, 4000, (5, 12, 12)).astype(np.uint16)
        _multiframe(site / "vols" / f"v{index}.dcm", stored, 1.0, -1024.0)
        rows.append(f"vols/v{index}.dcm,P{index},{index % 2}")
    shutil.copy(str(get_testdata_file("CT_small.dcm", download=False)), site / "vols" / "flat.dcm")
    rows.append("vols/flat.dcm,P9,1")
    (site / "manifest.csv").write_text("\n".join(rows) + "\n")
    return site


def test_3d_run_loads_volumes_and_skips_2d_images(tmp_path: Path) -> None:
    site = load_site(
        _volume_site(tmp_path),
        image_size=16,
        val_fraction=0.0,
        test_fraction=0.0,
        seed=1,
        spatial_dims=3,
    )
    assert site.splits["train"].images.shape == (6, 1, 16, 16, 16)
    assert [p.line for p in site.skipped] == [8]
    assert "2-D image in a 3-D run" in site.skipped[0].reason


def test_target_spacing_resamples_before_resizing(tmp_path: Path) -> None:
    from radfed.data.loading import _resample

    pixels = np.zeros((10, 20), dtype=np.float32)
    assert _resample(pixels, (1.0, 0.5), (2.0, 2.0)).shape == (5, 5)
    assert _resample(pixels, None, (2.0, 2.0)).shape == (10, 20)  # unknown spacing: unchanged
