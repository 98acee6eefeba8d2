"""The site side of a deployment: the site's SuperNode and the SuperExec that runs its tasks.

``radfed site join`` runs two Flower processes side by side:

- ``flower-supernode`` connects outward to the server with TLS and the site's key, and
  serves its Runtime API on loopback in *process* isolation: the API's SuperExec operations
  (listing tasks, issuing a task's token) need the secret the site keeps in
  ``SITE_DIR/.radfed/superexec.secret`` (0600), so another local user cannot take the
  site's tasks (Flower's subprocess mode leaves them open);
- ``flower-superexec`` (with the same secret; ``radfed.site.superexec``) runs each task
  as ``radfed.site.runtime``, forked from a warm process that has imported torch and radfed
  (``radfed.site.warm``), or else starts the ``flwr-clientapp`` first on its PATH, radfed's
  own (``SITE_DIR/.radfed/bin/flwr-clientapp``): either way the site answers with the
  radfed it installed, and no code of the run's app bundle runs here.

A task started cold gets its token on the command line (Flower's executor puts it there):
a host whose ``/proc`` is not mounted with ``hidepid=invisible`` shows it to other local
users while the task runs. ``deploy/README.md`` says how to close that. A forked task gets
it over a socket pair.
"""

from __future__ import annotations

import os
import secrets
import sys
from pathlib import Path

from radfed.deployment.process import (
    HARDENED_ENV,
    Command,
    port_is_free,
    run_foreground,
)
from radfed.deployment.site_kit import load_site_kit
from radfed.deployment.site_node import TLS_CA_ENV, TLS_CERT_ENV, TLS_KEY_ENV
from radfed.errors import ConfigError
from radfed.folders import MANIFEST_NAME, SiteFolder, SiteState
from radfed.log import logger
from radfed.privacy import load_policy

__all__ = [
    "CLIENTAPP_PROGRAM",
    "REFUSED_PROGRAMS",
    "RUNTIME_HOST",
    "install_site_programs",
    "join_site",
    "site_command",
    "superexec_command",
]

#: Where a SuperNode serves its local Runtime API (to its SuperExec and task processes).
RUNTIME_HOST = "127.0.0.1"
#: The program Flower's SuperExec starts for each ClientApp task, found on its PATH.
CLIENTAPP_PROGRAM = "flwr-clientapp"
#: The programs Flower's SuperExec starts for the other task types. The site's SuperExec
#: never takes such a task (radfed.flower_private.site_exec_plugin); should one be started
#: all the same, the site's program of that name refuses it.
REFUSED_PROGRAMS = (
    "flwr-agentapp",
    "flwr-connector",
    "flwr-model",
    "flwr-serverapp",
    "flwr-simulation",
)


def site_command(
    *,
    ca: Path,
    key: Path,
    cert: Path,
    site: str,
    data: Path,
    server: str,
    policy: Path | None = None,
    port: int = 9094,
) -> Command:
    """A site's SuperNode (Flower's, presenting the site's client certificate ``cert`` to the
    server's edge: radfed.deployment.site_node): TLS with the federation's CA,
    authenticated by the site's key, its Runtime API on loopback and open only to holders
    of the site's SuperExec secret."""
    node_config = f'site-name="{site}" data-path="{data.resolve()}"'
    if policy is not None:
        node_config += f' policy-path="{policy.resolve()}"'
    state = SiteFolder(data).state
    argv = [
        *_python_module("radfed.deployment.site_node"),
        "--root-certificates",
        str(ca),
        "--superlink",
        server,
        "--auth-supernode-private-key",
        str(key),
        "--node-config",
        node_config,
        "--host",
        RUNTIME_HOST,
        "--port",
        str(port),
        "--isolation",
        "process",
        "--superexec-auth-secret-file",
        str(state.superexec_secret.resolve()),
    ]
    tls = {TLS_CA_ENV: ca, TLS_CERT_ENV: cert, TLS_KEY_ENV: key}
    env = {**_site_env(state), **{name: str(path.resolve()) for name, path in tls.items()}}
    return Command(argv, env)


def superexec_command(*, data: Path, port: int = 9094) -> Command:
    """The site's SuperExec (radfed.site.superexec): takes the SuperNode's
    ClientApp tasks only, from its Runtime API on loopback ``port``, and starts radfed's
    ``flwr-clientapp`` for each."""
    state = SiteFolder(data).state
    argv = [
        *_python_module("radfed.site.superexec"),
        "--runtime-api-address",
        f"{RUNTIME_HOST}:{port}",
        "--insecure",  # loopback only, and every operation signed with the shared secret
        "--executor",
        "subprocess",
        "--superexec-auth-secret-file",
        str(state.superexec_secret.resolve()),
        "--parent-pid",
        str(os.getpid()),
    ]
    return Command(argv, _site_env(state), path_first=(state.programs.resolve(),))


def _python_module(module: str) -> list[str]:
    """This Python running ``module``, without the current folder on ``sys.path`` (``-P``):
    a ``radfed`` planted where the command was started is never imported."""
    return [sys.executable, "-P", "-m", module]


def _site_env(state: SiteState) -> dict[str, str]:
    env = dict(HARDENED_ENV)
    if "FLWR_HOME" not in os.environ:  # Flower's state beside the site's, not in ~/.flwr
        env["FLWR_HOME"] = str(state.flwr_home.resolve())
    return env


def install_site_programs(state: SiteState) -> Path:
    """Write the site's ``flwr-clientapp`` (this Python running ``radfed.site.runtime``), a
    refusing program for each of ``REFUSED_PROGRAMS`` and, once, the SuperExec secret; the
    site's state folder and all of these are the site's user's only (0700, 0600).

    Returns:
        The ClientApp program.
    """
    state.path.mkdir(parents=True, exist_ok=True, mode=0o700)
    state.path.chmod(0o700)  # made earlier by `radfed site index`, say, with the umask's mode
    state.programs.mkdir(exist_ok=True, mode=0o700)
    if not state.superexec_secret.is_file():
        descriptor = os.open(state.superexec_secret, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(secrets.token_bytes(32))
    # -P: the program's folder is not put on sys.path (only radfed as installed is imported)
    program = _write_program(
        state.programs / CLIENTAPP_PROGRAM,
        '"""The ClientApp process of this site: radfed as installed here (radfed site join)."""\n'
        "import sys\n\n"
        "from radfed.site.runtime import main\n\n"
        "sys.exit(main())\n",
    )
    for name in REFUSED_PROGRAMS:
        _write_program(
            state.programs / name,
            f'"""{name}: a task type this site never runs (radfed site join)."""\n'
            "import sys\n\n"
            f'sys.stderr.write("radfed: this site runs ClientApp tasks only; {name} refused\\n")\n'
            "sys.exit(1)\n",
        )
    return program


def _write_program(path: Path, body: str) -> Path:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(f"#!{sys.executable} -P\n{body}")
    tmp.chmod(0o700)
    tmp.replace(path)
    return path


def join_site(
    kit_dir: Path,
    site: str,
    data: Path,
    *,
    server: str = "",
    policy: Path | None = None,
    port: int = 9094,
) -> int:
    """Check the site kit, policy and data, then run the site's SuperNode and SuperExec in
    the foreground until either ends.

    Returns:
        The exit code of the process that ended first (non-zero when the server refuses the
        site; Flower logs "Exit Code: 305" when the site's key is not registered).
    """
    kit = load_site_kit(kit_dir)
    if kit.name != site:
        raise ConfigError(f"the kit in {kit_dir} is for site {kit.name!r}, not {site!r}")
    if kit.private_key is None:
        raise ConfigError(
            f"the kit in {kit_dir} has no site.key; put this site's private key there"
        )
    if kit.client_cert is None:
        raise ConfigError(
            f"the kit in {kit_dir} has no site.crt; send site.csr to the central team (`radfed "
            f"pki add-site {site} --csr site.csr`) and put the site.crt they return there"
        )
    folder = SiteFolder(data)
    if policy is None and folder.policy.is_file():
        policy = folder.policy
    effective = load_policy(policy)
    if not folder.manifest.is_file():
        raise ConfigError(
            f"{data} holds no {MANIFEST_NAME}; prepare it with `radfed site index` and "
            "`radfed site check`"
        )
    if not port_is_free(RUNTIME_HOST, port):
        raise ConfigError(
            f"local port {port} is taken (another site or program on this host uses it); "
            "give this site its own with --port"
        )
    os.umask(0o077)  # what the site's processes write is the site's user's only
    install_site_programs(folder.state)
    supernode = site_command(
        ca=kit.ca_cert,
        key=kit.private_key,
        cert=kit.client_cert,
        site=site,
        data=data,
        server=server or kit.server_address,
        policy=policy,
        port=port,
    )
    logger.info(
        "site %s joins %s (policy: %s); it answers runs of the app bundle %s with the radfed "
        "installed here, and runs no code of any bundle",
        site,
        server or kit.server_address,
        effective.describe(),
        effective.bundle.describe(),
    )
    return run_foreground(supernode, superexec_command(data=data, port=port))
