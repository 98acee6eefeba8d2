"""Generated sites: real DICOM, deterministic, and different from site to site."""

from __future__ import annotations

import csv
import hashlib
from pathlib import Path

import numpy as np
import pydicom
import pytest

from radfed.data.synth import site_profiles, synth_classification
from radfed.errors import ConfigError


def _digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_same_seed_same_bytes_other_seed_other_pixels(tmp_path: Path) -> None:
    kwargs = {"sites": 2, "cases_per_site": 10, "image_size": 32}
    synth_classification(tmp_path / "a", seed=1, **kwargs)
    synth_classification(tmp_path / "b", seed=1, **kwargs)
    synth_classification(tmp_path / "c", seed=2, **kwargs)
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    first = pydicom.dcmread(tmp_path / "a" / "site-a" / "images" / "case-0001.dcm")
    other = pydicom.dcmread(tmp_path / "c" / "site-a" / "images" / "case-0001.dcm")
    assert first.PixelData != other.PixelData


def test_files_are_real_dicom_with_the_subgroup_headers(synth_root: Path) -> None:
    with (synth_root / "site-a" / "manifest.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert set(rows[0]) == {"image", "patient_id", "label"}
    assert {r["label"] for r in rows} == {"0", "1"}
    ds = pydicom.dcmread(synth_root / "site-a" / rows[0]["image"])
    assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
    assert ds.PatientID == rows[0]["patient_id"]
    assert ds.PatientSex in {"F", "M"} and ds.PatientAge.endswith("Y") and ds.Manufacturer
    assert ds.pixel_array.shape == (32, 32)


def test_sites_differ_like_hospitals_do(synth_root: Path) -> None:
    headers = [
        pydicom.dcmread(next((synth_root / s / "images").glob("*.dcm")), stop_before_pixels=True)
        for s in ("site-a", "site-b", "site-c")
    ]
    assert len({h.Manufacturer for h in headers}) == 3
    assert {h.PhotometricInterpretation for h in headers} == {"MONOCHROME1", "MONOCHROME2"}
    assert len({int(h.BitsStored) for h in headers}) == 3
    profiles = site_profiles(3, 24, 11)
    assert len({p.cases for p in profiles}) == 3
    assert len({round(p.female_fraction, 2) for p in profiles}) == 3
    assert np.ptp([p.prevalence for p in profiles]) > 0.01


def test_refuses_to_overwrite_by_accident(tmp_path: Path) -> None:
    synth_classification(tmp_path, sites=1, cases_per_site=8, image_size=32)
    with pytest.raises(ConfigError, match="--overwrite"):
        synth_classification(tmp_path, sites=1, cases_per_site=8, image_size=32)
    synth_classification(tmp_path, sites=1, cases_per_site=8, image_size=32, overwrite=True)
    precious = tmp_path.parent / "hospital-export"
    precious.mkdir()
    (precious / "study.dcm").write_bytes(b"real data")
    with pytest.raises(ConfigError, match="not written by 'radfed synth'"):
        synth_classification(precious, sites=1, cases_per_site=8, image_size=32, overwrite=True)
    assert (precious / "study.dcm").exists()
    with pytest.raises(ConfigError, match="--sites"):
        site_profiles(0, 10, 0)
