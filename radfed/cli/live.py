"""The live display of a federated run: which round, how many sites replied, for how long.

The ServerApp logs a progress line each time replies arrive (``radfed.progress``). On a
terminal those lines drive one progress bar (the round, its phase, sites replied of
sites asked, time elapsed) and are not printed; elsewhere (logs, CI, a pipe) they stay
plain log lines. ``radfed simulate`` sees the ServerApp's log records in its own process;
``radfed launch`` reads the log the server streams, line by line.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Callable, Iterator

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.text import Text

from radfed.cli.output import console
from radfed.progress import parse_progress

__all__ = ["round_display", "streamed_line"]


@contextlib.contextmanager
def round_display(*, screen: Console | None = None) -> Iterator[Callable[[str], bool]]:
    """Show the run's progress while the block runs.

    Yields:
        ``feed(text)``: takes a log line; True when the display showed it (a progress
        line on a terminal), so that the caller does not print it as well.
    """
    screen = screen or console
    if not screen.is_terminal:
        yield lambda _text: False
        return
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.fields[sites]}"),
        TimeElapsedColumn(),
        console=screen,
        transient=True,
    ) as bar:
        task = bar.add_task("waiting for the sites", total=None, sites="")
        current: list[tuple[int, str]] = []

        def feed(text: str) -> bool:
            found = parse_progress(text)
            if found is None:
                return False
            step = (found.round, found.phase)
            if current != [step]:  # a new phase: its own clock
                current[:] = [step]
                bar.reset(task)
            label = "survey" if found.round == 0 else f"round {found.round}/{found.rounds}"
            bar.update(
                task,
                description=f"{label} {found.phase}" if found.round else "survey of the sites",
                completed=found.replied,
                total=found.asked,
                sites=f"{found.replied} of {found.asked} sites replied",
            )
            return True

        handler = _ProgressHandler(feed)
        logging.getLogger("radfed").addHandler(handler)
        hidden = _HideProgress()
        for root_handler in logging.getLogger().handlers:
            root_handler.addFilter(hidden)
        try:
            yield feed
        finally:
            logging.getLogger("radfed").removeHandler(handler)
            for root_handler in logging.getLogger().handlers:
                root_handler.removeFilter(hidden)


def streamed_line(feed: Callable[[str], bool]) -> Callable[[str], None]:
    """A handler of a streamed log's lines: each goes to the display, and is printed as
    it is unless the display showed it."""

    def show(line: str) -> None:
        if feed(line):
            return
        if console.is_terminal:
            console.print(Text(line.rstrip("\n")), soft_wrap=True)
        else:
            sys.stdout.write(line)
            sys.stdout.flush()

    return show


class _ProgressHandler(logging.Handler):
    """Feeds the radfed logger's progress records to the display."""

    def __init__(self, feed: Callable[[str], bool]) -> None:
        super().__init__(logging.INFO)
        self.feed = feed

    def emit(self, record: logging.LogRecord) -> None:
        self.feed(record.getMessage())


class _HideProgress(logging.Filter):
    """Keeps the progress lines the bar shows off the terminal's log."""

    def filter(self, record: logging.LogRecord) -> bool:
        return parse_progress(record.getMessage()) is None
