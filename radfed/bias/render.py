"""The bias report as one self-contained HTML page, from the layout of ``bias_report.json``."""

from __future__ import annotations

import base64
import html
import io
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from radfed.errors import DataError

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["render_html"]

_FORMAT = "radfed-bias-report"
_FORMAT_MAJOR = 1
#: The ``site`` of pooled cells, curves and ROC (docs/bias_report.md).
_POOLED = "ALL"
#: Metrics of the forest plots per task, in panel order; those the cells hold are drawn.
_FOREST_METRICS: dict[str, tuple[str, ...]] = {
    "classification": ("auc", "sensitivity", "specificity"),
    "detection": ("ap50", "froc_mean"),
    "segmentation": ("dice_mean",),
}
_DPI = 90
_RISKS = ("low", "moderate", "high")
_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Helvetica,Arial,sans-serif;margin:2em;
max-width:80em;color:#222;line-height:1.4}
h1{font-size:1.6em}h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:2em}
table{border-collapse:collapse;margin:.8em 0;font-size:.85em;display:block;overflow-x:auto}
th,td{border:1px solid #ccc;padding:.25em .5em;text-align:left;vertical-align:top}
th{background:#f2f2f2}
tr.flagged td{background:#fde2e2;font-weight:600}tr.suppressed td{color:#888}
.role{display:inline-block;padding:.1em .6em;border-radius:.8em;background:#1f4e79;color:#fff;
font-size:.8em;vertical-align:middle}
.risk-low{background:#dcefdc}.risk-moderate{background:#fff1c2}.risk-high{background:#f7c6c6}
.none{padding:.6em 1em;background:#e8f3e8;border-left:4px solid #3a7d3a}
.muted{color:#666}img{max-width:100%;height:auto;display:block;margin:.6em 0}
dt{font-weight:600}dd{margin:0 0 .4em 1.5em}
"""


def render_html(report: Mapping[str, Any], out: Path) -> Path:
    """Write the bias report as one HTML page that needs nothing but a browser.

    Every string of the report is escaped; figures are PNG embedded as base64; missing
    or empty sections are said so rather than failing.

    Args:
        report: the parsed ``bias_report.json`` (layout in docs/bias_report.md).
        out: the HTML file to write; its folder is created.

    Returns:
        ``out``.

    Raises:
        DataError: the report is not a ``radfed-bias-report`` of format version 1.
    """
    _check_format(report)
    splits = _mapping(report.get("splits"))
    body = [
        _header(report),
        _flags(report, splits),
        *(_split(str(name), _mapping(split), report) for name, split in splits.items()),
        _roc(report, splits),
        _curves(report, splits),
        _composition(report),
        _confounders(report),
    ]
    title = f"radfed bias report: {report.get('task', 'n/a')}"
    page = (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{_e(title)}</title><style>{_CSS}</style></head>\n<body>\n"
        + "\n".join(part for part in body if part)
        + "\n</body></html>\n"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(page, encoding="utf-8")
    return out


def _check_format(report: Mapping[str, Any]) -> None:
    fmt, version = report.get("format"), report.get("format_version")
    try:
        major = int(str(version).split(".")[0])
    except ValueError:
        major = None
    if fmt != _FORMAT or major != _FORMAT_MAJOR:
        msg = (
            f"cannot render a bias report of format {fmt!r} version {version!r}; this radfed "
            f"reads format {_FORMAT!r} version {_FORMAT_MAJOR}: re-render it with the radfed "
            "version that wrote it"
        )
        raise DataError(msg)


# ---------------------------------------------------------------- sections


def _header(report: Mapping[str, Any]) -> str:
    settings = _mapping(report.get("settings"))
    k, margin = settings.get("min_cell_size"), settings.get("margin")
    confidence = _float(settings.get("confidence"))
    level = f"{confidence:.0%}" if confidence is not None else "n/a"
    subgroups = ", ".join(str(s) for s in _list(settings.get("subgroups"))) or "none"
    methods = _mapping(report.get("methods"))
    method_list = "".join(f"<dt>{_e(m)}</dt><dd>{_e(t)}</dd>" for m, t in methods.items())
    return (
        f"<header><h1>radfed bias report</h1>\n<p><b>Task</b> {_e(report.get('task'))} · "
        f"<b>round</b> {_e(report.get('round'))} of {_e(report.get('rounds'))} · "
        f"<b>radfed</b> {_e(report.get('radfed_version'))}</p>\n"
        f"<p><b>Minimum cell size k</b> {_e(k)} · <b>margin</b> {_e(margin)} · "
        f"<b>confidence</b> {_e(level)} · <b>subgroups</b> {_e(subgroups)}</p>\n"
        "<h2>How to read this</h2>\n<p>Every number here was computed by the server from "
        "statistics the sites summed and sent (merged statistics); no per-case value left a "
        "site. A cell is one (site, attribute, group); <code>ALL</code> is the pool of the "
        "sites' statistics. A cell that held fewer than k cases at its site (a site may use a "
        "larger k than the run's) is <i>suppressed</i>: only that flag left the site, the cell "
        "shows no number and is left out of the pool, so a pooled cell may hold fewer cases "
        f"than the sites together. Intervals are {_e(level)} intervals, shown as "
        "value [low, high]; the method of each is listed below. A gap compares the worst and "
        "best group of one attribute for one metric within a site or the pool; it is "
        "<b>flagged</b> when the interval of the difference excludes 0 and |difference| is at "
        f"least the margin {_e(margin)}. Each split's role says what kind of evidence it is: "
        "<i>internal</i> (the sites' own cases), <i>held-out site</i> (a site that did not "
        "train) or <i>sealed test</i>. n/a: undefined or not applicable.</p>\n"
        f"<h3>Methods of the intervals</h3>\n<dl>{method_list or '<dd>none given</dd>'}</dl>"
        "</header>"
    )


def _flags(report: Mapping[str, Any], splits: Mapping[str, Any]) -> str:
    margin = _mapping(report.get("settings")).get("margin")
    criterion = (
        "a gap is flagged when the interval of the difference excludes 0 and |difference| "
        f"&ge; margin {_e(margin)}"
    )
    rows = []
    for name, split in splits.items():
        role = _mapping(split).get("role")
        for gap in map(_mapping, _list(_mapping(split).get("gaps"))):
            if gap.get("flagged") is True:
                rows.append(([_e(name), _e(role), *_gap_cells(gap)], "flagged"))
    head = '<section id="flags"><h2>Flagged gaps</h2>\n'
    if not rows:
        return f'{head}<p class="none">No gap is flagged ({criterion}).</p></section>'
    headers = ["split", "role", "site", "attribute", "metric", "worst group", "best group"]
    table = _table([*headers, "difference [interval]", "ratio [interval]"], rows)
    return f"{head}<p>{len(rows)} gap(s) flagged; {criterion}.</p>\n{table}</section>"


def _split(name: str, split: Mapping[str, Any], report: Mapping[str, Any]) -> str:
    cells = [_mapping(c) for c in _list(split.get("cells"))]
    gaps = [_mapping(g) for g in _list(split.get("gaps"))]
    parts = [
        f'<section class="split"><h2>Split {_e(name)} '
        f'<span class="role">{_e(split.get("role", "role n/a"))}</span></h2>'
    ]
    metrics = _forest_metrics(str(report.get("task")), cells)
    shown = [c for c in cells if not c.get("suppressed")]
    if metrics and shown:
        parts.append(_img(_forest_figure(name, shown, metrics), f"forest plot of split {name}"))
        if len(shown) < len(cells):
            parts.append(
                f'<p class="muted">{len(cells) - len(shown)} suppressed cells (fewer than k '
                "cases, or groups of sex and age band a site does not have) are listed in the "
                "table below, not plotted.</p>"
            )
    elif cells:
        parts.append('<p class="muted">No subgroup holds a value to plot.</p>')
    names = list(dict.fromkeys(m for c in cells for m in _mapping(c.get("metrics"))))
    rows = [
        (
            [
                _e(c.get("site")),
                _e(c.get("attribute")),
                _e(c.get("group")),
                "suppressed" if c.get("suppressed") else _num(c.get("n")),
                _num(c.get("positives")),
                *(_estimate(_mapping(c.get("metrics")).get(m)) for m in names),
            ],
            "suppressed" if c.get("suppressed") else "",
        )
        for c in cells
    ]
    parts.append("<h3>Cells</h3>")
    headers = ["site", "attribute", "group", "n", "positives", *names]
    parts.append(_table(headers, rows) if rows else '<p class="muted">No cells.</p>')
    parts.append("<h3>Gaps</h3>")
    gap_rows = [
        (
            [*_gap_cells(g), "yes" if g.get("flagged") is True else "no", _e(g.get("reason"))],
            "flagged" if g.get("flagged") is True else "",
        )
        for g in gaps
    ]
    headers = ["site", "attribute", "metric", "worst group", "best group", "difference"]
    headers += ["ratio", "flagged", "reason"]
    parts.append(
        _table(headers, gap_rows)
        if gap_rows
        else '<p class="muted">No gap: no attribute has two groups holding a value.</p>'
    )
    return "\n".join(parts) + "</section>"


def _roc(report: Mapping[str, Any], splits: Mapping[str, Any]) -> str:
    roc = _mapping(report.get("roc"))
    head = "<section><h2>ROC curves per site</h2>\n"
    if not roc:
        none = "No ROC curves in this report (classification only)."
        return f'{head}<p class="muted">{none}</p></section>'
    figures = [
        f"<h3>Split {_e(name)} {_role(splits, name)}</h3>\n"
        + _img(_roc_figure(str(name), _mapping(per_site)), f"ROC curves of split {name}")
        for name, per_site in roc.items()
    ]
    return head + "\n".join(figures) + "</section>"


def _curves(report: Mapping[str, Any], splits: Mapping[str, Any]) -> str:
    curves = _mapping(report.get("curves"))
    head = "<section><h2>Per-site metrics over rounds</h2>\n"
    figures = []
    for name, per_site in curves.items():
        fig = _curves_figure(str(name), _mapping(per_site))
        if fig is not None:
            figures.append(f"<h3>Split {_e(name)} {_role(splits, name)}</h3>\n")
            figures.append(_img(fig, f"metrics over rounds of split {name}"))
    if not figures:
        return f'{head}<p class="muted">No curves in this report.</p></section>'
    return head + "\n".join(figures) + "</section>"


def _composition(report: Mapping[str, Any]) -> str:
    rows = []
    for c in map(_mapping, _list(report.get("composition"))):
        groups = "<br>".join(
            f"{_e(attr)}: " + ", ".join(f"{_e(g)} {_num(n)}" for g, n in _mapping(counts).items())
            for attr, counts in _mapping(c.get("groups")).items()
        )
        hidden = "<br>".join(
            f"{_e(attr)}: " + ", ".join(_e(g) for g in _list(names))
            for attr, names in _mapping(c.get("suppressed_groups")).items()
        )
        numbers = [_num(c.get(key)) for key in ("n", "positives", "prevalence")]
        rows.append(([_e(c.get("site")), _e(c.get("split")), *numbers, groups, hidden], ""))
    head = "<section><h2>Composition per site and split</h2>\n"
    if not rows:
        return f'{head}<p class="muted">No composition in this report.</p></section>'
    headers = ["site", "split", "n", "positives", "prevalence", "groups", "suppressed groups"]
    return head + _table(headers, rows) + "</section>"


def _confounders(report: Mapping[str, Any]) -> str:
    rows = []
    for c in map(_mapping, _list(report.get("confounders"))):
        by_group = ", ".join(
            f"{_e(g)} {_num(p)}" for g, p in _mapping(c.get("prevalence_by_group")).items()
        )
        risk = c.get("risk")
        risk_class = f"risk-{risk}" if risk in _RISKS else ""
        cells = [_e(c.get("site")), _e(c.get("attribute")), _num(c.get("cramers_v")), by_group]
        rows.append(([*cells, f'<span class="{risk_class}">{_e(risk)}</span>'], risk_class))
    head = (
        "<section><h2>Confounder screen</h2>\n<p>How strongly each attribute predicts the "
        "label in a site's training cases (Cramér's V: 0 independent, 1 the group decides "
        "the label); risk is low below 0.1, moderate below 0.3, high above.</p>\n"
    )
    if not rows:
        return f'{head}<p class="muted">No confounder screen in this report.</p></section>'
    headers = ["site", "attribute", "Cramér's V", "prevalence by group", "risk"]
    return head + _table(headers, rows) + "</section>"


# ---------------------------------------------------------------- figures


def _forest_metrics(task: str, cells: Sequence[Mapping[str, Any]]) -> list[str]:
    """The task's forest-plot metrics that some cell holds a value of (else its first 3)."""
    held = [
        m
        for c in cells
        if not c.get("suppressed")
        for m, est in _mapping(c.get("metrics")).items()
        if _float(_mapping(est).get("value")) is not None
    ]
    present = list(dict.fromkeys(held))
    return [m for m in _FOREST_METRICS.get(task, ()) if m in present] or present[:3]


def _forest_figure(split: str, cells: Sequence[Mapping[str, Any]], metrics: list[str]) -> Figure:
    from matplotlib.figure import Figure

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
            est = _mapping(_mapping(cell.get("metrics")).get(metric))
            value, low, high = (_float(est.get(key)) for key in ("value", "low", "high"))
            if value is None:
                ax.text(0.02, row, "n/a", transform=text, va="center", fontsize=7, color="grey")
                continue
            values += [v for v in (value, low, high) if v is not None]
            xerr = None
            if low is not None and high is not None:
                xerr = [[max(0.0, value - low)], [max(0.0, high - value)]]
            pooled = cell.get("site") == _POOLED
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


def _roc_figure(split: str, per_site: Mapping[str, Any]) -> Figure:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4.6, 4.2))
    ax = fig.subplots()
    ax.plot([0, 1], [0, 1], color="#bbbbbb", linewidth=0.8, linestyle=":")
    for site, curve in _pool_last(per_site):
        fpr, tpr = _floats(_mapping(curve).get("fpr")), _floats(_mapping(curve).get("tpr"))
        if not fpr or len(fpr) != len(tpr):
            continue
        auc = _float(_mapping(curve).get("auc"))
        label = _plain(f"{site} (AUC {auc:.3f})" if auc is not None else f"{site} (AUC n/a)")
        ax.plot(fpr, tpr, label=label, **_line_style(site))
    ax.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="1 - specificity", ylabel="sensitivity")
    ax.set_title(_plain(f"{split}: ROC per site"), fontsize=9)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def _curves_figure(split: str, per_site: Mapping[str, Any]) -> Figure | None:
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    metrics = list(dict.fromkeys(m for series in per_site.values() for m in _mapping(series)))
    if not metrics:
        return None
    fig = Figure(figsize=(3.2 * len(metrics), 2.9))
    axes = fig.subplots(1, len(metrics), squeeze=False)[0]
    legend: dict[str, Any] = {}
    for ax, metric in zip(axes, metrics, strict=True):
        values = []
        for site, series in _pool_last(per_site):
            points = [
                (r, v)
                for r, v in (_point(p) for p in _list(_mapping(series).get(metric)))
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
    fig.tight_layout(rect=(0, 0, 1, 0.86))
    return fig


def _pool_last(per_site: Mapping[str, Any]) -> list[tuple[str, Any]]:
    return sorted(per_site.items(), key=lambda item: item[0] == _POOLED)


def _line_style(site: str) -> dict[str, Any]:
    """Sites in the colour cycle, the pool black, dashed and thicker."""
    if site == _POOLED:
        return {"color": "black", "linestyle": "--", "linewidth": 2}
    return {"linewidth": 1.2}


def _img(fig: Figure, alt: str) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=_DPI, metadata={"Software": None})
    data = base64.b64encode(buffer.getvalue()).decode("ascii")
    return f'<img alt="{_e(alt)}" src="data:image/png;base64,{data}">'


# ---------------------------------------------------------------- formatting


def _table(headers: Sequence[str], rows: Iterable[tuple[Sequence[str], str]]) -> str:
    """An HTML table; ``headers`` are escaped here, row cells must be HTML already."""
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    body = "".join(
        (f'<tr class="{css}">' if css else "<tr>")
        + "".join(f"<td>{cell}</td>" for cell in cells)
        + "</tr>\n"
        for cells, css in rows
    )
    return f"<table><thead><tr>{head}</tr></thead>\n<tbody>{body}</tbody></table>"


def _gap_cells(gap: Mapping[str, Any]) -> list[str]:
    """Site, attribute, metric, worst, best, difference and ratio of a gap, as HTML."""
    ends = []
    for end in (_mapping(gap.get("worst")), _mapping(gap.get("best"))):
        ends.append(f"{_e(end.get('group'))}: {_num(end.get('value'))} (n = {_num(end.get('n'))})")
    ids = [_e(gap.get(key)) for key in ("site", "attribute", "metric")]
    return [*ids, *ends, _estimate(gap.get("difference")), _estimate(gap.get("ratio"))]


def _estimate(est: Any) -> str:
    """``value [low, high]``, ``value`` without an interval, ``n/a`` without a value."""
    est = _mapping(est)
    value, low, high = (_float(est.get(key)) for key in ("value", "low", "high"))
    if value is None:
        return "n/a"
    if low is None or high is None:
        return f"{value:.3f}"
    return f"{value:.3f} [{low:.3f}, {high:.3f}]"


def _num(value: Any) -> str:
    """An integer as is, a float to 3 decimals, anything else (``null``, NaN) as ``n/a``."""
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    number = _float(value)
    return "n/a" if number is None else f"{number:.3f}"


def _role(splits: Mapping[str, Any], name: Any) -> str:
    role = _mapping(splits.get(name)).get("role")
    return f'<span class="role">{_e(role)}</span>' if role is not None else ""


def _e(value: Any) -> str:
    return "n/a" if value is None else html.escape(str(value))


def _plain(text: str) -> str:
    """Text matplotlib shows as is: no mathtext (``$``), no hidden ``_`` legend labels."""
    text = text.replace("$", r"\$")
    return f" {text}" if text.startswith("_") else text


def _rates(values: list[float]) -> bool:
    """Whether the values are all in [0, 1], so that an axis can span exactly that."""
    return bool(values) and min(values) >= 0.0 and max(values) <= 1.0


def _float(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def _floats(values: Any) -> list[float]:
    numbers = [_float(v) for v in _list(values)]
    return [v for v in numbers if v is not None] if None not in numbers else []


def _point(point: Any) -> tuple[float | None, float | None]:
    pair = _list(point)
    return (_float(pair[0]), _float(pair[1])) if len(pair) == 2 else (None, None)


def _mapping(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _list(value: Any) -> list[Any]:
    return list(value) if isinstance(value, list | tuple) else []
