"""Certificates and keys for a Flower deployment: a CA, the SuperLink's TLS pair, site keys.

Layout of a PKI folder; the private keys are created 0600 and ``ca/`` and each site folder
0700 from the start (never widened, then narrowed)::

    PKI/
      pki.toml                      server-address (host:port), created, extra-sans, the sites
                                    named at init (no secrets)
      ca/ca.crt  ca/ca.key          self-signed CA (EC P-384); ca.key never leaves the central team
      server/ca.crt                 flower-superlink --ssl-ca-certfile
      server/server.crt server.key  --ssl-certfile / --ssl-keyfile; SANs: the server host,
                                    localhost, 127.0.0.1 and any extra names
      server/site-keys/<name>.pub   registered site keys (OpenSSH): ``flwr supernode register``
      sites/<name>/                 the kit handed to one hospital:
        ca.crt                      flower-supernode --root-certificates
        site.key                    --auth-supernode-private-key (EC P-256, OpenSSH format);
                                    absent when the site generated its own key
        site.pub  site.toml         its public key; the site name and server address

``server/site-keys/`` is the registry: a site exists when its ``.pub`` file is there.
Nothing here prints, logs or returns key material: records hold paths only.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import shutil
import stat
import tempfile
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from radfed.deployment.certs import (
    DEFAULT_PORT,
    format_address,
    make_ca,
    parse_address,
    sans,
    server_cert,
)
from radfed.errors import ConfigError

__all__ = [
    "DEFAULT_PORT",
    "SITE_NAME_RULE",
    "Pki",
    "SiteKit",
    "add_site",
    "fingerprint",
    "format_address",
    "init_pki",
    "load_pki",
    "load_site_kit",
    "parse_address",
    "registered_sites",
    "renew_server",
]

#: What a site name must match: it names folders, key files and the SuperNode.
SITE_NAME_RULE = r"^[a-z0-9][a-z0-9-]{0,62}$"
_SITE_NAME = re.compile(SITE_NAME_RULE)
_PEM = serialization.Encoding.PEM
_SSH = serialization.Encoding.OpenSSH
_SSH_PUBLIC = serialization.PublicFormat.OpenSSH


@dataclass(frozen=True, kw_only=True)
class Pki:
    """A PKI folder, as :func:`load_pki` reads it; every path is derived from ``root``."""

    root: Path
    server_address: str
    created: datetime
    extra_sans: tuple[str, ...] = ()
    sites: tuple[str, ...] = ()

    @property
    def ca_cert(self) -> Path:
        return self.root / "ca" / "ca.crt"

    @property
    def ca_key(self) -> Path:
        return self.root / "ca" / "ca.key"

    @property
    def server_dir(self) -> Path:
        return self.root / "server"

    @property
    def server_cert(self) -> Path:
        return self.server_dir / "server.crt"

    @property
    def server_key(self) -> Path:
        return self.server_dir / "server.key"

    def site_dir(self, name: str) -> Path:
        """The kit folder of site ``name``."""
        return self.root / "sites" / name

    def site_key(self, name: str) -> Path:
        """The registered public key of site ``name``."""
        return _site_keys(self.root) / f"{name}.pub"

    def registered_keys(self) -> tuple[Path, ...]:
        """The registered site public keys, ``server/site-keys/<name>.pub``, sorted."""
        return tuple(sorted(_site_keys(self.root).glob("*.pub")))


@dataclass(frozen=True, kw_only=True)
class SiteKit:
    """One site's kit folder: what ``flower-supernode`` needs to join the federation.

    Attributes:
        private_key: ``site.key``, or None when the site keeps its own key elsewhere.
    """

    name: str
    server_address: str
    folder: Path
    ca_cert: Path
    private_key: Path | None
    public_key: Path


def init_pki(
    out: Path,
    server_address: str,
    sites: Sequence[str],
    *,
    extra_sans: Sequence[str] = (),
    ca_days: int = 3650,
    server_days: int = 825,
    now: datetime | None = None,
) -> Pki:
    """Create a CA, the server's certificate and one kit per site in the new folder ``out``.

    Raises:
        ConfigError: ``out`` is not empty, or an address, name or validity is invalid.
    """
    host, port = parse_address(server_address)
    sans(host, extra_sans)
    sites = [sites] if isinstance(sites, str) else list(sites)
    for name in sites:
        _check_site_name(name)
    if len(set(sites)) != len(sites):
        twice = sorted({n for n in sites if sites.count(n) > 1})
        raise ConfigError(f"site names must be unique, got {', '.join(twice)} more than once")
    if min(ca_days, server_days) < 1:
        raise ConfigError(f"validity must be at least 1 day, got {ca_days=}, {server_days=}")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"{out} is not an empty folder; give a new folder to create the PKI in")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))  # all or nothing
    try:
        now = _utc(now)
        (tmp / "ca").mkdir(mode=0o700)
        _site_keys(tmp).mkdir(parents=True)
        (tmp / "sites").mkdir()
        ca_key, ca_cert = make_ca(now, ca_days)
        _write(tmp / "ca" / "ca.crt", ca_cert.public_bytes(_PEM))
        _write(tmp / "ca" / "ca.key", _private_pem(ca_key), private=True)
        _write(tmp / "server" / "ca.crt", ca_cert.public_bytes(_PEM))
        key, cert = server_cert(ca_key, ca_cert, host, extra_sans, now, server_days)
        _write(tmp / "server" / "server.crt", cert.public_bytes(_PEM))
        _write(tmp / "server" / "server.key", _private_pem(key), private=True)
        address = format_address(host, port)
        _write(tmp / "pki.toml", _toml(address, now, extra_sans, sites).encode())
        for site in sites:
            _new_site(tmp, site, address, None)
        tmp.chmod(0o755)
        if out.exists():
            out.rmdir()
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return load_pki(out)


def add_site(pki: Path, name: str, *, public_key: Path | None = None) -> SiteKit:
    """Register site ``name``: a new key pair, or the public key the site generated itself.

    With ``public_key``, no private key is written: the kit holds ca.crt, site.pub and
    site.toml. No existing file is modified.

    Raises:
        ConfigError: a bad or taken name, or a public key that is not EC on a NIST curve
            or is already registered.
    """
    info = load_pki(pki)
    _check_site_name(name)
    if name in info.sites or info.site_dir(name).exists():
        raise ConfigError(
            f"site {name!r} already exists in {pki}; choose another name, or to replace its key "
            f"remove {info.site_dir(name)} and {info.site_key(name)} first"
        )
    key = _load_public(public_key) if public_key is not None else None
    if key is not None:
        for registered in info.registered_keys():
            if _load_public(registered) == key:
                raise ConfigError(f"{public_key} is already registered as site {registered.stem!r}")
    return _new_site(pki, name, info.server_address, key)


def renew_server(
    pki: Path,
    *,
    server_address: str | None = None,
    extra_sans: Sequence[str] | None = None,
    days: int = 825,
    now: datetime | None = None,
) -> Path:
    """Issue a new server key and certificate from the same CA; returns ``server.crt``.

    The CA and the site keys are untouched, so sites keep working. A new
    ``server_address`` is recorded in pki.toml and in the central copies of the site kits
    (the sites need to be told). ``extra_sans`` None keeps the recorded extra names.

    Raises:
        ConfigError: the folder is not a PKI, the CA is unreadable or expired, or a value
            is invalid.
    """
    info = load_pki(pki)
    host, port = parse_address(server_address or info.server_address)
    extra = info.extra_sans if extra_sans is None else tuple(extra_sans)
    sans(host, extra)
    if days < 1:
        raise ConfigError(f"validity must be at least 1 day, got {days=}")
    try:
        ca_cert = x509.load_pem_x509_certificate(info.ca_cert.read_bytes())
        ca_key = serialization.load_pem_private_key(info.ca_key.read_bytes(), None)
    except (OSError, ValueError) as err:
        raise ConfigError(f"the CA in {info.root / 'ca'} cannot be read ({err})") from err
    now = _utc(now)
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey) or now >= ca_cert.not_valid_after_utc:
        raise ConfigError(
            f"the CA in {info.root / 'ca'} is expired or not radfed's; run init again"
        )
    key, cert = server_cert(ca_key, ca_cert, host, extra, now, days)
    _write(info.server_cert, cert.public_bytes(_PEM), replace=True)
    _write(info.server_key, _private_pem(key), private=True, replace=True)
    address = format_address(host, port)
    init_sites = _read_toml(pki / "pki.toml", "run init again").get("sites", [])
    text = _toml(address, info.created, extra, init_sites, renewed=now)
    _write(pki / "pki.toml", text.encode(), replace=True)
    if address != info.server_address:
        for site_toml in sorted((pki / "sites").glob("*/site.toml")):
            text = _site_toml(site_toml.parent.name, address)
            _write(site_toml, text.encode(), replace=True)
    return info.server_cert


def load_pki(pki: Path) -> Pki:
    """Read the PKI folder ``pki``; its sites are the registered keys.

    Raises:
        ConfigError: ``pki`` is not a radfed PKI folder.
    """
    doc = _read_toml(pki / "pki.toml", f"create one with `radfed pki init --out {pki} ...`")
    address, created = doc.get("server-address"), doc.get("created")
    if not isinstance(address, str) or not isinstance(created, datetime):
        raise ConfigError(f"{pki / 'pki.toml'} lacks server-address or created; run init again")
    sites = registered_sites(pki)
    extra = tuple(str(name) for name in doc.get("extra-sans", []))
    return Pki(root=pki, server_address=address, created=created, extra_sans=extra, sites=sites)


def registered_sites(pki: Path) -> tuple[str, ...]:
    """The sites registered in a central PKI folder, sorted; none in a site kit."""
    return tuple(sorted(p.stem for p in _site_keys(pki).glob("*.pub")))


def _site_keys(pki: Path) -> Path:
    return pki / "server" / "site-keys"


def load_site_kit(folder: Path) -> SiteKit:
    """Read and check a site kit folder.

    Raises:
        ConfigError: a file is missing, or site.key can be read by other users.
    """
    missing = [n for n in ("site.toml", "ca.crt", "site.pub") if not (folder / n).is_file()]
    if missing:
        raise ConfigError(
            f"site kit {folder} lacks {', '.join(missing)}; copy the whole site folder the "
            "central team made (`radfed pki add-site`)"
        )
    doc = _read_toml(folder / "site.toml", "copy it again from the central team's kit")
    name, address = str(doc.get("site", "")), str(doc.get("server-address", ""))
    _check_site_name(name)
    address = format_address(*parse_address(address))
    key = folder / "site.key"
    mode = stat.S_IMODE(key.stat().st_mode) if key.exists() else 0
    if mode & 0o077 and os.name == "posix":
        raise ConfigError(
            f"{key} has mode {mode:o}: other users can read this site's private key; "
            f"run `chmod 600 {key}`"
        )
    return SiteKit(
        name=name,
        server_address=address,
        folder=folder,
        ca_cert=folder / "ca.crt",
        private_key=key if key.exists() else None,
        public_key=folder / "site.pub",
    )


def fingerprint(public_key: Path) -> str:
    """The OpenSSH SHA256 fingerprint (``SHA256:...``) of an OpenSSH public key file."""
    blob = base64.b64decode(_load_public(public_key).public_bytes(_SSH, _SSH_PUBLIC).split()[1])
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


def _new_site(
    root: Path, name: str, address: str, public: ec.EllipticCurvePublicKey | None
) -> SiteKit:
    folder = root / "sites" / name
    folder.mkdir(mode=0o700)
    _write(folder / "ca.crt", (root / "ca" / "ca.crt").read_bytes())
    if public is None:
        key = ec.generate_private_key(ec.SECP256R1())
        ssh = serialization.PrivateFormat.OpenSSH
        private = key.private_bytes(_PEM, ssh, serialization.NoEncryption())
        _write(folder / "site.key", private, private=True)
        public = key.public_key()
    line = public.public_bytes(_SSH, _SSH_PUBLIC) + f" {name}@radfed\n".encode()
    _write(folder / "site.pub", line)
    _write(folder / "site.toml", _site_toml(name, address).encode())
    _write(_site_keys(root) / f"{name}.pub", line)
    return load_site_kit(folder)


def _check_site_name(name: str) -> None:
    if not isinstance(name, str) or not _SITE_NAME.match(name):
        raise ConfigError(
            f"site name {name!r} is invalid: use 1-63 lowercase letters, digits and hyphens, "
            f"starting with a letter or digit ({SITE_NAME_RULE})"
        )


def _load_public(path: Path) -> ec.EllipticCurvePublicKey:
    try:
        key = serialization.load_ssh_public_key(path.read_bytes())
    except (OSError, ValueError, IndexError, UnsupportedAlgorithm) as err:
        raise ConfigError(f"{path} is not an OpenSSH public key file ({err})") from err
    nist = (ec.SECP256R1, ec.SECP384R1, ec.SECP521R1)
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, nist):
        raise ConfigError(
            f"{path} must be an EC key on a NIST curve, as Flower requires; "
            "make one with `ssh-keygen -t ecdsa -b 384 -N '' -f site`"
        )
    return key


def _private_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    pkcs8 = serialization.PrivateFormat.PKCS8
    return key.private_bytes(_PEM, pkcs8, serialization.NoEncryption())


def _write(path: Path, data: bytes, *, private: bool = False, replace: bool = False) -> None:
    """Create ``path`` with its final mode from the first byte; never overwrite in place."""
    target, path = path, path.with_name(f".{path.name}.new") if replace else path
    if replace:
        path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as file:
        file.write(data)
    if replace:
        os.replace(path, target)


def _read_toml(path: Path, fix: str) -> dict[str, Any]:
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        msg = f"{path.parent} is not a radfed folder ({path.name} is missing); {fix}"
        raise ConfigError(msg) from None
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as err:
        raise ConfigError(f"{path} cannot be read ({err}); {fix}") from err


def _toml(
    address: str,
    created: datetime,
    extra_sans: Sequence[str],
    sites: Sequence[str],
    renewed: datetime | None = None,
) -> str:
    lines = [
        "# radfed PKI; sites added later are in server/site-keys/, not in `sites`",
        f"server-address = {json.dumps(address)}",
        f"created = {created.isoformat()}",
        f"extra-sans = {json.dumps(list(extra_sans))}",
        f"sites = {json.dumps(list(sites))}",
    ]
    if renewed is not None:
        lines.append(f"server-renewed = {renewed.isoformat()}")
    return "\n".join(lines) + "\n"


def _site_toml(name: str, address: str) -> str:
    return f"site = {json.dumps(name)}\nserver-address = {json.dumps(address)}\n"


def _utc(now: datetime | None) -> datetime:
    if now is None:
        return datetime.now(UTC)
    return now if now.tzinfo is not None else now.replace(tzinfo=UTC)
