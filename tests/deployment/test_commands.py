"""The command lines radfed starts Flower with: hardened, TLS and authentication always on.
(The processes themselves run in tests/e2e/test_deployment.py.)"""

from __future__ import annotations

import shlex
import socket
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from flwr.common.config import parse_config_args

from radfed.deployment.launch import launch_command, write_connection
from radfed.deployment.pki import init_pki
from radfed.deployment.process import HARDENED_ENV
from radfed.deployment.superlink import superlink_command
from radfed.deployment.supernode import join_site, site_command
from radfed.errors import ConfigError


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("pki") / "pki"
    init_pki(root, "radfed.example.org:9443", ["a", "b"], central_keys=True)
    return root


def _flag(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def test_superlink_runs_with_tls_node_auth_a_database_and_no_runtime_installs(
    pki: Path, tmp_path: Path
) -> None:
    command = superlink_command(
        ca=pki / "server" / "ca.crt",
        cert=pki / "server" / "server.crt",
        key=pki / "server" / "server.key",
        state=tmp_path / "state",
        port=9443,
    )
    argv = command.argv
    assert Path(argv[0]).name == "flower-superlink"
    assert "--insecure" not in argv
    assert _flag(argv, "--ssl-certfile").endswith("server.crt")
    assert _flag(argv, "--ssl-keyfile").endswith("server.key")
    assert _flag(argv, "--ssl-ca-certfile").endswith("ca.crt")
    assert "--enable-supernode-auth" in argv
    assert "--disable-runtime-dependency-installation" in argv
    assert _flag(argv, "--database") == str(tmp_path / "state" / "superlink.db")
    assert _flag(argv, "--port") == "9443"
    for key, value in HARDENED_ENV.items():
        assert command.env[key] == value
    assert (tmp_path / "state").stat().st_mode & 0o077 == 0


def test_superlink_without_certificates_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="radfed pki init"):
        superlink_command(
            ca=tmp_path / "ca.crt", cert=tmp_path / "s.crt", key=tmp_path / "s.key", state=tmp_path
        )


def test_site_node_uses_tls_its_key_and_names_its_folder_only_locally(
    pki: Path, tmp_path: Path
) -> None:
    policy = tmp_path / "site-policy.toml"
    command = site_command(
        ca=pki / "sites" / "a" / "ca.crt",
        key=pki / "sites" / "a" / "site.key",
        cert=pki / "sites" / "a" / "site.crt",
        site="a",
        data=tmp_path / "site",
        server="radfed.example.org:9443",
        policy=policy,
        port=9101,
    )
    argv = command.argv
    assert argv[1:4] == ["-P", "-m", "radfed.deployment.site_node"]  # Flower's, with a client cert
    assert command.env["RADFED_TLS_CERT"].endswith("site.crt")
    assert command.env["RADFED_TLS_KEY"].endswith("site.key")
    assert _flag(argv, "--isolation") == "process" and _flag(argv, "--host") == "127.0.0.1"
    assert "--insecure" not in argv
    assert _flag(argv, "--root-certificates").endswith("ca.crt")
    assert _flag(argv, "--auth-supernode-private-key").endswith("site.key")
    assert _flag(argv, "--superlink") == "radfed.example.org:9443"
    pairs = dict(item.split("=", 1) for item in shlex.split(_flag(argv, "--node-config")))
    assert pairs == {
        "site-name": "a",
        "data-path": str((tmp_path / "site").resolve()),
        "policy-path": str(policy.resolve()),
    }
    assert {k: command.env[k] for k in HARDENED_ENV} == HARDENED_ENV


def test_cli_connection_trusts_only_the_federation_ca(pki: Path, tmp_path: Path) -> None:
    write_connection(tmp_path / "home", "[::1]:9443", pki / "ca" / "ca.crt")
    config = tomllib.loads((tmp_path / "home" / "config.toml").read_text())
    connection = config["superlink"][config["superlink"]["default"]]
    assert connection == {
        "address": "[::1]:9443",
        "root-certificates": str((pki / "ca" / "ca.crt").resolve()),
    }
    assert "insecure" not in connection


def test_launch_passes_typed_run_settings(tmp_path: Path) -> None:
    command = launch_command(
        tmp_path, tmp_path / "home", {"num-server-rounds": 3, "resume": True, "out-dir": "/r x"}
    )
    assert command.argv[1:5] == ["run", str(tmp_path), "radfed", "--stream"]
    settings = parse_config_args([_flag(command.argv, "--run-config")])  # as flwr run reads it
    assert settings == {"num-server-rounds": 3, "resume": True, "out-dir": "/r x"}


@pytest.mark.parametrize(
    ("site", "manifest", "message"),
    [
        ("b", True, "is for site 'a', not 'b'"),
        ("a", False, "no manifest.csv"),
    ],
)
def test_join_checks_kit_and_folder_before_starting_anything(
    pki: Path, tmp_path: Path, site: str, manifest: bool, message: str
) -> None:
    data = tmp_path / "site"
    data.mkdir()
    if manifest:
        (data / "manifest.csv").write_text("image,patient_id,label\n")
    with pytest.raises(ConfigError, match=message):
        join_site(pki / "sites" / "a", site, data)


def test_join_refuses_a_local_port_another_site_holds(pki: Path, tmp_path: Path) -> None:
    # Prepare: something (a first site's SuperNode) listens on the local Runtime API port
    data = tmp_path / "site"
    data.mkdir()
    (data / "manifest.csv").write_text("image,patient_id,label\n")
    with socket.socket() as first:
        first.bind(("127.0.0.1", 0))
        first.listen()
        port = first.getsockname()[1]

        # Execute: the second site, as a user starts it
        done = subprocess.run(
            [
                *(sys.executable, "-m", "radfed", "site", "join", "--pki"),
                *(str(pki / "sites" / "a"), "--site", "a", "--data", str(data)),
                *("--port", str(port)),
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )

    # Assert: one line that names the port and the fix, and no SuperNode was started
    assert done.returncode == 2
    assert done.stderr.strip() == (
        f"error: local port {port} is taken (another site or program on this host uses it); "
        "give this site its own with --port"
    )
    assert "Traceback" not in done.stdout + done.stderr
