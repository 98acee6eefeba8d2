"""Site data: DICOM reading, manifest, splits, whole-site loading, synthetic sites."""

from radfed.data.dicom import DicomImage, ImageReadError, normalise_sex, read_dicom_image
from radfed.data.manifest import MANIFEST_NAME, Case, Manifest, RowProblem, read_manifest
from radfed.data.site import STATE_DIR_NAME, SiteData, SplitData, list_sites, load_site

__all__ = [
    "MANIFEST_NAME",
    "STATE_DIR_NAME",
    "Case",
    "DicomImage",
    "ImageReadError",
    "Manifest",
    "RowProblem",
    "SiteData",
    "SplitData",
    "list_sites",
    "load_site",
    "normalise_sex",
    "read_dicom_image",
    "read_manifest",
]
