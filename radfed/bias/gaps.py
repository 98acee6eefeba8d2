"""Subgroup gaps and their verdicts: flagged, within margin, or inconclusive.

For each split, site (and the pool) and attribute, groups are compared on each compared
metric in two ways:

- **worst vs best**: the lowest against the highest group. The pair is chosen by its
  values, so its p-value is multiplied by the number of pairs that could have been chosen
  (g(g-1)/2 for g groups: Bonferroni within the attribute).
- **one vs rest**: each group against the rest of its site (the other released groups of
  the attribute, pooled), for attributes of three or more groups (with two, it is the same
  comparison as worst vs best). These have power where one small group fails.

Each kind of comparison forms a family per split; the run's ``primary-subgroups`` form
families of their own, and in-sample cells (training cases) families apart. Each
comparison is tested for "the gap is at most the margin" (|difference| <= margin; the
margin is a share of the reference value for HD95, in pixels), its p-value from inverting
the interval of the difference so that test and interval always agree. Within a family
the p-values (times the selection factor) are screened with Benjamini-Hochberg at 5%: on
data without a gap beyond the margin, any flag at all in a family appears with
probability at most 5% (the false discovery rate equals the family-wise rate under the
complete null); with real gaps, a small share of the flags may be false, in exchange for
power. Intervals are reported at the false-coverage-rate-adjusted level of Benjamini and
Yekutieli (2005), ``1 - 0.05 R / (m c)`` (R rejections of m, selection factor c), so that
a flag and its interval agree. A comparison without an interval of positive width (an AUC
of 1, a class of one case) is not tested.

Verdicts (held-out cells):

- **flagged**: the gap exceeds the margin beyond chance (its adjusted interval lies
  wholly beyond ±margin);
- **within margin**: the adjusted interval lies inside (-margin, margin), and for worst vs
  best of three or more groups so does every pair's: evidence, as in equivalence testing,
  that no gap of the margin's size exists;
- **inconclusive**: neither: too few cases to tell. ``cases_needed`` then says about how
  many cases per group would resolve a gap of the observed size with 80% power (variance
  taken as proportional to 1/n at the same composition; a lower bound).

Training cases get no verdict: a gap whose interval lies beyond the margin on the very
cases the model was fitted to is an ``in-sample warning`` (a group's data or labels may be
wrong), reported apart from the held-out verdicts.

A pooled gap is attributed to its sites: each site's two sides and its own difference,
Cochran's Q across the sites, the Mantel-Haenszel difference within sites, and the pooled
difference without each site. A pooled gap that no site holds both sides of, or that lies
outside the interval of the within-site difference, compares sites rather than groups
(Simpson's paradox): it is ``confounded_with_site`` and never flagged.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from scipy import stats as st

from radfed.bias.estimates import Estimate, Metric, compare, estimates, interval
from radfed.metrics.intervals import Interval, z_value
from radfed.tasks import SplitStats

__all__ = [
    "FALSE_DISCOVERY_RATE",
    "HETEROGENEITY_LEVEL",
    "GroupCell",
    "Verdict",
    "judge",
    "summarise",
]

#: The false discovery rate of each family's screen (and 1 - the level of every interval).
FALSE_DISCOVERY_RATE = 0.05
#: Cochran's Q below this p-value calls a pooled gap heterogeneous across sites (Q has low
#: power with few sites; 0.10 is the usual level in meta-analysis).
HETEROGENEITY_LEVEL = 0.10
#: The level of each site's own interval when a pooled gap is attributed.
_SITE_CONFIDENCE = 0.95
WORST_VS_BEST = "worst vs best"
ONE_VS_REST = "one vs rest"
#: The name of the other groups of a site in a one-vs-rest comparison.
REST = "rest"
#: Metrics not on [0, 1], whose margin is a share of the reference group's value.
_RELATIVE_MARGIN = frozenset({"hd95_mean"})
#: The power ``cases_needed`` plans for.
_POWER = 0.8


class Verdict:
    """The verdicts of a gap (strings in the JSON)."""

    FLAGGED = "flagged"
    WITHIN_MARGIN = "within margin"
    INCONCLUSIVE = "inconclusive"
    IN_SAMPLE_WARNING = "in-sample warning"
    IN_SAMPLE = "in-sample"

    HELD_OUT = (FLAGGED, WITHIN_MARGIN, INCONCLUSIVE)


@dataclass
class GroupCell:
    """One (site or pool, attribute, group) cell of a split with its metrics."""

    site: str
    attribute: str
    group: str
    stats: SplitStats
    positives: int
    metrics: dict[str, Metric] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.metrics and not self.stats.suppressed:
            self.metrics = estimates(self.stats)

    @property
    def suppressed(self) -> bool:
        return bool(self.stats.suppressed)


@dataclass(frozen=True)
class _Side:
    group: str
    value: float
    n: int
    estimate: Estimate


@dataclass
class _Comparison:
    site: str
    attribute: str
    metric: str
    kind: str
    first: _Side
    second: _Side
    pairs: int  # how many pairs the comparison was chosen from (selection factor)
    family: str
    margin: float
    members: tuple[_Side, ...] = ()  # every valued group (worst vs best of 3 or more)
    p_value: float | None = None
    level: float = 1 - FALSE_DISCOVERY_RATE
    discovered: bool = False


Merge = Callable[[Sequence[SplitStats]], SplitStats]


def judge(
    cells: Sequence[GroupCell],
    *,
    merge: Merge,
    margin: float,
    primary: Sequence[str] = (),
    in_sample: Collection[str] = frozenset(),
    pooled: str = "ALL",
    outside_pool: Collection[str] = frozenset(),
) -> list[dict[str, Any]]:
    """The gaps of one split with their verdicts (JSON-ready; docs/bias_report.md).

    Args:
        cells: the split's cells, per site and pooled (``all`` cells are skipped).
        merge: pools statistics of disjoint groups (the rest of a site).
        margin: the smallest difference worth flagging (``bias-margin``).
        primary: the attributes that form families of their own.
        in_sample: the sites (and the pool) whose cells are training cases: warnings
            only, no verdicts, in families of their own.
        pooled: the site name of the pool.
        outside_pool: sites whose cells the pool leaves out (a held-out site).
    """
    comparisons = _comparisons(cells, merge, primary, in_sample, margin)
    families: dict[str, list[_Comparison]] = defaultdict(list)
    for comparison in comparisons:
        first, second = comparison.first.estimate, comparison.second.estimate
        comparison.p_value = _p_value(first, second, comparison.margin)
        families[comparison.family].append(comparison)
    sizes = {name: _screen(members) for name, members in families.items()}
    sites = sorted({cell.site for cell in cells} - {pooled, *outside_pool})
    out = []
    for c in comparisons:
        own = c.site in in_sample
        gap = _gap_json(c, in_sample=own, family_size=sizes[c.family])
        if c.site == pooled and not own:
            gap["attribution"] = attribution = _attribute(
                c, cells, flagged=gap["flagged"], sites=sites, merge=merge
            )
            if gap["flagged"] and attribution["confounded_with_site"]:
                gap.update(
                    verdict=Verdict.INCONCLUSIVE,
                    flagged=False,
                    reason=(
                        "the pooled difference reflects differences between sites (confounded "
                        "with site): within the sites that hold both groups it is "
                        "not shown; see attribution"
                    ),
                    cases_needed=None,
                )
        out.append(gap)
    return out


def _comparisons(
    cells: Sequence[GroupCell],
    merge: Merge,
    primary: Sequence[str],
    in_sample: Collection[str],
    margin: float,
) -> list[_Comparison]:
    groups: dict[tuple[str, str], list[GroupCell]] = defaultdict(list)
    for cell in cells:
        if cell.attribute != "all" and not cell.suppressed and cell.stats.n > 0:
            groups[(cell.site, cell.attribute)].append(cell)
    out: list[_Comparison] = []
    for (site, attribute), members in groups.items():
        names = [n for n, m in members[0].metrics.items() if m.compared]
        for name in names:
            valued = [(_value(c.metrics[name].estimate), c) for c in members]
            ranked = [(v, c) for v, c in valued if v is not None]
            if len(ranked) < 2:
                continue
            better = members[0].metrics[name].higher_is_better
            ranked.sort(key=lambda item: (item[0], item[1].group), reverse=not better)
            family_of = "primary" if attribute in primary else "secondary"
            if site in in_sample:
                family_of += ", in-sample"
            g = len(ranked)
            (wv, worst), (bv, best) = ranked[0], ranked[-1]
            own_margin = metric_margin(name, margin, bv)
            out.append(
                _Comparison(
                    site,
                    attribute,
                    name,
                    WORST_VS_BEST,
                    _side(worst, name, wv),
                    _side(best, name, bv),
                    pairs=g * (g - 1) // 2,
                    family=f"{WORST_VS_BEST}, {family_of}",
                    margin=own_margin,
                    members=tuple(_side(c, name, v) for v, c in ranked),
                )
            )
            if g < 3:
                continue
            for value, cell in sorted(ranked, key=lambda item: item[1].group):
                rest = merge([c.stats for c in members if c is not cell])
                rest_metric = estimates(rest)[name]
                rest_value = _value(rest_metric.estimate)
                if rest_value is None:
                    continue
                rest_side = _Side(REST, rest_value, rest.n, rest_metric.estimate)
                out.append(
                    _Comparison(
                        site,
                        attribute,
                        name,
                        ONE_VS_REST,
                        _side(cell, name, value),
                        rest_side,
                        pairs=1,
                        family=f"{ONE_VS_REST}, {family_of}",
                        margin=metric_margin(name, margin, rest_value),
                    )
                )
    return out


def _side(cell: GroupCell, metric: str, value: float) -> _Side:
    return _Side(cell.group, value, cell.stats.n, cell.metrics[metric].estimate)


def _value(estimate: Estimate) -> float | None:
    return interval(estimate, 1 - FALSE_DISCOVERY_RATE).value


def _difference(first: Estimate, second: Estimate, confidence: float) -> Interval:
    return compare(first, second, confidence)[0]


def _beyond(fit: Interval, margin: float) -> bool:
    """Whether an interval lies wholly beyond ±margin (beyond 0 when the margin is 0)."""
    return fit.low is not None and fit.high is not None and (fit.low > margin or fit.high < -margin)


def _excludes_zero(fit: Interval) -> bool:
    return _beyond(fit, 0.0)


def _has_interval(fit: Interval) -> bool:
    """An interval of positive width: a zero-width one (a group without a variance: an
    AUC of 1, a class of one case, a histogram of one bin) supports no test."""
    return (
        fit.value is not None
        and fit.low is not None
        and fit.high is not None
        and fit.high - fit.low > 1e-12
    )


def _p_value(first: Estimate, second: Estimate, margin: float = 0.0) -> float | None:
    """The p-value of "the gap is at most the margin" (|difference| <= margin; "no
    difference" for margin 0), by inverting the interval of the difference: the largest
    ``alpha`` whose ``1 - alpha`` interval still reaches into [-margin, margin]. None when
    the difference has no interval of positive width."""
    fit = _difference(first, second, 0.5)
    if not _has_interval(fit):
        return None
    if not _beyond(fit, margin):  # p >= 0.5: bisect on [0.5, 1)
        low, high = 0.5, 1.0 - 1e-9
        if not _beyond(_difference(first, second, 1 - high), margin):
            return 1.0
    else:
        low, high = 1e-15, 0.5
        if _beyond(_difference(first, second, 1 - low), margin):
            return low
    for _ in range(80):  # log-scale bisection; the interval shrinks as alpha grows
        middle = math.sqrt(low * high)
        if _beyond(_difference(first, second, 1 - middle), margin):
            high = middle
        else:
            low = middle
        if high / low < 1.0005:
            break
    return high


def metric_margin(metric: str, margin: float, reference: float) -> float:
    """The margin of a metric's gaps: ``bias-margin`` for metrics on [0, 1]; for HD95 (in
    pixels) that share of the reference group's value."""
    return margin * abs(reference) if metric in _RELATIVE_MARGIN else margin


def _screen(members: list[_Comparison]) -> int:
    """Benjamini-Hochberg at ``FALSE_DISCOVERY_RATE`` over a family; sets each
    comparison's discovery and interval level (FCR-adjusted); returns the family size."""
    tested = sorted(
        (c for c in members if c.p_value is not None),
        key=lambda c: min(1.0, c.p_value * c.pairs),  # type: ignore[operator]
    )
    m = len(tested)
    found = 0
    for rank, c in enumerate(tested, start=1):
        assert c.p_value is not None
        if min(1.0, c.p_value * c.pairs) <= FALSE_DISCOVERY_RATE * rank / m:
            found = rank
    for rank, c in enumerate(tested, start=1):
        c.discovered = rank <= found
        c.level = 1 - FALSE_DISCOVERY_RATE * max(found, 1) / (m * c.pairs)
    return m


def _gap_json(c: _Comparison, *, in_sample: bool, family_size: int) -> dict[str, Any]:
    difference, ratio = compare(c.first.estimate, c.second.estimate, c.level)
    verdict, reason = _verdict(c, difference, in_sample)
    first, second = ("worst", "best") if c.kind == WORST_VS_BEST else ("group", "rest")
    gap: dict[str, Any] = {
        "site": c.site,
        "attribute": c.attribute,
        "metric": c.metric,
        "comparison": c.kind,
        first: {"group": c.first.group, "value": _round(c.first.value), "n": c.first.n},
        second: {"group": c.second.group, "value": _round(c.second.value), "n": c.second.n},
        "difference": _clean(difference),
        "ratio": _clean(ratio),
        "p_value": None if c.p_value is None else float(f"{c.p_value:.3g}"),
        "margin": _round(c.margin),
        "family": c.family,
        "comparisons": family_size,
        "confidence": round(c.level, 8),
        "verdict": verdict,
        "flagged": verdict == Verdict.FLAGGED,
        "reason": reason,
        "cases_needed": None,
    }
    if verdict == Verdict.INCONCLUSIVE:
        gap["cases_needed"] = _cases_needed(c, difference)
    return gap


def _verdict(c: _Comparison, difference: Interval, in_sample: bool) -> tuple[str, str]:
    margin = c.margin
    value, low, high = difference.value, difference.low, difference.high
    if in_sample:
        if _beyond(difference, margin):
            return Verdict.IN_SAMPLE_WARNING, (
                f"on its own training cases the group differs by more than the margin "
                f"{margin:g} beyond chance: check this group's data and labels"
            )
        return Verdict.IN_SAMPLE, "training cases (in-sample): no verdict"
    if value is None or low is None or high is None or c.p_value is None:
        return Verdict.INCONCLUSIVE, (
            "no interval for this difference (a metric without one, or a group without a "
            "variance): a gap cannot be ruled out"
        )
    if c.discovered:
        return Verdict.FLAGGED, (
            f"the gap exceeds the margin {margin:g} beyond chance (false discovery rate "
            f"{FALSE_DISCOVERY_RATE:g} over {c.family})"
        )
    if -margin < low and high < margin:
        hidden = _pair_beyond_margin(c)
        if hidden is None:
            return Verdict.WITHIN_MARGIN, f"the interval of the difference lies inside ±{margin:g}"
        return Verdict.INCONCLUSIVE, (
            f"the extreme groups agree within ±{margin:g}, but {hidden} cannot be shown to"
        )
    return Verdict.INCONCLUSIVE, (
        f"too few cases: the interval of the difference reaches both inside and past ±{margin:g}"
    )


def _pair_beyond_margin(c: _Comparison) -> str | None:
    """For worst vs best of three or more groups, "within margin" holds for every pair,
    not only the extremes (a small group between two large ones is otherwise never
    tested): the first pair whose interval, at the comparison's level, is not inside
    ±margin, or None."""
    for i, a in enumerate(c.members):
        for b in c.members[i + 1 :]:
            fit = _difference(a.estimate, b.estimate, c.level)
            if not (_has_interval(fit) and -c.margin < fit.low < fit.high < c.margin):  # type: ignore[operator]
                return f"{a.group} against {b.group}"
    return None


def _cases_needed(c: _Comparison, difference: Interval) -> dict[str, int] | None:
    """About how many cases per group would resolve a gap of the observed size with 80%
    power: flag it (when larger than the margin) or show it within the margin (when
    smaller), the variance shrinking as 1/n at the same composition and level. A lower
    bound: the observed largest gaps overstate the true ones, and the tie part of a
    histogram AUC's interval does not shrink with n."""
    value, low, high = difference.value, difference.low, difference.high
    if value is None or low is None or high is None:
        return None
    size, margin = abs(value), c.margin
    half = (high - value) if value <= 0 else (value - low)  # the side towards the margin
    if size < margin:
        half = max(high - value, value - low)
    distance = abs(size - margin)
    if distance <= 0 or half <= 0:
        return None
    z = z_value(c.level)
    target = distance * z / (z + z_value(2 * _POWER - 1))  # half-width for 80% power
    factor = max(1.0, (half / target) ** 2)
    return {
        c.first.group: math.ceil(c.first.n * factor),
        c.second.group: math.ceil(c.second.n * factor),
    }


def _attribute(
    c: _Comparison,
    cells: Sequence[GroupCell],
    *,
    flagged: bool,
    sites: Sequence[str],
    merge: Merge,
) -> dict[str, Any]:
    """Which sites a pooled gap comes from, and whether it is a gap between sites.

    Per site: both sides' values side by side and, where the site holds both, its own
    difference (95%); Cochran's Q across those sites and their Mantel-Haenszel pooled
    difference (the gap *within* sites, stratified by site); and the pooled difference
    without each site (at the gap's level). The pooled (crude) gap is
    ``confounded_with_site`` when no site holds both sides, or when it lies outside the
    interval of the stratified one: then it compares sites, not groups (Simpson's
    paradox), and is not flagged. A site drives the gap when its own interval excludes 0
    in the gap's direction with a difference of at least the margin, or, for a flagged
    gap, when without it the gap would not be flagged.
    """
    margin = c.margin
    direction = -1.0 if c.first.value < c.second.value else 1.0
    rows: list[dict[str, Any]] = []
    drivers: list[str] = []
    own_sides = _site_sides(c, sites, cells)
    without = zip(
        _leave_one_out([firsts for firsts, _ in own_sides], merge),
        _leave_one_out([seconds for _, seconds in own_sides], merge),
        strict=True,
    )
    for site, (firsts, seconds), others_sides in zip(sites, own_sides, without, strict=True):
        first, second = _merged(firsts, merge), _merged(seconds, merge)
        row: dict[str, Any] = {
            "site": site,
            "first": _side_json(first, c.metric),
            "second": _side_json(second, c.metric),
            "difference": None,
        }
        own = _fit(c, first, second, _SITE_CONFIDENCE)
        if own is not None and _has_interval(own):
            row["difference"] = _clean(own)
        others = _fit(c, *others_sides, c.level)
        row["without_site"] = None if others is None else _clean(others)
        value = (own.value or 0.0) if own is not None else 0.0
        shows = (
            own is not None
            and _excludes_zero(own)
            and value * direction > 0
            and abs(value) >= margin
        )
        holds = others is not None and _beyond(others, margin)
        if shows or (flagged and not holds):
            drivers.append(site)
        rows.append(row)
    compared = [row for row in rows if row["difference"] is not None]
    q = _cochran(compared)
    within = _stratified(compared)
    crude = c.first.value - c.second.value
    confounded = within is None or not (within["low"] <= crude <= within["high"])
    return {
        "sites": rows,
        "heterogeneity": q,
        "heterogeneous": q is not None and q["p_value"] < HETEROGENEITY_LEVEL,
        "within_sites": within,
        "confounded_with_site": confounded,
        "drivers": drivers,
        "site_confidence": _SITE_CONFIDENCE,
    }


def _weights(rows: Sequence[Mapping[str, Any]]) -> list[tuple[float, float]]:
    """(difference, inverse variance) per site, the variance from its 95% interval."""
    z = z_value(_SITE_CONFIDENCE)
    points = []
    for row in rows:
        d = row["difference"]
        se = (d["high"] - d["low"]) / (2 * z)
        if se > 0:
            points.append((d["value"], 1 / (se * se)))
    return points


def _stratified(rows: Sequence[Mapping[str, Any]]) -> dict[str, float] | None:
    """The sites' differences pooled with Mantel-Haenszel weights n1 n2 / (n1 + n2): the
    gap within sites, standardised for each site's share of the two groups (so that a
    site effect does not pass for a group effect); the variance from each site's 95%
    interval; with its 95% interval."""
    z = z_value(_SITE_CONFIDENCE)
    parts = []
    for row in rows:
        n1, n2, d = row["first"]["n"], row["second"]["n"], row["difference"]
        parts.append((n1 * n2 / (n1 + n2), d["value"], ((d["high"] - d["low"]) / (2 * z)) ** 2))
    total = sum(w for w, _, _ in parts)
    if not parts or total <= 0:
        return None
    mean = sum(w * v for w, v, _ in parts) / total
    half = z * math.sqrt(sum(w * w * var for w, _, var in parts)) / total
    return {"value": round(mean, 6), "low": round(mean - half, 6), "high": round(mean + half, 6)}


def _site_sides(
    c: _Comparison, sites: Sequence[str], cells: Sequence[GroupCell]
) -> list[tuple[list[SplitStats], list[SplitStats]]]:
    """Per site of ``sites``, the statistics of the comparison's two sides (as the report
    pools: released cells only); the rest of a one-vs-rest comparison is the site's other
    groups. One pass over the cells."""
    index = {site: i for i, site in enumerate(sites)}
    sides: list[tuple[list[SplitStats], list[SplitStats]]] = [([], []) for _ in sites]
    for cell in cells:
        i = index.get(cell.site)
        if i is None or cell.attribute != c.attribute or cell.suppressed or cell.stats.n <= 0:
            continue
        if cell.group == c.first.group:
            sides[i][0].append(cell.stats)
        elif c.kind == ONE_VS_REST or cell.group == c.second.group:
            sides[i][1].append(cell.stats)
    return sides


def _merged(parts: Sequence[SplitStats | None], merge: Merge) -> SplitStats | None:
    """``parts`` pooled, None when there are none."""
    present = [part for part in parts if part is not None]
    return merge(present) if present else None


def _leave_one_out(parts: Sequence[Sequence[SplitStats]], merge: Merge) -> list[SplitStats | None]:
    """Per index, every other index's ``parts`` pooled (None where they hold none).

    A running pool from the front and one from the back meet at each index: a linear number
    of merges, where pooling all others afresh for each index is quadratic in the sites.
    Pooling sums counts, so the order the parts are added in does not change the pool;
    nothing is subtracted from a total, so each pool is a sum of released cells only.
    """
    before: list[SplitStats | None] = [None]
    for part in parts:
        before.append(_merged([before[-1], *part], merge))
    after: list[SplitStats | None] = [None]
    for part in reversed(parts):
        after.append(_merged([*part, after[-1]], merge))
    after.reverse()  # after[i]: the parts from index i on
    return [_merged([before[i], after[i + 1]], merge) for i in range(len(parts))]


def _side_json(stats: SplitStats | None, metric: str) -> dict[str, Any] | None:
    if stats is None:
        return None
    return {"value": _round(_value(estimates(stats)[metric].estimate)), "n": stats.n}


def _fit(
    c: _Comparison, first: SplitStats | None, second: SplitStats | None, confidence: float
) -> Interval | None:
    if first is None or second is None:
        return None
    a, b = estimates(first)[c.metric].estimate, estimates(second)[c.metric].estimate
    if _value(a) is None or _value(b) is None:
        return None
    fit = _difference(a, b, confidence)
    return None if fit.value is None else fit


def _cochran(rows: Sequence[Mapping[str, Any]]) -> dict[str, float] | None:
    """Cochran's Q of the sites' differences (inverse-variance weights, variances from
    each site's 95% interval, which makes Q conservative for asymmetric intervals) and
    I²; None with fewer than two sites. Q has little power with few sites: "consistent"
    means no heterogeneity was shown, not that the sites agree."""
    points = _weights(rows)
    if len(points) < 2:
        return None
    total = sum(w for _, w in points)
    mean = sum(v * w for v, w in points) / total
    q = sum(w * (v - mean) ** 2 for v, w in points)
    df = len(points) - 1
    return {
        "q": round(q, 6),
        "df": df,
        "p_value": round(float(st.chi2.sf(q, df)), 8),
        "i2": round(max(0.0, (q - df) / q) if q > 0 else 0.0, 6),
    }


def summarise(splits: Mapping[str, Mapping[str, Any]], *, top: int = 5) -> dict[str, Any]:
    """The report's headline: how many gaps of each verdict over the held-out splits, the
    inconclusive ones with the largest point differences, and the in-sample warnings."""
    counts = {verdict: 0 for verdict in Verdict.HELD_OUT}
    inconclusive: list[dict[str, Any]] = []
    warnings: list[dict[str, Any]] = []
    for split, body in splits.items():
        for gap in body.get("gaps", ()):
            verdict = gap.get("verdict")
            if verdict in counts:
                counts[verdict] += 1
            if verdict == Verdict.INCONCLUSIVE and gap["difference"]["value"] is not None:
                inconclusive.append({"split": split, **gap})
            if verdict == Verdict.IN_SAMPLE_WARNING:
                warnings.append({"split": split, **gap})
    inconclusive.sort(key=lambda g: -abs(g["difference"]["value"]))
    return {
        "counts": counts,
        "largest_inconclusive": [_brief(g) for g in inconclusive[:top]],
        "in_sample_warnings": [_brief(g) for g in warnings],
    }


def _brief(gap: Mapping[str, Any]) -> dict[str, Any]:
    keys = ("split", "site", "attribute", "metric", "comparison", "difference", "cases_needed")
    out = {k: gap.get(k) for k in keys}
    first, second = (
        ("worst", "best") if gap.get("comparison") == WORST_VS_BEST else ("group", "rest")
    )
    out["first"], out["second"] = gap.get(first), gap.get(second)
    return out


def _round(value: float | None, digits: int = 6) -> float | None:
    if value is None or not math.isfinite(value):
        return None
    return round(float(value), digits)


def _clean(fit: Interval) -> dict[str, float | None]:
    return {k: _round(v) for k, v in fit.to_dict().items()}
