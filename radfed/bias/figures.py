"""Figures of a run: forest plots of subgroup cells, ROC curves and metrics over rounds.

Each takes values as ``bias_report.json`` holds them (read tolerantly: a malformed value is
left out, never fatal) and returns a matplotlib ``Figure`` (no global pyplot state).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from radfed.bias.values import as_float, as_floats, as_list, as_mapping, as_point
from radfed.folders import POOLED_SITE

__all__ = [
    "curves_figure",
    "curves_from_metrics",
    "forest_figure",
    "forest_metrics",
    "plot_curves",
    "roc_figure",
]

#: Metrics of the forest plots per task, in panel order; those the cells hold are drawn.
_FOREST_METRICS: dict[str, tuple[str, ...]] = {
    "classification": ("auc", "sensitivity", "specificity"),
    "detection": ("ap50", "froc_mean"),
    "segmentation": ("dice_mean",),
}


def forest_metrics(task: str, cells: Sequence[Mapping[str, Any]]) -> list[str]:
    """The task's forest-plot metrics that some cell holds a value of (else its first 3)."""
    held = [
        m
        for c in cells
        if not c.get("suppressed")
        for m, est in as_mapping(c.get("metrics")).items()
        if as_float(as_mapping(est).get("value")) is not None
    ]
    present = list(dict.fromkeys(held))
    return [m for m in _FOREST_METRICS.get(task, ()) if m in present] or present[:3]


def forest_figure(split: str, cells: Sequence[Mapping[str, Any]], metrics: list[str]) -> Figure:
    fig = Figure(figsize=(2.2 + 3.0 * len(metrics), 0.9 + 0.19 * len(cells)))
    axes = fig.subplots(1, len(metrics), sharey=True, squeeze=False)[0]
    pooled_line = False
    labels = [_plain(f"{c.get('site')} · {c.get('attribute')} · {c.get('group')}") for c in cells]
    for ax, metric in zip(axes, metrics, strict=True):
        text = ax.get_yaxis_transform()  # x in axes fraction, y in rows
        values = []
        for row, cell in enumerate(cells):
            if cell.get("suppressed"):
                ax.text(0.02, row, "suppressed (n < k)", transform=text, va="center", fontsize=7)
                continue
            est = as_mapping(as_mapping(cell.get("metrics")).get(metric))
            value, low, high = (as_float(est.get(key)) for key in ("value", "low", "high"))
            if value is None:
                ax.text(0.02, row, "n/a", transform=text, va="center", fontsize=7, color="grey")
                continue
            values += [v for v in (value, low, high) if v is not None]
            xerr = None
            if low is not None and high is not None:
                xerr = [[max(0.0, value - low)], [max(0.0, high - value)]]
            pooled = cell.get("site") == POOLED_SITE
            color = "black" if pooled else "tab:blue"
            ax.errorbar(value, row, xerr=xerr, fmt="D" if pooled else "o", color=color, ms=3.5)
            if pooled and cell.get("attribute") == "all":
                ax.axvline(value, color="black", linestyle=":", linewidth=1)
                pooled_line = True
        for row in range(1, len(cells)):
            if cells[row].get("site") != cells[row - 1].get("site"):
                ax.axhline(row - 0.5, color="#bbbbbb", linewidth=0.6)
        if _rates(values):
            ax.set_xlim(-0.02, 1.02)
        ax.set_title(_plain(f"{split}: {metric}"), fontsize=9)
        ax.tick_params(labelsize=7)
        ax.grid(axis="x", alpha=0.3)
    axes[0].set_yticks(range(len(cells)), labels)
    axes[0].set_ylim(len(cells) - 0.5, -0.5)
    if pooled_line:
        fig.text(0.01, 0.005, "dotted line: pooled ALL / all", fontsize=7, color="grey")
    fig.tight_layout(rect=(0, 0.02, 1, 1))
    return fig


def roc_figure(split: str, per_site: Mapping[str, Any]) -> Figure:
    fig = Figure(figsize=(4.6, 4.2))
    ax = fig.subplots()
    ax.plot([0, 1], [0, 1], color="#bbbbbb", linewidth=0.8, linestyle=":")
    for site, curve in _pool_last(per_site):
        fpr, tpr = as_floats(as_mapping(curve).get("fpr")), as_floats(as_mapping(curve).get("tpr"))
        if not fpr or len(fpr) != len(tpr):
            continue
        auc = as_float(as_mapping(curve).get("auc"))
        label = _plain(f"{site} (AUC {auc:.3f})" if auc is not None else f"{site} (AUC n/a)")
        ax.plot(fpr, tpr, label=label, **_line_style(site))
    ax.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="1 - specificity", ylabel="sensitivity")
    ax.set_title(_plain(f"{split}: ROC per site"), fontsize=9)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def curves_figure(series: Mapping[str, Any]) -> Figure | None:
    """Metrics over rounds per site, the pool black and dashed: one row per split, one
    column per metric (the curves of ``bias_report.json`` and ``curves.png`` alike).

    Args:
        series: per split, per site, per metric its ``[round, value]`` points (the layout
            of the report's ``curves``; see ``curves_from_metrics``).

    Returns:
        The figure, or None when no split holds a point.
    """
    splits = {str(name): as_mapping(per_site) for name, per_site in as_mapping(series).items()}
    metrics = list(
        dict.fromkeys(
            m for per_site in splits.values() for s in per_site.values() for m in as_mapping(s)
        )
    )
    if not splits or not metrics:
        return None
    fig = Figure(figsize=(3.2 * len(metrics), 0.5 + 2.6 * len(splits)))
    grid = fig.subplots(len(splits), len(metrics), squeeze=False)
    legend: dict[str, Any] = {}
    for axes, (split, per_site) in zip(grid, splits.items(), strict=True):
        for ax, metric in zip(axes, metrics, strict=True):
            values = []
            for site, by_metric in _pool_last(per_site):
                points = [
                    (r, v)
                    for r, v in (as_point(p) for p in as_list(as_mapping(by_metric).get(metric)))
                    if r is not None and v is not None
                ]
                if not points:
                    continue
                values += [v for _, v in points]
                (line,) = ax.plot(*zip(*points, strict=True), marker="o", ms=3, **_line_style(site))
                legend.setdefault(_plain(site), line)
            if _rates(values):
                ax.set_ylim(0, 1.02)
            ax.set_title(_plain(f"{split}: {metric}"), fontsize=9)
            ax.set_xlabel("round", fontsize=8)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.tick_params(labelsize=7)
            ax.grid(alpha=0.3)
    if not legend:
        return None
    fig.legend(legend.values(), legend.keys(), loc="upper center", ncol=min(len(legend), 6))
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.4 / (0.5 + 2.6 * len(splits))))
    return fig


def curves_from_metrics(
    lines: Iterable[Mapping[str, Any]], metrics: Sequence[str]
) -> dict[str, dict[str, dict[str, list[list[float]]]]]:
    """The curves of ``metrics`` from the lines of ``metrics.jsonl``: per split, per site,
    per metric its ``[round, value]`` points (rounds with no value are left out)."""
    out: dict[str, dict[str, dict[str, list[list[float]]]]] = {}
    for line in lines:
        for metric in metrics:
            value = line["metrics"].get(metric)
            if value is None:
                continue
            series = out.setdefault(line["split"], {}).setdefault(line["site"], {})
            series.setdefault(metric, []).append([line["round"], value])
    return out


def plot_curves(
    lines: Iterable[Mapping[str, Any]], out: Path, metrics: Sequence[str]
) -> Path | None:
    """Write ``curves_figure`` of ``metrics`` over the lines of ``metrics.jsonl`` as a PNG.

    Returns:
        ``out``, or None when no line holds a value of ``metrics``.
    """
    fig = curves_figure(curves_from_metrics(lines, metrics))
    if fig is None:
        return None
    fig.savefig(out, dpi=100)
    return out


def _pool_last(per_site: Mapping[str, Any]) -> list[tuple[str, Any]]:
    return sorted(per_site.items(), key=lambda item: item[0] == POOLED_SITE)


def _line_style(site: str) -> dict[str, Any]:
    """Sites in the colour cycle, the pool black, dashed and thicker."""
    if site == POOLED_SITE:
        return {"color": "black", "linestyle": "--", "linewidth": 2}
    return {"linewidth": 1.2}


def _plain(text: str) -> str:
    """Text matplotlib shows as is: no mathtext (``$``), no hidden ``_`` legend labels."""
    text = text.replace("$", r"\$")
    return f" {text}" if text.startswith("_") else text


def _rates(values: list[float]) -> bool:
    """Whether the values are all in [0, 1], so that an axis can span exactly that."""
    return bool(values) and min(values) >= 0.0 and max(values) <= 1.0
