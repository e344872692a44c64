"""
Tests for fedserver.client: failure classification, and the federation client
on a L{MemoryReactorClock} talking real TLS to an in-memory server.
"""

from __future__ import annotations

import json
from typing import Any, List

import attrs
import pytest
import service_identity
from OpenSSL import SSL
from twisted.internet import defer, error
from twisted.internet.address import HostnameAddress
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from twisted.web import client as web_client
from twisted.web import resource, server

from fedserver.client import (
    BodyTooLarge,
    FederationClient,
    NotDelivered,
    classify_failure,
)
from fedserver.errors import FederationError
from fedserver.tls import ClientCertificateServerOptions
from fedserver.values import OutboundRequest
from tests.unit.helpers import (
    assert_no_result,
    failure_result_of,
    labelled_failure,
    pump_between,
    site_for,
    success_result_of,
    target,
)

TARGET = target("fed.b.example", 8443, host="127.0.0.1")
REQUEST = OutboundRequest(
    destination="b.example",
    method="POST",
    path="/federation/brig/get-user",
    headers=[("Content-Type", "application/json"), ("Wire-Origin-Domain", "a.example")],
    body=b'{"handle": "alice"}',
)
WHERE = "fed.b.example (127.0.0.1:8443)"


# classify_failure


def classify(exc: BaseException) -> FederationError:
    return classify_failure(Failure(exc), TARGET)


def nested(cls: Any, exc: BaseException) -> BaseException:
    """C{exc} wrapped as Twisted's web client wraps failures."""
    return cls([Failure(exc)])


TLS_ERROR = SSL.Error([("SSL routines", "", "certificate verify failed")])


@pytest.mark.parametrize(
    "exc, label, not_delivered",
    [
        (TLS_ERROR, "federation-tls-error", True),
        (service_identity.VerificationError(errors=["DNSMismatch"]), "federation-tls-error", True),
        (nested(web_client.ResponseNeverReceived, TLS_ERROR), "federation-tls-error", True),
        (error.ConnectionRefusedError(), "federation-connection-refused", True),
        (error.DNSLookupError("no such host"), "federation-connection-refused", True),
        (error.TimeoutError(), "federation-timeout", True),
        (defer.TimeoutError(), "federation-timeout", False),
        (nested(web_client.ResponseNeverReceived, error.ConnectionLost()), "federation-connection-refused", False),
        (nested(web_client.ResponseFailed, error.ConnectionDone()), "federation-connection-refused", False),
        (BodyTooLarge(5000), "federation-remote-error", False),
        (ValueError("odd"), "federation-connection-refused", False),
    ],
)
def test_classify_failure(exc, label, not_delivered):
    classified = classify(exc)
    assert classified.label == label
    assert isinstance(classified, NotDelivered) is not_delivered
    assert classified.data == {"type": "federation", "domain": "fed.b.example"}
    assert WHERE in classified.message


def test_classify_failure_messages():
    assert classify(TLS_ERROR).message == f"TLS with {WHERE} failed: certificate verify failed"
    assert classify(error.ConnectionRefusedError()).message == (
        f"cannot connect to {WHERE}: Connection was refused by other side"
    )
    assert classify(defer.TimeoutError()).message == f"{WHERE} did not answer in time"
    assert classify(ValueError("odd")).message == f"talking to {WHERE} failed: odd"


def test_classify_failure_keeps_a_labelled_error():
    labelled = FederationError("x", "federation-denied")
    assert classify(nested(web_client.ResponseFailed, labelled)) is labelled


# reading bodies


@attrs.define
class FakeResponse:
    """Enough of an IResponse for L{read_body}."""

    length: Any
    transport: StringTransport = attrs.Factory(StringTransport)
    protocol: Any = None

    def deliverBody(self, protocol):
        self.protocol = protocol
        protocol.makeConnection(self.transport)

    def deliver(self, *chunks: bytes, end: Any = web_client.ResponseDone) -> None:
        for chunk in chunks:
            self.protocol.dataReceived(chunk)
        if end is not None:
            self.protocol.connectionLost(Failure(end()))


@pytest.fixture
def reactor() -> MemoryReactorClock:
    # fedserver gives its TLS layers this clock: nothing runs on the global reactor
    return MemoryReactorClock()


@pytest.fixture
def client(reactor, dev_pki) -> FederationClient:
    material = dev_pki.material("fed.a.example")
    return FederationClient(
        reactor,
        lambda t: material.client_options(t.infra_domain),
        request_timeout=30,
        connect_timeout=5,
        max_body_bytes=100,
    )


class RemoteBackend(resource.Resource):
    """The inward listener of b.example: records requests, answers as told."""

    isLeaf = True

    def __init__(self, code: int = 200, body: bytes = b'{"user": "alice"}', finish: bool = True) -> None:
        super().__init__()
        self.code = code
        self.body = body
        self.finish = finish
        self.requests: List[server.Request] = []
        self.received: List[bytes] = []

    def render(self, request):
        self.requests.append(request)
        self.received.append(request.content.read())
        request.setResponseCode(self.code)
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"x-remote", b"b")
        if self.finish:
            return self.body
        request.write(self.body)
        return server.NOT_DONE_YET


def connect(reactor, dev_pki, backend, name="fed.b.example"):
    """Complete the client's pending connection to an in-memory TLS server for C{name}."""
    host, port, factory, timeout, _ = reactor.tcpClients[-1]
    assert (host, port, timeout) == ("127.0.0.1", 8443, 5)
    server_factory = TLSMemoryBIOFactory(
        ClientCertificateServerOptions(dev_pki.material(name)), False, site_for(backend), clock=reactor
    )
    return pump_between(server_factory.buildProtocol(None), factory.buildProtocol(None), reactor)


def test_an_exchange(reactor, client, dev_pki):
    backend = RemoteBackend()
    d = client.send(TARGET, REQUEST)
    connect(reactor, dev_pki, backend)
    response = success_result_of(d)
    assert response.code == 200
    assert response.body == b'{"user": "alice"}'
    assert response.header("content-type") == "application/json"
    assert response.header("x-remote") == "b"
    (request,) = backend.requests
    assert (request.method, request.uri) == (b"POST", b"/federation/brig/get-user")
    assert request.getHeader(b"host") == b"fed.b.example:8443"
    assert request.getHeader(b"wire-origin-domain") == b"a.example"
    assert backend.received == [REQUEST.body]


def test_an_error_status_is_a_response(reactor, client, dev_pki):
    d = client.send(TARGET, REQUEST)
    connect(reactor, dev_pki, RemoteBackend(code=404, body=b'{"label": "not-found"}'))
    response = success_result_of(d)
    assert (response.code, json.loads(response.body)) == (404, {"label": "not-found"})


def test_a_certificate_for_another_name_is_a_tls_error(reactor, client, dev_pki):
    backend = RemoteBackend()
    d = client.send(TARGET, REQUEST)
    connect(reactor, dev_pki, backend, name="fed.c.example")
    assert isinstance(labelled_failure(d, "federation-tls-error"), NotDelivered)
    assert backend.requests == []


def test_connection_refused(reactor, client):
    d = client.send(TARGET, REQUEST)
    reactor.tcpClients[-1][2].clientConnectionFailed(reactor.connectors[-1], Failure(error.ConnectionRefusedError()))
    reactor.advance(1)
    error_ = labelled_failure(d, "federation-connection-refused")
    assert isinstance(error_, NotDelivered)


def test_connect_timeout_is_not_delivered(reactor, client):
    d = client.send(TARGET, REQUEST)
    reactor.tcpClients[-1][2].clientConnectionFailed(reactor.connectors[-1], Failure(error.TimeoutError()))
    reactor.advance(1)
    assert isinstance(labelled_failure(d, "federation-timeout"), NotDelivered)


def test_no_connection_within_the_request_timeout(reactor, client):
    d = client.send(TARGET, REQUEST)
    reactor.advance(29)
    assert_no_result(d)
    reactor.advance(1)
    # the whole budget is spent: no fail-over (a connect timeout, shorter, does fail over)
    assert not isinstance(labelled_failure(d, "federation-timeout"), NotDelivered)


def test_no_answer_after_sending_is_a_timeout_without_fail_over(reactor, client, dev_pki):
    backend = RemoteBackend(finish=False, body=b"")
    d = client.send(TARGET, REQUEST)
    connect(reactor, dev_pki, backend)
    assert len(backend.requests) == 1
    reactor.advance(30)
    error_ = labelled_failure(d, "federation-timeout")
    assert not isinstance(error_, NotDelivered)


def test_a_slow_body_times_out_and_the_connection_is_dropped(reactor, client, dev_pki):
    backend = RemoteBackend(finish=False, body=b'{"partial": ')
    d = client.send(TARGET, REQUEST)
    pump = connect(reactor, dev_pki, backend)
    gone = backend.requests[0].notifyFinish()
    reactor.advance(30)
    labelled_failure(d, "federation-timeout")
    pump.flush()
    failure_result_of(gone, error.ConnectionLost, error.ConnectionDone)


def test_an_answer_over_the_size_limit(reactor, client, dev_pki):
    d = client.send(TARGET, REQUEST)
    connect(reactor, dev_pki, RemoteBackend(body=b"[" + b"1," * 100 + b"1]"))
    assert "larger than [limits] max_body_bytes" in labelled_failure(d, "federation-remote-error").message


def test_an_answer_without_length_that_grows_over_the_limit(reactor, client, dev_pki):
    d = client.send(TARGET, REQUEST)
    connect(reactor, dev_pki, RemoteBackend(finish=False, body=b"x" * 101))
    labelled_failure(d, "federation-remote-error")


def test_close_closes_pooled_connections(reactor, client, dev_pki):
    d = client.send(TARGET, REQUEST)
    pump = connect(reactor, dev_pki, RemoteBackend())
    success_result_of(d)
    (state,) = client.pool._keys.values()
    (connection,) = state.idle
    success_result_of(client.close())
    pump.flush()
    assert connection.lost and not state.idle


@pytest.mark.parametrize(
    "exc, cancelled",
    [
        (defer.CancelledError(), True),
        (error.ConnectingCancelledError(HostnameAddress(b"fed.b.example", 8443)), True),
        (nested(web_client.ResponseNeverReceived, defer.CancelledError()), True),
        (defer.TimeoutError(), False),
        (error.ConnectionRefusedError(), False),
    ],
)
def test_a_cancellation_is_told_from_a_failure(exc, cancelled):
    from fedserver.client import was_cancelled

    assert was_cancelled(Failure(exc)) is cancelled


def test_bounded_turns_any_failure_after_the_deadline_into_a_timeout():
    from fedserver.client import bounded

    clock = Clock()
    d = bounded(Deferred(lambda d: d.errback(error.ConnectingCancelledError(None))), 2, clock)
    clock.advance(2)
    assert failure_result_of(d).check(defer.TimeoutError)
    done = bounded(defer.succeed("answer"), 2, clock)
    assert success_result_of(done) == "answer"
    assert not clock.getDelayedCalls()


def test_a_connection_reset_in_the_middle_of_the_answer(reactor, client, dev_pki):
    """
    The remote sent part of its answer and the connection broke: the request
    may have been handled, so this is not NotDelivered (no other target is
    tried), and the label is federation-connection-refused.
    """
    backend = RemoteBackend(finish=False, body=b'{"user": "al')
    d = client.send(TARGET, REQUEST)
    pump = connect(reactor, dev_pki, backend)
    assert_no_result(d)
    backend.requests[0].channel.transport.abortConnection()  # a reset: no TLS close_notify, no chunk end
    pump.flush()
    error_ = labelled_failure(d, "federation-connection-refused")
    assert not isinstance(error_, NotDelivered)
    assert error_.message.startswith(f"cannot reach {WHERE}: ")
    assert (error_.code, error_.data) == (521, {"type": "federation", "domain": "fed.b.example"})
    assert not any(state.idle for state in client.pool._keys.values())  # the broken connection is not kept
