"""Loading a whole site: manifest, images, fixed patient-disjoint splits, model-ready tensors."""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from radfed.config import RunConfig
from radfed.data.attributes import STANDARD_BANDS, AgeBands, merge_manifest_attributes
from radfed.data.cache import CaseCache, content_digest
from radfed.data.image import MAX_VOXELS, ImageReadError, check_voxels
from radfed.data.manifest import Case, RowProblem, read_manifest
from radfed.data.reader import read_image
from radfed.data.splits import (
    PatientInfo,
    case_keys,
    check_given_splits,
    legacy_patient_key,
    load_or_make_splits,
    patient_key,
    site_secret,
)
from radfed.errors import DataError
from radfed.folders import MANIFEST_NAME, SiteFolder
from radfed.log import logger

__all__ = ["SiteData", "SplitData", "load_site", "load_site_for"]


@dataclass(frozen=True)
class SplitData:
    """Model-ready cases of one split.

    Attributes:
        images: float32 tensor of shape ``(N, 1, S, S[, S])`` scaled to [0, 1].
        labels: int64 tensor of shape ``(N,)`` (segmentation: 1 when the mask is not empty).
        attributes: subgroup attributes of each case (header, overridden by the manifest).
        boxes: detection only: per case a float32 array of shape ``(M, 4)`` (``x1, y1, x2,
            y2``) or ``(M, 6)`` (``x1, y1, z1, x2, y2, z2``), ends exclusive, in the pixel
            coordinates of ``images`` (x along the last axis); empty for other tasks.
        masks: segmentation only: uint8 tensor of shape ``(N, 1, S, S[, S])``, 1 inside the
            structure, aligned with ``images``; None for other tasks.
        lines: the manifest line of each case (for the site's own audit tables).
        patients: the patient key of each case (an HMAC with the site's secret; it never
            leaves the site): DP statistics bound the cases one patient adds.
        cases: the key of each case (``radfed.data.splits.case_keys``; it never leaves the
            site): the record of what the site released names cases by it.
    """

    images: torch.Tensor
    labels: torch.Tensor
    attributes: tuple[dict[str, str], ...] = ()
    boxes: tuple[np.ndarray, ...] = ()
    masks: torch.Tensor | None = None
    lines: tuple[int, ...] = ()
    patients: tuple[str, ...] = ()
    cases: tuple[str, ...] = ()

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def subset(self, index: Sequence[int] | torch.Tensor) -> SplitData:
        """The cases at positions ``index``, every field sliced alike."""
        chosen = torch.as_tensor(index, dtype=torch.int64)
        positions = chosen.tolist()
        return SplitData(
            images=self.images[chosen],
            labels=self.labels[chosen],
            attributes=tuple(self.attributes[i] for i in positions) if self.attributes else (),
            boxes=tuple(self.boxes[i] for i in positions) if self.boxes else (),
            masks=self.masks[chosen] if self.masks is not None else None,
            lines=tuple(self.lines[i] for i in positions) if self.lines else (),
            patients=tuple(self.patients[i] for i in positions) if self.patients else (),
            cases=tuple(self.cases[i] for i in positions) if self.cases else (),
        )


@dataclass(frozen=True)
class SiteData:
    """A site's cases by split, plus the manifest rows that were skipped."""

    splits: dict[str, SplitData]
    skipped: tuple[RowProblem, ...]

    @property
    def num_cases(self) -> int:
        return sum(len(s) for s in self.splits.values())


def load_site(
    site_dir: Path,
    *,
    image_size: int,
    val_fraction: float,
    test_fraction: float,
    seed: int,
    task: str = "classification",
    state_dir: Path | None = None,
    age_bands: AgeBands = STANDARD_BANDS,
    use_cache: bool = True,
    spatial_dims: int = 2,
    voi: bool = False,
    target_spacing: tuple[float, ...] = (),
    max_voxels: int = MAX_VOXELS,
    cache_bytes: int | None = None,
) -> SiteData:
    """Read every case of a site and split it.

    Unreadable images are skipped and reported by manifest line; the split of each patient
    is stored in the state folder and never changes afterwards.

    Args:
        site_dir: the site folder.
        image_size: images are resized to ``(image_size, image_size)``.
        val_fraction: validation share, when the manifest gives no split.
        test_fraction: test share, when the manifest gives no split.
        seed: split seed (used only for patients not split before).
        task: the task whose target column is read.
        state_dir: the site's state folder; default ``site_dir/.radfed``.
        age_bands: the age bands of the ``age_band`` attribute.
        use_cache: read and fill the preprocessed cache in the state folder.
        spatial_dims: 2 for images, 3 for volumes; cases of the other kind are skipped.
        voi: apply the header's VOI LUT or window after the modality LUT.
        target_spacing: resample to this spacing in mm per axis before resizing (empty: off).
        max_voxels: a case image larger than this (as declared, or once resampled) is
            skipped without being decoded.
        cache_bytes: the cache's size on disk (least recently used entries evicted beyond
            it); None for no cap.

    Raises:
        DataError: no manifest, no usable case, or patient leakage in a given split.
    """
    state = state_dir or SiteFolder(site_dir).state.path
    manifest = read_manifest(site_dir, task)
    problems = list(manifest.problems)
    if not manifest.cases:
        for problem in problems:
            logger.warning("%s", problem)
        msg = (
            f"{site_dir.name}/{MANIFEST_NAME}: no usable row ({len(problems)} skipped); "
            "fix the rows reported above"
        )
        raise DataError(msg)
    settings = {
        "image_size": image_size,
        "age_bands": list(age_bands.edges),
        "spatial_dims": spatial_dims,
        "voi": voi,
        "target_spacing": list(target_spacing),
    }
    cache = CaseCache(state, settings, max_bytes=cache_bytes)
    mask_cache = CaseCache(state, {**settings, "target": "mask"}, max_bytes=cache_bytes)

    def decode(path: Path) -> tuple[np.ndarray, dict[str, str]]:
        image = read_image(path, age_bands, voi=voi, max_voxels=max_voxels)
        if image.pixels.ndim != spatial_dims:
            kind = "3-D volume" if image.pixels.ndim == 3 else "2-D image"
            raise ImageReadError(f"{kind} in a {spatial_dims}-D run (set spatial-dims)")
        pixels = _resample(image.pixels, image.spacing, target_spacing, max_voxels=max_voxels)
        shape = {_SHAPE_KEY: ",".join(map(str, image.pixels.shape))}
        return _preprocess(pixels, image_size), {**image.attributes, **shape}

    def decode_mask(path: Path) -> tuple[np.ndarray, dict[str, str]]:
        image = read_image(path, age_bands, max_voxels=max_voxels)
        if image.pixels.ndim != spatial_dims:
            raise ImageReadError(f"mask is not {spatial_dims}-D")
        pixels = _resample(
            image.pixels, image.spacing, target_spacing, mode="nearest", max_voxels=max_voxels
        )
        return _resize_mask(pixels, image_size), {
            _SHAPE_KEY: ",".join(map(str, image.pixels.shape))
        }

    def fetch(
        store: CaseCache, path: Path, compute: Callable[[Path], tuple[np.ndarray, dict[str, str]]]
    ) -> tuple[np.ndarray, dict[str, str], str]:
        """The decoded file, its header, and the digest of its bytes."""
        if not path.exists():
            raise ImageReadError("file not found")
        digest = content_digest(path)
        if use_cache:
            return (*store.get_or_compute(path, compute, digest=digest), digest)
        return (*compute(path), digest)

    pixels: list[np.ndarray] = []
    masks: list[np.ndarray] = []
    boxes: list[np.ndarray] = []
    kept: list[Case] = []
    attributes: list[dict[str, str]] = []
    contents: list[str] = []  # what decides a case's outputs: image, mask, label, boxes
    for case in manifest.cases:
        try:
            array, header, digest = fetch(cache, case.image, decode)
            header = dict(header)
            shape = tuple(int(v) for v in header.pop(_SHAPE_KEY).split(","))
            content = [digest, str(case.label), json.dumps(case.boxes)]
            if case.mask is not None:
                mask, mask_header, mask_digest = fetch(mask_cache, case.mask, decode_mask)
                content.append(mask_digest)
                if mask_header[_SHAPE_KEY] != ",".join(map(str, shape)):
                    raise ImageReadError("mask shape differs from the image shape")
                masks.append(mask)
            if case.boxes is not None:
                boxes.append(_scale_boxes(case.boxes, shape, image_size))
        except ImageReadError as err:
            problems.append(RowProblem(case.line, f"image skipped: {err.reason}"))
            continue
        except OSError:
            problems.append(RowProblem(case.line, "image skipped: file cannot be read"))
            continue
        pixels.append(array)
        contents.append("\0".join(content))
        kept.append(case)
        attributes.append(merge_manifest_attributes(header, case.attributes, age_bands))
    for problem in problems:
        logger.warning("%s", problem)
    if problems:
        logger.warning("skipped %d of %d manifest rows", len(problems), len(kept) + len(problems))
    if not kept:
        msg = f"{site_dir.name}/{MANIFEST_NAME}: no readable image; fix the rows reported above"
        raise DataError(msg)

    secret = site_secret(state)
    keys = [patient_key(c.patient_id, secret) for c in kept]
    identities = case_keys(contents, secret)
    legacy = {legacy_patient_key(c.patient_id): k for c, k in zip(kept, keys, strict=True)}
    splits = _split_cases(
        kept,
        keys,
        [a["sex"] for a in attributes],
        state,
        val_fraction=val_fraction,
        test_fraction=test_fraction,
        seed=seed,
        legacy=legacy,
    )
    stacked = torch.from_numpy(np.stack(pixels))[:, None]
    stacked_masks = torch.from_numpy(np.stack(masks))[:, None] if masks else None
    labels = torch.tensor([c.label for c in kept], dtype=torch.int64)
    if stacked_masks is not None:  # segmentation: a case is positive when it has a structure
        labels = (stacked_masks.flatten(1).amax(dim=1) > 0).to(torch.int64)
    out: dict[str, SplitData] = {}
    for name in ("train", "val", "test"):
        index = torch.tensor([i for i, s in enumerate(splits) if s == name], dtype=torch.int64)
        out[name] = SplitData(
            images=stacked[index].contiguous(),
            labels=labels[index].contiguous(),
            attributes=tuple(attributes[i] for i in index.tolist()),
            boxes=tuple(boxes[i] for i in index.tolist()) if boxes else (),
            masks=stacked_masks[index].contiguous() if stacked_masks is not None else None,
            lines=tuple(kept[i].line for i in index.tolist()),
            patients=tuple(keys[i] for i in index.tolist()),
            cases=tuple(identities[i] for i in index.tolist()),
        )
    counts = Counter(splits)
    logger.info(
        "site ready: %d cases (train %d, val %d, test %d), %d skipped, %d from cache",
        len(kept),
        counts["train"],
        counts["val"],
        counts["test"],
        len(problems),
        cache.hits,
    )
    return SiteData(splits=out, skipped=tuple(problems))


def _split_cases(
    cases: list[Case],
    keys: list[str],
    sexes: list[str],
    state_dir: Path,
    *,
    val_fraction: float,
    test_fraction: float,
    seed: int,
    legacy: Mapping[str, str],
) -> list[str]:
    given = [c.split for c in cases]
    if all(s is not None for s in given):
        check_given_splits(
            [(k, str(s), c.line) for k, s, c in zip(keys, given, cases, strict=True)]
        )
        return [str(s) for s in given]
    if any(s is not None for s in given):
        msg = (
            f"{MANIFEST_NAME}: 'split' is filled for some rows only; fill it for every row or none"
        )
        raise DataError(msg)
    patients: dict[str, PatientInfo] = {}
    for key, case, sex in zip(keys, cases, sexes, strict=True):
        before = patients.get(key)
        label = max(case.label, before.label) if before else case.label
        patients[key] = PatientInfo(label=label, sex=before.sex if before else sex)
    assignment = load_or_make_splits(
        state_dir,
        patients,
        val_fraction=val_fraction,
        test_fraction=test_fraction,
        seed=seed,
        legacy=legacy,
    )
    return [assignment[k] for k in keys]


#: Attribute key under which a cache entry records the image's shape before preprocessing.
_SHAPE_KEY = "__shape__"


def _scale_boxes(
    boxes: tuple[tuple[float, ...], ...], shape: tuple[int, ...], size: int
) -> np.ndarray:
    """Boxes in the original pixel grid -> the resized ``(size,) * dims`` grid, ``(M, 2*dims)``.

    Box coordinates run x, y(, z) while the pixel axes run (z,) y, x.
    """
    dims = len(shape)
    out = np.zeros((len(boxes), 2 * dims), dtype=np.float32)
    if not boxes:
        return out
    if len(boxes[0]) != 2 * dims:
        raise ImageReadError(f"boxes have {len(boxes[0])} values for a {dims}-D image")
    scale = np.array([size / n for n in reversed(shape)] * 2, dtype=np.float64)
    out[:] = np.asarray(boxes, dtype=np.float64) * scale
    return out


def _resize_mask(mask: np.ndarray, size: int) -> np.ndarray:
    """A label mask resized to ``(size,) * dims`` by nearest neighbour; uint8, 1 = inside."""
    tensor = torch.from_numpy(np.ascontiguousarray(mask > 0.5).astype(np.float32))[None, None]
    resized = torch.nn.functional.interpolate(
        tensor, size=(size,) * mask.ndim, mode="nearest-exact"
    )
    out: np.ndarray = resized[0, 0].numpy().astype(np.uint8)
    return out


def _resample(
    pixels: np.ndarray,
    spacing: tuple[float, ...] | None,
    target: tuple[float, ...],
    *,
    mode: str = "linear",
    max_voxels: int = MAX_VOXELS,
) -> np.ndarray:
    """Resample to the target spacing (mm per axis) when both are known; else unchanged.

    Raises:
        ImageReadError: the resampled image would hold more than ``max_voxels`` voxels.
    """
    if not target or spacing is None or len(spacing) != pixels.ndim:
        return pixels
    if len(target) != pixels.ndim:
        raise ImageReadError(f"target-spacing has {len(target)} values for a {pixels.ndim}-D image")
    shape = [
        max(1, round(n * s / t)) for n, s, t in zip(pixels.shape, spacing, target, strict=True)
    ]
    check_voxels(math.prod(shape), max_voxels)
    source = torch.from_numpy(np.ascontiguousarray(pixels, dtype=np.float32))[None, None]
    if mode == "nearest":
        resized = torch.nn.functional.interpolate(source, size=shape, mode="nearest-exact")
    else:
        linear = "bilinear" if pixels.ndim == 2 else "trilinear"
        resized = torch.nn.functional.interpolate(
            source, size=shape, mode=linear, align_corners=False
        )
    out: np.ndarray = resized[0, 0].numpy()
    return out


def _preprocess(pixels: np.ndarray, size: int) -> np.ndarray:
    """Resize every axis to ``size`` and scale the 1st..99th percentile range to [0, 1]."""
    from monai.transforms import Resize, ScaleIntensityRangePercentiles

    resized = Resize((size,) * pixels.ndim, mode="area")(torch.from_numpy(pixels[None]))
    scaled = ScaleIntensityRangePercentiles(lower=1, upper=99, b_min=0.0, b_max=1.0, clip=True)(
        resized
    )
    out: np.ndarray = np.asarray(scaled, dtype=np.float32)[0]
    return out


def load_site_for(
    site_dir: Path,
    config: RunConfig,
    *,
    state_dir: Path | None = None,
    max_voxels: int = MAX_VOXELS,
    cache_bytes: int | None = None,
) -> SiteData:
    """``load_site`` with the run's data settings (and the site's limits)."""
    return load_site(
        site_dir,
        image_size=config.image_size,
        val_fraction=config.val_fraction,
        test_fraction=config.test_fraction,
        seed=config.seed,
        task=config.task,
        state_dir=state_dir,
        age_bands=AgeBands(config.age_bands),
        spatial_dims=config.spatial_dims,
        voi=config.voi_lut,
        target_spacing=config.target_spacing,
        max_voxels=max_voxels,
        cache_bytes=cache_bytes,
    )
