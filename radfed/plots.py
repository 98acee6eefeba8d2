"""Figures of a run folder: per-site and pooled metric curves over rounds."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from radfed.federation.run_folder import POOLED_SITE, RunFolder

__all__ = ["CURVES_NAME", "plot_curves"]

CURVES_NAME = "curves.png"


def plot_curves(
    run: RunFolder, metrics: tuple[str, ...] = ("auc", "sensitivity", "specificity")
) -> Path:
    """Plot each metric per site (and pooled, dashed) over rounds, one row per split.

    Args:
        run: the run folder.
        metrics: rates in [0, 1] to plot, one column each (the task's ``summary[:3]``).

    Returns:
        The PNG written into the run folder.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    series: dict[tuple[str, str, str], list[tuple[int, float]]] = defaultdict(list)
    splits: list[str] = []
    for line in run.read_metrics():
        if line["split"] not in splits:
            splits.append(line["split"])
        for metric in metrics:
            value = line["metrics"].get(metric)
            if value is not None:
                series[(line["split"], metric, line["site"])].append((line["round"], value))
    fig, axes = plt.subplots(
        len(splits) or 1,
        len(metrics),
        figsize=(4 * len(metrics), 3 * max(1, len(splits))),
        squeeze=False,
        sharey=True,
    )
    for row, split in enumerate(splits):
        for col, metric in enumerate(metrics):
            ax = axes[row][col]
            for (s, m, site), points in sorted(series.items()):
                if (s, m) != (split, metric):
                    continue
                rounds, values = zip(*points, strict=True)
                pooled = site == POOLED_SITE
                ax.plot(
                    rounds,
                    values,
                    marker="o",
                    linestyle="--" if pooled else "-",
                    color="black" if pooled else None,
                    label=site,
                    linewidth=2 if pooled else 1,
                )
            ax.set_title(f"{split}: {metric}")
            ax.set_xlabel("round")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_ylim(0, 1.02)
            ax.grid(alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="upper center", ncol=min(len(labels), 6), frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 0.92))
    path = run.path / CURVES_NAME
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
