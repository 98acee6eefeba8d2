"""Binary image classification: MONAI networks, local training, per-split statistics."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from torch import nn

from radfed.config import RunConfig
from radfed.data.site import SiteData, SplitData
from radfed.errors import ConfigError
from radfed.metrics.binary import BinaryStats
from radfed.tasks.runtime import TrainResult, autocast, grad_scaler, pick_device, seeded_generator

__all__ = ["LOSSES", "MODELS", "build_model", "evaluate", "make_loss", "predict", "train"]

#: Network names accepted by the ``model`` run-config key.
MODELS = ("cnn", "resnet18", "resnet50", "densenet121", "efficientnet-b0")
#: Loss names accepted by the ``loss`` run-config key.
LOSSES = ("bce", "weighted-bce", "focal")


def build_model(config: RunConfig) -> nn.Module:
    """A MONAI network with one output logit for 1-channel ``(B, 1, S, S)`` images.

    The weights are initialised from ``config.seed`` so the server and every site agree.
    """
    from monai.networks import nets

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        if config.model == "cnn":
            # A narrow ResNet-10 with global pooling and batch norm: fast on CPU, translation
            # invariant (a lesion may be anywhere), integer BN buffers included.
            return nets.ResNet(
                block="basic",
                layers=[1, 1, 1, 1],
                block_inplanes=[8, 16, 32, 64],
                spatial_dims=config.spatial_dims,
                n_input_channels=1,
                num_classes=1,
                conv1_t_size=5,
                conv1_t_stride=1,
            )
        if config.model == "resnet18":
            return nets.resnet18(
                spatial_dims=config.spatial_dims, n_input_channels=1, num_classes=1
            )
        if config.model == "resnet50":
            return nets.resnet50(
                spatial_dims=config.spatial_dims, n_input_channels=1, num_classes=1
            )
        if config.model == "densenet121":
            return nets.DenseNet121(spatial_dims=config.spatial_dims, in_channels=1, out_channels=1)
        if config.model == "efficientnet-b0":  # random initialisation: nothing is downloaded
            return nets.EfficientNetBN(
                "efficientnet-b0",
                pretrained=False,
                progress=False,
                spatial_dims=config.spatial_dims,
                in_channels=1,
                num_classes=1,
            )
    msg = f"run config 'model' must be one of {', '.join(MODELS)}, got {config.model!r}"
    raise ConfigError(msg)


def make_loss(name: str, labels: torch.Tensor) -> nn.Module:
    """The training loss for logits of shape ``(B,)`` against 0/1 targets.

    ``weighted-bce`` weighs positives by the site's own negative-to-positive ratio (class
    imbalance differs by site); ``focal`` is MONAI's focal loss (gamma 2) on the sigmoid.
    """
    if name == "bce":
        return nn.BCEWithLogitsLoss()
    if name == "weighted-bce":
        positives = float(labels.sum())
        ratio = (len(labels) - positives) / positives if positives else 1.0
        return nn.BCEWithLogitsLoss(pos_weight=torch.tensor(ratio))
    if name == "focal":
        from monai.losses import FocalLoss

        focal = FocalLoss(gamma=2.0)  # sigmoid-based unless use_softmax
        return _Flat(focal)
    msg = f"run config 'loss' must be one of {', '.join(LOSSES)}, got {name!r}"
    raise ConfigError(msg)


class _Flat(nn.Module):
    """Adapts a MONAI ``(B, C, ...)`` loss to flat logits and targets of shape ``(B,)``."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.inner(logits[:, None], targets[:, None])
        return out


def train(
    model: nn.Module,
    data: SplitData,
    config: RunConfig,
    *,
    seed: int,
    proximal_mu: float = 0.0,
    val: SplitData | None = None,
) -> TrainResult:
    """Local epochs of Adam on binary cross-entropy; CUDA with mixed precision when present.

    Args:
        model: the network, holding the global weights of this round.
        data: the site's training split.
        config: run settings (epochs, batch size, learning rate).
        seed: shuffling seed for this site and round.
        proximal_mu: FedProx: add ``mu/2 * ||w - w_global||^2`` over the trainable weights.
        val: the site's validation split; with ``early-stopping-patience`` > 0, local
            training stops when its loss has not improved for that many epochs, and the
            weights of the best epoch are kept.
    """
    device = pick_device()
    model.to(device).train()
    anchor = [p.detach().clone() for p in model.parameters()] if proximal_mu > 0 else []
    optimiser = torch.optim.Adam(model.parameters(), lr=config.learning_rate)
    scaler = grad_scaler(device)
    loss_fn = make_loss(config.loss, data.labels)
    generator = seeded_generator(seed)
    n = len(data)
    total, seen, epochs = 0.0, 0, 0
    watch = config.early_stopping_patience > 0 and val is not None and len(val) > 0
    best_loss, best_state, stale = float("inf"), None, 0
    for _ in range(config.local_epochs):
        epochs += 1
        model.train()
        order = torch.randperm(n, generator=generator)
        for start in range(0, n, config.batch_size):
            index = order[start : start + config.batch_size]
            if len(index) < 2:  # batch norm needs two samples
                continue
            images = data.images[index].to(device, non_blocking=True)
            labels = data.labels[index].to(device, dtype=torch.float32)
            optimiser.zero_grad(set_to_none=True)
            with autocast(device):
                logits = model(images).reshape(-1)
                loss = loss_fn(logits.float(), labels)
            if anchor:
                drift = sum(
                    ((p - a) ** 2).sum() for p, a in zip(model.parameters(), anchor, strict=True)
                )
                loss = loss + 0.5 * proximal_mu * drift
            scaler.scale(loss).backward()
            scaler.step(optimiser)
            scaler.update()
            total += float(loss.detach()) * len(index)
            seen += len(index)
        if watch:
            assert val is not None
            current = _mean_loss(model, val, loss_fn, device)
            if current < best_loss:
                best_loss, stale = current, 0
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            else:
                stale += 1
                if stale >= config.early_stopping_patience:
                    break
    if best_state is not None:
        model.load_state_dict(best_state)
    model.to("cpu")
    return TrainResult(num_examples=n, loss=total / seen if seen else float("nan"), epochs=epochs)


@torch.no_grad()
def _mean_loss(
    model: nn.Module, data: SplitData, loss_fn: nn.Module, device: torch.device
) -> float:
    model.eval()
    total = 0.0
    for start in range(0, len(data), 64):
        images = data.images[start : start + 64].to(device)
        labels = data.labels[start : start + 64].to(device, dtype=torch.float32)
        with autocast(device):
            logits = model(images).reshape(-1)
        total += float(loss_fn(logits.float(), labels)) * len(labels)
    return total / len(data)


@torch.no_grad()
def predict(model: nn.Module, data: SplitData, *, batch_size: int = 64) -> np.ndarray:
    """Probabilities of the positive class, shape ``(N,)``; they never leave the site."""
    device = pick_device()
    model.to(device).eval()
    out = []
    for start in range(0, len(data), batch_size):
        images = data.images[start : start + batch_size].to(device)
        with autocast(device):
            logits = model(images).reshape(-1)
        out.append(torch.sigmoid(logits.float()).cpu())
    model.to("cpu")
    return torch.cat(out).numpy() if out else np.zeros(0, dtype=np.float32)


def evaluate(model: nn.Module, site: SiteData, config: RunConfig) -> Mapping[str, BinaryStats]:
    """Sufficient statistics of each split in ``config.eval_splits`` (empty splits give zeros)."""
    out: dict[str, BinaryStats] = {}
    for split in config.eval_splits:
        data = site.splits[split]
        scores = predict(model, data)
        out[split] = BinaryStats.from_scores(
            scores, data.labels.numpy(), threshold=config.threshold, bins=config.score_bins
        )
    return out
