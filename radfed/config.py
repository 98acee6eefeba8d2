"""Typed, validated run configuration, read from Flower's run config (kebab-case keys)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, TypeVar

from radfed.errors import ConfigError

__all__ = [
    "IDENTIFYING_PARTS",
    "SPLITS",
    "AttackKind",
    "RunConfig",
    "StrategyName",
    "TaskName",
    "as_choice",
    "looks_identifying",
]

#: The split names a site knows; ``test`` is sealed and only evaluated on request.
SPLITS = ("train", "val", "test")
#: The most classes a run may have (classification and segmentation): statistics and the
#: final layer grow with it, at the server and at every site.
MAX_CLASSES = 1000
#: The most values of a list setting (subgroups, age-band edges, evaluated splits).
MAX_LIST = 32
#: The most histogram bins of one statistics cell: a cell holds a histogram per class, so
#: num-classes x score-bins (and x metric-bins) is bounded, at the server and every site.
MAX_CELL_BINS = 200_000

#: Parts of an attribute name that say it may identify a patient or a person: such an
#: attribute never leaves as a subgroup, whatever a run or a site policy asks.
IDENTIFYING_PARTS = (
    *("id", "name", "date", "postcode", "postal", "zip", "address", "phone", "email"),
    *("birth", "mrn", "accession", "physician", "uid"),
)


def looks_identifying(attribute: str) -> bool:
    """Whether an attribute name (or a part of ``a*b``) looks like an identifier: it holds
    one of ``IDENTIFYING_PARTS`` (any case), or is ``age`` (report ``age_band``)."""
    for part in attribute.lower().split("*"):
        if part == "age" or any(word in part for word in IDENTIFYING_PARTS):
            return True
    return False


_E = TypeVar("_E", bound=StrEnum)


class TaskName(StrEnum):
    """The ``task`` values: what a run trains (one module of ``radfed.tasks`` each)."""

    CLASSIFICATION = "classification"
    DETECTION = "detection"
    SEGMENTATION = "segmentation"


class AttackKind(StrEnum):
    """What a poisoned simulated site sends instead of its update (``attack = "SITE:KIND"``)."""

    SIGN_FLIP = "sign-flip"  # the global model minus 4 times the site's honest change
    SCALE = "scale"  # the global model plus 10 times the site's honest change


class StrategyName(StrEnum):
    """The ``strategy`` values: Flower's aggregation strategies with radfed's checks."""

    FEDAVG = "fedavg"
    FEDPROX = "fedprox"
    FEDADAM = "fedadam"
    FEDYOGI = "fedyogi"
    FEDAVGM = "fedavgm"
    FEDMEDIAN = "fedmedian"
    FEDTRIMMEDAVG = "fedtrimmedavg"
    KRUM = "krum"
    MULTIKRUM = "multikrum"
    BULYAN = "bulyan"


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    """Settings of one federated run; every field has a kebab-case run-config key.

    Attributes:
        task: the task name (``classification``).
        num_server_rounds: federated rounds.
        data_root: in simulation, a folder of site folders (``DATA/<site>/manifest.csv``).
        out_dir: the run folder the server writes.
        seed: seeds model initialisation, splits and local training.
        model: network name of the task; empty for the task's default (classification
            ``cnn``, detection ``retinanet``, segmentation ``unet``).
        num_classes: classification classes; 2 is binary (one logit), more is multi-class
            (labels ``0 .. num_classes - 1``, softmax).
        image_size: images are resized to ``image_size x image_size`` pixels.
        local_epochs: local epochs per round at each site.
        augment: classification trains on scanner-like intensity variation (gain, offset,
            gamma, noise) so that the model stays calibrated across sites.
        local_steps: when above 0, local optimiser steps per round instead of epochs (sites
            of different sizes then do the same amount of work).
        batch_size: local mini-batch size.
        learning_rate: local Adam learning rate.
        eval_splits: splits each site evaluates every round.
        val_fraction: share of patients in ``val`` when radfed makes the split.
        test_fraction: share of patients in ``test`` when radfed makes the split.
        threshold: operating threshold on the predicted probability.
        score_bins: bins of the score histograms sites send (pooled AUC resolution).
        min_sites: sites that must be connected before a round starts.
        round_timeout: seconds the server waits for replies in a round.
        age_bands: ascending age-band edges in years (``18,40,60,80``).
        spatial_dims: 2 for images, 3 for volumes (series folders, multi-frame, NIfTI).
        voi_lut: apply each image's VOI LUT or window after the modality LUT.
        target_spacing: resample to this spacing in mm per axis before resizing (empty: off).
        min_cell_size: a statistics cell with fewer cases leaves a site only as suppressed,
            and score-histogram bins are merged to hold at least this many cases; a site's
            own ``min-cell-size`` node setting can only raise it.
        max_update_norm: the server clips an update further than this (L2) from the global
            model to this distance; 0: 3 times the median distance of the first round's
            updates (``radfed.central.strategy.NORM_FACTOR``).
        strategy: ``fedavg``, ``fedprox``, ``fedadam``, ``fedyogi``, ``fedavgm``, or a
            robust one: ``fedmedian``, ``fedtrimmedavg``, ``krum``, ``multikrum``, ``bulyan``.
        robust_f: the number of malicious sites Krum, MultiKrum and Bulyan tolerate.
        trim_beta: the fraction FedTrimmedAvg cuts from each end, per coordinate.
        proximal_mu: FedProx's proximal weight (sites add ``mu/2 * ||w - w_global||^2``).
        server_lr: the server optimiser's learning rate (FedAdam, FedYogi).
        fedbn: keep normalisation layers local (FedBN): neither sent nor overwritten.
        loss: the task's loss; empty for its default. Classification: ``bce``,
            ``weighted-bce`` (each site weighs its classes by its own class ratio) or
            ``focal``; segmentation: ``dice-ce`` or ``dice``; detection: ``retinanet``.
        init_checkpoint: a weights file on the server to start from (transfer learning);
            a radfed checkpoint or a plain state dict; nothing is downloaded.
        early_stopping_patience: stop a site's local epochs when its validation loss has
            not improved for this many epochs, keeping the best weights (0: off).
        num_workers: DataLoader worker processes for local training (0: in the main process).
        metric_bins: bins of the per-case metric histograms of detection and segmentation.
        patch_size: segmentation trains on random patches of this size and infers with a
            sliding window of it (0: whole images).
        sw_overlap: overlap of neighbouring sliding-window patches, in [0, 1).
        det_score_thresh: detection: boxes scoring below this are discarded before NMS.
        det_nms_thresh: detection: IoU above which NMS suppresses the lower-scoring box.
        det_detections_per_image: detection: boxes kept per image after NMS.
        det_fg_iou: detection matcher: anchors with IoU at least this are foreground.
        det_bg_iou: detection matcher: anchors with IoU below this are background.
        det_batch_size_per_image: detection sampler: anchors sampled per image for the
            classification loss.
        det_positive_fraction: detection sampler: share of foreground among them.
        subgroups: attributes reported per subgroup (header or manifest attributes, e.g.
            ``sex``, ``age_band``, ``manufacturer``); ``a*b`` is the intersection of two.
        bias_margin: the bias report flags a gap when the interval of the difference
            excludes 0 and the difference is at least this large.
        primary_subgroups: attributes of ``subgroups`` that the run declares primary: their
            comparisons form a multiple-testing family of their own (docs/bias_report.md).
        holdout_site: in simulation, a site that does not train and is evaluated as a
            held-out site (geographic validation); empty for none.
        attack: in simulation, ``SITE:KIND`` (``AttackKind``): that site sends a poisoned
            update, to measure what a robust strategy withstands; a deployed site never
            does (only simulated nodes read it); empty for none.
        sites: in a deployment, the site names expected in the run; the server names the
            missing ones while it waits (empty: wait for ``min-sites`` sites of any name).
        site_wait: seconds a round waits for every expected site before it starts with the
            ``min-sites`` that are connected; with fewer, the run stops (resumable).
        resume: continue the run in ``out-dir`` from its last completed round.
    """

    task: TaskName = TaskName.CLASSIFICATION
    num_server_rounds: int = 3
    data_root: str = ""
    out_dir: str = "runs/latest"
    seed: int = 42
    model: str = ""
    num_classes: int = 2
    image_size: int = 64
    local_epochs: int = 3
    local_steps: int = 0
    augment: bool = True
    batch_size: int = 16
    learning_rate: float = 1e-3
    eval_splits: tuple[str, ...] = ("train", "val")
    val_fraction: float = 0.2
    test_fraction: float = 0.2
    threshold: float = 0.5
    score_bins: int = 1000
    min_sites: int = 2
    round_timeout: float = 3600.0
    age_bands: tuple[int, ...] = (18, 40, 60, 80)
    spatial_dims: int = 2
    voi_lut: bool = False
    target_spacing: tuple[float, ...] = ()
    min_cell_size: int = 10
    max_update_norm: float = 0.0
    strategy: StrategyName = StrategyName.FEDAVG
    proximal_mu: float = 0.01
    server_lr: float = 0.01
    robust_f: int = 1
    trim_beta: float = 0.2
    fedbn: bool = False
    loss: str = ""
    init_checkpoint: str = ""
    early_stopping_patience: int = 0
    num_workers: int = 0
    metric_bins: int = 100
    patch_size: int = 0
    sw_overlap: float = 0.25
    det_score_thresh: float = 0.05
    det_nms_thresh: float = 0.22
    det_detections_per_image: int = 100
    det_fg_iou: float = 0.5
    det_bg_iou: float = 0.4
    det_batch_size_per_image: int = 64
    det_positive_fraction: float = 0.3
    subgroups: tuple[str, ...] = ("sex", "age_band", "manufacturer", "sex*age_band")
    bias_margin: float = 0.05
    primary_subgroups: tuple[str, ...] = ()
    holdout_site: str = ""
    attack: str = ""
    sites: tuple[str, ...] = ()
    site_wait: float = 300.0
    resume: bool = False
    extra: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "task", as_choice("task", self.task, TaskName))
        object.__setattr__(self, "strategy", as_choice("strategy", self.strategy, StrategyName))
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            numbers = value if isinstance(value, tuple) else (value,)
            _check(
                all(math.isfinite(v) for v in numbers if isinstance(v, float)),
                f.name.replace("_", "-"),
                value,
                "a finite number",
            )
        for key, size, most in (
            ("subgroups", len(self.subgroups), MAX_LIST),
            ("age-bands", len(self.age_bands), MAX_LIST),
            ("eval-splits", len(self.eval_splits), MAX_LIST),
            ("sites", len(self.sites), 10_000),
        ):
            _check(size <= most, key, f"{size} values", f"at most {most} values")
        _check(self.num_server_rounds >= 1, "num-server-rounds", self.num_server_rounds, ">= 1")
        _check(self.image_size >= 16, "image-size", self.image_size, ">= 16")
        _check(self.local_epochs >= 1, "local-epochs", self.local_epochs, ">= 1")
        _check(self.batch_size >= 1, "batch-size", self.batch_size, ">= 1")
        _check(self.learning_rate > 0, "learning-rate", self.learning_rate, "> 0")
        _check(0 <= self.val_fraction < 1, "val-fraction", self.val_fraction, "in [0, 1)")
        _check(0 <= self.test_fraction < 1, "test-fraction", self.test_fraction, "in [0, 1)")
        _check(
            self.val_fraction + self.test_fraction < 1,
            "val-fraction + test-fraction",
            self.val_fraction + self.test_fraction,
            "< 1 so that some patients train",
        )
        _check(0 < self.threshold < 1, "threshold", self.threshold, "in (0, 1)")
        edge = self.threshold * self.score_bins
        _check(
            abs(edge - round(edge)) < 1e-9,
            "threshold",
            self.threshold,
            f"on an edge of the {self.score_bins} score bins (a multiple of 1/{self.score_bins})",
        )
        _check(10 <= self.score_bins <= 100_000, "score-bins", self.score_bins, "in [10, 100000]")
        _check(self.min_sites >= 1, "min-sites", self.min_sites, ">= 1")
        _check(self.round_timeout > 0, "round-timeout", self.round_timeout, "> 0")
        _check(self.site_wait >= 0, "site-wait", self.site_wait, ">= 0 seconds")
        _check(
            len(set(self.sites)) == len(self.sites) and all(self.sites),
            "sites",
            ",".join(self.sites),
            "distinct site names, comma-separated",
        )
        _check(
            bool(self.age_bands)
            and list(self.age_bands) == sorted(set(self.age_bands))
            and self.age_bands[0] > 0,
            "age-bands",
            ",".join(map(str, self.age_bands)),
            "ascending positive years, e.g. '18,40,60,80'",
        )
        site, _, kind = self.attack.partition(":")
        _check(
            not self.attack or (bool(site) and kind in set(AttackKind)),
            "attack",
            self.attack,
            f"SITE:KIND with KIND one of {', '.join(AttackKind)} (empty: none)",
        )
        _check(self.min_cell_size >= 1, "min-cell-size", self.min_cell_size, ">= 1")
        _check(self.max_update_norm >= 0, "max-update-norm", self.max_update_norm, ">= 0 (0: auto)")
        _check(0 <= self.robust_f <= 1000, "robust-f", self.robust_f, "in [0, 1000]")
        _check(0 <= self.trim_beta < 0.5, "trim-beta", self.trim_beta, "in [0, 0.5)")
        _check(
            self.early_stopping_patience >= 0,
            "early-stopping-patience",
            self.early_stopping_patience,
            ">= 0 (0: off)",
        )
        _check(
            2 <= self.num_classes <= MAX_CLASSES,
            "num-classes",
            self.num_classes,
            f"in [2, {MAX_CLASSES}]",
        )
        _check(self.local_steps >= 0, "local-steps", self.local_steps, ">= 0 (0: use epochs)")
        _check(0 <= self.bias_margin < 1, "bias-margin", self.bias_margin, "in [0, 1)")
        _check(
            set(self.primary_subgroups) <= set(self.subgroups),
            "primary-subgroups",
            ",".join(self.primary_subgroups),
            f"attributes among subgroups ({','.join(self.subgroups)})",
        )
        for name in self.subgroups:
            parts = name.split("*")
            _check(
                len(parts) <= 2 and all(p.isidentifier() for p in parts),
                "subgroups",
                ",".join(self.subgroups),
                "attribute names (a*b for an intersection of two)",
            )
            _check(
                not looks_identifying(name),
                "subgroups",
                name,
                "attributes that do not look like identifiers (no id, name, date, postcode, "
                "address, birth, accession, physician...; age_band, not age)",
            )
        _check(self.num_workers >= 0, "num-workers", self.num_workers, ">= 0")
        _check(10 <= self.metric_bins <= 10_000, "metric-bins", self.metric_bins, "in [10, 10000]")
        for key, bins in (("score-bins", self.score_bins), ("metric-bins", self.metric_bins)):
            _check(
                self.num_classes * bins <= MAX_CELL_BINS,
                f"num-classes x {key}",
                f"{self.num_classes} x {bins}",
                f"at most {MAX_CELL_BINS} (fewer classes or bins)",
            )
        _check(self.patch_size >= 0, "patch-size", self.patch_size, ">= 0 (0: whole images)")
        _check(0 <= self.sw_overlap < 1, "sw-overlap", self.sw_overlap, "in [0, 1)")
        for key, value in (
            ("det-score-thresh", self.det_score_thresh),
            ("det-nms-thresh", self.det_nms_thresh),
            ("det-fg-iou", self.det_fg_iou),
            ("det-bg-iou", self.det_bg_iou),
            ("det-positive-fraction", self.det_positive_fraction),
        ):
            _check(0 <= value <= 1, key, value, "in [0, 1]")
        _check(
            self.det_bg_iou <= self.det_fg_iou,
            "det-bg-iou",
            self.det_bg_iou,
            f"<= det-fg-iou ({self.det_fg_iou})",
        )
        _check(
            1 <= self.det_detections_per_image <= 10_000,
            "det-detections-per-image",
            self.det_detections_per_image,
            "in [1, 10000]",
        )
        _check(
            1 <= self.det_batch_size_per_image <= 100_000,
            "det-batch-size-per-image",
            self.det_batch_size_per_image,
            "in [1, 100000]",
        )
        _check(self.proximal_mu >= 0, "proximal-mu", self.proximal_mu, ">= 0")
        _check(self.server_lr > 0, "server-lr", self.server_lr, "> 0")
        _check(self.spatial_dims in (2, 3), "spatial-dims", self.spatial_dims, "2 or 3")
        _check(
            not self.target_spacing
            or (len(self.target_spacing) == self.spatial_dims and min(self.target_spacing) > 0),
            "target-spacing",
            ",".join(map(str, self.target_spacing)),
            "empty or one positive spacing in mm per spatial axis",
        )
        bad = [s for s in self.eval_splits if s not in SPLITS]
        _check(
            not bad and bool(self.eval_splits),
            "eval-splits",
            ",".join(self.eval_splits),
            f"a comma-separated subset of {','.join(SPLITS)}",
        )

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> RunConfig:
        """Build from Flower's ``context.run_config``; unknown keys are kept in ``extra``.

        Raises:
            ConfigError: a value has the wrong type or is out of range.
        """
        kwargs: dict[str, Any] = {}
        extra: dict[str, Any] = {}
        fields = {f.name: f for f in dataclasses.fields(cls) if f.name != "extra"}
        for key, value in run_config.items():
            name = key.replace("-", "_")
            if name not in fields:
                extra[key] = value
                continue
            kwargs[name] = _coerce(key, value, fields[name].type)
        return cls(**kwargs, extra=extra)

    def to_run_config(self) -> dict[str, bool | int | float | str]:
        """The kebab-case mapping that ``from_run_config`` reads back."""
        out: dict[str, bool | int | float | str] = {}
        for f in dataclasses.fields(self):
            if f.name == "extra":
                continue
            value = getattr(self, f.name)
            if isinstance(value, tuple):
                value = ",".join(map(str, value))
            elif isinstance(value, StrEnum):
                value = value.value
            out[f.name.replace("_", "-")] = value
        return out


def as_choice(key: str, value: object, choices: type[_E]) -> _E:
    """``value`` as one of ``choices``.

    Raises:
        ConfigError: naming the key, the accepted values and the value given.
    """
    for choice in choices:
        if choice == value:
            return choice
    names = ", ".join(choices)
    raise ConfigError(f"run config {key!r} must be one of {names}, got {value!r}")


def _check(ok: bool, key: str, value: object, expected: str) -> None:
    if not ok:
        msg = f"run config {key!r} must be {expected}, got {value!r}"
        raise ConfigError(msg)


def _coerce(key: str, value: Any, annotation: Any) -> Any:
    kind = str(annotation)
    if kind in ("TaskName", "StrategyName"):  # a string, checked against the enum later
        kind = "str"
    try:
        if kind == "int":
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise TypeError
            return int(value)
        if kind == "float":
            if isinstance(value, bool):
                raise TypeError
            return float(value)
        if kind == "str":
            if not isinstance(value, str):
                raise TypeError
            return value
        if kind.startswith("tuple"):
            items = value.split(",") if isinstance(value, str) else [str(v) for v in value]
            texts = tuple(s.strip() for s in items if s.strip())
            if "int" in kind:
                return tuple(int(t) for t in texts)
            return tuple(float(t) for t in texts) if "float" in kind else texts
        if kind == "bool":
            if not isinstance(value, bool):
                raise TypeError
            return value
    except (TypeError, ValueError):
        msg = f"run config {key!r} must be of type {kind}, got {value!r}"
        raise ConfigError(msg) from None
    return value
