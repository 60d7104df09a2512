"""A throwaway self-signed certificate for 127.0.0.1 (made with openssl)."""

from __future__ import annotations

import os
import subprocess


def make_cert(directory: str) -> tuple[str, str]:
    """Write cert.pem and key.pem for IP 127.0.0.1 into ``directory``."""
    cert, key = os.path.join(directory, "cert.pem"), os.path.join(directory, "key.pem")
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
         "-keyout", key, "-out", cert],
        check=True, capture_output=True, timeout=30,
    )
    return cert, key


def client_context(cert: str):  # type: ignore[no-untyped-def]
    """An SSL context trusting only ``cert``."""
    import ssl

    return ssl.create_default_context(cafile=cert)
