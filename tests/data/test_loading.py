"""Loading a whole site: bad images skipped and counted, splits patient-disjoint and fixed."""

from __future__ import annotations

import csv
import json
import logging
import shutil
import warnings
from pathlib import Path

import pydicom
import pytest

from radfed.data.loading import load_site
from radfed.data.splits import legacy_patient_key, patient_key, site_secret
from radfed.errors import DataError
from radfed.folders import list_sites

SETTINGS = {"image_size": 32, "val_fraction": 0.25, "test_fraction": 0.25, "seed": 5}


def _rows(site: Path) -> list[dict[str, str]]:
    with (site / "manifest.csv").open() as handle:
        return list(csv.DictReader(handle))


def test_site_loads_every_case_into_patient_disjoint_splits(site_copy: Path) -> None:
    # Execute
    site = load_site(site_copy, **SETTINGS)
    # Assert
    rows = _rows(site_copy)
    assert site.num_cases == len(rows) and not site.skipped
    assert site.splits["train"].images.shape[1:] == (1, 32, 32)
    assert float(site.splits["train"].images.min()) >= 0.0
    assert float(site.splits["train"].images.max()) <= 1.0
    stored = (site_copy / ".radfed" / "split.json").read_text()
    by_patient: dict[str, set[str]] = {}
    import json

    assignments = json.loads(stored)["assignments"]
    for row in rows:
        by_patient.setdefault(row["patient_id"], set()).add(
            assignments[patient_key(row["patient_id"], site_secret(site_copy / ".radfed"))]
        )
    assert all(len(s) == 1 for s in by_patient.values())
    assert not any(row["patient_id"] in stored for row in rows)  # ids are hashed in the state file


def test_split_stays_fixed_across_loads_with_another_seed(site_copy: Path) -> None:
    first = load_site(site_copy, **SETTINGS)
    again = load_site(site_copy, **{**SETTINGS, "seed": 123})
    for name in ("train", "val", "test"):
        assert first.splits[name].labels.tolist() == again.splits[name].labels.tolist()
        assert (first.splits[name].images == again.splits[name].images).all()


def test_one_corrupt_image_is_skipped_counted_and_reported(
    site_copy: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Prepare: truncate the image of the third row (manifest line 4)
    rows = _rows(site_copy)
    victim = site_copy / rows[2]["image"]
    victim.write_bytes(victim.read_bytes()[:400])
    caplog.set_level(logging.INFO, logger="radfed")
    # Execute
    site = load_site(site_copy, **SETTINGS)
    # Assert
    assert site.num_cases == len(rows) - 1
    assert [p.line for p in site.skipped] == [4]
    assert "manifest.csv line 4: image skipped" in caplog.text
    assert "skipped 1 of" in caplog.text


def test_logs_hold_no_patient_id_path_or_header_value(
    site_copy: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Prepare: one unreadable file, and collect every identifying value of the site
    rows = _rows(site_copy)
    (site_copy / rows[0]["image"]).write_bytes(b"garbage")
    secrets = {str(site_copy), site_copy.parent.name}
    for row in rows[1:]:
        ds = pydicom.dcmread(site_copy / row["image"])
        ds.PatientName, ds.PatientBirthDate = "Doe^Jane", "19610304"  # as a careless export has
        with warnings.catch_warnings():  # writing the invalid value warns here, in Prepare
            warnings.simplefilter("ignore")
            ds.PatientAge = "N/A"  # invalid values make pydicom warn, quoting them
        ds.save_as(site_copy / row["image"])
        secrets |= {
            ds.PatientBirthDate,
            row["patient_id"],
            row["image"],
            str(ds.PatientName),
            ds.PatientAge,
            ds.Manufacturer,
            ds.InstitutionName,
            ds.StudyInstanceUID,
        }
    caplog.set_level(logging.DEBUG)
    caplog.set_level(logging.DEBUG, logger="radfed")
    caplog.clear()  # preparing the files made pydicom warn; only the loading counts
    logging.captureWarnings(True)  # Python warnings (pydicom's included) become log records
    # Execute
    try:
        load_site(site_copy, **SETTINGS)
    finally:
        logging.captureWarnings(False)
    # Assert
    assert caplog.records, "expected the site to log its summary"
    for secret in filter(None, secrets):
        assert secret not in caplog.text, "a log line quotes an identifying value"


def test_given_split_column_is_respected(site_copy: Path) -> None:
    rows = _rows(site_copy)
    patients = sorted({r["patient_id"] for r in rows})
    chosen = {p: ("val" if i % 4 == 0 else "train") for i, p in enumerate(patients)}
    with (site_copy / "manifest.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=[*rows[0].keys(), "split"])
        writer.writeheader()
        writer.writerows({**r, "split": chosen[r["patient_id"]]} for r in rows)
    site = load_site(site_copy, **SETTINGS)
    assert len(site.splits["val"]) == sum(chosen[r["patient_id"]] == "val" for r in rows)
    assert len(site.splits["test"]) == 0


def test_list_sites_errors_before_anything_starts(tmp_path: Path, synth_root: Path) -> None:
    with pytest.raises(DataError, match="no site folders"):
        list_sites(tmp_path)
    with pytest.raises(DataError, match="not found"):
        list_sites(tmp_path / "absent")
    assert [p.name for p in list_sites(synth_root)] == ["site-a", "site-b", "site-c"]


def test_a_site_without_readable_images_is_an_error(site_copy: Path) -> None:
    shutil.rmtree(site_copy / "images")
    with pytest.raises(DataError, match="no readable image"):
        load_site(site_copy, **SETTINGS)


def test_patient_keys_need_the_site_secret_and_old_split_files_keep_their_splits(
    site_copy: Path,
) -> None:
    # Prepare: a split file of version 1 (plain SHA-256 keys), as radfed 0.1 wrote it
    first = load_site(site_copy, **SETTINGS)
    state = site_copy / ".radfed"
    secret = site_secret(state)
    rows = _rows(site_copy)
    document = json.loads((state / "split.json").read_text())
    by_key = document["assignments"]
    old = {
        legacy_patient_key(r["patient_id"]): by_key[patient_key(r["patient_id"], secret)]
        for r in rows
    }
    (state / "split.json").write_text(json.dumps({**document, "version": 1, "assignments": old}))

    # Execute
    again = load_site(site_copy, **SETTINGS)

    # Assert: every case keeps its split; the file now holds keyed values only, which a
    # plain hash of a guessed id does not find
    for name in ("train", "val", "test"):
        assert again.splits[name].lines == first.splits[name].lines
    stored = json.loads((state / "split.json").read_text())
    assert stored["version"] == 2
    assert not set(stored["assignments"]) & set(old)
