"""
Tests for the http-forward component (fedserver.builtin.http_forward): the
component's real path, fedserver's own HTTP/1.1 client (L{HTTP11Pool}),
talking to an in-memory twisted.web site that plays the local component.
Nothing reaches the network or the global reactor; time is a clock.
"""

from __future__ import annotations

from typing import Any, List, Optional

import pytest
from twisted.internet import defer, error
from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import capturedLogs
from twisted.protocols import tls as twisted_tls
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from twisted.test import iosim
from twisted.web import resource, server
from zope.interface.verify import verifyObject

from fedserver.builtin import http_forward
from fedserver.builtin.http_forward import HTTPForwardComponent, make_http_forward, service_endpoint
from fedserver.client import was_cancelled
from fedserver.errors import ConfigError, FederationError
from fedserver.http11 import HTTP11Pool
from fedserver.interfaces import IComponentHandler
from fedserver.tls import ClientCertificateServerOptions
from tests.unit.helpers import (
    assert_no_result,
    build_plugin,
    failure_result_of,
    labelled_failure,
    make_call,
    make_context,
    pump_between,
    site_for,
    success_result_of,
)

URL = "http://127.0.0.1:8081"


class Brig(resource.Resource):
    """
    The local component: records each request and answers as told.  With
    C{finish=False} it writes C{body} (chunked, having no length) and never
    ends the answer; with C{content_type=None} its answer has no
    Content-Type.
    """

    isLeaf = True

    def __init__(self, code=200, body=b'{"id": "u1"}', content_type=b"application/json", finish=True):
        super().__init__()
        self.code = code
        self.body = body
        self.content_type = content_type
        self.finish = finish
        self.requests: List[server.Request] = []
        self.bodies: List[bytes] = []
        #: the connection of each request
        self.channels: List[Any] = []

    def render(self, request):
        self.requests.append(request)
        self.channels.append(request.channel)
        self.bodies.append(request.content.read())
        request.setResponseCode(self.code)
        if self.content_type is None:
            request.defaultContentType = None
        else:
            request.setHeader(b"content-type", self.content_type)
        request.setHeader(b"set-cookie", b"session=secret")
        request.setHeader(b"x-internal", b"brig-7")
        if self.finish:
            return self.body
        if self.body:
            request.write(self.body)
        return server.NOT_DONE_YET


class SiteEndpoint:
    """
    An endpoint whose every connection reaches C{site} in memory (an iosim
    pump on C{clock}); with C{fail} set, connecting fails with it instead.
    """

    def __init__(self, site: server.Site, clock: Any, fail: Optional[BaseException] = None) -> None:
        self.site = site
        self.clock = clock
        self.fail = fail
        self.pumps: List[iosim.IOPump] = []

    def connect(self, factory: Any) -> defer.Deferred:
        if self.fail is not None:
            return defer.fail(self.fail)
        client = factory.buildProtocol(None)
        self.pumps.append(pump_between(self.site.buildProtocol(None), client, self.clock))
        return defer.succeed(client)

    def flush(self) -> None:
        """Move the bytes each way until nothing moves."""
        for pump in self.pumps:
            pump.flush()


class Forwarder:
    """An http-forward component for C{brig} at C{url}, its pool on a L{Clock}."""

    def __init__(self, brig: Optional[Brig] = None, *, url: str = URL, timeout: float = 10.0,
                 max_body: int = 1000, fail: Optional[BaseException] = None) -> None:
        self.brig = brig or Brig()
        self.clock = Clock()
        self.pool = HTTP11Pool(self.clock, max_body=max_body)
        self.endpoint = SiteEndpoint(site_for(self.brig), self.clock, fail)
        self.component = HTTPForwardComponent(
            "brig", url, self.pool, lambda: self.endpoint, timeout=timeout, reactor=self.clock
        )

    def forward(self, call: Any = None) -> defer.Deferred:
        """Hand C{call} to the component and let the exchange run."""
        d = self.component.handle(call or make_call(origin_domain="b.example", target_domain="a.example"))
        self.endpoint.flush()
        return d


def forward(brig: Optional[Brig] = None, call: Any = None, **kwargs: Any) -> defer.Deferred:
    """Hand C{call} to an http-forward component in front of C{brig}."""
    return Forwarder(brig, **kwargs).forward(call)


def header(request, name):
    return request.requestHeaders.getRawHeaders(name)


def assert_private(error_, events, detail, url=URL):
    """The peer learns that the component failed; our log learns why and where."""
    assert error_.message == (
        "the component brig is unavailable; the log of this backend has the details under request id req-1"
    )
    assert error_.code == 502
    assert url not in error_.message and "127.0.0.1" not in error_.message
    logged = [e["log_format"].format(**e) for e in events if e.get("log_namespace") == "fedserver.http_forward"]
    assert any(detail in line and url in line and "req-1" in line for line in logged), logged


def forward_logs(events):
    return [e for e in events if e.get("log_namespace") == "fedserver.http_forward"]


def test_provides_icomponenthandler():
    assert verifyObject(IComponentHandler, Forwarder().component)


# the request the component gets


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
    assert (request.method, request.uri, request.clientproto) == (b"POST", b"/federation/get-user", b"HTTP/1.1")
    assert header(request, b"host") == [b"127.0.0.1:8081"]
    assert header(request, b"content-type") == [b"application/json"]
    assert header(request, b"wire-origin-domain") == [b"b.example"]
    assert header(request, b"request-id") == [b"req-42"]
    assert header(request, b"x-wire-api-version") == [b"v6"]
    assert header(request, b"cookie") is None
    assert header(request, b"content-length") == [b"%d" % len(call.body)]
    assert brig.bodies == [call.body]


def test_no_api_version_header_unless_the_peer_sent_one():
    brig = Brig()
    success_result_of(forward(brig))
    assert header(brig.requests[0], b"x-wire-api-version") is None


def test_an_empty_body_is_sent_as_such():
    brig = Brig()
    success_result_of(forward(brig, make_call(body=b"")))
    assert brig.bodies == [b""]
    assert header(brig.requests[0], b"content-length") == [b"0"]


@pytest.mark.parametrize(
    "url, path",
    [
        (URL + "/", b"/federation/get-user"),
        (URL + "/brig", b"/brig/federation/get-user"),
        (URL + "/api/brig/", b"/api/brig/federation/get-user"),
    ],
)
def test_the_path_of_the_url_is_kept_as_a_prefix(url, path):
    brig = Brig()
    success_result_of(forward(brig, url=url))
    assert brig.requests[0].uri == path


# the answer that goes back


def test_only_status_body_and_content_type_come_back():
    response = success_result_of(forward(Brig()))
    assert response.code == 200
    assert response.body == b'{"id": "u1"}'
    assert response.headers == (("Content-Type", "application/json"),)


@pytest.mark.parametrize("code", [400, 404, 500, 503])
def test_an_error_answer_of_the_component_goes_back_as_it_is(code):
    response = success_result_of(forward(Brig(code=code, body=b'{"label": "not-found"}')))
    assert (response.code, response.body) == (code, b'{"label": "not-found"}')
    assert response.headers == (("Content-Type", "application/json"),)


def test_another_content_type_is_kept():
    response = success_result_of(forward(Brig(content_type=b"text/plain; charset=utf-8", body=b"hi")))
    assert response.headers == (("Content-Type", "text/plain; charset=utf-8"),)


def test_an_answer_without_content_type_goes_back_as_json():
    response = success_result_of(forward(Brig(content_type=None)))
    assert response.headers == (("Content-Type", "application/json"),)


def test_a_chunked_answer_is_put_together():
    brig = Brig(finish=False, body=b'{"id": ')
    forwarder = Forwarder(brig)
    d = forwarder.forward()
    assert_no_result(d)
    brig.requests[0].write(b'"u1"}')
    brig.requests[0].finish()
    forwarder.endpoint.flush()
    assert success_result_of(d).body == b'{"id": "u1"}'


# connections


def test_sequential_calls_share_one_connection():
    forwarder = Forwarder()
    for request_id in ("req-1", "req-2"):
        success_result_of(forwarder.forward(make_call(request_id=request_id)))
    assert len(forwarder.endpoint.pumps) == 1
    first, second = forwarder.brig.channels
    assert first is second
    assert [header(r, b"request-id") for r in forwarder.brig.requests] == [[b"req-1"], [b"req-2"]]


def test_concurrent_calls_use_a_connection_each():
    forwarder = Forwarder(Brig(finish=False, body=b""))
    calls = [forwarder.forward(make_call(request_id=f"req-{i}")) for i in (1, 2)]
    assert len(forwarder.endpoint.pumps) == 2
    for request in forwarder.brig.requests:
        request.write(b"{}")
        request.finish()
    forwarder.endpoint.flush()
    assert [success_result_of(d).body for d in calls] == [b"{}", b"{}"]
    # both are idle now: the next call takes one of them
    forwarder.brig.finish = True
    success_result_of(forwarder.forward())
    assert len(forwarder.endpoint.pumps) == 2


def test_a_connection_the_component_closed_is_not_reused():
    forwarder = Forwarder()
    success_result_of(forwarder.forward())
    forwarder.brig.channels[0].transport.loseConnection()
    forwarder.endpoint.flush()
    success_result_of(forwarder.forward())
    assert len(forwarder.endpoint.pumps) == 2


# failures: the peer gets component-unavailable, our log the details


def test_a_component_that_is_down():
    with capturedLogs() as events:
        d = forward(fail=error.ConnectionRefusedError())
    assert_private(labelled_failure(d, "component-unavailable"), events, "Connection was refused")


def test_a_component_that_is_too_slow():
    brig = Brig(finish=False, body=b"")
    forwarder = Forwarder(brig, timeout=10)
    d = forwarder.forward()
    assert len(brig.requests) == 1
    gone = brig.requests[0].notifyFinish()
    forwarder.clock.advance(9.9)
    assert_no_result(d)
    with capturedLogs() as events:
        forwarder.clock.advance(0.1)
    assert_private(labelled_failure(d, "component-unavailable"), events, "no answer within 10 s")
    # the connection is dropped, not kept for another call
    forwarder.endpoint.flush()
    failure_result_of(gone, error.ConnectionLost, error.ConnectionDone)
    brig.finish = True
    success_result_of(forwarder.forward())
    assert len(forwarder.endpoint.pumps) == 2


def test_a_component_that_stops_in_the_middle_of_its_answer_is_too_slow():
    brig = Brig(finish=False, body=b'{"partial": ')
    forwarder = Forwarder(brig, timeout=10)
    d = forwarder.forward()
    assert_no_result(d)
    with capturedLogs() as events:
        forwarder.clock.advance(10)
    assert_private(labelled_failure(d, "component-unavailable"), events, "no answer within 10 s")


def test_a_component_that_closes_the_connection_without_answering():
    brig = Brig(finish=False, body=b"")
    forwarder = Forwarder(brig)
    d = forwarder.forward()
    with capturedLogs() as events:
        brig.requests[0].channel.transport.loseConnection()
        forwarder.endpoint.flush()
    assert_private(labelled_failure(d, "component-unavailable"), events, "the connection closed before the answer")


def test_an_answer_over_the_size_limit():
    with capturedLogs() as events:
        d = forward(Brig(body=b"x" * 1001))
    assert_private(labelled_failure(d, "component-unavailable"), events,
                   "its answer is larger than [limits] max_body_bytes")


def test_an_answer_at_the_size_limit():
    assert success_result_of(forward(Brig(body=b"x" * 1000))).body == b"x" * 1000


def test_a_chunked_answer_that_grows_over_the_size_limit():
    brig = Brig(finish=False, body=b"x" * 600)
    forwarder = Forwarder(brig)
    d = forwarder.forward()
    assert_no_result(d)
    with capturedLogs() as events:
        brig.requests[0].write(b"y" * 600)
        forwarder.endpoint.flush()
    assert_private(labelled_failure(d, "component-unavailable"), events,
                   "its answer is larger than [limits] max_body_bytes")


def test_the_url_named_in_the_log_keeps_its_path():
    with capturedLogs() as events:
        d = forward(url=URL + "/brig/", fail=error.ConnectionRefusedError())
    assert_private(labelled_failure(d, "component-unavailable"), events, "Connection was refused", URL + "/brig")


def test_a_labelled_error_is_passed_on():
    with capturedLogs() as events:
        d = forward(fail=FederationError("no connection to that address", "federation-denied"))
    assert labelled_failure(d, "federation-denied").message == "no connection to that address"
    assert forward_logs(events) == []


def test_a_cancelled_call_stays_cancelled():
    brig = Brig(finish=False, body=b"")
    forwarder = Forwarder(brig)
    d = forwarder.forward()
    gone = brig.requests[0].notifyFinish()
    with capturedLogs() as events:
        d.cancel()
    failure_result_of(d, defer.CancelledError)
    assert forward_logs(events) == []
    # the connection is dropped
    forwarder.endpoint.flush()
    failure_result_of(gone, error.ConnectionLost, error.ConnectionDone)
    # nothing is left to fire later
    forwarder.clock.advance(3600)
    assert not forwarder.clock.getDelayedCalls()


# the factory: [components.brig] through the plugin registry, on a MemoryReactorClock


def build(reactor=None, **values):
    """
    The component that C{[components.brig]} with C{values} configures, and
    the reactor of its context, whose component pool is a real L{HTTP11Pool}.
    """
    reactor = reactor or MemoryReactorClock()
    context = make_context(
        tables={
            "limits": {"component_timeout": 7, "max_body_bytes": 500, "connect_timeout": 3},
            "components": {"brig": {"plugin": "http-forward", **values}},
        },
        reactor=reactor,
    )
    context.component_pool = HTTP11Pool(reactor, max_body=context.config.limits.max_body_bytes)
    component = build_plugin(http_forward, "component", context.config.components["brig"], context)
    return component, reactor


def connect(reactor, site, *, port=8081, tls=None):
    """
    Complete the component's pending connection to C{site} (behind TLS with
    the server options C{tls}) in memory.
    """
    host, port_, factory, timeout, _ = reactor.tcpClients[-1]
    assert (host, port_, timeout) == ("127.0.0.1", port, 3)  # the connect timeout of [limits]
    if tls is not None:
        site = TLSMemoryBIOFactory(tls, False, site, clock=reactor)
    return pump_between(site.buildProtocol(None), factory.buildProtocol(None), reactor)


def test_the_hook_registers_http_forward():
    assert http_forward.fedserver_component_plugins() == {"http-forward": make_http_forward}


def test_make_http_forward_takes_defaults_from_limits():
    component, reactor = build(url="https://brig.local:8443/base")
    assert (component.name, component.url) == ("brig", "https://brig.local:8443/base")
    assert component.timeout == 7.0
    assert component.reactor is reactor


def test_make_http_forward_with_its_own_timeout():
    component, _ = build(url=URL, timeout=2)
    assert component.timeout == 2.0


def test_a_built_component_forwards_through_the_context_pool():
    component, reactor = build(url=URL + "/base")
    brig = Brig()
    d = component.handle(make_call(request_id="req-1"))
    pump = connect(reactor, site_for(brig))
    response = success_result_of(d)
    assert (response.code, response.body) == (200, b'{"id": "u1"}')
    assert response.headers == (("Content-Type", "application/json"),)
    (request,) = brig.requests
    assert (request.method, request.uri) == (b"POST", b"/base/federation/get-user")
    assert header(request, b"host") == [b"127.0.0.1:8081"]
    assert not brig.channels[0].isSecure()
    # the next call takes the same connection
    d = component.handle(make_call(request_id="req-2"))
    pump.flush()
    success_result_of(d)
    assert len(reactor.tcpClients) == 1
    assert [header(r, b"request-id") for r in brig.requests] == [[b"req-1"], [b"req-2"]]


def test_a_built_component_that_is_down():
    component, reactor = build(url=URL)
    d = component.handle(make_call())
    host, port, factory, _, _ = reactor.tcpClients[0]
    assert (host, port) == ("127.0.0.1", 8081)
    with capturedLogs() as events:
        factory.clientConnectionFailed(reactor.connectors[0], Failure(error.ConnectionRefusedError()))
        reactor.advance(1)
    assert_private(labelled_failure(d, "component-unavailable"), events, "Connection was refused")


def test_a_built_component_not_connected_within_its_timeout():
    component, reactor = build(url=URL)
    d = component.handle(make_call())
    reactor.advance(6.9)
    assert_no_result(d)
    with capturedLogs() as events:
        reactor.advance(0.1)
    assert_private(labelled_failure(d, "component-unavailable"), events, "no answer within 7.0 s")


def test_a_built_component_cancelled_while_connecting_stays_cancelled():
    component, reactor = build(url=URL)
    d = component.handle(make_call())
    with capturedLogs() as events:
        d.cancel()
    assert was_cancelled(failure_result_of(d))
    assert forward_logs(events) == []
    assert reactor.connectors[0].stoppedConnecting


def test_a_built_component_refuses_answers_over_limits_max_body_bytes():
    component, reactor = build(url=URL)
    d = component.handle(make_call())
    with capturedLogs() as events:
        connect(reactor, site_for(Brig(body=b"x" * 501)))
    assert_private(labelled_failure(d, "component-unavailable"), events,
                   "its answer is larger than [limits] max_body_bytes")


@pytest.mark.parametrize(
    "url, port",
    [("http://brig.local", 80), ("http://brig.local:8081/base", 8081)],
)
def test_the_endpoint_of_an_http_url_is_plain_tcp(url, port):
    reactor = MemoryReactorClock()
    endpoint = service_endpoint(reactor, url, 3)()
    assert isinstance(endpoint, HostnameEndpoint)
    endpoint.connect(Factory.forProtocol(Protocol))
    (host, port_, _, timeout, _), = reactor.tcpClients
    assert (host, port_, timeout) == ("127.0.0.1", port, 3)  # the memory reactor resolves any name so


@pytest.mark.parametrize(
    "url, port",
    [("https://brig.local", 443), ("https://brig.local:8443/base", 8443)],
)
def test_the_endpoint_of_an_https_url_is_tls_over_tcp(url, port):
    reactor = MemoryReactorClock()
    endpoint = service_endpoint(reactor, url, 3)()
    assert not isinstance(endpoint, HostnameEndpoint)  # wrapped: TLS over the TCP endpoint
    endpoint.connect(Factory.forProtocol(Protocol))
    (host, port_, _, timeout, _), = reactor.tcpClients
    assert (host, port_, timeout) == ("127.0.0.1", port, 3)


@pytest.fixture
def trusted_ca(dev_pki, monkeypatch):
    """The dev CA in the platform's trust store, as OpenSSL finds it."""
    monkeypatch.setenv("SSL_CERT_FILE", dev_pki.ca_path)
    return dev_pki


def test_an_https_component_is_reached_over_tls(trusted_ca):
    component, reactor = build(url="https://brig.local:8443")
    brig = Brig()
    d = component.handle(make_call())
    connect(reactor, site_for(brig), port=8443, tls=ClientCertificateServerOptions(trusted_ca.material("brig.local")))
    assert success_result_of(d).body == b'{"id": "u1"}'
    (request,) = brig.requests
    assert brig.channels[0].isSecure()
    assert header(request, b"host") == [b"brig.local:8443"]


def test_an_https_component_whose_certificate_names_another_host_is_unavailable(trusted_ca):
    component, reactor = build(url="https://brig.local:8443")
    brig = Brig()
    d = component.handle(make_call())
    with capturedLogs() as events:
        connect(reactor, site_for(brig), port=8443,
                tls=ClientCertificateServerOptions(trusted_ca.material("galley.local")))
    assert_private(labelled_failure(d, "component-unavailable"), events, "DNSMismatch", "https://brig.local:8443")
    assert brig.requests == []


def test_an_https_component_whose_certificate_we_do_not_trust_is_unavailable(dev_pki, other_pki, monkeypatch):
    monkeypatch.setenv("SSL_CERT_FILE", other_pki.ca_path)
    component, reactor = build(url="https://brig.local:8443")
    brig = Brig()
    d = component.handle(make_call())
    with capturedLogs() as events:
        connect(reactor, site_for(brig), port=8443, tls=ClientCertificateServerOptions(dev_pki.material("brig.local")))
    assert_private(labelled_failure(d, "component-unavailable"), events, "certificate verify failed",
                   "https://brig.local:8443")
    assert brig.requests == []


def test_the_tls_layer_of_an_https_component_runs_on_its_reactor(trusted_ca, monkeypatch):
    global_reactor = Clock()  # stands for the global reactor, which a test never runs
    monkeypatch.setattr(twisted_tls, "_get_default_clock", lambda: global_reactor)
    component, reactor = build(url="https://brig.local:8443")
    d = component.handle(make_call())
    connect(reactor, site_for(Brig()), port=8443, tls=ClientCertificateServerOptions(trusted_ca.material("brig.local")))
    assert not global_reactor.getDelayedCalls()
    success_result_of(d)


@pytest.mark.parametrize(
    "values, expected",
    [
        ({}, r"\[components.brig\] url: is required"),
        ({"url": 8081}, r"\[components.brig\] url: "),
        ({"url": "ftp://x"}, r"url: must be an http:// or https:// URL without query"),
        ({"url": "127.0.0.1:8081"}, r"url: must be an http:// or https:// URL"),
        ({"url": "http://x/?a=1"}, r"url: must be an http"),
        ({"url": "http://x/#top"}, r"url: must be an http"),
        ({"url": "http:///path"}, r"url: must be an http"),
        ({"url": "http://x:99999"}, r"url: 'http://x:99999' is not a valid URL"),
        ({"url": "http://x:port"}, r"url: 'http://x:port' is not a valid URL"),
        ({"url": URL, "timeout": 0}, r"timeout: must be at least 0.1"),
        ({"url": URL, "timeout": 3601}, r"timeout: must be at most 3600"),
        ({"url": URL, "timeout": "fast"}, r"\[components.brig\] timeout: "),
        ({"url": URL, "timout": 1}, r"timout: is not a known option here"),
    ],
)
def test_make_http_forward_refuses_bad_options(values, expected):
    with pytest.raises(ConfigError, match=expected):
        build(**values)


@pytest.mark.parametrize("url", ["http://brig", "https://brig.local:8443/x/", "http://[::1]:8081", "HTTP://brig"])
def test_make_http_forward_accepts_good_urls(url):
    component, _ = build(url=url)
    assert component.url == url.rstrip("/")


@pytest.mark.parametrize(
    "url, expected",
    [
        ("http://user:pw@127.0.0.1:8081", "must not carry credentials"),
        ("http://127.0.0.1:8081/a b", "must be ASCII without spaces"),
        ("http://brig.example/b\u00e4se", "must be ASCII without spaces"),
        ("http://br\u00efg.example", "must be ASCII without spaces"),
    ],
)
def test_urls_that_cannot_be_sent_as_they_are_are_refused(url, expected):
    with pytest.raises(ConfigError, match=expected):
        build(url=url)
