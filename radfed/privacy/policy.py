"""The site policy: what a hospital lets leave its site and what a run may cost it, enforced
whatever the run asks (read by ``radfed.privacy.policy_file``).

The site administrator owns a TOML file (``site-policy.toml``); every key is optional::

    [policy]
    min-cell-size = 20             # k: smaller cells leave only as "suppressed" (default 10)
    tasks = ["classification"]     # tasks this site trains (default: every radfed.config.TaskName)
    subgroups = ["sex", "age_band", "manufacturer", "sex*age_band"]  # (the default)
    max-message-bytes = 104857600  # the largest reply this site sends (default 512 MiB)
    exact-auc = false              # send exact AUC pair counts (trusts the server's models)

    [policy.attribute-values]      # free-text attributes a site reports, with their values
    manufacturer = ["GE", "Siemens"]  # default: the canonical vendor names
    model = ["Discovery XR656", "Ysio Max"]

    [policy.templates]             # the statistics a run may ask for: it chooses among these
    age-bands = [18, 40, 60, 80]   # the band edges (default: these)
    thresholds = [0.5]             # operating thresholds (default [0.5])
    score-bins = [1000]            # score histogram bins (default [1000])
    metric-bins = [100]            # per-case metric histogram bins (default [100])

    [policy.queries]               # what a run may ask how often (radfed.privacy.budget)
    splits = ["train", "val", "test"]  # splits whose statistics may leave (default: all)
    test-evaluations = 1           # evaluations of the sealed test split per run
    test-last-round-only = true    # and only in the run's last round
    test-evaluations-total = 20    # and over all runs

    [policy.dp]                    # DP on weight updates (absent: not required)
    required = true
    clipping-norm = 1.0            # L2 bound on (new weights - received weights)
    noise-multiplier = 0.8         # Gaussian noise std = noise-multiplier * clipping-norm
    epsilon = 8.0                  # total budget over rounds and runs (default: none)
    delta = 1e-5
    min-batch-size = 8             # a run may not train on smaller batches (default 8)
    max-learning-rate = 1.0        # nor with a larger learning rate (default 1.0)

    [policy.dp-statistics]         # DP on released statistics (absent: off)
    noise = 4.0                    # std of the discrete Gaussian added to every count
    epsilon = 10.0                 # total budget for statistics over rounds and runs
    delta = 1e-6
    cases-per-patient = 1          # the most images of one patient a release counts

    [policy.bundle]                # the app bundles whose runs this site takes part in
    publisher = "radfed"           # [tool.flwr.app] publisher (default radfed)
    name = "radfed"                # [project] name (default radfed)
    versions = ["0.1.0"]           # [project] version (default: this radfed's version)
    sha256 = []                    # SHA-256 of the bundle file (default []: any content)

    [policy.limits]                # what a run may cost the site (radfed.privacy.limits)
    image-size = 512               # the largest image-size a run may ask for
    input-voxels = 16777216        # the largest image-size ** spatial-dims
    batch-size = 256
    steps-per-round = 20000        # optimiser steps of one round's local training
    workers = 4                    # DataLoader worker processes
    rounds = 1000                  # rounds of a run
    decoded-voxels = 268435456     # the largest case image decoded (from its header)
    cache-bytes = 21474836480      # the decoded-case cache; least recently used evicted
    inbound-bytes = 2147483648     # the largest weights taken from a run
    model-parameters = 100000000   # the largest model built (parameters and buffers)

``subgroups`` lists the attributes and the intersections (``sex*age_band``) that may leave;
an intersection only when it is listed itself, and an empty list lets no subgroup
statistics leave. ``sex`` and ``age_band`` have closed vocabularies; any other attribute
needs the values it may name in ``[policy.attribute-values]`` (``manufacturer`` has the
canonical vendor names by default): other values leave pooled into ``other (small
groups)``. Attribute names that look like identifiers (``radfed.config.looks_identifying``:
``*id*``, ``*name*``, ``*date*``, ``*postcode*``, ``age``...) are refused. A run may only
choose among ``[policy.templates]``: a run asking for other age bands, a threshold, or
histogram bins the site does not list is refused with a code. The site computes its
disclosure control over every cell its policy allows, whatever subset a run asks for, so
that what different runs receive adds up to no more than one safe release.
``tasks = []`` makes the site evaluate-only. Within ``[policy.dp]``, ``required``
defaults to true, and ``clipping-norm`` (> 0) and ``noise-multiplier`` (>= 0; 0 clips
without noise, which bounds an update but gives no privacy guarantee) must then both be
set. A run can make the site stricter (a larger k), never laxer.

``[policy.dp-statistics]`` (``radfed.privacy.statistics_dp``) replaces suppression and bin
merging by noise: binary classification only, the threshold on an edge of the score bins,
which default to ``[20]`` in ``[policy.templates]`` then (fine bins sum more noise into
each confusion count); ``noise`` (> 0) must be set.

No code of an app bundle ever runs at a site (``radfed.site.runtime`` answers with the
radfed the site installed); ``[policy.bundle]`` says which bundles' runs the site answers
at all. Pin ``sha256`` to accept exactly the bundles the site has reviewed.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from radfed import __version__
from radfed.config import RunConfig, TaskName
from radfed.data.attributes import STANDARD_BANDS, VENDORS
from radfed.folders import POLICY_FILE_NAME
from radfed.privacy.budget import QueryBudget
from radfed.privacy.limits import ResourceLimits
from radfed.privacy.refusal import PolicyRefusal
from radfed.privacy.statistics_dp import StatisticsDP

__all__ = [
    "CLOSED_ATTRIBUTES",
    "DEFAULT_SUBGROUPS",
    "BundleRule",
    "DifferentialPrivacy",
    "PolicyRefusal",
    "QueryTemplates",
    "SitePolicy",
    "StatisticsDP",
]

DEFAULT_MIN_CELL_SIZE = 10
DEFAULT_MAX_MESSAGE_BYTES = 512 * 1024 * 1024
#: What a site reports per subgroup unless its policy says otherwise.
DEFAULT_SUBGROUPS = ("sex", "age_band", "manufacturer", "sex*age_band")
#: Attributes whose vocabulary is fixed by radfed (``radfed.metrics.cells``).
CLOSED_ATTRIBUTES = ("sex", "age_band")
#: The values of free-text attributes a site names unless its policy says otherwise.
DEFAULT_ATTRIBUTE_VALUES = (("manufacturer", VENDORS),)


@dataclass(frozen=True, kw_only=True)
class QueryTemplates:
    """The statistics a run may ask of the site: it chooses among these values only, so
    that two runs cannot slice the same cases two ways (band edges at 60 and at 66 would
    isolate everyone aged 60-65; two thresholds, the cases scored between them).

    Attributes:
        age_bands: the age-band edges a run must use.
        thresholds: the operating thresholds a run may choose.
        score_bins: the score histogram sizes a run may choose.
        metric_bins: the per-case metric histogram sizes a run may choose.
    """

    age_bands: tuple[int, ...] = STANDARD_BANDS.edges
    thresholds: tuple[float, ...] = (0.5,)
    score_bins: tuple[int, ...] = (1000,)
    metric_bins: tuple[int, ...] = (100,)

    def check(self, config: RunConfig) -> None:
        """Raises PolicyRefusal naming the first setting of ``config`` outside these."""
        for key, value, allowed in (
            ("age-bands", config.age_bands, (self.age_bands,)),
            ("threshold", config.threshold, self.thresholds),
            ("score-bins", config.score_bins, self.score_bins),
            ("metric-bins", config.metric_bins, self.metric_bins),
        ):
            if value not in allowed:
                shown = " or ".join(_show(a) for a in allowed) or "none"
                msg = (
                    f"the run asks for {key} {_show(value)}; this site's policy allows "
                    f"{shown} ([policy.templates] in {POLICY_FILE_NAME})"
                )
                raise PolicyRefusal(msg)

    def describe(self) -> dict[str, Any]:
        return {
            "age-bands": list(self.age_bands),
            "thresholds": list(self.thresholds),
            "score-bins": list(self.score_bins),
            "metric-bins": list(self.metric_bins),
        }


def _show(value: object) -> str:
    return ",".join(map(str, value)) if isinstance(value, tuple) else str(value)


@dataclass(frozen=True, kw_only=True)
class DifferentialPrivacy:
    """Clipping and Gaussian noise applied to every weight update the site sends, and what
    the site spends of its privacy budget (``radfed.privacy.accountant``).

    Attributes:
        clipping_norm: L2 bound on the update (new weights - received weights).
        noise_multiplier: noise std in units of ``clipping_norm``.
        epsilon: the site's total budget over all rounds and runs, at ``delta``; None to
            account without refusing.
        delta: the delta of (epsilon, delta)-DP.
        min_batch_size: the smallest ``batch-size`` a run may train with.
        max_learning_rate: the largest ``learning-rate`` a run may train with.
    """

    clipping_norm: float
    noise_multiplier: float
    epsilon: float | None = None
    delta: float = 1e-5
    min_batch_size: int = 8
    max_learning_rate: float = 1.0

    def check_run(self, config: RunConfig) -> None:
        """Raises PolicyRefusal when the run trains with batches smaller or a learning
        rate larger than the policy allows (a crafted batch of 2 let a server read the
        labels of two chosen cases from each round)."""
        if config.batch_size < self.min_batch_size:
            msg = (
                f"the run trains with batch-size {config.batch_size}; this site's DP policy "
                f"needs at least {self.min_batch_size} ([policy.dp] min-batch-size)"
            )
            raise PolicyRefusal(msg)
        if config.learning_rate > self.max_learning_rate:
            msg = (
                f"the run trains with learning-rate {config.learning_rate:g}; this site's DP "
                f"policy allows at most {self.max_learning_rate:g} ([policy.dp] "
                "max-learning-rate)"
            )
            raise PolicyRefusal(msg)


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
        subgroups: the attributes and intersections whose statistics may leave; None
            for whatever the run asks (a simulated site without a policy file only).
        attribute_values: per free-text attribute, the values it may name.
        templates: what a run may choose; None: anything (a simulated site without a
            policy file only: the researcher owns both sides).
        queries: what a run may ask how often; None: no budget (likewise).
        max_message_bytes: the largest reply the site sends (serialized bytes).
        dp: differential privacy on weight updates; None when not required.
        dp_statistics: differential privacy on released statistics; None when off.
        exact_auc: send each large enough cell's exact Mann-Whitney pair count and DeLong
            sums (exact AUCs in the bias report). Off by default: a server that crafts
            the model can read labels out of exact counts (docs/privacy.md); a simulated
            site without a policy file has it on (the researcher owns both sides).
        bundle: the app bundles whose runs the site answers.
        limits: what a run may cost the site (compute, memory, disk).
    """

    k: int = DEFAULT_MIN_CELL_SIZE
    tasks: tuple[str, ...] = tuple(t.value for t in TaskName)
    subgroups: tuple[str, ...] | None = DEFAULT_SUBGROUPS
    attribute_values: tuple[tuple[str, tuple[str, ...]], ...] = DEFAULT_ATTRIBUTE_VALUES
    templates: QueryTemplates | None = field(default_factory=QueryTemplates)
    queries: QueryBudget | None = field(default_factory=QueryBudget)
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    dp: DifferentialPrivacy | None = None
    dp_statistics: StatisticsDP | None = None
    exact_auc: bool = False
    bundle: BundleRule = field(default_factory=BundleRule)
    limits: ResourceLimits = field(default_factory=ResourceLimits)

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
        """The requested subgroup specs (``a`` or ``a*b``) the policy lists, as listed."""
        if self.subgroups is None:
            return tuple(requested)
        return tuple(spec for spec in requested if spec in self.subgroups)

    def template(self, requested: Sequence[str]) -> tuple[str, ...]:
        """Every subgroup spec the site computes its disclosure control over: all the
        policy allows (the run's own when the policy follows the run)."""
        return tuple(requested) if self.subgroups is None else self.subgroups

    def vocabularies(self) -> dict[str, tuple[str, ...]]:
        """Per free-text attribute the values it may name (``attribute-values``)."""
        return dict(self.attribute_values)

    def check_templates(self, config: RunConfig) -> None:
        """Raises PolicyRefusal when the run asks for statistics outside the templates, or
        ones the site cannot release with noise under its DP statistics."""
        if self.templates is not None:
            self.templates.check(config)
        if self.dp_statistics is not None:
            self.dp_statistics.check_run(config)

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
            "attribute-values": {a: len(v) for a, v in self.attribute_values},
            "templates": "any" if self.templates is None else self.templates.describe(),
            "queries": "any" if self.queries is None else self.queries.describe(),
            "max-message-bytes": self.max_message_bytes,
            "dp": "off"
            if self.dp is None
            else {
                "clipping-norm": self.dp.clipping_norm,
                "noise-multiplier": self.dp.noise_multiplier,
                "epsilon": self.dp.epsilon,
                "delta": self.dp.delta,
            },
            "dp-statistics": "off" if self.dp_statistics is None else self.dp_statistics.describe(),
            "bundle": self.bundle.describe(),
        }
