"""The ServerApp's work: build the global model, run the strategy, write the run folder."""

from __future__ import annotations

from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.serverapp import Grid

from radfed.config import RunConfig
from radfed.federation.run_folder import RunFolder
from radfed.federation.strategy import make_strategy
from radfed.federation.weights import shared_state
from radfed.log import logger
from radfed.plots import plot_curves
from radfed.tasks import build_model

__all__ = ["run_server"]


def run_server(grid: Grid, context: Context) -> Path:
    """Run a whole federated training as configured in ``context.run_config``.

    Returns:
        The run folder.
    """
    config = RunConfig.from_run_config(context.run_config)
    run = RunFolder.start(Path(config.out_dir).resolve(), config)
    model = build_model(config)
    reference = {k: v.detach().clone() for k, v in shared_state(model, config.fedbn).items()}
    run.save_checkpoint(0, reference, config)
    logger.info("run folder: %s", run.path)
    strategy = make_strategy(config, reference, run, max_update_norm=config.max_update_norm or None)
    strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord(reference),
        num_rounds=config.num_server_rounds,
        timeout=config.round_timeout,
        train_config=ConfigRecord({}),
        evaluate_config=ConfigRecord({}),
    )
    figure = plot_curves(run)
    logger.info(
        "run finished: %d rounds; metrics in %s, curves in %s",
        config.num_server_rounds,
        run.metrics_path,
        figure,
    )
    return run.path
