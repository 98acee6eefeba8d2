"""Model quality on shifted multi-site data: pooled, local-only and federated strategies.

For each task (classification: AUC; segmentation: mean Dice) and seed, ``radfed.data.synth``
generates ``--sites`` hospital sites (they differ in intensity scale and gamma, bit depth,
MONOCHROME1 vs 2, rescale slope/intercept, label prevalence, case count and demographics;
the seed draws those profiles, the cases, the splits, the initial weights and the training).
Then, on the same train/val/test split of every site (radfed's own, stored in the site's
state folder and reused by the simulation):

- **pooled**: one model trained in this process with ``Task.train`` on the union of the
  sites' train splits (all cases on one node);
- **local**: one model per site trained the same way on its own train split only;
- **federated**: ``radfed simulate`` in a subprocess (Flower's simulation engine, one
  virtual node per site, ``FLWR_HOME`` in a temporary folder, ``--store none``) with each
  strategy of ``--strategies``; ``fedbn`` is FedAvg with ``fedbn=true``.

Matched compute: every method sees each train case ``rounds x local-epochs`` times. A
federated site trains ``local-epochs`` epochs in each of ``rounds`` rounds; local-only and
pooled train ``rounds x local-epochs`` epochs in one pass (pooled over all sites' cases,
so the total sample-epochs and optimiser steps match the federation's, up to the rounding
of the last batch). Same network, optimiser (Adam), learning rate, batch size, no
augmentation. A federated site restarts Adam every round; the baselines do not.

Every model is evaluated on each site's sealed ``test`` split with the site's own
evaluation code (``radfed.site.evaluate.evaluate_cells``); the ``ALL`` value is computed
from the merged statistics of the sites (``merge_stats``), as the server computes it. The
generated sites carry a ``site-policy.toml`` with ``min-cell-size = 1`` and
``exact-auc = true`` and an unlimited test budget: at these test sizes (about 20 cases a
site) the default disclosure control (k = 10) would merge the score histograms into a few
bins or suppress a site, and the benchmark measures models, not disclosure control.

Poisoning: the ``X+poison`` methods run strategy X while the last site (in name order)
sends a poisoned update, through the simulation-only run setting ``attack="SITE:KIND"``
(``--poison``: sign-flip or scale); see ``_POISONING``.

Run: ``python bench/quality_bench.py [--tasks classification] [--seeds 0 1 2] [--rounds 3]``.
Results: ``quality_bench.json``, ``quality_bench.md`` and ``quality_bench.png`` in ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from quality_report import markdown, plot, summarise

from radfed.config import RunConfig
from radfed.data.loading import SplitData, load_site_for
from radfed.data.synth import synth_sites
from radfed.federation.weights import local_keys
from radfed.folders import list_sites
from radfed.site.evaluate import evaluate_cells
from radfed.site.node import own_policy
from radfed.tasks import get_task, merge_stats

_REPO = Path(__file__).resolve().parents[1]
_TASKS = ("classification", "segmentation")
#: Federated methods: ``radfed simulate --strategy`` and extra run-config values.
_FEDERATED: dict[str, tuple[str, str]] = {
    "fedavg": ("fedavg", ""),
    "fedprox": ("fedprox", ""),  # proximal-mu added from --proximal-mu
    "fedbn": ("fedavg", "fedbn=true"),
    "fedadam": ("fedadam", ""),  # server-lr added from --server-lr
    "fedyogi": ("fedyogi", ""),
    "fedavgm": ("fedavgm", ""),
    "fedmedian": ("fedmedian", ""),
    "fedtrimmedavg": ("fedtrimmedavg", ""),
    "krum": ("krum", ""),
    "multikrum": ("multikrum", ""),
    "bulyan": ("bulyan", ""),
}
_ROBUST = ("fedmedian", "fedtrimmedavg", "krum", "multikrum", "bulyan")
#: ``X+poison``: strategy X with the last site sending a poisoned update (``attack``).
_POISONED = {f"{name}+poison": (name, "") for name in ("fedavg", *_ROBUST)}
_FEDERATED.update(_POISONED)
_BASELINES = ("pooled", "local")
_DEFAULT_METHODS = (
    *("pooled", "local", "fedavg", "fedprox", "fedbn", "fedadam", "fedmedian"),
    *("fedavg+poison", "fedmedian+poison"),
)
_POLICY = """\
# written by bench/quality_bench.py: exact statistics of small test splits
[policy]
min-cell-size = 1
exact-auc = true
subgroups = []

[policy.queries]
test-evaluations = 1000
test-last-round-only = false
test-evaluations-total = 1000000
"""
_POISONING = {
    "how": (
        "methods X+poison: strategy X while the last site (in name order) sends a poisoned "
        'update through radfed\'s simulation-only run setting attack="SITE:KIND" '
        "(sign-flip: the global model minus 4 times its honest change; scale: plus 10 "
        "times); its own test cases still count in its column and in ALL"
    ),
}


def _log(text: str) -> None:
    print(f"[quality_bench {time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


# --- data ------------------------------------------------------------------------------


def _make_sites(root: Path, task: str, args: argparse.Namespace, seed: int) -> list[Path]:
    """Generate the sites of one seed and give each the benchmark's site policy."""
    synth_sites(
        root,
        task=task,
        sites=args.sites,
        cases_per_site=args.cases_per_site,
        seed=seed,
        image_size=args.image_size,
    )
    sites = list_sites(root)
    for site in sites:
        (site / "site-policy.toml").write_text(_POLICY)
    return sites


def _config(task: str, args: argparse.Namespace, seed: int) -> RunConfig:
    """The baselines' run config: the federation's settings, all epochs in one pass."""
    return RunConfig(
        task=task,
        seed=seed,
        image_size=args.image_size,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        local_epochs=args.rounds * args.local_epochs,
        augment=False,
        eval_splits=("test",),
        subgroups=(),
        min_cell_size=1,
    )


def _concat(parts: list[SplitData]) -> SplitData:
    """The cases of several splits as one (images, labels, masks, patient keys)."""
    masks = [p.masks for p in parts]
    return SplitData(
        images=torch.cat([p.images for p in parts]),
        labels=torch.cat([p.labels for p in parts]),
        masks=torch.cat([m for m in masks if m is not None]) if masks[0] is not None else None,
        patients=tuple(k for p in parts for k in p.patients),
    )


# --- baselines (in this process) --------------------------------------------------------


def _evaluate(
    task_name: str, models: dict[str, Any], sites: dict[str, Any], config: RunConfig
) -> dict[str, dict[str, Any]]:
    """Per site (its own model from ``models``) and ``ALL`` (merged statistics): the
    headline metric and test cases, through the site's own evaluation code."""
    task = get_task(task_name)
    stats = {}
    for name, (folder, data) in sites.items():
        policy = own_policy(folder)
        k = policy.min_cell_size(config.min_cell_size)
        _, cells = evaluate_cells(task, models[name], data.splits["test"], config, k, policy)
        stats[name] = cells[0].stats
    stats["ALL"] = merge_stats(task, stats.values(), config)
    return {
        name: {"metric": task.metrics(s).get(task.headline), "n": s.n} for name, s in stats.items()
    }


def _baselines(
    task_name: str, sites: dict[str, Any], config: RunConfig, methods: list[str]
) -> dict[str, dict[str, Any]]:
    task = get_task(task_name)
    out: dict[str, dict[str, Any]] = {}
    if "pooled" in methods:
        started = time.perf_counter()
        model = task.build_model(config)
        pooled = _concat([data.splits["train"] for _, data in sites.values()])
        task.train(model, pooled, config, seed=config.seed)
        out["pooled"] = {
            "sites": _evaluate(task_name, dict.fromkeys(sites, model), sites, config),
            "seconds": time.perf_counter() - started,
            "train_cases": len(pooled),
        }
        _log(f"  pooled: {_brief(out['pooled']['sites'])} ({out['pooled']['seconds']:.0f} s)")
    if "local" in methods:
        started = time.perf_counter()
        models = {}
        for name, (_, data) in sites.items():
            models[name] = task.build_model(config)
            task.train(models[name], data.splits["train"], config, seed=config.seed)
        out["local"] = {
            "sites": _evaluate(task_name, models, sites, config),
            "seconds": time.perf_counter() - started,
        }
        _log(f"  local: {_brief(out['local']['sites'])} ({out['local']['seconds']:.0f} s)")
    return out


# --- federated (radfed simulate in a subprocess) ---------------------------------------


def _run_config(method: str, args: argparse.Namespace, data: Path) -> tuple[str, str]:
    strategy, extra = _FEDERATED[method]
    if method in _POISONED:  # the last site (in name order) sends a poisoned update
        last = sorted(p.name for p in data.iterdir() if (p / "manifest.csv").is_file())[-1]
        extra = f'attack="{last}:{args.poison}"'

    values = [
        f"local-epochs={args.local_epochs}",
        "augment=false",
        f"image-size={args.image_size}",
        f"batch-size={args.batch_size}",
        f"learning-rate={float(args.learning_rate)!r}",
        'eval-splits="test"',
        'subgroups=""',
        "min-cell-size=1",
        f"proximal-mu={float(args.proximal_mu)!r}",
        f"server-lr={float(args.server_lr)!r}",
    ]
    values.append(f"robust-f={args.robust_f}")
    if extra:
        values.append(extra)
    return strategy, " ".join(values)


def _federated(
    method: str, task: str, data: Path, work: Path, args: argparse.Namespace, seed: int
) -> dict[str, Any]:
    strategy, run_config = _run_config(method, args, data)
    run = work / f"run-{task}-{seed}-{method}"
    command = [
        *(sys.executable, "-m", "radfed", "simulate", "--data", str(data), "--out", str(run)),
        *("--task", task, "--rounds", str(args.rounds), "--seed", str(seed)),
        *("--strategy", strategy, "--store", "none", "--run-config", run_config),
    ]
    env = {**os.environ, "FLWR_HOME": str(work / "flwr-home"), "RADFED_APP": str(_REPO)}
    log = work / f"{run.name}.log"
    started = time.perf_counter()
    with log.open("w") as handle:
        done = subprocess.run(
            command, cwd=_REPO, env=env, stdout=handle, stderr=subprocess.STDOUT, check=False
        )
    seconds = time.perf_counter() - started
    result: dict[str, Any] = {
        "command": command[1:],
        "seconds": seconds,
        "returncode": done.returncode,
    }
    metrics = run / "metrics.jsonl"
    if done.returncode != 0 or not metrics.is_file():
        tail = log.read_text(errors="replace").splitlines()[-15:]
        result["error"] = "\n".join(tail)
        _log(f"  {method}: FAILED (exit {done.returncode}); last lines:\n" + "\n".join(tail))
        return result
    headline = get_task(task).headline
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    last = max(r["round"] for r in rows if r["split"] == "test")
    result["sites"] = {
        r["site"]: {"metric": r["metrics"].get(headline), "n": r["n"]}
        for r in rows
        if r["split"] == "test" and r["round"] == last
    }
    result["round"] = last
    _log(f"  {method}: {_brief(result['sites'])} ({seconds:.0f} s)")
    return result


def _brief(sites: dict[str, dict[str, Any]]) -> str:
    return ", ".join(
        f"{name} {v['metric']:.3f}" if v["metric"] is not None else f"{name} -"
        for name, v in sites.items()
    )


# --- main ------------------------------------------------------------------------------


def _one_seed(task: str, seed: int, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    root = work / f"data-{task}-{seed}"
    started = time.perf_counter()
    folders = _make_sites(root, task, args, seed)
    config = _config(task, args, seed)
    sites = {folder.name: (folder, load_site_for(folder, config)) for folder in folders}
    profiles = json.loads((root / "synth.json").read_text())["sites"]
    splits = {
        name: {split: len(d) for split, d in data.splits.items()}
        for name, (_, data) in sites.items()
    }
    _log(f"{task} seed {seed}: sites ready in {time.perf_counter() - started:.0f} s: {splits}")
    methods: dict[str, Any] = _baselines(task, sites, config, args.strategies)
    for method in args.strategies:
        if method == "fedbn" and not local_keys(get_task(task).build_model(config)):
            # radfed refuses fedbn=true here: it would be plain FedAvg
            methods[method] = {"error": "not applicable: the model has no normalisation state"}
        elif method not in _BASELINES:
            methods[method] = _federated(method, task, root, work, args, seed)
    keys = ("name", "manufacturer", "cases", "prevalence", "intensity_scale", "gamma")
    shift = [
        {k: p[k] for k in (*keys, "bits_stored", "monochrome1", "rescale_slope")} for p in profiles
    ]
    return {"splits": splits, "site_profiles": shift, "methods": methods}


def _parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tasks", nargs="+", choices=_TASKS, default=list(_TASKS))
    parser.add_argument(
        "--strategies",
        nargs="+",
        choices=[*_BASELINES, *_FEDERATED],
        default=list(_DEFAULT_METHODS),
        metavar="METHOD",
        help=f"of {', '.join([*_BASELINES, *_FEDERATED])} (default: %(default)s)",
    )
    parser.add_argument("--sites", type=int, default=3, help="3 to 5 (default 3)")
    parser.add_argument("--cases-per-site", type=int, default=80)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--local-epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--proximal-mu", type=float, default=0.01, help="FedProx (radfed's)")
    parser.add_argument("--server-lr", type=float, default=0.01, help="FedAdam (radfed's)")
    parser.add_argument(
        "--robust-f",
        type=int,
        default=1,
        help="Krum, MultiKrum, Bulyan; only 1 works (radfed's app config lacks the key)",
    )
    parser.add_argument(
        "--poison",
        choices=["sign-flip", "scale"],
        default="sign-flip",
        help="what the poisoned site sends in the X+poison methods (default: %(default)s)",
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--work-dir", type=Path, help="keep sites and runs here")
    args = parser.parse_args()
    if not 2 <= args.sites <= 26:
        parser.error(f"--sites must be between 2 and 26, got {args.sites}")
    for key in ("rounds", "local_epochs", "batch_size", "cases_per_site"):
        if getattr(args, key) < 1:
            parser.error(f"--{key.replace('_', '-')} must be at least 1, got {getattr(args, key)}")
    args.strategies = list(dict.fromkeys(args.strategies))
    return args


def main() -> None:
    args = _parse()
    out = args.out.resolve()
    work = args.work_dir.resolve() if args.work_dir else Path(tempfile.mkdtemp(prefix="qbench-"))
    work.mkdir(parents=True, exist_ok=True)
    runs = sum(m not in _BASELINES for m in args.strategies) * len(args.seeds) * len(args.tasks)
    _log(
        f"{len(args.tasks)} task(s) x {len(args.seeds)} seed(s), {runs} federated runs "
        f"(about 40-60 s each on 2 CPU cores, mostly Ray start-up); work folder {work}"
    )
    started = time.perf_counter()
    result: dict[str, Any] = {
        "settings": {
            **{k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "matched_compute": (
                "each train case is seen rounds x local-epochs times by every method: a "
                "federated site trains local-epochs epochs per round; local-only and pooled "
                "train rounds x local-epochs epochs in one pass (pooled on the union of the "
                "sites' train splits: same total sample-epochs)"
            ),
            "evaluation": (
                "each site's sealed test split, radfed.site.evaluate.evaluate_cells; ALL from "
                "merged statistics; site policy min-cell-size 1, exact-auc true"
            ),
            "local_ALL": (
                "local-only ALL merges each site's own model's statistics on its own test split"
            ),
        },
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "load_average_start": os.getloadavg(),
            "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
        },
        "poisoning": {**_POISONING, "kind": args.poison},
        "tasks": {},
    }
    try:
        for seed in args.seeds:  # seed-major: a partial result covers every task
            for task in args.tasks:
                per_seed = result["tasks"].get(task, {}).get("seeds", {})
                per_seed[str(seed)] = _one_seed(task, seed, args, work)
                result["tasks"][task] = {
                    "headline": get_task(task).headline,
                    "model": get_task(task).models[0],
                    "fedbn_local_tensors": len(
                        local_keys(get_task(task).build_model(_config(task, args, seed)))
                    ),
                    "seeds": per_seed,
                }
                result["wall_seconds"] = time.perf_counter() - started
                _write(result, out, args.strategies, final=False)
        result["wall_seconds"] = time.perf_counter() - started
        result["machine"]["load_average_end"] = os.getloadavg()
        _write(result, out, args.strategies, final=True)
    finally:
        if not args.work_dir:
            shutil.rmtree(work, ignore_errors=True)
    _log(f"done in {result['wall_seconds'] / 60:.1f} min; results in {out}")


def _write(result: dict[str, Any], out: Path, methods: list[str], *, final: bool) -> None:
    """The JSON and the table after every seed (partial until ``final``), the plot at the end."""
    for entry in result["tasks"].values():
        entry["summary"] = summarise(entry["seeds"], methods)
    result["complete"] = final
    out.mkdir(parents=True, exist_ok=True)
    (out / "quality_bench.json").write_text(json.dumps(result, indent=1) + "\n")
    text = markdown(result)
    if final and not plot(result, out / "quality_bench.png"):
        text += "\nNo plot: matplotlib is not installed in this environment.\n"
    (out / "quality_bench.md").write_text(text)
    if final:
        print(text)


if __name__ == "__main__":
    main()
