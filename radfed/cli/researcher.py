"""Commands of a researcher who simulates sites on one machine: ``synth`` and ``simulate``.

Each command imports the library modules it calls when it runs, so that ``radfed --help``
and the quick commands start without loading torch and Flower.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from radfed.cli.live import round_display
from radfed.cli.output import attempt, fail, print_summary, progress, setup_logging
from radfed.cli.runs import use_store
from radfed.config import StrategyName, TaskName
from radfed.errors import RadfedError
from radfed.folders import RunFiles

__all__ = ["simulate", "synth"]


def synth(
    out: Annotated[Path, typer.Option("--out", help="Data root to create (one folder per site).")],
    task: Annotated[
        TaskName,
        typer.Option(
            help="Targets to write: classification (label), detection (boxes), segmentation (mask)."
        ),
    ] = TaskName.CLASSIFICATION,
    sites: Annotated[int, typer.Option(help="Number of sites.")] = 3,
    cases_per_site: Annotated[
        int | None,
        typer.Option(
            help="Average cases per site (default 60; with --bias small-sites, 240: the size "
            "of a small hospital's site).",
            show_default=False,
        ),
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed of everything generated.")] = 0,
    image_size: Annotated[int, typer.Option(help="Size of every axis of each image.")] = 64,
    dims: Annotated[int, typer.Option(help="2 for images, 3 for volumes (multi-frame DICOM).")] = 2,
    bias: Annotated[
        str,
        typer.Option(
            help="Plant a subgroup effect with a known answer at one site: none, contrast "
            "(fainter lesions in women aged 60+), small-sites (the same at the sizes of small "
            "real sites, where the report must say inconclusive rather than no gap), marker "
            "(burned-in marker tied to the label)."
        ),
    ] = "none",
    overwrite: Annotated[bool, typer.Option(help="Replace an --out that synth wrote.")] = False,
) -> None:
    """Generate hospital sites as real DICOM files plus a manifest per site."""
    from radfed.data.synth import synth_sites

    setup_logging(False)
    try:
        with progress("writing cases") as update:
            summaries = synth_sites(
                out,
                progress=update,
                task=task,
                sites=sites,
                cases_per_site=cases_per_site,
                seed=seed,
                image_size=image_size,
                dims=dims,
                bias=bias,
                overwrite=overwrite,
            )
    except RadfedError as err:
        fail(err)
    table = Table(title=f"{len(summaries)} sites written to {out}")
    for column in ("site", "cases", "positives", "patients", "female patients", "manufacturer"):
        table.add_column(column)
    for s in summaries:
        table.add_row(
            s.name, str(s.cases), str(s.positives), str(s.patients), str(s.female), s.manufacturer
        )
    Console().print(table)


def simulate(
    data: Annotated[
        Path, typer.Option("--data", help="Folder of site folders (DATA/<site>/manifest.csv).")
    ],
    out: Annotated[Path, typer.Option("--out", help="Run folder to write.")],
    task: Annotated[TaskName, typer.Option(help="Task to train.")] = TaskName.CLASSIFICATION,
    rounds: Annotated[int, typer.Option(help="Federated rounds.")] = 3,
    seed: Annotated[int, typer.Option(help="Seed of model, splits and training.")] = 42,
    strategy: Annotated[
        StrategyName,
        typer.Option(help="Aggregation strategy ('--run-config fedbn=true' adds FedBN)."),
    ] = StrategyName.FEDAVG,
    run_config: Annotated[
        list[str] | None,
        typer.Option(
            "--run-config",
            help="Further run-config values, e.g. 'local-epochs=2 model=\"resnet18\"'.",
        ),
    ] = None,
    holdout_site: Annotated[
        str,
        typer.Option(help="A site that does not train and is evaluated as held out."),
    ] = "",
    overwrite: Annotated[bool, typer.Option(help="Replace an existing run folder.")] = False,
    verbose: Annotated[bool, typer.Option(help="Show Flower's own log.")] = False,
    store: Annotated[
        str | None,
        typer.Option(
            help="Run store the run is written to as it goes (a SQLAlchemy URL; 'none': off). "
            "Default: $RADFED_STORE, else ~/.local/share/radfed/runs.sqlite.",
            show_default=False,
        ),
    ] = None,
    ray_address: Annotated[
        str | None,
        typer.Option(
            "--ray-address",
            metavar="HOST:PORT",
            help="Run the sites on an existing Ray cluster, the address 'ray start --head' "
            "printed, instead of on this machine alone; run this command on a node of that "
            "cluster. Every node needs the same Python, Ray and radfed install at the same "
            "paths, and the data root at the same path on a shared file system (sites keep "
            "their state in it); the run folder is written on this machine. Ray "
            "authenticates nothing by default: use a cluster on loopback or a private network "
            "only, with Ray's token authentication (RAY_AUTH_MODE=token and RAY_AUTH_TOKEN "
            "for its nodes and this command). Without this option Ray starts here, whatever "
            "RAY_ADDRESS says.",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Simulate one Flower node per site folder on this machine (or on a Ray cluster) and
    train federatedly."""
    from radfed.deployment.simulation import simulate as run_simulation
    from radfed.flower_private import parse_run_config
    from radfed.tasks import get_task

    setup_logging(verbose)
    if RunFiles(out).metrics.exists() and not overwrite:
        fail(f"{out} already holds a run; choose another --out or pass --overwrite")
    overrides = {
        **attempt(parse_run_config, run_config),
        "task": task.value,
        "num-server-rounds": rounds,
        "seed": seed,
        "strategy": strategy.value,
        **({"holdout-site": holdout_site} if holdout_site else {}),
    }
    use_store(store)
    with round_display():
        folder = attempt(
            run_simulation, data, out, overrides, ray_address=ray_address, verbose=verbose
        )
    print_summary(folder, get_task(task).summary)
