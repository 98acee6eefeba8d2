"""Differencing attacks on the parts of a cell that cover a sub-population of its cases:
a segmentation cell's Dice and IoU values (its cases with foreground) and HD95 (its
``segmented`` cases), a detection cell's score histograms (its detections).

A cell withholds such a part where it covers fewer than ``k`` units (``with_min_cell``),
but ``all`` minus a released ``sex=F`` is ``sex=M``: before parts were protected jointly
(``radfed.metrics.cells.withheld_parts``), an honest-but-curious server read the one man
with a lesion's Dice, IoU, HD95 and lesion volume off two released cells. Every release
here is the site's own ``evaluate_cells`` with the default site policy (k = 10); the
checks of what is released are independent of the site's code (``tests.disclosure_search``).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from radfed.config import RunConfig
from radfed.data.loading import SplitData
from radfed.federation.schema import CellStats
from radfed.privacy import SitePolicy
from radfed.site.evaluate import evaluate_cells
from radfed.tasks import get_task
from radfed.tasks.detection import DetectionOutputs
from tests.disclosure_search import exact_isolations, signed_sums

K = 10
SIZE = 16
WOMAN = {"sex": "F", "age_band": "40-59"}
MAN = {"sex": "M", "age_band": "40-59"}


class ThresholdModel(nn.Module):
    """The server's segmentation model: foreground where the image is above 0.5."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return torch.cat([torch.zeros_like(images), (images - 0.5) * 10], dim=1)


def _square(top: int, left: int, height: int, width: int) -> torch.Tensor:
    mask = torch.zeros(1, SIZE, SIZE)
    mask[0, top : top + height, left : left + width] = 1
    return mask


def _segmentation_release() -> tuple[list[CellStats], list[dict[str, str]], float]:
    """40 cases: 10 women with a lesion segmented exactly, 10 without; one man with a
    lesion half segmented (Dice 2/3), 19 without. Returns the cells, the attributes and
    the man's Dice."""
    masks, images, attributes = [], [], []
    for number in range(20):
        lesion = _square(4, 4, 4, 4) if number < 10 else torch.zeros(1, SIZE, SIZE)
        masks.append(lesion)
        images.append(lesion.clone())
        attributes.append(WOMAN)
    for number in range(20):
        lesion = _square(4, 4, 4, 4) if number == 0 else torch.zeros(1, SIZE, SIZE)
        masks.append(lesion)
        images.append(_square(4, 4, 2, 4) if number == 0 else lesion.clone())
        attributes.append(MAN)
    data = SplitData(
        images=torch.stack(images),
        labels=torch.tensor([int(m.any()) for m in masks]),
        attributes=tuple(attributes),
        masks=torch.stack(masks).to(torch.uint8),
    )
    config = RunConfig(task="segmentation", image_size=SIZE, eval_splits=("val",))
    task = get_task(config.task)
    _, cells = evaluate_cells(task, ThresholdModel(), data, config, K, SitePolicy.default())
    return cells, attributes, 2 * 8 / (16 + 8)


def _members(
    cell: CellStats, attributes: Sequence[dict[str, str]], units: Sequence[int]
) -> set[int]:
    """The units (case, unit) ids of a cell, from the site's own attributes."""
    first = list(itertools.accumulate(units, initial=0))
    inside = [
        i
        for i, case in enumerate(attributes)
        if cell.attribute == "all"
        or "|".join(case.get(a, "unknown") for a in cell.attribute.split("*")) == cell.group
    ]
    return {u for i in inside for u in range(first[i], first[i + 1])}


def test_all_minus_a_released_sex_gives_no_single_mans_dice() -> None:
    # Prepare and execute
    cells, attributes, mans_dice = _segmentation_release()
    foreground = [1] * 10 + [0] * 10 + [1] + [0] * 19

    # Assert: the cells that release the Dice part are a release of the foreground
    # cases in which no sum or difference covers 1 to 9 of them; the man's Dice is no
    # difference of two released Dice sums, and his lesion volume no difference of two
    # released voxel sums
    dice = [c for c in cells if not c.stats.suppressed and sum(c.stats.dice_hist)]
    members = [_members(c, attributes, foreground) for c in dice]
    assert signed_sums(members, K) == []
    assert exact_isolations(members, K) == []
    sums = [c.stats.dice_sum for c in dice]
    assert all(a - b != pytest.approx(mans_dice) for a, b in itertools.permutations(sums, 2))
    volumes = [c.stats.tp_voxels + c.stats.fn_voxels for c in cells if not c.stats.suppressed]
    assert 16 not in {a - b for a, b in itertools.permutations(volumes, 2)}
    # and the part leaves where it is safe: all's 11 cases with foreground
    everyone = next(c for c in cells if c.attribute == "all")
    assert sum(everyone.stats.dice_hist) == 11
    assert everyone.stats.dice_sum == pytest.approx(10 + mans_dice)


def test_withheld_dice_is_counted_as_withheld_in_every_cell_that_withholds_it() -> None:
    # Prepare and execute
    cells, _, _ = _segmentation_release()

    # Assert: a released cell either carries its foreground cases' Dice or says how
    # many it withheld (what the bias report shows as too few cases), never neither
    for cell in cells:
        if cell.stats.suppressed:
            continue
        foreground = cell.stats.missed + cell.stats.segmented
        assert sum(cell.stats.dice_hist) + cell.stats.dice_withheld == foreground


class _Outputs:
    """The detection task with the outputs a crafted model gives (a server that chooses
    the weights chooses the detections)."""

    def __init__(self, outputs: DetectionOutputs) -> None:
        self.task = get_task("detection")
        self.outputs = outputs

    def predict(self, model: nn.Module, data: SplitData, config: RunConfig) -> DetectionOutputs:
        return self.outputs

    def __getattr__(self, name: str) -> Any:
        return getattr(self.task, name)


def test_all_minus_a_released_sex_gives_no_single_detection() -> None:
    # Prepare: 40 images; each woman's has one detection, and one man's has one (score
    # 0.73); the other 19 men's have none
    box = np.array([[2.0, 2.0, 6.0, 6.0]], dtype=np.float32)
    none = np.zeros((0, 4), dtype=np.float32)
    found = [box] * 20 + [box] + [none] * 19
    scores = [np.array([0.4 + 0.02 * i], dtype=np.float32) for i in range(20)]
    scores += [np.array([0.73], dtype=np.float32)] + [np.zeros(0, dtype=np.float32)] * 19
    outputs = DetectionOutputs(
        boxes=tuple(found), scores=tuple(scores), truth=tuple(found), bins=100
    )
    attributes = [WOMAN] * 20 + [MAN] * 20
    data = SplitData(
        images=torch.zeros(40, 1, SIZE, SIZE),
        labels=torch.ones(40, dtype=torch.int64),
        attributes=tuple(attributes),
        boxes=tuple(found),
    )
    config = RunConfig(task="detection", image_size=SIZE, eval_splits=("val",))
    task: Any = _Outputs(outputs)

    # Execute
    _, cells = evaluate_cells(task, nn.Identity(), data, config, K, SitePolicy.default())

    # Assert: the cells that release detections are a release of the detections in
    # which no sum or difference covers 1 to 9; no difference of two released detection
    # histograms is the man's one detection
    detections = [len(s) for s in scores]
    released = [c for c in cells if not c.stats.suppressed and c.stats.detections]
    members = [_members(c, attributes, detections) for c in released]
    assert signed_sums(members, K) == []
    assert exact_isolations(members, K) == []
    for a, b in itertools.permutations(released, 2):
        difference = np.subtract(a.stats.det_hist, b.stats.det_hist)
        assert not (difference.sum() == 1 and (difference >= 0).all())
    everyone = next(c for c in cells if c.attribute == "all")
    assert everyone.stats.detections == 21


def test_a_cell_without_units_of_a_part_keeps_its_counts() -> None:
    # Prepare: the same split, no image with a detection
    none = np.zeros((0, 4), dtype=np.float32)
    outputs = DetectionOutputs(
        boxes=(none,) * 40,
        scores=(np.zeros(0, dtype=np.float32),) * 40,
        truth=(none,) * 40,
        bins=100,
    )
    data = SplitData(
        images=torch.zeros(40, 1, SIZE, SIZE),
        labels=torch.zeros(40, dtype=torch.int64),
        attributes=tuple([WOMAN] * 20 + [MAN] * 20),
        boxes=(none,) * 40,
    )
    config = RunConfig(task="detection", image_size=SIZE, eval_splits=("val",))

    # Execute
    task: Any = _Outputs(outputs)
    _, cells = evaluate_cells(task, nn.Identity(), data, config, K, SitePolicy.default())

    # Assert: nothing to withhold, so all and both sexes leave with their image counts
    sizes = {f"{c.attribute}={c.group}": c.stats.n for c in cells}
    assert sizes["all=all"] == 40
    assert sizes["sex=F"] == 20 and sizes["sex=M"] == 20
