"""Tests for the http-forward component (fedserver.builtin.http_forward)."""

from __future__ import annotations

from typing import List

import pytest
from treq.client import HTTPClient
from treq.testing import StubTreq
from twisted.internet import defer, error
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import capturedLogs
from twisted.python.failure import Failure
from twisted.web import resource, server
from twisted.web.client import Agent
from zope.interface.verify import verifyObject

from fedserver.builtin import http_forward
from fedserver.builtin.http_forward import HTTPForwardComponent, make_http_forward
from fedserver.errors import ConfigError, FederationError
from fedserver.interfaces import IComponentHandler
from tests.unit.helpers import (
    assert_no_result,
    build_plugin,
    labelled_failure,
    make_call,
    make_context,
    success_result_of,
)

URL = "http://127.0.0.1:8081"


class Brig(resource.Resource):
    """The local component: records each request and answers as told."""

    isLeaf = True

    def __init__(self, code=200, body=b'{"id": "u1"}', content_type=b"application/json", finish=True):
        super().__init__()
        self.code = code
        self.body = body
        self.content_type = content_type
        self.finish = finish
        self.requests: List[server.Request] = []
        self.bodies: List[bytes] = []

    def render(self, request):
        self.requests.append(request)
        self.bodies.append(request.content.read())
        request.setResponseCode(self.code)
        request.setHeader(b"content-type", self.content_type)
        request.setHeader(b"set-cookie", b"session=secret")
        request.setHeader(b"x-internal", b"brig-7")
        if not self.finish:
            return server.NOT_DONE_YET
        return self.body


def forwarder(http, *, reactor=None, url=URL, timeout=10.0, max_body_bytes=1000):
    return HTTPForwardComponent(
        "brig", url, http, timeout=timeout, max_body_bytes=max_body_bytes, reactor=reactor or Clock()
    )


def forward(brig, call=None, **kwargs):
    """Hand C{call} to an http-forward component in front of C{brig}."""
    stub = StubTreq(brig)
    d = forwarder(stub, **kwargs).handle(call or make_call(origin_domain="b.example", target_domain="a.example"))
    stub.flush()
    return d


def header(request, name):
    return request.requestHeaders.getRawHeaders(name)


def test_provides_icomponenthandler():
    assert verifyObject(IComponentHandler, forwarder(StubTreq(Brig())))


def test_the_call_becomes_a_post_to_federation_rpc():
    brig = Brig()
    call = make_call(
        origin_domain="b.example",
        target_domain="a.example",
        headers=[("X-Wire-API-Version", "v6"), ("Cookie", "c"), ("Wire-Origin-Domain", "forged.example")],
        request_id="req-42",
    )
    success_result_of(forward(brig, call))
    (request,) = brig.requests
    assert (request.method, request.path) == (b"POST", b"/federation/get-user")
    assert header(request, b"content-type") == [b"application/json"]
    assert header(request, b"wire-origin-domain") == [b"b.example"]
    assert header(request, b"request-id") == [b"req-42"]
    assert header(request, b"x-wire-api-version") == [b"v6"]
    assert header(request, b"cookie") is None
    assert brig.bodies == [call.body]


def test_no_api_version_header_unless_the_peer_sent_one():
    brig = Brig()
    success_result_of(forward(brig))
    assert header(brig.requests[0], b"x-wire-api-version") is None


def test_a_trailing_slash_in_the_url():
    brig = Brig()
    success_result_of(forward(brig, url=URL + "/"))
    assert brig.requests[0].path == b"/federation/get-user"


def test_only_status_body_and_content_type_come_back():
    response = success_result_of(forward(Brig()))
    assert response.code == 200
    assert response.body == b'{"id": "u1"}'
    assert response.headers == (("Content-Type", "application/json"),)


def test_an_error_answer_of_the_component_goes_back_as_it_is():
    response = success_result_of(forward(Brig(code=404, body=b'{"label": "not-found"}')))
    assert (response.code, response.body) == (404, b'{"label": "not-found"}')


def test_another_content_type_is_kept():
    response = success_result_of(forward(Brig(content_type=b"text/plain; charset=utf-8", body=b"hi")))
    assert response.headers == (("Content-Type", "text/plain; charset=utf-8"),)


def test_a_component_that_is_too_slow():
    clock = Clock()
    brig = Brig(finish=False)
    d = forward(brig, reactor=clock, timeout=10)
    assert len(brig.requests) == 1
    clock.advance(9.9)
    assert_no_result(d)
    with capturedLogs() as events:
        clock.advance(0.1)
    error_ = labelled_failure(d, "component-unavailable")
    assert error_.code == 502
    assert_private(error_, events, "no answer within 10 s")


def test_a_component_that_is_down():
    reactor = MemoryReactorClock()
    http = HTTPClient(Agent(reactor))
    d = forwarder(http, reactor=reactor).handle(make_call())
    host, port, factory, _, _ = reactor.tcpClients[0]
    assert (host, port) == ("127.0.0.1", 8081)
    with capturedLogs() as events:
        factory.clientConnectionFailed(reactor.connectors[0], Failure(error.ConnectionRefusedError()))
        reactor.advance(1)
    assert_private(labelled_failure(d, "component-unavailable"), events, "Connection was refused")


def test_an_answer_over_the_size_limit():
    with capturedLogs() as events:
        d = forward(Brig(body=b"x" * 1001))
    assert_private(labelled_failure(d, "component-unavailable"), events,
                   "its answer is larger than [limits] max_body_bytes")


def assert_private(error_, events, detail):
    """The peer learns that the component failed; our log learns why and where."""
    assert error_.message == (
        "the component brig is unavailable; the log of this backend has the details under request id req-1"
    )
    assert URL not in error_.message
    logged = [e["log_format"].format(**e) for e in events if e.get("log_namespace") == "fedserver.http_forward"]
    assert any(detail in line and URL in line and "req-1" in line for line in logged), logged


class Labelled:
    """A treq-like client whose post fails with a labelled error."""

    def post(self, url, data, headers):
        return defer.fail(FederationError("x", "federation-denied"))


def test_a_labelled_error_is_passed_on():
    labelled_failure(forwarder(Labelled()).handle(make_call()), "federation-denied")


# the factory


def build(**values):
    """The component that C{[components.brig]} with C{values} configures."""
    reactor, http = Clock(), StubTreq(Brig())
    context = make_context(
        tables={
            "limits": {"component_timeout": 7, "max_body_bytes": 500},
            "components": {"brig": {"plugin": "http-forward", **values}},
        },
        reactor=reactor,
        http=http,
    )
    component = build_plugin(http_forward, "component", context.config.components["brig"], context)
    return component, reactor, http


def test_the_hook_registers_http_forward():
    assert http_forward.fedserver_component_plugins() == {"http-forward": make_http_forward}


def test_make_http_forward_takes_defaults_from_limits():
    component, reactor, http = build(url="https://brig.local:8443/base")
    assert (component.name, component.url) == ("brig", "https://brig.local:8443/base")
    assert (component.timeout, component.max_body_bytes) == (7.0, 500)
    assert component.http is http and component.reactor is reactor


def test_make_http_forward_with_its_own_timeout():
    component, _, _ = build(url=URL, timeout=2)
    assert component.timeout == 2.0


@pytest.mark.parametrize(
    "values, expected",
    [
        ({}, r"\[components.brig\] url: is required"),
        ({"url": "ftp://x"}, r"url: must be an http:// or https:// URL without query"),
        ({"url": "http://x/?a=1"}, r"url: must be an http"),
        ({"url": "http:///path"}, r"url: must be an http"),
        ({"url": URL, "timeout": 0}, r"timeout: must be at least 0.1"),
        ({"url": URL, "timout": 1}, r"timout: is not a known option here"),
    ],
)
def test_make_http_forward_refuses_bad_options(values, expected):
    with pytest.raises(ConfigError, match=expected):
        build(**values)
