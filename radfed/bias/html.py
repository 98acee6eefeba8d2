"""The bias report as one self-contained HTML page, from the layout of ``bias_report.json``."""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from radfed.bias.figures import curves_figure, forest_figure, forest_metrics, roc_figure
from radfed.bias.values import as_float, as_list, as_mapping
from radfed.errors import DataError

__all__ = ["render_html"]

_FORMAT = "radfed-bias-report"
_FORMAT_MAJOR = 2
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
tr.inconclusive td{background:#fff6d9}tr.warning td{background:#f3e3f7}
.role{display:inline-block;padding:.1em .6em;border-radius:.8em;background:#1f4e79;color:#fff;
font-size:.8em;vertical-align:middle}
.risk-low{background:#dcefdc}.risk-moderate{background:#fff1c2}.risk-high{background:#f7c6c6}
.none{padding:.6em 1em;background:#e8f3e8;border-left:4px solid #3a7d3a}
.alarm{padding:.6em 1em;background:#fde2e2;border-left:4px solid #b22}
.unsure{padding:.6em 1em;background:#fff1c2;border-left:4px solid #b8860b}
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
        DataError: the report is not a ``radfed-bias-report`` of format version 2.
    """
    _check_format(report)
    splits = as_mapping(report.get("splits"))
    body = [
        _header(report),
        _verdicts(report, splits),
        *(_split(str(name), as_mapping(split), report) for name, split in splits.items()),
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
    settings = as_mapping(report.get("settings"))
    k, margin = settings.get("min_cell_size"), settings.get("margin")
    confidence = as_float(settings.get("confidence"))
    level = f"{confidence:.0%}" if confidence is not None else "n/a"
    subgroups = ", ".join(str(s) for s in as_list(settings.get("subgroups"))) or "none"
    methods = as_mapping(report.get("methods"))
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
        "sites' statistics. A cell its site held back is <i>suppressed</i>: it held fewer "
        "than k cases (a site may use a larger k than the run's), or a sum or difference of "
        "it with other cells the site released, in this run or an earlier one, would have "
        "covered fewer than k cases (the site's disclosure control: a suppressed cell may "
        "hold many cases). Only that flag left the site; the cell "
        "shows no number and is left out of the pool, so a pooled cell may hold fewer cases "
        f"than the sites together. Intervals are {_e(level)} intervals, shown as "
        "value [low, high]; the method of each is listed below. A gap compares, for one metric "
        "within a site or the pool, the worst and the best group of an attribute, or one group "
        "and the rest of its site. Each gap gets one of three verdicts: <b>flagged</b> (the "
        f"difference is beyond chance and at least the margin {_e(margin)}), <b>within "
        "margin</b> (its interval lies inside &plusmn;margin: evidence that no gap of that size "
        "exists) or <b>inconclusive</b> (neither: too few cases to tell; the table says about "
        "how many cases per group would resolve it). Comparisons are screened for false "
        "discoveries (Benjamini-Hochberg, 5%, per family) and their intervals adjusted to "
        "match. A pooled gap names the sites that drive it; one that differs between sites "
        "(Cochran's Q) is <i>heterogeneous</i>, a property of those sites, not of the pool. "
        "Gaps on training cases get no verdict: one beyond the margin there is an "
        "<i>in-sample warning</i> about that group's data or labels. "
        "Each split's role says what kind of evidence it is: "
        "<i>internal</i> (the sites' own cases), <i>held-out site</i> (a site that did not "
        "train) or <i>sealed test</i>. The <i>design effect</i> of a cell is how much its "
        "patients' several images widen the intervals (1: one image per patient); "
        "<i>AUC exact</i> marks an AUC computed from the site's exact pair count rather than "
        "score histograms. n/a: undefined, not applicable, or (an AUC) too coarse to mean "
        "anything.</p>\n"
        f"<h3>Methods of the intervals</h3>\n<dl>{method_list or '<dd>none given</dd>'}</dl>"
        "</header>"
    )


def _verdicts(report: Mapping[str, Any], splits: Mapping[str, Any]) -> str:
    """The headline: how many gaps of each verdict, the flagged ones with their sites, the
    largest inconclusive ones, and the in-sample warnings apart. "No gap flagged" is never
    said alone while some gap is inconclusive."""
    margin = as_mapping(report.get("settings")).get("margin")
    gaps = [
        (str(name), as_mapping(split).get("role"), gap)
        for name, split in splits.items()
        for gap in map(as_mapping, as_list(as_mapping(split).get("gaps")))
    ]
    flagged = [g for g in gaps if g[2].get("verdict") == "flagged"]
    unsure = [g for g in gaps if g[2].get("verdict") == "inconclusive"]
    within = [g for g in gaps if g[2].get("verdict") == "within margin"]
    warnings = [g for g in gaps if g[2].get("verdict") == "in-sample warning"]
    counts = (
        f"{len(flagged)} flagged · {len(within)} within margin &plusmn;{_e(margin)} · "
        f"{len(unsure)} inconclusive"
    )
    head = f'<section id="verdicts"><h2>Verdicts</h2>\n<p>{counts}</p>\n'
    parts = [head]
    if flagged:
        parts.append(f'<p class="alarm">{len(flagged)} gap(s) flagged.</p>')
    elif unsure:
        parts.append(
            f'<p class="unsure">No gap is flagged, but {len(unsure)} gap(s) are inconclusive: '
            "too few cases to tell whether a gap of the margin exists. This is not evidence "
            "that there is no bias.</p>"
        )
    elif within:
        parts.append(
            f'<p class="none">Every gap is within the margin &plusmn;{_e(margin)}: no gap of '
            "that size, as far as the intervals show.</p>"
        )
    else:
        parts.append('<p class="muted">No gap could be compared in this report.</p>')
    headers = ["split", "role", *_GAP_HEADERS]
    if flagged:
        rows = [([_e(n), _e(r), *_gap_cells(g), _sites(g)], "flagged") for n, r, g in flagged]
        parts.append("<h3>Flagged gaps</h3>" + _table([*headers, "sites"], rows))
    if unsure:
        unsure.sort(key=lambda item: -abs(as_float(_diff(item[2])) or 0.0))
        rows = [
            ([_e(n), _e(r), *_gap_cells(g), _cases(g)], "inconclusive") for n, r, g in unsure[:10]
        ]
        title = "<h3>Largest inconclusive gaps</h3>"
        parts.append(title + _table([*headers, "cases per group to resolve"], rows))
    if warnings:
        rows = [
            ([_e(n), _e(r), *_gap_cells(g), _e(g.get("reason"))], "warning") for n, r, g in warnings
        ]
        parts.append(
            "<h3>In-sample warnings (training cases)</h3><p>A group that fails on the cases "
            "the model was fitted to: check its data and labels. Not a held-out verdict.</p>"
            + _table([*headers, "reason"], rows)
        )
    return "\n".join(parts) + "</section>"


_GAP_HEADERS = ["site", "attribute", "metric", "comparison", "group", "against"]
_GAP_HEADERS += ["difference [interval]", "ratio [interval]"]


def _diff(gap: Mapping[str, Any]) -> Any:
    return as_mapping(gap.get("difference")).get("value")


def _sites(gap: Mapping[str, Any]) -> str:
    """A pooled gap's attribution: the sites that drive it and whether it is heterogeneous."""
    attribution = as_mapping(gap.get("attribution"))
    if not attribution:
        return "this site"
    drivers = ", ".join(_e(s) for s in as_list(attribution.get("drivers"))) or "none alone"
    q = as_mapping(attribution.get("heterogeneity"))
    test = f" (Cochran's Q p = {_num(q.get('p_value'))})" if q else ""
    per_site = "; ".join(
        f"{_e(row.get('site'))}: {_side(row.get('first'))} vs {_side(row.get('second'))}, "
        f"difference {_estimate(row.get('difference'))}"
        for row in map(as_mapping, as_list(attribution.get("sites")))
    )
    if attribution.get("confounded_with_site") is True:
        kind = "<b>between sites</b>: no site holds both groups, so the gap compares sites"
    elif attribution.get("heterogeneous") is True:
        kind = "<b>heterogeneous</b> across sites (a property of the driving sites, not the pool)"
    else:
        kind = "consistent across sites"
    return f"driven by {drivers}; {kind}{test}<br><span class='muted'>{per_site}</span>"


def _deff(cell: Mapping[str, Any]) -> str:
    """A cell's design effects (several images per patient) and whether its AUC is exact."""
    parts = [f"{_e(m)} {_num(v)}" for m, v in as_mapping(cell.get("design_effect")).items()]
    if cell.get("exact_auc") is True:
        parts.append("AUC exact")
    return ", ".join(parts) or "n/a"


def _side(side: Any) -> str:
    side = as_mapping(side)
    return f"{_num(side.get('value'))} (n = {_num(side.get('n'))})" if side else "none"


def _cases(gap: Mapping[str, Any]) -> str:
    needed = as_mapping(gap.get("cases_needed"))
    if not needed:
        return "n/a"
    return ", ".join(f"{_e(group)} ~{_num(n)}" for group, n in needed.items())


def _split(name: str, split: Mapping[str, Any], report: Mapping[str, Any]) -> str:
    cells = [as_mapping(c) for c in as_list(split.get("cells"))]
    gaps = [as_mapping(g) for g in as_list(split.get("gaps"))]
    parts = [
        f'<section class="split"><h2>Split {_e(name)} '
        f'<span class="role">{_e(split.get("role", "role n/a"))}</span></h2>'
    ]
    metrics = forest_metrics(str(report.get("task")), cells)
    shown = [c for c in cells if not c.get("suppressed")]
    if metrics and shown:
        parts.append(_img(forest_figure(name, shown, metrics), f"forest plot of split {name}"))
        if len(shown) < len(cells):
            parts.append(
                f'<p class="muted">{len(cells) - len(shown)} suppressed cells (held back '
                "by their site's disclosure control, or groups of sex and age band a site does "
                "not have) are listed in the table below, not plotted.</p>"
            )
    elif cells:
        parts.append('<p class="muted">No subgroup holds a value to plot.</p>')
    names = list(dict.fromkeys(m for c in cells for m in as_mapping(c.get("metrics"))))
    rows = [
        (
            [
                _e(c.get("site")),
                _e(c.get("attribute")),
                _e(c.get("group")),
                "suppressed" if c.get("suppressed") else _num(c.get("n")),
                _num(c.get("positives")),
                *(_estimate(as_mapping(c.get("metrics")).get(m)) for m in names),
                _deff(c),
            ],
            "suppressed" if c.get("suppressed") else "",
        )
        for c in cells
    ]
    parts.append("<h3>Cells</h3>")
    headers = ["site", "attribute", "group", "n", "positives", *names, "design effect"]
    parts.append(_table(headers, rows) if rows else '<p class="muted">No cells.</p>')
    parts.append("<h3>Gaps</h3>")
    gap_rows = [
        (
            [*_gap_cells(g), _e(g.get("verdict")), _e(g.get("reason")), _cases(g)],
            _VERDICT_CSS.get(str(g.get("verdict")), ""),
        )
        for g in gaps
    ]
    headers = [*_GAP_HEADERS, "verdict", "reason", "cases per group to resolve"]
    parts.append(
        _table(headers, gap_rows)
        if gap_rows
        else '<p class="muted">No gap: no attribute has two groups holding a value.</p>'
    )
    return "\n".join(parts) + "</section>"


def _roc(report: Mapping[str, Any], splits: Mapping[str, Any]) -> str:
    roc = as_mapping(report.get("roc"))
    head = "<section><h2>ROC curves per site</h2>\n"
    if not roc:
        none = "No ROC curves in this report (classification only)."
        return f'{head}<p class="muted">{none}</p></section>'
    figures = [
        f"<h3>Split {_e(name)} {_role(splits, name)}</h3>\n"
        + _img(roc_figure(str(name), as_mapping(per_site)), f"ROC curves of split {name}")
        for name, per_site in roc.items()
    ]
    return head + "\n".join(figures) + "</section>"


def _curves(report: Mapping[str, Any], splits: Mapping[str, Any]) -> str:
    curves = as_mapping(report.get("curves"))
    head = "<section><h2>Per-site metrics over rounds</h2>\n"
    figures = []
    for name, per_site in curves.items():
        fig = curves_figure({str(name): as_mapping(per_site)})
        if fig is not None:
            figures.append(f"<h3>Split {_e(name)} {_role(splits, name)}</h3>\n")
            figures.append(_img(fig, f"metrics over rounds of split {name}"))
    if not figures:
        return f'{head}<p class="muted">No curves in this report.</p></section>'
    return head + "\n".join(figures) + "</section>"


def _composition(report: Mapping[str, Any]) -> str:
    rows = []
    for c in map(as_mapping, as_list(report.get("composition"))):
        groups = "<br>".join(
            f"{_e(attr)}: " + ", ".join(f"{_e(g)} {_num(n)}" for g, n in as_mapping(counts).items())
            for attr, counts in as_mapping(c.get("groups")).items()
        )
        hidden = "<br>".join(
            f"{_e(attr)}: " + ", ".join(_e(g) for g in as_list(names))
            for attr, names in as_mapping(c.get("suppressed_groups")).items()
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
    for c in map(as_mapping, as_list(report.get("confounders"))):
        by_group = ", ".join(
            f"{_e(g)} {_num(p)}" for g, p in as_mapping(c.get("prevalence_by_group")).items()
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


# ---------------------------------------------------------------- formatting


def _img(fig: Figure, alt: str) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=_DPI, metadata={"Software": None})
    data = base64.b64encode(buffer.getvalue()).decode("ascii")
    return f'<img alt="{_e(alt)}" src="data:image/png;base64,{data}">'


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


_VERDICT_CSS = {
    "flagged": "flagged",
    "inconclusive": "inconclusive",
    "in-sample warning": "warning",
}


def _gap_cells(gap: Mapping[str, Any]) -> list[str]:
    """Site, attribute, metric, comparison, its two sides, difference and ratio, as HTML."""
    sides = (
        ("worst", "best")
        if gap.get("comparison", "worst vs best") == "worst vs best"
        else ("group", "rest")
    )
    ends = []
    for end in (as_mapping(gap.get(sides[0])), as_mapping(gap.get(sides[1]))):
        ends.append(f"{_e(end.get('group'))}: {_num(end.get('value'))} (n = {_num(end.get('n'))})")
    ids = [_e(gap.get(key)) for key in ("site", "attribute", "metric", "comparison")]
    return [*ids, *ends, _estimate(gap.get("difference")), _estimate(gap.get("ratio"))]


def _estimate(est: Any) -> str:
    """``value [low, high]``, ``value`` without an interval, ``n/a`` without a value."""
    est = as_mapping(est)
    value, low, high = (as_float(est.get(key)) for key in ("value", "low", "high"))
    if value is None:
        return "n/a" if low is None or high is None else f"n/a [{low:.3f}, {high:.3f}]"
    if low is None or high is None:
        return f"{value:.3f}"
    return f"{value:.3f} [{low:.3f}, {high:.3f}]"


def _num(value: Any) -> str:
    """An integer as is, a float to 3 decimals, anything else (``null``, NaN) as ``n/a``."""
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    number = as_float(value)
    return "n/a" if number is None else f"{number:.3f}"


def _role(splits: Mapping[str, Any], name: Any) -> str:
    role = as_mapping(splits.get(name)).get("role")
    return f'<span class="role">{_e(role)}</span>' if role is not None else ""


def _e(value: Any) -> str:
    return "n/a" if value is None else html.escape(str(value))
