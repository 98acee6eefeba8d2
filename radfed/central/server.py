"""The ServerApp's work: build the global model, run the rounds, write the run folder."""

from __future__ import annotations

from pathlib import Path

import torch
from flwr.app import ArrayRecord, Context
from flwr.serverapp import Grid
from torch import nn

from radfed.bias.figures import plot_curves
from radfed.bias.html import render_html
from radfed.central.registered import RegisteredGrid
from radfed.central.rounds import load_site_registry, restore_strategy_state, run_rounds
from radfed.central.run_folder import RunFolder
from radfed.central.strategy import make_strategy
from radfed.config import RunConfig
from radfed.errors import ConfigError, RadfedError
from radfed.federation.checkpoint import load_checkpoint
from radfed.federation.weights import check_fedbn, shared_state
from radfed.flower_private import log_like_flower, quick_object_pulls
from radfed.folders import RunEvent
from radfed.log import logger
from radfed.store import StoreFeed
from radfed.tasks import Task, get_task

__all__ = ["REPLY_PULLS", "render_report", "run_server"]


def render_report(run: RunFolder) -> Path | None:
    """Render the run's bias_report.json (the last evaluated round) to bias_report.html.

    Returns:
        The HTML file, or None when no round was evaluated.
    """
    if not run.bias_report_path.is_file():
        return None
    return render_html(run.read_bias_report(), run.files.bias_report_html)


def load_initial_weights(model: nn.Module, path: Path) -> None:
    """Start from local weights (a radfed checkpoint or a state dict) instead of the seed.

    Raises:
        ConfigError: the file is missing, unreadable, or its weights do not fit the model.
    """
    if not path.is_file():
        raise ConfigError(f"init-checkpoint {path} not found; give a local weights file")
    try:
        stored = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        raise ConfigError(
            f"init-checkpoint {path.name} is not a tensor-only weights file"
        ) from None
    state = stored.get("state_dict", stored) if isinstance(stored, dict) else None
    if not isinstance(state, dict):
        raise ConfigError(f"init-checkpoint {path.name} holds no state dict")
    try:
        model.load_state_dict(state)
    except RuntimeError:
        raise ConfigError(
            f"init-checkpoint {path.name} does not fit the configured model"
        ) from None
    logger.info("starting from the weights in %s", path.name)


#: The ServerApp's module that pulls the sites' replies (Flower's ``Grid`` of a deployment).
REPLY_PULLS = "flwr.superlink.grid.http_grid"


def run_server(grid: Grid, context: Context) -> Path:
    """Run a whole federated training as configured in ``context.run_config``.

    Returns:
        The run folder.
    """
    log_like_flower()
    config = RunConfig.from_run_config(context.run_config)
    # the replies, from the SuperLink: a site that announces one and withholds its weights
    # holds the round no longer than its timeout
    quick_object_pulls(REPLY_PULLS, max_time=config.round_timeout)
    task = get_task(config.task)
    task.check(config)
    registry = load_site_registry()  # first: a deployment without one stops here
    out = Path(config.out_dir).resolve()
    model = task.build_model(config)
    if config.fedbn:
        check_fedbn(model, config.model or f"{config.task} default")
    done = 0
    if config.resume:
        run, done = RunFolder.resume(out, config)
        state = load_checkpoint(run.checkpoint_path(done))["state_dict"]
        reference = {k: v.detach().clone() for k, v in state.items()}
        logger.info("resuming %s after round %d of %d", out, done, config.num_server_rounds)
    else:
        run = RunFolder.start(out, config)
        if config.init_checkpoint:
            load_initial_weights(model, Path(config.init_checkpoint).expanduser())
        reference = {k: v.detach().clone() for k, v in shared_state(model, config.fedbn).items()}
        run.save_checkpoint(0, reference, config)
    feed = StoreFeed.from_environment(run.path)
    run = run.feeding(feed)
    logger.info("run folder: %s", run.path)
    if done:
        run.event(RunEvent.RUN_RESUMED, f"resumed after round {done}", after_round=done)
    else:
        run.event(
            RunEvent.RUN_STARTED,
            f"{config.task} run of {config.num_server_rounds} rounds ({config.strategy})",
            rounds=config.num_server_rounds,
            sites=list(config.sites) or sorted(set((registry or {}).values())),
        )
    try:
        _train(grid, config, task, run, reference, registry, done)
    except BaseException as err:
        run.event(RunEvent.RUN_FAILED, _failure(err), level="error")
        raise
    finally:
        if feed is not None:
            feed.sync(force=True)
    return run.path


def _failure(err: BaseException) -> str:
    """What stopped a run, in the server's own words (a RadfedError's message is radfed's)."""
    if isinstance(err, RadfedError):
        return str(err)
    if isinstance(err, KeyboardInterrupt):
        return "stopped by the operator"
    return f"the server stopped with {type(err).__name__}; its log has the details"


def _train(
    grid: Grid,
    config: RunConfig,
    task: Task,
    run: RunFolder,
    reference: dict[str, torch.Tensor],
    registry: dict[int, str] | None,
    done: int,
) -> None:
    """The rounds after ``done``, then the curves and the HTML report."""
    strategy = make_strategy(config, reference, run, max_update_norm=config.max_update_norm or None)
    saved = run.load_state() if config.resume else None
    if saved:
        restore_strategy_state(strategy, saved["strategy"])
    strategy.registered = registry  # type: ignore[attr-defined]  # a RadfedChecks
    run_rounds(
        strategy,
        RegisteredGrid(grid, registry),
        config,
        run,
        ArrayRecord(reference),
        first_round=done + 1,
        names=dict(registry or {}),
    )
    figure = plot_curves(run.read_metrics(), run.files.curves, task.summary[:3])
    report = render_report(run)
    logger.info(
        "run finished: %d rounds; metrics in %s, curves in %s, bias report in %s",
        config.num_server_rounds,
        run.metrics_path,
        figure or "(no evaluated round)",
        report or "(no evaluated round)",
    )
    run.event(RunEvent.RUN_FINISHED, f"run finished: {config.num_server_rounds} rounds")
