"""Detection metrics from mergeable statistics, checked against pycocotools and MONAI."""

from __future__ import annotations

import contextlib
import io

import numpy as np
import pytest

from radfed.metrics.detection import (
    FROC_RATES,
    IOU_THRESHOLDS,
    DetectionStats,
    DetectionStatsAccumulator,
    average_precision,
    box_iou,
    detection_metrics,
    froc_curve,
    froc_sensitivities,
    match_detections,
)
from radfed.metrics.pooling import pool

_SIZE = 64  # image side in pixels
_CELL = 16  # ground-truth boxes sit in distinct 16-pixel cells, so they never overlap

Images = tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray]]


def _images(seed: int, n: int, *, bins: int = 1000, first_bin: int = 0) -> Images:
    """Random images: 0-3 integer ground-truth boxes each, jittered detections of most of
    them (some twice), and stray false positives. Every detection scores the centre of a
    bin of its own, so no two detections tie."""
    rng = np.random.default_rng(seed)
    truth, preds = [], []
    for _ in range(n):
        cells = rng.choice((_SIZE // _CELL) ** 2, size=rng.integers(0, 4), replace=False)
        gt = []
        for cell in cells:
            x0, y0 = (cell % 4) * _CELL, (cell // 4) * _CELL
            x1, y1 = x0 + rng.integers(0, 4), y0 + rng.integers(0, 4)
            gt.append([x1, y1, x1 + rng.integers(5, 13), y1 + rng.integers(5, 13)])
        boxes = []
        for box in gt:
            for _ in range(rng.choice([0, 1, 1, 2])):
                boxes.append(np.asarray(box, dtype=np.float64) + rng.normal(0, 0.8, 4))
        for _ in range(rng.integers(0, 3)):
            x, y = rng.uniform(0, _SIZE - 10, 2)
            boxes.append(np.array([x, y, x + rng.uniform(3, 10), y + rng.uniform(3, 10)]))
        pred = np.array(boxes, dtype=np.float64).reshape(-1, 4)
        pred[:, 2:] = np.maximum(pred[:, 2:], pred[:, :2] + 0.5)
        truth.append(np.array(gt, dtype=np.float64).reshape(-1, 4))
        preds.append(np.clip(pred, 0, _SIZE - 0.01))
    count = sum(len(p) for p in preds)
    chosen = rng.choice(np.arange(first_bin, bins), size=count, replace=False)
    centres = ((chosen + 0.5) / bins).astype(np.float32).astype(np.float64)
    scores = np.split(centres, np.cumsum([len(p) for p in preds])[:-1])
    return preds, list(scores), truth


def _coco_ap(
    preds: list[np.ndarray], scores: list[np.ndarray], truth: list[np.ndarray]
) -> tuple[float, float]:
    """(AP@0.5, AP@0.5:0.95) of pycocotools' COCOeval: one category, no crowd, area all."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    def xywh(box: np.ndarray) -> list[float]:
        return [float(box[0]), float(box[1]), float(box[2] - box[0]), float(box[3] - box[1])]

    annotations: list[dict[str, object]] = []
    for image, boxes in enumerate(truth):
        for box in boxes:
            annotations.append(
                {
                    "id": len(annotations) + 1,  # COCO ids start at 1 (0 means unmatched)
                    "image_id": image + 1,
                    "category_id": 1,
                    "bbox": xywh(box),
                    "area": float((box[2] - box[0]) * (box[3] - box[1])),
                    "iscrowd": 0,
                }
            )
    detections = [
        {"image_id": image + 1, "category_id": 1, "bbox": xywh(box), "score": float(score)}
        for image, (boxes, image_scores) in enumerate(zip(preds, scores, strict=True))
        for box, score in zip(boxes, image_scores, strict=True)
    ]
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = {
            "images": [{"id": i + 1} for i in range(len(truth))],
            "annotations": annotations,
            "categories": [{"id": 1, "name": "lesion"}],
        }
        gt.createIndex()
        evaluation = COCOeval(gt, gt.loadRes(detections), "bbox")
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    return float(evaluation.stats[1]), float(evaluation.stats[0])


def _monai_froc(
    preds: list[np.ndarray], scores: list[np.ndarray], truth: list[np.ndarray]
) -> tuple[np.ndarray, np.ndarray, list[float], float]:
    """MONAI's FROC curve and sensitivities: the centre pixel of each detection looked up
    in a label mask of the (non-overlapping) ground-truth boxes."""
    from monai.metrics.froc import (
        compute_fp_tp_probs_nd,
        compute_froc_curve_data,
        compute_froc_score,
    )

    fp_all, tp_all, targets = [], [], 0
    for boxes, image_scores, gt in zip(preds, scores, truth, strict=True):
        mask = np.zeros((_SIZE, _SIZE), dtype=np.int64)
        for label, (x1, y1, x2, y2) in enumerate(gt.astype(int), start=1):
            mask[y1:y2, x1:x2] = label  # rows are y, columns x
        centres = (boxes[:, :2] + boxes[:, 2:]) / 2
        coords = np.floor(centres[:, ::-1]).astype(np.int64).reshape(-1, 2)  # (row, col)
        fp, tp, n = compute_fp_tp_probs_nd(image_scores.astype(np.float32), coords, mask)
        fp_all.append(fp)
        tp_all.append(tp)
        targets += n
    fps, sens = compute_froc_curve_data(
        np.concatenate(fp_all), np.concatenate(tp_all), targets, len(preds)
    )
    at_rates = [compute_froc_score(fps, sens, (rate,)) for rate in FROC_RATES]
    return fps, sens, at_rates, compute_froc_score(fps, sens, FROC_RATES)


def test_ap_matches_pycocotools_when_no_detections_tie() -> None:
    # Prepare
    preds, scores, truth = _images(0, 12)
    # Execute
    stats = DetectionStats.from_images(preds, scores, truth, bins=1000)
    ap50 = average_precision(stats.tp_hist[0], stats.det_hist, stats.lesions)
    ap50_95 = np.mean([average_precision(t, stats.det_hist, stats.lesions) for t in stats.tp_hist])
    # Assert
    coco50, coco50_95 = _coco_ap(preds, scores, truth)
    assert 0.2 < coco50 < 1 and coco50_95 < coco50  # a test set with misses and false hits
    assert ap50 == pytest.approx(coco50, abs=1e-9)
    assert ap50_95 == pytest.approx(coco50_95, abs=1e-9)
    metrics = detection_metrics(stats)
    assert metrics["ap50"] == pytest.approx(coco50, abs=1e-6)
    assert metrics["ap50_95"] == pytest.approx(coco50_95, abs=1e-6)


def test_froc_matches_monai_on_the_same_detections() -> None:
    # Prepare: scores above bin 0, and at least one missed lesion (MONAI drops its lowest
    # observed score as a threshold, the 0 of missed lesions; see the module docstring)
    preds, scores, truth = _images(1, 15, first_bin=1)
    # Execute
    stats = DetectionStats.from_images(preds, scores, truth, bins=1000)
    fps, sens = froc_curve(stats.hit_hist, stats.fp_hist, stats.lesions, stats.n)
    at_rates = froc_sensitivities(fps, sens)
    metrics = detection_metrics(stats)
    # Assert
    assert stats.missed > 0
    monai_fps, monai_sens, monai_at_rates, monai_mean = _monai_froc(preds, scores, truth)
    np.testing.assert_array_equal(fps, monai_fps)
    np.testing.assert_array_equal(sens, monai_sens)
    np.testing.assert_allclose(at_rates, monai_at_rates, rtol=0, atol=1e-9)
    assert 0 < metrics["froc_mean"] < 1  # type: ignore[operator]
    assert metrics["froc_mean"] == pytest.approx(monai_mean, abs=1e-6)
    for rate, value in zip(FROC_RATES, monai_at_rates, strict=True):
        assert metrics[f"froc_{rate:g}"] == pytest.approx(value, abs=1e-6)


def test_pooled_statistics_equal_statistics_of_pooled_images() -> None:
    # Prepare: two sites
    preds, scores, truth = _images(2, 20, bins=100)
    # Execute
    site_a = DetectionStats.from_images(preds[:7], scores[:7], truth[:7], bins=100)
    site_b = DetectionStats.from_images(preds[7:], scores[7:], truth[7:], bins=100)
    pooled = DetectionStats.from_images(preds, scores, truth, bins=100)
    # Assert: exactly equal, so every metric is the pooled one
    assert site_a + site_b == pooled
    assert pool([site_a, site_b], DetectionStats.empty(100)) == pooled
    assert detection_metrics(site_a + site_b) == detection_metrics(pooled)
    assert pooled.n == 20 and pooled.lesions == sum(len(t) for t in truth)


def test_binned_scores_equal_exact_values_on_scores_at_bin_edges() -> None:
    # Prepare: 10 bins, so many detections share a bin
    preds, scores, truth = _images(3, 10)
    edges = [np.floor(s * 10) / 10 for s in scores]
    # Execute
    binned = DetectionStats.from_images(preds, scores, truth, bins=10)
    on_edges = DetectionStats.from_images(preds, edges, truth, bins=10)
    # Assert: binning is rounding down to the bin's edge
    assert binned == on_edges
    assert sum(1 for h in binned.det_hist if h > 1) > 0


def test_three_d_boxes_with_one_slice_give_the_two_d_statistics() -> None:
    # Prepare: the same boxes lifted to 3-D with z in [0, 1)
    preds, scores, truth = _images(4, 8, bins=100)

    def lift(boxes: np.ndarray) -> np.ndarray:
        z0, z1 = np.zeros((len(boxes), 1)), np.ones((len(boxes), 1))
        return np.hstack([boxes[:, :2], z0, boxes[:, 2:], z1])

    # Execute
    flat = DetectionStats.from_images(preds, scores, truth, bins=100)
    deep = DetectionStats.from_images(
        [lift(p) for p in preds], scores, [lift(t) for t in truth], bins=100
    )
    # Assert
    assert deep == flat


def test_box_iou_in_three_d() -> None:
    # Prepare: a 2x2x2 cube and one shifted by 1 along z
    a = np.array([[0.0, 0, 0, 2, 2, 2]])
    b = np.array([[0.0, 0, 1, 2, 2, 3], [5.0, 5, 5, 6, 6, 6]])
    # Execute
    iou = box_iou(a, b)
    # Assert: overlap 4, union 12
    np.testing.assert_allclose(iou, [[4 / 12, 0.0]])


def test_matching_is_greedy_by_score_as_coco() -> None:
    # Prepare: one lesion, a lower-scoring better box listed first, a duplicate
    gt = np.array([[10.0, 10, 20, 20]])
    pred = np.array([[10.0, 10, 20, 20], [11.0, 10, 21, 20], [10.0, 10, 20, 20]])
    score = np.array([0.5, 0.9, 0.5])
    # Execute
    matched = match_detections(pred, score, gt)
    # Assert: the best-scoring box takes the lesion at IoU 0.5..0.8, none is left for the
    # rest; above its IoU (9/11) the first of the tied 0.5 boxes takes it
    iou = 9 / 11
    for t, threshold in enumerate(IOU_THRESHOLDS):
        expected = [False, True, False] if threshold <= iou else [True, False, False]
        assert matched[t].tolist() == expected


def test_hand_counted_image() -> None:
    # Prepare: two lesions; a hit on one (0.95), a false positive (0.45), none on the other
    gt = np.array([[0.0, 0, 10, 10], [30.0, 30, 40, 40]])
    pred = np.array([[0.0, 0, 10, 10], [50.0, 50, 60, 60]])
    # Execute
    stats = DetectionStats.from_image(pred, np.array([0.95, 0.45]), gt, bins=10)
    metrics = detection_metrics(stats)
    # Assert
    assert stats.det_hist[9] == 1 and stats.det_hist[4] == 1
    assert stats.tp_hist[-1][9] == 1 and stats.hit_hist[9] == 1
    assert stats.fp_hist[4] == 1 and stats.missed == 1
    assert metrics["ap50"] == pytest.approx(51 / 101)  # precision 1 up to recall 0.5
    assert metrics["ap50_95"] == metrics["ap50"]
    assert metrics["froc_0.125"] == 0.5 and metrics["froc_8"] == 0.5
    assert metrics["lesions"] == 2 and metrics["detections_per_image"] == 2


def test_with_min_cell_suppresses_small_cells_and_coarsens_sparse_bins() -> None:
    # Prepare
    preds, scores, truth = _images(5, 30, bins=100)
    stats = DetectionStats.from_images(preds, scores, truth, bins=100)
    # Execute
    small = stats.with_min_cell(31)
    coarse = stats.with_min_cell(10)
    # Assert: too few images: nothing but the flag
    assert small.suppressed and small == DetectionStats.empty(100, suppressed=True)
    assert pool([stats, small], DetectionStats.empty(100)) == stats
    # every non-empty bin of every histogram holds at least k detections
    assert not coarse.suppressed and stats.with_min_cell(1) == stats
    for bin_, count in enumerate(coarse.det_hist):
        assert count == 0 or count >= 10
        for hist in (*coarse.tp_hist, coarse.hit_hist, coarse.fp_hist):
            assert hist[bin_] == 0 or count >= 10
    # totals are kept, and runs only move counts down to lower bins
    assert (coarse.n, coarse.missed, coarse.lesions) == (stats.n, stats.missed, stats.lesions)
    for before, after in zip(
        (stats.det_hist, *stats.tp_hist, stats.hit_hist, stats.fp_hist),
        (coarse.det_hist, *coarse.tp_hist, coarse.hit_hist, coarse.fp_hist),
        strict=True,
    ):
        assert sum(after) == sum(before)
        assert all(np.cumsum(after[::-1]) <= np.cumsum(before[::-1]))
    assert sum(1 for c in stats.det_hist if 0 < c < 10) > 0  # coarsening had work to do


def test_undefined_metrics_are_none() -> None:
    # Prepare: images without lesions, one with a detection
    empty = np.zeros((0, 4))
    stats = DetectionStats.from_images(
        [empty, np.array([[1.0, 1, 5, 5]])], [np.zeros(0), np.array([0.7])], [empty, empty]
    )
    # Execute
    metrics = detection_metrics(stats)
    nothing = detection_metrics(DetectionStats.empty(100))
    # Assert
    assert metrics["ap50"] is None and metrics["froc_mean"] is None
    assert metrics["lesions"] == 0 and metrics["detections_per_image"] == 0.5
    assert nothing["detections_per_image"] is None and nothing["ap50_95"] is None


def test_accumulator_over_batches_equals_one_pass() -> None:
    preds, scores, truth = _images(6, 9, bins=100)
    acc = DetectionStatsAccumulator(bins=100)
    for start in range(0, 9, 4):
        end = start + 4
        acc.append(preds[start:end], scores[start:end], truth[start:end])
    assert acc.aggregate() == DetectionStats.from_images(preds, scores, truth, bins=100)
    acc.reset()
    assert acc.aggregate().n == 0


@pytest.mark.parametrize(
    ("pred", "score", "gt", "message"),
    [
        (np.zeros((1, 4)), np.array([1.5]), np.zeros((0, 4)), "probabilities"),
        (np.zeros((2, 4)), np.array([0.5]), np.zeros((0, 4)), "differ in length"),
        (np.array([[5.0, 5, 1, 1]]), np.array([0.5]), np.zeros((0, 4)), "ends"),
        (np.zeros((1, 4)), np.array([0.5]), np.zeros((1, 6)), "values per box"),
        (np.zeros((1, 5)), np.array([0.5]), np.zeros((0, 4)), "shape"),
    ],
)
def test_bad_inputs_are_refused(
    pred: np.ndarray, score: np.ndarray, gt: np.ndarray, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        DetectionStats.from_image(pred, score, gt, bins=10)


def test_a_cell_with_fewer_than_k_detections_leaves_suppressed() -> None:
    from radfed.metrics.detection import DetectionStats

    # Prepare: 12 images, three detections in all
    boxes = [np.array([[1.0, 1.0, 5.0, 5.0]], dtype=np.float32)] * 3 + [
        np.zeros((0, 4), dtype=np.float32)
    ] * 9
    scores = [np.array([0.9], dtype=np.float32)] * 3 + [np.zeros(0, dtype=np.float32)] * 9
    truth = [np.array([[1.0, 1.0, 5.0, 5.0]], dtype=np.float32)] * 12
    stats = DetectionStats.from_images(boxes, scores, truth, bins=100)
    # Execute / Assert: enough images, too few detections for k=10
    assert stats.n == 12 and stats.detections == 3
    sent = stats.with_min_cell(10)
    assert sent.suppressed and sent.n == 0
    assert not stats.with_min_cell(3).suppressed
