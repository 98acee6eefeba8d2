"""Build the bias report (docs/bias_report.md) from the subgroup cells the sites sent.

Every number comes from merged statistics: per (split, site, attribute, group) the site's
cell, and per (split, attribute, group) the pool of the sites' non-suppressed cells.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Protocol

import numpy as np

from radfed import __version__
from radfed.bias.estimates import METHODS, design_effect, estimates, interval, is_exact
from radfed.bias.figures import curves_from_metrics
from radfed.bias.gaps import GroupCell, judge, summarise
from radfed.config import RunConfig
from radfed.federation.schema import CellStats
from radfed.folders import POOLED_SITE
from radfed.metrics.binary import BinaryStats, noisy_ratio
from radfed.metrics.cells import ALL
from radfed.tasks import SplitStats, Task, merge_stats

__all__ = ["CONFIDENCE", "FORMAT", "FORMAT_VERSION", "build_report", "cramers_v"]

FORMAT = "radfed-bias-report"
FORMAT_VERSION = 2
#: The level of every interval in the report.
CONFIDENCE = 0.95
#: Cramér's V below these is a low / moderate shortcut risk; above, high.
_RISK_EDGES = (0.1, 0.3)

SiteCells = Mapping[str, Mapping[str, Sequence[CellStats]]]


class MetricsHistory(Protocol):
    """What the report reads the curves over rounds from (a run folder's metrics.jsonl)."""

    def read_metrics(self) -> Iterator[dict[str, Any]]: ...


def build_report(
    task: Task,
    config: RunConfig,
    per_site: SiteCells,
    *,
    server_round: int,
    run: MetricsHistory | None = None,
) -> dict[str, Any]:
    """The bias report of one round (a JSON-ready dict; layout in docs/bias_report.md).

    Args:
        task: the run's task.
        config: the run configuration (subgroups, margin, held-out site).
        per_site: per site, per evaluated split, its cells (``all`` first).
        server_round: the round the statistics come from; 0 is before training: the
            report then holds the data's composition and confounder screen only (the
            untrained model's metrics are not reported).
        run: the run folder, for the curves over rounds (metrics.jsonl); optional.
    """
    splits: dict[str, Any] = {}
    roc: dict[str, Any] = {}
    for split in config.eval_splits if server_round > 0 else ():
        rows = _rows(task, config, per_site, split)
        splits[split] = {
            "role": "sealed test" if split == "test" else "internal",
            "cells": [_cell_json(row, config, split) for row in rows],
            "gaps": judge(
                rows,
                merge=lambda parts: merge_stats(task, parts, config),
                margin=config.bias_margin,
                primary=config.primary_subgroups,
                in_sample=_in_sample_sites(rows, config) if split == "train" else frozenset(),
                pooled=POOLED_SITE,
                outside_pool={config.holdout_site} if config.holdout_site else frozenset(),
            ),
        }
        curves = {
            row.site: _roc(row.stats)
            for row in rows
            if row.attribute == ALL and isinstance(row.stats, BinaryStats) and not row.suppressed
        }
        if curves:
            roc[split] = curves
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "radfed_version": __version__,
        "task": task.name,
        "round": server_round,
        "rounds": config.num_server_rounds,
        "settings": {
            "min_cell_size": config.min_cell_size,
            "margin": config.bias_margin,
            "confidence": CONFIDENCE,
            "subgroups": list(config.subgroups),
            "primary_subgroups": list(config.primary_subgroups),
            "holdout_site": config.holdout_site or None,
        },
        "methods": dict(METHODS),
        "splits": splits,
        "composition": _composition(per_site),
        "confounders": _confounders(per_site, config),
        "curves": {} if run is None else curves_from_metrics(run.read_metrics(), [task.headline]),
        "roc": roc,
        "summary": summarise(splits),
    }


_Row = GroupCell


def _in_sample_sites(rows: list[_Row], config: RunConfig) -> frozenset[str]:
    """The sites (and the pool) whose training cases the model was fitted to: all but a
    held-out site."""
    return frozenset(row.site for row in rows if row.site != config.holdout_site)


def _rows(task: Task, config: RunConfig, per_site: SiteCells, split: str) -> list[_Row]:
    rows: list[_Row] = []
    pooled: dict[tuple[str, str], list[CellStats]] = defaultdict(list)
    for site in sorted(per_site):
        for cell in per_site[site].get(split, ()):
            rows.append(_Row(site, cell.attribute, cell.group, cell.stats, cell.positives))
            if site != config.holdout_site:
                pooled[(cell.attribute, cell.group)].append(cell)
    for (attribute, group), cells in pooled.items():
        kept = [c for c in cells if not c.stats.suppressed]
        stats = merge_stats(task, (c.stats for c in kept), config)
        if not kept:
            stats = task.empty_stats(config, suppressed=True)
        rows.append(_Row(POOLED_SITE, attribute, group, stats, sum(c.positives for c in kept)))
    return rows


def _cell_json(row: _Row, config: RunConfig, split: str) -> dict[str, Any]:
    role = "sealed test" if split == "test" else "internal"
    if config.holdout_site and row.site == config.holdout_site:
        role = "held-out site"
    return {
        "site": row.site,
        "attribute": row.attribute,
        "group": row.group,
        "role": role,
        "n": None if row.suppressed else row.stats.n,
        "suppressed": row.suppressed,
        "noise_sd": _noise_sd(row.stats),
        "positives": None if row.suppressed else row.positives,
        "metrics": {
            name: _clean(interval(metric.estimate, CONFIDENCE).to_dict())
            for name, metric in row.metrics.items()
        },
        "design_effect": {
            name: _round(deff)
            for name, metric in row.metrics.items()
            if (deff := design_effect(metric.estimate)) is not None
        },
        "exact_auc": "auc" in row.metrics and is_exact(row.metrics["auc"].estimate),
    }


def _noise_sd(stats: SplitStats) -> float | None:
    """The standard deviation of the DP noise on each count of a cell; None when exact."""
    noise = float(getattr(stats, "noise", 0.0))
    return _round(math.sqrt(noise)) if noise > 0 else None


def _composition(per_site: SiteCells) -> list[dict[str, Any]]:
    out = []
    for site in sorted(per_site):
        for split, cells in per_site[site].items():
            first = cells[0]
            groups: dict[str, dict[str, int]] = defaultdict(dict)
            hidden: dict[str, list[str]] = defaultdict(list)
            for cell in cells[1:]:
                if cell.stats.suppressed:
                    hidden[cell.attribute].append(cell.group)
                else:
                    groups[cell.attribute][cell.group] = cell.stats.n
            n = None if first.stats.suppressed else first.stats.n
            out.append(
                {
                    "site": site,
                    "split": split,
                    "n": n,
                    "positives": None if n is None else first.positives,
                    "prevalence": None if n is None else _round(noisy_ratio(first.positives, n)),
                    "noise_sd": _noise_sd(first.stats),
                    "groups": dict(groups),
                    "suppressed_groups": dict(hidden),
                }
            )
    return out


def cramers_v(table: np.ndarray) -> float | None:
    """Cramér's V of a contingency table (rows: groups, columns: label); None if degenerate."""
    table = np.asarray(table, dtype=np.float64)
    table = table[table.sum(axis=1) > 0][:, table.sum(axis=0) > 0]
    if table.shape[0] < 2 or table.shape[1] < 2:
        return None
    total = table.sum()
    expected = np.outer(table.sum(axis=1), table.sum(axis=0)) / total
    chi2 = float(np.sum((table - expected) ** 2 / expected))
    return math.sqrt(chi2 / (total * (min(table.shape) - 1)))


def _confounders(per_site: SiteCells, config: RunConfig) -> list[dict[str, Any]]:
    """How strongly each attribute predicts the label at each site (training cases)."""
    out = []
    for site in sorted(per_site):
        cells_by_split = per_site[site]
        split = "train" if "train" in cells_by_split else next(iter(cells_by_split), None)
        if split is None:
            continue
        by_attribute: dict[str, list[CellStats]] = defaultdict(list)
        for cell in cells_by_split[split][1:]:
            if not cell.stats.suppressed and "*" not in cell.attribute:
                by_attribute[cell.attribute].append(cell)
        for attribute in config.subgroups:
            cells = by_attribute.get(attribute, [])
            table = np.array([[c.positives, c.stats.n - c.positives] for c in cells])
            value = cramers_v(np.maximum(table, 0)) if len(cells) >= 2 else None
            if value is None:
                continue
            risk = (
                "low"
                if value < _RISK_EDGES[0]
                else "moderate"
                if value < _RISK_EDGES[1]
                else "high"
            )
            out.append(
                {
                    "site": site,
                    "split": split,
                    "attribute": attribute,
                    "cramers_v": _round(value),
                    "prevalence_by_group": {
                        c.group: _round(noisy_ratio(c.positives, c.stats.n))
                        for c in cells
                        if c.stats.n > 0
                    },
                    "risk": risk,
                }
            )
    return out


def _roc(stats: SplitStats) -> dict[str, Any]:
    """ROC points from score histograms, thresholds from the highest bin down."""
    assert isinstance(stats, BinaryStats)
    pos = np.maximum(np.asarray(stats.pos_hist, dtype=np.float64)[::-1], 0)  # noisy bins
    neg = np.maximum(np.asarray(stats.neg_hist, dtype=np.float64)[::-1], 0)
    if pos.sum() == 0 or neg.sum() == 0:
        return {"fpr": [], "tpr": [], "auc": None}
    keep = (pos + neg) > 0
    tpr = np.concatenate(([0.0], np.cumsum(pos)[keep] / pos.sum()))
    fpr = np.concatenate(([0.0], np.cumsum(neg)[keep] / neg.sum()))
    value = interval(estimates(stats)["auc"].estimate, CONFIDENCE).value
    return {"fpr": [_round(v) for v in fpr], "tpr": [_round(v) for v in tpr], "auc": value}


def _round(value: float | None) -> float | None:
    if value is None or not math.isfinite(value):
        return None
    return round(float(value), 6)


def _clean(values: Mapping[str, float | None]) -> dict[str, float | None]:
    return {k: _round(v) for k, v in values.items()}
