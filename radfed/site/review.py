"""What a site's audit log shows that its administrator should look at: signs that the
server asked for more than a federated run needs.

A run asks each site once per round to train and once to evaluate; the weights it evaluates
in round r are the global model the site then trains from in round r + 1. Against a server
that crafts the models it sends (for example shifting a model's bias to sweep thresholds
over the same cases), only noise protects the statistics; these findings make such a sweep
visible after the fact:

- *repeated evaluation*: one round of a run evaluated more than once;
- *evaluated other weights*: the weights evaluated in round r differ from those the site
  received to train in round r + 1 (the round's global model);
- *sealed test split*: an evaluation asked for the ``test`` split;
- *refused bundle*: a run of an app bundle the site policy does not accept.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

from radfed.federation.codes import ErrorCode
from radfed.privacy import AuditEntry

__all__ = ["Finding", "review"]


@dataclass(frozen=True)
class Finding:
    """One thing the audit log shows. ``kind``: repeated evaluation, evaluated other weights,
    sealed test split, refused bundle."""

    kind: str
    run: int
    server_round: int
    detail: str

    def line(self) -> str:
        return f"run {self.run} round {self.server_round}: {self.kind}: {self.detail}"


def review(entries: Sequence[AuditEntry]) -> list[Finding]:
    """The findings of an audit log, in the order of the entries they concern.

    Entries of the first log format (no request recorded) are not judged.
    """
    evaluations: dict[tuple[int, int], list[AuditEntry]] = defaultdict(list)
    trained_from: dict[tuple[int, int], str | None] = {}
    findings: list[Finding] = []
    for entry in entries:
        request = entry.request
        if request is None:
            continue
        key = (entry.run_id, entry.server_round)
        if request.category == "evaluate":
            evaluations[key].append(entry)
            if "test" in request.eval_splits:
                findings.append(
                    Finding("sealed test split", *key, "an evaluation asked for the test split")
                )
        elif request.category == "train":
            trained_from.setdefault(key, request.weights_sha256)
        if entry.error_code == ErrorCode.BUNDLE:
            bundle = (request.bundle_sha256 or "?")[:16]
            findings.append(
                Finding("refused bundle", *key, f"a run of bundle {bundle}... was refused")
            )
    for (run, round_), evaluated in sorted(evaluations.items()):
        if len(evaluated) > 1:
            findings.append(
                Finding(
                    "repeated evaluation",
                    run,
                    round_,
                    f"evaluated {len(evaluated)} times (a run evaluates each round once)",
                )
            )
        global_model = trained_from.get((run, round_ + 1))
        for entry in evaluated:
            weights = entry.request.weights_sha256 if entry.request is not None else None
            if global_model is not None and weights is not None and weights != global_model:
                findings.append(
                    Finding(
                        "evaluated other weights",
                        run,
                        round_,
                        "the weights evaluated differ from the global model the site trained "
                        f"from in round {round_ + 1}",
                    )
                )
                break
    return findings
