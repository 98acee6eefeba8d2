"""Attacks on the .npy header of packed weights (``radfed.federation.packing``), now read in
place with NumPy's header parser, and on the layout digest the server names them by.

A malicious server (against a site) or site (against the server) writes every byte of the
one packed Array, header included, and may choose the message config's ``weights-layout``.
``tests/federation/test_packing_attacks.py`` covers the array's declared size, dtype and
payload; this file covers the header itself: its version, length and literal, the Array's
``data`` type, what the result keeps of the received bytes, ``pack``'s in-place read of an
Array, the layout digest's encoding, and the site's check of the digest it is sent.
"""

from __future__ import annotations

import struct
import sys
import time
import tracemalloc
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects
from flwr.supercore.inflatable.inflatable_utils import inflate_object_from_contents

from radfed.central.run_folder import RunFolder
from radfed.central.strategy import RadfedFedAvg
from radfed.config import RunConfig
from radfed.federation.codes import ErrorCode, InvalidReply
from radfed.federation.identity import SiteIdentity
from radfed.federation.packing import LAYOUT_KEY, PACKED, layout, pack, unpack
from radfed.site.handlers import handle_evaluate, handle_train
from radfed.tasks.classification import build_model
from tests.helpers import make_context, make_message, site_node

LAYOUT = {
    "w": torch.arange(6, dtype=torch.float32).reshape(2, 3),
    "h": torch.ones(3, dtype=torch.float16),
    "n": torch.tensor(7),
}
SIZE = 24 + 6 + 8
MAGIC = b"\x93NUMPY"


def _body() -> bytes:
    """The honest packed bytes of LAYOUT, without their header."""
    return pack(LAYOUT)[PACKED].numpy().tobytes()


def _header(text: str | bytes, version: tuple[int, int] = (1, 0)) -> bytes:
    """An .npy magic, version and header length, then ``text`` as the header, verbatim
    (no padding, no check): what a malicious peer can write."""
    raw = text.encode("latin1") if isinstance(text, str) else text
    length = struct.pack("<H" if version[0] == 1 else "<I", len(raw))
    return MAGIC + bytes(version) + length + raw


def _dict(descr: str, fortran: str = "False", shape: str = f"({SIZE},)") -> str:
    """A header literal with each value spelled as given (any Python source)."""
    return f"{{'descr': {descr}, 'fortran_order': {fortran}, 'shape': {shape}, }}\n"


def _record(data: Any, *, dtype: str = "uint8", shape: tuple[int, ...] = (SIZE,)) -> ArrayRecord:
    """A packed record whose Array carries ``data`` (set after construction, so it may be of
    any type) and metadata that may lie."""
    record = ArrayRecord({PACKED: Array(dtype, shape, "numpy.ndarray", b"")})
    record[PACKED].data = data
    return record


def _hex_shape(digits: int, sign: str = "") -> str:
    """A 1-D shape whose one number is a hexadecimal literal of ``digits`` digits: cheap to
    parse, yet with far more than Python's 4300 decimal digits once printed."""
    return f"({sign}0x{'f' * digits},)"


#: Headers a malicious peer writes, each over SIZE honest bytes unless it says otherwise,
#: with what ``unpack`` must answer.
HEADERS: dict[str, tuple[bytes, str]] = {
    # versions: 1.0 and 2.0 only (3.0's header is UTF-8; others are not .npy)
    "version-3.0-utf8": (
        _header(_dict("'|u1'").encode(), (3, 0)) + _body(),
        "cannot be decoded",
    ),
    "version-3.0-non-ascii": (
        _header(_dict("'|u1'").replace("\n", "#\u00e9\u4e2d\n").encode(), (3, 0)) + _body(),
        "cannot be decoded",
    ),
    "version-1.1": (_header(_dict("'|u1'"), (1, 1)) + _body(), "cannot be decoded"),
    "version-0.0": (_header(_dict("'|u1'"), (0, 0)) + _body(), "cannot be decoded"),
    "version-255.255": (_header(_dict("'|u1'"), (255, 255)) + _body(), "cannot be decoded"),
    # header lengths that point past the data, or are cut short
    "v2-length-4-GiB": (
        MAGIC + b"\x02\x00" + struct.pack("<I", 2**32 - 1) + b"{" + _body(),
        "cannot be decoded",
    ),
    "v1-length-past-the-end": (
        MAGIC + b"\x01\x00" + struct.pack("<H", 0xFFFF) + _dict("'|u1'").encode() + _body(),
        "cannot be decoded",
    ),
    "v2-length-cut-short": (MAGIC + b"\x02\x00\x01", "cannot be decoded"),
    "magic-only": (MAGIC, "cannot be decoded"),
    "not-a-magic": (b"\x93NUMPZ\x01\x00" + _header(_dict("'|u1'"))[8:] + _body(), "decoded"),
    # a header longer than NumPy's max_header_size (10000): never parsed
    "v1-header-of-10001": (_header(_dict("'|u1'") + " " * 10001) + _body(), "cannot be decoded"),
    "v2-header-of-1-MiB": (
        _header(_dict("'|u1'") + " " * 2**20, (2, 0)) + _body(),
        "cannot be decoded",
    ),
    # descr tricks: only a plain uint8 is one
    "descr-subarray-string": (_header(_dict("'(2,)u1'", shape="(19,)")) + _body(), "1-D uint8"),
    "descr-subarray-tuple": (
        _header(_dict("('|u1', (2,))", shape="(19,)")) + _body(),
        "1-D uint8",
    ),
    "descr-subarray-of-1": (_header(_dict("('|u1', (1,))")) + _body(), "1-D uint8"),
    "descr-struct-padded": (
        _header(_dict("[('a', '|u1'), ('', '|V1')]", shape="(19,)")) + _body(),
        "1-D uint8",
    ),
    "descr-struct-titled": (_header(_dict("[(('t', 'a'), '|u1')]")) + _body(), "1-D uint8"),
    "descr-dict-with-offsets": (
        _header(_dict("{'names': ['a'], 'formats': ['u1'], 'offsets': [0], 'itemsize': 1}"))
        + _body(),
        "cannot be decoded",
    ),
    "descr-unicode": (_header(_dict("'<U1'")) + _body(), "1-D uint8"),
    "descr-int": (_header(_dict("1")) + _body(), "cannot be decoded"),
    "descr-none": (_header(_dict("None")) + _body(), "cannot be decoded"),
    "descr-empty-tuple": (_header(_dict("()")) + _body(), "cannot be decoded"),
    "descr-one-tuple": (_header(_dict("('|u1',)")) + _body(), "cannot be decoded"),
    "descr-unknown": (_header(_dict("'u9'")) + _body(), "cannot be decoded"),
    "descr-object-in-struct": (_header(_dict("[('a', '|O')]")) + _body(), "1-D uint8"),
    # shapes: a tuple of ints (bools are ints), nothing else
    "shape-negative": (_header(_dict("'|u1'", shape=f"(-{SIZE},)")) + _body(), "-38 bytes"),
    "shape-two-negatives": (_header(_dict("'|u1'", shape="(-2, -19)")) + _body(), "1-D uint8"),
    "shape-float": (_header(_dict("'|u1'", shape=f"({SIZE}.0,)")) + _body(), "decoded"),
    "shape-complex": (_header(_dict("'|u1'", shape=f"({SIZE}+0j,)")) + _body(), "decoded"),
    "shape-string": (_header(_dict("'|u1'", shape=f"('{SIZE}',)")) + _body(), "decoded"),
    "shape-nested": (_header(_dict("'|u1'", shape=f"(({SIZE},),)")) + _body(), "decoded"),
    "shape-list": (_header(_dict("'|u1'", shape=f"[{SIZE}]")) + _body(), "decoded"),
    "shape-int": (_header(_dict("'|u1'", shape=f"{SIZE}")) + _body(), "decoded"),
    "shape-none": (_header(_dict("'|u1'", shape="None")) + _body(), "decoded"),
    "shape-set": (_header(_dict("'|u1'", shape=f"{{{SIZE}}}")) + _body(), "decoded"),
    "shape-2**64": (_header(_dict("'|u1'", shape=f"({2**64},)")) + _body(), "38 follow it"),
    "shape-bool-true": (_header(_dict("'|u1'", shape="(True,)")) + _body(), "declares True"),
    "shape-bool-false": (_header(_dict("'|u1'", shape="(False,)")) + _body(), "declares False"),
    # fortran_order: a bool, and False
    "fortran-int-0": (_header(_dict("'|u1'", fortran="0")) + _body(), "cannot be decoded"),
    "fortran-string": (_header(_dict("'|u1'", fortran="'False'")) + _body(), "decoded"),
    "fortran-none": (_header(_dict("'|u1'", fortran="None")) + _body(), "cannot be decoded"),
    "fortran-true": (_header(_dict("'|u1'", fortran="True")) + _body(), "1-D uint8"),
    # the literal: a dict of exactly the three keys, nothing Python would have to run
    "extra-key": (
        _header(_dict("'|u1'").replace("}", "'x': 1}")) + _body(),
        "cannot be decoded",
    ),
    "missing-key": (
        _header(f"{{'descr': '|u1', 'shape': ({SIZE},)}}\n") + _body(),
        "cannot be decoded",
    ),
    "a-list-of-pairs": (
        _header(f"[('descr', '|u1'), ('fortran_order', False), ('shape', ({SIZE},))]") + _body(),
        "cannot be decoded",
    ),
    "a-call": (
        _header(f"dict(descr='|u1', fortran_order=False, shape=({SIZE},))") + _body(),
        "cannot be decoded",
    ),
    "an-import": (_header("__import__('os').system('false')") + _body(), "cannot be decoded"),
    "a-lambda": (_header("(lambda: 0)()") + _body(), "cannot be decoded"),
    # literals made to be slow or deep for the parser (the header is at most 10000)
    "nested-parentheses": (_header("(" * 4999 + ")" * 4999) + _body(), "cannot be decoded"),
    "nested-brackets": (_header("[" * 199 + "1," * 4700 + "]" * 199) + _body(), "decoded"),
    "unary-minus-chain": (_header("-" * 9990 + "1") + _body(), "cannot be decoded"),
    "power-chain": (_header("2" + "**2" * 3300) + _body(), "cannot be decoded"),
    "comparison-chain": (_header("1" + "<1" * 4990) + _body(), "cannot be decoded"),
    "attribute-chain": (_header("a" + ".a" * 4990) + _body(), "cannot be decoded"),
    "call-chain": (_header("a" + "()" * 4990) + _body(), "cannot be decoded"),
    "unclosed-braces": (_header("{" * 150) + _body(), "cannot be decoded"),
    "python-2-longs": (_header("(" + "1L," * 3300 + ")") + _body(), "cannot be decoded"),
    "backslash-continuations": (_header("\\\n" * 4990 + "1") + _body(), "cannot be decoded"),
    "many-tokens": (_header("1 " * 4990) + _body(), "cannot be decoded"),
    "a-big-set": (
        _header("{" + ",".join(str(i) for i in range(2000)) + "}") + _body(),
        "cannot be decoded",
    ),
    "named-escapes": (
        _header("'" + "\\N{LATIN SMALL LETTER A}" * 400 + "'") + _body(),
        "cannot be decoded",
    ),
    "not-latin1-bytes": (_header(b"\xff\xfe\x00" * 100) + _body(), "cannot be decoded"),
    "nul-bytes": (_header(b"\x00" * 200) + _body(), "cannot be decoded"),
}


# --------------------------------------------------------------------------- unpack itself


@pytest.mark.parametrize("name", list(HEADERS))
def test_a_crafted_header_is_refused_as_invalid_quickly_and_without_quoting_it(
    name: str,
) -> None:
    # Prepare
    data, reason = HEADERS[name]
    record = _record(data)
    started = time.monotonic()

    # Execute
    with pytest.raises(InvalidReply) as caught, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        unpack(record, LAYOUT)

    # Assert: the one refusal type, the reason named, within a second, and no piece of the
    # header (which the attacker wrote) quoted back
    assert reason in str(caught.value)
    assert (
        time.monotonic() - started < 5
    )  # a bound on a pathological parse (0.01 s here), not a timing
    assert "descr" not in str(caught.value) and "\\x" not in str(caught.value)
    assert len(str(caught.value)) < 200


@pytest.mark.parametrize(
    "shape",
    [
        _hex_shape(9000),
        _hex_shape(9000, "-"),
        f"(0b{'1' * 9000},)",
        f"(0o{'7' * 9000},)",
        f"({'9' * 4299},)",
    ],
    ids=["hex", "negative-hex", "binary", "octal", "4299-decimal-digits"],
)
def test_a_declared_count_too_long_to_print_is_refused_as_invalid(shape: str) -> None:
    # Prepare: a 1-D uint8 header whose one number is a literal of thousands of digits
    # (cheap to parse: hexadecimal, binary and octal have no digit limit)
    record = _record(_header(_dict("'|u1'", shape=shape)) + _body())
    started = time.monotonic()

    # Execute / Assert: refused as any other bad count is, quickly and unquoted
    with pytest.raises(InvalidReply, match="38 follow it") as caught:
        unpack(record, LAYOUT)
    assert time.monotonic() - started < 5  # as above: bounded, not timed
    assert len(str(caught.value)) < 200


@pytest.mark.parametrize("descr", ["'|u1'", "'<u1'", "'>u1'", "'=u1'", "'u1'", "'B'", "'uint8'"])
@pytest.mark.parametrize("version", [(1, 0), (2, 0)], ids=["v1", "v2"])
def test_every_spelling_of_uint8_reads_the_same_bytes(descr: str, version: tuple[int, int]) -> None:
    # Prepare: NumPy's own spellings of one byte per element, in either header version
    record = _record(_header(_dict(descr), version) + _body())

    # Execute
    got = unpack(record, LAYOUT).to_torch_state_dict()

    # Assert: byte order and spelling cannot change how the receiver slices
    assert list(got) == list(LAYOUT)
    assert all(torch.equal(got[k], v) for k, v in LAYOUT.items())


def test_a_bool_in_the_shape_declares_what_it_equals_and_no_more() -> None:
    # Prepare: (True,) is (1,) to NumPy's check; the receiver's model holds one or two bytes
    one, two = {"b": torch.zeros(1, dtype=torch.uint8)}, {"b": torch.zeros(2, dtype=torch.uint8)}
    record = _record(_header(_dict("'|u1'", shape="(True,)")) + b"\x07")

    # Execute
    got = unpack(record, one).to_torch_state_dict()

    # Assert: exactly the one byte that follows, never more
    assert got["b"].tolist() == [7]
    with pytest.raises(InvalidReply, match="hold 1 bytes, the model needs 2"):
        unpack(record, two)


@pytest.mark.parametrize(
    "data",
    [
        lambda b: bytearray(b),
        lambda b: memoryview(b),
        lambda b: b.decode("latin1"),
        lambda b: np.frombuffer(b, np.uint8),
        lambda b: list(b),
        lambda b: None,
        lambda b: 0,
    ],
    ids=["bytearray", "memoryview", "str", "ndarray", "list", "none", "int"],
)
def test_array_data_that_is_not_bytes_is_refused_as_invalid(
    data: Callable[[bytes], Any],
) -> None:
    # Prepare: honest bytes, handed over as another type (Flower's constructor refuses
    # these; the attribute can still be set afterwards)
    honest = pack(LAYOUT)[PACKED].data
    with pytest.raises(TypeError):
        Array("uint8", (SIZE,), "numpy.ndarray", data(honest))
    record = _record(data(honest))

    # Execute / Assert: a mutable buffer is never read in place, nothing else is guessed at
    with pytest.raises(InvalidReply, match="cannot be decoded"):
        unpack(record, LAYOUT)


def test_a_bytes_subclass_is_read_as_its_bytes_and_not_kept() -> None:
    # Prepare
    class Sub(bytes):
        pass

    data = Sub(pack(LAYOUT)[PACKED].data)
    record = _record(data)
    before = sys.getrefcount(data)

    # Execute
    got = unpack(record, LAYOUT)

    # Assert: the same tensors, each Array's data a plain bytes of its own
    assert sys.getrefcount(data) == before
    assert all(type(a.data) is bytes for a in got.values())
    assert all(torch.equal(got.to_torch_state_dict()[k], v) for k, v in LAYOUT.items())


def test_the_unpacked_arrays_keep_no_reference_to_the_received_bytes() -> None:
    # Prepare: 8 MB received (allocated while traced); the references to it before unpacking
    layout_ = {"a": torch.randn(2_000_000), "n": torch.tensor(3)}
    tracemalloc.start()
    try:
        data = pack(layout_)[PACKED].data
        record = _record(data, shape=(len(data),))
        before = sys.getrefcount(data)

        # Execute
        got = unpack(record, layout_)
        kept = sys.getrefcount(data)
        held, _ = tracemalloc.get_traced_memory()
        del record, data
        after, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    # Assert: no memoryview of the received bytes survives in the result (they would stay
    # in memory for as long as the strategy or the site keeps the named weights): dropping
    # the received message frees them
    assert kept == before
    assert held - after >= 8_000_000
    assert torch.equal(got.to_torch_state_dict()["a"], layout_["a"])


def test_changing_the_received_array_after_unpacking_changes_nothing_unpacked() -> None:
    # Prepare
    record = _record(pack(LAYOUT)[PACKED].data)
    got = unpack(record, LAYOUT)
    copies = {k: bytes(a.data) for k, a in got.items()}

    # Execute: the sender's object is changed in every way it can be afterwards
    received = record[PACKED]
    received.data = _header(_dict("'|u1'")) + b"\xff" * SIZE
    received.shape, received.dtype, received.stype = (1,), "float64", "torch.raw"
    record[PACKED] = Array(np.full(SIZE, 255, np.uint8))

    # Assert
    assert {k: bytes(a.data) for k, a in got.items()} == copies
    assert all(torch.equal(got.to_torch_state_dict()[k], v) for k, v in LAYOUT.items())


@pytest.mark.parametrize("version", [(1, 0), (2, 0)], ids=["v1", "v2"])
def test_a_header_declaring_huge_sizes_allocates_nothing_like_them(
    version: tuple[int, int],
) -> None:
    # Prepare: a header that says its length is 4 GiB (2.0) or 64 KiB (1.0) over 38 bytes;
    # and a well-formed one declaring a 2**62-byte array
    length = struct.pack(
        "<I" if version == (2, 0) else "<H", 2**32 - 1 if version[0] == 2 else 0xFFFF
    )
    long_header = _record(MAGIC + bytes(version) + length + _body())
    huge_count = _record(_header(_dict("'|u1'", shape=f"({2**62},)"), version) + _body())

    # Execute
    tracemalloc.start()
    try:
        for record in (long_header, huge_count):
            with pytest.raises(InvalidReply):
                unpack(record, LAYOUT)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    # Assert: what is allocated follows what came, not what the header declares
    assert peak < 2**20


def test_a_header_spanning_every_received_byte_is_refused_in_bounded_time_and_memory() -> None:
    # Prepare: a 2.0 header 16 MiB long (all of the message but the magic): NumPy reads and
    # decodes it before it checks its length
    size = 16 * 2**20
    text = _dict("'|u1'", shape=f"({size},)") + " " * size
    data = _header(text, (2, 0))

    # Execute
    tracemalloc.start()
    started = time.monotonic()
    try:
        with pytest.raises(InvalidReply, match="cannot be decoded"):
            unpack(_record(data, shape=(size,)), LAYOUT)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    took = time.monotonic() - started

    # Assert: a copy or two of what came (its bytes, its text), never parsed
    assert took < 5  # bounded, not timed: a busy machine stalls
    assert peak < 3 * len(data)


# --------------------------------------------------------------------------- pack's in-place read


def _decoded_bytes(array: Array) -> bytes:
    """The C-order native bytes of an Array's elements as Flower decodes it (``np.load``)."""
    value = array.numpy()
    native = np.ascontiguousarray(value, dtype=value.dtype.newbyteorder("="))
    return native.reshape(-1).view(np.uint8).tobytes()


#: Arrays whose header lies (about dtype, shape, order, or itself), as a server could hold if
#: it ever packed an Array it received: (data, metadata dtype, metadata shape).
LYING_ARRAYS: dict[str, tuple[bytes, str, tuple[int, ...]]] = {
    "big-endian-f4": (
        _header(_dict("'>f4'", shape="(3,)")) + b"\x3f\x80\x00\x00" * 3,
        "float32",
        (3,),
    ),
    "fortran-2x3": (
        _header(_dict("'<f4'", fortran="True", shape="(2, 3)"))
        + np.arange(6, dtype=np.float32).tobytes(),
        "float32",
        (2, 3),
    ),
    "declares-more": (_header(_dict("'<f4'", shape="(100,)")) + bytes(12), "float32", (3,)),
    "declares-fewer": (_header(_dict("'<f4'", shape="(2,)")) + bytes(12), "float32", (3,)),
    "declares-2**62": (_header(_dict("'<f4'", shape=f"({2**62},)")) + bytes(12), "float32", (3,)),
    "two-negatives": (_header(_dict("'|u1'", shape="(-2, -6)")) + bytes(12), "uint8", (12,)),
    "subarray": (_header(_dict("'(2,)<f4'", shape="(3,)")) + bytes(24), "float32", (3, 2)),
    "struct-big-endian": (
        _header(_dict("[('a', '>f4')]", shape="(3,)")) + b"\x3f\x80\x00\x00" * 3,
        "float32",
        (3,),
    ),
    "object": (_header(_dict("'|O'", shape="(3,)")) + bytes(24), "float32", (3,)),
    "version-3.0": (
        _header(_dict("'<f4'", shape="(3,)").encode(), (3, 0)) + bytes(12),
        "float32",
        (3,),
    ),
    "version-9.9": (_header(_dict("'<f4'", shape="(3,)"), (9, 9)) + bytes(12), "float32", (3,)),
    "header-too-long": (
        _header(_dict("'<f4'", shape="(3,)") + " " * 10001) + bytes(12),
        "float32",
        (3,),
    ),
    "nested-parentheses": (_header("(" * 999 + ")" * 999) + bytes(12), "float32", (3,)),
    "unary-minus-chain": (_header("-" * 9990 + "1") + bytes(12), "float32", (3,)),
    "unclosed-braces": (_header("{" * 150) + bytes(12), "float32", (3,)),
    "descr-one-tuple": (_header(_dict("('<f4',)", shape="(3,)")) + bytes(12), "float32", (3,)),
    "huge-hex-count": (
        _header(_dict("'<f4'", shape=_hex_shape(9000))) + bytes(12),
        "float32",
        (3,),
    ),
    "stype-torch": (bytes(12), "float32", (3,)),
}


@pytest.mark.parametrize("name", list(LYING_ARRAYS))
def test_pack_never_sends_bytes_other_than_the_arrays_own_elements(name: str) -> None:
    # Prepare: an honest tensor before and after the lying Array
    data, dtype, shape = LYING_ARRAYS[name]
    stype = "torch.raw" if name == "stype-torch" else "numpy.ndarray"
    lying = Array(dtype, shape, stype, data)
    record = ArrayRecord({"a": Array(np.ones(2, np.float32)), "x": lying})
    record["z"] = Array(np.full(1, 9, np.int64))
    try:
        decoded: bytes | None = _decoded_bytes(lying)
    except Exception:
        decoded = None

    # Execute
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            sent: bytes | None = bytes(pack(record)[PACKED].numpy())
    except Exception:
        sent = None

    # Assert: an Array Flower decodes is sent as Flower decodes it, between its neighbours;
    # one Flower cannot decode is refused, or sent as the very bytes that follow its header,
    # as many as it declares (never a neighbour's, never invented)
    if sent is None:
        assert decoded is None
        return
    head, tail = np.ones(2, np.float32).tobytes(), np.full(1, 9, np.int64).tobytes()
    assert sent.startswith(head) and sent.endswith(tail)
    middle = sent[len(head) : len(sent) - len(tail)]
    if decoded is not None:
        assert middle == decoded
    else:
        assert data.endswith(middle) and len(middle) == len(data) - (data.index(b"\n") + 1)


class _Bytes(bytes):
    pass


@pytest.mark.parametrize(
    "kind", ["bytearray", "memoryview", "bytes-subclass"], ids=lambda kind: str(kind)
)
def test_pack_copies_an_arrays_bytes_and_a_later_change_to_them_changes_nothing(
    kind: str,
) -> None:
    # Prepare: an Array whose data was replaced by a buffer the caller keeps and changes
    record = ArrayRecord({"a": Array(np.arange(5, dtype=np.float32))})
    buffer = bytearray(record["a"].data)
    data: Any = {
        "bytearray": buffer,
        "memoryview": memoryview(buffer),
        "bytes-subclass": _Bytes(buffer),
    }[kind]
    record["a"].data = data

    # Execute
    sent = pack(record)
    buffer[-4:] = b"\xff\xff\xff\xff"
    record["a"].data = b""

    # Assert: the bytes decoded when packed, copied into the result
    assert sent[PACKED].numpy().tobytes() == np.arange(5, dtype=np.float32).tobytes()


# --------------------------------------------------------------------------- Flower's wire


def _over_the_wire(record: ArrayRecord) -> ArrayRecord:
    """``record`` deflated into Flower's objects (its Array chunked) and inflated again, as
    the receiver's Flower hands it over."""
    objects = get_all_nested_objects(record)
    contents = {object_id: obj.deflate() for object_id, obj in objects.items()}
    inflated = inflate_object_from_contents(record.object_id, contents)
    assert isinstance(inflated, ArrayRecord)
    return inflated


def test_packed_weights_in_several_flower_chunks_arrive_as_bytes_and_unpack() -> None:
    # Prepare: 12 MB of weights: three of Flower's 5-MB chunks
    layout_ = {"a": torch.randn(3_000_000), "n": torch.tensor(3)}
    packed = pack(layout_)
    assert len(get_all_nested_objects(packed)) >= 5

    # Execute
    received = _over_the_wire(packed)
    got = unpack(received, layout_).to_torch_state_dict()

    # Assert: Flower hands over plain bytes (the only data type unpack reads)
    assert type(received[PACKED].data) is bytes
    assert all(torch.equal(got[k], v) for k, v in layout_.items())


@pytest.mark.parametrize("name", ["version-3.0-utf8", "v2-length-4-GiB", "descr-subarray-tuple"])
def test_a_crafted_header_is_refused_after_flowers_wire_too(name: str) -> None:
    # Prepare: the crafted bytes as Flower delivers them (its metadata says honest things)
    received = _over_the_wire(_record(HEADERS[name][0]))

    # Execute / Assert
    with pytest.raises(InvalidReply, match=HEADERS[name][1]):
        unpack(received, LAYOUT)


# --------------------------------------------------------------------------- the server's round

ROUND_CONFIG = RunConfig(num_server_rounds=2, min_sites=1, score_bins=1000, eval_splits=("val",))
REFERENCE = {
    "w": torch.zeros(3),
    "h": torch.zeros(2, dtype=torch.float16),
    "bn.num_batches_tracked": torch.tensor(0),
}
REPLY_SIZE = 12 + 4 + 8


def _strategy(tmp_path: Path) -> RadfedFedAvg:
    run = RunFolder.start(tmp_path / "run", ROUND_CONFIG)
    return RadfedFedAvg(config=ROUND_CONFIG, reference=REFERENCE, run=run)


def _train_reply(site: str, node: int, arrays: ArrayRecord) -> Message:
    content = RecordDict(
        {
            "arrays": arrays,
            "metrics": MetricRecord({"num-examples": 10, "train-loss": 0.5}),
            "site": SiteIdentity.local(site).to_record(),
        }
    )
    return make_message(content, message_type="train", src_node_id=node)


def _honest(w: float) -> ArrayRecord:
    return pack(
        {
            "w": torch.full((3,), w),
            "h": torch.full((2,), w, dtype=torch.float16),
            "bn.num_batches_tracked": torch.tensor(10),
        }
    )


def _crafted_reply(header: str, version: tuple[int, int] = (1, 0)) -> ArrayRecord:
    record = _record(_header(header, version) + bytes(REPLY_SIZE), shape=(REPLY_SIZE,))
    return record


@pytest.mark.parametrize(
    "header",
    [
        _dict("'(2,)u1'", shape=f"({REPLY_SIZE // 2},)"),
        "-" * 9990 + "1",
        "{" * 150,
        _dict("('|u1',)", shape=f"({REPLY_SIZE},)"),
        "(" * 4999 + ")" * 4999,
    ],
    ids=["subarray", "parser-memory-error", "tokenizer-error", "index-error", "deep"],
)
def test_a_header_that_breaks_numpys_parser_only_drops_its_site(
    header: str, tmp_path: Path
) -> None:
    # Prepare: headers whose parsing raises MemoryError, TokenError, IndexError in NumPy
    strategy = _strategy(tmp_path)
    replies = [
        _train_reply("site-a", 1, _honest(1.0)),
        _train_reply("site-x", 2, _crafted_reply(header)),
        _train_reply("site-b", 3, _honest(3.0)),
    ]

    # Execute
    arrays, _ = strategy.aggregate_train(1, replies)

    # Assert: the round went on over the honest sites; the global model the server packs
    # next holds none of the received Arrays, only its own reference's layout
    assert arrays is not None
    assert torch.allclose(arrays.to_torch_state_dict()["w"], torch.full((3,), 2.0))
    replied, dropped = strategy.take_ledger()
    assert sorted(replied) == ["site-a", "site-b"] and list(dropped) == ["site-x"]
    assert layout(arrays) == layout(REFERENCE)
    for name, array in arrays.items():
        assert (array.dtype, tuple(array.shape)) == (str(array.numpy().dtype), array.numpy().shape)
        assert array.numpy().dtype == REFERENCE[name].numpy().dtype


def test_a_declared_count_too_long_to_print_only_drops_its_site(tmp_path: Path) -> None:
    # Prepare
    strategy = _strategy(tmp_path)
    replies = [
        _train_reply("site-a", 1, _honest(1.0)),
        _train_reply("site-x", 2, _crafted_reply(_dict("'|u1'", shape=_hex_shape(9000)))),
        _train_reply("site-b", 3, _honest(3.0)),
    ]

    # Execute
    arrays, _ = strategy.aggregate_train(1, replies)

    # Assert
    assert arrays is not None
    replied, dropped = strategy.take_ledger()
    assert sorted(replied) == ["site-a", "site-b"] and list(dropped) == ["site-x"]


# --------------------------------------------------------------------------- the layout digest


def _names_that_look_like_the_encoding() -> list[dict[str, torch.Tensor]]:
    f3 = torch.zeros(3)
    return [
        {"w": f3, "h": f3},
        {"w', 'float32', (3,))('h": f3},
        {"w', 'float32', (3,))('h', 'float32', (3,))": f3},
        {"w\", 'float32', (3,))(\"h": f3},
        {"('w', 'float32', (3,))": f3, "h": f3},
        {"w": f3, "h', 'float32', (3,))": f3},
        {"w\\": f3, "h": f3},
        {"w": torch.zeros(6)},
        {"w": torch.zeros(3, 2)},
        {"w": torch.zeros(2, 3)},
        {"w": torch.zeros(6, 1)},
        {"w": torch.zeros(1, 6)},
        {"w": torch.zeros(6, dtype=torch.int32)},
        {"w": torch.zeros(3, dtype=torch.float64)},
        {"w": torch.zeros(12, dtype=torch.float16)},
        {"w": torch.zeros(24, dtype=torch.uint8)},
        {"w": torch.zeros(24, dtype=torch.int8)},
        {"w": torch.zeros(24, dtype=torch.bool)},
        {"w": torch.zeros(3, dtype=torch.complex64)},
        {"w": torch.zeros(())},
        {"w": torch.zeros(0)},
        {"": torch.zeros(3)},
        {"w\u00e9": f3},
        {"we\u0301": f3},
        {"w\x00": f3},
        {"w": torch.zeros(0), "": torch.zeros(0)},
        {"w": torch.zeros(0), "h": torch.zeros(0)},
        {},
    ]


def test_different_honest_layouts_never_share_a_digest() -> None:
    # Prepare: names made to look like the digest's own encoding, shapes and dtypes of the
    # same byte size, empty and zero-sized parts
    layouts = _names_that_look_like_the_encoding()

    # Execute
    digests = [layout(x) for x in layouts]

    # Assert
    assert len(set(digests)) == len(layouts)
    assert all(len(d) == 32 and set(d) <= set("0123456789abcdef") for d in digests)


@pytest.mark.parametrize(
    "dtype",
    [
        torch.float16,
        torch.float32,
        torch.float64,
        torch.int8,
        torch.int16,
        torch.int32,
        torch.int64,
        torch.uint8,
        torch.bool,
        torch.complex64,
    ],
)
def test_one_honest_layout_has_one_digest_however_it_is_held(dtype: torch.dtype) -> None:
    # Prepare: a state dict; its ArrayRecord; that record after Flower's wire
    state = {"a.weight": torch.zeros(2, 3, dtype=dtype), "b": torch.zeros((), dtype=dtype)}
    record = ArrayRecord(state)

    # Execute
    digests = {layout(state), layout(record), layout(_over_the_wire(record))}

    # Assert: a site and a server holding the same model always agree
    assert len(digests) == 1


# --------------------------------------------------------------------------- the site's handlers

SITE_CONFIG = RunConfig(image_size=32, local_epochs=1, batch_size=8, score_bins=1000, seed=3)
#: A policy that spends privacy on each evaluation: a refusal after admission would leave
#: its ledger behind.
SPENDING_POLICY = "[policy.dp-statistics]\nnoise = 4.0\nepsilon = 10.0\n"


class _Str(str):
    pass


def _never(what: str) -> Callable[..., Any]:
    def called(*_: object, **__: object) -> Any:
        raise AssertionError(f"{what} was reached")

    return called


def _site_request(kind: str, arrays: ArrayRecord, packed_by: Any = None) -> Message:
    config = ConfigRecord({"server-round": 1})
    if packed_by is not None:
        config[LAYOUT_KEY] = packed_by
    content = RecordDict({"arrays": arrays, "config": config})
    return make_message(content, message_type=kind, src_node_id=0, dst_node_id=1)


#: What a malicious server puts under "weights-layout" with honest weights; each is refused.
BAD_LAYOUTS: dict[str, Callable[[str], Any]] = {
    "bytes-of-the-digest": lambda d: d.encode(),
    "list-of-the-digest": lambda d: [d],
    "empty-list": lambda d: [],
    "empty-text": lambda d: "",
    "str-subclass-of-another": lambda d: _Str("0" * 32),
    "true": lambda d: True,
    "float": lambda d: 1.5,
    "upper-case": lambda d: d.upper(),
    "with-a-newline": lambda d: d + "\n",
    "with-a-nul": lambda d: d + "\x00",
    "the-full-sha256": lambda d: d + "0" * 32,
    "64-characters-of-other": lambda d: "f" * 64,
    "non-ascii": lambda d: "\u00e9" * 32,
}


@pytest.mark.parametrize("handler", [handle_train, handle_evaluate], ids=["train", "evaluate"])
@pytest.mark.parametrize("name", list(BAD_LAYOUTS))
def test_a_bad_weights_layout_is_refused_with_the_config_code_before_the_sites_data(
    site_copy: Path,
    monkeypatch: pytest.MonkeyPatch,
    name: str,
    handler: Callable[[Message, Any], Message],
) -> None:
    # Prepare: the site's own honest weights, a policy that spends privacy on evaluation;
    # reaching the site's data fails the test
    state = build_model(SITE_CONFIG).state_dict()
    packed_by = BAD_LAYOUTS[name](layout(state))
    monkeypatch.setattr("radfed.site.handlers.load_site_once", _never("the site's data"))
    kind = "train" if handler is handle_train else "evaluate"
    context = make_context(SITE_CONFIG.to_run_config(), site_node(site_copy, SPENDING_POLICY))
    started = time.monotonic()

    # Execute
    reply = handler(_site_request(kind, pack(state), packed_by), context)

    # Assert: the config code and nothing else, before any data, cache or privacy is touched
    assert reply.has_error() and reply.error.code == ErrorCode.CONFIG
    assert reply.error.reason == f"radfed site error {ErrorCode.CONFIG}"
    assert not reply.has_content()
    assert time.monotonic() - started < 5
    assert not list(site_copy.glob(".radfed/cache/*"))
    left = {p.relative_to(site_copy).as_posix() for p in site_copy.glob(".radfed/**/*")}
    assert not {p for p in left if "privacy" in p or "quer" in p or "ledger" in p}, left


def test_a_str_subclass_even_holding_the_right_digest_is_refused(
    site_copy: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: the right digest, as a str subclass (whose own != could lie)
    state = build_model(SITE_CONFIG).state_dict()
    monkeypatch.setattr("radfed.site.handlers.load_site_once", _never("the site's data"))
    context = make_context(SITE_CONFIG.to_run_config(), site_node(site_copy))

    # Execute
    reply = handle_train(_site_request("train", pack(state), _Str(layout(state))), context)

    # Assert: only a plain str is compared
    assert reply.has_error() and reply.error.code == ErrorCode.CONFIG


def test_a_declared_count_too_long_to_print_is_refused_with_the_config_code(
    site_copy: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare
    state = build_model(SITE_CONFIG).state_dict()
    size = sum(t.numel() * t.element_size() for t in state.values())
    data = _header(_dict("'|u1'", shape=_hex_shape(9000))) + bytes(size)
    monkeypatch.setattr("radfed.site.handlers.load_site_once", _never("the site's data"))
    context = make_context(SITE_CONFIG.to_run_config(), site_node(site_copy))

    # Execute
    reply = handle_train(_site_request("train", _record(data, shape=(size,))), context)

    # Assert
    assert reply.has_error() and reply.error.code == ErrorCode.CONFIG
