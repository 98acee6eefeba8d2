"""The ``radfed`` command: one typer app over the commands of each user role.

A command ends with one line ``error: ...`` and exit code 2 on a problem it can name (a
missing file, a bad setting), and never shows a traceback or local variables; an
unexpected error (a radfed bug) ends with one line naming the exception's type and where
it was raised, exit code 1 (``RADFED_DEBUG=1`` shows the traceback, still without locals).
"""

from __future__ import annotations

import sys
import traceback
from pathlib import Path
from typing import Annotated

import typer

import radfed
from radfed import __version__
from radfed.cli import central, researcher, runs, site
from radfed.cli.output import debug_requested, make_app, print_error
from radfed.errors import RadfedError

__all__ = ["app", "main"]

app = make_app("radfed: federated learning for radiology across hospital sites.")
site_app = make_app("Prepare, check and join a site; see what left it.")


@app.callback(invoke_without_command=True)
def _main(
    version: Annotated[
        bool, typer.Option("--version", is_eager=True, help="Print the version.")
    ] = False,
) -> None:
    if version:
        typer.echo(__version__)
        raise typer.Exit()


# researchers
app.command()(researcher.synth)
app.command()(researcher.simulate)
# site administrators
app.add_typer(site_app, name="site")
site_app.command("index")(site.site_index)
site_app.command("check")(site.site_check)
site_app.command("keygen")(site.site_keygen)
site_app.command("join")(site.site_join)
site_app.command("audit")(site.site_audit)
app.command()(site.evaluate)
app.command()(site.explain)
# the central team
app.add_typer(central.pki_app, name="pki")
app.add_typer(central.server_app, name="server")
app.command()(central.launch)
app.command()(central.report)
app.add_typer(runs.runs_app, name="runs")
app.add_typer(runs.store_app, name="store")
app.command()(runs.dashboard)


def main() -> None:
    """Entry point of the ``radfed`` console script and of ``python -m radfed``."""
    try:
        app()
    except RadfedError as err:  # a library error no command caught: its message is safe
        print_error(err)
        sys.exit(2)
    except Exception as err:
        if debug_requested():
            raise
        print_error(
            f"unexpected {type(err).__name__} at {_where(err)}; this is a radfed bug: "
            "please report it (RADFED_DEBUG=1 shows the traceback)"
        )
        sys.exit(1)


def _where(err: BaseException) -> str:
    """Where an exception was raised (file and line, no text), and the innermost radfed
    line on the way there when that is elsewhere."""
    frames = traceback.extract_tb(err.__traceback__)
    where = f"{Path(frames[-1].filename).name}:{frames[-1].lineno}"
    package = Path(radfed.__file__).parent
    ours = [f for f in frames if Path(f.filename).is_relative_to(package)]
    if ours and ours[-1] is not frames[-1]:
        inner = Path(ours[-1].filename).relative_to(package.parent)
        where += f" (from {inner}:{ours[-1].lineno})"
    return where
