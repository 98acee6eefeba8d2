"""False flags, power, false reassurance and coverage of the bias report's verdicts, in
repeated simulations at the statistics level (no training).

Run from the repository root (``make bench`` calls it this way)::

    .venv/bin/python bench/bias_power.py [--reps 200] [--seed 0] [--workers 2] [--out bench/results]

Each repetition draws per-case scores for three sites from a binormal model (score =
sigmoid(a (2 label - 1) + e), e ~ N(0, 1), a = 1.5), builds every site's subgroup cells as
a site does (``radfed.metrics.cells``: closed vocabularies, joint suppression under k = 10,
histograms merged to k), builds the bias report as the server does
(``radfed.bias.report.build_report``) and reads its verdicts. Scenarios: no effect, and a
planted failure (women at site-b: a = 0.3 for their positive cases only, so their
sensitivity is 0.62 against 0.93 and their AUC 0.90 against 0.98), each at the size of
small real sites (240 cases a site) and of large ones (800).

Measured per family (worst vs best, one vs rest):
- **any flag** on data without an effect: the chance that a report flags anything (the
  screen's family-wise error under the complete null; target <= 5%);
- **power**: the chance that the planted group at the planted site is flagged on
  sensitivity (by either family);
- **false reassurance**: the chance that the planted gap is called *within margin*
  (must stay near 0: the report must never say "no gap" for a real one);
- **coverage**: of each cell's 95% interval (sensitivity, specificity, AUC) and of each
  site's sex gap's adjusted interval of the difference, against the true values.

Results: a table on stdout, ``<out>/bias_power.json`` (every number),
``<out>/bias_power.md`` (the table) and ``<out>/bias_power.png`` (the rates as bars).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from collections import defaultdict
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from scipy.stats import norm

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO_ROOT / "bench" / "results"
SITES = ("site-a", "site-b", "site-c")
PLANTED_SITE, PLANTED_GROUP = "site-b", "F"
SIGNAL, WEAK_SIGNAL = 1.5, 0.3
K = 10
SUBGROUPS = ("sex", "age_band")
AGES = (30, 50, 70, 85)  # one age per band of the default bands 18,40,60,80


@dataclass(frozen=True)
class Scenario:
    name: str
    cases: int
    planted: bool


SCENARIOS = (
    Scenario("no effect, 240 a site", 240, False),
    Scenario("no effect, 800 a site", 800, False),
    Scenario("planted, 240 a site", 240, True),
    Scenario("planted, 800 a site", 800, True),
)


def _truth(planted_group: bool) -> dict[str, float]:
    """True sensitivity, specificity and AUC of a group under the binormal model."""
    a_pos = WEAK_SIGNAL if planted_group else SIGNAL
    return {
        "sensitivity": float(norm.cdf(a_pos)),
        "specificity": float(norm.cdf(SIGNAL)),
        "auc": float(norm.cdf((a_pos + SIGNAL) / math.sqrt(2))),
    }


def _site_cells(rng: np.random.Generator, n: int, planted: bool) -> list[Any]:
    from radfed.config import RunConfig
    from radfed.data.attributes import AgeBands
    from radfed.federation.schema import CellStats
    from radfed.metrics.binary import BinaryStats
    from radfed.metrics.cells import subgroup_cells, suppressed_cells

    config = RunConfig()
    sex = rng.choice(["F", "M"], n)
    age = rng.choice(AGES, n)
    bands = AgeBands(config.age_bands)
    labels = (rng.random(n) < 0.4).astype(int)
    signal = np.full(n, SIGNAL)
    if planted:
        signal[(sex == PLANTED_GROUP) & (labels == 1)] = WEAK_SIGNAL
    scores = 1 / (1 + np.exp(-(signal * (2 * labels - 1) + rng.normal(0, 1, n))))
    attributes = [
        {"sex": str(s), "age_band": bands.band(int(a))} for s, a in zip(sex, age, strict=True)
    ]
    cells = subgroup_cells(attributes, SUBGROUPS, K, age_bands=bands.labels)
    hidden = suppressed_cells(cells, K)
    out = []
    for number, cell in enumerate(cells):
        index = list(cell.index)
        if number in hidden:
            out.append(
                CellStats(cell.attribute, cell.group, BinaryStats.empty(1000, suppressed=True), 0)
            )
            continue
        stats = BinaryStats.from_scores(scores[index], labels[index], bins=1000)
        out.append(
            CellStats(cell.attribute, cell.group, stats.with_min_cell(K), int(labels[index].sum()))
        )
    return out


def _repetition(args: tuple[Scenario, int]) -> dict[str, Any]:
    from radfed.bias.report import build_report
    from radfed.config import RunConfig
    from radfed.tasks.classification import TASK

    scenario, seed = args
    rng = np.random.default_rng(seed)
    config = RunConfig(eval_splits=("val",), subgroups=SUBGROUPS, min_cell_size=K)
    per_site = {
        site: {"val": _site_cells(rng, scenario.cases, scenario.planted and site == PLANTED_SITE)}
        for site in SITES
    }
    report = build_report(TASK, config, per_site, server_round=1)
    return _measure(report, scenario)


def _group_of(gap: dict[str, Any]) -> str:
    return gap["worst" if gap["comparison"] == "worst vs best" else "group"]["group"]


def _measure(report: dict[str, Any], scenario: Scenario) -> dict[str, Any]:
    body = report["splits"]["val"]
    out: dict[str, Any] = {"any_flag": {}, "power": {}, "reassured": False, "covered": {}}
    for family in ("worst vs best", "one vs rest"):
        gaps = [g for g in body["gaps"] if g["comparison"] == family]
        out["any_flag"][family] = any(g["flagged"] for g in gaps)
        out["power"][family] = any(
            g["flagged"]
            and g["site"] == PLANTED_SITE
            and g["metric"] == "sensitivity"
            and _group_of(g) == PLANTED_GROUP
            for g in gaps
        )
    planted_gap = next(
        (
            g
            for g in body["gaps"]
            if (g["site"], g["attribute"], g["metric"], g["comparison"])
            == (PLANTED_SITE, "sex", "sensitivity", "worst vs best")
        ),
        None,
    )
    out["reassured"] = planted_gap is not None and planted_gap["verdict"] == "within margin"
    out["planted_verdict"] = None if planted_gap is None else planted_gap["verdict"]
    covered: dict[str, list[bool]] = defaultdict(list)
    for cell in body["cells"]:
        if cell["site"] == "ALL" or cell["attribute"] != "sex" or cell["suppressed"]:
            continue
        weak = scenario.planted and (cell["site"], cell["group"]) == (PLANTED_SITE, PLANTED_GROUP)
        truth = _truth(weak)
        for metric, value in truth.items():
            fit = cell["metrics"].get(metric)
            if fit and fit["low"] is not None and fit["high"] is not None:
                covered[metric].append(fit["low"] <= value <= fit["high"])
    for gap in body["gaps"]:
        if gap["site"] == "ALL" or gap["attribute"] != "sex" or gap["metric"] != "sensitivity":
            continue
        groups = (gap["worst"]["group"], gap["best"]["group"])
        weak = [
            scenario.planted and gap["site"] == PLANTED_SITE and g == PLANTED_GROUP for g in groups
        ]
        true_difference = _truth(weak[0])["sensitivity"] - _truth(weak[1])["sensitivity"]
        d = gap["difference"]
        if d["low"] is not None:
            covered["sex gap (adjusted)"].append(d["low"] <= true_difference <= d["high"])
    out["covered"] = {k: [sum(v), len(v)] for k, v in covered.items()}
    return out


def _summarise(scenario: Scenario, results: list[dict[str, Any]]) -> dict[str, Any]:
    reps = len(results)
    summary: dict[str, Any] = {"scenario": scenario.name, "cases": scenario.cases, "reps": reps}
    for family in ("worst vs best", "one vs rest"):
        summary[f"any flag, {family}"] = sum(r["any_flag"][family] for r in results) / reps
        summary[f"power, {family}"] = sum(r["power"][family] for r in results) / reps
    summary["power, either"] = (
        sum(r["power"]["worst vs best"] or r["power"]["one vs rest"] for r in results) / reps
    )
    summary["within margin (false reassurance)"] = sum(r["reassured"] for r in results) / reps
    verdicts: dict[str, int] = defaultdict(int)
    for r in results:
        verdicts[str(r["planted_verdict"])] += 1
    summary["planted gap verdicts"] = dict(verdicts)
    coverage: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for r in results:
        for metric, (hit, total) in r["covered"].items():
            coverage[metric][0] += hit
            coverage[metric][1] += total
    summary["coverage"] = {m: (h / t if t else None) for m, (h, t) in coverage.items()}
    return summary


def _table(summaries: list[dict[str, Any]]) -> str:
    head = (
        "| scenario | any flag (wvb) | any flag (ovr) | power (wvb) | power (ovr) | power (either)"
        " | within margin | coverage sens / spec / AUC | coverage of gap |\n"
        "|---|---|---|---|---|---|---|---|---|\n"
    )
    rows = []
    for s in summaries:
        c = s["coverage"]

        def pct(v: float | None) -> str:
            return "n/a" if v is None else f"{100 * v:.1f}%"

        rows.append(
            f"| {s['scenario']} | {pct(s['any flag, worst vs best'])} | "
            f"{pct(s['any flag, one vs rest'])} | {pct(s['power, worst vs best'])} | "
            f"{pct(s['power, one vs rest'])} | {pct(s['power, either'])} | "
            f"{pct(s['within margin (false reassurance)'])} | "
            f"{pct(c.get('sensitivity'))} / {pct(c.get('specificity'))} / {pct(c.get('auc'))} | "
            f"{pct(c.get('sex gap (adjusted)'))} |"
        )
    return head + "\n".join(rows) + "\n"


def _plot(summaries: list[dict[str, Any]], out: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 4))
    ax = fig.subplots()
    keys = [
        ("any flag, worst vs best", "any flag (wvb)"),
        ("any flag, one vs rest", "any flag (ovr)"),
        ("power, either", "power"),
        ("within margin (false reassurance)", "within margin"),
    ]
    width = 0.8 / len(keys)
    for i, (key, label) in enumerate(keys):
        ax.bar(
            [j + i * width for j in range(len(summaries))],
            [100 * s[key] for s in summaries],
            width,
            label=label,
        )
    ax.axhline(5, color="grey", linestyle=":", linewidth=1)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(summaries))])
    ax.set_xticklabels([s["scenario"] for s in summaries], fontsize=8)
    ax.set_ylabel("% of reports")
    ax.set_title("bias report verdicts in repeated simulations (dotted: 5%)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=90)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    summaries = []
    with ProcessPoolExecutor(max_workers=args.workers) as pool:
        for number, scenario in enumerate(SCENARIOS):
            jobs = [
                (scenario, args.seed * 1_000_003 + number * 100_000 + r) for r in range(args.reps)
            ]
            results = []
            for done, result in enumerate(pool.map(_repetition, jobs, chunksize=4), start=1):
                results.append(result)
                if done % 25 == 0 or done == args.reps:
                    print(f"{scenario.name}: {done}/{args.reps}", file=sys.stderr, flush=True)
            summaries.append(_summarise(scenario, results))
    table = _table(summaries)
    print(table)
    document = {
        "benchmark": "bias_power",
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {"python": platform.python_version(), "processor": platform.machine()},
        "settings": {
            "reps": args.reps,
            "seed": args.seed,
            "sites": len(SITES),
            "k": K,
            "subgroups": list(SUBGROUPS),
            "signal": SIGNAL,
            "weak_signal": WEAK_SIGNAL,
            "truth": {"normal": _truth(False), "planted": _truth(True)},
        },
        "results": summaries,
        "seconds": round(time.perf_counter() - started, 1),
    }
    (args.out / "bias_power.json").write_text(json.dumps(document, indent=1) + "\n")
    (args.out / "bias_power.md").write_text(
        f"# Bias report verdicts in repeated simulations ({args.reps} reports a scenario)\n\n"
        + table
    )
    _plot(summaries, args.out / "bias_power.png")
    print(f"results in {args.out} ({document['seconds']} s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
