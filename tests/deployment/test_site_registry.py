"""The server's registered nodes follow the PKI's site keys exactly: a removed key and a
replaced one lose their node, a new one gets one (the SuperLink's side taken by fakes that
record the calls; the real calls run in tests/e2e/test_deployment.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from radfed.deployment.site_kit import fingerprint, make_site_keys
from radfed.deployment.superlink import sync_site_keys
from radfed.errors import ConfigError
from radfed.folders import ServerState


class SuperLink:
    def __init__(self) -> None:
        self.nodes: dict[int, str] = {}
        self.next = 100

    def register(self, home: Path, key: Path) -> int:
        self.next += 1
        self.nodes[self.next] = fingerprint(key)
        return self.next

    def unregister(self, home: Path, node: int) -> None:
        del self.nodes[node]


def _key(tmp_path: Path, site: str, tag: str) -> Path:
    made = make_site_keys(tmp_path / f"{site}-{tag}", site)
    return made.public_key.rename(made.public_key.with_name(f"{site}.pub"))


def test_the_registered_nodes_follow_the_pki(tmp_path: Path) -> None:
    # Prepare: sites a and b registered; then b's key is replaced and a's removed, c added
    server, link = ServerState(tmp_path / "state"), SuperLink()
    server.path.mkdir()
    a, b = _key(tmp_path, "a", "1"), _key(tmp_path, "b", "1")
    first = sync_site_keys(
        tmp_path, server, [a, b], register=link.register, unregister=link.unregister
    )
    again = sync_site_keys(
        tmp_path, server, [a, b], register=link.register, unregister=link.unregister
    )
    b2, c = _key(tmp_path, "b", "2"), _key(tmp_path, "c", "1")

    # Execute
    after = sync_site_keys(
        tmp_path, server, [b2, c], register=link.register, unregister=link.unregister
    )

    # Assert: a restart changes nothing; afterwards the SuperLink knows b's new key and c only
    assert first == again == {"a": 101, "b": 102}
    assert after == {"b": 103, "c": 104}
    assert sorted(link.nodes.values()) == sorted([fingerprint(b2), fingerprint(c)])
    assert json.loads(server.sites.read_text()) == after
    assert json.loads(server.site_keys.read_text()) == {"b": fingerprint(b2), "c": fingerprint(c)}


def test_a_registry_that_is_not_radfeds_stops_the_server(tmp_path: Path) -> None:
    server = ServerState(tmp_path)
    server.sites.write_text("[1, 2]")
    with pytest.raises(ConfigError, match="is not radfed's"):
        sync_site_keys(tmp_path, server, [], register=SuperLink().register)
