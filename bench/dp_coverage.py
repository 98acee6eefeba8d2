"""Coverage of the bias report's intervals under DP statistics, in repeated simulations.

Run from the repository root (``make bench`` calls it this way)::

    .venv/bin/python bench/dp_coverage.py [--reps 1000] [--seed 0] [--out bench/results]

Each repetition draws per-case scores and labels for a few sites with two groups each (a
fixed population per scenario, so that only the noise varies: the question is whether the
noisy release's intervals contain the values the exact statistics would give), releases
every cell as a site with DP statistics does (``radfed.privacy.statistics_dp.noisy_release``:
discrete Gaussian noise on every bin, confusion counts summed from the noisy bins), pools
the sites as the server does, and checks whether each 95% interval of the bias report
(``radfed.bias.estimates``) contains the noise-free value: per site and pooled
sensitivity, specificity and AUC, and the pooled difference between the groups. It also
checks the same intervals with the noise term left out, to show what it is for.

Results: a table on stdout, ``<out>/dp_coverage.json`` (every number) and
``<out>/dp_coverage.md`` (the table). See bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import sys
import time
from collections import defaultdict
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from radfed.bias.estimates import (
    METHODS,
    Auc,
    Estimate,
    Proportion,
    compare,
    estimates,
    interval,
)
from radfed.metrics.binary import BinaryStats
from radfed.metrics.pooling import pool
from radfed.privacy.statistics_dp import noisy_release

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO_ROOT / "bench" / "results"
CONFIDENCE = 0.95
METRICS = ("sensitivity", "specificity", "auc")
BINS = 20


@dataclass(frozen=True)
class Scenario:
    """Sites of ``cases`` each, ``noise`` the standard deviation on every count."""

    name: str
    sites: int
    cases: int
    noise: float


SCENARIOS = (
    Scenario("3 sites x 300, noise 2", 3, 300, 2.0),
    Scenario("3 sites x 300, noise 4", 3, 300, 4.0),
    Scenario("5 sites x 120, noise 4", 5, 120, 4.0),
    Scenario("3 sites x 1000, noise 4", 3, 1000, 4.0),
)


def _population(scenario: Scenario, rng: np.random.Generator) -> list[dict[str, BinaryStats]]:
    """Per site its exact cells ``all``, ``F``, ``M`` (scores of a model that ranks
    positives higher, a little worse for one sex)."""
    sites = []
    for _ in range(scenario.sites):
        labels = rng.random(scenario.cases) < 0.35
        female = rng.random(scenario.cases) < 0.5
        logits = rng.normal(-0.8 + 1.8 * labels - 0.4 * (female & labels), 1.1)
        scores = 1 / (1 + np.exp(-logits))
        cells = {}
        for name, chosen in (("all", np.ones_like(female)), ("F", female), ("M", ~female)):
            cells[name] = BinaryStats.from_scores(
                scores[chosen], labels[chosen], threshold=0.5, bins=BINS
            )
        sites.append(cells)
    return sites


def _covers(estimate: Estimate, truth: float | None) -> tuple[bool, float] | None:
    fit = interval(estimate, CONFIDENCE)
    if truth is None or fit.low is None or fit.high is None:
        return None
    return fit.low <= truth <= fit.high, fit.high - fit.low


def _without_noise(estimate: Estimate) -> Estimate:
    """The same noisy counts with the noise term dropped (an interval that ignores it)."""
    if isinstance(estimate, Proportion):
        trials = max(estimate.trials, 0)
        return Proportion(min(max(estimate.successes, 0), trials), trials)
    if isinstance(estimate, Auc):
        return Auc(tuple(max(v, 0) for v in estimate.pos), tuple(max(v, 0) for v in estimate.neg))
    return estimate


def run_scenario(scenario: Scenario, reps: int, seed: int) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    noise_rng = random.Random(seed)
    sites = _population(scenario, rng)
    empty = BinaryStats.empty(BINS)
    truth_pooled = {c: pool((s[c] for s in sites), empty) for c in ("all", "F", "M")}
    hits: dict[str, list[bool]] = defaultdict(list)
    widths: dict[str, list[float]] = defaultdict(list)
    naive: dict[str, list[bool]] = defaultdict(list)
    for _ in range(reps):
        released = [
            {c: noisy_release(stats, scenario.noise, noise_rng) for c, stats in s.items()}
            for s in sites
        ]
        pooled = {c: pool((s[c] for s in released), empty) for c in ("all", "F", "M")}
        checks: list[tuple[str, BinaryStats, BinaryStats]] = [
            (f"site {i + 1}", released[i]["all"], sites[i]["all"]) for i in range(len(sites))
        ]
        checks.append(("pooled", pooled["all"], truth_pooled["all"]))
        for where, noisy, exact in checks:
            kind = "pooled" if where == "pooled" else "site"
            noisy_metrics, exact_metrics = estimates(noisy), estimates(exact)
            for metric in METRICS:
                truth = interval(exact_metrics[metric].estimate, CONFIDENCE).value
                result = _covers(noisy_metrics[metric].estimate, truth)
                if result is not None:
                    hits[f"{kind} {metric}"].append(result[0])
                    widths[f"{kind} {metric}"].append(result[1])
                plain = _covers(_without_noise(noisy_metrics[metric].estimate), truth)
                if plain is not None:
                    naive[f"{kind} {metric}"].append(plain[0])
        for metric in ("sensitivity", "auc"):
            noisy_f, noisy_m = estimates(pooled["F"])[metric], estimates(pooled["M"])[metric]
            exact_f = estimates(truth_pooled["F"])[metric]
            exact_m = estimates(truth_pooled["M"])[metric]
            a = interval(exact_f.estimate, CONFIDENCE).value
            b = interval(exact_m.estimate, CONFIDENCE).value
            gap, _ = compare(noisy_f.estimate, noisy_m.estimate, CONFIDENCE)
            if a is not None and b is not None and gap.low is not None and gap.high is not None:
                hits[f"pooled F-M {metric}"].append(gap.low <= a - b <= gap.high)
                widths[f"pooled F-M {metric}"].append(gap.high - gap.low)
            plain_gap, _ = compare(
                _without_noise(noisy_f.estimate), _without_noise(noisy_m.estimate), CONFIDENCE
            )
            if a is not None and b is not None and plain_gap.low is not None:
                assert plain_gap.high is not None
                naive[f"pooled F-M {metric}"].append(plain_gap.low <= a - b <= plain_gap.high)
    return {
        "scenario": scenario.name,
        "sites": scenario.sites,
        "cases_per_site": scenario.cases,
        "noise": scenario.noise,
        "reps": reps,
        "coverage": {k: float(np.mean(v)) for k, v in hits.items()},
        "intervals": {k: len(v) for k, v in hits.items()},
        "mean_width": {k: float(np.mean(v)) for k, v in widths.items()},
        "coverage_without_noise_term": {k: float(np.mean(v)) for k, v in naive.items()},
    }


def _markdown(results: list[dict[str, Any]]) -> str:
    lines = [
        "# Coverage of 95% intervals under DP statistics",
        "",
        "Share of repetitions whose interval holds the noise-free value (nominal 0.95; the",
        "intervals also hold the sampling error, so above 0.95 is expected); in brackets the",
        "same intervals without the noise term.",
        "",
    ]
    keys = list(results[0]["coverage"])
    lines.append("| scenario | " + " | ".join(keys) + " |")
    lines.append("|---|" + "---|" * len(keys))
    for r in results:
        cells = [
            f"{r['coverage'][k]:.3f} ({r['coverage_without_noise_term'].get(k, float('nan')):.3f})"
            for k in keys
        ]
        lines.append(f"| {r['scenario']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=1000, help="repetitions per scenario")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    if args.reps < 1:
        parser.error("--reps must be at least 1")
    start = time.perf_counter()
    results = []
    for number, scenario in enumerate(SCENARIOS):
        print(f"[{number + 1}/{len(SCENARIOS)}] {scenario.name}: {args.reps} reps", file=sys.stderr)
        results.append(run_scenario(scenario, args.reps, args.seed + number))
    document = {
        "benchmark": "dp_coverage",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "confidence": CONFIDENCE,
        "score_bins": BINS,
        "method": METHODS["noise"],
        "seconds": round(time.perf_counter() - start, 1),
        "results": results,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "dp_coverage.json").write_text(json.dumps(document, indent=1) + "\n")
    table = _markdown(results)
    (args.out / "dp_coverage.md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
