"""Commands of the central team over the run store: ``runs``, ``store`` and ``dashboard``."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.measure import Measurement
from rich.table import Table
from rich.text import Text

from radfed.cli.output import attempt, console, fail, make_app, setup_logging
from radfed.errors import ConfigError
from radfed.folders import POOLED_SITE, STORE_ENV

__all__ = ["dashboard", "runs_app", "store_app", "use_store"]

runs_app = make_app("The runs in the run store: list them, show one, export one to MLflow.")
store_app = make_app("The run store: load run folders into it, upgrade its schema.")

_STORE_HELP = (
    "The run store (a SQLAlchemy URL: sqlite:////path/runs.sqlite or "
    "postgresql+psycopg://user@host/db). Default: $RADFED_STORE, else "
    "~/.local/share/radfed/runs.sqlite."
)
Store = Annotated[str | None, typer.Option("--store", help=_STORE_HELP, show_default=False)]
AsJson = Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")]


def use_store(given: str | None) -> None:
    """Point the run about to start at the store (``RADFED_STORE``), checked first.

    A store that is down only warns: the run goes on and ``radfed store import`` (or the
    run itself, once the store is back) catches it up from the run folder.
    """
    from sqlalchemy.exc import SQLAlchemyError

    from radfed.store import open_store, shown_url, store_url

    url = store_url(given)
    if url is None:
        os.environ[STORE_ENV] = "none"
        return
    os.environ[STORE_ENV] = url
    try:
        open_store(url).dispose()
    except ConfigError as err:
        fail(err)
    except SQLAlchemyError as err:
        console.print(
            Text(
                f"warning: the run store {shown_url(url)} is unavailable ({type(err).__name__}); "
                "the run goes on and the store catches up when it is back"
            ),
            soft_wrap=True,
        )


def _engine(given: str | None) -> Any:
    from sqlalchemy.exc import SQLAlchemyError

    from radfed.store import open_store, shown_url, store_url

    url = store_url(given)
    if url is None:
        fail(f"the run store is off ({STORE_ENV}=none); give --store URL")
    try:
        return open_store(url)
    except ConfigError as err:
        fail(err)
    except SQLAlchemyError as err:
        fail(
            f"the run store {shown_url(url)} cannot be opened ({type(err).__name__}); check "
            "that its server is running and the URL"
        )


@runs_app.command("list")
def runs_list(store: Store = None, as_json: AsJson = False) -> None:
    """List the runs: status, rounds done, sites, latest pooled headline metric, verdicts."""
    from radfed.store import list_runs

    setup_logging(False)
    found = list_runs(_engine(store))
    if as_json:
        typer.echo(json.dumps(found, indent=2))
        return
    if not found:
        typer.echo("no runs in the store yet; `radfed simulate` or `radfed store import` adds one")
        return
    title = f"{len(found)} run(s)"
    table = Table(title=title)
    for column in (
        "run",
        "name",
        "status",
        "rounds",
        "sites",
        "pooled",
        "flagged",
        "inconclusive",
        "started",
    ):
        table.add_column(column, no_wrap=column in ("run", "started"))
    for run in found:
        pooled = run["pooled"] or {}
        verdicts = run["verdicts"] or {}
        table.add_row(
            run["id"][:8],
            run["name"],
            run["status"],
            f"{run['rounds_done']}/{run['rounds_planned']}",
            str(run["sites"]),
            _headline(pooled),
            str(verdicts.get("flagged", "-")),
            str(verdicts.get("inconclusive", "-")),
            (run["started_at"] or "")[:19].replace("T", " "),
        )
    out = Console(highlight=False)
    natural = Measurement.get(out, out.options.update(max_width=10_000), table).maximum
    if natural <= out.width:
        out.print(table)
        return
    out.print(title)  # too narrow for the table (a log, a pipe): one line per run
    for run in found:
        verdicts = run["verdicts"] or {}
        out.print(
            Text(
                f"  {run['id'][:8]} {run['name']}: {run['status']}, round "
                f"{run['rounds_done']}/{run['rounds_planned']}, {run['sites']} sites, "
                f"pooled {_headline(run['pooled'] or {})}, {verdicts.get('flagged', 0)} flagged, "
                f"{verdicts.get('inconclusive', 0)} inconclusive; started {run['started_at']}"
            ),
            soft_wrap=True,
        )


@runs_app.command("show")
def runs_show(
    run: Annotated[str, typer.Argument(help="A run id (or its start) or a run folder's name.")],
    store: Store = None,
    as_json: AsJson = False,
) -> None:
    """One run: status, sites and their state, the latest round per site, flagged and
    inconclusive gaps."""
    from radfed.store import find_run, run_detail

    setup_logging(False)
    engine = _engine(store)
    detail = attempt(lambda: run_detail(engine, find_run(engine, run)))
    if as_json:
        typer.echo(json.dumps(detail, indent=2))
        return
    out = Console(highlight=False)
    for line in show_lines(detail):
        out.print(Text(line), soft_wrap=True)


def show_lines(detail: dict[str, Any]) -> list[str]:
    """``radfed runs show`` as plain lines."""
    lines = [
        f"run {detail['id']} ({detail['name']}): {detail['status']}"
        + (f" ({detail['status_reason']})" if detail.get("status_reason") else ""),
        f"  {detail['task']}, {detail['strategy']}, round {detail['rounds_done']} of "
        f"{detail['rounds_planned']}; started {detail['started_at']}, last news "
        f"{detail['updated_at']}",
        f"  folder: {detail['folder']}",
        f"sites ({len(detail['sites'])}):",
    ]
    for site in detail["sites"]:
        refusals = ", ".join(f"code {c}: {n}" for c, n in site["refusals"].items())
        lines.append(
            f"  {site['name']}: {site['state']}"
            + (f" ({site['reason']})" if site["reason"] else "")
            + f"; {site['replies']} replies, {site['failures']} failures"
            + (f", refusals {refusals}" if refusals else "")
        )
    headline = detail["headline"]
    if detail["latest_round"] is not None:
        lines.append(f"round {detail['latest_round']}, {headline} (pooled = {POOLED_SITE}):")
        for split, rows in sorted(detail["latest"].items()):
            shown = " | ".join(
                f"{r['site']} "
                + ("suppressed" if r["suppressed"] else _value(r["metrics"].get(headline)))
                for r in rows
            )
            lines.append(f"  {split}: {shown}")
    report = detail["report"]
    if report is None:
        lines.append("bias report: none yet")
        return lines
    counts = report["counts"]
    lines.append(
        f"bias report (round {report['round']}): {counts.get('flagged', 0)} flagged, "
        f"{counts.get('inconclusive', 0)} inconclusive (too few cases), "
        f"{counts.get('within margin', 0)} within margin"
    )
    for gap in report["gaps"]:
        if gap.get("verdict") != "flagged":
            continue
        lines.append("  flagged: " + _gap_text(gap))
    for gap in report["largest_inconclusive"]:
        lines.append("  inconclusive: " + _gap_text(gap))
    return lines


def _gap_text(gap: dict[str, Any]) -> str:
    first = gap.get("first") or gap.get("worst") or gap.get("group") or {}
    second = gap.get("second") or gap.get("best") or gap.get("rest") or {}
    value, low, high = (
        _value((gap.get("difference") or {}).get(k), signed=True) for k in ("value", "low", "high")
    )
    where = f"{gap.get('split', '')} {gap.get('site')} {gap.get('attribute')} {gap.get('metric')}"
    return f"{where}: {first.get('group')} vs {second.get('group')} {value} [{low}, {high}]"


def _headline(pooled: dict[str, Any]) -> str:
    if not pooled:
        return "-"
    return f"{pooled['metric']} {_value(pooled['value'])} ({pooled['split']})"


def _value(value: float | None, *, signed: bool = False) -> str:
    if value is None:
        return "n/a"
    return f"{value:+.3f}" if signed else f"{value:.3f}"


@runs_app.command("export-mlflow")
def runs_export_mlflow(
    run_dir: Annotated[Path, typer.Argument(help="The run folder to export.")],
    tracking_uri: Annotated[
        str, typer.Option(help="The MLflow tracking server or store (e.g. http://mlflow:5000).")
    ],
    experiment: Annotated[str, typer.Option(help="The MLflow experiment.")] = "radfed",
    replace: Annotated[
        bool, typer.Option(help="Replace this run if it was exported before.")
    ] = False,
) -> None:
    """Export a run to MLflow: per-site and pooled metrics per round, the configuration as
    parameters, the bias report and curves as artifacts (never the weights)."""
    from radfed.store.mlflow_export import export_run

    setup_logging(False)
    run_id = attempt(
        export_run, run_dir, tracking_uri=tracking_uri, experiment=experiment, replace=replace
    )
    typer.echo(f"exported {run_dir} to MLflow run {run_id} (experiment {experiment})")


@store_app.command("import")
def store_import(
    run_dirs: Annotated[
        list[Path], typer.Argument(help="Run folders to load (or bring up to date).")
    ],
    store: Store = None,
) -> None:
    """Load run folders into the store; a run already there is brought up to date."""
    from radfed.store import sync_run

    setup_logging(False)
    engine = _engine(store)
    for run_dir in run_dirs:
        run_id = attempt(sync_run, engine, run_dir)
        typer.echo(f"{run_dir}: run {run_id}")


@store_app.command("upgrade")
def store_upgrade(store: Store = None) -> None:
    """Bring the store's schema to this radfed's newest revision (opening it does too)."""
    from radfed.store.engine import head_revision, revision_of

    setup_logging(False)
    engine = _engine(store)
    typer.echo(f"the store is at schema revision {revision_of(engine)} (newest: {head_revision()})")


def dashboard(
    store: Store = None,
    host: Annotated[
        str, typer.Option(help="Address to listen on (loopback by default).")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8765,
    token: Annotated[
        str | None,
        typer.Option(
            envvar="RADFED_DASHBOARD_TOKEN",
            help="Token every request must carry; required to listen beyond loopback "
            "(or set RADFED_DASHBOARD_TOKEN).",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Serve the read-only dashboard of the run store: runs, per-site curves, site status,
    the bias report's verdicts and the event log, updated while runs go."""
    from radfed.dashboard import serve
    from radfed.store import store_url

    setup_logging(False)
    url = store_url(store)
    if url is None:
        fail(f"the run store is off ({STORE_ENV}=none); give --store URL")
    attempt(serve, url, host=host, port=port, token=token)
