"""
Two fedserver processes under twistd federating over mutual TLS, and every
error label of the pipeline provoked by a real request.
"""

from __future__ import annotations

import json
import socket
import ssl
import threading
from typing import Any, Dict, Iterator

import pytest
from cryptography.x509.oid import ExtendedKeyUsageOID

from tests.integration.harness import (
    PKI,
    Component,
    Fedserver,
    backend_config,
    discover_json,
    free_port,
    post,
    post_tls,
    tls_context,
)

B_BODY_LIMIT = 4096


class Silent:
    """A TCP server that accepts connections and never answers."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.accepted: list = []
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while True:
            try:
                connection, _ = self.sock.accept()
            except OSError:
                return
            self.accepted.append(connection)

    def close(self) -> None:
        self.sock.close()
        for connection in self.accepted:
            connection.close()


def component_answer(path: str, headers: Dict[str, str], body: bytes) -> tuple:
    if path == "/federation/missing-user":
        return 404, {"label": "not-found", "message": "no such user"}
    return 200, {"path": path, "origin": headers.get("wire-origin-domain"), "echo": json.loads(body or b"null")}


@pytest.fixture(scope="module")
def federation(tmp_path_factory: Any) -> Iterator[Dict[str, Any]]:
    tmp = tmp_path_factory.mktemp("federation")
    pki = PKI(str(tmp / "pki"))
    ports = {name: free_port() for name in ("a_in", "a_out", "b_in", "b_out", "closed", "c_in")}
    silent = Silent()
    component = Component(component_answer)
    servers = []
    try:
        b = Fedserver(str(tmp), "b", backend_config(
            "b.example", "fed.b.example", pki=pki, inward_port=ports["b_in"], outward_port=ports["b_out"],
            discovery={
                "a.example": {"infra_domain": "fed.a.example", "host": "127.0.0.1", "port": ports["a_in"]},
                "c.example": {"infra_domain": "fed.c.example", "host": "127.0.0.1", "port": ports["c_in"]},
                "d.example": {"infra_domain": "fed.d.example", "host": "127.0.0.1", "port": ports["c_in"]},
            },
            allow=["a.example", "c.example"],
            components={"brig": component.url},
            limits={"max_body_bytes": B_BODY_LIMIT},
        ))
        servers.append(b)
        a = Fedserver(str(tmp), "a", backend_config(
            "a.example", "fed.a.example", pki=pki, inward_port=ports["a_in"], outward_port=ports["a_out"],
            discovery={
                "b.example": {"infra_domain": "fed.b.example", "host": "127.0.0.1", "port": ports["b_in"]},
                "closed.example": {"infra_domain": "fed.closed.example", "host": "127.0.0.1",
                                   "port": ports["closed"]},
                "mismatch.example": {"infra_domain": "fed.mismatch.example", "host": "127.0.0.1",
                                     "port": ports["b_in"]},
                "slow.example": {"infra_domain": "fed.slow.example", "host": "127.0.0.1", "port": silent.port},
                "failover.example": [
                    {"infra_domain": "fed.b.example", "host": "127.0.0.1", "port": ports["closed"]},
                    {"infra_domain": "fed.b.example", "host": "127.0.0.1", "port": ports["b_in"]},
                ],
            },
            allow=["b.example", "closed.example", "mismatch.example", "slow.example", "failover.example",
                   "nowhere.example"],
            components={},
            limits={"request_timeout": 2},
        ))
        servers.append(a)
        yield {"a": a, "b": b, "pki": pki, "component": component, "ports": ports, "tmp": tmp}
    finally:
        for server in servers:
            server.stop()
        component.close()
        silent.close()


# outward: a.example's components call b.example through a's fedserver


def test_call_reaches_remote_component_and_answer_comes_back(federation: Dict[str, Any]) -> None:
    component = federation["component"]
    before = len(component.requests)
    status, headers, answer = post(
        federation["a"].outward_port, "/rpc/b.example/brig/get-user-by-handle", {"handle": "bob"},
        headers={"Wire-Origin-Request-Id": "req-e2e-1", "X-Wire-API-Version": "v7",
                 "Content-Type": "application/json"},
    )
    assert status == 200, answer
    assert answer == {"path": "/federation/get-user-by-handle", "origin": "a.example",
                      "echo": {"handle": "bob"}}
    assert headers["content-type"] == "application/json"
    path, seen, body = component.requests[before]
    assert path == "/federation/get-user-by-handle"
    assert seen["wire-origin-domain"] == "a.example"
    assert seen["request-id"] == "req-e2e-1"
    assert seen["x-wire-api-version"] == "v7"
    assert seen["content-type"] == "application/json"
    assert json.loads(body) == {"handle": "bob"}
    # the request id is on the log lines of both backends
    assert "req-e2e-1" in federation["a"].log()
    assert "req-e2e-1" in federation["b"].log()


def test_only_content_type_of_the_component_answer_goes_back(federation: Dict[str, Any]) -> None:
    status, headers, _ = post(federation["a"].outward_port, "/rpc/b.example/brig/x", {})
    assert status == 200
    assert "x-component-secret" not in headers


def test_remote_error_is_wrapped_with_inner(federation: Dict[str, Any]) -> None:
    status, _, answer = post(federation["a"].outward_port, "/rpc/b.example/brig/missing-user", {})
    assert status == 533
    assert answer["label"] == "federation-remote-error"
    assert answer["inner"] == {"label": "not-found", "message": "no such user"}
    assert answer["data"] == {"type": "federation", "domain": "b.example",
                              "path": "/federation/brig/missing-user"}


@pytest.mark.parametrize(
    "domain, code, label",
    [
        ("closed.example", 521, "federation-connection-refused"),
        ("mismatch.example", 525, "federation-tls-error"),
        ("slow.example", 504, "federation-timeout"),
        ("nowhere.example", 422, "invalid-domain"),
        ("e.example", 400, "federation-denied"),
    ],
)
def test_outward_failures_are_labelled(federation: Dict[str, Any], domain: str, code: int, label: str) -> None:
    status, _, answer = post(federation["a"].outward_port, f"/rpc/{domain}/brig/get-user-by-handle", {})
    assert (status, answer["label"]) == (code, label), answer
    assert answer["code"] == code
    assert domain in answer["message"] or answer["data"]["domain"] in answer["message"]


def test_fail_over_to_the_next_target(federation: Dict[str, Any]) -> None:
    status, _, answer = post(federation["a"].outward_port, "/rpc/failover.example/brig/ping", {})
    assert status == 200, answer
    assert answer["origin"] == "a.example"


@pytest.mark.parametrize(
    "method, path, raw, label, code",
    [
        ("GET", "/rpc/b.example/brig/ping", None, "invalid-endpoint", 403),
        ("POST", "/rpc/b.example/brig/ping?x=1", b"{}", "invalid-endpoint", 403),
        ("POST", "/rpc/B..example/brig/ping", b"{}", "invalid-endpoint", 403),
        ("POST", "/other", b"{}", "invalid-endpoint", 403),
        ("POST", "/rpc/b.example/brig/ping", b"{not json", "invalid-json", 400),
    ],
)
def test_outward_refuses_bad_requests(federation: Dict[str, Any], method: str, path: str,
                                      raw: Any, label: str, code: int) -> None:
    status, _, answer = post(federation["a"].outward_port, path, method=method, raw=raw)
    assert (status, answer["label"]) == (code, label), answer


# inward: what b.example answers to whoever connects to its federation port


def _inward(federation: Dict[str, Any], cert: Any, origin: Any = "a.example", path: str = "/federation/brig/ping",
            *, method: str = "POST", raw: bytes = b"{}", ca: Any = None) -> tuple:
    context = tls_context(ca or federation["pki"].ca_path, cert)
    headers = {"Content-Type": "application/json"}
    if origin is not None:
        headers["Wire-Origin-Domain"] = origin
    return post_tls(federation["b"].inward_port, "fed.b.example", context, path, method=method, raw=raw,
                    headers=headers)


def test_inward_accepts_a_valid_peer(federation: Dict[str, Any]) -> None:
    cert = federation["pki"].issue("peer-a", ["fed.a.example"])
    status, _, answer = _inward(federation, cert)
    assert status == 200, answer
    assert answer["origin"] == "a.example"


def test_common_name_counts_only_without_san(federation: Dict[str, Any]) -> None:
    cn_only = federation["pki"].issue("cn-only", ["fed.a.example"], san=False)
    assert _inward(federation, cn_only)[0] == 200
    # a SAN that does not name fed.a.example hides a matching CN
    san_other = federation["pki"].issue("san-other", ["fed.evil.example"], common_name="fed.a.example")
    status, _, answer = _inward(federation, san_other)
    assert (status, answer["label"]) == (403, "validation-error")


def test_inward_without_client_certificate(federation: Dict[str, Any]) -> None:
    status, _, answer = _inward(federation, None)
    assert (status, answer["label"]) == (403, "no-client-certificate")


def test_inward_certificate_from_another_ca(federation: Dict[str, Any]) -> None:
    other = PKI(str(federation["tmp"] / "other-pki"), "other CA")
    cert = other.issue("fed.a.example", ["fed.a.example"])
    status, _, answer = _inward(federation, cert)
    assert (status, answer["label"]) == (403, "authentication-failure")
    assert "not a configured CA" in answer["message"]


def test_inward_certificate_without_client_auth_usage(federation: Dict[str, Any]) -> None:
    cert = federation["pki"].issue("server-only", ["fed.a.example"], usages=[ExtendedKeyUsageOID.SERVER_AUTH])
    status, _, answer = _inward(federation, cert)
    assert (status, answer["label"]) == (403, "authentication-failure")
    assert "clientAuth" in answer["message"]


def test_inward_certificate_for_another_backend(federation: Dict[str, Any]) -> None:
    # a genuine certificate of fed.a.example claiming to speak for c.example
    cert = federation["pki"].issue("peer-a2", ["fed.a.example"])
    status, _, answer = _inward(federation, cert, origin="c.example")
    assert (status, answer["label"]) == (403, "validation-error")
    assert "fed.c.example" in answer["message"]


def test_inward_origin_not_allowed(federation: Dict[str, Any]) -> None:
    cert = federation["pki"].issue("peer-d", ["fed.d.example"])
    status, _, answer = _inward(federation, cert, origin="d.example")
    assert (status, answer["label"]) == (400, "federation-denied")


def test_inward_origin_undiscoverable(federation: Dict[str, Any]) -> None:
    cert = federation["pki"].issue("peer-a3", ["fed.a.example"])
    status, _, answer = _inward(federation, cert, origin="nowhere.example")
    assert (status, answer["label"]) == (422, "invalid-domain")


def test_inward_without_origin_domain(federation: Dict[str, Any]) -> None:
    cert = federation["pki"].issue("peer-a4", ["fed.a.example"])
    status, _, answer = _inward(federation, cert, origin=None)
    assert (status, answer["label"]) == (403, "no-origin-domain")


@pytest.mark.parametrize(
    "method, path, raw, code, label",
    [
        ("GET", "/federation/brig/ping", b"", 403, "invalid-endpoint"),
        ("POST", "/federation/brig/ping?debug=1", b"{}", 403, "invalid-endpoint"),
        ("POST", "/federation/brig/..%2f..%2fusers", b"{}", 403, "invalid-endpoint"),
        ("POST", "/federation/brig/get-user-%D9%A1", b"{}", 403, "invalid-endpoint"),
        ("POST", "/federation/brig", b"{}", 403, "invalid-endpoint"),
        ("POST", "/internal/brig/ping", b"{}", 403, "invalid-endpoint"),
        ("POST", "/federation/cargohold/get-asset", b"{}", 403, "unknown-component"),
        ("POST", "/federation/brig/ping", b"{\"handle\": ", 400, "invalid-json"),
    ],
)
def test_inward_refuses_bad_requests(federation: Dict[str, Any], method: str, path: str, raw: bytes,
                                     code: int, label: str) -> None:
    cert = federation["pki"].issue("peer-a5", ["fed.a.example"])
    status, _, answer = _inward(federation, cert, path=path, method=method, raw=raw)
    assert (status, answer["label"]) == (code, label), answer


def _raw_tls(federation: Dict[str, Any], head: bytes, body_parts: list) -> bytes:
    cert = federation["pki"].issue("peer-a6", ["fed.a.example"])
    context = tls_context(federation["pki"].ca_path, cert)
    with socket.create_connection(("127.0.0.1", federation["b"].inward_port), timeout=10) as sock:
        with context.wrap_socket(sock, server_hostname="fed.b.example") as tls:
            tls.sendall(head)
            for part in body_parts:
                try:
                    tls.sendall(part)
                except (ssl.SSLError, OSError):
                    break
            received = b""
            while True:
                try:
                    chunk = tls.recv(65536)
                except (ssl.SSLError, OSError):
                    break
                if not chunk:
                    break
                received += chunk
    return received


def _status_and_json(raw: bytes) -> tuple:
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head.split(b" ")[1]), json.loads(body)


def test_oversized_body_is_refused_before_it_is_read(federation: Dict[str, Any]) -> None:
    head = (b"POST /federation/brig/ping HTTP/1.1\r\nHost: fed.b.example\r\n"
            b"Wire-Origin-Domain: a.example\r\nContent-Type: application/json\r\n"
            b"Content-Length: 50000000\r\n\r\n")
    # announce 50 MB, send nothing of it: the answer must come anyway
    status, answer = _status_and_json(_raw_tls(federation, head, []))
    assert (status, answer["label"]) == (413, "request-too-large")


def test_oversized_chunked_body_is_refused(federation: Dict[str, Any]) -> None:
    head = (b"POST /federation/brig/ping HTTP/1.1\r\nHost: fed.b.example\r\n"
            b"Wire-Origin-Domain: a.example\r\nTransfer-Encoding: chunked\r\n\r\n")
    chunk = b"%x\r\n%s\r\n" % (1024, b" " * 1024)
    status, answer = _status_and_json(_raw_tls(federation, head, [chunk] * (B_BODY_LIMIT // 1024 + 2)))
    assert (status, answer["label"]) == (413, "request-too-large")


def test_no_traceback_reaches_peers(federation: Dict[str, Any]) -> None:
    for server in (federation["a"], federation["b"]):
        assert "Traceback" not in server.log()


def test_idle_connections_are_closed(tmp_path: Any) -> None:
    pki = PKI(str(tmp_path / "pki"))
    server = Fedserver(str(tmp_path), "idle", backend_config(
        "b.example", "fed.b.example", pki=pki, inward_port=free_port(), outward_port=free_port(),
        discovery={}, allow=["a.example"], components={}, limits={"idle_timeout": 1},
    ))
    try:
        with socket.create_connection(("127.0.0.1", server.outward_port), timeout=10) as sock:
            # the server closes the silent connection after about a second
            assert sock.recv(1) == b""
    finally:
        server.stop()


def test_resumed_tls_session_is_verified_again(federation: Dict[str, Any]) -> None:
    """
    A resumed TLS session skips certificate verification in OpenSSL: a peer
    refused once must not get in by resuming its session.
    """
    other = PKI(str(federation["tmp"] / "resume-pki"), "resumer CA")
    context = tls_context(federation["pki"].ca_path, other.issue("fed.a.example", ["fed.a.example"]))
    request = (b"POST /federation/brig/ping HTTP/1.1\r\nHost: fed.b.example\r\n"
               b"Wire-Origin-Domain: a.example\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}")
    session = None
    for attempt in range(2):
        with socket.create_connection(("127.0.0.1", federation["b"].inward_port), timeout=10) as sock:
            with context.wrap_socket(sock, server_hostname="fed.b.example", session=session) as tls:
                tls.sendall(request)
                received = b""
                while chunk := tls.recv(65536):
                    received += chunk
                session = tls.session
                if attempt:
                    assert not tls.session_reused
        status, answer = _status_and_json(received)
        assert (status, answer["label"]) == (403, "authentication-failure"), (attempt, answer)


def _discover(federation: Dict[str, Any], domain: str) -> tuple:
    return discover_json(federation["a"].config_path, domain)


def test_discover_gives_a_verdict_for_a_reachable_domain(federation: Dict[str, Any]) -> None:
    code, report = _discover(federation, "b.example")
    assert code == 0, report
    assert report["reachable"] is True
    (target,) = report["targets"]
    handshake = target["handshake"]
    assert handshake["ok"] and handshake["protocol"] in ("TLSv1.2", "TLSv1.3")
    assert handshake["names"] == ["fed.b.example"] and handshake["name_matches"]
    assert handshake["verify_error"] is None
    assert handshake["chain"][-1] == "CN=test CA"


@pytest.mark.parametrize(
    "domain, reason",
    [
        ("closed.example", "connection refused"),
        ("mismatch.example", "does not name the infrastructure domain"),
        ("nowhere.example", "not federating"),
    ],
)
def test_discover_explains_an_unreachable_domain(federation: Dict[str, Any], domain: str, reason: str) -> None:
    code, report = _discover(federation, domain)
    assert code == 1
    assert report["reachable"] is False
    assert reason in report["verdict"]


def test_after_refusing_a_body_the_server_stops_reading(federation: Dict[str, Any]) -> None:
    """A peer that keeps sending after the 413 is cut off, over TLS too."""
    import time

    cert = federation["pki"].issue("peer-a7", ["fed.a.example"])
    context = tls_context(federation["pki"].ca_path, cert)
    head = (b"POST /federation/brig/ping HTTP/1.1\r\nHost: fed.b.example\r\n"
            b"Wire-Origin-Domain: a.example\r\nContent-Length: 500000000\r\n\r\n")
    sent = 0
    with socket.create_connection(("127.0.0.1", federation["b"].inward_port), timeout=10) as sock:
        with context.wrap_socket(sock, server_hostname="fed.b.example") as tls:
            tls.sendall(head)
            deadline = time.monotonic() + 20
            chunk = b" " * 65536
            try:
                while time.monotonic() < deadline:
                    tls.sendall(chunk)
                    sent += len(chunk)
            except (ssl.SSLError, OSError):
                pass
    assert time.monotonic() < deadline, "the server kept reading"
    assert sent < 64 * 1024 * 1024


def test_a_peer_without_certificate_is_refused_before_its_body(federation: Dict[str, Any]) -> None:
    context = tls_context(federation["pki"].ca_path, None)
    head = (b"POST /federation/brig/ping HTTP/1.1\r\nHost: fed.b.example\r\n"
            b"Wire-Origin-Domain: a.example\r\nContent-Length: 4000\r\n\r\n")
    with socket.create_connection(("127.0.0.1", federation["b"].inward_port), timeout=10) as sock:
        with context.wrap_socket(sock, server_hostname="fed.b.example") as tls:
            tls.sendall(head)  # and no body: the answer must come anyway
            received = b""
            while chunk := tls.recv(65536):
                received += chunk
    status, answer = _status_and_json(received)
    assert (status, answer["label"]) == (403, "no-client-certificate")


def test_discover_notices_when_the_peer_refuses_our_certificate(federation: Dict[str, Any], tmp_path: Any) -> None:
    """Under TLS 1.3 a refusal of our certificate comes only after the handshake."""
    import subprocess

    from tests.integration.harness import to_toml, tool

    other = PKI(str(tmp_path / "stranger-pki"), "stranger CA")
    cert, key = other.issue("fed.a.example", ["fed.a.example"])
    config = {
        "server": {"backend_domain": "a.example", "infra_domain": "fed.a.example"},
        "inward": {"listen": "tcp:1:interface=127.0.0.1"},
        # we trust b's CA, but b does not trust ours
        "tls": {"certificate": cert, "private_key": key, "ca_certificates": [federation["pki"].ca_path]},
        "discovery": {"plugin": "static", "domains": {"b.example": {
            "infra_domain": "fed.b.example", "host": "127.0.0.1", "port": federation["b"].inward_port}}},
        "authenticator": {"plugin": "mtls"},
        "authorizers": [{"plugin": "allow-list", "allow_all": True}],
    }
    path = tmp_path / "stranger.toml"
    path.write_text(to_toml(config))
    result = subprocess.run([tool("fedserver"), "discover", "--config", str(path), "--json", "b.example"],
                            capture_output=True, text=True, timeout=60)
    report = json.loads(result.stdout)
    assert result.returncode == 1, report
    handshake = report["targets"][0]["handshake"]
    assert handshake["verify_error"] is None and handshake["name_matches"]
    assert handshake["refused_us"].startswith("authentication-failure")
    assert "does not accept our certificate" in report["verdict"]
