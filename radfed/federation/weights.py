"""Which weights travel: all of them, or (FedBN) all but the normalisation layers."""

from __future__ import annotations

from collections import OrderedDict

import torch
from flwr.app import ArrayRecord
from torch import nn

from radfed.errors import ConfigError, RadfedError

__all__ = ["check_fedbn", "load_global", "local_keys", "shared_state"]

_NORM_LAYERS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)


def local_keys(model: nn.Module) -> set[str]:
    """State-dict names of every normalisation layer (weights, biases, running statistics)."""
    keys: set[str] = set()
    for prefix, module in model.named_modules():
        if isinstance(module, _NORM_LAYERS):
            keys |= {f"{prefix}.{name}" if prefix else name for name in module.state_dict()}
    return keys


def check_fedbn(model: nn.Module, name: str) -> None:
    """Refuse FedBN for a model that has no normalisation state to keep local.

    Raises:
        ConfigError: no normalisation layer of ``model`` (``name``) has weights or running
            statistics (instance normalisation without them, say): FedBN would be FedAvg.
    """
    if not local_keys(model):
        msg = (
            f"fedbn=true keeps normalisation layers local, but model {name!r} has none with "
            "weights or running statistics, so FedBN would be plain FedAvg; drop fedbn or "
            "choose a model with batch normalisation"
        )
        raise ConfigError(msg)


def shared_state(model: nn.Module, fedbn: bool) -> OrderedDict[str, torch.Tensor]:
    """The part of the state dict that leaves the site (FedBN keeps normalisation local)."""
    state = OrderedDict(model.state_dict())
    if not fedbn:
        return state
    private = local_keys(model)
    return OrderedDict((k, v) for k, v in state.items() if k not in private)


def load_global(model: nn.Module, arrays: ArrayRecord, fedbn: bool) -> None:
    """Load the received global weights; with FedBN the local normalisation layers stay.

    Raises:
        RadfedError: the received names do not match what this site expects to receive.
    """
    state = arrays.to_torch_state_dict()
    if not fedbn:
        model.load_state_dict(state)
        return
    if set(state) != set(model.state_dict()) - local_keys(model):
        raise RadfedError("the global model's layers do not match this site's FedBN model")
    model.load_state_dict(state, strict=False)  # the local normalisation layers stay as they are
