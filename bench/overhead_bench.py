"""Platform overhead: ``radfed simulate`` versus a plain Flower app doing the same training.

Both train radfed's default classification network (``cnn``) with FedAvg over the same
generated sites (``radfed synth --task classification``), on the same 60% train split of
each site, with the same batch size, Adam learning rate, local epochs and rounds, no
augmentation, under Flower's simulation engine (Ray) with the same resources (one CPU per
virtual node, ``num_cpus`` = the machine's). The plain app (``bench/plain_flower/``, written
like Flower's PyTorch quickstart) reads its site's DICOM files with pydicom in every
message and evaluates on the 20% validation split; radfed does everything it always does
(checks, decoded-case cache, round-0 survey, statistics of train and val, subgroup cells,
audit log, checkpoints, bias report, run store, curves and HTML report).

Part 1, interleaved pairs: each run is a fresh subprocess with ``FLWR_HOME`` in the work
folder; the order alternates (radfed first, then plain first, ...) so both see the same
machine load. Each radfed run starts from site folders without ``.radfed/`` state (no
decoded-case cache: like the plain app it decodes every image; ``--warm-cache`` keeps it).
Whole-run wall time is taken around the subprocess; per-round times come from radfed's
``events.jsonl`` (round r: from the end of round r-1, or of the survey, to ROUND_ENDED r)
and from the plain app's ``rounds.json`` (the times Flower's ``evaluate_fn`` hook is called:
before round 1 and after each round). Round 1 of the plain app also starts Ray's workers,
which radfed's survey has already started: the per-round ratio is given for rounds >= 2.

Part 2, where a radfed round's time goes: the survey and the rounds are replayed in this
process without Ray (every site's ClientApp handler called in turn with a message built
as Flower builds it, then the strategy's aggregation, events, state, curves and HTML
report), under cProfile, with one torch thread (as a Ray worker with one CPU has). The
cumulative times of radfed's functions split a round into local training and the rest.

Run: ``python bench/overhead_bench.py [--pairs 3 --rounds 3 --cases-per-site 300]``
(about 15 minutes with the defaults on 2 CPU cores). Results: ``overhead_bench.json`` and
``overhead_bench.md`` in ``--out``.
"""

from __future__ import annotations

import argparse
import cProfile
import itertools
import json
import os
import platform
import pstats
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

_ROOT = Path(__file__).resolve().parents[1]
_BIN = Path(sys.executable).parent
_PLAIN = _ROOT / "bench" / "plain_flower" / "run.py"


def _say(text: str) -> None:
    print(f"overhead_bench: {text}", file=sys.stderr, flush=True)


def _env(flwr_home: Path, store: str) -> dict[str, str]:
    flwr_home.mkdir(parents=True, exist_ok=True)
    return {
        **os.environ,
        "FLWR_HOME": str(flwr_home),
        "RADFED_STORE": store,
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "RADFED_APP": str(_ROOT),
    }


def _run(command: list[str], env: dict[str, str], log: Path) -> tuple[float, float]:
    """Run a subprocess to its end; (its start as epoch seconds, its wall seconds)."""
    started, clock = time.time(), time.perf_counter()
    with log.open("w") as handle:
        done = subprocess.run(
            command, cwd=_ROOT, env=env, stdout=handle, stderr=subprocess.STDOUT, check=False
        )
    wall = time.perf_counter() - clock
    if done.returncode != 0:
        sys.exit(f"overhead_bench: {command[0]} failed ({done.returncode}); see {log}")
    return started, wall


def _at(line: dict[str, Any]) -> float:
    return datetime.fromisoformat(line["at"]).timestamp()


def _radfed_times(run_dir: Path, started: float, wall: float, rounds: int) -> dict[str, Any]:
    """Per-round and per-phase seconds of a radfed run from its events.jsonl."""
    events = [json.loads(x) for x in (run_dir / "events.jsonl").read_text().splitlines() if x]

    def at(kind: str, round_: int | None, phase: str | None = None) -> float:
        return next(
            _at(e)
            for e in events
            if e["kind"] == kind and e["round"] == round_ and (phase is None or e["phase"] == phase)
        )

    survey = at("phase-ended", 0, "survey") - at("phase-started", 0, "survey")
    ends = [at("phase-ended", 0, "survey")] + [at("round-ended", r) for r in range(1, rounds + 1)]
    per_round, train, evaluate = [], [], []
    for r in range(1, rounds + 1):
        per_round.append(ends[r] - ends[r - 1])
        train.append(at("phase-ended", r, "train") - at("phase-started", r, "train"))
        evaluate.append(at("phase-ended", r, "evaluate") - at("phase-started", r, "evaluate"))
    return {
        "wall": wall,
        "startup": at("phase-started", 0, "survey") - started,  # CLI, checks, Ray, server set-up
        "survey": survey,
        "rounds": per_round,
        "train_phase": train,
        "evaluate_phase": evaluate,
        "tail": started + wall - ends[-1],  # curves, HTML report, store, Ray shut-down, exit
    }


def _plain_times(out: Path, started: float, wall: float) -> dict[str, Any]:
    ended = json.loads((out / "rounds.json").read_text())["round_ended_at"]
    return {
        "wall": wall,
        "startup": ended[0] - started,
        "rounds": [b - a for a, b in itertools.pairwise(ended)],
        "tail": started + wall - ended[-1],
    }


def _pairs(args: argparse.Namespace, work: Path, data: Path) -> list[dict[str, Any]]:
    store = f"sqlite:///{work / 'runs.sqlite'}"
    out: list[dict[str, Any]] = []
    for pair in range(args.pairs):
        result: dict[str, Any] = {}
        order = ("radfed", "plain") if pair % 2 == 0 else ("plain", "radfed")
        for app in order:
            name = f"{app}-{pair + 1}"
            env = _env(work / f"flwr-{name}", store)
            if app == "radfed":
                if not args.warm_cache:
                    for state in data.glob("*/.radfed"):
                        shutil.rmtree(state)
                command = [
                    str(_BIN / "radfed"),
                    "simulate",
                    *("--data", str(data), "--out", str(work / name)),
                    *("--rounds", str(args.rounds), "--seed", str(args.seed)),
                    *("--run-config", f"augment=false local-epochs={args.epochs}"),
                    *("--store", store),
                ]
            else:
                command = [
                    sys.executable,
                    str(_PLAIN),
                    *("--data", str(data), "--out", str(work / name)),
                    *("--rounds", str(args.rounds), "--local-epochs", str(args.epochs)),
                    *("--seed", str(args.seed)),
                ]
            _say(f"pair {pair + 1}/{args.pairs}: {app} ...")
            started, wall = _run(command, env, work / f"{name}.log")
            if app == "radfed":
                result[app] = _radfed_times(work / name, started, wall, args.rounds)
            else:
                result[app] = _plain_times(work / name, started, wall)
            _say(f"pair {pair + 1}/{args.pairs}: {app} {wall:.1f} s")
        out.append(result)
    return out


# --- part 2: the breakdown of a radfed round, replayed in one process -------------------------

#: (label, module file suffix, function name): radfed functions whose cumulative time is
#: reported. Nested ones are listed under their parent in the table.
_FUNCTIONS = (
    ("client: handler, total (train or evaluate, with egress)", "site/egress.py", "run"),
    ("client: local training (Task.train)", "tasks/classification.py", "train"),
    (
        "client: prepare (settings, policy, weight checks, data, model)",
        "site/handlers.py",
        "_prepare",
    ),
    (
        "client:   load site (decoded-case cache; decode when cold)",
        "site/node.py",
        "load_site_once",
    ),
    ("client:   model size check (model on the meta device)", "tasks/training.py", "model_size"),
    ("client:   build model + load global weights", "site/handlers.py", "build_model"),
    ("client: evaluation (predict + subgroup cells)", "site/evaluate.py", "evaluate_cells"),
    ("client:   inference (predict)", "tasks/classification.py", "predict"),
    ("client: reply + audit log (serialise, size check, hash chain)", "site/egress.py", "_leave"),
    ("client:   serialise reply (protobuf)", "radfed/flower_private.py", "serialize_content"),
    ("client:   audit log record", "privacy/audit.py", "record"),
    (
        "server: aggregate_train (checks, clipping, FedAvg, checkpoint)",
        "central/strategy.py",
        "aggregate_train",
    ),
    (
        "server:   update checks and distance (validate_arrays)",
        "federation/updates.py",
        "validate_arrays",
    ),
    ("server:   checkpoint (torch.save)", "central/run_folder.py", "save_checkpoint"),
    (
        "server: aggregate_evaluate (statistics, metrics, bias report)",
        "central/strategy.py",
        "aggregate_evaluate",
    ),
    (
        "server:   statistics checks (unpack, metric trial)",
        "central/strategy.py",
        "_check_statistics",
    ),
    ("server:   leave-one-site-out influence", "central/strategy.py", "_influence"),
    ("server:   bias report (build + write)", "central/strategy.py", "_write_bias_report"),
    ("server: survey (composition report)", "central/strategy.py", "survey"),
    ("server: events.jsonl + run store sync", "central/run_folder.py", "event"),
    ("server: save_state (torch.save)", "central/run_folder.py", "save_state"),
    ("end: curves (matplotlib)", "bias/figures.py", "plot_curves"),
    ("end: HTML report", "central/server.py", "render_report"),
)


def _cumulative(profile: cProfile.Profile) -> dict[str, float]:
    """Cumulative seconds of each function of ``_FUNCTIONS`` in a profile."""
    stats: dict[tuple[str, int, str], tuple[Any, ...]] = pstats.Stats(profile).stats  # type: ignore[attr-defined]
    out: dict[str, float] = {}
    for label, suffix, name in _FUNCTIONS:
        if name == "build_model":  # the model built for the message (not the meta-device one)
            out[label] = _cumulative_of(stats, "site/handlers.py", "_prepare", ("build_model",))
            continue
        matches = [v[3] for (f, _, func), v in stats.items() if f.endswith(suffix) and func == name]
        out[label] = max(matches, default=0.0)  # a method and the function it wraps: the outer
    return out


def _cumulative_of(
    stats: dict[tuple[str, int, str], tuple[Any, ...]],
    caller_suffix: str,
    caller: str,
    names: tuple[str, ...],
) -> float:
    """Cumulative seconds of functions ``names`` (any module) when called from ``caller``
    (and ``load_global``)."""
    total = 0.0
    for (_, _, func), v in stats.items():
        if func not in (*names, "load_global"):
            continue
        for (file, _, calling), edge in v[4].items():
            if file.endswith(caller_suffix) and calling == caller:
                total += edge[3]
    return total


def _replay(args: argparse.Namespace, work: Path, data: Path) -> dict[str, Any]:
    """The survey and the rounds of a radfed run replayed in this process, under cProfile."""
    import torch
    from flwr.app import ArrayRecord, ConfigRecord, Context, Message, Metadata, RecordDict

    from radfed.bias.figures import plot_curves
    from radfed.central.rounds import strategy_state
    from radfed.central.run_folder import RunFolder
    from radfed.central.server import render_report
    from radfed.central.strategy import make_strategy
    from radfed.config import RunConfig
    from radfed.federation.packing import pack
    from radfed.federation.weights import shared_state
    from radfed.flower_private import fused_run_config
    from radfed.folders import RunEvent, list_sites
    from radfed.site.handlers import handle_evaluate, handle_train
    from radfed.store import StoreFeed
    from radfed.tasks import get_task

    torch.set_num_threads(1)  # as in a Ray worker given one CPU
    for state in data.glob("*/.radfed"):  # cold, as the pairs' radfed runs
        shutil.rmtree(state)
    os.environ["RADFED_STORE"] = f"sqlite:///{work / 'replay.sqlite'}"
    sites = list_sites(data)
    run_config = fused_run_config(
        _ROOT,
        {
            "task": "classification",
            "num-server-rounds": args.rounds,
            "seed": args.seed,
            "strategy": "fedavg",
            "augment": False,
            "local-epochs": args.epochs,
            "data-root": str(data),
            "out-dir": str(work / "replay"),
            "min-sites": len(sites),
        },
    )
    config = RunConfig.from_run_config(run_config)
    task = get_task(config.task)
    contexts = [
        Context(
            run_id=1,
            node_id=i + 1,
            node_config={"partition-id": i, "num-partitions": len(sites)},
            state=RecordDict(),
            run_config=dict(run_config),
        )
        for i in range(len(sites))
    ]

    def message(node: int, kind: str, arrays: ArrayRecord, server_round: int) -> Message:
        content = RecordDict(
            {"arrays": arrays, "config": ConfigRecord({"server-round": server_round})}
        )
        metadata = Metadata(
            run_id=1,
            message_id=f"{kind}-{server_round}-{node}",
            src_node_id=0,
            dst_node_id=node,
            reply_to_message_id="",
            group_id=str(server_round),
            created_at=time.time(),
            ttl=3600.0,
            message_type=kind,
        )
        return Message(content=content, metadata=metadata)

    def ask(kind: str, arrays: ArrayRecord, server_round: int) -> list[Message]:
        handler = handle_train if kind == "train" else handle_evaluate
        packed = pack(arrays)  # once a phase, as the strategy's configure_* does
        replies = []
        for i, context in enumerate(contexts):
            replies.append(handler(message(i + 1, kind, packed, server_round), context))
        return replies

    clocks: dict[str, list[float]] = {}

    def timed(name: str, fn: Any, *a: Any) -> Any:
        start = time.perf_counter()
        out = fn(*a)
        clocks.setdefault(name, []).append(time.perf_counter() - start)
        return out

    # the server's set-up (radfed.central.server.run_server), not timed
    model = task.build_model(config)
    run = RunFolder.start(Path(config.out_dir), config)
    reference = {k: v.detach().clone() for k, v in shared_state(model, config.fedbn).items()}
    run.save_checkpoint(0, reference, config)
    feed = StoreFeed.from_environment(run.path)
    run = run.feeding(feed)
    strategy = make_strategy(config, reference, run, max_update_norm=None)
    arrays = ArrayRecord(reference)

    survey_profile, rounds_profile, end_profile = (cProfile.Profile() for _ in range(3))
    _say("replay: survey ...")
    survey_profile.enable()
    run.event(RunEvent.PHASE_STARTED, "survey", round_=0, phase="survey")
    replies = timed("survey: sites", ask, "evaluate", arrays, 0)
    timed("survey: server", strategy.survey, replies)  # type: ignore[attr-defined]
    run.event(RunEvent.PHASE_ENDED, "survey", round_=0, phase="survey")
    survey_profile.disable()
    for server_round in range(1, args.rounds + 1):
        _say(f"replay: round {server_round}/{args.rounds} ...")
        rounds_profile.enable()
        run.event(RunEvent.PHASE_STARTED, "train", round_=server_round, phase="train")
        replies = timed("round: train, sites", ask, "train", arrays, server_round)
        aggregated, _ = timed(
            "round: train, server", strategy.aggregate_train, server_round, replies
        )
        arrays = aggregated if aggregated is not None else arrays
        run.event(RunEvent.PHASE_ENDED, "train", round_=server_round, phase="train")
        run.event(RunEvent.PHASE_STARTED, "evaluate", round_=server_round, phase="evaluate")
        replies = timed("round: evaluate, sites", ask, "evaluate", arrays, server_round)
        timed("round: evaluate, server", strategy.aggregate_evaluate, server_round, replies)
        run.event(RunEvent.PHASE_ENDED, "evaluate", round_=server_round, phase="evaluate")
        timed("round: state", run.save_state, server_round, strategy_state(strategy))
        run.event(RunEvent.ROUND_ENDED, "round", round_=server_round)
        rounds_profile.disable()
    _say("replay: curves and report ...")
    end_profile.enable()
    timed("end: curves", plot_curves, run.read_metrics(), run.files.curves, task.summary[:3])
    timed("end: HTML report", render_report, run)
    if feed is not None:
        feed.sync(force=True)
    end_profile.disable()
    rounds_profile.dump_stats(str(work / "replay-rounds.prof"))
    return {
        "clocks": clocks,
        "survey": _cumulative(survey_profile),
        "rounds": _cumulative(rounds_profile),
        "end": _cumulative(end_profile),
        "rounds_total": sum(sum(v) for k, v in clocks.items() if k.startswith("round:")),
        "survey_total": sum(sum(v) for k, v in clocks.items() if k.startswith("survey:")),
        "end_total": sum(sum(v) for k, v in clocks.items() if k.startswith("end:")),
    }


# --- report -----------------------------------------------------------------------------------


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def _summary(pairs: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for app in ("radfed", "plain"):
        runs = [p[app] for p in pairs]
        out[app] = {
            "wall": _median([r["wall"] for r in runs]),
            "startup": _median([r["startup"] for r in runs]),
            "round_1": _median([r["rounds"][0] for r in runs]),
            "round_2_on": _median([x for r in runs for x in r["rounds"][1:]]),
            "all_rounds": _median([x for r in runs for x in r["rounds"]]),
            "tail": _median([r["tail"] for r in runs]),
        }
        if app == "radfed":
            out[app]["survey"] = _median([r["survey"] for r in runs])
            out[app]["train_phase"] = _median([x for r in runs for x in r["train_phase"]])
            out[app]["evaluate_phase"] = _median([x for r in runs for x in r["evaluate_phase"]])
    out["ratio"] = {k: out["radfed"][k] / out["plain"][k] for k in out["plain"] if out["plain"][k]}
    return out


def _table(result: dict[str, Any]) -> str:
    s, a = result["summary"], result["args"]
    lines = [
        "# radfed platform overhead: `radfed simulate` vs a plain Flower app",
        "",
        f"{a['sites']} sites x {a['cases_per_site']} cases (radfed synth, seed {a['seed']}), "
        f"default `cnn`, {a['epochs']} local epochs, {a['rounds']} rounds, batch 16, Adam 1e-3, "
        f"FedAvg, no augmentation; Ray simulation, 1 CPU per node, {result['cpus']} CPUs. "
        f"Medians of {a['pairs']} interleaved pairs "
        f"({'warm' if a['warm_cache'] else 'cold'} decoded-case cache for radfed). "
        "Measured on a shared machine: other jobs ran at the same time.",
        "",
        "| seconds (median) | radfed | plain | radfed / plain |",
        "|---|---:|---:|---:|",
    ]
    names = {
        "wall": "whole run (process start to exit)",
        "startup": "start-up (to the first message sent)",
        "survey": "round-0 survey (radfed only)",
        "round_1": "round 1",
        "round_2_on": "rounds 2.. (per round)",
        "all_rounds": "all rounds (per round)",
        "train_phase": "train phase of a round (radfed)",
        "evaluate_phase": "evaluate phase of a round (radfed)",
        "tail": "after the last round to exit",
    }
    for key, label in names.items():
        r, p = s["radfed"].get(key), s["plain"].get(key)
        ratio = s["ratio"].get(key)
        lines.append(
            f"| {label} | {r:.1f} | {'' if p is None else f'{p:.1f}'} "
            f"| {'' if ratio is None else f'{ratio:.2f}'} |"
        )
    lines += [
        "",
        "Per pair (whole run, s): "
        + ", ".join(
            f"radfed {p['radfed']['wall']:.1f} / plain {p['plain']['wall']:.1f}"
            for p in result["pairs"]
        ),
    ]
    replay = result.get("replay")
    if replay:
        rounds = replay["rounds"]
        total = replay["rounds_total"]
        training = rounds["client: local training (Task.train)"]
        lines += [
            "",
            f"## Where a radfed round's time goes (replay in one process, cProfile, "
            f"{a['rounds']} rounds, all sites in turn, 1 torch thread)",
            "",
            f"Rounds: {total:.1f} s of which local training {training:.1f} s "
            f"({100 * training / total:.0f}%), outside training {total - training:.1f} s "
            f"({100 * (total - training) / total:.0f}%). Survey {replay['survey_total']:.1f} s, "
            f"curves + HTML report {replay['end_total']:.1f} s (once per run).",
            "",
            "| function (cumulative s) | rounds | % of rounds | survey | end |",
            "|---|---:|---:|---:|---:|",
        ]
        for label, _, _ in _FUNCTIONS:
            r = rounds[label]
            lines.append(
                f"| {label} | {r:.2f} | {100 * r / total:.1f} | {replay['survey'][label]:.2f} "
                f"| {replay['end'][label]:.2f} |"
            )
        lines += ["", "| step (wall s, summed over rounds) | seconds |", "|---|---:|"]
        for name, values in replay["clocks"].items():
            lines.append(f"| {name} | {sum(values):.2f} |")
    return "\n".join(lines) + "\n"


def _parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--cases-per-site", type=int, default=300)
    parser.add_argument("--sites", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=3, help="local epochs per round")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    parser.add_argument(
        "--warm-cache", action="store_true", help="keep radfed's decoded-case cache between runs"
    )
    parser.add_argument("--no-replay", action="store_true", help="skip part 2 (the breakdown)")
    args = parser.parse_args()
    for key in ("pairs", "rounds", "sites", "epochs"):
        if getattr(args, key) < 1:
            parser.error(f"--{key} must be at least 1, got {getattr(args, key)}")
    if args.cases_per_site < 20:
        parser.error(f"--cases-per-site must be at least 20, got {args.cases_per_site}")
    return args


def main() -> None:
    args = _parse()
    work = Path(tempfile.mkdtemp(prefix="overhead_bench-"))
    _say(f"work folder {work}")
    try:
        data = work / "data"
        _run(
            [
                str(_BIN / "radfed"),
                "synth",
                *("--task", "classification", "--sites", str(args.sites)),
                *("--cases-per-site", str(args.cases_per_site), "--seed", str(args.seed)),
                *("--out", str(data)),
            ],
            _env(work / "flwr-synth", "none"),
            work / "synth.log",
        )
        started = time.perf_counter()
        pairs = _pairs(args, work, data)
        result: dict[str, Any] = {
            "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "load_average": os.getloadavg(),
            "pairs": pairs,
            "summary": _summary(pairs),
        }
        if not args.no_replay:
            result["replay"] = _replay(args, work, data)
        result["wall_seconds"] = time.perf_counter() - started
        table = _table(result)
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "overhead_bench.json").write_text(json.dumps(result, indent=2) + "\n")
        (args.out / "overhead_bench.md").write_text(table)
        print(table)
    finally:
        if args.keep:
            _say(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
