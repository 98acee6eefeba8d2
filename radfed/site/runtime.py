"""radfed's ``flwr-clientapp``: the process Flower starts at a site for each task.

Flower's own ``flwr-clientapp`` installs the run's app bundle and imports the ClientApp its
``pyproject.toml`` names, the bundle folder first on ``sys.path``: the server would decide
which code runs at the site, and could even shadow the installed radfed. This process reads
the bundle only as data (``radfed.site.bundle``) and answers with the ClientApp of the
radfed installed here (``radfed.site.app``); the site policy's ``[policy.bundle]`` decides
whether the site takes part in the run at all. ``radfed site join`` puts it first on the
PATH of the SuperExec, under the name Flower starts (``radfed.deployment.supernode``).
"""

from __future__ import annotations

from flwr.clientapp import ClientApp

from radfed.flower_private import run_site_clientapp
from radfed.site.app import make_client_app
from radfed.site.bundle import read_bundle

__all__ = ["load_site_app", "main"]


def load_site_app(bundle: bytes) -> ClientApp:
    """The site's own ClientApp for a task of the run that ``bundle`` belongs to."""
    return make_client_app(read_bundle(bundle))


def main() -> None:
    """Entry point of the ``flwr-clientapp`` that ``radfed site join`` installs."""
    run_site_clientapp(load_site_app)
