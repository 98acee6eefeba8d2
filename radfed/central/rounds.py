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
from collections.abc import Callable, Iterable, Mapping, MutableMapping
from dataclasses import dataclass
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
from radfed.folders import SITES_FILE_ENV, RunEvent
from radfed.log import logger
from radfed.progress import Progress

__all__ = [
    "SitesMissing",
    "exchange",
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
#: Seconds between two pulls of replies: the last reply of a phase waits at most this long
#: (Flower's in-memory grid pulls every 0.1 s; its own deployed loop waits 3 s).
_PULL_EVERY = 0.1


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
    run: RunFolder | None = None,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> list[int]:
    """Wait until the run's sites are connected, at most ``config.site_wait`` seconds.

    With ``config.sites`` set, connected nodes are asked for their site name once (a query
    message answered by the site's ClientApp) and ``names`` maps node ids to names; the log
    then names the sites still missing. Without it, ``min-sites`` nodes of any name suffice.

    With ``run``, a change in who is missing and a start without some sites are events
    of the run folder.

    Returns:
        The connected node ids the round starts with.

    Raises:
        SitesMissing: after the deadline fewer than ``min-sites`` sites are connected.
    """
    deadline = clock() + config.site_wait
    noted = -math.inf
    told: tuple[str, ...] | None = None
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
                if run is not None:
                    run.event(
                        RunEvent.LATE,
                        f"round {server_round} started without it after {config.site_wait:.0f} s",
                        round_=server_round,
                        level="warning",
                        missing=missing,
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
        if run is not None and told != (waiting,):
            told = (waiting,)
            run.event(
                RunEvent.WAITING,
                f"round {server_round}: waiting for {waiting} ({len(nodes)} connected)",
                round_=server_round,
                missing=missing,
                connected=len(nodes),
            )
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


def exchange(
    grid: Grid,
    messages: Iterable[Message],
    *,
    timeout: float,
    step: tuple[int, int, str],
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> tuple[list[Message], list[int]]:
    """Send ``messages`` and collect the replies until all are in or ``timeout`` passed,
    logging a progress line (``radfed.progress``) whenever replies arrive.

    Flower's ``send_and_receive`` does the same without telling anyone how far it got.

    Args:
        step: (round, rounds, phase) for the progress lines.

    Returns:
        The replies, and the node ids that did not reply in time.
    """
    sent = list(messages)
    pending = {i for i in grid.push_messages(sent) if i}
    targets = {m.metadata.message_id: m.metadata.dst_node_id for m in sent}  # ids set by push
    started, asked = clock(), len(pending)
    replies: list[Message] = []

    def note() -> None:
        elapsed = int(clock() - started)
        logger.info(Progress(step[0], step[1], step[2], len(replies), asked, elapsed).line())

    note()
    while pending:
        got = list(grid.pull_messages(pending))
        for reply in got:
            pending.discard(reply.metadata.reply_to_message_id)
        replies.extend(got)
        if got:
            note()
        if not pending or clock() - started >= timeout:
            break
        sleep(_PULL_EVERY)
    return replies, sorted(targets[i] for i in pending if i in targets)


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
    rounds = config.num_server_rounds

    def phase(server_round: int, name: str, messages: Iterable[Message]) -> _Phase:
        sent = list(messages)
        run.event(
            RunEvent.PHASE_STARTED,
            f"round {server_round}: {name} asked of {len(sent)} sites",
            round_=server_round,
            phase=name,
            asked=len(sent),
        )
        replies, silent = exchange(
            grid, sent, timeout=config.round_timeout, step=(server_round, rounds, name)
        )
        known = {**names, **getattr(strategy, "site_names", {})}
        quiet = [known.get(node, f"node {node}") for node in silent]
        for site in quiet:
            logger.warning("round %d: %s did not reply to %s in time", server_round, site, name)
        return _Phase(server_round, name, len(sent), quiet, replies)

    if first_round == 1:  # the sites' data composition, before any training
        wait_for_sites(grid, config, names, 0, run=run)
        done = phase(0, "survey", strategy.configure_evaluate(0, arrays, ConfigRecord({}), grid))
        strategy.survey(done.replies)  # type: ignore[attr-defined]  # a RadfedChecks
        done.close(run, strategy)
    for server_round in range(first_round, rounds + 1):
        started = time.monotonic()
        wait_for_sites(grid, config, names, server_round, run=run)
        done = phase(
            server_round,
            "train",
            strategy.configure_train(server_round, arrays, ConfigRecord({}), grid),
        )
        aggregated, _ = strategy.aggregate_train(server_round, done.replies)
        done.close(run, strategy)
        if aggregated is not None:
            arrays = aggregated
        done = phase(
            server_round,
            "evaluate",
            strategy.configure_evaluate(server_round, arrays, ConfigRecord({}), grid),
        )
        strategy.aggregate_evaluate(server_round, done.replies)
        done.close(run, strategy)
        run.save_state(server_round, strategy_state(strategy))
        seconds = time.monotonic() - started
        logger.info("round %d/%d completed in %.0f s", server_round, rounds, seconds)
        run.event(
            RunEvent.ROUND_ENDED,
            f"round {server_round}/{rounds} completed in {seconds:.0f} s",
            round_=server_round,
            seconds=round(seconds, 1),
        )
    return arrays


@dataclass(frozen=True)
class _Phase:
    """One exchange of a round: how many sites were asked, who stayed silent, the replies."""

    round: int
    name: str
    asked: int
    silent: list[str]
    replies: list[Message]

    def close(self, run: RunFolder, strategy: FedAvg) -> None:
        """After the strategy used the replies: one event with who replied, who was
        dropped and why, and who stayed silent."""
        take = getattr(strategy, "take_ledger", None)
        replied, dropped = take() if take is not None else ([], {})
        dropped = {**dropped, **dict.fromkeys(self.silent, "no reply in time")}
        run.event(
            RunEvent.PHASE_ENDED,
            f"round {self.round}: {self.name}: {len(replied)} of {self.asked} sites replied"
            + (f", {len(dropped)} dropped" if dropped else ""),
            round_=self.round,
            phase=self.name,
            asked=self.asked,
            replied=replied,
            dropped=dropped,
            silent=self.silent,
        )
