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

from radfed.config import MAX_LIST, SPLITS, TaskName, looks_identifying
from radfed.errors import ConfigError
from radfed.privacy.budget import QueryBudget
from radfed.privacy.limits import ResourceLimits
from radfed.privacy.policy import (
    CLOSED_ATTRIBUTES,
    DEFAULT_ATTRIBUTE_VALUES,
    DEFAULT_MAX_MESSAGE_BYTES,
    DEFAULT_MIN_CELL_SIZE,
    DEFAULT_SUBGROUPS,
    BundleRule,
    DifferentialPrivacy,
    QueryTemplates,
    SitePolicy,
    StatisticsDP,
)

__all__ = ["DP_SCORE_BINS", "POLICY_KEYS", "load_policy"]

#: The score bins of ``[policy.templates]`` under DP statistics unless the site lists others.
DP_SCORE_BINS = 20

#: The keys of each table of the file: ``policy`` and its sub-tables.
POLICY_KEYS: dict[str, tuple[str, ...]] = {
    "policy": (
        *("min-cell-size", "tasks", "subgroups", "max-message-bytes", "exact-auc"),
        *("dp", "bundle", "limits", "attribute-values", "templates", "queries"),
        "dp-statistics",
    ),
    "policy.queries": (
        *("splits", "test-evaluations", "test-last-round-only", "test-evaluations-total"),
    ),
    "policy.templates": ("age-bands", "thresholds", "score-bins", "metric-bins"),
    "policy.dp": (
        *("required", "clipping-norm", "noise-multiplier", "epsilon", "delta"),
        *("min-batch-size", "max-learning-rate"),
    ),
    "policy.dp-statistics": ("noise", "epsilon", "delta", "cases-per-patient"),
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

    def boolean(
        self, table: Mapping[str, Any], key: str, default: bool, where: str = "policy"
    ) -> bool:
        value = table.get(key, default)
        if not isinstance(value, bool):
            self.fail(f"{where}.{key}", "true or false", value)
        return value

    def number(
        self, table: Mapping[str, Any], key: str, *, positive: bool, where: str = "policy.dp"
    ) -> float:
        value = table.get(key, 1.0)
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        if not ok or not math.isfinite(value) or value < 0 or (positive and value == 0):
            self.fail(f"{where}.{key}", "a finite number " + ("> 0" if positive else ">= 0"), value)
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
        values = self.attribute_values(table.get("attribute-values"))
        subgroups = self.subgroups(table, values)
        noisy = None
        if "dp-statistics" in table:
            noisy = self.dp_statistics(table["dp-statistics"])
        templates = self.templates(table.get("templates", {}), noisy is not None)
        return SitePolicy(
            k=self.integer(table, "min-cell-size", DEFAULT_MIN_CELL_SIZE),
            tasks=known if tasks is None else tasks,
            subgroups=subgroups,
            attribute_values=tuple(sorted(values.items())),
            templates=templates,
            queries=self.queries(table.get("queries", {})),
            max_message_bytes=self.integer(table, "max-message-bytes", DEFAULT_MAX_MESSAGE_BYTES),
            dp=self.dp(table["dp"]) if "dp" in table else None,
            dp_statistics=noisy,
            exact_auc=self.boolean(table, "exact-auc", False),
            bundle=self.bundle(table["bundle"]) if "bundle" in table else BundleRule(),
            limits=self.limits(table["limits"]) if "limits" in table else ResourceLimits(),
        )

    def subgroups(
        self, table: Mapping[str, Any], values: Mapping[str, tuple[str, ...]]
    ) -> tuple[str, ...]:
        where = "policy.subgroups"
        specs = self.names(table, "subgroups")
        if specs is None:
            return DEFAULT_SUBGROUPS
        for spec in specs:
            parts = spec.split("*")
            if len(parts) > 2 or not all(p.isidentifier() for p in parts):
                self.fail(where, "attribute names, or a*b for an intersection of two", spec)
            if looks_identifying(spec):
                self.fail(where, "attributes that do not look like identifiers (age_band)", spec)
            for part in parts:
                if part not in CLOSED_ATTRIBUTES and part not in values:
                    self.fail(
                        where,
                        f"sex, age_band or an attribute with its values in "
                        f"[policy.attribute-values] ({part} = [...])",
                        spec,
                    )
        return specs

    def attribute_values(self, value: object) -> dict[str, tuple[str, ...]]:
        where = "policy.attribute-values"
        if value is None:
            return dict(DEFAULT_ATTRIBUTE_VALUES)
        if not isinstance(value, dict):
            self.fail(where, "a table of attribute = [values]", value)
        out: dict[str, tuple[str, ...]] = {}
        for name, listed in value.items():
            key = f"{where}.{name}"
            if not name.isidentifier() or looks_identifying(name) or name in CLOSED_ATTRIBUTES:
                self.fail(key, "a free-text attribute that does not look like an identifier", name)
            names = self.names(value, name, where)
            if not names or len(names) > 64 or not all(v.strip() and len(v) <= 30 for v in names):
                self.fail(key, "a list of 1 to 64 values of 1 to 30 characters", listed)
            out[name] = names
        return out

    def queries(self, value: object) -> QueryBudget:
        where = "policy.queries"
        table = self.table(where, value, POLICY_KEYS[where])
        default = QueryBudget()
        splits = self.names(table, "splits", where)
        if splits is not None and not set(splits) <= set(SPLITS):
            self.fail(f"{where}.splits", f"a list of split names among {', '.join(SPLITS)}", splits)
        uses = table.get("test-evaluations", default.test_evaluations)
        if isinstance(uses, bool) or not isinstance(uses, int) or uses < 0:
            self.fail(f"{where}.test-evaluations", "an integer >= 0", uses)
        total = table.get("test-evaluations-total", default.test_total)
        if isinstance(total, bool) or not isinstance(total, int) or total < 0:
            self.fail(f"{where}.test-evaluations-total", "an integer >= 0", total)
        last = table.get("test-last-round-only", default.test_last_round_only)
        if not isinstance(last, bool):
            self.fail(f"{where}.test-last-round-only", "true or false", last)
        return QueryBudget(
            splits=default.splits if splits is None else splits,
            test_evaluations=uses,
            test_last_round_only=last,
            test_total=total,
        )

    def templates(self, value: object, noisy: bool = False) -> QueryTemplates:
        where = "policy.templates"
        table = self.table(where, value, POLICY_KEYS[where])
        default = QueryTemplates(score_bins=(DP_SCORE_BINS,)) if noisy else QueryTemplates()
        bands = self.numbers(table, "age-bands", default.age_bands, where, integer=True)
        if list(bands) != sorted(set(bands)) or bands[0] <= 0:
            self.fail(f"{where}.age-bands", "ascending positive years", list(bands))
        thresholds = self.numbers(table, "thresholds", default.thresholds, where)
        if not all(0 < t < 1 for t in thresholds):
            self.fail(f"{where}.thresholds", "numbers in (0, 1)", list(thresholds))
        score_bins = self.numbers(table, "score-bins", default.score_bins, where, integer=True)
        metric_bins = self.numbers(table, "metric-bins", default.metric_bins, where, integer=True)
        for key, bins, most in (
            ("score-bins", score_bins, 100_000),
            ("metric-bins", metric_bins, 10_000),
        ):
            if not all(10 <= b <= most for b in bins):
                self.fail(f"{where}.{key}", f"integers in [10, {most}]", list(bins))
        off_edge = [
            (t, b) for t in thresholds for b in score_bins if abs(t * b - round(t * b)) > 1e-9
        ]
        if noisy and off_edge:
            threshold, count = off_edge[0]
            self.fail(
                f"{where}.thresholds",
                f"on an edge of every score-bins under [policy.dp-statistics] "
                f"({threshold:g} is not a multiple of 1/{count:g})",
                list(thresholds),
            )
        return QueryTemplates(
            age_bands=tuple(int(b) for b in bands),
            thresholds=tuple(float(t) for t in thresholds),
            score_bins=tuple(int(b) for b in score_bins),
            metric_bins=tuple(int(b) for b in metric_bins),
        )

    def numbers(
        self,
        table: Mapping[str, Any],
        key: str,
        default: tuple[float, ...] | tuple[int, ...],
        where: str,
        *,
        integer: bool = False,
    ) -> tuple[float, ...]:
        value = table.get(key, list(default))
        kinds = (int,) if integer else (int, float)
        if (
            not isinstance(value, list)
            or not 1 <= len(value) <= MAX_LIST
            or not all(isinstance(v, kinds) and not isinstance(v, bool) for v in value)
            or not all(math.isfinite(v) for v in value)
        ):
            kind = "integers" if integer else "numbers"
            self.fail(f"{where}.{key}", f"a list of 1 to {MAX_LIST} {kind}", value)
        return tuple(value)

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

    def dp_statistics(self, value: object) -> StatisticsDP:
        where = "policy.dp-statistics"
        table = self.table(where, value, POLICY_KEYS[where])
        if "noise" not in table:
            msg = (
                f"site policy {self.path}: '{where}.noise' is missing; set the standard "
                "deviation of the noise on each count (for instance 4.0)"
            )
            raise ConfigError(msg)
        noise = self.number(table, "noise", positive=True, where=where)
        epsilon = None
        if "epsilon" in table:
            epsilon = self.number(table, "epsilon", positive=True, where=where)
        delta = (
            self.number(table, "delta", positive=True, where=where) if "delta" in table else 1e-6
        )
        if not delta < 1:
            self.fail(f"{where}.delta", "a number in (0, 1)", delta)
        if not noise <= 1000:
            self.fail(f"{where}.noise", "a number in (0, 1000]", noise)
        most = self.integer(table, "cases-per-patient", 1, where)
        return StatisticsDP(noise=noise, epsilon=epsilon, delta=delta, cases_per_patient=most)

    def dp(self, value: object) -> DifferentialPrivacy | None:
        table = self.table("policy.dp", value, POLICY_KEYS["policy.dp"])
        required = table.get("required", True)
        if not isinstance(required, bool):
            self.fail("policy.dp.required", "true or false", required)
        missing = [k for k in POLICY_KEYS["policy.dp"][1:3] if k not in table]
        if required and missing:
            msg = (
                f"site policy {self.path}: 'policy.dp.{missing[0]}' is missing; set it "
                "(required = true needs clipping-norm and noise-multiplier)"
            )
            raise ConfigError(msg)
        clip = self.number(table, "clipping-norm", positive=True)
        noise = self.number(table, "noise-multiplier", positive=False)
        epsilon = self.number(table, "epsilon", positive=True) if "epsilon" in table else None
        delta = self.number(table, "delta", positive=True) if "delta" in table else 1e-5
        if not delta < 1:
            self.fail("policy.dp.delta", "a number in (0, 1)", delta)
        rate = table.get("max-learning-rate", 1.0)
        if "max-learning-rate" in table:
            rate = self.number(table, "max-learning-rate", positive=True)
        batch = self.integer(table, "min-batch-size", 8, "policy.dp")
        if not required:
            return None
        return DifferentialPrivacy(
            clipping_norm=clip,
            noise_multiplier=noise,
            epsilon=epsilon,
            delta=delta,
            min_batch_size=batch,
            max_learning_rate=float(rate),
        )
