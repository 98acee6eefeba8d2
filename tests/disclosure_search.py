"""Searching released tables for a combination that isolates fewer than k cases, by means
independent of radfed's own (radfed.metrics.disclosure solves a mixed-integer programme in
floating point): every signed sum of a few cells, case by case, and exact rational rank
over sets of small atoms (sympy)."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

from sympy import QQ, ZZ
from sympy.polys.matrices import DomainMatrix

__all__ = ["exact_isolations", "signed_sums"]


def signed_sums(members: Sequence[set[int]], k: int, most: int = 3) -> list[str]:
    """Every ±1 combination of up to ``most`` cells that covers 1..k-1 cases."""
    found = []
    for size in range(1, most + 1):
        for chosen in itertools.combinations(range(len(members)), size):
            for signs in itertools.product((1, -1), repeat=size - 1):
                weight: dict[int, int] = {}
                for sign, cell in zip((1, *signs), chosen, strict=True):
                    for case in members[cell]:
                        weight[case] = weight.get(case, 0) + sign
                covered = sum(1 for w in weight.values() if w)
                if 0 < covered < k:
                    found.append(f"{chosen} {signs}: {covered} cases")
    return found


def exact_isolations(members: Sequence[set[int]], k: int, most: int = 2) -> list[str]:
    """Sets of small atoms (all of them when there are few, else up to ``most``) on which
    some rational combination of the cells is non-zero while it vanishes on every other
    atom, covering 1..k-1 cases: exact rational arithmetic (sympy's DomainMatrix)."""
    cases = sorted(set().union(*members))
    classes: dict[tuple[bool, ...], int] = {}
    for case in cases:
        key = tuple(case in m for m in members)
        classes[key] = classes.get(key, 0) + 1
    keys = sorted(classes)
    matrix = DomainMatrix(
        [[ZZ(int(key[c])) for key in keys] for c in range(len(members))],
        (len(members), len(keys)),
        ZZ,
    ).convert_to(QQ)
    small = [a for a, key in enumerate(keys) if classes[key] < k]
    large = [a for a in range(len(keys)) if a not in small]
    if not small:
        return []
    # the combinations that vanish on every large atom, seen on the small ones
    if large:
        null = matrix.extract(range(len(members)), large).transpose().nullspace()
    else:
        null = DomainMatrix.eye(len(members), QQ)
    if null.shape[0] == 0:
        return []
    space = null * matrix.extract(range(len(members)), small)
    dimension = space.rank()
    dense = space.to_Matrix()
    reach = [i for i in range(len(small)) if any(dense[:, i])]
    sizes = range(1, len(reach) + 1) if len(reach) <= 10 else range(1, most + 1)
    found = []
    rows = range(space.shape[0])
    for size in sizes:
        for chosen in itertools.combinations(reach, size):
            weight = sum(classes[keys[small[i]]] for i in chosen)
            rest = [i for i in range(len(small)) if i not in chosen]
            if weight < k and space.extract(rows, rest).rank() < dimension:
                found.append(f"atoms {chosen}: {weight} cases")
    return found
