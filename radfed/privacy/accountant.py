"""The site's privacy accountant: its differentially private weight updates and statistics.

Each DP training round releases the site's update clipped to L2 norm C with Gaussian noise of
standard deviation z * C (``[policy.dp]``). With the site's whole contribution as the unit
(add or remove it: sensitivity C), that is the Gaussian mechanism, which satisfies
rho-zero-concentrated DP with ``rho = 1 / (2 z^2)`` (Bun and Steinke, 2016, Prop. 1.6). Every
site takes part in every round (no subsampling), so rounds compose by adding their rho
(Lemma 1.7), across rounds and runs alike; and rho-zCDP gives (epsilon, delta)-DP with
``epsilon = rho + 2 sqrt(rho ln(1/delta))`` (Prop. 1.3). The unit is the site, so the
guarantee covers every patient of it at once.

Each DP statistics release (``radfed.privacy.statistics_dp``) spends the rho of its discrete
Gaussian noise, with one patient as the unit. A site-level guarantee is also a patient-level
one, so the patient-level rho of the site is the sum of both kinds; each kind has its own
budget (``[policy.dp]``, ``[policy.dp-statistics]``).

The ledger ``SITE_DIR/.radfed/privacy.jsonl`` (0600, one JSON line per release, appended under
a lock) holds what was spent, with its kind (``update`` or ``statistics``; a line without a
kind is an update). A release is recorded before the work it releases, so a failed one
counts; with ``epsilon`` in the policy, a release that would take its kind beyond it is
refused.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

from radfed.errors import DataError
from radfed.folders import POLICY_FILE_NAME
from radfed.privacy.refusal import PolicyRefusal

__all__ = ["KINDS", "PrivacyLedger", "Spent", "epsilon_of", "rho_per_round"]

#: What the ledger accounts: weight updates and statistics.
KINDS = ("update", "statistics")
_SECTION = {"update": "[policy.dp]", "statistics": "[policy.dp-statistics]"}


def rho_per_round(noise_multiplier: float) -> float:
    """zCDP of one round of the Gaussian mechanism with noise ``z * C``: ``1 / (2 z^2)``."""
    return math.inf if noise_multiplier <= 0 else 1.0 / (2.0 * noise_multiplier**2)


def epsilon_of(rho: float, delta: float) -> float:
    """The epsilon of (epsilon, delta)-DP that rho-zCDP implies."""
    if rho == 0:
        return 0.0
    return rho + 2.0 * math.sqrt(rho * math.log(1.0 / delta))


@dataclass(frozen=True)
class Spent:
    """What the ledger holds: rounds and their total rho."""

    rounds: int
    rho: float

    def epsilon(self, delta: float) -> float:
        return epsilon_of(self.rho, delta)


class PrivacyLedger:
    """The site's record of the privacy its DP updates spent."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def spent(self, kind: str | None = None) -> Spent:
        """The releases and rho recorded so far, of one kind or (None) of both."""
        if not self.path.is_file():
            return Spent(0, 0.0)
        return _total(self._entries(self.path.read_bytes()), kind)

    def spend(
        self,
        rho: float,
        *,
        run_id: int,
        server_round: int,
        epsilon: float | None,
        delta: float,
        kind: str = "update",
    ) -> Spent:
        """Record one release's rho, or refuse it when it would take the total of its kind
        beyond ``epsilon`` at ``delta``; returns that total after it.

        Raises:
            PolicyRefusal: the budget would be spent (nothing is recorded).
            DataError: the ledger is not radfed's.
        """
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            if kind not in KINDS:
                raise ValueError(f"unknown privacy ledger kind {kind!r}")
            before = _total(self._entries(self.path.read_bytes()), kind)
            after = Spent(before.rounds + 1, before.rho + rho)
            if epsilon is not None and not after.epsilon(delta) <= epsilon:
                what = "round" if kind == "update" else "statistics release"
                msg = (
                    f"this {what} would spend the site's privacy budget: epsilon "
                    f"{after.epsilon(delta):.3g} > {epsilon:g} at delta {delta:g} after "
                    f"{before.rounds} DP {kind} releases ({_SECTION[kind]} epsilon in "
                    f"{POLICY_FILE_NAME})"
                )
                raise PolicyRefusal(msg)
            entry = {"run": run_id, "round": server_round, "rho": rho, "kind": kind}
            line = json.dumps(entry).encode()
            os.write(fd, line + b"\n")
            os.fsync(fd)
            return after
        finally:
            os.close(fd)

    def _entries(self, data: bytes) -> list[tuple[str, float]]:
        try:
            entries = []
            for line in data.splitlines():
                if line.strip():
                    entry = json.loads(line)
                    entries.append((str(entry.get("kind", "update")), float(entry["rho"])))
        except (ValueError, KeyError, TypeError, AttributeError):
            entries = [("", -1.0)]
        if any(not rho >= 0 or kind not in KINDS for kind, rho in entries):
            msg = f"{self.path.name}: the site's privacy ledger is not radfed's; restore it"
            raise DataError(msg)
        return entries


def _total(entries: list[tuple[str, float]], kind: str | None) -> Spent:
    rhos = [rho for k, rho in entries if kind is None or k == kind]
    return Spent(len(rhos), float(sum(rhos)))
