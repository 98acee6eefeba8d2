"""What the ``radfed`` commands show: logging, progress bars, errors and run summaries.

Every message is printed as plain text, never as console markup: an error may quote a
value the user typed, and a square bracket in it must reach the screen as it is.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.measure import Measurement
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text

from radfed.errors import RadfedError
from radfed.folders import POOLED_SITE, RunFiles

__all__ = [
    "attempt",
    "console",
    "debug_requested",
    "fail",
    "make_app",
    "print_error",
    "print_summary",
    "progress",
    "setup_logging",
    "summary_lines",
]

console = Console(stderr=True, highlight=False)
_T = TypeVar("_T")


def make_app(help_text: str, **options: Any) -> typer.Typer:
    """A typer app (or command group) that never shows local variables in a traceback: they
    can hold arguments, the environment and values read from headers."""
    return typer.Typer(
        help=help_text,
        no_args_is_help=True,
        add_completion=False,
        pretty_exceptions_show_locals=False,
        rich_markup_mode=None,
        **options,
    )


def setup_logging(verbose: bool) -> None:
    handler: logging.Handler
    if console.is_terminal:
        handler = RichHandler(console=console, show_path=False, show_time=True, markup=False)
        handler.setFormatter(logging.Formatter("%(message)s"))
    else:  # logs and CI: one unwrapped line per record
        handler = logging.StreamHandler()
        handler.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)-7s %(message)s", "%H:%M:%S")
        )
    logging.basicConfig(level=logging.WARNING, handlers=[handler], force=True)
    logging.getLogger("radfed").setLevel(logging.DEBUG if verbose else logging.INFO)
    if not verbose:
        # Flower logs every message at INFO; radfed's own lines show the progress.
        logging.getLogger("flwr").setLevel(logging.WARNING)


@contextlib.contextmanager
def progress(description: str) -> Iterator[Callable[[int, int], None]]:
    """A progress bar on a terminal (none in logs and CI); yields ``update(done, total)``."""
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=True,
        disable=not console.is_terminal,
    ) as bar:
        task = bar.add_task(description, total=None)

        def update(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        yield update


def print_error(err: Exception | str) -> None:
    """One line ``error: ...`` on standard error, the text as it is (no console markup)."""
    line = Text("error: ", style="bold red")
    line.append(str(err))
    console.print(line, soft_wrap=True)


def fail(err: Exception | str, *, code: int = 2) -> NoReturn:
    """End the command with one line ``error: ...`` and exit ``code``."""
    print_error(err)
    raise typer.Exit(code=code)


def attempt(call: Callable[..., _T], *args: Any, **kwargs: Any) -> _T:
    """``call(*args, **kwargs)``; a radfed error ends the command with its message (exit 2)."""
    try:
        return call(*args, **kwargs)
    except RadfedError as err:
        fail(err)


def print_summary(folder: Path, headline: tuple[str, ...], *, resume_hint: str = "") -> None:
    """The last round's metrics per site and split, the run folder and the flagged gaps.

    Args:
        folder: the run folder.
        headline: the task's summary metrics (``Task.summary``); those that no line holds
            (balanced accuracy of a binary classifier) are left out.
        resume_hint: how to continue the run when no round completed.
    """
    files = RunFiles(folder)
    lines = list(files.read_metrics()) if files.metrics.is_file() else []
    out = Console(highlight=False)
    if not lines:
        fail(
            f"no round completed in {folder}; nothing to summarise"
            + (f"; continue with {resume_hint}" if resume_hint else ""),
            code=1,
        )
    last = max(line["round"] for line in lines)
    rows = [line for line in lines if line["round"] == last]
    keys = [k for k in headline if any(line["metrics"].get(k) is not None for line in rows)]
    title = f"round {last} (pooled = {POOLED_SITE}, from merged statistics)"
    table = _summary_table(title, rows, keys)
    natural = Measurement.get(out, out.options.update(max_width=10_000), table).maximum
    if natural > out.width:  # the table would cut names and numbers: one line per row instead
        out.print(title)
        for text in summary_lines(rows, keys):
            out.print(Text(text), soft_wrap=True)
    else:
        out.print(table)
    out.print(Text(f"run folder: {folder}"), soft_wrap=True)
    for label, path in (
        ("metrics", files.metrics),
        ("config", files.config),
        ("checkpoints", files.checkpoints),
        ("curves", files.curves),
        ("bias report", files.bias_report_html),
    ):
        if path.exists():
            out.print(Text(f"  {label + ':':<12} {path}"), soft_wrap=True)
    if files.bias_report.is_file():
        for text in _flag_lines(files.read_bias_report()):
            out.print(Text(text), soft_wrap=True)
    planned = files.read_config().get("run-config", {}).get("num-server-rounds", last)
    if last < planned:
        note = f"the run stopped after round {last} of {planned}"
        out.print(Text(note + (f"; continue with {resume_hint}" if resume_hint else "")))


def _summary_table(title: str, rows: list[dict[str, Any]], keys: list[str]) -> Table:
    table = Table(title=title)
    for column in ("site", "split", "n", *keys):
        table.add_column(
            column, no_wrap=True, justify="left" if column in ("site", "split") else "right"
        )
    for row in rows:
        n = _count(row)
        table.add_row(row["site"], row["split"], n, *(_fmt(row["metrics"].get(k)) for k in keys))
    return table


def _count(row: Mapping[str, Any]) -> str:
    """A row's case count: ``suppressed``, exact, or noisy (DP statistics: ``~n``)."""
    if row.get("suppressed"):
        return "suppressed"
    return f"~{row['n']}" if row.get("noise_sd") else str(row["n"])


def summary_lines(rows: list[dict[str, Any]], keys: list[str]) -> list[str]:
    """The summary as one line per (site, split): readable at any width, and in logs."""
    out = []
    for row in rows:
        n = _count(row)
        n = n if row.get("suppressed") else f"n {n}"
        values = ", ".join(f"{k} {_fmt(row['metrics'].get(k))}" for k in keys)
        out.append(f"  {row['site']} {row['split']}: {n}" + (f"; {values}" if values else ""))
    return out


def _flag_lines(report: Mapping[str, Any]) -> list[str]:
    """The bias report's verdicts: counts, the flagged gaps (largest first, with the sites
    that drive a pooled one), the largest inconclusive gaps, and in-sample warnings apart.
    "No gap flagged" is never said alone while some gap is inconclusive."""
    margin = report["settings"]["margin"]
    gaps = [(split, gap) for split, body in report["splits"].items() for gap in body["gaps"]]
    by = {v: [(s, g) for s, g in gaps if g.get("verdict") == v] for v in _VERDICTS}
    flagged, unsure = by["flagged"], by["inconclusive"]
    out = [
        f"bias report: {len(flagged)} gap(s) flagged, {len(by['within margin'])} within margin "
        f"±{margin:g}, {len(unsure)} inconclusive (too few cases)"
    ]
    if not flagged and unsure:
        out.append(
            "  no gap is flagged, but the inconclusive gaps are not evidence of no bias: "
            "see the largest below"
        )
    for title, chosen in (("flagged, largest first", flagged), ("largest inconclusive", unsure)):
        chosen = sorted(chosen, key=lambda item: -abs(item[1]["difference"]["value"] or 0.0))
        if chosen:
            out.append(f"  {title}:")
        out.extend(f"    {_gap_line(split, gap)}" for split, gap in chosen[:5])
    if by["in-sample warning"]:
        out.append("  in-sample warnings (a group fails on its own training cases):")
        out.extend(f"    {_gap_line(s, g)}" for s, g in by["in-sample warning"][:5])
    return out


_VERDICTS = ("flagged", "within margin", "inconclusive", "in-sample warning")


def _gap_line(split: str, gap: Mapping[str, Any]) -> str:
    first, second = ("worst", "best") if gap["comparison"] == "worst vs best" else ("group", "rest")
    a, b, d = gap[first], gap[second], gap["difference"]
    interval = "" if d["low"] is None else f" [{d['low']:+.3f}, {d['high']:+.3f}]"
    text = (
        f"{split} {gap['site']} {gap['attribute']} {gap['metric']}: "
        f"{a['group']} {_fmt(a['value'])} (n {a['n']}) vs {b['group']} {_fmt(b['value'])} "
        f"(n {b['n']}), difference {_signed(d['value'])}{interval}"
    )
    attribution = gap.get("attribution")
    if gap["verdict"] == "flagged" and attribution:
        drivers = ", ".join(attribution["drivers"]) or "no single site"
        kind = (
            "between sites: no site holds both groups"
            if attribution.get("confounded_with_site")
            else "heterogeneous across sites"
            if attribution["heterogeneous"]
            else "consistent across sites"
        )
        text += f"; driven by {drivers} ({kind})"
    needed = gap.get("cases_needed")
    if needed:
        text += "; resolved at about " + " and ".join(f"{n} {g}" for g, n in needed.items())
    return text


def _signed(value: float | None) -> str:
    return "n/a" if value is None else f"{value:+.3f}"


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def debug_requested() -> bool:
    """``RADFED_DEBUG=1``: show the traceback of an unexpected error (a radfed bug)."""
    return os.environ.get("RADFED_DEBUG", "") not in ("", "0")
