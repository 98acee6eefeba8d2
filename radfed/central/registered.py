"""The grid as a deployed run sees it: only the nodes whose keys were registered from the PKI.

``radfed server start`` registers each site's key from the PKI and records the node id it
got in ``sites.json``. A node the SuperLink knows by any other way (a key registered through
the Control API on the server host, say) is never a site: it is not counted while the
run waits for sites, it is sent no message (no model), and a reply from it is dropped; each
such node is logged once as a security event. Outside a deployment (no registry, None, as
in a simulation) the grid is Flower's, unchanged; an empty registry admits no node.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from flwr.app import Message, RecordDict
from flwr.serverapp import Grid

from radfed.log import logger

__all__ = ["RegisteredGrid"]


class RegisteredGrid(Grid):
    """``grid`` limited to the nodes of ``registered`` (node id -> site name; None: all)."""

    def __init__(self, grid: Grid, registered: Mapping[int, str] | None) -> None:
        self._grid = grid
        self._registered = None if registered is None else dict(registered)
        self._reported: set[int] = set()

    def _allowed(self, node: int) -> bool:
        if self._registered is None or node in self._registered:
            return True
        if node not in self._reported:
            self._reported.add(node)
            logger.warning(
                "security: node %d is connected but its key was not registered from the PKI "
                "(sites.json); it is no site of this run: sent nothing, its replies dropped",
                node,
            )
        return False

    def set_run(self, run: Any) -> None:  # Flower's Run (a type of its internals)
        self._grid.set_run(run)

    @property
    def run(self) -> Any:
        return self._grid.run

    def create_message(
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        return self._grid.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        return [node for node in self._grid.get_node_ids() if self._allowed(node)]

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self._grid.push_messages(self._to_sites(messages))

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self._from_sites(self._grid.pull_messages(message_ids))

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        replies = self._grid.send_and_receive(self._to_sites(messages), timeout=timeout)
        return self._from_sites(replies)

    def _to_sites(self, messages: Iterable[Message]) -> list[Message]:
        return [m for m in messages if self._allowed(m.metadata.dst_node_id)]

    def _from_sites(self, replies: Iterable[Message]) -> list[Message]:
        return [m for m in replies if self._allowed(m.metadata.src_node_id)]
