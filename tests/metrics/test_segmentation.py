"""Segmentation metrics from mergeable statistics, checked against MONAI and numpy."""

from __future__ import annotations

import contextlib
import math

import numpy as np
import pytest
import torch
from monai.metrics import DiceMetric, HausdorffDistanceMetric, MeanIoU

from radfed.metrics.pooling import pool
from radfed.metrics.segmentation import (
    CaseKind,
    CaseMetrics,
    SegmentationStats,
    case_metrics,
    hd95_range,
    histogram_quantile,
    segmentation_metrics,
)


def _masks(seed: int, n: int, size: int, dims: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random blob-like masks ``(n, 1, size, ...)``: the truth and a perturbed prediction,
    with an empty truth in case 0 and an empty prediction in case 1."""
    g = torch.Generator().manual_seed(seed)
    shape = (n, 1) + (size,) * dims
    smooth = torch.nn.functional.avg_pool2d if dims == 2 else torch.nn.functional.avg_pool3d
    noise = smooth(torch.rand(shape, generator=g), 3, stride=1, padding=1)
    truth = (noise > 0.6).to(torch.uint8)
    pred = ((noise + 0.15 * torch.rand(shape, generator=g)) > 0.65).to(torch.uint8)
    truth[0], pred[1] = 0, 0
    return pred, truth


def _one_hot(mask: torch.Tensor) -> torch.Tensor:
    return torch.cat([mask == 0, mask != 0], dim=1).float()


@pytest.mark.filterwarnings("ignore:.*always_return_as_numpy:FutureWarning")
@pytest.mark.parametrize(("dims", "size"), [(2, 24), (3, 12)])
def test_per_case_values_equal_monai_metric_classes(dims: int, size: int) -> None:
    # Prepare
    pred, truth = _masks(dims, 8, size, dims)
    reference = {
        "dice": DiceMetric(include_background=False, reduction="none", ignore_empty=True),
        "iou": MeanIoU(include_background=False, reduction="none", ignore_empty=True),
        "hd95": HausdorffDistanceMetric(include_background=False, percentile=95, reduction="none"),
    }
    # Execute
    cases = case_metrics(pred, truth)
    # Assert
    assert len(cases) == 8
    both = cases.kind == CaseKind.SEGMENTED
    assert both.sum() >= 5
    for name, metric in reference.items():
        with pytest.warns(UserWarning) if name == "hd95" else contextlib.nullcontext():
            result = torch.as_tensor(metric(_one_hot(pred), _one_hot(truth)))
        expected = result[:, 0].double().numpy()
        ours = getattr(cases, name)
        defined = ~np.isnan(ours)
        assert (defined == (both if name == "hd95" else truth.flatten(1).any(1).numpy())).all()
        np.testing.assert_allclose(ours[defined], expected[defined], rtol=0, atol=1e-6)
    # Dice and IoU also from the voxel counts (2|A∩B| / (|A|+|B|), |A∩B| / |A∪B|)
    fg = ~np.isnan(cases.dice)
    tp, fp, fn = cases.tp[fg], cases.fp[fg], cases.fn[fg]
    np.testing.assert_allclose(cases.dice[fg], 2 * tp / (2 * tp + fp + fn), atol=1e-6)
    np.testing.assert_allclose(cases.iou[fg], tp / (tp + fp + fn), atol=1e-6)


def test_hd95_of_two_points_is_their_distance() -> None:
    # Prepare: one foreground pixel each, 3 rows and 4 columns apart
    pred, truth = torch.zeros(1, 1, 16, 16), torch.zeros(1, 1, 16, 16)
    pred[0, 0, 2, 2], truth[0, 0, 5, 6] = 1, 1
    # Execute
    cases = case_metrics(pred, truth)
    # Assert
    assert cases.hd95[0] == pytest.approx(5.0)
    assert cases.dice[0] == 0.0 and cases.kind[0] == CaseKind.SEGMENTED


def test_empty_masks_are_counted_by_kind_and_kept_out_of_undefined_metrics() -> None:
    # Prepare: neither empty-truth case has a Dice; a missed case has Dice 0 but no HD95
    pred, truth = torch.zeros(4, 1, 16, 16), torch.zeros(4, 1, 16, 16)
    pred[1, 0, 4:8, 4:8] = 1  # false positive
    truth[2, 0, 4:8, 4:8] = 1  # missed
    pred[3, 0, 4:8, 4:8], truth[3, 0, 4:9, 4:8] = 1, 1  # segmented
    # Execute
    cases = case_metrics(pred, truth)
    stats = SegmentationStats.from_cases(cases, bins=10, hd95_max=hd95_range(16, 2))
    metrics = segmentation_metrics(stats)
    # Assert
    assert [CaseKind(int(k)).label for k in cases.kind] == [
        "true-negative",
        "false-positive",
        "missed",
        "segmented",
    ]
    assert np.isnan(cases.dice[:2]).all() and cases.dice[2] == 0.0
    assert cases.dice[3] == pytest.approx(2 * 16 / (16 + 20))
    assert np.isnan(cases.hd95[:3]).all() and cases.hd95[3] == pytest.approx(1.0)
    assert (stats.true_negative, stats.false_positive, stats.missed, stats.segmented) == (
        1,
        1,
        1,
        1,
    )
    assert stats.n == 4 and sum(stats.dice_hist) == 2 and sum(stats.hd95_hist) == 1
    assert (stats.tp_voxels, stats.fp_voxels, stats.fn_voxels) == (16, 16, 16 + 4)
    assert metrics["dice_mean"] == pytest.approx((0 + 32 / 36) / 2, abs=1e-6)
    assert metrics["hd95_mean"] == pytest.approx(1.0)
    assert metrics["fp_case_rate"] == 0.5 and metrics["miss_rate"] == 0.5
    assert metrics["global_dice"] == pytest.approx(32 / (32 + 16 + 20), abs=1e-6)
    assert metrics["dice_ge_half"] == 0.5


def _synthetic_cases(seed: int, n: int, hd95_max: float) -> CaseMetrics:
    """Per-case values without masks: kinds at random, Dice from a beta distribution."""
    rng = np.random.default_rng(seed)
    kind = rng.choice(4, size=n, p=[0.3, 0.1, 0.1, 0.5]).astype(np.int8)
    dice = np.where(kind == CaseKind.SEGMENTED, rng.beta(4 + seed, 2, n), np.nan)
    dice[kind == CaseKind.MISSED] = 0.0
    iou = dice / (2 - dice)
    hd95 = np.where(kind == CaseKind.SEGMENTED, rng.gamma(2.0, 3.0 + seed, n), np.nan)
    hd95 = np.minimum(hd95, hd95_max)
    tp = np.where(kind == CaseKind.SEGMENTED, rng.integers(1, 50, n), 0)
    fp = np.where(np.isin(kind, (1, 3)), rng.integers(1, 20, n), 0)
    fn = np.where(np.isin(kind, (2, 3)), rng.integers(1, 20, n), 0)
    return CaseMetrics(kind, dice, iou, hd95, tp, fp, fn)


def test_pooled_statistics_give_exact_means_and_histogram_medians() -> None:
    # Prepare: two sites with different distributions
    top = hd95_range(64, 2)
    site_a, site_b = _synthetic_cases(1, 120, top), _synthetic_cases(2, 70, top)
    pooled_cases = CaseMetrics.concat([site_a, site_b])
    # Execute
    merged = pool(
        [SegmentationStats.from_cases(c, bins=100, hd95_max=top) for c in (site_a, site_b)],
        SegmentationStats.empty(100, top),
    )
    metrics = segmentation_metrics(merged)
    # Assert: histograms and counts equal those of the pooled cases, sums to rounding
    pooled = SegmentationStats.from_cases(pooled_cases, bins=100, hd95_max=top)
    assert merged.dice_hist == pooled.dice_hist and merged.hd95_hist == pooled.hd95_hist
    assert merged.n == 190 and merged.segmented == pooled.segmented
    assert merged.dice_sum == pytest.approx(pooled.dice_sum, rel=1e-12)
    for name, width in (("dice", 0.01), ("iou", 0.01), ("hd95", top / 100)):
        values = getattr(pooled_cases, name)
        values = values[~np.isnan(values)]
        assert metrics[f"{name}_mean"] == pytest.approx(values.mean(), abs=1e-6)
        for key, q in (("median", 0.5), ("q1", 0.25), ("q3", 0.75)):
            estimate = metrics[f"{name}_{key}"]
            assert estimate is not None
            assert abs(estimate - np.quantile(values, q)) <= width / 2 + 1e-6
    fg = pooled_cases.dice[~np.isnan(pooled_cases.dice)]
    assert metrics["dice_ge_half"] == pytest.approx(np.mean(fg >= 0.5), abs=1e-6)


@pytest.mark.parametrize("seed", range(5))
def test_histogram_quantile_is_within_half_a_bin_of_numpy(seed: int) -> None:
    # Prepare
    rng = np.random.default_rng(seed)
    values = rng.uniform(2.0, 7.0, rng.integers(1, 40)) ** (1 + seed % 2)
    low, high, bins = 0.0, 50.0, 37
    hist = np.bincount(np.minimum((values / high * bins).astype(int), bins - 1), minlength=bins)
    for q in (0.0, 0.1, 0.25, 0.5, 0.9, 1.0):
        # Execute
        estimate = histogram_quantile(hist, q, low=low, high=high)
        # Assert
        assert estimate is not None
        assert abs(estimate - np.quantile(values, q)) <= (high - low) / bins / 2 + 1e-9
    assert histogram_quantile([0] * bins, 0.5, low=low, high=high) is None


def test_min_cell_suppresses_small_cells_and_merges_sparse_bins() -> None:
    # Prepare
    top = hd95_range(32, 3)
    stats = SegmentationStats.from_cases(_synthetic_cases(3, 60, top), bins=50, hd95_max=top)
    # Execute
    small = SegmentationStats.from_cases(_synthetic_cases(4, 4, top), bins=50, hd95_max=top)
    coarse = stats.with_min_cell(5)
    # Assert: fewer than k cases -> nothing but the flag; pooled values leave it out
    assert small.with_min_cell(5).suppressed and small.with_min_cell(5).n == 0
    assert small.with_min_cell(5).dice_sum == 0.0
    merged = pool([coarse, small.with_min_cell(5)], SegmentationStats.empty(50, top))
    assert merged == coarse
    # no non-empty bin pins down fewer than k cases; counts and sums stay
    for name in ("dice_hist", "iou_hist", "hd95_hist"):
        hist = getattr(coarse, name)
        assert all(v == 0 or v >= 5 for v in hist)
        assert sum(hist) == sum(getattr(stats, name))
        assert hist != getattr(stats, name)
    assert (coarse.n, coarse.dice_sum, coarse.hd95_sum) == (stats.n, stats.dice_sum, stats.hd95_sum)
    assert stats.with_min_cell(1) is stats


def test_min_cell_withholds_a_metric_of_fewer_than_k_cases() -> None:
    # Prepare: 12 cases, of which only 3 have both masks non-empty
    kind = np.array([0] * 8 + [2] + [3] * 3, dtype=np.int8)
    dice = np.array([np.nan] * 8 + [0.0, 0.5, 0.7, 0.9])
    hd95 = np.array([np.nan] * 9 + [4.0, 2.0, 1.0])
    voxels = np.ones(12, dtype=np.int64)
    cases = CaseMetrics(kind, dice, dice / (2 - dice), hd95, voxels, voxels, voxels)
    stats = SegmentationStats.from_cases(cases, bins=10, hd95_max=hd95_range(16, 2))
    # Execute
    out = stats.with_min_cell(4)
    kept = stats.with_min_cell(3)
    # Assert: HD95 (3 cases) withheld, and the Dice of the 4 cases with foreground too: the
    # missed case adds a known 0, so the sums would be the 3 segmented cases'; every case
    # counted, the voxel sums withheld for the whole cell
    assert out.hd95_withheld == 3 and sum(out.hd95_hist) == 0 and out.hd95_sum == 0.0
    assert out.dice_withheld == 4 and sum(out.dice_hist) == 0 and out.dice_sum == 0.0
    assert out.voxels_withheld == 12 and out.tp_voxels == out.fn_voxels == 0
    assert out.n == 12 and out.segmented == 3
    metrics = segmentation_metrics(out)
    assert metrics["hd95_mean"] is None and metrics["dice_mean"] is None
    assert metrics["voxel_cases"] == 0 and metrics["global_dice"] is None
    # with k = 3 both leave (Dice in one bin); the voxel sums not (one missed case)
    assert kept.dice_withheld == 0 and sum(kept.dice_hist) == 4
    assert segmentation_metrics(kept)["dice_mean"] == pytest.approx(0.525)
    assert kept.hd95_withheld == 0 and kept.voxels_withheld == 12


def test_merging_statistics_of_other_bins_fails_and_empty_metrics_are_none() -> None:
    # Prepare
    a = SegmentationStats.empty(10, hd95_range(32, 2))
    # Execute / Assert
    with pytest.raises(ValueError, match="cannot merge"):
        _ = a + SegmentationStats.empty(20, hd95_range(32, 2))
    metrics = segmentation_metrics(a)
    assert metrics["cases"] == 0 and metrics["dice_mean"] is None
    assert metrics["global_dice"] is None and metrics["hd95_median"] is None
    assert not any(isinstance(v, float) and math.isnan(v) for v in metrics.values())


def test_shapes_must_match() -> None:
    with pytest.raises(ValueError, match=r"\(B, 1, H, W\[, D\]\)"):
        case_metrics(torch.zeros(1, 1, 8, 8), torch.zeros(1, 1, 8, 9))
