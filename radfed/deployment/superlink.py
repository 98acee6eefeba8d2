"""The server side of a deployment: the hardened SuperLink, and registering the site keys.

The SuperLink always runs with TLS and node authentication, keeps its state on disk and
knows each site by the public key that ``radfed pki`` made for it.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from radfed.deployment.certs import format_address, parse_address
from radfed.deployment.launch import CONNECTION, write_connection
from radfed.deployment.pki import Pki
from radfed.deployment.process import (
    HARDENED_ENV,
    Command,
    flower_tool,
    run_foreground,
    wait_for_port,
)
from radfed.errors import ConfigError
from radfed.folders import SITES_FILE_ENV, ServerState
from radfed.log import logger

__all__ = ["register_site", "start_server", "superlink_command"]


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


def register_site(flwr_home: Path, key: Path) -> int:
    """Register one site public key with the running SuperLink; return its node id.

    Raises:
        ConfigError: the SuperLink refused it (e.g. the key is already registered, but
            not in ``sites.json``: unregister it with ``flwr supernode unregister``).
    """
    env = {**os.environ, **HARDENED_ENV, "FLWR_HOME": str(flwr_home)}
    done = subprocess.run(
        [flower_tool("flwr"), "supernode", "register", str(key), CONNECTION, "--format", "json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    try:
        reply = json.loads(done.stdout[done.stdout.index("{") :])
        return int(reply["node-id"])
    except (ValueError, KeyError, TypeError):
        raise ConfigError(
            f"the SuperLink did not register site key {key.name} (exit {done.returncode}); "
            "a key registered before but missing from STATE/sites.json must be unregistered "
            "first (flwr supernode unregister)"
        ) from None


def start_server(pki: Pki, state: Path, *, host: str = "0.0.0.0", port: int | None = None) -> int:
    """Run the hardened SuperLink in the foreground and register the PKI's site keys.

    Site keys are registered once; ``STATE/sites.json`` maps each site to the node id its
    key was given, and the ServerApp reads it (``RADFED_SITES_FILE``) to name nodes by the
    key they authenticate with.

    Returns:
        The SuperLink's exit code.
    """
    port = port or parse_address(pki.server_address)[1]
    command = superlink_command(
        ca=pki.server_dir / "ca.crt",
        cert=pki.server_cert,
        key=pki.server_key,
        state=state,
        host=host,
        port=port,
    )
    registry = ServerState(state).sites
    command.env[SITES_FILE_ENV] = str(registry.resolve())
    home = Path(command.env["FLWR_HOME"])
    write_connection(home, format_address("127.0.0.1", port), pki.server_dir / "ca.crt")

    def register() -> None:
        wait_for_port("127.0.0.1", port)
        known = json.loads(registry.read_text()) if registry.is_file() else {}
        for key in pki.registered_keys():
            if key.stem in known:
                continue
            known[key.stem] = register_site(home, key)
            registry.write_text(json.dumps(known, indent=1) + "\n")
            logger.info("registered site %s (node %d)", key.stem, known[key.stem])
        logger.info("server ready on %s:%d with %d sites", host, port, len(known))

    return run_foreground(command, after_start=register)
