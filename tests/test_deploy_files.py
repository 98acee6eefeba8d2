"""deploy/: the launch files parse, run real radfed commands, and stay hardened."""

from __future__ import annotations

import functools
import math
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click
import pytest
import typer
import yaml

from radfed.cli import app
from radfed.deployment.process import HARDENED_ENV
from radfed.deployment.superlink import control_port
from radfed.federation.codes import ErrorCode
from radfed.privacy import load_policy
from radfed.privacy.policy_file import POLICY_KEYS

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
README = DEPLOY / "README.md"
SERVER_UNIT = DEPLOY / "systemd" / "radfed-server.service"
SITE_UNIT = DEPLOY / "systemd" / "radfed-site@.service"
UNITS = (SERVER_UNIT, SITE_UNIT)
COMPOSE = DEPLOY / "compose.yaml"
K8S_SERVER = DEPLOY / "k8s" / "server.yaml"
K8S_SITE = DEPLOY / "k8s" / "site.yaml"
DOCKERFILE = DEPLOY / "Dockerfile"

#: What every unit and container that runs Flower must set (FLOWER.md, Deployment).
REQUIRED_ENV = {
    **HARDENED_ENV,
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
}
WORKLOADS = {"Deployment", "StatefulSet", "DaemonSet", "Job", "Pod"}
_SEPARATORS = {"&&", "||", "|", ";", "&"}


# ---------------------------------------------------------------- radfed command lines


@functools.cache
def _cli() -> click.Group:
    command = typer.main.get_command(app)
    assert isinstance(command, click.Group)
    return command


def _option(command: click.Command, name: str) -> click.Option | None:
    for param in command.params:
        if isinstance(param, click.Option) and name in (*param.opts, *param.secondary_opts):
            return param
    return None


def check_radfed(args: list[str]) -> tuple[tuple[str, ...], list[str]]:
    """The subcommand path of ``radfed ARGS`` and what is wrong with the line (empty: fine).

    Placeholders as in a synopsis are allowed: ``[--opt VALUE]`` brackets and ``...``.
    """
    command: click.Command = _cli()
    path: list[str] = []
    problems: list[str] = []
    positionals: list[str] = []
    seen: set[str] = set()
    helped = False
    tokens = [t.removeprefix("[").removesuffix("]") if t.strip("[]") else t for t in args]
    tokens = [t for t in tokens if t != "..."]
    i = 0
    while i < len(tokens):
        token = tokens[i]
        where = " ".join(["radfed", *path])
        if token.startswith("-") and token != "-":
            name, eq, _ = token.partition("=")
            i += 1
            if name == "--help":
                helped = True
                continue
            option = _option(command, name)
            if option is None:
                problems.append(f"`{where}` has no option {name}")
                continue
            seen.add(option.name or "")
            flag = option.is_flag or option.count or name in option.secondary_opts
            i += 0 if eq or flag else option.nargs
        elif isinstance(command, click.Group):
            sub = command.commands.get(token)
            if sub is None:
                known = ", ".join(sorted(command.commands))
                problems.append(f"`{where}` has no subcommand {token!r} (it has: {known})")
                return tuple(path), problems
            command, i = sub, i + 1
            path.append(token)
        else:
            positionals.append(token)
            i += 1
    where = " ".join(["radfed", *path])
    if helped:
        return tuple(path), problems
    if isinstance(command, click.Group):
        problems.append(f"`{where}` is a group: name one of its commands")
        return tuple(path), problems
    arguments = [p for p in command.params if isinstance(p, click.Argument)]
    least = sum(max(p.nargs, 1) for p in arguments if p.required)
    most = math.inf if any(p.nargs < 0 for p in arguments) else sum(p.nargs for p in arguments)
    if not least <= len(positionals) <= most:
        problems.append(f"`{where}` takes {least}..{most} arguments, got {positionals}")
    for param in command.params:
        if isinstance(param, click.Option) and param.required and param.name not in seen:
            problems.append(f"`{where}` lacks its required option {param.opts[0]}")
    return tuple(path), problems


def _shell_commands(text: str) -> Iterator[list[str]]:
    """The argument lists of ``radfed`` invoked at a command position in shell text."""
    for line in text.replace("\\\n", " ").splitlines():
        line = line.strip().removeprefix("$ ")
        try:
            tokens = shlex.split(line, comments=True)
        except ValueError:
            assert not re.search(r"(^|\s)radfed\s", line), f"cannot tokenize: {line}"
            continue
        segment: list[str] = []
        for token in [*tokens, ";"]:
            if token not in _SEPARATORS:
                segment.append(token)
                continue
            while segment and (re.match(r"^\w+=", segment[0]) or segment[0] in ("exec", "env")):
                segment.pop(0)
            if segment and segment[0] == "sudo":
                segment.pop(0)
                while segment and segment[0].startswith("-"):
                    segment = segment[2:] if segment[0] in ("-u", "-g") else segment[1:]
            if segment and Path(segment[0]).name == "radfed":
                yield segment[1:]
            segment = []


def _comments(path: Path) -> str:
    """The comment lines of a YAML or unit file, without their ``#``, as shell text."""
    lines = [
        line.strip().removeprefix("#")
        for line in path.read_text().splitlines()
        if line.strip().startswith("#")
    ]
    return "\n".join(lines)


def _readme_blocks() -> list[tuple[str, str]]:
    """(language, body) of every fenced code block of deploy/README.md."""
    blocks = re.findall(r"^```([^\n]*)\n(.*?)^```", README.read_text(), re.MULTILINE | re.DOTALL)
    assert len(blocks) >= 10, "the README's code blocks were not found"
    return [(lang.strip(), body) for lang, body in blocks]


def _assert_valid(lines: list[list[str]], where: str) -> set[tuple[str, ...]]:
    assert lines, f"no radfed command found in {where}"
    problems = [p for args in lines for p in check_radfed(args)[1]]
    assert not problems, f"{where}:\n" + "\n".join(problems)
    return {check_radfed(args)[0] for args in lines}


def test_command_checker_rejects_what_the_cli_rejects() -> None:
    # Prepare
    good = shlex.split("site join --pki KIT --site a --data SITE [--policy p.toml]")
    bad = {
        "sit join --pki KIT --site a --data SITE": "no subcommand 'sit'",
        "site join --pki KIT --site a --data SITE --polcy p": "no option --polcy",
        "site join --pki KIT --data SITE": "required option --site",
        "site check": "arguments",
        "site": "is a group",
    }

    # Execute
    ok = check_radfed(good)
    found = {line: check_radfed(line.split())[1] for line in bad}

    # Assert
    assert ok == (("site", "join"), [])
    for line, expected in bad.items():
        assert any(expected in p for p in found[line]), (line, found[line])


# ---------------------------------------------------------------- files and their commands


def _unit(path: Path) -> dict[str, list[str]]:
    """Key -> values of a unit file (keys may repeat)."""
    out: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            out.setdefault(key.strip(), []).append(value.strip())
    return out


def _exec_args(path: Path) -> list[str]:
    argv = shlex.split(_unit(path)["ExecStart"][0])
    assert argv[0] == "/usr/local/bin/radfed", argv[0]
    return argv[1:]


def _value(args: list[str], option: str) -> str:
    return args[args.index(option) + 1]


def _compose() -> dict[str, Any]:
    doc = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(doc, dict)
    return doc


def _k8s(path: Path) -> list[dict[str, Any]]:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert docs, f"{path} holds no object"
    return docs


def _containers(obj: dict[str, Any]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The pod spec of a workload and all its containers (init containers included)."""
    spec = obj["spec"] if obj["kind"] == "Pod" else obj["spec"]["template"]["spec"]
    return spec, [*spec.get("initContainers", []), *spec["containers"]]


def _radfed_args(container: dict[str, Any]) -> list[str] | None:
    """What a container passes to radfed, or None when it runs something else."""
    command = container.get("command")
    if command is None:
        assert "radfed" in container["image"], container["name"]
        return [str(a) for a in container.get("args", [])]
    if Path(command[0]).name == "radfed":
        return [str(a) for a in [*command[1:], *container.get("args", [])]]
    return None


def test_systemd_units_run_real_radfed_commands() -> None:
    paths = _assert_valid([_exec_args(SERVER_UNIT)], SERVER_UNIT.name)
    paths |= _assert_valid([_exec_args(SITE_UNIT)], SITE_UNIT.name)

    assert paths == {("server", "start"), ("site", "join")}


def test_compose_services_run_real_radfed_commands() -> None:
    services = _compose()["services"]
    lines = {}
    for name, service in services.items():
        assert service["image"].startswith("radfed:"), name
        assert service.get("entrypoint") in (None, ["radfed"]), name
        lines[name] = [str(a) for a in service["command"]]
    comment_lines = list(_shell_commands(_comments(COMPOSE)))

    paths = _assert_valid(list(lines.values()), COMPOSE.name)
    comment_paths = _assert_valid(comment_lines, f"{COMPOSE.name} comments")

    assert paths == {("server", "start"), ("site", "join"), ("launch",)}
    assert {("pki", "init"), ("launch",)} <= comment_paths
    # The sites dial the server by its service name, so the PKI must be made for it.
    (init,) = [args for args in comment_lines if check_radfed(args)[0] == ("pki", "init")]
    port = _value(lines["server"], "--port")
    assert _value(init, "--server-address") == f"server:{port}"
    assert {_value(lines[s], "--site") for s in ("site-a", "site-b")} == set(
        _value(init, "--sites").split(",")
    )


def test_k8s_containers_run_real_radfed_commands() -> None:
    lines = []
    for path in (K8S_SERVER, K8S_SITE):
        for obj in _k8s(path):
            if obj["kind"] in WORKLOADS:
                lines += [a for c in _containers(obj)[1] if (a := _radfed_args(c)) is not None]

    paths = _assert_valid(lines, "deploy/k8s")

    assert paths == {("server", "start"), ("site", "join")}


def test_readme_commands_are_real_radfed_commands() -> None:
    lines = [args for _, body in _readme_blocks() for args in _shell_commands(body)]

    paths = _assert_valid(lines, README.name)

    expected = {
        ("pki", "init"),
        ("pki", "add-site"),
        ("pki", "renew-server"),
        ("server", "start"),
        ("site", "check"),
        ("site", "keygen"),
        ("site", "join"),
        ("site", "audit"),
        ("launch",),
    }
    assert expected <= paths, expected - paths
    launches = [args for args in lines if check_radfed(args)[0] == ("launch",)]
    for option in ("--resume", "--site-wait", "--min-sites", "--run-config"):
        assert any(option in args for args in launches), option
    assert any("--csr" in a for a in lines if check_radfed(a)[0] == ("pki", "add-site"))


# ---------------------------------------------------------------- systemd


def _verify(unit: Path, name: str, tmp_path: Path) -> None:
    """``systemd-analyze verify`` on a copy named ``name`` whose ExecStart binary exists here."""
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze is not installed")
    local = Path(sys.executable).parent / "radfed"
    binary = str(local if local.exists() else Path(sys.executable))
    copy = tmp_path / name
    copy.write_text(unit.read_text().replace("/usr/local/bin/radfed", binary))
    done = subprocess.run(
        [tool, "verify", "--man=no", str(copy)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    output = done.stdout + done.stderr
    about_unit = [line for line in output.splitlines() if name in line or "ignoring" in line]
    assert done.returncode == 0 and not about_unit, output


def test_server_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    _verify(SERVER_UNIT, SERVER_UNIT.name, tmp_path)


@pytest.mark.parametrize("name", ["radfed-site@.service", "radfed-site@site-a.service"])
def test_site_unit_passes_systemd_analyze_verify(name: str, tmp_path: Path) -> None:
    # The instance resolves the specifiers (%i) that the template only declares.
    _verify(SITE_UNIT, name, tmp_path)


@pytest.mark.parametrize("unit", UNITS, ids=lambda p: p.name)
def test_systemd_unit_is_hardened(unit: Path) -> None:
    keys = _unit(unit)
    required = {
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "CapabilityBoundingSet": "",
        "AmbientCapabilities": "",
        "RestrictNamespaces": "yes",
        "RestrictSUIDSGID": "yes",
        "LockPersonality": "yes",
        "ProtectKernelTunables": "yes",
        "ProtectKernelModules": "yes",
        "ProtectControlGroups": "yes",
        "Restart": "on-failure",
    }
    for key, value in required.items():
        assert keys.get(key) == [value], (key, keys.get(key))
    assert keys["RestrictAddressFamilies"] == ["AF_INET AF_INET6 AF_UNIX"]
    assert keys["User"] not in (["root"], ["0"]) and keys["User"] == keys["Group"]
    # Writable: the state folder and (for a site) the site folder, nothing else.
    args = _exec_args(unit)
    state = "/var/lib/" + keys["StateDirectory"][0]
    writable = {state} | ({_value(args, "--data")} if "--data" in args else set())
    assert "--state" not in args or _value(args, "--state") == state
    assert set(" ".join(keys["ReadWritePaths"]).split()) == writable


def test_site_unit_reads_the_server_address_from_an_environment_file() -> None:
    keys = _unit(SITE_UNIT)
    args = _exec_args(SITE_UNIT)

    (env_file,) = keys["EnvironmentFile"]
    assert env_file.startswith("-/etc/radfed/")
    assert _value(args, "--server") == "${RADFED_SERVER}"
    assert _value(args, "--site") == "%i"


@pytest.mark.parametrize("unit", UNITS, ids=lambda p: p.name)
def test_systemd_unit_sets_the_flower_hardening_environment(unit: Path) -> None:
    env = dict(
        item.split("=", 1) for value in _unit(unit)["Environment"] for item in shlex.split(value)
    )
    assert REQUIRED_ENV.items() <= env.items(), env


# ---------------------------------------------------------------- compose


def test_compose_services_are_hardened_and_non_root() -> None:
    for name, service in _compose()["services"].items():
        user = re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", str(service["user"]))
        assert user.split(":")[0] not in ("", "0", "root"), name
        assert service["read_only"] is True, name
        assert service["cap_drop"] == ["ALL"], name
        assert "no-new-privileges:true" in service["security_opt"], name
        env = service["environment"]
        env = dict(e.split("=", 1) for e in env) if isinstance(env, list) else env
        assert REQUIRED_ENV.items() <= {k: str(v) for k, v in env.items()}.items(), name


def test_compose_sites_reach_only_the_server() -> None:
    doc = _compose()
    services, networks = doc["services"], doc["networks"]
    server_port = _value([str(a) for a in services["server"]["command"]], "--port")

    for name in ("site-a", "site-b"):
        assert "ports" not in services[name], name
        for network in services[name]["networks"]:
            assert networks[network]["internal"] is True, (name, network)
            assert network in services["server"]["networks"], (name, network)
    assert [p.rsplit(":", 1)[-1] for p in services["server"]["ports"]] == [server_port]


def test_compose_launches_runs_on_the_servers_loopback_only() -> None:
    services = _compose()["services"]
    server = [str(a) for a in services["server"]["command"]]
    launch = [str(a) for a in services["launch"]["command"]]
    edge = int(_value(server, "--port"))

    # The Control API is on the server's loopback: the launch service shares its network
    # namespace and dials the SuperLink's port there, never the edge.
    assert services["launch"]["network_mode"] == "service:server"
    assert _value(launch, "--server") == f"127.0.0.1:{control_port(edge)}"
    assert "ports" not in services["launch"]


def test_k8s_server_exposes_only_the_edge_and_probes_it_without_https() -> None:
    (statefulset,) = [o for o in _k8s(K8S_SERVER) if o["kind"] == "StatefulSet"]
    _, (container,) = _containers(statefulset)
    args = _radfed_args(container)
    assert args is not None
    edge = int(_value(args, "--port"))

    assert [p["containerPort"] for p in container["ports"]] == [edge]
    assert "--superlink-port" not in args  # the default: loopback, edge port + 1
    # The edge wants a site certificate; an HTTPS probe from the kubelet would never pass.
    for probe in ("readinessProbe", "livenessProbe"):
        assert "httpGet" not in container[probe] and "tcpSocket" in container[probe], probe
    # `kubectl exec ... -- radfed launch --server ...`: radfed is kubectl's argument here
    launches = re.findall(r"radfed launch --server (\S+)", _comments(K8S_SERVER))
    assert launches and set(launches) == {f"127.0.0.1:{control_port(edge)}"}


# ---------------------------------------------------------------- kubernetes


@pytest.mark.parametrize("path", (K8S_SERVER, K8S_SITE), ids=lambda p: p.name)
def test_k8s_objects_are_well_formed(path: Path) -> None:
    for obj in _k8s(path):
        assert isinstance(obj.get("apiVersion"), str) and obj["apiVersion"], obj
        assert isinstance(obj.get("kind"), str) and obj["kind"], obj
        assert obj.get("metadata", {}).get("name"), obj


def test_k8s_server_has_one_replica_state_volume_and_secret_pki() -> None:
    docs = {obj["kind"]: obj for obj in _k8s(K8S_SERVER)}
    assert {"Namespace", "StatefulSet", "Service"} <= docs.keys()
    statefulset = docs["StatefulSet"]
    spec, (container,) = _containers(statefulset)

    assert statefulset["spec"]["replicas"] == 1
    args = _radfed_args(container)
    assert args is not None
    claims = {t["metadata"]["name"] for t in statefulset["spec"]["volumeClaimTemplates"]}
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert mounts[_value(args, "--state")] in claims
    pki = {v["name"]: v for v in spec["volumes"]}[mounts[_value(args, "--pki")]]
    secrets = {s["secret"]["name"] for s in pki["projected"]["sources"]}
    assert secrets == {"radfed-server-pki", "radfed-site-keys"}
    paths = {i["path"] for s in pki["projected"]["sources"] for i in s["secret"]["items"]}
    assert {"pki.toml", "server/ca.crt", "server/server.crt", "server/server.key"} <= paths
    ports = {p["port"] for p in docs["Service"]["spec"]["ports"]}
    assert ports == {int(_value(args, "--port"))}
    assert container["resources"]["requests"]


def _workload_pods() -> Iterator[tuple[str, dict[str, Any], list[dict[str, Any]]]]:
    for path in (K8S_SERVER, K8S_SITE):
        for obj in _k8s(path):
            if obj["kind"] in WORKLOADS:
                yield (obj["metadata"]["name"], *_containers(obj))


def test_k8s_containers_run_as_non_root_and_flower_ones_are_hardened() -> None:
    pods = list(_workload_pods())
    assert {name for name, _, _ in pods} == {"radfed-server", "radfed-site"}
    for name, spec, containers in pods:
        pod = spec["securityContext"]
        assert pod["runAsNonRoot"] is True and pod.get("runAsUser", 1) != 0, name
        assert spec["automountServiceAccountToken"] is False, name
        for container in containers:
            where = f"{name}/{container['name']}"
            security = container["securityContext"]
            assert security.get("runAsUser", pod.get("runAsUser")) != 0, where
            assert security.get("runAsNonRoot", True) is True, where
            assert security["allowPrivilegeEscalation"] is False, where
            assert security["readOnlyRootFilesystem"] is True, where
            assert security["capabilities"]["drop"] == ["ALL"], where
            assert not security.get("privileged", False), where
            assert container["resources"]["requests"], where
            if _radfed_args(container) is not None:  # runs Flower
                env = {e["name"]: e.get("value") for e in container["env"]}
                assert REQUIRED_ENV.items() <= env.items(), where


def test_k8s_site_kit_key_is_not_group_readable() -> None:
    # radfed refuses a site.key that others can read; Secret files get fsGroup's read bit.
    (spec, containers) = next((s, c) for n, s, c in _workload_pods() if n == "radfed-site")
    (main,) = [c for c in containers if _radfed_args(c) is not None]
    args = _radfed_args(main)
    assert args is not None
    mounts = {m["mountPath"]: m["name"] for m in main["volumeMounts"]}
    kit = {v["name"]: v for v in spec["volumes"]}[mounts[_value(args, "--pki")]]
    assert "secret" not in kit or "fsGroup" not in spec["securityContext"]


def _site_policy_doc() -> dict[str, Any]:
    (policy,) = [
        p
        for p in _k8s(K8S_SITE)
        if p["kind"] == "NetworkPolicy" and p["metadata"]["name"] == "radfed-site"
    ]
    return policy


def test_k8s_site_network_policy_allows_only_egress_to_the_server_and_dns() -> None:
    policy = _site_policy_doc()["spec"]
    server = next(o for o in _k8s(K8S_SERVER) if o["kind"] == "Service")
    server_ports = {p["port"] for p in server["spec"]["ports"]}

    assert sorted(policy["policyTypes"]) == ["Egress", "Ingress"]
    assert not policy.get("ingress")
    kinds = []
    for rule in policy["egress"]:
        assert rule.get("to") and rule.get("ports"), rule  # no rule open to all
        ports = {(p["protocol"], p["port"]) for p in rule["ports"]}
        if ports <= {("UDP", 53), ("TCP", 53)}:
            for peer in rule["to"]:
                assert peer["podSelector"]["matchLabels"] == {"k8s-app": "kube-dns"}, peer
                assert peer["namespaceSelector"]["matchLabels"] == {
                    "kubernetes.io/metadata.name": "kube-system"
                }
            kinds.append("dns")
        else:
            assert ports == {("TCP", p) for p in server_ports}, rule
            for peer in rule["to"]:
                cidr = peer["ipBlock"]["cidr"]
                assert cidr.endswith("/32") and "except" not in peer["ipBlock"], peer
            kinds.append("server")
    assert sorted(kinds) == ["dns", "server"]
    labels = [
        o["spec"]["template"]["metadata"]["labels"]
        for o in _k8s(K8S_SITE)
        if o["kind"] == "Deployment"
    ]
    assert labels and policy["podSelector"]["matchLabels"].items() <= labels[0].items()


def test_k8s_server_network_policy_admits_only_the_port_and_opens_nothing() -> None:
    (policy,) = [o["spec"] for o in _k8s(K8S_SERVER) if o["kind"] == "NetworkPolicy"]
    args = _radfed_args(
        next(c for n, _, cs in _workload_pods() if n == "radfed-server" for c in cs)
    )
    assert args is not None

    assert sorted(policy["policyTypes"]) == ["Egress", "Ingress"]
    assert not policy.get("egress")
    for rule in policy["ingress"]:
        assert rule["from"] and rule["ports"] == [
            {"protocol": "TCP", "port": int(_value(args, "--port"))}
        ]


# ---------------------------------------------------------------- Dockerfile


def _dockerfile() -> list[str]:
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    return [line.strip() for line in text.splitlines() if line.strip() and line[0] != "#"]


def test_dockerfile_installs_radfed_and_runs_it_as_non_root() -> None:
    lines = _dockerfile()
    users = [line.split()[1] for line in lines if line.startswith("USER ")]
    env = dict(
        item.split("=", 1)
        for line in lines
        if line.startswith("ENV ")
        for item in shlex.split(line[4:])
    )
    runs = " ".join(line for line in lines if line.startswith("RUN "))

    assert users and users[-1].split(":")[0] not in ("0", "root")
    assert [line for line in lines if line.startswith("ENTRYPOINT")] == ['ENTRYPOINT ["radfed"]']
    assert "pip install --constraint constraints.txt" in runs
    assert REQUIRED_ENV.items() <= env.items(), env
    assert env["RADFED_APP"]


def test_dockerignore_lets_in_what_the_build_needs() -> None:
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
    allowed = {line[1:] for line in ignore if line.startswith("!")}
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    needed = {"pyproject.toml", "constraints.txt", "radfed", "server", "client"}
    needed |= {project["readme"], project["license"]["file"]}

    assert "*" in ignore  # an allow-list: nothing else (.venv, data, keys) is sent
    assert needed <= allowed, needed - allowed
    assert all((ROOT / name).exists() for name in allowed)


# ---------------------------------------------------------------- README content


def test_readme_policy_example_has_every_key_and_loads(tmp_path: Path) -> None:
    (body,) = [b for lang, b in _readme_blocks() if lang == "toml" and "[policy]" in b]
    file = tmp_path / "site-policy.toml"
    file.write_text(body)
    doc = tomllib.loads(body)["policy"]

    policy = load_policy(file)

    assert set(doc) == set(POLICY_KEYS["policy"])
    tables = {key.removeprefix("policy.") for key in POLICY_KEYS if key != "policy"}
    for table in tables:
        assert set(doc[table]) == set(POLICY_KEYS[f"policy.{table}"])
    assert policy.dp is not None and policy.k == doc["min-cell-size"]
    readme = README.read_text()
    tables_of_values = {k for k in doc if isinstance(doc[k], dict)} - tables  # free keys
    names = [
        f"`[policy.{k}]`" if k in tables | tables_of_values else f"`{k}`"
        for k in POLICY_KEYS["policy"]
    ]
    for table in tables:
        names += [f"`{table}.{k}`" for k in POLICY_KEYS[f"policy.{table}"]]
    for name in names:  # each key is explained in the README's table
        assert re.search(rf"^\| {re.escape(name)} \|", readme, re.MULTILINE), name


def test_k8s_site_policy_loads(tmp_path: Path) -> None:
    (config,) = [o for o in _k8s(K8S_SITE) if o["kind"] == "ConfigMap"]
    file = tmp_path / "site-policy.toml"
    file.write_text(config["data"]["site-policy.toml"])

    assert load_policy(file).k >= 1


def test_readme_lists_every_site_error_code() -> None:
    codes = {int(code) for code in ErrorCode}
    listed = {int(c) for c in re.findall(r"^\| (\d{4}) \|", README.read_text(), re.MULTILINE)}

    assert codes and listed == codes


# ---------------------------------------------------------------- resource limits


@pytest.mark.parametrize("unit", UNITS, ids=lambda p: p.name)
def test_systemd_unit_bounds_memory_tasks_and_cpu(unit: Path) -> None:
    keys = _unit(unit)
    for key in ("MemoryMax", "TasksMax", "CPUQuota"):
        assert keys.get(key) and keys[key][0] not in ("", "infinity"), key
    assert keys["MemorySwapMax"] == ["0"]


def test_compose_services_bound_memory_processes_and_cpu() -> None:
    services = yaml.safe_load(COMPOSE.read_text())["services"]
    for name, service in services.items():
        assert service.get("mem_limit") and service.get("pids_limit"), name
        assert service.get("cpus"), name


def test_k8s_radfed_containers_bound_memory_and_cpu() -> None:
    workloads = [o for p in (K8S_SERVER, K8S_SITE) for o in _k8s(p) if o["kind"] in WORKLOADS]
    for obj in workloads:
        for container in _containers(obj)[1]:
            if _radfed_args(container) is None:
                continue
            limits = container.get("resources", {}).get("limits", {})
            assert limits.get("memory") and limits.get("cpu"), container["name"]
