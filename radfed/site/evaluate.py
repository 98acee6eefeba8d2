"""Local evaluation at a site: per-case outputs (kept) and the statistics that would leave.

The ClientApp and ``radfed evaluate`` share this code, so what a site administrator
inspects with ``radfed evaluate`` is what the site sends in a federated round.
"""

from __future__ import annotations

import csv
import dataclasses
import json
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from radfed.config import SPLITS, RunConfig
from radfed.data.attributes import AgeBands
from radfed.data.loading import SplitData
from radfed.data.splits import record_test_use
from radfed.errors import ConfigError
from radfed.federation.checkpoint import load_checkpoint
from radfed.federation.schema import CellStats, cell_names, pack_stats
from radfed.folders import SiteFolder
from radfed.log import logger
from radfed.metrics.binary import BinaryStats
from radfed.metrics.cells import ALL, Cell, subgroup_cells, suppressed_cells, withheld_part
from radfed.privacy import SitePolicy
from radfed.privacy.releases import ReleaseRecord, SplitReleases
from radfed.privacy.statistics_dp import StatisticsDP, bounded_cases, noisy_release
from radfed.site.node import load_site_within, own_policy
from radfed.tasks import CaseOutputs, SplitStats, Task, get_task
from radfed.tasks.classification import ScoreOutputs

__all__ = [
    "EvaluationResult",
    "empty_noisy_cells",
    "evaluate_cells",
    "evaluate_site",
    "released_cells_per_case",
]


def evaluate_cells(
    task: Task,
    model: nn.Module,
    data: SplitData,
    config: RunConfig,
    k: int,
    policy: SitePolicy,
    released: SplitReleases | None = None,
) -> tuple[CaseOutputs, list[CellStats]]:
    """Per-case outputs of a split and its subgroup cells (``all`` first) under cell size
    ``k``: the cells of the run's subgroups that ``policy`` allows.

    The site's disclosure control runs over every cell the policy allows (its template),
    under the policy's own cell size and under ``k``, whatever subset the run asks for:
    what different runs receive from the same split is then part of one safe release.
    With ``released`` (the split's record, ``radfed.privacy.releases``), the cells released
    before in any run are part of it too, and the cells that leave now are added to it.
    With DP statistics in the policy, the cells the run asks for leave with noise instead
    (``radfed.privacy.statistics_dp``); the caller has spent the release's privacy.
    """
    outputs = task.predict(model, data, config)
    if policy.dp_statistics is not None:
        return outputs, _noisy_cells(outputs, data, config, policy, policy.dp_statistics)
    positive = (data.labels > 0).tolist()
    bands = AgeBands(config.age_bands).labels
    wanted = {ALL, *policy.allowed_subgroups(config.subgroups)}
    own_k = policy.k if policy.templates is not None else k  # fixed by the site
    partition = subgroup_cells(
        data.attributes,
        policy.template(config.subgroups),
        own_k,
        age_bands=bands,
        vocabularies=policy.vocabularies(),
    )
    keys = data.cases
    earlier = released.earlier if released is not None and keys else frozenset()
    at_policy = suppressed_cells(partition, own_k, keys=keys, earlier=earlier)
    hidden = at_policy | suppressed_cells(partition, k, keys=keys, earlier=earlier)
    if earlier:
        held = hidden - suppressed_cells(partition, own_k) - suppressed_cells(partition, k)
        if held:
            logger.info(
                "%d of %d cells held back: their cases differ by fewer than %d from cells "
                "released before (the site's record of released cells)",
                len(held),
                len(partition),
                max(own_k, k),
            )
    units = outputs.parts()
    stable = [part for part in units if part in task.stable_parts]
    before = {p: released.part(p) for p in stable} if released is not None and keys else {}
    withheld = _withheld(units, partition, (at_policy, own_k), (hidden, k), keys, before)
    images = Counter(data.patients)
    cells = []
    left: dict[int, SplitStats] = {}  # the cells that leave, and what they release
    for number, cell in enumerate(partition):
        if cell.attribute not in wanted:
            continue
        if number in hidden:
            cells.append(
                CellStats(cell.attribute, cell.group, task.empty_stats(config, suppressed=True), 0)
            )
            continue
        raw = outputs.stats(cell.index)
        if isinstance(raw, BinaryStats) and not policy.exact_auc:
            raw = raw.without_exact_auc()
        stats = raw.with_min_cell(own_k)  # the same in every run
        for part in withheld.get(number, ()):
            stats = stats.withholding(part)
        if isinstance(stats, BinaryStats):
            stats = _patient_sums_allowed(stats, cell, data.patients, images)
        positives = sum(positive[i] for i in cell.index)
        cells.append(CellStats(cell.attribute, cell.group, stats, positives))
        if not stats.suppressed and keys:
            left[number] = stats
    if released is not None and keys:
        released.add(frozenset(keys[i] for i in partition[n].index) for n in left)
        for part in stable:  # where the part left: withholding it would change the cell
            per_case = units[part]
            released.add(
                (
                    frozenset(keys[i] for i in partition[n].index if per_case[i] > 0)
                    for n, stats in left.items()
                    if stats.withholding(part) != stats
                ),
                part,
            )
    return outputs, cells


def _withheld(
    units: Mapping[str, Sequence[int]],
    partition: list[Cell],
    policy: tuple[set[int], int],
    run: tuple[set[int], int],
    keys: Sequence[str] = (),
    earlier: Mapping[str, frozenset[frozenset[str]]] | None = None,
) -> dict[int, list[str]]:
    """Per released cell, the parts of its statistics it withholds so that no sum or
    difference of the cells that release a part covers 1 to k - 1 of the part's units
    (``radfed.metrics.cells.withheld_part``).

    The parts are chosen over the cells released under the policy's cell size first, then
    among what is left over the cells released under the run's: a run asking a larger
    ``k`` releases a subset of what the policy's ``k`` releases, so what runs asking
    different sizes receive together is part of one safe release.

    Args:
        units: per part, per case its units (``CaseOutputs.parts``).
        partition: every cell of the split.
        policy: the cells suppressed under the policy's cell size, and that size.
        run: the cells suppressed under both sizes, and the run's size.
        keys: per case its key (``SplitData.cases``), with ``earlier``.
        earlier: per part, the case sets of the cells that released it before (the site's
            record, ``radfed.privacy.releases``).
    """
    out: dict[int, list[str]] = {}
    everything = range(len(partition))
    for part, per_case in units.items():
        (policy_hidden, policy_k), (run_hidden, run_k) = policy, run
        before = (earlier or {}).get(part, frozenset())
        released = [n for n in everything if n not in policy_hidden]
        withheld = withheld_part(partition, released, per_case, policy_k, keys=keys, earlier=before)
        if run_k != policy_k or run_hidden != policy_hidden:
            left = [n for n in everything if n not in run_hidden and n not in withheld]
            withheld |= withheld_part(partition, left, per_case, run_k, keys=keys, earlier=before)
        for number in withheld:
            out.setdefault(number, []).append(part)
    return out


def _patient_sums_allowed(
    stats: BinaryStats, cell: Cell, patients: tuple[str, ...], images: Counter[str]
) -> BinaryStats:
    """The per-patient sums only where every patient of the cell has all its images of the
    split in it: per-patient sums do not add up over cells a patient straddles (studies in
    two age bands), and differences of linked cells would give that patient's counts."""
    inside = Counter(patients[i] for i in cell.index) if patients else Counter()
    if any(images[patient] != count for patient, count in inside.items()):
        stats = stats.without_clusters()
    return stats


def released_cells_per_case(config: RunConfig, policy: SitePolicy) -> int:
    """How many cells of a release each case is in: ``all`` and one group of each
    attribute the policy lets the run have (the sensitivity of DP statistics)."""
    return 1 + len(policy.allowed_subgroups(config.subgroups))


def _noisy_cells(
    outputs: CaseOutputs,
    data: SplitData,
    config: RunConfig,
    policy: SitePolicy,
    noisy: StatisticsDP,
) -> list[CellStats]:
    """The cells of a DP statistics release (``radfed.privacy.statistics_dp``): at most
    ``cases-per-patient`` cases of a patient, every listed group, noise on every bin."""
    kept = bounded_cases(data.patients, len(data), noisy.cases_per_patient)
    if len(kept) < len(data):
        logger.info("DP statistics count %d of %d cases (cases-per-patient)", len(kept), len(data))
    attributes = [data.attributes[i] for i in kept] if data.attributes else [{} for _ in kept]
    assert isinstance(outputs, ScoreOutputs)  # check_run admits binary classification only
    # a crafted model may score some cases NaN or out of range: each case's score is mapped
    # to [0, 1] on its own (NaN to 0), so that no case can make the release fail
    scores = np.clip(np.nan_to_num(outputs.scores, nan=0.0, posinf=1.0, neginf=0.0), 0.0, 1.0)
    safe = dataclasses.replace(outputs, scores=scores)
    cells = []
    for cell in _listed_cells(attributes, config, policy):
        exact = safe.stats([kept[i] for i in cell.index])
        assert isinstance(exact, BinaryStats)
        released = noisy_release(exact, noisy.noise)
        cells.append(CellStats(cell.attribute, cell.group, released, released.tp + released.fn))
    return cells


def _listed_cells(
    attributes: list[dict[str, str]], config: RunConfig, policy: SitePolicy
) -> list[Cell]:
    return subgroup_cells(
        attributes,
        policy.allowed_subgroups(config.subgroups),
        0,
        age_bands=AgeBands(config.age_bands).labels,
        vocabularies=policy.vocabularies(),
        listed=True,
    )


def empty_noisy_cells(config: RunConfig, policy: SitePolicy) -> list[CellStats]:
    """A DP statistics release of no cases: the cells a release lists, each only noise
    (what a site sends when its work failed after the release was spent)."""
    assert policy.dp_statistics is not None
    empty = BinaryStats.from_scores(
        np.zeros(0), np.zeros(0, dtype=bool), threshold=config.threshold, bins=config.score_bins
    )
    cells = []
    for cell in _listed_cells([], config, policy):
        released = noisy_release(empty, policy.dp_statistics.noise)
        cells.append(CellStats(cell.attribute, cell.group, released, released.tp + released.fn))
    return cells


@dataclass(frozen=True)
class EvaluationResult:
    """What ``evaluate_site`` wrote: the per-case table and the statistics document."""

    predictions: Path
    statistics: Path
    cases: int


def evaluate_site(
    checkpoint: Path, site_dir: Path, out: Path, *, split: str = "val", min_cell_size: int = 0
) -> EvaluationResult:
    """Evaluate a checkpoint on one site's split, locally.

    Writes ``out/predictions.csv`` (one row per case with its manifest line and image, for
    the site's own audit: it never leaves the site) and ``out/statistics.json`` (exactly
    the statistics the site would send for this split under its policy,
    ``SITE_DIR/site-policy.toml`` or the default one).

    Args:
        checkpoint: a radfed checkpoint (its run config rebuilds the task and model).
        site_dir: the site folder.
        out: the folder to write.
        split: ``train``, ``val`` or ``test`` (the sealed test split: each use is counted).
        min_cell_size: the site's minimum cell size; 0 for the run's.

    Raises:
        ConfigError: the checkpoint is missing or the split unknown.
        PolicyRefusal: the checkpoint's run asks for statistics the policy does not allow.
    """
    if split not in SPLITS:
        raise ConfigError(f"--split must be one of {', '.join(SPLITS)}, got {split!r}")
    if not checkpoint.is_file():
        raise ConfigError(f"checkpoint {checkpoint} not found; give a radfed checkpoint file")
    stored = load_checkpoint(checkpoint)
    config = RunConfig.from_run_config(stored["run-config"])
    task = get_task(config.task)
    task.check(config)
    model = task.build_model(config)
    model.load_state_dict(stored["state_dict"], strict=not config.fedbn)
    policy = own_policy(site_dir)
    policy.check_templates(config)
    site = load_site_within(site_dir, config, policy.limits)
    if split == "test":
        uses = record_test_use(SiteFolder(site_dir).state.path, run_id=0, server_round=0)
        logger.warning("the sealed test split is evaluated (use %d at this site)", uses)
    data = site.splits[split]
    k = policy.min_cell_size(max(config.min_cell_size, min_cell_size))
    with torch.no_grad():
        record = ReleaseRecord(SiteFolder(site_dir).state.releases)  # read, not added to
        outputs, cells = evaluate_cells(task, model, data, config, k, policy, record.read(split))
    out.mkdir(parents=True, exist_ok=True)
    predictions = out / "predictions.csv"
    _write_rows(predictions, outputs.rows(), data)
    values = pack_stats(
        task,
        {split: cells[0].stats},
        cells={split: cells[1:]},
        positives={split: cells[0].positives},
    )
    document: dict[str, Any] = {
        "task": config.task,
        "split": split,
        "min-cell-size": k,
        "metrics": dict(values.items()),
        "cells": dict(cell_names({split: cells[1:]}).items()),
    }
    if policy.dp_statistics is not None:
        document["dp-statistics"] = (
            "noise drawn here and not accounted in the site's privacy ledger: a sample of "
            "what the site would send; share it as a release only by spending from the budget"
        )
    statistics = out / "statistics.json"
    statistics.write_text(json.dumps(document, indent=1) + "\n")
    logger.info(
        "evaluated %d %s cases: %s, %s", len(data), split, predictions.name, statistics.name
    )
    return EvaluationResult(predictions, statistics, len(data))


def _write_rows(path: Path, rows: list[dict[str, float | int | str]], data: SplitData) -> None:
    for row, line in zip(rows, data.lines or [0] * len(rows), strict=True):
        row["manifest_line"] = line
    for row, attributes in zip(rows, data.attributes or [{}] * len(rows), strict=True):
        row["sex"] = attributes.get("sex", "")
        row["age_band"] = attributes.get("age_band", "")
    columns = list(dict.fromkeys(k for row in rows for k in row))
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
