"""The live display of a run: progress lines drive a bar on a terminal, plain lines elsewhere."""

from __future__ import annotations

import io
import logging

from rich.console import Console

from radfed.cli.live import round_display, streamed_line
from radfed.log import logger
from radfed.progress import Progress, parse_progress


def test_a_progress_line_reads_back_as_written() -> None:
    step = Progress(round=2, rounds=5, phase="train", replied=2, asked=3, elapsed=14)

    assert step.line() == "round 2/5 train: 2 of 3 sites replied after 14 s"
    assert parse_progress(f"12:00:01 INFO    {step.line()}") == step
    assert parse_progress("round 2/5: 3 sites trained (local loss site-a 0.6)") is None


def test_on_a_terminal_the_bar_shows_the_round_and_hides_the_lines() -> None:
    # Prepare
    screen = Console(file=io.StringIO(), force_terminal=True, width=100)
    shown = io.StringIO()
    handler = logging.StreamHandler(shown)
    logging.getLogger().addHandler(handler)
    logger.setLevel(logging.INFO)

    # Execute
    try:
        with round_display(screen=screen) as feed:
            logger.info(Progress(1, 3, "train", 0, 3, 0).line())
            logger.info(Progress(1, 3, "train", 2, 3, 4).line())
            logger.info("round 1/3: 3 sites trained")
            printed = streamed_line(feed)
            printed(Progress(1, 3, "evaluate", 3, 3, 1).line() + "\n")
        bar = screen.file.getvalue()  # type: ignore[attr-defined]  # the last render included
    finally:
        logging.getLogger().removeHandler(handler)

    # Assert
    assert "round 1/3 train" in bar and "2 of 3 sites replied" in bar
    assert "round 1/3 evaluate" in bar and "3 of 3 sites replied" in bar
    assert shown.getvalue() == "round 1/3: 3 sites trained\n"  # progress lines not repeated


def test_elsewhere_progress_stays_plain_log_lines() -> None:
    # Prepare
    screen = Console(file=io.StringIO(), force_terminal=False)

    # Execute
    with round_display(screen=screen) as feed:
        taken = feed(Progress(1, 3, "train", 1, 3, 2).line())

    # Assert
    assert taken is False
    assert screen.file.getvalue() == ""  # type: ignore[attr-defined]
