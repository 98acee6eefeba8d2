"""Flower ServerApp: runs radfed's federated training (logic in radfed.central.server)."""

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from radfed.central.server import run_server

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Train the global model for the configured rounds and write the run folder."""
    run_server(grid, context)
