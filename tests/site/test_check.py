"""`radfed site check`: every problem by manifest line, composition, pre-flight, exit code."""

from __future__ import annotations

import csv
import dataclasses
import json
import shutil
from pathlib import Path

import pydicom
from pydicom.data import get_testdata_file
from typer.testing import CliRunner

from radfed.cli import app
from radfed.config import RunConfig
from radfed.site.check import check_site

runner = CliRunner()
CONFIG = RunConfig(image_size=32, val_fraction=0.25, test_fraction=0.25)


def _rows(site: Path) -> list[dict[str, str]]:
    with (site / "manifest.csv").open() as handle:
        return list(csv.DictReader(handle))


def _write(site: Path, rows: list[dict[str, str]]) -> None:
    with (site / "manifest.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def test_clean_site_can_train_and_shows_its_composition(site_copy: Path) -> None:
    report = check_site(site_copy, CONFIG)
    assert report.can_train, report.blockers
    assert report.cases_usable == report.cases_listed == len(_rows(site_copy))
    assert report.preflight == "ok"
    composition = report.composition
    assert sum(entry["cases"] for entry in composition.values()) == report.cases_usable
    assert set(composition["train"]["sex"]) <= {"F", "M"}
    assert report.identifying_tags == {}


def test_every_problem_is_reported_by_line(site_copy: Path) -> None:
    # Prepare: a truncated image (line 2), a non-image object (line 3), a duplicate of line 4
    # (line 6), a bad label (line 5), and an identifying element left in one header
    rows = _rows(site_copy)
    (site_copy / rows[0]["image"]).write_bytes((site_copy / rows[0]["image"]).read_bytes()[:300])
    shutil.copy(
        str(get_testdata_file("rtstruct.dcm", download=False)), site_copy / rows[1]["image"]
    )
    rows[3]["label"] = "maybe"
    shutil.copy(site_copy / rows[2]["image"], site_copy / "images" / "copy.dcm")
    rows.insert(4, {**rows[2], "image": "images/copy.dcm"})
    _write(site_copy, rows)
    ds = pydicom.dcmread(site_copy / rows[5]["image"])
    ds.PatientName = "Doe^Jane"
    ds.save_as(site_copy / rows[5]["image"])
    # Execute
    report = check_site(site_copy, CONFIG)
    # Assert
    by_line = {p["line"]: p["reason"] for p in report.problems}
    assert "truncated" in by_line[2] or "unreadable" in by_line[2]
    assert "non-image" in by_line[3]
    assert "0 or 1" in by_line[5]
    assert report.duplicates == [[4, 6]]
    assert report.identifying_tags == {"PatientName": 1}
    assert not report.can_train and "more than once" in report.blockers[0]


def test_cli_exit_codes_and_json_without_identifying_values(site_copy: Path) -> None:
    ok = runner.invoke(
        app, ["site", "check", str(site_copy), "--run-config", "image-size=32", "--json"]
    )
    assert ok.exit_code == 0, ok.output
    document = json.loads(ok.output)
    assert document["can_train"] is True
    text = json.dumps(document)
    for row in _rows(site_copy):
        assert row["patient_id"] not in text and row["image"] not in text
    assert str(site_copy.parent) not in text
    rows = _rows(site_copy)
    leaking = [{**r, "split": "train"} for r in rows]
    leaking.append({**rows[0], "split": "val"})  # the same patient in two splits
    _write(site_copy, leaking)
    bad = runner.invoke(app, ["site", "check", str(site_copy), "--run-config", "image-size=32"])
    assert bad.exit_code == 1
    assert "the same patient is in splits 'train' and 'val'" in bad.output
    assert "result: the site cannot train" in bad.output


def test_a_folder_without_manifest_cannot_train(tmp_path: Path) -> None:
    result = runner.invoke(app, ["site", "check", str(tmp_path)])
    assert result.exit_code == 1
    assert "no manifest.csv" in result.output


def test_targets_that_do_not_fit_their_images_are_reported(tmp_path: Path) -> None:
    import nibabel
    import numpy as np

    from radfed.data.synth import synth_sites

    synth_sites(
        tmp_path / "det", task="detection", sites=1, cases_per_site=8, image_size=32, seed=2
    )
    site = tmp_path / "det" / "site-a"
    rows = _rows(site)
    rows[0]["boxes"] = "[[10, 10, 40, 20]]"  # x2 beyond the 32 columns
    rows[1]["boxes"] = "[[1, 2, 3]]"  # not a box
    _write(site, rows)
    report = check_site(site, dataclasses.replace(CONFIG, task="detection"), preflight=False)
    by_line = {p["line"]: p["reason"] for p in report.problems}
    assert by_line[2] == "box 1 lies outside the image"
    assert "4 numbers" in by_line[3]

    synth_sites(
        tmp_path / "seg", task="segmentation", sites=1, cases_per_site=8, image_size=32, seed=2
    )
    site = tmp_path / "seg" / "site-a"
    rows = _rows(site)
    nibabel.save(
        nibabel.Nifti1Image(np.zeros((16, 16), dtype=np.uint8), np.eye(4)), site / rows[0]["mask"]
    )
    report = check_site(site, dataclasses.replace(CONFIG, task="segmentation"))
    assert {p["line"]: p["reason"] for p in report.problems}[2].startswith(
        "mask shape (16, 16) differs"
    )


def test_real_files_leave_no_header_value_in_logs_or_report(tmp_path: Path, caplog) -> None:  # type: ignore[no-untyped-def]
    import logging

    # Prepare: a site made of pydicom's real files, identifying headers as they come
    site = tmp_path / "site-real"
    (site / "img").mkdir(parents=True)
    names = [
        "CT_small.dcm",
        "MR_small.dcm",
        "examples_overlay.dcm",
        "MR_small_RLE.dcm",
        "rtstruct.dcm",
        "MR_truncated.dcm",
        "JPEG2000.dcm",
    ]
    lines, secrets = ["image,patient_id,label"], set()
    for index, name in enumerate(names):
        source = get_testdata_file(name, download=False)
        if source is None:
            continue
        shutil.copy(str(source), site / "img" / name)
        ds = pydicom.dcmread(str(source), stop_before_pixels=True, force=True)
        for keyword in (
            "PatientName",
            "PatientID",
            "PatientBirthDate",
            "InstitutionName",
            "ReferringPhysicianName",
            "StudyInstanceUID",
            "AccessionNumber",
        ):
            value = str(ds.get(keyword, "") or "").strip()
            if len(value) >= 4:
                secrets.add(value)
        lines.append(f"img/{name},P{index},{index % 2}")
    (site / "manifest.csv").write_text("\n".join(lines) + "\n")
    assert secrets, "the real files should carry identifying values"
    caplog.set_level(logging.DEBUG)
    caplog.set_level(logging.DEBUG, logger="radfed")
    logging.captureWarnings(True)
    # Execute
    try:
        report = check_site(
            site,
            dataclasses.replace(CONFIG, image_size=16, val_fraction=0.0, test_fraction=0.0),
            preflight=False,
        )
    finally:
        logging.captureWarnings(False)
    # Assert
    text = caplog.text + json.dumps(report.to_json())
    assert report.problems  # the non-image and truncated files were reported
    for secret in secrets:
        assert secret not in text, "a header value reached a log line or the report"


def test_check_reports_progress_per_case(site_copy: Path) -> None:
    calls: list[tuple[int, int]] = []
    check_site(site_copy, CONFIG, preflight=False, progress=lambda d, t: calls.append((d, t)))
    rows = len(_rows(site_copy))
    assert calls[-1] == (rows, rows) and len(calls) == rows


def test_the_check_reads_the_site_within_its_own_cache_cap(site_copy: Path) -> None:
    # Prepare: the site's policy caps its decoded-case cache far below its cases
    cap = 20_000
    (site_copy / "site-policy.toml").write_text(f"[policy.limits]\ncache-bytes = {cap}\n")

    # Execute
    report = check_site(site_copy, CONFIG, preflight=False)

    # Assert: every case was read, and the cache kept under the cap (the check used to
    # load the site without the policy's limits)
    files = list((site_copy / ".radfed" / "cache").glob("*.npz"))
    assert report.cases_usable > len(files) > 0
    assert sum(f.stat().st_size for f in files) <= cap
