"""Flower's non-public APIs that radfed relies on, in one place (checked against flwr 1.41.0).

Each is wrapped here with radfed's own signature, so a Flower upgrade touches this module
only; nothing else in radfed imports from Flower beyond its public app API (``flwr.app``,
``flwr.serverapp``, ``flwr.clientapp``).

- ``flwr.common.config``: parsing ``--run-config`` values, fusing them with an app's defaults;
- ``flwr.common.logger.console_handler``: Flower's log handler (its streamed run log);
- ``flwr.common.serde.recorddict_to_proto``: the bytes of a reply as Flower sends them;
- ``flwr.simulation.run_simulation._run_simulation`` with ``Run``, ``TaskIdentity`` and
  the id helpers: what Flower's ``flwr-simulation`` process does after it fetched the app;
- ``flwr.supernode.cli.flwr_clientapp`` (the ``flwr-clientapp`` process) with two of the
  names its ``flwr.supernode.runtime.run_clientapp`` module calls replaced,
  ``install_from_fab`` and ``get_load_client_app_fn``: a site answers with its own code;
- ``flwr.supercore.cli.flower_superexec`` (the ``flower-superexec`` process) with
  ``flwr.supercore.superexec.run_superexec.AutoExecPlugin`` limited to ClientApp tasks:
  the task types it supports are the ones it asks its SuperNode for (``AcquireTask``);
  and ``run_superexec.get_executor`` replaced by one that hands ClientApp tasks to a
  ``TaskStarter`` (the site's warm process) before Flower's ``SubprocessExecutor``, building
  the task's arguments as that executor does (``flwr.supercore.constant``'s
  ``TASK_TYPE_TO_COMMAND`` and ``TASK_TYPE_TO_APPIO_API_ADDRESS_ARG``); its poll for tasks
  every ``SUPEREXEC_POLL_S`` through Flower's ``FLWR_SUPEREXEC_TASK_POLL_INTERVAL``;
- ``flwr.supernode.cli.flower_supernode`` (the ``flower-supernode`` process) with
  ``flwr.supernode.fleet_http_connection.FleetHttpClient`` given the site's client
  certificate (``ProtobufClient`` takes an ``ssl.SSLContext`` as ``verify``);
- ``flwr.supercore.inflatable.inflatable_utils.pull_objects`` (Flower's retrying pull of a
  message's objects), called with a shorter first wait where the site's task and SuperNode
  and the server's ServerApp call it: ``quick_object_pulls``.
"""

from __future__ import annotations

import logging
import os
import ssl
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from flwr.app import Context, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.config import get_fused_config_from_dir, parse_config_args
from flwr.common.logger import console_handler
from flwr.common.serde import recorddict_to_proto

from radfed.errors import ConfigError
from radfed.log import logger

__all__ = [
    "SUPEREXEC_POLL_S",
    "TaskStarter",
    "flower_give_up_s",
    "fused_run_config",
    "log_like_flower",
    "parse_run_config",
    "quick_object_pulls",
    "run_simulation",
    "run_site_clientapp",
    "run_site_superexec",
    "run_supernode",
    "serialize_content",
    "site_exec_plugin",
]

RunConfigValues = dict[str, bool | int | float | str]


def parse_run_config(values: Sequence[str] | None) -> RunConfigValues:
    """``--run-config 'k=v k2="s"'`` values (TOML-like, as ``flwr run`` reads them).

    Raises:
        ConfigError: a value that is not of that form.
    """
    try:
        parsed: RunConfigValues = dict(parse_config_args(list(values) if values else None))
    except OSError:
        raise ConfigError("--run-config names a TOML file that cannot be read") from None
    except Exception:  # Flower raises ValueError or click's exception, with its own text
        msg = (
            "--run-config must be space-separated key=value pairs, strings in double quotes, "
            "e.g. 'local-epochs=2 model=\"resnet18\"' (or one .toml file)"
        )
        raise ConfigError(msg) from None
    return parsed


def fused_run_config(app: Path, overrides: Mapping[str, Any]) -> RunConfigValues:
    """The app's ``[tool.flwr.app.config]`` with ``overrides`` over it.

    Raises:
        ConfigError: an override names a key the app does not have.
    """
    try:
        fused: RunConfigValues = dict(get_fused_config_from_dir(app, dict(overrides)))
    except ValueError as err:
        raise ConfigError(f"unknown run-config key: {err}") from None
    return fused


def serialize_content(content: RecordDict) -> bytes:
    """The deterministic protobuf bytes of a reply's content, as Flower encodes it."""
    data: bytes = recorddict_to_proto(content).SerializeToString(deterministic=True)
    return data


def log_like_flower() -> None:
    """In a process Flower started (ServerApp, ClientApp) with no logging set up, show
    radfed's lines through Flower's console handler, so that they reach the streamed run
    log (``flwr run --stream``, ``radfed launch``) and the SuperNode's output."""
    configured = [h for h in logger.handlers if not isinstance(h, logging.NullHandler)]
    if configured or logging.getLogger().handlers or logger.level != logging.NOTSET:
        return
    logger.addHandler(console_handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False


def run_simulation(
    app: Path,
    *,
    nodes: int,
    components: Mapping[str, str],
    run_config: Mapping[str, Any],
    override: Mapping[str, Any],
    backend_config: Mapping[str, Any],
    verbose: bool,
) -> None:
    """Run the app's ServerApp and ``nodes`` ClientApps in this process (Ray backend), as
    Flower's ``flwr-simulation`` process does once it has the app and its run config."""
    # Flower's simulation engine, imported here: a site's or the server's process (which
    # imports this module for the other wrappers) never pays for it.
    from flwr.common.constant import RUN_ID_NUM_BYTES, SUPERLINK_NODE_ID, TASK_ID_NUM_BYTES
    from flwr.server.superlink.linkstate.utils import generate_rand_int_from_bytes
    from flwr.simulation.run_simulation import _run_simulation
    from flwr.supercore.constant import NOOP_FEDERATION_ID
    from flwr.supercore.run import Run
    from flwr.supercore.task_identity import TaskIdentity
    from flwr.supercore.telemetry import EventType

    run_id = generate_rand_int_from_bytes(RUN_ID_NUM_BYTES)
    run = Run.create_empty(run_id=run_id)
    run.primary_task_id = generate_rand_int_from_bytes(TASK_ID_NUM_BYTES)
    run.federation_id = NOOP_FEDERATION_ID
    run.override_config = dict(override)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, run_id, SUPERLINK_NODE_ID
    context = Context(
        run_id=run_id, node_id=0, node_config={}, state=RecordDict(), run_config=dict(run_config)
    )
    _run_simulation(
        num_supernodes=nodes,
        exit_event=EventType.FLWR_SIMULATION_RUN_LEAVE,
        server_app_attr=components["serverapp"],
        client_app_attr=components["clientapp"],
        backend_name="ray",
        backend_config=dict(backend_config),
        app_dir=str(app),
        run=run,
        server_app_context=context,
        is_app=True,
        verbose_logging=verbose,
    )


#: How a process retries pulling an object that is not there yet: after 0.05 s, doubling up
#: to 0.5 s. Flower waits 1 s first, doubling up to 10 s (``PULL_INITIAL_BACKOFF``,
#: ``PULL_BACKOFF_CAP``): a site's task starts as soon as its message is announced, before
#: the SuperNode has all of its weights, and sat out 1 + 2 s for the last ones.
OBJECT_PULL_BACKOFF = (0.05, 0.5)
#: The same for a site's task, which pulls from its own SuperNode on loopback: a task
#: starts as soon as its SuperExec sees it, often while its SuperNode still pulls the
#: weights from the server, and waited up to 0.5 s past their arrival.
LOCAL_OBJECT_PULL_BACKOFF = (0.02, 0.1)


def quick_object_pulls(
    *modules: str,
    max_time: float | None = None,
    backoff: tuple[float, float] = OBJECT_PULL_BACKOFF,
) -> None:
    """In each of ``modules`` (those that call Flower's ``pull_objects``), retry an object
    that is not there yet after ``backoff`` (first wait, doubling up to the second).

    A pull gives up after ``max_time`` seconds, by default no later than Flower's own
    retries give up on one object that never comes (``flower_give_up_s``): a peer that
    announces a message and withholds its objects holds the puller no longer than before.
    The tries come at most once per backoff cap per missing object (two a second with
    ``OBJECT_PULL_BACKOFF``).

    An option a caller leaves out, or passes on at Flower's default (its
    ``pull_and_inflate_object_from_tree``, which a task pulls its message with, passes
    every default on explicitly), is radfed's; one a caller chose is kept, but never a
    time limit beyond radfed's.
    """
    import importlib

    import flwr.supercore.inflatable.inflatable_utils as inflatable
    from flwr.supercore.constant import (
        PULL_BACKOFF_CAP,
        PULL_INITIAL_BACKOFF,
        PULL_MAX_TIME,
        PULL_MAX_TRIES_PER_OBJECT,
    )

    flower: Any = getattr(inflatable, "pull_objects")  # noqa: B009  (the module global)
    flower = getattr(flower, "__wrapped__", flower)  # patched once, whatever is asked twice
    first, cap = backoff
    bound = flower_give_up_s() if max_time is None else min(max_time, flower_give_up_s())
    limit = max(0.0, bound - cap)  # Flower looks at the time after a try, then waits once more
    ours: dict[str, float | None] = {
        "initial_backoff": first,
        "backoff_cap": cap,
        "max_time": limit,
        "max_tries_per_object": None,  # max_time bounds it instead
    }
    flowers = {
        "initial_backoff": PULL_INITIAL_BACKOFF,
        "backoff_cap": PULL_BACKOFF_CAP,
        "max_time": PULL_MAX_TIME,
        "max_tries_per_object": PULL_MAX_TRIES_PER_OBJECT,
    }

    def pull_objects(object_ids: Any, pull_object_fn: Any, **options: Any) -> Any:
        for key, value in ours.items():
            if key not in options or options[key] == flowers[key]:
                options[key] = value
        chosen = options["max_time"]  # always bounded: the try limit may be radfed's None
        options["max_time"] = limit if chosen is None else min(float(chosen), limit)
        return flower(object_ids, pull_object_fn, **options)

    setattr(pull_objects, "__wrapped__", flower)  # noqa: B010
    for name in modules:
        setattr(importlib.import_module(name), "pull_objects", pull_objects)  # noqa: B010


def flower_give_up_s() -> float:
    """How long Flower's own retries wait for one object that never comes: its try limit
    (``PULL_MAX_TRIES_PER_OBJECT``) at its backoff (``PULL_INITIAL_BACKOFF`` doubling up to
    ``PULL_BACKOFF_CAP``), within its overall ``PULL_MAX_TIME``; jitter left out."""
    from flwr.supercore.constant import (
        PULL_BACKOFF_CAP,
        PULL_INITIAL_BACKOFF,
        PULL_MAX_TIME,
        PULL_MAX_TRIES_PER_OBJECT,
    )

    waited, delay = 0.0, float(PULL_INITIAL_BACKOFF)
    for _ in range(PULL_MAX_TRIES_PER_OBJECT - 1):  # no wait after the last try
        waited += delay
        delay = min(delay * 2, float(PULL_BACKOFF_CAP))
    return min(waited, float(PULL_MAX_TIME))


def run_site_clientapp(load: Callable[[bytes], ClientApp]) -> None:
    """Be Flower's ``flwr-clientapp`` process (arguments from ``sys.argv``) for one task,
    answering with the ClientApp that ``load`` returns for the run's app bundle.

    Flower's own process extracts the bundle under ``FLWR_HOME/apps/`` and imports the
    ClientApp its ``pyproject.toml`` names, the bundle folder first on ``sys.path``. Here the
    bundle's bytes go to ``load`` instead: nothing of it is written, installed or imported.
    Everything else (pulling the task, pushing the reply, heartbeats) is Flower's.
    """
    import flwr.supernode.runtime.run_clientapp as process
    from flwr.supernode.cli.flwr_clientapp import flwr_clientapp

    bundles: list[bytes] = []

    def keep_bundle(fab_file: Path | bytes, *_: object, **__: object) -> Path:
        bundles.append(fab_file if isinstance(fab_file, bytes) else b"")
        return Path(os.devnull)

    def site_app_loader(**_: object) -> Callable[[str, str, str], ClientApp]:
        return lambda fab_id, fab_version, fab_hash: load(bundles[-1] if bundles else b"")

    setattr(process, "install_from_fab", keep_bundle)  # noqa: B010  (module globals it calls)
    setattr(process, "get_load_client_app_fn", site_app_loader)  # noqa: B010
    quick_object_pulls(  # from its own SuperNode, on loopback
        "flwr.supercore.inflatable.inflatable_utils", backoff=LOCAL_OBJECT_PULL_BACKOFF
    )
    flwr_clientapp()


def site_exec_plugin() -> type[Any]:
    """Flower's SuperExec plugin, taking ClientApp tasks only.

    A SuperNode makes an agent-app task (``flwr-agentapp``, which installs and imports the
    bundle's own code) when the run the server sent says so; Flower's plugin takes every
    task type. This one asks its SuperNode for ClientApp tasks alone, so no other kind of
    task is ever handed to the site's SuperExec.
    """
    import flwr.supercore.superexec.run_superexec as superexec
    from flwr.supercore.constant import TaskType

    base: Any = getattr(superexec, "AutoExecPlugin")  # noqa: B009  (the module global)

    class SiteExecPlugin(base):  # type: ignore[misc]
        supported_task_types = frozenset({TaskType.CLIENT_APP})

    return SiteExecPlugin


class TaskStarter(Protocol):
    """What starts a ClientApp task other than by a fresh process (``radfed.site.warm``)."""

    def check(self) -> None:
        """Keep ready between task polls (start anew what has ended)."""

    def start(self, argv: Sequence[str]) -> bool:
        """Start the task that ``argv`` (``flwr-clientapp`` and its arguments) describes;
        False: it was not started, and the task is started as Flower does."""

    def close(self) -> None:
        """Release what it holds when the SuperExec ends."""


#: Seconds between a site's SuperExec's asks for a task (Flower's default: 1 s, half a
#: second of every message on average). The ask goes to the site's own SuperNode on
#: loopback; an administrator's ``FLWR_SUPEREXEC_TASK_POLL_INTERVAL`` wins.
SUPEREXEC_POLL_S = 0.1
_SUPEREXEC_POLL_ENV = "FLWR_SUPEREXEC_TASK_POLL_INTERVAL"


def run_site_superexec(starter: TaskStarter | None = None) -> None:
    """Be Flower's ``flower-superexec`` process (arguments from ``sys.argv``) with
    ``site_exec_plugin``: a site's SuperExec that starts ClientApp processes only, through
    ``starter`` when one is given (else, or when it fails, a fresh process each), asking
    its SuperNode for a task every ``SUPEREXEC_POLL_S``."""
    import flwr.supercore.superexec.run_superexec as superexec
    from flwr.supercore.cli.flower_superexec import flower_superexec
    from flwr.supercore.constant import (
        TASK_TYPE_TO_APPIO_API_ADDRESS_ARG,
        TASK_TYPE_TO_COMMAND,
        TaskType,
    )
    from flwr.supercore.superexec.executor import LaunchResult

    flower_executor = getattr(superexec, "get_executor")  # noqa: B009  (the module global)

    class SiteExecutor:
        """Flower's executor, ClientApp tasks handed to ``starter`` first."""

        def __init__(self, base: Any) -> None:
            self.base = base

        def get_eligible_capacity(self, *args: Any, **kwargs: Any) -> Any:
            return self.base.get_eligible_capacity(*args, **kwargs)

        def wait_for_capacity(self, *args: Any, **kwargs: Any) -> None:
            self.base.wait_for_capacity(*args, **kwargs)

        def launch(self, spec: Any) -> Any:
            if starter is not None and spec.task_type == TaskType.CLIENT_APP:
                argv = [
                    TASK_TYPE_TO_COMMAND[spec.task_type],
                    TASK_TYPE_TO_APPIO_API_ADDRESS_ARG[spec.task_type],
                    spec.runtime_api_address,
                    "--token",
                    spec.token,
                ]
                if spec.insecure:
                    argv.append("--insecure")
                elif spec.root_certificates_path is not None:
                    argv.extend(["--root-certificates", spec.root_certificates_path])
                if spec.parent_pid is not None:
                    argv.extend(["--parent-pid", str(spec.parent_pid)])
                if spec.runtime_dependency_install:
                    argv.append("--allow-runtime-dependency-installation")
                if starter.start(argv):
                    return LaunchResult.accepted()
            return self.base.launch(spec)

        def reconcile(self) -> None:
            if starter is not None:
                starter.check()
            self.base.reconcile()

        def close(self) -> None:
            if starter is not None:
                starter.close()
            self.base.close()

    def site_executor(*args: Any, **kwargs: Any) -> SiteExecutor:
        return SiteExecutor(flower_executor(*args, **kwargs))

    setattr(superexec, "AutoExecPlugin", site_exec_plugin())  # noqa: B010
    setattr(superexec, "get_executor", site_executor)  # noqa: B010
    os.environ.setdefault(_SUPEREXEC_POLL_ENV, str(SUPEREXEC_POLL_S))
    flower_superexec()


def run_supernode(tls: ssl.SSLContext) -> None:
    """Be Flower's ``flower-supernode`` process (arguments from ``sys.argv``), connecting to
    the server's Fleet API with ``tls``: the federation's CA and the site's own client
    certificate, which Flower's SuperNode has no option for (mutual TLS at the edge)."""
    import flwr.supernode.fleet_http_connection as connection
    from flwr.supernode.cli.flower_supernode import flower_supernode

    base: Any = getattr(connection, "FleetHttpClient")  # noqa: B009  (the module global)

    class SiteFleetClient(base):  # type: ignore[misc]
        """Flower's Fleet API client, presenting the site's certificate."""

        @classmethod
        def from_server_address(
            cls,
            server_address: str,
            insecure: bool,
            root_certificates: bytes | str | None,
            interceptors: Sequence[Any],
            *,
            retry_invoker: Any = None,
        ) -> Any:
            del insecure, root_certificates  # always TLS, with the CA inside ``tls``
            return cls(
                f"https://{server_address}",
                interceptors=interceptors,
                verify=tls,
                retry_invoker=retry_invoker,
            )

    setattr(connection, "FleetHttpClient", SiteFleetClient)  # noqa: B010  (module global)
    quick_object_pulls("flwr.supernode.start_client_internal")  # from the server's SuperLink
    flower_supernode()
