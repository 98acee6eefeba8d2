"""Disclosure control over the linked tables of one split: no sum or difference of released
cells covers between 1 and k - 1 cases.

The cells a site releases for a split (``all``, each attribute's groups, intersections
such as ``sex*age_band``) are linked: they are unions of the same cases, so a margin minus
its released intersections, or a band minus one sex within it, is a table of the cases
left over. Suppressing each cell below ``k`` is therefore not enough. This module treats
the release as a statistical-disclosure expert treats linked frequency tables:

- the cases fall into *atoms*, the classes of cases that belong to exactly the same cells;
  every cell is a union of atoms, and every released statistic that adds up over cases
  (counts, confusion counts, histogram bins, sums of per-case metrics) is, for any linear
  combination of cells, the same combination of the atoms' statistics;
- a release *discloses* when some linear combination of the released cells (any real
  coefficients: sums, differences, multiples) is non-zero only on atoms holding together
  between 1 and ``k - 1`` cases: those few cases' statistics are then known exactly;
- ``protect`` suppresses cells (joint complementary suppression) until no combination
  discloses: first every cell below ``k``, then, while ``find_disclosure`` finds a
  combination, one of the cells it combines, chosen by the caller's preference (the
  bias report loses least when intersections go before margins, and smaller cells
  before larger ones).

``find_disclosure`` is exact: the combinations non-zero only on small atoms form a vector
space, and a mixed-integer programme finds the fewest cases any of its non-zero vectors
covers (``_smallest_support``). When the solver runs out of time, any non-zero
combination on small atoms counts as disclosing, which suppresses more than needed but
never less.

What this does not cover, and what does (docs/privacy.md): the statistics within a cell
(a released cell of 12 cases may hold 1 true positive: one of those 12, not which) and
crafted models that sweep thresholds over the same cases (only noise protects then).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Collection, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp

__all__ = ["Disclosure", "atoms", "find_disclosure", "protect"]

#: Relative tolerance of the rank decisions (the matrices hold 0/1 entries).
_TOL = 1e-9
#: Seconds the solver may take for one search before any combination on small atoms
#: counts as disclosing (more suppression, never less).
TIME_LIMIT = 5.0
#: Seconds ``protect`` may take for one split in all; beyond them only the cell preferred
#: last (the whole split) is released.
DEADLINE = 60.0


@dataclass(frozen=True)
class Disclosure:
    """A combination of released cells that covers too few cases.

    Attributes:
        cells: positions of the cells combined (those with a non-zero coefficient).
        coefficients: their coefficients, in the same order.
        cases: how many cases the combination covers (1..k-1; with ``exact`` false, the
            cases of some combination on small atoms, which may be k or more).
        exact: false when the solver ran out of time and suppression is conservative.
    """

    cells: tuple[int, ...]
    coefficients: tuple[float, ...]
    cases: int
    exact: bool = True


def atoms(
    memberships: Sequence[Iterable[Hashable]], weights: Mapping[Hashable, int] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """The atoms of some cells: the classes of cases that belong to exactly the same cells.

    Args:
        memberships: per cell, the cases (any hashable ids, here positions) it holds.
        weights: per case the units it counts for (a case's detections; default 1 each).

    Returns:
        ``(matrix, sizes)``: ``matrix[c, a]`` is 1 when atom ``a`` lies in cell ``c``;
        ``sizes[a]`` counts the atom's cases (units). Atoms are ordered by their cells, so
        the result depends on the memberships only.
    """
    signature: dict[Hashable, list[int]] = {}
    for cell, members in enumerate(memberships):
        for case in members:
            signature.setdefault(case, []).append(cell)
    classes: dict[tuple[int, ...], int] = {}
    for case, cells in signature.items():
        key = tuple(cells)
        classes[key] = classes.get(key, 0) + (1 if weights is None else weights[case])
    ordered = sorted(classes)
    matrix = np.zeros((len(memberships), len(ordered)), dtype=np.float64)
    for column, key in enumerate(ordered):
        matrix[list(key), column] = 1.0
    return matrix, np.array([classes[key] for key in ordered], dtype=np.int64)


def _row_basis(matrix: np.ndarray) -> np.ndarray:
    """An orthonormal basis of the row space (rows), empty when the matrix is zero."""
    if matrix.size == 0:
        return np.zeros((0, matrix.shape[1]))
    _, s, vt = np.linalg.svd(matrix, full_matrices=False)
    rank = int(np.sum(s > _TOL * max(1.0, float(s[0]) if s.size else 1.0)))
    return vt[:rank]


def _left_null(matrix: np.ndarray) -> np.ndarray:
    """A basis (rows) of ``{y : y @ matrix = 0}``."""
    rows = matrix.shape[0]
    if matrix.shape[1] == 0:
        return np.eye(rows)
    u, s, _ = np.linalg.svd(matrix, full_matrices=True)
    rank = int(np.sum(s > _TOL * max(1.0, float(s[0]) if s.size else 1.0)))
    return u[:, rank:].T


def _smallest_support(
    basis: np.ndarray, sizes: np.ndarray, time_limit: float
) -> tuple[np.ndarray | None, bool]:
    """The non-zero vector of the row space of ``basis`` (d x m) whose support holds the
    fewest cases (``sizes`` per coordinate), and whether the solver proved it the fewest.

    A mixed-integer programme, as tau-ARGUS solves cell suppression: ``c = z @ basis``,
    one binary ``s_a`` per coordinate with ``-s_a <= c_a <= s_a``, one pivot coordinate
    (binary ``t``, ``sum(t) = 1``) where ``c`` is 1, minimising ``sum(sizes * s)``. Every
    non-zero vector of the space, scaled so that its largest entry is 1, is feasible, so
    the optimum is the fewest cases any combination covers. Solved by HiGHS (SciPy).
    """
    d, m = basis.shape
    # variables: z (d, free within the box that |c| <= 1 implies), s (m), t (m)
    bound = math.sqrt(m) + 1.0
    cost = np.concatenate([np.zeros(d), sizes.astype(np.float64), np.zeros(m)])
    eye, zeros = np.eye(m), np.zeros((m, m))
    rows = [
        np.hstack([basis.T, -eye, zeros]),  # c - s <= 0
        np.hstack([-basis.T, -eye, zeros]),  # -c - s <= 0
        np.hstack([-basis.T, zeros, 2 * eye]),  # 2t - c <= 1: c = 1 at the pivot
        np.hstack([np.zeros((m, d)), -eye, eye]),  # t <= s
        np.concatenate([np.zeros(d + m), np.ones(m)])[None, :],  # one pivot
    ]
    upper = np.concatenate([np.zeros(m), np.zeros(m), np.ones(m), np.zeros(m), [1.0]])
    lower = np.concatenate([np.full(4 * m, -np.inf), [1.0]])
    result = milp(
        cost,
        constraints=LinearConstraint(np.vstack(rows), lower, upper),
        integrality=np.concatenate([np.zeros(d), np.ones(2 * m)]),
        bounds=Bounds(
            np.concatenate([np.full(d, -bound), np.zeros(2 * m)]),
            np.concatenate([np.full(d, bound), np.ones(2 * m)]),
        ),
        options={"time_limit": time_limit},
    )
    if result.x is None:
        return None, result.status == 2  # 2: infeasible, which a non-zero space is not
    return result.x[:d] @ basis, result.status == 0


def find_disclosure(
    matrix: np.ndarray,
    sizes: np.ndarray,
    released: Sequence[int],
    k: int,
    *,
    time_limit: float = TIME_LIMIT,
) -> Disclosure | None:
    """A combination of the ``released`` cells that covers 1 to ``k - 1`` cases, or None.

    Args:
        matrix: cells x atoms membership matrix (``atoms``).
        sizes: cases per atom.
        released: positions of the released cells.
        k: the minimum cell size.
        time_limit: seconds of the solver before answering conservatively.
    """
    rows = np.asarray(sorted(released), dtype=np.int64)
    if k <= 1 or rows.size == 0:
        return None
    shown = matrix[rows]
    small = np.flatnonzero(sizes < k)
    large = np.flatnonzero(sizes >= k)
    if small.size == 0:
        return None
    # combinations y of released cells that vanish on every large atom, seen on small ones
    on_small = _left_null(shown[:, large]) @ shown[:, small]
    basis = _row_basis(on_small)
    if basis.shape[0] == 0:
        return None
    vector, exact = _smallest_support(basis, sizes[small], time_limit)
    if vector is None:  # the solver gave up: any combination on small atoms counts
        vector, exact = basis[0], False
    support = np.abs(vector) > 1e-6 * float(np.abs(vector).max())
    if exact and int(sizes[small][support].sum()) >= k:
        return None
    full = np.zeros(matrix.shape[1])
    full[small] = np.where(support, vector, 0.0)
    coefficients, *_ = np.linalg.lstsq(shown.T, full, rcond=None)
    used = np.abs(coefficients) > 1e-6 * float(np.abs(coefficients).max())
    return Disclosure(
        cells=tuple(int(c) for c in rows[used]),
        coefficients=tuple(float(c) for c in coefficients[used]),
        cases=int(sizes[small][support].sum()),
        exact=exact,
    )


def protect(
    memberships: Sequence[Sequence[Hashable]],
    k: int,
    *,
    preference: Callable[[int], tuple[object, ...]] | None = None,
    released: Collection[int] = (),
    weights: Mapping[Hashable, int] | None = None,
    time_limit: float = TIME_LIMIT,
    deadline: float = DEADLINE,
) -> set[int]:
    """The cells to suppress so that no combination of the others discloses.

    Args:
        memberships: per cell its cases.
        k: the minimum cell size (in units, with ``weights``).
        preference: sort key of a cell position; of the cells a disclosing combination
            uses, the one with the smallest key is suppressed next (default: the smallest
            cell).
        released: positions of cells that left before (a site's earlier releases of the
            same cases): they count in every combination and are never suppressed. A
            combination of them alone (released under a smaller ``k``) cannot be taken
            back; one of its cells is left out of the search instead.
        weights: per case the units it counts for (``atoms``); default one each.
        time_limit: as for ``find_disclosure``.
        deadline: seconds for the whole search; beyond them every cell but the one
            preferred last is suppressed (a crafted split cannot stall the site), and
            every cell when some left before.

    Returns:
        Positions of the suppressed cells: every cell below ``k`` and the complementary
        suppressions (never one of ``released``).
    """
    fixed = set(released)
    size = [len(m) if weights is None else sum(weights[c] for c in m) for m in memberships]
    suppressed = {i for i, units in enumerate(size) if units < k} - fixed
    if k <= 1:
        return suppressed
    key = preference or (lambda i: (size[i], i))
    matrix, sizes = atoms(memberships, weights)
    ignored: set[int] = set()  # earlier releases that disclose among themselves
    stop = time.monotonic() + deadline
    while True:
        if time.monotonic() > stop:
            new = set(range(len(memberships))) - fixed
            return new if fixed or not new else new - ({max(new, key=key)} - suppressed)
        out = [i for i in range(len(memberships)) if i not in suppressed | ignored]
        found = find_disclosure(matrix, sizes, out, k, time_limit=time_limit)
        if found is None:
            return suppressed
        choices = [i for i in found.cells if i not in fixed]
        if choices:
            suppressed.add(min(choices, key=key))
        else:
            ignored.add(min(found.cells, key=key))
