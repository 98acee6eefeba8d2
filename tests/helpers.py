"""Helpers for tests that call Flower handlers directly."""

from __future__ import annotations

import time

from flwr.app import Context, Message, Metadata, RecordDict


def make_message(
    content: RecordDict, *, message_type: str, src_node_id: int = 1, dst_node_id: int = 0
) -> Message:
    """A message as the other side would have sent it (explicit metadata, as Flower's tests do)."""
    metadata = Metadata(
        run_id=1,
        message_id="",
        src_node_id=src_node_id,
        dst_node_id=dst_node_id,
        reply_to_message_id="",
        group_id="1",
        created_at=time.time(),
        ttl=600.0,
        message_type=message_type,
    )
    return Message(content=content, metadata=metadata)


def make_context(
    run_config: dict[str, bool | float | int | str],
    node_config: dict[str, bool | float | int | str],
) -> Context:
    return Context(
        run_id=1, node_id=1, node_config=node_config, state=RecordDict(), run_config=run_config
    )
