"""Differential privacy for the statistics a site releases (``[policy.dp-statistics]``).

Against a server that crafts the models it asks a site to evaluate (shifting a model's bias
until one patient's score crosses a bin edge, say), no rule on what is released suffices:
the answer must not depend much on any one patient. With DP statistics on, a site releases
for binary classification, per cell (``all`` and each group of each attribute asked for):

- the positive and negative score histograms with **fixed** bins (never merged) and a fresh
  draw of the discrete Gaussian ``N_Z(0, noise^2)`` (``radfed.privacy.noise``) added to
  every bin;
- the confusion counts at the threshold and the positives as sums of those noisy bins
  (post-processing: no further privacy cost), so the threshold must lie on a bin edge;
- no cell is suppressed and every group of each attribute's vocabulary is listed, empty or
  not: which cells leave never depends on the data.

The unit of privacy is one patient. A site keeps at most ``cases-per-patient`` images of a
patient in each release (the first in the split's order; the others are left out of the
statistics), so adding or removing a patient changes at most that many counts by one in each
cell a case is in: one per attribute, plus ``all``. Splits hold disjoint patients, so an
evaluation of several splits costs what one does (parallel composition). One release is the
Gaussian mechanism of L2 sensitivity ``L sqrt(A)`` (``L`` cases per patient, ``A`` cells per
case) and costs ``rho = L^2 A / (2 noise^2)`` in zero-concentrated DP (Canonne, Kamath and
Steinke, 2020). The site's ledger (``radfed.privacy.accountant``, kind ``statistics``)
records each release before the site's data is even loaded, and refuses one that would take
the total beyond ``epsilon`` at ``delta``.

The server reads ``noise-variance`` from each cell, and its intervals add that variance to
the sampling variance (``radfed.bias.estimates``): under noise the bias report stays honest,
only wider.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from radfed.config import RunConfig, TaskName
from radfed.folders import POLICY_FILE_NAME
from radfed.metrics.binary import BinaryStats
from radfed.privacy.accountant import PrivacyLedger, Spent, epsilon_of
from radfed.privacy.noise import IntegerSource, discrete_gaussians
from radfed.privacy.refusal import PolicyRefusal

__all__ = ["StatisticsDP", "bounded_cases", "noisy_release"]


@dataclass(frozen=True, kw_only=True)
class StatisticsDP:
    """The site's DP statistics (see the module docstring).

    Attributes:
        noise: the standard deviation of the discrete Gaussian added to every count.
        epsilon: the site's budget for statistics over all rounds and runs, at ``delta``;
            None to account without refusing.
        delta: the delta of (epsilon, delta)-DP.
        cases_per_patient: the most images of one patient a release counts.
    """

    noise: float
    epsilon: float | None = None
    delta: float = 1e-6
    cases_per_patient: int = 1

    def rho(self, cells_per_case: int) -> float:
        """zCDP of one release whose cases are each in ``cells_per_case`` cells."""
        return self.cases_per_patient**2 * cells_per_case / (2.0 * self.noise**2)

    def check_run(self, config: RunConfig) -> None:
        """Raises PolicyRefusal unless the run's statistics are ones this site can release
        with noise: binary classification (a run's threshold is on an edge of its score
        bins, ``RunConfig``)."""
        if config.task != TaskName.CLASSIFICATION or config.num_classes != 2:
            msg = (
                f"this site releases statistics with differential privacy, which radfed "
                f"supports for binary classification only; the run asks for {config.task} "
                f"with {config.num_classes} classes ([policy.dp-statistics] in "
                f"{POLICY_FILE_NAME})"
            )
            raise PolicyRefusal(msg)

    def spend(
        self, ledger: PrivacyLedger, cells_per_case: int, *, run_id: int, server_round: int
    ) -> Spent:
        """Record one release in the site's ledger (PolicyRefusal beyond the budget)."""
        return ledger.spend(
            self.rho(cells_per_case),
            run_id=run_id,
            server_round=server_round,
            epsilon=self.epsilon,
            delta=self.delta,
            kind="statistics",
        )

    def epsilon_of_release(self, cells_per_case: int) -> float:
        """The epsilon of one release at ``delta`` (for the docs and the site's log)."""
        return epsilon_of(self.rho(cells_per_case), self.delta)

    def describe(self) -> dict[str, Any]:
        return {
            "noise": self.noise,
            "epsilon": self.epsilon,
            "delta": self.delta,
            "cases-per-patient": self.cases_per_patient,
        }


def bounded_cases(patients: Sequence[str], count: int, most: int) -> list[int]:
    """The positions of the cases a release counts: at most ``most`` per patient, the first
    in order; without patient keys (``patients`` empty) every case is its own patient."""
    if not patients:
        return list(range(count))
    seen: Counter[str] = Counter()
    kept = []
    for position, patient in enumerate(patients):
        seen[patient] += 1
        if seen[patient] <= most:
            kept.append(position)
    return kept


def noisy_release(
    stats: BinaryStats, noise: float, rng: IntegerSource | None = None
) -> BinaryStats:
    """The statistics of one cell with discrete Gaussian noise on every histogram bin and
    the confusion counts summed from the noisy bins each side of the threshold.

    Raises:
        ValueError: the threshold is not on a bin edge (``stats.threshold_bin`` None), or
            the statistics were merged or suppressed already.
    """
    edge = stats.threshold_bin
    if edge is None or stats.suppressed or stats.noise:
        raise ValueError("noise goes on exact, unmerged statistics with the threshold on an edge")
    bins = len(stats.pos_hist)
    draws = discrete_gaussians(2 * bins, noise, rng)
    pos = tuple(v + e for v, e in zip(stats.pos_hist, draws[:bins], strict=True))
    neg = tuple(v + e for v, e in zip(stats.neg_hist, draws[bins:], strict=True))
    return BinaryStats(
        tp=sum(pos[edge:]),
        fp=sum(neg[edge:]),
        tn=sum(neg[:edge]),
        fn=sum(pos[:edge]),
        pos_hist=pos,
        neg_hist=neg,
        noise=float(noise) ** 2,
        threshold_bin=edge,
    )
