"""The statistics schema: what an evaluation reply carries, and its checks at the server.

Statistics (schema 5), in the reply's one MetricRecord:

- ``num-examples`` (int): cases evaluated (train replies: cases trained on);
- ``schema-version`` (int): ``STATS_SCHEMA_VERSION``;
- per evaluated split ``S``: ``S.suppressed`` (0/1: fewer cases than the site's minimum
  cell size; all counts are then zero), ``S.positives`` (cases with a positive label) and
  ``S.<key>`` for each key of the task's
  statistics (``Task.to_values``; fixed keys and lengths for a run config). For binary
  classification: ``tp``, ``fp``, ``tn``, ``fn`` and ``pos-hist``, ``neg-hist`` (lists of
  ``score-bins`` ints; adjacent bins merged until each non-empty bin holds at least the
  minimum cell size) and ``noise-variance``; where the site's policy sends exact pair
  counts (``exact-auc``), for a cell with at least the minimum cell size of positives and
  of negatives (bins then merged until a bin holding both classes holds that many of
  each) ``auc-exact`` 1, ``auc-mw2`` (int: twice the exact
  Mann-Whitney count of the cell's positive-negative pairs, ties counting 1) and
  ``auc-v10-sq``, ``auc-v01-sq`` (floats: sums of the squared placement values of the
  positives and of the negatives, for DeLong's variance), else ``auc-exact`` 0 and the
  others 0; per-patient sums for cluster-robust variances: ``sens-clusters`` and
  ``spec-clusters`` (ints ``[patients, sum x^2, sum x m, sum m^2]``, ``x`` a patient's true
  positives of its ``m`` positives, true negatives of its negatives), ``auc-clusters``
  (ints ``[patients, with a positive, with a negative]``) and ``auc-cluster-sums`` (ten
  floats of Obuchowski's variance, ``radfed.metrics.clusters.AUC_SUMS``), all 0 when
  fewer patients than the minimum cell size contribute (``radfed.tasks.binary_values``;
  the server refuses values no cell's cases can have). With the site's DP statistics
  (``radfed.privacy.statistics_dp``) the histograms are noisy, unmerged and may hold
  negative counts, the confusion counts and ``positives`` are sums of their bins,
  ``noise-variance`` is the variance of each bin's noise, no cell is suppressed, no exact
  count or per-patient sum is sent and ``num-examples`` is the noisy total (0 when
  below). The task modules document theirs.
- per subgroup cell ``i`` (1, 2, ...) of split ``S``: the same keys under ``S#i.``; the
  reply's ConfigRecord ``cells`` lists per split the cells' names (``sex=F``,
  ``age_band=60-79``, ``sex*age_band=F|60-79``; see ``radfed.metrics.cells``).

A training reply carries the ArrayRecord ``arrays`` (the weights that leave:
``radfed.federation.weights``) and a MetricRecord of exactly ``TRAIN_METRIC_KEYS``. Weights
travel packed, in the server's messages and in training replies alike
(``radfed.federation.packing``): ``arrays`` holds one 1-D ``uint8`` Array ``packed``, every
tensor's raw bytes in the model's state-dict order, without names, shapes or dtypes. Flower
sends a message as one object (and request) per array per hop, so a state dict of 77
tensors would cost some 150 requests per hop; and the receiver slices the bytes by its own
model, so the sender cannot choose what it allocates. Every reply's ConfigRecord ``site``
holds ``name``, ``radfed-version`` and ``schema-version`` (``radfed.federation.identity``).
Nothing else leaves a site: no per-case value, no path, id, header value or exception text.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from flwr.app import ConfigRecord, MetricRecord

from radfed.config import RunConfig
from radfed.data.attributes import AgeBands
from radfed.federation.codes import InvalidReply
from radfed.metrics.cells import ALL, SMALL_GROUPS, cell_name, closed_vocabulary, parse_cell_name
from radfed.tasks import SplitStats, StatsValue, Task

__all__ = [
    "ARRAYS_KEY",
    "CELLS_KEY",
    "CONFIG_KEY",
    "METRICS_KEY",
    "SITE_KEY",
    "STATS_SCHEMA_VERSION",
    "TRAIN_METRIC_KEYS",
    "CellStats",
    "cell_names",
    "pack_stats",
    "unpack_cells",
    "unpack_stats",
]

#: Version of the wire contract that sites send (statistics and, from 4, weights packed into
#: one array: ``radfed.federation.packing``; from 5, segmentation's ``voxels-withheld``); the
#: server refuses others by name.
STATS_SCHEMA_VERSION = 5

ARRAYS_KEY = "arrays"
#: The ConfigRecord of a message to a site (Flower's strategies' ``configrecord_key``).
CONFIG_KEY = "config"
METRICS_KEY = "metrics"
SITE_KEY = "site"
CELLS_KEY = "cells"
#: The keys of a training reply's MetricRecord, exactly: Flower fails the round otherwise.
TRAIN_METRIC_KEYS = frozenset({"num-examples", "train-loss"})


@dataclass(frozen=True)
class CellStats:
    """Statistics of one subgroup cell of a split, as they leave a site.

    Attributes:
        attribute: ``all``, an attribute, or ``a*b``.
        group: the group (``all`` for the cell of every case).
        stats: the task's statistics, after the site's minimum cell size.
        positives: cases with a positive label (0 when suppressed).
    """

    attribute: str
    group: str
    stats: SplitStats
    positives: int


def pack_stats(
    task: Task,
    stats: Mapping[str, SplitStats],
    *,
    cells: Mapping[str, Sequence[CellStats]] | None = None,
    positives: Mapping[str, int] | None = None,
) -> MetricRecord:
    """Statistics per split (and its subgroup cells) -> the reply's MetricRecord.

    Args:
        task: the run's task.
        stats: the statistics of every case of each split (the ``all`` cell).
        cells: per split its subgroup cells other than ``all``, in the order of
            ``cell_names``; keys ``S#i.<key>`` for the i-th.
        positives: per split its positive cases (0 for a suppressed split).
    """
    record: dict[str, StatsValue] = {
        "num-examples": _examples(stats.values()),
        "schema-version": STATS_SCHEMA_VERSION,
    }
    for split, s in stats.items():
        _put(record, split, task, s, (positives or {}).get(split, 0))
        for number, cell in enumerate((cells or {}).get(split, ()), start=1):
            _put(record, f"{split}#{number}", task, cell.stats, cell.positives)
    return MetricRecord(record)  # type: ignore[arg-type]


def _noisy(stats: SplitStats) -> bool:
    """Whether the statistics carry DP noise (their counts may then be negative)."""
    return float(getattr(stats, "noise", 0.0)) > 0


def _examples(stats: Iterable[SplitStats]) -> int:
    """``num-examples``: the cases of the splits, a noisy total taken as 0 when below."""
    return max(0, sum(s.n for s in stats))


def _put(
    record: dict[str, StatsValue], prefix: str, task: Task, stats: SplitStats, positives: int
) -> None:
    record[f"{prefix}.suppressed"] = int(stats.suppressed)
    record[f"{prefix}.positives"] = 0 if stats.suppressed else int(positives)
    for key, value in task.to_values(stats).items():
        record[f"{prefix}.{key}"] = value


def cell_names(cells: Mapping[str, Sequence[CellStats]]) -> ConfigRecord:
    """The reply's ConfigRecord ``cells``: per split the names of its cells ``1..``."""
    return ConfigRecord(
        {split: [cell_name(c.attribute, c.group) for c in items] for split, items in cells.items()}
    )


def unpack_stats(task: Task, record: MetricRecord, config: RunConfig) -> dict[str, SplitStats]:
    """The statistics of every case of each evaluated split (see ``unpack_cells``)."""
    return {
        split: cells[0].stats for split, cells in unpack_cells(task, record, None, config).items()
    }


def unpack_cells(
    task: Task, record: MetricRecord, names: ConfigRecord | None, config: RunConfig
) -> dict[str, list[CellStats]]:
    """The reply's records -> per evaluated split its cells, ``all`` first, checked.

    Raises:
        InvalidReply: a key is missing or extra, the schema version is not this server's,
            a cell names an attribute the run does not report or a group outside a closed
            vocabulary (sex, age band), the reply holds more values than its cells and
            bins, a value breaks the task's
            statistics (wrong type, length, negative, totals that disagree), a suppressed
            cell carries counts, or positives exceed the cases.
    """
    empty = task.to_values(task.empty_stats(config))
    value_keys = list(empty)
    per_cell = ("suppressed", "positives", *value_keys)
    per_cell_values = 2 + sum(len(v) if isinstance(v, list) else 1 for v in empty.values())
    bands = AgeBands(config.age_bands).labels
    cells: dict[str, list[tuple[str, str, str]]] = {}
    given = dict(names.items()) if names is not None else {}
    if set(given) - set(config.eval_splits):
        raise InvalidReply("cell names are given for a split the run does not evaluate")
    for split in config.eval_splits:
        listed = given.get(split, [])
        if not isinstance(listed, list) or not all(isinstance(n, str) for n in listed):
            raise InvalidReply(f"cells of {split} must be a list of names")
        if len(listed) > _MAX_CELLS:
            raise InvalidReply(f"{split} has more than {_MAX_CELLS} cells")
        cells[split] = [(split, ALL, ALL)]
        for number, name in enumerate(listed, start=1):
            try:
                attribute, group = parse_cell_name(str(name), config.subgroups)
            except ValueError as err:
                raise InvalidReply(f"{split} cell {number}: {err}") from None
            vocabulary = closed_vocabulary(attribute, bands)
            if vocabulary is not None and group not in (*vocabulary, SMALL_GROUPS):
                raise InvalidReply(f"{split} cell {number}: a group outside its vocabulary")
            cells[split].append((f"{split}#{number}", attribute, group))
        if len({(a, g) for _, a, g in cells[split]}) != len(cells[split]):
            raise InvalidReply(f"{split} names a cell twice")
    expected = {"num-examples", "schema-version"}
    for entries in cells.values():
        expected |= {f"{prefix}.{k}" for prefix, _, _ in entries for k in per_cell}
    if set(record.keys()) != expected:
        missing = sorted(expected - set(record.keys()))
        extra = sorted(set(record.keys()) - expected)
        raise InvalidReply(
            f"statistics keys differ from schema (missing {missing[:5]}, extra {extra[:5]})"
        )
    size = sum(len(v) if isinstance(v, list) else 1 for v in record.values())
    if size > 2 + per_cell_values * sum(len(entries) for entries in cells.values()):
        raise InvalidReply("the statistics hold more values than their cells and bins")
    schema = record["schema-version"]
    if isinstance(schema, bool) or not isinstance(schema, int):
        raise InvalidReply("schema-version must be an integer")
    if schema != STATS_SCHEMA_VERSION:
        msg = (
            f"statistics schema-version {schema}, this server reads {STATS_SCHEMA_VERSION}; "
            "install the same radfed version at site and server"
        )
        raise InvalidReply(msg)
    for key, value in record.items():
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, float) and not math.isfinite(item):
                raise InvalidReply(f"{key} holds a non-finite value")
            if abs(item) > _LARGEST_COUNT:
                raise InvalidReply(f"{key} holds a value beyond any plausible count")
    out: dict[str, list[CellStats]] = {}
    for split, entries in cells.items():
        out[split] = [
            _cell(task, record, prefix, a, g, value_keys, config) for prefix, a, g in entries
        ]
        noisy = any(_noisy(c.stats) for c in out[split])
        if noisy and not all(_noisy(c.stats) for c in out[split]):
            raise InvalidReply(f"{split}: noisy and exact cells in one split")
        whole = out[split][0].stats  # suppressed while a subgroup leaves: see releases
        if not (noisy or whole.suppressed) and any(c.stats.n > whole.n for c in out[split][1:]):
            raise InvalidReply(f"{split}: a subgroup holds more cases than the split")
    examples = _examples(c[0].stats for c in out.values())
    if _count(record["num-examples"], "num-examples") != examples:
        raise InvalidReply("num-examples disagrees with the statistics")
    return out


#: Most cells a split may have in one reply.
_MAX_CELLS = 500
#: Largest number any statistic may hold (sums of far fewer never overflow int64).
_LARGEST_COUNT = 2**40


def _cell(
    task: Task,
    record: MetricRecord,
    prefix: str,
    attribute: str,
    group: str,
    value_keys: Sequence[str],
    config: RunConfig,
) -> CellStats:
    try:
        stats = task.from_values({k: record[f"{prefix}.{k}"] for k in value_keys}, config)
    except ValueError as err:
        raise InvalidReply(f"{prefix}: {err}") from None
    suppressed = record[f"{prefix}.suppressed"]
    if suppressed not in (0, 1) or isinstance(suppressed, bool):
        raise InvalidReply(f"{prefix}.suppressed must be 0 or 1")
    noisy = _noisy(stats)
    positives = _count(record[f"{prefix}.positives"], f"{prefix}.positives", signed=noisy)
    if suppressed and (stats.n or positives or noisy):
        raise InvalidReply(f"{prefix}: a suppressed cell must not carry counts")
    if positives > stats.n and not noisy:
        raise InvalidReply(f"{prefix}: more positives than cases")
    if suppressed:
        stats = task.empty_stats(config, suppressed=True)
    return CellStats(attribute, group, stats, positives)


def _count(value: object, key: str, *, signed: bool = False) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or (value < 0 and not signed):
        raise InvalidReply(f"{key} must be a non-negative integer")
    return value
