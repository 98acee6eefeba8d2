"""Lesion detection metrics (COCO AP, FROC) from mergeable score histograms.

A site matches each image's predicted boxes to its ground-truth boxes and keeps only
histograms over ``B`` equal-width score bins on [0, 1]; the server sums them over sites, so
every number equals the exact number on the pooled images with scores rounded down to bin
edges. Boxes are ``(M, 4)`` ``x1, y1, x2, y2`` or ``(M, 6)`` ``x1, y1, z1, x2, y2, z2`` with
exclusive ends; the same code serves 2-D and 3-D.

*AP* follows COCO (pycocotools ``COCOeval``, one category, no crowd, area ``all``): per
image, detections in descending score order are matched greedily to the unmatched
ground-truth box of highest IoU at least the threshold, at each of the IoU thresholds
0.50:0.05:0.95, and precision is read at 101 recall points. Detections in one score bin are
tied: the precision-recall curve has one point per non-empty bin, which equals COCO exactly
when no two detections share a bin (COCO's value then depends on the order of the ties).

*FROC* is lesion-level: a detection *hits* a lesion when the detection box's centre lies in
the lesion's box (half-open, as pixel ``[x1, x2)``; the LUNA16/CAMELYON "detection point
inside the lesion" rule). A lesion counts as found at threshold ``t`` when a detection
scoring at least ``t`` hits it; a detection hitting no lesion is a false positive, one
hitting an already found lesion is neither. Sensitivity is interpolated linearly at 1/8 to
8 false positives per image as MONAI's ``compute_froc_score`` does, and ``froc_mean`` is
their mean (LUNA16's CPM). MONAI's ``compute_froc_curve_data`` skips the lowest observed
score as a threshold (meant for the 0 of missed lesions); this module keeps it, so the two
agree whenever some lesion is missed.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from radfed.metrics.histograms import merge_sparse_bins

__all__ = [
    "DETECTED_IMAGES",
    "DETECTIONS",
    "FROC_RATES",
    "IOU_THRESHOLDS",
    "DetectionStats",
    "DetectionStatsAccumulator",
    "average_precision",
    "box_iou",
    "centre_hits",
    "detection_metrics",
    "froc_curve",
    "froc_sensitivities",
    "match_detections",
]

#: COCO's IoU thresholds 0.50:0.05:0.95 (computed as pycocotools does, for equal floats).
IOU_THRESHOLDS: tuple[float, ...] = tuple(
    float(t) for t in np.linspace(0.5, 0.95, round((0.95 - 0.5) / 0.05) + 1, endpoint=True)
)
#: False positives per image at which FROC sensitivity is reported.
FROC_RATES: tuple[float, ...] = (0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)
#: The sub-populations of a cell whose detections decide its statistics
#: (``DetectionStats.withholding``): the detections, and the images holding them.
DETECTIONS = "detections"
DETECTED_IMAGES = "detected-images"
#: COCO's 101 recall points.
_RECALL_POINTS = np.linspace(0.0, 1.0, round(1.0 / 0.01) + 1, endpoint=True)


@dataclass(frozen=True)
class DetectionStats:
    """Sufficient statistics of detections on a set of images; ``+`` pools two sets.

    Attributes:
        n: images summarised.
        det_hist: detections per score bin, shape ``(B,)``.
        tp_hist: per IoU threshold of ``IOU_THRESHOLDS``, the detections per score bin that
            COCO matching counts as true positives, shape ``(T, B)``; the rest of
            ``det_hist`` are false positives at that threshold.
        hit_hist: FROC: lesions per score bin of the best detection hitting them, ``(B,)``.
        missed: FROC: lesions no detection hits.
        fp_hist: FROC: detections hitting no lesion per score bin, ``(B,)``.
        suppressed: the cell held fewer images than the site's minimum cell size; every
            count is zero and the cell is left out of pooled values.
        detected_images: images with at least one detection (at the site, for its release
            rule; not sent).
    """

    n: int
    det_hist: tuple[int, ...]
    tp_hist: tuple[tuple[int, ...], ...]
    hit_hist: tuple[int, ...]
    missed: int
    fp_hist: tuple[int, ...]
    suppressed: bool = False
    detected_images: int = field(default=0, compare=False)

    @classmethod
    def empty(cls, bins: int, *, suppressed: bool = False) -> DetectionStats:
        """Statistics of no image (the identity of ``+``)."""
        zeros = (0,) * bins
        return cls(0, zeros, (zeros,) * len(IOU_THRESHOLDS), zeros, 0, zeros, suppressed)

    @classmethod
    def from_images(
        cls,
        pred_boxes: Sequence[np.ndarray],
        pred_scores: Sequence[np.ndarray],
        gt_boxes: Sequence[np.ndarray],
        *,
        bins: int = 100,
    ) -> DetectionStats:
        """Summarise images.

        Args:
            pred_boxes: per image the predicted boxes, ``(P, 2*D)``.
            pred_scores: per image their scores in [0, 1], ``(P,)``.
            gt_boxes: per image the ground-truth boxes, ``(G, 2*D)``.
            bins: equal-width score bins on [0, 1].

        Raises:
            ValueError: different numbers of images, or a bad box or score array.
        """
        if not len(pred_boxes) == len(pred_scores) == len(gt_boxes):
            msg = (
                "pred_boxes, pred_scores and gt_boxes differ in images: "
                f"{len(pred_boxes)}, {len(pred_scores)}, {len(gt_boxes)}"
            )
            raise ValueError(msg)
        det = np.zeros(bins, dtype=np.int64)
        tp = np.zeros((len(IOU_THRESHOLDS), bins), dtype=np.int64)
        hit = np.zeros(bins, dtype=np.int64)
        fp = np.zeros(bins, dtype=np.int64)
        missed = 0
        for boxes, scores, truth in zip(pred_boxes, pred_scores, gt_boxes, strict=True):
            boxes, scores, truth = _check_image(boxes, scores, truth)
            index = np.minimum((scores * bins).astype(np.int64), bins - 1)
            det += np.bincount(index, minlength=bins)
            for t, matched in enumerate(match_detections(boxes, scores, truth)):
                tp[t] += np.bincount(index[matched], minlength=bins)
            hits = centre_hits(boxes, truth)
            fp += np.bincount(index[~hits.any(axis=1)], minlength=bins)
            for lesion in hits.T:
                if lesion.any():
                    hit[index[lesion].max()] += 1
                else:
                    missed += 1
        return cls(
            n=len(pred_boxes),
            det_hist=_ints(det),
            tp_hist=tuple(_ints(row) for row in tp),
            hit_hist=_ints(hit),
            missed=missed,
            fp_hist=_ints(fp),
            detected_images=sum(1 for scores in pred_scores if len(scores)),
        )

    @classmethod
    def from_image(
        cls, pred_boxes: np.ndarray, pred_scores: np.ndarray, gt_boxes: np.ndarray, *, bins: int
    ) -> DetectionStats:
        """Statistics of one image (see ``from_images``)."""
        return cls.from_images([pred_boxes], [pred_scores], [gt_boxes], bins=bins)

    @property
    def bins(self) -> int:
        return len(self.det_hist)

    @property
    def lesions(self) -> int:
        """Ground-truth lesions (boxes) on the images."""
        return sum(self.hit_hist) + self.missed

    @property
    def detections(self) -> int:
        return sum(self.det_hist)

    def with_min_cell(self, k: int) -> DetectionStats:
        """What may leave a site under a minimum cell size ``k``.

        Fewer than ``k`` images, or between 1 and ``k - 1`` detections (whose scores and
        matches the histograms would pin down): a suppressed cell without counts. Otherwise
        adjacent score
        bins are merged (``merge_sparse_bins``, low to high scores) until every non-empty
        bin of the detection histogram holds at least ``k`` detections, and every other
        histogram is merged into the same runs. Each of them counts detections or lesions
        through a detection of that bin (true positives and FROC false positives are
        detections; a lesion sits in the bin of its best hitting detection), so no non-empty
        bin of any histogram pins down fewer than ``k`` detections.
        """
        if k <= 1:
            return self
        if self.n < k:
            return DetectionStats.empty(self.bins, suppressed=True)
        if 0 < self.detections < k or 0 < self.detected_images < k:
            return self.withholding(DETECTIONS)
        (merged,) = merge_sparse_bins((self.det_hist,), k)
        starts = [b for b, count in enumerate(merged) if count]
        if not starts:  # no detection: nothing to coarsen
            return self

        def coarsen(hist: Sequence[int]) -> tuple[int, ...]:
            out = [0] * len(hist)
            for b, count in enumerate(hist):
                if count:
                    out[starts[max(bisect.bisect_right(starts, b) - 1, 0)]] += count
            return tuple(out)

        return DetectionStats(
            n=self.n,
            det_hist=tuple(merged),
            tp_hist=tuple(coarsen(row) for row in self.tp_hist),
            hit_hist=coarsen(self.hit_hist),
            missed=self.missed,
            fp_hist=coarsen(self.fp_hist),
        )

    def withholding(self, part: str) -> DetectionStats:
        """The statistics without what too few ``detections`` (or ``detected-images``,
        the images holding them: ten boxes on one image describe that image) decide:
        every histogram counts detections or lesions through them, so a suppressed cell
        without counts.

        Raises:
            ValueError: another part.
        """
        if part not in (DETECTIONS, DETECTED_IMAGES):
            raise ValueError(f"detection statistics have no part {part!r} to withhold")
        return DetectionStats.empty(self.bins, suppressed=True)

    def __add__(self, other: DetectionStats) -> DetectionStats:
        if self.bins != other.bins:
            msg = f"cannot merge histograms of {self.bins} and {other.bins} bins"
            raise ValueError(msg)
        return DetectionStats(
            n=self.n + other.n,
            det_hist=_sum(self.det_hist, other.det_hist),
            tp_hist=tuple(_sum(a, b) for a, b in zip(self.tp_hist, other.tp_hist, strict=True)),
            hit_hist=_sum(self.hit_hist, other.hit_hist),
            missed=self.missed + other.missed,
            fp_hist=_sum(self.fp_hist, other.fp_hist),
            detected_images=self.detected_images + other.detected_images,
        )


class DetectionStatsAccumulator:
    """Stateful accumulator over batches (MONAI style: ``append``, ``aggregate``, ``reset``)."""

    def __init__(self, *, bins: int = 100) -> None:
        self.bins = bins
        self._stats = DetectionStats.empty(bins)

    def append(
        self,
        pred_boxes: Sequence[np.ndarray],
        pred_scores: Sequence[np.ndarray],
        gt_boxes: Sequence[np.ndarray],
    ) -> None:
        batch = DetectionStats.from_images(pred_boxes, pred_scores, gt_boxes, bins=self.bins)
        self._stats = self._stats + batch

    def aggregate(self) -> DetectionStats:
        return self._stats

    def reset(self) -> None:
        self._stats = DetectionStats.empty(self.bins)


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise IoU of boxes ``(P, 2*D)`` and ``(G, 2*D)`` -> ``(P, G)`` (0 for empty unions)."""
    dims = a.shape[1] // 2
    lo = np.maximum(a[:, None, :dims], b[None, :, :dims])
    hi = np.minimum(a[:, None, dims:], b[None, :, dims:])
    inter = np.prod(np.clip(hi - lo, 0.0, None), axis=2)
    size_a = np.prod(a[:, dims:] - a[:, :dims], axis=1)
    size_b = np.prod(b[:, dims:] - b[:, :dims], axis=1)
    union = size_a[:, None] + size_b[None, :] - inter
    out: np.ndarray = np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)
    return out


def match_detections(
    pred_boxes: np.ndarray,
    pred_scores: np.ndarray,
    gt_boxes: np.ndarray,
    iou_thresholds: Sequence[float] = IOU_THRESHOLDS,
) -> np.ndarray:
    """COCO's greedy matching of one image: ``(T, P)``, True where detection ``p`` (input
    order) is a true positive at threshold ``t``.

    Detections in descending score order (stable for ties) each take the unmatched
    ground-truth box of highest IoU at least the threshold (the last of equal ones, as
    pycocotools does).
    """
    out = np.zeros((len(iou_thresholds), len(pred_boxes)), dtype=bool)
    if not len(pred_boxes) or not len(gt_boxes):
        return out
    order = np.argsort(-np.asarray(pred_scores, dtype=np.float64), kind="mergesort")
    ious = box_iou(pred_boxes[order], gt_boxes)
    candidates = np.flatnonzero(ious.max(axis=1) >= min(iou_thresholds))
    last = ious.shape[1] - 1
    for t, threshold in enumerate(iou_thresholds):
        floor = min(threshold, 1 - 1e-10)
        taken = np.zeros(ious.shape[1], dtype=bool)
        for d in candidates:
            row = np.where(taken | (ious[d] < floor), -1.0, ious[d])
            if row.max() < 0:
                continue
            g = last - int(np.argmax(row[::-1]))
            taken[g] = True
            out[t, order[d]] = True
    return out


def centre_hits(pred_boxes: np.ndarray, gt_boxes: np.ndarray) -> np.ndarray:
    """FROC hits of one image: ``(P, G)``, True where the centre of detection ``p`` lies in
    ground-truth box ``g`` (``x1 <= c < x2`` on every axis)."""
    if not len(pred_boxes) or not len(gt_boxes):
        return np.zeros((len(pred_boxes), len(gt_boxes)), dtype=bool)
    dims = pred_boxes.shape[1] // 2
    centre = (pred_boxes[:, None, :dims] + pred_boxes[:, None, dims:]) / 2
    inside = (centre >= gt_boxes[None, :, :dims]) & (centre < gt_boxes[None, :, dims:])
    out: np.ndarray = inside.all(axis=2)
    return out


def average_precision(
    tp_hist: Sequence[int], det_hist: Sequence[int], lesions: int
) -> float | None:
    """COCO's 101-point interpolated AP from one threshold's histograms; None without lesions.

    One precision-recall point per non-empty score bin, from the highest bin down.
    """
    if lesions <= 0:
        return None
    det = np.asarray(det_hist, dtype=np.float64)[::-1]
    tp = np.asarray(tp_hist, dtype=np.float64)[::-1]
    keep = det > 0
    if not keep.any():
        return 0.0
    tp_sum = np.cumsum(tp)[keep]
    det_sum = np.cumsum(det)[keep]
    recall = tp_sum / lesions
    precision = np.maximum.accumulate((tp_sum / det_sum)[::-1])[::-1]
    index = np.searchsorted(recall, _RECALL_POINTS, side="left")
    sampled = np.where(index < len(precision), precision[np.minimum(index, len(precision) - 1)], 0)
    return float(np.mean(sampled))


def froc_curve(
    hit_hist: Sequence[int], fp_hist: Sequence[int], lesions: int, images: int
) -> tuple[np.ndarray, np.ndarray]:
    """False positives per image and sensitivity at each observed score bin, from the
    lowest threshold up, then ``(0, 0)``: the layout of MONAI's ``compute_froc_curve_data``.

    Raises:
        ValueError: no lesion or no image.
    """
    if lesions <= 0 or images <= 0:
        msg = f"FROC needs lesions and images, got {lesions} lesions on {images} images"
        raise ValueError(msg)
    hits = np.asarray(hit_hist, dtype=np.int64)
    fps = np.asarray(fp_hist, dtype=np.int64)
    hits_above = np.cumsum(hits[::-1])[::-1]  # entries at or above each bin
    fps_above = np.cumsum(fps[::-1])[::-1]
    observed = (hits + fps) > 0
    fp_rate = np.append(fps_above[observed], 0) / float(images)
    sensitivity = np.append(hits_above[observed], 0) / float(lesions)
    return fp_rate, sensitivity


def froc_sensitivities(
    fp_rate: np.ndarray, sensitivity: np.ndarray, rates: Sequence[float] = FROC_RATES
) -> np.ndarray:
    """Sensitivity at each false-positive rate, linearly interpolated (MONAI's
    ``compute_froc_score`` without the mean)."""
    out: np.ndarray = np.interp(rates, fp_rate[::-1], sensitivity[::-1])
    return out


def detection_metrics(s: DetectionStats) -> dict[str, float | None]:
    """Every reported metric of one set of statistics (None where undefined).

    Keys: ``ap50``, ``ap50_95`` (mean AP over the IoU thresholds), ``froc_<rate>`` for each
    of ``FROC_RATES`` (``froc_0.125`` .. ``froc_8``), ``froc_mean`` (CPM), ``lesions`` and
    ``detections_per_image``.
    """
    lesions = s.lesions
    aps = [average_precision(row, s.det_hist, lesions) for row in s.tp_hist]
    defined = [a for a in aps if a is not None]
    out: dict[str, float | None] = {
        "ap50": aps[0],
        "ap50_95": float(np.mean(defined)) if defined else None,
    }
    if lesions and s.n:
        sens = froc_sensitivities(*froc_curve(s.hit_hist, s.fp_hist, lesions, s.n))
        out |= {f"froc_{r:g}": float(v) for r, v in zip(FROC_RATES, sens, strict=True)}
        out["froc_mean"] = float(np.mean(sens))
    else:
        out |= {f"froc_{r:g}": None for r in FROC_RATES}
        out["froc_mean"] = None
    out["lesions"] = float(lesions)
    out["detections_per_image"] = s.detections / s.n if s.n else None
    return {k: (None if v is None or math.isnan(v) else round(v, 6)) for k, v in out.items()}


def _check_image(
    boxes: np.ndarray, scores: np.ndarray, truth: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    boxes = np.asarray(boxes, dtype=np.float64)
    truth = np.asarray(truth, dtype=np.float64)
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    widths = sorted({a.shape[-1] for a in (boxes, truth) if a.size})
    if len(widths) > 1:
        msg = f"predicted and ground-truth boxes differ in values per box: {widths}"
        raise ValueError(msg)
    width = widths[0] if widths else 4
    checked = []
    for name, array in (("predicted", boxes), ("ground-truth", truth)):
        if not array.size:
            array = np.zeros((0, width))
        if array.ndim != 2 or width not in (4, 6):
            msg = f"{name} boxes must have shape (M, 4) or (M, 6), got {array.shape}"
            raise ValueError(msg)
        dims = width // 2
        if not np.isfinite(array).all() or (array[:, dims:] < array[:, :dims]).any():
            msg = f"{name} boxes must be finite with ends not before starts"
            raise ValueError(msg)
        checked.append(array)
    if len(scores) != len(checked[0]):
        msg = f"scores and predicted boxes differ in length: {len(scores)} vs {len(checked[0])}"
        raise ValueError(msg)
    if scores.size and (not np.isfinite(scores).all() or scores.min() < 0 or scores.max() > 1):
        msg = "scores must be finite probabilities in [0, 1]"
        raise ValueError(msg)
    return checked[0], scores, checked[1]


def _ints(values: np.ndarray) -> tuple[int, ...]:
    return tuple(int(v) for v in values)


def _sum(a: Sequence[int], b: Sequence[int]) -> tuple[int, ...]:
    return tuple(x + y for x, y in zip(a, b, strict=True))
