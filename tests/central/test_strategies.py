"""Strategies beyond FedAvg: FedProx at the site, FedBN's local layers, server optimisers."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAdam, FedAvgM
from flwr.supercore.task_identity import TaskIdentity

from radfed.central.run_folder import RunFolder
from radfed.central.strategy import STRATEGIES, make_strategy
from radfed.config import RunConfig, TaskName
from radfed.errors import ConfigError
from radfed.federation.identity import SiteIdentity
from radfed.federation.packing import LAYOUT_KEY, PACKED, layout, pack, unpack
from radfed.federation.weights import check_fedbn, local_keys, shared_state
from radfed.site.handlers import handle_evaluate, handle_train
from radfed.tasks import get_task
from radfed.tasks.classification import build_model
from tests.helpers import make_context, make_message, weights_of

CONFIG = RunConfig(
    image_size=32, local_epochs=1, batch_size=8, score_bins=1000, seed=3, min_sites=1
)


def _request(
    config: RunConfig, arrays: ArrayRecord, kind: str = "train", run_id: int = 1, **settings: float
) -> object:
    content = RecordDict(
        {"arrays": arrays, "config": ConfigRecord({"server-round": 1, **settings})}
    )
    return make_message(content, message_type=kind, src_node_id=0, dst_node_id=1, run_id=run_id)


def _site(path: Path, name: str) -> dict[str, bool | float | int | str]:
    return {"site-name": name, "data-path": str(path)}


def test_fedprox_term_keeps_the_local_update_closer_to_the_global_model(site_copy: Path) -> None:
    # Prepare
    model = build_model(CONFIG)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    context = make_context(CONFIG.to_run_config(), _site(site_copy, "site-a"))

    def drift(run_id: int, **settings: float) -> float:  # one run each: a run trains once a round
        request = _request(CONFIG, pack(start), run_id=run_id, **settings)
        reply = handle_train(request, context)  # type: ignore[arg-type]
        assert not reply.has_error()
        sent = weights_of(reply, start)
        return float(
            sum(((sent[k] - start[k]) ** 2).sum() for k in start if start[k].is_floating_point())
        )

    # Execute: same data, same seed; only the proximal weight differs
    plain, proximal = drift(1), drift(2, **{"proximal-mu": 50.0})
    # Assert
    assert proximal != plain
    assert proximal < plain


def test_fedbn_keeps_each_sites_normalisation_layers(synth_root: Path, tmp_path: Path) -> None:
    # Prepare: two sites, FedBN on
    import shutil

    config = dataclasses.replace(CONFIG, fedbn=True)
    sites = {}
    for name in ("site-a", "site-b"):
        shutil.copytree(synth_root / name, tmp_path / name)
        sites[name] = tmp_path / name
    model = build_model(config)
    private = local_keys(model)
    assert {"bn1.running_mean", "bn1.weight", "bn1.num_batches_tracked"} <= private
    assert not any(k.startswith("conv1.") or k.startswith("fc.") for k in private)
    global_state = shared_state(model, fedbn=True)
    assert not set(global_state) & private
    # Execute: a round at each site, then a second round from the same global weights
    replies = {}
    for name, path in sites.items():
        context = make_context(config.to_run_config(), _site(path, name))
        replies[name] = handle_train(_request(config, pack(global_state)), context)  # type: ignore[arg-type]
    # Assert: nothing of the normalisation layers was sent (the packed bytes hold exactly
    # the shared layers), and the server aggregates the replies over those layers
    for reply in replies.values():
        assert not reply.has_error()
        assert set(weights_of(reply, global_state)) == set(global_state)  # type: ignore[arg-type]
    strategy = make_strategy(config, global_state, RunFolder.start(tmp_path / "run", config))
    aggregated, _ = strategy.aggregate_train(1, list(replies.values()))  # type: ignore[arg-type]
    assert aggregated is not None and list(aggregated.keys()) == list(global_state)
    stored = {
        name: torch.load(next((path / ".radfed" / "fedbn").glob("*.pt")), weights_only=True)
        for name, path in sites.items()
    }
    running = [k for k in private if k.endswith("running_mean")]
    assert running and any(
        not torch.equal(stored["site-a"][k], stored["site-b"][k]) for k in running
    )
    # and evaluating with the global weights uses (and keeps) each site's own statistics
    for name, path in sites.items():
        context = make_context(config.to_run_config(), _site(path, name))
        assert not handle_evaluate(
            _request(config, pack(global_state), "evaluate"), context
        ).has_error()  # type: ignore[arg-type]
        after = torch.load(next((path / ".radfed" / "fedbn").glob("*.pt")), weights_only=True)
        assert all(torch.equal(after[k], stored[name][k]) for k in running)


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_every_strategy_aggregates_checked_updates_and_keeps_integer_buffers(
    name: str, tmp_path: Path
) -> None:
    config = dataclasses.replace(CONFIG, strategy=name, robust_f=0)  # Bulyan: 4 f + 3 sites
    reference = {"w": torch.zeros(3), "bn.num_batches_tracked": torch.tensor(0)}
    strategy = make_strategy(config, reference, RunFolder.start(tmp_path / "run", config))
    # what configure_train records for server optimisers (FedOpt: NumPy arrays; FedAvgM: a record)
    if isinstance(strategy, FedAvgM):
        strategy.current_arrays = ArrayRecord(reference)
    elif hasattr(strategy, "current_arrays"):
        strategy.current_arrays = {k: v.numpy() for k, v in reference.items()}
    replies = []
    for node, (site, w) in enumerate((("site-a", 1.0), ("site-b", 3.0), ("site-c", 2.0)), start=1):
        content = RecordDict(
            {
                "arrays": pack(
                    {"w": torch.full((3,), w), "bn.num_batches_tracked": torch.tensor(7)}
                ),
                "metrics": MetricRecord({"num-examples": 10, "train-loss": 0.5}),
                "site": SiteIdentity.local(site).to_record(),
            }
        )
        replies.append(make_message(content, message_type="train", src_node_id=node))
    arrays, _ = strategy.aggregate_train(1, replies)
    assert arrays is not None
    state = arrays.to_torch_state_dict()
    assert state["bn.num_batches_tracked"].dtype == torch.int64
    assert float(state["w"][0]) > 0  # moved towards the sites' weights
    if name in ("fedavg", "fedprox"):
        assert torch.allclose(state["w"], torch.full((3,), 2.0))


def test_fedbn_is_refused_for_a_model_without_normalisation_state() -> None:
    # Prepare: the default U-Net normalises per instance, with no weights or statistics
    unet = get_task("segmentation").build_model(RunConfig(task=TaskName.SEGMENTATION))
    cnn = get_task("classification").build_model(RunConfig())

    # Execute / Assert: FedBN there would be FedAvg under another name
    with pytest.raises(ConfigError, match=r"fedbn=true .* 'unet' has none"):
        check_fedbn(unet, "unet")
    check_fedbn(cnn, "cnn")  # batch normalisation: accepted


class _Nodes:
    """Flower's grid as far as a strategy's ``configure_*`` uses it: three connected nodes."""

    def get_node_ids(self) -> list[int]:
        return [11, 12, 13]


@pytest.mark.parametrize("name", ["fedavg", "fedadam", "fedavgm"])
def test_a_phases_messages_share_one_packed_array_of_the_global_model(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: the default classification model (77 tensors, int64 buffers among them), in
    # a process with a ServerApp's identity (Flower sets it before messages are created)
    for attr in ("_task_id", "_run_id", "_node_id"):
        monkeypatch.setattr(TaskIdentity, attr, 1)
    config = dataclasses.replace(CONFIG, strategy=name)
    model = build_model(config)
    reference = model.state_dict()
    strategy = make_strategy(config, reference, RunFolder.start(tmp_path / "run", config))
    arrays = ArrayRecord(reference)

    # Execute
    train = list(strategy.configure_train(1, arrays, ConfigRecord({}), _Nodes()))  # type: ignore[arg-type]
    evaluate = list(strategy.configure_evaluate(1, arrays, ConfigRecord({}), _Nodes()))  # type: ignore[arg-type]

    # Assert: one Array per message, the same record in every message of the phase, and
    # it unpacks to the global model; the server optimiser keeps the named model
    assert len(reference) > 50
    for messages in (train, evaluate):
        assert sorted(m.metadata.dst_node_id for m in messages) == [11, 12, 13]
        packed = messages[0].content["arrays"]
        assert isinstance(packed, ArrayRecord) and list(packed.keys()) == [PACKED]
        assert len(packed) == 1
        assert all(m.content["arrays"] is packed for m in messages)
        got = unpack(packed, reference).to_torch_state_dict()
        assert all(torch.equal(got[k], v) and got[k].dtype == v.dtype for k, v in reference.items())
        # each message names the layout it was packed by: the receiving model's
        assert {m.content["config"][LAYOUT_KEY] for m in messages} == {layout(reference)}  # type: ignore[index]
    assert train[0].content["config"]["server-round"] == 1  # type: ignore[index]
    current = getattr(strategy, "current_arrays", None)
    if isinstance(strategy, FedAdam | FedAvgM):
        assert current is not None and list(current.keys()) == list(reference)
