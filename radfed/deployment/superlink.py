"""The server side of a deployment: the hardened SuperLink behind its edge, and registering
the site keys.

The SuperLink always runs with TLS and node authentication, on loopback only, keeps its
state on disk and knows each site by the public key registered from ``radfed pki``; sites
reach it through the edge (radfed.deployment.edge), which serves them the Fleet API alone.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from radfed.deployment.certs import format_address, parse_address
from radfed.deployment.edge import Edge
from radfed.deployment.launch import CONNECTION, write_connection
from radfed.deployment.pki import Pki
from radfed.deployment.process import (
    HARDENED_ENV,
    Command,
    flower_tool,
    port_is_free,
    run_foreground,
    wait_for_port,
)
from radfed.deployment.site_kit import check_site_name, fingerprint
from radfed.errors import ConfigError
from radfed.folders import SITES_FILE_ENV, STORE_ENV, ServerState
from radfed.log import logger

__all__ = [
    "control_port",
    "list_nodes",
    "register_site",
    "start_server",
    "superlink_command",
    "sync_site_keys",
    "unregister_node",
]


def superlink_command(
    *, ca: Path, cert: Path, key: Path, state: Path, host: str = "0.0.0.0", port: int = 8000
) -> Command:
    """The hardened SuperLink: TLS, node authentication, a state database on disk."""
    for path in (ca, cert, key):
        if not path.is_file():
            raise ConfigError(f"{path} is missing; create the PKI with `radfed pki init`")
    state.mkdir(parents=True, exist_ok=True, mode=0o700)
    argv = [
        flower_tool("flower-superlink"),
        "--ssl-ca-certfile",
        str(ca),
        "--ssl-certfile",
        str(cert),
        "--ssl-keyfile",
        str(key),
        "--enable-supernode-auth",
        "--database",
        str(ServerState(state).database),
        "--disable-runtime-dependency-installation",
        "--host",
        host,
        "--port",
        str(port),
    ]
    return Command(argv, {**HARDENED_ENV, "FLWR_HOME": str(ServerState(state).flwr_home)})


def _flwr_supernode(
    flwr_home: Path, *args: str, as_json: bool = False
) -> subprocess.CompletedProcess[str]:
    """``flwr supernode ARGS radfed`` against the SuperLink of ``flwr_home``."""
    env = {**os.environ, **HARDENED_ENV, "FLWR_HOME": str(flwr_home)}
    output = ["--format", "json"] if as_json else []
    return subprocess.run(
        [flower_tool("flwr"), "supernode", *args, CONNECTION, *output],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def _json_reply(done: subprocess.CompletedProcess[str]) -> Any:
    """The JSON object a ``--format json`` command printed (after any log lines)."""
    return json.loads(done.stdout[done.stdout.index("{") :])


def register_site(flwr_home: Path, key: Path) -> int:
    """Register one site public key with the running SuperLink; return its node id.

    Raises:
        ConfigError: the SuperLink refused it (e.g. the key was registered outside
            ``radfed server start``).
    """
    done = _flwr_supernode(flwr_home, "register", str(key), as_json=True)
    try:
        return int(_json_reply(done)["node-id"])
    except (ValueError, KeyError, TypeError):
        raise ConfigError(
            f"the SuperLink did not register site key {key.name} (exit {done.returncode}); "
            "if it was registered outside `radfed server start` (it is not in "
            "STATE/sites.json), the SuperLink never takes it again: the site makes a new "
            "key and the central team replaces it (deploy/README.md, a lost or stolen key)"
        ) from None


def list_nodes(flwr_home: Path) -> list[int]:
    """The ids of the nodes the running SuperLink has registered (and not unregistered).

    Raises:
        ConfigError: the SuperLink did not answer.
    """
    done = _flwr_supernode(flwr_home, "list", as_json=True)
    try:
        nodes = _json_reply(done)["nodes"]
        return [int(n["node-id"]) for n in nodes if n["status"] != "unregistered"]
    except (ValueError, KeyError, TypeError):
        raise ConfigError(
            f"the SuperLink did not list its nodes (exit {done.returncode}); check its log"
        ) from None


def sync_site_keys(
    flwr_home: Path,
    server: ServerState,
    keys: Sequence[Path],
    *,
    register: Callable[[Path, Path], int] | None = None,
    unregister: Callable[[Path, int], None] | None = None,
    listed: Callable[[Path], list[int]] | None = None,
) -> dict[str, int]:
    """Make the SuperLink's registered nodes the PKI's site keys, exactly; return the
    registry (site -> node id) as written to ``STATE/sites.json``.

    A site whose key file is gone from the PKI is unregistered; a site whose key changed (a
    key replaced after it was lost or stolen) has its old node unregistered before the new
    key is registered, so the old key is refused from then on. A node registered some other
    way (``flwr supernode register`` on the server host) is unregistered too.
    ``STATE/site-keys.json`` records the fingerprint each node was registered with.

    Raises:
        ConfigError: a key file's name is not a site name (nothing is changed).
    """
    register = register or register_site
    unregister = unregister or unregister_node
    listed = listed or list_nodes
    known: dict[str, int] = _read_json(server.sites)
    prints: dict[str, str] = _read_json(server.site_keys)
    wanted = {key.stem: key for key in keys}
    for site in wanted:
        check_site_name(site)  # a key file named outside the rule is no site's
    for site in sorted(known):
        key = wanted.get(site)
        if key is not None and prints.get(site) == fingerprint(key):
            continue
        unregister(flwr_home, known.pop(site))
        prints.pop(site, None)
        _write_json(server.sites, known)
        _write_json(server.site_keys, prints)
        why = "its key was removed from the PKI" if key is None else "its key was replaced"
        logger.warning("site %s: %s; its old node is unregistered", site, why)
    for node in sorted(set(listed(flwr_home)) - set(known.values())):
        unregister(flwr_home, node)
        logger.warning("node %d was registered outside the PKI; it is unregistered", node)
    for site, key in sorted(wanted.items()):
        if site in known:
            continue
        known[site] = register(flwr_home, key)
        prints[site] = fingerprint(key)
        _write_json(server.sites, known)
        _write_json(server.site_keys, prints)
        logger.info("registered site %s (node %d)", site, known[site])
    return known


def unregister_node(flwr_home: Path, node: int) -> None:
    """Unregister node ``node`` from the running SuperLink.

    Raises:
        ConfigError: the SuperLink refused.
    """
    done = _flwr_supernode(flwr_home, "unregister", str(node))
    if done.returncode != 0:
        raise ConfigError(
            f"the SuperLink did not unregister node {node} (exit {done.returncode}); "
            "unregister it with `flwr supernode unregister` on the server host"
        )


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        value = json.loads(path.read_text())
    except ValueError:
        value = None
    if not isinstance(value, dict):
        raise ConfigError(f"{path} is not radfed's; remove it and the server's database")
    return value


def _write_json(path: Path, value: Mapping[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(dict(value), indent=1, sort_keys=True) + "\n")
    tmp.replace(path)


def control_port(port: int) -> int:
    """The loopback port of the SuperLink behind an edge on ``port``: the next one."""
    return port + 1 if port < 65535 else port - 1


def start_server(
    pki: Pki,
    state: Path,
    *,
    host: str = "0.0.0.0",
    port: int | None = None,
    superlink_port: int | None = None,
    store: str | None = None,
) -> int:
    """Run the server in the foreground: the hardened SuperLink on loopback, nginx on
    ``host:port`` in front of it (radfed.deployment.edge: mutual TLS, the Fleet API only),
    and register the PKI's site keys; the edge opens after they are registered.

    Site keys are registered once, from the PKI only; ``STATE/sites.json`` maps each site to
    the node id its key was given, and the ServerApp reads it (``RADFED_SITES_FILE``) to name
    nodes by the key they authenticate with. ``store`` names the run store the ServerApp
    writes to (``RADFED_STORE``; by default the one the environment names, else radfed's
    SQLite file).

    Returns:
        The exit code of the process that ended first.

    Raises:
        ConfigError: nginx is missing, or a port is not free.
    """
    port = port or parse_address(pki.server_address)[1]
    inner = superlink_port or control_port(port)
    if inner == port:
        raise ConfigError(f"the SuperLink's loopback port must differ from the edge's ({port})")
    for where, number in ((host, port), ("127.0.0.1", inner)):
        if not port_is_free(where, number):
            raise ConfigError(
                f"port {number} on {where} is taken; stop what holds it or choose another "
                "(--port for the edge, --superlink-port for the SuperLink)"
            )
    server = ServerState(state)
    command = superlink_command(
        ca=pki.server_dir / "ca.crt",
        cert=pki.server_cert,
        key=pki.server_key,
        state=state,
        host="127.0.0.1",
        port=inner,
    )
    edge = Edge.of(pki, host=host, port=port, superlink_port=inner).command(server)
    command.env[SITES_FILE_ENV] = str(server.sites.resolve())
    if store:
        command.env[STORE_ENV] = store
    home = Path(command.env["FLWR_HOME"])
    write_connection(home, format_address("127.0.0.1", inner), pki.server_dir / "ca.crt")

    def register() -> None:
        wait_for_port("127.0.0.1", inner)
        known = sync_site_keys(home, server, pki.registered_keys())
        logger.info("%d site keys registered; opening the edge", len(known))

    def ready() -> None:
        wait_for_port("127.0.0.1" if host in ("0.0.0.0", "::") else host, port)
        logger.info(
            "server ready on %s (sites, mutual TLS, the Fleet API only); the Control API "
            "is on this host only: radfed launch --server 127.0.0.1:%d",
            format_address(host, port),
            inner,
        )

    # The edge opens only once the registered keys are exactly the PKI's: a key removed
    # or replaced since the last start is refused from the first connection on.
    return run_foreground(command, then=(register, edge, ready))
