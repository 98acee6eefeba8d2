"""Binary segmentation metrics (Dice, IoU, HD95) from mergeable sufficient statistics.

A site computes each case's Dice, IoU and 95th-percentile Hausdorff distance of the
foreground with MONAI, sorts the case into one of four kinds by which masks are empty, and
summarises the values as histograms plus exact sums; the server adds these over sites.
Means are exact (from the sums); medians and quartiles come from the histograms, within
half a bin width of numpy's on histograms that were not coarsened for privacy.

Empty masks (``CaseKind``):

- ground truth and prediction empty: a correct negative (``true-negative``); no Dice,
  IoU or HD95 (each is undefined, not 1);
- ground truth empty, prediction not: a false-positive case; no Dice, IoU or HD95;
- prediction empty, ground truth not: ``missed``; Dice and IoU 0, HD95 undefined;
- both non-empty: ``segmented``; Dice, IoU and HD95 defined.

So the Dice and IoU histograms hold the cases with foreground in the ground truth
(``missed`` + ``segmented``), the HD95 histogram the ``segmented`` cases, and the counts of
the four kinds account for every case. HD95 is in pixels (voxels) of the model grid,
binned linearly on ``[0, S * sqrt(dims)]``: no two pixels of an ``S``-wide grid are
further apart, so no value falls outside.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from radfed.metrics.histograms import merge_sparse_bins

__all__ = [
    "FALSE_POSITIVE",
    "FOREGROUND",
    "MISSED",
    "SEGMENTED",
    "CaseKind",
    "CaseMetrics",
    "SegmentationStats",
    "case_metrics",
    "hd95_range",
    "histogram_quantile",
    "segmentation_metrics",
]

#: The sub-populations of a cell whose parts of the statistics it may withhold
#: (``SegmentationStats.withholding``): the cases with ground-truth foreground, and the
#: cases of three kinds.
FOREGROUND = "foreground"
SEGMENTED = "segmented"
MISSED = "missed"
FALSE_POSITIVE = "false-positive"


class CaseKind(enum.IntEnum):
    """Which of a case's masks hold foreground (ground truth, prediction)."""

    TRUE_NEGATIVE = 0  # neither
    FALSE_POSITIVE = 1  # prediction only
    MISSED = 2  # ground truth only
    SEGMENTED = 3  # both

    @property
    def label(self) -> str:
        """The kebab-case name used in tables (``true-negative``)."""
        return self.name.lower().replace("_", "-")


def hd95_range(image_size: int, spatial_dims: int) -> float:
    """The top of the HD95 histogram: the diagonal ``S * sqrt(dims)`` of the model grid."""
    return float(image_size) * math.sqrt(spatial_dims)


@dataclass(frozen=True)
class CaseMetrics:
    """Per-case values of a set of cases, each of shape ``(N,)``; they never leave the site.

    Attributes:
        kind: ``CaseKind`` codes (int8).
        dice, iou: float64 overlap of the foreground; NaN where the ground truth is empty.
        hd95: float64 95th-percentile symmetric Hausdorff distance in pixels; NaN unless
            both masks hold foreground.
        tp, fp, fn: int64 voxel counts (true positive, false positive, false negative).
    """

    kind: np.ndarray
    dice: np.ndarray
    iou: np.ndarray
    hd95: np.ndarray
    tp: np.ndarray
    fp: np.ndarray
    fn: np.ndarray

    def __len__(self) -> int:
        return int(self.kind.shape[0])

    @classmethod
    def empty(cls) -> CaseMetrics:
        floats, ints = np.zeros(0, dtype=np.float64), np.zeros(0, dtype=np.int64)
        return cls(np.zeros(0, dtype=np.int8), floats, floats, floats, ints, ints, ints)

    def select(self, index: Sequence[int] | np.ndarray) -> CaseMetrics:
        """The cases at positions ``index``."""
        chosen = np.asarray(index, dtype=np.int64)
        return CaseMetrics(
            *(getattr(self, f)[chosen] for f in ("kind", "dice", "iou", "hd95", "tp", "fp", "fn"))
        )

    @staticmethod
    def concat(parts: Iterable[CaseMetrics]) -> CaseMetrics:
        """The cases of all parts, in order."""
        items = [CaseMetrics.empty(), *parts]
        fields = ("kind", "dice", "iou", "hd95", "tp", "fp", "fn")
        return CaseMetrics(*(np.concatenate([getattr(p, f) for p in items]) for f in fields))


def case_metrics(prediction: torch.Tensor, target: torch.Tensor) -> CaseMetrics:
    """Per-case Dice, IoU and HD95 of binary masks, computed with MONAI.

    Args:
        prediction: predicted masks, shape ``(B, 1, H, W[, D])``, nonzero = foreground.
        target: ground-truth masks of the same shape.

    Raises:
        ValueError: the shapes differ or are not ``(B, 1, spatial...)``.
    """
    from monai.metrics import compute_dice, compute_hausdorff_distance, compute_iou

    if prediction.shape != target.shape or prediction.ndim not in (4, 5):
        msg = (
            "prediction and target must both be (B, 1, H, W[, D]), got "
            f"{tuple(prediction.shape)} and {tuple(target.shape)}"
        )
        raise ValueError(msg)
    if prediction.shape[1] != 1:
        msg = f"masks must have one channel, got {prediction.shape[1]}"
        raise ValueError(msg)
    pred, truth = prediction.detach().cpu() != 0, target.detach().cpu() != 0
    axes = tuple(range(1, pred.ndim))
    tp = (pred & truth).sum(axes).to(torch.int64)
    predicted, actual = pred.sum(axes).to(torch.int64), truth.sum(axes).to(torch.int64)
    kind = torch.where(
        actual == 0,
        torch.where(predicted == 0, CaseKind.TRUE_NEGATIVE, CaseKind.FALSE_POSITIVE),
        torch.where(predicted == 0, CaseKind.MISSED, CaseKind.SEGMENTED),
    ).to(torch.int8)
    pred_hot = torch.cat([~pred, pred], dim=1).float()
    truth_hot = torch.cat([~truth, truth], dim=1).float()
    dice = compute_dice(pred_hot, truth_hot, include_background=False, ignore_empty=True)[:, 0]
    iou = compute_iou(pred_hot, truth_hot, include_background=False, ignore_empty=True)[:, 0]
    hd95 = torch.full((len(kind),), float("nan"), dtype=torch.float64)
    both = kind == CaseKind.SEGMENTED
    if bool(both.any()):  # empty masks would make MONAI warn and return inf
        with warnings.catch_warnings():  # MONAI 1.6 warns about its own internal call
            warnings.filterwarnings("ignore", message=".*always_return_as_numpy")
            distances = compute_hausdorff_distance(
                pred_hot[both], truth_hot[both], include_background=False, percentile=95
            )
        hd95[both] = distances[:, 0].double()
    return CaseMetrics(
        kind=kind.numpy(),
        dice=dice.double().numpy(),
        iou=iou.double().numpy(),
        hd95=hd95.numpy(),
        tp=tp.numpy(),
        fp=(predicted - tp).numpy(),
        fn=(actual - tp).numpy(),
    )


@dataclass(frozen=True, kw_only=True)
class SegmentationStats:
    """Sufficient statistics of binary segmentations; adding two gives the pooled statistics.

    Attributes:
        true_negative, false_positive, missed, segmented: cases of each ``CaseKind``.
        dice_hist, iou_hist: per-case Dice and IoU of the cases with ground-truth
            foreground, ``B`` equal-width bins on [0, 1].
        hd95_hist: per-case HD95 of the ``segmented`` cases, ``B`` equal-width bins on
            ``[0, hd95_max]`` pixels.
        dice_sum, iou_sum, hd95_sum: exact sums of the values in the histograms.
        dice_hits: cases in ``dice_hist`` whose Dice is at least 0.5.
        tp_voxels, fp_voxels, fn_voxels: voxel counts summed over all cases (global Dice).
        hd95_max: the top of the HD95 range (``hd95_range``); set by the run config, not sent.
        dice_withheld: cases with ground-truth foreground left out of the Dice and IoU
            histograms, sums and ``dice_hits`` (``withholding``: too few of them, or of the
            segmented cases, in the cell or in a combination of the site's cells).
        hd95_withheld: ``segmented`` cases left out of the HD95 histogram and sum likewise.
        voxels_withheld: cases whose voxel counts were left out (a cell's voxel sums leave
            whole or not at all; ``withholding``).
        suppressed: the cell held fewer cases than the site's minimum cell size; every
            count is zero and the cell is left out of pooled values.
    """

    true_negative: int = 0
    false_positive: int = 0
    missed: int = 0
    segmented: int = 0
    dice_hist: tuple[int, ...]
    iou_hist: tuple[int, ...]
    hd95_hist: tuple[int, ...]
    dice_sum: float = 0.0
    iou_sum: float = 0.0
    hd95_sum: float = 0.0
    dice_hits: int = 0
    tp_voxels: int = 0
    fp_voxels: int = 0
    fn_voxels: int = 0
    hd95_max: float
    dice_withheld: int = 0
    hd95_withheld: int = 0
    voxels_withheld: int = 0
    suppressed: bool = False

    @classmethod
    def empty(cls, bins: int, hd95_max: float, *, suppressed: bool = False) -> SegmentationStats:
        """No case: the identity of ``+``."""
        zeros = (0,) * bins
        return cls(
            dice_hist=zeros,
            iou_hist=zeros,
            hd95_hist=zeros,
            hd95_max=hd95_max,
            suppressed=suppressed,
        )

    @classmethod
    def from_cases(cls, cases: CaseMetrics, *, bins: int, hd95_max: float) -> SegmentationStats:
        """Summarise per-case values (see ``case_metrics``)."""
        kind = np.asarray(cases.kind)
        foreground = (kind == CaseKind.MISSED) | (kind == CaseKind.SEGMENTED)
        both = kind == CaseKind.SEGMENTED
        dice, iou, hd95 = cases.dice[foreground], cases.iou[foreground], cases.hd95[both]
        for name, values in (("dice", dice), ("iou", iou), ("hd95", hd95)):
            if values.size and not np.isfinite(values).all():
                msg = f"{name} must be finite for every case it is defined for"
                raise ValueError(msg)
        return cls(
            true_negative=int(np.sum(kind == CaseKind.TRUE_NEGATIVE)),
            false_positive=int(np.sum(kind == CaseKind.FALSE_POSITIVE)),
            missed=int(np.sum(kind == CaseKind.MISSED)),
            segmented=int(np.sum(both)),
            dice_hist=_histogram(dice, bins, 1.0),
            iou_hist=_histogram(iou, bins, 1.0),
            hd95_hist=_histogram(hd95, bins, hd95_max),
            dice_sum=math.fsum(dice.tolist()),
            iou_sum=math.fsum(iou.tolist()),
            hd95_sum=math.fsum(hd95.tolist()),
            dice_hits=int(np.sum(dice >= 0.5)),
            tp_voxels=int(np.sum(cases.tp)),
            fp_voxels=int(np.sum(cases.fp)),
            fn_voxels=int(np.sum(cases.fn)),
            hd95_max=hd95_max,
        )

    @property
    def n(self) -> int:
        return self.true_negative + self.false_positive + self.missed + self.segmented

    @property
    def bins(self) -> int:
        return len(self.dice_hist)

    def with_min_cell(self, k: int) -> SegmentationStats:
        """What may leave a site under a minimum cell size ``k``.

        Fewer than ``k`` cases: a suppressed cell without counts. Otherwise the case counts
        stay, and each part over a sub-population of the cases (``withholding``) is
        withheld where that sub-population holds 1 to ``k - 1`` cases. Each kept histogram
        has adjacent bins merged (low to high, stored in the run's first bin) until every
        non-empty bin holds at least ``k`` cases.
        """
        if k <= 1:
            return self
        if self.n < k:
            return SegmentationStats.empty(self.bins, self.hd95_max, suppressed=True)
        stats = self
        for part, cases in self.part_cases().items():
            if 0 < cases < k:
                stats = stats.withholding(part)
        (dice_hist,) = merge_sparse_bins((stats.dice_hist,), k)
        (iou_hist,) = merge_sparse_bins((stats.iou_hist,), k)
        (hd95_hist,) = merge_sparse_bins((stats.hd95_hist,), k)
        return dataclasses.replace(
            stats, dice_hist=dice_hist, iou_hist=iou_hist, hd95_hist=hd95_hist
        )

    def part_cases(self) -> dict[str, int]:
        """The cases of each sub-population ``withholding`` knows."""
        return {
            FOREGROUND: self.missed + self.segmented,
            SEGMENTED: self.segmented,
            MISSED: self.missed,
            FALSE_POSITIVE: self.false_positive,
        }

    def withholding(self, part: str) -> SegmentationStats:
        """The statistics without what a sub-population of fewer than ``k`` cases decides.

        - ``foreground`` (the cases with ground-truth foreground): their Dice and IoU
          histograms, sums and ``dice_hits`` (counted in ``dice_withheld``);
        - ``segmented`` (both masks hold foreground): the same, since a missed case adds
          a known 0 to the Dice sums (they are the segmented cases' sums), and their HD95
          histogram and sum (counted in ``hd95_withheld``);
        - ``missed``, ``false-positive``: nothing but the voxel sums, which every part
          takes along: ``fn_voxels`` adds up the missed cases' lesion volumes and
          ``fp_voxels`` the false-positive cases' predicted volumes, beside what the
          segmented cases add (which their Dice can pin down: a Dice of 1 adds none).
          The voxel sums leave whole or not at all (counted in ``voxels_withheld``).

        Raises:
            ValueError: another part.
        """
        if part not in (FOREGROUND, SEGMENTED, MISSED, FALSE_POSITIVE):
            raise ValueError(f"segmentation statistics have no part {part!r} to withhold")
        zeros = (0,) * self.bins
        out = dataclasses.replace(
            self, tp_voxels=0, fp_voxels=0, fn_voxels=0, voxels_withheld=self.n
        )
        if part in (FOREGROUND, SEGMENTED):
            out = dataclasses.replace(
                out,
                dice_hist=zeros,
                iou_hist=zeros,
                dice_sum=0.0,
                iou_sum=0.0,
                dice_hits=0,
                dice_withheld=self.dice_withheld + sum(self.dice_hist),
            )
        if part == SEGMENTED:
            out = dataclasses.replace(
                out,
                hd95_hist=zeros,
                hd95_sum=0.0,
                hd95_withheld=self.hd95_withheld + sum(self.hd95_hist),
            )
        return out

    def __add__(self, other: SegmentationStats) -> SegmentationStats:
        if self.bins != other.bins or self.hd95_max != other.hd95_max:
            msg = (
                f"cannot merge statistics of {self.bins} bins up to HD95 {self.hd95_max} "
                f"with {other.bins} bins up to {other.hd95_max}"
            )
            raise ValueError(msg)

        def add(a: tuple[int, ...], b: tuple[int, ...]) -> tuple[int, ...]:
            return tuple(x + y for x, y in zip(a, b, strict=True))

        return SegmentationStats(
            true_negative=self.true_negative + other.true_negative,
            false_positive=self.false_positive + other.false_positive,
            missed=self.missed + other.missed,
            segmented=self.segmented + other.segmented,
            dice_hist=add(self.dice_hist, other.dice_hist),
            iou_hist=add(self.iou_hist, other.iou_hist),
            hd95_hist=add(self.hd95_hist, other.hd95_hist),
            dice_sum=self.dice_sum + other.dice_sum,
            iou_sum=self.iou_sum + other.iou_sum,
            hd95_sum=self.hd95_sum + other.hd95_sum,
            dice_hits=self.dice_hits + other.dice_hits,
            tp_voxels=self.tp_voxels + other.tp_voxels,
            fp_voxels=self.fp_voxels + other.fp_voxels,
            fn_voxels=self.fn_voxels + other.fn_voxels,
            hd95_max=self.hd95_max,
            dice_withheld=self.dice_withheld + other.dice_withheld,
            hd95_withheld=self.hd95_withheld + other.hd95_withheld,
            voxels_withheld=self.voxels_withheld + other.voxels_withheld,
        )


def _histogram(values: np.ndarray, bins: int, top: float) -> tuple[int, ...]:
    """Counts of ``values`` in ``bins`` equal-width bins on ``[0, top]`` (clipped into it)."""
    index = np.clip(np.floor(values / top * bins), 0, bins - 1).astype(np.int64)
    return tuple(int(v) for v in np.bincount(index, minlength=bins))


def histogram_quantile(
    hist: Sequence[int] | np.ndarray, q: float, *, low: float, high: float
) -> float | None:
    """The ``q``-quantile of the values behind equal-width bins on ``[low, high]``.

    Each order statistic is placed at the middle of its bin and numpy's default (linear)
    interpolation between order statistics is applied; so the result is within half a bin
    width of ``np.quantile`` of the values themselves. Where bins were merged for privacy
    (a run's cases stored in its first bin), the error can reach the run's width.

    Returns:
        None for an empty histogram.
    """
    counts = np.asarray(hist, dtype=np.int64)
    total = int(counts.sum())
    if total == 0:
        return None
    width = (high - low) / len(counts)
    position = (total - 1) * q
    below, above = math.floor(position), math.ceil(position)
    cumulative = np.cumsum(counts)
    first = int(np.searchsorted(cumulative, below, side="right"))
    second = int(np.searchsorted(cumulative, above, side="right"))
    lower, upper = low + (first + 0.5) * width, low + (second + 0.5) * width
    return lower + (position - below) * (upper - lower)


def _ratio(num: float, den: float) -> float | None:
    return num / den if den else None


def segmentation_metrics(s: SegmentationStats) -> dict[str, float | None]:
    """Every reported metric of one set of statistics (None where undefined).

    ``dice_*`` and ``iou_*`` are over the cases with ground-truth foreground (``dice_cases``
    of them, withheld cells left out), ``hd95_*`` (pixels of the model grid) over the
    ``segmented`` ones (``hd95_cases``). Means are exact; medians and quartiles come from
    the histograms. ``dice_ge_half`` is the share of those cases with Dice >= 0.5,
    ``global_dice`` the Dice of all voxels pooled (over the ``voxel_cases`` whose voxel
    counts were sent), ``fp_case_rate`` the share of cases
    without ground-truth foreground that got a predicted one and ``miss_rate`` the share
    of cases with foreground that got none.
    """
    dice_cases = sum(s.dice_hist)
    out: dict[str, float | None] = {
        "cases": s.n,
        "dice_cases": dice_cases,
        "hd95_cases": sum(s.hd95_hist),
        "voxel_cases": s.n - s.voxels_withheld,
    }
    for name, hist, total, top in (
        ("dice", s.dice_hist, s.dice_sum, 1.0),
        ("iou", s.iou_hist, s.iou_sum, 1.0),
        ("hd95", s.hd95_hist, s.hd95_sum, s.hd95_max),
    ):
        out[f"{name}_mean"] = _ratio(total, sum(hist))
        for key, q in (("median", 0.5), ("q1", 0.25), ("q3", 0.75)):
            out[f"{name}_{key}"] = histogram_quantile(hist, q, low=0.0, high=top)
    out["dice_ge_half"] = _ratio(s.dice_hits, dice_cases)
    out["global_dice"] = _ratio(2 * s.tp_voxels, 2 * s.tp_voxels + s.fp_voxels + s.fn_voxels)
    out["tn_cases"] = s.true_negative
    out["fp_cases"] = s.false_positive
    out["missed_cases"] = s.missed
    out["segmented_cases"] = s.segmented
    out["fp_case_rate"] = _ratio(s.false_positive, s.true_negative + s.false_positive)
    out["miss_rate"] = _ratio(s.missed, s.missed + s.segmented)
    return {k: (None if v is None or math.isnan(v) else round(v, 6)) for k, v in out.items()}
