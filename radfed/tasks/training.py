"""Device, mixed precision and seeding shared by every task's training loop."""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from radfed.config import RunConfig

__all__ = [
    "TrainResult",
    "autocast",
    "fit",
    "grad_scaler",
    "loader",
    "model_size",
    "pick_device",
    "round_steps",
    "seeded_generator",
]


@dataclass(frozen=True)
class TrainResult:
    """What a local training pass reports: cases trained on, mean loss, epochs run."""

    num_examples: int
    loss: float
    epochs: int = 0


def round_steps(config: RunConfig, cases: int) -> int:
    """The optimiser steps one round of local training on ``cases`` cases takes at most:
    ``local-steps``, else ``local-epochs`` passes of ``ceil(cases / batch-size)`` batches."""
    if config.local_steps:
        return config.local_steps
    return config.local_epochs * math.ceil(cases / config.batch_size)


@functools.lru_cache(maxsize=16)
def model_size(build: Callable[[RunConfig], nn.Module], config: RunConfig) -> int:
    """The parameters and buffers of the model ``build`` (a task's ``build_model``) makes
    for ``config``, counted on PyTorch's meta device: no memory is taken, however large the
    run asks it to be. Kept per (build, config): a site asks for every message."""
    with torch.device("meta"):
        model = build(config)
    return sum(t.numel() for t in (*model.parameters(), *model.buffers()))


def pick_device() -> torch.device:
    """The site's GPU when CUDA is available, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def autocast(device: torch.device) -> contextlib.AbstractContextManager[object]:
    """Mixed precision (float16) on CUDA; a no-op on CPU."""
    if device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.float16)
    return contextlib.nullcontext()


def grad_scaler(device: torch.device) -> torch.amp.GradScaler:
    """Loss scaling for float16 training on CUDA; disabled (pass-through) on CPU."""
    return torch.amp.GradScaler("cuda", enabled=device.type == "cuda")


def seeded_generator(seed: int) -> torch.Generator:
    """A CPU generator for shuffling, independent of the global RNG."""
    generator = torch.Generator()
    generator.manual_seed(seed)
    return generator


def loader(
    dataset: Dataset[Any],
    *,
    batch_size: int,
    seed: int,
    num_workers: int = 0,
    shuffle: bool = True,
    collate_fn: Callable[[list[Any]], Any] | None = None,
) -> DataLoader[Any]:
    """A DataLoader whose order and worker seeds follow ``seed``; pinned memory on CUDA
    with workers."""
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        generator=seeded_generator(seed),
        num_workers=num_workers,
        # pinned buffers help only when worker processes prepare batches ahead; in the main
        # process the extra copy per batch costs about 20% on a GPU (make bench)
        pin_memory=torch.cuda.is_available() and num_workers > 0,
        collate_fn=collate_fn,
        persistent_workers=False,
    )


def augment_intensity(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Scanner-like intensity variation of a batch ``(B, 1, S, S[, S])`` in [0, 1]: a random
    gain, offset and gamma per image and Gaussian noise of a random level (up to 0.08).

    Sites differ in exactly these ways (vendor, bit depth, noise); training on them keeps a
    federated model calibrated at sites whose images are noisier or darker. Drawn from
    ``generator`` (CPU), so a seed gives the same augmentation on any device.
    """
    shape = (images.shape[0],) + (1,) * (images.dim() - 1)

    def draw(low: float, high: float) -> torch.Tensor:
        return (torch.rand(shape, generator=generator) * (high - low) + low).to(images.device)

    gamma = draw(0.8, 1.25)
    out = images.clamp(min=0).pow(gamma) * draw(0.9, 1.1) + draw(-0.05, 0.05)
    noise = torch.randn(images.shape, generator=generator).to(images.device)
    return out + noise * draw(0.0, 0.08)


def fit(
    model: nn.Module,
    batches: Callable[[], Iterable[Any]],
    step_loss: Callable[[nn.Module, Any, torch.device], tuple[torch.Tensor, int]],
    config: RunConfig,
    *,
    num_examples: int,
    proximal_mu: float = 0.0,
    val_loss: Callable[[nn.Module, torch.device], float] | None = None,
) -> TrainResult:
    """The local training loop every task shares: Adam, mixed precision on CUDA, FedProx,
    early stopping.

    Args:
        model: the network holding this round's global weights; left on the CPU.
        batches: the batches of one epoch; called once per epoch. Return the same
            DataLoader each time: every pass over it draws a new order from its generator.
        step_loss: the task's loss of one batch (run under autocast) and the number of
            cases it held; a batch of 0 cases is skipped.
        config: ``local-epochs`` (or ``local-steps``: that many optimiser steps per round,
            over as many passes as they take), ``learning-rate``,
            ``early-stopping-patience``.
        num_examples: the cases trained on, reported to the server.
        proximal_mu: FedProx: add ``mu/2 * ||w - w_global||^2`` over the trainable weights.
        val_loss: the mean validation loss of the model in eval mode; with
            ``early-stopping-patience`` > 0 training stops when it has not improved for that
            many epochs, and the weights of the best epoch are kept.
    """
    device = pick_device()
    model.to(device).train()
    anchor = [p.detach().clone() for p in model.parameters()] if proximal_mu > 0 else []
    optimiser = torch.optim.Adam(model.parameters(), lr=config.learning_rate)
    scaler = grad_scaler(device)
    watch = config.early_stopping_patience > 0 and val_loss is not None
    total, seen, epochs = torch.zeros((), device=device), 0, 0
    best_loss, best_state, stale = float("inf"), None, 0
    steps, budget = 0, config.local_steps
    while (steps < budget) if budget else (epochs < config.local_epochs):
        epochs += 1
        model.train()
        stepped = steps
        for batch in batches():
            if budget and steps >= budget:
                break
            optimiser.zero_grad(set_to_none=True)
            with autocast(device):
                loss, count = step_loss(model, batch, device)
            if count == 0:
                continue
            loss = loss.float()
            if anchor:
                drift = torch.zeros((), device=device)
                for weight, start in zip(model.parameters(), anchor, strict=True):
                    drift = drift + ((weight - start) ** 2).sum()
                loss = loss + 0.5 * proximal_mu * drift
            scaled: torch.Tensor = scaler.scale(loss)
            torch.autograd.backward(scaled)
            scaler.step(optimiser)
            scaler.update()
            total = total + loss.detach() * count  # summed on the device: no sync per step
            seen += count
            steps += 1
        if steps == stepped:  # no usable batch: more passes would not help
            break
        if watch:
            assert val_loss is not None
            model.eval()
            with torch.no_grad():
                current = val_loss(model, device)
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
    return TrainResult(
        num_examples=num_examples,
        loss=float(total) / seen if seen else float("nan"),
        epochs=epochs,
    )
