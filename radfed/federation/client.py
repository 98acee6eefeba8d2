"""The ClientApp's work at a site: train and evaluate locally, reply with weights and statistics."""

from __future__ import annotations

import dataclasses
import traceback
import zlib
from collections import OrderedDict
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, Context, Error, Message, MetricRecord, RecordDict
from torch import nn

from radfed.config import RunConfig
from radfed.data.site import STATE_DIR_NAME, SiteData, list_sites, load_site_for
from radfed.data.splits import record_test_use
from radfed.errors import ConfigError, DataError, RadfedError
from radfed.evaluate import evaluate_cells
from radfed.federation.records import (
    ARRAYS_KEY,
    CELLS_KEY,
    METRICS_KEY,
    SITE_KEY,
    CellStats,
    SiteIdentity,
    cell_names,
    pack_stats,
)
from radfed.federation.weights import LocalState, load_global, shared_state
from radfed.log import log_like_flower, logger
from radfed.privacy import (
    POLICY_FILE_NAME,
    AuditLog,
    PolicyRefusal,
    SitePolicy,
    load_policy,
    serialize_content,
)
from radfed.tasks import SplitStats, Task, get_task

__all__ = ["ErrorCode", "handle_evaluate", "handle_query", "handle_train", "resolve_site"]


class ErrorCode:
    """Codes a site replies with instead of exception text (radfed's band: 3000-3099)."""

    CONFIG = 3001
    DATA = 3002
    RADFED = 3003
    HELD_OUT = 3004  # this site is the run's held-out site: it evaluates but never trains
    POLICY = 3005  # the site's policy refuses what the run asks (task, message size, values)
    UNEXPECTED = 3099


def resolve_site(node_config: Mapping[str, Any], config: RunConfig) -> tuple[str, Path]:
    """The site name and folder of this node.

    A deployed SuperNode names its folder with ``--node-config 'data-path="..."'`` (and
    optionally ``site-name``); a simulated node takes the ``partition-id``-th site folder
    of ``data-root`` (sorted by name).

    Raises:
        ConfigError: neither is set, or the partitions do not match the site folders.
    """
    if "data-path" in node_config:
        name = str(node_config.get("site-name") or "").strip()
        if not name:  # the folder name could say more than the site wants to (it leaves)
            raise ConfigError(
                "node config has data-path but no site-name; start the SuperNode "
                'with --node-config \'site-name="NAME" data-path="..."\''
            )
        return name, Path(str(node_config["data-path"])).expanduser()
    if "partition-id" in node_config:
        if not config.data_root:
            raise ConfigError("run config 'data-root' is empty; set it to a folder of site folders")
        sites = list_sites(Path(config.data_root).expanduser())
        index, count = (
            int(node_config["partition-id"]),
            int(node_config.get("num-partitions", len(sites))),
        )
        if count != len(sites):
            msg = (
                f"the simulation has {count} nodes but data-root holds {len(sites)} site folders; "
                "run one node per site folder"
            )
            raise ConfigError(msg)
        return sites[index].name, sites[index]
    raise ConfigError(
        "node config names no site: start the SuperNode with "
        '--node-config \'site-name="NAME" data-path="/path/to/site"\''
    )


_SITE_MEMO: dict[tuple[object, ...], SiteData] = {}


def _site_data(path: Path, config: RunConfig) -> SiteData:
    """Load the site once per process and settings (a simulated node keeps its process)."""
    manifest = path / "manifest.csv"
    stamp = manifest.stat().st_mtime_ns if manifest.exists() else 0
    settings = {k: v for k, v in config.to_run_config().items() if k not in _NOT_DATA_SETTINGS}
    key = (str(path.resolve()), stamp, tuple(sorted(settings.items())))
    if key not in _SITE_MEMO:
        _SITE_MEMO.clear()  # one site per process in a deployment; bounded memory in simulation
        _SITE_MEMO[key] = load_site_for(path, config)
    return _SITE_MEMO[key]


#: Run settings that do not change how a site's data is loaded.
_NOT_DATA_SETTINGS = frozenset(
    {
        "num-server-rounds",
        "out-dir",
        "model",
        "local-epochs",
        "batch-size",
        "learning-rate",
        "eval-splits",
        "threshold",
        "score-bins",
        "min-sites",
        "round-timeout",
        "data-root",
    }
)


def _site_min_cell(node_config: Mapping[str, Any]) -> int:
    """The site's own minimum cell size (``--node-config 'min-cell-size=20'``); 1 if unset."""
    value = node_config.get("min-cell-size", 1)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError("node config 'min-cell-size' must be a positive integer")
    return value


def site_policy(node_config: Mapping[str, Any], site_dir: Path) -> SitePolicy:
    """The site's policy: the file named by node config ``policy-path``, else
    ``SITE_DIR/site-policy.toml`` when present, else the default policy (minimum cell
    size 10) for a deployed node. A simulated node without a policy file follows the
    run's settings: the researcher owns both sides."""
    given = str(node_config.get("policy-path") or "").strip()
    if given:
        return load_policy(Path(given).expanduser())
    default = site_dir / POLICY_FILE_NAME
    if default.is_file():
        return load_policy(default)
    policy = SitePolicy.default()
    return policy if "data-path" in node_config else dataclasses.replace(policy, k=1)


def _setting(msg: Message, key: str) -> float:
    """A number the strategy put in the message's config (``server-round``, FedProx's
    ``proximal-mu``), or 0 when absent."""
    config = msg.content.config_records.get("config")
    value = config.get(key, 0.0) if config is not None else 0.0
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        raise ConfigError(f"message config {key!r} must be a non-negative number")
    return float(value)


def _server_round(msg: Message) -> int:
    return int(_setting(msg, "server-round"))


def _prepare(
    msg: Message, context: Context
) -> tuple[RunConfig, Task, str, Path, SiteData, nn.Module]:
    """The run settings and task, this site's name, folder and data, and the received
    global model."""
    config = RunConfig.from_run_config(context.run_config)
    task = get_task(config.task)
    task.check(config)
    name, path = resolve_site(context.node_config, config)
    site = _site_data(path, config)
    model = task.build_model(config)
    if config.fedbn:  # this site's own normalisation layers from its earlier rounds
        LocalState(path / STATE_DIR_NAME, msg.metadata.run_id).restore(model)
    load_global(model, msg.content[ARRAYS_KEY], config.fedbn)  # type: ignore[arg-type]
    return config, task, name, path, site, model


class HeldOut(RadfedError):
    """This site is the run's held-out site; it does not train."""


def _train(msg: Message, context: Context) -> Message:
    config = RunConfig.from_run_config(context.run_config)
    if config.holdout_site and resolve_site(context.node_config, config)[0] == config.holdout_site:
        raise HeldOut("held-out site: not training in this run (evaluated only)")
    name, path = resolve_site(context.node_config, config)
    policy = site_policy(context.node_config, path)
    policy.check_task(config.task)
    config, task, name, path, site, model = _prepare(msg, context)
    server_round = _server_round(msg)
    seed = config.seed + 1000 * server_round + zlib.crc32(name.encode())
    mu = _setting(msg, "proximal-mu")
    result = task.train(
        model, site.splits["train"], config, seed=seed, proximal_mu=mu, val=site.splits["val"]
    )
    if config.fedbn:
        LocalState(path / STATE_DIR_NAME, msg.metadata.run_id).save(model)
    if result.num_examples == 0:
        raise DataError("the train split is empty; add cases or lower val/test fractions")
    logger.info(
        "round %d: trained on %d cases, loss %.4f", server_round, result.num_examples, result.loss
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
            path / STATE_DIR_NAME, run_id=msg.metadata.run_id, server_round=_server_round(msg)
        )
        logger.warning("the sealed test split is evaluated (use %d at this site)", uses)
    k = policy.min_cell_size(max(config.min_cell_size, _site_min_cell(context.node_config)))
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


def _guarded(
    handler: Callable[[Message, Context], Message],
) -> Callable[[Message, Context], Message]:
    """Reply with an error code, never exception text; log locally without values or paths.

    Every reply passes the site policy's size limit and is recorded in the site's audit
    log before it leaves.
    """
    kind = handler.__name__.strip("_")

    def run(msg: Message, context: Context) -> Message:
        log_like_flower()
        reply = _reply_or_code(handler, msg, context)
        return _leave(reply, msg, context, kind)

    return run


def _reply_or_code(
    handler: Callable[[Message, Context], Message], msg: Message, context: Context
) -> Message:
    try:
        return handler(msg, context)
    except RadfedError as err:
        # radfed's own messages name manifest lines and settings, never header values.
        log = logger.info if isinstance(err, HeldOut) else logger.error
        log("%s failed: %s", handler.__name__.strip("_"), err)
        code = (
            ErrorCode.CONFIG
            if isinstance(err, ConfigError)
            else ErrorCode.DATA
            if isinstance(err, DataError)
            else ErrorCode.HELD_OUT
            if isinstance(err, HeldOut)
            else ErrorCode.POLICY
            if isinstance(err, PolicyRefusal)
            else ErrorCode.RADFED
        )
    except Exception as err:
        frame = traceback.extract_tb(err.__traceback__)[-1]
        logger.error(
            "%s failed: %s at %s:%d (message withheld)",
            handler.__name__.strip("_"),
            type(err).__name__,
            Path(frame.filename).name,
            frame.lineno or 0,
        )
        code = ErrorCode.UNEXPECTED
    return _error(code, msg)


def _error(code: int, msg: Message) -> Message:
    return Message(error=Error(code=code, reason=f"radfed site error {code}"), reply_to=msg)


def _leave(reply: Message, msg: Message, context: Context, kind: str) -> Message:
    """Enforce the policy's message size and write the audit entry of ``reply``.

    A reply the audit log cannot record does not leave: an error code goes instead.
    """
    try:
        path = resolve_site(context.node_config, RunConfig.from_run_config(context.run_config))[1]
        policy = site_policy(context.node_config, path)
    except RadfedError:
        return reply  # an error reply for a node without a site folder: nothing to audit in
    if not reply.has_error():
        try:
            policy.check_size(len(serialize_content(reply.content)))
        except PolicyRefusal as err:
            logger.error("%s reply withheld: %s", kind, err)
            reply = _error(ErrorCode.POLICY, msg)
    try:
        config = msg.content.config_records.get("config")
        server_round = _server_round(msg) if config is not None else 0
        audit = AuditLog.for_site(path)
        if reply.has_error():
            audit.record(
                None,
                run_id=msg.metadata.run_id,
                server_round=server_round,
                kind="error",
                error_code=reply.error.code,
            )
        else:
            audit.record(
                reply.content, run_id=msg.metadata.run_id, server_round=server_round, kind=kind
            )
    except Exception as err:  # an unrecorded reply must not leave the site
        logger.error(
            "%s reply withheld: the audit log cannot record it (%s)", kind, type(err).__name__
        )
        return _error(ErrorCode.RADFED, msg)
    return reply


handle_train = _guarded(_train)
handle_evaluate = _guarded(_evaluate)
handle_query = _guarded(_query)
