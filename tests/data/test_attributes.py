"""Subgroup attributes: every messy header value seen in real files maps to something sensible."""

from __future__ import annotations

import warnings
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.tag import Tag

from radfed.data.attributes import (
    UNKNOWN,
    AgeBands,
    attributes_from_header,
    merge_manifest_attributes,
    normalise_manufacturer,
    parse_age,
)


def _header(**values: object) -> Dataset:
    """A dataset holding the given values as they would come off disk, valid or not."""
    before = pydicom.config.settings.writing_validation_mode
    pydicom.config.settings.writing_validation_mode = pydicom.config.IGNORE
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = Dataset()
            for keyword, value in values.items():
                setattr(ds, keyword, value)
    finally:
        pydicom.config.settings.writing_validation_mode = before
    return ds


@pytest.mark.parametrize(
    ("value", "years"),
    [
        ("045Y", 45.0),
        ("22Y", 22.0),
        ("99", 99.0),
        ("006M", 0.5),
        ("000Y", None),
        ("", None),
        (None, None),
        ("N/A", None),
        ("150Y", None),
        ("012W", 12 * 7 / 365.25),
    ],
)
def test_age_values_seen_in_real_headers(value: object, years: float | None) -> None:
    assert parse_age(value) == (None if years is None else pytest.approx(years))


def test_age_falls_back_to_birth_and_study_dates() -> None:
    ds = _header(PatientAge="", PatientBirthDate="19700615", StudyDate="20200614", Modality="CR")
    assert attributes_from_header(ds)["age"] == "49"
    assert (
        attributes_from_header(_header(PatientBirthDate="1970", StudyDate="2020"))["age"] == UNKNOWN
    )


def test_age_bands_are_configurable_and_unknown_is_explicit() -> None:
    bands = AgeBands((50,))
    assert bands.labels == ("<50", "50+", "unknown")
    assert [bands.band(a) for a in (10, 50, None)] == ["<50", "50+", "unknown"]
    assert AgeBands().band(39.9) == "18-39"
    with pytest.raises(ValueError, match="ascending"):
        AgeBands((60, 40))


@pytest.mark.parametrize(
    ("value", "name"),
    [
        ("SIEMENS", "Siemens"),
        ("Siemens Healthineers", "Siemens"),
        ("GE MEDICAL SYSTEMS", "GE"),
        ("GE Healthcare", "GE"),
        ("Philips Medical Systems", "Philips"),
        ("TOSHIBA", "Canon"),
        ("  Acme  Imaging ", "Acme Imaging"),
        ("", UNKNOWN),
        (None, UNKNOWN),
    ],
)
def test_manufacturers_are_canonical(value: object, name: str) -> None:
    assert normalise_manufacturer(value) == name


def test_real_files_from_pydicom() -> None:
    def read(name: str) -> dict[str, str]:
        path = get_testdata_file(name, download=False)
        if path is None:
            pytest.skip(f"{name} is not in this pydicom wheel")
        return attributes_from_header(pydicom.dcmread(str(path), stop_before_pixels=True))

    ct = read("CT_small.dcm")
    assert (ct["sex"], ct["age"], ct["modality"]) == ("other", UNKNOWN, "CT")
    assert ct["kvp"] != UNKNOWN and ct["slice_thickness"] != UNKNOWN
    overlay = read("examples_overlay.dcm")
    assert (overlay["sex"], overlay["age"], overlay["age_band"]) == ("M", "58", "40-59")
    assert overlay["manufacturer"] == "Siemens" and overlay["modality"] == "MR"
    assert read("MR_small.dcm")["sex"] == "F"


def test_mr_field_strength_bands_and_gauss_values() -> None:
    assert (
        attributes_from_header(_header(Modality="MR", MagneticFieldStrength=1.5))["field_strength"]
        == "1.5T"
    )
    assert (
        attributes_from_header(_header(Modality="MR", MagneticFieldStrength=30000))[
            "field_strength"
        ]
        == "3T"
    )
    assert (
        attributes_from_header(_header(Modality="CR", MagneticFieldStrength=3))["field_strength"]
        == UNKNOWN
    )


def test_garbage_values_never_raise() -> None:
    ds = _header(PatientSex="N/A", PatientAge="abc", Manufacturer="", Modality="CT")
    kvp = Tag("KVP")
    ds[kvp] = RawDataElement(kvp, "DS", 2, b"x ", 0, True, True)  # converted lazily, on access
    attributes = attributes_from_header(ds)
    assert attributes["sex"] == UNKNOWN and attributes["age_band"] == UNKNOWN
    assert attributes.pop("modality") == "CT"
    assert set(attributes.values()) == {UNKNOWN}


def test_manifest_columns_override_and_add(tmp_path: Path) -> None:
    header = attributes_from_header(_header(PatientSex="M", PatientAge="030Y", Modality="CR"))
    merged = merge_manifest_attributes(
        header, {"sex": "female", "age": "72", "scanner_room": " B 2 "}
    )
    assert (merged["sex"], merged["age"], merged["age_band"]) == ("F", "72", "60-79")
    assert merged["scanner_room"] == "B 2"
    assert merged["modality"] == "CR"
