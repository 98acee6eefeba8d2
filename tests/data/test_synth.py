"""Generated sites: real DICOM, deterministic, and different from site to site."""

from __future__ import annotations

import csv
import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pydicom
import pytest

from radfed.data.reader import read_image
from radfed.data.synth import (
    MAX_SITES,
    SMALL_SITE_CASES,
    site_name,
    site_profiles,
    synth_classification,
    synth_sites,
)
from radfed.deployment.site_kit import SITE_NAME_RULE
from radfed.errors import ConfigError
from radfed.folders import list_sites


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


def _manifest(site: Path) -> list[dict[str, str]]:
    with (site / "manifest.csv").open() as handle:
        return list(csv.DictReader(handle))


def test_detection_boxes_enclose_the_lesions(tmp_path: Path) -> None:
    synth_sites(tmp_path / "d", task="detection", sites=1, cases_per_site=8, image_size=48, seed=3)
    rows = _manifest(tmp_path / "d" / "site-a")
    positives = [r for r in rows if r["label"] == "1"]
    assert positives and all(json.loads(r["boxes"]) == [] for r in rows if r["label"] == "0")
    for row in positives:
        image = read_image(tmp_path / "d" / "site-a" / row["image"]).pixels
        boxes = json.loads(row["boxes"])
        assert len(boxes) in (1, 2, 3)
        for x1, y1, x2, y2 in boxes:
            assert 0 <= x1 < x2 <= image.shape[1] and 0 <= y1 < y2 <= image.shape[0]
            inside = image[y1:y2, x1:x2].mean()
            assert inside > np.median(image)  # a lesion is brighter than the typical pixel


@pytest.mark.parametrize("dims", [2, 3])
def test_segmentation_masks_match_their_images(tmp_path: Path, dims: int) -> None:
    size = 48 if dims == 2 else 24
    synth_sites(
        tmp_path / "s",
        task="segmentation",
        sites=1,
        cases_per_site=8,
        image_size=size,
        dims=dims,
        seed=4,
    )
    for row in _manifest(tmp_path / "s" / "site-a"):
        image = read_image(tmp_path / "s" / "site-a" / row["image"]).pixels
        mask = read_image(tmp_path / "s" / "site-a" / row["mask"]).pixels
        assert image.shape == mask.shape == (size,) * dims
        assert set(np.unique(mask)) <= {0.0, 1.0}
        assert (mask.sum() > 0) == (row["label"] == "1")
        if mask.sum():
            assert image[mask > 0].mean() > image[mask == 0].mean()


def test_bias_presets_are_planted_where_synth_json_says(tmp_path: Path) -> None:
    common = {"sites": 3, "cases_per_site": 40, "image_size": 32, "seed": 9}
    synth_sites(tmp_path / "plain", **common)
    synth_sites(tmp_path / "biased", bias="contrast", **common)
    planted = json.loads((tmp_path / "biased" / "synth.json").read_text())["bias"]
    assert planted["site"] == "site-b" and planted["group"] == {"sex": "F", "min_age": 60}
    # Only site-b's older women changed: every other file is byte-identical to the plain run
    changed = []
    for path in sorted((tmp_path / "plain").rglob("*.dcm")):
        other = tmp_path / "biased" / path.relative_to(tmp_path / "plain")
        if path.read_bytes() != other.read_bytes():
            ds = pydicom.dcmread(other, stop_before_pixels=True)
            changed.append((path.parent.parent.name, ds.PatientSex, int(ds.PatientAge[:3])))
    assert changed and all(
        site == "site-b" and sex == "F" and age >= 60 for site, sex, age in changed
    )
    synth_sites(tmp_path / "marker", bias="marker", **common)
    assert json.loads((tmp_path / "marker" / "synth.json").read_text())["bias"]["site"] == "site-c"
    with pytest.raises(ConfigError, match="--bias"):
        synth_sites(tmp_path / "x", bias="unknown", **common)


def test_progress_reports_every_case_once(tmp_path: Path) -> None:
    calls: list[tuple[int, int]] = []
    summaries = synth_sites(
        tmp_path / "p",
        sites=2,
        cases_per_site=8,
        image_size=32,
        progress=lambda done, total: calls.append((done, total)),
    )
    total = sum(s.cases for s in summaries)
    assert [done for done, _ in calls] == list(range(1, total + 1))
    assert {t for _, t in calls} == {total}


def test_small_sites_preset_plants_the_contrast_effect_at_small_sites_sizes(
    tmp_path: Path,
) -> None:
    # Execute: no size given, so the preset's (a small hospital's site)
    summaries = synth_sites(tmp_path / "small", bias="small-sites", sites=2, image_size=32, seed=9)
    planted = json.loads((tmp_path / "small" / "synth.json").read_text())["bias"]
    # Assert: the contrast effect, its expected verdicts, sites around SMALL_SITE_CASES
    assert planted["preset"] == "small-sites" and planted["site"] == "site-b"
    assert planted["group"] == {"sex": "F", "min_age": 60} and "inconclusive" in planted["expected"]
    assert SMALL_SITE_CASES == 240
    assert all(0.5 * SMALL_SITE_CASES <= s.cases <= 1.5 * SMALL_SITE_CASES for s in summaries)


def test_more_than_26_sites_get_valid_names_in_creation_order() -> None:
    # Prepare: beyond the alphabet, and the first 26 names as docs and tests use them
    letters = [f"site-{c}" for c in "abcdefghijklmnopqrstuvwxyz"]
    # Execute
    names = [p.name for p in site_profiles(30, 8, 0)]
    # Assert: the first 26 unchanged, then distinct, valid names that sort in creation order
    assert names[:26] == letters
    assert names[26:] == ["site-z00027", "site-z00028", "site-z00029", "site-z00030"]
    assert len(set(names)) == 30 and sorted(names) == names
    assert all(re.fullmatch(SITE_NAME_RULE, n) for n in names)
    assert [p.name for p in site_profiles(3, 8, 0)] == names[:3]  # stable whatever the count
    last = [site_name(i) for i in (MAX_SITES - 2, MAX_SITES - 1)]
    assert sorted(last) == last and all(re.fullmatch(SITE_NAME_RULE, n) for n in last)


def test_thirty_sites_are_written_and_simulated_in_creation_order(tmp_path: Path) -> None:
    # Execute
    summaries = synth_sites(tmp_path, sites=30, cases_per_site=8, image_size=32)
    # Assert: the partition-id-th node (folders sorted by name) gets the id-th site,
    # and patient ids stay distinct across sites
    assert [p.name for p in list_sites(tmp_path)] == [s.name for s in summaries]
    patients = [
        (site.name, row["patient_id"]) for site in list_sites(tmp_path) for row in _manifest(site)
    ]
    owner = {pid: name for name, pid in patients}
    assert all(owner[pid] == name for name, pid in patients)


def test_too_many_sites_is_refused_with_the_limit_in_the_message() -> None:
    with pytest.raises(ConfigError, match=rf"--sites must be between 1 and {MAX_SITES}, got"):
        site_profiles(MAX_SITES + 1, 8, 0)
    with pytest.raises(ValueError, match="site index"):
        site_name(MAX_SITES)
