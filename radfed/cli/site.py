"""Commands of a site administrator: ``site index|check|join|audit``, ``evaluate``, ``explain``.

Everything these commands write stays at the site. Each command imports the library modules
it calls when it runs, so that ``radfed --help`` and the quick commands start fast.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Annotated

import typer

from radfed.cli.output import attempt, fail, progress, setup_logging
from radfed.config import SPLITS, RunConfig, TaskName
from radfed.errors import ConfigError, RadfedError
from radfed.folders import SiteFolder, find_app_dir

__all__ = [
    "evaluate",
    "explain",
    "site_audit",
    "site_check",
    "site_index",
    "site_join",
    "site_keygen",
]


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
    from radfed.site.index import index_export

    setup_logging(False)
    summary = attempt(index_export, export, out, labels=labels)
    skipped = ", ".join(f"{n} {why}" for why, n in sorted(summary.skipped.items())) or "none"
    typer.echo(
        f"{summary.cases} cases ({summary.series_cases} series) from {summary.patients} "
        f"patients; {summary.labelled} labelled; {summary.dicom} DICOM of {summary.files} "
        f"files; skipped: {skipped}"
    )
    typer.echo(f"wrote {SiteFolder(out).manifest}; next: radfed site check {out}")


def site_check(
    site_dir: Annotated[Path, typer.Argument(help="The site folder (holding manifest.csv).")],
    task: Annotated[TaskName, typer.Option(help="Task the site will train.")] = (
        TaskName.CLASSIFICATION
    ),
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
    run_config: Annotated[
        list[str] | None,
        typer.Option("--run-config", help="Run settings to check against, e.g. 'image-size=128'."),
    ] = None,
    preflight: Annotated[bool, typer.Option(help="Run one training step at the end.")] = True,
) -> None:
    """Read every case and report problems by manifest line; exit 1 when the site cannot train."""
    from radfed.site.check import check_site, render_text

    setup_logging(False)
    logging.getLogger("radfed").setLevel(logging.ERROR)  # the report says it all
    try:
        config = _run_config(task, run_config)
        with progress("reading cases") as update:
            report = check_site(site_dir, config, preflight=preflight, progress=update)
    except RadfedError as err:
        fail(err)
    if as_json:
        typer.echo(json.dumps(report.to_json(), indent=2))
    else:
        typer.echo(render_text(report))
    raise typer.Exit(code=0 if report.can_train else 1)


def _run_config(task: TaskName, values: list[str] | None) -> RunConfig:
    """The app's default run config, with ``task`` and ``--run-config`` values over it."""
    from radfed.flower_private import fused_run_config, parse_run_config

    overrides = {**parse_run_config(values), "task": task.value}
    try:
        app = find_app_dir()
    except ConfigError:  # no app folder (radfed installed alone): radfed's own defaults
        return RunConfig.from_run_config(overrides)
    return RunConfig.from_run_config(fused_run_config(app, overrides))


def site_keygen(
    site: Annotated[str, typer.Option("--site", help="This site's name.")],
    out: Annotated[Path, typer.Option("--out", help="This site's kit folder (created).")],
) -> None:
    """Make this site's private key (it never leaves the site) and the certificate request
    to send to the central team."""
    from radfed.deployment.site_kit import fingerprint, make_site_keys

    made = attempt(make_site_keys, out, site)
    typer.echo(f"private key {made.private_key} (0600; keep it here, back it up offline)")
    typer.echo(f"public key  {made.public_key}  {fingerprint(made.public_key)}")
    typer.echo(
        f"send {made.request} to the central team (`radfed pki add-site {site} --csr "
        f"site.csr`), confirm the fingerprint with them over another channel, and put the "
        f"ca.crt, site.crt and site.toml they return into {out}"
    )


def site_join(
    pki: Annotated[Path, typer.Option("--pki", help="This site's kit folder (from the PKI).")],
    site: Annotated[str, typer.Option("--site", help="This site's name (as in its kit).")],
    data: Annotated[Path, typer.Option("--data", help="The site folder (manifest.csv).")],
    server: Annotated[
        str, typer.Option(help="HOST:PORT of the server (default: from the kit).")
    ] = "",
    policy: Annotated[
        Path | None, typer.Option(help="The site's policy (default: SITE_DIR/site-policy.toml).")
    ] = None,
    port: Annotated[int, typer.Option(help="Local ClientApp API port (loopback).")] = 9094,
) -> None:
    """Join the federation: a SuperNode with TLS and this site's key; runs until stopped."""
    from radfed.deployment.supernode import join_site

    setup_logging(False)
    code = attempt(join_site, pki, site, data, server=server, policy=policy, port=port)
    raise typer.Exit(code=code)


def site_audit(
    site_dir: Annotated[Path, typer.Argument(help="The site folder.")],
    last: Annotated[int, typer.Option(help="Show the last N entries (0: all).")] = 20,
) -> None:
    """Verify the site's audit log, show what was asked and what left, and point out what to
    look at (repeated evaluations, other weights evaluated, the sealed test split, refused
    bundles); exit 1 when there is something to look at."""
    from radfed.privacy import load_policy, read_entries, verify
    from radfed.privacy.accountant import PrivacyLedger
    from radfed.site.review import review

    path = SiteFolder(site_dir).state.audit_log
    if not path.is_file():
        fail(f"{site_dir} has no audit log yet (nothing has left this site)")
    count = attempt(verify, path)
    entries = read_entries(path)
    for entry in entries[-last if last else 0 :]:
        line = (
            f"{entry.time} run {entry.run_id} round {entry.server_round} {entry.kind}: "
            f"{entry.nbytes} bytes sha256 {(entry.sha256 or '-')[:16]}"
        )
        if entry.error_code:
            line += f" error {entry.error_code}"
        if entry.request is not None:
            asked = entry.request
            line += f"; asked {asked.kind}"
            line += f" {','.join(asked.eval_splits)}" if asked.eval_splits else ""
            line += f" weights {asked.weights_sha256[:12]}" if asked.weights_sha256 else ""
            line += f" bundle {asked.bundle_sha256[:12]}" if asked.bundle_sha256 else ""
        typer.echo(line)
    typer.echo(f"audit log intact: {count} entries in {path}")
    ledger = PrivacyLedger(SiteFolder(site_dir).state.privacy)
    policy_file = SiteFolder(site_dir).policy
    policy = attempt(load_policy, policy_file if policy_file.is_file() else None)
    deltas = {
        "update": policy.dp.delta if policy.dp is not None else 1e-5,
        "statistics": policy.dp_statistics.delta if policy.dp_statistics is not None else 1e-6,
    }
    for kind, what in (("update", "DP rounds"), ("statistics", "DP statistics releases")):
        spent = attempt(ledger.spent, kind)
        if spent.rounds:
            typer.echo(
                f"differential privacy: {spent.rounds} {what}, rho {spent.rho:.3g} "
                f"(epsilon {spent.epsilon(deltas[kind]):.3g} at delta {deltas[kind]:g})"
            )
    both = attempt(ledger.spent)
    if both.rounds and all(attempt(ledger.spent, kind).rounds for kind in deltas):
        delta = min(deltas.values())
        typer.echo(
            f"differential privacy per patient, both together: rho {both.rho:.3g} "
            f"(epsilon {both.epsilon(delta):.3g} at delta {delta:g})"
        )
    findings = review(entries)
    for finding in findings:
        typer.echo(f"look at: {finding.line()}")
    if findings:
        typer.echo(f"{len(findings)} finding(s) to look at")
        raise typer.Exit(code=1)


def evaluate(
    checkpoint: Annotated[Path, typer.Option("--checkpoint", help="A radfed checkpoint file.")],
    data: Annotated[Path, typer.Option("--data", help="The site folder.")],
    out: Annotated[
        Path, typer.Option("--out", help="Folder for predictions.csv and statistics.json.")
    ],
    split: Annotated[
        str, typer.Option(help=f"{', '.join(SPLITS)} (test is sealed: each use is counted).")
    ] = "val",
    min_cell_size: Annotated[
        int, typer.Option(help="The site's minimum cell size (0: the run's).")
    ] = 0,
) -> None:
    """Evaluate a model on one site locally: per-case outputs stay here; shows what would leave."""
    from radfed.site.evaluate import evaluate_site

    setup_logging(False)
    result = attempt(evaluate_site, checkpoint, data, out, split=split, min_cell_size=min_cell_size)
    typer.echo(f"{result.cases} cases: {result.predictions} (stays here), {result.statistics}")


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
    from radfed.site.explain import explain_site

    setup_logging(False)
    explained = attempt(explain_site, checkpoint, data, out, split=split, cases=cases)
    typer.echo(f"wrote {len(explained)} maps to {out}")
