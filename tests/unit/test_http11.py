"""
L{fedserver.http11}: the lean HTTP/1.1 client, in memory.
"""

from __future__ import annotations

from typing import Any, List

import pytest
from twisted.internet import defer, error
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from fedserver.http11 import (
    BadAnswer,
    BodyTooLarge,
    ConnectionClosed,
    HTTP11Connection,
    HTTP11Pool,
    encode_request,
)
from tests.unit.helpers import failure_result_of, success_result_of


def connected(max_body: int = 1000) -> Any:
    connection = HTTP11Connection(max_body)
    transport = StringTransport()
    connection.makeConnection(transport)
    return connection, transport


def ask(connection: HTTP11Connection, **kwargs: Any) -> Any:
    return connection.request(encode_request("POST", "/federation/x", "h", [], b"{}"), **kwargs)


def test_requests_are_encoded_with_host_and_length():
    data = encode_request("POST", "/p", "fed.b.example:8443", [("X-A", "1"), ("Content-Length", "9")], b"body")
    assert data == (b"POST /p HTTP/1.1\r\nHost: fed.b.example:8443\r\nX-A: 1\r\nContent-Length: 4\r\n\r\nbody")


@pytest.mark.parametrize("name, value", [("X-A", "1\r\nX-Injected: 2"), ("X-A\n", "1"), ("X:A", "1"), ("X", "\0")])
def test_header_injection_is_refused(name, value):
    with pytest.raises(ValueError, match="cannot be sent"):
        encode_request("POST", "/p", "h", [(name, value)], b"")


def test_a_content_length_answer_in_pieces():
    connection, transport = connected()
    d = ask(connection)
    for piece in (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-", b"Length: 7\r\n\r\n{\"a\"", b":1}"):
        connection.dataReceived(piece)
    response = success_result_of(d)
    assert (response.code, response.body, response.header("content-type")) == (200, b'{"a":1}', "application/json")
    assert connection.reusable and not transport.disconnecting


def test_a_chunked_answer_with_extensions_and_trailers():
    connection, _ = connected()
    d = ask(connection)
    connection.dataReceived(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3;x=y\r\nabc\r\n")
    connection.dataReceived(b"2\r\nde\r\n0\r\nX-Trailer: 1\r\n\r\n")
    assert success_result_of(d).body == b"abcde"
    assert connection.reusable


def test_an_interim_answer_is_skipped():
    connection, _ = connected()
    d = ask(connection)
    connection.dataReceived(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n")
    assert success_result_of(d).code == 201


def test_an_answer_until_close_is_not_reused():
    connection, _ = connected()
    d = ask(connection)
    connection.dataReceived(b"HTTP/1.1 200 OK\r\n\r\nall of ")
    connection.dataReceived(b"it")
    connection.connectionLost(Failure(error.ConnectionDone()))
    assert success_result_of(d).body == b"all of it"
    assert not connection.reusable


@pytest.mark.parametrize(
    "head", [b"HTTP/1.0 200 OK\r\nContent-Length: 0", b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0"]
)
def test_connection_close_is_honoured(head):
    connection, transport = connected()
    d = ask(connection)
    connection.dataReceived(head + b"\r\n\r\n")
    success_result_of(d)
    assert not connection.reusable and transport.disconnecting


@pytest.mark.parametrize(
    "answer, kind",
    [
        (b"HTTP/1.1 200 OK\r\nContent-Length: 1001\r\n\r\n", BodyTooLarge),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3e9\r\n" + b"x" * 1001, BodyTooLarge),
        (b"HTTP/1.1 200 OK\r\n" + b"X-A: b\r\n" * 10000, BodyTooLarge),
        (b"SSH-2.0-OpenSSH\r\n\r\n", BadAnswer),
        (b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n", BadAnswer),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n", BadAnswer),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n", BadAnswer),
        (b"HTTP/1.1 200 OK\r\n bad: header\r\n\r\n", BadAnswer),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", BadAnswer),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1\r\nabc\r\n", BadAnswer),
    ],
)
def test_bad_or_oversized_answers_abort_the_connection(answer, kind):
    connection, transport = connected()
    d = ask(connection)
    connection.dataReceived(answer)
    assert failure_result_of(d, kind)
    assert transport.disconnected


def test_a_connection_lost_midway_fails_the_request():
    connection, _ = connected()
    d = ask(connection)
    connection.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
    connection.connectionLost(Failure(error.ConnectionLost()))
    failure = failure_result_of(d, ConnectionClosed)
    assert "in the middle of the answer" in str(failure.value)


def test_an_answer_nobody_asked_for_aborts():
    connection, transport = connected()
    connection.dataReceived(b"HTTP/1.1 200 OK\r\n\r\n")
    assert transport.disconnected


def test_cancelling_aborts_the_connection():
    connection, transport = connected()
    d = ask(connection)
    d.cancel()
    assert failure_result_of(d, defer.CancelledError)
    assert transport.disconnected


def test_no_body_for_head_requests_and_204():
    connection, _ = connected()
    d = ask(connection, expect_body=False)
    connection.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 50\r\n\r\n")
    assert success_result_of(d).body == b""
    d = ask(connection)
    connection.dataReceived(b"HTTP/1.1 204 No Content\r\n\r\n")
    assert success_result_of(d).code == 204


# the pool


class Endpoint:
    """Connects at once over StringTransports, or fails when told to."""

    def __init__(self) -> None:
        self.connections: List[Any] = []
        self.fail = False

    def connect(self, factory: Any) -> Any:
        if self.fail:
            return defer.fail(error.ConnectionRefusedError())
        protocol = factory.buildProtocol(None)
        protocol.makeConnection(StringTransport())
        self.connections.append(protocol)
        return defer.succeed(protocol)


def answer(connection: Any, body: bytes = b"{}") -> None:
    connection.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))


def test_the_pool_reuses_idle_connections_and_expires_them():
    clock, endpoint = Clock(), Endpoint()
    pool = HTTP11Pool(clock, max_body=1000, idle_timeout=50)
    d = pool.request("k", lambda: endpoint, b"R1")
    answer(endpoint.connections[0])
    success_result_of(d)
    d = pool.request("k", lambda: endpoint, b"R2")
    assert len(endpoint.connections) == 1  # reused
    answer(endpoint.connections[0])
    success_result_of(d)
    clock.advance(50)
    assert endpoint.connections[0].transport.disconnecting


def test_the_pool_queues_requests_beyond_its_connections():
    clock, endpoint = Clock(), Endpoint()
    pool = HTTP11Pool(clock, max_body=1000, max_per_key=2)
    requests = [pool.request("k", lambda: endpoint, b"R") for _ in range(3)]
    assert len(endpoint.connections) == 2
    assert not requests[2].called
    answer(endpoint.connections[0], b"first")
    assert success_result_of(requests[0]).body == b"first"
    # the freed connection serves the queued request
    answer(endpoint.connections[0], b"third")
    assert success_result_of(requests[2]).body == b"third"
    assert len(endpoint.connections) == 2


def test_a_lost_connection_frees_its_slot_for_a_waiting_request():
    clock, endpoint = Clock(), Endpoint()
    pool = HTTP11Pool(clock, max_body=1000, max_per_key=1)
    first = pool.request("k", lambda: endpoint, b"R")
    second = pool.request("k", lambda: endpoint, b"R")
    endpoint.connections[0].connectionLost(Failure(error.ConnectionLost()))
    failure_result_of(first, ConnectionClosed)
    assert len(endpoint.connections) == 2  # a new connection for the waiting request
    answer(endpoint.connections[1])
    assert success_result_of(second).code == 200


def test_a_waiting_request_can_be_cancelled():
    clock, endpoint = Clock(), Endpoint()
    pool = HTTP11Pool(clock, max_body=1000, max_per_key=1)
    pool.request("k", lambda: endpoint, b"R")
    waiting = pool.request("k", lambda: endpoint, b"R")
    waiting.cancel()
    failure_result_of(waiting, defer.CancelledError)
    answer(endpoint.connections[0])
    assert len(endpoint.connections) == 1


def test_a_failed_connection_attempt_is_reported_and_frees_its_slot():
    clock, endpoint = Clock(), Endpoint()
    pool = HTTP11Pool(clock, max_body=1000, max_per_key=1)
    endpoint.fail = True
    failure_result_of(pool.request("k", lambda: endpoint, b"R"), error.ConnectionRefusedError)
    endpoint.fail = False
    d = pool.request("k", lambda: endpoint, b"R")
    answer(endpoint.connections[0])
    success_result_of(d)


def test_close_closes_idle_connections():
    clock, endpoint = Clock(), Endpoint()
    pool = HTTP11Pool(clock, max_body=1000)
    d = pool.request("k", lambda: endpoint, b"R")
    answer(endpoint.connections[0])
    success_result_of(d)
    pool.close()
    assert endpoint.connections[0].transport.disconnecting
    assert not clock.getDelayedCalls()
