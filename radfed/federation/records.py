"""What travels between site and server: weights, site identity and statistics, and their checks.

Statistics schema 1, in the reply's one MetricRecord:

- ``num-examples`` (int): cases evaluated (train replies: cases trained on);
- ``schema-version`` (int): ``radfed.STATS_SCHEMA_VERSION``;
- per evaluated split ``S``: ``S.suppressed`` (0/1: fewer cases than the site's minimum
  cell size; all counts are then zero) and ``S.<key>`` for each key of the task's
  statistics (``Task.to_values``; fixed keys and lengths for a run config). For binary
  classification: ``tp``, ``fp``, ``tn``, ``fn`` and ``pos-hist``, ``neg-hist`` (lists of
  ``score-bins`` ints; adjacent bins merged until each non-empty bin holds at least the
  minimum cell size). The task modules document theirs.

The reply's ConfigRecord ``site`` holds ``name``, ``radfed-version`` and ``schema-version``.
Nothing else leaves a site: no per-case value, no path, id, header value or exception text.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from radfed import STATS_SCHEMA_VERSION, __version__
from radfed.config import RunConfig
from radfed.federation.run_folder import POOLED_SITE
from radfed.tasks.base import SplitStats, StatsValue, Task

__all__ = [
    "ARRAYS_KEY",
    "METRICS_KEY",
    "SITE_KEY",
    "InvalidReply",
    "SiteIdentity",
    "cast_like",
    "pack_stats",
    "read_site_identity",
    "unpack_stats",
    "validate_arrays",
]

ARRAYS_KEY = "arrays"
METRICS_KEY = "metrics"
SITE_KEY = "site"


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


def pack_stats(task: Task, stats: Mapping[str, SplitStats]) -> MetricRecord:
    """Statistics per split -> the reply's MetricRecord (schema above)."""
    record: dict[str, StatsValue] = {
        "num-examples": sum(s.n for s in stats.values()),
        "schema-version": STATS_SCHEMA_VERSION,
    }
    for split, s in stats.items():
        record[f"{split}.suppressed"] = int(s.suppressed)
        for key, value in task.to_values(s).items():
            record[f"{split}.{key}"] = value
    return MetricRecord(record)  # type: ignore[arg-type]


def unpack_stats(task: Task, record: MetricRecord, config: RunConfig) -> dict[str, SplitStats]:
    """The reply's MetricRecord -> statistics per evaluated split, checked.

    Raises:
        InvalidReply: a key is missing or extra, the schema version is not this server's,
            a value breaks the task's statistics (wrong type, length, negative, totals that
            disagree), or a suppressed cell carries counts.
    """
    names = list(task.to_values(task.empty_stats(config)))
    expected = {"num-examples", "schema-version"}
    for split in config.eval_splits:
        expected |= {f"{split}.suppressed", *(f"{split}.{k}" for k in names)}
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
    out: dict[str, SplitStats] = {}
    for split in config.eval_splits:
        try:
            stats = task.from_values({k: record[f"{split}.{k}"] for k in names}, config)
        except ValueError as err:
            raise InvalidReply(f"{split}: {err}") from None
        suppressed = record[f"{split}.suppressed"]
        if suppressed not in (0, 1) or isinstance(suppressed, bool):
            raise InvalidReply(f"{split}.suppressed must be 0 or 1")
        if suppressed and stats.n:
            raise InvalidReply(f"{split}: a suppressed cell must not carry counts")
        out[split] = task.empty_stats(config, suppressed=True) if suppressed else stats
    if _count(record["num-examples"], "num-examples") != sum(s.n for s in out.values()):
        raise InvalidReply("num-examples disagrees with the statistics")
    return out


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
