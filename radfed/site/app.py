"""The site's ClientApp: the radfed installed at the site answers every message of a run.

``make_client_app`` builds it for one task of a deployed site (with the run's app bundle,
which the site policy must accept) or for a simulation (without). The repository's
``client/app.py`` is the same app, for ``radfed simulate`` and ``flwr run``.
"""

from __future__ import annotations

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from radfed.site.bundle import BundleIdentity
from radfed.site.handlers import site_handlers

__all__ = ["app", "make_client_app"]


def make_client_app(bundle: BundleIdentity | None = None) -> ClientApp:
    """The ClientApp: train, evaluate and query, each through the site's egress."""
    handlers = site_handlers(bundle)
    client_app = ClientApp()

    @client_app.train()
    def train(msg: Message, context: Context) -> Message:
        """Train the received global model on this site's train split."""
        return handlers["train"](msg, context)

    @client_app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        """Evaluate the received model; reply with sufficient statistics only."""
        return handlers["evaluate"](msg, context)

    @client_app.query()
    def query(msg: Message, context: Context) -> Message:
        """Say this site's name and versions (nothing else)."""
        return handlers["query"](msg, context)

    return client_app


#: The app of a simulation (no bundle check: the researcher runs both sides).
app = make_client_app()
