"""Patient-disjoint train/val/test splits, stratified by label and sex, stored once and kept."""

from __future__ import annotations

import hashlib
import json
import time
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from radfed.errors import DataError
from radfed.folders import MANIFEST_NAME, SiteState

__all__ = [
    "PatientInfo",
    "assign_splits",
    "check_given_splits",
    "load_or_make_splits",
    "patient_key",
    "record_test_use",
]

_SPLIT_VERSION = 1


@dataclass(frozen=True)
class PatientInfo:
    """What stratification needs of one patient: any positive case, and sex."""

    label: int
    sex: str


def assign_splits(
    patients: Mapping[str, PatientInfo],
    *,
    val_fraction: float,
    test_fraction: float,
    seed: int,
    fixed: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """Assign each patient to ``train``, ``val`` or ``test``, stratified by (label, sex).

    Patients in ``fixed`` keep their split and count towards the targets; every other
    patient, in a seeded random order within its stratum, joins the split furthest below
    its target share, both within the stratum and overall. Proportions therefore hold per
    stratum and overall, also when patients arrive a few at a time.

    Args:
        patients: patient key -> stratification info (fixed ones included).
        val_fraction: share of patients for validation.
        test_fraction: share of patients for the sealed test split.
        seed: random seed.
        fixed: patient key -> split already assigned.

    Returns:
        patient key -> split name, for every patient.
    """
    fixed = dict(fixed or {})
    fractions = {
        "train": 1.0 - val_fraction - test_fraction,
        "val": val_fraction,
        "test": test_fraction,
    }
    strata: dict[tuple[int, str], list[str]] = defaultdict(list)
    in_stratum: dict[tuple[int, str], Counter[str]] = defaultdict(Counter)
    overall: Counter[str] = Counter()
    for key in sorted(patients):
        stratum = (patients[key].label, patients[key].sex)
        if key in fixed:
            in_stratum[stratum][fixed[key]] += 1
            overall[fixed[key]] += 1
        else:
            strata[stratum].append(key)
    rng = np.random.default_rng(seed)
    out = {k: v for k, v in fixed.items() if k in patients}
    for stratum in sorted(strata):
        members = strata[stratum]
        counts = in_stratum[stratum]
        for index in rng.permutation(len(members)):
            n_stratum, n_overall = sum(counts.values()) + 1, sum(overall.values()) + 1
            split = max(
                fractions,
                key=lambda s: (
                    (fractions[s] * n_stratum - counts[s]) + (fractions[s] * n_overall - overall[s])
                ),
            )
            out[members[index]] = split
            counts[split] += 1
            overall[split] += 1
    return out


def check_given_splits(patient_splits: Sequence[tuple[str, str, int]]) -> None:
    """Check manifest-given splits for patient leakage.

    Args:
        patient_splits: (patient key, split, manifest line) for each case.

    Raises:
        DataError: a patient appears in two splits; the message names both lines.
    """
    first: dict[str, tuple[str, int]] = {}
    for patient, split, line in patient_splits:
        seen = first.setdefault(patient, (split, line))
        if seen[0] != split:
            msg = (
                f"{MANIFEST_NAME} lines {seen[1]} and {line}: the same patient is in splits "
                f"{seen[0]!r} and {split!r}; keep each patient in one split"
            )
            raise DataError(msg)


def patient_key(patient_id: str) -> str:
    """A stable, non-reversible key for a patient id (state files never hold the id)."""
    return hashlib.sha256(patient_id.encode("utf-8")).hexdigest()[:24]


def load_or_make_splits(
    state_dir: Path,
    patients: Mapping[str, PatientInfo],
    *,
    val_fraction: float,
    test_fraction: float,
    seed: int,
) -> dict[str, str]:
    """Return the stored split of every patient, assigning and storing new patients.

    Patients already in ``state_dir/split.json`` keep their split whatever the seed or
    fractions are now; new patients are assigned so that the proportions, counted over
    all patients, move towards the targets.

    Raises:
        DataError: the split file is unreadable, or the state folder is not writable.

    Args:
        state_dir: the site's state folder.
        patients: patient key (see ``patient_key``) -> stratification info.
    """
    path = SiteState(state_dir).split
    stored: dict[str, str] = {}
    if path.is_file():
        try:
            document = json.loads(path.read_text())
            stored = {str(k): str(v) for k, v in document["assignments"].items()}
        except (ValueError, KeyError, TypeError, AttributeError):
            msg = (
                f"{state_dir.name}/{path.name}: unreadable split file in the site state folder; "
                "restore it from backup (or delete it to re-split)"
            )
            raise DataError(msg) from None
    if any(k not in stored for k in patients) or not path.is_file():
        stored.update(
            assign_splits(
                patients,
                val_fraction=val_fraction,
                test_fraction=test_fraction,
                seed=seed,
                fixed={k: v for k, v in stored.items() if k in patients},
            )
        )
        _write_state(
            state_dir,
            path,
            {
                "version": _SPLIT_VERSION,
                "seed": seed,
                "fractions": {"val": val_fraction, "test": test_fraction},
                "assignments": dict(sorted(stored.items())),
            },
        )
    return {k: stored[k] for k in patients}


def _write_state(state_dir: Path, path: Path, document: object) -> None:
    """Write a state file atomically; a read-only site folder gets a message with the fix."""
    try:
        state_dir.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(document, indent=1))
        tmp.replace(path)
    except OSError:
        msg = (
            f"cannot write {state_dir.name}/{path.name}: the site state folder is not writable; "
            "make it writable or point the site at a writable state folder"
        )
        raise DataError(msg) from None


def record_test_use(state_dir: Path, *, run_id: int, server_round: int) -> int:
    """Count one evaluation of the sealed test split in the site's state; returns the total.

    Every look at the test split is a chance to overfit to it: the count tells the site
    (and the study report) how often it has been used.
    """
    path = SiteState(state_dir).test_uses
    uses: list[dict[str, int]] = []
    if path.is_file():
        try:
            uses = list(json.loads(path.read_text())["uses"])
        except (ValueError, KeyError, TypeError):
            msg = f"{path.name}: unreadable test-use log in the site state folder; restore it"
            raise DataError(msg) from None
    uses.append({"run": run_id, "round": server_round, "time": int(time.time())})
    _write_state(state_dir, path, {"version": 1, "uses": uses})
    return len(uses)
