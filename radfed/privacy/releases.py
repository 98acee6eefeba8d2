"""The site's record of which cases each released cell covered, over every run.

Disclosure control makes one evaluation's cells safe together; but a site's cases change
between runs (new patients join a split, a manifest row is fixed, a run's settings make a
case unreadable), and a cell released before and again after a change differs by the cases
that changed: ``sex=F`` of last month minus ``sex=F`` of today is one new woman. So the site
keeps the case set of every cell it released, by case key (``SplitData.cases``: an HMAC
with the site's secret, never a patient id or path), in ``SITE_DIR/.radfed/releases.jsonl``
(0600, one JSON line per distinct case set, appended under a lock), and each evaluation's
suppression counts the earlier sets as released cells it cannot take back
(``radfed.metrics.cells.suppressed_cells``, ``earlier``).

The parts of a cell's statistics over a sub-population that depends on the cases alone
(``Task.stable_parts``: the cases with ground-truth foreground behind a Dice) are recorded
alike, per part the set of cases holding units of it, and protected against in the same
way (``radfed.metrics.cells.withheld_part``).

A set is recorded when its statistics are computed, before the reply is sent: a reply that
never arrives still counts (more suppression later, never less). ``radfed evaluate`` reads
the record without adding to it, so it shows what a run would receive.
"""

from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from radfed.errors import DataError

__all__ = ["ReleaseRecord", "SplitReleases"]


class SplitReleases:
    """What one split released before, and a way to add what it releases now.

    Attributes:
        earlier: the case sets of the cells released before, in any run.
    """

    def __init__(
        self,
        split: str,
        earlier: Mapping[str | None, Iterable[frozenset[str]]],
        fd: int | None,
    ) -> None:
        self.split = split
        self._sets = {part: frozenset(sets) for part, sets in earlier.items()}
        self._fd = fd

    @property
    def earlier(self) -> frozenset[frozenset[str]]:
        return self._sets.get(None, frozenset())

    def part(self, name: str) -> frozenset[frozenset[str]]:
        """The case sets (cases with units of the part) of the cells that released part
        ``name`` of their statistics before (``CaseOutputs.parts``)."""
        return self._sets.get(name, frozenset())

    def add(self, released: Iterable[frozenset[str]], part: str | None = None) -> None:
        """Record the case sets of cells released now (or of the cells that released a
        part), those not recorded yet; a read-only view (``ReleaseRecord.read``) records
        nothing."""
        if self._fd is None:
            return
        known = self._sets.get(part, frozenset())
        lines = []
        for cases in released:
            if cases and cases not in known:
                entry: dict[str, object] = {"split": self.split, "cases": sorted(cases)}
                if part is not None:
                    entry["part"] = part
                lines.append(json.dumps(entry) + "\n")
                known |= {cases}
        self._sets[part] = known
        data = "".join(lines).encode()
        if data and os.write(self._fd, data) != len(data):
            raise OSError("short write to the record of released cells")
        if data:
            os.fsync(self._fd)


class ReleaseRecord:
    """``SITE_DIR/.radfed/releases.jsonl``: per split, every case set a cell released."""

    def __init__(self, path: Path) -> None:
        self.path = path

    @contextmanager
    def locked(self) -> Iterator[dict[str, SplitReleases]]:
        """Hold the record's lock while an evaluation decides what leaves and records it:
        per split name (any asked for), its earlier releases."""
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            data = self.path.read_bytes()
            if data and not data.endswith(b"\n"):  # an append cut short: it never left
                os.ftruncate(fd, data.rfind(b"\n") + 1)
            per_split = self._read()
            yield _Splits(per_split, fd)
        finally:
            os.close(fd)

    def read(self, split: str) -> SplitReleases:
        """One split's earlier releases, read-only (``add`` records nothing)."""
        return SplitReleases(split, self._read().get(split, {}), None)

    def _read(self) -> dict[str, dict[str | None, set[frozenset[str]]]]:
        out: dict[str, dict[str | None, set[frozenset[str]]]] = {}
        try:
            text = self.path.read_bytes().decode()
            # a last line without its newline is an append cut short (a crash): the set is
            # written before its reply leaves, so that reply never left
            for line in text.splitlines(keepends=True):
                if not line.strip() or not line.endswith("\n"):
                    continue
                entry = json.loads(line)
                split, cases, part = entry["split"], entry["cases"], entry.get("part")
                if not (isinstance(split, str) and isinstance(cases, list)):
                    raise ValueError
                if not (part is None or isinstance(part, str)):
                    raise ValueError
                if not all(isinstance(c, str) for c in cases):
                    raise ValueError
                out.setdefault(split, {}).setdefault(part, set()).add(frozenset(cases))
        except FileNotFoundError:
            return out
        except (ValueError, KeyError, TypeError, UnicodeDecodeError):
            msg = (
                f"{self.path.name}: the site's record of released cells is not radfed's; "
                "restore it from a backup (without it, a cell could be differenced against "
                "one released before)"
            )
            raise DataError(msg) from None
        return out


class _Splits(dict[str, SplitReleases]):
    """Per split its ``SplitReleases`` (created on first use), writing to one locked file."""

    def __init__(
        self, per_split: dict[str, dict[str | None, set[frozenset[str]]]], fd: int
    ) -> None:
        super().__init__()
        self._per_split = per_split
        self._fd = fd

    def __missing__(self, split: str) -> SplitReleases:
        self[split] = SplitReleases(split, self._per_split.get(split, {}), self._fd)
        return self[split]
