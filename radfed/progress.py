"""The server's progress lines: written to the log as a round goes, read back by the CLI.

The ServerApp logs one line each time replies arrive (``round 2/5 train: 2 of 3 sites
replied after 14 s``). ``radfed simulate`` sees these log records in its own process and
``radfed launch`` sees them in the log the SuperLink streams; both parse them with
``parse_progress`` to drive a progress display, so the two agree by construction.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["Progress", "parse_progress"]

_LINE = re.compile(
    r"round (?P<round>\d+)/(?P<rounds>\d+) (?P<phase>[a-z]+): (?P<replied>\d+) of "
    r"(?P<asked>\d+) sites replied after (?P<elapsed>\d+) s"
)


@dataclass(frozen=True)
class Progress:
    """Where a round stands: ``replied`` of ``asked`` sites answered ``phase``."""

    round: int
    rounds: int
    phase: str
    replied: int
    asked: int
    elapsed: int

    def line(self) -> str:
        """The log line (``parse_progress`` reads it back)."""
        return (
            f"round {self.round}/{self.rounds} {self.phase}: {self.replied} of {self.asked} "
            f"sites replied after {self.elapsed} s"
        )


def parse_progress(text: str) -> Progress | None:
    """The progress in a log line, or None when the line is not a progress line."""
    found = _LINE.search(text)
    if found is None:
        return None
    return Progress(
        round=int(found["round"]),
        rounds=int(found["rounds"]),
        phase=found["phase"],
        replied=int(found["replied"]),
        asked=int(found["asked"]),
        elapsed=int(found["elapsed"]),
    )
