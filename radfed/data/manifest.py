"""Reading and validating a site's ``manifest.csv`` (the site-folder contract)."""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from radfed.config import SPLITS, TaskName
from radfed.errors import DataError
from radfed.folders import MANIFEST_NAME, SiteFolder

__all__ = ["TARGET_COLUMN", "Case", "Manifest", "RowProblem", "read_manifest"]

#: The target column of each task.
TARGET_COLUMN = {
    TaskName.CLASSIFICATION: "label",
    TaskName.DETECTION: "boxes",
    TaskName.SEGMENTATION: "mask",
}


@dataclass(frozen=True)
class Case:
    """One manifest row that passed validation.

    Attributes:
        line: line number in manifest.csv (the header is line 1).
        image: absolute path of the image (never leaves the site, never logged).
        patient_id: pseudonymous patient id (never leaves the site, never logged).
        label: the class label (classification); for detection 1 when the case has a box,
            for segmentation the ``label`` column when present, else 0 (used to stratify).
        split: the split given in the manifest, or None.
        attributes: other columns (subgroup attributes such as sex or age).
        boxes: detection boxes ``[x1, y1, x2, y2]`` (or ``[x1, y1, z1, x2, y2, z2]``) in
            pixel coordinates; None for other tasks.
        mask: absolute path of the segmentation mask; None for other tasks.
    """

    line: int
    image: Path
    patient_id: str
    label: int
    split: str | None
    attributes: dict[str, str] = field(default_factory=dict)
    boxes: tuple[tuple[float, ...], ...] | None = None
    mask: Path | None = None


@dataclass(frozen=True)
class RowProblem:
    """A manifest row that was skipped, and why (no values from the row itself)."""

    line: int
    reason: str

    def __str__(self) -> str:
        return f"{MANIFEST_NAME} line {self.line}: {self.reason}"


@dataclass(frozen=True)
class Manifest:
    """The valid cases of a site and the rows that were skipped."""

    site_dir: Path
    cases: tuple[Case, ...]
    problems: tuple[RowProblem, ...]


def read_manifest(site_dir: Path, task: str = "classification") -> Manifest:
    """Read ``site_dir/manifest.csv`` for a task.

    A missing manifest, or one without a required column, is an error for the whole
    site; a bad row is skipped and reported (a manifest may end up with no valid case:
    the caller decides what that means).

    Raises:
        DataError: no manifest, not UTF-8, malformed CSV, or a missing or doubled column.
    """
    path = SiteFolder(site_dir).manifest
    where = f"{site_dir.name}/{MANIFEST_NAME}"  # named by site, never by full path
    target = next((column for name, column in TARGET_COLUMN.items() if name == task), None)
    if target is None:
        msg = f"task {task!r} is not supported; choose one of {', '.join(TaskName)}"
        raise DataError(msg)
    if not path.is_file():
        msg = (
            f"{where}: no {MANIFEST_NAME} in the site folder; write one with the columns "
            f"image, patient_id, {target} (see README: site folder)"
        )
        raise DataError(msg)
    required = ("image", "patient_id", target)
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError:
        msg = f"{where}: not UTF-8 text; save the manifest as CSV UTF-8 (e.g. 'CSV UTF-8' in Excel)"
        raise DataError(msg) from None
    try:
        return _parse(site_dir, text, where, required, target)
    except csv.Error:
        msg = f"{where}: malformed CSV (an unclosed quote or an oversized field); fix the file"
        raise DataError(msg) from None


def _parse(
    site_dir: Path, text: str, where: str, required: tuple[str, ...], target: str
) -> Manifest:
    reader = csv.DictReader(io.StringIO(text, newline=""))
    header = [h.strip() for h in (reader.fieldnames or [])]
    doubled = sorted({h for h in header if header.count(h) > 1 and h})
    if doubled:
        msg = f"{where}: column(s) {', '.join(doubled)} appear more than once; keep one of each"
        raise DataError(msg)
    missing = [c for c in required if c not in header]
    if missing:
        msg = (
            f"{where}: missing required column(s) {', '.join(missing)}; "
            f"the header must name {', '.join(required)} (found: {', '.join(header) or 'none'})"
        )
        raise DataError(msg)
    reader.fieldnames = header
    cases: list[Case] = []
    problems: list[RowProblem] = []
    line = 1
    for row in reader:
        line += 1  # first line of the record; a quoted field may span lines
        result = _parse_row(site_dir, row, target, line)
        if isinstance(result, RowProblem):
            problems.append(result)
        else:
            cases.append(result)
        line = reader.line_num
    return Manifest(site_dir=site_dir, cases=tuple(cases), problems=tuple(problems))


def _parse_row(
    site_dir: Path, row: dict[str, str | None], target: str, line: int
) -> Case | RowProblem:
    values = {k: (v or "").strip() for k, v in row.items() if k is not None}
    image, patient_id = values["image"], values["patient_id"]
    if not image:
        return RowProblem(line, "empty 'image'; give a path relative to the site folder")
    if not patient_id:
        return RowProblem(line, "empty 'patient_id'; every case needs a pseudonymous patient id")
    boxes: tuple[tuple[float, ...], ...] | None = None
    mask: Path | None = None
    label_text = values.get("label", "")
    if target == "boxes":
        parsed = _parse_boxes(values["boxes"])
        if isinstance(parsed, str):
            return RowProblem(line, parsed)
        boxes, label_text = parsed, "1" if parsed else "0"
    elif target == "mask":
        if not values["mask"] or Path(values["mask"]).is_absolute():
            return RowProblem(line, "'mask' must be a path relative to the site folder")
        mask = (site_dir / values["mask"]).resolve()
        label_text = label_text or "0"
    if not (label_text.isascii() and label_text.isdigit()) or len(label_text) > 4:
        return RowProblem(line, "'label' must be a class number (0 or 1; 0..C-1 for C classes)")
    split = values.get("split") or None
    if split is not None and split not in SPLITS:
        return RowProblem(line, f"'split' must be one of {', '.join(SPLITS)} or empty")
    if Path(image).is_absolute():
        return RowProblem(line, "'image' is an absolute path; give it relative to the site folder")
    image_path = (site_dir / image).resolve()
    reserved = {"image", "patient_id", "label", "split", target}
    attributes = {k: v for k, v in values.items() if k not in reserved and v}
    return Case(
        line=line,
        image=image_path,
        patient_id=patient_id,
        label=int(label_text),
        split=split,
        attributes=attributes,
        boxes=boxes,
        mask=mask,
    )


def _parse_boxes(text: str) -> tuple[tuple[float, ...], ...] | str:
    """Boxes from a JSON list of ``[x1, y1, x2, y2]`` (or 6 numbers in 3-D); a reason if bad."""
    try:
        value = json.loads(text or "[]")
    except ValueError:
        return "'boxes' must be a JSON list of [x1, y1, x2, y2] boxes (use [] for none)"
    if not isinstance(value, list) or not all(isinstance(b, list) for b in value):
        return "'boxes' must be a JSON list of [x1, y1, x2, y2] boxes (use [] for none)"
    boxes = []
    for box in value:
        if len(box) not in (4, 6) or not all(
            isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in box
        ):
            return "each box needs 4 numbers (2-D) or 6 (3-D)"
        half = len(box) // 2
        if any(box[i] >= box[i + half] for i in range(half)):
            return "each box must have x1 < x2 and y1 < y2 (and z1 < z2)"
        boxes.append(tuple(float(v) for v in box))
    if len({len(b) for b in boxes}) > 1:
        return "'boxes' mixes 2-D and 3-D boxes"
    return tuple(boxes)
