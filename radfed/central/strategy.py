"""Flower strategies with radfed's reply checks, checkpoints and statistics-based metrics."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any, TypeVar

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import (
    Bulyan,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    FedYogi,
    Krum,
    MultiKrum,
)

from radfed.bias.report import build_report
from radfed.central.run_folder import RunFolder
from radfed.config import RunConfig, StrategyName
from radfed.federation.codes import ErrorCode, InvalidReply, describe_code
from radfed.federation.identity import read_site_identity
from radfed.federation.packing import LAYOUT_KEY, layout, pack, unpack
from radfed.federation.schema import (
    ARRAYS_KEY,
    CELLS_KEY,
    CONFIG_KEY,
    METRICS_KEY,
    TRAIN_METRIC_KEYS,
    CellStats,
    unpack_cells,
)
from radfed.federation.updates import cast_like, clip_update, validate_arrays
from radfed.folders import POOLED_SITE, RunEvent
from radfed.log import logger
from radfed.tasks import get_task, merge_stats

__all__ = ["INFLUENCE_ALERT", "NORM_FACTOR", "STRATEGIES", "RadfedChecks", "RadfedFedAvg"]
__all__ += ["make_strategy"]

_R = TypeVar("_R", ArrayRecord, MetricRecord)

#: Without a set ``max-update-norm``, updates are clipped to this many times the median
#: distance of the first round's updates from the global model.
NORM_FACTOR = 3.0
#: A site whose leave-one-site-out changes a pooled headline metric by more than this is
#: named in the log (its statistics may be wrong, or its population differs).
INFLUENCE_ALERT = 0.05


class RadfedChecks:
    """radfed's behaviour on top of any Flower Message-API strategy (used as a mixin).

    Aggregation itself is the base strategy's (FedAvg, FedProx, FedAdam, ...).

    Every reply is checked on its own before aggregation; a bad one is logged with the
    site name and dropped, never allowed to fail the round. An update further from the
    global model than the norm bound is clipped to it (the bound set, or ``NORM_FACTOR``
    times the first round's median); a site's ``num-examples`` is capped at the size of its
    train split as its statistics report it. Per split, each site's influence on the pooled
    headline metric (leave one site out) is written beside its metrics, and a site that
    moves it by more than ``INFLUENCE_ALERT`` is named. An accepted training reply
    holds exactly one ArrayRecord and one MetricRecord of fixed keys, so Flower's own
    consistency check cannot fail on the accepted set. Only the first reply of a round
    from each site name is used. Evaluation replies carry sufficient statistics: the
    per-site and pooled metrics are computed from them and written to metrics.jsonl
    (pooled from summed statistics, never averaged).

    Weights travel packed (``radfed.federation.packing``): the messages of a phase share one
    packed record of the global model, and a reply's weights are unpacked against the
    current global model before any check, so the base strategy aggregates named arrays.

    Args:
        config: the run configuration.
        reference: the initial global weights.
        run: the run folder to write.
        max_update_norm: the L2 distance between an update and the current global weights
            (floating-point tensors only) beyond which it is clipped; None: calibrated
            from the first round.
        max_examples: largest ``num-examples`` a reply may report.

    Raises:
        ValueError: a bound that is not positive.
    """

    def __init__(
        self,
        *,
        config: RunConfig,
        reference: Mapping[str, torch.Tensor],
        run: RunFolder,
        max_update_norm: float | None = None,
        max_examples: int = 10_000_000,
        **base_options: Any,
    ) -> None:
        if max_update_norm is not None and not 0 < max_update_norm < math.inf:
            msg = f"max_update_norm must be positive and finite, or None; got {max_update_norm!r}"
            raise ValueError(msg)
        if isinstance(max_examples, bool) or not isinstance(max_examples, int) or max_examples < 1:
            msg = f"max_examples must be a positive integer, got {max_examples!r}"
            raise ValueError(msg)
        super().__init__(  # type: ignore[call-arg]
            fraction_train=1.0,
            fraction_evaluate=1.0,
            # radfed.central.rounds waits for min-sites, with a deadline; Flower's own
            # wait has none, so it only ever waits for one node here.
            min_train_nodes=1,
            min_evaluate_nodes=1,
            min_available_nodes=1,
            **base_options,
        )
        self.config = config
        self.task = get_task(config.task)
        self.reference = {k: v.detach().cpu() for k, v in reference.items()}
        self.run = run
        self.max_update_norm = max_update_norm
        self.max_examples = max_examples
        self.site_names: dict[int, str] = {}
        #: the norm bound calibrated from the first round's updates
        self.calibrated_norm: float | None = None
        #: site -> cases of its train split, from its statistics (caps num-examples)
        self.train_sizes: dict[str, int] = {}
        #: node id -> site name of the keys registered with the SuperLink (a deployment)
        self.registered: dict[int, str] | None = None
        #: this phase's sites whose replies were used, and those dropped with the reason
        self._replied: list[str] = []
        self._dropped: dict[str, str] = {}

    def take_ledger(self) -> tuple[list[str], dict[str, str]]:
        """The sites whose replies this phase used, and the dropped ones with the reason;
        the ledger starts again empty."""
        replied = [s for s in self._replied if s not in self._dropped]
        dropped, self._replied, self._dropped = self._dropped, [], {}
        return replied, dropped

    def summary(self) -> None:
        super().summary()  # type: ignore[misc]
        logger.info(
            "strategy %s: %d rounds, at least %d sites, statistics-based metrics, "
            "update norm bound %s (clipping), at most %d examples per reply",
            self.config.strategy,
            self.config.num_server_rounds,
            self.config.min_sites,
            f"{NORM_FACTOR:g} x the first round's median"
            if self.max_update_norm is None
            else f"{self.max_update_norm:g}",
            self.max_examples,
        )

    # ------------------------------------------------------------------ messages
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        messages = super().configure_train(server_round, arrays, config, grid)  # type: ignore[misc]
        return _packed(messages, arrays)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        messages = super().configure_evaluate(server_round, arrays, config, grid)  # type: ignore[misc]
        return _packed(messages, arrays)

    # ------------------------------------------------------------------ training
    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        checked: list[tuple[Message, str, float]] = []
        losses: dict[str, float] = {}
        for msg, site in self._checked(server_round, replies, "update"):
            try:
                loss, norm = self._check_update(msg.content)
            except InvalidReply as err:
                self._drop(server_round, site, "update", err)
                continue
            checked.append((msg, site, norm))
            losses[site] = loss
        accepted = self._bounded(server_round, checked)
        arrays: ArrayRecord | None = None
        metrics: MetricRecord | None = None
        if accepted:
            arrays, metrics = super().aggregate_train(server_round, accepted)  # type: ignore[misc]
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

    def _bounded(
        self, server_round: int, checked: list[tuple[Message, str, float]]
    ) -> list[Message]:
        """Clip each update to the norm bound and cap each site's ``num-examples`` at its
        train split; the messages to aggregate."""
        bound = self.max_update_norm
        if bound is None:
            norms = sorted(n for _, _, n in checked if math.isfinite(n))
            if self.calibrated_norm is None and norms and norms[len(norms) // 2] > 0:
                self.calibrated_norm = NORM_FACTOR * float(norms[len(norms) // 2])
                logger.info(
                    "round %d: update norm bound calibrated at %.3g (%g x the median)",
                    server_round,
                    self.calibrated_norm,
                    NORM_FACTOR,
                )
            bound = self.calibrated_norm
        accepted: list[Message] = []
        for msg, site, norm in checked:
            if not math.isfinite(norm):
                self._drop(server_round, site, "update", InvalidReply("its norm overflows"))
                continue
            if bound is not None and norm > bound:
                arrays = msg.content[ARRAYS_KEY]
                msg.content[ARRAYS_KEY] = clip_update(arrays, self.reference, bound / norm)  # type: ignore[arg-type]
                logger.warning(
                    "round %d: clipped the update of %s from %.3g to the bound %.3g (L2)",
                    server_round,
                    site,
                    norm,
                    bound,
                )
            metrics = msg.content.metric_records[METRICS_KEY]
            reported, size = metrics["num-examples"], self.train_sizes.get(site)
            if size is not None and isinstance(reported, int) and reported > size:
                metrics["num-examples"] = size
                logger.warning(
                    "round %d: %s reported %d training examples, its train split holds %d; "
                    "its weight is capped there",
                    server_round,
                    site,
                    reported,
                    size,
                )
            accepted.append(msg)
        return accepted

    # ---------------------------------------------------------------- evaluation
    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        per_site: dict[str, dict[str, list[CellStats]]] = {}
        for msg, site in self._checked(server_round, replies, "statistics"):
            try:
                per_site[site] = self._check_statistics(msg.content)
            except InvalidReply as err:
                self._drop(server_round, site, "statistics", err)
        if not per_site:
            logger.warning("round %d: no valid statistics", server_round)
            return None
        self._remember_train_sizes(per_site)
        summary: dict[str, float] = {}
        for split in self.config.eval_splits:
            pooled = merge_stats(  # the held-out site is reported, never pooled
                self.task,
                (s[split][0].stats for n, s in per_site.items() if n != self.config.holdout_site),
                self.config,
            )
            rows = {
                **{name: cells[split][0].stats for name, cells in sorted(per_site.items())},
                POOLED_SITE: pooled,
            }
            headline, shown = self.task.headline, []
            influence = self._influence(server_round, split, per_site)
            for name, stats in rows.items():
                values = self.task.metrics(stats)
                if name in influence:
                    values = {**values, f"{headline}-influence": influence[name]}
                noise = float(getattr(stats, "noise", 0.0))  # DP statistics: per-bin variance
                self.run.append_metrics(
                    server_round,
                    name,
                    split,
                    stats.n,
                    values,
                    suppressed=stats.suppressed,
                    noise_sd=math.sqrt(noise) if noise > 0 else None,
                )
                shown.append(
                    f"{name} {'suppressed' if stats.suppressed else _fmt(values.get(headline))}"
                )
                if name == POOLED_SITE:
                    summary.update({f"{split}-{k}": v for k, v in values.items() if v is not None})
            logger.info(
                "round %d/%d %s %s: %s",
                server_round,
                self.config.num_server_rounds,
                split,
                headline,
                " | ".join(shown),
            )
        self._write_bias_report(server_round, per_site)
        return MetricRecord(summary)  # type: ignore[arg-type]

    def _remember_train_sizes(self, per_site: Mapping[str, Mapping[str, list[CellStats]]]) -> None:
        """Each site's train split size, the cap of its ``num-examples``; a noisy count
        (DP statistics) is taken at its upper limit (3 noise standard deviations above),
        so that noise does not cut an honest site's weight."""
        for site, cells in per_site.items():
            if "train" in cells and not cells["train"][0].stats.suppressed:
                stats = cells["train"][0].stats
                bins = len(getattr(stats, "pos_hist", ()))
                spread = 3 * math.sqrt(2 * bins * float(getattr(stats, "noise", 0.0)))
                self.train_sizes[site] = max(0, stats.n + math.ceil(spread))

    def _influence(
        self, server_round: int, split: str, per_site: Mapping[str, Mapping[str, list[CellStats]]]
    ) -> dict[str, float]:
        """Per pooled site, how far leaving it out moves the pooled headline metric."""
        headline = self.task.headline
        pooled_sites = {
            n: c[split][0].stats
            for n, c in per_site.items()
            if n != self.config.holdout_site and not c[split][0].stats.suppressed
        }
        if len(pooled_sites) < 2:
            return {}
        everyone = self.task.metrics(merge_stats(self.task, pooled_sites.values(), self.config))
        out: dict[str, float] = {}
        for name in pooled_sites:
            rest = (s for n, s in pooled_sites.items() if n != name)
            without = self.task.metrics(merge_stats(self.task, rest, self.config))
            a, b = everyone.get(headline), without.get(headline)
            if a is None or b is None:
                continue
            out[name] = abs(float(a) - float(b))
            if out[name] > INFLUENCE_ALERT:
                logger.warning(
                    "round %d %s: leaving %s out moves the pooled %s by %.3f (more than %g): "
                    "check its statistics and population",
                    server_round,
                    split,
                    name,
                    headline,
                    out[name],
                    INFLUENCE_ALERT,
                )
        return out

    def survey(self, replies: Iterable[Message]) -> None:
        """Before training: write the sites' data composition and confounder screen (from
        the counts of the initial model's evaluation; its metrics are not reported)."""
        per_site: dict[str, dict[str, list[CellStats]]] = {}
        for msg, site in self._checked(0, replies, "statistics"):
            try:
                per_site[site] = self._check_statistics(msg.content)
            except InvalidReply as err:
                self._drop(0, site, "statistics", err)
        if per_site:
            self._remember_train_sizes(per_site)
            self._write_bias_report(0, per_site)
            logger.info(
                "before training: composition of %s in %s",
                ", ".join(sorted(per_site)),
                self.run.bias_report_path,
            )

    def _write_bias_report(
        self, server_round: int, per_site: Mapping[str, Mapping[str, list[CellStats]]]
    ) -> None:
        """Replace ``bias_report.json`` with this round's subgroup report."""
        try:
            report = build_report(
                self.task, self.config, per_site, server_round=server_round, run=self.run
            )
        except (ArithmeticError, ValueError) as err:  # never let a report stop the run
            logger.error("round %d: bias report not written (%s)", server_round, type(err).__name__)
            return
        self.run.write_bias_report(report)
        self.run.event(
            RunEvent.REPORT,
            f"bias report of round {server_round} written",
            round_=server_round,
            **report.get("summary", {}).get("counts", {}),
        )

    # ------------------------------------------------------------------ checks
    def _check_update(self, content: RecordDict) -> tuple[float, float]:
        """Check a training reply; return its training loss and its update's L2 distance
        from the global model. Its packed weights are replaced by the named ones, unpacked
        against the global model, for aggregation.

        Raises:
            InvalidReply: records other than one ArrayRecord and one MetricRecord of the
                training keys, weights that are not packed for the global model (see
                ``unpack``), bad weights (see ``validate_arrays``), or bad values.
        """
        packed = _only(content.array_records, ARRAYS_KEY, "ArrayRecord")
        reported = _only(content.metric_records, METRICS_KEY, "MetricRecord")
        if set(reported.keys()) != TRAIN_METRIC_KEYS:
            missing = sorted(TRAIN_METRIC_KEYS - set(reported.keys()))
            extra = sorted(set(reported.keys()) - TRAIN_METRIC_KEYS)
            raise InvalidReply(f"metric keys differ (missing {missing}, extra {extra[:3]})")
        n = reported["num-examples"]
        if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
            raise InvalidReply("num-examples must be a positive integer")
        self._check_examples(n)
        loss = reported["train-loss"]
        if not isinstance(loss, float) or not math.isfinite(loss):
            raise InvalidReply("train-loss must be a finite float")
        arrays = unpack(packed, self.reference)
        norm = validate_arrays(arrays, self.reference)  # the norm bound clips (_bounded)
        content[ARRAYS_KEY] = arrays
        return loss, norm

    def _check_statistics(self, content: RecordDict) -> dict[str, list[CellStats]]:
        """Check an evaluation reply; return per split its cells (``all`` first).

        Raises:
            InvalidReply: not exactly one MetricRecord, or bad statistics or cell names.
        """
        record = _only(content.metric_records, METRICS_KEY, "MetricRecord")
        names = content.config_records.get(CELLS_KEY)
        cells = unpack_cells(self.task, record, names, self.config)
        self._check_examples(sum(c[0].stats.n for c in cells.values()))
        try:  # statistics that pass the schema but break the metric code are dropped too
            for parts in cells.values():
                for cell in parts:
                    self.task.metrics(cell.stats)
        except (ArithmeticError, ValueError):
            raise InvalidReply("statistics cannot be evaluated") from None
        return cells

    def _check_examples(self, n: int) -> None:
        """Refuse a count that would let one site outweigh all others without bound."""
        if n > self.max_examples:
            raise InvalidReply(f"num-examples {n} is above the bound {self.max_examples}")

    # ------------------------------------------------------------------ helpers
    def _checked(
        self, server_round: int, replies: Iterable[Message], what: str
    ) -> Iterable[tuple[Message, str]]:
        """Replies that carry content and a valid site identity, with the site name.

        Only the first reply of the round from a site name is passed on: a later one
        would overwrite it (or be counted twice) and is dropped with a warning.
        """
        seen: set[str] = set()
        for msg in replies:
            node = msg.metadata.src_node_id
            if msg.has_error() and msg.error.code == ErrorCode.HELD_OUT:
                logger.info(
                    "round %d: %s is the held-out site; it evaluates but does not train",
                    server_round,
                    self.name_of(node),
                )
                continue
            if msg.has_error():
                name = self.name_of(node)
                logger.warning(
                    "round %d: %s failed with error code %d (%s); dropped",
                    server_round,
                    name,
                    msg.error.code,
                    describe_code(msg.error.code),
                )
                self._dropped[name] = f"error code {msg.error.code}"
                self.run.event(
                    RunEvent.SITE_ERROR,
                    f"error code {msg.error.code}: {describe_code(msg.error.code)}",
                    round_=server_round,
                    site=name,
                    level="warning",
                    code=int(msg.error.code),
                )
                continue
            try:
                site = read_site_identity(msg.content).name
            except InvalidReply as err:
                self._drop(server_round, self.name_of(node), what, err)
                continue
            if self.registered is not None and node not in self.registered:
                logger.warning(
                    "round %d: security: dropped %s from node %d: its key was not registered "
                    "from the PKI (sites.json)",
                    server_round,
                    what,
                    node,
                )
                self.run.event(
                    RunEvent.SECURITY,
                    f"dropped {what} from node {node}: its key was not registered from the PKI",
                    round_=server_round,
                    level="warning",
                    node=node,
                )
                continue
            if self.registered is not None and self.registered[node] != site:
                self._drop(
                    server_round,
                    self.registered[node],
                    what,
                    InvalidReply(f"it calls itself {site!r}, not the site its key belongs to"),
                    kind=RunEvent.SECURITY,
                )
                continue
            if self.config.sites and site not in self.config.sites:
                self._drop(server_round, site, what, InvalidReply("not one of the run's sites"))
                continue
            if site in seen:
                logger.warning(
                    "round %d: dropped %s from %s (node %d): this round already has a reply "
                    "from that site name",
                    server_round,
                    what,
                    site,
                    node,
                )
                continue
            seen.add(site)
            self.site_names[node] = site
            self._replied.append(site)
            yield msg, site

    def name_of(self, node: int) -> str:
        """The site a node is: the name it gave, else the name its registered key belongs to."""
        if node in self.site_names:
            return self.site_names[node]
        if self.registered is not None and node in self.registered:
            return self.registered[node]
        return f"node {node}"

    def _drop(
        self,
        server_round: int,
        site: str,
        what: str,
        err: Exception,
        *,
        kind: RunEvent = RunEvent.DROPPED,
    ) -> None:
        logger.warning("round %d: dropped %s from %s: %s", server_round, what, site, err)
        self._dropped[site] = f"{what} dropped: {err}"
        self.run.event(
            kind,
            f"dropped {what}: {err}",
            round_=server_round,
            site=site,
            level="warning",
            what=what,
        )


def _only(records: Mapping[str, _R], key: str, kind: str) -> _R:
    """The one record of a kind in a reply, which must be named ``key``.

    Raises:
        InvalidReply: no record of that kind, more than one, or one under another name.
    """
    if list(records.keys()) != [key]:
        names = sorted(records.keys())
        raise InvalidReply(
            f"reply must carry exactly one {kind} named {key!r}, got {len(names)} {names[:3]}"
        )
    return records[key]


def _packed(messages: Iterable[Message], arrays: ArrayRecord) -> list[Message]:
    """The messages with ``arrays`` packed, once for all of them (Flower's strategies give
    every message of a phase the same content), and the layout they were packed by named
    in each message's config."""
    sent = list(messages)
    if sent:
        packed, packed_by = pack(arrays), layout(arrays)
        for msg in sent:
            msg.content[ARRAYS_KEY] = packed
            msg.content.config_records[CONFIG_KEY][LAYOUT_KEY] = packed_by
    return sent


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


class RadfedFedAvg(RadfedChecks, FedAvg):
    """FedAvg with radfed's checks, checkpoints and statistics-based metrics."""


#: Strategy names of the ``strategy`` run setting and the Flower class each extends.
STRATEGIES: dict[StrategyName, type[FedAvg]] = {
    StrategyName.FEDAVG: FedAvg,
    StrategyName.FEDPROX: FedProx,
    StrategyName.FEDADAM: FedAdam,
    StrategyName.FEDYOGI: FedYogi,
    StrategyName.FEDAVGM: FedAvgM,
    StrategyName.FEDMEDIAN: FedMedian,
    StrategyName.FEDTRIMMEDAVG: FedTrimmedAvg,
    StrategyName.KRUM: Krum,
    StrategyName.MULTIKRUM: MultiKrum,
    StrategyName.BULYAN: Bulyan,
}


def make_strategy(
    config: RunConfig,
    reference: Mapping[str, torch.Tensor],
    run: RunFolder,
    **bounds: Any,
) -> FedAvg:
    """The strategy named by ``config.strategy``, with radfed's checks and outputs.

    FedProx sends ``proximal-mu`` (the site adds the proximal term); FedAdam and FedYogi
    keep a server optimiser with learning rate ``server-lr``; FedAvgM uses server momentum.
    The robust ones: FedMedian (coordinate-wise median), FedTrimmedAvg (cuts ``trim-beta``
    from each end), Krum, MultiKrum and Bulyan (tolerating ``robust-f`` malicious sites;
    Bulyan needs 4 f + 3 sites).
    """
    base = STRATEGIES[config.strategy]
    options: dict[str, Any] = {}
    if base is FedProx:
        options["proximal_mu"] = config.proximal_mu
    elif base in (FedAdam, FedYogi):
        options.update(eta=config.server_lr, eta_l=config.learning_rate, beta_1=0.9, beta_2=0.99)
    elif base is FedAvgM:
        options.update(server_learning_rate=1.0, server_momentum=0.9)
    elif base is FedTrimmedAvg:
        options["beta"] = config.trim_beta
    elif base in (Krum, MultiKrum, Bulyan):
        options["num_malicious_nodes"] = config.robust_f
        if base is MultiKrum:  # average the n - f updates Krum scores best
            options["num_nodes_to_select"] = max(1, config.min_sites - config.robust_f)
    cls = (
        RadfedFedAvg if base is FedAvg else type(f"Radfed{base.__name__}", (RadfedChecks, base), {})
    )
    strategy: FedAvg = cls(config=config, reference=reference, run=run, **bounds, **options)
    return strategy  # a RadfedChecks too
