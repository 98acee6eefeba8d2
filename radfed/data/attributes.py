"""Subgroup attributes from DICOM headers and manifest columns, normalised to a fixed vocabulary.

Headers are messy (see DATA.md): every value maps to something sensible, unknown values
map to the explicit ``unknown`` group and never become a real group, and nothing raises.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import date

from pydicom.dataset import Dataset

__all__ = [
    "DEFAULT_AGE_BANDS",
    "STANDARD_BANDS",
    "UNKNOWN",
    "VENDORS",
    "AgeBands",
    "attributes_from_header",
    "merge_manifest_attributes",
    "normalise_manufacturer",
    "normalise_sex",
    "parse_age",
]

UNKNOWN = "unknown"
DEFAULT_AGE_BANDS = (18, 40, 60, 80)

_AGE = re.compile(r"^\s*(\d{1,3})\s*([DWMY]?)\s*$", re.IGNORECASE)
_UNIT_YEARS = {"D": 1 / 365.25, "W": 7 / 365.25, "M": 1 / 12, "Y": 1.0, "": 1.0}
_VENDORS = (
    ("siemens", "Siemens"),
    ("ge ", "GE"),
    ("ge medical", "GE"),
    ("gems", "GE"),
    ("general electric", "GE"),
    ("philips", "Philips"),
    ("toshiba", "Canon"),
    ("canon", "Canon"),
    ("fuji", "Fujifilm"),
    ("agfa", "Agfa"),
    ("kodak", "Carestream"),
    ("carestream", "Carestream"),
    ("hologic", "Hologic"),
    ("samsung", "Samsung"),
    ("konica", "Konica Minolta"),
    ("hitachi", "Hitachi"),
    ("united imaging", "United Imaging"),
)


@dataclass(frozen=True)
class AgeBands:
    """Age bands from ascending edges in years: (18, 40) gives ``<18``, ``18-39``, ``40+``."""

    edges: tuple[int, ...] = DEFAULT_AGE_BANDS

    def __post_init__(self) -> None:
        if not self.edges or list(self.edges) != sorted(set(self.edges)) or self.edges[0] <= 0:
            msg = f"age band edges must be ascending positive years, got {self.edges!r}"
            raise ValueError(msg)

    @property
    def labels(self) -> tuple[str, ...]:
        inner = [f"{a}-{b - 1}" for a, b in zip(self.edges, self.edges[1:], strict=False)]
        return (f"<{self.edges[0]}", *inner, f"{self.edges[-1]}+", UNKNOWN)

    def band(self, age: float | None) -> str:
        if age is None:
            return UNKNOWN
        for index, edge in enumerate(self.edges):
            if age < edge:
                return self.labels[index]
        return self.labels[len(self.edges)]


#: The default bands: <18, 18-39, 40-59, 60-79, 80+ (and unknown).
STANDARD_BANDS = AgeBands()


#: The canonical vendor names ``normalise_manufacturer`` gives: the values of
#: ``manufacturer`` a site names by default (others leave pooled).
VENDORS = tuple(sorted({name for _, name in _VENDORS}))


def normalise_sex(value: object) -> str:
    """Map a PatientSex value (or a manifest cell) to ``F``, ``M``, ``other`` or ``unknown``."""
    text = str(value or "").strip().upper()
    if text in {"F", "FEMALE", "W"}:
        return "F"
    if text in {"M", "MALE"}:
        return "M"
    if text in {"O", "OTHER"}:
        return "other"
    return UNKNOWN


def parse_age(value: object) -> float | None:
    """Age in years from a DICOM AS value (``045Y``, ``006M``) or a bare number.

    Lenient where the intent is clear (``22Y``, ``99`` read as years); ``000Y`` is the usual
    anonymisation placeholder (infants are coded in days, weeks or months) and gives None.
    """
    match = _AGE.match(str(value or ""))
    if not match:
        return None
    number, unit = int(match.group(1)), match.group(2).upper()
    if unit == "Y" and number == 0:
        return None
    years = number * _UNIT_YEARS[unit]
    return years if 0 <= years <= 130 else None


def _dicom_date(value: object) -> date | None:
    text = str(value or "").strip()
    if not re.fullmatch(r"\d{8}", text):
        return None
    try:
        return date(int(text[:4]), int(text[4:6]), int(text[6:]))
    except ValueError:
        return None


def _age_from_dates(ds: Dataset) -> float | None:
    born = _dicom_date(ds.get("PatientBirthDate"))
    seen = next(
        (
            d
            for d in (
                _dicom_date(ds.get(k))
                for k in ("StudyDate", "SeriesDate", "AcquisitionDate", "ContentDate")
            )
            if d
        ),
        None,
    )
    if born is None or seen is None or seen < born:
        return None
    years = (seen - born).days / 365.25
    return years if years <= 130 else None


def normalise_manufacturer(value: object) -> str:
    """A canonical vendor name (``SIEMENS`` and ``Siemens Healthineers`` are both ``Siemens``)."""
    text = " ".join(str(value or "").split())
    if not text:
        return UNKNOWN
    lowered = text.lower() + " "
    for needle, name in _VENDORS:
        if lowered.startswith(needle) or f" {needle}" in f" {lowered}":
            return name
    return text


def _text(ds: Dataset, keyword: str) -> str:
    value = " ".join(str(ds.get(keyword, "") or "").split())
    return value or UNKNOWN


def _number(ds: Dataset, keyword: str) -> float | None:
    try:
        value = float(ds.get(keyword))
    except (TypeError, ValueError):
        return None
    return value if value == value and value >= 0 else None  # NaN and negatives are unknown


def _field_strength(ds: Dataset) -> str:
    tesla = _number(ds, "MagneticFieldStrength")
    if tesla is None or tesla == 0:
        return UNKNOWN
    if tesla > 20:  # some scanners write Gauss/1000 (15000 for 1.5 T)
        tesla = tesla / 10000
    return f"{round(tesla * 2) / 2:g}T"


def attributes_from_header(ds: Dataset, bands: AgeBands = STANDARD_BANDS) -> dict[str, str]:
    """Subgroup attributes of one image from its header; every key is always present."""
    age = parse_age(ds.get("PatientAge"))
    if age is None:
        age = _age_from_dates(ds)
    modality = _text(ds, "Modality").upper()
    out = {
        "sex": normalise_sex(ds.get("PatientSex")),
        "age": UNKNOWN if age is None else str(int(age)),
        "age_band": bands.band(age),
        "manufacturer": normalise_manufacturer(ds.get("Manufacturer")),
        "model": _text(ds, "ManufacturerModelName"),
        "modality": modality if modality != "UNKNOWN" else UNKNOWN,
        "body_part": _text(ds, "BodyPartExamined").upper().replace("UNKNOWN", UNKNOWN),
        "kvp": UNKNOWN,
        "field_strength": UNKNOWN,
        "slice_thickness": UNKNOWN,
    }
    if modality == "CT":
        kvp = _number(ds, "KVP")
        out["kvp"] = UNKNOWN if kvp is None else f"{kvp:g}"
    if modality == "MR":
        out["field_strength"] = _field_strength(ds)
    if modality in {"CT", "MR"}:
        thickness = _number(ds, "SliceThickness")
        out["slice_thickness"] = UNKNOWN if thickness is None else f"{thickness:g}"
    return out


def merge_manifest_attributes(
    header: Mapping[str, str],
    manifest: Mapping[str, str],
    bands: AgeBands = STANDARD_BANDS,
    *,
    ignore: Sequence[str] = (),
) -> dict[str, str]:
    """Manifest columns override (or add to) the header attributes, normalised the same way."""
    out = dict(header)
    for key, value in manifest.items():
        if key in ignore or not value.strip():
            continue
        if key == "sex":
            out["sex"] = normalise_sex(value)
        elif key == "age":
            age = parse_age(value)
            out["age"] = UNKNOWN if age is None else str(int(age))
            out["age_band"] = bands.band(age)
        elif key == "manufacturer":
            out["manufacturer"] = normalise_manufacturer(value)
        else:
            out[key] = " ".join(value.split())
    return out
