"""
Load on the inward listener (issue 8, item 4): a fedserver under twistd,
started with a soft limit of 1,024 open files as shells give, holds 1,000
mutual-TLS connections from a peer at once with bounded memory, answers
all 1,000 when they ask together, keeps answering a new peer meanwhile,
closes connections past C{[limits] max_connections} on arrival, and gives
the memory back to the next thousand.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import resource
import socket
import ssl
import time
from typing import Any, Dict, Iterator, List, Tuple

import pytest

from tests.integration.harness import PKI, Component, Fedserver, backend_config, free_port, tls_context, wait_until

HELD = 1000
#: the inward listener's [limits] max_connections: room for HELD and a few more
LIMIT = HELD + 10
#: the soft limit of open files twistd is started with (fedserver raises it)
START_SOFT_LIMIT = 1024
#: what one held mutual-TLS connection may cost fedserver at most
BYTES_PER_CONNECTION = 64 * 1024
#: what a second thousand connections may add to the first thousand's peak
ROUND_GROWTH = 0.10
WAIT = 60.0


@pytest.fixture
def backend(tmp_path: Any) -> Iterator[Dict[str, Any]]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    needed = 2 * LIMIT + 1024  # twistd's connections and the test's own ends of them
    if hard != resource.RLIM_INFINITY and hard < needed:
        pytest.fail(f"this test needs {needed} open files and the hard limit is {hard}: raise it (ulimit -Hn)")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, needed), hard))
    pki = PKI(str(tmp_path / "pki"))
    component = Component(lambda path, headers, body: (200, {"path": path,
                                                             "origin": headers.get("wire-origin-domain")}))
    server = None
    try:
        server = Fedserver(str(tmp_path), "b", backend_config(
            "b.example", "fed.b.example", pki=pki, inward_port=free_port(), outward_port=free_port(),
            # the origins' infrastructure domains, against which their certificates are checked
            discovery={domain: {"infra_domain": f"fed.{domain}", "host": "127.0.0.1", "port": 9}
                       for domain in ("a.example", "c.example")},
            allow=["a.example", "c.example"], components={"brig": component.url},
            limits={"max_connections": LIMIT, "idle_timeout": 600, "max_inbound_per_peer": HELD},
        ), soft_open_files=START_SOFT_LIMIT)
        yield {
            "server": server,
            "a": tls_context(pki.ca_path, pki.issue("fed.a.example", ["fed.a.example"])),
            "c": tls_context(pki.ca_path, pki.issue("fed.c.example", ["fed.c.example"])),
            "component": component,
        }
    finally:
        if server is not None:
            server.stop()
        component.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def _request(origin: str, rpc: str) -> bytes:
    return (f"POST /federation/brig/{rpc} HTTP/1.1\r\nHost: fed.b.example\r\nWire-Origin-Domain: {origin}\r\n"
            f"Content-Type: application/json\r\nContent-Length: 2\r\n\r\n{{}}").encode()


def _read_response(tls: ssl.SSLSocket) -> Tuple[int, Any]:
    """One HTTP/1.1 response with a Content-Length, leaving the connection open."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = tls.recv(65536)
        if not chunk:
            raise AssertionError(f"the connection closed before the answer's headers: {data!r}")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(re.search(rb"(?im)^content-length:\s*(\d+)", head).group(1))  # type: ignore[union-attr]
    while len(body) < length:
        chunk = tls.recv(65536)
        if not chunk:
            raise AssertionError("the connection closed in the answer's body")
        body += chunk
    assert len(body) == length, "more than one answer arrived"
    return int(head.split(b" ", 2)[1]), json.loads(body)


def _connect(port: int, context: ssl.SSLContext) -> ssl.SSLSocket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=WAIT)
    return context.wrap_socket(sock, server_hostname="fed.b.example")


def _open(port: int, context: ssl.SSLContext, count: int) -> List[ssl.SSLSocket]:
    """C{count} connections, each with one call answered, held open."""
    held: List[ssl.SSLSocket] = []
    try:
        for i in range(count):
            tls = _connect(port, context)
            held.append(tls)
            tls.sendall(_request("a.example", f"hold-{i}"))
            status, answer = _read_response(tls)
            assert (status, answer.get("path")) == (200, f"/federation/hold-{i}"), (i, status, answer)
    except BaseException:
        _close(held)
        raise
    return held


def _close(connections: List[ssl.SSLSocket]) -> None:
    for tls in connections:
        try:
            tls.close()
        except OSError:
            pass


def _rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS in /proc/{pid}/status")


def _open_files(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _soft_open_files_limit(pid: int) -> int:
    with open(f"/proc/{pid}/limits") as f:
        for line in f:
            if line.startswith("Max open files"):
                return int(line.split()[3])
    raise AssertionError(f"no open files limit in /proc/{pid}/limits")


def _metric(server: Fedserver, name: str) -> int:
    """A value scraped from the backend's C{GET /metrics}."""
    connection = http.client.HTTPConnection("127.0.0.1", server.outward_port, timeout=WAIT)
    try:
        connection.request("GET", "/metrics")
        text = connection.getresponse().read().decode()
    finally:
        connection.close()
    for line in text.splitlines():
        if line.startswith(name + " "):
            return int(float(line.split()[1]))
    raise AssertionError(f"{name} is not among the metrics:\n{text}")


def _wait_for_connections(server: Fedserver, count: int) -> None:
    wait_until(f"{count} inward connections open",
               lambda: _metric(server, 'fedserver_connections{listener="inward"}') == count, WAIT)


def test_a_thousand_connections_are_held_with_bounded_memory(backend: Dict[str, Any]) -> None:
    server: Fedserver = backend["server"]
    port, pid = server.inward_port, server.process.pid
    # twistd fedserver raised the soft limit it was started with to what max_connections needs
    assert _soft_open_files_limit(pid) >= LIMIT + 1024 > START_SOFT_LIMIT
    assert "raised the limit of open files from 1024" in server.log()

    # warm up: the first connections and calls load what every later one shares
    _close(_open(port, backend["a"], 50))
    _wait_for_connections(server, 0)
    baseline = _rss(pid)

    held = _open(port, backend["a"], HELD)
    try:
        _wait_for_connections(server, HELD)
        assert _open_files(pid) > HELD
        first = _rss(pid)
        per_connection = (first - baseline) / HELD
        print(f"\nRSS {baseline / 2**20:.1f} MiB before, {first / 2**20:.1f} MiB with {HELD} connections: "
              f"{per_connection / 1024:.1f} KiB per connection")
        assert per_connection < BYTES_PER_CONNECTION, f"{per_connection:.0f} bytes per held connection"

        # another peer is answered while the thousand are held
        with _connect(port, backend["c"]) as tls:
            started = time.monotonic()
            tls.sendall(_request("c.example", "meanwhile"))
            assert _read_response(tls) == (200, {"path": "/federation/meanwhile", "origin": "c.example"})
            print(f"a new peer answered in {1000 * (time.monotonic() - started):.1f} ms beside {HELD} connections")

        # all thousand ask at once, and every one is answered on its own connection
        started = time.monotonic()
        for i, tls in enumerate(held):
            tls.sendall(_request("a.example", f"together-{i}"))
        for i, tls in enumerate(held):
            answer = _read_response(tls)
            assert answer == (200, {"path": f"/federation/together-{i}", "origin": "a.example"}), (i, answer)
        print(f"{HELD} calls at once answered in {time.monotonic() - started:.2f} s")

        # up to max_connections, and the next one is closed on arrival
        extra = _open(port, backend["a"], LIMIT - HELD)
        held.extend(extra)
        _wait_for_connections(server, LIMIT)
        # closed on arrival: the handshake or the answer meets the end of the connection (not a timeout)
        with pytest.raises((ssl.SSLError, ConnectionError, AssertionError)):
            with _connect(port, backend["a"]) as tls:
                tls.sendall(_request("a.example", "one-too-many"))
                _read_response(tls)
        assert _metric(server, 'fedserver_connections_refused_total{listener="inward"}') >= 1
        peak = _rss(pid)
    finally:
        _close(held)
    _wait_for_connections(server, 0)

    # the next thousand reuse what the first thousand freed
    held = _open(port, backend["a"], HELD)
    try:
        _wait_for_connections(server, HELD)
        second = _rss(pid)
        print(f"RSS {peak / 2**20:.1f} MiB at the first peak, {second / 2**20:.1f} MiB with the next {HELD}")
        assert second < peak * (1 + ROUND_GROWTH), (peak, second)
    finally:
        _close(held)
    _wait_for_connections(server, 0)
