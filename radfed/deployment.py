"""A real deployment: the hardened SuperLink, a site's SuperNode, and launching a run.

Each function builds the exact Flower command line and environment (so tests, systemd
units and containers start the same thing) and the ``run_*`` functions start it in the
foreground. Flower defaults that every deployment changes (see FLOWER.md): no runtime
dependency installation, no telemetry, no update checks, TLS always, node authentication
always.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from radfed.certs import format_address, parse_address
from radfed.errors import ConfigError
from radfed.log import logger
from radfed.pki import Pki, load_site_kit

__all__ = [
    "HARDENED_ENV",
    "Command",
    "join_site",
    "launch_command",
    "register_site",
    "run_foreground",
    "site_command",
    "start_server",
    "superlink_command",
    "wait_for_port",
    "write_connection",
]

#: Environment of every Flower process radfed starts.
HARDENED_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
}

#: The Flower CLI connection name radfed writes into its own ``FLWR_HOME``.
CONNECTION = "radfed"


@dataclass(frozen=True)
class Command:
    """A command line and the environment it needs on top of the caller's."""

    argv: list[str]
    env: dict[str, str]

    def environ(self) -> dict[str, str]:
        """The caller's environment with ``env`` over it; this Python's ``bin`` folder first
        on PATH, because Flower starts ``flower-superexec`` and the app processes by name."""
        merged = {**os.environ, **self.env}
        merged["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), merged.get("PATH", "")])
        return merged


def _tool(name: str) -> str:
    """A Flower executable of this environment (beside the running Python first)."""
    local = Path(sys.executable).parent / name
    found = str(local) if local.exists() else shutil.which(name)
    if not found:
        raise ConfigError(f"{name} not found; install radfed with its flwr dependency")
    return found


def superlink_command(
    *, ca: Path, cert: Path, key: Path, state: Path, host: str = "0.0.0.0", port: int = 8000
) -> Command:
    """The hardened SuperLink: TLS, node authentication, a state database on disk."""
    for path in (ca, cert, key):
        if not path.is_file():
            raise ConfigError(f"{path} is missing; create the PKI with `radfed pki init`")
    state.mkdir(parents=True, exist_ok=True, mode=0o700)
    argv = [
        _tool("flower-superlink"),
        "--ssl-ca-certfile",
        str(ca),
        "--ssl-certfile",
        str(cert),
        "--ssl-keyfile",
        str(key),
        "--enable-supernode-auth",
        "--database",
        str(state / "superlink.db"),
        "--disable-runtime-dependency-installation",
        "--host",
        host,
        "--port",
        str(port),
    ]
    return Command(argv, {**HARDENED_ENV, "FLWR_HOME": str(state / "flwr-home")})


def write_connection(flwr_home: Path, address: str, root_certificates: Path) -> None:
    """Write the Flower CLI connection ``radfed`` (TLS with the federation's CA)."""
    flwr_home.mkdir(parents=True, exist_ok=True, mode=0o700)
    host, port = parse_address(address)
    (flwr_home / "config.toml").write_text(
        f'[superlink]\ndefault = "{CONNECTION}"\n\n'
        f'[superlink.{CONNECTION}]\naddress = "{format_address(host, port)}"\n'
        f'root-certificates = "{root_certificates.resolve()}"\n'
    )


def register_site(flwr_home: Path, key: Path) -> int:
    """Register one site public key with the running SuperLink; return its node id.

    Raises:
        ConfigError: the SuperLink refused it (e.g. the key is already registered, but
            not in ``sites.json``: unregister it with ``flwr supernode unregister``).
    """
    env = {**os.environ, **HARDENED_ENV, "FLWR_HOME": str(flwr_home)}
    done = subprocess.run(
        [_tool("flwr"), "supernode", "register", str(key), CONNECTION, "--format", "json"],
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


def site_command(
    *,
    ca: Path,
    key: Path,
    site: str,
    data: Path,
    server: str,
    policy: Path | None = None,
    port: int = 9094,
) -> Command:
    """A site's SuperNode: TLS with the federation's CA, authenticated by the site's key."""
    node_config = f'site-name="{site}" data-path="{data.resolve()}"'
    if policy is not None:
        node_config += f' policy-path="{policy.resolve()}"'
    argv = [
        _tool("flower-supernode"),
        "--root-certificates",
        str(ca),
        "--superlink",
        server,
        "--auth-supernode-private-key",
        str(key),
        "--node-config",
        node_config,
        "--port",
        str(port),
    ]
    env = dict(HARDENED_ENV)
    if "FLWR_HOME" not in os.environ:  # app bundles go beside the site's state, not to ~/.flwr
        env["FLWR_HOME"] = str((data / ".radfed" / "flwr-home").resolve())
    return Command(argv, env)


def launch_command(
    app: Path, flwr_home: Path, run_config: Mapping[str, bool | int | float | str]
) -> Command:
    """``flwr run APP radfed --stream`` with the run settings (progress is streamed)."""
    parts = []
    for key, value in run_config.items():
        if isinstance(value, bool):
            parts.append(f"{key}={'true' if value else 'false'}")
        elif isinstance(value, str):
            parts.append(f'{key}="{value}"')
        else:
            parts.append(f"{key}={value}")
    argv = [_tool("flwr"), "run", str(app), CONNECTION, "--stream", "--run-config", " ".join(parts)]
    return Command(argv, {**HARDENED_ENV, "FLWR_HOME": str(flwr_home)})


def start_server(pki: Pki, state: Path, *, host: str = "0.0.0.0", port: int | None = None) -> int:
    """Run the hardened SuperLink in the foreground and register the PKI's site keys.

    Site keys are registered once; ``STATE/sites.json`` maps each site to the node id its
    key was given, and the ServerApp reads it (``RADFED_SITES_FILE``) to name nodes by the
    key they authenticate with.

    Returns:
        The SuperLink's exit code.
    """
    from radfed.federation.rounds import SITES_FILE_ENV

    port = port or parse_address(pki.server_address)[1]
    command = superlink_command(
        ca=pki.server_dir / "ca.crt",
        cert=pki.server_cert,
        key=pki.server_key,
        state=state,
        host=host,
        port=port,
    )
    registry = state / "sites.json"
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


def join_site(
    kit_dir: Path,
    site: str,
    data: Path,
    *,
    server: str = "",
    policy: Path | None = None,
    port: int = 9094,
) -> int:
    """Check the site kit, policy and data, then run the site's SuperNode in the foreground.

    Returns:
        The SuperNode's exit code (non-zero when the server refuses it; Flower logs
        "Exit Code: 305" when the site's key is not registered).
    """
    from radfed.privacy import POLICY_FILE_NAME, load_policy

    kit = load_site_kit(kit_dir)
    if kit.name != site:
        raise ConfigError(f"the kit in {kit_dir} is for site {kit.name!r}, not {site!r}")
    if kit.private_key is None:
        raise ConfigError(
            f"the kit in {kit_dir} has no site.key; put this site's private key there"
        )
    if policy is None and (data / POLICY_FILE_NAME).is_file():
        policy = data / POLICY_FILE_NAME
    effective = load_policy(policy)
    if not (data / "manifest.csv").is_file():
        raise ConfigError(
            f"{data} holds no manifest.csv; prepare it with `radfed site index` and "
            "`radfed site check`"
        )
    command = site_command(
        ca=kit.ca_cert,
        key=kit.private_key,
        site=site,
        data=data,
        server=server or kit.server_address,
        policy=policy,
        port=port,
    )
    logger.info(
        "site %s joins %s (policy: %s)", site, server or kit.server_address, effective.describe()
    )
    return run_foreground(command)


def wait_for_port(host: str, port: int, timeout: float = 60.0) -> None:
    """Block until something accepts TCP connections at ``host:port``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            sock.settimeout(1.0)
            if sock.connect_ex((host, port)) == 0:
                return
        time.sleep(0.2)
    raise ConfigError(f"nothing listens at {host}:{port} after {timeout:.0f} s")


def run_foreground(command: Command, *, after_start: object = None) -> int:
    """Run ``command``, passing SIGINT/SIGTERM on to it; return its exit code.

    ``after_start`` (a callable taking no argument) runs once the process is up.
    """
    process = subprocess.Popen(command.argv, env=command.environ())

    def forward(signum: int, _frame: object) -> None:
        process.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        if callable(after_start):
            try:
                after_start()
            except ConfigError:
                process.terminate()
                process.wait(timeout=30)
                raise
        return process.wait()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        if process.poll() is None:
            process.terminate()
            process.wait(timeout=30)
        logger.debug("process %d ended", process.pid)
