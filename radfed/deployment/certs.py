"""X.509 for a Flower deployment: the federation's CA, the server's certificate (with the SANs
it is reached at), each site's client certificate (mutual TLS at the server's edge) and
server addresses. Keys are EC; ``pki`` writes them."""

from __future__ import annotations

import ipaddress
import re
import secrets
from collections.abc import Sequence
from datetime import datetime, timedelta

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from radfed.errors import ConfigError

__all__ = [
    "DEFAULT_PORT",
    "client_cert",
    "format_address",
    "make_ca",
    "parse_address",
    "sans",
    "server_cert",
    "site_request",
]

#: Flower 1.41's SuperLink port (``flwr.supercore.constant.SUPERLINK_UVICORN_DEFAULT_PORT``).
DEFAULT_PORT = 8000
_ADDRESS = re.compile(
    r"^(?:\[(?P<ip6>[0-9A-Fa-f:.]+)\]|(?P<host>[^:\[\]]+))(?::(?P<port>\d{1,5}))?$"
)
_LABEL = r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
_HOSTNAME = re.compile(rf"^(?:\*\.)?(?:{_LABEL}\.)*{_LABEL}$", re.IGNORECASE)
#: Certificates start this long before ``now``, for clocks that lag behind the central one.
_CLOCK_SKEW = timedelta(hours=1)


def make_ca(now: datetime, days: int) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A self-signed EC P-384 CA valid for ``days`` days."""
    key = ec.generate_private_key(ec.SECP384R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"radfed CA {secrets.token_hex(4)}")])
    cert = (
        _builder(name, name, key.public_key(), now, now + timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(cert_sign=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        .sign(key, hashes.SHA384())
    )
    return key, cert


def server_cert(
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    host: str,
    extra_sans: Sequence[str],
    now: datetime,
    days: int,
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A new EC P-256 key and its serverAuth certificate for ``host`` (plus localhost,
    127.0.0.1 and ``extra_sans``), signed by the CA, never outliving it."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host[:64])])
    not_after = min(now + timedelta(days=days), ca_cert.not_valid_after_utc)
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    cert = (
        _builder(subject, ca_cert.subject, key.public_key(), now, not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(cert_sign=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False)
        .add_extension(x509.SubjectAlternativeName(sans(host, extra_sans)), False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), False
        )
        .sign(ca_key, hashes.SHA384())
    )
    return key, cert


def site_request(key: ec.EllipticCurvePrivateKey, site: str) -> x509.CertificateSigningRequest:
    """A site's certificate signing request: its name, signed with its own key."""
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, site)])
    return x509.CertificateSigningRequestBuilder().subject_name(subject).sign(key, hashes.SHA256())


def client_cert(
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    site: str,
    public: ec.EllipticCurvePublicKey,
    now: datetime,
    days: int,
) -> x509.Certificate:
    """The clientAuth certificate of site ``site`` for ``public`` (the key the site keeps),
    signed by the CA, never outliving it: what the server's edge asks every site for."""
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, site)])
    not_after = min(now + timedelta(days=days), ca_cert.not_valid_after_utc)
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    return (
        _builder(subject, ca_cert.subject, public, now, not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(cert_sign=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), False
        )
        .sign(ca_key, hashes.SHA384())
    )


def _builder(
    subject: x509.Name,
    issuer: x509.Name,
    public: ec.EllipticCurvePublicKey,
    now: datetime,
    not_after: datetime,
) -> x509.CertificateBuilder:
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _CLOCK_SKEW)
        .not_valid_after(not_after)
    )


def _key_usage(*, cert_sign: bool) -> x509.KeyUsage:
    """A CA signs certificates and CRLs; a server or site signs its TLS handshakes."""
    no = False  # content_commitment, key/data encipherment, key agreement, en/decipher only
    return x509.KeyUsage(not cert_sign, no, no, no, no, cert_sign, cert_sign, no, no)


def sans(host: str, extra: Sequence[str]) -> list[x509.GeneralName]:
    """The subject alternative names: IP addresses as such, host names as DNS names.

    Raises:
        ConfigError: a name that is neither.
    """
    names: list[x509.GeneralName] = []
    for name in (host, "localhost", "127.0.0.1", *extra):
        general: x509.GeneralName
        try:
            general = x509.IPAddress(ipaddress.ip_address(name))
        except ValueError:
            if not _HOSTNAME.match(name) or name.rsplit(".", 1)[-1].isdigit():
                raise ConfigError(f"{name!r} is not a host name or IP address") from None
            general = x509.DNSName(name.lower())
        if general not in names:
            names.append(general)
    return names


def parse_address(address: str) -> tuple[str, int]:
    """``HOST[:PORT]`` (``[v6]:PORT`` for IPv6) as host and port; ConfigError otherwise."""
    match = _ADDRESS.match(address.strip())
    host = (match["ip6"] or match["host"]) if match else "*"
    port = int(match["port"] or DEFAULT_PORT) if match else 0
    try:
        sans(host, ())  # a host name or an IP address
    except ConfigError:
        port = 0
    if not 0 < port < 65536 or "*" in host or (match and match["ip6"] and ":" not in host):
        raise ConfigError(
            f"server address {address!r} must be HOST[:PORT], with PORT 1-65535 "
            f"(default {DEFAULT_PORT}) and an IPv6 host in brackets, e.g. [::1]:{DEFAULT_PORT}"
        )
    return host, port


def format_address(host: str, port: int) -> str:
    """``host:port``, with an IPv6 host in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
