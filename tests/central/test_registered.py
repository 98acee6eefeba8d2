"""Who is a site in a deployment: the nodes whose keys `radfed server start` registered from
the PKI, and nobody else, even when the registry itself is missing or broken."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from pathlib import Path

import pytest
from flwr.app import Message, RecordDict

from radfed.central.registered import RegisteredGrid
from radfed.central.rounds import load_site_registry
from radfed.errors import ConfigError
from radfed.folders import SITES_FILE_ENV
from tests.helpers import make_message


class Grid:
    """Flower's grid as far as RegisteredGrid uses it: nodes 11, 12 and an intruder 99."""

    def __init__(self) -> None:
        self.pushed: list[int] = []

    def get_node_ids(self) -> list[int]:
        return [11, 12, 99]

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> list[Message]:
        replies = []
        for msg in messages:
            self.pushed.append(msg.metadata.dst_node_id)
        for node in (11, 12, 99):  # the intruder answers too, unasked
            replies.append(make_message(RecordDict(), message_type="query", src_node_id=node))
        return replies


def _ask_all(grid: RegisteredGrid) -> list[int]:
    messages = [
        make_message(RecordDict(), message_type="query", dst_node_id=n) for n in (11, 12, 99)
    ]
    replies = grid.send_and_receive(messages, timeout=1.0)
    return [m.metadata.src_node_id for m in replies]


def test_a_node_outside_the_registry_is_sent_nothing_and_never_heard(
    caplog: pytest.LogCaptureFixture,
) -> None:
    inner = Grid()
    grid = RegisteredGrid(inner, {11: "a", 12: "b"})  # type: ignore[arg-type]

    with caplog.at_level(logging.WARNING):
        nodes = list(grid.get_node_ids())
        heard = _ask_all(grid)

    assert nodes == [11, 12] and heard == [11, 12] and inner.pushed == [11, 12]
    assert caplog.text.count("security: node 99") == 1  # once, however often it shows


def test_an_empty_registry_admits_no_node_and_none_means_a_simulation() -> None:
    assert list(RegisteredGrid(Grid(), {}).get_node_ids()) == []  # type: ignore[arg-type]
    assert list(RegisteredGrid(Grid(), None).get_node_ids()) == [11, 12, 99]  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("content", "named"),
    [
        (None, "cannot be read"),
        ("[11, 12]", "is not one"),
        ("{not json", "is not one"),
        ('{"a": "eleven"}', "is not one"),
        ("{}", "names no site"),
    ],
)
def test_a_deployment_without_a_sound_registry_stops(
    content: str | None, named: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "sites.json"
    if content is not None:
        path.write_text(content)
    monkeypatch.setenv(SITES_FILE_ENV, str(path))

    with pytest.raises(ConfigError, match=named) as raised:
        load_site_registry()
    assert "radfed server start" in str(raised.value)


def test_outside_a_deployment_there_is_no_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(SITES_FILE_ENV, raising=False)
    assert load_site_registry() is None


def test_the_registry_names_nodes_by_their_keys(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "sites.json").write_text(json.dumps({"a": 11, "b": 12}))
    monkeypatch.setenv(SITES_FILE_ENV, str(tmp_path / "sites.json"))
    assert load_site_registry() == {11: "a", 12: "b"}
