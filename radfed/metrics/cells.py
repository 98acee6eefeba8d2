"""Subgroup cells of a split at a site: which cases fall in each (attribute, group).

Cells are what the bias report compares. Group names leave the site, so they follow one
rule: ``sex``, ``age_band`` and their intersection have closed vocabularies (``F``/``M``/
``other``/``unknown``; the run's age bands), and every group of the vocabulary is listed,
empty or not; any other value (a manufacturer, a manifest column, a manifest ``age_band``
outside the bands) may be free text, so groups with fewer than ``k`` cases are pooled at
the site into one group, ``other (small groups)``, before anything is named. Cells below
``k`` leave suppressed, and so many more that no sum or difference of released cells (of
one attribute, or margins against intersections) covers fewer than ``k`` cases
(``radfed.metrics.disclosure``).
"""

from __future__ import annotations

import functools
from collections import defaultdict
from collections.abc import Collection, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass

from radfed.data.attributes import UNKNOWN
from radfed.metrics.disclosure import protect

__all__ = [
    "ALL",
    "SMALL_GROUPS",
    "Cell",
    "cell_name",
    "closed_vocabulary",
    "listed_groups",
    "parse_cell_name",
    "subgroup_cells",
    "suppressed_cells",
    "withheld_part",
]

#: The attribute and group of the cell holding every case.
ALL = "all"
#: The normalised values of ``sex`` besides ``unknown``.
SEXES = ("F", "M", "other")
#: The group that pools the small groups of a free-text attribute.
SMALL_GROUPS = "other (small groups)"
#: Longest group name that may leave a site.
MAX_GROUP_LENGTH = 64


@dataclass(frozen=True)
class Cell:
    """Cases of one (attribute, group) of a split.

    Attributes:
        attribute: ``all``, an attribute name, or ``a*b`` for an intersection.
        group: the group; ``a|b`` for an intersection.
        index: positions of the cases in the split.
    """

    attribute: str
    group: str
    index: tuple[int, ...]

    @property
    def name(self) -> str:
        return cell_name(self.attribute, self.group)


def cell_name(attribute: str, group: str) -> str:
    """The wire name of a cell: ``attribute=group``."""
    return f"{attribute}={group}"


def parse_cell_name(name: str, subgroups: Sequence[str]) -> tuple[str, str]:
    """``attribute=group`` -> (attribute, group), checked against the run's subgroups.

    Raises:
        ValueError: not of that form, an attribute the run does not report, or a group
            name that is empty, too long or holds control characters.
    """
    attribute, sep, group = name.partition("=")
    if not sep or (attribute not in subgroups and (attribute, group) != (ALL, ALL)):
        raise ValueError("a cell names an attribute the run does not report")
    if not group or len(group) > MAX_GROUP_LENGTH or not group.isprintable():
        raise ValueError("a cell's group name is empty, too long or not printable")
    if "*" in attribute and group != SMALL_GROUPS and group.count("|") != 1:
        raise ValueError("an intersection cell must name two groups (a|b)")
    return attribute, group


def _clean(value: object, limit: int) -> str:
    """A group name part: printable, single-spaced, without the separators ``|`` and ``=``."""
    text = "".join(ch if ch.isprintable() else " " for ch in str(value or UNKNOWN))
    text = " ".join(text.replace("|", "/").replace("=", "-").split())
    return text[:limit] or UNKNOWN


def _group_of(
    attributes: Mapping[str, str],
    attribute: str,
    vocabularies: Mapping[str, Collection[str]],
) -> str:
    parts = attribute.split("*")
    limit = MAX_GROUP_LENGTH // len(parts) - 1
    values = [_clean(attributes.get(p), limit) for p in parts]
    for part, value in zip(parts, values, strict=True):
        allowed = vocabularies.get(part)
        if allowed is not None and value != UNKNOWN and value not in allowed:
            return SMALL_GROUPS  # a value the site does not name
    return "|".join(values)


def closed_vocabulary(attribute: str, age_bands: Sequence[str]) -> tuple[str, ...] | None:
    """The fixed groups of a closed attribute (every intersection of closed parts), or None."""
    vocabularies = {"sex": (*SEXES, UNKNOWN), "age_band": (*age_bands, UNKNOWN)}
    parts = attribute.split("*")
    if not all(p in vocabularies for p in parts):
        return None
    groups = [""]
    for part in parts:
        groups = [f"{g}|{v}" if g else v for g in groups for v in vocabularies[part]]
    return tuple(groups)


def listed_groups(
    attribute: str, age_bands: Sequence[str], vocabularies: Mapping[str, Collection[str]]
) -> tuple[str, ...]:
    """Every group an attribute (or intersection) can name, fixed before any data is seen:
    the products of each part's vocabulary and ``unknown``, then ``other (small groups)``.

    Raises:
        ValueError: a part has no vocabulary (a free-text attribute the policy lists no
            values of).
    """
    fixed = {"sex": (*SEXES, UNKNOWN), "age_band": (*age_bands, UNKNOWN)}
    groups = [""]
    for part in attribute.split("*"):
        if part in fixed:
            values: Sequence[str] = fixed[part]
        elif part in vocabularies:
            values = [*sorted(vocabularies[part]), UNKNOWN]
        else:
            raise ValueError(f"attribute {part!r} has no fixed vocabulary")
        groups = [f"{g}|{v}" if g else v for g in groups for v in values]
    return (*groups, SMALL_GROUPS)


def subgroup_cells(
    attributes: Sequence[Mapping[str, str]],
    subgroups: Sequence[str],
    k: int,
    *,
    age_bands: Sequence[str] = (),
    vocabularies: Mapping[str, Collection[str]] | None = None,
    listed: bool = False,
) -> list[Cell]:
    """The cells of a split: ``all`` first, then each attribute's groups in name order.

    Closed attributes list every group of their vocabulary, empty ones included, so that
    a name never says that some patient exists; a value outside the vocabulary (a
    manifest column may say anything) is free text. Free-text groups below ``k`` are
    pooled into ``other (small groups)``.

    Args:
        attributes: per case its subgroup attributes (``SplitData.attributes``).
        subgroups: the attributes to report (``RunConfig.subgroups``).
        k: the minimum cell size in force at the site.
        age_bands: the labels of the run's age bands (``AgeBands.labels``).
        vocabularies: per free-text attribute the values the site names (its policy's
            ``attribute-values``); a case with another value falls in ``other (small
            groups)``. An attribute not given here may name any value of ``k`` cases.
        listed: every group of ``listed_groups`` is a cell, empty or not, and none is
            pooled by ``k``: which cells exist does not depend on the data (DP statistics).
    """
    cells = [Cell(ALL, ALL, tuple(range(len(attributes))))]
    allowed: dict[str, Collection[str]] = dict(vocabularies or {})
    if age_bands:  # a manifest column may put any text in sex or age_band: never named
        allowed.update(sex=(*SEXES, UNKNOWN), age_band=(*age_bands, UNKNOWN))
    for attribute in subgroups:
        groups: dict[str, list[int]] = defaultdict(list)
        for position, case in enumerate(attributes):
            groups[_group_of(case, attribute, allowed)].append(position)
        vocabulary = closed_vocabulary(attribute, age_bands) or ()
        if listed:
            vocabulary = listed_groups(attribute, age_bands, allowed)
            unnamed = [g for g in groups if g not in vocabulary]
            for group in unnamed:  # a value outside the vocabulary (an unknown part)
                groups[SMALL_GROUPS] = sorted(groups.get(SMALL_GROUPS, []) + groups.pop(group))
        small = [g for g, members in groups.items() if len(members) < k and g not in vocabulary]
        if small:
            pooled = sorted(i for g in small for i in groups.pop(g))
            groups[SMALL_GROUPS] = sorted(groups.get(SMALL_GROUPS, []) + pooled)
        for group in vocabulary:
            groups.setdefault(group, [])
        for group in sorted(groups):
            cells.append(Cell(attribute, group, tuple(groups[group])))
    return cells


def suppressed_cells(
    cells: Sequence[Cell],
    k: int,
    *,
    keys: Sequence[str] = (),
    earlier: Collection[frozenset[str]] = (),
) -> set[int]:
    """Positions of the cells that must leave suppressed, complementary suppression included.

    A cell with fewer than ``k`` cases is suppressed, and then, jointly over every cell of
    the split (``all``, margins and intersections are linked tables of the same cases), so
    many more that no sum or difference of the released cells covers 1 to ``k - 1`` cases
    (``radfed.metrics.disclosure.protect``). Intersections are suppressed before margins,
    smaller cells before larger ones, ``all`` last: the bias report compares margins. The
    result depends on the cells' attributes and cases only, so every round of a run
    releases the same cells (and the answer is kept for the rounds that follow).

    Args:
        cells: every cell of the split.
        k: the minimum cell size.
        keys: per case of the split its key (``SplitData.cases``); needed with ``earlier``.
        earlier: the case sets (by key) of cells the site released before, in any run:
            they are part of the release too (a cell that gained one case since is that
            case) and cannot be taken back; a cell now equal to one of them is not
            suppressed (its cases are out already).
    """
    now: tuple[tuple[Hashable, ...], ...]
    if earlier:
        now = tuple(tuple(sorted(keys[i] for i in cell.index)) for cell in cells)
    else:  # no record: the cases' positions name them
        now = tuple(cell.index for cell in cells)
    attributes = tuple(cell.attribute for cell in cells)
    return set(_chosen_once(attributes, now, frozenset(earlier), k))


@functools.lru_cache(maxsize=64)
def _chosen_once(
    attributes: tuple[str, ...],
    now: tuple[tuple[Hashable, ...], ...],
    earlier: frozenset[frozenset[str]],
    k: int,
    weights: tuple[tuple[Hashable, int], ...] | None = None,
) -> frozenset[int]:
    """``_chosen``, kept: the cells (and the parts that depend on the cases alone) give the
    same answer in every round of a run."""
    return frozenset(_chosen(attributes, now, earlier, k, weights))


def _chosen(
    attributes: Sequence[str],
    now: Sequence[Collection[Hashable]],
    earlier: frozenset[frozenset[str]],
    k: int,
    weights: Iterable[tuple[Hashable, int]] | None = None,
) -> set[int]:
    """Which of the cells ``now`` (their cases, or units' cases) to suppress.

    Of a disclosing combination, intersections go before margins, smaller cells before
    larger ones, ``all`` last (the bias report compares margins). Every ``earlier`` set (by
    case key) is a released cell that cannot be taken back; a cell now equal to one of
    them (of at least ``k`` units) is never suppressed: its cases are out already, so it
    adds nothing. ``weights``: per case its units (1 when absent).
    """
    old = sorted(earlier, key=sorted)
    memberships: list[Collection[Hashable]] = [*now, *old]
    out_already = [frozenset(members) in earlier for members in now] + [True] * len(old)
    cell_attributes = [*attributes, *[ALL] * len(old)]
    sizes = [len(members) for members in memberships]

    def preference(i: int) -> tuple[bool, bool, bool, int, int]:
        attribute = cell_attributes[i]
        return (out_already[i], attribute == ALL, "*" not in attribute, sizes[i], i)

    units: dict[Hashable, int] | None = None
    if weights is not None:
        given = dict(weights)
        units = {case: given.get(case, 1) for members in memberships for case in members}
    fixed = range(len(now), len(memberships))
    rows = [list(members) for members in memberships]
    chosen = protect(rows, k, preference=preference, released=fixed, weights=units)

    def size(members: Iterable[Hashable]) -> int:
        return sum(1 if units is None else units[case] for case in members)

    return {i for i in chosen if i < len(now) and not (out_already[i] and size(now[i]) >= k)}


def withheld_part(
    cells: Sequence[Cell],
    released: Collection[int],
    units: Sequence[int],
    k: int,
    *,
    keys: Sequence[str] = (),
    earlier: frozenset[frozenset[str]] = frozenset(),
) -> set[int]:
    """The released cells that must withhold one part of a task's statistics.

    A part (a segmentation's Dice over the cases with foreground, a detector's score
    histograms over its detections) covers a sub-population of a cell's cases, and a cell
    withholds it where it covers between 1 and ``k - 1`` units (``with_min_cell``). The
    cells are linked tables of the same cases, so that is not enough: ``all`` minus a
    released ``sex=F`` is the ``sex=M`` part a cell withheld. So the part is protected as
    the cells are (``radfed.metrics.disclosure.protect``), over its units: no sum or
    difference of the cells that release it covers 1 to ``k - 1`` of them. A cell without
    units of the part adds nothing to any combination and keeps it.

    Args:
        cells: every cell of the split (the policy's template).
        released: positions of the cells that release the part so far.
        units: per case of the split the units it holds (0 for none): the units of one
            case are in the same cells, so they count as the case's weight.
        k: the minimum cell size.
        keys: per case of the split its key (``SplitData.cases``); needed with ``earlier``.
        earlier: the sets of cases (by key) holding units of the part in cells that
            released it before, in any run: released cells that cannot be taken back, as
            for ``suppressed_cells``.

    Returns:
        Positions (in ``cells``) of the released cells that withhold the part.
    """
    holding = []  # (cell position, its cases holding units)
    for position in sorted(released):
        members = [i for i in cells[position].index if units[i] > 0]
        if members:
            holding.append((position, members))
    if not holding:
        return set()
    attributes = tuple(cells[p].attribute for p, _ in holding)
    if earlier:  # the part depends on the cases alone: the same answer every round
        now = tuple(tuple(sorted(keys[i] for i in members)) for _, members in holding)
        by_key = tuple(sorted({keys[i]: int(units[i]) for _, m in holding for i in m}.items()))
        chosen = _chosen_once(attributes, now, earlier, k, by_key)
    else:  # it changes with the model: worked out anew
        weights = [(i, int(units[i])) for _, members in holding for i in members]
        chosen = frozenset(_chosen(attributes, [m for _, m in holding], earlier, k, weights))
    return {holding[i][0] for i in chosen}
