"""Memory and round time of ``radfed simulate`` as the number of simulated sites grows.

For each size in ``--sites`` (default 10, 30, 100, 300, 1000): ``radfed synth`` writes that
many small classification sites (``--cases-per-site`` cases of ``--image-size`` pixels),
then ``radfed simulate`` trains ``--rounds`` rounds of 1 local epoch on them, in a fresh
process with its own ``FLWR_HOME``, Ray temp folder and no run store. While it runs, the
memory of the whole process tree (the simulate process and every child: Ray's GCS,
raylet, workers) is summed every ``--interval`` seconds (PSS where the kernel gives it,
else RSS; both are kept) and the peak is reported. Round times come from the run folder's
``events.jsonl`` (``phase-started``/``phase-ended``/``round-ended``).

The sizes run in order and stop at the first that fails or passes ``--timeout`` or
``--max-memory-gb``: the report names the largest size this machine ran and why the next
did not. Every process a point starts is stopped (its process group, then any process of
its tree that left the group) whatever happens.

Run: ``python bench/scale_bench.py [--sites 10 30 100] [--timeout 900]``. Results go to
``--out`` (default ``bench/results/``): ``scale_bench.json``, ``scale_bench.md`` and, with
matplotlib, ``scale_bench.png``. Progress goes to stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

from radfed.folders import RunEvent


def _import_psutil() -> Any:
    """psutil, or the copy Ray ships (``ray/thirdparty_files``) when it is not installed."""
    try:
        import psutil
    except ImportError:
        import importlib.util

        ray = importlib.util.find_spec("ray")  # finds the package without importing Ray
        if ray is None or not ray.submodule_search_locations:
            sys.exit("scale_bench: needs psutil (pip install psutil) or Ray's copy of it")
        sys.path.append(str(Path(next(iter(ray.submodule_search_locations))) / "thirdparty_files"))
        import psutil
    return psutil


psutil = _import_psutil()
_Process = Any  # psutil.Process (psutil ships no type hints)

_ROOT = Path(__file__).resolve().parent.parent
#: Seconds a process group gets between SIGTERM and SIGKILL.
_GRACE = 10.0
#: Stop a point when the machine has less memory than this left (other work shares it).
_MIN_AVAILABLE = 1 << 30
#: Process roles in the memory breakdown, by name or command line.
_ROLES = (
    ("gcs_server", "ray gcs_server"),
    ("raylet", "ray raylet"),
    ("ray::", "ray workers (site ClientApps)"),
    ("default_worker.py", "ray workers (site ClientApps)"),
    ("ray/", "ray helpers (log monitor, agents)"),
)


def _log(message: str) -> None:
    print(f"{datetime.now():%H:%M:%S} scale_bench: {message}", file=sys.stderr, flush=True)


# --- the process tree -----------------------------------------------------------------


class _Tree:
    """The processes one point started: the root, its descendants, and its session (a
    process that left the tree, reparented to init, is still in the root's session unless
    it called setsid; one seen once in the tree stays tracked until it exits)."""

    def __init__(self, root: _Process) -> None:
        self.root = root
        self.session = os.getsid(root.pid)
        self.seen: dict[int, _Process] = {root.pid: root}

    def members(self) -> list[_Process]:
        found = dict(self.seen)
        for process in list(self.seen.values()):
            with contextlib.suppress(psutil.Error):
                for child in process.children(recursive=True):
                    found.setdefault(child.pid, child)
        for process in psutil.process_iter():
            with contextlib.suppress(OSError, psutil.Error):
                if process.pid not in found and os.getsid(process.pid) == self.session:
                    found[process.pid] = process
        alive = {pid: p for pid, p in found.items() if _alive(p)}
        self.seen = alive
        return list(alive.values())


def _alive(process: _Process) -> bool:
    """Running and the same process (``is_running`` checks the creation time: no PID reuse)."""
    try:
        return bool(process.is_running() and process.status() != psutil.STATUS_ZOMBIE)
    except psutil.Error:
        return False


def _name(process: _Process) -> str:
    try:
        return str(process.name())
    except psutil.Error:
        return "?"


def _role(process: _Process, root: int) -> str:
    if process.pid == root:
        return "radfed process (ServerApp, Flower, Ray driver)"
    try:
        text = process.name() + " " + " ".join(process.cmdline())
    except psutil.Error:
        return "other"
    for needle, role in _ROLES:
        if needle in text:
            return role
    return "other"


@dataclasses.dataclass
class _Sample:
    """One look at the tree: summed memory in bytes and the process count."""

    at: float
    pss: int
    rss: int
    processes: int
    by_role: dict[str, int]


def _sample(tree: _Tree, started: float) -> _Sample:
    pss = rss = 0
    by_role: dict[str, int] = {}
    members = tree.members()
    for process in members:
        try:
            info = process.memory_full_info()
        except psutil.AccessDenied:
            try:
                info = process.memory_info()
            except psutil.Error:
                continue
        except psutil.Error:
            continue
        own = getattr(info, "pss", info.rss)
        pss, rss = pss + own, rss + info.rss
        role = _role(process, tree.root.pid)
        by_role[role] = by_role.get(role, 0) + own
    return _Sample(time.monotonic() - started, pss, rss, len(members), by_role)


def _exited(pid: int) -> bool:
    """Whether our child ``pid`` has exited, without reaping it: while it is a zombie its
    PID (and so its process group and session ID) cannot be reused by another process."""
    try:
        return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:
        return True


def _stop(tree: _Tree, popen: subprocess.Popen[bytes]) -> list[str]:
    """SIGTERM the process group, wait up to ``_GRACE`` seconds, then SIGKILL the group and
    every tracked process still alive; reap the root last. Returns the names of the
    processes of the tree still running after the root had exited on its own."""
    others = [p for p in tree.members() if p.pid != popen.pid]
    left = [_name(p) for p in others] if _exited(popen.pid) else []
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(popen.pid, signal.SIGTERM)  # the root is unreaped: the group ID is ours
    deadline = time.monotonic() + _GRACE
    while time.monotonic() < deadline:
        if _exited(popen.pid) and not [p for p in tree.members() if p.pid != popen.pid]:
            break
        time.sleep(0.2)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(popen.pid, signal.SIGKILL)
    stragglers = [p for p in tree.members() if p.pid != popen.pid]
    for process in stragglers:
        with contextlib.suppress(psutil.Error):
            process.kill()
    psutil.wait_procs(stragglers, timeout=5)
    popen.wait()
    return left


# --- one point ------------------------------------------------------------------------


@dataclasses.dataclass
class _Settings:
    cases_per_site: int
    rounds: int
    image_size: int
    timeout: float
    max_memory: int
    interval: float
    seed: int


def _radfed() -> list[str]:
    script = Path(sys.executable).parent / "radfed"
    return [str(script)] if script.exists() else [sys.executable, "-m", "radfed"]


def _environment(work: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        FLWR_HOME=str(work / "flwr"),
        RAY_TMPDIR=str(work / "ray"),  # Ray's session folder (sockets, logs) goes away too
        RADFED_STORE="none",
        PYTHONUNBUFFERED="1",
    )
    (work / "flwr").mkdir()
    (work / "ray").mkdir()
    return env


def _watch(
    command: list[str], *, env: dict[str, str], log: Path, settings: _Settings, deadline: float
) -> dict[str, Any]:
    """Run ``command`` in its own process group until it exits, passes the deadline or the
    memory cap; sample its tree's memory all along; stop everything it started."""
    started, wall_start = time.monotonic(), time.time()
    samples: list[_Sample] = []
    reason = None
    with log.open("wb") as sink:
        popen = subprocess.Popen(
            command,
            cwd=_ROOT,
            env=env,
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        tree = _Tree(psutil.Process(popen.pid))
        left: list[str] = []
        try:
            last_note = started
            while not _exited(popen.pid):
                sample = _sample(tree, started)
                samples.append(sample)
                if sample.pss > settings.max_memory:
                    reason = f"memory {sample.pss / 1e9:.2f} GB over --max-memory-gb"
                elif psutil.virtual_memory().available < _MIN_AVAILABLE:
                    reason = "the machine had less than 1 GiB of memory left"
                elif time.monotonic() > deadline:
                    reason = f"over --timeout ({settings.timeout:.0f} s)"
                if reason:
                    break
                if time.monotonic() - last_note > 30:
                    last_note = time.monotonic()
                    _log(
                        f"  {sample.at:.0f} s, {sample.processes} processes, "
                        f"{sample.pss / 1e9:.2f} GB"
                    )
                time.sleep(settings.interval)
        finally:
            left = _stop(tree, popen)
    peak = max(samples, key=lambda s: s.pss) if samples else None
    return {
        "command": command[1:],
        "returncode": popen.returncode,
        "seconds": time.monotonic() - started,
        "stopped_because": reason,
        "left_running_after_exit": left,
        "started_at": wall_start,
        "samples": len(samples),
        "peak_pss_bytes": peak.pss if peak else 0,
        "peak_rss_bytes": max((s.rss for s in samples), default=0),
        "peak_processes": max((s.processes for s in samples), default=0),
        "peak_by_role_bytes": peak.by_role if peak else {},
        "log_tail": log.read_text(errors="replace")[-2000:],
    }


def _round_times(events: Path, process_started: float) -> dict[str, Any]:
    """Seconds per phase and round from ``events.jsonl`` (what exists, also of a cut run),
    and the seconds from the process start (``time.time()``) to ``run-started``."""
    if not events.is_file():
        return {"rounds": {}, "startup_seconds": None}
    lines = [json.loads(line) for line in events.read_text().splitlines() if line.strip()]
    starts: dict[tuple[int, str], datetime] = {}
    rounds: dict[int, dict[str, float]] = {}
    run_started = None
    for line in lines:
        at, kind, number = datetime.fromisoformat(line["at"]), line["kind"], line.get("round")
        if kind == RunEvent.RUN_STARTED:
            run_started = at
        elif kind == RunEvent.PHASE_STARTED:
            starts[number, line["phase"]] = at
        elif kind == RunEvent.PHASE_ENDED and (number, line["phase"]) in starts:
            took = (at - starts[number, line["phase"]]).total_seconds()
            rounds.setdefault(number, {})[line["phase"]] = took
        elif kind == RunEvent.ROUND_ENDED:
            rounds.setdefault(number, {})["round"] = float(line["seconds"])
    return {
        "rounds": {str(k): v for k, v in sorted(rounds.items())},
        "startup_seconds": run_started.timestamp() - process_started if run_started else None,
    }


def _point(sites: int, settings: _Settings, work: Path) -> dict[str, Any]:
    env = _environment(work)
    deadline = time.monotonic() + settings.timeout
    _log(f"{sites} sites: radfed synth")
    synth = _watch(
        [
            *_radfed(),
            "synth",
            "--out",
            str(work / "data"),
            "--sites",
            str(sites),
            "--cases-per-site",
            str(settings.cases_per_site),
            "--image-size",
            str(settings.image_size),
            "--seed",
            str(settings.seed),
        ],
        env=env,
        log=work / "synth.log",
        settings=settings,
        deadline=deadline,
    )
    result: dict[str, Any] = {"sites": sites, "synth": synth}
    if synth["stopped_because"] or synth["returncode"] != 0:
        result["failed"] = "synth: " + (synth["stopped_because"] or _last_line(synth["log_tail"]))
        return result
    _log(f"{sites} sites: radfed simulate ({synth['seconds']:.0f} s of synth)")
    simulate = _watch(
        [
            *_radfed(),
            "simulate",
            "--data",
            str(work / "data"),
            "--out",
            str(work / "run"),
            "--rounds",
            str(settings.rounds),
            "--seed",
            str(settings.seed),
            "--store",
            "none",
            "--run-config",
            f"local-epochs=1 image-size={settings.image_size}",
        ],
        env=env,
        log=work / "simulate.log",
        settings=settings,
        deadline=deadline,
    )
    result["simulate"] = simulate
    result.update(_round_times(work / "run" / "events.jsonl", simulate["started_at"]))
    trained = [r["round"] for n, r in result["rounds"].items() if int(n) >= 1 and "round" in r]
    result["round_seconds"] = sum(trained) / len(trained) if trained else None
    result["peak_memory_bytes"] = simulate["peak_pss_bytes"]
    if simulate["stopped_because"]:
        result["failed"] = "simulate: " + simulate["stopped_because"]
    elif simulate["returncode"] != 0:
        result["failed"] = f"simulate exited {simulate['returncode']}: " + _last_line(
            simulate["log_tail"]
        )
    elif len(trained) < settings.rounds:
        result["failed"] = f"simulate ended after {len(trained)} of {settings.rounds} rounds"
    return result


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1][:300] if lines else "(no output)"


@contextlib.contextmanager
def _workspace(keep: Path | None, sites: int) -> Iterator[Path]:
    if keep is not None:
        folder = keep / f"sites-{sites}"
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        yield folder
        return
    folder = Path(tempfile.mkdtemp(prefix="scale-"))  # short: Ray's socket paths live here
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


# --- report ---------------------------------------------------------------------------


def _summary(points: list[dict[str, Any]], asked: list[int]) -> str:
    ran = [p for p in points if "failed" not in p]
    failed = next((p for p in points if "failed" in p), None)
    if failed is None:
        return f"Largest number of sites this machine ran: {ran[-1]['sites']} (every size asked)."
    best = f"{ran[-1]['sites']}" if ran else "none"
    return (
        f"Largest number of sites this machine ran: {best}; {failed['sites']} sites failed: "
        f"{failed['failed']}."
        + (
            f" Not tried: {', '.join(map(str, asked[len(points) :]))}."
            if len(points) < len(asked)
            else ""
        )
    )


def _table(result: dict[str, Any]) -> str:
    s = result["settings"]
    lines = [
        "# radfed simulate: memory and round time as sites grow",
        "",
        f"{result['cpus']} CPUs, {result['memory_gb']:.0f} GB RAM, {result['platform']}. "
        f"Classification, {s['cases_per_site']} cases per site (on average), "
        f"{s['image_size']}x{s['image_size']} images, 1 local epoch, {s['rounds']} rounds, "
        "seed "
        f"{s['seed']}. Peak memory: the summed PSS of the simulate process and all its "
        f"children (Ray included), sampled every {s['interval']} s. Round time: the mean of "
        "the rounds' `round-ended` seconds (train + evaluate, bias report included).",
        "",
        f"**{result['summary']}**",
        "",
        "| sites | peak memory GB | memory per site MB | marginal MB per site | round time s "
        "| time per site s | train s | evaluate s | survey s | start-up s | processes | note |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    previous = None
    for p in result["points"]:
        if "simulate" not in p:
            lines.append(f"| {p['sites']} |" + " |" * 10 + f" {p['failed']} |")
            continue
        memory = p["peak_memory_bytes"]
        marginal = (
            f"{(memory - previous[1]) / (p['sites'] - previous[0]) / 1e6:.1f}" if previous else ""
        )
        rounds = p["round_seconds"]
        phases = [
            _mean([r[phase] for n, r in p["rounds"].items() if int(n) >= 1 and phase in r])
            for phase in ("train", "evaluate")
        ]
        cells = [
            f"{memory / 1e9:.2f}",
            f"{memory / p['sites'] / 1e6:.1f}",
            marginal,
            _number(rounds),
            _number(rounds / p["sites"] if rounds else None, 2),
            *(_number(v) for v in phases),
            _number(p["rounds"].get("0", {}).get("survey")),
            _number(p.get("startup_seconds")),
            str(p["simulate"]["peak_processes"]),
            p.get("failed", ""),
        ]
        lines.append(f"| {p['sites']} | " + " | ".join(cells) + " |")
        if "failed" not in p:
            previous = (p["sites"], memory)
    lines += [
        "",
        "Memory per site: peak / sites; marginal: the peak's growth per added site since the "
        "previous size. Round time: train + evaluate (+ the server's bias report), mean over "
        "rounds; time per site: round time / sites. Survey: round 0, where each site loads "
        "its data for the first time and reports its composition. Start-up: from the "
        "simulate process's start to the run's `run-started` event (imports, Ray, app).",
    ]
    lines += ["", "Memory at the peak, by process:", ""]
    for p in result["points"]:
        roles = p.get("simulate", {}).get("peak_by_role_bytes", {})
        if roles:
            parts = ", ".join(f"{k} {v / 1e9:.2f} GB" for k, v in sorted(roles.items()))
            lines.append(f"- {p['sites']} sites: {parts}")
    return "\n".join(lines) + "\n"


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _number(value: float | None, digits: int = 1) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def _plot(result: dict[str, Any], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        _log("matplotlib is not installed: no plot")
        return False
    points = [p for p in result["points"] if p.get("round_seconds")]
    if not points:
        return False
    sites = [p["sites"] for p in points]
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.plot(sites, [p["peak_memory_bytes"] / 1e9 for p in points], marker="o")
    left.set(xscale="log", xlabel="sites", ylabel="peak memory (GB, PSS)")
    right.plot(sites, [p["round_seconds"] for p in points], marker="o")
    right.set(xscale="log", yscale="log", xlabel="sites", ylabel="round time (s)")
    figure.suptitle(result["summary"], fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return True


# --- main -----------------------------------------------------------------------------


def _parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sites", type=int, nargs="+", default=[10, 30, 100, 300, 1000])
    parser.add_argument("--cases-per-site", type=int, default=24)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument(
        "--timeout", type=float, default=1800, help="seconds per size, synth + simulate"
    )
    parser.add_argument(
        "--max-memory-gb",
        type=float,
        default=None,
        help="stop a size whose tree passes this (default: 80%% of this machine's RAM)",
    )
    parser.add_argument("--interval", type=float, default=0.5, help="seconds between samples")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--work-dir", type=Path, default=None, help="keep each size's files here")
    args = parser.parse_args()
    if any(n < 1 for n in args.sites):
        parser.error(f"--sites must all be at least 1, got {args.sites}")
    if args.sites != sorted(set(args.sites)):
        parser.error(f"--sites must grow, got {args.sites}")
    for key in ("rounds", "timeout", "interval"):
        if getattr(args, key) <= 0:
            parser.error(f"--{key.replace('_', '-')} must be positive, got {getattr(args, key)}")
    if args.max_memory_gb is not None and args.max_memory_gb <= 0:
        parser.error(f"--max-memory-gb must be positive, got {args.max_memory_gb}")
    return args


def main() -> None:
    args = _parse()
    total = psutil.virtual_memory().total
    settings = _Settings(
        cases_per_site=args.cases_per_site,
        rounds=args.rounds,
        image_size=args.image_size,
        timeout=args.timeout,
        max_memory=int(args.max_memory_gb * 1e9) if args.max_memory_gb else int(0.8 * total),
        interval=args.interval,
        seed=args.seed,
    )
    # SIGTERM to this script unwinds like Ctrl-C, so every point's finally stops its tree.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    started = time.monotonic()
    points: list[dict[str, Any]] = []
    for sites in args.sites:
        with _workspace(args.work_dir, sites) as work:
            point = _point(sites, settings, work)
        points.append(point)
        if "failed" in point:
            _log(f"{sites} sites failed: {point['failed']}")
            break
        _log(
            f"{sites} sites: peak {point['peak_memory_bytes'] / 1e9:.2f} GB, "
            f"round {point['round_seconds']:.1f} s"
        )
    result: dict[str, Any] = {
        "settings": {**dataclasses.asdict(settings), "sites": args.sites},
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "memory_gb": total / 1e9,
        "python": platform.python_version(),
        "points": points,
        "wall_seconds": time.monotonic() - started,
    }
    result["summary"] = _summary(points, args.sites)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "scale_bench.json").write_text(json.dumps(result, indent=2) + "\n")
    table = _table(result)
    (args.out / "scale_bench.md").write_text(table)
    _plot(result, args.out / "scale_bench.png")
    print(table)


if __name__ == "__main__":
    main()
