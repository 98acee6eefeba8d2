"""Site data: DICOM reading, manifest, splits, whole-site loading, synthetic sites."""

from radfed.data.attributes import AgeBands, attributes_from_header, normalise_sex, parse_age
from radfed.data.cache import CaseCache
from radfed.data.dicom import DicomImage, ImageReadError, read_dicom_image, read_image
from radfed.data.manifest import MANIFEST_NAME, Case, Manifest, RowProblem, read_manifest
from radfed.data.site import (
    STATE_DIR_NAME,
    SiteData,
    SplitData,
    list_sites,
    load_site,
    load_site_for,
)

__all__ = [
    "MANIFEST_NAME",
    "STATE_DIR_NAME",
    "AgeBands",
    "Case",
    "CaseCache",
    "DicomImage",
    "ImageReadError",
    "Manifest",
    "RowProblem",
    "SiteData",
    "SplitData",
    "attributes_from_header",
    "list_sites",
    "load_site",
    "load_site_for",
    "normalise_sex",
    "parse_age",
    "read_dicom_image",
    "read_image",
    "read_manifest",
]
