"""The checkpoint file: the global model after a round, as the server stores it.

The server writes one per round into the run folder; a site reads one to evaluate or
explain a model locally (``radfed evaluate``, ``radfed explain``). Tensors only: loading
runs no code.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from radfed import __version__
from radfed.config import RunConfig

__all__ = ["load_checkpoint", "save_checkpoint"]


def save_checkpoint(
    path: Path, round_: int, state_dict: Mapping[str, torch.Tensor], config: RunConfig
) -> Path:
    """Write the global model after ``round_`` (0 is the initial model), atomically."""
    tmp = path.with_suffix(".tmp")
    torch.save(
        {
            "round": round_,
            "state_dict": dict(state_dict),
            "run-config": config.to_run_config(),
            "radfed-version": __version__,
        },
        tmp,
    )
    tmp.replace(path)
    return path


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Read a checkpoint written by ``save_checkpoint`` (tensors only, no code)."""
    return dict(torch.load(path, map_location="cpu", weights_only=True))
