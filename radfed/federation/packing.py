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
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from io import BytesIO

import numpy as np
import torch
from flwr.app import Array, ArrayRecord

from radfed.federation.codes import InvalidReply

__all__ = ["PACKED", "pack", "unpack"]

#: The name of the one Array of a packed ArrayRecord.
PACKED = "packed"


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


def unpack(record: ArrayRecord, layout: Mapping[str, torch.Tensor]) -> ArrayRecord:
    """Packed weights as a named ArrayRecord, sliced by ``layout`` (the receiver's own state
    dict: its names, shapes, dtypes and order; its values are not read).

    Holds one decoded copy of the bytes beside the result.

    Raises:
        InvalidReply: not exactly one Array named ``PACKED``, not a 1-D ``uint8`` array, or
            not as many bytes as ``layout`` holds (both numbers are named, no value).
    """
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
    dtypes = [_numpy_dtype(tensor) for tensor in layout.values()]
    sizes = [t.numel() * d.itemsize for t, d in zip(layout.values(), dtypes, strict=True)]
    if flat.size != sum(sizes):
        raise InvalidReply(
            f"the packed weights hold {flat.size} bytes, the model needs {sum(sizes)} "
            f"({len(sizes)} tensors)"
        )
    out: OrderedDict[str, Array] = OrderedDict()
    start = 0
    for (name, tensor), dtype, size in zip(layout.items(), dtypes, sizes, strict=True):
        part = flat[start : start + size].view(dtype).reshape(tuple(tensor.shape))
        out[name] = Array(part)
        start += size
    return ArrayRecord(out)


def _numpy_dtype(tensor: torch.Tensor) -> np.dtype:
    """The NumPy dtype of a tensor's elements (the tensor may be on any device)."""
    return torch.empty((), dtype=tensor.dtype).numpy().dtype
