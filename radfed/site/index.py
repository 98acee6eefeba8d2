"""`radfed site index`: turn a hospital DICOM export into a site folder with a manifest.

Walks the export (a DICOMDIR tree or any folder of files), groups files into cases (one
per 2-D image or multi-frame file; one per series for CT, MR, PET and NM slice stacks),
pseudonymises patient ids with a secret kept in the site's state folder, attaches labels
from a CSV keyed by DICOM UIDs, and writes ``manifest.csv``. Paths in the manifest are
relative to the site folder; the export itself is never modified or copied.
"""

from __future__ import annotations

import csv
import hashlib
import hmac
import os
import warnings
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import pydicom

from radfed.data.dicom import NON_IMAGE_MODALITIES, quiet_pydicom
from radfed.data.splits import site_secret
from radfed.errors import DataError
from radfed.folders import SiteFolder

__all__ = ["LABEL_KEYS", "IndexSummary", "index_export", "pseudonymise"]

#: Label-file columns that identify a case, most specific first.
LABEL_KEYS = ("sop_instance_uid", "series_instance_uid", "study_instance_uid", "accession_number")
_VOLUME_MODALITIES = frozenset({"CT", "MR", "PT", "NM"})


@dataclass
class IndexSummary:
    """Counts of what an index run found (no identifiers)."""

    files: int = 0
    dicom: int = 0
    skipped: Counter[str] = field(default_factory=Counter)
    cases: int = 0
    series_cases: int = 0
    patients: int = 0
    labelled: int = 0


@dataclass(frozen=True)
class _File:
    path: Path
    patient: str
    study: str
    series: str
    sop: str
    accession: str
    modality: str
    frames: int


def pseudonymise(secret: bytes, patient_id: str) -> str:
    """A stable pseudonym: the same id and secret always give the same value."""
    return "P" + hmac.new(secret, patient_id.encode("utf-8"), hashlib.sha256).hexdigest()[:16]


def index_export(export: Path, site_dir: Path, *, labels: Path | None = None) -> IndexSummary:
    """Index ``export`` into ``site_dir/manifest.csv``.

    Args:
        export: the hospital export folder (read only).
        site_dir: the site folder to write (created; an existing manifest is replaced).
        labels: optional CSV with a ``label`` column and one of ``LABEL_KEYS``; further
            columns (e.g. ``split``, ``sex``) are copied into the manifest.

    Raises:
        DataError: the export is missing or holds no image, or the label file is unusable.
    """
    if not export.is_dir():
        raise DataError(f"{export}: export folder not found")
    summary = IndexSummary()
    files = _scan(export, summary)
    if not files:
        raise DataError(f"{export}: no DICOM image found ({summary.files} files looked at)")
    site_dir.mkdir(parents=True, exist_ok=True)
    secret = site_secret(SiteFolder(site_dir).state.path)
    label_rows, extra_columns = _read_labels(labels) if labels else ({}, [])
    rows = []
    for case_files, image in _cases(files, site_dir, summary):
        first = case_files[0]
        row = {
            "image": image,
            "patient_id": pseudonymise(secret, first.patient or f"study:{first.study}"),
            "label": "",
        }
        match = _match(label_rows, case_files)
        if match is not None:
            row.update({k: match.get(k, "") for k in ("label", *extra_columns)})
            summary.labelled += 1
        rows.append(row)
    summary.cases = len(rows)
    summary.patients = len({r["patient_id"] for r in rows})
    with SiteFolder(site_dir).manifest.open("w", newline="") as handle:
        writer = csv.DictWriter(
            handle,
            fieldnames=["image", "patient_id", "label", *extra_columns],
            extrasaction="ignore",
        )
        writer.writeheader()
        writer.writerows(rows)
    return summary


def _scan(export: Path, summary: IndexSummary) -> list[_File]:
    found = []
    for path in sorted(p for p in export.rglob("*") if p.is_file()):
        summary.files += 1
        if path.name.upper() == "DICOMDIR":
            summary.skipped["DICOMDIR index file"] += 1
            continue
        try:
            with quiet_pydicom(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ds = pydicom.dcmread(path, stop_before_pixels=True)
        except Exception:
            summary.skipped["not a DICOM file"] += 1
            continue
        summary.dicom += 1
        modality = str(ds.get("Modality", "") or "").strip().upper()
        if modality in NON_IMAGE_MODALITIES or "Rows" not in ds:
            summary.skipped["non-image object"] += 1
            continue
        try:
            frames = int(ds.get("NumberOfFrames", 1) or 1)
        except (TypeError, ValueError):
            frames = 1
        found.append(
            _File(
                path=path,
                patient=str(ds.get("PatientID", "") or "").strip(),
                study=str(ds.get("StudyInstanceUID", "")),
                series=str(ds.get("SeriesInstanceUID", "")),
                sop=str(ds.get("SOPInstanceUID", "")),
                accession=str(ds.get("AccessionNumber", "") or ""),
                modality=modality,
                frames=frames,
            )
        )
    return found


def _cases(
    files: list[_File], site_dir: Path, summary: IndexSummary
) -> list[tuple[list[_File], str]]:
    """Cases as (files, manifest path); slice stacks become series folders."""
    by_series: dict[str, list[_File]] = defaultdict(list)
    for f in files:
        by_series[f.series or f"file:{f.path}"].append(f)
    by_folder: Counter[Path] = Counter(f.path.parent for f in files)
    out = []
    for series, members in sorted(by_series.items(), key=lambda item: str(item[1][0].path)):
        stack = [f for f in members if f.frames == 1]
        if (
            members[0].modality in _VOLUME_MODALITIES
            and len(stack) >= 2
            and len(stack) == len(members)
        ):
            folder = members[0].path.parent
            if all(f.path.parent == folder for f in members) and by_folder[folder] == len(members):
                out.append((members, _relative(folder, site_dir)))
            else:  # slices share folders with other series: link them into a folder of their own
                out.append((members, _link_series(members, series, site_dir)))
            summary.series_cases += 1
            continue
        out.extend(([f], _relative(f.path, site_dir)) for f in members)
    return out


def _link_series(members: list[_File], series: str, site_dir: Path) -> str:
    name = hashlib.sha256(series.encode()).hexdigest()[:16]
    folder = site_dir / "series" / name
    folder.mkdir(parents=True, exist_ok=True)
    for index, f in enumerate(members):
        link = folder / f"{index:05d}.dcm"
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(f.path.resolve())
    return _relative(folder, site_dir)


def _relative(path: Path, site_dir: Path) -> str:
    return Path(os.path.relpath(path.resolve(), site_dir.resolve())).as_posix()


def _read_labels(path: Path) -> tuple[dict[tuple[str, str], dict[str, str]], list[str]]:
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            header = [h.strip() for h in (reader.fieldnames or [])]
            keys = [k for k in LABEL_KEYS if k in header]
            if "label" not in header or not keys:
                msg = (
                    f"{path.name}: needs a 'label' column and one of {', '.join(LABEL_KEYS)}; "
                    f"found {', '.join(header) or 'no header'}"
                )
                raise DataError(msg)
            reader.fieldnames = header
            rows: dict[tuple[str, str], dict[str, str]] = {}
            for row in reader:
                clean = {k: (v or "").strip() for k, v in row.items() if k}
                for key in keys:
                    if clean.get(key):
                        rows[(key, clean[key])] = clean
    except (OSError, UnicodeDecodeError, csv.Error):
        raise DataError(f"{path.name}: unreadable label file; save it as CSV UTF-8") from None
    extra = [h for h in header if h not in (*LABEL_KEYS, "label", "image", "patient_id")]
    return rows, extra


def _match(rows: dict[tuple[str, str], dict[str, str]], case: list[_File]) -> dict[str, str] | None:
    first = case[0]
    candidates = [
        ("series_instance_uid", first.series),
        ("study_instance_uid", first.study),
        ("accession_number", first.accession),
    ]
    if len(case) == 1:
        candidates.insert(0, ("sop_instance_uid", first.sop))
    for key in candidates:
        if key[1] and key in rows:
            return rows[key]
    return None
