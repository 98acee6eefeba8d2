"""The site's handlers, called directly: what they reply, and that nothing identifying leaves."""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
from collections.abc import Callable
from pathlib import Path

import pydicom
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict

from radfed.config import RunConfig
from radfed.errors import ConfigError
from radfed.federation.codes import ErrorCode
from radfed.federation.packing import PACKED, pack
from radfed.federation.schema import unpack_cells
from radfed.metrics.cells import SMALL_GROUPS
from radfed.site.handlers import handle_evaluate, handle_train
from radfed.site.node import resolve_site
from radfed.tasks.classification import TASK, build_model
from tests.helpers import make_context, make_message, weights_of

CONFIG = RunConfig(image_size=32, local_epochs=1, batch_size=8, score_bins=1000, seed=3)


def _request(kind: str, server_round: int = 1) -> Message:
    model = build_model(CONFIG)
    content = RecordDict(
        {
            "arrays": pack(model.state_dict()),
            "config": ConfigRecord({"server-round": server_round}),
        }
    )
    return make_message(content, message_type=kind, src_node_id=0, dst_node_id=1)


def _deployed(site: Path) -> dict[str, bool | float | int | str]:
    return {"site-name": "site-a", "data-path": str(site)}


def test_train_reply_carries_updated_weights_and_counts_only(site_copy: Path) -> None:
    # Execute
    reply = handle_train(
        _request("train"), make_context(CONFIG.to_run_config(), _deployed(site_copy))
    )
    # Assert
    assert not reply.has_error()
    assert list(reply.content["arrays"].keys()) == [PACKED]  # type: ignore[union-attr]
    initial = build_model(CONFIG).state_dict()
    sent = weights_of(reply, initial)
    assert list(sent) == list(initial)
    assert any(
        not torch.equal(sent[k], initial[k]) for k in initial if initial[k].is_floating_point()
    )
    metrics = reply.content["metrics"]
    assert set(metrics.keys()) == {"num-examples", "train-loss"}  # type: ignore[union-attr]
    assert metrics["num-examples"] > 0  # type: ignore[index]
    assert reply.content["site"]["name"] == "site-a"  # type: ignore[index]


def test_evaluate_reply_holds_statistics_and_nothing_identifying(site_copy: Path) -> None:
    # Prepare: every identifying value the site holds
    with (site_copy / "manifest.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    secrets = {str(site_copy)}
    for row in rows:
        ds = pydicom.dcmread(site_copy / row["image"], stop_before_pixels=True)
        secrets |= {
            row["patient_id"],
            row["image"],
            str(ds.PatientName),
            ds.PatientAge,
            ds.Manufacturer,
        }
    # Execute: subgroups named by normalised sex and age band only (no manufacturer)
    config = dataclasses.replace(CONFIG, subgroups=("sex", "age_band", "sex*age_band"))
    reply = handle_evaluate(
        _request("evaluate"), make_context(config.to_run_config(), _deployed(site_copy))
    )
    # Assert: the statistics parse against the schema, counts match the site
    assert not reply.has_error()
    assert not reply.content.array_records
    cells = unpack_cells(
        TASK,
        reply.content["metrics"],  # type: ignore[arg-type]
        reply.content.config_records["cells"],
        config,
    )
    stats = {split: parts[0].stats for split, parts in cells.items()}
    assert sum(s.n for s in stats.values()) < len(rows)  # the sealed test split was not evaluated
    assert {c.attribute for parts in cells.values() for c in parts} == {
        "all",
        "sex",
        "age_band",
        "sex*age_band",
    }
    # Assert: no string leaves except the site identity, and it holds no secret
    strings = [str(v) for record in reply.content.config_records.values() for v in record.values()]
    strings += [k for record in reply.content.metric_records.values() for k in record]
    assert not [s for s in strings for secret in filter(None, secrets) if secret in s]
    for record in reply.content.metric_records.values():
        for key, value in record.items():
            if key.endswith(".noise-variance"):  # the policy's noise (none here), not data
                assert value == 0.0
                continue
            if key.endswith((".auc-v10-sq", ".auc-v01-sq")):  # sums over a cell's cases
                assert isinstance(value, float) and value >= 0
                continue
            assert isinstance(value, int | list), "only counts and sums leave a site"


def test_site_failure_replies_with_a_code_not_the_exception_text(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Prepare: a site folder without manifest
    site = tmp_path / "hospital-x" / "secret-folder"
    site.mkdir(parents=True)
    caplog.set_level(logging.INFO, logger="radfed")
    # Execute
    reply = handle_train(
        _request("train"),
        make_context(CONFIG.to_run_config(), {"site-name": "x", "data-path": str(site)}),
    )
    # Assert
    assert reply.has_error()
    assert reply.error.code == ErrorCode.DATA
    assert "secret-folder" not in (reply.error.reason or "") and "manifest" not in (
        reply.error.reason or ""
    )
    assert "no manifest.csv" in caplog.text  # the site administrator still learns why
    assert str(tmp_path) not in caplog.text


def test_unexpected_failure_is_withheld(
    site_copy: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: loading the weights fails with a text that names a secret (a fault injected:
    # the site's own model decides every shape, so no message makes the load fail)
    def fail(*_: object) -> None:
        raise RuntimeError(f"secret {site_copy}")

    monkeypatch.setattr("radfed.site.handlers.load_global", fail)
    # Execute
    reply = handle_train(
        _request("train"), make_context(CONFIG.to_run_config(), _deployed(site_copy))
    )
    # Assert
    assert reply.has_error() and reply.error.code == ErrorCode.UNEXPECTED
    assert "RuntimeError" in caplog.text and "message withheld" in caplog.text
    assert "secret" not in (reply.error.reason or "") and "secret" not in caplog.text


def _one_byte_short() -> ArrayRecord:
    flat = pack(build_model(CONFIG).state_dict())[PACKED].numpy()
    return ArrayRecord({PACKED: Array(flat[:-1])})


@pytest.mark.parametrize(
    "arrays",
    [
        pytest.param(_one_byte_short, id="one-byte-short"),
        pytest.param(lambda: ArrayRecord(build_model(CONFIG).state_dict()), id="named"),
        pytest.param(lambda: ArrayRecord({"wrong": torch.zeros(1)}), id="other-names"),
    ],
)
def test_weights_not_packed_for_the_sites_model_are_refused(
    site_copy: Path, caplog: pytest.LogCaptureFixture, arrays: Callable[[], ArrayRecord]
) -> None:
    # Prepare
    request = _request("train")
    request.content["arrays"] = arrays()
    caplog.set_level(logging.INFO, logger="radfed")
    # Execute
    reply = handle_train(request, make_context(CONFIG.to_run_config(), _deployed(site_copy)))
    # Assert: refused as a setting that does not fit the site, before any data was read;
    # the site's log says why, naming sizes, never a value
    assert reply.has_error() and reply.error.code == ErrorCode.CONFIG
    assert "the received weights do not fit this site's model" in caplog.text
    assert "wrong" not in (reply.error.reason or "")
    assert not list(site_copy.glob(".radfed/cache/*"))


def test_simulated_nodes_map_to_sorted_site_folders(synth_root: Path) -> None:
    config = RunConfig(data_root=str(synth_root))
    assert resolve_site({"partition-id": 1, "num-partitions": 3}, config) == (
        "site-b",
        synth_root / "site-b",
    )
    with pytest.raises(ConfigError, match="2 nodes but data-root holds 3"):
        resolve_site({"partition-id": 0, "num-partitions": 2}, config)
    with pytest.raises(ConfigError, match="data-root"):
        resolve_site({"partition-id": 0, "num-partitions": 3}, RunConfig())
    with pytest.raises(ConfigError, match="node config names no site"):
        resolve_site({}, config)


def test_sealed_test_split_is_evaluated_once_per_run_at_its_end_and_counted(
    site_copy: Path,
) -> None:
    uses = site_copy / ".radfed" / "test_uses.json"
    context = make_context(CONFIG.to_run_config(), _deployed(site_copy))
    handle_evaluate(_request("evaluate"), context)
    assert not uses.exists()
    asking = dataclasses.replace(CONFIG, eval_splits=("val", "test"), num_server_rounds=3)
    context = make_context(asking.to_run_config(), _deployed(site_copy))

    early = handle_evaluate(_request("evaluate", server_round=2), context)
    last = handle_evaluate(_request("evaluate", server_round=3), context)
    again = handle_evaluate(_request("evaluate", server_round=3), context)

    # Assert: before the last round and a second time, the default policy refuses; the one
    # evaluation is counted
    assert early.has_error() and early.error.code == ErrorCode.POLICY
    assert not last.has_error() and "test.tp" in last.content["metrics"]  # type: ignore[operator]
    assert again.has_error() and again.error.code == ErrorCode.POLICY
    document = json.loads(uses.read_text())
    assert [u["round"] for u in document["uses"]] == [3]


def test_deployed_node_must_name_its_site(site_copy: Path) -> None:
    reply = handle_train(
        _request("train"), make_context(CONFIG.to_run_config(), {"data-path": str(site_copy)})
    )
    assert reply.has_error() and reply.error.code == ErrorCode.CONFIG


def test_what_leaves_holds_no_cell_below_k_and_no_single_case_bin(site_copy: Path) -> None:
    # Prepare: the run asks for k=3, the site's own policy demands k=4
    config = dataclasses.replace(CONFIG, min_cell_size=3, score_bins=1000)
    (site_copy / "site-policy.toml").write_text("[policy]\nmin-cell-size = 4\n")
    context = make_context(config.to_run_config(), _deployed(site_copy))
    # Execute
    reply = handle_evaluate(_request("evaluate"), context)
    # Assert
    record = reply.content["metrics"]
    names = reply.content.config_records["cells"]
    cells = unpack_cells(TASK, record, names, config)  # type: ignore[arg-type]
    checked = 0
    for split, parts in cells.items():
        for cell in parts:  # every subgroup cell, not only the whole split
            s = cell.stats
            if s.suppressed:
                assert s.n == 0 and cell.positives == 0
                continue
            checked += 1
            assert s.n >= 4, (split, cell.attribute, cell.group)
            totals = [p + q for p, q in zip(s.pos_hist, s.neg_hist, strict=True)]
            # merged apart on each side of the threshold; a side of fewer than k is one bin
            sides = ((totals[:500], s.tn + s.fn), (totals[500:], s.tp + s.fp))
            for side, whole in sides:
                assert all(t == 0 or t >= 4 or t == whole for t in side), (split, cell.group)
    assert checked > len(cells)  # subgroup cells were sent, not only the splits
    # a small group is named only when its vocabulary is closed (sex, age band) or pooled
    for parts in cells.values():
        for cell in parts:
            if cell.stats.suppressed and cell.attribute not in {"all", "sex", "age_band"}:
                assert cell.attribute == "sex*age_band" or cell.group == SMALL_GROUPS, cell
    everything = CONFIG.to_run_config() | {"min-cell-size": 10_000}
    suppressed = handle_evaluate(
        _request("evaluate", server_round=2), make_context(everything, _deployed(site_copy))
    )
    values = suppressed.content["metrics"]
    assert all(values[f"{split}.suppressed"] == 1 for split in CONFIG.eval_splits)  # type: ignore[index]
    assert values["num-examples"] == 0  # type: ignore[index]


def test_the_held_out_site_evaluates_but_never_trains(site_copy: Path) -> None:
    # Prepare
    config = dataclasses.replace(CONFIG, holdout_site="site-a")
    context = make_context(config.to_run_config(), _deployed(site_copy))
    # Execute
    trained = handle_train(_request("train"), context)
    evaluated = handle_evaluate(_request("evaluate"), context)
    # Assert: no weights leave the held-out site; its statistics do
    assert trained.has_error() and trained.error.code == ErrorCode.HELD_OUT
    assert not evaluated.has_error() and "metrics" in evaluated.content.metric_records


@pytest.mark.parametrize("kind, factor", [("sign-flip", -4.0), ("scale", 10.0)])
def test_a_simulated_site_named_by_the_attack_sends_a_poisoned_update(
    site_copy: Path, kind: str, factor: float
) -> None:
    # Prepare: the same training as a simulated node (partition 0 of the data root) and as
    # a deployed node, both named by the run's attack
    plain = dataclasses.replace(CONFIG, data_root=str(site_copy.parent))
    config = dataclasses.replace(plain, attack=f"site-a:{kind}")
    simulated = {"partition-id": 0, "num-partitions": 1}
    request = _request("train")
    layout = build_model(CONFIG).state_dict()
    initial = weights_of(request, layout)

    # Execute
    honest = handle_train(request, make_context(plain.to_run_config(), simulated))
    poisoned = handle_train(_request("train"), make_context(config.to_run_config(), simulated))
    deployed = handle_train(
        _request("train"), make_context(config.to_run_config(), _deployed(site_copy))
    )

    # Assert: the simulated site sent the global model plus factor x its honest change; a
    # deployed site ignores what the server's run config asks and sends its honest update
    sent = {
        name: weights_of(reply, layout)
        for name, reply in (("honest", honest), ("poisoned", poisoned), ("deployed", deployed))
    }
    for key, value in initial.items():
        if value.is_floating_point():
            change = sent["honest"][key] - value
            torch.testing.assert_close(sent["poisoned"][key], value + factor * change)
        torch.testing.assert_close(sent["deployed"][key], sent["honest"][key])
    assert any(
        not torch.equal(sent["poisoned"][k], sent["honest"][k])
        for k in initial
        if initial[k].is_floating_point()
    )


def test_an_attack_is_a_site_and_a_known_kind() -> None:
    with pytest.raises(ConfigError, match="'attack' must be SITE:KIND"):
        RunConfig(attack="site-a:sign-flop")
    with pytest.raises(ConfigError, match="'attack' must be SITE:KIND"):
        RunConfig(attack=":scale")
