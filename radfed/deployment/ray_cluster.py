"""Simulating on an existing Ray cluster: its address, its nodes, and each site's share.

``radfed simulate --ray-address HOST:PORT`` joins a cluster that ``ray start`` made instead
of starting Ray on this machine. Ray refuses ``num_cpus``/``num_gpus`` when it joins a
cluster, so the sites' Ray actors are sized from what the cluster's nodes have.
"""

from __future__ import annotations

import logging
import math
import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from radfed.errors import ConfigError

__all__ = ["SiteResources", "cluster_nodes", "parse_ray_address", "site_resources"]

#: Seconds the cluster's address may take to accept a connection before it counts as
#: unreachable (Ray itself retries an unreachable address for many minutes).
CONNECT_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class SiteResources:
    """What each simulated site's Ray actor reserves on a node."""

    cpus: int
    gpus: float


def parse_ray_address(address: str) -> tuple[str, int]:
    """The host and port of ``HOST:PORT`` (an IPv6 host in brackets: ``[::1]:6379``).

    Raises:
        ConfigError: ``address`` is not of that form.
    """
    host, sep, port = address.strip().rpartition(":")
    host = host.strip().removeprefix("[").removesuffix("]")
    if not sep or not host or "/" in host or not port.isdigit() or not 0 < int(port) < 65536:
        msg = (
            "--ray-address must be HOST:PORT, the address that 'ray start --head' printed "
            f"(e.g. 10.0.0.5:6379), got {address!r}"
        )
        raise ConfigError(msg)
    return host, int(port)


def cluster_nodes(address: str) -> list[dict[str, float]]:
    """The resources (``CPU``, ``GPU``, ...) of each live node of the Ray cluster at
    ``address``: this process joins the cluster as a Ray driver, reads them and leaves.

    Raises:
        ConfigError: nothing accepts a connection at ``address`` within
            ``CONNECT_TIMEOUT_S``, or Ray cannot join the cluster from this machine.
    """
    host, port = parse_ray_address(address)
    try:
        with socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S):
            pass
    except OSError as err:
        msg = (
            f"--ray-address {address}: no Ray cluster can be reached there "
            f"({err.strerror or err or type(err).__name__}); start one with "
            f"'ray start --head --port={port}' on that machine, or pass the address that "
            "'ray start --head' printed"
        )
        raise ConfigError(msg) from None

    import ray  # the simulation engine, imported only when a run needs it

    try:
        ray.init(address=address, logging_level=logging.ERROR, log_to_driver=False)
        nodes = [
            {str(k): float(v) for k, v in node["Resources"].items()}
            for node in ray.nodes()  # type: ignore[no-untyped-call]
            if node.get("Alive") and node.get("Resources")
        ]
    except Exception as err:  # Ray raises RuntimeError, ValueError, ConnectionError
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        msg = (
            f"--ray-address {address}: cannot join a Ray cluster there ({reason}); pass the "
            "cluster's own address (the --port of 'ray start --head', default 6379, not the "
            "dashboard's or Ray Client's port), run radfed simulate on a node of the cluster "
            "(one where 'ray start' ran) with the same Python, Ray and radfed versions as its "
            "other nodes, and, if the cluster uses token authentication, with its "
            "RAY_AUTH_MODE=token and token (RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH) set"
        )
        raise ConfigError(msg) from None
    finally:
        ray.shutdown()
    return nodes


def site_resources(nodes: Sequence[Mapping[str, float]], sites: int) -> SiteResources:
    """Each site's share of a cluster's nodes (as ``cluster_nodes`` reads them).

    GPUs: when the cluster has any, an equal share of them, at most one whole GPU per site
    (sites then run only on nodes with a GPU); otherwise none. CPUs: the most whole CPUs per
    site that still lets every site run at once on the nodes (each node hosts as many sites
    as fit in its CPUs and GPUs, as Flower counts them), at least one. So the cluster holds
    about one Ray actor per site, each training with that many threads.

    Raises:
        ConfigError: no node can host a site.
    """
    total_gpus = sum(node.get("GPU", 0.0) for node in nodes)
    # Ray counts resources in steps of 1e-4: round the share down so that shares add up.
    gpus = math.floor(min(1.0, total_gpus / sites) * 1e4) / 1e4 if total_gpus else 0.0
    hosts = [node for node in nodes if node.get("GPU", 0.0) > 0] if gpus else list(nodes)

    def fitting(cpus: int) -> int:
        """How many sites the hosts run at once with ``cpus`` CPUs each."""
        return sum(
            min(
                int(node.get("CPU", 0.0) // cpus),
                int(node.get("GPU", 0.0) / gpus) if gpus else sites,
            )
            for node in hosts
        )

    most = int(max((node.get("CPU", 0.0) for node in hosts), default=0.0))
    if most < 1 or fitting(1) < 1:
        kind = "a CPU and a GPU share" if gpus else "a whole CPU"
        msg = (
            f"no node of the Ray cluster has {kind} to run a site on; start the cluster's "
            "nodes with 'ray start --num-cpus N' (N of at least 1)"
        )
        raise ConfigError(msg)
    cpus = next((c for c in range(most, 0, -1) if fitting(c) >= sites), 1)
    return SiteResources(cpus=cpus, gpus=gpus)
