"""Attacks on the packed wire format (``radfed.federation.packing``) from both sides, on
Flower's object pulls as ``quick_object_pulls`` retunes them, and on the edge's kept-open
connections to the SuperLink.

A malicious server crafts the packed array a site unpacks; a malicious site crafts the one the
server unpacks; both go through ``unpack``, so each crafted array is tried against ``unpack``
itself and against the server's round (``RadfedFedAvg.aggregate_train``). The site handlers'
side is in ``tests/site/test_packed_message_attacks.py``.
"""

from __future__ import annotations

import asyncio
import inspect
import io
import pickle
import socket
import ssl
import sys
import threading
import time
import types
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict

from radfed.central import server
from radfed.central.run_folder import RunFolder
from radfed.central.strategy import RadfedFedAvg
from radfed.config import RunConfig, TaskName
from radfed.federation.checkpoint import load_checkpoint, save_checkpoint
from radfed.federation.codes import InvalidReply
from radfed.federation.identity import SiteIdentity
from radfed.federation.packing import PACKED, pack, unpack
from radfed.federation.weights import local_keys, shared_state
from radfed.flower_private import quick_object_pulls
from radfed.tasks import get_task
from tests.helpers import make_message, needs_nginx
from tests.services import running_edge

LAYOUT = {
    "w": torch.arange(6, dtype=torch.float32).reshape(2, 3),
    "h": torch.ones(3, dtype=torch.float16),
    "n": torch.tensor(7),
}
SIZE = 24 + 6 + 8


def _npy(shape: tuple[int, ...], descr: Any = "|u1", payload: bytes = b"") -> bytes:
    """A hand-written .npy: a header saying anything, followed by ``payload``."""
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        buffer, {"descr": descr, "fortran_order": False, "shape": shape}
    )
    return buffer.getvalue() + payload


def _raw(data: bytes, *, dtype: str = "uint8", shape: tuple[int, ...] = (SIZE,)) -> ArrayRecord:
    """A packed record whose Array carries ``data`` and metadata that may lie."""
    return ArrayRecord({PACKED: Array(dtype, shape, "numpy.ndarray", data)})


class _Pickled:
    """Unpickling this would create a file: proof that a pickle ran."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Callable[..., Any], tuple[str, str]]:
        return (open, (self.path, "w"))


def _npz() -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, packed=np.zeros(SIZE, dtype=np.uint8))
    return buffer.getvalue()


#: Packed arrays a malicious peer crafts, each with what ``unpack`` must answer.
CRAFTED: dict[str, tuple[Callable[[Path], ArrayRecord], str]] = {
    # an .npy header declaring far more elements than the bytes that travel
    "declares-8-GiB": (
        lambda _: _raw(_npy((2**33,), payload=bytes(SIZE))),
        "declares 8589934592 bytes, 38 follow",
    ),
    "declares-1-TiB": (
        lambda _: _raw(_npy((2**40,), payload=bytes(SIZE))),
        "declares 1099511627776 bytes, 38 follow",
    ),
    "declares-2**62": (lambda _: _raw(_npy((2**62,), payload=bytes(SIZE))), "38 follow it"),
    # fewer: the bytes after the declared ones would travel unchecked
    "declares-fewer": (lambda _: _raw(_npy((SIZE - 8,), payload=bytes(SIZE))), "30 bytes, 38"),
    "object-dtype": (lambda _: _raw(_npy((SIZE,), "|O", bytes(SIZE * 8))), "must be a 1-D uint8"),
    "pickle-stream": (
        lambda tmp: _raw(pickle.dumps(_Pickled(str(tmp / "pwned")))),
        "cannot be decoded",
    ),
    "npz-archive": (lambda _: _raw(_npz()), "cannot be decoded"),
    "bool": (lambda _: _raw(_npy((SIZE,), "|b1", bytes(SIZE))), "must be a 1-D uint8"),
    "int8": (lambda _: _raw(_npy((SIZE,), "|i1", bytes(SIZE))), "must be a 1-D uint8"),
    "bytes-S1": (lambda _: _raw(_npy((SIZE,), "|S1", bytes(SIZE))), "must be a 1-D uint8"),
    "void-V1": (lambda _: _raw(_npy((SIZE,), "|V1", bytes(SIZE))), "must be a 1-D uint8"),
    "float16": (lambda _: _raw(_npy((SIZE // 2,), "<f2", bytes(SIZE))), "must be a 1-D uint8"),
    "big-endian-u2": (lambda _: _raw(_npy((SIZE // 2,), ">u2", bytes(SIZE))), "1-D uint8"),
    "complex64": (lambda _: _raw(_npy((SIZE // 8,), "<c8", bytes(SIZE))), "must be a 1-D uint8"),
    "struct-of-u1": (
        lambda _: _raw(_npy((SIZE,), [("a", "|u1")], bytes(SIZE))),
        "must be a 1-D uint8",
    ),
    "0-d": (lambda _: _raw(_npy((), payload=b"\x01")), "must be a 1-D uint8"),
    "2-d": (lambda _: _raw(_npy((2, SIZE // 2), payload=bytes(SIZE))), "must be a 1-D uint8"),
    "zero-length": (lambda _: _raw(_npy((0,))), "hold 0 bytes, the model needs 38"),
    "stype-torch": (
        lambda _: ArrayRecord({PACKED: Array("uint8", (SIZE,), "torch.raw", bytes(SIZE))}),
        "cannot be decoded",
    ),
    "stype-empty": (
        lambda _: ArrayRecord({PACKED: Array("uint8", (SIZE,), "", bytes(SIZE))}),
        "cannot be decoded",
    ),
    "empty-data": (lambda _: _raw(b""), "cannot be decoded"),
    "header-only": (lambda _: _raw(_npy((SIZE,))), "declares 38 bytes, 0 follow"),
}


def _rss_peak_reset() -> int | None:
    """Reset this process's peak resident size (Linux) and return the current size, bytes."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return _status("VmRSS")
    except OSError:
        return None


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise AssertionError(field)


# --------------------------------------------------------------------------- unpack itself


@pytest.mark.parametrize("name", list(CRAFTED))
def test_a_crafted_packed_array_is_refused_as_invalid_without_running_or_quoting_it(
    name: str, tmp_path: Path
) -> None:
    # Prepare: the crafted array; the bytes the attacker would like to see quoted back
    make, reason = CRAFTED[name]
    record = make(tmp_path)
    started = time.monotonic()

    # Execute
    with pytest.raises(InvalidReply) as caught:
        unpack(record, LAYOUT)

    # Assert: the one refusal type (the server drops it, the site answers a code), the
    # reason named, quickly, with no value quoted and no pickle run
    assert reason in str(caught.value)
    assert time.monotonic() - started < 5
    assert "pwned" not in str(caught.value) and "\\x" not in str(caught.value)
    assert not (tmp_path / "pwned").exists()


def test_a_header_declaring_a_huge_array_does_not_make_the_receiver_hold_it() -> None:
    # Prepare: 38 real bytes under a header that declares 8 GiB
    record = _raw(_npy((2**33,), payload=bytes(SIZE)))
    before = _rss_peak_reset()
    if before is None:
        pytest.skip("no /proc/self/clear_refs: the peak resident size cannot be measured")

    # Execute
    with pytest.raises(InvalidReply):
        unpack(record, LAYOUT)

    # Assert: NumPy reserves the declared size but touches only the bytes that came
    assert _status("VmHWM") - before < 64 * 2**20


def test_trailing_bytes_after_the_declared_array_are_refused() -> None:
    # Prepare: a correct header and payload, then 4 MiB the header does not cover
    good = pack(LAYOUT)[PACKED].data
    record = _raw(good + b"\xff" * 4 * 2**20)

    # Execute / Assert: the header must declare every byte that travels
    with pytest.raises(InvalidReply, match=f"declares {SIZE} bytes, {SIZE + 4 * 2**20} follow"):
        unpack(record, LAYOUT)


def test_metadata_that_lies_about_shape_and_dtype_is_ignored_for_the_decoded_bytes() -> None:
    # Prepare: honest bytes, metadata that claims a 2**40-element float64 array
    record = _raw(pack(LAYOUT)[PACKED].data, dtype="float64", shape=(2**40,))
    got = unpack(record, LAYOUT)
    assert [(a.shape, a.dtype) for a in got.values()] == [
        ((2, 3), "float32"),
        ((3,), "float16"),
        ((), "int64"),
    ]


def test_big_endian_single_bytes_are_the_same_bytes() -> None:
    # '>u1' is uint8: byte order cannot change how the receiver slices
    data = pack(LAYOUT)[PACKED].numpy().tobytes()
    got = unpack(_raw(_npy((SIZE,), ">u1", data)), LAYOUT).to_torch_state_dict()
    assert all(torch.equal(got[k], v) for k, v in LAYOUT.items())


def test_empty_layouts_and_zero_sized_tensors() -> None:
    assert len(unpack(pack({}), {})) == 0
    with pytest.raises(InvalidReply, match="hold 1 bytes, the model needs 0"):
        unpack(_raw(_npy((1,), payload=b"\x00")), {})
    layout = {"z": torch.zeros(0), "w": torch.ones(2)}
    got = unpack(pack(layout), layout).to_torch_state_dict()
    assert got["z"].shape == (0,) and torch.equal(got["w"], torch.ones(2))


def test_a_bool_buffer_filled_with_any_byte_reads_as_a_proper_bool() -> None:
    # The sender chooses every byte, also those a bool tensor of the receiver's is made of
    layout = {"mask": torch.zeros(3, dtype=torch.bool)}
    got = unpack(_raw(_npy((3,), payload=b"\x02\x00\xff")), layout).to_torch_state_dict()
    assert got["mask"].tolist() == [True, False, True]
    assert (~got["mask"]).tolist() == [False, True, False]
    assert int(got["mask"].sum()) == 2


# --------------------------------------------------------------------------- the server's round

CONFIG = RunConfig(num_server_rounds=2, min_sites=1, score_bins=1000, eval_splits=("val",))
REFERENCE = {"w": torch.zeros(3), "bn.num_batches_tracked": torch.tensor(0)}
REPLY_SIZE = 3 * 4 + 8


def _strategy(tmp_path: Path) -> RadfedFedAvg:
    run = RunFolder.start(tmp_path / "run", CONFIG)
    return RadfedFedAvg(config=CONFIG, reference=REFERENCE, run=run)


def _train_reply(site: str, node: int, arrays: ArrayRecord, n: int = 10) -> Message:
    content = RecordDict(
        {
            "arrays": arrays,
            "metrics": MetricRecord({"num-examples": n, "train-loss": 0.5}),
            "site": SiteIdentity.local(site).to_record(),
        }
    )
    return make_message(content, message_type="train", src_node_id=node)


def _good(w: float) -> ArrayRecord:
    return pack({"w": torch.full((3,), w), "bn.num_batches_tracked": torch.tensor(10)})


#: What a malicious site sends in place of its packed update (sized for REFERENCE).
SITE_CRAFTED: dict[str, Callable[[Path], ArrayRecord]] = {
    "declares-1-TiB": lambda _: _raw(_npy((2**40,), payload=bytes(REPLY_SIZE))),
    "declares-2**62": lambda _: _raw(_npy((2**62,), payload=bytes(REPLY_SIZE))),
    "object-dtype": lambda _: _raw(_npy((REPLY_SIZE,), "|O", bytes(REPLY_SIZE * 8))),
    "pickle": lambda tmp: _raw(pickle.dumps(_Pickled(str(tmp / "pwned")))),
    "npz": lambda _: _raw(_npz()),
    "float32-view": lambda _: ArrayRecord({PACKED: Array(np.zeros(5, dtype=np.float32))}),
    "stype-torch": lambda _: ArrayRecord(
        {PACKED: Array("uint8", (REPLY_SIZE,), "torch.raw", bytes(REPLY_SIZE))}
    ),
    "nan-float-bytes": lambda _: ArrayRecord(
        {PACKED: Array(np.frombuffer(np.full(5, np.nan, np.float32).tobytes(), np.uint8))}
    ),
    "zero-length": lambda _: _raw(_npy((0,))),
}


@pytest.mark.parametrize("name", list(SITE_CRAFTED))
def test_a_crafted_reply_is_dropped_and_the_round_aggregates_the_honest_sites(
    name: str, tmp_path: Path
) -> None:
    # Prepare
    strategy = _strategy(tmp_path)
    replies = [
        _train_reply("site-a", 1, _good(1.0)),
        _train_reply("site-x", 2, SITE_CRAFTED[name](tmp_path), n=1_000),
        _train_reply("site-b", 3, _good(3.0)),
    ]

    # Execute
    arrays, _ = strategy.aggregate_train(1, replies)

    # Assert: the round went on over the two honest sites only; the attacker was dropped by
    # name and ran nothing
    assert arrays is not None
    assert torch.allclose(arrays.to_torch_state_dict()["w"], torch.full((3,), 2.0))
    replied, dropped = strategy.take_ledger()
    assert sorted(replied) == ["site-a", "site-b"] and list(dropped) == ["site-x"]
    assert not (tmp_path / "pwned").exists()


def test_an_accepted_reply_holds_named_arrays_only_and_a_padded_one_is_dropped(
    tmp_path: Path,
) -> None:
    # Prepare: an honest update; the same followed by 8 MiB its header does not cover
    strategy = _strategy(tmp_path)
    honest = _train_reply("site-a", 1, _good(2.0))
    padded = _raw(_good(3.0)[PACKED].data + bytes(8 * 2**20), shape=(REPLY_SIZE,))
    padding = _train_reply("site-b", 2, padded)

    # Execute
    arrays, _ = strategy.aggregate_train(1, [honest, padding])

    # Assert: the reply the strategy keeps holds the global model's names, unpacked, with
    # the honest bytes only; the padded reply does not count (its 8 MiB kept nowhere)
    kept = honest.content["arrays"]
    assert isinstance(kept, ArrayRecord) and list(kept.keys()) == list(REFERENCE)
    assert sum(len(a.data) for a in kept.values()) < 1000
    assert torch.equal(kept.to_torch_state_dict()["w"], torch.full((3,), 2.0))
    assert arrays is not None
    assert torch.equal(arrays.to_torch_state_dict()["w"], torch.full((3,), 2.0))
    assert padding.content["arrays"] is padded


# --------------------------------------------------------------------------- FedBN both sides


@pytest.mark.parametrize("fedbn", [False, True])
def test_site_and_server_slice_the_same_bytes_the_same_way_with_and_without_fedbn(
    fedbn: bool, tmp_path: Path
) -> None:
    # Prepare: the server's reference as run_server makes it, and after a resume from its
    # checkpoint; the site's own freshly built model
    config = RunConfig(task=TaskName("classification"), fedbn=fedbn)
    build = get_task("classification").build_model
    server = {k: v.detach().clone() for k, v in shared_state(build(config), fedbn).items()}
    path = save_checkpoint(tmp_path / "round-000.pt", 0, server, config)
    resumed = load_checkpoint(path)["state_dict"]
    site = build(config)
    torch.manual_seed(5)
    for value in site.state_dict().values():  # the site trained: every tensor changed
        fresh = torch.randn_like(value) if value.is_floating_point() else value + 17
        value.copy_(fresh)
    sent = shared_state(site, fedbn)

    # Execute: the server's message unpacked at the site; the site's reply at the server
    at_site = unpack(pack(server), shared_state(build(config), fedbn)).to_torch_state_dict()
    at_server = unpack(pack(sent), resumed).to_torch_state_dict()

    # Assert: the same names in the same order on both sides; with FedBN no normalisation
    # tensor travels, in either direction; every tensor arrives where it was packed from
    assert list(at_site) == list(server) == list(resumed) == list(sent)
    if fedbn:
        assert not local_keys(site) & set(sent) and len(sent) < len(site.state_dict())
    for key in sent:
        assert torch.equal(at_server[key], sent[key]), key
        assert torch.equal(at_site[key], server[key]), key


# --------------------------------------------------------------------------- quick_object_pulls


class _Clock:
    """Simulated time for Flower's pull_objects: waiting advances it, nothing sleeps."""

    def __init__(self) -> None:
        self.now = 0.0
        self.calls: list[float] = []


class _Event:
    def __init__(self, clock: _Clock) -> None:
        self.clock, self.flag = clock, False

    def is_set(self) -> bool:
        return self.flag

    def set(self) -> None:
        self.flag = True

    def wait(self, timeout: float | None = None) -> bool:
        self.clock.now += float(timeout or 0.0)
        return self.flag


@pytest.fixture
def simulated_pulls(monkeypatch: pytest.MonkeyPatch) -> Callable[..., tuple[float, list[float]]]:
    """Run a pull of one object that is never available (a peer that announced a message and
    never delivers its weights), in simulated time; return when it gave up and every try."""
    import flwr.supercore.inflatable.inflatable_utils as inflatable

    flower = getattr(inflatable.pull_objects, "__wrapped__", inflatable.pull_objects)
    monkeypatch.setattr(inflatable, "pull_objects", flower)
    clock = _Clock()
    fake_time = types.SimpleNamespace(monotonic=lambda: clock.now)
    fake_threading = types.SimpleNamespace(Lock=threading.Lock, Event=lambda: _Event(clock))
    monkeypatch.setattr(inflatable, "time", fake_time)
    monkeypatch.setattr(inflatable, "threading", fake_threading)
    monkeypatch.setattr(inflatable, "random", types.SimpleNamespace(uniform=lambda a, b: 0.0))

    def run(pull: Callable[..., Any]) -> tuple[float, list[float]]:
        clock.now, clock.calls = 0.0, []

        def never_there(object_id: str) -> bytes:
            clock.calls.append(clock.now)
            raise inflatable.ObjectUnavailableError(object_id)

        with pytest.raises(inflatable.ObjectPullError):
            pull(["weights"], never_there)
        return clock.now, list(clock.calls)

    return run


def _quick(monkeypatch: pytest.MonkeyPatch) -> Callable[..., Any]:
    """quick_object_pulls installed into a module of the test's own, as the product installs
    it into Flower's SuperNode, ClientApp and ServerApp modules."""
    module = types.ModuleType("radfed_test_puller")
    monkeypatch.setitem(sys.modules, module.__name__, module)
    quick_object_pulls(module.__name__)
    return module.pull_objects  # type: ignore[no-any-return]


def _flower_default(simulated: Callable[..., tuple[float, list[float]]]) -> tuple[float, int]:
    import flwr.supercore.inflatable.inflatable_utils as inflatable

    gave_up, calls = simulated(inflatable.pull_objects)  # Flower's own retries
    return gave_up, len(calls)


def test_quick_pulls_do_not_busy_loop(
    simulated_pulls: Callable[..., tuple[float, list[float]]], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Execute
    _, calls = simulated_pulls(_quick(monkeypatch))

    # Assert: no two tries closer than the first backoff; after the first second at most
    # two tries a second (the 0.5 s cap) for an object that never comes
    gaps = np.diff(calls)
    assert gaps.min() >= 0.05 - 1e-9
    late = [t for t in calls if 1.0 <= t < 61.0]
    assert len(late) <= 2 * 60 + 1


def test_an_object_that_never_arrives_is_given_up_no_later_than_flower_did(
    simulated_pulls: Callable[..., tuple[float, list[float]]], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: Flower's own retries, as before radfed's quick pulls
    before, _ = _flower_default(simulated_pulls)

    # Execute
    after, calls = simulated_pulls(_quick(monkeypatch))

    # Assert: the quick retries never hold a pull longer than Flower's did, and ask at most
    # two a second (more often than Flower, never a busy loop: test_quick_pulls_do_not_busy_loop)
    assert after <= before, f"gave up after {after:.0f} s, Flower after {before:.0f} s"
    assert after >= 0.9 * before  # nor much sooner: a slow link still gets Flower's time
    assert len(calls) <= 2 * after + 20


def test_one_sites_undelivered_reply_cannot_hold_the_round_past_its_timeout(
    simulated_pulls: Callable[..., tuple[float, list[float]]], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: the ServerApp's pull of replies as run_server installs it
    config = RunConfig()
    module = types.ModuleType("radfed_test_server_puller")
    monkeypatch.setitem(sys.modules, module.__name__, module)
    quick_object_pulls(module.__name__, max_time=config.round_timeout)

    # Execute: a site announced its reply and never delivers its weights
    gave_up, _ = simulated_pulls(module.pull_objects)

    # Assert: the pull ends within the round's timeout, not Flower's two hours
    assert gave_up <= config.round_timeout


def test_the_server_bounds_its_reply_pulls_by_the_round_timeout() -> None:
    source = inspect.getsource(server.run_server)
    assert "quick_object_pulls(REPLY_PULLS, max_time=config.round_timeout)" in source
    import flwr.superlink.grid.http_grid as http_grid

    assert hasattr(http_grid, "pull_objects")  # the name REPLY_PULLS' module calls
    assert http_grid.__name__ == server.REPLY_PULLS


def test_quick_pulls_keep_what_a_caller_asks_for(
    simulated_pulls: Callable[..., tuple[float, list[float]]], monkeypatch: pytest.MonkeyPatch
) -> None:
    # a caller's own bound is kept (setdefault): Flower's callers that pass one stay bounded
    pull = _quick(monkeypatch)
    gave_up, calls = simulated_pulls(lambda ids, fn: pull(ids, fn, max_tries_per_object=7))
    assert len(calls) == 7 and gave_up < 2


# --------------------------------------------------------------------------- the edge's upstream

SMUGGLED = "/v1/fleet/smuggled"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class _SuperLinkPlace:
    """uvicorn (the SuperLink's HTTP server, with its default parser) over TLS on loopback,
    recording each request: path, headers, body and the upstream connection it came on."""

    def __init__(self, cert: Path, key: Path) -> None:
        import uvicorn

        self.requests: list[dict[str, Any]] = []

        async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
            if scope["type"] != "http":
                return
            body = b""
            while True:
                event = await receive()
                body += event.get("body", b"")
                if not event.get("more_body"):
                    break
            self.requests.append(
                {
                    "path": scope["path"],
                    "headers": {k.decode().lower(): v.decode() for k, v in scope["headers"]},
                    "body": body,
                    "peer": tuple(scope["client"] or ()),
                }
            )
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"superlnk"})

        self.port = _free_port()
        config = uvicorn.Config(
            app,
            host="127.0.0.1",
            port=self.port,
            ssl_certfile=str(cert),
            ssl_keyfile=str(key),
            log_level="error",
            lifespan="off",
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=lambda: asyncio.run(self.server.serve()), daemon=True)

    def __enter__(self) -> _SuperLinkPlace:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started and time.monotonic() < deadline:
            time.sleep(0.05)
        return self

    def __exit__(self, *_: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


@pytest.fixture(scope="module")
def two_site_edge(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Any, int, Any]]:
    from radfed.deployment.pki import init_pki

    root = tmp_path_factory.mktemp("edge-attacks")
    pki = init_pki(root / "pki", "127.0.0.1:9443", ["a", "b"], central_keys=True)
    with (
        _SuperLinkPlace(pki.server_cert, pki.server_key) as upstream,
        running_edge(root / "state", pki, upstream.port) as port,
    ):
        yield pki, port, upstream


def _site_context(pki: Any, site: str) -> ssl.SSLContext:
    from radfed.deployment.pki import load_site_kit
    from radfed.deployment.site_node import site_tls

    kit = load_site_kit(pki.site_dir(site))
    assert kit.private_key is not None and kit.client_cert is not None
    return site_tls(kit.ca_cert, kit.client_cert, kit.private_key)


def _smuggle(head: str, body: str) -> bytes:
    return (f"POST /v1/fleet/pull-object HTTP/1.1\r\nHost: localhost\r\n{head}\r\n{body}").encode()


_INNER = f"POST {SMUGGLED} HTTP/1.1\r\nHost: localhost\r\nContent-Length: 200\r\n\r\n"

#: Requests that try to leave a second request (or the start of one) on nginx's kept-open
#: connection to the SuperLink, to be completed by the next site's request.
SMUGGLING = {
    "cl-te": _smuggle(
        f"Content-Length: {len(_INNER) + 5}\r\nTransfer-Encoding: chunked\r\n",
        "0\r\n\r\n" + _INNER,
    ),
    "te-cl": _smuggle(
        "Content-Length: 4\r\nTransfer-Encoding: chunked\r\n",
        f"{len(_INNER):x}\r\n{_INNER}\r\n0\r\n\r\n",
    ),
    "te-obfuscated": _smuggle(
        f"Content-Length: {len(_INNER) + 5}\r\nTransfer-Encoding: chunked\r\n"
        "Transfer-encoding: identity\r\n",
        "0\r\n\r\n" + _INNER,
    ),
    "te-space-before-colon": _smuggle(
        f"Content-Length: {len(_INNER) + 5}\r\nTransfer-Encoding : chunked\r\n",
        "0\r\n\r\n" + _INNER,
    ),
    "two-content-lengths": _smuggle("Content-Length: 0\r\nContent-Length: 120\r\n", _INNER),
    "chunked-carrying-a-request": _smuggle(
        "Transfer-Encoding: chunked\r\n", f"{len(_INNER):x}\r\n{_INNER}\r\n0\r\n\r\n"
    ),
}


@needs_nginx
@pytest.mark.parametrize("name", list(SMUGGLING))
def test_one_site_cannot_smuggle_a_request_into_anothers_on_the_kept_open_upstream(
    two_site_edge: tuple[Any, int, Any], name: str
) -> None:
    # Prepare
    pki, port, upstream = two_site_edge
    before = len(upstream.requests)

    # Execute: site a sends its crafted request, then site b an ordinary one with its
    # own (here: marker) authentication headers
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as plain,
        _site_context(pki, "a").wrap_socket(plain, server_hostname="localhost") as tls,
    ):
        tls.sendall(SMUGGLING[name])
        try:
            answer = tls.recv(4096)
        except (TimeoutError, ssl.SSLError, OSError):
            answer = b""
    with httpx.Client(verify=_site_context(pki, "b"), timeout=10) as client:
        reply = client.post(
            f"https://127.0.0.1:{port}/v1/fleet/pull-messages",
            content=b"site-b-body",
            headers={"x-flwr-signature": "site-b-signature"},
        )

    # Assert: the smuggled request never reached the SuperLink as a request; site b's
    # request arrived whole, as its own, with its own headers, and nowhere else
    seen = upstream.requests[before:]
    assert reply.status_code == 200 and reply.content == b"superlnk"
    assert SMUGGLED not in [r["path"] for r in seen]
    mine = [r for r in seen if r["path"] == "/v1/fleet/pull-messages"]
    assert len(mine) == 1
    assert mine[0]["body"] == b"site-b-body"
    assert mine[0]["headers"].get("x-flwr-signature") == "site-b-signature"
    # site a's request was refused at the edge, or reached the SuperLink with the inner
    # request as its body only (then over the very connection site b's came on: the shared
    # upstream the attack needs)
    theirs = [r for r in seen if r["path"] == "/v1/fleet/pull-object"]
    if theirs:
        assert [r["body"] for r in theirs] == [_INNER.encode()]
        assert theirs[0]["peer"] == mine[0]["peer"]
    else:
        assert answer.startswith(b"HTTP/1.1 400")
    for other in seen:
        if other is not mine[0]:
            assert b"site-b" not in other["body"]
            assert other["headers"].get("x-flwr-signature") != "site-b-signature"


@needs_nginx
def test_the_edge_gives_the_superlink_no_identity_of_its_own_to_share(
    two_site_edge: tuple[Any, int, Any],
) -> None:
    # The SuperLink authenticates each Fleet request by its signed headers
    # (flwr.superlink.routers.fleet.node_auth), never by the TLS connection: nginx presents
    # no client certificate upstream, so a kept-open connection carries no site's identity
    from radfed.deployment.edge import Edge
    from radfed.folders import ServerState

    pki, _, _ = two_site_edge
    text = Edge.of(pki, host="127.0.0.1", port=1, superlink_port=2).config(
        ServerState(pki.server_dir.parent / "unused-state")
    )
    assert "proxy_ssl_certificate " not in text and "proxy_ssl_certificate_key" not in text
    assert "$ssl_client" not in text  # no certificate-derived header the SuperLink could trust
