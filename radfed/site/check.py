"""Site check: everything wrong with a site folder, by manifest line, before a federation starts.

The report names manifest lines, reasons, counts and normalised subgroup labels; it never
holds a patient id, a path or a raw header value, so it can be shown or shared as is.
"""

from __future__ import annotations

import dataclasses
import hashlib
import warnings
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import torch

from radfed.config import RunConfig
from radfed.data.image import ImageReadError
from radfed.data.loading import SiteData
from radfed.data.manifest import Case, RowProblem, read_manifest
from radfed.data.reader import read_image
from radfed.errors import RadfedError
from radfed.folders import MANIFEST_NAME
from radfed.log import ProgressFn
from radfed.site.node import load_site_within, own_policy
from radfed.tasks import get_task

__all__ = ["IDENTIFYING_KEYWORDS", "SiteReport", "check_site"]

#: Header elements that identify a person and should be blank in a de-identified export
#: (a subset of DICOM PS3.15 Annex E, Basic Application Level Confidentiality Profile).
IDENTIFYING_KEYWORDS = (
    "PatientName",
    "PatientBirthDate",
    "PatientAddress",
    "PatientTelephoneNumbers",
    "OtherPatientIDs",
    "OtherPatientNames",
    "PatientMotherBirthName",
    "MilitaryRank",
    "EthnicGroup",
    "ReferringPhysicianName",
    "PerformingPhysicianName",
    "OperatorsName",
    "InstitutionAddress",
    "AccessionNumber",
    "MedicalRecordLocator",
)


@dataclass
class SiteReport:
    """The result of checking one site; ``can_train`` decides the exit code."""

    site: str
    task: str
    cases_listed: int = 0
    cases_usable: int = 0
    problems: list[dict[str, Any]] = field(default_factory=list)
    duplicates: list[list[int]] = field(default_factory=list)
    identifying_tags: dict[str, int] = field(default_factory=dict)
    burned_in_annotation: int = 0
    composition: dict[str, Any] = field(default_factory=dict)
    preflight: str = "not run"
    blockers: list[str] = field(default_factory=list)

    @property
    def can_train(self) -> bool:
        return not self.blockers

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "can_train": self.can_train}


def check_site(
    site_dir: Path, config: RunConfig, *, preflight: bool = True, progress: ProgressFn | None = None
) -> SiteReport:
    """Read every case of a site and report what would stop or distort training.

    Args:
        site_dir: the site folder.
        config: run settings (task, image size, split fractions and seed, age bands).
        preflight: run one training step on a few cases at the end.
        progress: called with (cases read, cases listed) as the check goes.
    """
    report = SiteReport(site=site_dir.name, task=config.task)
    try:
        manifest = read_manifest(site_dir, config.task)
    except RadfedError as err:
        report.blockers.append(str(err))
        return report
    report.cases_listed = len(manifest.cases) + len(manifest.problems)
    _add_problems(report, manifest.problems, "manifest")
    by_pixels: dict[str, list[int]] = defaultdict(list)
    for number, case in enumerate(manifest.cases, start=1):
        if progress is not None:
            progress(number, len(manifest.cases))
        try:
            image = read_image(case.image, voi=config.voi_lut)
        except ImageReadError as err:
            _add_problems(report, [RowProblem(case.line, err.reason)], "image")
            continue
        by_pixels[hashlib.sha256(image.pixels.tobytes()).hexdigest()].append(case.line)
        _scan_header(report, case.image)
        target_problem = _check_target(case, image.pixels.shape, config)
        if target_problem:
            _add_problems(report, [RowProblem(case.line, target_problem)], "target")
    report.duplicates = sorted(lines for lines in by_pixels.values() if len(lines) > 1)
    if report.duplicates:
        report.blockers.append(
            f"{len(report.duplicates)} image(s) appear more than once; keep one row per image "
            "(duplicates inflate metrics and may cross splits)"
        )
    try:
        site = load_site_within(site_dir, config, own_policy(site_dir).limits)
    except RadfedError as err:
        report.blockers.append(str(err))
        return report
    report.cases_usable = site.num_cases
    report.composition = _composition(site)
    train = site.splits["train"]
    if len(train) < 2 or len(set(train.labels.tolist())) < 2:
        report.blockers.append("the train split needs at least two cases of each label")
    if preflight and len(train) >= 2:
        report.preflight = _preflight(site, config)
        if report.preflight != "ok":
            report.blockers.append(f"pre-flight training step failed: {report.preflight}")
    return report


def _check_target(case: Case, shape: tuple[int, ...], config: RunConfig) -> str | None:
    """Why a case's boxes or mask do not fit its image, or None."""
    if case.boxes:
        sizes = (shape[-1], shape[-2]) if len(shape) == 2 else (shape[-1], shape[-2], shape[0])
        for number, box in enumerate(case.boxes, start=1):
            half = len(box) // 2
            if half != len(shape):
                return f"box {number} has {half}-D coordinates for a {len(shape)}-D image"
            if any(box[i] < 0 or box[i + half] > sizes[i] for i in range(half)):
                return f"box {number} lies outside the image"
    if case.mask is not None:
        try:
            mask = read_image(case.mask).pixels
        except ImageReadError as err:
            return f"mask unreadable: {err.reason}"
        if mask.shape != shape:
            return f"mask shape {mask.shape} differs from the image shape {shape}"
        if not np.array_equal(mask, np.round(mask)) or mask.min() < 0:
            return "mask values must be non-negative integer labels"
    return None


def _add_problems(
    report: SiteReport, problems: list[RowProblem] | tuple[RowProblem, ...], kind: str
) -> None:
    for problem in problems:
        report.problems.append({"line": problem.line, "kind": kind, "reason": problem.reason})


def _scan_header(report: SiteReport, path: Path) -> None:
    """Count identifying elements that are still filled (counts only, never values)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
        for keyword in IDENTIFYING_KEYWORDS:
            if str(ds.get(keyword, "") or "").strip():
                report.identifying_tags[keyword] = report.identifying_tags.get(keyword, 0) + 1
        if str(ds.get("BurnedInAnnotation", "")).strip().upper() == "YES":
            report.burned_in_annotation += 1
    except Exception:
        return


def _composition(site: SiteData) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, split in site.splits.items():
        labels = split.labels.tolist()
        entry: dict[str, Any] = {
            "cases": len(labels),
            "positives": int(sum(labels)),
            "prevalence": round(sum(labels) / len(labels), 4) if labels else None,
        }
        for attribute in ("sex", "age_band", "manufacturer"):
            entry[attribute] = dict(
                sorted(Counter(a.get(attribute, "unknown") for a in split.attributes).items())
            )
        out[name] = entry
    return out


def _preflight(site: SiteData, config: RunConfig) -> str:
    """One training step on up to eight training cases; "ok" or the failure's type."""
    data = site.splits["train"]
    few = data.subset(range(min(8, len(data))))
    step_config = dataclasses.replace(config, local_epochs=1, batch_size=len(few))
    try:
        task = get_task(config.task)
        task.check(step_config)
        model = task.build_model(step_config)
        result = task.train(model, few, step_config, seed=config.seed)
        if not torch.isfinite(torch.tensor(result.loss)):
            return "the loss is not finite"
    except Exception as err:
        return f"{type(err).__name__}"
    return "ok"


def render_text(report: SiteReport) -> str:
    """A plain-text rendering for the terminal."""
    lines = [
        f"site {report.site}: {report.cases_usable} of {report.cases_listed} cases usable "
        f"for {report.task}"
    ]
    for problem in report.problems:
        lines.append(f"  {MANIFEST_NAME} line {problem['line']}: {problem['reason']}")
    for group in report.duplicates:
        lines.append(f"  duplicate image on lines {', '.join(map(str, group))}")
    if report.identifying_tags:
        tags = ", ".join(f"{k} ({v})" for k, v in sorted(report.identifying_tags.items()))
        lines.append(
            f"  warning: identifying header elements still filled: {tags}; de-identify the export"
        )
    if report.burned_in_annotation:
        lines.append(
            f"  warning: {report.burned_in_annotation} image(s) declare burned-in annotation"
        )
    for name, entry in report.composition.items():
        prevalence = "n/a" if entry["prevalence"] is None else f"{entry['prevalence']:.2f}"
        groups = "; ".join(
            f"{attribute} " + ", ".join(f"{k} {v}" for k, v in entry[attribute].items())
            for attribute in ("sex", "age_band", "manufacturer")
        )
        lines.append(f"  {name}: {entry['cases']} cases, prevalence {prevalence}; {groups}")
    lines.append(f"  pre-flight: {report.preflight}")
    if report.can_train:
        lines.append("result: the site can train")
    else:
        lines += ["result: the site cannot train:", *(f"  - {b}" for b in report.blockers)]
    return "\n".join(lines)
