"""The site's query budget: what a run may ask of it how often, whatever the server sends.

A federated run asks each site once per round to train and once to evaluate. A server that
asks more (the same round again and again, with models of its making) can sweep thresholds
over the same cases; the budget refuses it:

- one training and one evaluation per (run, round), and no round beyond the run's own
  ``num-server-rounds``: a second request, or a later round, is refused;
- statistics only of the splits the policy lists (``splits``; a site may keep its training
  split's statistics at home);
- the sealed test split at most ``test-evaluations`` times per run (default once), by
  default only in the run's last round, and ``test-evaluations-total`` times over all runs
  (default 20): every look at it is a chance to fit to it, and a fresh run id is free.

Every answered request is recorded in ``SITE_DIR/.radfed/queries.jsonl`` (0600, one JSON line
per request, appended under a lock) before any work is done, so a refused or failed request
still counts. ``radfed site audit`` shows what was asked and refused.
"""

from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from radfed.config import SPLITS
from radfed.errors import DataError
from radfed.folders import POLICY_FILE_NAME
from radfed.privacy.refusal import PolicyRefusal

__all__ = ["QueryBudget", "QueryLedger"]


@dataclass(frozen=True, kw_only=True)
class QueryBudget:
    """What a run may ask of the site (``[policy.queries]``).

    Attributes:
        splits: the splits whose statistics may leave.
        test_evaluations: evaluations of the sealed test split per run.
        test_last_round_only: the test split only in the run's last round.
        test_total: evaluations of the sealed test split over all runs.
    """

    splits: tuple[str, ...] = SPLITS
    test_evaluations: int = 1
    test_last_round_only: bool = True
    test_total: int = 20

    def check(
        self,
        ledger: QueryLedger,
        *,
        run_id: int,
        server_round: int,
        kind: str,
        splits: Sequence[str] = (),
        last_round: int = 0,
    ) -> None:
        """Admit one request and record it, or refuse it.

        Args:
            ledger: the site's record of answered requests.
            run_id: the run asking.
            server_round: the round it names.
            kind: ``train`` or ``evaluate``.
            splits: for an evaluation, the splits asked for.
            last_round: the run's last round (``num-server-rounds``).

        Raises:
            PolicyRefusal: the request is over budget (the message names the rule).
        """
        for split in splits:
            if split not in self.splits:
                msg = (
                    f"the run asks for statistics of the {split} split; this site's policy "
                    f"lets out {', '.join(self.splits) or 'none'} ([policy.queries] splits "
                    f"in {POLICY_FILE_NAME})"
                )
                raise PolicyRefusal(msg)
        with ledger.locked() as answered:
            if server_round > last_round:
                msg = (
                    f"run {run_id} asks for round {server_round} of a run of {last_round} "
                    "rounds (num-server-rounds); refused"
                )
                ledger.add([run_id, server_round, kind, "refused"])
                raise PolicyRefusal(msg)
            if any(a[:3] == [run_id, server_round, kind] for a in answered):
                msg = (
                    f"run {run_id} already asked this site to {kind} in round "
                    f"{server_round}; a run asks once per round (the request is refused)"
                )
                ledger.add([run_id, server_round, kind, "refused"])
                raise PolicyRefusal(msg)
            if "test" in splits:
                used = sum(1 for a in answered if a[0] == run_id and a[3] == "test")
                if used >= self.test_evaluations:
                    msg = (
                        f"run {run_id} already evaluated the sealed test split {used} "
                        f"time(s), the most this site's policy allows per run "
                        f"([policy.queries] test-evaluations)"
                    )
                    ledger.add([run_id, server_round, kind, "refused"])
                    raise PolicyRefusal(msg)
                overall = sum(1 for a in answered if a[3] == "test")
                if overall >= self.test_total:
                    msg = (
                        f"the sealed test split was evaluated {overall} times at this site, "
                        "the most its policy allows ([policy.queries] test-evaluations-total)"
                    )
                    ledger.add([run_id, server_round, kind, "refused"])
                    raise PolicyRefusal(msg)
                if self.test_last_round_only and server_round != last_round:
                    msg = (
                        f"the sealed test split is evaluated only in a run's last round "
                        f"({last_round}), not in round {server_round} ([policy.queries] "
                        "test-last-round-only)"
                    )
                    ledger.add([run_id, server_round, kind, "refused"])
                    raise PolicyRefusal(msg)
            ledger.add([run_id, server_round, kind, "test" if "test" in splits else ""])

    def describe(self) -> dict[str, object]:
        return {
            "splits": list(self.splits),
            "test-evaluations": self.test_evaluations,
            "test-last-round-only": self.test_last_round_only,
            "test-evaluations-total": self.test_total,
        }


class QueryLedger:
    """The site's record of the requests it answered: ``[run, round, kind, note]`` lines."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None

    def locked(self) -> _Locked:
        """A context holding the ledger's lock, giving the requests recorded so far."""
        return _Locked(self)

    def add(self, entry: list[object]) -> None:
        if self._fd is None:  # pragma: no cover - add is only called under the lock
            raise RuntimeError("the query ledger is not locked")
        line = json.dumps(entry).encode() + b"\n"
        if os.write(self._fd, line) != len(line):
            raise OSError("short write to the query ledger")
        os.fsync(self._fd)


class _Locked:
    def __init__(self, ledger: QueryLedger) -> None:
        self.ledger = ledger

    def __enter__(self) -> list[list[object]]:
        path = self.ledger.path
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX)
        self.ledger._fd = fd
        try:
            text = path.read_bytes().decode()
            answered = [json.loads(line) for line in text.splitlines() if line.strip()]
            if not all(isinstance(a, list) and len(a) == 4 for a in answered):
                raise ValueError
        except ValueError:
            self.__exit__()
            msg = f"{path.name}: the site's query ledger is not radfed's; restore it"
            raise DataError(msg) from None
        return answered

    def __exit__(self, *_: object) -> None:
        fd, self.ledger._fd = self.ledger._fd, None
        if fd is not None:
            os.close(fd)
