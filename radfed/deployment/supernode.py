"""The site side of a deployment: a site's SuperNode, with TLS and the site's own key."""

from __future__ import annotations

import os
from pathlib import Path

from radfed.deployment.pki import load_site_kit
from radfed.deployment.process import (
    HARDENED_ENV,
    Command,
    flower_tool,
    port_is_free,
    run_foreground,
)
from radfed.errors import ConfigError
from radfed.folders import MANIFEST_NAME, SiteFolder
from radfed.log import logger
from radfed.privacy import load_policy

__all__ = ["RUNTIME_HOST", "join_site", "site_command"]

#: Where a SuperNode serves its local Runtime API (to its ClientApp processes only).
RUNTIME_HOST = "127.0.0.1"


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
        flower_tool("flower-supernode"),
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
        env["FLWR_HOME"] = str(SiteFolder(data).state.flwr_home.resolve())
    return Command(argv, env)


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
    kit = load_site_kit(kit_dir)
    if kit.name != site:
        raise ConfigError(f"the kit in {kit_dir} is for site {kit.name!r}, not {site!r}")
    if kit.private_key is None:
        raise ConfigError(
            f"the kit in {kit_dir} has no site.key; put this site's private key there"
        )
    folder = SiteFolder(data)
    if policy is None and folder.policy.is_file():
        policy = folder.policy
    effective = load_policy(policy)
    if not folder.manifest.is_file():
        raise ConfigError(
            f"{data} holds no {MANIFEST_NAME}; prepare it with `radfed site index` and "
            "`radfed site check`"
        )
    if not port_is_free(RUNTIME_HOST, port):
        raise ConfigError(
            f"local port {port} is taken (another site or program on this host uses it); "
            "give this site its own with --port"
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
