"""The site's audit log: one hash-chained JSON line for every message that leaves the site,
with what was asked for it.

``SITE_DIR/.radfed/audit.jsonl`` (0600, in a 0700 folder) is append-only and written by the
site's own code (no code of a run's bundle runs at a site). Each line is a JSON object with
sorted keys::

    {"bytes": 1234, "error-code": null, "hash": "...", "kind": "evaluate", "prev": "...",
     "records": {"metrics": {"keys": ["num-examples", ...], "type": "metric"}},
     "released": {"metrics": {"num-examples": 60, "val.tp": 12, ...}},
     "request": {"bundle-sha256": "...", "config-sha256": "...", "eval-splits": ["val"],
                 "kind": "evaluate", "message-config": {"server-round": 3},
                 "weights-sha256": "..."},
     "round": 3, "run": 7, "seq": 12, "sha256": "...", "time": "2025-...", "v": 2}

``bytes`` and ``sha256`` are the length and SHA-256 of the content as Flower serializes it
(``radfed.flower_private.serialize_content``, deterministic protobuf encoding); ``records``
names what left (array names, shapes and dtypes: the weights travel packed, as one ``uint8``
array ``packed`` of the model's size, ``radfed.federation.packing``; metric and config
keys) and ``released`` holds the values of its metric and config records: the aggregate
statistics the site agreed to release (weights are named and hashed, not copied).
``request`` says what was asked: the message kind, the SHA-256 of the run configuration, of
the run's app bundle (null in a simulation) and of the received weights (``weights_digest``
of the packed record as it arrived), the message's own settings, and for an evaluation the
splits asked for. Settings are bounded: the ones the site reads first, at most 32, long
values as a digest; when some are left out, ``message-config-more`` counts them and
``message-config-sha256`` digests them all.

``seq`` counts lines from 1, ``prev`` is the SHA-256 of the previous line (64 zeros on the
first) and ``hash`` the SHA-256 of the line's own canonical JSON without ``hash``, so
``verify`` finds an edited, removed, inserted or moved line. Removing lines at the end
shows only against a count or hash kept elsewhere (``verify`` returns the count). Lines of
radfed 0.1's first format (without ``v``, ``request`` and ``released``) still verify.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from radfed.errors import DataError
from radfed.flower_private import serialize_content
from radfed.folders import SiteFolder

__all__ = [
    "AuditEntry",
    "AuditKind",
    "AuditLog",
    "Request",
    "read_entries",
    "serialize_content",
    "verify",
    "weights_digest",
]

#: ``prev`` of the first line.
GENESIS = "0" * 64
#: The format of the lines this radfed writes (1: without request and released values).
FORMAT = 2


class AuditKind(StrEnum):
    """What kind of reply left the site."""

    TRAIN = "train"
    EVALUATE = "evaluate"
    QUERY = "query"
    ERROR = "error"


def _describe(content: RecordDict) -> dict[str, dict[str, Any]]:
    """Names, shapes, dtypes and keys of a reply's records; never a value."""
    out: dict[str, dict[str, Any]] = {}
    for key, record in content.items():
        if isinstance(record, ArrayRecord):
            arrays = [
                {"name": n, "shape": list(a.shape), "dtype": a.dtype} for n, a in record.items()
            ]
            out[key] = {"type": "array", "arrays": arrays}
        elif isinstance(record, MetricRecord | ConfigRecord):
            kind = "metric" if isinstance(record, MetricRecord) else "config"
            out[key] = {"type": kind, "keys": list(record.keys())}
        else:  # pragma: no cover - RecordDict admits only the three record types
            raise TypeError(f"record {key!r} has an unknown type {type(record).__name__}")
    return out


def _released(content: RecordDict) -> dict[str, dict[str, Any]]:
    """The values of a reply's metric and config records: the statistics that left."""
    return {
        key: dict(record.items())
        for key, record in content.items()
        if isinstance(record, MetricRecord | ConfigRecord)
    }


def weights_digest(arrays: ArrayRecord) -> str:
    """SHA-256 over the names and serialized bytes of an ArrayRecord's arrays, in order."""
    digest = hashlib.sha256()
    for name, array in arrays.items():
        digest.update(name.encode() + b"\0" + array.data + b"\0")
    return digest.hexdigest()


def message_category(message_type: str) -> str:
    """``train``, ``evaluate`` or ``query`` of a Flower message type, with or without its
    action (Flower sends ``evaluate.default`` to the same handler as ``evaluate``)."""
    return message_type.partition(".")[0]


@dataclass(frozen=True, kw_only=True)
class Request:
    """What the server asked for with the message a reply answers.

    Attributes:
        kind: the request's message type (train, evaluate, query).
        config_sha256: SHA-256 of the run configuration (canonical JSON).
        bundle_sha256: SHA-256 of the run's app bundle; None in a simulation.
        weights_sha256: ``weights_digest`` of the received weights; None without weights.
        message_config: the message's own settings (server round, FedProx's mu), the
            ones the site reads first, bounded (``_auditable``).
        eval_splits: for an evaluation, the splits asked for.
        message_config_more: how many settings were left out of ``message_config``.
        message_config_sha256: with some left out, the SHA-256 of all the settings.
    """

    kind: str
    config_sha256: str
    bundle_sha256: str | None = None
    weights_sha256: str | None = None
    message_config: Mapping[str, Any] = field(default_factory=dict)
    eval_splits: tuple[str, ...] = ()
    message_config_more: int = 0
    message_config_sha256: str | None = None

    @classmethod
    def describe(
        cls,
        kind: str,
        run_config: Mapping[str, Any],
        *,
        bundle_sha256: str | None = None,
        arrays: ArrayRecord | None = None,
        message_config: Mapping[str, Any] | None = None,
    ) -> Request:
        """The request of a message, from the run configuration and what it carried.
        ``kind`` is the message type as received (``evaluate``, ``evaluate.default``)."""
        splits = run_config.get("eval-splits", "")
        asked = tuple(s.strip() for s in str(splits).split(",") if s.strip())
        kept, more, digest = _auditable(message_config or {})
        return cls(
            kind=str(_bounded(kind)),
            config_sha256=_sha256(_canonical({str(k): v for k, v in run_config.items()})),
            bundle_sha256=bundle_sha256,
            weights_sha256=weights_digest(arrays) if arrays is not None else None,
            message_config=kept,
            message_config_more=more,
            message_config_sha256=digest,
            eval_splits=tuple(str(_bounded(s)) for s in asked[:_MAX_ITEMS])
            if message_category(kind) == "evaluate"
            else (),
        )

    @property
    def category(self) -> str:
        """The handler the message reached: ``evaluate`` for ``evaluate.default`` too."""
        return message_category(self.kind)

    def to_json(self) -> dict[str, Any]:
        obj: dict[str, Any] = {
            "kind": self.kind,
            "config-sha256": self.config_sha256,
            "bundle-sha256": self.bundle_sha256,
            "weights-sha256": self.weights_sha256,
            "message-config": dict(self.message_config),
            "eval-splits": list(self.eval_splits),
        }
        if self.message_config_more:  # only then, so that earlier lines still verify
            obj["message-config-more"] = self.message_config_more
            obj["message-config-sha256"] = self.message_config_sha256
        return obj

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> Request:
        return cls(
            kind=str(obj["kind"]),
            config_sha256=str(obj["config-sha256"]),
            bundle_sha256=obj["bundle-sha256"],
            weights_sha256=obj["weights-sha256"],
            message_config=dict(obj["message-config"]),
            eval_splits=tuple(obj["eval-splits"]),
            message_config_more=int(obj.get("message-config-more", 0)),
            message_config_sha256=obj.get("message-config-sha256"),
        )


#: What the audit log keeps of a request's own values, whatever the server sends: this many
#: settings, strings of this length; longer ones and other types are kept as a digest.
_MAX_ITEMS, _MAX_TEXT = 32, 128


def _bounded(value: object) -> bool | int | float | str:
    """``value`` as the audit log keeps it: a finite number or a short string as it is,
    anything else (a long string, bytes, a list) as its type, size and digest."""
    if isinstance(value, bool | int) and abs(int(value)) < 2**63:
        return value
    if isinstance(value, float) and math.isfinite(value):
        return value
    if isinstance(value, str) and len(value) <= _MAX_TEXT:
        return value
    data = value if isinstance(value, bytes) else repr(value).encode("utf-8", "replace")
    return f"<{type(value).__name__} of {len(data)} bytes, sha256 {_sha256(data)[:16]}>"


#: The message settings the site's code reads (radfed.site.node.message_setting): kept
#: first, so that no number of other settings pushes them out of the log.
READ_SETTINGS = ("server-round", "proximal-mu")


def _auditable(config: Mapping[str, Any]) -> tuple[dict[str, Any], int, str | None]:
    """A message's settings as the log keeps them: those the site reads
    (``READ_SETTINGS``) first, then the others in the message's order, ``_MAX_ITEMS`` in
    all, bounded (``_bounded``); how many were left out, and with any left out the SHA-256
    of them all."""
    items = sorted(config.items(), key=lambda kv: kv[0] not in READ_SETTINGS)
    kept = {str(_bounded(str(k))): _bounded(v) for k, v in items[:_MAX_ITEMS]}
    more = len(items) - len(items[:_MAX_ITEMS])
    digest = _sha256(_canonical({str(k): v for k, v in items})) if more else None
    return kept, more, digest


def _canonical(obj: Mapping[str, Any]) -> bytes:
    return json.dumps(
        obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, default=repr
    ).encode()


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass(frozen=True, kw_only=True)
class AuditEntry:
    """One line of the audit log (see the module docstring for the JSON keys)."""

    seq: int
    time: str
    run_id: int
    server_round: int
    kind: AuditKind
    nbytes: int
    sha256: str | None
    error_code: int | None
    records: Mapping[str, Mapping[str, Any]]
    prev: str
    request: Request | None = None
    released: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    version: int = FORMAT

    def to_json(self) -> dict[str, Any]:
        """The line's JSON object without its own ``hash``."""
        obj: dict[str, Any] = {
            "seq": self.seq,
            "time": self.time,
            "run": self.run_id,
            "round": self.server_round,
            "kind": str(self.kind),
            "bytes": self.nbytes,
            "sha256": self.sha256,
            "error-code": self.error_code,
            "records": self.records,
            "prev": self.prev,
        }
        if self.version >= 2:
            obj["v"] = self.version
            obj["request"] = None if self.request is None else self.request.to_json()
            obj["released"] = dict(self.released)
        return obj

    def line(self) -> bytes:
        """The line as written (without the newline), its own ``hash`` included."""
        obj = self.to_json()
        return _canonical({**obj, "hash": _sha256(_canonical(obj))})

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> AuditEntry:
        """Raises KeyError, TypeError or ValueError when ``obj`` is not an entry."""
        version = obj.get("v", 1)
        if version not in (1, FORMAT) or isinstance(version, bool):
            raise ValueError("unknown format")
        request = obj["request"] if version >= 2 else None
        entry = cls(
            request=None if request is None else Request.from_json(request),
            released=obj["released"] if version >= 2 else {},
            version=version,
            seq=obj["seq"],
            time=obj["time"],
            run_id=obj["run"],
            server_round=obj["round"],
            kind=AuditKind(obj["kind"]),
            nbytes=obj["bytes"],
            sha256=obj["sha256"],
            error_code=obj["error-code"],
            records=obj["records"],
            prev=obj["prev"],
        )
        if set(obj) - {"hash"} != set(entry.to_json()):
            raise ValueError("unexpected keys")
        return entry


class AuditLog:
    """Appends entries to a site's audit log; several processes may append in turn."""

    def __init__(self, path: Path) -> None:
        self.path = path

    @classmethod
    def for_site(cls, site_dir: Path) -> AuditLog:
        """The log of a site folder: ``SITE_DIR/.radfed/audit.jsonl``."""
        return cls(SiteFolder(site_dir).state.audit_log)

    def record(
        self,
        content: RecordDict | None,
        *,
        run_id: int,
        server_round: int,
        kind: str,
        error_code: int | None = None,
        request: Request | None = None,
        payload: bytes | None = None,
    ) -> AuditEntry:
        """Append one entry for a reply about to leave (``content`` None for an error reply),
        with the request it answers. ``payload``: ``serialize_content(content)`` when the
        caller has it already (the bytes that leave; serialized here otherwise).

        Raises:
            ValueError: ``kind`` is not train, evaluate, query or error.
            DataError: the log's last line is not an entry (check it with ``verify``).
        """
        kind = AuditKind(kind)
        if content is None:
            payload = None
        elif payload is None:
            payload = serialize_content(content)
        records = _describe(content) if content is not None else {}
        self.path.parent.mkdir(mode=0o700, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # the tail read and the append are one step
            last = _last_line(self.path)
            entry = AuditEntry(
                seq=1 if last is None else _seq_of(last) + 1,
                time=datetime.now(UTC).isoformat(timespec="milliseconds"),
                run_id=int(run_id),
                server_round=int(server_round),
                kind=kind,
                nbytes=0 if payload is None else len(payload),
                sha256=None if payload is None else _sha256(payload),
                error_code=error_code,
                records=records,
                prev=GENESIS if last is None else _sha256(last),
                request=request,
                released=_released(content) if content is not None else {},
            )
            line = entry.line() + b"\n"
            if os.write(fd, line) != len(line):
                raise OSError("short write to the audit log")
            os.fsync(fd)
        finally:
            os.close(fd)
        return entry


def _last_line(path: Path, block: int = 1 << 16) -> bytes | None:
    """The file's last line without its newline, read from the end; None when empty."""
    with path.open("rb") as f:
        pos = f.seek(0, os.SEEK_END)
        buf = b""
        while True:
            text = buf.removesuffix(b"\n")
            cut = text.rfind(b"\n")
            if cut >= 0 or pos == 0:
                return text[cut + 1 :] if text or cut >= 0 else None
            step = min(block, pos)
            pos -= step
            f.seek(pos)
            buf = f.read(step) + buf


def _seq_of(line: bytes) -> int:
    try:
        seq = json.loads(line)["seq"]
    except (ValueError, KeyError, TypeError):
        seq = None
    if not isinstance(seq, int) or isinstance(seq, bool):
        msg = "the audit log's last line is not an entry; run verify, then move the file aside"
        raise DataError(msg)
    return seq


def _lines(path: Path) -> list[bytes]:
    try:
        data = path.read_bytes()
    except OSError as err:
        raise DataError(f"audit log {path} cannot be read ({err.strerror})") from None
    return data.removesuffix(b"\n").split(b"\n") if data else []


def _parse(line: bytes, number: int, path: Path) -> AuditEntry:
    try:
        return AuditEntry.from_json(json.loads(line))
    except (ValueError, KeyError, TypeError):
        msg = f"audit log {path.name}: line {number} is not an audit entry (JSON object)"
        raise DataError(msg) from None


def read_entries(path: Path) -> list[AuditEntry]:
    """The entries of a log, in order, for display (``verify`` checks the chain).

    Raises:
        DataError: the file cannot be read or a line is not an entry (named by number).
    """
    return [_parse(line, i, path) for i, line in enumerate(_lines(path), start=1)]


def verify(path: Path) -> int:
    """Check every line's own hash, number and link to the line before; the entry count.

    Raises:
        DataError: naming the first line that is not an entry, was edited, or does not
            follow the line before it (a line removed, inserted or moved).
    """
    prev = GENESIS
    lines = _lines(path)
    for number, line in enumerate(lines, start=1):
        entry = _parse(line, number, path)
        where = f"audit log {path.name}: line {number}"
        if line != entry.line():  # its own hash, or its bytes, differ from what was written
            raise DataError(f"{where} was edited: it does not match its own hash")
        if entry.seq != number:
            msg = f"{where} holds entry {entry.seq}: lines were removed, inserted or moved"
            raise DataError(msg)
        if entry.prev != prev:
            raise DataError(f"{where} does not follow line {number - 1}: the chain is broken")
        prev = _sha256(line)
    return len(lines)
