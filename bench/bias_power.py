"""False flags, power, false reassurance and coverage of the bias report's verdicts, in
repeated simulations at the statistics level (no training).

Run from the repository root (``make bench`` calls it this way)::

    .venv/bin/python bench/bias_power.py [--reps 200] [--seed 0] [--workers 2] [--out bench/results]

Each repetition draws per-case scores for three sites from a binormal model (score =
sigmoid(a (2 label - 1) + e), e ~ N(0, 1), a = 1.5), builds every site's subgroup cells as
a site does (``radfed.metrics.cells``: closed vocabularies, joint suppression under k = 10,
histograms merged to k), builds the bias report as the server does
(``radfed.bias.report.build_report``) and reads its verdicts. Scenarios (``SCENARIOS``):
no effect at 240 and 800 cases a site (the size of small and of large real sites); women
failing at site-b (a = 0.3 for their positive cases only: sensitivity 0.62 against 0.93,
AUC 0.90 against 0.98) at both sizes; the 60-79 age band failing at site-b (a group of
one of several: where one-vs-rest has power); women at site-b exactly the margin (0.05)
below in sensitivity, with 2000 cases a site (the hardest case for "within margin"); and
a site effect without any group effect (site-b does worse and sees mostly women: Simpson's
paradox in the pool).

Measured, each rate with its 95% Wilson interval over the repetitions:
- **any flag** on data without a group effect, per family (worst vs best, one vs rest),
  per report, and among pooled gaps (the screen's family-wise error under the null;
  target <= 5% per family);
- **power**: the chance that the planted group at the planted site is flagged on
  sensitivity, per family;
- **within margin**: the chance that a planted gap is called *within margin* (false
  reassurance; at most about 2.5% for a gap at the margin, near 0 beyond);
- **coverage**: of each sex cell's 95% interval (sensitivity, specificity, AUC) against
  the true values, and the share of flagged sex gaps whose adjusted interval holds the
  true difference (1 - the false coverage rate).

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
    """Three sites of ``cases`` each. ``planted``: the (site, attribute, group) whose
    positive cases get ``weak`` instead of ``SIGNAL``; ``female``: each site's share of
    women; ``site_signal``: each site's signal (a site effect)."""

    name: str
    cases: int
    planted: tuple[str, str, str] | None = None
    weak: float = WEAK_SIGNAL
    female: tuple[float, float, float] = (0.5, 0.5, 0.5)
    site_signal: tuple[float, float, float] = (SIGNAL, SIGNAL, SIGNAL)


#: A signal whose sensitivity is the margin (0.05) below the others': a gap exactly at the
#: margin, which must be called "within margin" at most 2.5% of the time.
AT_MARGIN = float(norm.ppf(norm.cdf(SIGNAL) - 0.05))

SCENARIOS = (
    Scenario("no effect, 240 a site", 240),
    Scenario("no effect, 800 a site", 800),
    Scenario("women fail at site-b, 240 a site", 240, (PLANTED_SITE, "sex", "F")),
    Scenario("women fail at site-b, 800 a site", 800, (PLANTED_SITE, "sex", "F")),
    Scenario("ages 60-79 fail at site-b, 800 a site", 800, (PLANTED_SITE, "age_band", "60-79")),
    Scenario("women at the margin at site-b, 2000", 2000, (PLANTED_SITE, "sex", "F"), AT_MARGIN),
    Scenario(
        "site effect, no group effect (Simpson), 800",
        800,
        female=(0.1, 0.9, 0.5),
        site_signal=(SIGNAL, 0.6, SIGNAL),
    ),
)


def _truth(positive_signal: float, negative_signal: float = SIGNAL) -> dict[str, float]:
    """True sensitivity, specificity and AUC of a group under the binormal model."""
    return {
        "sensitivity": float(norm.cdf(positive_signal)),
        "specificity": float(norm.cdf(negative_signal)),
        "auc": float(norm.cdf((positive_signal + negative_signal) / math.sqrt(2))),
    }


def _site_cells(rng: np.random.Generator, scenario: Scenario, site: int) -> list[Any]:
    from radfed.config import RunConfig
    from radfed.data.attributes import AgeBands
    from radfed.federation.schema import CellStats
    from radfed.metrics.binary import BinaryStats
    from radfed.metrics.cells import subgroup_cells, suppressed_cells

    n = scenario.cases
    sex = np.where(rng.random(n) < scenario.female[site], "F", "M")
    age = rng.choice(AGES, n)
    bands = AgeBands(RunConfig().age_bands)
    band = np.array([bands.band(int(a)) for a in age])
    labels = (rng.random(n) < 0.4).astype(int)
    signal = np.full(n, scenario.site_signal[site])
    if scenario.planted is not None and SITES[site] == scenario.planted[0]:
        _, attribute, group = scenario.planted
        members = (sex if attribute == "sex" else band) == group
        signal[members & (labels == 1)] = scenario.weak
    scores = 1 / (1 + np.exp(-(signal * (2 * labels - 1) + rng.normal(0, 1, n))))
    attributes = [{"sex": str(s), "age_band": str(b)} for s, b in zip(sex, band, strict=True)]
    cells = subgroup_cells(attributes, SUBGROUPS, K, age_bands=bands.labels)
    hidden = suppressed_cells(cells, K)
    out = []
    for number, cell in enumerate(cells):
        index = list(cell.index)
        if number in hidden:
            empty = BinaryStats.empty(1000, suppressed=True)
            out.append(CellStats(cell.attribute, cell.group, empty, 0))
            continue
        stats = BinaryStats.from_scores(scores[index], labels[index], bins=1000, exact=True)
        positives = int(labels[index].sum())
        out.append(CellStats(cell.attribute, cell.group, stats.with_min_cell(K), positives))
    return out


def _repetition(args: tuple[Scenario, int]) -> dict[str, Any]:
    from radfed.bias.report import build_report
    from radfed.config import RunConfig
    from radfed.tasks.classification import TASK

    scenario, seed = args
    rng = np.random.default_rng(seed)
    config = RunConfig(eval_splits=("val",), subgroups=SUBGROUPS, min_cell_size=K)
    per_site = {site: {"val": _site_cells(rng, scenario, i)} for i, site in enumerate(SITES)}
    report = build_report(TASK, config, per_site, server_round=1)
    return _measure(report, scenario)


def _group_of(gap: dict[str, Any]) -> str:
    return str(gap["worst" if gap["comparison"] == "worst vs best" else "group"]["group"])


def _cell_truth(scenario: Scenario, site: str, attribute: str, group: str) -> dict[str, float]:
    index = SITES.index(site)
    weak = scenario.planted == (site, attribute, group)
    positive = scenario.weak if weak else scenario.site_signal[index]
    return _truth(positive, scenario.site_signal[index])


def _measure(report: dict[str, Any], scenario: Scenario) -> dict[str, Any]:
    body = report["splits"]["val"]
    out: dict[str, Any] = {"any_flag": {}, "power": {}, "reassured": False, "covered": {}}
    for family in ("worst vs best", "one vs rest"):
        gaps = [g for g in body["gaps"] if g["comparison"] == family]
        out["any_flag"][family] = any(g["flagged"] for g in gaps)
        out["power"][family] = scenario.planted is not None and any(
            g["flagged"]
            and (g["site"], g["attribute"]) == scenario.planted[:2]
            and g["metric"] == "sensitivity"
            and _group_of(g) == scenario.planted[2]
            for g in gaps
        )
    out["any_flag"]["report"] = any(g["flagged"] for g in body["gaps"])
    out["any_flag"]["pooled"] = any(g["flagged"] for g in body["gaps"] if g["site"] == "ALL")
    planted_gaps = [
        g
        for g in body["gaps"]
        if scenario.planted is not None
        and (g["site"], g["attribute"]) == scenario.planted[:2]
        and g["metric"] == "sensitivity"
        and scenario.planted[2] in (_group_of(g), g.get("best", {}).get("group"))
    ]
    out["reassured"] = any(g["verdict"] == "within margin" for g in planted_gaps)
    out["planted_verdict"] = planted_gaps[0]["verdict"] if planted_gaps else None
    covered: dict[str, list[bool]] = defaultdict(list)
    if scenario.planted is not None and scenario.planted[1] != "sex":
        return out  # the sex cells are mixtures of the planted groups: no simple truth
    for cell in body["cells"]:
        if cell["site"] == "ALL" or cell["attribute"] != "sex" or cell["suppressed"]:
            continue
        truth = _cell_truth(scenario, cell["site"], "sex", cell["group"])
        for metric, value in truth.items():
            fit = cell["metrics"].get(metric)
            if fit and fit["low"] is not None and fit["high"] is not None:
                covered[metric].append(fit["low"] <= value <= fit["high"])
    for gap in body["gaps"]:
        if gap["site"] == "ALL" or gap["attribute"] != "sex" or not gap["flagged"]:
            continue
        worst, best = gap["worst"]["group"], gap["best"]["group"]
        metric = gap["metric"]
        true_difference = (
            _cell_truth(scenario, gap["site"], "sex", worst)[metric]
            - _cell_truth(scenario, gap["site"], "sex", best)[metric]
        )
        d = gap["difference"]
        covered["flagged sex gaps (FCR)"].append(d["low"] <= true_difference <= d["high"])
    out["covered"] = {k: [sum(v), len(v)] for k, v in covered.items()}
    return out


def _rate(hits: int, total: int) -> dict[str, float | int | None]:
    """A rate with its 95% Wilson interval (the Monte Carlo uncertainty)."""
    from radfed.metrics.intervals import wilson

    if not total:
        return {"rate": None, "low": None, "high": None, "n": 0}
    fit = wilson(hits, total)
    return {"rate": hits / total, "low": fit.low, "high": fit.high, "n": total}


def _summarise(scenario: Scenario, results: list[dict[str, Any]]) -> dict[str, Any]:
    reps = len(results)
    summary: dict[str, Any] = {"scenario": scenario.name, "cases": scenario.cases, "reps": reps}
    for key in ("worst vs best", "one vs rest", "report", "pooled"):
        summary[f"any flag, {key}"] = _rate(sum(r["any_flag"][key] for r in results), reps)
    if scenario.planted is not None:
        for family in ("worst vs best", "one vs rest"):
            summary[f"power, {family}"] = _rate(sum(r["power"][family] for r in results), reps)
        either = sum(r["power"]["worst vs best"] or r["power"]["one vs rest"] for r in results)
        summary["power, either"] = _rate(either, reps)
        summary["within margin"] = _rate(sum(r["reassured"] for r in results), reps)
    verdicts: dict[str, int] = defaultdict(int)
    for r in results:
        verdicts[str(r["planted_verdict"])] += 1
    summary["planted gap verdicts"] = dict(verdicts)
    coverage: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for r in results:
        for metric, (hit, total) in r["covered"].items():
            coverage[metric][0] += hit
            coverage[metric][1] += total
    summary["coverage"] = {m: _rate(h, t) for m, (h, t) in coverage.items()}
    return summary


def _pct(rate: Any) -> str:
    if not rate or rate.get("rate") is None:
        return "-"
    return f"{100 * rate['rate']:.1f}% [{100 * rate['low']:.1f}, {100 * rate['high']:.1f}]"


def _table(summaries: list[dict[str, Any]]) -> str:
    head = (
        "| scenario | any flag: wvb / ovr / report / pooled | power: wvb / ovr "
        "| planted gap within margin | coverage 95%: sens / spec / AUC | flagged sex gaps "
        "covering the truth |\n|---|---|---|---|---|---|\n"
    )
    rows = []
    for s in summaries:
        c = s["coverage"]
        flags = " / ".join(
            _pct(s[f"any flag, {k}"]) for k in ("worst vs best", "one vs rest", "report", "pooled")
        )
        power = " / ".join(_pct(s.get(f"power, {k}")) for k in ("worst vs best", "one vs rest"))
        coverage = " / ".join(_pct(c.get(m)) for m in ("sensitivity", "specificity", "auc"))
        rows.append(
            f"| {s['scenario']} | {flags} | {power} | {_pct(s.get('within margin'))} | "
            f"{coverage} | {_pct(c.get('flagged sex gaps (FCR)'))} |"
        )
    return head + "\n".join(rows) + "\n"


def _plot(summaries: list[dict[str, Any]], out: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4.5))
    ax = fig.subplots()
    keys = [
        ("any flag, report", "any flag in the report"),
        ("power, either", "planted group flagged"),
        ("within margin", "planted gap called within margin"),
    ]
    width = 0.8 / len(keys)
    for i, (key, label) in enumerate(keys):
        xs = [j + i * width for j in range(len(summaries))]
        values = [100 * (s.get(key) or {}).get("rate", 0.0) or 0.0 for s in summaries]
        ax.bar(xs, values, width, label=label)
    ax.axhline(5, color="grey", linestyle=":", linewidth=1)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(summaries))])
    ax.set_xticklabels([s["scenario"] for s in summaries], fontsize=7, rotation=15, ha="right")
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
            "truth": {"normal": _truth(SIGNAL), "planted": _truth(WEAK_SIGNAL)},
            "at_margin_signal": AT_MARGIN,
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
