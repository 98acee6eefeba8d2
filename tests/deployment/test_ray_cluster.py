"""Joining an existing Ray cluster: the address, the reachability check, each site's share.
(A real two-node cluster runs in tests/e2e/test_ray_cluster.py.)"""

from __future__ import annotations

import socket
import time

import pytest

from radfed.deployment.ray_cluster import (
    SiteResources,
    cluster_nodes,
    parse_ray_address,
    site_resources,
)
from radfed.errors import ConfigError


def _closed_port() -> int:
    """A loopback port that nothing listens on."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        ("10.0.0.5:6379", ("10.0.0.5", 6379)),
        ("head-node:6380", ("head-node", 6380)),
        ("[::1]:6379", ("::1", 6379)),
    ],
)
def test_an_address_is_host_and_port(address: str, expected: tuple[str, int]) -> None:
    assert parse_ray_address(address) == expected


@pytest.mark.parametrize(
    "address",
    [
        "head-node",
        ":6379",
        "head-node:",
        "head-node:0",
        "head-node:70000",
        "head-node:port",
        "ray://head-node:10001",
    ],
)
def test_an_address_without_host_and_port_is_refused_by_name(address: str) -> None:
    with pytest.raises(ConfigError, match="must be HOST:PORT") as raised:
        parse_ray_address(address)
    assert repr(address) in str(raised.value)


def test_an_unreachable_cluster_is_a_config_error_that_says_how_to_start_one() -> None:
    # Prepare
    port = _closed_port()
    started = time.monotonic()

    # Execute
    with pytest.raises(ConfigError) as raised:
        cluster_nodes(f"127.0.0.1:{port}")

    # Assert
    message = str(raised.value)
    assert f"--ray-address 127.0.0.1:{port}: no Ray cluster can be reached there" in message
    assert f"'ray start --head --port={port}'" in message
    assert time.monotonic() - started < 5  # refused at once, not Ray's minutes of retries


def test_cpu_sites_get_one_cpu_each_on_one_cpu_nodes() -> None:
    nodes = [{"CPU": 1.0, "memory": 1e9}, {"CPU": 1.0}]
    assert site_resources(nodes, 2) == SiteResources(cpus=1, gpus=0.0)


def test_sites_share_a_large_cluster_so_that_all_run_at_once() -> None:
    # 4 nodes of 32 CPUs, 10 sites: 10 CPUs each fits 3 a node (12 >= 10), 11 only 8
    nodes = [{"CPU": 32.0}] * 4
    assert site_resources(nodes, 10) == SiteResources(cpus=10, gpus=0.0)
    # a head node without CPUs hosts nothing; more sites than CPUs: one CPU each
    assert site_resources([{"CPU": 0.0}, {"CPU": 4.0}], 2).cpus == 2
    assert site_resources([{"CPU": 2.0}, {"CPU": 2.0}], 7).cpus == 1


def test_gpus_are_shared_among_sites_on_the_nodes_that_have_them() -> None:
    # Prepare: one GPU node (2 GPUs, 8 CPUs) and a CPU-only node
    nodes = [{"CPU": 8.0, "GPU": 2.0}, {"CPU": 64.0}]

    # Execute
    share = site_resources(nodes, 4)

    # Assert: half a GPU each, so the 4 sites fit the GPU node with 2 CPUs each
    assert share == SiteResources(cpus=2, gpus=0.5)
    assert site_resources(nodes, 3).gpus == 0.6666  # rounded down: shares add up to <= 2
    assert site_resources(nodes, 1) == SiteResources(cpus=8, gpus=1.0)  # at most one GPU


def test_a_cluster_without_a_cpu_to_run_a_site_is_refused() -> None:
    with pytest.raises(ConfigError, match="no node of the Ray cluster has a whole CPU"):
        site_resources([{"CPU": 0.0}, {"CPU": 0.5}], 2)
    with pytest.raises(ConfigError, match="a CPU and a GPU share"):
        site_resources([{"CPU": 0.0, "GPU": 1.0}, {"CPU": 16.0}], 2)
