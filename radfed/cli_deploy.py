"""The deployment commands of ``radfed``: pki, server start, site join/audit, launch."""

from __future__ import annotations

import subprocess
import tempfile
from pathlib import Path
from typing import Annotated

import typer

from radfed.cli_common import attempt, console, fail, print_summary, setup_logging
from radfed.errors import ConfigError, RadfedError

__all__ = ["launch", "pki_app", "server_app", "site_audit", "site_join"]

pki_app = typer.Typer(no_args_is_help=True, help="Certificates and site keys of a federation.")
server_app = typer.Typer(no_args_is_help=True, help="The federation's server (a SuperLink).")


@pki_app.command("init")
def pki_init(
    out: Annotated[Path, typer.Option("--out", help="The PKI folder to create.")],
    server_address: Annotated[
        str, typer.Option(help="HOST[:PORT] the sites reach the server at (default port 8000).")
    ],
    sites: Annotated[str, typer.Option(help="Comma-separated site names, e.g. a,b,c.")],
    san: Annotated[
        list[str] | None, typer.Option("--san", help="A further server name or IP (repeat).")
    ] = None,
) -> None:
    """Create the CA, the server certificate and one key pair per site."""
    from radfed.pki import fingerprint, init_pki

    names = [s.strip() for s in sites.split(",") if s.strip()]
    pki = attempt(init_pki, out, server_address, names, extra_sans=san or ())
    typer.echo(f"PKI for {pki.server_address} in {pki.root}")
    typer.echo(f"  server:  {pki.server_dir} (for `radfed server start --pki {pki.root}`)")
    for name in pki.sites:
        key = pki.root / "server" / "site-keys" / f"{name}.pub"
        typer.echo(f"  site {name}: kit {pki.site_dir(name)}  key {fingerprint(key)}")
    typer.echo("Hand each site its kit folder over a trusted channel; keep ca/ca.key offline.")


@pki_app.command("add-site")
def pki_add_site(
    name: Annotated[str, typer.Argument(help="The new site's name.")],
    pki: Annotated[Path, typer.Option("--pki", help="The PKI folder.")],
    public_key: Annotated[
        Path | None,
        typer.Option(help="Register this OpenSSH EC public key (the site keeps its private key)."),
    ] = None,
) -> None:
    """Add a site without re-issuing anything else (restart the server to register it)."""
    from radfed.pki import add_site, fingerprint

    kit = attempt(add_site, pki, name, public_key=public_key)
    typer.echo(f"site {kit.name}: kit {kit.folder}  key {fingerprint(kit.public_key)}")


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
    from radfed.pki import renew_server

    cert = attempt(renew_server, pki, server_address=server_address, extra_sans=san)
    typer.echo(f"new server certificate: {cert}; restart `radfed server start` to use it")


@server_app.command("start")
def server_start(
    pki: Annotated[Path, typer.Option("--pki", help="The PKI folder (radfed pki init).")],
    state: Annotated[Path, typer.Option("--state", help="Folder for the server's database.")],
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "0.0.0.0",
    port: Annotated[int, typer.Option(help="Port (default: the PKI's server address port).")] = 0,
) -> None:
    """Run the SuperLink with TLS and site authentication, and register the site keys."""
    from radfed.deployment import start_server
    from radfed.pki import load_pki

    setup_logging(False)
    code = attempt(lambda: start_server(load_pki(pki), state, host=host, port=port or None))
    raise typer.Exit(code=code)


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
    from radfed.deployment import join_site

    setup_logging(False)
    code = attempt(join_site, pki, site, data, server=server, policy=policy, port=port)
    raise typer.Exit(code=code)


def site_audit(
    site_dir: Annotated[Path, typer.Argument(help="The site folder.")],
    last: Annotated[int, typer.Option(help="Show the last N entries (0: all).")] = 20,
) -> None:
    """Verify the site's audit log and show what left the site."""
    from radfed.privacy import read_entries, verify

    path = site_dir / ".radfed" / "audit.jsonl"
    if not path.is_file():
        fail(ConfigError(f"{site_dir} has no audit log yet (nothing has left this site)"))
        return
    count = attempt(verify, path)
    entries = read_entries(path)
    for entry in entries[-last if last else 0 :]:
        shown = entry.to_json()
        typer.echo(
            f"{shown['time']} run {shown['run']} round {shown['round']} {shown['kind']}: "
            f"{shown['bytes']} bytes sha256 {str(shown['sha256'])[:16]}"
            + (f" error {shown['error-code']}" if shown.get("error-code") else "")
        )
    typer.echo(f"audit log intact: {count} entries in {path}")


def launch(
    server: Annotated[str, typer.Option(help="HOST:PORT of the server.")],
    pki: Annotated[
        Path, typer.Option("--pki", help="The PKI folder, or a folder holding the CA's ca.crt.")
    ],
    out: Annotated[Path, typer.Option("--out", help="Run folder ON THE SERVER machine.")],
    task: Annotated[str, typer.Option(help="Task to train.")] = "classification",
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
    from flwr.common.config import parse_config_args

    from radfed.deployment import launch_command, write_connection
    from radfed.simulate import find_app_dir

    setup_logging(False)
    try:
        sites = _pki_sites(pki)
        settings = {
            **parse_config_args(run_config),
            "task": task,
            "num-server-rounds": rounds,
            "out-dir": str(out.absolute()),
            "resume": resume,
            "site-wait": float(site_wait),
            **({"sites": ",".join(sites)} if sites else {}),
            "min-sites": min_sites or max(1, len(sites)),
        }
        ca = pki / "ca" / "ca.crt" if (pki / "ca" / "ca.crt").is_file() else pki / "ca.crt"
        if not ca.is_file():
            raise ConfigError(f"no ca.crt in {pki}; give the PKI folder or a site kit")
        with tempfile.TemporaryDirectory(prefix="radfed-launch-") as home:
            write_connection(Path(home), server, ca)
            command = launch_command(find_app_dir(), Path(home), settings)
            console.print(f"launching {task} for {rounds} rounds on {server} -> {out}")
            code = subprocess.run(command.argv, env=command.environ(), check=False).returncode
    except RadfedError as err:
        fail(err)
        return
    if code == 0 and (out / "metrics.jsonl").is_file():
        print_summary(out)
    raise typer.Exit(code=code)


def _pki_sites(pki: Path) -> list[str]:
    """The registered site names of a central PKI folder (none for a site kit)."""
    keys = pki / "server" / "site-keys"
    return sorted(p.stem for p in keys.glob("*.pub")) if keys.is_dir() else []
