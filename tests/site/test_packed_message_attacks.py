"""A malicious server's packed weights against the real site handlers: refused with a code
before the site's data, budget or cache is touched, never run, audited as they arrived; the
site's policy limits come before any decoding; FedBN's normalisation layers never travel."""

from __future__ import annotations

import dataclasses
import io
import logging
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict

from radfed.config import RunConfig
from radfed.federation.codes import ErrorCode
from radfed.federation.packing import LAYOUT_KEY, PACKED, layout, pack, unpack
from radfed.federation.weights import local_keys, shared_state
from radfed.privacy import read_entries, weights_digest
from radfed.site.handlers import handle_evaluate, handle_train
from radfed.tasks.classification import build_model
from tests.helpers import make_context, make_message, site_node

CONFIG = RunConfig(image_size=32, local_epochs=1, batch_size=8, score_bins=1000, seed=3)


def _model_bytes(config: RunConfig = CONFIG, fedbn: bool = False) -> int:
    state = shared_state(build_model(config), fedbn)
    return sum(t.numel() * t.element_size() for t in state.values())


def _npy(shape: tuple[int, ...], descr: Any = "|u1", payload: bytes = b"") -> bytes:
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        buffer, {"descr": descr, "fortran_order": False, "shape": shape}
    )
    return buffer.getvalue() + payload


def _raw(data: bytes, stype: str = "numpy.ndarray") -> ArrayRecord:
    return ArrayRecord({PACKED: Array("uint8", (_model_bytes(),), stype, data)})


class _Pickled:
    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Callable[..., Any], tuple[str, str]]:
        return (open, (self.path, "w"))


def _nan_at_an_unaligned_float() -> ArrayRecord:
    """The model's own bytes with one float32 set to NaN bits, one that starts at an odd
    offset of the packed array's decoded bytes once sliced (the sender picks every byte)."""
    state = build_model(CONFIG).state_dict()
    flat = pack(state)[PACKED].numpy().copy()
    names = list(state)
    last_float = max(i for i, k in enumerate(names) if state[k].is_floating_point())
    offset = sum(state[k].numel() * state[k].element_size() for k in names[:last_float])
    flat[offset : offset + 4] = np.frombuffer(np.float32(np.nan).tobytes(), np.uint8)
    return ArrayRecord({PACKED: Array(flat)})


def _crafted(tmp: Path) -> dict[str, ArrayRecord]:
    size = _model_bytes()
    return {
        "declares-1-TiB": _raw(_npy((2**40,), payload=bytes(size))),
        "object-dtype": _raw(_npy((size,), "|O", bytes(size * 8))),
        "pickle": _raw(pickle.dumps(_Pickled(str(tmp / "pwned")))),
        "bool": _raw(_npy((size,), "|b1", bytes(size))),
        "float32-array": ArrayRecord({PACKED: Array(np.zeros(size // 4, dtype=np.float32))}),
        "stype-torch": _raw(bytes(size), stype="torch.raw"),
        "zero-length": _raw(_npy((0,))),
        "2-d": _raw(_npy((2, size // 2), payload=bytes(size))),
        "nan-bits": _nan_at_an_unaligned_float(),
        "inf-in-int-neighbour": _inf_next_to_the_int64_buffer(),
    }


def _inf_next_to_the_int64_buffer() -> ArrayRecord:
    state = build_model(CONFIG).state_dict()
    flat = pack(state)[PACKED].numpy().copy()
    flat[:4] = np.frombuffer(np.float32(np.inf).tobytes(), np.uint8)
    return ArrayRecord({PACKED: Array(flat)})


CRAFTED_NAMES = [
    "declares-1-TiB",
    "object-dtype",
    "pickle",
    "bool",
    "float32-array",
    "stype-torch",
    "zero-length",
    "2-d",
    "nan-bits",
    "inf-in-int-neighbour",
]


def _request(kind: str, arrays: ArrayRecord, server_round: int = 1) -> Message:
    content = RecordDict({"arrays": arrays, "config": ConfigRecord({"server-round": server_round})})
    return make_message(content, message_type=kind, src_node_id=0, dst_node_id=1)


def _never(what: str) -> Callable[..., Any]:
    def called(*_: object, **__: object) -> Any:
        raise AssertionError(f"{what} was reached")

    return called


#: A policy that spends: DP statistics, so a refusal that came after the site's admission
#: would leave its privacy ledger behind.
SPENDING_POLICY = "[policy.dp-statistics]\nnoise = 4.0\nepsilon = 10.0\n"


@pytest.mark.parametrize("handler", [handle_train, handle_evaluate], ids=["train", "evaluate"])
@pytest.mark.parametrize("name", CRAFTED_NAMES)
def test_crafted_weights_are_refused_with_a_code_before_the_sites_data_or_budget(
    site_copy: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    name: str,
    handler: Callable[[Message, Any], Message],
) -> None:
    # Prepare: reaching the site's data would fail the test (a code other than CONFIG)
    arrays = _crafted(tmp_path)[name]
    monkeypatch.setattr("radfed.site.handlers.load_site_once", _never("the site's data"))
    caplog.set_level(logging.INFO, logger="radfed")
    request = _request("train" if handler is handle_train else "evaluate", arrays)

    # Execute
    node = site_node(site_copy, SPENDING_POLICY)
    reply = handler(request, make_context(CONFIG.to_run_config(), node))

    # Assert: a code and nothing else leaves; no pickle ran; nothing of the data was read or
    # cached, no privacy spent; the audit log records the refusal with the digest of the
    # weights as they came
    assert reply.has_error() and reply.error.code == ErrorCode.CONFIG
    assert not reply.has_content()
    assert reply.error.reason == f"radfed site error {ErrorCode.CONFIG}"
    assert not (tmp_path / "pwned").exists()
    assert not list(site_copy.glob(".radfed/cache/*"))
    left = {p.relative_to(site_copy).as_posix() for p in site_copy.glob(".radfed/**/*")}
    assert not {p for p in left if "privacy" in p or "quer" in p or "ledger" in p}, left
    (entry,) = [e.to_json() for e in read_entries(site_copy / ".radfed" / "audit.jsonl")]
    assert entry["kind"] == "error" and entry["error-code"] == ErrorCode.CONFIG
    assert entry["request"]["weights-sha256"] == weights_digest(arrays)
    assert "Traceback" not in caplog.text and "pwned" not in caplog.text


def test_a_refusal_is_the_same_whatever_the_site_holds(site_copy: Path, tmp_path: Path) -> None:
    # Prepare: the same NaN-bearing weights to a site with data, and to one whose data
    # cannot even be listed (its manifest is gone)
    empty = tmp_path / "other" / "site-a"
    empty.mkdir(parents=True)
    arrays = _nan_at_an_unaligned_float()
    context = make_context
    # Execute
    codes = [
        handle_train(_request("train", arrays), context(CONFIG.to_run_config(), site_node(site)))
        for site in (site_copy, empty)
    ]
    # Assert: whether and how the work fails tells nothing about the data
    assert [r.error.code for r in codes] == [ErrorCode.CONFIG, ErrorCode.CONFIG]


def test_weights_past_the_inbound_limit_are_refused_before_they_are_decoded(
    site_copy: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: a header that declares exactly the model's size, the bytes padded past the
    # site's inbound-bytes limit (only the declared bytes would be decoded)
    size = _model_bytes()
    honest = pack(build_model(CONFIG).state_dict())[PACKED].data
    arrays = _raw(honest + bytes(2 * size))
    monkeypatch.setattr("radfed.site.handlers.unpack", _never("decoding"))
    node = site_node(site_copy, f"[policy.limits]\ninbound-bytes = {2 * size}\n")

    # Execute
    reply = handle_train(_request("train", arrays), make_context(CONFIG.to_run_config(), node))

    # Assert: the policy's code, not a decode error
    assert reply.has_error() and reply.error.code == ErrorCode.LIMIT


def test_the_model_size_limit_comes_before_the_model_is_built_or_weights_decoded(
    site_copy: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: a run whose model is above the site's model-parameters limit, with weights
    # that fit the inbound limit (a 1-TiB header over a few bytes)
    monkeypatch.setattr("radfed.site.handlers.unpack", _never("decoding"))
    arrays = _raw(_npy((2**40,), payload=b"\x00" * 64))
    node = site_node(site_copy, "[policy.limits]\nmodel-parameters = 1000\n")

    # Execute
    reply = handle_train(_request("train", arrays), make_context(CONFIG.to_run_config(), node))

    # Assert
    assert reply.has_error() and reply.error.code == ErrorCode.LIMIT


def test_fedbn_normalisation_layers_neither_arrive_nor_leave(site_copy: Path) -> None:
    # Prepare: the server's FedBN message holds the shared weights only, packed
    config = dataclasses.replace(CONFIG, fedbn=True)
    model = build_model(config)
    assert local_keys(model)  # the default classifier has batch normalisation
    shared = shared_state(model, True)
    context = make_context(config.to_run_config(), site_node(site_copy))

    # Execute: the shared weights, and the full state (norm layers too) a server could send
    reply = handle_train(_request("train", pack(shared)), context)
    full = handle_train(_request("train", pack(model.state_dict()), 2), context)

    # Assert: the reply is exactly the shared weights' bytes, in the server's order (it
    # unpacks against the server's own FedBN layout); the full state does not fit
    assert not reply.has_error()
    sent = reply.content["arrays"]
    assert isinstance(sent, ArrayRecord) and list(sent.keys()) == [PACKED]
    assert sent[PACKED].shape == (_model_bytes(config, fedbn=True),)
    assert _model_bytes(config, fedbn=True) < _model_bytes(config)
    got = unpack(sent, shared).to_torch_state_dict()
    assert list(got) == list(shared) and not set(got) & local_keys(model)
    assert all(torch.isfinite(v).all() for v in got.values() if v.is_floating_point())
    assert full.has_error() and full.error.code == ErrorCode.CONFIG


def _with_layout(arrays: ArrayRecord, packed_by: object) -> Message:
    request = _request("train", arrays)
    request.content.config_records["config"][LAYOUT_KEY] = packed_by  # type: ignore[assignment]
    return request


def test_weights_packed_for_another_layout_of_the_same_size_are_refused_by_name(
    site_copy: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # Prepare: a server whose model has this site's byte size but another layout (its
    # tensors in another order: another torch or MONAI version building it), packed and
    # named as radfed's server does; and, as the control, this site's own layout
    state = build_model(CONFIG).state_dict()
    other = dict(reversed(list(state.items())))
    assert sum(t.numel() * t.element_size() for t in other.values()) == _model_bytes()
    context = make_context(CONFIG.to_run_config(), site_node(site_copy))
    caplog.set_level(logging.INFO, logger="radfed")

    # Execute
    control = handle_train(_with_layout(pack(state), layout(state)), context)
    monkeypatch.setattr("radfed.site.handlers.load_site_once", _never("the site's data"))
    refused = handle_train(_with_layout(pack(other), layout(other)), context)

    # Assert: the same bytes count, yet refused before the site's data, saying why
    assert not control.has_error()
    assert refused.has_error() and refused.error.code == ErrorCode.CONFIG
    assert "another layout of the model" in caplog.text
    assert "same radfed, torch and MONAI versions" in caplog.text


@pytest.mark.parametrize("packed_by", [7, "x" * 65], ids=["a-number", "too-long"])
def test_a_layout_that_is_not_a_short_text_is_refused(
    site_copy: Path, monkeypatch: pytest.MonkeyPatch, packed_by: object
) -> None:
    monkeypatch.setattr("radfed.site.handlers.load_site_once", _never("the site's data"))
    context = make_context(CONFIG.to_run_config(), site_node(site_copy))
    state = build_model(CONFIG).state_dict()
    reply = handle_train(_with_layout(pack(state), packed_by), context)
    assert reply.has_error() and reply.error.code == ErrorCode.CONFIG
