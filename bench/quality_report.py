"""Summary, Markdown table and plot of ``quality_bench.py``'s results (means ± sd over seeds)."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

__all__ = ["markdown", "plot", "summarise"]

_LABELS = {
    "pooled": "pooled (one node)",
    "local": "local-only",
    "fedbn": "fedbn (fedavg + local norm layers)",
}
_ROBUST = ("fedmedian", "fedtrimmedavg", "krum", "multikrum", "bulyan")


def _spread(values: list[float]) -> dict[str, Any]:
    """Mean, sample sd (0 for one value) and count of the values that exist."""
    if not values:
        return {"mean": None, "sd": None, "n": 0, "values": []}
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return {"mean": statistics.fmean(values), "sd": sd, "n": len(values), "values": values}


def _metric(seed: dict[str, Any], method: str, site: str) -> float | None:
    sites = seed["methods"].get(method, {}).get("sites", {})
    value = sites.get(site, {}).get("metric")
    return None if value is None else float(value)


def summarise(seeds: dict[str, dict[str, Any]], methods: list[str]) -> dict[str, Any]:
    """Per method and site (``ALL`` included): the metric, the metric as a percentage of
    pooled training's at that site, and the gain over local-only there, each computed per
    seed and then summarised over seeds (paired, so the spread is the seeds')."""
    names = [*sorted({s for seed in seeds.values() for s in seed["splits"]}), "ALL"]
    out: dict[str, Any] = {"sites": names, "methods": {}}
    for method in methods:
        per_site = {}
        for site in names:
            metric, pct, gain = [], [], []
            for seed in seeds.values():
                value = _metric(seed, method, site)
                if value is None:
                    continue
                metric.append(value)
                pooled, local = _metric(seed, "pooled", site), _metric(seed, "local", site)
                if pooled:
                    pct.append(100.0 * value / pooled)
                if local is not None:
                    gain.append(value - local)
            per_site[site] = {
                "metric": _spread(metric),
                "percent_of_pooled": _spread(pct),
                "gain_over_local": _spread(gain),
            }
        failed = [k for k, seed in seeds.items() if "error" in seed["methods"].get(method, {})]
        out["methods"][method] = {"sites": per_site, "failed_seeds": failed}
    return out


def _fmt(entry: dict[str, Any], digits: int = 3, signed: bool = False) -> str:
    if entry["mean"] is None:
        return "–"
    sign = "+" if signed else ""
    return f"{entry['mean']:{sign}.{digits}f} ± {entry['sd']:.{digits}f}"


def markdown(result: dict[str, Any]) -> str:
    """One table per task: the metric per site and pooled over sites (``ALL``), the
    percentage of pooled training's ``ALL``, and the gain over local-only at every site."""
    s = result["settings"]
    lines = [
        "# radfed model quality: pooled, local-only and federated training",
        "",
        f"{s['sites']} generated sites with site shift, ~{s['cases_per_site']} cases a site, "
        f"{s['image_size']} px, seeds {', '.join(map(str, s['seeds']))}; "
        f"{s['rounds']} rounds x {s['local_epochs']} local epochs, batch {s['batch_size']}, "
        f"Adam lr {s['learning_rate']}, no augmentation; FedProx mu {s['proximal_mu']}, "
        f"FedAdam server lr {s['server_lr']}.",
        "",
        f"**Matched compute:** {s['matched_compute']}.",
        "",
        f"**Evaluation:** {s['evaluation']}. Values are mean ± sd over seeds; % of pooled "
        "and the gain over local-only are computed per seed (paired) and then summarised. "
        f"Local-only's ALL: {s['local_ALL']}.",
        "",
    ]
    for task, entry in result["tasks"].items():
        summary = entry.get("summary")
        if summary is None:
            continue
        sites = summary["sites"]
        own = [x for x in sites if x != "ALL"]
        lines += [
            f"## {task} ({entry['headline']}, test split, model {entry['model']})",
            "",
            f"FedBN keeps {entry['fedbn_local_tensors']} normalisation tensors at each site"
            + (
                " (none: fedbn is FedAvg for this model)."
                if not entry["fedbn_local_tensors"]
                else "."
            )
            + ("" if result.get("complete") else " **Partial: the run has not finished.**"),
            "",
            "| method | "
            + " | ".join(sites)
            + " | % of pooled (ALL) | "
            + " | ".join(f"gain vs local {x}" for x in [*own, "ALL"])
            + " |",
            "|---|" + "---:|" * (len(sites) + 1 + len(own) + 1),
        ]
        for method, row in summary["methods"].items():
            cells = row["sites"]
            name = _LABELS.get(method, method) + (" (robust)" if method in _ROBUST else "")
            if row["failed_seeds"]:
                name += f" [failed seeds: {', '.join(row['failed_seeds'])}]"
            pct = cells["ALL"]["percent_of_pooled"]
            pct_text = "–" if pct["mean"] is None else f"{pct['mean']:.1f} ± {pct['sd']:.1f} %"
            gains = [
                "–" if method == "local" else _fmt(cells[x]["gain_over_local"], signed=True)
                for x in [*own, "ALL"]
            ]
            lines.append(
                f"| {name} | "
                + " | ".join(_fmt(cells[x]["metric"]) for x in sites)
                + f" | {pct_text} | "
                + " | ".join(gains)
                + " |"
            )
        lines.append("")
    poison = result["poisoning"]
    lines += [
        "## Poisoned site (robust strategies)",
        "",
        f"Rows `X+poison` ({poison['kind']}): {poison['how']}.",
        "",
        f"Wall time {result.get('wall_seconds', 0) / 60:.1f} min on {result['machine']['cpus']} "
        f"CPUs (load average at start {result['machine']['load_average_start'][0]:.1f}).",
        "",
    ]
    return "\n".join(lines)


def plot(result: dict[str, Any], path: Path) -> bool:
    """Grouped bars per task: methods on x, one bar per site and ``ALL``, sd as error bars.
    False when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    tasks = [(t, e) for t, e in result["tasks"].items() if "summary" in e]
    fig, axes = plt.subplots(len(tasks), 1, figsize=(11, 4 * len(tasks)), squeeze=False)
    for ax, (task, entry) in zip(axes[:, 0], tasks, strict=True):
        summary = entry["summary"]
        methods, sites = list(summary["methods"]), summary["sites"]
        width = 0.8 / len(sites)
        for i, site in enumerate(sites):
            stats = [summary["methods"][m]["sites"][site]["metric"] for m in methods]
            ax.bar(
                [j + (i - (len(sites) - 1) / 2) * width for j in range(len(methods))],
                [st["mean"] if st["mean"] is not None else 0.0 for st in stats],
                width,
                yerr=[st["sd"] or 0.0 for st in stats],
                capsize=2,
                label=site,
                color="black" if site == "ALL" else None,
                alpha=0.85,
            )
        ax.set_xticks(range(len(methods)), methods)
        ax.set_ylabel(f"{entry['headline']} (test)")
        ax.set_ylim(0, 1)
        ax.set_title(f"{task}: mean ± sd over {len(entry['seeds'])} seeds")
        ax.legend(ncol=len(sites), fontsize=8, loc="lower right")
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True
