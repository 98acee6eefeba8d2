"""Seeded synthetic hospital sites written as real DICOM (for the demo, tests and benchmarks).

Each site differs the way real hospitals do: scanner vendor, intensity scale and gamma,
bit depth, MONOCHROME1 versus MONOCHROME2, rescale slope/intercept, label prevalence,
number of cases and patient demographics. Cases are equally hard everywhere (the same noise
and lesion contrast at every site): a difference in difficulty between sites or groups is a
bias, and only ``--bias`` plants one, so that on data without it the bias report has nothing
true to flag. A positive case holds a small
bright lesion over a smooth anatomical background (both from MONAI's
``create_test_image_2d``); a negative case has the background only.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid

from radfed import __version__
from radfed.config import TaskName
from radfed.errors import ConfigError
from radfed.folders import SiteFolder
from radfed.log import ProgressFn

__all__ = [
    "BIAS_PRESETS",
    "DEFAULT_CASES_PER_SITE",
    "MAX_SITES",
    "SMALL_SITE_CASES",
    "SYNTH_MARKER",
    "SiteProfile",
    "SiteSummary",
    "site_name",
    "site_profiles",
    "synth_classification",
    "synth_sites",
]

#: File that marks a data root as generated (and safe for --overwrite to replace).
SYNTH_MARKER = "synth.json"
#: The marker radfed 0.1 wrote before synth.json (its folders may be replaced too).
_OLD_MARKER = ".radfed-synth"
#: Planted subgroup effects with a known answer (see ``_plant``).
BIAS_PRESETS = ("none", "contrast", "small-sites", "marker")
#: Average cases per site by default, and with ``--bias small-sites``: the size of a small
#: hospital's site (the size at which a researcher found the report falsely reassuring).
DEFAULT_CASES_PER_SITE, SMALL_SITE_CASES = 60, 240
#: The presets that make lesions fainter for women aged 60 and over at one site.
_CONTRAST_PRESETS = ("contrast", "small-sites")

_CR_IMAGE_STORAGE = UID("1.2.840.10008.5.1.4.1.1.1")
_ENHANCED_CT_STORAGE = UID("1.2.840.10008.5.1.4.1.1.2.1")
_UID_ROOT = "1.2.826.0.1.3680043.8.498."  # pydicom's root for UIDs derived from entropy sources
_VENDORS = (
    ("SIEMENS", "Fictional General Hospital"),
    ("GE MEDICAL SYSTEMS", "Fictional University Clinic"),
    ("Philips", "Fictional Community Hospital"),
    ("FUJIFILM Corporation", "Fictional Children's Centre"),
    ("Canon Medical Systems", "Fictional Regional Hospital"),
)


#: The most sites synth writes: after site-a .. site-z come site-z00027 .. site-z99999.
MAX_SITES = 99_999
_LETTERS = "abcdefghijklmnopqrstuvwxyz"


def site_name(index: int) -> str:
    """The name of the ``index``-th generated site (from 0): ``site-a`` .. ``site-z``, then
    ``site-z00027``, ``site-z00028`` .. (the site's number, from 1, in five digits).

    Names sort in creation order (``site-z`` < ``site-z00027`` < ``site-z00028``), so the
    ``partition-id``-th simulated node gets the ``partition-id``-th site, and a site's name
    does not depend on how many sites were made. They are valid site names
    (``SITE_NAME_RULE``: lower-case letters, digits and hyphens).

    Raises:
        ValueError: ``index`` is negative or not below ``MAX_SITES``.
    """
    if not 0 <= index < MAX_SITES:
        msg = f"site index must be between 0 and {MAX_SITES - 1}, got {index}"
        raise ValueError(msg)
    if index < len(_LETTERS):
        return f"site-{_LETTERS[index]}"
    return f"site-z{index + 1:05d}"


#: Image noise (std, in [0, 1] units) and lesion contrast, the same at every site.
NOISE, LESION_CONTRAST = 0.04, 0.35


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
    if not 1 <= sites <= MAX_SITES:
        msg = f"--sites must be between 1 and {MAX_SITES}, got {sites}"
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
                name=site_name(i),
                manufacturer=vendor,
                institution=institution,
                cases=max(8, round(cases_per_site * (0.8, 1.0, 1.25)[i % 3])),
                prevalence=float(rng.uniform(0.3, 0.6)),
                female_fraction=float((0.3, 0.6, 0.45, 0.75, 0.2)[i % 5]),
                age_mean=float(rng.uniform(45, 70)),
                intensity_scale=float(rng.uniform(0.7, 1.3)),
                gamma=float(rng.uniform(0.8, 1.25)),
                noise=NOISE,
                lesion_contrast=LESION_CONTRAST,
                bits_stored=(12, 16, 10)[i % 3],
                monochrome1=i % 3 == 2,
                rescale_slope=(1.0, 0.5, 1.0)[i % 3],
                rescale_intercept=(0.0, -1024.0, 0.0)[i % 3],
            )
        )
    return out


def synth_classification(out: Path, **kwargs: Any) -> list[SiteSummary]:
    """``synth_sites`` for the classification task (see there)."""
    return synth_sites(out, task="classification", **kwargs)


def synth_sites(
    out: Path,
    *,
    task: str = "classification",
    sites: int = 3,
    cases_per_site: int | None = None,
    seed: int = 0,
    image_size: int = 64,
    dims: int = 2,
    bias: str = "none",
    overwrite: bool = False,
    progress: ProgressFn | None = None,
) -> list[SiteSummary]:
    """Write ``out/<site>/manifest.csv`` and one DICOM file per case (multi-frame in 3-D).

    Targets by task: ``label`` (classification: a lesion or not), ``boxes`` (detection:
    one box per connected lesion, ``[x1, y1, x2, y2]`` with x the column and y the row,
    ends exclusive; ``[x1, y1, z1, x2, y2, z2]`` in 3-D), ``mask`` (segmentation: a NIfTI
    mask per case, plus ``label``). ``out/synth.json`` records the settings, each site's
    profile and the planted bias with its known answer. Same arguments, same bytes.

    Args:
        out: the data root to create.
        task: ``classification``, ``detection`` or ``segmentation``.
        sites: number of sites, 1 to ``MAX_SITES`` (named by ``site_name``).
        cases_per_site: average number of cases per site (sites differ around it); None:
            ``SMALL_SITE_CASES`` with the ``small-sites`` preset, else
            ``DEFAULT_CASES_PER_SITE``.
        seed: the seed of everything generated.
        image_size: size of every axis of each image (at least 32 in 2-D, 16 in 3-D).
        dims: 2 for images, 3 for volumes.
        bias: a preset of ``BIAS_PRESETS`` planted at one site, or ``none``.
        overwrite: replace an ``out`` that synth wrote before.
        progress: called with (cases written, cases in all) as generation goes.

    Raises:
        ConfigError: bad settings, or ``out`` is not empty and may not be replaced.
    """
    if task not in tuple(TaskName):
        raise ConfigError(f"--task must be one of {', '.join(TaskName)}, got {task!r}")
    if dims not in (2, 3):
        raise ConfigError(f"--dims must be 2 or 3, got {dims}")
    if image_size < (32 if dims == 2 else 16):
        raise ConfigError(
            f"--image-size must be at least {32 if dims == 2 else 16} in {dims}-D, got {image_size}"
        )
    if bias not in BIAS_PRESETS:
        raise ConfigError(f"--bias must be one of {', '.join(BIAS_PRESETS)}, got {bias!r}")
    if cases_per_site is None:
        cases_per_site = SMALL_SITE_CASES if bias == "small-sites" else DEFAULT_CASES_PER_SITE
    profiles = site_profiles(sites, cases_per_site, seed)
    planted = _plant(bias, profiles)
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            msg = f"{out} is not empty; choose another --out or pass --overwrite"
            raise ConfigError(msg)
        if not any((out / marker).is_file() for marker in (SYNTH_MARKER, _OLD_MARKER)):
            msg = (
                f"{out} was not written by 'radfed synth' (no {SYNTH_MARKER}); "
                "refusing to delete it: choose another --out"
            )
            raise ConfigError(msg)
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    description = {
        "radfed-version": __version__,
        "task": task,
        "seed": seed,
        "dims": dims,
        "image-size": image_size,
        "bias": planted,
        "sites": [dataclasses.asdict(p) for p in profiles],
    }
    (out / SYNTH_MARKER).write_text(json.dumps(description, indent=1) + "\n")
    spec = _Spec(task=task, size=image_size, dims=dims, planted=planted)
    total = sum(p.cases for p in profiles)
    summaries: list[SiteSummary] = []
    for i, p in enumerate(profiles):
        done = sum(s.cases for s in summaries)

        def report(n: int, done: int = done) -> None:
            if progress is not None:
                progress(done + n, total)

        summaries.append(
            _write_site(out / p.name, p, seed=seed, index=i, spec=spec, progress=report)
        )
    return summaries


@dataclass(frozen=True)
class _Spec:
    task: str
    size: int
    dims: int
    planted: dict[str, Any]


def _plant(bias: str, profiles: list[SiteProfile]) -> dict[str, Any]:
    """The planted effect and its known answer (which site, which group, what happens)."""
    if bias == "none":
        return {"preset": "none"}
    site = (
        profiles[min(1, len(profiles) - 1)].name if bias in _CONTRAST_PRESETS else profiles[-1].name
    )
    if bias in _CONTRAST_PRESETS:
        return {
            "preset": bias,
            "site": site,
            "group": {"sex": "F", "min_age": 60},
            "effect": "lesion contrast x0.35 for women aged 60 and over: the model misses them",
            "expected": (
                "at small sites' sizes, inconclusive (never within margin) unless the data "
                "allow a flag; at several hundred cases a site, flagged at this site"
                if bias == "small-sites"
                else "flagged at this site when the sites hold several hundred cases"
            ),
        }
    return {
        "preset": bias,
        "site": site,
        "effect": "a burned-in corner marker in 90% of positive and 10% of negative cases",
    }


def _write_site(
    folder: Path,
    profile: SiteProfile,
    *,
    seed: int,
    index: int,
    spec: _Spec,
    progress: Callable[[int], None] | None = None,
) -> SiteSummary:
    rng = np.random.default_rng([seed, index])
    (folder / "images").mkdir(parents=True)
    if spec.task == "segmentation":
        (folder / "masks").mkdir()
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
    here = spec.planted.get("site") == profile.name
    rows = []
    for case, (owner, label) in enumerate(zip(owners, labels, strict=True)):
        state = np.random.RandomState(rng.integers(2**31))
        contrast = profile.lesion_contrast
        planted = spec.planted["preset"] in _CONTRAST_PRESETS
        if here and planted and sex[owner] == "F" and age[owner] >= 60:
            contrast *= 0.35
        lesions = (
            0 if not label else (1 if spec.task == "classification" else int(state.randint(1, 4)))
        )
        pixels, mask = _image(spec, lesions, contrast, profile, state)
        if (
            here
            and spec.planted["preset"] == "marker"
            and state.random_sample() < (0.9 if label else 0.1)
        ):
            corner = (slice(1, 1 + max(2, spec.size // 12)),) * spec.dims
            pixels[corner] = 1.0
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
        row: dict[str, object] = {"image": name, "patient_id": patient_id}
        if spec.task == "detection":
            row["boxes"] = json.dumps(_boxes(mask))
        elif spec.task == "segmentation":
            row["mask"] = f"masks/case-{case + 1:04d}.nii.gz"
            _save_mask(mask, folder / str(row["mask"]))
        row["label"] = int(label)
        rows.append(row)
        if progress is not None:
            progress(case + 1)
    with SiteFolder(folder).manifest.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
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


def _image(
    spec: _Spec, lesions: int, contrast: float, p: SiteProfile, state: np.random.RandomState
) -> tuple[np.ndarray, np.ndarray]:
    """Modality values in [0, 1] and the lesion mask, both of shape ``(S,) * dims``."""
    from monai.data import create_test_image_2d, create_test_image_3d
    from scipy.ndimage import gaussian_filter

    size = spec.size
    make: Any = create_test_image_2d if spec.dims == 2 else create_test_image_3d
    shape = (size,) * spec.dims
    anatomy, _ = make(
        *shape,
        num_objs=6,
        rad_max=size // 4,
        rad_min=size // 8,
        num_seg_classes=3,
        random_state=state,
    )
    image = 0.25 + 0.35 * gaussian_filter(anatomy, sigma=size / 32)
    mask = np.zeros(shape, dtype=np.uint8)
    if lesions:
        _, seg = make(
            *shape,
            num_objs=lesions,
            rad_max=max(4, size // 10),
            rad_min=3,
            num_seg_classes=1,
            random_state=state,
        )
        mask = (seg > 0).astype(np.uint8)
        image = image + contrast * gaussian_filter(mask.astype(np.float32), sigma=0.7)
    image = image + state.normal(0.0, p.noise, image.shape)
    image = np.clip(image, 0.0, 1.0) ** p.gamma * p.intensity_scale
    out: np.ndarray = np.clip(image / 1.3, 0.0, 1.0).astype(np.float32)
    return out, mask


def _boxes(mask: np.ndarray) -> list[list[int]]:
    """One box per connected lesion: ``[x1, y1, x2, y2]`` (x column, y row, ends exclusive)."""
    from scipy.ndimage import find_objects, label

    components, _ = label(mask)
    boxes = []
    for found in find_objects(components):
        if found is None:
            continue
        starts = [s.start for s in found]  # (row, col) or (slice, row, col)
        stops = [s.stop for s in found]
        order = [1, 0] if mask.ndim == 2 else [2, 1, 0]  # -> x, y(, z)
        boxes.append([starts[i] for i in order] + [stops[i] for i in order])
    return boxes


def _save_mask(mask: np.ndarray, path: Path) -> None:
    """A NIfTI mask that radfed's reader returns in the image's ``(H, W)``/``(D, H, W)`` order."""
    import nibabel

    data = np.ascontiguousarray(np.transpose(mask, tuple(reversed(range(mask.ndim)))))
    image: Any = nibabel.Nifti1Image(data.astype(np.uint8), np.eye(4))  # type: ignore[no-untyped-call]
    nibabel.save(image, path)


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
    volume = pixels.ndim == 3
    sop_class = _ENHANCED_CT_STORAGE if volume else _CR_IMAGE_STORAGE
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    sop_uid = generate_uid(_UID_ROOT, entropy_srcs=[uid_seed, "sop"])
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationVersionName = f"RADFED_{__version__}"[:16]
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = generate_uid(_UID_ROOT, entropy_srcs=[uid_seed, "study"])
    ds.SeriesInstanceUID = generate_uid(_UID_ROOT, entropy_srcs=[uid_seed, "series"])
    ds.Modality = "CT" if volume else "CR"
    ds.StudyDate = ds.ContentDate = "20250101"
    ds.PatientName = ""  # a de-identified export: type 2, present and empty
    ds.PatientID = patient_id
    ds.PatientSex = sex
    ds.PatientAge = f"{age:03d}Y"
    ds.Manufacturer = p.manufacturer
    ds.InstitutionName = p.institution
    ds.BodyPartExamined = "CHEST"
    if volume:  # enhanced multi-frame: spacing and rescale live in the functional groups
        shared, measures, transform = Dataset(), Dataset(), Dataset()
        measures.PixelSpacing, measures.SliceThickness = [1.0, 1.0], "1"
        transform.RescaleSlope = f"{p.rescale_slope:g}"
        transform.RescaleIntercept = f"{p.rescale_intercept:g}"
        transform.RescaleType = "US"
        shared.PixelMeasuresSequence = [measures]
        shared.PixelValueTransformationSequence = [transform]
        ds.SharedFunctionalGroupsSequence = [shared]
        ds.NumberOfFrames = pixels.shape[0]
    else:
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
