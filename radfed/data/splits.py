"""Patient-disjoint train/val/test splits, stratified by label and sex, stored once and kept."""

from __future__ import annotations

import hashlib
import json
import time
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from radfed.errors import DataError

__all__ = [
    "SPLIT_FILE",
    "TEST_USE_FILE",
    "PatientInfo",
    "assign_splits",
    "check_given_splits",
    "load_or_make_splits",
    "patient_key",
    "record_test_use",
]

SPLIT_FILE = "split.json"
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
) -> dict[str, str]:
    """Assign each patient to ``train``, ``val`` or ``test``.

    Patients are grouped into strata by (label, sex); within each stratum, shuffled with
    ``seed``, the split sizes follow the fractions by largest remainder, so every stratum
    is represented in proportion. The result depends only on the inputs and the seed.

    Args:
        patients: patient key -> stratification info.
        val_fraction: share of patients for validation.
        test_fraction: share of patients for the sealed test split.
        seed: random seed.

    Returns:
        patient key -> split name.
    """
    strata: dict[tuple[int, str], list[str]] = defaultdict(list)
    for key in sorted(patients):
        info = patients[key]
        strata[(info.label, info.sex)].append(key)
    rng = np.random.default_rng(seed)
    fractions = {
        "train": 1.0 - val_fraction - test_fraction,
        "val": val_fraction,
        "test": test_fraction,
    }
    # Carry the rounding remainders across strata so small strata add up to the target.
    carry = dict.fromkeys(fractions, 0.0)
    out: dict[str, str] = {}
    for stratum in sorted(strata):
        members = strata[stratum]
        order = rng.permutation(len(members))
        wanted = {s: len(members) * f + carry[s] for s, f in fractions.items()}
        counts = {s: int(np.floor(w)) for s, w in wanted.items()}
        left = len(members) - sum(counts.values())
        for s in sorted(wanted, key=lambda s: wanted[s] - counts[s], reverse=True)[:left]:
            counts[s] += 1
        carry = {s: wanted[s] - counts[s] for s in fractions}
        position = 0
        for split in ("val", "test", "train"):
            for index in order[position : position + counts[split]]:
                out[members[index]] = split
            position += counts[split]
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
                f"manifest.csv lines {seen[1]} and {line}: the same patient is in splits "
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
    fractions are now; new patients are split among themselves and added.

    Args:
        state_dir: the site's state folder.
        patients: patient key (see ``patient_key``) -> stratification info.
    """
    path = state_dir / SPLIT_FILE
    stored: dict[str, str] = {}
    if path.is_file():
        try:
            document = json.loads(path.read_text())
            stored = {str(k): str(v) for k, v in document["assignments"].items()}
        except (ValueError, KeyError, TypeError, AttributeError):
            msg = (
                f"{path}: unreadable split file; restore it from backup (or delete it to re-split)"
            )
            raise DataError(msg) from None
    new = {k: v for k, v in patients.items() if k not in stored}
    if new or not path.is_file():
        stored.update(
            assign_splits(new, val_fraction=val_fraction, test_fraction=test_fraction, seed=seed)
        )
        state_dir.mkdir(parents=True, exist_ok=True)
        document = {
            "version": _SPLIT_VERSION,
            "seed": seed,
            "fractions": {"val": val_fraction, "test": test_fraction},
            "assignments": dict(sorted(stored.items())),
        }
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(document, indent=1))
        tmp.replace(path)
    return {k: stored[k] for k in patients}


TEST_USE_FILE = "test_uses.json"


def record_test_use(state_dir: Path, *, run_id: int, server_round: int) -> int:
    """Count one evaluation of the sealed test split in the site's state; returns the total.

    Every look at the test split is a chance to overfit to it: the count tells the site
    (and the study report) how often it has been used.
    """
    path = state_dir / TEST_USE_FILE
    uses: list[dict[str, int]] = []
    if path.is_file():
        try:
            uses = list(json.loads(path.read_text())["uses"])
        except (ValueError, KeyError, TypeError):
            msg = f"{path.name}: unreadable test-use log in the site state folder; restore it"
            raise DataError(msg) from None
    uses.append({"run": run_id, "round": server_round, "time": int(time.time())})
    state_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"version": 1, "uses": uses}, indent=1))
    tmp.replace(path)
    return len(uses)
