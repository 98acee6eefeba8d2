"""The site's own policy, enforced by its handlers whatever the run asks, and the audit log
of every reply that leaves."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict

from radfed.config import RunConfig
from radfed.federation.codes import ErrorCode
from radfed.privacy import read_entries, verify
from radfed.privacy.audit import serialize_content
from radfed.site.handlers import handle_evaluate, handle_query, handle_train
from radfed.tasks.classification import build_model
from tests.helpers import make_context, make_message

CONFIG = RunConfig(image_size=32, local_epochs=1, batch_size=8, score_bins=100, seed=3)


def _request(kind: str, server_round: int = 1) -> Message:
    content = RecordDict(
        {
            "arrays": ArrayRecord(build_model(CONFIG).state_dict()),
            "config": ConfigRecord({"server-round": server_round}),
        }
    )
    return make_message(content, message_type=kind, src_node_id=0, dst_node_id=1)


def _node(site: Path, policy: str | None = None) -> dict[str, bool | float | int | str]:
    node: dict[str, bool | float | int | str] = {"site-name": "site-a", "data-path": str(site)}
    if policy is not None:
        path = site.parent / "site-policy.toml"
        path.write_text(policy)
        node["policy-path"] = str(path)
    return node


def _audit(site: Path) -> list[dict[str, object]]:
    path = site / ".radfed" / "audit.jsonl"
    verify(path)
    return [entry.to_json() for entry in read_entries(path)]


def test_a_task_the_policy_does_not_allow_is_refused_with_a_code(site_copy: Path) -> None:
    node = _node(site_copy, '[policy]\ntasks = ["segmentation"]\n')
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
    sent_to_site = request.content["arrays"].to_torch_state_dict()  # type: ignore[union-attr]
    # Execute
    clipped = handle_train(request, make_context(CONFIG.to_run_config(), _node(site_copy, policy)))
    free = handle_train(
        _request("train"), make_context(CONFIG.to_run_config(), _node(site_copy, ""))
    )

    # Assert: without DP the update is far larger than the bound, with DP it is within it
    def norm(reply: Message) -> float:
        got = reply.content["arrays"].to_torch_state_dict()  # type: ignore[union-attr]
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
    node = _node(site_copy, "[policy]\nmin-cell-size = 1000\n")
    reply = handle_evaluate(_request("evaluate"), make_context(config.to_run_config(), node))
    metrics = reply.content["metrics"]
    # every split is smaller than 1000 cases: all of it leaves only as suppressed
    assert all(metrics[f"{split}.suppressed"] == 1 for split in config.eval_splits)  # type: ignore[index]


def test_policy_subgroups_allow_list_filters_what_leaves(site_copy: Path) -> None:
    node = _node(site_copy, '[policy]\nsubgroups = ["sex"]\n')
    reply = handle_evaluate(_request("evaluate"), make_context(CONFIG.to_run_config(), node))
    names = " ".join(str(v) for v in reply.content.config_records["cells"].values())
    assert "sex=" in names
    assert "age_band" not in names and "manufacturer" not in names


def test_a_reply_over_the_size_limit_is_withheld(site_copy: Path) -> None:
    node = _node(site_copy, "[policy]\nmax-message-bytes = 1000\n")
    reply = handle_train(_request("train"), make_context(CONFIG.to_run_config(), node))
    assert reply.has_error() and reply.error.code == ErrorCode.POLICY


def test_every_reply_is_audited_with_names_and_sizes_never_values(site_copy: Path) -> None:
    context = make_context(CONFIG.to_run_config(), _node(site_copy))
    replies = [
        handle_query(_request("query"), context),
        handle_train(_request("train", server_round=2), context),
        handle_evaluate(_request("evaluate", server_round=2), context),
    ]
    entries = _audit(site_copy)
    assert [e["kind"] for e in entries] == ["query", "train", "evaluate"]
    assert [e["round"] for e in entries] == [1, 2, 2]
    for entry, reply in zip(entries, replies, strict=True):
        assert entry["bytes"] == len(serialize_content(reply.content))
    train = entries[1]["records"]
    assert isinstance(train, dict)
    text = (site_copy / ".radfed" / "audit.jsonl").read_text()
    loss = replies[1].content["metrics"]["train-loss"]  # type: ignore[index]
    assert repr(loss) not in text and str(site_copy) not in text
    assert "train-loss" in text
    layer = next(iter(build_model(CONFIG).state_dict()))
    assert layer in json.dumps(train)


def test_a_reply_the_audit_log_cannot_record_does_not_leave(site_copy: Path) -> None:
    context = make_context(CONFIG.to_run_config(), _node(site_copy))
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
    reply = handle_train(_request("train"), make_context(settings, _node(site_copy)))

    # Assert: an error code leaves, and the audit log records it
    assert reply.has_error() and reply.error.code == ErrorCode.CONFIG
    (entry,) = _audit(site_copy)
    assert entry["kind"] == "error" and entry["error-code"] == ErrorCode.CONFIG
