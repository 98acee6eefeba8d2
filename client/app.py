"""Flower ClientApp: a site's local training and evaluation (logic in radfed.site.handlers)."""

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from radfed.site.handlers import handle_evaluate, handle_query, handle_train

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train the received global model on this site's train split."""
    return handle_train(msg, context)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Evaluate the received model; reply with sufficient statistics only."""
    return handle_evaluate(msg, context)


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Say this site's name and versions (nothing else)."""
    return handle_query(msg, context)
