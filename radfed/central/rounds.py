"""The server's round loop: bounded waiting for sites, train, evaluate, persist, resume.

Flower's ``Strategy.start`` runs rounds 1..R from scratch and, while fewer than
``min_available_nodes`` nodes are connected, waits without a time limit. A deployment needs
both to change: a round waits at most ``site-wait`` seconds for the run's sites and then
starts with the ``min-sites`` that are there (naming the missing ones), and a run continues
from its last completed round after the server process was killed. The loop below calls
the strategy's own ``configure_*``/``aggregate_*`` methods, so aggregation stays Flower's.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Mapping, MutableMapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from radfed.central.run_folder import RunFolder
from radfed.config import RunConfig
from radfed.errors import ConfigError, RadfedError
from radfed.federation.codes import InvalidReply, describe_code
from radfed.federation.identity import read_site_identity
from radfed.folders import SITES_FILE_ENV
from radfed.log import logger

__all__ = [
    "SitesMissing",
    "load_site_registry",
    "restore_strategy_state",
    "run_rounds",
    "strategy_state",
    "wait_for_sites",
]

#: Attributes of Flower's strategies that carry server-optimiser state between rounds
#: (FedAdam/FedYogi/FedAdagrad moments, FedAvgM momentum).
_STATE_ATTRS = ("m_t", "v_t", "momentum_vector")

#: Seconds between "waiting for sites" lines, and the reply timeout of an identity query.
_NOTE_EVERY, _QUERY_TIMEOUT = 10.0, 120.0


def load_site_registry() -> dict[int, str] | None:
    """Node id -> site name of the registered site keys; None outside a deployment.

    A node's id is bound to the key it authenticates with, so this names a node by its
    key, not by what its replies claim. In a deployment (``radfed server start`` names the
    registry in ``RADFED_SITES_FILE``) it fails closed: a registry that is missing,
    unreadable or empty stops the run rather than let any node be a site.

    Raises:
        ConfigError: the registry is missing, malformed or names no site.
    """
    name = os.environ.get(SITES_FILE_ENV)
    if not name:
        return None
    path = Path(name)
    fix = "start the server with `radfed server start`, which registers the sites' keys"
    try:
        sites = json.loads(path.read_text())
        registry = {int(node): str(site) for site, node in sites.items()}
    except OSError:
        raise ConfigError(f"the site registry {path} cannot be read; {fix}") from None
    except (ValueError, AttributeError, TypeError):
        raise ConfigError(f"the site registry {path} is not one; {fix}") from None
    if not registry:
        raise ConfigError(f"the site registry {path} names no site; {fix}")
    return registry


class SitesMissing(RadfedError):
    """Fewer than ``min-sites`` sites connected within ``site-wait`` seconds."""


def wait_for_sites(
    grid: Grid,
    config: RunConfig,
    names: MutableMapping[int, str],
    server_round: int,
    *,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> list[int]:
    """Wait until the run's sites are connected, at most ``config.site_wait`` seconds.

    With ``config.sites`` set, connected nodes are asked for their site name once (a query
    message answered by the site's ClientApp) and ``names`` maps node ids to names; the log
    then names the sites still missing. Without it, ``min-sites`` nodes of any name suffice.

    Returns:
        The connected node ids the round starts with.

    Raises:
        SitesMissing: after the deadline fewer than ``min-sites`` sites are connected.
    """
    deadline = clock() + config.site_wait
    noted = -math.inf
    while True:
        nodes = sorted(grid.get_node_ids())
        missing: list[str] = []
        if config.sites:
            _identify(grid, [n for n in nodes if n not in names], names)
            present = {names[n] for n in nodes if n in names}
            missing = [s for s in config.sites if s not in present]
        enough = len(nodes) >= config.min_sites
        if enough and not missing:
            return nodes
        waiting = ", ".join(missing) if missing else f"{config.min_sites - len(nodes)} more"
        if clock() >= deadline:
            if enough:
                logger.warning(
                    "round %d: starting without %s after %.0f s (%d sites connected, min-sites %d)",
                    server_round,
                    waiting,
                    config.site_wait,
                    len(nodes),
                    config.min_sites,
                )
                return nodes
            msg = (
                f"round {server_round}: {len(nodes)} site(s) connected after "
                f"{config.site_wait:.0f} s, min-sites is {config.min_sites} (missing: {waiting}); "
                "the run stops here; start the missing sites and continue with "
                "`radfed launch ... --resume`"
            )
            raise SitesMissing(msg)
        if clock() - noted >= _NOTE_EVERY:
            logger.info(
                "round %d: waiting for sites: %s (%d connected)", server_round, waiting, len(nodes)
            )
            noted = clock()
        sleep(1.0)


def _identify(grid: Grid, nodes: list[int], names: MutableMapping[int, str]) -> None:
    """Ask new nodes for their site name; a node that does not answer stays unnamed."""
    if not nodes:
        return
    messages = [
        Message(content=RecordDict(), dst_node_id=node, message_type=MessageType.QUERY)
        for node in nodes
    ]
    for reply in grid.send_and_receive(messages, timeout=_QUERY_TIMEOUT):
        node = reply.metadata.src_node_id
        if reply.has_error():
            logger.warning(
                "node %d did not say its site name (error code %d: %s)",
                node,
                reply.error.code,
                describe_code(reply.error.code),
            )
            continue
        try:
            names[node] = read_site_identity(reply.content).name
        except InvalidReply as err:
            logger.warning("node %d sent a bad identity: %s", node, err)


def strategy_state(strategy: FedAvg) -> dict[str, Any]:
    """The strategy's server-optimiser state as tensors (for ``torch.save``)."""
    state: dict[str, Any] = {}
    for attr in _STATE_ATTRS:
        value = getattr(strategy, attr, None)
        if isinstance(value, Mapping):
            state[attr] = {k: torch.from_numpy(np.array(v)) for k, v in value.items()}
        elif isinstance(value, list):
            state[attr] = [torch.from_numpy(np.array(v)) for v in value]
    return state


def restore_strategy_state(strategy: FedAvg, state: Mapping[str, Any]) -> None:
    """Put back what ``strategy_state`` saved."""
    for attr, value in state.items():
        if attr not in _STATE_ATTRS or not hasattr(strategy, attr):
            continue
        if isinstance(value, Mapping):
            setattr(strategy, attr, {k: v.numpy() for k, v in value.items()})
        else:
            setattr(strategy, attr, [v.numpy() for v in value])


def run_rounds(
    strategy: FedAvg,
    grid: Grid,
    config: RunConfig,
    run: RunFolder,
    arrays: ArrayRecord,
    *,
    first_round: int = 1,
    names: MutableMapping[int, str] | None = None,
) -> ArrayRecord:
    """Rounds ``first_round``..``num-server-rounds``: wait for sites, train, evaluate, and
    persist what a resumed run needs after every completed round.

    Returns:
        The final global arrays.
    """
    names = {} if names is None else names
    strategy.summary()
    if first_round == 1:  # the sites' data composition, before any training
        wait_for_sites(grid, config, names, 0)
        replies = grid.send_and_receive(
            messages=strategy.configure_evaluate(0, arrays, ConfigRecord({}), grid),
            timeout=config.round_timeout,
        )
        strategy.survey(replies)  # type: ignore[attr-defined]  # a RadfedChecks
    for server_round in range(first_round, config.num_server_rounds + 1):
        started = time.monotonic()
        wait_for_sites(grid, config, names, server_round)
        replies = grid.send_and_receive(
            messages=strategy.configure_train(server_round, arrays, ConfigRecord({}), grid),
            timeout=config.round_timeout,
        )
        aggregated, _ = strategy.aggregate_train(server_round, replies)
        if aggregated is not None:
            arrays = aggregated
        replies = grid.send_and_receive(
            messages=strategy.configure_evaluate(server_round, arrays, ConfigRecord({}), grid),
            timeout=config.round_timeout,
        )
        strategy.aggregate_evaluate(server_round, replies)
        run.save_state(server_round, strategy_state(strategy))
        logger.info(
            "round %d/%d completed in %.0f s",
            server_round,
            config.num_server_rounds,
            time.monotonic() - started,
        )
    return arrays
