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
from collections import OrderedDict
from collections.abc import Mapping
from io import BytesIO

import numpy as np
import torch
from flwr.app import Array, ArrayRecord

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

    Holds one copy of the bytes beside the result (and, from an ArrayRecord, one tensor
    decoded at a time).

    Returns:
        An ArrayRecord of one 1-D ``uint8`` Array named ``PACKED``.
    """
    buffer = BytesIO()
    for value in state.values():
        array = value.numpy() if isinstance(value, Array) else value.detach().cpu().numpy()
        buffer.write(np.ascontiguousarray(array).reshape(-1).view(np.uint8).data)
    flat = np.frombuffer(buffer.getbuffer(), dtype=np.uint8)
    return ArrayRecord({PACKED: Array(flat)})


def unpack(
    record: ArrayRecord, like: Mapping[str, torch.Tensor], packed_by: str | None = None
) -> ArrayRecord:
    """Packed weights as a named ArrayRecord, sliced by ``like`` (the receiver's own state
    dict: its names, shapes, dtypes and order; its values are not read).

    Holds one decoded copy of the bytes beside the result.

    Args:
        record: the received ArrayRecord.
        like: the receiver's own state dict.
        packed_by: the sender's ``layout`` digest, when it sent one.

    Raises:
        InvalidReply: not exactly one Array named ``PACKED``, not a 1-D ``uint8`` array,
            not as many bytes as ``like`` holds (both numbers are named, no value), or
            ``packed_by`` is not ``like``'s layout.
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
    try:
        flat = record[PACKED].numpy()
    except Exception:  # its text may quote the received bytes
        raise InvalidReply("the packed weights cannot be decoded as a NumPy array") from None
    if not isinstance(flat, np.ndarray) or flat.dtype != np.uint8 or flat.ndim != 1:
        raise InvalidReply("the packed weights must be a 1-D uint8 array")
    dtypes = [_numpy_dtype(tensor) for tensor in like.values()]
    sizes = [t.numel() * d.itemsize for t, d in zip(like.values(), dtypes, strict=True)]
    if flat.size != sum(sizes):
        raise InvalidReply(
            f"the packed weights hold {flat.size} bytes, the model needs {sum(sizes)} "
            f"({len(sizes)} tensors)"
        )
    out: OrderedDict[str, Array] = OrderedDict()
    start = 0
    for (name, tensor), dtype, size in zip(like.items(), dtypes, sizes, strict=True):
        part = flat[start : start + size].view(dtype).reshape(tuple(tensor.shape))
        out[name] = Array(part)
        start += size
    return ArrayRecord(out)


def _numpy_dtype(tensor: torch.Tensor) -> np.dtype:
    """The NumPy dtype of a tensor's elements (the tensor may be on any device)."""
    return torch.empty((), dtype=tensor.dtype).numpy().dtype
