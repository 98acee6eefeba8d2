"""Deployed round time: a real deployment on 127.0.0.1 against ``radfed simulate``.

On the same generated sites (``radfed synth --task classification``) and the same run
settings, three runs: (a) ``radfed simulate`` (Flower's simulation engine, Ray); (b) a
deployment with warm tasks (radfed's default: each site's SuperExec forks every task from a
process that imported torch and radfed once, ``radfed/site/warm.py``); (c) the same with
``RADFED_WARM_TASKS=0`` at the sites (every task a fresh process, as Flower does; skip it
with ``--skip-cold``). A deployment is stood up as ``tests/e2e/test_deployment.py`` does:
a fresh PKI (``radfed pki init``, ``radfed site keygen``, ``radfed pki add-site``),
``radfed server start`` (nginx at the edge + SuperLink, a run store), one ``radfed site
join`` per site and ``radfed launch``; each in its own process group, stopped by its PID
(SIGTERM, then SIGKILL) whatever happens. Every run gets fresh copies of the sites (no
decoded-case cache from an earlier run) and its own ``FLWR_HOME``.

Round and phase times come from each run folder's ``events.jsonl`` (round r: ROUND_ENDED's
``seconds``, from the start of round r; a phase: PHASE_STARTED to PHASE_ENDED). Round 1 is
reported apart (first data decoding, and Ray's or the sites' first tasks); the medians are
over rounds 2..N.

Where a deployed phase goes is measured inside the site's processes, without changing
radfed: the sites (and the simulation) start with a ``sitecustomize.py`` of this benchmark
on ``PYTHONPATH`` that appends time stamps to a trace file: the task process's creation
(``/proc/self/stat``), its interpreter start (cold tasks), Flower's ``pull_task_input`` and
``push_message`` in the task, radfed's train/evaluate handler, ``_prepare`` and
``load_site_once`` in it, and in the SuperNode the start of the pull that brought each message
and the reply's departure (``_push_messages``). Process start
(``python -c pass``) and the imports of a cold task (``python -c 'import radfed.site.runtime,
torch, monai.transforms'``) are also timed as fresh processes of their own.

Run: ``python bench/deployed_bench.py [--sites 2 --cases-per-site 60 --rounds 3 --seed 7]``
(about 10 minutes on 2 CPU cores with the defaults). Results: ``deployed_bench.json`` and
``deployed_bench.md`` in ``--out`` (default ``bench/results/``); progress goes to stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

_ROOT = Path(__file__).resolve().parents[1]

#: Flower's polling, in the installed flwr (1.41): (what, seconds, where). A deployed phase
#: waits for each at most once per message; a simulation waits for none of them.
FLOWER_POLLING = (
    (
        "SuperNode: sleep when a pull from the SuperLink brought no message",
        3.0,
        "flwr/supernode/start_client_internal.py:263",
    ),
    (
        "SuperExec: task poll interval (FLWR_SUPEREXEC_TASK_POLL_INTERVAL; Flower's default"
        " 1 s, a site's radfed.flower_private.SUPEREXEC_POLL_S)",
        0.1,
        "flwr/supercore/superexec/run_superexec.py:51 (sleep at :280)",
    ),
    (
        "SuperNode: wait for the task's reply before pushing it",
        0.5,
        "flwr/supernode/start_client_internal.py:470",
    ),
)


def _server_pull() -> tuple[float, str]:
    """radfed's own pull of replies on the server (the same in simulation and deployment),
    read from the source as it is now: (seconds, where)."""
    source = _ROOT / "radfed" / "central" / "rounds.py"
    for number, line in enumerate(source.read_text().splitlines(), start=1):
        if line.startswith("_PULL_EVERY = "):
            return float(line.split("=")[1].split("#")[0]), f"radfed/central/rounds.py:{number}"
    return float("nan"), "radfed/central/rounds.py (_PULL_EVERY not found)"


SERVER_PULL = _server_pull()

#: The trace hooks, installed in every Python process of a site (and of the simulation).
_SITECUSTOMIZE = r'''
"""deployed_bench's trace hooks (bench only): time stamps to $RADFED_BENCH_TRACE."""
import functools
import json
import os
import sys
import time

_PATH = os.environ.get("RADFED_BENCH_TRACE")
_SITE = os.environ.get("RADFED_BENCH_SITE", "")


def _created():
    """When this process was created (fork), as epoch seconds (10 ms resolution)."""
    try:
        with open("/proc/self/stat") as handle:
            ticks = int(handle.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as handle:
            uptime = float(handle.read().split()[0])
        return time.time() - (uptime - ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return None


def _emit(event, **facts):
    line = {"t": time.time(), "pid": os.getpid(), "site": _SITE, "event": event, **facts}
    fd = os.open(_PATH, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, (json.dumps(line) + "\n").encode())
    finally:
        os.close(fd)


def _timed(function, before, after):
    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        _emit(before)
        try:
            return function(*args, **kwargs)
        finally:
            _emit(after)

    return wrapper


def _handler(function, kind):
    @functools.wraps(function)  # radfed names the audit entry after the handler
    def wrapper(msg, context):
        import torch
        from radfed.site.node import server_round

        meta = msg.metadata
        try:
            round_ = server_round(msg)
        except Exception:
            round_ = None
        _emit(
            "handler-start",
            kind=kind,
            message=meta.message_id,
            group=meta.group_id,
            round=round_,
            node=meta.dst_node_id,
            created=_created(),
            threads=torch.get_num_threads(),
        )
        try:
            return function(msg, context)
        finally:
            _emit("handler-end", kind=kind, message=meta.message_id)

    return wrapper


def _patch_handlers(module):
    if any(part == b"radfed.site.warm" for part in _ARGV):  # the warm process has imported
        _emit("warm-imported")
    module._train = _handler(module._train, "train")
    module._evaluate = _handler(module._evaluate, "evaluate")
    module._prepare = _timed(module._prepare, "prepare-start", "prepare-end")
    module.load_site_once = _timed(module.load_site_once, "data-start", "data-end")


def _patch_clientapp(module):
    module.run_clientapp = _timed(module.run_clientapp, "clientapp-start", "clientapp-end")
    module.pull_task_input = _timed(module.pull_task_input, "pull-start", "pull-end")
    module.pull_and_inflate_object_from_tree = _timed(
        module.pull_and_inflate_object_from_tree, "inflate-start", "inflate-end"
    )
    module.push_message = _timed(module.push_message, "push-start", "push-end")


def _patch_supernode(module):
    pull = module._pull_and_store_message

    @functools.wraps(pull)
    def pulled(*args, **kwargs):
        began = time.time()
        calls = {"objects": 0, "object_s": 0.0, "receive_s": 0.0}

        def counted(function, count, seconds):
            @functools.wraps(function)
            def wrapper(*a, **k):
                start = time.perf_counter()
                try:
                    return function(*a, **k)
                finally:
                    if count:
                        calls[count] += 1
                    calls[seconds] += time.perf_counter() - start

            return wrapper

        kwargs["pull_object"] = counted(kwargs["pull_object"], "objects", "object_s")
        kwargs["receive"] = counted(kwargs["receive"], "", "receive_s")
        run_id = pull(*args, **kwargs)
        if run_id is not None:  # this pull brought a message
            _emit("node-pulled", started=began, ended=time.time(), **calls)
        return run_id

    module._pull_and_store_message = pulled
    # called after a message was pulled and stored; returns once its reply has left
    module._push_messages = _timed(module._push_messages, "node-push-start", "node-push-end")


def _patch_runtime(module):
    module.main = _timed(module.main, "task-entry", "task-exit")


_PATCHES = {
    "radfed.site.handlers": _patch_handlers,
    "radfed.site.runtime": _patch_runtime,
    "flwr.supernode.runtime.run_clientapp": _patch_clientapp,
    "flwr.supernode.start_client_internal": _patch_supernode,
}


class _Finder:
    """Patches a module of _PATCHES right after it is executed."""

    def find_spec(self, name, path, target=None):
        if name not in _PATCHES:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None:
                break
        else:
            return None
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            _PATCHES[name](module)

        spec.loader.exec_module = exec_module
        return spec


try:
    with open("/proc/self/cmdline", "rb") as _handle:
        _ARGV = _handle.read().split(b"\0")
except OSError:
    _ARGV = []
if _PATH:
    if any(part.endswith(b"flwr-clientapp") for part in _ARGV):
        _emit("interpreter", created=_created())
    sys.meta_path.insert(0, _Finder())
'''


def _say(text: str) -> None:
    print(f"deployed_bench: {text}", file=sys.stderr, flush=True)


# --- processes ------------------------------------------------------------------------


class _Process:
    """A radfed command in its own process group, its output in a log file; ``stop`` ends
    the group by the PID started here (SIGTERM, then SIGKILL)."""

    def __init__(self, log: Path, args: list[str], env: dict[str, str]) -> None:
        self.log = log
        self._handle = log.open("ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "radfed", *args],
            cwd=_ROOT,
            env=env,
            stdout=self._handle,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.pid = self.process.pid

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for(self, text: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.output():
            if self.process.poll() is not None or time.monotonic() > deadline:
                msg = f"{text!r} not seen in {self.log}; its end:\n{self.output()[-3000:]}"
                raise RuntimeError(msg)
            time.sleep(0.5)

    def wait(self, timeout: float) -> int:
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            msg = (
                f"{self.log.name}: no end after {timeout:.0f} s; its end:\n{self.output()[-3000:]}"
            )
            raise RuntimeError(msg) from None

    def stop(self) -> None:
        for sig, grace in ((signal.SIGTERM, 15.0), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(self.pid, sig)
            except ProcessLookupError:
                break
            deadline = time.monotonic() + grace
            while time.monotonic() < deadline and _group_alive(self.pid):
                self.process.poll()  # reap the leader, or the group stays alive as a zombie
                time.sleep(0.2)
            if not _group_alive(self.pid):
                break
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=5)
        self._handle.close()


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def _processes() -> Iterator[list[_Process]]:
    """Every process started in the block is stopped when it ends, however it ends."""
    started: list[_Process] = []
    try:
        yield started
    finally:
        for process in reversed(started):
            process.stop()


def _radfed(args: list[str], env: dict[str, str], timeout: float = 300) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "radfed", *args],
        cwd=_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if done.returncode != 0:
        msg = f"radfed {' '.join(args[:2])} failed ({done.returncode}): {done.stderr[-2000:]}"
        raise RuntimeError(msg)
    return done.stdout


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


# --- the runs -------------------------------------------------------------------------


@dataclass
class _Bench:
    """The work folder, the settings of every run and the environment of every process."""

    work: Path
    sites: int
    cases: int
    rounds: int
    seed: int
    image_size: int
    site_threads: int = 1
    hooks: Path = field(init=False)

    def __post_init__(self) -> None:
        self.hooks = self.work / "hooks"
        self.hooks.mkdir(parents=True, exist_ok=True)
        (self.hooks / "sitecustomize.py").write_text(_SITECUSTOMIZE)

    @property
    def run_config(self) -> str:
        return f"image-size={self.image_size} local-epochs=1 seed={self.seed}"

    def env(self, name: str, **extra: str) -> dict[str, str]:
        home = self.work / "flwr-home" / name
        home.mkdir(parents=True, exist_ok=True)
        return {
            **os.environ,
            "FLWR_HOME": str(home),
            "FLWR_TELEMETRY_ENABLED": "0",
            "FLWR_DISABLE_UPDATE_CHECK": "1",
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
            "RADFED_APP": str(_ROOT),
            **extra,
        }

    def traced(self, trace: Path, site: str = "") -> dict[str, str]:
        path = os.pathsep.join(p for p in (str(self.hooks), os.environ.get("PYTHONPATH")) if p)
        return {"PYTHONPATH": path, "RADFED_BENCH_TRACE": str(trace), "RADFED_BENCH_SITE": site}

    def data(self, name: str) -> Path:
        """A fresh copy of the generated sites, without any radfed state."""
        copy = self.work / f"data-{name}"
        shutil.copytree(
            self.work / "data", copy, ignore=shutil.ignore_patterns(".radfed"), dirs_exist_ok=True
        )
        return copy

    def synth(self) -> list[str]:
        _radfed(
            [
                "synth",
                *("--task", "classification", "--sites", str(self.sites)),
                *("--cases-per-site", str(self.cases), "--seed", str(self.seed)),
                *("--image-size", str(self.image_size), "--out", str(self.work / "data")),
            ],
            self.env("synth"),
        )
        return sorted(p.name for p in (self.work / "data").iterdir() if p.is_dir())

    def simulate(self) -> dict[str, Any]:
        name, trace = "simulate", self.work / "trace-simulate.jsonl"
        out = self.work / "run-simulate"
        env = self.env(name, **self.traced(trace))
        started = time.perf_counter()
        with _processes() as started_here:
            run = _Process(
                self.work / "simulate.log",
                [
                    *("simulate", "--data", str(self.data(name)), "--task", "classification"),
                    *("--rounds", str(self.rounds), "--seed", str(self.seed)),
                    *("--out", str(out), "--run-config", self.run_config, "--store", "none"),
                ],
                env,
            )
            started_here.append(run)
            code = run.wait(timeout=1800)
        if code != 0:
            raise RuntimeError(f"radfed simulate failed ({code}): {run.output()[-3000:]}")
        return _summary(out, trace, time.perf_counter() - started)

    def deploy(self, name: str, site_folders: list[str], *, warm: bool) -> dict[str, Any]:
        """One deployment from scratch: PKI, server, sites, one run; everything stopped."""
        root, trace = self.work / name, self.work / f"trace-{name}.jsonl"
        root.mkdir()
        data, pki, port = self.data(name), root / "pki", _free_pair()
        sites = {folder.removeprefix("site-"): folder for folder in site_folders}
        _radfed(
            ["pki", "init", "--out", str(pki), "--server-address", f"127.0.0.1:{port}"],
            self.env(f"{name}-pki"),
        )
        for site in sites:
            kit = root / "kits" / site
            _radfed(["site", "keygen", "--site", site, "--out", str(kit)], self.env(f"{name}-pki"))
            _radfed(
                ["pki", "add-site", site, "--pki", str(pki), "--csr", str(kit / "site.csr")],
                self.env(f"{name}-pki"),
            )
            for file in ("ca.crt", "site.crt", "site.toml"):  # what the central team sends
                shutil.copy(pki / "sites" / site / file, kit / file)
        out = root / "run"
        started = time.perf_counter()
        with _processes() as started_here:
            server = _Process(
                root / "server.log",
                [
                    *("server", "start", "--pki", str(pki), "--state", str(root / "state")),
                    *("--host", "127.0.0.1", "--store", f"sqlite:///{root / 'runs.sqlite'}"),
                ],
                self.env(f"{name}-server"),
            )
            started_here.append(server)
            server.wait_for("server ready", timeout=300)
            _say(f"{name}: server ready after {time.perf_counter() - started:.0f} s")
            joined = []
            for site, folder in sites.items():
                extra = self.traced(trace, site)
                if not warm:
                    extra["RADFED_WARM_TASKS"] = "0"
                if self.site_threads:  # torch's CPU threads at this site (read at import)
                    extra["OMP_NUM_THREADS"] = extra["MKL_NUM_THREADS"] = str(self.site_threads)
                process = _Process(
                    root / f"site-{site}.log",
                    [
                        *("site", "join", "--pki", str(root / "kits" / site), "--site", site),
                        *("--data", str(data / folder), "--port", str(_free_port())),
                    ],
                    self.env(f"{name}-site-{site}", **extra),
                )
                started_here.append(process)
                joined.append(process)
            if warm:  # a site joins long before a run: its warm process is ready by then
                _wait_warm(trace, len(joined), joined, timeout=300)
            _say(f"{name}: {len(joined)} sites joined; launching {self.rounds} rounds")
            launched = time.perf_counter()
            launch = _Process(
                root / "launch.log",
                [
                    *("launch", "--server", f"127.0.0.1:{port + 1}", "--pki", str(pki)),
                    *("--out", str(out), "--rounds", str(self.rounds)),
                    *("--min-sites", str(len(sites)), "--site-wait", "300"),
                    *("--run-config", self.run_config),
                ],
                self.env(f"{name}-launch"),
            )
            started_here.append(launch)
            code = launch.wait(timeout=3600)
            if code != 0:
                raise RuntimeError(
                    f"{name}: radfed launch failed ({code}): {launch.output()[-3000:]}"
                )
            launch_seconds = time.perf_counter() - launched
            warm_ready = [_warm_import(p.output()) for p in joined] if warm else []
        summary = _summary(out, trace, launch_seconds)
        summary["warm_process_import_s"] = warm_ready
        return summary


def _wait_warm(trace: Path, sites: int, joined: list[_Process], timeout: float) -> None:
    """Until every site's warm process has imported radfed's handlers (its preload)."""
    deadline = time.monotonic() + timeout
    while sum(line["event"] == "warm-imported" for line in _jsonl(trace)) < sites:
        if time.monotonic() > deadline or any(p.process.poll() is not None for p in joined):
            raise RuntimeError(f"the sites' warm processes were not ready after {timeout:.0f} s")
        time.sleep(0.5)
    time.sleep(2.0)  # the rest of its preload (radfed.tasks), already imported by now


def _warm_import(log: str) -> float | None:
    """The import time the site's warm process reported ("imports took X s")."""
    marker = "imports took "
    at = log.find(marker)
    if at < 0:
        return None
    with contextlib.suppress(ValueError):
        return float(log[at + len(marker) :].split()[0])
    return None


# --- reading the runs -----------------------------------------------------------------


def _time(stamp: str) -> float:
    return datetime.fromisoformat(stamp).timestamp()


def _jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    lines = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(ValueError):
            lines.append(json.loads(line))
    return lines


def _summary(out: Path, trace: Path, wall: float) -> dict[str, Any]:
    """Rounds and phases from the run folder's events.jsonl, the split from the trace."""
    events = _jsonl(out / "events.jsonl")
    phases: dict[tuple[int, str], dict[str, float]] = {}
    rounds: dict[int, float] = {}
    for event in events:
        if event["kind"] in ("phase-started", "phase-ended"):
            key = (int(event["round"]), str(event["phase"]))
            side = "start" if event["kind"] == "phase-started" else "end"
            phases.setdefault(key, {})[side] = _time(event["at"])
        elif event["kind"] == "round-ended":
            rounds[int(event["round"])] = float(event["seconds"])
    if not rounds:
        raise RuntimeError(f"{out}: no round ended (events.jsonl: {len(events)} lines)")
    per_round = []
    for r in sorted(rounds):
        row: dict[str, Any] = {"round": r, "seconds": rounds[r]}
        for phase in ("train", "evaluate"):
            span = phases.get((r, phase), {})
            row[phase] = span["end"] - span["start"] if {"start", "end"} <= set(span) else None
        row["between"] = rounds[r] - sum(row[p] or 0.0 for p in ("train", "evaluate"))
        per_round.append(row)
    survey = phases.get((0, "survey"), {})
    return {
        "wall_seconds": round(wall, 2),
        "survey_seconds": survey["end"] - survey["start"] if len(survey) == 2 else None,
        "rounds": per_round,
        "median_later": _later_medians(per_round),
        "tasks": _tasks(_jsonl(trace), phases),
    }


def _later_medians(per_round: list[dict[str, Any]]) -> dict[str, float | None]:
    later = [row for row in per_round if row["round"] >= 2] or per_round
    return {
        key: _median([row[key] for row in later if row[key] is not None])
        for key in ("seconds", "train", "evaluate", "between")
    }


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


#: The parts of one task at a site, in order: (name, from event, to event).
_PARTS = (
    ("wait: SuperNode poll", "phase-start", "node-received"),
    ("wait: SuperExec poll + launch", "node-received", "created"),
    ("process start", "created", "interpreter"),
    ("imports", "interpreter", "pull-start"),
    ("Flower task input", "pull-start", "pull-end"),
    ("app + checks", "pull-end", "data-start"),
    ("data", "data-start", "data-end"),
    ("model + weights", "data-end", "prepare-end"),
    ("train/evaluate", "prepare-end", "handler-end"),
    ("reply (egress, audit, push)", "handler-end", "push-end"),
    ("wait: SuperNode reply poll + send", "push-end", "node-push-end"),
    ("wait: server pull + other sites", "node-push-end", "phase-end"),
)
#: Totals that a simulation has too: phase start to handler, the handler, handler to end.
_TOTALS = (
    ("phase start to handler", "phase-start", "handler-start"),
    ("handler", "handler-start", "handler-end"),
    ("handler end to phase end", "handler-end", "phase-end"),
)


def _tasks(trace: list[dict[str, Any]], phases: dict[tuple[int, str], dict[str, float]]) -> list:
    """One row per task (site, round, phase): the time stamps of its steps, and its parts.

    A task is a fresh process (cold), a fork of the warm process, or one handler call in a
    simulated node's long-lived process. The message reaches the site with the SuperNode's
    pull that brought it (its start is taken); the SuperNode's ``_push_messages`` ends when
    the reply has left.
    """
    by_pid: dict[int, list[dict[str, Any]]] = {}
    for line in sorted(trace, key=lambda x: x["t"]):
        by_pid.setdefault(int(line["pid"]), []).append(line)
    node: dict[str, list[tuple[str, float]]] = {}  # site -> SuperNode events in time order
    for line in sorted(trace, key=lambda x: x["t"]):
        if line["event"] == "node-pulled":
            node.setdefault(line["site"], []).append(("node-pulled", line["started"]))
        elif line["event"] == "node-push-end":
            node.setdefault(line["site"], []).append((line["event"], line["t"]))
    rows = []
    for pid, lines in by_pid.items():
        interp = next((x for x in lines if x["event"] == "interpreter"), None)
        for stamps, start in _segments(lines):
            if start.get("created") is not None:
                stamps["created"] = float(start["created"])
            if interp is not None and interp["t"] <= stamps["handler-start"]:
                stamps["interpreter"] = float(interp["t"])
                if interp.get("created") is not None:
                    stamps["created"] = float(interp["created"])
            elif "pull-start" in stamps:  # a fork of the warm process: no interpreter start
                stamps["interpreter"] = stamps.get("created", stamps["pull-start"])
            began = stamps.get("pull-start", stamps["handler-start"])
            arrivals = [t for e, t in node.get(start["site"], []) if e == "node-pulled"]
            before = [t for t in arrivals if t <= began]
            if before:
                stamps["node-received"] = before[-1]
            if "push-end" in stamps:
                after = [
                    t
                    for e, t in node.get(start["site"], [])
                    if e == "node-push-end" and t >= stamps["push-end"]
                ]
                if after:
                    stamps["node-push-end"] = after[0]
            round_ = int(start["round"]) if start.get("round") is not None else 0
            phase = start["kind"] if round_ else "survey"
            span = phases.get((round_, phase), {})
            if "start" in span:
                stamps["phase-start"] = span["start"]
            if "end" in span:
                stamps["phase-end"] = span["end"]
            parts = {
                name: round(stamps[b] - stamps[a], 3)
                for name, a, b in (*_PARTS, *_TOTALS)
                if a in stamps and b in stamps
            }
            rows.append(
                {
                    "site": start["site"] or f"node {start['node']}",
                    "pid": pid,
                    "round": round_,
                    "phase": phase,
                    "torch_threads": start.get("threads"),
                    "parts": parts,
                }
            )
    return sorted(rows, key=lambda row: (row["round"], row["phase"], row["site"]))


def _segments(lines: list[dict[str, Any]]) -> Iterator[tuple[dict[str, float], dict[str, Any]]]:
    """A process's trace cut into tasks: (first time stamp of each event, handler-start)."""
    current: dict[str, float] = {}
    start: dict[str, Any] | None = None
    for line in lines:
        event = line["event"]
        if event in ("pull-start", "handler-start") and event in current:
            if start is not None:
                yield current, start
            current, start = {}, None
        if event == "handler-start" and start is not None:  # a simulated node's next call
            yield current, start
            current, start = {}, None
        if event == "handler-start":
            start = line
        current.setdefault(event, float(line["t"]))
    if start is not None:
        yield current, start


def _split(tasks: list[dict[str, Any]], rounds_from: int = 2) -> dict[str, dict[str, float]]:
    """Per phase (train, evaluate): the median of each part over sites and rounds >= 2."""
    out: dict[str, dict[str, float]] = {}
    for phase in ("train", "evaluate"):
        rows = [t for t in tasks if t["phase"] == phase and t["round"] >= rounds_from]
        if not rows:  # a run of one round
            rows = [t for t in tasks if t["phase"] == phase]
        medians = {}
        for name, _, _ in (*_PARTS, *_TOTALS):
            values = [t["parts"][name] for t in rows if name in t["parts"]]
            if values:
                medians[name] = round(statistics.median(values), 3)
        out[phase] = medians
    return out


# --- fresh-process reference timings --------------------------------------------------


def _fresh(code: str, repeats: int) -> dict[str, Any]:
    """Wall seconds of ``python -c CODE`` in fresh processes (median of ``repeats``)."""
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        subprocess.run([sys.executable, "-P", "-c", code], cwd=_ROOT, check=True)
        times.append(time.perf_counter() - began)
    return {"code": code, "seconds": [round(t, 3) for t in times], "median": _median(times)}


# --- report ---------------------------------------------------------------------------


def _compare(runs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    pairs = [("warm", "simulate"), ("cold", "simulate"), ("cold", "warm")]
    for a, b in pairs:
        if a not in runs or b not in runs:
            continue
        row = {}
        for key in ("seconds", "train", "evaluate"):
            later_a, later_b = runs[a]["median_later"][key], runs[b]["median_later"][key]
            first_a = runs[a]["rounds"][0][key]
            first_b = runs[b]["rounds"][0][key]
            row[key] = {
                "later_diff_s": _round(later_a - later_b) if later_a and later_b else None,
                "later_ratio": _round(later_a / later_b) if later_a and later_b else None,
                "round1_diff_s": _round(first_a - first_b) if first_a and first_b else None,
                "round1_ratio": _round(first_a / first_b) if first_a and first_b else None,
            }
        out[f"{a} - {b}"] = row
    return out


def _round(value: float) -> float:
    return round(value, 3)


#: The parts of a task that are Flower's polling (a simulation has none of them).
_POLLING_PARTS = (
    "wait: SuperNode poll",
    "wait: SuperExec poll + launch",
    "wait: SuperNode reply poll + send",
)
#: The part that ends a task's chain: from its reply's departure to the phase's end.
_LAST_WAIT = "wait: server pull + other sites"


def _critical_polling(tasks: list[dict[str, Any]]) -> dict[int, float]:
    """Per round: Flower's polling on the round's critical path.

    A phase ends when its last reply is in, so its time is the chain of the site whose reply
    came last (the least wait for the server's pull): that site's polling is the phase's,
    each part counted up to its interval in ``FLOWER_POLLING`` (the SuperExec's part also
    holds the task's launch, the reply's part its sending: those count as overhead).
    The medians of the parts over all sites mix chains: a site whose message came early
    waits for the other site's polling in its "server pull + other sites" part, which is
    polling too.
    """
    last: dict[tuple[int, str], dict[str, Any]] = {}
    incomplete = _incomplete_phases(tasks)
    for task in tasks:
        parts = task["parts"]
        key = (int(task["round"]), str(task["phase"]))
        if task["phase"] not in ("train", "evaluate") or key in incomplete:
            continue
        if key not in last or parts[_LAST_WAIT] < last[key]["parts"][_LAST_WAIT]:
            last[key] = task
    polling: dict[int, float] = {}
    for (round_, _), task in last.items():
        waits = sum(
            min(task["parts"].get(name, 0.0), seconds)  # the rest is launch, sending
            for name, (_, seconds, _) in zip(_POLLING_PARTS, FLOWER_POLLING, strict=True)
        )
        polling[round_] = polling.get(round_, 0.0) + waits
    return polling


def _incomplete_phases(tasks: list[dict[str, Any]]) -> set[tuple[int, str]]:
    """The (round, phase) pairs with a task whose chain the trace did not complete: their
    critical path is unknown (the site whose reply came last may be that one)."""
    return {
        (int(task["round"]), str(task["phase"]))
        for task in tasks
        if task["phase"] in ("train", "evaluate")
        and not all(name in task["parts"] for name in (*_POLLING_PARTS, _LAST_WAIT))
    }


def _target(runs: dict[str, dict[str, Any]], splits: dict[str, Any]) -> dict[str, Any]:
    """Deployed (warm) round within 2 s of a simulated one, plus Flower's polling.

    Per later round: the deployed round's seconds less the polling on its critical path
    (``_critical_polling``), less the simulated later round (median); the median of those.
    The older figure (round medians less the medians of the polling parts over all sites)
    is kept beside it: it counts a site's wait for another site's polling as overhead.
    """
    if "warm" not in runs:
        return {}
    simulated = runs["simulate"]["median_later"]["seconds"]
    diff = runs["warm"]["median_later"]["seconds"] - simulated
    polling = 0.0
    for phase in ("train", "evaluate"):
        parts = splits["warm"].get(phase, {})
        polling += sum(parts.get(name, 0.0) for name in _POLLING_PARTS)
    critical = _critical_polling(runs["warm"]["tasks"])
    rounds = {row["round"]: row["seconds"] for row in runs["warm"]["rounds"]}
    incomplete = _incomplete_phases(runs["warm"]["tasks"])
    left_out = sorted({r for r, _ in incomplete} | (set(rounds) - set(critical)))
    critical = {r: v for r, v in critical.items() if r not in left_out}
    later = [r for r in sorted(critical) if r >= 2 and r in rounds] or sorted(
        r for r in critical if r in rounds
    )
    beyond = [rounds[r] - critical[r] - simulated for r in later]
    median_beyond = _median(beyond)
    bound = 2 * sum(seconds for _, seconds, _ in FLOWER_POLLING)
    return {
        "deployed_minus_simulated_s": _round(diff),
        "critical_polling_s": {str(r): _round(critical[r]) for r in later},
        "rounds_left_out": left_out,  # a phase's chain incomplete in the trace
        "beyond_polling_per_round_s": [_round(b) for b in beyond],
        "beyond_polling_s": None if median_beyond is None else _round(median_beyond),
        "polling_bound_s": round(bound, 3),
        "met": median_beyond is not None and median_beyond <= 2.0,
        "median_parts_polling_s": _round(polling),
        "median_parts_beyond_s": _round(diff - polling),
    }


def _fmt(value: float | None, unit: str = "") -> str:
    return "-" if value is None else f"{value:.2f}{unit}"


def _markdown(result: dict[str, Any]) -> str:
    runs, s = result["runs"], result["settings"]
    lines = [
        "# Deployed round time: `radfed simulate` vs a deployment on 127.0.0.1",
        "",
        f"{s['sites']} sites x {s['cases_per_site']} cases (classification, image-size "
        f"{s['image_size']}, 1 local epoch), {s['rounds']} rounds, seed {s['seed']}; "
        f"deployed sites with {s.get('site_threads') or 'default'} torch thread(s) each; "
        f"{result['cpus']} CPUs, shared with other work. Round and phase times from "
        "events.jsonl; later = median over rounds 2..N.",
        "",
        "| run | round 1 s | later round s | later train s | later evaluate s | "
        "later between s | survey s |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, run in runs.items():
        first, later = run["rounds"][0], run["median_later"]
        lines.append(
            f"| {name} | {_fmt(first['seconds'])} | {_fmt(later['seconds'])} "
            f"| {_fmt(later['train'])} | {_fmt(later['evaluate'])} | {_fmt(later['between'])} "
            f"| {_fmt(run['survey_seconds'])} |"
        )
    lines += ["", "| comparison | later round | later train | later evaluate | round 1 |"]
    lines.append("|---|---:|---:|---:|---:|")
    for name, row in result["comparison"].items():
        cells = [
            f"{_fmt(row[k]['later_diff_s'], ' s')} ({_fmt(row[k]['later_ratio'], 'x')})"
            for k in ("seconds", "train", "evaluate")
        ]
        first = row["seconds"]
        cells.append(f"{_fmt(first['round1_diff_s'], ' s')} ({_fmt(first['round1_ratio'], 'x')})")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Where a task's time goes (medians over sites and rounds 2..N, seconds; measured by "
        "the trace hooks):",
        "",
        "| part | "
        + " | ".join(f"{n} {p}" for n in result["split"] for p in ("train", "eval"))
        + " |",
        "|---|" + "---:|" * (2 * len(result["split"])),
    ]
    for name, _, _ in (*_PARTS, *_TOTALS):
        cells = [
            _fmt(result["split"][n][p].get(name))
            for n in result["split"]
            for p in ("train", "evaluate")
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    ref = result["fresh_processes"]
    lines += [
        "",
        f"Fresh processes: `python -c pass` {_fmt(ref['process_start']['median'], ' s')}; "
        f"`import radfed.site.runtime, torch, monai.transforms` "
        f"{_fmt(ref['imports']['median'], ' s')} (wall, with process start).",
        "",
        "Flower's polling (installed flwr): "
        + "; ".join(f"{what} {sec} s ({where})" for what, sec, where in FLOWER_POLLING)
        + f"; server pull {SERVER_PULL[0]} s ({SERVER_PULL[1]}, in both).",
    ]
    target = result["target"]
    if target:
        diff = _fmt(target["deployed_minus_simulated_s"], " s")
        critical = ", ".join(f"{v:.2f} s" for v in target["critical_polling_s"].values())
        each = ", ".join(f"{v:.2f} s" for v in target["beyond_polling_per_round_s"])
        beyond = _fmt(target["beyond_polling_s"], " s")
        verdict = "met (<= 2 s)" if target["met"] else "not met (> 2 s)"
        lines += [
            "",
            f"Target (warm): deployed - simulated {diff} a round (medians). Flower's polling "
            f"on each later round's critical path (in each phase, the chain of the site whose "
            f"reply came last) {critical} (bound {target['polling_bound_s']} s); deployed "
            f"round less that polling less the simulated round: {each}; median {beyond}: "
            f"{verdict}."
            + (
                " Rounds left out (a chain the trace did not complete): "
                f"{target['rounds_left_out']}."
                if target["rounds_left_out"]
                else ""
            ),
            "",
            f"(Medians of the polling parts over all sites instead: "
            f"{_fmt(target['median_parts_polling_s'], ' s')}, leaving "
            f"{_fmt(target['median_parts_beyond_s'], ' s')}; that counts a site's wait for "
            "the other site's polling, in its 'server pull + other sites', as overhead.)",
        ]
    return "\n".join(lines) + "\n"


def _parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sites", type=int, default=2)
    parser.add_argument("--cases-per-site", type=int, default=60)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--out", type=Path, default=_ROOT / "bench" / "results")
    parser.add_argument("--skip-cold", action="store_true", help="no RADFED_WARM_TASKS=0 run")
    parser.add_argument(
        "--site-threads",
        type=int,
        default=1,
        help="torch CPU threads of each deployed site (OMP_NUM_THREADS): 1, as each simulated "
        "site gets one Ray CPU and the sites share this machine; 0: torch's default",
    )
    parser.add_argument("--work-dir", type=Path, help="keep logs, runs and traces here")
    args = parser.parse_args()
    for key in ("sites", "cases_per_site", "rounds", "image_size"):
        if getattr(args, key) < 1:
            parser.error(f"--{key.replace('_', '-')} must be at least 1, got {getattr(args, key)}")
    if shutil.which("nginx") is None and not Path("/usr/sbin/nginx").exists():
        parser.error("nginx is needed by `radfed server start`: apt-get install nginx")
    return args


def main() -> None:
    args = _parse()
    work = (
        Path(tempfile.mkdtemp(prefix="deployed_bench-")) if args.work_dir is None else args.work_dir
    )
    work.mkdir(parents=True, exist_ok=True)
    bench = _Bench(
        work,
        args.sites,
        args.cases_per_site,
        args.rounds,
        args.seed,
        args.image_size,
        site_threads=args.site_threads,
    )
    stop = signal.getsignal(signal.SIGTERM)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the finally blocks
    began = time.perf_counter()
    try:
        _say(f"work folder {work}")
        folders = bench.synth()
        _say(f"generated {len(folders)} sites")
        fresh = {
            "process_start": _fresh("pass", 5),
            "imports": _fresh("import radfed.site.runtime, torch, monai.transforms", 3),
        }
        _say(f"fresh processes: {fresh['imports']['median']:.1f} s to import")
        runs: dict[str, dict[str, Any]] = {"simulate": bench.simulate()}
        _say(f"simulate: rounds {[r['seconds'] for r in runs['simulate']['rounds']]}")
        runs["warm"] = bench.deploy("warm", folders, warm=True)
        _say(f"warm: rounds {[r['seconds'] for r in runs['warm']['rounds']]}")
        if not args.skip_cold:
            runs["cold"] = bench.deploy("cold", folders, warm=False)
            _say(f"cold: rounds {[r['seconds'] for r in runs['cold']['rounds']]}")
    finally:
        signal.signal(signal.SIGTERM, stop)
        if args.work_dir is None and not os.environ.get("DEPLOYED_BENCH_KEEP"):
            shutil.rmtree(work, ignore_errors=True)
    splits = {name: _split(run["tasks"]) for name, run in runs.items()}
    result: dict[str, Any] = {
        "settings": {
            "sites": args.sites,
            "cases_per_site": args.cases_per_site,
            "rounds": args.rounds,
            "image_size": args.image_size,
            "seed": args.seed,
            "site_threads": args.site_threads,
            "run_config": bench.run_config,
        },
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "load_average": os.getloadavg(),
        "flower_polling": [{"what": w, "seconds": s, "where": p} for w, s, p in FLOWER_POLLING],
        "server_pull": {"seconds": SERVER_PULL[0], "where": SERVER_PULL[1]},
        "fresh_processes": fresh,
        "runs": runs,
        "comparison": _compare(runs),
        "split": splits,
        "target": _target(runs, splits),
        "wall_seconds": round(time.perf_counter() - began, 1),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "deployed_bench.json").write_text(json.dumps(result, indent=1) + "\n")
    table = _markdown(result)
    (args.out / "deployed_bench.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
