"""The ``radfed`` command: parses arguments, sets up output and calls library functions."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from radfed import __version__
from radfed.cli_common import attempt, fail, print_summary, progress, setup_logging
from radfed.cli_deploy import launch, pki_app, server_app, site_audit, site_join
from radfed.config import RunConfig
from radfed.errors import ConfigError, RadfedError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="radfed: federated learning for radiology across hospital sites.",
)
site_app = typer.Typer(no_args_is_help=True, help="Prepare and check a site folder.")
app.add_typer(site_app, name="site")


@app.callback()
def _main(
    version: Annotated[bool, typer.Option("--version", help="Print the version.")] = False,
) -> None:
    if version:
        typer.echo(__version__)
        raise typer.Exit()


@app.command()
def synth(
    out: Annotated[Path, typer.Option("--out", help="Data root to create (one folder per site).")],
    task: Annotated[
        str,
        typer.Option(
            help="Targets to write: classification (label), detection (boxes), segmentation (mask)."
        ),
    ] = "classification",
    sites: Annotated[int, typer.Option(help="Number of sites.")] = 3,
    cases_per_site: Annotated[int, typer.Option(help="Average cases per site.")] = 60,
    seed: Annotated[int, typer.Option(help="Seed of everything generated.")] = 0,
    image_size: Annotated[int, typer.Option(help="Size of every axis of each image.")] = 64,
    dims: Annotated[int, typer.Option(help="2 for images, 3 for volumes (multi-frame DICOM).")] = 2,
    bias: Annotated[
        str,
        typer.Option(
            help="Plant a subgroup effect with a known answer at one site: none, contrast "
            "(fainter lesions in women aged 60+), marker (burned-in marker tied to the label)."
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
        return
    table = Table(title=f"{len(summaries)} sites written to {out}")
    for column in ("site", "cases", "positives", "patients", "female patients", "manufacturer"):
        table.add_column(column)
    for s in summaries:
        table.add_row(
            s.name, str(s.cases), str(s.positives), str(s.patients), str(s.female), s.manufacturer
        )
    Console().print(table)


@app.command()
def simulate(
    data: Annotated[
        Path, typer.Option("--data", help="Folder of site folders (DATA/<site>/manifest.csv).")
    ],
    out: Annotated[Path, typer.Option("--out", help="Run folder to write.")],
    task: Annotated[str, typer.Option(help="Task to train.")] = "classification",
    rounds: Annotated[int, typer.Option(help="Federated rounds.")] = 3,
    seed: Annotated[int, typer.Option(help="Seed of model, splits and training.")] = 42,
    strategy: Annotated[
        str,
        typer.Option(
            help="fedavg, fedprox, fedadam, fedyogi or fedavgm ('--run-config fedbn=true': FedBN)."
        ),
    ] = "fedavg",
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
) -> None:
    """Simulate one Flower node per site folder on this machine and train federatedly."""
    from flwr.common.config import parse_config_args

    from radfed.simulate import simulate as run_simulation

    setup_logging(verbose)
    if (out / "metrics.jsonl").exists() and not overwrite:
        fail(RadfedError(f"{out} already holds a run; choose another --out or pass --overwrite"))
    overrides = {
        **parse_config_args(run_config),
        "task": task,
        "num-server-rounds": rounds,
        "seed": seed,
        "strategy": strategy,
        **({"holdout-site": holdout_site} if holdout_site else {}),
    }
    folder = attempt(run_simulation, data, out, overrides, verbose=verbose)
    print_summary(folder)


def _run_config(task: str, values: list[str] | None) -> RunConfig:
    """The app's default run config, with ``task`` and ``--run-config`` values over it."""
    from flwr.common.config import get_fused_config_from_dir, parse_config_args

    from radfed.simulate import find_app_dir

    overrides = {**parse_config_args(values), "task": task}
    try:
        fused = get_fused_config_from_dir(find_app_dir(), overrides)
    except RadfedError:  # no app folder (radfed installed alone): radfed's own defaults
        fused = overrides
    except ValueError as err:
        raise ConfigError(f"unknown run-config key: {err}") from None
    return RunConfig.from_run_config(fused)


@site_app.command("check")
def site_check(
    site_dir: Annotated[Path, typer.Argument(help="The site folder (holding manifest.csv).")],
    task: Annotated[str, typer.Option(help="Task the site will train.")] = "classification",
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
    run_config: Annotated[
        list[str] | None,
        typer.Option("--run-config", help="Run settings to check against, e.g. 'image-size=128'."),
    ] = None,
    preflight: Annotated[bool, typer.Option(help="Run one training step at the end.")] = True,
) -> None:
    """Read every case and report problems by manifest line; exit 1 when the site cannot train."""

    from radfed.data.check import check_site, render_text

    setup_logging(False)
    logging.getLogger("radfed").setLevel(logging.ERROR)  # the report says it all
    try:
        with progress("reading cases") as update:
            report = check_site(
                site_dir, _run_config(task, run_config), preflight=preflight, progress=update
            )
    except RadfedError as err:
        fail(err)
        return
    if as_json:
        typer.echo(json.dumps(report.to_json(), indent=2))
    else:
        typer.echo(render_text(report))
    raise typer.Exit(code=0 if report.can_train else 1)


@site_app.command("index")
def site_index(
    export: Annotated[
        Path, typer.Argument(help="The hospital DICOM export (e.g. a DICOMDIR tree).")
    ],
    out: Annotated[Path, typer.Option("--out", help="The site folder to write manifest.csv into.")],
    labels: Annotated[
        Path | None,
        typer.Option(
            help="CSV with 'label' and one of sop/series/study_instance_uid, accession_number."
        ),
    ] = None,
) -> None:
    """Group an export into cases, pseudonymise patient ids and write the site's manifest."""
    from radfed.data.index import index_export

    setup_logging(False)
    summary = attempt(index_export, export, out, labels=labels)
    skipped = ", ".join(f"{n} {why}" for why, n in sorted(summary.skipped.items())) or "none"
    typer.echo(
        f"{summary.cases} cases ({summary.series_cases} series) from {summary.patients} "
        f"patients; {summary.labelled} labelled; {summary.dicom} DICOM of {summary.files} "
        f"files; skipped: {skipped}"
    )
    typer.echo(f"wrote {out / 'manifest.csv'}; next: radfed site check {out}")


@app.command()
def explain(
    checkpoint: Annotated[
        Path, typer.Option(help="A radfed checkpoint (run folder checkpoints/).")
    ],
    data: Annotated[Path, typer.Option("--data", help="The site folder.")],
    out: Annotated[
        Path, typer.Option("--out", help="Folder for the PNG maps (stays at the site).")
    ],
    split: Annotated[str, typer.Option(help="Split to explain.")] = "val",
    cases: Annotated[int, typer.Option(help="How many cases.")] = 8,
) -> None:
    """Grad-CAM and occlusion maps of a site's cases, written locally as images."""
    from radfed.explain import explain_site

    setup_logging(False)
    explained = attempt(explain_site, checkpoint, data, out, split=split, cases=cases)
    typer.echo(f"wrote {len(explained)} maps to {out}")


@app.command()
def report(
    run: Annotated[Path, typer.Argument(help="A run folder (holding bias_report.json).")],
) -> None:
    """Re-render a run's bias report (bias_report.html) from its bias_report.json."""
    from radfed.federation.run_folder import RunFolder
    from radfed.federation.server import render_report

    setup_logging(False)
    folder = RunFolder(run)
    if not folder.bias_report_path.is_file():
        fail(ConfigError(f"{run} holds no bias_report.json; give the folder of a finished run"))
        return
    html = render_report(folder)
    typer.echo(f"bias report: {html}")


@app.command()
def evaluate(
    checkpoint: Annotated[Path, typer.Option("--checkpoint", help="A radfed checkpoint file.")],
    data: Annotated[Path, typer.Option("--data", help="The site folder.")],
    out: Annotated[
        Path, typer.Option("--out", help="Folder for predictions.csv and statistics.json.")
    ],
    split: Annotated[
        str, typer.Option(help="train, val or test (sealed: each use is counted).")
    ] = "val",
    min_cell_size: Annotated[
        int, typer.Option(help="The site's minimum cell size (0: the run's).")
    ] = 0,
) -> None:
    """Evaluate a model on one site locally: per-case outputs stay here; shows what would leave."""
    from radfed.evaluate import evaluate_site

    setup_logging(False)
    result = attempt(evaluate_site, checkpoint, data, out, split=split, min_cell_size=min_cell_size)
    typer.echo(f"{result.cases} cases: {result.predictions} (stays here), {result.statistics}")


app.add_typer(pki_app, name="pki")
app.add_typer(server_app, name="server")
site_app.command("join")(site_join)
site_app.command("audit")(site_audit)
app.command()(launch)


def main() -> None:
    """Entry point of the ``radfed`` console script."""
    app()
