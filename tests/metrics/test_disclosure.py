"""Disclosure control over linked tables: after ``suppressed_cells``, no sum or difference of
the released cells of a split covers 1 to k-1 cases.

Each test searches the released tables for an isolating combination by methods independent
of radfed's (which enumerates elementary vectors in floating point): every signed sum of up
to three released cells, case by case, and exact rational arithmetic (sympy) over every
small set of atoms. The search is shown to find the attack on a release that only
suppresses cells below k, so that a pass means something.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import pytest

from radfed.data.attributes import STANDARD_BANDS
from radfed.metrics.cells import Cell, subgroup_cells, suppressed_cells
from radfed.metrics.disclosure import atoms, find_disclosure, protect
from tests.disclosure_search import exact_isolations as _exact_isolations
from tests.disclosure_search import signed_sums as _signed_sums

BANDS = STANDARD_BANDS.labels
SUBGROUPS = ["sex", "age_band", "sex*age_band", "manufacturer"]


def _released(cells: Sequence[Cell], hidden: set[int]) -> list[set[int]]:
    return [set(c.index) for i, c in enumerate(cells) if i not in hidden]


def _women_of_one_band() -> list[dict[str, str]]:
    # the attack of issue 13: 80 women, 79 of them aged 40-59 and one 60-79
    women = [{"sex": "F", "age_band": "40-59"}] * 79 + [{"sex": "F", "age_band": "60-79"}]
    men = [{"sex": "M", "age_band": b} for b in ("18-39", "40-59", "60-79", "80+") * 20]
    return [{**case, "manufacturer": "GE"} for case in women + men]


def test_a_margin_minus_its_intersections_no_longer_isolates_a_patient() -> None:
    # Prepare: the default subgroups over the cases of the attack
    cells = subgroup_cells(_women_of_one_band(), ["sex", "age_band", "sex*age_band"], 10)
    below_k = {i for i, c in enumerate(cells) if len(c.index) < 10}

    # Execute
    hidden = suppressed_cells(cells, 10)

    # Assert: suppressing cells below k alone leaves the woman aged 60-79 exposed (sex=F
    # minus sex*age_band=F|40-59), the search finds it; after protection it finds nothing
    naive = _released(cells, below_k)
    assert any(": 1 cases" in f for f in _signed_sums(naive, 10))
    assert _exact_isolations(naive, 10)
    protected = _released(cells, hidden)
    assert _signed_sums(protected, 10) == [] and _exact_isolations(protected, 10) == []
    shown = {c.name for i, c in enumerate(cells) if i not in hidden}
    assert {"all=all", "sex=F", "sex=M"} <= shown  # the margins the report compares stay


def _random_split(seed: int) -> list[dict[str, str]]:
    rng = random.Random(seed)
    n = rng.randint(20, 260)
    sexes = rng.choice([("F", "M"), ("F", "M", "M", "other"), ("F", "F", "F", "M", "unknown")])
    makers = rng.sample(["GE", "Siemens", "Philips", "Canon", "Fuji", "Agfa"], rng.randint(1, 5))
    weights = [rng.random() + 0.05 for _ in BANDS]
    return [
        {
            "sex": rng.choice(sexes),
            "age_band": rng.choices(list(BANDS), weights)[0],
            "manufacturer": rng.choice(makers),
        }
        for _ in range(n)
    ]


@pytest.mark.parametrize("seed", range(18))
def test_no_signed_sum_of_released_cells_isolates_fewer_than_k_cases(seed: int) -> None:
    # Prepare: a random split, subgroups with margins, an intersection and free text
    cases = _random_split(seed)
    k = (5, 10, 20)[seed % 3]
    cells = subgroup_cells(cases, SUBGROUPS, k, age_bands=BANDS)

    # Execute
    hidden = suppressed_cells(cells, k)

    # Assert: nothing isolates; the whole split leaves whenever it holds k cases
    released = _released(cells, hidden)
    assert _signed_sums(released, k) == []
    assert _exact_isolations(released, k) == []
    assert (0 in hidden) == (len(cases) < k)


def test_a_search_out_of_time_suppresses_more_never_less() -> None:
    cases = _random_split(3)
    cells = subgroup_cells(cases, SUBGROUPS, 10, age_bands=BANDS)
    members = [c.index for c in cells]

    exact = protect(members, 10)
    conservative = protect(members, 10, time_limit=0.0)

    assert exact <= conservative or len(conservative) >= len(exact)
    assert _exact_isolations(_released(cells, conservative), 10) == []


def test_the_suppression_depends_on_the_cells_not_on_the_order_of_cases() -> None:
    # the same split read in another order releases the same cells, in every round
    cases = _random_split(5)
    order = list(range(len(cases)))
    random.Random(1).shuffle(order)
    shuffled = [cases[i] for i in order]
    first = subgroup_cells(cases, SUBGROUPS, 10, age_bands=BANDS)
    second = subgroup_cells(shuffled, SUBGROUPS, 10, age_bands=BANDS)
    assert [c.name for c in first] == [c.name for c in second]
    assert suppressed_cells(first, 10) == suppressed_cells(second, 10)


def test_find_disclosure_names_the_cells_and_the_cases() -> None:
    # all = 30 cases, F = 20, M = 9, other = 1: all - F - M isolates the one
    members = [range(30), range(20), range(20, 29), range(29, 30)]
    matrix, sizes = atoms(members)

    found = find_disclosure(matrix, sizes, [0, 1, 2], 10)

    assert found is not None and found.exact and found.cases == 1
    assert sorted(found.cells) == [0, 1, 2]
    assert find_disclosure(matrix, sizes, [0, 1], 10) is None  # all - F covers 10


def test_past_the_deadline_only_the_whole_split_leaves() -> None:
    cells = subgroup_cells(_random_split(3), SUBGROUPS, 10, age_bands=BANDS)
    hidden = protect([c.index for c in cells], 10, deadline=0.0)
    assert hidden == set(range(1, len(cells)))


def test_cells_released_before_count_and_stay_released() -> None:
    # Prepare: last month 'all' (20 cases) and 'F' (10) left; today 'all' holds 21 and
    # 'F' 11 (one woman joined) and 'M' 10
    earlier_all, earlier_f = list(range(20)), list(range(10))
    now = [list(range(21)), [*range(10), 20], list(range(10, 20))]

    # Execute
    suppressed = protect([*now, earlier_all, earlier_f], 10, released=[3, 4])

    # Assert: today's 'all' and 'F' are each one woman more than a cell that left: both
    # suppressed, never the earlier cells; what is left covers no 1..9 cases
    assert {0, 1} <= suppressed and not suppressed & {3, 4}
    left = [set(m) for i, m in enumerate([*now, earlier_all, earlier_f]) if i not in suppressed]
    assert _signed_sums(left, 10) == []


def test_earlier_cells_that_disclose_among_themselves_end_the_search() -> None:
    # Prepare: under k = 5 before, 'all' (12) and 'F' (6) left, and 'M' (6); k is now 10
    earlier = [list(range(12)), list(range(6)), list(range(6, 12))]
    now = [list(range(12)), list(range(6)), list(range(6, 12))]

    # Execute
    suppressed = protect([*now, *earlier], 10, released=[3, 4, 5])

    # Assert: nothing released before is taken back (it cannot be), the search ends, and
    # today's small cells are suppressed
    assert {1, 2} <= suppressed and not suppressed & {3, 4, 5}


def test_a_cell_equal_to_an_earlier_release_is_not_held_back() -> None:
    # Prepare: under k = 5 before, all (12), F (6) and M (6) left; k is now 10, the cases
    # are the same
    cells = [
        Cell("all", "all", tuple(range(12))),
        Cell("sex", "F", tuple(range(6))),
        Cell("sex", "M", tuple(range(6, 12))),
    ]
    keys = [f"k{i}" for i in range(12)]
    earlier = {frozenset(keys[i] for i in cell.index) for cell in cells}

    # Execute
    suppressed = suppressed_cells(cells, 10, keys=keys, earlier=earlier)

    # Assert: the sexes are below k now; all is what left before (all minus F was M
    # then already): holding it back would protect nothing, so it leaves
    assert suppressed == {1, 2}
