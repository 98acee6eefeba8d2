"""Weights on the wire: one byte array in the model's state-dict order.

Flower 1.41 moves a message as a tree of objects, one request per object per hop, and an
ArrayRecord of a state dict is an object (plus its chunks) per tensor: a model of 77
tensors is some 150 requests per hop. radfed sends the weights as ONE Array instead: every
tensor's raw bytes (C order, native byte order: little-endian wherever radfed runs)
concatenated in the state dict's order, as a 1-D ``uint8`` array under ``PACKED``. No
names, shapes or dtypes travel: the receiver slices the bytes by its own model's state dict
(``unpack``), so a sender cannot choose the layout the receiver allocates, and everything
after (checks, aggregation, loading) sees an ordinary named ArrayRecord.

Both sides send and accept only this form: one code path, one format to attack.

The server also names the layout it packed by (``layout``: a digest of the names, dtypes
and shapes, in the message config under ``LAYOUT_KEY``): a site whose own model has the same
byte size but another layout (another torch or MONAI version building it differently) is
told so instead of loading bytes into the wrong tensors. The digest decides nothing else: a
server chooses the weights' values anyway.
"""

from __future__ import annotations

import hashlib
import math
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from io import BytesIO

import numpy as np
import torch
from flwr.app import Array, ArrayRecord

from radfed.errors import ConfigError
from radfed.federation.codes import InvalidReply

__all__ = ["LAYOUT_KEY", "PACKED", "layout", "pack", "unpack"]

#: The name of the one Array of a packed ArrayRecord.
PACKED = "packed"
#: The message config key of the layout the weights were packed by (``layout``).
LAYOUT_KEY = "weights-layout"


def layout(state: Mapping[str, torch.Tensor] | ArrayRecord) -> str:
    """A digest of a state dict's (or named ArrayRecord's) names, dtypes and shapes, in
    order; its values are not read. Equal for a state dict and its ArrayRecord."""
    digest = hashlib.sha256()
    for name, value in state.items():
        if isinstance(value, Array):
            dtype, shape = value.dtype, tuple(value.shape)
        else:
            dtype, shape = _numpy_dtype(value).name, tuple(value.shape)
        digest.update(repr((name, dtype, shape)).encode())
    return digest.hexdigest()[:32]


def pack(state: Mapping[str, torch.Tensor] | ArrayRecord) -> ArrayRecord:
    """A state dict (or a named ArrayRecord) as one Array of its bytes, in its order.

    The bytes are copied once, into the result (an Array of an ArrayRecord is read in
    place when it holds NumPy's C-order bytes, as Flower writes them).

    Returns:
        An ArrayRecord of one 1-D ``uint8`` Array named ``PACKED``.
    """
    parts = [_elements(value) for value in state.values()]
    total = sum(part.nbytes for part in parts)
    return ArrayRecord({PACKED: _npy(np.dtype(np.uint8), (total,), parts)})


def unpack(
    record: ArrayRecord, like: Mapping[str, torch.Tensor], packed_by: str | None = None
) -> ArrayRecord:
    """Packed weights as a named ArrayRecord, sliced by ``like`` (the receiver's own state
    dict: its names, shapes, dtypes and order; its values are not read).

    The received bytes are read in place and copied once, into the result.

    Args:
        record: the received ArrayRecord.
        like: the receiver's own state dict.
        packed_by: the sender's ``layout`` digest, when it sent one.

    Raises:
        InvalidReply: not exactly one Array named ``PACKED``, not a 1-D ``uint8`` NumPy
            array whose header matches its bytes, not as many bytes as ``like`` holds (both
            numbers are named, no value), or ``packed_by`` is not ``like``'s layout.
    """
    if packed_by is not None and packed_by != layout(like):
        raise InvalidReply(
            "the weights were packed for another layout of the model (names, shapes or "
            "dtypes differ)"
        )
    if list(record.keys()) != [PACKED]:
        raise InvalidReply(
            f"weights must travel as one packed array {PACKED!r}, got {len(record)} arrays"
        )
    flat = _packed_bytes(record[PACKED])
    dtypes = [_numpy_dtype(tensor) for tensor in like.values()]
    sizes = [t.numel() * d.itemsize for t, d in zip(like.values(), dtypes, strict=True)]
    if len(flat) != sum(sizes):
        raise InvalidReply(
            f"the packed weights hold {len(flat)} bytes, the model needs {sum(sizes)} "
            f"({len(sizes)} tensors)"
        )
    out: OrderedDict[str, Array] = OrderedDict()
    start = 0
    for (name, tensor), dtype, size in zip(like.items(), dtypes, sizes, strict=True):
        out[name] = _npy(dtype, tuple(tensor.shape), [flat[start : start + size]])
        start += size
    return ArrayRecord(out)


#: Flower's ``SType.NUMPY``: an Array whose data is ``np.save``'s bytes.
_NUMPY = "numpy.ndarray"


def _npy(dtype: np.dtype, shape: tuple[int, ...], parts: Sequence[memoryview]) -> Array:
    """The Array Flower builds from an ndarray (``Array(ndarray)``: ``np.save``'s bytes,
    header version 1.0), from the raw bytes of its elements in C order, copied once."""
    header = BytesIO()
    np.lib.format.write_array_header_1_0(
        header,
        {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": shape},
    )
    data = b"".join([header.getvalue(), *parts])
    return Array(dtype=str(dtype), shape=shape, stype=_NUMPY, data=data)


def _elements(value: torch.Tensor | Array) -> memoryview:
    """The raw bytes of a tensor's (or an Array's) elements in C order, native byte order:
    in place where they already are so."""
    if isinstance(value, Array):
        in_place = _plain_body(value)
        if in_place is not None:
            return in_place
        array = value.numpy()  # not np.save's C-order native bytes: decoded
    else:
        _numpy_dtype(value)  # a dtype NumPy lacks is refused by name
        array = value.detach().cpu().numpy()
    native = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("="))
    return native.reshape(-1).view(np.uint8).data


def _plain_body(array: Array) -> memoryview | None:
    """The element bytes of an Array holding ``np.save``'s bytes of a C-order array of a
    native, plain dtype, read in place; None for anything else."""
    try:
        shape, fortran, dtype, body = _npy_parts(array)
    except Exception:  # NumPy's parser raises several kinds
        return None
    plain = not (fortran or dtype.hasobject or not dtype.isnative)
    return body if plain and len(body) == math.prod(shape) * dtype.itemsize else None


def _npy_parts(array: Array) -> tuple[tuple[int, ...], bool, np.dtype, memoryview]:
    """The header (shape, Fortran order, dtype) of an Array holding ``np.save``'s bytes, and
    the bytes after it, read in place (NumPy's header parser: no pickle, a bounded header).

    Raises:
        ValueError: another stype, not an .npy header of version 1.0 or 2.0.
    """
    if array.stype != _NUMPY or not isinstance(array.data, bytes):
        raise ValueError("not NumPy bytes")
    stream = BytesIO(array.data)
    version = np.lib.format.read_magic(stream)
    if version == (1, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(stream)
    elif version == (2, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_2_0(stream)
    else:
        raise ValueError("an .npy version radfed does not read")
    return tuple(shape), bool(fortran), dtype, memoryview(array.data)[stream.tell() :]


def _packed_bytes(array: Array) -> memoryview:
    """The bytes of a received packed Array, read in place.

    Raises:
        InvalidReply: not a 1-D ``uint8`` NumPy array, or its header does not declare as
            many bytes as follow it (the cause of a decoding failure is not told: its text
            may quote the received bytes).
    """
    try:
        shape, fortran, dtype, body = _npy_parts(array)
    except Exception:
        raise InvalidReply("the packed weights cannot be decoded as a NumPy array") from None
    if dtype != np.uint8 or len(shape) != 1 or fortran:
        raise InvalidReply("the packed weights must be a 1-D uint8 array")
    if len(body) != shape[0]:
        # a Python literal has no digit limit: a count too long to print is not quoted
        declared = shape[0] if -(2**63) <= shape[0] < 2**64 else "an impossible number of"
        raise InvalidReply(
            f"the packed weights' header declares {declared} bytes, {len(body)} follow it"
        )
    return body


def _numpy_dtype(tensor: torch.Tensor) -> np.dtype:
    """The NumPy dtype of a tensor's elements (the tensor may be on any device).

    Raises:
        ConfigError: a dtype NumPy lacks (bfloat16, float8): it cannot travel as an Array.
    """
    try:
        return torch.empty((), dtype=tensor.dtype).numpy().dtype
    except TypeError:
        msg = (
            f"a model weight of dtype {tensor.dtype} cannot be sent (NumPy, and so Flower's "
            "Array, has no such type): keep the model's weights in float32 and let mixed "
            "precision cast inside autocast"
        )
        raise ConfigError(msg) from None
