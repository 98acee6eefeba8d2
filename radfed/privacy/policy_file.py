"""Reading a site's ``site-policy.toml`` (its format is in ``radfed.privacy.policy``).

Every error names the file and the key, and says how to fix it; nothing is guessed.
"""

from __future__ import annotations

import math
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any, NoReturn

from radfed.config import TaskName
from radfed.errors import ConfigError
from radfed.privacy.limits import ResourceLimits
from radfed.privacy.policy import (
    DEFAULT_MAX_MESSAGE_BYTES,
    DEFAULT_MIN_CELL_SIZE,
    BundleRule,
    DifferentialPrivacy,
    SitePolicy,
)

__all__ = ["POLICY_KEYS", "load_policy"]

#: The keys of each table of the file: ``policy`` and its sub-tables.
POLICY_KEYS: dict[str, tuple[str, ...]] = {
    "policy": (
        *("min-cell-size", "tasks", "subgroups", "max-message-bytes"),
        *("dp", "bundle", "limits"),
    ),
    "policy.dp": ("required", "clipping-norm", "noise-multiplier"),
    "policy.bundle": ("publisher", "name", "versions", "sha256"),
    "policy.limits": ResourceLimits.keys(),
}


def load_policy(path: Path | None) -> SitePolicy:
    """Read and check a site policy file; None gives the default policy.

    Raises:
        ConfigError: the file is missing, unreadable or not TOML (the message names the
            line), or a key is unknown or has a bad value (the message names the key).
    """
    if path is None:
        return SitePolicy.default()
    try:
        with path.open("rb") as f:
            data = tomllib.load(f)
    except OSError as err:
        msg = f"site policy {path} cannot be read ({err.strerror}); create it or fix its rights"
        raise ConfigError(msg) from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        msg = f"site policy {path} is not valid TOML: {err}; fix the syntax there"
        raise ConfigError(msg) from None
    return _Reader(path).policy(data)


class _Reader:
    """Checks the parsed TOML of one policy file; every error names the file and key."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def fail(self, key: str, expected: str, value: object) -> NoReturn:
        msg = f"site policy {self.path}: {key!r} must be {expected}, got {value!r}; fix it there"
        raise ConfigError(msg)

    def table(self, key: str, value: object, known: Sequence[str]) -> dict[str, Any]:
        if not isinstance(value, dict):
            self.fail(key, "a table", value)
        for name in value:
            if name not in known:
                full = f"{key}.{name}".lstrip(".")
                msg = (
                    f"site policy {self.path}: unknown key {full!r}; "
                    f"known keys there: {', '.join(known)}; rename or remove it"
                )
                raise ConfigError(msg)
        return value

    def integer(
        self, table: Mapping[str, Any], key: str, default: int, where: str = "policy"
    ) -> int:
        value = table.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            self.fail(f"{where}.{key}", "an integer >= 0", value)
        if value < 1 and key != "workers":
            self.fail(f"{where}.{key}", "an integer >= 1", value)
        return value

    def number(self, table: Mapping[str, Any], key: str, *, positive: bool) -> float:
        value = table.get(key, 1.0)
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        if not ok or not math.isfinite(value) or value < 0 or (positive and value == 0):
            self.fail(
                "policy.dp." + key, "a finite number " + ("> 0" if positive else ">= 0"), value
            )
        return float(value)

    def names(
        self, table: Mapping[str, Any], key: str, where: str = "policy"
    ) -> tuple[str, ...] | None:
        value = table.get(key)
        if value is None:
            return None
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            self.fail(f"{where}.{key}", "a list of strings", value)
        return tuple(dict.fromkeys(value))

    def text(self, table: Mapping[str, Any], key: str, default: str, where: str) -> str:
        value = table.get(key, default)
        if not isinstance(value, str) or not value.strip():
            self.fail(f"{where}.{key}", "a non-empty string", value)
        return value

    def policy(self, data: Mapping[str, Any]) -> SitePolicy:
        top = self.table("", data, ("policy",))
        table = self.table("policy", top.get("policy", {}), POLICY_KEYS["policy"])
        known = tuple(t.value for t in TaskName)
        tasks = self.names(table, "tasks")
        if tasks is not None and not set(tasks) <= set(known):
            self.fail("policy.tasks", f"a list of task names among {', '.join(known)}", tasks)
        subgroups = self.names(table, "subgroups")
        if any(not s.isidentifier() or s == "age" for s in subgroups or ()):
            expected = "a list of attribute names (a*b is allowed when a and b are; age_band)"
            self.fail("policy.subgroups", expected, subgroups)
        return SitePolicy(
            k=self.integer(table, "min-cell-size", DEFAULT_MIN_CELL_SIZE),
            tasks=known if tasks is None else tasks,
            subgroups=subgroups,
            max_message_bytes=self.integer(table, "max-message-bytes", DEFAULT_MAX_MESSAGE_BYTES),
            dp=self.dp(table["dp"]) if "dp" in table else None,
            bundle=self.bundle(table["bundle"]) if "bundle" in table else BundleRule(),
            limits=self.limits(table["limits"]) if "limits" in table else ResourceLimits(),
        )

    def limits(self, value: object) -> ResourceLimits:
        where = "policy.limits"
        table = self.table(where, value, POLICY_KEYS[where])
        default = ResourceLimits()
        values = {
            f.name: self.integer(table, f.name.replace("_", "-"), getattr(default, f.name), where)
            for f in fields(ResourceLimits)
        }
        return ResourceLimits(**values)

    def bundle(self, value: object) -> BundleRule:
        where = "policy.bundle"
        table = self.table(where, value, POLICY_KEYS["policy.bundle"])
        default = BundleRule()
        digests = tuple(d.lower() for d in self.names(table, "sha256", where) or ())
        if any(len(d) != 64 or set(d) - set("0123456789abcdef") for d in digests):
            self.fail(f"{where}.sha256", "a list of SHA-256 digests (64 hex digits)", digests)
        versions = self.names(table, "versions", where)
        return BundleRule(
            publisher=self.text(table, "publisher", default.publisher, where),
            name=self.text(table, "name", default.name, where),
            versions=default.versions if versions is None else versions,
            sha256=digests,
        )

    def dp(self, value: object) -> DifferentialPrivacy | None:
        table = self.table("policy.dp", value, POLICY_KEYS["policy.dp"])
        required = table.get("required", True)
        if not isinstance(required, bool):
            self.fail("policy.dp.required", "true or false", required)
        missing = [k for k in POLICY_KEYS["policy.dp"][1:] if k not in table]
        if required and missing:
            msg = (
                f"site policy {self.path}: 'policy.dp.{missing[0]}' is missing; set it "
                "(required = true needs clipping-norm and noise-multiplier)"
            )
            raise ConfigError(msg)
        clip = self.number(table, "clipping-norm", positive=True)
        noise = self.number(table, "noise-multiplier", positive=False)
        return DifferentialPrivacy(clipping_norm=clip, noise_multiplier=noise) if required else None
