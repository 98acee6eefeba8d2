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

from radfed import __version__
from radfed.cli import central, researcher, site
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
site_app.command("join")(site.site_join)
site_app.command("audit")(site.site_audit)
app.command()(site.evaluate)
app.command()(site.explain)
# the central team
app.add_typer(central.pki_app, name="pki")
app.add_typer(central.server_app, name="server")
app.command()(central.launch)
app.command()(central.report)


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
        frame = traceback.extract_tb(err.__traceback__)[-1]
        print_error(
            f"unexpected {type(err).__name__} at {Path(frame.filename).name}:{frame.lineno}; "
            "this is a radfed bug: please report it (RADFED_DEBUG=1 shows the traceback)"
        )
        sys.exit(1)
