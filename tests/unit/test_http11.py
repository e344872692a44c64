"""
L{fedserver.http11}: the lean HTTP/1.1 client, in memory.
"""

from __future__ import annotations

from typing import Any, List

import pytest
from twisted.internet import defer, error
from twisted.internet.defer import Deferred
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


# found in review: each of these once went wrong


def test_cancelling_a_waiter_whose_connection_is_being_made_cancels_that_attempt():
    clock = Clock()
    attempts: List[Deferred] = []

    class Slow:
        def connect(self, factory: Any) -> Deferred:
            d: Deferred = Deferred()
            attempts.append(d)
            return d

    endpoint = Endpoint()
    pool = HTTP11Pool(clock, max_body=1000, max_per_key=1)
    first = pool.request("k", lambda: endpoint, b"R1")
    waiting = pool.request("k", lambda: Slow(), b"R2")
    endpoint.connections[0].connectionLost(Failure(error.ConnectionLost()))  # frees the slot
    failure_result_of(first, ConnectionClosed)
    assert len(attempts) == 1  # a connection is being made for the waiter
    waiting.cancel()  # must not raise
    failure_result_of(waiting)
    assert attempts[0].called


def test_an_expiring_connection_is_never_handed_out_again():
    clock, endpoint = Clock(), Endpoint()
    pool = HTTP11Pool(clock, max_body=1000, max_per_key=2, idle_timeout=50)
    d = pool.request("k", lambda: endpoint, b"R")
    answer(endpoint.connections[0])
    success_result_of(d)
    clock.advance(50)  # closing, its peer has not yet closed its side
    pool.request("k", lambda: endpoint, b"R")
    assert len(endpoint.connections) == 2


def test_closing_idle_connections_keeps_the_count_right():
    clock, endpoint = Clock(), Endpoint()
    pool = HTTP11Pool(clock, max_body=1000, max_per_key=2)
    requests = [pool.request("k", lambda: endpoint, b"R") for _ in range(2)]
    for connection in endpoint.connections:
        answer(connection)
    for d in requests:
        success_result_of(d)
    pool.close()
    for connection in endpoint.connections:
        connection.connectionLost(Failure(error.ConnectionDone()))
    # two more may open, not four
    for _ in range(3):
        pool.request("k", lambda: endpoint, b"R")
    assert len(endpoint.connections) == 4


def test_close_can_select_keys():
    clock, endpoint = Clock(), Endpoint()
    pool = HTTP11Pool(clock, max_body=1000)
    for key in ("a", "b"):
        d = pool.request(key, lambda: endpoint, b"R")
        answer(endpoint.connections[-1])
        success_result_of(d)
    pool.close(lambda key: key == "a")
    assert endpoint.connections[0].transport.disconnecting
    assert not endpoint.connections[1].transport.disconnecting


def test_a_chunked_answer_in_tiny_reads_is_linear():
    import time

    connection, _ = connected(max_body=100_000)
    d = ask(connection)
    connection.dataReceived(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
    data = b"".join(b"10\r\n" + b"x" * 16 + b"\r\n" for _ in range(2000)) + b"0\r\n\r\n"
    started = time.process_time()
    for i in range(0, len(data), 7):
        connection.dataReceived(data[i:i + 7])
    assert len(success_result_of(d).body) == 32000
    # quadratic parsing took seconds here; linear takes milliseconds
    assert time.process_time() - started < 2


@pytest.mark.parametrize(
    "answer_bytes",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: " + b"9" * 5000 + b"\r\n\r\n",
        b"HTTP/1.1 " + b"2" * 5000 + b" OK\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n-5\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0x3\r\n",
    ],
)
def test_ambiguous_or_absurd_framing_is_a_bad_answer(answer_bytes):
    connection, transport = connected()
    d = ask(connection)
    connection.dataReceived(answer_bytes)
    assert failure_result_of(d, BadAnswer)
    assert transport.disconnected


def test_endless_trailers_are_too_large():
    connection, _ = connected()
    d = ask(connection)
    connection.dataReceived(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n")
    for _ in range(10000):
        connection.dataReceived(b"X-T: v\r\n")
        if d.called:
            break
    assert failure_result_of(d, BodyTooLarge)


@pytest.mark.parametrize("method, path", [("GET\r\nX", "/"), ("GET", "/a b"), ("GET", "/\u00e4")])
def test_a_method_or_path_that_cannot_be_sent_is_refused(method, path):
    with pytest.raises(ValueError, match="not visible ASCII"):
        encode_request(method, path, "h", [], b"")
