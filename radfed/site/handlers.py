"""The ClientApp's work at a site: train and evaluate locally, reply with weights and statistics.

Each handler is wrapped by ``radfed.site.egress.guarded``: what it returns leaves only
through the site policy and the audit log, and an exception leaves only as an error code.
"""

from __future__ import annotations

import zlib
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from torch import nn

from radfed.config import RunConfig
from radfed.data.loading import SiteData
from radfed.data.splits import record_test_use
from radfed.errors import ConfigError, DataError
from radfed.federation.codes import InvalidReply
from radfed.federation.identity import SiteIdentity
from radfed.federation.packing import LAYOUT_KEY, pack, unpack
from radfed.federation.schema import (
    ARRAYS_KEY,
    CELLS_KEY,
    METRICS_KEY,
    SITE_KEY,
    CellStats,
    cell_names,
    pack_stats,
)
from radfed.federation.weights import load_global, shared_state
from radfed.folders import SiteFolder
from radfed.log import logger
from radfed.privacy import SitePolicy
from radfed.privacy.accountant import PrivacyLedger, rho_per_round
from radfed.privacy.budget import QueryLedger
from radfed.privacy.noise import discrete_gaussian
from radfed.privacy.releases import ReleaseRecord
from radfed.privacy.statistics_dp import bounded_cases
from radfed.site.attack import attacked, poison
from radfed.site.bundle import BundleIdentity
from radfed.site.egress import Handler, HeldOut, guarded
from radfed.site.evaluate import empty_noisy_cells, evaluate_cells, released_cells_per_case
from radfed.site.fedbn import LocalState
from radfed.site.node import (
    load_site_once,
    message_setting,
    message_text,
    resolve_site,
    server_round,
    site_min_cell,
    site_policy,
)
from radfed.tasks import Task, get_task
from radfed.tasks.training import model_size, round_steps

__all__ = ["handle_evaluate", "handle_query", "handle_train", "site_handlers"]


@dataclass(frozen=True)
class _Task:
    """What a message asks of this site, checked against its policy, with what it needs:
    ``received`` is the global model as received, unpacked by this site's own model."""

    config: RunConfig
    task: Task
    name: str
    path: Path
    policy: SitePolicy
    site: SiteData
    model: nn.Module
    received: ArrayRecord


def _prepare(msg: Message, context: Context, *, training: bool = False) -> _Task:
    """The run settings and task, this site's name, folder, policy and data, and the
    received global model; every limit of the site's policy is checked before the work it
    bounds (the settings and the received weights before the site's data is loaded). The
    weights arrive packed: their size is checked as received, then they are sliced by the
    site's own freshly built model, never by anything the message says."""
    config = RunConfig.from_run_config(context.run_config)
    task = get_task(config.task)
    task.check(config)
    name, path = resolve_site(context.node_config, config)
    if training and config.holdout_site == name:
        raise HeldOut("held-out site: not training in this run (evaluated only)")
    policy = site_policy(context.node_config, path)
    if training:
        policy.check_task(config.task)
    policy.limits.check_run(config)
    policy.limits.check_round(server_round(msg))
    packed = msg.content.array_records.get(ARRAYS_KEY)
    if packed is None:
        raise ConfigError("the message carries no weights (ArrayRecord 'arrays')")
    policy.limits.check_inbound(sum(len(array.data) for array in packed.values()))
    policy.limits.check_model(model_size(task.build_model, config))
    model = task.build_model(config)
    arrays = _unpacked(packed, model, config.fedbn, message_text(msg, LAYOUT_KEY))
    if not all(np.isfinite(array.numpy()).all() for array in arrays.values()):
        # before anything is spent: a crafted model with NaN for some cases would make
        # whether the work fails an exact answer about the data
        raise ConfigError("the received weights hold NaN or infinity; send a finite model")
    spent = False
    if not training:  # an evaluation is admitted before the site's data is even loaded
        policy.check_templates(config)
        _within_budget(policy, path, config, msg, "evaluate")
        if policy.dp_statistics is not None:  # its privacy is spent before any data is read
            total = policy.dp_statistics.spend(
                PrivacyLedger(SiteFolder(path).state.privacy),
                released_cells_per_case(config, policy),
                run_id=msg.metadata.run_id,
                server_round=server_round(msg),
            )
            spent = True
            logger.info(
                "DP statistics: epsilon %.3g spent at delta %g over %d releases",
                total.epsilon(policy.dp_statistics.delta),
                policy.dp_statistics.delta,
                total.rounds,
            )
    try:
        site = load_site_once(path, config, policy.limits)
        if config.fedbn:  # this site's own normalisation layers from its earlier rounds
            LocalState(SiteFolder(path).state, msg.metadata.run_id).restore(model)
        load_global(model, arrays, config.fedbn)
    except Exception as err:
        if spent:
            raise _SpentRelease(config, policy, name, err) from None
        raise
    return _Task(config, task, name, path, policy, site, model, arrays)


def _unpacked(
    packed: ArrayRecord, model: nn.Module, fedbn: bool, packed_by: str | None
) -> ArrayRecord:
    """The received packed weights, sliced by this site's own model (``unpack``): the
    sender cannot choose the names, shapes or dtypes. ``packed_by``: the layout the server
    says it packed by, checked against this site's.

    Raises:
        ConfigError: the weights are not packed for this site's model.
    """
    try:
        return unpack(packed, shared_state(model, fedbn), packed_by)
    except InvalidReply as err:
        raise ConfigError(
            f"the received weights do not fit this site's model ({err}); the server and "
            "the site must build the same model from the run's settings (the same radfed, "
            "torch and MONAI versions)"
        ) from None


class _SpentRelease(Exception):
    """A DP statistics release was spent and then its work failed. Whether (and why) the
    work failed may depend on the data (no case readable under the run's settings), so the
    reply must not say it: the site sends a noisy release of no cases instead."""

    def __init__(self, config: RunConfig, policy: SitePolicy, name: str, cause: Exception):
        super().__init__(type(cause).__name__)
        self.config, self.policy, self.name = config, policy, name


def _within_budget(
    policy: SitePolicy, path: Path, config: RunConfig, msg: Message, kind: str
) -> None:
    """Admit and record the request under the site's query budget (PolicyRefusal if not)."""
    if policy.queries is None:
        return
    policy.queries.check(
        QueryLedger(SiteFolder(path).state.queries),
        run_id=msg.metadata.run_id,
        server_round=server_round(msg),
        kind=kind,
        splits=config.eval_splits if kind == "evaluate" else (),
        last_round=config.num_server_rounds,
    )


def _train(msg: Message, context: Context) -> Message:
    job = _prepare(msg, context, training=True)
    config, train = job.config, job.site.splits["train"]
    if len(train) == 0:  # before anything is spent or trained
        raise DataError("the train split is empty; add cases or lower val/test fractions")
    job.policy.limits.check_steps(round_steps(config, len(train)))
    if job.policy.dp is not None:
        job.policy.dp.check_run(config)
    _within_budget(job.policy, job.path, config, msg, "train")
    if job.policy.dp_statistics is not None:  # num-examples is a noisy count: spent first
        job.policy.dp_statistics.spend(
            PrivacyLedger(SiteFolder(job.path).state.privacy),
            1,
            run_id=msg.metadata.run_id,
            server_round=server_round(msg),
        )
    if job.policy.dp is not None:  # the round's privacy is spent before it is trained
        spent = PrivacyLedger(SiteFolder(job.path).state.privacy).spend(
            rho_per_round(job.policy.dp.noise_multiplier),
            run_id=msg.metadata.run_id,
            server_round=server_round(msg),
            epsilon=job.policy.dp.epsilon,
            delta=job.policy.dp.delta,
        )
        logger.info(
            "differential privacy: epsilon %.3g spent at delta %g over %d rounds",
            spent.epsilon(job.policy.dp.delta),
            job.policy.dp.delta,
            spent.rounds,
        )
    round_ = server_round(msg)
    seed = config.seed + 1000 * round_ + zlib.crc32(job.name.encode())
    mu = message_setting(msg, "proximal-mu")
    model = job.model
    result = job.task.train(
        model, train, config, seed=seed, proximal_mu=mu, val=job.site.splits["val"]
    )
    if config.fedbn:
        LocalState(SiteFolder(job.path).state, msg.metadata.run_id).save(model)
    logger.info(
        "round %d: trained on %d cases, loss %.4f", round_, result.num_examples, result.loss
    )
    state = shared_state(model, config.fedbn)
    attack = attacked(config, job.name, context.node_config)
    if attack is not None:  # a simulated site the run names: the benchmarks' poisoned site
        logger.warning("round %d: this simulated site sends a %s update", round_, attack)
        state = poison(state, job.received.to_torch_state_dict(), attack)
    if job.policy.dp is not None:  # the site's differential privacy: clip and noise the update
        noised = job.policy.privatize(
            {k: v.detach().cpu().numpy() for k, v in state.items()},
            {k: v.numpy() for k, v in job.received.items()},
            # fresh entropy: noise from a seed the server could know could be subtracted
            np.random.default_rng(),
        )
        state = OrderedDict((k, torch.from_numpy(v)) for k, v in noised.items())
    examples, loss = result.num_examples, float(result.loss)
    touched = min(len(train), config.batch_size * config.local_steps) or len(train)
    if touched < job.policy.k:  # the loss of fewer than k chosen cases is not sent
        loss = 0.0
    if job.policy.dp is not None:
        # outside the noise, these would be exact: the loss is not sent (0), the count
        # leaves rounded down to a multiple of the site's k
        k = job.policy.k
        examples, loss = max(k, examples // k * k), 0.0
    if job.policy.dp_statistics is not None:  # the count with noise, the loss not sent
        most = job.policy.dp_statistics.cases_per_patient
        counted = len(bounded_cases(train.patients, len(train), most))  # sensitivity L
        noise = discrete_gaussian(job.policy.dp_statistics.noise)
        examples, loss = max(1, counted + noise), 0.0
    content = RecordDict(
        {
            ARRAYS_KEY: pack(state),
            METRICS_KEY: MetricRecord({"num-examples": examples, "train-loss": loss}),
            SITE_KEY: SiteIdentity.local(job.name).to_record(),
        }
    )
    return Message(content=content, reply_to=msg)


def _evaluate(msg: Message, context: Context) -> Message:
    try:
        return _evaluate_job(msg, context, _prepare(msg, context))
    except _SpentRelease as failed:
        logger.warning(
            "the evaluation failed (%s) after its DP statistics were spent: a noisy release "
            "of no cases is sent instead",
            failed,
        )
        cells = {
            split: empty_noisy_cells(failed.config, failed.policy)
            for split in failed.config.eval_splits
        }
        return _statistics_reply(msg, get_task(failed.config.task), cells, failed.name)


def _evaluate_job(msg: Message, context: Context, job: _Task) -> Message:
    config = job.config
    if "test" in config.eval_splits:
        uses = record_test_use(
            SiteFolder(job.path).state.path,
            run_id=msg.metadata.run_id,
            server_round=server_round(msg),
        )
        logger.warning("the sealed test split is evaluated (use %d at this site)", uses)
    k = job.policy.min_cell_size(max(config.min_cell_size, site_min_cell(context.node_config)))
    cells: dict[str, list[CellStats]] = {}
    with ReleaseRecord(SiteFolder(job.path).state.releases).locked() as released:
        for split in config.eval_splits:
            try:
                _, cells[split] = evaluate_cells(
                    job.task,
                    job.model,
                    job.site.splits[split],
                    config,
                    k,
                    job.policy,
                    released[split],
                )
            except Exception as err:
                if job.policy.dp_statistics is not None:  # spent: see _SpentRelease
                    raise _SpentRelease(config, job.policy, job.name, err) from None
                raise
    return _statistics_reply(msg, job.task, cells, job.name)


def _statistics_reply(
    msg: Message, task: Task, cells: dict[str, list[CellStats]], name: str
) -> Message:
    """The evaluation reply: per split its ``all`` cell and its subgroup cells."""
    rest = {split: parts[1:] for split, parts in cells.items()}
    content = RecordDict(
        {
            METRICS_KEY: pack_stats(
                task,
                {split: parts[0].stats for split, parts in cells.items()},
                cells=rest,
                positives={split: parts[0].positives for split, parts in cells.items()},
            ),
            CELLS_KEY: cell_names(rest),
            SITE_KEY: SiteIdentity.local(name).to_record(),
        }
    )
    return Message(content=content, reply_to=msg)


def _query(msg: Message, context: Context) -> Message:
    """Say this site's name (the server asks while it waits for a run's sites)."""
    config = RunConfig.from_run_config(context.run_config)
    name, _ = resolve_site(context.node_config, config)
    return Message(
        content=RecordDict({SITE_KEY: SiteIdentity.local(name).to_record()}), reply_to=msg
    )


def site_handlers(bundle: BundleIdentity | None = None) -> dict[str, Handler]:
    """The handlers of each message kind, guarded; ``bundle`` is the run's app bundle at a
    deployed site (the site policy must accept it), None in a simulation."""
    return {
        "train": guarded(_train, bundle),
        "evaluate": guarded(_evaluate, bundle),
        "query": guarded(_query, bundle),
    }


handle_train = guarded(_train)
handle_evaluate = guarded(_evaluate)
handle_query = guarded(_query)
