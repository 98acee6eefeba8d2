"""Differencing attacks on the parts of a cell that cover a sub-population of its cases:
a segmentation cell's Dice and IoU values, HD95 and voxel sums (its cases with foreground,
its ``segmented``, ``missed`` and ``false-positive`` cases), a detection cell's
histograms (its detections, and the images holding them).

A cell withholds such a part where its sub-population holds fewer than ``k`` units
(``with_min_cell``), but ``all`` minus a released ``sex=F`` is ``sex=M``: before parts
were protected jointly (``radfed.metrics.cells.withheld_part``), an honest-but-curious
server read the one man with a lesion's Dice, HD95 and lesion volume off two released
cells. The attacks after the first came from an attack review of that fix: cases a model
missed add a known 0 to the Dice sums, ten boxes on one image are ten units of one
patient, the voxel sums cover false-positive cases, and runs asking different cell sizes
chose different cells. Every release here is the site's own ``evaluate_cells`` with the
default site policy (k = 10); what is released is checked by the independent disclosure
search (``tests.disclosure_search``) over each sub-population.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from radfed.config import RunConfig
from radfed.data.loading import SplitData
from radfed.federation.schema import CellStats
from radfed.privacy import SitePolicy
from radfed.privacy.releases import ReleaseRecord, SplitReleases
from radfed.site.evaluate import evaluate_cells
from radfed.tasks import get_task
from radfed.tasks.detection import DetectionOutputs
from tests.disclosure_search import exact_isolations, signed_sums

K = 10
SIZE = 16
WOMAN = {"sex": "F", "age_band": "40-59"}
MAN = {"sex": "M", "age_band": "40-59"}
EMPTY = torch.zeros(1, SIZE, SIZE)

#: A segmentation case: its attributes, ground-truth mask and predicted mask.
Case = tuple[dict[str, str], torch.Tensor, torch.Tensor]


class ThresholdModel(nn.Module):
    """The server's segmentation model: foreground where the image is above 0.5 (the
    image is the prediction the test chooses)."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return torch.cat([torch.zeros_like(images), (images - 0.5) * 10], dim=1)


def _square(top: int, left: int, height: int, width: int) -> torch.Tensor:
    mask = torch.zeros(1, SIZE, SIZE)
    mask[0, top : top + height, left : left + width] = 1
    return mask


def _segment(
    cases: Sequence[Case],
    k: int = K,
    released: SplitReleases | None = None,
    keys: Sequence[str] = (),
) -> list[CellStats]:
    """What the site releases for a split of these cases (against its record of earlier
    releases, given one and the cases' keys)."""
    data = SplitData(
        images=torch.stack([predicted for _, _, predicted in cases]),
        labels=torch.tensor([int(truth.any()) for _, truth, _ in cases]),
        attributes=tuple(attributes for attributes, _, _ in cases),
        masks=torch.stack([truth for _, truth, _ in cases]).to(torch.uint8),
        cases=tuple(keys),
    )
    config = RunConfig(task="segmentation", image_size=SIZE, eval_splits=("val",))
    task = get_task(config.task)
    policy = SitePolicy.default()
    _, cells = evaluate_cells(task, ThresholdModel(), data, config, k, policy, released)
    return cells


def _kinds(cases: Sequence[Case]) -> dict[str, list[int]]:
    """Per sub-population, whether each case is in it (computed here, not by the site)."""
    truth = [bool(t.any()) for _, t, _ in cases]
    predicted = [bool(p.any()) for _, _, p in cases]
    return {
        "segmented": [int(t and p) for t, p in zip(truth, predicted, strict=True)],
        "missed": [int(t and not p) for t, p in zip(truth, predicted, strict=True)],
        "false-positive": [int(p and not t) for t, p in zip(truth, predicted, strict=True)],
    }


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


def _no_isolation(
    cells: Sequence[CellStats],
    attributes: Sequence[dict[str, str]],
    units: Sequence[int],
    releases: Callable[[Any], bool],
) -> None:
    """No sum or difference of the cells whose statistics ``releases`` the part covers
    1 to k - 1 of its units."""
    members = [
        _members(c, attributes, units) for c in cells if not c.stats.suppressed and releases(c)
    ]
    members = [m for m in members if m]
    assert signed_sums(members, K) == []
    assert exact_isolations(members, K) == []


def _dice_released(cell: CellStats) -> bool:
    return sum(cell.stats.dice_hist) > 0 and cell.stats.dice_withheld == 0


def _voxels_released(cell: CellStats) -> bool:
    return cell.stats.voxels_withheld == 0


def _one_man_half_segmented() -> tuple[list[Case], float]:
    """40 cases: 10 women with a lesion segmented exactly, 10 without; one man with a
    lesion half segmented (Dice 2/3), 19 without."""
    cases: list[Case] = []
    for number in range(20):
        lesion = _square(4, 4, 4, 4) if number < 10 else EMPTY
        cases.append((WOMAN, lesion, lesion.clone()))
    cases.append((MAN, _square(4, 4, 4, 4), _square(4, 4, 2, 4)))
    cases += [(MAN, EMPTY, EMPTY)] * 19
    return cases, 2 * 8 / (16 + 8)


def test_all_minus_a_released_sex_gives_no_single_mans_dice() -> None:
    # Prepare and execute
    cases, mans_dice = _one_man_half_segmented()
    cells = _segment(cases)
    attributes = [a for a, _, _ in cases]

    # Assert: among the cells that release the Dice part no sum or difference covers 1 to
    # 9 segmented cases, nor voxel sums 1 to 9 of any kind; the man's Dice is no
    # difference of two released Dice sums, his lesion volume none of two voxel sums
    _no_isolation(cells, attributes, _kinds(cases)["segmented"], _dice_released)
    for units in _kinds(cases).values():
        _no_isolation(cells, attributes, units, _voxels_released)
    sums = [c.stats.dice_sum for c in cells if _dice_released(c)]
    assert all(a - b != pytest.approx(mans_dice) for a, b in itertools.permutations(sums, 2))
    volumes = [c.stats.tp_voxels + c.stats.fn_voxels for c in cells if not c.stats.suppressed]
    assert 16 not in {a - b for a, b in itertools.permutations(volumes, 2)}
    # and the part leaves where it is safe: all's 11 segmented cases
    everyone = next(c for c in cells if c.attribute == "all")
    assert sum(everyone.stats.dice_hist) == 11
    assert everyone.stats.dice_sum == pytest.approx(10 + mans_dice)


def test_cases_the_model_missed_do_not_pin_one_segmented_dice() -> None:
    # Prepare: 10 women segmented exactly; 10 men with a lesion, of which a crafted model
    # misses 9 (predicts nothing) and half segments one; 10 men without
    cases: list[Case] = [(WOMAN, _square(4, 4, 4, 4), _square(4, 4, 4, 4))] * 10
    cases += [(WOMAN, EMPTY, EMPTY)] * 10
    cases.append((MAN, _square(4, 4, 4, 4), _square(4, 4, 2, 4)))
    cases += [(MAN, _square(4, 4, 4, 4), EMPTY)] * 9 + [(MAN, EMPTY, EMPTY)] * 10

    # Execute
    cells = _segment(cases)

    # Assert: sex=M holds 10 cases with foreground, but a missed case adds a known 0 to
    # the Dice sums, so they are the one segmented man's: the Dice part is protected over
    # the segmented cases, and no released Dice sum (or difference) is 2/3
    attributes = [a for a, _, _ in cases]
    _no_isolation(cells, attributes, _kinds(cases)["segmented"], _dice_released)
    sums = [c.stats.dice_sum for c in cells if _dice_released(c)]
    differences = [a - b for a, b in itertools.permutations(sums, 2)]
    assert 2 / 3 not in [pytest.approx(v) for v in sums + differences]


def test_a_false_positive_cases_predicted_volume_stays() -> None:
    # Prepare: 10 women segmented exactly, 10 women without a lesion on whose images the
    # model predicts some voxels; 20 men without a lesion, a crafted model predicts 37
    # voxels (any number it reads off the image) on one
    cases: list[Case] = [(WOMAN, _square(4, 4, 4, 4), _square(4, 4, 4, 4))] * 10
    cases += [(WOMAN, EMPTY, _square(0, 0, 1 + i % 3, 2)) for i in range(10)]
    secret = torch.zeros(1, SIZE, SIZE)
    secret.view(-1)[:37] = 1
    cases += [(MAN, EMPTY, secret)] + [(MAN, EMPTY, EMPTY)] * 19

    # Execute
    cells = _segment(cases)

    # Assert: all holds 11 false-positive cases and sex=F 10, so each alone may send its
    # voxel sums, but all minus sex=F would be his volume: no combination of the cells
    # that send them covers 1 to 9 false-positive cases, and 37 is no released difference
    attributes = [a for a, _, _ in cases]
    _no_isolation(cells, attributes, _kinds(cases)["false-positive"], _voxels_released)
    released = [c.stats.fp_voxels for c in cells if _voxels_released(c)]
    assert 37 not in released + [a - b for a, b in itertools.permutations(released, 2)]
    everyone = next(c for c in cells if c.attribute == "all")
    assert _voxels_released(everyone)  # all keeps them; a smaller cell withholds


def test_runs_asking_different_cell_sizes_release_parts_of_one_safe_release() -> None:
    # Prepare: segmented cases spread over groups so that the cells releasing the Dice
    # part under k = 10 and under k = 15 differ (the attack review's layout)
    layout = {
        ("F", "40-59"): (11, 9),
        ("F", "<18"): (3, 3),
        ("M", "40-59"): (5, 5),
        ("M", "18-39"): (12, 1),
        ("M", "<18"): (20, 13),
    }
    cases: list[Case] = []
    for (sex, band), (count, with_lesion) in layout.items():
        for number in range(count):
            if number < with_lesion:
                rows = 1 + len(cases) % 8
                cases.append(
                    ({"sex": sex, "age_band": band}, _square(2, 2, 8, 8), _square(2, 2, rows, 8))
                )
            else:
                cases.append(({"sex": sex, "age_band": band}, EMPTY, EMPTY))

    # Execute: one run asks k = 10, another k = 15
    first, second = _segment(cases, k=10), _segment(cases, k=15)

    # Assert: what both runs released together covers no 1 to 9 segmented cases
    attributes = [a for a, _, _ in cases]
    units = _kinds(cases)["segmented"]
    members = [_members(c, attributes, units) for c in [*first, *second] if _dice_released(c)]
    assert signed_sums([m for m in members if m], K) == []
    assert exact_isolations([m for m in members if m], K) == []


def test_withheld_dice_is_counted_as_withheld_in_every_cell_that_withholds_it() -> None:
    # Prepare and execute
    cases, _ = _one_man_half_segmented()
    cells = _segment(cases)

    # Assert: a released cell either carries its foreground cases' Dice or says how
    # many it withheld (what the bias report shows as too few cases), never neither; and
    # its voxel sums are sent or counted as withheld for all its cases
    for cell in cells:
        if cell.stats.suppressed:
            continue
        foreground = cell.stats.missed + cell.stats.segmented
        assert sum(cell.stats.dice_hist) + cell.stats.dice_withheld == foreground
        assert cell.stats.voxels_withheld in (0, cell.stats.n)


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


def _detect(
    attributes: Sequence[dict[str, str]],
    found: Sequence[np.ndarray],
    scores: Sequence[np.ndarray],
    truth: Sequence[np.ndarray],
) -> list[CellStats]:
    outputs = DetectionOutputs(
        boxes=tuple(found), scores=tuple(scores), truth=tuple(truth), bins=100
    )
    data = SplitData(
        images=torch.zeros(len(attributes), 1, SIZE, SIZE),
        labels=torch.tensor([int(len(t) > 0) for t in truth]),
        attributes=tuple(attributes),
        boxes=tuple(truth),
    )
    config = RunConfig(task="detection", image_size=SIZE, eval_splits=("val",))
    task: Any = _Outputs(outputs)
    _, cells = evaluate_cells(task, nn.Identity(), data, config, K, SitePolicy.default())
    return cells


BOX = np.array([[2.0, 2.0, 6.0, 6.0]], dtype=np.float32)
NO_BOX = np.zeros((0, 4), dtype=np.float32)
NO_SCORE = np.zeros(0, dtype=np.float32)


def _detections_released(cell: CellStats) -> bool:
    return cell.stats.detections > 0


def test_all_minus_a_released_sex_gives_no_single_detection() -> None:
    # Prepare: 40 images; each woman's has one detection, and one man's has one (score
    # 0.73); the other 19 men's have none
    found = [BOX] * 21 + [NO_BOX] * 19
    scores = [np.array([0.4 + 0.02 * i], dtype=np.float32) for i in range(20)]
    scores += [np.array([0.73], dtype=np.float32)] + [NO_SCORE] * 19
    attributes = [WOMAN] * 20 + [MAN] * 20

    # Execute
    cells = _detect(attributes, found, scores, found)

    # Assert: among the cells that release detections no sum or difference covers 1 to
    # 9 detections; no difference of two detection histograms is the man's one detection
    _no_isolation(cells, attributes, [len(s) for s in scores], _detections_released)
    released = [c for c in cells if not c.stats.suppressed and c.stats.detections]
    for a, b in itertools.permutations(released, 2):
        difference = np.subtract(a.stats.det_hist, b.stats.det_hist)
        assert not (difference.sum() == 1 and (difference >= 0).all())
    everyone = next(c for c in cells if c.attribute == "all")
    assert everyone.stats.detections == 21


def test_many_boxes_on_one_image_describe_that_image_and_stay() -> None:
    # Prepare: each woman's image has one true detection; a crafted detector puts 20
    # probe boxes on one man's image (10 on its left half scored 0.15, 10 on its right
    # 0.85) and none on the other men's: the bins hit would say where his lesion is
    probes = [[x, y, x + 4, y + 4] for x in (0, 2, 4) for y in (0, 3, 6, 9)][:10]
    probes += [[x, y, x + 4, y + 4] for x in (8, 10, 12) for y in (0, 3, 6, 9)][:10]
    found = [BOX] * 20 + [np.array(probes, dtype=np.float32)] + [NO_BOX] * 19
    scores = [np.array([0.4 + 0.02 * i], dtype=np.float32) for i in range(20)]
    scores += [np.array([0.15] * 10 + [0.85] * 10, dtype=np.float32)] + [NO_SCORE] * 19
    truth = [BOX] * 20 + [np.array([[10.0, 3.0, 14.0, 7.0]], dtype=np.float32)]
    truth += [NO_BOX] * 19
    attributes = [WOMAN] * 20 + [MAN] * 20

    # Execute
    cells = _detect(attributes, found, scores, truth)

    # Assert: no combination of the cells that release detections covers 1 to 9 images
    # holding detections (sex=M's 20 detections all come from his image)
    images = [int(len(s) > 0) for s in scores]
    _no_isolation(cells, attributes, images, _detections_released)
    man = next(c for c in cells if c.attribute == "sex" and c.group == "M")
    assert man.stats.suppressed


def test_a_cell_without_units_of_a_part_keeps_its_counts() -> None:
    # Prepare / Execute: the same split, no image with a detection
    cells = _detect([WOMAN] * 20 + [MAN] * 20, [NO_BOX] * 40, [NO_SCORE] * 40, [NO_BOX] * 40)

    # Assert: nothing to withhold, so all and both sexes leave with their image counts
    sizes = {f"{c.attribute}={c.group}": c.stats.n for c in cells}
    assert sizes["all=all"] == 40
    assert sizes["sex=F"] == 20 and sizes["sex=M"] == 20


def test_a_part_gains_no_single_case_between_runs(tmp_path: Path) -> None:
    # Prepare: run 1 evaluates 20 women, 10 with a lesion segmented exactly; then ten
    # women join, one with a lesion (the attack review's layout): the cells gain ten
    # cases, so they leave again, but their Dice part would gain one case
    record = ReleaseRecord(tmp_path / "releases.jsonl")
    lesion = [(WOMAN, _square(2, 2, 4 + i % 3, 5), _square(2, 2, 4 + i % 3, 5)) for i in range(10)]
    first: list[Case] = lesion + [(WOMAN, EMPTY, EMPTY)] * 10
    second = [*first, (WOMAN, _square(3, 3, 6, 6), _square(4, 4, 6, 7))]
    second += [(WOMAN, EMPTY, EMPTY)] * 9
    keys = [f"case-{i}" for i in range(len(second))]

    # Execute: the same model in both runs, the site's record between them
    runs = []
    for cases in (first, second):
        with record.locked() as released:
            runs.append(_segment(cases, released=released["val"], keys=keys[: len(cases)]))

    # Assert: the cells of both runs that release the Dice part cover no 1 to 9
    # segmented cases by any sum or difference; and whole cells left again in run 2
    members = [
        _members(c, [a for a, _, _ in cases], _kinds(cases)["segmented"])
        for cases, run in zip((first, second), runs, strict=True)  # first: a prefix of second
        for c in run
        if _dice_released(c)
    ]
    assert signed_sums([m for m in members if m], K) == []
    assert exact_isolations([m for m in members if m], K) == []
    assert any(c.attribute == "all" and c.stats.n == 30 for c in runs[1])
