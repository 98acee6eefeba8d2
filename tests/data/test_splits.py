"""Patient-disjoint, stratified, seeded splits that never change once stored."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from radfed.data.splits import (
    PatientInfo,
    assign_splits,
    case_keys,
    check_given_splits,
    load_or_make_splits,
)
from radfed.errors import DataError


def _patients(n: int) -> dict[str, PatientInfo]:
    return {
        f"p{i:03d}": PatientInfo(label=int(i % 3 == 0), sex="F" if i % 2 else "M") for i in range(n)
    }


def test_split_sizes_follow_the_fractions_within_every_stratum() -> None:
    # Prepare
    patients = _patients(300)
    # Execute
    split = assign_splits(patients, val_fraction=0.2, test_fraction=0.1, seed=1)
    # Assert
    counts = Counter(split.values())
    assert counts == {"train": 210, "val": 60, "test": 30}
    for stratum in {(p.label, p.sex) for p in patients.values()}:
        members = [k for k, p in patients.items() if (p.label, p.sex) == stratum]
        share = Counter(split[k] for k in members)
        assert abs(share["val"] / len(members) - 0.2) < 0.03, stratum


def test_split_is_a_function_of_the_seed() -> None:
    patients = _patients(50)
    a = assign_splits(patients, val_fraction=0.2, test_fraction=0.2, seed=3)
    assert a == assign_splits(
        dict(reversed(list(patients.items()))), val_fraction=0.2, test_fraction=0.2, seed=3
    )
    assert a != assign_splits(patients, val_fraction=0.2, test_fraction=0.2, seed=4)


def test_stored_split_survives_a_new_seed_and_new_patients(tmp_path: Path) -> None:
    # Prepare
    first = load_or_make_splits(
        tmp_path, _patients(40), val_fraction=0.2, test_fraction=0.2, seed=1
    )
    more = {**_patients(40), "new-1": PatientInfo(1, "F"), "new-2": PatientInfo(0, "M")}
    # Execute: a later round, another seed, two new patients
    second = load_or_make_splits(tmp_path, more, val_fraction=0.5, test_fraction=0.0, seed=99)
    # Assert
    assert {k: second[k] for k in first} == first
    assert {"new-1", "new-2"} <= set(second)
    stored = json.loads((tmp_path / "split.json").read_text())["assignments"]
    assert stored == second


def test_corrupt_split_file_is_reported(tmp_path: Path) -> None:
    (tmp_path / "split.json").write_text("{not json")
    with pytest.raises(DataError, match="split file"):
        load_or_make_splits(tmp_path, _patients(5), val_fraction=0.2, test_fraction=0.2, seed=1)


def test_given_splits_with_patient_leakage_are_refused() -> None:
    check_given_splits([("a", "train", 2), ("b", "val", 3), ("a", "train", 4)])
    with pytest.raises(DataError, match="lines 2 and 5"):
        check_given_splits([("a", "train", 2), ("b", "val", 3), ("a", "val", 5)])


def test_patients_enrolled_one_at_a_time_still_reach_every_split(tmp_path: Path) -> None:
    patients = _patients(60)
    keys = list(patients)
    for count in range(1, len(keys) + 1):  # the manifest grows by one patient at a time
        enrolled = {k: patients[k] for k in keys[:count]}
        load_or_make_splits(tmp_path, enrolled, val_fraction=0.2, test_fraction=0.2, seed=1)
    final = load_or_make_splits(tmp_path, patients, val_fraction=0.2, test_fraction=0.2, seed=1)
    counts = Counter(final.values())
    assert counts == {"train": 36, "val": 12, "test": 12}


def test_unwritable_state_folder_gets_a_clear_message(tmp_path: Path) -> None:
    blocked = tmp_path / "state"
    blocked.write_text("a file where the state folder should be")  # fails even for root
    with pytest.raises(DataError, match="not writable"):
        load_or_make_splits(blocked, _patients(5), val_fraction=0.2, test_fraction=0.2, seed=1)


def test_a_cases_key_follows_its_content_and_needs_the_secret() -> None:
    # Prepare: per case the digest of its image, its label, boxes (and mask digest)
    cases = ["d1\x001\x00null", "d2\x000\x00null", "d1\x001\x00null"]

    # Execute
    keys = case_keys(cases, b"secret")
    later = case_keys(["d0\x000\x00null", *cases[:2]], b"secret")
    mended = case_keys(["d1\x000\x00null"], b"secret")

    # Assert: stable under added rows, distinct for a case listed twice, another case when
    # its label is mended, keyed by the secret, and naming nothing of the case
    assert later[1:] == keys[:2]
    assert len(set(keys)) == 3
    assert mended[0] not in keys
    assert case_keys(cases, b"other") != keys
    assert all("d1" not in key for key in keys)
