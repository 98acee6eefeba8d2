"""Lesion detection: a MONAI RetinaNet, local training, per-image boxes and their statistics.

Box conventions: radfed's boxes (``SplitData.boxes``) run ``x1, y1[, z1], x2, y2[, z2]``
with x along the *last* array axis; MONAI's detector numbers its box coordinates in the
tensor's spatial axis order (its first coordinate indexes spatial dim 0). The two differ by
reversing the axes within each half (``to_monai_boxes``, ``from_monai_boxes``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from radfed.config import RunConfig, TaskName
from radfed.data.loading import SplitData
from radfed.errors import ConfigError, DataError
from radfed.metrics.detection import (
    DETECTED_IMAGES,
    DETECTIONS,
    IOU_THRESHOLDS,
    DetectionStats,
    detection_metrics,
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

if TYPE_CHECKING:
    from monai.apps.detection.networks.retinanet_detector import RetinaNetDetector

__all__ = [
    "COUNT_KEYS",
    "HIST_KEYS",
    "LOSSES",
    "MODELS",
    "SIZE_MULTIPLE",
    "TASK",
    "TP_HIST_KEYS",
    "DetectionOutputs",
    "DetectionTask",
    "RetinaNetModel",
    "build_model",
    "from_monai_boxes",
    "predict_boxes",
    "stats_from_values",
    "to_monai_boxes",
]

#: Network names accepted by the ``model`` run-config key; the first is the default.
MODELS: tuple[str, ...] = ("retinanet",)
#: Loss names accepted by the ``loss`` run-config key: ``retinanet`` is a sigmoid focal
#: loss on the sampled anchors plus a smooth-L1 loss on the encoded box offsets.
LOSSES: tuple[str, ...] = ("retinanet",)
#: The backbone's conv1 stride, its max-pool and the two returned stages halve the grid
#: four times: inputs are padded to a multiple of this, and must be at least this large.
SIZE_MULTIPLE = 16
#: Channels of the feature pyramid and of both heads (MONAI's helper fixes 256: 16x the
#: weights and ~10x the CPU time at 32-64 pixels).
_FPN_CHANNELS = 64
#: Anchor side in pixels at the finest level; each coarser level doubles it (8, 16, 32).
_ANCHOR_SIZE = 8

#: Statistics record keys: ``images``, ``lesions-missed`` (counts) and lists of
#: ``metric-bins`` counts: ``det-hist``, ``hit-hist``, ``fp-hist`` and one ``TP_HIST_KEYS``
#: entry per COCO IoU threshold (``tp-hist-50`` .. ``tp-hist-95``).
COUNT_KEYS = ("images", "lesions-missed")
TP_HIST_KEYS = tuple(f"tp-hist-{round(100 * t)}" for t in IOU_THRESHOLDS)
HIST_KEYS = ("det-hist", *TP_HIST_KEYS, "hit-hist", "fp-hist")


def to_monai_boxes(boxes: np.ndarray) -> np.ndarray:
    """radfed boxes ``(M, 2*D)`` (x along the last array axis) -> MONAI's axis order.

    2-D: ``x1, y1, x2, y2`` -> ``y1, x1, y2, x2``; 3-D: ``x1, y1, z1, x2, y2, z2`` ->
    ``z1, y1, x1, z2, y2, x2``.
    """
    return _reverse_axes(boxes)


def from_monai_boxes(boxes: np.ndarray) -> np.ndarray:
    """MONAI boxes ``(M, 2*D)`` (first coordinate along spatial dim 0) -> radfed's order."""
    return _reverse_axes(boxes)


def _reverse_axes(boxes: np.ndarray) -> np.ndarray:
    dims = boxes.shape[-1] // 2
    order = [*range(dims - 1, -1, -1), *range(2 * dims - 1, dims - 1, -1)]
    out: np.ndarray = boxes[..., order]
    return out


class RetinaNetModel(nn.Module):
    """MONAI's RetinaNet network together with its detector (anchors, matcher, sampler,
    box selector).

    Only ``network`` is a registered submodule, so ``state_dict()`` holds exactly the
    network's weights and nothing of the detector goes over the wire. ``train()`` and
    ``eval()`` set the network's mode (batch norm); ``forward`` returns the detector's
    losses when given targets (in either mode) and per-image detections otherwise.
    """

    _detector: RetinaNetDetector

    def __init__(self, detector: RetinaNetDetector) -> None:
        super().__init__()
        self.network = detector.network
        object.__setattr__(self, "_detector", detector)  # unregistered: not in state_dict
        self.network.register_forward_hook(self._numbers_only)

    def _numbers_only(self, _: nn.Module, __: Any, outputs: Any) -> Any:
        """When detecting, the network's outputs with every value that is not a number (a
        diverged or crafted model) made "nothing here": a classification logit of
        ``-_NOT_A_NUMBER_LOGIT`` (no detection at that anchor), a box regression of 0;
        regressions are bounded by ``_MAX_REGRESSION`` so that decoding them stays finite.

        MONAI's detector fails on such values, and a failure would tell a model made to
        give them for some images only whether the site holds one, outside the disclosure
        control of the statistics. Training sees the network's outputs unchanged.
        """
        if self._detector.training:
            return None
        if isinstance(outputs, dict):
            cls_key, box_key = self.network.cls_key, self.network.box_reg_key
            return {
                **outputs,
                cls_key: [_finite_logits(t) for t in outputs[cls_key]],
                box_key: [_finite_regression(t) for t in outputs[box_key]],
            }
        half = len(outputs) // 2  # MONAI's list output: the class maps, then the box maps
        return [_finite_logits(t) for t in outputs[:half]] + [
            _finite_regression(t) for t in outputs[half:]
        ]

    @property
    def detector(self) -> RetinaNetDetector:
        return self._detector

    def forward(
        self, images: torch.Tensor, targets: list[dict[str, torch.Tensor]] | None = None
    ) -> Any:
        """Losses ``{"classification", "box_regression"}`` of ``(B, 1, S, S[, S])`` images
        against ``targets`` (per image ``boxes`` in MONAI's order and ``labels``), or
        without targets per image ``boxes``, ``labels`` and ``labels_scores``."""
        detector = self._detector
        detector.anchors = None  # cached per shape only: may be of another device or dtype
        # The detector's own flag picks losses or detections; the network keeps its mode.
        detector.training = targets is not None
        return detector(images, targets)


#: The classification logit that stands for an output that is not a number: no detection.
_NOT_A_NUMBER_LOGIT = 1e4
#: The largest box regression a detection decodes (sane networks give a few units).
_MAX_REGRESSION = 1e4


def _finite_logits(logits: torch.Tensor) -> torch.Tensor:
    none = -_NOT_A_NUMBER_LOGIT
    return torch.nan_to_num(logits, nan=none, posinf=none, neginf=none)


def _finite_regression(regression: torch.Tensor) -> torch.Tensor:
    finite = torch.nan_to_num(regression, nan=0.0, posinf=0.0, neginf=0.0)
    return finite.clamp(-_MAX_REGRESSION, _MAX_REGRESSION)


def build_model(config: RunConfig) -> RetinaNetModel:
    """A RetinaNet for 1-channel ``(B, 1, S, S[, S])`` images and one lesion class.

    Backbone: a MONAI ResNet-10 (basic blocks, 8-16-32-64 channels, conv1 stride 2 and
    max-pool); its first two stages feed a 64-channel feature pyramid with an extra pooled
    level (``BackboneWithFPN``, as ``resnet_fpn_feature_extractor`` builds it), so the
    levels have strides 4, 8 and 16 with one square anchor of 8, 16 and 32 pixels each.
    The detector is set up from the ``det-*`` keys. Random initialisation from
    ``config.seed`` (nothing is downloaded), so the server and every site agree.
    """
    from monai.apps.detection.networks.retinanet_detector import RetinaNetDetector
    from monai.apps.detection.networks.retinanet_network import RetinaNet
    from monai.apps.detection.utils.anchor_utils import AnchorGeneratorWithAnchorShape
    from monai.losses import FocalLoss
    from monai.networks.blocks.backbone_fpn_utils import BackboneWithFPN
    from monai.networks.nets import resnet

    _check(config)
    dims = config.spatial_dims
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        backbone = resnet.ResNet(
            block="basic",
            layers=[1, 1, 1, 1],
            block_inplanes=[8, 16, 32, 64],
            spatial_dims=dims,
            n_input_channels=1,
            conv1_t_size=7,
            conv1_t_stride=2,
            num_classes=1,
        )
        features = BackboneWithFPN(
            backbone,
            return_layers={"layer1": "0", "layer2": "1"},
            in_channels_list=[8, 16],
            out_channels=_FPN_CHANNELS,
            spatial_dims=dims,
        )
        network = RetinaNet(
            spatial_dims=dims,
            num_classes=1,
            num_anchors=1,
            feature_extractor=features,
            size_divisible=SIZE_MULTIPLE,
        )
    anchors = AnchorGeneratorWithAnchorShape(
        feature_map_scales=(1, 2, 4), base_anchor_shapes=((_ANCHOR_SIZE,) * dims,)
    )
    detector = RetinaNetDetector(network, anchors)
    detector.set_cls_loss(FocalLoss(gamma=2.0, reduction="mean"))
    detector.set_box_regression_loss(
        nn.SmoothL1Loss(beta=1.0 / 9, reduction="mean"), encode_gt=True, decode_pred=False
    )
    detector.set_regular_matcher(
        config.det_fg_iou, config.det_bg_iou, allow_low_quality_matches=True
    )
    detector.set_balanced_sampler(
        batch_size_per_image=config.det_batch_size_per_image,
        positive_fraction=config.det_positive_fraction,
    )
    detector.set_box_selector_parameters(
        score_thresh=config.det_score_thresh,
        topk_candidates_per_level=1000,
        nms_thresh=config.det_nms_thresh,
        detections_per_img=config.det_detections_per_image,
    )
    return RetinaNetModel(detector)


def _check(config: RunConfig) -> None:
    choose(config.model, MODELS, "model", "detection")
    choose(config.loss, LOSSES, "loss", "detection")
    if config.image_size < SIZE_MULTIPLE:
        msg = (
            f"run config 'image-size' must be at least {SIZE_MULTIPLE} for detection (the "
            f"backbone halves the grid four times), got {config.image_size}"
        )
        raise ConfigError(msg)
    if config.patch_size:
        msg = (
            "run config 'patch-size' must be 0 for detection (it trains and predicts on "
            f"whole images), got {config.patch_size}"
        )
        raise ConfigError(msg)


class _Cases(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """Images with their boxes in MONAI's order, ``(2*D,)`` values per box."""

    def __init__(self, data: SplitData) -> None:
        self.images = data.images
        self.boxes = [torch.from_numpy(to_monai_boxes(b)) for b in _boxes(data)]

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images[index], self.boxes[index]


def _collate(
    items: list[tuple[torch.Tensor, torch.Tensor]],
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Stack the images; keep each image's own number of boxes."""
    return torch.stack([image for image, _ in items]), [boxes for _, boxes in items]


def _boxes(data: SplitData) -> list[np.ndarray]:
    """Each case's boxes as float32 ``(M, 2*D)`` (no lesion: ``(0, 2*D)``).

    Raises:
        DataError: the split has no boxes column or boxes of the wrong size.
    """
    width = 2 * (data.images.ndim - 2)
    if len(data.boxes) != len(data):
        msg = (
            f"detection needs boxes for every case, got {len(data.boxes)} for {len(data)} "
            "cases: fill the manifest's 'boxes' column ('[]' for a case without lesions)"
        )
        raise DataError(msg)
    out = []
    for boxes in data.boxes:
        array = np.asarray(boxes, dtype=np.float32)
        if array.size and (array.ndim != 2 or array.shape[1] != width):
            msg = f"detection boxes must have {width} values each, got shape {array.shape}"
            raise DataError(msg)
        out.append(array.reshape(-1, width))
    return out


def _targets(boxes: list[torch.Tensor], device: torch.device) -> list[dict[str, torch.Tensor]]:
    return [
        {
            "boxes": b.to(device),
            "labels": torch.zeros(len(b), dtype=torch.int64, device=device),
        }
        for b in boxes
    ]


def _loss(model: nn.Module, images: torch.Tensor, targets: list[dict[str, torch.Tensor]]) -> Any:
    losses = model(images, targets)
    return losses["classification"] + losses["box_regression"]


def _rng_devices(device: torch.device) -> list[int]:
    return [torch.cuda.current_device()] if device.type == "cuda" else []


def train(
    model: nn.Module,
    data: SplitData,
    config: RunConfig,
    *,
    seed: int,
    proximal_mu: float = 0.0,
    val: SplitData | None = None,
) -> TrainResult:
    """Local epochs of Adam on the RetinaNet loss (see ``Task.train``).

    Images without lesions are negatives (every anchor is background). The anchor sampler
    draws from ``seed``, as does the shuffling. With ``early-stopping-patience`` the loss
    on ``val`` is the same loss with the network in eval mode (batch-norm statistics
    frozen) and the anchor sample of each image fixed across epochs.
    """
    _check(config)
    cases = _Cases(data)
    batches = loader(
        cases,
        batch_size=config.batch_size,
        seed=seed,
        num_workers=config.num_workers,
        collate_fn=_collate,
    )

    def step_loss(
        net: nn.Module, batch: tuple[torch.Tensor, list[torch.Tensor]], device: torch.device
    ) -> tuple[torch.Tensor, int]:
        images, boxes = batch
        loss: torch.Tensor = _loss(
            net, images.to(device, non_blocking=True), _targets(boxes, device)
        )
        return loss, len(images)

    held_out = _Cases(val) if val is not None and len(val) else None

    def val_loss(net: nn.Module, device: torch.device) -> float:
        assert held_out is not None
        total = 0.0
        with torch.random.fork_rng(devices=_rng_devices(device)):
            torch.manual_seed(seed)
            for start in range(0, len(held_out), config.batch_size):
                end = min(start + config.batch_size, len(held_out))
                images, boxes = _collate([held_out[i] for i in range(start, end)])
                with autocast(device):
                    loss = _loss(net, images.to(device), _targets(boxes, device))
                total += float(loss) * len(images)
        return total / len(held_out)

    with torch.random.fork_rng(devices=_rng_devices(pick_device())):
        torch.manual_seed(seed)
        return fit(
            model,
            lambda: batches,
            step_loss,
            config,
            num_examples=len(data),
            proximal_mu=proximal_mu,
            val_loss=val_loss if held_out is not None else None,
        )


@torch.no_grad()
def predict_boxes(
    model: nn.Module, data: SplitData, config: RunConfig
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Per image the detected boxes (radfed's order, float32 ``(P, 2*D)``) and their scores
    (float32 ``(P,)`` in [0, 1]), after score threshold, NMS and the per-image limit."""
    device = pick_device()
    model.to(device).eval()
    boxes: list[np.ndarray] = []
    scores: list[np.ndarray] = []
    width = 2 * (data.images.ndim - 2)
    for start in range(0, len(data), config.batch_size):
        images = data.images[start : start + config.batch_size].to(device)
        with autocast(device):
            detections = model(images)
        for found in detections:
            found_boxes = found["boxes"].float().cpu().numpy().reshape(-1, width)
            boxes.append(from_monai_boxes(found_boxes).astype(np.float32))
            found_scores = found["labels_scores"].float().cpu().numpy().reshape(-1)
            scores.append(np.clip(found_scores, 0.0, 1.0).astype(np.float32))
    model.to("cpu")
    return boxes, scores


@dataclass(frozen=True)
class DetectionOutputs:
    """Per-image predicted and true boxes of a split, in radfed's order (kept at the site).

    Attributes:
        boxes: per image the detected boxes, ``(P, 2*D)``.
        scores: per image their scores, ``(P,)``.
        truth: per image the ground-truth boxes, ``(G, 2*D)``.
        bins: score bins of the statistics (``metric-bins``).
    """

    boxes: tuple[np.ndarray, ...]
    scores: tuple[np.ndarray, ...]
    truth: tuple[np.ndarray, ...]
    bins: int

    def __len__(self) -> int:
        return len(self.truth)

    def stats(self, index: Sequence[int] | np.ndarray) -> DetectionStats:
        chosen = [int(i) for i in np.asarray(index, dtype=np.int64).reshape(-1)]
        return DetectionStats.from_images(
            [self.boxes[i] for i in chosen],
            [self.scores[i] for i in chosen],
            [self.truth[i] for i in chosen],
            bins=self.bins,
        )

    def rows(self) -> list[dict[str, float | int | str]]:
        """Per image: lesions, detections and the best score (0 without a detection)."""
        return [
            {
                "index": i,
                "lesions": len(truth),
                "detections": len(scores),
                "best_score": float(scores.max()) if len(scores) else 0.0,
            }
            for i, (truth, scores) in enumerate(zip(self.truth, self.scores, strict=True))
        ]

    def parts(self) -> dict[str, list[int]]:
        """``detections``: each image adds its detections; ``detected-images``: each image
        with one adds 1 (``DetectionStats.withholding``)."""
        return {
            DETECTIONS: [len(scores) for scores in self.scores],
            DETECTED_IMAGES: [int(len(scores) > 0) for scores in self.scores],
        }


class DetectionTask:
    """Lesion detection with one class (MONAI RetinaNet); metrics ``detection_metrics``.

    Headline ``ap50``: the usual single number of box detectors (COCO, MONAI's detection
    tutorials), threshold-free, it punishes misses and false positives alike, and it is
    defined as soon as a split holds a lesion; the lesion-level FROC (``froc_mean``, the
    LUNA16 CPM) is reported beside it.

    Statistics (``DetectionStats``): ``COUNT_KEYS`` and the ``HIST_KEYS`` histograms of
    ``metric-bins`` counts each.
    """

    name = TaskName.DETECTION
    models = MODELS
    losses = LOSSES
    headline = "ap50"
    summary: tuple[str, ...] = (
        "ap50",
        "ap50_95",
        "froc_mean",
        "froc_1",
        "detections_per_image",
    )
    stable_parts: tuple[str, ...] = ()

    def check(self, config: RunConfig) -> None:
        _check(config)

    # the module's functions are the task's (see their docstrings)
    build_model = staticmethod(build_model)
    train = staticmethod(train)

    def predict(self, model: nn.Module, data: SplitData, config: RunConfig) -> DetectionOutputs:
        truth = _boxes(data)
        boxes, scores = predict_boxes(model, data, config)
        return DetectionOutputs(tuple(boxes), tuple(scores), tuple(truth), config.metric_bins)

    def empty_stats(self, config: RunConfig, *, suppressed: bool = False) -> DetectionStats:
        return DetectionStats.empty(config.metric_bins, suppressed=suppressed)

    def to_values(self, stats: SplitStats) -> dict[str, StatsValue]:
        s = _detection_stats(stats)
        values: dict[str, StatsValue] = {"images": s.n, "lesions-missed": s.missed}
        values["det-hist"] = list(s.det_hist)
        for key, row in zip(TP_HIST_KEYS, s.tp_hist, strict=True):
            values[key] = list(row)
        values["hit-hist"] = list(s.hit_hist)
        values["fp-hist"] = list(s.fp_hist)
        return values

    def from_values(self, values: Mapping[str, object], config: RunConfig) -> DetectionStats:
        return stats_from_values(values, bins=config.metric_bins)

    def metrics(self, stats: SplitStats) -> dict[str, float | None]:
        return detection_metrics(_detection_stats(stats))


def stats_from_values(values: Mapping[str, object], *, bins: int) -> DetectionStats:
    """Record values -> statistics, checked (see ``Task.from_values``).

    Raises:
        ValueError: naming the key whose value is missing, of the wrong type or length,
            negative, or inconsistent with the others (never quoting a value).
    """
    images, missed = (record_count(record_value(values, k), k) for k in COUNT_KEYS)
    hists = {k: record_histogram(record_value(values, k), k, bins) for k in HIST_KEYS}
    det = hists["det-hist"]
    for key in (*TP_HIST_KEYS, "fp-hist"):
        if any(part > whole for part, whole in zip(hists[key], det, strict=True)):
            raise ValueError(f"{key} counts more detections than det-hist in a bin")
    if any(count and not whole for count, whole in zip(hists["hit-hist"], det, strict=True)):
        raise ValueError("hit-hist places a lesion in a bin without detections")
    lesions = sum(hists["hit-hist"]) + missed
    for key in TP_HIST_KEYS:
        if sum(hists[key]) > lesions:
            raise ValueError(f"{key} counts more true positives than lesions")
    if not images and (lesions or sum(det)):
        raise ValueError("images must be positive when lesions or detections are counted")
    return DetectionStats(
        n=images,
        det_hist=det,
        tp_hist=tuple(hists[k] for k in TP_HIST_KEYS),
        hit_hist=hists["hit-hist"],
        missed=missed,
        fp_hist=hists["fp-hist"],
    )


def _detection_stats(stats: object) -> DetectionStats:
    if not isinstance(stats, DetectionStats):
        msg = f"detection statistics expected, got {type(stats).__name__}"
        raise TypeError(msg)
    return stats


#: The detection task of the registry.
TASK: Task = DetectionTask()
