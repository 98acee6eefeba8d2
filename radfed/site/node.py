"""Which site this node is, and what its administrators set: folder, policy, cell size.

A deployed SuperNode names its site folder (and optionally policy) in its node config; a
simulated node takes the n-th site folder of the run's data root. The site's own settings
(policy file, minimum cell size) can only make it stricter than the run asks.
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from flwr.app import Message

from radfed.config import RunConfig
from radfed.data.loading import SiteData, load_site_for
from radfed.errors import ConfigError
from radfed.federation.schema import CONFIG_KEY
from radfed.folders import SiteFolder, list_sites
from radfed.privacy import ResourceLimits, SitePolicy, load_policy

__all__ = [
    "MAX_MESSAGE_SETTING",
    "MAX_MESSAGE_TEXT",
    "load_site_once",
    "load_site_within",
    "message_setting",
    "message_text",
    "own_policy",
    "resolve_site",
    "server_round",
    "site_min_cell",
    "site_policy",
]

#: The largest number a message's config may carry (a round number, a proximal term).
MAX_MESSAGE_SETTING = 1e6
#: The longest text a message's config may carry (a layout digest is 32).
MAX_MESSAGE_TEXT = 64


def resolve_site(node_config: Mapping[str, Any], config: RunConfig) -> tuple[str, Path]:
    """The site name and folder of this node.

    A deployed SuperNode names its folder with ``--node-config 'data-path="..."'`` (and
    optionally ``site-name``); a simulated node takes the ``partition-id``-th site folder
    of ``data-root`` (sorted by name).

    Raises:
        ConfigError: neither is set, or the partitions do not match the site folders.
    """
    if "data-path" in node_config:
        name = str(node_config.get("site-name") or "").strip()
        if not name:  # the folder name could say more than the site wants to (it leaves)
            raise ConfigError(
                "node config has data-path but no site-name; start the SuperNode "
                'with --node-config \'site-name="NAME" data-path="..."\''
            )
        return name, Path(str(node_config["data-path"])).expanduser()
    if "partition-id" in node_config:
        if not config.data_root:
            raise ConfigError("run config 'data-root' is empty; set it to a folder of site folders")
        sites = list_sites(Path(config.data_root).expanduser())
        index, count = (
            int(node_config["partition-id"]),
            int(node_config.get("num-partitions", len(sites))),
        )
        if count != len(sites):
            msg = (
                f"the simulation has {count} nodes but data-root holds {len(sites)} site folders; "
                "run one node per site folder"
            )
            raise ConfigError(msg)
        return sites[index].name, sites[index]
    raise ConfigError(
        "node config names no site: start the SuperNode with "
        '--node-config \'site-name="NAME" data-path="/path/to/site"\''
    )


_SITE_MEMO: OrderedDict[tuple[object, ...], SiteData] = OrderedDict()
#: The most a process keeps of loaded sites' tensors (the newest site is always kept).
_MEMO_BYTES = 512 * 1024**2


def own_policy(site_dir: Path) -> SitePolicy:
    """The policy a site's local commands follow (``radfed evaluate``, ``radfed site check``):
    ``SITE_DIR/site-policy.toml``, else the default one."""
    path = SiteFolder(site_dir).policy
    return load_policy(path if path.is_file() else None)


def load_site_within(site_dir: Path, config: RunConfig, limits: ResourceLimits) -> SiteData:
    """Load a site with the run's data settings within the site's limits (the size of a
    case image, of the decoded-case cache)."""
    return load_site_for(
        site_dir, config, max_voxels=limits.decoded_voxels, cache_bytes=limits.cache_bytes
    )


def load_site_once(path: Path, config: RunConfig, limits: ResourceLimits) -> SiteData:
    """Load the site once per process and settings (a simulated node keeps its process),
    within the site's limits (``load_site_within``)."""
    manifest = SiteFolder(path).manifest
    stamp = manifest.stat().st_mtime_ns if manifest.exists() else 0
    settings = {k: v for k, v in config.to_run_config().items() if k not in _NOT_DATA_SETTINGS}
    key = (str(path.resolve()), stamp, tuple(sorted(settings.items())))
    if key in _SITE_MEMO:
        _SITE_MEMO.move_to_end(key)
        return _SITE_MEMO[key]
    loaded = load_site_within(path, config, limits)
    # A simulated node's process serves several sites in turn: keep the most recent ones
    # whose tensors fit within _MEMO_BYTES (always the newest); a deployed site has one.
    stale = [k for k in _SITE_MEMO if k[0] == key[0]]  # this site under older settings
    for old in stale:
        del _SITE_MEMO[old]
    _SITE_MEMO[key] = loaded
    while len(_SITE_MEMO) > 1 and sum(map(_site_bytes, _SITE_MEMO.values())) > _MEMO_BYTES:
        _SITE_MEMO.popitem(last=False)
    return loaded


def _site_bytes(data: SiteData) -> int:
    """The bytes of a loaded site's image and mask tensors."""
    total = 0
    for split in data.splits.values():
        total += split.images.nelement() * split.images.element_size()
        if split.masks is not None:
            total += split.masks.nelement() * split.masks.element_size()
    return total


#: Run settings that do not change how a site's data is loaded.
_NOT_DATA_SETTINGS = frozenset(
    {
        "num-server-rounds",
        "out-dir",
        "model",
        "local-epochs",
        "batch-size",
        "learning-rate",
        "eval-splits",
        "threshold",
        "score-bins",
        "min-sites",
        "round-timeout",
        "data-root",
    }
)


def site_min_cell(node_config: Mapping[str, Any]) -> int:
    """The site's own minimum cell size (``--node-config 'min-cell-size=20'``); 1 if unset."""
    value = node_config.get("min-cell-size", 1)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError("node config 'min-cell-size' must be a positive integer")
    return value


def site_policy(node_config: Mapping[str, Any], site_dir: Path) -> SitePolicy:
    """The site's policy: the file named by node config ``policy-path``, else
    ``SITE_DIR/site-policy.toml`` when present, else the default policy (minimum cell
    size 10, the default subgroups and templates) for a deployed node. A simulated node
    without a policy file follows the run's settings (cell size, subgroups, templates,
    query budget, limits): the researcher owns both sides."""
    given = str(node_config.get("policy-path") or "").strip()
    if given:
        return load_policy(Path(given).expanduser())
    default = SiteFolder(site_dir).policy
    if default.is_file():
        return load_policy(default)
    policy = SitePolicy.default()
    if "data-path" in node_config:
        return policy
    return dataclasses.replace(
        policy,
        k=1,
        limits=ResourceLimits.unbounded(),
        subgroups=None,
        attribute_values=(),
        templates=None,
        queries=None,
        exact_auc=True,
    )


def message_setting(msg: Message, key: str) -> float:
    """A number the strategy put in the message's config (``server-round``, FedProx's
    ``proximal-mu``), or 0 when absent.

    Raises:
        ConfigError: it is not a finite number in [0, MAX_MESSAGE_SETTING] (a NaN or huge
            proximal term would turn training into whatever the sender wants).
    """
    config = msg.content.config_records.get(CONFIG_KEY)
    value = config.get(key, 0.0) if config is not None else 0.0
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not 0 <= value <= MAX_MESSAGE_SETTING  # False for NaN too
    ):
        raise ConfigError(
            f"message config {key!r} must be a number in [0, {MAX_MESSAGE_SETTING:g}]"
        )
    return float(value)


def message_text(msg: Message, key: str) -> str | None:
    """A short text the strategy put in the message's config (``weights-layout``), or None
    when absent.

    Raises:
        ConfigError: it is not a text of at most ``MAX_MESSAGE_TEXT`` characters.
    """
    config = msg.content.config_records.get(CONFIG_KEY)
    value = config.get(key) if config is not None else None
    if value is None:
        return None
    if type(value) is not str or len(value) > MAX_MESSAGE_TEXT:  # no subclass's own !=
        raise ConfigError(
            f"message config {key!r} must be a text of at most {MAX_MESSAGE_TEXT} characters"
        )
    return value


def server_round(msg: Message) -> int:
    """The message's ``server-round``: a whole number (0 when absent).

    Raises:
        ConfigError: it is not a whole number in [0, MAX_MESSAGE_SETTING].
    """
    value = message_setting(msg, "server-round")
    if not value.is_integer():
        raise ConfigError(f"message config 'server-round' must be a whole number, got {value}")
    return int(value)
