"""The site policy: what a hospital lets leave its site, enforced whatever the run asks.

The site administrator owns a TOML file (``site-policy.toml``); every key is optional::

    [policy]
    min-cell-size = 20             # k: smaller cells leave only as "suppressed" (default 10)
    tasks = ["classification"]     # tasks this site trains (default: every radfed.config.TaskName)
    subgroups = ["sex", "age_band", "manufacturer"]  # may leave per subgroup (default: any)
    max-message-bytes = 104857600  # the largest reply this site sends (default 512 MiB)

    [policy.dp]                    # DP on weight updates (absent: not required)
    required = true
    clipping-norm = 1.0            # L2 bound on (new weights - received weights)
    noise-multiplier = 0.8         # Gaussian noise std = noise-multiplier * clipping-norm

    [policy.bundle]                # the app bundles whose runs this site takes part in
    publisher = "radfed"           # [tool.flwr.app] publisher (default radfed)
    name = "radfed"                # [project] name (default radfed)
    versions = ["0.1.0"]           # [project] version (default: this radfed's version)
    sha256 = []                    # SHA-256 of the bundle file (default []: any content)

``subgroups`` lists attributes; an intersection (``sex*age_band``) may leave only when all
its parts are listed, and an empty list lets no subgroup statistics leave. ``tasks = []``
makes the site evaluate-only. Within ``[policy.dp]``, ``required`` defaults to true, and
``clipping-norm`` (> 0) and ``noise-multiplier`` (>= 0; 0 clips without noise, which
bounds an update but gives no privacy guarantee) must then both be set. A run can make
the site stricter (a larger k), never laxer.

No code of an app bundle ever runs at a site (``radfed.site.runtime`` answers with the
radfed the site installed); ``[policy.bundle]`` says which bundles' runs the site answers
at all. Pin ``sha256`` to accept exactly the bundles the site has reviewed.
"""

from __future__ import annotations

import math
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import numpy as np

from radfed import __version__
from radfed.config import TaskName
from radfed.errors import ConfigError, RadfedError
from radfed.folders import POLICY_FILE_NAME

__all__ = ["BundleRule", "DifferentialPrivacy", "PolicyRefusal", "SitePolicy", "load_policy"]

DEFAULT_MIN_CELL_SIZE = 10
DEFAULT_MAX_MESSAGE_BYTES = 512 * 1024 * 1024

_POLICY_KEYS = ("min-cell-size", "tasks", "subgroups", "max-message-bytes", "dp", "bundle")
_DP_KEYS = ("required", "clipping-norm", "noise-multiplier")
_BUNDLE_KEYS = ("publisher", "name", "versions", "sha256")


class PolicyRefusal(RadfedError):
    """The site policy forbids what the run asks; the message names the policy key."""


@dataclass(frozen=True, kw_only=True)
class DifferentialPrivacy:
    """Clipping and Gaussian noise applied to every weight update the site sends.

    Attributes:
        clipping_norm: L2 bound on the update (new weights - received weights).
        noise_multiplier: noise std in units of ``clipping_norm``.
    """

    clipping_norm: float
    noise_multiplier: float


@dataclass(frozen=True, kw_only=True)
class BundleRule:
    """The app bundles whose runs the site takes part in (none of their code runs here).

    Attributes:
        publisher: the bundle's ``[tool.flwr.app] publisher``.
        name: its ``[project] name``.
        versions: accepted ``[project] version`` values.
        sha256: accepted SHA-256 digests (hex) of the bundle file; empty for any content.
    """

    publisher: str = "radfed"
    name: str = "radfed"
    versions: tuple[str, ...] = (__version__,)
    sha256: tuple[str, ...] = ()

    def describe(self) -> str:
        """What the rule accepts, in a few words (for the site's log)."""
        content = "any content" if not self.sha256 else f"{len(self.sha256)} pinned digest(s)"
        return (
            f"{self.publisher}/{self.name} {', '.join(self.versions) or 'no version'} ({content})"
        )


@dataclass(frozen=True, kw_only=True)
class SitePolicy:
    """The effective site policy (see the module docstring for the file format).

    Attributes:
        k: the site's minimum statistics cell size (``min-cell-size``).
        tasks: tasks the site agrees to train.
        subgroups: attributes whose subgroup statistics may leave; None for any.
        max_message_bytes: the largest reply the site sends (serialized bytes).
        dp: differential privacy on weight updates; None when not required.
        bundle: the app bundles whose runs the site answers.
    """

    k: int = DEFAULT_MIN_CELL_SIZE
    tasks: tuple[str, ...] = tuple(t.value for t in TaskName)
    subgroups: tuple[str, ...] | None = None
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    dp: DifferentialPrivacy | None = None
    bundle: BundleRule = field(default_factory=BundleRule)

    @classmethod
    def default(cls) -> SitePolicy:
        """The policy of a site without a policy file."""
        return cls()

    def min_cell_size(self, run_k: int) -> int:
        """The k in force: the larger of the run's and the policy's (a run never lowers it)."""
        return max(run_k, self.k)

    def check_task(self, task: str) -> None:
        """Raises PolicyRefusal when the site does not train ``task``."""
        task = str(task)  # a TaskName prints as its value
        if task not in self.tasks:
            allowed = ", ".join(self.tasks) or "none"
            msg = (
                f"task {task!r} is not in the site policy's 'tasks' ({allowed}); "
                f"the site administrator can add it to {POLICY_FILE_NAME}"
            )
            raise PolicyRefusal(msg)

    def allowed_subgroups(self, requested: Sequence[str]) -> tuple[str, ...]:
        """The requested subgroup specs (``a`` or ``a*b``) whose every attribute is allowed."""
        if self.subgroups is None:
            return tuple(requested)
        allowed = set(self.subgroups)
        return tuple(spec for spec in requested if set(spec.split("*")) <= allowed)

    def check_size(self, nbytes: int) -> None:
        """Raises PolicyRefusal when a reply of ``nbytes`` exceeds ``max-message-bytes``."""
        if nbytes > self.max_message_bytes:
            msg = (
                f"the reply is {nbytes} bytes, over the site policy's 'max-message-bytes' "
                f"({self.max_message_bytes}); use a smaller model or raise the limit in "
                f"{POLICY_FILE_NAME}"
            )
            raise PolicyRefusal(msg)

    def privatize(
        self,
        update: Mapping[str, np.ndarray],
        reference: Mapping[str, np.ndarray],
        rng: np.random.Generator,
    ) -> dict[str, np.ndarray]:
        """Clip the floating-point delta ``update - reference`` to ``clipping-norm`` (L2 over
        all floating arrays jointly), add N(0, (noise-multiplier * clipping-norm)^2) to each
        of its elements (drawn from ``rng`` in the update's name order) and return
        ``reference + delta`` in the update's dtypes and shapes. Other arrays (BatchNorm's
        ``num_batches_tracked``) pass unchanged; without DP the update passes unchanged.
        ``reference`` may hold more names than ``update`` (FedBN keeps some layers local).

        Raises:
            ValueError: a floating array has no reference of its shape.
            PolicyRefusal: the update holds NaN or infinity, which no clipping bounds.
        """
        if self.dp is None:
            return dict(update)
        deltas: dict[str, np.ndarray] = {}
        for name, array in update.items():
            if np.issubdtype(array.dtype, np.floating):
                ref = reference.get(name)
                if ref is None or ref.shape != array.shape:
                    msg = f"array {name!r} {array.shape} has no such array in the reference"
                    raise ValueError(msg)
                deltas[name] = array.astype(np.float64) - ref.astype(np.float64)
        norm = math.sqrt(sum(float(np.sum(np.square(d))) for d in deltas.values()))
        if not math.isfinite(norm):
            raise PolicyRefusal("the update holds non-finite values; DP cannot bound it: not sent")
        scale = min(1.0, self.dp.clipping_norm / norm) if norm > 0 else 1.0
        std = self.dp.noise_multiplier * self.dp.clipping_norm
        out = dict(update)
        for name, delta in deltas.items():
            delta *= scale
            if std > 0:
                delta += rng.normal(0.0, std, size=delta.shape)
            out[name] = (reference[name].astype(np.float64) + delta).astype(update[name].dtype)
        return out

    def describe(self) -> dict[str, Any]:
        """The effective policy in a few JSON-ready values, for logs (no paths)."""
        return {
            "min-cell-size": self.k,
            "tasks": list(self.tasks),
            "subgroups": "any" if self.subgroups is None else list(self.subgroups),
            "max-message-bytes": self.max_message_bytes,
            "dp": "off"
            if self.dp is None
            else {
                "clipping-norm": self.dp.clipping_norm,
                "noise-multiplier": self.dp.noise_multiplier,
            },
            "bundle": self.bundle.describe(),
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

    def integer(self, table: Mapping[str, Any], key: str, default: int) -> int:
        value = table.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            self.fail("policy." + key, "an integer >= 1", value)
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
        table = self.table("policy", top.get("policy", {}), _POLICY_KEYS)
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
        )

    def bundle(self, value: object) -> BundleRule:
        where = "policy.bundle"
        table = self.table(where, value, _BUNDLE_KEYS)
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
        table = self.table("policy.dp", value, _DP_KEYS)
        required = table.get("required", True)
        if not isinstance(required, bool):
            self.fail("policy.dp.required", "true or false", required)
        missing = [k for k in _DP_KEYS[1:] if k not in table]
        if required and missing:
            msg = (
                f"site policy {self.path}: 'policy.dp.{missing[0]}' is missing; set it "
                "(required = true needs clipping-norm and noise-multiplier)"
            )
            raise ConfigError(msg)
        clip = self.number(table, "clipping-norm", positive=True)
        noise = self.number(table, "noise-multiplier", positive=False)
        return DifferentialPrivacy(clipping_norm=clip, noise_multiplier=noise) if required else None
