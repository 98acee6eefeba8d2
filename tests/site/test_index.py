"""`radfed site index` on a real export tree (pydicom's dicomdirtests, a DICOMDIR tree)."""

from __future__ import annotations

import csv
import shutil
import stat
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file

from radfed.data.reader import read_image
from radfed.errors import DataError
from radfed.site.index import index_export

TREE = Path(str(get_testdata_file("CT_small.dcm", download=False))).parent / "dicomdirtests"


@pytest.fixture
def export(tmp_path: Path) -> Path:
    target = tmp_path / "export"
    shutil.copytree(TREE, target)
    return target


def _rows(site: Path) -> list[dict[str, str]]:
    with (site / "manifest.csv").open() as handle:
        return list(csv.DictReader(handle))


def test_export_becomes_cases_with_pseudonymous_patients(export: Path, tmp_path: Path) -> None:
    # Execute
    summary = index_export(export, tmp_path / "site")
    # Assert: every image file is in exactly one case; slice stacks are series cases
    rows = _rows(tmp_path / "site")
    assert summary.cases == len(rows) == 13 and summary.series_cases == 6
    assert summary.skipped["DICOMDIR index file"] == 2
    real_ids = {"77654033", "98890234"}  # the PatientIDs in this tree's image headers
    pseudonyms = {r["patient_id"] for r in rows}
    assert len(pseudonyms) == summary.patients == 2
    assert not pseudonyms & real_ids
    key = tmp_path / "site" / ".radfed" / "pseudonym.key"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    # Every case reads: the CT2 folder is one 4-slice volume
    ct2 = next(r for r in rows if r["image"].endswith("77654033/CT2"))
    assert read_image((tmp_path / "site" / ct2["image"]).resolve()).pixels.shape == (4, 16, 16)


def test_pseudonyms_are_stable_per_site_and_differ_between_sites(
    export: Path, tmp_path: Path
) -> None:
    index_export(export, tmp_path / "a")
    first = [r["patient_id"] for r in _rows(tmp_path / "a")]
    index_export(export, tmp_path / "a")
    assert [r["patient_id"] for r in _rows(tmp_path / "a")] == first
    index_export(export, tmp_path / "b")
    assert set(first).isdisjoint(r["patient_id"] for r in _rows(tmp_path / "b"))


def test_series_sharing_a_folder_get_a_folder_of_links(export: Path, tmp_path: Path) -> None:
    # MR2 holds three series in one folder: its 3-slice series becomes a linked folder
    index_export(export, tmp_path / "site")
    linked = [r for r in _rows(tmp_path / "site") if r["image"].startswith("series/")]
    assert linked
    for row in linked:
        folder = tmp_path / "site" / row["image"]
        uids = {
            pydicom.dcmread(p, stop_before_pixels=True).SeriesInstanceUID for p in folder.iterdir()
        }
        assert len(uids) == 1
        assert read_image(folder).pixels.ndim == 3


def test_labels_attach_by_uid_and_extra_columns_are_copied(export: Path, tmp_path: Path) -> None:
    cr = pydicom.dcmread(export / "77654033" / "CR1" / "6154", stop_before_pixels=True)
    ct = pydicom.dcmread(next((export / "77654033" / "CT2").iterdir()), stop_before_pixels=True)
    labels = tmp_path / "labels.csv"
    labels.write_text(
        "sop_instance_uid,series_instance_uid,label,split\n"
        f"{cr.SOPInstanceUID},,1,val\n"
        f",{ct.SeriesInstanceUID},0,train\n"
    )
    summary = index_export(export, tmp_path / "site", labels=labels)
    rows = _rows(tmp_path / "site")
    assert summary.labelled == 2
    by_image = {r["image"].split("export/")[-1]: r for r in rows}
    assert (by_image["77654033/CR1/6154"]["label"], by_image["77654033/CR1/6154"]["split"]) == (
        "1",
        "val",
    )
    assert by_image["77654033/CT2"]["label"] == "0"
    assert sum(1 for r in rows if r["label"] == "") == len(rows) - 2


def test_bad_inputs_are_named(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="export folder not found"):
        index_export(tmp_path / "absent", tmp_path / "site")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("no images here")
    with pytest.raises(DataError, match="no DICOM image found"):
        index_export(tmp_path / "empty", tmp_path / "site")
    bad_labels = tmp_path / "labels.csv"
    bad_labels.write_text("case,label\n1,0\n")
    with pytest.raises(DataError, match="needs a 'label' column and one of"):
        index_export(TREE, tmp_path / "site", labels=bad_labels)
