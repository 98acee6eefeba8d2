"""Output shared by the ``radfed`` commands: logging, progress bars, errors, run summaries."""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

__all__ = ["attempt", "console", "fail", "print_summary", "progress", "setup_logging"]

console = Console(stderr=True)
_T = TypeVar("_T")


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


def fail(err: Exception) -> NoReturn:
    console.print(f"[bold red]error:[/] {err}", highlight=False, soft_wrap=True)
    raise typer.Exit(code=2)


def attempt(call: Callable[..., _T], *args: Any, **kwargs: Any) -> _T:
    """``call(*args, **kwargs)``; a radfed error ends the command with its message (exit 2)."""
    from radfed.errors import RadfedError

    try:
        return call(*args, **kwargs)
    except RadfedError as err:
        fail(err)


def print_summary(folder: Path) -> None:
    from radfed.federation.run_folder import POOLED_SITE, RunFolder
    from radfed.tasks import get_task

    run = RunFolder(folder)
    lines = list(run.read_metrics())
    last = max(line["round"] for line in lines)
    config = json.loads((folder / "config.json").read_text())["run-config"]
    keys = get_task(config["task"]).summary
    table = Table(title=f"round {last} (pooled = {POOLED_SITE}, from merged statistics)")
    for column in ("site", "split", "n", *keys):
        table.add_column(column)
    for line in lines:
        if line["round"] == last:
            m = line["metrics"]
            n = "suppressed" if line.get("suppressed") else str(line["n"])
            table.add_row(line["site"], line["split"], n, *(_fmt(m.get(k)) for k in keys))
    out = Console()
    out.print(table)
    out.print(f"run folder: {folder}")
    out.print(f"  metrics:     {run.metrics_path}")
    out.print(f"  config:      {folder / 'config.json'}")
    out.print(f"  checkpoints: {run.checkpoints}")
    out.print(f"  curves:      {folder / 'curves.png'}")
    out.print(f"  bias report: {folder / 'bias_report.html'}")
    if run.bias_report_path.is_file():
        _print_flags(out, run.read_bias_report())


def _print_flags(out: Console, report: dict[str, Any]) -> None:
    """The flagged subgroup gaps of a bias report, worst first, at most ten."""
    flagged = [
        (split, gap)
        for split, body in report["splits"].items()
        for gap in body["gaps"]
        if gap["flagged"]
    ]
    if not flagged:
        out.print(
            f"bias report: no gap flagged (margin {report['settings']['margin']:g}, "
            "interval of the difference must exclude 0)"
        )
        return
    flagged.sort(key=lambda item: -abs(item[1]["difference"]["value"]))
    out.print(f"bias report: {len(flagged)} gap(s) flagged, largest first:")
    for split, gap in flagged[:10]:
        d = gap["difference"]
        out.print(
            f"  {split} {gap['site']} {gap['attribute']} {gap['metric']}: "
            f"{gap['worst']['group']} {gap['worst']['value']:.3f} vs "
            f"{gap['best']['group']} {gap['best']['value']:.3f} "
            f"(difference {d['value']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}])"
        )


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"
