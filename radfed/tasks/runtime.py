"""Device, mixed precision and seeding shared by every task's training loop."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

__all__ = ["TrainResult", "autocast", "grad_scaler", "pick_device", "seeded_generator"]


@dataclass(frozen=True)
class TrainResult:
    """What a local training pass reports: cases trained on, mean loss, epochs run."""

    num_examples: int
    loss: float
    epochs: int = 0


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
