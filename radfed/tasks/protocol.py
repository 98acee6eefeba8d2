"""The one interface every task implements; the client and server look a task up by name.

A task builds its network from the run config, trains it for one local pass, predicts
per-case outputs (which never leave the site) and turns any subset of those outputs into
mergeable statistics: the sum of two sites' statistics is the statistics of their pooled
cases, and every reported number is computed from such sums.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Protocol, Self

import numpy as np
from torch import nn

from radfed.config import RunConfig, TaskName
from radfed.data.loading import SplitData
from radfed.errors import ConfigError
from radfed.metrics.pooling import pool
from radfed.tasks.training import TrainResult

__all__ = [
    "MAX_NOISE_VARIANCE",
    "CaseOutputs",
    "SplitStats",
    "StatsValue",
    "Task",
    "choose",
    "merge_stats",
    "record_count",
    "record_histogram",
    "record_noise",
    "record_value",
]

#: A value of a statistics record (Flower MetricRecord values).
StatsValue = int | float | list[int] | list[float]


class SplitStats(Protocol):
    """Mergeable sufficient statistics of a set of cases (a split or a subgroup cell)."""

    @property
    def suppressed(self) -> bool:
        """Fewer cases than the minimum cell size: nothing but this flag leaves the site."""
        ...

    @property
    def n(self) -> int:
        """Cases (images) summarised."""
        ...

    def __add__(self, other: Self, /) -> Self:
        """The statistics of both sets of cases together."""
        ...

    def with_min_cell(self, k: int) -> Self:
        """What may leave a site under minimum cell size ``k`` (suppressed below ``k``
        cases; histogram bins coarsened so that no non-empty bin holds fewer than ``k``)."""
        ...

    def withholding(self, part: str) -> Self:
        """The statistics without one of the parts ``CaseOutputs.parts`` names (what
        ``with_min_cell`` does to a part of fewer than ``k`` units).

        Raises:
            ValueError: the statistics have no such part.
        """
        ...


class CaseOutputs(Protocol):
    """A task's per-case outputs at a site. They never leave it."""

    def __len__(self) -> int: ...

    def stats(self, index: Sequence[int] | np.ndarray) -> SplitStats:
        """Statistics of the cases at positions ``index``."""
        ...

    def rows(self) -> list[dict[str, float | int | str]]:
        """One row per case for the site's own audit table (``predictions.csv``)."""
        ...

    def parts(self) -> Mapping[str, Sequence[int]]:
        """The parts of the statistics that cover a sub-population of a cell's cases, each
        withheld from a cell where it covers fewer than the minimum cell size: per part,
        per case the units it adds (a case with foreground adds one to a Dice histogram,
        an image adds each of its detections to a detector's score histograms)."""
        ...


class Task(Protocol):
    """What the client and server need from a task (see ``radfed.tasks.registry``).

    Attributes:
        name: the run-config ``task`` value.
        models: accepted ``model`` values; the first is the default.
        losses: accepted ``loss`` values; the first is the default.
        headline: the metric logged per site and round.
        summary: the metrics of summary tables; the first three are rates in [0, 1]
            plotted over rounds.
        stable_parts: the parts of ``CaseOutputs.parts`` whose cases depend on the cases
            alone, not on the model (the cases with ground-truth foreground): the site
            compares them with its earlier releases over time (``radfed.privacy.releases``);
            the others change with every model.
    """

    name: TaskName
    models: tuple[str, ...]
    losses: tuple[str, ...]
    headline: str
    summary: tuple[str, ...]
    stable_parts: tuple[str, ...]

    def check(self, config: RunConfig) -> None:
        """Refuse settings this task cannot run with (raises ConfigError)."""
        ...

    def build_model(self, config: RunConfig) -> nn.Module:
        """The network, initialised from ``config.seed`` so server and sites agree."""
        ...

    def train(
        self,
        model: nn.Module,
        data: SplitData,
        config: RunConfig,
        *,
        seed: int,
        proximal_mu: float = 0.0,
        val: SplitData | None = None,
    ) -> TrainResult:
        """One local pass: ``config.local_epochs`` epochs on ``data``; CUDA with mixed
        precision when present. FedProx adds ``mu/2 * ||w - w_global||^2``; with
        ``early-stopping-patience`` the pass stops on ``val``'s loss and keeps its best
        epoch. The model is left on the CPU."""
        ...

    def predict(self, model: nn.Module, data: SplitData, config: RunConfig) -> CaseOutputs:
        """Per-case outputs of ``data`` (kept at the site)."""
        ...

    def empty_stats(self, config: RunConfig, *, suppressed: bool = False) -> SplitStats:
        """Statistics of no case (the identity of ``+``)."""
        ...

    def to_values(self, stats: SplitStats) -> dict[str, StatsValue]:
        """Statistics -> record values (keys without the split prefix, fixed for a config)."""
        ...

    def from_values(self, values: Mapping[str, object], config: RunConfig) -> SplitStats:
        """Record values -> statistics, checked.

        Raises:
            ValueError: naming the key whose value is missing, of the wrong type or length,
                negative, or inconsistent with the others (never quoting the value).
        """
        ...

    def metrics(self, stats: SplitStats) -> dict[str, float | None]:
        """Every reported metric of the statistics (None where undefined)."""
        ...


def choose(value: str, allowed: tuple[str, ...], key: str, task: str) -> str:
    """``value``, or the task's default (the first allowed) when empty.

    Raises:
        ConfigError: naming the key, the task and the accepted values.
    """
    if not value:
        return allowed[0]
    if value not in allowed:
        msg = f"run config {key!r} for {task} must be one of {', '.join(allowed)}, got {value!r}"
        raise ConfigError(msg)
    return value


def merge_stats(task: Task, parts: Iterable[SplitStats], config: RunConfig) -> SplitStats:
    """The pooled statistics of ``parts`` (suppressed cells are left out)."""
    return pool(parts, task.empty_stats(config))


def record_value(values: Mapping[str, object], key: str) -> object:
    """``values[key]`` of a received statistics record (raises ValueError naming a missing key)."""
    if key not in values:
        raise ValueError(f"{key} is missing")
    return values[key]


def record_count(value: object, key: str, *, signed: bool = False) -> int:
    """A received count: a non-negative int (any int when ``signed``: a noisy count; bools
    refused); never quotes the value."""
    if isinstance(value, bool) or not isinstance(value, int) or (value < 0 and not signed):
        raise ValueError(f"{key} must be a non-negative integer")
    return value


def record_histogram(
    value: object, key: str, bins: int, *, signed: bool = False
) -> tuple[int, ...]:
    """A received histogram: a list of ``bins`` counts (noisy ones when ``signed``)."""
    if not isinstance(value, list) or len(value) != bins:
        raise ValueError(f"{key} must be a list of {bins} counts")
    return tuple(record_count(v, key, signed=signed) for v in value)


#: The largest noise variance a statistic may declare (a standard deviation of 1000 counts).
MAX_NOISE_VARIANCE = 1e6


def record_noise(value: object, key: str) -> float:
    """A received noise variance: a finite number in [0, ``MAX_NOISE_VARIANCE``]."""
    ok = isinstance(value, int | float) and not isinstance(value, bool)
    if not ok or not 0 <= float(value) <= MAX_NOISE_VARIANCE:  # type: ignore[arg-type]
        raise ValueError(f"{key} must be a number in [0, {MAX_NOISE_VARIANCE:g}]")
    return float(value)  # type: ignore[arg-type]
