"""A site's task, its SuperNode and the ServerApp retry an object that is not there yet after
radfed's short wait (Flower waits 1 s first, then 2, 4...), giving up no later than Flower."""

from __future__ import annotations

import importlib
from typing import Any

import pytest
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.supercore.constant import PULL_MAX_TIME, PULL_MAX_TRIES_PER_OBJECT
from flwr.supercore.inflatable import inflatable_utils
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects, get_object_tree
from flwr.supercore.inflatable.inflatable_utils import ObjectUnavailableError

from radfed.flower_private import (
    LOCAL_OBJECT_PULL_BACKOFF,
    OBJECT_PULL_BACKOFF,
    flower_give_up_s,
    quick_object_pulls,
    run_site_clientapp,
)
from tests.helpers import make_message

CALLERS = (
    "flwr.supercore.inflatable.inflatable_utils",  # the task's pull from its SuperNode
    "flwr.supernode.start_client_internal",  # the SuperNode's pull from the SuperLink
    "flwr.superlink.grid.http_grid",  # the ServerApp's pull of the replies
)


@pytest.fixture
def flower_pull(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """Flower's pull_objects replaced by a recorder in every caller (restored after)."""
    calls: list[dict[str, Any]] = []

    def recorder(object_ids: Any, pull_object_fn: Any, **options: Any) -> dict[str, bytes]:
        calls.append(options)
        return {object_id: pull_object_fn(object_id) for object_id in object_ids}

    for name in CALLERS:
        monkeypatch.setattr(importlib.import_module(name), "pull_objects", recorder)
    return calls


def test_every_caller_pulls_with_the_short_backoff_and_flowers_time_limit(
    flower_pull: list[dict[str, Any]],
) -> None:
    quick_object_pulls(*CALLERS)
    quick_object_pulls(*CALLERS)  # asked twice: wrapped once
    for name in CALLERS:
        pulled = importlib.import_module(name).pull_objects(["a"], lambda oid: oid.encode())
        assert pulled == {"a": b"a"}
    first, cap = OBJECT_PULL_BACKOFF
    assert len(flower_pull) == len(CALLERS)
    for options in flower_pull:
        assert options["initial_backoff"] == first < 1 and options["backoff_cap"] == cap < 10
        assert options["max_time"] == flower_give_up_s() - cap < PULL_MAX_TIME
        assert options["max_tries_per_object"] is None


def test_a_caller_s_own_options_are_kept(flower_pull: list[dict[str, Any]]) -> None:
    quick_object_pulls(CALLERS[0])
    inflatable_utils.pull_objects(["a"], lambda oid: b"", initial_backoff=2.0, max_time=5.0)
    assert flower_pull[0]["initial_backoff"] == 2.0 and flower_pull[0]["max_time"] == 5.0


def test_an_object_that_comes_late_is_pulled_after_short_waits(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Prepare: Flower's real pull_objects; the object is missing for its first three tries
    monkeypatch.setattr(inflatable_utils, "pull_objects", inflatable_utils.pull_objects)
    quick_object_pulls("flwr.supercore.inflatable.inflatable_utils")
    tries: list[str] = []

    def pull(object_id: str) -> bytes:
        tries.append(object_id)
        if len(tries) <= 3:
            raise ObjectUnavailableError(object_id)
        return b"weights"

    # Execute
    pulled = inflatable_utils.pull_objects(["w"], pull, max_tries_per_object=4)
    # Assert: the fourth try brought it (Flower's own loop, radfed's waits)
    assert pulled == {"w": b"weights"} and tries == ["w"] * 4


def test_a_sites_task_pulls_from_its_own_supernode_with_the_local_backoff(
    flower_pull: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: the task process's entry with Flower's process body left out (the names it
    # patches are restored after the test)
    import flwr.supernode.runtime.run_clientapp as process

    cli = importlib.import_module("flwr.supernode.cli.flwr_clientapp")  # the module, not
    # the function of the same name its package exports
    for name in ("install_from_fab", "get_load_client_app_fn"):
        monkeypatch.setattr(process, name, getattr(process, name))
    monkeypatch.setattr(cli, "flwr_clientapp", lambda: None)

    # Execute
    run_site_clientapp(lambda bundle: ClientApp())
    inflatable_utils.pull_objects(["a"], lambda oid: b"")

    # Assert: loopback retries, ten a second at most, still bounded by Flower's give-up
    first, cap = LOCAL_OBJECT_PULL_BACKOFF
    assert (first, cap) < OBJECT_PULL_BACKOFF and cap <= 0.1
    (options,) = flower_pull
    assert options["initial_backoff"] == first and options["backoff_cap"] == cap
    assert options["max_time"] == flower_give_up_s() - cap


def test_a_task_pulling_its_message_through_flowers_inflate_gets_radfeds_backoff(
    flower_pull: list[dict[str, Any]],
) -> None:
    # Prepare: a message's objects as a SuperNode holds them; Flower's
    # pull_and_inflate_object_from_tree (how a task pulls its message) passes every pull
    # option on at Flower's default, explicitly
    message = make_message(RecordDict({"c": ConfigRecord({"k": 1})}), message_type="train")
    tree = get_object_tree(message)
    contents = {oid: obj.deflate() for oid, obj in get_all_nested_objects(message).items()}
    quick_object_pulls(CALLERS[0], backoff=LOCAL_OBJECT_PULL_BACKOFF)

    # Execute
    got = inflatable_utils.pull_and_inflate_object_from_tree(
        tree, contents.__getitem__, lambda oid: None, return_type=Message
    )

    # Assert: radfed's options, not the defaults Flower passed on
    assert got.content["c"]["k"] == 1  # type: ignore[index]
    (options,) = flower_pull
    assert options["initial_backoff"] == LOCAL_OBJECT_PULL_BACKOFF[0]
    assert options["backoff_cap"] == LOCAL_OBJECT_PULL_BACKOFF[1]
    assert options["max_tries_per_object"] is None


def test_no_mix_of_a_callers_options_and_radfeds_leaves_a_pull_unbounded(
    flower_pull: list[dict[str, Any]],
) -> None:
    # Prepare: a caller that asks for no time limit and leaves Flower's try limit, which
    # radfed replaces by its own (no try limit, bounded by time)
    quick_object_pulls(CALLERS[0])

    # Execute
    inflatable_utils.pull_objects(
        ["a"], lambda oid: b"", max_time=None, max_tries_per_object=PULL_MAX_TRIES_PER_OBJECT
    )
    inflatable_utils.pull_objects(["a"], lambda oid: b"", max_time=10**9)

    # Assert: each pull still gives up no later than Flower would
    for options in flower_pull:
        assert options["max_time"] == flower_give_up_s() - OBJECT_PULL_BACKOFF[1]
