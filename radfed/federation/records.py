"""What travels between site and server: weights, site identity and statistics, and their checks.

Statistics schema 1, in the reply's one MetricRecord:

- ``num-examples`` (int): cases evaluated (train replies: cases trained on);
- ``schema-version`` (int): ``radfed.STATS_SCHEMA_VERSION``;
- per evaluated split ``S``: ``S.suppressed`` (0/1: fewer cases than the site's minimum
  cell size; all counts are then zero), ``S.positives`` (cases with a positive label) and
  ``S.<key>`` for each key of the task's
  statistics (``Task.to_values``; fixed keys and lengths for a run config). For binary
  classification: ``tp``, ``fp``, ``tn``, ``fn`` and ``pos-hist``, ``neg-hist`` (lists of
  ``score-bins`` ints; adjacent bins merged until each non-empty bin holds at least the
  minimum cell size). The task modules document theirs.
- per subgroup cell ``i`` (1, 2, ...) of split ``S``: the same keys under ``S#i.``; the
  reply's ConfigRecord ``cells`` lists per split the cells' names (``sex=F``,
  ``age_band=60-79``, ``sex*age_band=F|60-79``; see ``radfed.bias.cells``).

The reply's ConfigRecord ``site`` holds ``name``, ``radfed-version`` and ``schema-version``.
Nothing else leaves a site: no per-case value, no path, id, header value or exception text.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from radfed import STATS_SCHEMA_VERSION, __version__
from radfed.bias.cells import ALL, cell_name, parse_cell_name
from radfed.config import RunConfig
from radfed.federation.run_folder import POOLED_SITE
from radfed.tasks.base import SplitStats, StatsValue, Task

__all__ = [
    "ARRAYS_KEY",
    "CELLS_KEY",
    "METRICS_KEY",
    "SITE_KEY",
    "CellStats",
    "InvalidReply",
    "SiteIdentity",
    "cast_like",
    "cell_names",
    "pack_stats",
    "read_site_identity",
    "unpack_cells",
    "unpack_stats",
    "validate_arrays",
]

ARRAYS_KEY = "arrays"
METRICS_KEY = "metrics"
SITE_KEY = "site"
CELLS_KEY = "cells"


class InvalidReply(ValueError):
    """A site's reply breaks the contract; the message names what, never the content."""


@dataclass(frozen=True)
class SiteIdentity:
    """Who replied, with which radfed and statistics schema."""

    name: str
    radfed_version: str
    schema_version: int

    @classmethod
    def local(cls, name: str) -> SiteIdentity:
        return cls(name=name, radfed_version=__version__, schema_version=STATS_SCHEMA_VERSION)

    def to_record(self) -> ConfigRecord:
        return ConfigRecord(
            {
                "name": self.name,
                "radfed-version": self.radfed_version,
                "schema-version": self.schema_version,
            }
        )


def read_site_identity(content: RecordDict) -> SiteIdentity:
    """Read and check the identity of a reply.

    Raises:
        InvalidReply: no identity, the name reserved for pooled metrics, or a radfed/schema
            version this server cannot read.
    """
    record = content.config_records.get(SITE_KEY)
    if record is None:
        raise InvalidReply("reply carries no site identity (is the site running radfed?)")
    name = record.get("name")
    version = record.get("radfed-version")
    schema = record.get("schema-version")
    if (
        not isinstance(name, str)
        or not name
        or not isinstance(version, str)
        or not isinstance(schema, int)
    ):
        raise InvalidReply("reply carries a malformed site identity")
    if name == POOLED_SITE:
        msg = (
            f"site name {name!r} is reserved for the pooled metrics; "
            "give the site another name in its node config"
        )
        raise InvalidReply(msg)
    if schema != STATS_SCHEMA_VERSION:
        msg = (
            f"site {name!r} sends statistics schema {schema}, this server reads "
            f"{STATS_SCHEMA_VERSION}; install the same radfed version at site and server"
        )
        raise InvalidReply(msg)
    if _release(version) != _release(__version__):
        msg = (
            f"site {name!r} runs radfed {version}, the server {__version__}; "
            "install the same radfed release at site and server"
        )
        raise InvalidReply(msg)
    return SiteIdentity(name=name, radfed_version=version, schema_version=schema)


def _release(version: str) -> tuple[str, ...]:
    """The part of a version that must match: major, and minor while the major is 0."""
    parts = version.split(".")
    return tuple(parts[:2]) if parts[0] == "0" else tuple(parts[:1])


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
        "num-examples": sum(s.n for s in stats.values()),
        "schema-version": STATS_SCHEMA_VERSION,
    }
    for split, s in stats.items():
        _put(record, split, task, s, (positives or {}).get(split, 0))
        for number, cell in enumerate((cells or {}).get(split, ()), start=1):
            _put(record, f"{split}#{number}", task, cell.stats, cell.positives)
    return MetricRecord(record)  # type: ignore[arg-type]


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
            a cell names an attribute the run does not report, a value breaks the task's
            statistics (wrong type, length, negative, totals that disagree), a suppressed
            cell carries counts, or positives exceed the cases.
    """
    value_keys = list(task.to_values(task.empty_stats(config)))
    per_cell = ("suppressed", "positives", *value_keys)
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
        if any(c.stats.n > out[split][0].stats.n for c in out[split][1:]):
            raise InvalidReply(f"{split}: a subgroup holds more cases than the split")
    if _count(record["num-examples"], "num-examples") != sum(c[0].stats.n for c in out.values()):
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
    positives = _count(record[f"{prefix}.positives"], f"{prefix}.positives")
    if suppressed and (stats.n or positives):
        raise InvalidReply(f"{prefix}: a suppressed cell must not carry counts")
    if positives > stats.n:
        raise InvalidReply(f"{prefix}: more positives than cases")
    if suppressed:
        stats = task.empty_stats(config, suppressed=True)
    return CellStats(attribute, group, stats, positives)


def _count(value: object, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InvalidReply(f"{key} must be a non-negative integer")
    return value


def validate_arrays(
    record: ArrayRecord,
    reference: Mapping[str, torch.Tensor],
    *,
    max_update_norm: float | None = None,
) -> None:
    """Check an update against the global model: names, decoded shapes and dtypes, values.

    Each array is decoded as aggregation will decode it, so the checks hold for the data
    and not only for the declared ``shape``/``dtype`` metadata.

    Args:
        record: the update as received.
        reference: the current global weights.
        max_update_norm: largest allowed L2 distance between the update and ``reference``,
            over the floating-point tensors taken together; None for no bound.

    Raises:
        InvalidReply: naming the first offending array, or the norm and its bound.
    """
    if list(record.keys()) != list(reference.keys()):
        missing = sorted(set(reference) - set(record.keys()))
        extra = sorted(set(record.keys()) - set(reference))
        raise InvalidReply(
            f"weights differ from the model (missing {missing[:3]}, extra {extra[:3]})"
        )
    squared = 0.0
    for name, ref in reference.items():
        expected = ref.detach().cpu().numpy()
        values = _decode(record, name)
        if values.shape != expected.shape:
            raise InvalidReply(
                f"weight {name!r} has shape {values.shape}, expected {expected.shape}"
            )
        if values.dtype != expected.dtype:
            raise InvalidReply(
                f"weight {name!r} has dtype {values.dtype}, expected {expected.dtype}"
            )
        if values.dtype.kind != "f":
            continue
        if not np.isfinite(values).all():
            raise InvalidReply(f"weight {name!r} holds non-finite values")
        if max_update_norm is not None:
            with np.errstate(over="ignore", invalid="ignore"):
                diff = values.astype(np.float64) - expected.astype(np.float64)
                squared += float(np.sum(np.square(diff)))
    if max_update_norm is not None:
        norm = math.sqrt(squared)
        if not norm <= max_update_norm:
            raise InvalidReply(
                f"update is {norm:.3g} from the global model (L2), above the bound "
                f"{max_update_norm:.3g}"
            )


def _decode(record: ArrayRecord, name: str) -> np.ndarray:
    """One array of ``record`` decoded as aggregation decodes it.

    Raises:
        InvalidReply: the array cannot be decoded to a NumPy array (the cause is not told:
            its text may quote the received bytes).
    """
    try:
        values = record[name].numpy()
    except Exception:
        raise InvalidReply(f"weight {name!r} cannot be decoded as a NumPy array") from None
    if not isinstance(values, np.ndarray):
        raise InvalidReply(f"weight {name!r} cannot be decoded as a NumPy array")
    return values


def cast_like(
    record: ArrayRecord, reference: Mapping[str, torch.Tensor]
) -> OrderedDict[str, torch.Tensor]:
    """Aggregated arrays as a state dict with the reference dtypes.

    Weighted averaging turns integer buffers (BatchNorm ``num_batches_tracked``) into
    float64; they are rounded back to their integer dtype here.
    """
    out: OrderedDict[str, torch.Tensor] = OrderedDict()
    for name, ref in reference.items():
        value = torch.from_numpy(np.array(record[name].numpy()))
        if not ref.dtype.is_floating_point:
            value = torch.round(value)
        out[name] = value.to(ref.dtype)
    return out
