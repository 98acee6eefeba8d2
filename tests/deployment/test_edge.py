"""The server's edge, attacked on loopback: real nginx with radfed's configuration in front of
an HTTPS upstream that records what reaches it (the SuperLink's place)."""

from __future__ import annotations

import http.server
import socket
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from radfed.deployment.pki import Pki, init_pki, load_site_kit
from radfed.deployment.site_node import site_tls
from tests.helpers import needs_nginx
from tests.services import running_edge

pytestmark = needs_nginx


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class _Upstream(http.server.ThreadingHTTPServer):
    """An HTTPS server on loopback that answers 200 and records every path it is asked and
    the connection it came on."""

    def __init__(self, pki: Pki) -> None:
        self.paths: list[str] = []
        self.connections: list[tuple[str, int]] = []  # the peer of each request
        upstream = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keeps a connection open, as the SuperLink does

            def _answer(self) -> None:
                upstream.paths.append(self.path)
                upstream.connections.append(self.client_address)
                length = int(self.headers.get("Content-Length", 0) or 0)
                self.rfile.read(length)
                self.send_response(200)
                self.send_header("Content-Length", "8")
                self.end_headers()
                self.wfile.write(b"superlnk")

            do_GET = do_POST = _answer

            def log_message(self, *args: object) -> None:
                pass

        super().__init__(("127.0.0.1", _free_port()), Handler)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(pki.server_cert, pki.server_key)
        self.socket = context.wrap_socket(self.socket, server_side=True)


@pytest.fixture(scope="module")
def edge(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Pki, int, _Upstream]]:
    root = tmp_path_factory.mktemp("edge")
    pki = init_pki(root / "pki", "127.0.0.1:9443", ["a"], central_keys=True)
    upstream = _Upstream(pki)
    thread = threading.Thread(target=upstream.serve_forever, daemon=True)
    thread.start()
    try:
        with running_edge(root / "state", pki, upstream.server_address[1]) as port:
            yield pki, port, upstream
    finally:
        upstream.shutdown()


def _site_client(pki: Pki) -> httpx.Client:
    kit = load_site_kit(pki.site_dir("a"))
    assert kit.private_key is not None and kit.client_cert is not None
    return httpx.Client(verify=site_tls(kit.ca_cert, kit.client_cert, kit.private_key))


def test_the_fleet_api_reaches_the_superlink_for_a_site(edge: tuple[Pki, int, _Upstream]) -> None:
    pki, port, upstream = edge
    with _site_client(pki) as client:
        reply = client.post(f"https://127.0.0.1:{port}/v1/fleet/pull-messages", content=b"x")

    assert reply.status_code == 200 and reply.content == b"superlnk"
    assert upstream.paths[-1] == "/v1/fleet/pull-messages"


def test_the_edge_keeps_its_connection_to_the_superlink_open(
    edge: tuple[Pki, int, _Upstream],
) -> None:
    # A message is pulled as one request per object: a TLS handshake with the SuperLink for
    # each cost seconds a message
    pki, port, upstream = edge
    before = len(upstream.connections)
    with _site_client(pki) as client:
        for _ in range(6):
            reply = client.post(f"https://127.0.0.1:{port}/v1/fleet/pull-object", content=b"x")
            assert reply.status_code == 200
    used = set(upstream.connections[before:])
    assert len(upstream.connections) - before == 6 and len(used) == 1


@pytest.mark.parametrize(
    "path",
    [
        "/v1/control/start-run",  # would run code at every site
        "/v1/control/register-node",  # would register a node key
        "/v1/serverapp/pull-task-input",  # the ServerApp's Runtime API
        "/v1/fleetx/../control/list-runs",
        "/",
    ],
)
def test_every_other_path_is_refused_even_for_a_site(
    edge: tuple[Pki, int, _Upstream], path: str
) -> None:
    pki, port, upstream = edge
    before = len(upstream.paths)
    with _site_client(pki) as client:
        reply = client.post(f"https://127.0.0.1:{port}{path}", content=b"x")

    assert reply.status_code == 403
    assert len(upstream.paths) == before  # nothing reached the SuperLink


@pytest.mark.parametrize(
    ("raw", "forwarded"),
    [
        ("/v1/control/start-run/../../fleet/pull-messages", "/v1/fleet/pull-messages"),
        ("/v1/fleet/./pull-messages", "/v1/fleet/pull-messages"),
        ("/v1/fleet/%70ull-messages", "/v1/fleet/pull-messages"),
        ("/v1/fleet/x/%2e%2e/%2e%2e/control/list-runs", None),
        ("/v1/fleet/..%2fcontrol/list-runs", None),
    ],
)
def test_the_superlink_only_ever_sees_a_normalised_fleet_path(
    edge: tuple[Pki, int, _Upstream], raw: str, forwarded: str | None
) -> None:
    # Prepare: a request line as written by hand (an HTTP client would normalise it)
    pki, port, upstream = edge
    kit = load_site_kit(pki.site_dir("a"))
    assert kit.private_key is not None and kit.client_cert is not None
    context = site_tls(kit.ca_cert, kit.client_cert, kit.private_key)
    before = len(upstream.paths)

    # Execute
    with (
        socket.create_connection(("127.0.0.1", port)) as plain,
        context.wrap_socket(plain, server_hostname="localhost") as tls,
    ):
        tls.sendall(
            f"POST {raw} HTTP/1.1\r\nHost: localhost\r\nContent-Length: 1\r\n"
            "Connection: close\r\n\r\nx".encode()
        )
        status = tls.recv(64).split(b" ")[1]

    # Assert: a path under /v1/fleet/ once normalised reaches the SuperLink as that; any
    # other is refused without reaching it
    if forwarded is None:
        assert status in (b"400", b"403") and len(upstream.paths) == before
    else:
        assert status == b"200" and upstream.paths[before:] == [forwarded]


def test_a_client_without_a_site_certificate_is_turned_away(
    edge: tuple[Pki, int, _Upstream],
) -> None:
    pki, port, upstream = edge
    before = len(upstream.paths)
    stranger = ssl.create_default_context(cafile=str(pki.ca_cert))  # trusts it; no cert
    with httpx.Client(verify=stranger) as client:
        reply = client.post(f"https://127.0.0.1:{port}/v1/fleet/pull-messages", content=b"x")

    assert reply.status_code == 400 and b"certificate" in reply.content.lower()
    assert len(upstream.paths) == before


def test_a_certificate_from_another_ca_is_turned_away(
    edge: tuple[Pki, int, _Upstream], tmp_path: Path
) -> None:
    pki, port, upstream = edge
    other = init_pki(tmp_path / "other", "127.0.0.1:9443", ["a"], central_keys=True)
    kit = load_site_kit(other.site_dir("a"))
    assert kit.private_key is not None and kit.client_cert is not None
    context = site_tls(kit.ca_cert, kit.client_cert, kit.private_key)
    context.load_verify_locations(cafile=str(pki.ca_cert))  # it does trust the real server
    before = len(upstream.paths)
    with httpx.Client(verify=context) as client:
        reply = client.post(f"https://127.0.0.1:{port}/v1/fleet/pull-messages", content=b"x")

    assert reply.status_code == 400
    assert len(upstream.paths) == before
