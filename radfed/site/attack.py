"""A poisoned update, sent by a simulated site that the run names (``attack = "SITE:KIND"``).

Benchmarks and tests measure what radfed's robust strategies withstand with a site that
sends something other than its honest update. Only a simulated node (one whose node config
has ``partition-id``) reads the setting: the run configuration comes from the server, and
a deployed site never lets the server make it send anything but its own work.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import torch

from radfed.config import AttackKind, RunConfig

__all__ = ["attacked", "poison"]

#: How far each attack moves the update from the global model, in honest changes.
_FACTORS = {AttackKind.SIGN_FLIP: -4.0, AttackKind.SCALE: 10.0}


def attacked(config: RunConfig, site: str, node_config: Mapping[str, Any]) -> AttackKind | None:
    """The attack this site makes in this run, or None (always None for a deployed site)."""
    if not config.attack or "partition-id" not in node_config:
        return None
    name, _, kind = config.attack.partition(":")
    return AttackKind(kind) if name == site else None


def poison(
    state: Mapping[str, torch.Tensor], received: Mapping[str, torch.Tensor], kind: AttackKind
) -> OrderedDict[str, torch.Tensor]:
    """``received + factor * (state - received)`` for the floating-point tensors (the rest as
    trained): the honest change from the global model ``received``, flipped and enlarged
    (``sign-flip``: -4) or enlarged (``scale``: 10)."""
    factor = _FACTORS[kind]
    out: OrderedDict[str, torch.Tensor] = OrderedDict()
    for name, value in state.items():
        if value.is_floating_point():
            base = received[name].to(value.dtype)
            value = base + factor * (value - base)
        out[name] = value
    return out
