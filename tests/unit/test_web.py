"""
Tests for fedserver.web: the body limit of L{FederationSite}, L{serve} and the
listener root, driven through an HTTP channel over an in-memory transport.
"""

from __future__ import annotations

import io
import tempfile
from typing import Any, List

import pytest
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.logger import capturedLogs
from twisted.web import resource, server
from twisted.web.test.requesthelper import DummyRequest

from fedserver.errors import FederationError
from fedserver.values import Response
from fedserver.web import (
    ErrorResource,
    FederationSite,
    ListenerRoot,
    body_of,
    request_id_from,
    require_post,
    serve,
    write_response,
)
from tests.unit.helpers import HTTPConnection, json_response, site_for


class Echo(resource.Resource):
    """Answers with the body it received."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.bodies: List[bytes] = []

    def render_POST(self, request):
        self.bodies.append(request.content.getvalue())
        return request.content.getvalue()


def connection(root=None, max_body_bytes=1000):
    root = root if root is not None else Echo()
    return HTTPConnection.to(site_for(root, max_body_bytes=max_body_bytes)), root


def assert_too_large(conn):
    answer = conn.answer()
    assert answer.code == 413
    assert answer.header("connection") == "close"
    assert answer.json()["label"] == "request-too-large"
    assert answer.json()["code"] == 413
    assert conn.transport.disconnecting
    return answer.json()["message"]


# the body limit


def test_a_body_within_the_limit_is_read():
    conn, echo = connection()
    conn.request(b"POST", b"/", b"x" * 1000)
    assert conn.answer().code == 200
    assert echo.bodies == [b"x" * 1000]


def test_a_declared_length_over_the_limit_is_refused_before_the_body():
    conn, echo = connection()
    conn.send(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 2000\r\n\r\n")
    message = assert_too_large(conn)
    assert message == (
        "the request body has 2000 bytes, more than the limit of 1000 bytes ([limits] max_body_bytes)"
    )
    answered = conn.transport.value()
    conn.send(b"x" * 2000)
    assert conn.transport.value() == answered
    assert echo.bodies == []


def test_expect_continue_with_a_length_over_the_limit_gets_only_the_413():
    conn, echo = connection()
    conn.send(b"POST / HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 2000\r\n\r\n")
    assert_too_large(conn)
    assert b"100 Continue" not in conn.transport.value()
    conn.send(b"x" * 2000)
    assert echo.bodies == []


def test_a_chunked_body_that_grows_over_the_limit():
    conn, echo = connection()
    conn.send(b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
    conn.send(b"258\r\n" + b"x" * 600 + b"\r\n")
    assert conn.transport.value() == b""
    conn.send(b"258\r\n" + b"y" * 600 + b"\r\n")
    message = assert_too_large(conn)
    assert message.startswith("the request body has more bytes than the limit of 1000 bytes")
    conn.send(b"0\r\n\r\n")
    assert echo.bodies == []


def test_a_chunked_body_within_the_limit():
    conn, echo = connection()
    conn.send(b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n")
    assert conn.answer().body == b"abcde"
    assert echo.bodies == [b"abcde"]


def test_an_exception_in_a_resource_shows_no_traceback():
    class Broken(resource.Resource):
        isLeaf = True

        def render(self, request):
            raise RuntimeError("secret detail")

    conn, _ = connection(Broken())
    with capturedLogs():
        conn.request(b"POST", b"/")
    assert b"secret detail" not in conn.transport.value()
    assert conn.transport.value().startswith(b"HTTP/1.1 500")


# body_of


def test_body_of_reads_memory_and_files():
    request = DummyRequest([b""])
    request.content = io.BytesIO(b"abc")
    assert body_of(request, 3) == b"abc"
    with tempfile.TemporaryFile() as f:
        f.write(b"x" * 10)
        request.content = f
        assert body_of(request, 10) == b"x" * 10
        with pytest.raises(FederationError) as info:
            body_of(request, 9)
    assert info.value.label == "request-too-large"


# request shape helpers


@pytest.mark.parametrize("value", [b"abc-123", b"a.b:c@d/e+f=g_h", b"x" * 128])
def test_request_id_is_kept_when_sane(value):
    request = DummyRequest([b""])
    request.requestHeaders.addRawHeader(b"request-id", value)
    assert request_id_from(request, b"request-id") == value.decode()


@pytest.mark.parametrize("value", [None, b"", b"has space", b"x" * 129, b"caf\xc3\xa9", b"a\tb"])
def test_request_id_is_made_up_otherwise(value):
    request = DummyRequest([b""])
    if value is not None:
        request.requestHeaders.addRawHeader(b"request-id", value)
    made_up = request_id_from(request, b"request-id")
    assert len(made_up) == 36 and made_up.count("-") == 4
    assert made_up != request_id_from(request, b"request-id")


def test_require_post():
    request = DummyRequest([b""])
    request.method = b"POST"
    request.uri = b"/federation/brig/x"
    require_post(request)
    request.uri = b"/federation/brig/x?debug=1"
    with pytest.raises(FederationError, match="no query string"):
        require_post(request)
    request.method = b"GET"
    with pytest.raises(FederationError, match="only POST is accepted here, not GET") as info:
        require_post(request)
    assert info.value.label == "invalid-endpoint"


# writing answers


def dummy_request() -> DummyRequest:
    """A L{DummyRequest} with the attribute a connected L{server.Request} has."""
    request = DummyRequest([b""])
    request._disconnected = False
    return request


def rendered(response: Response, only=None) -> DummyRequest:
    request = dummy_request()
    write_response(request, response, only=only)
    return request


def test_write_response_with_every_header():
    request = rendered(Response(201, [("Content-Type", "text/plain"), ("X-A", "1")], b"done"))
    assert request.responseCode == 201
    assert request.responseHeaders.getRawHeaders(b"x-a") == [b"1"]
    assert request.responseHeaders.getRawHeaders(b"content-length") == [b"4"]
    assert b"".join(request.written) == b"done"
    assert request.finished


def test_write_response_with_only_some_headers():
    response = Response(200, [("Content-Type", "text/plain"), ("Set-Cookie", "s")], b"")
    request = rendered(response, only=("content-type",))
    assert request.responseHeaders.getRawHeaders(b"set-cookie") is None
    assert request.responseHeaders.getRawHeaders(b"content-type") == [b"text/plain"]


def test_write_response_after_the_client_left_writes_nothing():
    request = dummy_request()
    request._disconnected = True
    write_response(request, Response(200, [], b"late"))
    assert request.written == [] and not request.finished


# serve


class Serving(resource.Resource):
    """Serves each request with C{work} through L{serve}."""

    isLeaf = True

    def __init__(self, work, **kwargs: Any) -> None:
        super().__init__()
        self.work = work
        self.kwargs = kwargs

    def render(self, request):
        return serve(request, self.work, describe="test", request_id="req-7", **self.kwargs)


def served(work, **kwargs):
    conn, _ = connection(Serving(work, **kwargs))
    with capturedLogs() as events:
        conn.request(b"POST", b"/")
    return conn, events


def test_serve_sends_the_response():
    answer = Response(202, [("Content-Type", "application/json"), ("X-Secret", "s")], b"{}")
    conn, events = served(lambda: defer.succeed(answer), only=("content-type",))
    result = conn.answer()
    assert (result.code, result.body) == (202, b"{}")
    assert result.header("x-secret") is None
    assert any("test -> 202" in e["log_format"].format(**e) for e in events if "describe" in e)


def test_serve_sends_a_labelled_error():
    conn, _ = served(lambda: defer.fail(FederationError("denied", "federation-denied")))
    assert conn.answer().json() == {"code": 400, "label": "federation-denied", "message": "denied"}


def test_serve_lets_the_caller_add_context():
    def add_data(error):
        error.data = {"domain": "b.example"}
        return error

    conn, _ = served(lambda: defer.fail(FederationError("x", "discovery-failure")), on_error=add_data)
    assert conn.answer().json()["data"] == {"domain": "b.example"}


@pytest.mark.parametrize("synchronous", [True, False])
def test_serve_hides_unexpected_exceptions(synchronous):
    def work():
        if synchronous:
            raise KeyError("secret detail")
        return defer.fail(KeyError("secret detail"))

    conn, events = served(work)
    answer = conn.answer()
    assert answer.code == 500
    assert answer.json() == {
        "code": 500,
        "label": "internal-error",
        "message": "internal error; the server log has the details under request id req-7",
    }
    assert b"secret" not in conn.transport.value() and b"Traceback" not in conn.transport.value()
    (logged,) = [e["log_failure"].value for e in events if "log_failure" in e]
    assert logged.args == ("secret detail",)


def test_serve_cancels_the_work_when_the_client_goes_away():
    pending: Deferred = Deferred()
    conn, _ = served(lambda: pending)
    assert conn.transport.value() == b""
    with capturedLogs():
        conn.close()
    assert pending.called
    assert conn.transport.value() == b""


def test_work_that_finishes_after_the_client_went_away_writes_nothing():
    uncancellable: Deferred = Deferred(lambda d: d.callback(json_response(200, {})))
    conn, _ = served(lambda: uncancellable)
    with capturedLogs():
        conn.close()
    assert uncancellable.called
    assert conn.transport.value() == b""


# the listener root


def test_listener_root_serves_mounted_children_only():
    root = ListenerRoot("inward listener")
    echo = Echo()
    root.mount(b"echo", echo)
    conn, _ = connection(root)
    conn.request(b"POST", b"/echo", b"hi")
    assert conn.answer().body == b"hi"
    for path in (b"/", b"/other", b"/other/deeper"):
        conn, _ = connection(root)
        conn.request(b"POST", path)
        answer = conn.answer()
        assert (answer.code, answer.json()["label"]) == (403, "invalid-endpoint")
        assert answer.json()["message"] == "the inward listener serves no such path"


def test_a_segment_is_mounted_once():
    root = ListenerRoot("outward listener")
    root.mount(b"rpc", Echo())
    with pytest.raises(ValueError, match="/rpc is mounted twice on the outward listener"):
        root.mount(b"rpc", Echo())


def test_error_resource():
    request = DummyRequest([b""])
    request.path = b"/nowhere"
    assert ErrorResource(FederationError("gone", "invalid-endpoint")).render(request) == server.NOT_DONE_YET
    assert request.responseCode == 403
    assert b"".join(request.written) == b'{"code": 403, "label": "invalid-endpoint", "message": "gone"}'
    assert request.finished


@pytest.mark.parametrize("answer", [{"not": "a Response"}, Response(200, [], "text, not bytes")])
def test_serve_answers_a_malformed_component_answer_as_internal_error(answer):
    conn, events = served(lambda: defer.succeed(answer))
    assert conn.answer().labelled(500, "internal-error")
    assert any("log_failure" in e for e in events)


def test_serve_gives_up_after_the_deadline():
    clock = Clock()
    pending: Deferred = Deferred()
    conn, _ = served(lambda: pending, deadline=3.0, clock=clock)
    clock.advance(2.9)
    assert conn.transport.value() == b""
    with capturedLogs():
        clock.advance(0.2)
    body = conn.answer().labelled(504, "federation-timeout")
    assert "within 3.0 s" in body["message"]


def test_answers_name_no_software_version():
    conn, _ = served(lambda: defer.succeed(Response(200, [], b"{}")))
    assert conn.answer().header("server") == "fedserver"


def test_a_form_encoded_body_stays_a_body_and_the_content_type_is_kept():
    seen = {}

    class Look(resource.Resource):
        isLeaf = True

        def render(self, request):
            seen["args"] = dict(request.args)
            seen["content-type"] = request.getHeader(b"content-type")
            seen["body"] = request.content.getvalue()
            return b"{}"

    conn, _ = connection(Look())
    conn.request(b"POST", b"/x", body=b"handle=alice",
                 headers=[(b"Content-Type", b"application/x-www-form-urlencoded")])
    assert conn.answer().code == 200
    assert seen == {"args": {}, "content-type": b"application/x-www-form-urlencoded", "body": b"handle=alice"}


# slow peers: the header and body deadlines of FederationChannel


def slow_site(root=None, *, header_timeout=10.0, body_timeout=60.0, idle_timeout=60.0):
    """A site with all three timeouts on a L{Clock}; returns the connection, the root and the clock."""
    root = root if root is not None else Echo()
    clock = Clock()
    site = FederationSite(root, max_body_bytes=1000, reactor=clock, timeout=idle_timeout,
                          header_timeout=header_timeout, body_timeout=body_timeout)
    return HTTPConnection.to(site), root, clock


def trickle(conn, clock, data, every):
    """Send C{data} a byte at a time, C{every} seconds apart, while the connection lasts."""
    for i in range(len(data)):
        if conn.transport.disconnected:
            return
        conn.send(data[i:i + 1])
        clock.advance(every)


HEAD = b"POST /x HTTP/1.1\r\nHost: b\r\nContent-Length: 5\r\nX-Padding: " + b"p" * 40 + b"\r\n\r\n"


def test_headers_trickling_in_are_cut_off_at_the_header_deadline():
    conn, root, clock = slow_site()
    with capturedLogs() as events:
        # a byte every 2 s: the idle timeout (60 s) never fires, the header deadline does
        trickle(conn, clock, HEAD, every=2.0)
    assert conn.transport.disconnected
    assert conn.transport.value() == b""  # nothing is answered: nothing was dispatched
    assert root.bodies == []
    assert clock.seconds() == 10.0  # 10 s after the first byte, though bytes kept coming
    (line,) = [e for e in events if e.get("key") == "header_timeout"]
    assert line["log_namespace"] == "fedserver.web"
    assert line["what"] == "the request line and headers" and line["seconds"] == 10.0
    assert line["peer"] == "127.0.0.1:40000"


def test_a_request_line_alone_trickling_in_is_cut_off_too():
    # no Request exists before the request line ends: the deadline is the channel's
    conn, _, clock = slow_site(header_timeout=3.0)
    with capturedLogs():
        trickle(conn, clock, b"POST /" + b"a" * 100, every=0.5)
    assert conn.transport.disconnected and clock.seconds() == 3.0


def test_headers_in_time_leave_no_deadline_behind():
    conn, root, clock = slow_site()
    trickle(conn, clock, HEAD, every=0.1)
    conn.send(b"hello")
    assert conn.answer().body == b"hello"
    assert root.bodies == [b"hello"]
    clock.advance(59)  # only the idle timeout is left, and it starts anew after the answer
    assert not conn.transport.disconnected and not conn.transport.disconnecting


def test_a_body_trickling_in_is_cut_off_at_the_body_deadline():
    conn, root, clock = slow_site(body_timeout=20.0)
    conn.send(b"POST /x HTTP/1.1\r\nHost: b\r\nContent-Length: 100\r\n\r\n")
    with capturedLogs() as events:
        trickle(conn, clock, b"x" * 100, every=1.0)
    assert conn.transport.disconnected and clock.seconds() == 20.0
    assert root.bodies == [] and conn.transport.value() == b""
    (line,) = [e for e in events if e.get("key") == "body_timeout"]
    assert line["what"] == "the request body"


def test_a_chunked_body_trickling_in_is_cut_off_at_the_body_deadline():
    conn, root, clock = slow_site(body_timeout=5.0)
    conn.send(b"POST /x HTTP/1.1\r\nHost: b\r\nTransfer-Encoding: chunked\r\n\r\n")
    with capturedLogs():
        trickle(conn, clock, b"1\r\nx\r\n" * 20 + b"0\r\n\r\n", every=0.5)
    assert conn.transport.disconnected and clock.seconds() == 5.0
    assert root.bodies == []


def test_a_body_in_time_is_answered():
    conn, _, clock = slow_site(body_timeout=5.0)
    conn.send(b"POST /x HTTP/1.1\r\nHost: b\r\nContent-Length: 4\r\n\r\n")
    trickle(conn, clock, b"abcd", every=1.0)
    assert conn.answer().body == b"abcd"
    clock.advance(10)
    assert not conn.transport.disconnected


def test_each_request_of_a_kept_alive_connection_has_its_own_header_deadline():
    conn, root, clock = slow_site(header_timeout=3.0)
    conn.request(b"POST", b"/x", b"one")
    clock.advance(50)  # idle between requests: only the idle timeout (60 s) counts here
    assert not conn.transport.disconnected
    with capturedLogs():
        trickle(conn, clock, HEAD, every=1.0)
    assert root.bodies == [b"one"]
    assert conn.transport.disconnected and clock.seconds() == 53.0


def test_a_partial_next_request_sent_while_one_is_answered_gets_the_deadline():
    pending: List[Deferred] = []

    class Slow(resource.Resource):
        isLeaf = True

        def render_POST(self, request):
            d: Deferred = Deferred()
            d.addCallback(lambda _: (request.write(b"done"), request.finish()))
            pending.append(d)
            return server.NOT_DONE_YET

    conn, _, clock = slow_site(Slow(), header_timeout=3.0)
    conn.send(b"POST /x HTTP/1.1\r\nHost: b\r\nContent-Length: 0\r\n\r\nPOST /x HTT")
    clock.advance(30)  # answering takes long; the half request waits, with no deadline yet
    assert not conn.transport.disconnected
    pending[0].callback(None)
    clock.advance(2.9)
    assert not conn.transport.disconnected
    with capturedLogs():
        clock.advance(0.1)
    assert conn.transport.disconnected


def test_a_refused_body_starts_no_body_deadline():
    conn, _, clock = slow_site(body_timeout=1.0)
    with capturedLogs():
        conn.send(b"POST /x HTTP/1.1\r\nHost: b\r\nContent-Length: 5000\r\n\r\n")
    assert conn.answer().code == 413
    # the refusal closes the connection itself (and cuts it after 2 s), not the body deadline
    with capturedLogs() as events:
        clock.advance(1.5)
    assert not [e for e in events if e.get("key") == "body_timeout"]


def test_without_deadlines_only_the_idle_timeout_counts():
    conn, _, clock = slow_site(header_timeout=None, body_timeout=None)
    trickle(conn, clock, HEAD[:30], every=30.0)
    assert not conn.transport.disconnected


def test_the_connection_lost_cancels_the_deadline():
    conn, _, clock = slow_site()
    conn.send(b"POST /x HT")
    conn.close()
    assert clock.getDelayedCalls() == [] or all(not c.active() for c in clock.getDelayedCalls())
