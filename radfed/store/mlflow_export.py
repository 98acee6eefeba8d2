"""Export of a finished run folder to MLflow: metrics by round, settings, tags and reports."""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

from radfed.errors import ConfigError
from radfed.folders import RunFiles
from radfed.log import logger
from radfed.store.sync import run_id_of

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

__all__ = ["RUN_FOLDER_TAG", "RUN_ID_TAG", "export_run", "metric_key", "run_params"]

#: The tag that identifies the run folder an MLflow run was exported from (idempotence).
RUN_ID_TAG = "radfed.run_id"
#: The tag holding the run folder's name (never its full path).
RUN_FOLDER_TAG = "radfed.run_folder"

# MLflow's limits (mlflow.utils.validation): keys, param values, tag values, batch sizes.
_MAX_KEY = 250
_MAX_PARAM_VALUE = 6000
_MAX_TAG_VALUE = 8000
_METRICS_PER_BATCH = 1000
_PARAMS_PER_BATCH = 100

#: One part of a key as MLflow takes it on every platform; no leading dot (MLflow reads
#: keys as paths and refuses ``.``, ``..`` and names that start with them).
_SAFE_PART = re.compile(r"[A-Za-z0-9_\- ][A-Za-z0-9_.\- ]*")
_UNSAFE_CHAR = re.compile(r"[^A-Za-z0-9_.\- ]")
_SAFE_RUN_ID = re.compile(r"[A-Za-z0-9_.:\-]{1,200}")

#: Files exported as artifacts, in this order. Checkpoints never leave the server.
_ARTIFACTS = ("config.json", "metrics.jsonl", "bias_report.json", "bias_report.html", "curves.png")


@dataclass(frozen=True)
class _Value:
    """One metric value of metrics.jsonl: ``key`` logged at ``step`` (the round)."""

    key: str
    step: int
    value: float


def metric_key(split: str, site: str, metric: str) -> str:
    """The MLflow metric key of one value of metrics.jsonl: ``{split}/{site}/{metric}``.

    Each part keeps only the characters MLflow accepts everywhere (letters, digits, ``_``,
    ``-``, ``.``, space); a part that needed changing gets a short hash of its original
    name, so two different site names never share a key, and the same name always gives
    the same key.

    Args:
        split: the split (``train``, ``val``, ``test``).
        site: the site, or ``ALL`` for the pooled value.
        metric: the metric's name, or ``n``.
    """
    key = "/".join(_key_part(part) for part in (split, site, metric))
    return _fit_key(key)


def run_params(run_config: Mapping[str, Any]) -> dict[str, str]:
    """The run configuration as MLflow params: flattened, values as text.

    Nested mappings give dotted keys (``a.b``); text stays as it is, any other value is
    written as JSON (``true``, ``0.001``, ``[1, 2]``). A value longer than MLflow's limit
    (6000 characters) is cut to it, with a warning that names the setting.

    Args:
        run_config: config.json's ``run-config`` (kebab-case keys).
    """
    params: dict[str, str] = {}
    for key, value in _flatten(run_config, ""):
        name = _fit_key(".".join(_key_part(part) for part in key.split(".")))
        if name != key:
            logger.warning("run setting %r is exported to MLflow as %r", key, name)
        params[name] = _text(value, _MAX_PARAM_VALUE, f"run setting {key!r}")
    return params


def export_run(
    run_dir: Path,
    *,
    tracking_uri: str,
    experiment: str = "radfed",
    run_name: str | None = None,
    replace: bool = False,
    artifact_location: str | None = None,
) -> str:
    """Export a finished run folder to an MLflow tracking store as one MLflow run.

    Every non-null value of metrics.jsonl becomes an MLflow metric ``{split}/{site}/{name}``
    (see ``metric_key``) at step = round, with ``n`` (and ``noise_sd`` where present)
    beside the metrics; config.json's ``run-config`` becomes the params (``run_params``);
    tags name the radfed version, task, strategy and the run folder (its name only).
    config.json, metrics.jsonl, the bias reports and curves.png are the artifacts; the
    checkpoints are never exported (the weights stay on the server).

    The MLflow run is tagged ``radfed.run_id``: config.json's ``run-id`` where present,
    else (a folder from before radfed kept one) the id the run store gives it. Exporting the
    same folder again to the same experiment is refused unless ``replace`` is set.

    Unless ``MLFLOW_DISABLE_TELEMETRY`` is already set, it is set to ``true`` for this
    process before MLflow is first imported: MLflow otherwise contacts its telemetry
    service.

    Args:
        run_dir: the run folder (``radfed simulate --out``).
        tracking_uri: where MLflow keeps runs: ``sqlite:///PATH/mlflow.db`` or an
            ``http(s)://`` tracking server.
        experiment: the MLflow experiment (created when missing).
        run_name: the MLflow run's name (default: the run folder's name).
        replace: delete an earlier export of this folder after this one succeeded.
        artifact_location: where a newly created experiment keeps its artifacts (default:
            the tracking store's choice, ``./mlruns`` for a SQLite store).

    Returns:
        The MLflow run id.

    Raises:
        ConfigError: MLflow is not installed, the folder is not a run folder, the tracking
            store cannot be used, the experiment is deleted, or the folder was already
            exported and ``replace`` is not set.
    """
    _require_mlflow()
    from mlflow.entities import Metric, Param
    from mlflow.entities.view_type import ViewType

    files = RunFiles(run_dir)
    folder_name = run_dir.resolve().name
    document = _read_config(files)
    run_config: dict[str, Any] = document["run-config"]
    values, skipped = _read_values(files)
    params = run_params(run_config)
    export_id = _export_id(files, document)
    tags = _tags(document, run_config, folder_name, export_id)
    start_ms = int(files.config.stat().st_mtime * 1000)
    end_ms = max(start_ms, int(files.metrics.stat().st_mtime * 1000))

    client = _client(tracking_uri)
    experiment_id = _experiment_id(client, experiment, artifact_location)
    earlier = [
        str(run.info.run_id)
        for run in client.search_runs(
            [experiment_id],
            filter_string=f"tags.`{RUN_ID_TAG}` = '{export_id}'",
            run_view_type=ViewType.ACTIVE_ONLY,
        )
    ]
    if earlier and not replace:
        msg = (
            f"run folder {folder_name!r} was already exported to MLflow experiment "
            f"{experiment!r} as run {', '.join(earlier)}; export it with replace=True to "
            "delete that run and export again"
        )
        raise ConfigError(msg)

    run = client.create_run(
        experiment_id, start_time=start_ms, tags=tags, run_name=run_name or folder_name
    )
    run_id = str(run.info.run_id)
    logger.info(
        "exporting run folder %s to MLflow experiment %r, run %s", folder_name, experiment, run_id
    )
    try:
        items = list(params.items())
        for i in range(0, len(items), _PARAMS_PER_BATCH):
            batch = [Param(k, v) for k, v in items[i : i + _PARAMS_PER_BATCH]]
            client.log_batch(run_id, params=batch, synchronous=True)
        for i in range(0, len(values), _METRICS_PER_BATCH):
            metrics = [
                Metric(v.key, v.value, end_ms, v.step) for v in values[i : i + _METRICS_PER_BATCH]
            ]
            client.log_batch(run_id, metrics=metrics, synchronous=True)
            logger.info(
                "MLflow run %s: %d of %d metric values", run_id, i + len(metrics), len(values)
            )
        artifacts = _log_artifacts(client, run_id, files)
        client.set_terminated(run_id, "FINISHED", end_time=end_ms)
    except BaseException:
        logger.warning("export to MLflow failed; deleting the incomplete MLflow run %s", run_id)
        try:
            client.delete_run(run_id)
        except Exception:
            logger.warning("could not delete the incomplete MLflow run %s", run_id, exc_info=True)
        raise
    for old in earlier:
        client.delete_run(old)
        logger.info("deleted MLflow run %s, the earlier export of %s", old, folder_name)
    logger.info(
        "exported %s to MLflow run %s: %d metric values (%d null values skipped), "
        "%d params, %d artifacts",
        folder_name,
        run_id,
        len(values),
        skipped,
        len(params),
        artifacts,
    )
    return run_id


def _require_mlflow() -> None:
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    try:
        import mlflow.entities
        import mlflow.tracking  # noqa: F401
    except ImportError as exc:
        msg = (
            f"exporting to MLflow needs the mlflow package ({exc}); "
            "install it with: pip install 'radfed[mlflow]'"
        )
        raise ConfigError(msg) from exc


def _client(tracking_uri: str) -> MlflowClient:
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    try:
        client = MlflowClient(tracking_uri=tracking_uri)
    except MlflowException as exc:
        msg = (
            f"MLflow cannot use the tracking URI {_shown_uri(tracking_uri)!r}: {exc.message}; "
            "use 'sqlite:///PATH/mlflow.db' or the http(s):// address of a tracking server"
        )
        raise ConfigError(msg) from exc
    return client


def _experiment_id(client: MlflowClient, name: str, artifact_location: str | None) -> str:
    found = client.get_experiment_by_name(name)
    if found is None:
        logger.info("creating MLflow experiment %r", name)
        return client.create_experiment(name, artifact_location=artifact_location)
    if found.lifecycle_stage != "active":
        msg = (
            f"MLflow experiment {name!r} is deleted; restore it "
            f"('mlflow experiments restore --experiment-id {found.experiment_id}') "
            "or export to another experiment"
        )
        raise ConfigError(msg)
    return str(found.experiment_id)


def _log_artifacts(client: MlflowClient, run_id: str, files: RunFiles) -> int:
    logged = 0
    for name in _ARTIFACTS:
        path = files.path / name
        if path.is_file():
            client.log_artifact(run_id, str(path))
            logged += 1
        else:
            logger.info("%s is not in the run folder; not exported to MLflow", name)
    logger.info("MLflow run %s: %d artifacts (checkpoints are never exported)", run_id, logged)
    return logged


def _read_config(files: RunFiles) -> dict[str, Any]:
    if not files.config.is_file() or not files.metrics.is_file():
        msg = (
            f"{files.path} is not a run folder (it needs config.json and metrics.jsonl); "
            "point at the folder that 'radfed simulate --out' wrote"
        )
        raise ConfigError(msg)
    try:
        document = files.read_config()
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{files.config}: not valid JSON ({exc}); is the run finished?") from exc
    if not isinstance(document, dict) or not isinstance(document.get("run-config"), dict):
        msg = f"{files.config}: no 'run-config' mapping; is this a radfed run folder?"
        raise ConfigError(msg)
    return document


def _read_values(files: RunFiles) -> tuple[list[_Value], int]:
    """The values of metrics.jsonl to log, and how many were null (suppressed or undefined)."""
    values: list[_Value] = []
    skipped = 0
    renamed: dict[str, str] = {}
    for number, line in _lines(files.metrics):
        try:
            step, site, split = int(line["round"]), str(line["site"]), str(line["split"])
            named: dict[str, Any] = dict(line["metrics"])
        except (KeyError, TypeError, ValueError) as exc:
            msg = (
                f"{files.metrics} line {number}: expected round, site, split and metrics, "
                f"got {exc!r}; the file is damaged or not radfed's"
            )
            raise ConfigError(msg) from exc
        named["n"] = line.get("n")
        if "noise_sd" in line:
            named["noise_sd"] = line["noise_sd"]
        for name, value in named.items():
            if value is None:
                skipped += 1
                continue
            if isinstance(value, bool) or not isinstance(value, int | float):
                logger.warning(
                    "metrics.jsonl line %d: %s of %s/%s is not a number (%r); not exported",
                    number,
                    name,
                    split,
                    site,
                    value,
                )
                continue
            key = metric_key(split, site, name)
            if _key_part(site) != site:
                renamed[site] = _key_part(site)
            values.append(_Value(key, step, float(value)))
    for site, part in sorted(renamed.items()):
        logger.info("site %r appears in MLflow metric keys as %r", site, part)
    return values, skipped


def _lines(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    with path.open() as handle:
        for number, text in enumerate(handle, start=1):
            if not text.strip():
                continue
            try:
                line = json.loads(text)
            except json.JSONDecodeError as exc:
                msg = f"{path} line {number}: not valid JSON ({exc}); the file is damaged"
                raise ConfigError(msg) from exc
            if not isinstance(line, dict):
                raise ConfigError(f"{path} line {number}: expected a JSON object, got {line!r}")
            yield number, line


def _tags(
    document: Mapping[str, Any], run_config: Mapping[str, Any], folder: str, export_id: str
) -> dict[str, str]:
    tags = {
        RUN_ID_TAG: export_id,
        RUN_FOLDER_TAG: folder,
        "radfed.version": str(document.get("radfed-version", "")),
        "radfed.task": str(run_config.get("task", "")),
        "radfed.strategy": str(run_config.get("strategy", "")),
    }
    known = {"run-config", "run-id", "radfed-version"}
    for key, value in document.items():
        if key in known:
            continue
        name = _fit_key("radfed." + _key_part(key.replace("-", "_")))
        tags[name] = _text(value, _MAX_TAG_VALUE, f"config.json's {key!r}")
    return tags


def _text(value: Any, limit: int, what: str) -> str:
    """``value`` as MLflow keeps a param or tag: text (JSON unless a string), at most
    ``limit`` characters; a longer one is cut, and the log says so."""
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
    if len(text) > limit:
        logger.warning(
            "%s is %d characters long; MLflow keeps its first %d", what, len(text), limit
        )
        text = text[:limit]
    return text


def _export_id(files: RunFiles, document: Mapping[str, Any]) -> str:
    """The store's id of the run (``run_id_of``) if it is a plain name, else a hash of it."""
    run_id = run_id_of(files, document)
    if _SAFE_RUN_ID.fullmatch(run_id):
        return run_id
    return hashlib.sha256(f"run-id:{run_id}".encode()).hexdigest()


def _flatten(mapping: Mapping[str, Any], prefix: str) -> Iterator[tuple[str, Any]]:
    for key, value in mapping.items():
        if isinstance(value, Mapping) and value:
            yield from _flatten(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def _key_part(name: str) -> str:
    if _SAFE_PART.fullmatch(name):
        return name
    clean = _UNSAFE_CHAR.sub("_", name)
    clean = "_" * (len(clean) - len(clean.lstrip("."))) + clean.lstrip(".")
    return f"{clean}-{_short_hash(name)}"


def _fit_key(key: str) -> str:
    if len(key) <= _MAX_KEY:
        return key
    return f"{key[: _MAX_KEY - 9]}-{_short_hash(key)}"


def _short_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:8]


def _shown_uri(uri: str) -> str:
    """The URI without a password, as messages may show it."""
    parts = urlsplit(uri)
    if parts.password is None:
        return uri
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))
