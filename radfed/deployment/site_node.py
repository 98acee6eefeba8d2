"""The site's SuperNode process: Flower's ``flower-supernode``, presenting the site's client
certificate to the server's edge (mutual TLS), which Flower's own has no option for.

``radfed site join`` starts it as ``python -m radfed.deployment.site_node`` with Flower's
own arguments and the kit's CA, certificate and key named in the environment.
"""

from __future__ import annotations

import os
import ssl
import tempfile
from pathlib import Path

from cryptography.hazmat.primitives import serialization

from radfed.flower_private import run_supernode

__all__ = ["TLS_CA_ENV", "TLS_CERT_ENV", "TLS_KEY_ENV", "main", "site_tls"]

#: Environment variables naming the kit's CA certificate, client certificate and key.
TLS_CA_ENV, TLS_CERT_ENV, TLS_KEY_ENV = "RADFED_TLS_CA", "RADFED_TLS_CERT", "RADFED_TLS_KEY"


def site_tls(ca: Path, cert: Path, key: Path) -> ssl.SSLContext:
    """A TLS client context that trusts only the federation's CA and presents the site's
    certificate, whose private key is the site's node key (OpenSSH in the kit).

    The key is handed to OpenSSL through a file readable by the site's user alone, in the
    kit folder, removed as soon as it is loaded.
    """
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca))
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    private = serialization.load_ssh_private_key(key.read_bytes(), password=None)
    pem = private.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    handle, path = tempfile.mkstemp(dir=key.parent, prefix=".tls-", suffix=".pem")
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(pem)
        context.load_cert_chain(str(cert), path)
    finally:
        os.unlink(path)
    return context


def main() -> None:
    """Entry point of the site's SuperNode process."""
    tls = site_tls(*(Path(os.environ[name]) for name in (TLS_CA_ENV, TLS_CERT_ENV, TLS_KEY_ENV)))
    run_supernode(tls)


if __name__ == "__main__":
    main()
