"""Commands of the central team: ``pki``, ``server start``, ``launch`` and ``report``.

Each command imports the library modules it calls when it runs, so that ``radfed --help``
and the quick commands (``pki``) start without loading torch and Flower.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from radfed.cli.live import round_display, streamed_line
from radfed.cli.output import attempt, fail, make_app, print_error, print_summary, setup_logging
from radfed.config import TaskName
from radfed.folders import RunFiles, find_app_dir

__all__ = ["launch", "pki_app", "report", "server_app"]

pki_app = make_app("Certificates and site keys of a federation.")
server_app = make_app("The federation's server (a SuperLink).")


@pki_app.command("init")
def pki_init(
    out: Annotated[Path, typer.Option("--out", help="The PKI folder to create.")],
    server_address: Annotated[
        str, typer.Option(help="HOST[:PORT] the sites reach the server at (default port 8000).")
    ],
    sites: Annotated[
        str,
        typer.Option(help="Trial federations only, with --central-keys: site names, e.g. a,b,c."),
    ] = "",
    central_keys: Annotated[
        bool,
        typer.Option(
            help="Make the sites' private keys here (a trial federation): the central team "
            "then holds every site's key. Otherwise each site runs `radfed site keygen`."
        ),
    ] = False,
    san: Annotated[
        list[str] | None, typer.Option("--san", help="A further server name or IP (repeat).")
    ] = None,
) -> None:
    """Create the CA and the server certificate (and, for a trial, keys for named sites)."""
    from radfed.deployment.pki import fingerprint, init_pki

    names = [s.strip() for s in sites.split(",") if s.strip()]
    pki = attempt(
        init_pki, out, server_address, names, central_keys=central_keys, extra_sans=san or ()
    )
    typer.echo(f"PKI for {pki.server_address} in {pki.root}")
    typer.echo(f"  server:  {pki.server_dir} (for `radfed server start --pki {pki.root}`)")
    for name in pki.sites:
        key = fingerprint(pki.site_key(name))
        typer.echo(f"  site {name}: kit {pki.site_dir(name)}  key {key}")
    if pki.sites:
        print_error(
            "warning: these sites' private keys were made here; the central team holds them. "
            "For a real federation each site makes its own (`radfed site keygen`)."
        )
        typer.echo("Hand each site its kit folder over a trusted channel; keep ca/ca.key offline.")
    else:
        typer.echo(
            "Add each site from the request its own key signed: at the site `radfed site "
            "keygen --site NAME --out KIT`, here `radfed pki add-site NAME --csr site.csr`."
        )


@pki_app.command("add-site")
def pki_add_site(
    name: Annotated[str, typer.Argument(help="The new site's name.")],
    pki: Annotated[Path, typer.Option("--pki", help="The PKI folder.")],
    csr: Annotated[
        Path | None,
        typer.Option(help="The site's certificate request (`radfed site keygen` at the site)."),
    ] = None,
    public_key: Annotated[
        Path | None,
        typer.Option(help="The site's OpenSSH public key (site.pub), instead of --csr."),
    ] = None,
    central_keys: Annotated[
        bool, typer.Option(help="Make the site's private key here (a trial federation).")
    ] = False,
) -> None:
    """Add a site: register its key and issue its client certificate (restart the server
    to register it); nothing else is re-issued."""
    from radfed.deployment.pki import add_site, fingerprint

    kit = attempt(add_site, pki, name, csr=csr, public_key=public_key, central_keys=central_keys)
    typer.echo(f"site {kit.name}: kit {kit.folder}  key {fingerprint(kit.public_key)}")
    if kit.private_key is not None:
        print_error("warning: this site's private key was made here; the central team holds it")
    typer.echo(
        "Send the kit's ca.crt, site.crt and site.toml to the site (public files; check the "
        "key fingerprint with the site over another channel)."
    )


@pki_app.command("renew-server")
def pki_renew_server(
    pki: Annotated[Path, typer.Option("--pki", help="The PKI folder.")],
    server_address: Annotated[
        str | None, typer.Option(help="A new HOST[:PORT] (default: the current one).")
    ] = None,
    san: Annotated[
        list[str] | None, typer.Option("--san", help="Further server names (replace the old).")
    ] = None,
) -> None:
    """Re-issue the server certificate from the same CA; site kits stay valid."""
    from radfed.deployment.pki import renew_server

    cert = attempt(renew_server, pki, server_address=server_address, extra_sans=san)
    typer.echo(f"new server certificate: {cert}; restart `radfed server start` to use it")


@server_app.command("start")
def server_start(
    pki: Annotated[Path, typer.Option("--pki", help="The PKI folder (radfed pki init).")],
    state: Annotated[Path, typer.Option("--state", help="Folder for the server's database.")],
    host: Annotated[str, typer.Option(help="Address the sites reach the edge at.")] = "0.0.0.0",
    port: Annotated[
        int, typer.Option(help="The edge's port (default: the PKI's server address port).")
    ] = 0,
    superlink_port: Annotated[
        int,
        typer.Option(help="The SuperLink's port on loopback, for `radfed launch` (default: +1)."),
    ] = 0,
    store: Annotated[
        str | None,
        typer.Option(
            help="Run store the runs are written to as they go (a SQLAlchemy URL, e.g. "
            "postgresql+psycopg://radfed@db/radfed; 'none': off). Default: $RADFED_STORE, "
            "else ~/.local/share/radfed/runs.sqlite.",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Run the server: the SuperLink on loopback with TLS and site authentication, nginx in
    front of it for the sites (mutual TLS, the Fleet API only), and register the site keys."""
    from radfed.deployment.pki import load_pki
    from radfed.deployment.superlink import start_server

    setup_logging(False)
    code = attempt(
        lambda: start_server(
            load_pki(pki),
            state,
            host=host,
            port=port or None,
            superlink_port=superlink_port or None,
            store=store,
        )
    )
    raise typer.Exit(code=code)


def launch(
    server: Annotated[str, typer.Option(help="HOST:PORT of the server.")],
    pki: Annotated[
        Path, typer.Option("--pki", help="The PKI folder, or a folder holding the CA's ca.crt.")
    ],
    out: Annotated[Path, typer.Option("--out", help="Run folder ON THE SERVER machine.")],
    task: Annotated[TaskName, typer.Option(help="Task to train.")] = TaskName.CLASSIFICATION,
    rounds: Annotated[int, typer.Option(help="Federated rounds.")] = 3,
    resume: Annotated[
        bool, typer.Option(help="Continue the run in --out after its last completed round.")
    ] = False,
    min_sites: Annotated[int, typer.Option(help="Sites a round needs (0: all sites).")] = 0,
    site_wait: Annotated[
        float, typer.Option(help="Seconds a round waits for missing sites.")
    ] = 300.0,
    run_config: Annotated[
        list[str] | None,
        typer.Option("--run-config", help="Further run-config values, e.g. 'local-epochs=2'."),
    ] = None,
) -> None:
    """Submit a federated run to the server and show its progress until it ends."""
    from radfed.deployment.launch import launch as launch_run
    from radfed.flower_private import parse_run_config
    from radfed.tasks import get_task

    setup_logging(False)
    settings = {
        **attempt(parse_run_config, run_config),
        "task": task.value,
        "num-server-rounds": rounds,
        "resume": resume,
        "site-wait": float(site_wait),
    }
    app = attempt(find_app_dir)
    with round_display() as feed:
        code = attempt(
            launch_run,
            app,
            server,
            pki,
            out,
            settings,
            min_sites=min_sites,
            on_line=streamed_line(feed),
        )
    if code == 0 and RunFiles(out).metrics.is_file():
        again = f"radfed launch --server {server} --pki {pki} --out {out} --resume"
        print_summary(out, get_task(task).summary, resume_hint=again)
    raise typer.Exit(code=code)


def report(
    run: Annotated[Path, typer.Argument(help="A run folder (holding bias_report.json).")],
) -> None:
    """Re-render a run's bias report (bias_report.html) from its bias_report.json."""
    from radfed.central.run_folder import RunFolder
    from radfed.central.server import render_report

    setup_logging(False)
    if not RunFiles(run).bias_report.is_file():
        fail(f"{run} holds no bias_report.json; give the folder of a finished run")
    html = attempt(render_report, RunFolder(run))
    typer.echo(f"bias report: {html}")
