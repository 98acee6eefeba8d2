"""Binary segmentation: MONAI U-Net or SegResNet, patch training, sliding-window inference."""

from __future__ import annotations

import itertools
import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from radfed.config import RunConfig, TaskName
from radfed.data.loading import SplitData
from radfed.errors import ConfigError, DataError
from radfed.metrics.segmentation import (
    FALSE_POSITIVE,
    FOREGROUND,
    MISSED,
    SEGMENTED,
    CaseKind,
    CaseMetrics,
    SegmentationStats,
    case_metrics,
    hd95_range,
    segmentation_metrics,
)
from radfed.tasks.protocol import (
    SplitStats,
    StatsValue,
    Task,
    choose,
    record_count,
    record_histogram,
    record_value,
)
from radfed.tasks.training import TrainResult, autocast, fit, loader, pick_device

__all__ = [
    "COUNT_KEYS",
    "HIST_KEYS",
    "LOSSES",
    "MODELS",
    "SUM_KEYS",
    "TASK",
    "SegmentationOutputs",
    "SegmentationTask",
    "build_model",
    "infer_logits",
    "make_loss",
]

#: Network names accepted by the ``model`` run-config key; the first is the default.
MODELS = ("unet", "segresnet")
#: Loss names accepted by the ``loss`` run-config key; the first is the default.
LOSSES = ("dice-ce", "dice")
#: Both networks halve the grid three times: what they see must be a multiple of this, and
#: at least twice it (normalisation needs more than one pixel at the coarsest level).
SIZE_MULTIPLE = 8

#: Statistics record keys (``SegmentationStats`` attributes, kebab-case): non-negative
#: integers, finite non-negative floats, and lists of ``metric-bins`` counts.
COUNT_KEYS = (
    "true-negative",
    "false-positive",
    "missed",
    "segmented",
    "dice-hits",
    "dice-withheld",
    "hd95-withheld",
    "voxels-withheld",
    "tp-voxels",
    "fp-voxels",
    "fn-voxels",
)
SUM_KEYS = ("dice-sum", "iou-sum", "hd95-sum")
HIST_KEYS = ("dice-hist", "iou-hist", "hd95-hist")


def build_model(config: RunConfig) -> nn.Module:
    """A MONAI network from ``(B, 1, S, S[, S])`` images to 2-class logits of the same size.

    ``unet``: a residual U-Net with channels 8-16-32-64 and three stride-2 levels;
    ``segresnet``: a SegResNet of 8 initial filters, one block per level. The weights are
    initialised from ``config.seed`` so the server and every site agree.
    """
    from monai.networks import nets

    model = _check(config)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        if model == "unet":
            return nets.UNet(
                spatial_dims=config.spatial_dims,
                in_channels=1,
                out_channels=2,
                channels=(8, 16, 32, 64),
                strides=(2, 2, 2),
                num_res_units=1,
            )
        return nets.SegResNet(
            spatial_dims=config.spatial_dims,
            init_filters=8,
            in_channels=1,
            out_channels=2,
            blocks_down=(1, 1, 1, 1),
            blocks_up=(1, 1, 1),
        )


def make_loss(name: str) -> nn.Module:
    """MONAI's Dice + cross-entropy (``dice-ce``) or Dice (``dice``) loss of 2-class logits
    ``(B, 2, ...)`` against masks ``(B, 1, ...)`` (one-hot encoded, softmax applied).

    The Dice term pools the voxels of the whole batch (``batch=True``): most cases may hold
    no foreground, and a per-case foreground Dice of an empty mask only punishes.
    """
    from monai.losses import DiceCELoss, DiceLoss

    if name == "dice-ce":
        return DiceCELoss(to_onehot_y=True, softmax=True, batch=True)
    if name == "dice":
        return DiceLoss(to_onehot_y=True, softmax=True, batch=True)
    msg = f"run config 'loss' must be one of {', '.join(LOSSES)}, got {name!r}"
    raise ConfigError(msg)


def _check(config: RunConfig) -> str:
    """The model name, after refusing settings the networks cannot run with."""
    model = choose(config.model, MODELS, "model", "segmentation")
    choose(config.loss, LOSSES, "loss", "segmentation")
    if config.patch_size > config.image_size:
        msg = (
            f"run config 'patch-size' must be at most image-size ({config.image_size}), "
            f"got {config.patch_size}: choose a smaller patch, or 0 for whole images"
        )
        raise ConfigError(msg)
    key = "patch-size" if config.patch_size else "image-size"
    size = config.patch_size or config.image_size
    if size % SIZE_MULTIPLE or size < 2 * SIZE_MULTIPLE:
        below = size // SIZE_MULTIPLE * SIZE_MULTIPLE
        above = max(2 * SIZE_MULTIPLE, below + SIZE_MULTIPLE)
        near = f"{below} or {above}" if below >= 2 * SIZE_MULTIPLE else str(above)
        msg = (
            f"run config {key!r} must be a multiple of {SIZE_MULTIPLE} and at least "
            f"{2 * SIZE_MULTIPLE} for segmentation model {model!r} (three stride-2 levels), "
            f"got {size}: use {near}"
        )
        raise ConfigError(msg)
    return model


def infer_logits(model: nn.Module, images: torch.Tensor, config: RunConfig) -> torch.Tensor:
    """2-class logits ``(B, 2, S, S[, S])`` of images ``(B, 1, S, S[, S])``, in float32.

    With ``patch-size`` > 0 by sliding-window inference over patches of that size
    (``sw-overlap`` between neighbours, averaged where they overlap); else in one pass.
    """
    if not config.patch_size:
        whole: torch.Tensor = model(images)
        return whole.float()
    from monai.inferers import sliding_window_inference

    def predictor(patches: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = model(patches)
        return out.float()

    logits = sliding_window_inference(
        images,
        roi_size=(config.patch_size,) * (images.ndim - 2),
        sw_batch_size=config.batch_size,
        predictor=predictor,
        overlap=config.sw_overlap,
    )
    return _plain(logits).float()


class _Cases(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """Image and mask pairs of a split: whole, or one random patch per case.

    A patch is centred on foreground or background with equal odds (MONAI's
    ``RandCropByPosNegLabeld``); its randomness is drawn from ``(seed, case)``, so the
    patches do not depend on worker processes or on the order cases are read.
    """

    def __init__(self, images: torch.Tensor, masks: torch.Tensor, *, patch: int, seed: int):
        self.images = images
        self.masks = masks
        self.seed = seed
        self.crop: Any = None
        if patch:
            from monai.transforms import RandCropByPosNegLabeld

            self.crop = RandCropByPosNegLabeld(
                keys=("image", "mask"),
                label_key="mask",
                spatial_size=(patch,) * (images.ndim - 2),
                pos=1.0,
                neg=1.0,
                num_samples=1,
            )

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image, mask = self.images[index], self.masks[index]
        if self.crop is None:
            return image, mask
        self.crop.set_random_state(seed=_derive(self.seed, index))
        with warnings.catch_warnings():  # a case without foreground: background patches
            warnings.filterwarnings("ignore", message="Num foregrounds")
            patch = self.crop({"image": image, "mask": mask})[0]
        return _plain(patch["image"]), _plain(patch["mask"])


def _plain(tensor: Any) -> torch.Tensor:
    """A plain tensor: MONAI's MetaTensor would route every later operation through its
    metadata tracking (several times slower)."""
    from monai.utils import convert_to_tensor

    out: torch.Tensor = convert_to_tensor(tensor, track_meta=False)
    return out


def _derive(*parts: int) -> int:
    """A 32-bit seed from integers (NumPy's SeedSequence, so nearby inputs do not collide)."""
    return int(np.random.SeedSequence(list(parts)).generate_state(1)[0])


def _masks(data: SplitData) -> torch.Tensor:
    if data.masks is None:
        msg = "segmentation needs a mask per case: fill the manifest's 'mask' column"
        raise DataError(msg)
    return data.masks


def train(
    model: nn.Module,
    data: SplitData,
    config: RunConfig,
    *,
    seed: int,
    proximal_mu: float = 0.0,
    val: SplitData | None = None,
) -> TrainResult:
    """Local epochs of Adam on the configured loss (see ``Task.train``).

    With ``patch-size`` > 0 each case gives one random patch per epoch (new patches every
    epoch, drawn from ``seed``); the validation loss is then taken on sliding-window
    logits of whole images, as ``predict`` sees them.
    """
    _check(config)
    loss_fn = make_loss(choose(config.loss, LOSSES, "loss", "segmentation"))
    masks = _masks(data)
    epochs = itertools.count()

    def batches() -> Any:
        if not len(data):
            return []
        epoch = next(epochs)
        cases = _Cases(data.images, masks, patch=config.patch_size, seed=_derive(seed, epoch))
        return loader(
            cases,
            batch_size=config.batch_size,
            seed=_derive(seed, epoch, 1),
            num_workers=config.num_workers,
        )

    def step_loss(
        net: nn.Module, batch: tuple[torch.Tensor, torch.Tensor], device: torch.device
    ) -> tuple[torch.Tensor, int]:
        images, targets = batch
        logits = net(images.to(device, non_blocking=True)).float()
        loss: torch.Tensor = loss_fn(logits, targets.to(device).float())
        return loss, len(images)

    def val_loss(net: nn.Module, device: torch.device) -> float:
        assert val is not None
        val_masks = _masks(val)
        total = 0.0
        for start in range(0, len(val), config.batch_size):
            images = val.images[start : start + config.batch_size].to(device)
            targets = val_masks[start : start + config.batch_size].to(device).float()
            with autocast(device):
                logits = infer_logits(net, images, config)
            total += float(loss_fn(logits, targets)) * len(images)
        return total / len(val)

    return fit(
        model,
        batches,
        step_loss,
        config,
        num_examples=len(data),
        proximal_mu=proximal_mu,
        val_loss=val_loss if val is not None and len(val) else None,
    )


@torch.no_grad()
def predict_cases(model: nn.Module, data: SplitData, config: RunConfig) -> CaseMetrics:
    """Per-case Dice, IoU and HD95 of the argmax prediction on ``data`` (kept at the site)."""
    masks = _masks(data)
    device = pick_device()
    model.to(device).eval()
    parts = []
    for start in range(0, len(data), config.batch_size):
        images = data.images[start : start + config.batch_size].to(device)
        with autocast(device):
            logits = infer_logits(model, images, config)
        predicted = logits.argmax(dim=1, keepdim=True).cpu()
        parts.append(case_metrics(predicted, masks[start : start + config.batch_size]))
    model.to("cpu")
    return CaseMetrics.concat(parts)


@dataclass(frozen=True)
class SegmentationOutputs:
    """Per-case segmentation values of a split (kept at the site; no mask is kept)."""

    cases: CaseMetrics
    bins: int
    hd95_max: float

    def __len__(self) -> int:
        return len(self.cases)

    def stats(self, index: Sequence[int] | np.ndarray) -> SegmentationStats:
        return SegmentationStats.from_cases(
            self.cases.select(index), bins=self.bins, hd95_max=self.hd95_max
        )

    def rows(self) -> list[dict[str, float | int | str]]:
        """Per case: its kind, Dice, IoU, HD95 (empty where undefined) and voxel counts."""
        c = self.cases
        out: list[dict[str, float | int | str]] = []
        for i in range(len(c)):

            def value(array: np.ndarray, i: int = i) -> float | str:
                v = float(array[i])
                return "" if math.isnan(v) else v

            out.append(
                {
                    "index": i,
                    "kind": CaseKind(int(c.kind[i])).label,
                    "dice": value(c.dice),
                    "iou": value(c.iou),
                    "hd95": value(c.hd95),
                    "foreground_voxels": int(c.tp[i] + c.fn[i]),
                    "predicted_voxels": int(c.tp[i] + c.fp[i]),
                }
            )
        return out

    def parts(self) -> dict[str, list[int]]:
        """Per sub-population of ``SegmentationStats.withholding`` whether each case is
        in it."""
        kind = np.asarray(self.cases.kind)
        segmented, missed = kind == CaseKind.SEGMENTED, kind == CaseKind.MISSED
        return {
            FOREGROUND: (segmented | missed).astype(int).tolist(),
            SEGMENTED: segmented.astype(int).tolist(),
            MISSED: missed.astype(int).tolist(),
            FALSE_POSITIVE: (kind == CaseKind.FALSE_POSITIVE).astype(int).tolist(),
        }


class SegmentationTask:
    """Binary segmentation of the manifest's masks (foreground vs background).

    Statistics (``SegmentationStats``): the counts ``COUNT_KEYS``, the sums ``SUM_KEYS``
    and the histograms ``HIST_KEYS`` of ``metric-bins`` counts each.
    """

    name = TaskName.SEGMENTATION
    models: tuple[str, ...] = MODELS
    losses: tuple[str, ...] = LOSSES
    headline: str = "dice_mean"
    summary: tuple[str, ...] = (
        "dice_mean",
        "dice_median",
        "iou_mean",
        "hd95_median",
        "fp_case_rate",
        "miss_rate",
    )
    stable_parts: tuple[str, ...] = (FOREGROUND,)

    def check(self, config: RunConfig) -> None:
        _check(config)

    # the module's functions are the task's (see their docstrings)
    build_model = staticmethod(build_model)
    train = staticmethod(train)

    def predict(self, model: nn.Module, data: SplitData, config: RunConfig) -> SegmentationOutputs:
        return SegmentationOutputs(
            cases=predict_cases(model, data, config),
            bins=config.metric_bins,
            hd95_max=hd95_range(config.image_size, config.spatial_dims),
        )

    def empty_stats(self, config: RunConfig, *, suppressed: bool = False) -> SegmentationStats:
        return SegmentationStats.empty(
            config.metric_bins,
            hd95_range(config.image_size, config.spatial_dims),
            suppressed=suppressed,
        )

    def to_values(self, stats: SplitStats) -> dict[str, StatsValue]:
        s = _segmentation_stats(stats)
        values: dict[str, StatsValue] = {}
        for key in COUNT_KEYS:
            values[key] = int(getattr(s, _attribute(key)))
        for key in SUM_KEYS:
            values[key] = float(getattr(s, _attribute(key)))
        for key in HIST_KEYS:
            values[key] = [int(v) for v in getattr(s, _attribute(key))]
        return values

    def from_values(self, values: Mapping[str, object], config: RunConfig) -> SegmentationStats:
        return stats_from_values(
            values,
            bins=config.metric_bins,
            hd95_max=hd95_range(config.image_size, config.spatial_dims),
        )

    def metrics(self, stats: SplitStats) -> dict[str, float | None]:
        return segmentation_metrics(_segmentation_stats(stats))


def _segmentation_stats(stats: object) -> SegmentationStats:
    if not isinstance(stats, SegmentationStats):
        msg = f"segmentation statistics expected, got {type(stats).__name__}"
        raise TypeError(msg)
    return stats


def _attribute(key: str) -> str:
    return key.replace("-", "_")


def stats_from_values(
    values: Mapping[str, object], *, bins: int, hd95_max: float
) -> SegmentationStats:
    """Record values -> statistics, checked (see ``Task.from_values``).

    Raises:
        ValueError: naming the key whose value is missing, of the wrong type or length,
            negative, not finite, or inconsistent with the others (never quoting a value).
    """
    fields: dict[str, Any] = {}
    for key in COUNT_KEYS:
        fields[_attribute(key)] = record_count(record_value(values, key), key)
    for key in SUM_KEYS:
        fields[_attribute(key)] = _sum(record_value(values, key), key)
    for key in HIST_KEYS:
        fields[_attribute(key)] = record_histogram(record_value(values, key), key, bins)
    stats = SegmentationStats(**fields, hd95_max=hd95_max)
    _check_consistent(stats)
    return stats


def _check_consistent(s: SegmentationStats) -> None:
    """Raise ValueError naming the first key that disagrees with the others."""
    dice_cases, hd95_cases = sum(s.dice_hist), sum(s.hd95_hist)
    slack = 1e-9 * (1 + dice_cases)  # rounding of float sums
    voxels_sent = not s.voxels_withheld
    problems = (
        (
            s.voxels_withheld not in (0, s.n),
            "voxels-withheld must be 0 or every case of the cell",
        ),
        (
            voxels_sent and bool(s.dice_withheld or s.hd95_withheld),
            "voxels-withheld must be the cell's cases when a metric is withheld",
        ),
        (
            dice_cases + s.dice_withheld != s.missed + s.segmented,
            "dice-hist must hold missed + segmented - dice-withheld cases",
        ),
        (sum(s.iou_hist) != dice_cases, "iou-hist must hold as many cases as dice-hist"),
        (
            hd95_cases + s.hd95_withheld != s.segmented,
            "hd95-hist must hold segmented - hd95-withheld cases",
        ),
        (
            s.dice_hits > min(dice_cases, s.segmented),
            "dice-hits must not exceed the cases of dice-hist or segmented",
        ),
        (
            not 0.5 * s.dice_hits - slack <= s.dice_sum <= dice_cases + slack,
            "dice-sum must lie between dice-hits / 2 and the cases of dice-hist",
        ),
        (s.iou_sum > s.dice_sum + slack, "iou-sum must not exceed dice-sum"),
        (
            s.hd95_sum > hd95_cases * s.hd95_max * (1 + 1e-9),
            "hd95-sum must not exceed the image diagonal per case of hd95-hist",
        ),
        (s.tp_voxels > 0 and not s.segmented, "tp-voxels must be 0 without segmented cases"),
        (
            voxels_sent and s.tp_voxels + s.fn_voxels < s.missed + s.segmented,
            "tp-voxels + fn-voxels must be at least missed + segmented",
        ),
        (
            voxels_sent and s.tp_voxels + s.fp_voxels < s.false_positive + s.segmented,
            "tp-voxels + fp-voxels must be at least false-positive + segmented",
        ),
        (
            not voxels_sent and (s.tp_voxels or s.fp_voxels or s.fn_voxels),
            "voxel counts must be 0 when they are withheld",
        ),
    )
    for bad, msg in problems:
        if bad:
            raise ValueError(msg)


def _sum(value: object, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{key} must be a number")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{key} must be finite and non-negative")
    return float(value)


#: The segmentation task of the registry.
TASK: Task = SegmentationTask()
