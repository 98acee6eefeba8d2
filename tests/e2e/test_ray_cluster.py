"""`radfed simulate --ray-address` on a real two-node Ray cluster (2 tiny sites, 1 round).

Both nodes run on this machine, on loopback: the head node at 127.0.0.2, the worker node at
127.0.0.3 (Ray replaces a node address of 127.0.0.1 with the machine's network address, and
distinct addresses tell the nodes apart). Each node has its own temp folder, so its logs are
its own. Every process the test starts is stopped by its PID (its process group), never by
name, and none may be left.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from radfed.data.synth import synth_classification
from tests.e2e.processes import run_simulate

#: Ray-backed simulations run one at a time, on one pytest-xdist worker.
pytestmark = [pytest.mark.e2e, pytest.mark.xdist_group("ray")]
HEAD, WORKER = "127.0.0.2", "127.0.0.3"
SITES = ("site-a", "site-b")
#: Ray's smallest object store; two nodes share this machine's memory.
OBJECT_STORE_BYTES = 100 * 1024**2
_RAY_ENV = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0"}

#: Run as a Ray driver of its own after the simulation: the live nodes' addresses, and the
#: node address of every ClientApp call the cluster recorded (Ray's task timeline).
_CLUSTER_QUERY = """
import json, sys, ray
ray.init(address=sys.argv[1], logging_level="ERROR", log_to_driver=False)
nodes = sorted(n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"])
runs = [e["pid"] for e in ray.timeline() if e.get("cat") == "task::ClientAppActor.run"]
ray.shutdown()
print(json.dumps({"nodes": nodes, "runs": runs}))
"""


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("", 0))  # Ray's servers listen on every interface: free on all of them
        return int(probe.getsockname()[1])


def _raylets(root: Path) -> list[str]:
    """The PIDs of the raylets (one per node) whose folders are under ``root``."""
    pattern = f"raylet/raylet --raylet_socket_name={root}/"  # not a worker's --raylet-name
    found = subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True)
    return found.stdout.split()


def _state(pid: int) -> tuple[str, int] | None:
    """A process's state letter and process group; None when it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return fields[0], int(fields[2])


def _alive(pid: int) -> bool:
    """Running, not a zombie: an orphan's exit status waits for PID 1 to collect it."""
    state = _state(pid)
    return state is not None and state[0] != "Z"


def _group_pids(pgid: int) -> set[int]:
    """The live processes of a process group (from /proc)."""
    pids = (int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit())
    return {pid for pid in pids if _alive(pid) and (_state(pid) or ("", 0))[1] == pgid}


class _RayNode:
    """One Ray node: ``ray start --block`` in a process group of its own, which holds every
    process of the node (GCS, raylet, agents, workers)."""

    def __init__(self, temp_dir: Path, *args: str) -> None:
        temp_dir.mkdir(parents=True)
        self.temp_dir = temp_dir
        self.log = temp_dir / "ray-start.log"
        self._handle = self.log.open("wb")
        ray = Path(sys.executable).with_name("ray")
        self.process = subprocess.Popen(
            [str(ray), "start", "--block", f"--temp-dir={temp_dir}", *args],
            env={**os.environ, **_RAY_ENV},
            stdout=self._handle,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.pid = self.process.pid
        self.seen: set[int] = set()  # every process of the group seen while it ran

    def wait_started(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while "Ray runtime started." not in self.log.read_text(errors="replace"):
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"ray start failed:\n{self.log.read_text()[-4000:]}")
            time.sleep(0.5)
        self.seen |= _group_pids(self.pid)

    def stop(self) -> None:
        """SIGTERM to the group (``ray start --block`` stops its node), then SIGKILL."""
        self.seen |= _group_pids(self.pid)
        for sig, grace in ((signal.SIGTERM, 30.0), (signal.SIGKILL, 5.0)):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pid, sig)
            deadline = time.monotonic() + grace
            while _group_pids(self.pid) and time.monotonic() < deadline:
                self.process.poll()  # reap the leader, or it stays a zombie of the group
                time.sleep(0.2)
            if not _group_pids(self.pid):
                break
        self.process.poll()
        self._handle.close()

    def trained_lines(self) -> list[str]:
        """The ClientApps' training lines in this node's own worker logs."""
        logs = sorted((self.temp_dir / "session_latest" / "logs").glob("worker-*"))
        return [
            line
            for log in logs
            for line in log.read_text(errors="replace").splitlines()
            if re.search(r"round 1: trained on \d+ cases", line)
        ]


@pytest.fixture
def cluster() -> Iterator[tuple[str, _RayNode, _RayNode]]:
    """A head and a worker node on loopback; stopped (by PID) whatever the test did."""
    # A short folder: Ray's sockets live under it and a socket path has at most 107 bytes.
    root = Path(tempfile.mkdtemp(prefix="radfed-ray-", dir="/tmp"))
    port = _free_port()
    nodes: list[_RayNode] = []
    try:
        head = _RayNode(
            root / "head",
            "--head",
            f"--node-ip-address={HEAD}",
            f"--port={port}",
            f"--ray-client-server-port={_free_port()}",
            "--num-cpus=1",
            "--num-gpus=0",
            f"--object-store-memory={OBJECT_STORE_BYTES}",
            "--min-worker-port=0",  # both nodes' workers on free ports, not one fixed range
            "--max-worker-port=0",
            "--include-dashboard=false",
            "--disable-usage-stats",
        )
        nodes.append(head)
        head.wait_started(timeout=90)
        worker = _RayNode(
            root / "worker",
            f"--address={HEAD}:{port}",
            f"--node-ip-address={WORKER}",
            "--num-cpus=1",
            "--num-gpus=0",
            f"--object-store-memory={OBJECT_STORE_BYTES}",
            "--min-worker-port=0",
            "--max-worker-port=0",
        )
        nodes.append(worker)
        worker.wait_started(timeout=90)
        yield f"{HEAD}:{port}", head, worker
    finally:
        for node in reversed(nodes):  # the worker node first, then the head
            node.stop()
        shutil.rmtree(root, ignore_errors=True)


def test_simulate_runs_the_sites_on_both_nodes_of_a_ray_cluster(
    cluster: tuple[str, _RayNode, _RayNode], tmp_path: Path
) -> None:
    # Prepare
    address, head, worker = cluster
    data, out = tmp_path / "data", tmp_path / "run"
    synth_classification(data, sites=len(SITES), cases_per_site=24, seed=3, image_size=32)

    # Execute
    output = run_simulate(
        tmp_path / "flwr-home",
        "--data",
        str(data),
        "--out",
        str(out),
        "--rounds",
        "1",
        "--ray-address",
        address,
        "--run-config",
        "image-size=32 local-epochs=1 batch-size=8 min-cell-size=1",
        "--store",
        "none",
    )
    query = subprocess.run(
        [sys.executable, "-c", _CLUSTER_QUERY, address],
        env={**os.environ, **_RAY_ENV},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert query.returncode == 0, query.stderr[-4000:]
    recorded = json.loads(query.stdout.strip().splitlines()[-1])
    trained = {HEAD: head.trained_lines(), WORKER: worker.trained_lines()}
    raylets_running = _raylets(head.temp_dir.parent)
    for node in (worker, head):
        node.stop()

    # Assert
    joined = f"on the Ray cluster at {address}: 2 nodes, 1 CPUs and 0 GPUs per site"
    assert joined in output, output[-4000:]
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert {(r["round"], r["site"], r["split"]) for r in lines} == {
        (1, site, split) for site in (*SITES, "ALL") for split in ("train", "val")
    }
    assert all(r["n"] and not r["suppressed"] for r in lines if r["site"] != "ALL")
    # The ClientApps ran on both nodes: Ray recorded ClientApp calls on each node's address,
    # and each node's own worker logs hold a site's training (one per site in all).
    assert recorded["nodes"] == [HEAD, WORKER]
    assert set(recorded["runs"]) == {HEAD, WORKER}, recorded
    assert trained[HEAD] and trained[WORKER], trained
    assert len(trained[HEAD]) + len(trained[WORKER]) == len(SITES), trained
    # Nothing the test started is left: no process of either node's group, no raylet.
    assert len(raylets_running) == 2
    for node in (head, worker):
        assert node.seen and not _group_pids(node.pid)
        assert not [pid for pid in node.seen if _alive(pid)], node.seen
    assert _raylets(head.temp_dir.parent) == []
