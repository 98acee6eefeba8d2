"""The site-folder contract: manifest errors name the file, the line and the fix."""

from __future__ import annotations

from pathlib import Path

import pytest

from radfed.data.loading import load_site
from radfed.data.manifest import read_manifest
from radfed.errors import DataError


def test_missing_manifest_names_the_file_and_the_columns(tmp_path: Path) -> None:
    (tmp_path / "site-x").mkdir()
    with pytest.raises(
        DataError, match=r"site-x/manifest.csv: no manifest.csv .*image, patient_id, label"
    ):
        read_manifest(tmp_path / "site-x")


def test_missing_required_column(tmp_path: Path) -> None:
    site = tmp_path / "site-x"
    site.mkdir()
    (site / "manifest.csv").write_text("image,patient_id\na.dcm,P1\n")
    with pytest.raises(DataError, match=r"missing required column.*label"):
        read_manifest(site)


def test_bad_rows_are_skipped_with_their_line_numbers(tmp_path: Path) -> None:
    # Prepare
    site = tmp_path / "site-x"
    site.mkdir()
    (site / "manifest.csv").write_text(
        "image,patient_id,label,sex\n"
        "a.dcm,P1,1,F\n"  # line 2: fine
        "b.dcm,,0,M\n"  # line 3: no patient
        "c.dcm,P3,yes,M\n"  # line 4: bad label
        "/mnt/export/x.dcm,P4,0,M\n"  # line 5: absolute path
        "d.dcm,P5,0,\n"  # line 6: fine, empty attribute dropped
    )
    # Execute
    manifest = read_manifest(site)
    # Assert
    assert [c.line for c in manifest.cases] == [2, 6]
    assert [p.line for p in manifest.problems] == [3, 4, 5]
    assert "patient_id" in manifest.problems[0].reason
    assert "0 or 1" in manifest.problems[1].reason
    assert "absolute path" in manifest.problems[2].reason
    assert manifest.cases[0].attributes == {"sex": "F"}
    assert manifest.cases[1].attributes == {}
    assert str(manifest.problems[2]).startswith("manifest.csv line 5:")


def test_a_manifest_without_any_usable_row_cannot_load(tmp_path: Path) -> None:
    site = tmp_path / "site-x"
    site.mkdir()
    (site / "manifest.csv").write_text("image,patient_id,label\na.dcm,P1,yes\n")
    assert [p.line for p in read_manifest(site).problems] == [2]
    with pytest.raises(DataError, match="no usable row"):
        load_site(site, image_size=32, val_fraction=0.2, test_fraction=0.2, seed=1)


def test_manifest_encoding_duplicate_columns_and_multiline_fields(tmp_path: Path) -> None:
    site = tmp_path / "site-x"
    site.mkdir()
    (site / "manifest.csv").write_bytes(
        "image,patient_id,label,note\na.dcm,P1,1,Müller\n".encode("latin-1")
    )
    with pytest.raises(DataError, match="not UTF-8"):
        read_manifest(site)
    (site / "manifest.csv").write_text("image,patient_id,label,label\na.dcm,P1,1,0\n")
    with pytest.raises(DataError, match="label appear more than once"):
        read_manifest(site)
    (site / "manifest.csv").write_text(
        'image,patient_id,label,note\na.dcm,P1,1,"two\nlines"\nb.dcm,P2,x,\n'
    )
    manifest = read_manifest(site)
    assert [p.line for p in manifest.problems] == [4]  # the record after a 2-line record


def test_boxes_with_non_finite_coordinates_are_refused(tmp_path: Path) -> None:
    site = tmp_path / "site-x"
    site.mkdir()
    (site / "manifest.csv").write_text(
        'image,patient_id,boxes\na.dcm,P1,"[[1, 2, NaN, 4]]"\nb.dcm,P2,"[[1, 2, Infinity, 4]]"\n'
    )
    problems = read_manifest(site, "detection").problems
    assert [p.line for p in problems] == [2, 3]
    assert all("4 numbers" in p.reason for p in problems)
