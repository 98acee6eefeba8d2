"""Image classification, binary or multi-class: MONAI networks, local training, statistics."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import TensorDataset

from radfed.config import RunConfig, TaskName
from radfed.data.loading import SplitData
from radfed.errors import ConfigError, DataError
from radfed.log import logger
from radfed.metrics.binary import BinaryStats, binary_metrics
from radfed.metrics.multiclass import MulticlassStats, multiclass_metrics
from radfed.tasks.binary_values import binary_from_values, binary_values
from radfed.tasks.protocol import (
    StatsValue,
    Task,
    choose,
    record_count,
    record_histogram,
)
from radfed.tasks.training import (
    TrainResult,
    augment_intensity,
    autocast,
    fit,
    loader,
    pick_device,
    seeded_generator,
)

__all__ = [
    "LOSSES",
    "MODELS",
    "TASK",
    "ClassificationTask",
    "ScoreOutputs",
    "build_model",
    "make_loss",
]

#: Network names accepted by the ``model`` run-config key; the first is the default.
MODELS = ("cnn", "resnet18", "resnet50", "densenet121", "efficientnet-b0")
#: Loss names of binary and of multi-class classification; the first is the default.
BINARY_LOSSES = ("bce", "weighted-bce", "focal")
MULTICLASS_LOSSES = ("ce", "weighted-ce", "focal")
LOSSES = (*BINARY_LOSSES, *MULTICLASS_LOSSES[:2])

ClassStats = BinaryStats | MulticlassStats


def build_model(config: RunConfig) -> nn.Module:
    """A MONAI network for 1-channel ``(B, 1, S, S[, S])`` images.

    It has one output logit for binary classification (``num-classes`` 2) and one per
    class otherwise. The weights are initialised from ``config.seed`` so the server and
    every site agree.
    """
    from monai.networks import nets

    model = choose(config.model, MODELS, "model", "classification")
    outputs = _outputs(config)
    dims = config.spatial_dims
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        if model == "cnn":
            # A narrow ResNet-10 with global pooling and batch norm: fast on CPU, translation
            # invariant (a lesion may be anywhere), integer BN buffers included.
            return nets.ResNet(
                block="basic",
                layers=[1, 1, 1, 1],
                block_inplanes=[8, 16, 32, 64],
                spatial_dims=dims,
                n_input_channels=1,
                num_classes=outputs,
                conv1_t_size=5,
                conv1_t_stride=1,
            )
        if model == "resnet18":
            return nets.resnet18(spatial_dims=dims, n_input_channels=1, num_classes=outputs)
        if model == "resnet50":
            return nets.resnet50(spatial_dims=dims, n_input_channels=1, num_classes=outputs)
        if model == "densenet121":
            return nets.DenseNet121(spatial_dims=dims, in_channels=1, out_channels=outputs)
        # efficientnet-b0, randomly initialised: nothing is downloaded
        return nets.EfficientNetBN(
            "efficientnet-b0",
            pretrained=False,
            progress=False,
            spatial_dims=dims,
            in_channels=1,
            num_classes=outputs,
        )


def _outputs(config: RunConfig) -> int:
    """Logits per case: one for binary classification, one per class otherwise."""
    return 1 if config.num_classes == 2 else config.num_classes


def _loss_name(config: RunConfig) -> str:
    """The configured loss, or the default (``bce`` for binary, ``ce`` for multi-class)."""
    allowed = BINARY_LOSSES if config.num_classes == 2 else MULTICLASS_LOSSES
    kind = "binary" if config.num_classes == 2 else f"{config.num_classes}-class"
    return choose(config.loss, allowed, "loss", f"{kind} classification")


def make_loss(name: str, labels: torch.Tensor, classes: int = 2) -> nn.Module:
    """The training loss of logits against class numbers.

    Binary (``classes`` 2): logits ``(B,)`` against 0/1 targets; ``weighted-bce`` weighs
    positives by the site's own negative-to-positive ratio (class imbalance differs by
    site); ``focal`` is MONAI's focal loss (gamma 2) on the sigmoid. Multi-class: logits
    ``(B, C)`` against class numbers ``(B,)``; ``ce`` is softmax cross-entropy,
    ``weighted-ce`` weighs each class by the site's inverse class frequency, ``focal`` is
    MONAI's softmax focal loss.
    """
    if classes == 2:
        if name == "bce":
            return nn.BCEWithLogitsLoss()
        if name == "weighted-bce":
            positives = float(labels.sum())
            ratio = (len(labels) - positives) / positives if positives else 1.0
            return nn.BCEWithLogitsLoss(pos_weight=torch.tensor(ratio))
    else:
        if name == "ce":
            return nn.CrossEntropyLoss()
        if name == "weighted-ce":
            counts = torch.bincount(labels, minlength=classes).float()
            weights = torch.where(counts > 0, len(labels) / (classes * counts.clamp(min=1)), 1.0)
            return nn.CrossEntropyLoss(weight=weights)
    if name == "focal":
        from monai.losses import FocalLoss

        if classes == 2:
            return _Flat(FocalLoss(gamma=2.0))  # sigmoid-based unless use_softmax
        return _OneHot(FocalLoss(gamma=2.0, use_softmax=True), classes)
    allowed = BINARY_LOSSES if classes == 2 else MULTICLASS_LOSSES
    msg = f"run config 'loss' must be one of {', '.join(allowed)}, got {name!r}"
    raise ConfigError(msg)


class _OneHot(nn.Module):
    """Adapts a MONAI ``(B, C)`` loss to class numbers of shape ``(B,)``."""

    def __init__(self, inner: nn.Module, classes: int) -> None:
        super().__init__()
        self.inner = inner
        self.classes = classes

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        onehot = nn.functional.one_hot(targets, self.classes).to(logits.dtype)
        out: torch.Tensor = self.inner(logits, onehot)
        return out


class _Flat(nn.Module):
    """Adapts a MONAI ``(B, C, ...)`` loss to flat logits and targets of shape ``(B,)``."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.inner(logits[:, None], targets[:, None])
        return out


def _targets(labels: torch.Tensor, classes: int) -> torch.Tensor:
    return labels.float() if classes == 2 else labels.long()


def _logits(model: nn.Module, images: torch.Tensor, classes: int) -> torch.Tensor:
    out: torch.Tensor = model(images)
    return out.reshape(-1).float() if classes == 2 else out.float()


def _probabilities(logits: torch.Tensor, classes: int) -> tuple[torch.Tensor, int]:
    """Class probabilities, and the number of cases whose output is not a number (a diverged
    or crafted model: a NaN logit, or an infinite one under softmax): those get the uniform
    probability, 1/C.

    Evaluation then succeeds whatever the images are: were it to fail on such a case, a
    model made to give NaN for some images only would learn from the mere failure whether
    the site holds one, outside the disclosure control of the statistics. The uniform
    probability is what a model that says nothing about the case would give.
    """
    if classes == 2:
        probabilities = torch.sigmoid(logits)
        unknown = torch.isnan(probabilities)
    else:
        probabilities = torch.softmax(logits, dim=1)
        unknown = torch.isnan(probabilities).any(dim=1, keepdim=True)
    uniform = torch.full_like(probabilities, 1.0 / classes)
    return torch.where(unknown, uniform, probabilities), int(unknown.sum())


def _check_labels(data: SplitData, classes: int) -> None:
    if len(data) and int(data.labels.max()) >= classes:
        msg = (
            f"a label is {int(data.labels.max())} but num-classes is {classes}; "
            "set num-classes to the number of classes (labels run 0..C-1)"
        )
        raise DataError(msg)


def train(
    model: nn.Module,
    data: SplitData,
    config: RunConfig,
    *,
    seed: int,
    proximal_mu: float = 0.0,
    val: SplitData | None = None,
) -> TrainResult:
    """Local epochs of Adam on the configured loss (see ``Task.train``)."""
    classes = config.num_classes
    _check_labels(data, classes)
    loss_fn = make_loss(_loss_name(config), data.labels, classes)
    # one loader for all epochs: each pass over it draws a new order from its generator
    batches = loader(
        TensorDataset(data.images, data.labels),
        batch_size=config.batch_size,
        seed=seed,
        num_workers=config.num_workers,
    )

    generator = seeded_generator(seed + 1)

    def step_loss(
        net: nn.Module, batch: tuple[torch.Tensor, torch.Tensor], device: torch.device
    ) -> tuple[torch.Tensor, int]:
        images, labels = batch
        if len(labels) < 2:  # batch norm needs two samples
            return torch.zeros(()), 0
        images = images.to(device, non_blocking=True)
        if config.augment:
            images = augment_intensity(images, generator)
        logits = _logits(net, images, classes)
        return loss_fn.to(device)(logits, _targets(labels.to(device), classes)), len(labels)

    def val_loss(net: nn.Module, device: torch.device) -> float:
        assert val is not None
        total = 0.0
        for start in range(0, len(val), 64):
            images = val.images[start : start + 64].to(device)
            labels = val.labels[start : start + 64].to(device)
            with autocast(device):
                logits = _logits(net, images, classes)
            total += float(loss_fn.to(device)(logits, _targets(labels, classes))) * len(labels)
        return total / len(val)

    return fit(
        model,
        lambda: batches,
        step_loss,
        config,
        num_examples=len(data),
        proximal_mu=proximal_mu,
        val_loss=val_loss if val is not None and len(val) else None,
    )


@torch.no_grad()
def predict(
    model: nn.Module, data: SplitData, config: RunConfig | None = None, *, batch_size: int = 64
) -> np.ndarray:
    """Class probabilities: shape ``(N,)`` (the positive class) when binary, else ``(N, C)``.

    They never leave the site.
    """
    classes = config.num_classes if config is not None else 2
    device = pick_device()
    model.to(device).eval()
    out = []
    unknown = 0
    for start in range(0, len(data), batch_size):
        images = data.images[start : start + batch_size].to(device)
        with autocast(device):
            logits = _logits(model, images, classes)
        probabilities, without = _probabilities(logits, classes)
        out.append(probabilities.cpu())
        unknown += without
    model.to("cpu")
    if unknown:  # the site's own log: a count, never which case
        logger.warning(
            "the model's output is not a number for %d of %d cases (a diverged or crafted "
            "model); they count as the uniform probability",
            unknown,
            len(data),
        )
    if out:
        return torch.cat(out).numpy()
    return np.zeros((0,) if classes == 2 else (0, classes), dtype=np.float32)


@dataclass(frozen=True)
class ScoreOutputs:
    """Per-case probabilities and labels of a split (kept at the site).

    ``patients`` holds each case's patient key (``SplitData.patients``; empty: every case
    its own patient). It only groups the cases for the per-patient sums of binary
    statistics: no key is ever packed, written to ``rows`` or logged.
    """

    scores: np.ndarray
    labels: np.ndarray
    classes: int
    threshold: float
    bins: int
    patients: tuple[str, ...] = field(default=(), repr=False)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def stats(self, index: Sequence[int] | np.ndarray) -> ClassStats:
        chosen = np.asarray(index, dtype=np.int64)
        if self.classes == 2:
            return BinaryStats.from_scores(
                self.scores[chosen],
                self.labels[chosen],
                threshold=self.threshold,
                bins=self.bins,
                exact=True,
                patients=tuple(self.patients[i] for i in chosen.tolist()) if self.patients else (),
            )
        return MulticlassStats.from_scores(self.scores[chosen], self.labels[chosen], bins=self.bins)

    def rows(self) -> list[dict[str, float | int | str]]:
        out: list[dict[str, float | int | str]] = []
        for i, label in enumerate(self.labels.tolist()):
            row: dict[str, float | int | str] = {"index": i, "label": int(label)}
            if self.classes == 2:
                row["score"] = float(self.scores[i])
            else:
                row.update({f"score_{c}": float(self.scores[i, c]) for c in range(self.classes)})
                row["predicted"] = int(self.scores[i].argmax())
            out.append(row)
        return out

    def parts(self) -> dict[str, list[int]]:
        """None: a classification cell's histograms count every case of the cell."""
        return {}


class ClassificationTask:
    """Binary (one sigmoid logit) or multi-class (softmax) image classification.

    Statistics: binary: the keys of ``radfed.tasks.binary_values`` (confusion counts,
    score histograms, noise variance, exact Mann-Whitney parts and per-patient sums);
    multi-class: ``confusion`` (C x C counts, row = true class, flattened) and per class
    ``c`` its one-vs-rest ``class-c.pos-hist`` and ``class-c.neg-hist``.
    """

    name = TaskName.CLASSIFICATION
    models: tuple[str, ...] = MODELS
    losses: tuple[str, ...] = LOSSES
    headline = "auc"
    summary: tuple[str, ...] = (
        "auc",
        "sensitivity",
        "specificity",
        "accuracy",
        "balanced_accuracy",
        "ece",
        "auc_tie_bound",
    )
    stable_parts: tuple[str, ...] = ()

    def check(self, config: RunConfig) -> None:
        choose(config.model, MODELS, "model", self.name)
        _loss_name(config)

    # the module's functions are the task's (see their docstrings)
    build_model = staticmethod(build_model)
    train = staticmethod(train)

    def predict(self, model: nn.Module, data: SplitData, config: RunConfig) -> ScoreOutputs:
        _check_labels(data, config.num_classes)
        return ScoreOutputs(
            scores=predict(model, data, config),
            labels=data.labels.numpy(),
            classes=config.num_classes,
            threshold=config.threshold,
            bins=config.score_bins,
            patients=tuple(data.patients),
        )

    def empty_stats(self, config: RunConfig, *, suppressed: bool = False) -> ClassStats:
        if config.num_classes == 2:
            return BinaryStats.empty(config.score_bins, suppressed=suppressed)
        return MulticlassStats.empty(config.num_classes, config.score_bins, suppressed=suppressed)

    def to_values(self, stats: Any) -> dict[str, StatsValue]:
        if isinstance(stats, BinaryStats):
            return binary_values(stats)
        assert isinstance(stats, MulticlassStats)
        values: dict[str, StatsValue] = {"confusion": [v for row in stats.confusion for v in row]}
        for c, part in enumerate(stats.per_class):
            values[f"class-{c}.pos-hist"] = list(part.pos_hist)
            values[f"class-{c}.neg-hist"] = list(part.neg_hist)
        return values

    def from_values(self, values: Mapping[str, object], config: RunConfig) -> ClassStats:
        bins, classes = config.score_bins, config.num_classes
        if classes == 2:
            return binary_from_values(values, config)
        flat = values.get("confusion")
        if not isinstance(flat, list) or len(flat) != classes * classes:
            raise ValueError(f"confusion must be a list of {classes * classes} counts")
        cells = [record_count(v, "confusion") for v in flat]
        confusion = tuple(tuple(cells[r * classes : (r + 1) * classes]) for r in range(classes))
        n = sum(cells)
        per_class = []
        for c in range(classes):
            pos = record_histogram(values.get(f"class-{c}.pos-hist"), f"class-{c}.pos-hist", bins)
            neg = record_histogram(values.get(f"class-{c}.neg-hist"), f"class-{c}.neg-hist", bins)
            support = sum(confusion[c])
            decided = sum(row[c] for row in confusion)
            if sum(pos) != support or sum(neg) != n - support:
                raise ValueError(f"class-{c} histograms disagree with the confusion matrix")
            tp = confusion[c][c]
            per_class.append(
                BinaryStats(tp, decided - tp, n - support - decided + tp, support - tp, pos, neg)
            )
        return MulticlassStats(confusion, tuple(per_class))

    def metrics(self, stats: Any) -> dict[str, float | None]:
        if isinstance(stats, BinaryStats):
            return binary_metrics(stats)
        assert isinstance(stats, MulticlassStats)
        return multiclass_metrics(stats)


#: The classification task of the registry.
TASK: Task = ClassificationTask()
