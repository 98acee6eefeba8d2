"""The server's registered nodes follow the PKI's site keys exactly: a removed key and a
replaced one lose their node, a new one gets one (the SuperLink's side taken by fakes that
record the calls; the real calls run in tests/e2e/test_deployment.py), and the edge opens
only after they do."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest

from radfed.deployment.process import Command, run_foreground
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

    def listed(self, home: Path) -> list[int]:
        return list(self.nodes)

    def calls(self) -> dict[str, object]:
        return {"register": self.register, "unregister": self.unregister, "listed": self.listed}


def _key(tmp_path: Path, site: str, tag: str) -> Path:
    made = make_site_keys(tmp_path / f"{site}-{tag}", site)
    return made.public_key.rename(made.public_key.with_name(f"{site}.pub"))


def test_the_registered_nodes_follow_the_pki(tmp_path: Path) -> None:
    # Prepare: sites a and b registered; then b's key is replaced and a's removed, c added
    server, link = ServerState(tmp_path / "state"), SuperLink()
    server.path.mkdir()
    a, b = _key(tmp_path, "a", "1"), _key(tmp_path, "b", "1")
    first = sync_site_keys(tmp_path, server, [a, b], **link.calls())
    again = sync_site_keys(tmp_path, server, [a, b], **link.calls())
    b2, c = _key(tmp_path, "b", "2"), _key(tmp_path, "c", "1")

    # Execute
    after = sync_site_keys(tmp_path, server, [b2, c], **link.calls())

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
        sync_site_keys(tmp_path, server, [], **SuperLink().calls())


def test_a_key_file_not_named_as_a_site_changes_nothing(tmp_path: Path) -> None:
    # Prepare: a registered site, then a key file whose name is no site name
    server, link = ServerState(tmp_path / "state"), SuperLink()
    server.path.mkdir()
    a = _key(tmp_path, "a", "1")
    sync_site_keys(tmp_path, server, [a], **link.calls())
    odd = a.with_name("A b.pub")
    odd.write_bytes(a.read_bytes())

    # Execute / Assert: refused by name, before any node changes
    with pytest.raises(ConfigError, match="site name 'A b' is invalid"):
        sync_site_keys(tmp_path, server, [a, odd], **link.calls())
    assert list(link.nodes.values()) == [fingerprint(a)]


def test_the_edge_starts_only_after_the_keys_are_synced(tmp_path: Path) -> None:
    # Prepare: a long-running "SuperLink", a sync step, and an "edge" that records
    # whether the sync had finished when it started
    synced, seen = tmp_path / "synced", tmp_path / "seen"
    superlink = Command([sys.executable, "-c", "import time; time.sleep(60)"], {})
    edge = Command(
        [
            sys.executable,
            "-c",
            f"import pathlib; pathlib.Path({str(seen)!r}).write_text("
            f"str(pathlib.Path({str(synced)!r}).exists()))",
        ],
        {},
    )

    def sync() -> None:
        time.sleep(0.5)
        synced.write_text("done")

    # Execute: the edge ends first, which stops the SuperLink
    code = run_foreground(superlink, then=(sync, edge))

    # Assert
    assert code == 0
    assert seen.read_text() == "True"


def test_a_failed_sync_stops_the_server_before_the_edge_starts(tmp_path: Path) -> None:
    seen = tmp_path / "seen"
    superlink = Command([sys.executable, "-c", "import time; time.sleep(60)"], {})
    edge = Command([sys.executable, "-c", f"open({str(seen)!r}, 'w')"], {})

    def sync() -> None:
        raise ConfigError("the SuperLink did not register site key a.pub")

    started = time.monotonic()
    with pytest.raises(ConfigError, match="did not register"):
        run_foreground(superlink, then=(sync, edge))
    assert not seen.exists()
    assert time.monotonic() - started < 30  # the SuperLink was stopped, not waited for


def test_a_node_registered_outside_the_pki_is_unregistered_at_start(tmp_path: Path) -> None:
    # Prepare: site a registered; someone on the server host registered another key
    server, link = ServerState(tmp_path / "state"), SuperLink()
    server.path.mkdir()
    a = _key(tmp_path, "a", "1")
    sync_site_keys(tmp_path, server, [a], **link.calls())
    link.register(tmp_path, _key(tmp_path, "x", "1"))

    # Execute
    after = sync_site_keys(tmp_path, server, [a], **link.calls())

    # Assert: only the PKI's key keeps a node
    assert after == {"a": 101}
    assert list(link.nodes.values()) == [fingerprint(a)]
