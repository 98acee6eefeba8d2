"""Which subgroup cells a site names and which it must suppress."""

from __future__ import annotations

import torch

from radfed.data.attributes import STANDARD_BANDS
from radfed.metrics.cells import SMALL_GROUPS, subgroup_cells, suppressed_cells
from radfed.metrics.segmentation import SegmentationStats, case_metrics

BANDS = STANDARD_BANDS.labels


def _attributes(sexes: list[str], bands: list[str] | None = None) -> list[dict[str, str]]:
    bands = bands or ["40-59"] * len(sexes)
    return [{"sex": s, "age_band": b} for s, b in zip(sexes, bands, strict=True)]


def test_a_lone_small_group_cannot_be_recovered_by_subtraction() -> None:
    # Prepare: one patient of sex "other" among 40
    cases = _attributes(["F"] * 20 + ["M"] * 19 + ["other"])
    cells = subgroup_cells(cases, ["sex"], 10, age_bands=BANDS)
    # Execute
    hidden = {cells[i].group for i in suppressed_cells(cells, 10)}
    # Assert: "other" is suppressed, and so is the next-smallest group (M), since
    # all - F - M would otherwise give the lone patient's counts
    assert {"other", "M"} <= hidden and "F" not in hidden and "all" not in hidden


def test_closed_vocabularies_name_every_group_and_free_text_is_pooled() -> None:
    # Prepare: a manifest column overrode age_band with a value outside the bands
    cases = _attributes(["F"] * 30, ["John Smith"] + ["40-59"] * 29)
    # Execute
    cells = subgroup_cells(cases, ["sex", "age_band"], 10, age_bands=BANDS)
    groups = {(c.attribute, c.group): len(c.index) for c in cells}
    # Assert: every sex and band is listed (empty ones too), the stray value is not named
    assert {("sex", g) for g in ("F", "M", "other", "unknown")} <= set(groups)
    assert {("age_band", g) for g in BANDS} <= set(groups)
    assert ("age_band", "John Smith") not in groups
    assert groups[("age_band", SMALL_GROUPS)] == 1


def test_voxel_sums_are_withheld_with_the_metric_they_would_reveal() -> None:
    # Prepare: 12 cases, one with a structure (its volume must not leave)
    target = torch.zeros(12, 1, 8, 8)
    target[0, 0, 2:5, 2:5] = 1
    prediction = target.clone()
    stats = SegmentationStats.from_cases(case_metrics(prediction, target), bins=10, hd95_max=12.0)
    # Execute
    sent = stats.with_min_cell(10)
    # Assert
    assert stats.tp_voxels == 9 and sent.n == 12 and not sent.suppressed
    assert (sent.tp_voxels, sent.fp_voxels, sent.fn_voxels) == (0, 0, 0)
    assert sent.dice_withheld == 1 and sum(sent.dice_hist) == 0


def test_text_in_a_closed_attribute_never_leaves_as_a_group_name() -> None:
    # a manifest column put a ward's name in age_band for 30 cases: enough for k, still pooled
    cases = _attributes(["F"] * 30 + ["M"] * 30, ["Ward 7B oncology"] * 30 + ["40-59"] * 30)
    cells = subgroup_cells(cases, ["age_band", "sex*age_band"], 10, age_bands=BANDS)
    names = {c.group for c in cells}
    assert not any("Ward" in n for n in names)
    assert (
        len(next(c for c in cells if c.attribute == "age_band" and c.group == SMALL_GROUPS).index)
        == 30
    )
