"""The central team's side of a run: the Flower CLI connection, and ``flwr run`` of the app."""

from __future__ import annotations

import subprocess
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path

from radfed.deployment.certs import format_address, parse_address
from radfed.deployment.pki import registered_sites
from radfed.deployment.process import HARDENED_ENV, Command, flower_tool
from radfed.errors import ConfigError
from radfed.log import logger

__all__ = [
    "CONNECTION",
    "find_ca",
    "launch",
    "launch_command",
    "write_connection",
]

#: The Flower CLI connection name radfed writes into its own ``FLWR_HOME``.
CONNECTION = "radfed"


def write_connection(flwr_home: Path, address: str, root_certificates: Path) -> None:
    """Write the Flower CLI connection ``radfed`` (TLS with the federation's CA)."""
    flwr_home.mkdir(parents=True, exist_ok=True, mode=0o700)
    host, port = parse_address(address)
    (flwr_home / "config.toml").write_text(
        f'[superlink]\ndefault = "{CONNECTION}"\n\n'
        f'[superlink.{CONNECTION}]\naddress = "{format_address(host, port)}"\n'
        f'root-certificates = "{root_certificates.resolve()}"\n'
    )


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
    argv = [
        flower_tool("flwr"),
        "run",
        str(app),
        CONNECTION,
        "--stream",
        "--run-config",
        " ".join(parts),
    ]
    return Command(argv, {**HARDENED_ENV, "FLWR_HOME": str(flwr_home)})


def find_ca(pki: Path) -> Path:
    """The federation's CA certificate in a PKI folder or a site kit.

    Raises:
        ConfigError: neither holds one.
    """
    for ca in (pki / "ca" / "ca.crt", pki / "server" / "ca.crt", pki / "ca.crt"):
        if ca.is_file():
            return ca
    raise ConfigError(f"no ca.crt in {pki}; give the PKI folder or a site kit")


def launch(
    app: Path,
    server: str,
    pki: Path,
    out: Path,
    settings: Mapping[str, bool | int | float | str],
    *,
    min_sites: int = 0,
    on_line: Callable[[str], None] | None = None,
) -> int:
    """Submit the app as a run to the server and stream its log until it ends.

    With ``on_line``, each line of the streamed log is handed to it (the CLI's live
    display) instead of going straight to this process's output.

    The run's ``sites`` are the sites registered in the PKI folder (when it is the central
    one), and a round needs all of them unless ``min_sites`` says fewer.

    Returns:
        ``flwr run``'s exit code.

    Raises:
        ConfigError: no CA certificate in ``pki``.
    """
    ca = find_ca(pki)
    sites = registered_sites(pki)
    run_config = {
        **settings,
        "out-dir": str(out.absolute()),
        **({"sites": ",".join(sites)} if sites else {}),
        "min-sites": min_sites or max(1, len(sites)),
    }
    logger.info(
        "launching %s for %s rounds on %s -> %s",
        settings.get("task"),
        settings.get("num-server-rounds"),
        server,
        out,
    )
    with tempfile.TemporaryDirectory(prefix="radfed-launch-") as home:
        write_connection(Path(home), server, ca)
        command = launch_command(app, Path(home), run_config)
        if on_line is None:
            return subprocess.run(command.argv, env=command.environ(), check=False).returncode
        with subprocess.Popen(
            command.argv,
            env=command.environ(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            bufsize=1,
        ) as process:
            assert process.stdout is not None
            for line in process.stdout:
                on_line(line)
        return process.returncode
