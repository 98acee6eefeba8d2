"""Patient-disjoint train/val/test splits, stratified by label and sex, stored once and kept."""

from __future__ import annotations

import fcntl
import hashlib
import hmac
import json
import os
import secrets
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
    "case_keys",
    "check_given_splits",
    "load_or_make_splits",
    "patient_key",
    "record_test_use",
    "site_secret",
]

#: 2: patient keys are an HMAC with the site's secret (1: a plain SHA-256 of the id).
_SPLIT_VERSION = 2


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
    order: Mapping[str, str] | None = None,
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
        order: patient key -> what patients are sorted by before the seeded shuffle
            (default: the key). Keys made with a site's random secret would otherwise
            make the same data and seed split differently at every new site folder.

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
    for key in sorted(patients, key=lambda k: (order or {}).get(k, k)):
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


def site_secret(state_dir: Path) -> bytes:
    """The site's secret key, created on first use (0600, never leaves the site): it keys
    the patient keys of the state files and the pseudonyms of ``radfed site index``."""
    path = SiteState(state_dir).pseudonym_key
    if not path.exists():
        state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        try:
            descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:  # another process made it first
            pass
        except OSError as err:
            msg = (
                f"{state_dir.name}: the site's secret key cannot be created "
                f"({err.strerror}); make the site's state folder writable"
            )
            raise DataError(msg) from None
        else:
            with os.fdopen(descriptor, "w") as handle:
                handle.write(secrets.token_hex(32))
    try:
        return bytes.fromhex(path.read_text().strip())
    except (OSError, ValueError):
        msg = (
            f"{state_dir.name}/{path.name}: the site's secret key cannot be read; restore it "
            "from backup (a new one changes every patient key and so the splits)"
        )
        raise DataError(msg) from None


def patient_key(patient_id: str, secret: bytes) -> str:
    """A stable key for a patient id, keyed with the site's secret: without the secret it
    cannot be recomputed from a guessed id (a plain hash of a medical record number can)."""
    return hmac.new(secret, patient_id.encode("utf-8"), hashlib.sha256).hexdigest()[:24]


def case_keys(contents: Sequence[str], secret: bytes) -> list[str]:
    """A key for each case from what decides its outputs (``contents``: the digest of its
    image's bytes, its label, boxes and mask), keyed with the site's secret like
    ``patient_key``. A case keeps its key when other rows change, when its file moves or is
    renamed, and under any run setting; a mended label or a replaced image makes it another
    case. Identical cases get one key each (a second one ``#2``)."""
    seen: Counter[str] = Counter()
    keys = []
    for content in contents:
        seen[content] += 1
        text = f"case\0{content}\0{seen[content]}".encode()
        keys.append(hmac.new(secret, text, hashlib.sha256).hexdigest()[:16])
    return keys


def legacy_patient_key(patient_id: str) -> str:
    """The key of split files of version 1 (a plain SHA-256), to re-key them."""
    return hashlib.sha256(patient_id.encode("utf-8")).hexdigest()[:24]


def load_or_make_splits(
    state_dir: Path,
    patients: Mapping[str, PatientInfo],
    *,
    val_fraction: float,
    test_fraction: float,
    seed: int,
    legacy: Mapping[str, str] | None = None,
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
        legacy: version-1 key -> key of each patient, to re-key a version-1 file, and to
            order new patients (a plain hash, kept in memory only: the same data and seed
            give the same split at every site folder).
    """
    path = SiteState(state_dir).split
    try:
        state_dir.mkdir(parents=True, exist_ok=True)
        lock = os.open(path.with_suffix(".lock"), os.O_RDWR | os.O_CREAT, 0o600)
    except OSError:
        msg = (
            f"cannot write {state_dir.name}/{path.name}: the site state folder is not writable; "
            "make it writable or point the site at a writable state folder"
        )
        raise DataError(msg) from None
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one process assigns at a time
        return _load_or_make(
            path, state_dir, patients, val_fraction, test_fraction, seed, legacy or {}
        )
    finally:
        os.close(lock)


def _load_or_make(
    path: Path,
    state_dir: Path,
    patients: Mapping[str, PatientInfo],
    val_fraction: float,
    test_fraction: float,
    seed: int,
    legacy: Mapping[str, str],
) -> dict[str, str]:
    stored: dict[str, str] = {}
    unmapped: dict[str, str] = {}
    changed = not path.is_file()
    if path.is_file():
        try:
            document = json.loads(path.read_text())
            stored = {str(k): str(v) for k, v in document["assignments"].items()}
            unmapped = {str(k): str(v) for k, v in document.get("legacy", {}).items()}
            version = document.get("version", 1)
        except (ValueError, KeyError, TypeError, AttributeError):
            msg = (
                f"{state_dir.name}/{path.name}: unreadable split file in the site state folder; "
                "restore it from backup (or delete it to re-split)"
            )
            raise DataError(msg) from None
        if version == 1:  # re-key with the site's secret; the splits stay as they were
            unmapped, stored = stored, {}
            changed = True
    # a patient of a version-1 file not seen since (an unreadable image that day) keeps
    # its split when it comes back: the old keys wait in "legacy" until then
    for old, key in legacy.items():
        if old in unmapped and key not in stored:
            stored[key] = unmapped.pop(old)
            changed = True
    if changed or any(k not in stored for k in patients):
        stored.update(
            assign_splits(
                patients,
                val_fraction=val_fraction,
                test_fraction=test_fraction,
                seed=seed,
                fixed={k: v for k, v in stored.items() if k in patients},
                order={key: old for old, key in legacy.items()},
            )
        )
        document = {
            "version": _SPLIT_VERSION,
            "seed": seed,
            "fractions": {"val": val_fraction, "test": test_fraction},
            "assignments": dict(sorted(stored.items())),
        }
        if unmapped:
            document["legacy"] = dict(sorted(unmapped.items()))
        _write_state(state_dir, path, document)
    return {k: stored[k] for k in patients}


def _write_state(state_dir: Path, path: Path, document: object) -> None:
    """Write a state file atomically; a read-only site folder gets a message with the fix."""
    try:
        state_dir.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # no two writers share it
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
