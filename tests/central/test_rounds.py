"""The server's round loop pieces: bounded waiting for sites, strategy state, resume."""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from radfed.central.rounds import (
    SitesMissing,
    load_site_registry,
    restore_strategy_state,
    strategy_state,
    wait_for_sites,
)
from radfed.central.run_folder import RunFolder
from radfed.central.strategy import make_strategy
from radfed.config import RunConfig
from radfed.errors import ConfigError
from radfed.federation.identity import SiteIdentity
from radfed.federation.schema import SITE_KEY
from radfed.folders import SITES_FILE_ENV
from tests.helpers import make_message


class Clock:
    """Time that advances only when the code under test sleeps."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


class Nodes:
    """A grid whose connected nodes change over time and that answers identity queries."""

    def __init__(self, clock: Clock, arrivals: dict[int, tuple[float, str]]) -> None:
        self.clock, self.arrivals = clock, arrivals
        self.queried: list[int] = []

    def get_node_ids(self) -> list[int]:
        return [n for n, (t, _) in self.arrivals.items() if t <= self.clock.now]

    def send_and_receive(self, messages: Iterable[Message], timeout: float) -> list[Message]:
        replies = []
        for msg in messages:
            node = msg.metadata.dst_node_id
            self.queried.append(node)
            identity = SiteIdentity.local(self.arrivals[node][1]).to_record()
            request = make_message(
                RecordDict(), message_type="query", src_node_id=0, dst_node_id=node
            )
            reply = Message(content=RecordDict({SITE_KEY: identity}), reply_to=request)
            replies.append(reply)
        return replies


@pytest.fixture(autouse=True)
def _server_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    """What a ServerApp process has set when the loop creates messages."""
    for attr in ("_task_id", "_run_id", "_node_id"):
        monkeypatch.setattr(TaskIdentity, attr, 1)


def _config(**changes: object) -> RunConfig:
    return dataclasses.replace(RunConfig(min_sites=2, site_wait=60.0), **changes)  # type: ignore[arg-type]


def test_waits_for_every_named_site_and_names_the_missing(caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    grid = Nodes(clock, {1: (0, "a"), 2: (5, "b"), 3: (30, "c")})
    names: dict[int, str] = {}
    with caplog.at_level(logging.INFO, logger="radfed"):
        nodes = wait_for_sites(
            grid,
            _config(sites=("a", "b", "c")),
            names,
            1,
            clock=clock,
            sleep=clock.sleep,  # type: ignore[arg-type]
        )
    assert nodes == [1, 2, 3] and names == {1: "a", 2: "b", 3: "c"}
    assert 30 <= clock.now < 32  # it started as soon as c arrived, not at the deadline
    assert "waiting for sites: b, c" in caplog.text and "waiting for sites: c" in caplog.text
    assert sorted(grid.queried) == [1, 2, 3]  # each node asked once


def test_after_the_deadline_a_round_starts_with_min_sites(caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    grid = Nodes(clock, {1: (0, "a"), 2: (0, "b")})
    with caplog.at_level(logging.WARNING, logger="radfed"):
        nodes = wait_for_sites(
            grid,
            _config(sites=("a", "b", "c")),
            {},
            3,
            clock=clock,
            sleep=clock.sleep,  # type: ignore[arg-type]
        )
    assert nodes == [1, 2] and 60 <= clock.now < 62
    assert "round 3: starting without c" in caplog.text


def test_below_min_sites_at_the_deadline_the_run_stops_with_the_fix() -> None:
    clock = Clock()
    grid = Nodes(clock, {1: (0, "a")})
    with pytest.raises(SitesMissing, match=r"missing: b, c.*--resume"):
        wait_for_sites(grid, _config(sites=("a", "b", "c")), {}, 2, clock=clock, sleep=clock.sleep)  # type: ignore[arg-type]


def test_registered_nodes_are_named_without_asking(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "sites.json").write_text(json.dumps({"a": 11, "b": 12}))
    monkeypatch.setenv(SITES_FILE_ENV, str(tmp_path / "sites.json"))
    registry = load_site_registry()
    assert registry == {11: "a", 12: "b"}
    clock = Clock()
    grid = Nodes(clock, {11: (0, "a"), 12: (0, "b")})
    wait_for_sites(
        grid, _config(sites=("a", "b")), dict(registry), 1, clock=clock, sleep=clock.sleep
    )  # type: ignore[arg-type]
    assert grid.queried == []


@pytest.mark.parametrize("name", ["fedadam", "fedavgm"])
def test_server_optimiser_state_survives_a_restart(name: str, tmp_path: Path) -> None:
    config = _config(strategy=name, out_dir=str(tmp_path))
    reference = {"w": torch.zeros(3)}
    run = RunFolder.start(tmp_path, config)
    strategy = make_strategy(config, reference, run)
    if name == "fedadam":
        strategy.m_t = {"w": np.array([0.1, 0.2, 0.3])}  # type: ignore[attr-defined]
        strategy.v_t = {"w": np.array([1.0, 2.0, 3.0])}  # type: ignore[attr-defined]
    else:
        strategy.momentum_vector = [np.array([0.5, 0.5, 0.5])]  # type: ignore[attr-defined]
    run.save_state(4, strategy_state(strategy))
    fresh = make_strategy(config, reference, run)
    saved = run.load_state()
    assert saved is not None and saved["round"] == 4
    restore_strategy_state(fresh, saved["strategy"])
    for attr in ("m_t", "v_t", "momentum_vector"):
        before, after = getattr(strategy, attr, None), getattr(fresh, attr, None)
        if before is None:
            continue
        pairs = (
            zip(before.values(), after.values(), strict=True)
            if isinstance(before, dict)
            else zip(before, after, strict=True)
        )
        for x, y in pairs:
            np.testing.assert_array_equal(x, y)


def test_resume_drops_the_unfinished_round_and_refuses_other_settings(tmp_path: Path) -> None:
    config = _config(out_dir=str(tmp_path), num_server_rounds=3)
    run = RunFolder.start(tmp_path, config)
    for r in range(3):
        run.save_checkpoint(r, {"w": torch.full((2,), float(r))}, config)
    for r in (1, 2):
        run.append_metrics(r, "a", "val", 10, {"auc": 0.5})
    run.save_state(1, {})  # round 2 did not complete
    # Execute
    again, done = RunFolder.resume(
        tmp_path, dataclasses.replace(config, resume=True, site_wait=5.0)
    )
    # Assert
    assert done == 1
    assert [line["round"] for line in again.read_metrics()] == [1]
    assert not run.checkpoint_path(2).exists() and run.checkpoint_path(1).exists()
    with pytest.raises(ConfigError, match="learning-rate"):
        RunFolder.resume(tmp_path, dataclasses.replace(config, learning_rate=0.5))
    with pytest.raises(ConfigError, match="nothing to resume"):
        RunFolder.resume(tmp_path / "elsewhere", config)
