"""The ClientApp's work at a site: train and evaluate locally, reply with weights and statistics.

Each handler is wrapped by ``radfed.site.egress.guarded``: what it returns leaves only
through the site policy and the audit log, and an exception leaves only as an error code.
"""

from __future__ import annotations

import dataclasses
import zlib
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from torch import nn

from radfed.config import RunConfig
from radfed.data.loading import SiteData
from radfed.data.splits import record_test_use
from radfed.errors import DataError
from radfed.federation.identity import SiteIdentity
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
from radfed.site.bundle import BundleIdentity
from radfed.site.egress import Handler, HeldOut, guarded
from radfed.site.evaluate import evaluate_cells
from radfed.site.fedbn import LocalState
from radfed.site.node import (
    load_site_once,
    message_setting,
    resolve_site,
    server_round,
    site_min_cell,
    site_policy,
)
from radfed.tasks import SplitStats, Task, get_task

__all__ = ["handle_evaluate", "handle_query", "handle_train", "site_handlers"]


def _prepare(
    msg: Message, context: Context
) -> tuple[RunConfig, Task, str, Path, SiteData, nn.Module]:
    """The run settings and task, this site's name, folder and data, and the received
    global model."""
    config = RunConfig.from_run_config(context.run_config)
    task = get_task(config.task)
    task.check(config)
    name, path = resolve_site(context.node_config, config)
    site = load_site_once(path, config)
    model = task.build_model(config)
    if config.fedbn:  # this site's own normalisation layers from its earlier rounds
        LocalState(SiteFolder(path).state, msg.metadata.run_id).restore(model)
    load_global(model, msg.content[ARRAYS_KEY], config.fedbn)  # type: ignore[arg-type]
    return config, task, name, path, site, model


def _train(msg: Message, context: Context) -> Message:
    config = RunConfig.from_run_config(context.run_config)
    if config.holdout_site and resolve_site(context.node_config, config)[0] == config.holdout_site:
        raise HeldOut("held-out site: not training in this run (evaluated only)")
    name, path = resolve_site(context.node_config, config)
    policy = site_policy(context.node_config, path)
    policy.check_task(config.task)
    config, task, name, path, site, model = _prepare(msg, context)
    round_ = server_round(msg)
    seed = config.seed + 1000 * round_ + zlib.crc32(name.encode())
    mu = message_setting(msg, "proximal-mu")
    result = task.train(
        model, site.splits["train"], config, seed=seed, proximal_mu=mu, val=site.splits["val"]
    )
    if config.fedbn:
        LocalState(SiteFolder(path).state, msg.metadata.run_id).save(model)
    if result.num_examples == 0:
        raise DataError("the train split is empty; add cases or lower val/test fractions")
    logger.info(
        "round %d: trained on %d cases, loss %.4f", round_, result.num_examples, result.loss
    )
    state = shared_state(model, config.fedbn)
    if policy.dp is not None:  # the site's differential privacy: clip and noise the update
        received = {k: v.numpy() for k, v in msg.content[ARRAYS_KEY].items()}  # type: ignore[union-attr]
        noised = policy.privatize(
            {k: v.detach().cpu().numpy() for k, v in state.items()},
            received,
            # fresh entropy: noise from a seed the server could know could be subtracted
            np.random.default_rng(),
        )
        state = OrderedDict((k, torch.from_numpy(v)) for k, v in noised.items())
    content = RecordDict(
        {
            ARRAYS_KEY: ArrayRecord(state),
            METRICS_KEY: MetricRecord(
                {"num-examples": result.num_examples, "train-loss": float(result.loss)}
            ),
            SITE_KEY: SiteIdentity.local(name).to_record(),
        }
    )
    return Message(content=content, reply_to=msg)


def _evaluate(msg: Message, context: Context) -> Message:
    config, task, name, path, site, model = _prepare(msg, context)
    policy = site_policy(context.node_config, path)
    config = dataclasses.replace(config, subgroups=policy.allowed_subgroups(config.subgroups))
    if "test" in config.eval_splits:
        uses = record_test_use(
            SiteFolder(path).state.path, run_id=msg.metadata.run_id, server_round=server_round(msg)
        )
        logger.warning("the sealed test split is evaluated (use %d at this site)", uses)
    k = policy.min_cell_size(max(config.min_cell_size, site_min_cell(context.node_config)))
    stats: dict[str, SplitStats] = {}
    positives: dict[str, int] = {}
    cells: dict[str, list[CellStats]] = {}
    for split in config.eval_splits:
        _, parts = evaluate_cells(task, model, site.splits[split], config, k)
        stats[split], positives[split] = parts[0].stats, parts[0].positives
        cells[split] = parts[1:]
    content = RecordDict(
        {
            METRICS_KEY: pack_stats(task, stats, cells=cells, positives=positives),
            CELLS_KEY: cell_names(cells),
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
