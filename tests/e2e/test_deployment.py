"""A real deployment on 127.0.0.1: `radfed pki`, `radfed server start` (SuperLink with TLS
and node authentication), `radfed site join` (SuperNodes with their keys and policies) and
`radfed launch`, with a site sending NaN weights, a site killed mid-run, an unregistered
site, and the server killed and resumed. Every process is stopped by its PID."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from radfed.data.synth import synth_classification
from radfed.deployment.launch import write_connection
from radfed.deployment.site_node import site_tls
from radfed.folders import find_app_dir
from radfed.privacy import read_entries, verify
from tests.e2e.processes import Background
from tests.helpers import needs_nginx

#: One federation per module, on one pytest-xdist worker (beside the Ray group: it waits).
pytestmark = [pytest.mark.e2e, pytest.mark.xdist_group("deployment"), needs_nginx]

#: Settings of every run: small and quick; the run's k (2) is below what site b allows.
#: A site that dies is noticed by its missed heartbeats (about a minute); round-timeout bounds
#: a round whatever happens.
#: FedAdam, so that resuming must also restore the server optimiser's moments.
RUN_CONFIG = (
    "image-size=32 local-epochs=1 batch-size=8 min-cell-size=2 round-timeout=240.0 "
    'strategy="fedadam"'
)

#: Site a's cache cap in bytes: about a quarter of its decoded cases at image-size 32.
CACHE_CAP = 40_000

#: Site c imports this at start-up (PYTHONPATH) and so sends NaN weights: a broken site.
POISON = """
import math
import radfed.site.handlers as client

_shared = client.shared_state

def _poisoned(model, fedbn):
    state = _shared(model, fedbn)
    for value in state.values():
        if value.is_floating_point():
            value.fill_(math.nan)
    return state

client.shared_state = _poisoned
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _free_pair() -> int:
    """A free port whose next one is free too (the edge, and the SuperLink behind it)."""
    while True:
        port = _free_port()
        with socket.socket() as sock:
            if port < 65535 and sock.connect_ex(("127.0.0.1", port + 1)) != 0:
                return port


def _radfed(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "radfed", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        timeout=120,
    )


@dataclass
class Federation:
    root: Path
    port: int
    pki: Path
    data: Path
    processes: dict[str, Background] = field(default_factory=dict)

    @property
    def address(self) -> str:
        """The edge: what the sites reach (mutual TLS, the Fleet API only)."""
        return f"127.0.0.1:{self.port}"

    @property
    def control(self) -> str:
        """The SuperLink on loopback: the Control API, on the server host only."""
        return f"127.0.0.1:{self.port + 1}"

    def kit(self, site: str) -> Path:
        return self.root / "kits" / site

    def enrol(self, site: str) -> str:
        """A site's key made at the site, registered from its request: the real flow.
        Returns the output of `radfed site keygen` and `radfed pki add-site`."""
        kit = self.kit(site)
        made = _radfed("site", "keygen", "--site", site, "--out", str(kit))
        added = _radfed(
            "pki", "add-site", site, "--pki", str(self.pki), "--csr", str(kit / "site.csr")
        )
        assert made.returncode == 0 and added.returncode == 0, made.stderr + added.stderr
        for name in ("ca.crt", "site.crt", "site.toml"):  # what the central team sends back
            shutil.copy(self.pki / "sites" / site / name, kit / name)
        assert not (self.pki / "sites" / site / "site.key").exists()
        return made.stdout + made.stderr + added.stdout + added.stderr

    def env(self, name: str) -> dict[str, str]:
        home = self.root / "flwr-home" / name
        home.mkdir(parents=True, exist_ok=True)
        return {"FLWR_HOME": str(home)}

    @property
    def store(self) -> str:
        """The run store the server's runs write to (`radfed server start --store`)."""
        return f"sqlite:///{self.root / 'runs.sqlite'}"

    def run_in_store(self, name: str) -> dict[str, Any]:
        """`radfed runs show NAME --json`, as the central team reads it."""
        shown = _radfed("runs", "show", name, "--json", "--store", self.store)
        assert shown.returncode == 0, shown.stderr
        detail: dict[str, Any] = json.loads(shown.stdout)
        return detail

    def start_server(self) -> Background:
        server = Background(
            self.root / "server.log",
            "server",
            "start",
            "--pki",
            str(self.pki),
            "--state",
            str(self.root / "state"),
            "--host",
            "127.0.0.1",
            "--store",
            self.store,
            env=self.env("server"),
        )
        self.processes["server"] = server
        server.wait_for("server ready", timeout=120)
        return server

    def join(self, site: str, kit: Path | None = None, **env: str) -> Background:
        process = Background(
            self.root / f"site-{site}.log",
            "site",
            "join",
            "--pki",
            str(kit or self.kit(site)),
            "--site",
            site,
            "--data",
            str(self.data / f"site-{site}"),
            "--port",
            str(_free_port()),
            env={**self.env(f"site-{site}"), **env},
        )
        self.processes[f"site-{site}"] = process
        return process

    def launch(self, out: Path, *args: str, **env: str) -> Background:
        return Background(
            self.root / f"launch-{out.name}.log",
            "launch",
            "--server",
            self.control,
            "--pki",
            str(self.pki),
            "--out",
            str(out),
            "--run-config",
            RUN_CONFIG,
            *args,
            env={**self.env("launch"), **env},
        )


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Federation]:
    root = tmp_path_factory.mktemp("federation")
    data = root / "data"
    synth_classification(data, sites=3, cases_per_site=30, seed=5, image_size=32)
    # site b's own policy: a minimum cell size far above the run's 2
    (data / "site-b" / "site-policy.toml").write_text("[policy]\nmin-cell-size = 1000\n")
    # site a's: a decoded-case cache far smaller than its 30 cases
    (data / "site-a" / "site-policy.toml").write_text(
        f"[policy]\nmin-cell-size = 2\n\n[policy.limits]\ncache-bytes = {CACHE_CAP}\n"
    )
    poison = root / "poison"
    poison.mkdir()
    (poison / "sitecustomize.py").write_text(POISON)
    pki = root / "pki"
    port = _free_pair()
    made = _radfed("pki", "init", "--out", str(pki), "--server-address", f"127.0.0.1:{port}")
    assert made.returncode == 0, made.stderr
    fed = Federation(root=root, port=port, pki=pki, data=data)
    said = "".join(fed.enrol(site) for site in ("a", "b", "c"))
    assert "PRIVATE KEY" not in made.stdout + made.stderr + said
    try:
        fed.start_server()
        fed.join("a")
        fed.join("b")
        fed.join("c", PYTHONPATH=os.pathsep.join([str(poison), os.environ.get("PYTHONPATH", "")]))
        yield fed
    finally:
        for process in fed.processes.values():
            process.stop()


def _metrics(run: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_run_survives_a_nan_site_a_killed_site_and_a_killed_server(
    federation: Federation,
) -> None:
    # Execute: 2 rounds over TLS with authenticated sites. Site c sends NaN weights in
    # round 1 and is killed before it evaluates; the server is killed once round 1 is
    # complete and restarted, and the run is resumed.
    out = federation.root / "run"
    args = ("--rounds", "2", "--min-sites", "2", "--site-wait", "10")
    first = federation.launch(out, *args)
    first.wait_for("round 1: dropped update from c", timeout=400)
    federation.processes["site-c"].stop()  # mid-round: before it evaluates round 1
    first.wait_for("round 1/2 completed", timeout=400)
    federation.processes["server"].stop()
    first.stop()  # its log stream would retry the dead server; its output is all we need
    federation.start_server()
    resumed = federation.launch(out, *args, "--resume")
    code = resumed.wait(timeout=400)
    before, after = first.output(), resumed.output()
    # Assert: c's NaN update was dropped by name; the round without c went on
    assert code == 0, after[-4000:]
    assert "round 1: dropped update from c" in before
    assert "round 1/2: 2 sites trained (local loss a" in before
    assert "round 1/2 val auc: a" in before  # round 1 ended without the dead site
    # the resumed run continued after round 1, waited for c and went on without it
    assert "after round 1 of 2" in after
    assert "waiting for sites: c" in after and "starting without c" in after
    lines = _metrics(out)
    counts = Counter((line["round"], line["site"], line["split"]) for line in lines)
    assert set(counts.values()) == {1}, counts  # every round once, none lost or repeated
    assert {r for r, s, _ in counts if s == "a"} == {1, 2}
    assert "before training: composition of a, b, c" in before
    assert "c" not in {s for r, s, _ in counts if r == 2}
    final = torch.load(out / "checkpoints" / "round-002.pt", weights_only=True)["state_dict"]
    assert all(torch.isfinite(v.float()).all() for v in final.values())
    # the server optimiser's moments were restored, not restarted: FedAdam's state is there
    state = torch.load(out / "checkpoints" / "server-state.pt", weights_only=True)
    assert state["round"] == 2 and state["strategy"]["m_t"] and state["strategy"]["v_t"]
    assert (out / "bias_report.html").is_file()
    # site b enforces its own k (1000) over the run's 2: nothing it sent had counts
    assert all(line["suppressed"] and line["n"] is None for line in lines if line["site"] == "b")
    assert any(line["site"] == "a" and not line["suppressed"] for line in lines)
    # site a's audit log holds every reply that left, and verifies
    audit = federation.data / "site-a" / ".radfed" / "audit.jsonl"
    assert verify(audit) >= 4
    kinds = Counter((e.kind, e.server_round) for e in read_entries(audit))
    assert kinds[("train", 1)] == 1 and kinds[("evaluate", 1)] == 1 and kinds[("evaluate", 2)] >= 1
    shown = subprocess.run(
        [sys.executable, "-m", "radfed", "site", "audit", str(federation.data / "site-a")],
        capture_output=True,
        text=True,
    )
    assert shown.returncode == 0 and "audit log intact" in shown.stdout
    # the run store saw it all as it went: c dropped, then late; the run resumed and ended
    stored = federation.run_in_store("run")
    assert stored["status"] == "finished" and stored["rounds_done"] == 2
    sites = {s["name"]: s for s in stored["sites"]}
    assert sites["c"]["state"] == "late" and sites["c"]["failures"] >= 1
    assert sites["a"]["state"] == "finished" and sites["a"]["replies"] >= 5
    train1 = next(r for r in stored["rounds"] if (r["round"], r["phase"]) == (1, "train"))
    assert "c" in train1["dropped"] and train1["replied"] == 2
    events = _radfed("runs", "show", "run", "--store", federation.store).stdout
    assert "c: late" in events


#: The ClientApp of a hostile app bundle: it leaves a mark, and answers every message with
#: the site's manifest.
HOSTILE_CLIENTAPP = """
from pathlib import Path

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.clientapp import ClientApp

Path({marker!r}).write_text("the bundle's code ran at a site")
app = ClientApp()


def _leak(msg, context):
    manifest = Path(context.node_config["data-path"], "manifest.csv").read_text()
    return Message(RecordDict({{"leak": ConfigRecord({{"manifest": manifest}})}}), reply_to=msg)


app.train()(_leak)
app.evaluate()(_leak)
app.query()(_leak)
"""


def _hostile_bundle(root: Path, marker: Path, version: str | None = None) -> Path:
    """An app folder like radfed's, with the hostile ClientApp (and another version)."""
    app, source = root / "app", find_app_dir()
    for folder in ("server", "client"):
        shutil.copytree(source / folder, app / folder, ignore=shutil.ignore_patterns("__py*"))
    for name in ("pyproject.toml", "LICENSE"):
        shutil.copy(source / name, app / name)
    (app / "client" / "app.py").write_text(HOSTILE_CLIENTAPP.format(marker=str(marker)))
    if version is not None:
        project = (app / "pyproject.toml").read_text()
        project = re.sub(r'(?m)^version = ".*"$', f'version = "{version}"', project, count=1)
        (app / "pyproject.toml").write_text(project)
    return app


def _audit_lines(federation: Federation, site: str) -> list[dict[str, object]]:
    path = federation.data / f"site-{site}" / ".radfed" / "audit.jsonl"
    if not path.is_file():
        return []
    verify(path)
    return [entry.to_json() for entry in read_entries(path)]


def test_no_code_of_an_app_bundle_runs_at_a_site(federation: Federation) -> None:
    # Prepare: a bundle named like this radfed release, whose ClientApp would leave a mark
    # and send each site's manifest
    marker = federation.root / "hostile-mark"
    app = _hostile_bundle(federation.root / "hostile", marker)
    before = len(_audit_lines(federation, "a"))
    out = federation.root / "hostile-run"

    # Execute: the central team launches it (RADFED_APP points radfed launch at it)
    run = federation.launch(
        out, "--rounds", "1", "--min-sites", "2", "--site-wait", "5", RADFED_APP=str(app)
    )
    code = run.wait(timeout=400)

    # Assert: the sites answered with their own radfed; the bundle's code never ran
    assert code == 0, run.output()[-4000:]
    assert not marker.exists()
    entries = _audit_lines(federation, "a")[before:]
    assert {e["kind"] for e in entries} >= {"train", "evaluate"}
    assert all("leak" not in json.dumps(e["records"]) for e in entries)
    assert {line["site"] for line in _metrics(out)} >= {"a", "b", "ALL"}
    # ... forked from the site's warm process (radfed.site.warm), which imported them once
    assert "warm task process ready" in federation.processes["site-a"].output()
    assert "starting the task cold" not in federation.processes["site-a"].output()


def test_a_site_refuses_a_bundle_its_policy_does_not_accept(federation: Federation) -> None:
    # Prepare: the same hostile bundle as version 6.6.6, which no site's policy accepts
    marker = federation.root / "refused-mark"
    app = _hostile_bundle(federation.root / "refused", marker, version="6.6.6")
    before = len(_audit_lines(federation, "a"))

    # Execute
    run = federation.launch(
        federation.root / "refused-run",
        *("--rounds", "1", "--min-sites", "2", "--site-wait", "5"),
        RADFED_APP=str(app),
    )
    run.wait(timeout=400)

    # Assert: every message got error code 3006, each refusal is in the site's audit log
    assert "failed with error code 3006" in run.output()
    assert not marker.exists()
    refusals = [e for e in _audit_lines(federation, "a")[before:] if e["kind"] == "error"]
    assert refusals and {e["error-code"] for e in refusals} == {3006}
    site_log = federation.processes["site-a"].output()
    assert "6.6.6" in site_log and "[policy.bundle]" in site_log  # said at the site, not sent
    # the store shows each site refused, by code, with the reason in the server's words
    sites = {s["name"]: s for s in federation.run_in_store("refused-run")["sites"]}
    assert sites["a"]["state"] == "refused" and sites["a"]["refusals"].get("3006", 0) >= 1
    assert "3006" in (sites["a"]["reason"] or "")


def test_a_run_beyond_a_sites_limits_is_refused_before_any_decoding(
    federation: Federation,
) -> None:
    # Prepare: 1024-pixel images, beyond every site's default limit (512)
    cache = federation.data / "site-a" / ".radfed" / "cache"
    cached = sorted(cache.glob("*.npz"))
    before = len(_audit_lines(federation, "a"))

    # Execute
    run = federation.launch(
        federation.root / "too-big-run",
        *("--rounds", "1", "--min-sites", "2", "--site-wait", "5"),
        *("--run-config", "image-size=1024"),
    )
    run.wait(timeout=400)

    # Assert: error code 3007 from the sites, audited; the limit named at the site only;
    # no case decoded at that size (a new size would add cache entries)
    assert "failed with error code 3007" in run.output()
    assert "limits.image-size" not in run.output()
    refusals = [e for e in _audit_lines(federation, "a")[before:] if e["kind"] == "error"]
    assert refusals and {e["error-code"] for e in refusals} == {3007}
    assert "limits.image-size" in federation.processes["site-a"].output()
    assert sorted(cache.glob("*.npz")) == cached


def test_the_decoded_case_cache_stays_under_the_sites_cap(federation: Federation) -> None:
    # Prepare: whatever the runs above left at site a, its administrator's check reads
    # every case once more, in a fresh process under the site's policy
    site = federation.data / "site-a"
    checked = _radfed("site", "check", str(site), "--run-config", "image-size=32", "--no-preflight")
    assert checked.returncode in (0, 1) and "Traceback" not in checked.stderr, checked.stderr

    # Assert: the cache evicted to stay under the cap, the deployed node's entries and the
    # check's together
    files = list((site / ".radfed" / "cache").glob("*.npz"))
    sizes = [f.stat().st_size for f in files]
    assert files and sum(sizes) <= CACHE_CAP
    assert len(files) < 30  # the site has 30 cases: some were evicted


#: The ServerApp of a server that asks each site to evaluate round 1 twice.
DOUBLE_EVALUATION = """
import time

from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import ServerApp

from radfed.config import RunConfig
from radfed.federation.packing import pack
from radfed.tasks import get_task

app = ServerApp()


@app.main()
def main(grid, context):
    config = RunConfig.from_run_config(context.run_config)
    arrays = pack(get_task(config.task).build_model(config).state_dict())
    deadline = time.monotonic() + 120
    while len(list(grid.get_node_ids())) < 2 and time.monotonic() < deadline:
        time.sleep(1)
    for _ in range(2):  # the same round, twice
        content = RecordDict({"arrays": arrays, "config": ConfigRecord({"server-round": 1})})
        messages = [
            Message(content=content, dst_node_id=node, message_type=MessageType.EVALUATE)
            for node in grid.get_node_ids()
        ]
        list(grid.send_and_receive(messages, timeout=240))
"""


def test_site_audit_shows_what_was_asked_and_a_planted_double_evaluation(
    federation: Federation,
) -> None:
    # Prepare: a bundle of this release whose ServerApp asks for round 1's evaluation twice
    app = _hostile_bundle(federation.root / "double", federation.root / "double-mark")
    (app / "server" / "app.py").write_text(DOUBLE_EVALUATION)
    before = len(_audit_lines(federation, "a"))

    # Execute
    federation.launch(federation.root / "double-run", RADFED_APP=str(app)).wait(timeout=400)
    shown = subprocess.run(
        [sys.executable, "-m", "radfed", "site", "audit", str(federation.data / "site-a")],
        capture_output=True,
        text=True,
    )

    # Assert: both requests are in the log with what was asked; the first was answered with
    # the values that left, the repeat refused by the site's query budget (3005)
    entries = [
        e
        for e in _audit_lines(federation, "a")[before:]
        if isinstance(e["request"], dict) and str(e["request"]["kind"]).startswith("evaluate")
    ]
    assert [e["kind"] for e in entries] == ["evaluate", "error"]
    for entry in entries:
        request = entry["request"]
        assert isinstance(request, dict)
        assert request["bundle-sha256"] and request["weights-sha256"]
    released = entries[0]["released"]
    assert isinstance(released, dict) and released["metrics"]["num-examples"] > 0
    assert entries[1]["error-code"] == 3005 and entries[1]["released"] == {}
    assert shown.returncode == 1, shown.stdout[-2000:]
    assert "repeated evaluation: evaluated 2 times" in shown.stdout


def test_the_public_port_serves_the_fleet_api_to_sites_only(federation: Federation) -> None:
    # Prepare: a Flower CLI connection to the public port (the edge), as an outsider with
    # the CA certificate would write it
    home = federation.root / "outsider"
    write_connection(home, federation.address, federation.pki / "ca" / "ca.crt")
    stranger = federation.root / "stranger"
    _radfed("site", "keygen", "--site", "stranger", "--out", str(stranger))
    env = {**os.environ, "FLWR_HOME": str(home)}
    flwr = str(Path(sys.executable).parent / "flwr")

    # Execute: register a node key, list the runs, and call the Control API as a site
    registered = subprocess.run(
        [flwr, "supernode", "register", str(stranger / "site.pub"), "radfed"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    listed = subprocess.run(
        [flwr, "ls", "radfed"], env=env, capture_output=True, text=True, timeout=120
    )
    kit = federation.kit("a")
    with httpx.Client(
        verify=site_tls(kit / "ca.crt", kit / "site.crt", kit / "site.key")
    ) as client:
        control = client.post(f"https://{federation.address}/v1/control/list-runs", content=b"")

    # Assert: none of it went through the edge (the runs of the other tests reached the
    # Control API on the server host, as the central team does)
    # (the same `flwr supernode register` succeeds on the server host: the next test)
    assert registered.returncode != 0, registered.stdout + registered.stderr
    assert listed.returncode != 0, listed.stdout + listed.stderr
    assert control.status_code == 403
    # the failures came from the connection, not from how the commands were written
    for done in (registered, listed):
        assert "Usage:" not in done.stdout + done.stderr, done.stdout + done.stderr


def test_a_node_registered_outside_the_pki_is_never_a_site(federation: Federation) -> None:
    # Prepare: site e is enrolled in the PKI after the server started, and its key is then
    # registered with the SuperLink through the Control API on the server host: a node the
    # SuperLink knows, but not from `radfed server start` (sites.json)
    federation.enrol("e")
    shutil.copytree(federation.data / "site-a", federation.data / "site-e")
    shutil.rmtree(federation.data / "site-e" / ".radfed")
    server_home = federation.root / "state" / "flwr-home"
    registered = subprocess.run(
        [
            str(Path(sys.executable).parent / "flwr"),
            *("supernode", "register", str(federation.kit("e") / "site.pub"), "radfed"),
        ],
        env={**os.environ, "FLWR_HOME": str(server_home)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert registered.returncode == 0, registered.stdout + registered.stderr
    federation.join("e")
    time.sleep(10)  # connected before the run starts
    out = federation.root / "with-e-run"

    # Execute
    run = federation.launch(out, "--rounds", "1", "--min-sites", "2", "--site-wait", "5")
    code = run.wait(timeout=400)

    # Assert: e was named a security event and sent nothing; the run went on without it
    assert code == 0, run.output()[-3000:]
    assert "security: node" in run.output()
    assert "e" not in {line["site"] for line in _metrics(out)}
    assert not (federation.data / "site-e" / ".radfed" / "audit.jsonl").exists()
    federation.processes["site-e"].stop()
    # The SuperLink never registers a key twice: the central team drops e's key from the
    # PKI (the server's next start unregisters the node; e would make a new key)
    shutil.rmtree(federation.pki / "sites" / "e")
    (federation.pki / "server" / "site-keys" / "e.pub").unlink()


def test_a_site_whose_key_is_not_registered_is_refused(federation: Federation) -> None:
    federation.enrol("d")
    (federation.data / "site-d").symlink_to(federation.data / "site-a")
    intruder = federation.join("d")
    code = intruder.wait(timeout=120)
    assert code != 0
    assert "305" in intruder.output()


def test_a_replaced_site_key_is_refused_and_the_new_one_joins(federation: Federation) -> None:
    # Prepare: site b lost its key; it makes a new one, the central team replaces the old
    # one in the PKI (as deploy/README.md says), and the server restarts
    for name in ("site-b", "server"):
        federation.processes[name].stop()
    old_kit = federation.root / "old-kit-b"
    shutil.move(federation.kit("b"), old_kit)
    shutil.rmtree(federation.pki / "sites" / "b")
    (federation.pki / "server" / "site-keys" / "b.pub").unlink()
    federation.enrol("b")
    server = federation.start_server()

    # Execute: the old key tries to join as b, then the new one joins
    thief = federation.join("b", kit=old_kit)
    code = thief.wait(timeout=120)
    site = federation.join("b")
    time.sleep(15)

    # Assert: the old node was unregistered, so its key is refused; the new key stays joined
    assert "site b: its key was replaced; its old node is unregistered" in server.output()
    assert code != 0 and "305" in thief.output()
    assert site.process.poll() is None, site.output()[-3000:]
