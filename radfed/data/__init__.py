"""Site data: reading images, attributes, the manifest, splits, the cache, loading, synthesis."""

from radfed.data.attributes import AgeBands, attributes_from_header, normalise_sex, parse_age
from radfed.data.cache import CaseCache
from radfed.data.dicom import read_dicom_image
from radfed.data.image import DicomImage, ImageReadError
from radfed.data.loading import SiteData, SplitData, load_site, load_site_for
from radfed.data.manifest import Case, Manifest, RowProblem, read_manifest
from radfed.data.reader import read_image

__all__ = [
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
    "load_site",
    "load_site_for",
    "normalise_sex",
    "parse_age",
    "read_dicom_image",
    "read_image",
    "read_manifest",
]
