"""Aggregation throughput: radfed's reply checks and FedAvg versus a plain memory copy.

Run from the repository root::

    .venv/bin/python bench/aggregation_bench.py [--sizes-mb 10 100 1000] [--sites 3 10 30 100]

For each model size x number of sites it builds the training replies the server receives
(real Flower ``Message`` objects whose content is what ``radfed.site.handlers`` sends: the
weights packed into one array (``radfed.federation.packing.pack``), the
``num-examples``/``train-loss`` MetricRecord and the site identity) and times, on a real
``RadfedFedAvg`` (``radfed.central.strategy``):

(a) *check*: the loop of ``RadfedChecks.aggregate_train`` before aggregation, for every
    reply: ``_checked`` (site identity), ``_check_update`` (record layout, metrics, the
    weights unpacked against the global model,
    ``radfed.federation.updates.validate_arrays``: names, decoded shapes and dtypes,
    finite values, and in the same pass the update's L2 distance from the global model);
(b) *aggregate*: the rest of it: ``_bounded`` (norm bound, calibrated in the warm-up at
    3 x the median, so that no reply is clipped; ``num-examples`` cap), Flower's
    ``FedAvg.aggregate_train`` (reply consistency check, ``aggregate_arrayrecords``,
    ``aggregate_metricrecords``), ``cast_like`` and the new global ``ArrayRecord``;
(c) *memcpy*: ``np.copyto`` of every reply array's bytes (the same bytes, array by array)
    into one preallocated buffer: the speed of touching those bytes at all.

Each is warmed up once, then timed ``--repeats`` times (check, aggregate, memcpy in turn,
so that load from other processes hits all three alike); the medians are reported as
bytes of weights per second (the bytes of the replies' arrays, 1 GB = 10^9 bytes) and as
the ratio (check + aggregate) / memcpy. With ``--end-to-end``, the whole
``aggregate_train`` also runs once per combination: it adds the checkpoint write
(``torch.save`` of the new global model into a temporary run folder).

Server memory per site: during the warm-up round the peak resident set size
(``VmHWM`` of ``/proc/self/status``, reset through ``/proc/self/clear_refs`` before the
round) and tracemalloc's peak are taken above the level before the replies were built
(after ``malloc_trim``); their slope over the site counts of one model size is the memory
each additional site costs the server, replies included.

The model is ResNet-18's state dict (torchvision names, 1 input channel, 2 classes: 122
tensors, 102 float32 and 20 int64 ``num_batches_tracked`` scalars) with its width scaled
to the size asked for (1 MB = 10^6 bytes). A combination whose estimated peak exceeds
``--max-memory-gb`` (or 90% of the memory available when it starts) is skipped and listed
with the reason. Results: ``<out>/aggregation_bench.json`` (every run, settings, machine
info) and ``<out>/aggregation_bench.md`` (summary tables); progress goes to stderr.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import logging
import math
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import tracemalloc
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, Message, MessageType, Metadata, MetricRecord, RecordDict

from radfed.central.run_folder import RunFolder
from radfed.central.strategy import RadfedChecks, RadfedFedAvg
from radfed.config import RunConfig
from radfed.federation.identity import SiteIdentity
from radfed.federation.packing import pack, unpack
from radfed.federation.schema import ARRAYS_KEY, METRICS_KEY, SITE_KEY
from radfed.federation.updates import cast_like
from radfed.log import logger

_BENCH_START = time.perf_counter()

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO_ROOT / "bench" / "results"
MB = 10**6
GB = 10**9

#: Estimated memory of a combination besides its replies, in copies of the model: the
#: global model, and at the end of a round FedAvg's ArrayRecord, ``cast_like``'s state and
#: the new ArrayRecord (FedAvg's accumulator is freed by then); plus, in copies of the
#: largest tensor, the float64 temporaries of the distance, the noise and the memcpy
#: buffer. The JSON records the measured peak beside the estimate.
_MODEL_COPIES = 4
_LARGEST_COPIES = 4
#: Standard deviations of the global weights and of a site's update to them.
_WEIGHT_SD = 0.05
_UPDATE_SD = 0.01


def progress(message: str) -> None:
    """One progress line on stderr, with the time since the benchmark started."""
    print(f"[{time.perf_counter() - _BENCH_START:6.1f}s] {message}", file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--sizes-mb",
        type=float,
        nargs="+",
        default=[10.0, 100.0, 1000.0],
        help="model sizes in MB of float32 weights (default 10 100 1000)",
    )
    parser.add_argument(
        "--sites", type=int, nargs="+", default=[3, 10, 30, 100], help="site counts"
    )
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per measurement")
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights and updates")
    parser.add_argument(
        "--max-memory-gb",
        type=float,
        default=8.0,
        help="skip combinations whose estimated peak is above this (default 8)",
    )
    parser.add_argument(
        "--end-to-end",
        action="store_true",
        help="also run the whole aggregate_train once per combination (adds the checkpoint "
        "write; one more round of time)",
    )
    parser.add_argument(
        "--out", type=Path, default=DEFAULT_OUT, help="results folder (default bench/results)"
    )
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error(f"--repeats must be at least 1, got {args.repeats}")
    if any(s < 1 for s in args.sites):
        parser.error(f"--sites must be positive, got {args.sites}")
    if any(not 0 < m < math.inf for m in args.sizes_mb):
        parser.error(f"--sizes-mb must be positive, got {args.sizes_mb}")
    if not args.max_memory_gb > 0:
        parser.error(f"--max-memory-gb must be positive, got {args.max_memory_gb}")
    args.sizes_mb = sorted(set(args.sizes_mb))
    args.sites = sorted(set(args.sites))
    return args


# ---------------------------------------------------------------------- the model


def resnet18_layers(width: int) -> list[tuple[str, tuple[int, ...], str]]:
    """ResNet-18's state dict (name, shape, dtype) with ``width`` channels in its first
    stage (64 in the original), 1 input channel and 2 classes."""
    layers: list[tuple[str, tuple[int, ...], str]] = []

    def bn(prefix: str, channels: int) -> None:
        for part in ("weight", "bias", "running_mean", "running_var"):
            layers.append((f"{prefix}.{part}", (channels,), "float32"))
        layers.append((f"{prefix}.num_batches_tracked", (), "int64"))

    layers.append(("conv1.weight", (width, 1, 7, 7), "float32"))
    bn("bn1", width)
    c_in = width
    for stage in range(1, 5):
        c_out = width * 2 ** (stage - 1)
        for block in range(2):
            prefix = f"layer{stage}.{block}"
            first_in = c_in if block == 0 else c_out
            layers.append((f"{prefix}.conv1.weight", (c_out, first_in, 3, 3), "float32"))
            bn(f"{prefix}.bn1", c_out)
            layers.append((f"{prefix}.conv2.weight", (c_out, c_out, 3, 3), "float32"))
            bn(f"{prefix}.bn2", c_out)
            if block == 0 and stage > 1:
                layers.append((f"{prefix}.downsample.0.weight", (c_out, c_in, 1, 1), "float32"))
                bn(f"{prefix}.downsample.1", c_out)
        c_in = c_out
    layers.append(("fc.weight", (2, 8 * width), "float32"))
    layers.append(("fc.bias", (2,), "float32"))
    return layers


def _nbytes(layers: list[tuple[str, tuple[int, ...], str]]) -> int:
    return sum(math.prod(shape) * np.dtype(dtype).itemsize for _, shape, dtype in layers)


def layers_for(target_bytes: float) -> tuple[int, list[tuple[str, tuple[int, ...], str]]]:
    """The width whose ResNet-18 state dict is closest to ``target_bytes``, and its layers."""
    width = 1
    while _nbytes(resnet18_layers(width + 1)) <= target_bytes:
        width += 1
    below, above = _nbytes(resnet18_layers(width)), _nbytes(resnet18_layers(width + 1))
    if abs(above - target_bytes) < abs(below - target_bytes):
        width += 1
    return width, resnet18_layers(width)


def make_reference(
    layers: list[tuple[str, tuple[int, ...], str]], rng: np.random.Generator
) -> OrderedDict[str, np.ndarray]:
    """The global model: normal float32 weights of standard deviation ``_WEIGHT_SD``, int64
    buffers 0."""
    out: OrderedDict[str, np.ndarray] = OrderedDict()
    for name, shape, dtype in layers:
        if dtype == "int64":
            out[name] = np.zeros(shape, dtype=np.int64)
        else:
            values = rng.standard_normal(shape, dtype=np.float32)
            values *= np.float32(_WEIGHT_SD)
            out[name] = values
    return out


def make_noise(reference: OrderedDict[str, np.ndarray], rng: np.random.Generator) -> np.ndarray:
    """Flat normal noise of standard deviation ``_UPDATE_SD``, twice the largest tensor's
    elements: each site's update to a tensor is a window of it (memory: not a model copy)."""
    largest = max(v.size for v in reference.values())
    noise = rng.standard_normal(2 * largest, dtype=np.float32)
    noise *= np.float32(_UPDATE_SD)
    return noise


def make_replies(
    reference: OrderedDict[str, np.ndarray], noise: np.ndarray, sites: int
) -> list[Message]:
    """The training replies of ``sites`` sites, as the server receives them.

    Site ``i`` sends ``reference + (1 + i / sites) * noise window`` (windows differ by site
    and tensor; int64 buffers advanced by 10 steps) as ``radfed.site.handlers`` builds a
    reply: ``ArrayRecord`` of a torch state dict, ``num-examples`` ``100 + 7 i``, its
    identity, and the metadata of a reply from node ``1000 + i``.
    """
    replies: list[Message] = []
    room = noise.size // 2
    for i in range(sites):
        scale = np.float32(1 + i / sites)
        state: OrderedDict[str, torch.Tensor] = OrderedDict()
        for t, (name, ref) in enumerate(reference.items()):
            if ref.dtype.kind == "f":
                start = (7919 * i + 104729 * t) % room
                values = noise[start : start + ref.size].reshape(ref.shape) * scale
                values += ref
            else:
                values = np.array(ref + 10)
            state[name] = torch.from_numpy(values)
        content = RecordDict(
            {
                ARRAYS_KEY: pack(state),  # as a site sends them
                METRICS_KEY: MetricRecord({"num-examples": 100 + 7 * i, "train-loss": 0.5}),
                SITE_KEY: SiteIdentity.local(f"site-{i:03d}").to_record(),
            }
        )
        del state
        metadata = Metadata(
            run_id=1,
            message_id=f"reply-{i}",
            src_node_id=1000 + i,
            dst_node_id=0,
            reply_to_message_id=f"instruction-{i}",
            group_id="1",
            created_at=time.time(),
            ttl=600.0,
            message_type=MessageType.TRAIN,
        )
        replies.append(Message(content=content, metadata=metadata))
    return replies


# ---------------------------------------------------------------------- the phases


def check(strategy: RadfedFedAvg, replies: list[Message]) -> list[tuple[Message, str, float]]:
    """The checks of ``RadfedChecks.aggregate_train``, reply by reply, as it calls them."""
    checked: list[tuple[Message, str, float]] = []
    for msg, site in strategy._checked(1, replies, "update"):
        _, norm = strategy._check_update(msg.content)
        checked.append((msg, site, norm))
    if len(checked) != len(replies):
        msg_ = f"only {len(checked)} of {len(replies)} replies passed the checks"
        raise RuntimeError(msg_)
    return checked


def aggregate(
    strategy: RadfedFedAvg, checked: list[tuple[Message, str, float]]
) -> OrderedDict[str, torch.Tensor]:
    """The rest of ``RadfedChecks.aggregate_train`` up to the checkpoint: the norm bound,
    Flower's FedAvg, the cast back to the model's dtypes and the new global ArrayRecord."""
    accepted = strategy._bounded(1, checked)
    if len(accepted) != len(checked):
        msg = f"only {len(accepted)} of {len(checked)} replies were accepted"
        raise RuntimeError(msg)
    arrays, _ = super(RadfedChecks, strategy).aggregate_train(1, accepted)  # type: ignore[misc]
    state = cast_like(arrays, strategy.reference)
    ArrayRecord(state)
    _, dropped = strategy.take_ledger()
    if dropped:
        raise RuntimeError(f"replies dropped: {dropped}")
    return state


def memcpy(replies: list[Message], buffer: np.ndarray) -> int:
    """Copy the bytes of every reply array into ``buffer``; the bytes copied."""
    copied = 0
    for msg in replies:
        for array in msg.content[ARRAYS_KEY].values():  # type: ignore[union-attr]
            source = np.frombuffer(array.data, dtype=np.uint8)
            np.copyto(buffer[: source.size], source)
            copied += source.size
    return copied


def timed_round(
    strategy: RadfedFedAvg, replies: list[Message]
) -> tuple[float, float, OrderedDict[str, torch.Tensor], list[float]]:
    """Seconds of ``check`` and of ``aggregate`` for one round, the new global model and
    the update norms."""
    start = time.perf_counter()
    checked = check(strategy, replies)  # replaces each reply's packed weights by named ones
    middle = time.perf_counter()
    state = aggregate(strategy, checked)
    end = time.perf_counter()
    for msg in replies:  # packed again, as received, for the next round (the same bytes)
        msg.content[ARRAYS_KEY] = pack(msg.content[ARRAYS_KEY])  # type: ignore[arg-type]
    return middle - start, end - middle, state, [n for _, _, n in checked]


def _timed_memcpy(replies: list[Message], buffer: np.ndarray, payload: int) -> float:
    start = time.perf_counter()
    copied = memcpy(replies, buffer)
    seconds = time.perf_counter() - start
    if copied != payload:
        raise RuntimeError(f"memcpy copied {copied} bytes, not {payload}")
    return seconds


# ---------------------------------------------------------------------- memory


def _proc_status(field: str) -> int | None:
    """A ``kB`` field of ``/proc/self/status`` in bytes (None where there is none)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def _available_bytes() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _trim() -> None:
    """Collect garbage and give freed heap pages back to the OS, so RSS reads true."""
    gc.collect()
    with suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


@contextmanager
def _counting_decodes(counter: list[int]) -> Iterator[None]:
    """Count ``Array.numpy`` calls (each one decodes an array's bytes) and bytes decoded."""
    original = Array.numpy

    def counted(self: Array) -> np.ndarray:
        counter[0] += 1
        counter[1] += len(self.data)
        return original(self)

    Array.numpy = counted  # type: ignore[method-assign]
    try:
        yield
    finally:
        Array.numpy = original  # type: ignore[method-assign]


# ---------------------------------------------------------------------- one combination


def estimate_peak(model_bytes: int, largest: int, sites: int) -> int:
    return model_bytes * (sites + _MODEL_COPIES) + largest * _LARGEST_COPIES


def run_one(
    *,
    reference_np: OrderedDict[str, np.ndarray],
    noise: np.ndarray,
    sites: int,
    repeats: int,
    end_to_end: bool,
    work: Path,
) -> dict[str, Any]:
    """Warm-up (memory measured), then ``repeats`` timed check / aggregate / memcpy runs."""
    reference = OrderedDict((k, torch.from_numpy(v)) for k, v in reference_np.items())
    config = RunConfig(num_server_rounds=1, min_sites=sites)
    run_dir = work / f"run-{sites}"
    strategy = RadfedFedAvg(
        config=config, reference=reference, run=RunFolder.start(run_dir, config)
    )
    largest = sum(v.nbytes for v in reference_np.values())  # a reply is one packed array
    buffer = np.zeros(largest + 1024, dtype=np.uint8)  # + the .npy header

    _trim()
    rss_before = _proc_status("VmRSS")
    tracemalloc.start()
    traced_before = tracemalloc.get_traced_memory()[0]
    start = time.perf_counter()
    replies = make_replies(reference_np, noise, sites)
    build_s = time.perf_counter() - start
    _trim()
    held_traced = tracemalloc.get_traced_memory()[0] - traced_before
    rss_held = _proc_status("VmRSS")
    payload = sum(
        len(a.data)
        for m in replies
        for a in m.content[ARRAYS_KEY].values()  # type: ignore[union-attr]
    )

    # warm-up: one round, its memory measured and its decodes counted
    tracemalloc.reset_peak()
    hwm_reset = _reset_peak_rss()
    decodes = [0, 0]
    with _counting_decodes(decodes):
        warm_check_s, warm_aggregate_s, state, norms = timed_round(strategy, replies)
    peak_traced = tracemalloc.get_traced_memory()[1] - traced_before
    rss_hwm = _proc_status("VmHWM")
    tracemalloc.stop()
    _verify(state, replies, reference_np)
    del state
    warm_memcpy_s = _timed_memcpy(replies, buffer, payload)

    runs: dict[str, list[float]] = {"check": [], "aggregate": [], "memcpy": []}
    for i in range(repeats):
        check_s, aggregate_s = timed_round(strategy, replies)[:2]  # the model freed
        memcpy_s = _timed_memcpy(replies, buffer, payload)
        runs["check"].append(check_s)
        runs["aggregate"].append(aggregate_s)
        runs["memcpy"].append(memcpy_s)
        progress(
            f"    run {i + 1}/{repeats}: check {check_s:.3f}s, aggregate {aggregate_s:.3f}s, "
            f"memcpy {memcpy_s:.3f}s"
        )

    e2e: dict[str, Any] | None = None
    if end_to_end:
        start = time.perf_counter()
        strategy.aggregate_train(1, replies)
        e2e = {"aggregate_train_s": time.perf_counter() - start}
        strategy.reference = reference
        strategy.take_ledger()
    shutil.rmtree(run_dir, ignore_errors=True)

    medians = {k: statistics.median(v) for k, v in runs.items()}
    both = medians["check"] + medians["aggregate"]
    result: dict[str, Any] = {
        "sites": sites,
        "payload_bytes": payload,
        "build_replies_s": build_s,
        "warmup_s": {"check": warm_check_s, "aggregate": warm_aggregate_s, "memcpy": warm_memcpy_s},
        "runs_s": runs,
        "median_s": medians,
        "gb_per_s": {
            "check": payload / medians["check"] / GB,
            "aggregate": payload / medians["aggregate"] / GB,
            "check_and_aggregate": payload / both / GB,
            "memcpy": payload / medians["memcpy"] / GB,
        },
        "ratio_check_and_aggregate_to_memcpy": both / medians["memcpy"],
        "ratio_check_to_memcpy": medians["check"] / medians["memcpy"],
        "ratio_aggregate_to_memcpy": medians["aggregate"] / medians["memcpy"],
        "decodes_in_round": {
            "array_numpy_calls": decodes[0],
            "bytes_decoded": decodes[1],
            "bytes_decoded_per_payload_byte": decodes[1] / payload,
        },
        "norms": {"min": min(norms), "max": max(norms), "bound": strategy.calibrated_norm},
        "memory": {
            "estimated_peak_bytes": estimate_peak(
                sum(v.nbytes for v in reference_np.values()), largest, sites
            ),
            "held_replies_traced_bytes": held_traced,
            "held_replies_rss_bytes": None
            if rss_before is None or rss_held is None
            else rss_held - rss_before,
            "peak_traced_bytes": peak_traced,
            "peak_rss_bytes": None
            if rss_before is None or rss_hwm is None or not hwm_reset
            else rss_hwm - rss_before,
        },
    }
    if e2e is not None:
        e2e["checkpoint_and_rest_s"] = e2e["aggregate_train_s"] - both
        result["end_to_end"] = e2e
    return result


def _verify(
    state: OrderedDict[str, torch.Tensor],
    replies: list[Message],
    reference: OrderedDict[str, np.ndarray],
) -> None:
    """The aggregate of the first float tensor is the examples-weighted mean of the replies."""
    name = next(k for k, v in reference.items() if v.dtype.kind == "f")
    weights = np.array(
        [float(m.content[METRICS_KEY]["num-examples"]) for m in replies]  # type: ignore[arg-type]
    )
    values = [
        unpack(m.content[ARRAYS_KEY], state)[name].numpy()  # type: ignore[arg-type]
        for m in replies
    ]
    expected = sum(w * v.astype(np.float64) for w, v in zip(weights, values, strict=True))
    expected = expected / weights.sum()
    if not np.allclose(state[name].numpy(), expected, rtol=1e-4, atol=1e-6):
        raise RuntimeError(f"the aggregate of {name!r} is not the weighted mean of the replies")


# ---------------------------------------------------------------------- report


def machine_info() -> dict[str, Any]:
    import flwr

    import radfed

    try:
        usable: int | None = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        usable = os.cpu_count()
    available = _available_bytes()
    return {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "processor": platform.processor(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "cpu_usable": usable,
        "memory_available_gb": None if available is None else available / GB,
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "versions": {
            "radfed": getattr(radfed, "__version__", "unknown"),
            "flwr": flwr.__version__,
            "numpy": np.__version__,
            "torch": torch.__version__,
        },
    }


def per_site_memory(results: list[dict[str, Any]], model_bytes: int) -> dict[str, Any]:
    """Slopes over the site counts of one model size: memory per additional site."""
    out: dict[str, Any] = {"points": len(results)}
    for key in ("peak_rss_bytes", "peak_traced_bytes", "held_replies_traced_bytes"):
        points = [(r["sites"], r["memory"][key]) for r in results if r["memory"][key] is not None]
        if len(points) < 2:
            out[key] = None
            continue
        fit = statistics.linear_regression([p[0] for p in points], [p[1] for p in points])
        out[key] = {
            "per_site_bytes": fit.slope,
            "per_site_model_copies": fit.slope / model_bytes,
            "intercept_bytes": fit.intercept,
        }
    return out


def _fmt(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def markdown(result: dict[str, Any]) -> str:
    settings = result["settings"]
    lines = [
        "# Aggregation throughput: radfed's checks + FedAvg versus memcpy",
        "",
        f"{result['timestamp']}, {result['machine']['cpu_usable']} usable CPUs, "
        f"load average at start {_loads(result['machine']['load_average'])}, "
        f"at end {_loads(result['load_average_end'])} (a shared machine: other processes "
        f"ran beside this one). Repeats {settings['repeats']} (median, after a warm-up), "
        f"seed {settings['seed']}. GB/s: bytes of the replies' weights per second "
        "(1 GB = 10^9 bytes); ratio: (check + aggregate) time over memcpy time of the "
        "same bytes. Peak RSS: above the process before the replies were built.",
        "",
        "| model MB | sites | replies GB | check GB/s | aggregate GB/s | check+aggr GB/s "
        "| memcpy GB/s | ratio | peak RSS GB | end-to-end s |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for size in result["sizes"]:
        for r in size["results"]:
            e2e = r.get("end_to_end", {}).get("aggregate_train_s")
            rss = r["memory"]["peak_rss_bytes"]
            lines.append(
                f"| {size['model_bytes'] / MB:.0f} | {r['sites']} | {r['payload_bytes'] / GB:.2f} "
                f"| {r['gb_per_s']['check']:.2f} | {r['gb_per_s']['aggregate']:.2f} "
                f"| {r['gb_per_s']['check_and_aggregate']:.2f} | {r['gb_per_s']['memcpy']:.2f} "
                f"| {r['ratio_check_and_aggregate_to_memcpy']:.1f} "
                f"| {_fmt(None if rss is None else rss / GB, '.2f')} | {_fmt(e2e, '.2f')} |"
            )
    lines += [
        "",
        "Server memory per additional site (least-squares slope of the round's peak over the "
        "site counts; fixed: its intercept):",
        "",
        "| model MB | tensors | site counts | peak RSS MB/site | x model "
        "| peak RSS fixed MB | tracemalloc peak MB/site | replies held MB/site |",
        "|---:|---:|---|---:|---:|---:|---:|---:|",
    ]
    for size in result["sizes"]:
        memory, counts = size["memory_per_site"], [r["sites"] for r in size["results"]]
        rss, traced, held = (
            memory.get(k)
            for k in ("peak_rss_bytes", "peak_traced_bytes", "held_replies_traced_bytes")
        )
        lines.append(
            f"| {size['model_bytes'] / MB:.0f} | {size['tensors']} | {counts or 'none'} "
            f"| {_fmt(rss and rss['per_site_bytes'] / MB, '.1f')} "
            f"| {_fmt(rss and rss['per_site_model_copies'], '.2f')} "
            f"| {_fmt(rss and rss['intercept_bytes'] / MB, '.0f')} "
            f"| {_fmt(traced and traced['per_site_bytes'] / MB, '.1f')} "
            f"| {_fmt(held and held['per_site_bytes'] / MB, '.1f')} |"
        )
    if result["skipped"]:
        lines += ["", "Skipped:", ""]
        lines += [
            f"- {s['model_mb']:g} MB x {s['sites']} sites: {s['reason']}" for s in result["skipped"]
        ]
    lines += ["", "## What this shows", "", _what_this_shows(result), ""]
    return "\n".join(lines)


def _loads(loads: Any) -> str:
    return "n/a" if not loads else "/".join(f"{x:.1f}" for x in loads)


def _what_this_shows(result: dict[str, Any]) -> str:
    rows = [r for size in result["sizes"] for r in size["results"]]
    if not rows:
        return "No combination fitted in memory; nothing was measured."
    ratios = [r["ratio_check_and_aggregate_to_memcpy"] for r in rows]
    both = [r["gb_per_s"]["check_and_aggregate"] for r in rows]
    copy = [r["gb_per_s"]["memcpy"] for r in rows]
    check_share = statistics.median(
        r["median_s"]["check"] / (r["median_s"]["check"] + r["median_s"]["aggregate"]) for r in rows
    )
    decoded = statistics.median(
        r["decodes_in_round"]["bytes_decoded_per_payload_byte"] for r in rows
    )
    copies = [
        s["memory_per_site"]["peak_rss_bytes"]["per_site_model_copies"]
        for s in result["sizes"]
        if s["memory_per_site"].get("peak_rss_bytes")
    ]
    memory = (
        f"Each additional site costs the server {min(copies):.2f} to {max(copies):.2f} times the "
        "model's size in peak RSS: its reply, held until the round is aggregated (the "
        "round's own allocations are the fixed part, the intercept in the table)"
        if copies
        else "Memory per site needs at least two site counts of one size"
    )
    spreads = [
        max(v) / min(v)
        for v in (
            [r["gb_per_s"]["check_and_aggregate"] for r in s["results"]] for s in result["sizes"]
        )
        if len(v) > 1
    ]
    spread = (
        f"Across the site counts of one model size, check+aggregate GB/s varies by up to "
        f"{max(spreads):.1f}x, so the time of a round is not exactly proportional to sites x "
        "model size. "
        if spreads and max(spreads) > 1.5
        else f"Across the site counts of one model size, check+aggregate GB/s varies by at "
        f"most {max(spreads):.1f}x: a round's server time grows about linearly with sites x "
        "model size. "
        if spreads
        else ""
    )
    return (
        f"Checking and aggregating the replies runs at {min(both):.2f} to {max(both):.2f} GB/s "
        f"of weights, {min(ratios):.0f} to {max(ratios):.0f} times the time of a plain memory "
        f"copy of the same bytes ({min(copy):.1f} to {max(copy):.1f} GB/s here); the checks "
        f"take a median {100 * check_share:.0f}% of it. In one round each received byte is "
        f"decoded from its .npy bytes {decoded:.1f} times (``Array.numpy()``: once in "
        "``validate_arrays`` (with the distance), once in FedAvg, plus the aggregate once "
        "in ``cast_like``; ``unpack`` reads the packed reply in place and copies each "
        "tensor's bytes once into its named Array), so the "
        f"checks make several passes over each reply where a copy makes one. {memory}. "
        f"{spread}The machine was shared with other CPU-heavy work (load averages above): "
        "absolute GB/s are lower, and vary more, than on an idle machine; each ratio is timed "
        "in alternation with its copy, so it is less exposed to that."
    )


# ---------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    logger.setLevel(logging.ERROR)  # the strategy's per-round lines
    logging.getLogger("flwr").setLevel(logging.ERROR)
    info = machine_info()
    budget = int(args.max_memory_gb * GB)
    progress(
        f"sizes {args.sizes_mb} MB, sites {args.sites}, repeats {args.repeats}, "
        f"seed {args.seed}, memory budget {args.max_memory_gb:g} GB, "
        f"load average {_loads(info['load_average'])}"
    )
    sizes: list[dict[str, Any]] = []
    skipped: list[dict[str, Any]] = []
    work = Path(tempfile.mkdtemp(prefix="radfed-aggregation-bench-"))
    try:
        for size_mb in args.sizes_mb:
            width, layers = layers_for(size_mb * MB)
            model_bytes = _nbytes(layers)
            largest = max(math.prod(s) * np.dtype(d).itemsize for _, s, d in layers)
            size_result: dict[str, Any] = {
                "model_mb_asked": size_mb,
                "model_bytes": model_bytes,
                "resnet18_width": width,
                "tensors": len(layers),
                "largest_tensor_bytes": largest,
                "results": [],
            }
            sizes.append(size_result)
            fitting = []
            for sites in args.sites:
                estimate = estimate_peak(model_bytes, largest, sites)
                available = _available_bytes()
                reason = None
                if estimate > budget:
                    reason = (
                        f"estimated peak {estimate / GB:.1f} GB is above --max-memory-gb "
                        f"{args.max_memory_gb:g}"
                    )
                elif available is not None and estimate > 0.9 * available:
                    reason = (
                        f"estimated peak {estimate / GB:.1f} GB is above 90% of the "
                        f"{available / GB:.1f} GB available now"
                    )
                if reason:
                    skipped.append({"model_mb": size_mb, "sites": sites, "reason": reason})
                    progress(f"skip {size_mb:g} MB x {sites} sites: {reason}")
                else:
                    fitting.append(sites)
            if not fitting:
                continue
            progress(
                f"model {model_bytes / MB:.1f} MB: ResNet-18 width {width}, {len(layers)} "
                f"tensors, largest {largest / MB:.1f} MB"
            )
            rng = np.random.default_rng([args.seed, int(size_mb * 1000)])
            reference_np = make_reference(layers, rng)
            noise = make_noise(reference_np, rng)
            for sites in fitting:
                progress(f"  {model_bytes / MB:.0f} MB x {sites} sites")
                result = run_one(
                    reference_np=reference_np,
                    noise=noise,
                    sites=sites,
                    repeats=args.repeats,
                    end_to_end=args.end_to_end,
                    work=work,
                )
                size_result["results"].append(result)
                mem = result["memory"]
                progress(
                    f"    {result['payload_bytes'] / GB:.2f} GB: check "
                    f"{result['gb_per_s']['check']:.2f} GB/s, aggregate "
                    f"{result['gb_per_s']['aggregate']:.2f} GB/s, memcpy "
                    f"{result['gb_per_s']['memcpy']:.2f} GB/s, ratio "
                    f"{result['ratio_check_and_aggregate_to_memcpy']:.1f}; peak RSS "
                    f"{_fmt(mem['peak_rss_bytes'] and mem['peak_rss_bytes'] / GB, '.2f')} GB "
                    f"(estimated {mem['estimated_peak_bytes'] / GB:.2f})"
                )
                _trim()
            size_result["memory_per_site"] = per_site_memory(size_result["results"], model_bytes)
            del reference_np, noise
            _trim()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    for size_result in sizes:
        size_result.setdefault("memory_per_site", per_site_memory([], size_result["model_bytes"]))

    result: dict[str, Any] = {
        "benchmark": "radfed aggregation throughput: reply checks + FedAvg vs memcpy",
        "timestamp": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": [Path(sys.executable).name, *sys.argv],
        "settings": {
            "sizes_mb": args.sizes_mb,
            "sites": args.sites,
            "repeats": args.repeats,
            "seed": args.seed,
            "max_memory_gb": args.max_memory_gb,
            "end_to_end": args.end_to_end,
            "strategy": "RadfedFedAvg (max_update_norm None: calibrated, 3 x median)",
            "model": "ResNet-18 state dict, width scaled; float32 weights, int64 BN counters",
            "memory": "peak RSS: VmHWM reset via /proc/self/clear_refs; tracemalloc peak",
            "units": "1 MB = 10^6 bytes, 1 GB = 10^9 bytes",
        },
        "machine": info,
        "load_average_end": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "elapsed_s": time.perf_counter() - _BENCH_START,
        "sizes": sizes,
        "skipped": skipped,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "aggregation_bench.json").write_text(json.dumps(result, indent=2) + "\n")
    table = markdown(result)
    (args.out / "aggregation_bench.md").write_text(table)
    print(table)
    progress(f"wrote {args.out / 'aggregation_bench.json'} and aggregation_bench.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
