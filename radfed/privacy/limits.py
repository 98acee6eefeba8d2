"""What a run may cost a site: compute, memory and disk, bounded by the site's policy.

Each limit is checked before the work it bounds: the run's settings before a site loads
anything, the received weights before they are loaded, a case image's declared size before
it is decoded, a round's optimiser steps before it trains; the decoded-case cache evicts
its least recently used entries to stay under its cap.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from radfed.config import RunConfig
from radfed.folders import POLICY_FILE_NAME
from radfed.privacy.refusal import PolicyRefusal

__all__ = ["LimitExceeded", "ResourceLimits"]

_UNBOUNDED = 2**62


class LimitExceeded(PolicyRefusal):
    """A run asks for more than the site policy's ``[policy.limits]`` allow."""


@dataclass(frozen=True, kw_only=True)
class ResourceLimits:
    """The site policy's ``[policy.limits]`` (every key optional; these are the defaults).

    Attributes:
        image_size: the largest ``image-size`` a run may ask for (pixels per axis).
        input_voxels: the largest model input, ``image-size ** spatial-dims``.
        batch_size: the largest ``batch-size``.
        steps_per_round: the most optimiser steps of one round's local training.
        workers: the most DataLoader worker processes (``num-workers``).
        rounds: the most rounds of a run (``num-server-rounds``, and the round a message
            names).
        decoded_voxels: the largest case image the site decodes, as its header declares it.
        cache_bytes: the size of the decoded-case cache on disk; the least recently used
            entries are evicted beyond it.
        inbound_bytes: the largest set of weights the site takes from a run.
        model_parameters: the largest model a run may have the site build, in parameters
            and buffers (counted without allocating them).
    """

    image_size: int = 512
    input_voxels: int = 256**3
    batch_size: int = 256
    steps_per_round: int = 20_000
    workers: int = 4
    rounds: int = 1000
    decoded_voxels: int = 2**28
    cache_bytes: int = 20 * 2**30
    inbound_bytes: int = 2 * 2**30
    model_parameters: int = 100_000_000

    @classmethod
    def unbounded(cls) -> ResourceLimits:
        """No limit at all (a simulated site without a policy file: the researcher runs both
        sides)."""
        return cls(**{f.name: _UNBOUNDED for f in fields(cls)})

    @classmethod
    def keys(cls) -> tuple[str, ...]:
        """The policy file's keys (kebab-case), in field order."""
        return tuple(f.name.replace("_", "-") for f in fields(cls))

    def check_run(self, config: RunConfig) -> None:
        """The run's settings against the limits, before any work.

        Raises:
            LimitExceeded: naming the run setting and the limit.
        """
        self._check("image-size", config.image_size, self.image_size)
        self._check(
            "image-size ** spatial-dims",
            config.image_size**config.spatial_dims,
            self.input_voxels,
            key="input-voxels",
        )
        self._check("batch-size", config.batch_size, self.batch_size)
        self._check("num-workers", config.num_workers, self.workers, key="workers")
        self._check("num-server-rounds", config.num_server_rounds, self.rounds, key="rounds")
        if config.local_steps:
            self.check_steps(config.local_steps)

    def check_round(self, server_round: int) -> None:
        """The round a message names (a run never has more rounds than the limit)."""
        self._check("the message's server-round", server_round, self.rounds, key="rounds")

    def check_steps(self, steps: int) -> None:
        """The optimiser steps one round's local training would take."""
        self._check("local training", steps, self.steps_per_round, key="steps-per-round")

    def check_inbound(self, nbytes: int) -> None:
        """The size of the weights a message brings."""
        self._check("the received weights (bytes)", nbytes, self.inbound_bytes, key="inbound-bytes")

    def check_model(self, parameters: int) -> None:
        """The size of the model a run would have the site build."""
        self._check(
            "the run's model (parameters)",
            parameters,
            self.model_parameters,
            key="model-parameters",
        )

    @staticmethod
    def _check(what: str, asked: int, limit: int, *, key: str = "") -> None:
        if asked > limit:
            name = key or what
            msg = (
                f"{what} is {asked}, above the site policy's limits.{name} ({limit}); the run "
                f"may ask for less, or the site administrator raises it in {POLICY_FILE_NAME}"
            )
            raise LimitExceeded(msg)
