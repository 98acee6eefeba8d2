"""Seeded synthetic hospital sites written as real DICOM (for the demo, tests and benchmarks).

Each site differs the way real hospitals do: scanner vendor, intensity scale and gamma,
noise, bit depth, MONOCHROME1 versus MONOCHROME2, rescale slope/intercept, label
prevalence, number of cases and patient demographics. A positive case holds a small
bright lesion over a smooth anatomical background (both from MONAI's
``create_test_image_2d``); a negative case has the background only.
"""

from __future__ import annotations

import csv
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid

from radfed import __version__
from radfed.errors import ConfigError

__all__ = ["SYNTH_MARKER", "SiteProfile", "SiteSummary", "site_profiles", "synth_classification"]

#: File that marks a data root as generated (and safe for --overwrite to replace).
SYNTH_MARKER = ".radfed-synth"

_CR_IMAGE_STORAGE = UID("1.2.840.10008.5.1.4.1.1.1")
_UID_ROOT = "1.2.826.0.1.3680043.8.498."  # pydicom's root for UIDs derived from entropy sources
_VENDORS = (
    ("SIEMENS", "Fictional General Hospital"),
    ("GE MEDICAL SYSTEMS", "Fictional University Clinic"),
    ("Philips", "Fictional Community Hospital"),
    ("FUJIFILM Corporation", "Fictional Children's Centre"),
    ("Canon Medical Systems", "Fictional Regional Hospital"),
)


@dataclass(frozen=True)
class SiteProfile:
    """How one synthetic site acquires its images and whom it serves."""

    name: str
    manufacturer: str
    institution: str
    cases: int
    prevalence: float
    female_fraction: float
    age_mean: float
    intensity_scale: float
    gamma: float
    noise: float
    lesion_contrast: float
    bits_stored: int
    monochrome1: bool
    rescale_slope: float
    rescale_intercept: float


@dataclass(frozen=True)
class SiteSummary:
    """What was written for one site (counts only)."""

    name: str
    cases: int
    positives: int
    patients: int
    female: int
    manufacturer: str


def site_profiles(sites: int, cases_per_site: int, seed: int) -> list[SiteProfile]:
    """Deterministic, distinct profiles for ``sites`` sites."""
    if not 1 <= sites <= 26:
        msg = f"--sites must be between 1 and 26, got {sites}"
        raise ConfigError(msg)
    if cases_per_site < 8:
        msg = (
            f"--cases-per-site must be at least 8 (both labels in each split), got {cases_per_site}"
        )
        raise ConfigError(msg)
    rng = np.random.default_rng(seed)
    out = []
    for i in range(sites):
        vendor, institution = _VENDORS[i % len(_VENDORS)]
        out.append(
            SiteProfile(
                name=f"site-{chr(ord('a') + i)}",
                manufacturer=vendor,
                institution=institution,
                cases=max(8, round(cases_per_site * (0.8, 1.0, 1.25)[i % 3])),
                prevalence=float(rng.uniform(0.3, 0.6)),
                female_fraction=float((0.3, 0.6, 0.45, 0.75, 0.2)[i % 5]),
                age_mean=float(rng.uniform(45, 70)),
                intensity_scale=float(rng.uniform(0.7, 1.3)),
                gamma=float(rng.uniform(0.8, 1.25)),
                noise=float(rng.uniform(0.02, 0.06)),
                lesion_contrast=float(rng.uniform(0.3, 0.4)),
                bits_stored=(12, 16, 10)[i % 3],
                monochrome1=i % 3 == 2,
                rescale_slope=(1.0, 0.5, 1.0)[i % 3],
                rescale_intercept=(0.0, -1024.0, 0.0)[i % 3],
            )
        )
    return out


def synth_classification(
    out: Path,
    *,
    sites: int = 3,
    cases_per_site: int = 60,
    seed: int = 0,
    image_size: int = 64,
    overwrite: bool = False,
) -> list[SiteSummary]:
    """Write ``out/<site>/manifest.csv`` and one DICOM file per case.

    Same arguments, same bytes: UIDs, dates and pixels all derive from the seed.

    Args:
        out: the data root to create.
        sites: number of sites.
        cases_per_site: average number of cases per site (sites differ around it).
        seed: the seed of everything generated.
        image_size: rows and columns of each image (at least 32).
        overwrite: replace an existing, non-empty ``out``.

    Raises:
        ConfigError: bad counts, or ``out`` is not empty and ``overwrite`` is False.
    """
    if image_size < 32:
        msg = f"--image-size must be at least 32, got {image_size}"
        raise ConfigError(msg)
    profiles = site_profiles(sites, cases_per_site, seed)
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            msg = f"{out} is not empty; choose another --out or pass --overwrite"
            raise ConfigError(msg)
        if not (out / SYNTH_MARKER).is_file():
            msg = (
                f"{out} was not written by 'radfed synth' (no {SYNTH_MARKER}); "
                "refusing to delete it: choose another --out"
            )
            raise ConfigError(msg)
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / SYNTH_MARKER).write_text(f"written by radfed {__version__} synth, seed {seed}\n")
    return [
        _write_site(out / p.name, p, seed=seed, index=i, size=image_size)
        for i, p in enumerate(profiles)
    ]


def _write_site(
    folder: Path, profile: SiteProfile, *, seed: int, index: int, size: int
) -> SiteSummary:
    rng = np.random.default_rng([seed, index])
    (folder / "images").mkdir(parents=True)
    n_patients = max(4, int(np.ceil(profile.cases * 0.8)))
    # Every patient has one case; the remaining cases are follow-ups of random patients.
    owners = np.concatenate(
        [np.arange(n_patients), rng.integers(0, n_patients, profile.cases - n_patients)]
    )
    sex = np.where(rng.random(n_patients) < profile.female_fraction, "F", "M")
    age = np.clip(rng.normal(profile.age_mean, 12, n_patients), 18, 95).astype(int)
    labels = (rng.random(profile.cases) < profile.prevalence).astype(int)
    labels[:2], labels[2:4] = 1, 0  # both classes present at every site
    prefix = profile.name.split("-")[-1].upper()
    rows = []
    for case, (owner, label) in enumerate(zip(owners, labels, strict=True)):
        pixels = _image(size, bool(label), profile, np.random.RandomState(rng.integers(2**31)))
        name = f"images/case-{case + 1:04d}.dcm"
        patient_id = f"{prefix}{owner + 1:05d}"
        ds = _dataset(
            pixels,
            profile,
            patient_id=patient_id,
            sex=str(sex[owner]),
            age=int(age[owner]),
            uid_seed=f"{seed}/{profile.name}/{case}",
        )
        ds.save_as(folder / name, enforce_file_format=True)
        rows.append({"image": name, "patient_id": patient_id, "label": int(label)})
    with (folder / "manifest.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["image", "patient_id", "label"])
        writer.writeheader()
        writer.writerows(rows)
    return SiteSummary(
        name=profile.name,
        cases=profile.cases,
        positives=int(labels.sum()),
        patients=n_patients,
        female=int((sex == "F").sum()),
        manufacturer=profile.manufacturer,
    )


def _image(size: int, lesion: bool, p: SiteProfile, state: np.random.RandomState) -> np.ndarray:
    """Modality values in [0, 1] of shape ``(size, size)``."""
    from monai.data import create_test_image_2d
    from scipy.ndimage import gaussian_filter

    anatomy, _ = create_test_image_2d(
        size,
        size,
        num_objs=6,
        rad_max=size // 4,
        rad_min=size // 8,
        num_seg_classes=3,
        random_state=state,
    )
    image = 0.25 + 0.35 * gaussian_filter(anatomy, sigma=size / 32)
    if lesion:
        _, mask = create_test_image_2d(
            size,
            size,
            num_objs=1,
            rad_max=max(4, size // 10),
            rad_min=3,
            num_seg_classes=1,
            random_state=state,
        )
        image = image + p.lesion_contrast * gaussian_filter(mask.astype(np.float32), sigma=0.7)
    image = image + state.normal(0.0, p.noise, image.shape)
    image = np.clip(image, 0.0, 1.0) ** p.gamma * p.intensity_scale
    out: np.ndarray = np.clip(image / 1.3, 0.0, 1.0).astype(np.float32)
    return out


def _dataset(
    pixels: np.ndarray, p: SiteProfile, *, patient_id: str, sex: str, age: int, uid_seed: str
) -> Dataset:
    top = 2**p.bits_stored - 1
    modality = (
        pixels * top * p.rescale_slope + p.rescale_intercept
    )  # the values a reader should get
    stored = (
        np.rint((modality - p.rescale_intercept) / p.rescale_slope).clip(0, top).astype(np.uint16)
    )
    if p.monochrome1:
        stored = (top - stored).astype(np.uint16)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = _CR_IMAGE_STORAGE
    sop_uid = generate_uid(_UID_ROOT, entropy_srcs=[uid_seed, "sop"])
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationVersionName = f"RADFED_{__version__}"[:16]
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = _CR_IMAGE_STORAGE
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = generate_uid(_UID_ROOT, entropy_srcs=[uid_seed, "study"])
    ds.SeriesInstanceUID = generate_uid(_UID_ROOT, entropy_srcs=[uid_seed, "series"])
    ds.Modality = "CR"
    ds.StudyDate = ds.ContentDate = "20250101"
    ds.PatientName = ""  # a de-identified export: type 2, present and empty
    ds.PatientID = patient_id
    ds.PatientSex = sex
    ds.PatientAge = f"{age:03d}Y"
    ds.Manufacturer = p.manufacturer
    ds.InstitutionName = p.institution
    ds.BodyPartExamined = "CHEST"
    ds.PixelSpacing = [0.5, 0.5]
    ds.RescaleSlope = f"{p.rescale_slope:g}"
    ds.RescaleIntercept = f"{p.rescale_intercept:g}"
    ds.set_pixel_data(
        stored,
        "MONOCHROME1" if p.monochrome1 else "MONOCHROME2",
        p.bits_stored,
        generate_instance_uid=False,
    )
    return ds
