"""The app bundle a run arrives with, read as data: who made it, which version, its digest.

A Flower app bundle (FAB) is a zip file of the app's code and ``pyproject.toml``. At a site
radfed never extracts, installs or imports it (``radfed.site.runtime`` answers every message
with the site's installed radfed); it reads the one ``pyproject.toml`` from memory, to
decide with the site policy's ``[policy.bundle]`` whether the site takes part in the run.
"""

from __future__ import annotations

import hashlib
import io
import tomllib
import zipfile
from dataclasses import dataclass

from radfed.privacy import BundleRule, PolicyRefusal

__all__ = ["MAX_BUNDLE_BYTES", "BundleIdentity", "BundleRefused", "check_bundle", "read_bundle"]

#: Largest bundle a site reads at all (Flower builds bundles of at most 10 MB).
MAX_BUNDLE_BYTES = 10 * 1024 * 1024
#: Largest ``pyproject.toml`` read from a bundle.
_MAX_PROJECT_BYTES = 256 * 1024


class BundleRefused(PolicyRefusal):
    """The site policy does not take part in runs of this app bundle."""


@dataclass(frozen=True)
class BundleIdentity:
    """Who made an app bundle and what exactly it is.

    Attributes:
        publisher: ``[tool.flwr.app] publisher`` of its ``pyproject.toml`` ("" if absent).
        name: ``[project] name`` ("" if absent).
        version: ``[project] version`` ("" if absent).
        sha256: SHA-256 (hex) of the bundle file as received.
    """

    publisher: str
    name: str
    version: str
    sha256: str

    def describe(self) -> str:
        return f"{self.publisher or '?'}/{self.name or '?'} {self.version or '?'}"


def read_bundle(content: bytes) -> BundleIdentity:
    """The identity of a bundle from its bytes; nothing is written or executed.

    A bundle that is too large, not a zip file or without a readable ``pyproject.toml``
    gets empty names (and is then refused by any rule).
    """
    digest = hashlib.sha256(content).hexdigest()
    unknown = BundleIdentity("", "", "", digest)
    if len(content) > MAX_BUNDLE_BYTES:
        return unknown
    try:
        with zipfile.ZipFile(io.BytesIO(content)) as archive:
            info = archive.getinfo("pyproject.toml")
            if info.file_size > _MAX_PROJECT_BYTES:
                return unknown
            project = tomllib.loads(archive.read(info).decode("utf-8"))
    except Exception:  # hostile input: zipfile and tomllib may raise anything (RecursionError)
        return unknown
    return BundleIdentity(
        publisher=_text(project, "tool", "flwr", "app", "publisher"),
        name=_text(project, "project", "name"),
        version=_text(project, "project", "version"),
        sha256=digest,
    )


def _text(table: object, *keys: str) -> str:
    """The string at ``keys`` in nested tables; "" where a step is missing or of another
    type (``tool = "x"``, ``project = [1]``)."""
    for key in keys:
        if not isinstance(table, dict):
            return ""
        table = table.get(key)
    return table if isinstance(table, str) else ""


def check_bundle(rule: BundleRule, bundle: BundleIdentity) -> None:
    """Raises BundleRefused unless ``rule`` accepts ``bundle`` (the message names the key)."""
    if (bundle.publisher, bundle.name) != (rule.publisher, rule.name):
        raise BundleRefused(
            f"the run's app bundle is {bundle.describe()}; the site policy's [policy.bundle] "
            f"accepts {rule.publisher}/{rule.name}"
        )
    if bundle.version not in rule.versions:
        raise BundleRefused(
            f"the run's app bundle has version {bundle.version or '?'}; the site policy's "
            f"[policy.bundle] versions are {', '.join(rule.versions) or 'none'}"
        )
    if rule.sha256 and bundle.sha256 not in rule.sha256:
        raise BundleRefused(
            f"the run's app bundle (sha256 {bundle.sha256[:16]}...) is not one of the digests "
            "pinned in the site policy's [policy.bundle] sha256"
        )
