"""Subgroup cells of a split at a site: which cases fall in each (attribute, group).

Cells are what the bias report compares. Group names leave the site, so they follow one
rule: ``sex``, ``age_band`` and their intersection have closed vocabularies (``F``/``M``/
``other``/``unknown``; the run's age bands) and are named even when their cell is
suppressed; any other attribute (a manufacturer, a manifest column) may hold free text, so
its groups with fewer than ``k`` cases are pooled at the site into one group,
``other (small groups)``, before anything is named.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

__all__ = [
    "ALL",
    "CLOSED_ATTRIBUTES",
    "SMALL_GROUPS",
    "Cell",
    "cell_name",
    "parse_cell_name",
    "subgroup_cells",
]

#: The attribute and group of the cell holding every case.
ALL = "all"
#: Attributes whose groups come from a fixed vocabulary (safe to name when small).
CLOSED_ATTRIBUTES = frozenset({"sex", "age_band"})
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
    if "*" in attribute and group.count("|") != 1:
        raise ValueError("an intersection cell must name two groups (a|b)")
    return attribute, group


def _group_of(attributes: Mapping[str, str], attribute: str) -> str:
    parts = attribute.split("*")
    values = [
        " ".join(str(attributes.get(p) or "unknown").split())[:MAX_GROUP_LENGTH] for p in parts
    ]
    return "|".join(values)


def subgroup_cells(
    attributes: Sequence[Mapping[str, str]], subgroups: Sequence[str], k: int
) -> list[Cell]:
    """The cells of a split: ``all`` first, then each attribute's groups in name order.

    Args:
        attributes: per case its subgroup attributes (``SplitData.attributes``).
        subgroups: the attributes to report (``RunConfig.subgroups``).
        k: the minimum cell size in force at the site.
    """
    cells = [Cell(ALL, ALL, tuple(range(len(attributes))))]
    for attribute in subgroups:
        groups: dict[str, list[int]] = defaultdict(list)
        for position, case in enumerate(attributes):
            groups[_group_of(case, attribute)].append(position)
        closed = all(part in CLOSED_ATTRIBUTES for part in attribute.split("*"))
        if not closed:
            small = [g for g, members in groups.items() if len(members) < k]
            if small:
                pooled = sorted(i for g in small for i in groups.pop(g))
                groups[SMALL_GROUPS] = sorted(groups.get(SMALL_GROUPS, []) + pooled)
        for group in sorted(groups):
            cells.append(Cell(attribute, group, tuple(groups[group])))
    return cells
