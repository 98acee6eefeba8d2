"""FedBN at a site: its own normalisation layers, kept on its disk between rounds of a run."""

from __future__ import annotations

import torch
from torch import nn

from radfed.federation.weights import local_keys
from radfed.folders import SiteState

__all__ = ["LocalState"]


class LocalState:
    """A site's own normalisation layers across rounds of one run (FedBN), on its disk."""

    def __init__(self, state: SiteState, run_id: int) -> None:
        self.path = state.fedbn(run_id)

    def restore(self, model: nn.Module) -> bool:
        """Load the stored local layers into ``model``; False before the first round."""
        if not self.path.is_file():
            return False
        stored = torch.load(self.path, map_location="cpu", weights_only=True)
        model.load_state_dict(stored, strict=False)
        return True

    def save(self, model: nn.Module) -> None:
        state = model.state_dict()
        local = {k: state[k] for k in local_keys(model)}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        torch.save(local, tmp)
        tmp.replace(self.path)
