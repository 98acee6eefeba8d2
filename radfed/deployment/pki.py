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
        site.crt                    the site's client certificate (mutual TLS at the edge)
        site.pub  site.toml         its public key; the site name and server address
        site.key                    only for a trial federation (--central-keys): the site's
                                    private key, made centrally (EC P-256, OpenSSH format)

By default a site makes its own key (``radfed site keygen``, radfed.deployment.site_keys)
and sends only its certificate request; ``add_site(..., csr=...)`` registers the public key
and issues the client certificate, and the private key never leaves the site.

``server/site-keys/`` is the registry: a site exists when its ``.pub`` file is there.
Nothing here prints, logs or returns key material: records hold paths only.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from radfed.deployment.certs import (
    DEFAULT_PORT,
    client_cert,
    format_address,
    make_ca,
    parse_address,
    sans,
    server_cert,
)
from radfed.deployment.site_kit import (
    NIST_CURVES,
    SITE_NAME_RULE,
    SiteKit,
    check_site_name,
    fingerprint,
    load_public,
    load_site_kit,
    openssh_private,
    public_line,
    read_toml,
    site_toml,
    utc,
    write_file,
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
    "openssh_private",
    "parse_address",
    "public_line",
    "registered_sites",
    "renew_server",
]

#: What a site name must match: it names folders, key files and the SuperNode.
#: Validity of a site's client certificate (renewed with `pki add-site` after removal).
_SITE_DAYS = 825
_PEM = serialization.Encoding.PEM


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


def init_pki(
    out: Path,
    server_address: str,
    sites: Sequence[str],
    *,
    central_keys: bool = False,
    extra_sans: Sequence[str] = (),
    ca_days: int = 3650,
    server_days: int = 825,
    now: datetime | None = None,
) -> Pki:
    """Create a CA and the server's certificate in the new folder ``out``; with
    ``central_keys`` (a trial federation only) also a key pair and kit per site of ``sites``.

    Raises:
        ConfigError: ``out`` is not empty, sites are named without ``central_keys``, or an
            address, name or validity is invalid.
    """
    host, port = parse_address(server_address)
    sans(host, extra_sans)
    sites = [sites] if isinstance(sites, str) else list(sites)
    for name in sites:
        check_site_name(name)
    if len(set(sites)) != len(sites):
        twice = sorted({n for n in sites if sites.count(n) > 1})
        raise ConfigError(f"site names must be unique, got {', '.join(twice)} more than once")
    if sites and not central_keys:
        raise ConfigError(
            "site keys are made at each site: there, `radfed site keygen`; here, `radfed pki "
            "add-site NAME --csr site.csr`. To make them here for a trial federation, pass "
            "--central-keys"
        )
    if min(ca_days, server_days) < 1:
        raise ConfigError(f"validity must be at least 1 day, got {ca_days=}, {server_days=}")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"{out} is not an empty folder; give a new folder to create the PKI in")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))  # all or nothing
    try:
        now = utc(now)
        (tmp / "ca").mkdir(mode=0o700)
        _site_keys(tmp).mkdir(parents=True)
        (tmp / "sites").mkdir()
        ca_key, ca_cert = make_ca(now, ca_days)
        write_file(tmp / "ca" / "ca.crt", ca_cert.public_bytes(_PEM))
        write_file(tmp / "ca" / "ca.key", _private_pem(ca_key), private=True)
        write_file(tmp / "server" / "ca.crt", ca_cert.public_bytes(_PEM))
        key, cert = server_cert(ca_key, ca_cert, host, extra_sans, now, server_days)
        write_file(tmp / "server" / "server.crt", cert.public_bytes(_PEM))
        write_file(tmp / "server" / "server.key", _private_pem(key), private=True)
        address = format_address(host, port)
        write_file(tmp / "pki.toml", _toml(address, now, extra_sans, sites).encode())
        for site in sites:
            _new_site(tmp, site, address, None, ca=(ca_key, ca_cert), now=now)
        tmp.chmod(0o755)
        if out.exists():
            out.rmdir()
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return load_pki(out)


def add_site(
    pki: Path,
    name: str,
    *,
    csr: Path | None = None,
    public_key: Path | None = None,
    central_keys: bool = False,
) -> SiteKit:
    """Register site ``name`` from the certificate request its own key signed (``csr``),
    from its OpenSSH public key (``public_key``), or with a key pair made here
    (``central_keys``: a trial federation only). Exactly one of the three.

    A request also proves that the site holds the private key and names the site; a bare
    public key relies on the fingerprint check with the site alone. Either way the client
    certificate issued is of use only to the holder of the private key.

    The kit gets ca.crt, site.crt (the site's client certificate), site.pub and site.toml,
    and site.key only with ``central_keys``. No existing file is modified.

    Raises:
        ConfigError: a bad or taken name, not exactly one source of the key, a request
            whose signature or name does not hold, or a key that is not EC on a NIST curve
            or is already registered.
    """
    info = load_pki(pki)
    check_site_name(name)
    if name in info.sites or info.site_dir(name).exists():
        raise ConfigError(
            f"site {name!r} already exists in {pki}; choose another name, or to replace its key "
            f"remove {info.site_dir(name)} and {info.site_key(name)} first"
        )
    given = [csr is not None, public_key is not None, central_keys]
    if sum(given) != 1:
        raise ConfigError(
            f"give exactly one of the site's certificate request (--csr site.csr, made at the "
            f"site with `radfed site keygen --site {name}`), its public key (--public-key "
            f"site.pub), or --central-keys for a trial federation"
        )
    source = csr or public_key
    key = None
    if csr is not None:
        key = _load_request(csr, name)
    elif public_key is not None:
        key = load_public(public_key)
    if key is not None:
        for registered in info.registered_keys():
            if load_public(registered) == key:
                raise ConfigError(f"{source} holds the key of site {registered.stem!r}")
    return _new_site(pki, name, info.server_address, key, ca=_load_ca(info), now=utc(None))


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
    now = utc(now)
    ca_key, ca_cert = _load_ca(info, now)
    key, cert = server_cert(ca_key, ca_cert, host, extra, now, days)
    write_file(info.server_cert, cert.public_bytes(_PEM), replace=True)
    write_file(info.server_key, _private_pem(key), private=True, replace=True)
    address = format_address(host, port)
    init_sites = read_toml(pki / "pki.toml", "run init again").get("sites", [])
    text = _toml(address, info.created, extra, init_sites, renewed=now)
    write_file(pki / "pki.toml", text.encode(), replace=True)
    if address != info.server_address:
        for kit_toml in sorted((pki / "sites").glob("*/site.toml")):
            text = site_toml(kit_toml.parent.name, address)
            write_file(kit_toml, text.encode(), replace=True)
    return info.server_cert


def load_pki(pki: Path) -> Pki:
    """Read the PKI folder ``pki``; its sites are the registered keys.

    Raises:
        ConfigError: ``pki`` is not a radfed PKI folder.
    """
    doc = read_toml(pki / "pki.toml", f"create one with `radfed pki init --out {pki} ...`")
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


def _new_site(
    root: Path,
    name: str,
    address: str,
    public: ec.EllipticCurvePublicKey | None,
    *,
    ca: tuple[ec.EllipticCurvePrivateKey, x509.Certificate],
    now: datetime,
) -> SiteKit:
    folder = root / "sites" / name
    folder.mkdir(mode=0o700)
    write_file(folder / "ca.crt", (root / "ca" / "ca.crt").read_bytes())
    if public is None:
        key = ec.generate_private_key(ec.SECP256R1())
        write_file(folder / "site.key", openssh_private(key), private=True)
        public = key.public_key()
    line = public_line(public, name)
    cert = client_cert(*ca, name, public, now, _SITE_DAYS)
    write_file(folder / "site.crt", cert.public_bytes(_PEM))
    write_file(folder / "site.pub", line)
    write_file(folder / "site.toml", site_toml(name, address).encode())
    write_file(_site_keys(root) / f"{name}.pub", line)
    return load_site_kit(folder)


def _load_ca(
    info: Pki, now: datetime | None = None
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    try:
        ca_cert = x509.load_pem_x509_certificate(info.ca_cert.read_bytes())
        ca_key = serialization.load_pem_private_key(info.ca_key.read_bytes(), None)
    except (OSError, ValueError) as err:
        raise ConfigError(f"the CA in {info.root / 'ca'} cannot be read ({err})") from err
    if (
        not isinstance(ca_key, ec.EllipticCurvePrivateKey)
        or utc(now) >= ca_cert.not_valid_after_utc
    ):
        raise ConfigError(
            f"the CA in {info.root / 'ca'} is expired or not radfed's; run init again"
        )
    return ca_key, ca_cert


def _load_request(path: Path, name: str) -> ec.EllipticCurvePublicKey:
    """The public key of a site's certificate request, once its signature and name hold."""
    try:
        request = x509.load_pem_x509_csr(path.read_bytes())
    except (OSError, ValueError) as err:
        raise ConfigError(f"{path} is not a certificate request (PEM) ({err})") from err
    if not request.is_signature_valid:
        raise ConfigError(f"{path}: its signature does not hold; make it again at the site")
    names = request.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if [n.value for n in names] != [name]:
        raise ConfigError(
            f"{path} is a request for site {names[0].value if names else '?'!r}, not {name!r}"
        )
    key = request.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, NIST_CURVES):
        raise ConfigError(f"{path} must hold an EC key on a NIST curve, as Flower requires")
    return key


def _private_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    pkcs8 = serialization.PrivateFormat.PKCS8
    return key.private_bytes(_PEM, pkcs8, serialization.NoEncryption())


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
