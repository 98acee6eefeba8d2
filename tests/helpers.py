"""Helpers for tests: messages and contexts for calling Flower handlers directly, the
weights a message carries, and the mark of tests that need an operating-system service.

Weights travel packed (``radfed.federation.packing``): a test sends ``pack(state)`` and
reads what came back with ``weights_of``, as the server and the sites do."""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from pathlib import Path

import pytest
import torch
from flwr.app import ArrayRecord, Context, Message, Metadata, RecordDict

from radfed.deployment.edge import nginx
from radfed.errors import ConfigError
from radfed.federation.packing import unpack


def _nginx_missing() -> bool:
    try:
        nginx()
    except ConfigError:
        return True
    return False


#: Tests that start the server's edge. Skipped on a machine without nginx, unless
#: ``RADFED_REQUIRE_SERVICES`` is set (``.ci/run`` sets it after installing nginx): there they
#: run, and fail with the message that names the missing package, so CI never skips them.
needs_nginx = pytest.mark.skipif(
    _nginx_missing() and not os.environ.get("RADFED_REQUIRE_SERVICES"),
    reason="nginx is not installed (the server's edge needs it; `apt-get install nginx`)",
)


def make_message(
    content: RecordDict,
    *,
    message_type: str,
    src_node_id: int = 1,
    dst_node_id: int = 0,
    run_id: int = 1,
) -> Message:
    """A message as the other side would have sent it (explicit metadata, as Flower's tests do)."""
    metadata = Metadata(
        run_id=run_id,
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


def weights_of(msg: Message, layout: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The weights ``msg`` carries, unpacked by ``layout`` (the receiver's state dict)."""
    packed = msg.content["arrays"]
    assert isinstance(packed, ArrayRecord)
    return dict(unpack(packed, layout).to_torch_state_dict())


def site_node(site: Path, policy: str | None = None) -> dict[str, bool | float | int | str]:
    """The node config of site "site-a" on folder ``site``, with ``policy`` (TOML) written
    beside it as its site policy when given."""
    node: dict[str, bool | float | int | str] = {"site-name": "site-a", "data-path": str(site)}
    if policy is not None:
        path = site.parent / "site-policy.toml"
        path.write_text(policy)
        node["policy-path"] = str(path)
    return node
