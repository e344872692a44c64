"""
Certificate rotation on a running fedserver: replacing the [tls] files takes
effect for new connections without a restart.
"""

from __future__ import annotations

import os
import socket
import ssl
import time
from typing import Any, Callable

from cryptography import x509

from tests.integration.harness import PKI, Component, Fedserver, backend_config, free_port, post_tls, tls_context


def _eventually(check: Callable[[], bool], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "the rotation did not take effect in time"
        time.sleep(0.2)


def _replace(path: str, data: bytes) -> None:
    with open(path + ".new", "wb") as f:
        f.write(data)
    os.replace(path + ".new", path)


def _served_serial(port: int, ca_path: str) -> int:
    context = ssl.create_default_context(cafile=ca_path)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        with context.wrap_socket(sock, server_hostname="fed.b.example") as tls:
            der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


def test_rotating_ca_and_certificate_without_restart(tmp_path: Any) -> None:
    pki = PKI(str(tmp_path / "pki"))
    newcomer = PKI(str(tmp_path / "newcomer-pki"), "newcomer CA")
    component = Component()
    config = backend_config(
        "b.example", "fed.b.example", pki=pki, inward_port=free_port(), outward_port=free_port(),
        discovery={"a.example": {"infra_domain": "fed.a.example", "host": "127.0.0.1", "port": 9}},
        allow=["a.example"], components={"brig": component.url},
    )
    server = Fedserver(str(tmp_path), "b", config)
    try:
        peer = newcomer.issue("peer", ["fed.a.example"])

        def call() -> int:
            context = tls_context(pki.ca_path, peer)
            return post_tls(server.inward_port, "fed.b.example", context, "/federation/brig/ping", raw=b"{}",
                            headers={"Wire-Origin-Domain": "a.example"})[0]

        assert call() == 403
        # trust the newcomer CA too: its peers get in, no restart
        with open(pki.ca_path, "rb") as f:
            ours = f.read()
        with open(newcomer.ca_path, "rb") as f:
            theirs = f.read()
        _replace(config["tls"]["ca_certificates"][0], ours + theirs)
        _eventually(lambda: call() == 200)

        # rotate our own certificate: new connections see the new one
        before = _served_serial(server.inward_port, pki.ca_path)
        cert, key = pki.issue("rotated", ["fed.b.example"])
        with open(cert, "rb") as f:
            new_cert = f.read()
        with open(key, "rb") as f:
            new_key = f.read()
        _replace(config["tls"]["private_key"], new_key)
        _replace(config["tls"]["certificate"], new_cert)
        _eventually(lambda: _served_serial(server.inward_port, pki.ca_path) != before)
        assert "reloaded the [tls] files" in server.log()
    finally:
        server.stop()
        component.close()
