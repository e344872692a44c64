"""
Faults, each provoked for real against fedserver processes under twistd,
with the outcome docs/errors.md documents (label and status), and proof
that what was accepted is not lost (issue 8, item 3).

a.example discovers every domain through a DNS server of this test
(L{ScriptedDNS}: answers from its records, or SERVFAIL, or nothing) and
calls, through its outward listener:

 - b.example, another fedserver, whose components are up, down or hung;
 - peers in threads of this test that reset the connection in the middle
   of their answer, present a certificate from another CA, or do not
   speak TLS at all.

b.example's listeners bound how slowly a peer may send (header and body
deadlines).  w.example keeps the Wire reference's data in SQLite, which
this test locks from outside.

The remote that refuses and the remote that never answers are in
test_federation.py (C{test_outward_failures_are_labelled}), the idle
timeout there too (C{test_idle_connections_are_closed}), and DNS that
times out in test_wire_dns.py (C{test_a_known_peer_is_reached_while_dns_is_down}).
"""

from __future__ import annotations

import json
import socket
import sqlite3
import ssl
import struct
import threading
import time
from typing import Any, Callable, Dict, Iterator, List, Optional, Set, Tuple

import pytest
from twisted.names import dns

from tests.integration.harness import (
    PKI,
    Component,
    Fedserver,
    backend_config,
    free_port,
    post,
    tls_context,
)
from tests.integration.test_federation import Silent

SERVICE = "_wire-server-federator._tcp"
#: seconds for one DNS lookup on a.example
DNS_TIMEOUT = 2
#: b.example's header and body deadlines
DEADLINE = 1


# a DNS server whose every answer the test decides


class ScriptedDNS:
    """
    A UDP DNS server on 127.0.0.1 in a thread: answers from C{records}
    (NXDOMAIN for names it has none for), SERVFAIL for the names in
    C{servfail} (or for all while C{mode} is C{"servfail"}), and nothing at
    all while C{mode} is C{"silent"}.
    """

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.1)
        self.port = self.sock.getsockname()[1]
        self.records: Dict[Tuple[bytes, int], List[dns.RRHeader]] = {}
        self.servfail: Set[bytes] = set()
        self.mode = "answer"
        self.asked: List[Tuple[bytes, int]] = []
        self._stopping = False
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def srv(self, domain: str, priority: int, port: int, target: str) -> None:
        name = f"{SERVICE}.{domain}"
        self.records.setdefault((name.encode(), dns.SRV), []).append(
            dns.RRHeader(name, dns.SRV, dns.IN, 1, dns.Record_SRV(priority, 0, port, target, 1)))
        self.records.setdefault((target.encode(), dns.A), [
            dns.RRHeader(target, dns.A, dns.IN, 1, dns.Record_A("127.0.0.1", 1))])

    def _serve(self) -> None:
        while not self._stopping:
            try:
                data, address = self.sock.recvfrom(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            query = dns.Message()
            try:
                query.fromStr(data)
                question = query.queries[0]
            except Exception:
                continue
            name = question.name.name.lower()
            self.asked.append((name, question.type))
            if self.mode == "silent":
                continue
            answer = dns.Message(id=query.id, answer=1, auth=1)
            answer.queries = query.queries
            if self.mode == "servfail" or name in self.servfail:
                answer.rCode = dns.ESERVER
            elif any(known == name for known, _ in self.records):
                answer.answers = list(self.records.get((name, question.type), []))
            else:
                answer.rCode = dns.ENAME
            self.sock.sendto(answer.toStr(), address)

    def close(self) -> None:
        self._stopping = True
        self._thread.join(5)
        self.sock.close()


# peers that misbehave, in threads of this test


def read_request(connection: socket.socket) -> bytes:
    """One HTTP request with a Content-Length body (as fedserver sends them)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = connection.recv(65536)
        if not chunk:
            return data
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    while len(body) < length:
        chunk = connection.recv(65536)
        if not chunk:
            break
        body += chunk
    return head + b"\r\n\r\n" + body


class Peer:
    """
    A TCP server on 127.0.0.1 (TLS with C{context}) that runs
    C{handle(connection)} for each connection; records the requests handed
    to L{Peer.record} and the handshakes that failed.
    """

    def __init__(self, handle: Callable[[Peer, socket.socket], None],
                 context: Optional[ssl.SSLContext] = None) -> None:
        self.handle = handle
        self.context = context
        self.requests: List[bytes] = []
        self.failed_handshakes: List[str] = []
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def record(self, request: bytes) -> None:
        self.requests.append(request)

    def _accept(self) -> None:
        while True:
            try:
                connection, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._run, args=(connection,), daemon=True).start()

    def _run(self, connection: socket.socket) -> None:
        connection.settimeout(10)
        try:
            if self.context is not None:
                try:
                    connection = self.context.wrap_socket(connection, server_side=True)
                except (ssl.SSLError, OSError) as e:
                    self.failed_handshakes.append(str(e))
                    return
            self.handle(self, connection)
        except OSError:
            pass
        finally:
            connection.close()

    def close(self) -> None:
        self.sock.close()


def server_context(cert: Tuple[str, str]) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(*cert)
    return context


def half_answer_then_reset(peer: Peer, connection: socket.socket) -> None:
    """Read the request, send the head and a few bytes of the body, then reset (RST, no close_notify)."""
    peer.record(read_request(connection))
    connection.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n"
                       b'{"partial": ')
    time.sleep(0.2)
    connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


def plain_http(peer: Peer, connection: socket.socket) -> None:
    """An HTTP server without TLS: answers whatever comes (a TLS ClientHello) with a 400."""
    peer.record(connection.recv(65536))
    connection.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")


def serve_nothing(peer: Peer, connection: socket.socket) -> None:
    peer.record(read_request(connection))


# the backends


def component_answer(path: str, headers: Dict[str, str], body: bytes) -> tuple:
    return 200, {"path": path, "origin": headers.get("wire-origin-domain")}


@pytest.fixture(scope="module")
def faults(tmp_path_factory: Any) -> Iterator[Dict[str, Any]]:
    tmp = tmp_path_factory.mktemp("faults")
    pki = PKI(str(tmp / "pki"))
    other = PKI(str(tmp / "other-pki"), "another CA")
    ports = {name: free_port() for name in ("a_in", "a_out", "b_in", "b_out", "closed")}
    dns_server = ScriptedDNS()
    component = Component(component_answer)
    hung = Silent()
    resetter = Peer(half_answer_then_reset, server_context(pki.issue("fed.reset.example", ["fed.reset.example"])))
    stranger = Peer(serve_nothing, server_context(other.issue("fed.wrongca.example", ["fed.wrongca.example"])))
    plain = Peer(plain_http)
    dns_server.srv("b.example", 0, ports["b_in"], "fed.b.example")
    # after the resetting peer, b; b must never see the call
    dns_server.srv("reset.example", 0, resetter.port, "fed.reset.example")
    dns_server.srv("reset.example", 10, ports["b_in"], "fed.b.example")
    # after the peer with another CA's certificate, b, which answers
    dns_server.srv("wrongca.example", 0, stranger.port, "fed.wrongca.example")
    dns_server.srv("wrongca.example", 10, ports["b_in"], "fed.b.example")
    dns_server.srv("untrusted.example", 0, stranger.port, "fed.wrongca.example")
    dns_server.srv("plain.example", 0, plain.port, "fed.plain.example")
    dns_server.servfail.add(f"{SERVICE}.servfail.example".encode())
    servers: List[Fedserver] = []
    try:
        b = Fedserver(str(tmp), "b", backend_config(
            "b.example", "fed.b.example", pki=pki, inward_port=ports["b_in"], outward_port=ports["b_out"],
            discovery={"a.example": {"infra_domain": "fed.a.example", "host": "127.0.0.1", "port": ports["a_in"]}},
            allow=["a.example"],
            components={"brig": component.url, "down": f"http://127.0.0.1:{ports['closed']}",
                        "hung": f"http://127.0.0.1:{hung.port}"},
            limits={"header_timeout": DEADLINE, "body_timeout": DEADLINE, "idle_timeout": 30,
                    "component_timeout": 1},
        ))
        servers.append(b)
        a_config = backend_config(
            "a.example", "fed.a.example", pki=pki, inward_port=ports["a_in"], outward_port=ports["a_out"],
            discovery={}, allow=["b.example", "reset.example", "wrongca.example", "untrusted.example",
                                 "plain.example", "servfail.example", "never.example"],
            components={}, limits={"request_timeout": 10, "connect_timeout": 2},
        )
        a_config["discovery"] = {"plugin": "wire-srv", "nameservers": [f"127.0.0.1:{dns_server.port}"],
                                 "timeout": DNS_TIMEOUT, "min_ttl": 0, "max_ttl": 1, "negative_ttl": 1,
                                 "stale_ttl": 3600}
        a_config["outward"]["allow_ip_ranges"] = ["127.0.0.0/8"]
        a = Fedserver(str(tmp), "a", a_config)
        servers.append(a)
        yield {"a": a, "b": b, "pki": pki, "dns": dns_server, "component": component, "resetter": resetter,
               "stranger": stranger, "plain": plain, "hung": hung, "tmp": tmp}
    finally:
        for server in servers:
            server.stop()
        for closeable in (dns_server, component, hung, resetter, stranger, plain):
            closeable.close()


def call(faults: Dict[str, Any], domain: str, rpc: str = "get-user-by-handle", component: str = "brig",
         request_id: str = "") -> Tuple[int, Any]:
    headers = {"Content-Type": "application/json"}
    if request_id:
        headers["Wire-Origin-Request-Id"] = request_id
    status, _, answer = post(faults["a"].outward_port, f"/rpc/{domain}/{component}/{rpc}", {"handle": "bob"},
                             headers=headers, timeout=30)
    return status, answer


def test_the_rig_works(faults: Dict[str, Any]) -> None:
    status, answer = call(faults, "b.example")
    assert status == 200, answer
    assert answer == {"path": "/federation/get-user-by-handle", "origin": "a.example"}


# the remote resets the connection in the middle of its answer


def test_a_reset_in_the_middle_of_the_answer_is_connection_refused_and_not_retried(faults: Dict[str, Any]) -> None:
    component, resetter = faults["component"], faults["resetter"]
    before = len(component.requests)
    status, answer = call(faults, "reset.example", request_id="req-reset")
    assert (status, answer["label"]) == (521, "federation-connection-refused"), answer
    assert answer["message"].startswith(f"cannot reach fed.reset.example (127.0.0.1:{resetter.port}): ")
    assert answer["data"] == {"type": "federation", "domain": "reset.example",
                              "path": "/federation/brig/get-user-by-handle"}
    # the request reached the peer once; it may have been handled, so the next target is not tried
    assert len(resetter.requests) == 1
    assert b"req-reset" in resetter.requests[0]
    assert len(component.requests) == before
    assert "-> 521 federation-connection-refused" in faults["a"].log()


# the TLS handshake fails


def test_a_certificate_from_another_ca_is_a_tls_error_and_the_next_target_answers(faults: Dict[str, Any]) -> None:
    stranger = faults["stranger"]
    status, answer = call(faults, "wrongca.example", request_id="req-wrongca")
    # nothing was sent to the stranger, so fail-over to b is safe
    assert status == 200, answer
    assert stranger.requests == [] and stranger.failed_handshakes
    assert f"wrongca.example: target 127.0.0.1:{stranger.port} failed (federation-tls-error); 1 more to try " \
           "[request req-wrongca]" in faults["a"].log()


def test_a_peer_that_does_not_speak_tls(faults: Dict[str, Any]) -> None:
    status, answer = call(faults, "plain.example")
    assert (status, answer["label"]) == (525, "federation-tls-error"), answer
    assert answer["message"].startswith(f"TLS with fed.plain.example (127.0.0.1:{faults['plain'].port}) failed: ")


def test_a_certificate_from_another_ca_without_another_target(faults: Dict[str, Any]) -> None:
    status, answer = call(faults, "untrusted.example")
    assert (status, answer["label"]) == (525, "federation-tls-error"), answer
    assert answer["message"].startswith(
        f"TLS with fed.wrongca.example (127.0.0.1:{faults['stranger'].port}) failed: ")
    assert "certificate verify failed" in answer["message"]


# DNS answers SERVFAIL, or nothing


def test_servfail_is_discovery_failure_at_once(faults: Dict[str, Any]) -> None:
    started = time.monotonic()
    status, answer = call(faults, "servfail.example")
    assert (status, answer["label"]) == (400, "discovery-failure"), answer
    assert answer["message"] == (
        f"cannot discover servfail.example: the DNS server failed to answer for {SERVICE}.servfail.example (SERVFAIL)"
    )
    assert time.monotonic() - started < DNS_TIMEOUT  # no waiting for a timeout


def test_dns_that_does_not_answer_is_discovery_failure_after_the_dns_timeout(faults: Dict[str, Any]) -> None:
    dns_server = faults["dns"]
    dns_server.mode = "silent"
    try:
        started = time.monotonic()
        status, answer = call(faults, "never.example")
    finally:
        dns_server.mode = "answer"
    assert (status, answer["label"]) == (400, "discovery-failure"), answer
    assert answer["message"] == f"cannot discover never.example: the DNS lookup of {SERVICE}.never.example timed out"
    assert DNS_TIMEOUT - 0.5 < time.monotonic() - started < DNS_TIMEOUT + 3


def test_a_known_peer_is_reached_while_dns_answers_servfail(faults: Dict[str, Any]) -> None:
    dns_server, component = faults["dns"], faults["component"]
    assert call(faults, "b.example")[0] == 200
    dns_server.mode = "servfail"
    try:
        time.sleep(1.5)  # the answer (max_ttl 1) has expired
        before = len(component.requests)
        status, answer = call(faults, "b.example", request_id="req-servfail-stale")
        assert status == 200, answer
        assert len(component.requests) == before + 1
        assert f"discovery of b.example failed (cannot discover b.example: the DNS server failed to answer for " \
               f"{SERVICE}.b.example (SERVFAIL)); using the answer that expired" in faults["a"].log()
    finally:
        dns_server.mode = "answer"


# the component is down, or does not answer


@pytest.mark.parametrize("component", ["down", "hung"])
def test_a_component_that_is_down_or_hung_is_component_unavailable(faults: Dict[str, Any], component: str) -> None:
    request_id = f"req-component-{component}"
    started = time.monotonic()
    status, answer = call(faults, "b.example", component=component, request_id=request_id)
    assert (status, answer["label"]) == (533, "federation-remote-error"), answer
    inner = answer["inner"]
    assert (inner["code"], inner["label"]) == (502, "component-unavailable")
    assert inner["message"] == (f"the component {component} is unavailable; the log of this backend has the "
                                f"details under request id {request_id}")
    assert time.monotonic() - started < 8  # the hung one: [limits] component_timeout = 1
    # the reason is in b's log only, under the request id
    line = next(line for line in faults["b"].log().splitlines()
                if f"component {component} (" in line and request_id in line)
    assert ("Connection was refused" if component == "down" else "failed: no answer within 1.0 s") in line, line


# a peer sends slowly


def _trickle(sock: socket.socket, data: bytes, every: float, limit: float) -> Optional[float]:
    """Send C{data} a byte at a time; the seconds until the server cut the connection, or None."""
    started = time.monotonic()
    for i in range(len(data)):
        try:
            sock.sendall(data[i:i + 1])
        except (OSError, ssl.SSLError):
            return time.monotonic() - started
        time.sleep(every)
        if time.monotonic() - started > limit:
            return None
    try:
        sock.settimeout(limit)
        return time.monotonic() - started if sock.recv(1) == b"" else None
    except (OSError, ssl.SSLError):
        return time.monotonic() - started


SLOW_HEAD = (b"POST /federation/brig/ping HTTP/1.1\r\nHost: fed.b.example\r\nContent-Type: application/json\r\n"
             b"Wire-Origin-Domain: a.example\r\nContent-Length: 2\r\n\r\n")


def test_headers_trickled_to_the_inward_listener_are_cut_off(faults: Dict[str, Any]) -> None:
    b = faults["b"]
    context = tls_context(faults["pki"].ca_path)
    with socket.create_connection(("127.0.0.1", b.inward_port), timeout=10) as raw:
        with context.wrap_socket(raw, server_hostname="fed.b.example") as sock:
            # a byte every 0.2 s: the idle timeout (30 s) would never fire
            cut = _trickle(sock, SLOW_HEAD, every=0.2, limit=10)
    assert cut is not None and DEADLINE - 0.1 < cut < DEADLINE + 2, cut
    assert f"did not arrive within {float(DEADLINE)} s ([limits] header_timeout)" in b.log()


def test_a_body_trickled_to_the_outward_listener_is_cut_off(faults: Dict[str, Any]) -> None:
    b = faults["b"]
    head = b"POST /rpc/a.example/brig/ping HTTP/1.1\r\nHost: x\r\nContent-Length: 200\r\n\r\n"
    with socket.create_connection(("127.0.0.1", b.outward_port), timeout=10) as sock:
        sock.sendall(head)
        cut = _trickle(sock, b"{" + b" " * 198 + b"}", every=0.2, limit=10)
    assert cut is not None and cut < DEADLINE + 2, cut
    assert f"the request body did not arrive within {float(DEADLINE)} s ([limits] body_timeout)" in b.log()


def test_a_quick_request_still_passes(faults: Dict[str, Any]) -> None:
    assert call(faults, "b.example")[0] == 200


def test_no_traceback_reaches_peers(faults: Dict[str, Any]) -> None:
    for server in (faults["a"], faults["b"]):
        assert "Traceback" not in server.log()


# the database is unavailable for a while (SQLite: another process holds the write lock)


@pytest.fixture
def wire_backend(tmp_path: Any) -> Iterator[Tuple[Fedserver, str]]:
    pki = PKI(str(tmp_path / "pki"))
    config = backend_config("w.example", "fed.w.example", pki=pki, inward_port=free_port(),
                            outward_port=free_port(), discovery={}, allow=["a.example"], components={})
    config["components"] = {"brig": {"plugin": "wire-brig"}, "galley": {"plugin": "wire-galley"}}
    server = Fedserver(str(tmp_path), "w", config)
    try:
        yield server, str(tmp_path / "var" / "w.example" / "fedserver.sqlite")
    finally:
        server.stop()


def _create_user(server: Fedserver, handle: str, request_id: str) -> Tuple[int, Any, float]:
    started = time.monotonic()
    status, _, answer = post(server.outward_port, "/wire/users", {"handle": handle, "name": handle.title()},
                             headers={"Content-Type": "application/json", "Request-Id": request_id})
    return status, answer, time.monotonic() - started


def _hold_write_lock(path: str) -> sqlite3.Connection:
    holder = sqlite3.connect(path, isolation_level=None, timeout=10, check_same_thread=False)
    holder.execute("BEGIN EXCLUSIVE")  # in WAL mode: the write lock; readers go on
    return holder


def test_the_database_locked_for_a_while(wire_backend: Tuple[Fedserver, str]) -> None:
    server, path = wire_backend
    assert _create_user(server, "alice", "req-db-1")[0] == 201

    # locked for a second (a backup copying the file, an operator's sqlite3 shell):
    # the write waits for it (busy_timeout, 5 s) and succeeds
    holder = _hold_write_lock(path)
    threading.Timer(1.0, holder.rollback).start()
    status, answer, took = _create_user(server, "bob", "req-db-2")
    assert status == 201, answer
    assert took >= 0.9
    holder.close()

    # locked for longer than that: the request fails, labelled, with its request id, and nothing is half-kept
    holder = _hold_write_lock(path)
    try:
        status, answer, took = _create_user(server, "carol", "req-db-3")
    finally:
        holder.rollback()
        holder.close()
    assert (status, answer["label"]) == (500, "internal-error"), answer
    assert answer["message"] == "internal error; the server log has the details under request id req-db-3"
    assert 4.5 < took < 15
    log = server.log()
    assert "database is locked" in log and "[request req-db-3]" in log
    assert "Traceback" not in json.dumps(answer)

    # once the lock is gone the same request succeeds: the failed one left no trace (no handle-exists)
    status, answer, _ = _create_user(server, "carol", "req-db-4")
    assert status == 201, answer
    with sqlite3.connect(path) as check:
        handles = sorted(row[0] for row in check.execute("SELECT handle FROM wire_users"))
    assert handles == ["alice", "bob", "carol"]
