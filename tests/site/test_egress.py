"""The site's own policy, enforced by its handlers whatever the run asks, and the audit log
of every reply that leaves."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from flwr.app import ConfigRecord, Message, RecordDict
from typer.testing import CliRunner

from radfed.cli import app
from radfed.config import RunConfig
from radfed.federation.codes import ErrorCode
from radfed.federation.packing import pack
from radfed.privacy import read_entries, verify, weights_digest
from radfed.privacy.audit import serialize_content
from radfed.site.handlers import handle_evaluate, handle_query, handle_train
from radfed.tasks.classification import build_model
from tests.helpers import make_context, make_message, site_node, weights_of

CONFIG = RunConfig(image_size=32, local_epochs=1, batch_size=8, score_bins=1000, seed=3)


def _request(kind: str, server_round: int | str = 1) -> Message:
    content = RecordDict(
        {
            "arrays": pack(build_model(CONFIG).state_dict()),
            "config": ConfigRecord({"server-round": server_round}),
        }
    )
    return make_message(content, message_type=kind, src_node_id=0, dst_node_id=1)


def _audit(site: Path) -> list[dict[str, object]]:
    path = site / ".radfed" / "audit.jsonl"
    verify(path)
    return [entry.to_json() for entry in read_entries(path)]


def test_a_task_the_policy_does_not_allow_is_refused_with_a_code(site_copy: Path) -> None:
    node = site_node(site_copy, '[policy]\ntasks = ["segmentation"]\n')
    reply = handle_train(_request("train"), make_context(CONFIG.to_run_config(), node))
    assert reply.has_error() and reply.error.code == ErrorCode.POLICY
    reason = reply.error.reason or ""
    assert "segmentation" not in reason and "classification" not in reason
    (entry,) = _audit(site_copy)
    assert entry["kind"] == "error" and entry["error-code"] == ErrorCode.POLICY


def test_dp_policy_clips_the_update_whatever_the_run_asks(site_copy: Path) -> None:
    # Prepare: the site demands an update norm of at most 0.05 and no noise
    policy = "[policy.dp]\nclipping-norm = 0.05\nnoise-multiplier = 0.0\n"
    request = _request("train")
    layout = build_model(CONFIG).state_dict()
    sent_to_site = weights_of(request, layout)
    # Execute
    clipped = handle_train(
        request, make_context(CONFIG.to_run_config(), site_node(site_copy, policy))
    )
    free = handle_train(  # round 2: the site trains once a round
        _request("train", server_round=2),
        make_context(CONFIG.to_run_config(), site_node(site_copy, "")),
    )

    # Assert: without DP the update is far larger than the bound, with DP it is within it
    def norm(reply: Message) -> float:
        got = weights_of(reply, layout)
        deltas = [
            (got[k].double() - sent_to_site[k].double()).flatten()
            for k in got
            if got[k].is_floating_point()
        ]
        return float(torch.cat(deltas).norm())

    assert norm(free) > 0.5
    assert norm(clipped) <= 0.05 + 1e-6


def test_policy_min_cell_size_beats_the_run(site_copy: Path) -> None:
    config = RunConfig(**{**CONFIG.__dict__, "min_cell_size": 2, "extra": {}})
    node = site_node(site_copy, "[policy]\nmin-cell-size = 1000\n")
    reply = handle_evaluate(_request("evaluate"), make_context(config.to_run_config(), node))
    metrics = reply.content["metrics"]
    # every split is smaller than 1000 cases: all of it leaves only as suppressed
    assert all(metrics[f"{split}.suppressed"] == 1 for split in config.eval_splits)  # type: ignore[index]


def test_policy_subgroups_allow_list_filters_what_leaves(site_copy: Path) -> None:
    node = site_node(site_copy, '[policy]\nsubgroups = ["sex"]\n')
    reply = handle_evaluate(_request("evaluate"), make_context(CONFIG.to_run_config(), node))
    names = " ".join(str(v) for v in reply.content.config_records["cells"].values())
    assert "sex=" in names
    assert "age_band" not in names and "manufacturer" not in names


def test_a_reply_over_the_size_limit_is_withheld(site_copy: Path) -> None:
    node = site_node(site_copy, "[policy]\nmax-message-bytes = 1000\n")
    reply = handle_train(_request("train"), make_context(CONFIG.to_run_config(), node))
    assert reply.has_error() and reply.error.code == ErrorCode.POLICY


def test_every_reply_is_audited_with_what_was_asked_and_what_left(site_copy: Path) -> None:
    # Prepare
    context = make_context(CONFIG.to_run_config(), site_node(site_copy))
    requests = [_request("query"), _request("train", 2), _request("evaluate", 2)]

    # Execute
    replies = [
        handle_query(requests[0], context),
        handle_train(requests[1], context),
        handle_evaluate(requests[2], context),
    ]

    # Assert: one entry per reply, its size and digest those of the serialized content
    entries = _audit(site_copy)
    assert [e["kind"] for e in entries] == ["query", "train", "evaluate"]
    assert [e["round"] for e in entries] == [1, 2, 2]
    for entry, reply in zip(entries, replies, strict=True):
        sent = serialize_content(reply.content)
        assert entry["bytes"] == len(sent)
        assert entry["sha256"] == hashlib.sha256(sent).hexdigest()
    # what was asked: the kind, the run configuration's and the received weights' digests
    asked = [e["request"] for e in entries]
    assert isinstance(asked[1], dict) and isinstance(asked[2], dict)
    assert [a["kind"] for a in asked] == ["query", "train", "evaluate"]  # type: ignore[index]
    config = hashlib.sha256(
        json.dumps(CONFIG.to_run_config(), sort_keys=True, separators=(",", ":")).encode()
    ).hexdigest()
    assert {a["config-sha256"] for a in asked} == {config}  # type: ignore[index]
    received = weights_digest(requests[1].content["arrays"])  # type: ignore[arg-type]
    assert asked[1]["weights-sha256"] == asked[2]["weights-sha256"] == received
    assert asked[2]["eval-splits"] == list(CONFIG.eval_splits)
    assert asked[1]["message-config"] == {"server-round": 2}
    # what left: the released statistics themselves, the weights (packed: one byte array of
    # the model's size) by shape and digest only
    released = entries[2]["released"]
    assert isinstance(released, dict)
    assert released["metrics"] == dict(replies[2].content["metrics"].items())  # type: ignore[union-attr]
    assert (
        entries[1]["released"]["metrics"]["train-loss"]
        == replies[1].content["metrics"][  # type: ignore[index]
            "train-loss"
        ]
    )
    size = sum(t.numel() * t.element_size() for t in build_model(CONFIG).state_dict().values())
    assert entries[1]["records"]["arrays"] == {  # type: ignore[index]
        "type": "array",
        "arrays": [{"name": "packed", "shape": [size], "dtype": "uint8"}],
    }
    assert "arrays" not in entries[1]["released"]  # type: ignore[operator]
    assert str(site_copy) not in (site_copy / ".radfed" / "audit.jsonl").read_text()


def test_a_reply_the_audit_log_cannot_record_does_not_leave(site_copy: Path) -> None:
    context = make_context(CONFIG.to_run_config(), site_node(site_copy))
    assert not handle_query(_request("query"), context).has_error()
    log = site_copy / ".radfed" / "audit.jsonl"
    log.write_text(log.read_text()[:-20] + "\n")  # a torn last line: the chain cannot go on
    reply = handle_train(_request("train"), context)
    assert reply.has_error() and reply.error.code == ErrorCode.RADFED
    assert not reply.has_content()


def test_an_error_about_a_bad_run_setting_is_audited_too(site_copy: Path) -> None:
    # Prepare: a run naming a task this radfed does not have
    settings = {**CONFIG.to_run_config(), "task": "no-such-task"}

    # Execute
    reply = handle_train(_request("train"), make_context(settings, site_node(site_copy)))

    # Assert: an error code leaves, and the audit log records it
    assert reply.has_error() and reply.error.code == ErrorCode.CONFIG
    (entry,) = _audit(site_copy)
    assert entry["kind"] == "error" and entry["error-code"] == ErrorCode.CONFIG


def test_a_message_with_a_bad_round_is_refused_and_audited(site_copy: Path) -> None:
    context = make_context(CONFIG.to_run_config(), site_node(site_copy))

    bad: list[int | float | str] = [-3, "one", float("nan"), float("inf"), 2.5, 10**12]
    replies = [handle_train(_request("train", server_round=r), context) for r in bad]

    assert all(r.has_error() and r.error.code == ErrorCode.CONFIG for r in replies)
    entries = _audit(site_copy)
    assert [(e["kind"], e["round"]) for e in entries] == [("error", -1)] * len(bad)


@pytest.mark.parametrize("mu", [float("nan"), float("inf"), 1e30, -0.5])
def test_a_proximal_term_that_is_not_a_bounded_number_is_refused(
    site_copy: Path, mu: float
) -> None:
    message = _request("train")
    message.content.config_records["config"]["proximal-mu"] = mu

    reply = handle_train(message, make_context(CONFIG.to_run_config(), site_node(site_copy)))

    assert reply.has_error() and reply.error.code == ErrorCode.CONFIG
    (entry,) = _audit(site_copy)
    assert entry["kind"] == "error" and entry["round"] == 1


def test_the_audit_log_keeps_a_bounded_record_of_whatever_the_message_carries(
    site_copy: Path,
) -> None:
    # Prepare: a message whose own settings are huge, many, and of every type, the ones
    # the site reads sent last, after a hundred forged ones
    message = _request("query")
    settings: dict[str, Any] = {f"k{i:03d}": i for i in range(100)}
    settings.update({"note": "x" * 1_000_000, "blob": b"\0" * 1000, "values": [1.0, 2.0]})
    settings.update({"server-round": 1, "proximal-mu": 0.5})
    message.content.config_records["config"] = ConfigRecord(settings)

    # Execute
    reply = handle_query(message, make_context(CONFIG.to_run_config(), site_node(site_copy)))

    # Assert: recorded, in a line of a few KB; long or odd values as their digest
    assert not reply.has_error()
    line = (site_copy / ".radfed" / "audit.jsonl").read_text().splitlines()[-1]
    assert len(line) < 10_000
    (entry,) = _audit(site_copy)
    request = entry["request"]
    kept = request["message-config"]  # type: ignore[index]
    assert len(kept) == 32
    assert kept["server-round"] == 1 and kept["proximal-mu"] == 0.5
    assert request["message-config-more"] == 105 - 32  # type: ignore[index]
    assert len(request["message-config-sha256"]) == 64  # type: ignore[index]


def test_long_and_odd_settings_are_kept_as_their_digest(site_copy: Path) -> None:
    message = _request("query")
    config = message.content.config_records["config"]
    config["note"] = "x" * 1_000_000
    config["blob"] = b"\0" * 1000
    config["values"] = [1.0, 2.0]

    handle_query(message, make_context(CONFIG.to_run_config(), site_node(site_copy)))

    (entry,) = _audit(site_copy)
    kept = entry["request"]["message-config"]  # type: ignore[index]
    assert kept["note"].startswith("<str of 1000002 bytes, sha256 ")
    assert kept["blob"].startswith("<bytes of 1000 bytes, sha256 ")
    assert kept["values"].startswith("<list of ")
    assert "message-config-more" not in entry["request"]  # type: ignore[operator]


def test_dp_training_spends_the_sites_budget_and_sends_no_exact_loss(site_copy: Path) -> None:
    # Prepare: DP with a budget for two rounds of noise multiplier 10 (epsilon 0.69 after
    # two, 0.85 after three, at delta 1e-5)
    budget = "epsilon = 0.75\ndelta = 1e-5\n"
    policy = f"[policy.dp]\nclipping-norm = 1.0\nnoise-multiplier = 10.0\n{budget}"
    context = make_context(CONFIG.to_run_config(), site_node(site_copy, policy))

    # Execute: three rounds
    replies = [handle_train(_request("train", server_round=r), context) for r in (1, 2, 3)]

    # Assert: two rounds trained, the third refused before training; the loss is not
    # sent and the count leaves rounded to the site's k
    assert not replies[0].has_error() and not replies[1].has_error()
    assert replies[2].has_error() and replies[2].error.code == ErrorCode.POLICY
    metrics = replies[0].content["metrics"]
    assert metrics["train-loss"] == 0.0  # type: ignore[index]
    assert metrics["num-examples"] % 10 == 0  # type: ignore[index,operator]
    lines = (site_copy / ".radfed" / "privacy.jsonl").read_text().splitlines()
    assert len(lines) == 2
    shown = CliRunner().invoke(app, ["site", "audit", str(site_copy)])
    assert "differential privacy: 2 DP rounds, rho 0.01 (epsilon 0.689" in shown.output


@pytest.mark.parametrize(
    ("settings", "named"),
    [({"batch-size": 2, "local-steps": 1}, "batch-size 2"), ({"learning-rate": 50.0}, "50")],
)
def test_dp_refuses_the_crafted_runs_that_single_out_training_cases(
    site_copy: Path, settings: dict[str, object], named: str
) -> None:
    # a batch of 2 and one step made each round's update the gradient of two chosen cases
    policy = "[policy.dp]\nclipping-norm = 1.0\nnoise-multiplier = 1.0\n"
    run = {**CONFIG.to_run_config(), **settings}
    reply = handle_train(_request("train"), make_context(run, site_node(site_copy, policy)))  # type: ignore[arg-type]
    assert reply.has_error() and reply.error.code == ErrorCode.POLICY
    assert not (site_copy / ".radfed" / "privacy.jsonl").exists()  # nothing spent


def test_the_loss_of_fewer_than_k_training_cases_is_not_sent(site_copy: Path) -> None:
    # a batch of 2 and one step: the loss would give the labels of two cases every round
    run = {**CONFIG.to_run_config(), "batch-size": 2, "local-steps": 1}
    small = handle_train(_request("train"), make_context(run, site_node(site_copy)))
    usual = handle_train(
        _request("train", server_round=2),
        make_context(CONFIG.to_run_config(), site_node(site_copy)),
    )
    assert small.content["metrics"]["train-loss"] == 0.0  # type: ignore[index]
    assert usual.content["metrics"]["train-loss"] > 0.0  # type: ignore[index,operator]
