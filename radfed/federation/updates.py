"""Checks of a weight update against the global model, and casting the aggregate back."""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Mapping

import numpy as np
import torch
from flwr.app import ArrayRecord

from radfed.federation.codes import InvalidReply

__all__ = ["cast_like", "clip_update", "validate_arrays"]


def validate_arrays(
    record: ArrayRecord,
    reference: Mapping[str, torch.Tensor],
    *,
    max_update_norm: float | None = None,
) -> float:
    """Check an update against the global model: names, decoded shapes and dtypes, values.

    Each array is decoded once, as aggregation will decode it, so the checks hold for the
    data and not only for the declared ``shape``/``dtype`` metadata; the update's distance
    from the global model is measured in the same pass.

    Args:
        record: the update as received.
        reference: the current global weights.
        max_update_norm: largest allowed L2 distance between the update and ``reference``,
            over the floating-point tensors taken together; None for no bound.

    Returns:
        The L2 distance of the update from ``reference`` over the floating-point tensors
        taken together (inf when it overflows).

    Raises:
        InvalidReply: naming the first offending array, or the norm and its bound.
    """
    if list(record.keys()) != list(reference.keys()):
        missing = sorted(set(reference) - set(record.keys()))
        extra = sorted(set(record.keys()) - set(reference))
        raise InvalidReply(
            f"weights differ from the model (missing {missing[:3]}, extra {extra[:3]})"
        )
    squared = 0.0
    for name, ref in reference.items():
        expected = ref.detach().cpu().numpy()
        values = _decode(record, name)
        if values.shape != expected.shape:
            raise InvalidReply(
                f"weight {name!r} has shape {values.shape}, expected {expected.shape}"
            )
        if values.dtype != expected.dtype:
            raise InvalidReply(
                f"weight {name!r} has dtype {values.dtype}, expected {expected.dtype}"
            )
        if values.dtype.kind != "f":
            continue
        if not np.isfinite(values).all():
            raise InvalidReply(f"weight {name!r} holds non-finite values")
        with np.errstate(over="ignore", invalid="ignore"):
            diff = np.subtract(values, expected, dtype=np.float64).ravel()
            squared += float(np.dot(diff, diff))
    norm = math.sqrt(squared) if math.isfinite(squared) else math.inf
    if max_update_norm is not None and not norm <= max_update_norm:
        raise InvalidReply(
            f"update is {norm:.3g} from the global model (L2), above the bound "
            f"{max_update_norm:.3g}"
        )
    return norm


def _decode(record: ArrayRecord, name: str) -> np.ndarray:
    """One array of ``record`` decoded as aggregation decodes it.

    Raises:
        InvalidReply: the array cannot be decoded to a NumPy array (the cause is not told:
            its text may quote the received bytes).
    """
    try:
        values = record[name].numpy()
    except Exception:
        raise InvalidReply(f"weight {name!r} cannot be decoded as a NumPy array") from None
    if not isinstance(values, np.ndarray):
        raise InvalidReply(f"weight {name!r} cannot be decoded as a NumPy array")
    return values


def cast_like(
    record: ArrayRecord, reference: Mapping[str, torch.Tensor]
) -> OrderedDict[str, torch.Tensor]:
    """Aggregated arrays as a state dict with the reference dtypes.

    Weighted averaging turns integer buffers (BatchNorm ``num_batches_tracked``) into
    float64; they are rounded back to their integer dtype here.
    """
    out: OrderedDict[str, torch.Tensor] = OrderedDict()
    for name, ref in reference.items():
        value = torch.from_numpy(np.array(record[name].numpy()))
        if not ref.dtype.is_floating_point:
            value = torch.round(value)
        out[name] = value.to(ref.dtype)
    return out


def clip_update(
    record: ArrayRecord, reference: Mapping[str, torch.Tensor], scale: float
) -> ArrayRecord:
    """``reference + scale * (update - reference)`` for the floating-point tensors (the rest
    unchanged), in the update's dtypes: an update clipped to a norm bound."""
    out: OrderedDict[str, torch.Tensor] = OrderedDict()
    for name, ref in reference.items():
        value = torch.from_numpy(np.array(record[name].numpy()))
        if ref.is_floating_point():
            base = ref.detach().cpu().to(torch.float64)
            value = (base + scale * (value.to(torch.float64) - base)).to(value.dtype)
        out[name] = value
    return ArrayRecord(out)
