"""Flower strategies with radfed's reply checks, checkpoints and statistics-based metrics."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import torch
from flwr.app import ArrayRecord, Message, MetricRecord
from flwr.serverapp.strategy import FedAvg

from radfed.config import RunConfig
from radfed.federation.records import (
    ARRAYS_KEY,
    InvalidReply,
    cast_like,
    read_site_identity,
    unpack_classification_stats,
    validate_arrays,
)
from radfed.federation.run_folder import POOLED_SITE, RunFolder
from radfed.log import logger
from radfed.metrics.binary import BinaryStats, binary_metrics

__all__ = ["RadfedFedAvg"]


class RadfedFedAvg(FedAvg):
    """FedAvg over checked updates, writing the run folder as rounds complete.

    Every reply is checked on its own before aggregation; a bad one is logged with the
    site name and dropped, never allowed to fail the round. Evaluation replies carry
    sufficient statistics: the per-site and pooled metrics are computed from them and
    written to metrics.jsonl (pooled from summed statistics, never averaged).
    """

    def __init__(
        self, *, config: RunConfig, reference: Mapping[str, torch.Tensor], run: RunFolder
    ) -> None:
        super().__init__(
            fraction_train=1.0,
            fraction_evaluate=1.0,
            min_train_nodes=config.min_sites,
            min_evaluate_nodes=config.min_sites,
            min_available_nodes=config.min_sites,
        )
        self.config = config
        self.reference = {k: v.detach().cpu() for k, v in reference.items()}
        self.run = run
        self.site_names: dict[int, str] = {}

    def summary(self) -> None:
        super().summary()
        logger.info(
            "strategy FedAvg: %d rounds, at least %d sites, statistics-based metrics",
            self.config.num_server_rounds,
            self.config.min_sites,
        )

    # ------------------------------------------------------------------ training
    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        accepted: list[Message] = []
        losses: dict[str, float] = {}
        for msg, site in self._checked(server_round, replies, "update"):
            try:
                validate_arrays(msg.content[ARRAYS_KEY], self.reference)  # type: ignore[arg-type]
                reported = next(iter(msg.content.metric_records.values()))
                n, loss = reported.get("num-examples"), reported.get("train-loss")
                if not isinstance(n, int) or isinstance(n, bool) or n <= 0:
                    raise InvalidReply("num-examples must be a positive integer")
                if not isinstance(loss, float) or not math.isfinite(loss):
                    raise InvalidReply("train-loss must be a finite float")
            except (InvalidReply, KeyError, StopIteration) as err:
                self._drop(server_round, site, "update", err)
                continue
            accepted.append(msg)
            losses[site] = loss
        arrays: ArrayRecord | None = None
        metrics: MetricRecord | None = None
        if accepted:
            arrays, metrics = super().aggregate_train(server_round, accepted)
        if arrays is not None:
            state = cast_like(arrays, self.reference)
            arrays = ArrayRecord(state)
            self.reference = state
        else:
            logger.warning("round %d: no valid update; the global model is unchanged", server_round)
        self.run.save_checkpoint(server_round, self.reference, self.config)
        logger.info(
            "round %d/%d: %d sites trained (local loss %s)",
            server_round,
            self.config.num_server_rounds,
            len(accepted),
            ", ".join(f"{s} {v:.3f}" for s, v in sorted(losses.items())) or "none",
        )
        return arrays, metrics

    # ---------------------------------------------------------------- evaluation
    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        per_site: dict[str, Mapping[str, BinaryStats]] = {}
        for msg, site in self._checked(server_round, replies, "statistics"):
            try:
                record = next(iter(msg.content.metric_records.values()))
                per_site[site] = unpack_classification_stats(
                    record, self.config.eval_splits, self.config.score_bins
                )
            except (InvalidReply, StopIteration) as err:
                self._drop(server_round, site, "statistics", err)
        if not per_site:
            logger.warning("round %d: no valid statistics", server_round)
            return None
        summary: dict[str, float] = {}
        for split in self.config.eval_splits:
            pooled = BinaryStats.merge(
                (s[split] for s in per_site.values()), self.config.score_bins
            )
            rows = {
                **{name: stats[split] for name, stats in sorted(per_site.items())},
                POOLED_SITE: pooled,
            }
            aucs = []
            for name, stats in rows.items():
                values = binary_metrics(stats)
                self.run.append_metrics(server_round, name, split, stats.n, values)
                aucs.append(f"{name} {_fmt(values['auc'])}")
                if name == POOLED_SITE:
                    summary.update({f"{split}-{k}": v for k, v in values.items() if v is not None})
            logger.info(
                "round %d/%d %s AUC: %s",
                server_round,
                self.config.num_server_rounds,
                split,
                " | ".join(aucs),
            )
        return MetricRecord(summary)  # type: ignore[arg-type]

    # ------------------------------------------------------------------ helpers
    def _checked(
        self, server_round: int, replies: Iterable[Message], what: str
    ) -> Iterable[tuple[Message, str]]:
        """Replies that carry content and a valid site identity, with the site name."""
        for msg in replies:
            node = msg.metadata.src_node_id
            if msg.has_error():
                logger.warning(
                    "round %d: %s failed with error code %d; dropped",
                    server_round,
                    self.site_names.get(node, f"node {node}"),
                    msg.error.code,
                )
                continue
            try:
                site = read_site_identity(msg.content).name
            except InvalidReply as err:
                self._drop(server_round, self.site_names.get(node, f"node {node}"), what, err)
                continue
            self.site_names[node] = site
            yield msg, site

    def _drop(self, server_round: int, site: str, what: str, err: Exception) -> None:
        logger.warning("round %d: dropped %s from %s: %s", server_round, what, site, err)


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"
