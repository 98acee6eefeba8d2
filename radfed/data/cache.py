"""Preprocessed-case cache in the site's state folder: decode each image once, reuse every round.

An entry is keyed by the SHA-256 of the image file's bytes and by the preprocessing
settings, so a changed file or setting misses and is decoded again. Each round of a
deployment runs in a fresh process: the cache is what makes its start-up cheap.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np

from radfed.folders import SiteState
from radfed.log import logger

__all__ = ["CaseCache", "content_digest"]
#: Bump when preprocessing changes in a way the settings do not capture.
_PREPROCESSING_VERSION = 2

Entry = tuple[np.ndarray, dict[str, str]]


def content_digest(path: Path) -> str:
    """Content digest of a file, or of every file (names and bytes) in a series folder."""
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        digest.update(file.name.encode() + b"\0")
        with file.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()[:32]


class CaseCache:
    """Get-or-compute store of (preprocessed pixels, attributes) per image file.

    Args:
        state_dir: the site's state folder (the cache is its ``cache/``).
        settings: the preprocessing settings (part of every key).
        max_bytes: the cache's size on disk; beyond it the least recently used entries
            (by their modification time, renewed on every hit) are removed. None: no cap.
    """

    def __init__(
        self, state_dir: Path, settings: Mapping[str, object], *, max_bytes: int | None = None
    ) -> None:
        self.folder = SiteState(state_dir).cache
        text = json.dumps({"v": _PREPROCESSING_VERSION, **settings}, sort_keys=True)
        self._settings = hashlib.sha256(text.encode()).hexdigest()[:16]
        self.max_bytes = max_bytes
        self._size: int | None = None  # bytes on disk, counted at the first store
        self.hits = 0
        self.misses = 0
        self.evicted = 0
        self.write_failed = False

    def key(self, path: Path, digest: str | None = None) -> str:
        """The entry name of a file: its ``content_digest`` (``digest`` when the caller has
        it) and the preprocessing settings."""
        return f"{digest or content_digest(path)}-{self._settings}"

    def get_or_compute(
        self, path: Path, compute: Callable[[Path], Entry], *, digest: str | None = None
    ) -> Entry:
        """The cached entry of ``path``, or ``compute(path)`` stored for next time.

        Errors of ``compute`` propagate and nothing is stored. A missing file raises
        FileNotFoundError before anything is computed.
        """
        entry_path = self.folder / f"{self.key(path, digest)}.npz"
        if entry_path.is_file():
            try:
                with np.load(entry_path, allow_pickle=False) as stored:
                    pixels = stored["pixels"]
                    attributes = json.loads(str(stored["attributes"]))
                self.hits += 1
                os.utime(entry_path)  # recently used: evicted last
                return pixels, attributes
            except (OSError, ValueError, KeyError):
                entry_path.unlink(missing_ok=True)  # a damaged entry is rebuilt
        pixels, attributes = compute(path)
        self.misses += 1
        try:
            self._store(entry_path, pixels, attributes)
        except OSError:
            if not self.write_failed:  # a read-only state folder: slower, not broken
                logger.warning("preprocessed cache not writable; cases are decoded every time")
            self.write_failed = True
        return pixels, attributes

    def _store(self, entry_path: Path, pixels: np.ndarray, attributes: dict[str, str]) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        handle, tmp = tempfile.mkstemp(dir=self.folder, suffix=".tmp")
        try:
            with os.fdopen(handle, "wb") as out:
                np.savez(out, pixels=pixels, attributes=np.array(json.dumps(attributes)))
            os.replace(tmp, entry_path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        if self.max_bytes is not None:
            if self._size is None:
                self._size = sum(size for _, size, _ in self._entries())
            else:
                self._size += entry_path.stat().st_size
            if self._size > self.max_bytes:
                self._evict(keep=entry_path)

    def _evict(self, *, keep: Path) -> None:
        """Remove the least recently used entries until the cache holds 90% of its cap."""
        if self.max_bytes is None or self._size is None:
            return
        entries = sorted(e for e in self._entries() if e[2] != keep)
        target = int(self.max_bytes * 0.9)
        for _, size, path in entries:
            if self._size <= target:
                break
            path.unlink(missing_ok=True)
            self._size -= size
            self.evicted += 1

    def _entries(self) -> list[tuple[int, int, Path]]:
        """(last use, bytes, path) of every entry on disk; one that another process of the
        site evicts meanwhile is skipped, not an error."""
        out = []
        for path in self.folder.glob("*.npz"):
            try:
                info = path.stat()
            except FileNotFoundError:
                continue
            out.append((info.st_mtime_ns, info.st_size, path))
        return out
