"""A site's kit: what a hospital holds to join the federation, and the keys it makes itself.

Layout of a kit folder (``radfed pki`` makes the public part; see ``radfed.deployment.pki``)::

    KIT/
      site.key    the site's private key (EC P-256, OpenSSH format, 0600): made at the site
                  by ``make_site_keys`` (``radfed site keygen``); it never leaves the site
      site.pub    its public key (OpenSSH), which the server registers for node authentication
      site.csr    the certificate request the site sends to the central team
      site.crt    the site's client certificate from the central team (mutual TLS at the edge)
      ca.crt      the federation's CA, from the central team
      site.toml   the site name and the server address, from the central team

Nothing here prints, logs or returns key material: records hold paths only.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import stat
import tomllib
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from radfed.deployment.certs import format_address, parse_address, site_request
from radfed.errors import ConfigError

__all__ = [
    "SITE_NAME_RULE",
    "SiteKit",
    "SiteRequest",
    "check_site_name",
    "fingerprint",
    "load_public",
    "load_site_kit",
    "make_site_keys",
    "openssh_private",
    "public_line",
    "read_toml",
    "site_toml",
    "utc",
    "write_file",
]

SITE_NAME_RULE = r"^[a-z0-9][a-z0-9-]{0,62}$"
_SITE_NAME = re.compile(SITE_NAME_RULE)
NIST_CURVES = (ec.SECP256R1, ec.SECP384R1, ec.SECP521R1)
_PEM = serialization.Encoding.PEM
_SSH = serialization.Encoding.OpenSSH
_SSH_PUBLIC = serialization.PublicFormat.OpenSSH


@dataclass(frozen=True, kw_only=True)
class SiteKit:
    """One site's kit folder: what ``flower-supernode`` needs to join the federation.

    Attributes:
        private_key: ``site.key``, or None when the site keeps its own key elsewhere.
        client_cert: ``site.crt``, the site's client certificate; None when missing.
    """

    name: str
    server_address: str
    folder: Path
    ca_cert: Path
    private_key: Path | None
    public_key: Path
    client_cert: Path | None = None


@dataclass(frozen=True)
class SiteRequest:
    """What ``make_site_keys`` wrote: the private key (stays), the public key and request."""

    private_key: Path
    public_key: Path
    request: Path


def make_site_keys(folder: Path, site: str) -> SiteRequest:
    """Make this site's key pair in ``folder`` and its certificate request for the central
    team; the private key is created 0600 and never shown.

    Raises:
        ConfigError: a bad site name, or ``folder`` already holds a site key.
    """
    check_site_name(site)
    if (folder / "site.key").exists():
        raise ConfigError(
            f"{folder} already holds a site key; keep it, or move it aside to make a new one"
        )
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    key = ec.generate_private_key(ec.SECP256R1())
    write_file(folder / "site.key", openssh_private(key), private=True)
    write_file(folder / "site.pub", public_line(key.public_key(), site), replace=True)
    request = site_request(key, site).public_bytes(_PEM)
    write_file(folder / "site.csr", request, replace=True)
    return SiteRequest(folder / "site.key", folder / "site.pub", folder / "site.csr")


def load_site_kit(folder: Path) -> SiteKit:
    """Read and check a site kit folder.

    Raises:
        ConfigError: a file is missing, or site.key can be read by other users.
    """
    missing = [n for n in ("site.toml", "ca.crt", "site.pub") if not (folder / n).is_file()]
    if not missing and not any((folder / n).is_file() for n in ("site.key", "site.crt")):
        missing = ["site.crt"]
    if missing:
        raise ConfigError(
            f"site kit {folder} lacks {', '.join(missing)}; copy the whole site folder the "
            "central team made (`radfed pki add-site`)"
        )
    doc = read_toml(folder / "site.toml", "copy it again from the central team's kit")
    name, address = str(doc.get("site", "")), str(doc.get("server-address", ""))
    check_site_name(name)
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
        client_cert=folder / "site.crt" if (folder / "site.crt").is_file() else None,
    )


def fingerprint(public_key: Path) -> str:
    """The OpenSSH SHA256 fingerprint (``SHA256:...``) of an OpenSSH public key file."""
    blob = base64.b64decode(load_public(public_key).public_bytes(_SSH, _SSH_PUBLIC).split()[1])
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


def openssh_private(key: ec.EllipticCurvePrivateKey) -> bytes:
    """A site key as Flower's node authentication reads it (OpenSSH, unencrypted)."""
    ssh = serialization.PrivateFormat.OpenSSH
    return key.private_bytes(_PEM, ssh, serialization.NoEncryption())


def public_line(public: ec.EllipticCurvePublicKey, name: str) -> bytes:
    """A site's public key as one OpenSSH line (what the server registers)."""
    return public.public_bytes(_SSH, _SSH_PUBLIC) + f" {name}@radfed\n".encode()


def check_site_name(name: str) -> None:
    if not isinstance(name, str) or not _SITE_NAME.match(name):
        raise ConfigError(
            f"site name {name!r} is invalid: use 1-63 lowercase letters, digits and hyphens, "
            f"starting with a letter or digit ({SITE_NAME_RULE})"
        )


def load_public(path: Path) -> ec.EllipticCurvePublicKey:
    """An OpenSSH public key file holding an EC key on a NIST curve.

    Raises:
        ConfigError: anything else.
    """
    try:
        key = serialization.load_ssh_public_key(path.read_bytes())
    except (OSError, ValueError, IndexError, UnsupportedAlgorithm) as err:
        raise ConfigError(f"{path} is not an OpenSSH public key file ({err})") from err
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, NIST_CURVES):
        raise ConfigError(
            f"{path} must be an EC key on a NIST curve, as Flower requires; "
            "make one with `radfed site keygen`"
        )
    return key


def write_file(path: Path, data: bytes, *, private: bool = False, replace: bool = False) -> None:
    """Create ``path`` with its final mode from the first byte; never overwrite in place."""
    target, path = path, path.with_name(f".{path.name}.new") if replace else path
    if replace:
        path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as file:
        file.write(data)
    if replace:
        os.replace(path, target)


def read_toml(path: Path, fix: str) -> dict[str, Any]:
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        msg = f"{path.parent} is not a radfed folder ({path.name} is missing); {fix}"
        raise ConfigError(msg) from None
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as err:
        raise ConfigError(f"{path} cannot be read ({err}); {fix}") from err


def site_toml(name: str, address: str) -> str:
    return f"site = {json.dumps(name)}\nserver-address = {json.dumps(address)}\n"


def utc(now: datetime | None) -> datetime:
    if now is None:
        return datetime.now(UTC)
    return now if now.tzinfo is not None else now.replace(tzinfo=UTC)
