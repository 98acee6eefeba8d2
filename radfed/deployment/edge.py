"""The server's edge: nginx in front of the SuperLink, the one port sites reach.

Flower's SuperLink serves its Fleet API (sites), Control API (``flwr run``, ``flwr supernode
register``) and Runtime API (the ServerApp) on one port. ``radfed server start`` keeps that
port on loopback and puts nginx (the operating system's package) on the public address:

- TLS with the server's certificate, and a client certificate from the federation's CA
  required of every connection (mutual TLS: ``radfed pki`` issues one per site);
- only paths under ``/v1/fleet/`` are forwarded, to the SuperLink over TLS on loopback;
  every other path is refused at the edge (the Control and Runtime APIs stay on the
  server host, where ``radfed launch`` reaches them).

nginx runs unprivileged in the foreground, with its configuration, temporary files and
PID file in the server's state folder (``ServerState.edge``).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from radfed.deployment.certs import format_address
from radfed.deployment.pki import Pki
from radfed.deployment.process import Command
from radfed.errors import ConfigError
from radfed.folders import ServerState

__all__ = ["FLEET_PREFIX", "MAX_BODY", "Edge", "nginx"]

#: The only path prefix the edge forwards: Flower's Fleet API.
FLEET_PREFIX = "/v1/fleet/"
#: The largest request body the edge lets through (a site's model update).
MAX_BODY = "4g"


def nginx() -> str:
    """The nginx executable of this host.

    Raises:
        ConfigError: nginx is not installed.
    """
    found = shutil.which("nginx") or next(
        (str(p) for p in (Path("/usr/sbin/nginx"), Path("/usr/local/sbin/nginx")) if p.exists()),
        None,
    )
    if found is None:
        raise ConfigError(
            "nginx is not installed; the server's edge needs it (Debian/Ubuntu: "
            "apt-get install nginx)"
        )
    return found


_TEMP_KINDS = ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")


@dataclass(frozen=True, kw_only=True)
class Edge:
    """The edge on ``host:port`` in front of the SuperLink on loopback ``superlink_port``,
    with the server's TLS pair (``cert``, ``key``) and the federation's CA (``ca``)."""

    host: str
    port: int
    superlink_port: int
    ca: Path
    cert: Path
    key: Path

    @classmethod
    def of(cls, pki: Pki, *, host: str, port: int, superlink_port: int) -> Edge:
        """The edge with the PKI's server TLS pair and CA."""
        return cls(
            host=host,
            port=port,
            superlink_port=superlink_port,
            ca=pki.server_dir / "ca.crt",
            cert=pki.server_cert,
            key=pki.server_key,
        )

    def config(self, state: ServerState) -> str:
        """nginx's configuration: mutual TLS on ``host:port``, the Fleet API forwarded to the
        SuperLink on loopback, everything else refused."""
        folder = state.edge
        temp = "\n".join(f"    {kind}_temp_path {folder / kind};" for kind in _TEMP_KINDS)
        ca, cert, key = self.ca.resolve(), self.cert.resolve(), self.key.resolve()
        return f"""# Written by `radfed server start`; rewritten at every start.
daemon off;
worker_processes 1;
pid {folder / "nginx.pid"};
error_log stderr warn;
events {{
    worker_connections 512;
}}
http {{
{temp}
    access_log off;
    server_tokens off;
    client_max_body_size {MAX_BODY};
    # Connections to the SuperLink are kept open: a message is one request per object, and a
    # fresh TLS handshake with the SuperLink for each cost most of a deployed message's time.
    upstream superlink {{
        server 127.0.0.1:{self.superlink_port};
        keepalive 8;
    }}
    server {{
        listen {format_address(self.host, self.port)} ssl;
        ssl_protocols TLSv1.2 TLSv1.3;
        ssl_certificate {cert};
        ssl_certificate_key {key};
        # Every client must present a certificate the federation's CA issued (a site's).
        ssl_client_certificate {ca};
        ssl_verify_client on;
        ssl_verify_depth 1;
        location {FLEET_PREFIX} {{
            # With a URI, nginx forwards the normalised path (never a raw one holding ../)
            proxy_pass https://superlink{FLEET_PREFIX};
            proxy_ssl_trusted_certificate {ca};
            proxy_ssl_verify on;
            proxy_ssl_name localhost;  # a DNS name of the certificate (nginx checks no IP)
            proxy_http_version 1.1;
            proxy_set_header Connection "";  # keep the upstream connection open
            proxy_request_buffering off;
            proxy_read_timeout 600s;
            proxy_send_timeout 600s;
        }}
        # The Control and Runtime APIs, and anything else: not served at the edge.
        location / {{
            return 403;
        }}
    }}
}}
"""

    def command(self, state: ServerState) -> Command:
        """nginx in the foreground with ``config`` written into the state folder."""
        folder = state.edge
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        for kind in _TEMP_KINDS:
            (folder / kind).mkdir(exist_ok=True, mode=0o700)
        config = folder / "nginx.conf"
        config.write_text(self.config(state))
        argv = [nginx(), "-e", "stderr", "-p", str(folder), "-c", str(config)]
        return Command(argv, {})
