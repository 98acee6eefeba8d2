"""PKI: a CA, the SuperLink's TLS certificate and site keys that Flower's own loaders accept."""

from __future__ import annotations

import argparse
import base64
import hashlib
import ipaddress
import os
import re
import shutil
import socket
import ssl
import stat
import subprocess
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

from radfed.deployment.certs import site_request
from radfed.deployment.pki import (
    SITE_NAME_RULE,
    Pki,
    add_site,
    fingerprint,
    init_pki,
    load_pki,
    load_site_kit,
    renew_server,
)
from radfed.deployment.site_kit import make_site_keys
from radfed.deployment.site_node import site_tls
from radfed.errors import ConfigError

NOW = datetime(2025, 6, 1, 12, tzinfo=UTC)


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return init_pki(
        tmp_path / "PKI",
        "fl.hospital.example:9443",
        ["alpha", "beta"],
        central_keys=True,
        extra_sans=["10.0.0.5"],
        now=NOW,
    )


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def _verify(pki: Pki, name: x509.DNSName | x509.IPAddress, at: datetime = NOW) -> None:
    """Web-PKI path validation of server.crt for ``name`` with only the PKI's CA trusted."""
    store = Store([_cert(pki.ca_cert)])
    verifier = PolicyBuilder().store(store).time(at).build_server_verifier(name)
    verifier.verify(_cert(pki.server_cert), [])


def _sans(pki: Pki) -> list[x509.GeneralName]:
    return list(
        _cert(pki.server_cert).extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    )


def _snapshot(root: Path) -> dict[Path, tuple[str, int]]:
    """Every file's hash and mode, every folder's mode."""
    return {
        path.relative_to(root): (
            hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "dir",
            stat.S_IMODE(path.stat().st_mode),
        )
        for path in root.rglob("*")
    }


def _handshake(
    pki: Pki,
    cafile: Path,
    server_hostname: str,
    *,
    client: ssl.SSLContext | None = None,
    mutual: bool = False,
) -> bytes:
    """A TLS handshake on loopback: server.crt/server.key served, ``cafile`` trusted; with
    ``mutual`` the server asks for a client certificate from the PKI's CA."""
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(pki.server_cert, pki.server_key)
    if mutual:
        server_ctx.verify_mode = ssl.CERT_REQUIRED
        server_ctx.load_verify_locations(cafile=str(pki.ca_cert))
    client_ctx = client or ssl.create_default_context(cafile=str(cafile))
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(10)

        def serve() -> None:
            try:
                conn, _ = listener.accept()
                with server_ctx.wrap_socket(conn, server_side=True) as tls:
                    tls.sendall(b"ok")
            except OSError:  # ssl.SSLError included: the client refused the certificate
                pass

        thread = threading.Thread(target=serve)
        thread.start()
        try:
            port = listener.getsockname()[1]
            with (
                socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
                client_ctx.wrap_socket(raw, server_hostname=server_hostname) as tls,
            ):
                data = tls.recv(2)
                if not data:
                    raise ConnectionError("the server closed the connection")
                return data
        finally:
            thread.join(10)
            assert not thread.is_alive()


def test_server_certificate_chains_to_the_ca_for_every_name(pki: Pki) -> None:
    # Execute
    sans = _sans(pki)
    leaf, ca = _cert(pki.server_cert), _cert(pki.ca_cert)

    # Assert: the server host is a DNS name, the IP literals are IP addresses
    assert x509.DNSName("fl.hospital.example") in sans
    assert x509.DNSName("localhost") in sans
    assert x509.IPAddress(ipaddress.ip_address("127.0.0.1")) in sans
    assert x509.IPAddress(ipaddress.ip_address("10.0.0.5")) in sans
    assert x509.DNSName("127.0.0.1") not in sans
    for name in sans:
        assert isinstance(name, x509.DNSName | x509.IPAddress)
        _verify(pki, name, NOW + timedelta(days=1))
    with pytest.raises(VerificationError):
        _verify(pki, x509.DNSName("other.example"))
    eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    constraints = ca.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.critical and constraints.value.ca and constraints.value.path_length == 0
    assert ca.extensions.get_extension_for_class(x509.KeyUsage).value.key_cert_sign
    assert leaf.issuer == ca.subject
    assert leaf.not_valid_after_utc == NOW + timedelta(days=825)
    assert ca.not_valid_after_utc == NOW + timedelta(days=3650)
    assert (pki.root / "server" / "ca.crt").read_bytes() == pki.ca_cert.read_bytes()


@pytest.mark.parametrize(
    ("address", "expected", "san"),
    [
        ("[::1]:9092", "[::1]:9092", x509.IPAddress(ipaddress.ip_address("::1"))),
        ("10.1.2.3", "10.1.2.3:8000", x509.IPAddress(ipaddress.ip_address("10.1.2.3"))),
        ("FL.Example.org", "FL.Example.org:8000", x509.DNSName("fl.example.org")),
    ],
)
def test_server_address_host_and_port_are_parsed(
    tmp_path: Path, address: str, expected: str, san: x509.GeneralName
) -> None:
    # Execute
    pki = init_pki(tmp_path / "PKI", address, [])

    # Assert
    assert pki.server_address == expected
    assert san in _sans(pki)
    assert all(not isinstance(n, x509.DNSName) or ":" not in n.value for n in _sans(pki))


@pytest.mark.parametrize(
    "address",
    [
        "https://fl.example:443",
        "fl.example:0",
        "fl.example:70000",
        "::1:8000",
        "a b",
        "",
        "1.2.3.4.5",
    ],
)
def test_bad_server_addresses_are_refused_before_anything_is_written(
    tmp_path: Path, address: str
) -> None:
    # Execute
    with pytest.raises(ConfigError, match=r"HOST\[:PORT\]") as err:
        init_pki(tmp_path / "PKI", address, ["alpha"])

    # Assert
    assert repr(address) in str(err.value)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("hostname", ["127.0.0.1", "localhost", "fl.hospital.example"])
def test_tls_handshake_on_loopback_trusts_only_the_pki_ca(tmp_path: Path, hostname: str) -> None:
    # Prepare
    pki = init_pki(tmp_path / "PKI", "fl.hospital.example", ["alpha"], central_keys=True)
    unrelated = init_pki(tmp_path / "OTHER", "fl.hospital.example", [])

    # Execute / Assert: the site's ca.crt is what flower-supernode --root-certificates gets
    assert _handshake(pki, pki.site_dir("alpha") / "ca.crt", hostname) == b"ok"
    with pytest.raises(ssl.SSLCertVerificationError):
        _handshake(pki, unrelated.ca_cert, hostname)


def test_tls_handshake_fails_for_a_name_not_in_the_certificate(pki: Pki) -> None:
    with pytest.raises(ssl.SSLCertVerificationError):
        _handshake(pki, pki.ca_cert, "other.example")


def test_private_keys_are_0600_from_the_start_and_never_in_records(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: a permissive umask, and every chmod recorded
    chmodded_files: list[Path] = []
    real_chmod = os.chmod

    def chmod(path: str | Path, mode: int, **kwargs: object) -> None:
        if not Path(path).is_dir():
            chmodded_files.append(Path(path))
        real_chmod(path, mode, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "chmod", chmod)
    old_umask = os.umask(0)

    # Execute
    try:
        pki = init_pki(tmp_path / "PKI", "fl.example", ["alpha"], central_keys=True)
        kit = add_site(pki.root, "beta", central_keys=True)
    finally:
        os.umask(old_umask)

    # Assert
    keys = [pki.ca_key, pki.server_key, pki.site_dir("alpha") / "site.key", kit.private_key]
    for key in keys:
        assert key is not None
        assert stat.S_IMODE(key.stat().st_mode) == 0o600, key
    assert stat.S_IMODE((pki.root / "ca").stat().st_mode) == 0o700
    assert stat.S_IMODE(pki.site_dir("alpha").stat().st_mode) == 0o700
    assert chmodded_files == []  # no file was narrowed after writing
    text = repr(pki) + repr(kit) + repr(load_site_kit(pki.site_dir("alpha")))
    assert "PRIVATE" not in text
    for key in keys:
        assert key is not None
        body = key.read_text().splitlines()[1]
        assert body not in text


def test_site_key_loads_with_flowers_own_supernode_and_register_loaders(pki: Pki) -> None:
    # Prepare: the functions behind `flower-supernode --auth-supernode-private-key` and
    # `flwr supernode register KEY.pub`
    from flwr.cli.supernode.register import try_load_public_key
    from flwr.supercore.primitives.asymmetric import public_key_to_bytes
    from flwr.supernode.cli.flower_supernode import _try_setup_client_authentication

    kit = load_site_kit(pki.site_dir("alpha"))
    assert kit.private_key is not None
    args = argparse.Namespace(
        auth_supernode_private_key=str(kit.private_key), auth_supernode_public_key=None
    )

    # Execute
    loaded = _try_setup_client_authentication(args)

    # Assert
    assert loaded is not None
    private, public = loaded
    assert isinstance(private, ec.EllipticCurvePrivateKey)
    assert isinstance(private.curve, ec.SECP256R1)
    assert kit.private_key.read_text().startswith("-----BEGIN OPENSSH PRIVATE KEY-----")
    registered = pki.root / "server" / "site-keys" / "alpha.pub"
    assert try_load_public_key(kit.public_key) == public_key_to_bytes(public)
    assert try_load_public_key(registered) == public_key_to_bytes(public)
    assert registered.read_bytes() == kit.public_key.read_bytes()
    other = load_site_kit(pki.site_dir("beta"))
    assert try_load_public_key(other.public_key) != public_key_to_bytes(public)
    assert kit.name == "alpha" and kit.server_address == "fl.hospital.example:9443"


def test_add_site_changes_no_existing_file(pki: Pki) -> None:
    # Prepare
    before = _snapshot(pki.root)

    # Execute
    kit = add_site(pki.root, "gamma", central_keys=True)

    # Assert
    after = _snapshot(pki.root)
    assert {path: after[path] for path in before} == before
    new = {Path("sites/gamma"), Path("server/site-keys/gamma.pub")}
    files = ("ca.crt", "site.crt", "site.key", "site.pub", "site.toml")
    new |= {Path("sites/gamma") / n for n in files}
    assert set(after) - set(before) == new
    assert load_pki(pki.root).sites == ("alpha", "beta", "gamma")
    assert kit.ca_cert.read_bytes() == pki.ca_cert.read_bytes()
    assert kit.server_address == pki.server_address


def test_a_site_that_made_its_own_key_gets_a_kit_without_it(pki: Pki, tmp_path: Path) -> None:
    # Prepare: the hospital makes its key and request (`radfed site keygen`); only the
    # request travels to the central team
    made = make_site_keys(tmp_path / "hospital", "delta")
    before = _snapshot(pki.root)

    # Execute
    kit = add_site(pki.root, "delta", csr=made.request)

    # Assert: no private key in the central kit; the key registered and certified is the site's
    assert kit.private_key is None
    assert sorted(p.name for p in kit.folder.iterdir()) == [
        "ca.crt",
        "site.crt",
        "site.pub",
        "site.toml",
    ]
    new = set(_snapshot(pki.root)) - set(before)
    assert new == {Path("sites/delta"), Path("server/site-keys/delta.pub")} | {
        Path("sites/delta") / n for n in ("ca.crt", "site.crt", "site.pub", "site.toml")
    }
    own = serialization.load_ssh_private_key(made.private_key.read_bytes(), None).public_key()
    registered = serialization.load_ssh_public_key(
        (pki.root / "server/site-keys/delta.pub").read_bytes()
    )
    assert registered == own and fingerprint(kit.public_key) == fingerprint(made.public_key)
    cert = _cert(kit.folder / "site.crt")
    assert cert.public_key() == own
    assert cert.subject.rfc4514_string() == "CN=delta" and cert.issuer == _cert(pki.ca_cert).subject
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert stat.S_IMODE(made.private_key.stat().st_mode) == 0o600
    # the same key cannot be a second site, and a request is for one name only
    other = tmp_path / "other"
    other.mkdir()
    request = site_request(
        serialization.load_ssh_private_key(made.private_key.read_bytes(), None),  # type: ignore[arg-type]
        "epsilon",
    )
    (other / "site.csr").write_bytes(request.public_bytes(serialization.Encoding.PEM))
    with pytest.raises(ConfigError, match="holds the key of site 'delta'"):
        add_site(pki.root, "epsilon", csr=other / "site.csr")
    with pytest.raises(ConfigError, match="a request for site 'delta', not 'zeta'"):
        add_site(pki.root, "zeta", csr=made.request)


def test_a_site_can_be_added_from_its_public_key_alone(pki: Pki, tmp_path: Path) -> None:
    # Prepare: the site sends only site.pub (the fingerprint is checked over the phone)
    made = make_site_keys(tmp_path / "hospital", "delta")

    # Execute
    kit = add_site(pki.root, "delta", public_key=made.public_key)

    # Assert: the site's own key is registered and certified; a second site cannot reuse it
    own = serialization.load_ssh_private_key(made.private_key.read_bytes(), None).public_key()
    assert kit.private_key is None and _cert(kit.folder / "site.crt").public_key() == own
    assert (pki.root / "server/site-keys/delta.pub").read_bytes() == made.public_key.read_bytes()
    with pytest.raises(ConfigError, match="holds the key of site 'delta'"):
        add_site(pki.root, "epsilon", public_key=made.public_key)
    with pytest.raises(ConfigError, match="OpenSSH public key"):
        add_site(pki.root, "epsilon", public_key=made.request)


def test_keys_are_made_at_the_site_unless_a_trial_says_otherwise(pki: Pki, tmp_path: Path) -> None:
    made = make_site_keys(tmp_path / "hospital", "delta")
    with pytest.raises(ConfigError, match="radfed site keygen"):
        init_pki(tmp_path / "NEW", "fl.example", ["alpha"])
    with pytest.raises(ConfigError, match=re.escape("--csr site.csr")):
        add_site(pki.root, "delta")
    with pytest.raises(ConfigError, match="exactly one"):
        add_site(pki.root, "delta", csr=made.request, central_keys=True)
    with pytest.raises(ConfigError, match="exactly one"):
        add_site(pki.root, "delta", csr=made.request, public_key=made.public_key)
    with pytest.raises(ConfigError, match="already holds a site key"):
        make_site_keys(pki.site_dir("alpha"), "alpha")
    assert not (tmp_path / "NEW").exists() and not pki.site_dir("delta").exists()


def test_add_site_refuses_a_request_that_is_not_ec_or_not_signed(pki: Pki, tmp_path: Path) -> None:
    # Prepare: an RSA request, and a request whose name was changed after signing
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "delta")])
    rsa_request = (
        x509.CertificateSigningRequestBuilder().subject_name(name).sign(rsa_key, hashes.SHA256())
    )
    (tmp_path / "rsa.csr").write_bytes(rsa_request.public_bytes(serialization.Encoding.PEM))
    made = make_site_keys(tmp_path / "site", "delta")
    tampered = made.request.read_bytes()
    der = bytearray(x509.load_pem_x509_csr(tampered).public_bytes(serialization.Encoding.DER))
    der[-5] ^= 0xFF  # a bit of the signature
    (tmp_path / "tampered.csr").write_bytes(
        b"-----BEGIN CERTIFICATE REQUEST-----\n"
        + base64.encodebytes(bytes(der))
        + b"-----END CERTIFICATE REQUEST-----\n"
    )

    # Execute / Assert
    with pytest.raises(ConfigError, match="EC key on a NIST curve"):
        add_site(pki.root, "delta", csr=tmp_path / "rsa.csr")
    with pytest.raises(ConfigError, match="signature does not hold"):
        add_site(pki.root, "delta", csr=tmp_path / "tampered.csr")
    assert not pki.site_dir("delta").exists()


def test_the_site_certificate_passes_mutual_tls_with_the_site_key(pki: Pki) -> None:
    # Prepare: a server that asks for a client certificate from the federation's CA
    kit = load_site_kit(pki.site_dir("alpha"))
    assert kit.private_key is not None and kit.client_cert is not None
    site = site_tls(kit.ca_cert, kit.client_cert, kit.private_key)
    stranger = ssl.create_default_context(cafile=str(kit.ca_cert))

    # Execute / Assert
    assert _handshake(pki, kit.ca_cert, "127.0.0.1", client=site, mutual=True) == b"ok"
    with pytest.raises((ssl.SSLError, ConnectionError)):
        _handshake(pki, kit.ca_cert, "127.0.0.1", client=stranger, mutual=True)
    assert not list(kit.folder.glob(".tls-*"))  # the PEM copy of the key is gone


@pytest.mark.parametrize("name", ["Alpha", "-x", "a_b", "", "x" * 64, "a/b", "../up"])
def test_bad_site_names_are_refused_with_the_rule(pki: Pki, tmp_path: Path, name: str) -> None:
    with pytest.raises(ConfigError) as err:
        add_site(pki.root, name)
    assert repr(name) in str(err.value) and SITE_NAME_RULE in str(err.value)
    with pytest.raises(ConfigError, match="invalid"):
        init_pki(tmp_path / "NEW", "fl.example", ["ok", name])
    assert not (tmp_path / "NEW").exists()


def test_duplicate_and_existing_sites_are_refused(pki: Pki, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unique, got beta more than once"):
        init_pki(tmp_path / "NEW", "fl.example", ["alpha", "beta", "beta"])
    assert not (tmp_path / "NEW").exists()
    before = _snapshot(pki.root)
    with pytest.raises(ConfigError, match=r"site 'alpha' already exists.*remove .*alpha"):
        add_site(pki.root, "alpha")
    assert _snapshot(pki.root) == before


def test_renew_server_keeps_the_ca_and_site_keys_and_updates_the_address(pki: Pki) -> None:
    # Prepare
    before = _snapshot(pki.root)
    old_cert = _cert(pki.server_cert)
    later = NOW + timedelta(days=800)

    # Execute
    path = renew_server(pki.root, server_address="new.example:8443", days=90, now=later)

    # Assert
    assert path == pki.server_cert
    new_cert = _cert(path)
    assert new_cert.public_key() != old_cert.public_key()
    _verify(pki, x509.DNSName("new.example"), later)
    _verify(pki, x509.IPAddress(ipaddress.ip_address("10.0.0.5")), later)  # extra names kept
    with pytest.raises(VerificationError):
        _verify(pki, x509.DNSName("fl.hospital.example"), later)
    assert new_cert.not_valid_after_utc == later + timedelta(days=90)
    after = _snapshot(pki.root)
    unchanged = [p for p in before if p.parts[0] == "ca" or p.suffix in (".pub", ".key")]
    unchanged = [p for p in unchanged if p.name != "server.key"]
    assert {p: after[p] for p in unchanged} == {p: before[p] for p in unchanged}
    assert after[Path("server/server.key")][1] == 0o600
    assert after[Path("server/server.key")] != before[Path("server/server.key")]
    assert set(after) == set(before)
    assert load_pki(pki.root).server_address == "new.example:8443"
    assert load_site_kit(pki.site_dir("alpha")).server_address == "new.example:8443"


def test_renewed_certificate_serves_tls_with_the_sites_old_ca_file(pki: Pki) -> None:
    # Prepare
    site_ca = pki.site_dir("alpha") / "ca.crt"

    # Execute
    renew_server(pki.root)

    # Assert
    assert _handshake(pki, site_ca, "fl.hospital.example") == b"ok"
    assert load_pki(pki.root).server_address == "fl.hospital.example:9443"


def test_init_refuses_a_non_empty_folder_and_accepts_an_empty_one(tmp_path: Path) -> None:
    # Prepare
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "notes.txt").write_text("keep me")
    (tmp_path / "empty").mkdir()

    # Execute / Assert
    with pytest.raises(ConfigError, match=r"full is not an empty folder; give a new folder"):
        init_pki(tmp_path / "full", "fl.example", ["alpha"], central_keys=True)
    assert [p.name for p in (tmp_path / "full").iterdir()] == ["notes.txt"]
    made = init_pki(tmp_path / "empty", "fl.example", ["alpha"], central_keys=True)
    assert made.sites == ("alpha",)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "full"]  # no temporaries


def test_load_pki_and_load_site_kit_explain_what_is_missing(pki: Pki, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"not a radfed folder.*radfed pki init"):
        load_pki(tmp_path)
    kit = tmp_path / "kit"
    shutil.copytree(pki.site_dir("alpha"), kit)
    (kit / "ca.crt").unlink()
    with pytest.raises(ConfigError, match=r"lacks ca\.crt; copy the whole site folder"):
        load_site_kit(kit)
    shutil.copy(pki.ca_cert, kit / "ca.crt")
    for mode in (0o644, 0o640):
        (kit / "site.key").chmod(mode)
        with pytest.raises(ConfigError, match=rf"mode {mode:o}.*chmod 600"):
            load_site_kit(kit)
    (kit / "site.key").chmod(0o600)
    assert load_site_kit(kit).private_key == kit / "site.key"


def test_fingerprint_is_openssh_sha256(pki: Pki) -> None:
    # Prepare
    public = pki.site_dir("alpha") / "site.pub"
    blob = base64.b64decode(public.read_text().split()[1])
    expected = "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")

    # Execute
    result = fingerprint(public)

    # Assert
    assert result == expected
    assert result != fingerprint(pki.site_dir("beta") / "site.pub")
    if shutil.which("ssh-keygen"):
        listing = subprocess.run(
            ["ssh-keygen", "-lf", str(public)], capture_output=True, text=True, check=True
        )
        assert listing.stdout.split()[1] == result
