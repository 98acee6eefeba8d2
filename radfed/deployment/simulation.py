"""Simulating sites on one machine: the radfed Flower app run by Flower's simulation engine.

``radfed simulate`` runs the app from the project folder (the folder whose pyproject.toml
has ``[tool.flwr.app]``), as ``flwr run .`` does against a local simulation, but in the
foreground, with one virtual node per site folder and nothing left running afterwards.
It does what Flower's ``flwr-simulation`` process does after it has fetched the app:
fuse the app's run config with the overrides and start the simulation engine (Ray), on
this machine or, with ``ray_address``, on an existing Ray cluster (``ray_cluster``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch

from radfed.config import RunConfig, TaskName
from radfed.data.manifest import read_manifest
from radfed.deployment.ray_cluster import (
    SiteResources,
    cluster_nodes,
    parse_ray_address,
    site_resources,
)
from radfed.errors import ConfigError
from radfed.flower_private import fused_run_config, run_simulation
from radfed.folders import RunFiles, app_components, find_app_dir, list_sites
from radfed.log import logger
from radfed.tasks import get_task

__all__ = ["simulate"]


def simulate(
    data_root: Path,
    out_dir: Path,
    overrides: Mapping[str, bool | int | float | str] | None = None,
    *,
    app_dir: Path | None = None,
    ray_address: str | None = None,
    verbose: bool = False,
) -> Path:
    """Run a federated training over the site folders of ``data_root``.

    Everything that can be checked before Flower starts is checked first: the data root,
    every site's manifest and the run configuration.

    Args:
        data_root: a folder of site folders (``DATA/<site>/manifest.csv``).
        out_dir: the run folder to write.
        overrides: run-config values (kebab-case keys) over the app's defaults.
        app_dir: the app folder; found with ``find_app_dir`` when None.
        ray_address: ``HOST:PORT`` of an existing Ray cluster to run the sites on, this
            machine being one of its nodes; None: start Ray on this machine (never the
            cluster that ``RAY_ADDRESS`` names). Every node needs the same Python, Ray and
            radfed install, and the data root at the same path (a shared file system:
            sites keep their state in it); the run folder is written here.
        verbose: show Flower's own log.

    Returns:
        The run folder.
    """
    if ray_address is not None:
        parse_ray_address(ray_address)
    app = (app_dir or find_app_dir()).resolve()
    data_root, out_dir = data_root.resolve(), out_dir.resolve()
    sites = list_sites(data_root)
    given = dict(overrides or {})
    task = str(given.get("task", TaskName.CLASSIFICATION))
    for site in sites:
        read_manifest(site, task)
    override = {
        **given,
        "data-root": str(data_root),
        "out-dir": str(out_dir),
        "min-sites": len(sites),
    }
    run_config = fused_run_config(app, override)
    config = RunConfig.from_run_config(run_config)
    get_task(config.task).check(config)
    names = [site.name for site in sites]
    if config.holdout_site and config.holdout_site not in names:
        msg = (
            f"--holdout-site {config.holdout_site!r} is not a site folder of the data root "
            f"({', '.join(names)})"
        )
        raise ConfigError(msg)
    if config.holdout_site and len(names) < 2:
        raise ConfigError("--holdout-site needs at least one other site to train")
    logger.info(
        "simulating %d sites (%s), %d rounds, app %s",
        len(sites),
        ", ".join(s.name for s in sites),
        config.num_server_rounds,
        app,
    )

    init_args: dict[str, str | int | bool]
    if ray_address is None:
        # "local": a Ray of its own, even where RAY_ADDRESS or a running `ray start` is seen
        init_args = {"address": "local", "num_cpus": os.cpu_count() or 1}
        share = SiteResources(cpus=1, gpus=_gpus_per_site(len(sites)))
    else:
        # Ray refuses num_cpus/num_gpus when it joins a cluster: the nodes say what they have.
        nodes = cluster_nodes(ray_address)
        init_args = {"address": ray_address}
        share = site_resources(nodes, len(sites))
        logger.info(
            "on the Ray cluster at %s: %d nodes, %d CPUs and %g GPUs per site",
            ray_address,
            len(nodes),
            share.cpus,
            share.gpus,
        )

    run_simulation(
        app,
        nodes=len(sites),
        components=app_components(app),
        run_config=run_config,
        override=override,
        backend_config={
            "client_resources": {"num_cpus": share.cpus, "num_gpus": share.gpus},
            "init_args": {
                **init_args,
                "include_dashboard": False,
                "logging_level": "ERROR",
                "log_to_driver": verbose,
            },
        },
        verbose=verbose,
    )
    if not RunFiles(out_dir).metrics.is_file():
        raise ConfigError("the simulation ended without a run folder; rerun with --verbose")
    return out_dir


def _gpus_per_site(sites: int) -> float:
    """Share this machine's GPU among the simulated sites when there is one."""
    return 1.0 / sites if torch.cuda.is_available() else 0.0
