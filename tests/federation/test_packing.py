"""Weights on the wire: one packed byte array, read back only by the receiver's own model."""

from __future__ import annotations

import tracemalloc
from collections.abc import Callable

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord

from radfed.config import RunConfig, TaskName
from radfed.errors import ConfigError
from radfed.federation.codes import InvalidReply
from radfed.federation.packing import PACKED, layout, pack, unpack
from radfed.tasks import get_task

LAYOUT = {
    "w": torch.arange(6, dtype=torch.float32).reshape(2, 3),
    "h": torch.ones(3, dtype=torch.float16),  # 6 bytes: the int64 after it is unaligned
    "n": torch.tensor(7),  # a 0-d int64 buffer (num_batches_tracked)
}
SIZE = 24 + 6 + 8


def _flat() -> np.ndarray:
    return pack(LAYOUT)[PACKED].numpy()


@pytest.mark.parametrize("name", ["classification", "segmentation", "detection"])
def test_each_tasks_model_travels_as_one_array_and_comes_back_identical(name: str) -> None:
    # Prepare: the task's real model, and the receiver's own fresh copy of it as the layout
    config = RunConfig(task=TaskName(name))
    state = get_task(name).build_model(config).state_dict()
    layout = get_task(name).build_model(config).state_dict()
    size = sum(t.numel() * t.element_size() for t in state.values())

    # Execute
    packed = pack(state)
    got = unpack(packed, layout).to_torch_state_dict()

    # Assert: one 1-D uint8 array of the model's bytes; the same tensors, in the same order
    assert list(packed.keys()) == [PACKED] and len(packed) == 1
    assert packed[PACKED].dtype == "uint8" and packed[PACKED].shape == (size,)
    assert list(got) == list(state)
    for key, value in state.items():
        assert got[key].dtype == value.dtype and got[key].shape == value.shape, key
        assert torch.equal(got[key], value), key
    if name == "classification":  # batch normalisation's int64 counters travel too
        assert any(v.dtype == torch.int64 for v in state.values())
    # the server packs its named global ArrayRecord: the same bytes
    assert pack(ArrayRecord(state))[PACKED].data == packed[PACKED].data
    # the Arrays are byte for byte those Flower builds from the arrays (np.save's)
    raw = np.concatenate([v.numpy().reshape(-1).view(np.uint8) for v in state.values()])
    assert packed[PACKED].data == Array(raw).data
    for key, array in unpack(packed, layout).items():
        assert array == Array(state[key].numpy()), key


def test_dtypes_and_unaligned_offsets_survive() -> None:
    got = unpack(pack(LAYOUT), LAYOUT).to_torch_state_dict()
    assert list(got) == ["w", "h", "n"]
    for key, value in LAYOUT.items():
        assert got[key].dtype == value.dtype and torch.equal(got[key], value)


@pytest.mark.parametrize(
    ("record", "reason"),
    [
        (
            lambda: ArrayRecord({PACKED: Array(_flat()[:-1])}),
            rf"hold {SIZE - 1} bytes, the model needs {SIZE} \(3 tensors\)",
        ),
        (
            lambda: ArrayRecord({PACKED: Array(np.append(_flat(), np.uint8(1)))}),
            rf"hold {SIZE + 1} bytes, the model needs {SIZE} \(3 tensors\)",
        ),
        (lambda: ArrayRecord({PACKED: Array(_flat().view(np.int8))}), "must be a 1-D uint8"),
        (
            lambda: ArrayRecord({PACKED: Array(_flat().reshape(2, SIZE // 2))}),
            "must be a 1-D uint8",
        ),
        (
            lambda: ArrayRecord({PACKED: Array(_flat()), "layout": Array(np.zeros(3))}),
            "one packed array 'packed', got 2 arrays",
        ),
        (lambda: ArrayRecord(LAYOUT), "one packed array 'packed', got 3 arrays"),
        (lambda: ArrayRecord(), "one packed array 'packed', got 0 arrays"),
        (lambda: ArrayRecord({"w": Array(_flat())}), "one packed array 'packed', got 1 arrays"),
    ],
    ids=["one-byte-short", "one-byte-long", "int8", "2-d", "two-arrays", "named", "empty", "key"],
)
def test_weights_that_are_not_packed_for_the_layout_are_refused(
    record: Callable[[], ArrayRecord], reason: str
) -> None:
    with pytest.raises(InvalidReply, match=reason):
        unpack(record(), LAYOUT)


def test_undecodable_bytes_are_refused_without_quoting_them() -> None:
    packed = Array(_flat())
    broken = Array(packed.dtype, packed.shape, packed.stype, b"secret" + packed.data[6:])
    with pytest.raises(InvalidReply, match="cannot be decoded") as caught:
        unpack(ArrayRecord({PACKED: broken}), LAYOUT)
    assert "secret" not in str(caught.value)


def test_the_receivers_model_decides_the_layout_not_the_sender() -> None:
    # Prepare: a sender that packs its own names and shapes, and declares a huge array in
    # the metadata, with as many bytes as the receiver's model holds
    evil = pack({"evil": torch.zeros(SIZE // 2, dtype=torch.int16)})
    evil[PACKED].shape, evil[PACKED].dtype = (10**12,), "float64"

    # Execute
    got = unpack(evil, LAYOUT)

    # Assert: the receiver's names, shapes and dtypes, filled with the sent bytes
    assert list(got.keys()) == ["w", "h", "n"]
    assert [(a.shape, a.dtype) for a in got.values()] == [
        ((2, 3), "float32"),
        ((3,), "float16"),
        ((), "int64"),
    ]
    assert all(not a.numpy().any() for a in got.values())


def test_unpacking_holds_at_most_one_copy_beside_the_result() -> None:
    # Prepare: about 40 MB of weights
    layout = {"a": torch.randn(6_000_000), "b": torch.randn(2000, 2000), "n": torch.tensor(3)}
    size = sum(t.numel() * t.element_size() for t in layout.values())
    packed = pack(layout)

    # Execute
    tracemalloc.start()
    try:
        got = unpack(packed, layout)
        result, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    # Assert: beside the result, the decoded bytes and NumPy's 16 MiB write chunk at most
    assert result >= size
    assert peak - result <= size + 16 * 2**20 + size // 8
    assert torch.equal(got.to_torch_state_dict()["b"], layout["b"])


def test_the_layout_names_names_dtypes_and_shapes_in_order_not_values() -> None:
    # Prepare: the layout as a state dict and as the server's named ArrayRecord, its
    # values changed, and layouts of the same byte size that differ
    same = {k: torch.zeros_like(v) for k, v in LAYOUT.items()}
    reordered = dict(reversed(list(LAYOUT.items())))
    reshaped = {**LAYOUT, "w": LAYOUT["w"].reshape(3, 2)}
    retyped = {**LAYOUT, "h": torch.ones(3, dtype=torch.int16)}
    renamed = {("v" if k == "w" else k): v for k, v in LAYOUT.items()}

    # Execute / Assert
    assert layout(LAYOUT) == layout(ArrayRecord(LAYOUT)) == layout(same)
    others = {layout(x) for x in (reordered, reshaped, retyped, renamed)}
    assert len(others) == 4 and layout(LAYOUT) not in others
    for other in (reordered, reshaped, retyped, renamed):
        assert pack(other)[PACKED].shape == (SIZE,)  # the byte count cannot tell them apart
        with pytest.raises(InvalidReply, match="another layout"):
            unpack(pack(other), LAYOUT, layout(other))
    assert unpack(pack(LAYOUT), LAYOUT, layout(LAYOUT)).keys() == LAYOUT.keys()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float8_e4m3fn])
def test_a_weight_numpy_cannot_hold_is_refused_by_name(dtype: torch.dtype) -> None:
    # Prepare: a model with one weight of a dtype NumPy (and Flower's Array) lacks
    state = {**LAYOUT, "b": torch.zeros(2, dtype=dtype)}
    packed = pack(LAYOUT)

    # Execute / Assert: packing, the layout digest and unpacking into such a model each
    # name the dtype and the fix, as a settings error rather than an unexpected one
    for attempt in (lambda: pack(state), lambda: layout(state), lambda: unpack(packed, state)):
        with pytest.raises(ConfigError, match=f"dtype {dtype}.*float32"):
            attempt()
