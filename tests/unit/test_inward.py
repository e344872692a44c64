"""
Tests for fedserver.inward: C{POST /federation/{component}/{rpc}} through a
real site and HTTP channel, with a pipeline of fakes behind it.
"""

from __future__ import annotations

import pytest
from twisted.logger import capturedLogs
from twisted.web.test.requesthelper import DummyRequest

from fedserver.builtin.mtls import MutualTLSAuthenticator
from fedserver.errors import AuthenticationFailure, DiscoveryFailure, FederationError
from fedserver.inward import InwardFederationResource, parse_route
from fedserver.values import Peer, Response
from fedserver.web import ListenerRoot
from tests.unit.helpers import HTTPConnection, make_rig, site_for, target

ORIGIN = (b"Wire-Origin-Domain", b"b.example")
JSON = (b"Content-Type", b"application/json")


def inward(rig, *, max_body_bytes=1000):
    root = ListenerRoot("inward listener")
    root.mount(b"federation", InwardFederationResource(rig.pipeline, max_body_bytes=max_body_bytes))
    return HTTPConnection.to(site_for(root, max_body_bytes=max_body_bytes))


def post(rig, path=b"/federation/brig/get-user", body=b"{}", headers=(ORIGIN, JSON), method=b"POST"):
    """The answer to one request on the inward listener of C{rig}."""
    conn = inward(rig)
    with capturedLogs():
        conn.request(method, path, body, headers)
    return conn.answer()


def test_a_call_reaches_the_component_and_its_answer_comes_back():
    answer = Response(201, [("Content-Type", "application/json"), ("Set-Cookie", "s"), ("X-Brig", "7")], b'{"id": 1}')
    rig = make_rig(answer=answer)
    result = post(rig, headers=(ORIGIN, JSON, (b"Request-Id", b"abc-1"), (b"X-Wire-API-Version", b"v6")))
    assert (result.code, result.body) == (201, b'{"id": 1}')
    assert result.header("content-type") == "application/json"
    assert result.header("set-cookie") is None and result.header("x-brig") is None
    (call,) = rig.component.calls
    assert (call.component, call.rpc, call.request_id, call.origin_domain) == ("brig", "get-user", "abc-1", "b.example")
    assert call.header("x-wire-api-version") == "v6"
    assert call.body == b"{}"


def test_without_a_request_id_one_is_made_up():
    rig = make_rig()
    post(rig)
    assert len(rig.component.calls[0].request_id) == 36


@pytest.mark.parametrize(
    "method, path",
    [
        (b"GET", b"/federation/brig/get-user"),
        (b"PUT", b"/federation/brig/get-user"),
        (b"POST", b"/federation/brig/get-user?debug=1"),
        (b"POST", b"/federation/brig"),
        (b"POST", b"/federation/brig/get-user/extra"),
        (b"POST", b"/federation//get-user"),
        (b"POST", b"/federation/brig/"),
        (b"POST", b"/federation/brig/.."),
        (b"POST", b"/federation/../get-user"),
        (b"POST", b"/federation/brig/%D9%A1"),
        (b"POST", b"/federation/brig/get.user"),
        (b"POST", b"/federation"),
        (b"POST", b"/other/brig/get-user"),
    ],
)
def test_invalid_endpoint(method, path):
    rig = make_rig()
    answer = post(rig, path=path, method=method)
    answer.labelled(403, "invalid-endpoint")
    assert rig.events == []


@pytest.mark.parametrize("name", ["get\u0661", "\u0661", "caf\u00e9", "get user", "get\n"])
def test_parse_route_takes_ascii_names_only(name):
    request = DummyRequest([b""])
    request.method = b"POST"
    request.uri = request.path = b"/federation/brig/" + name.encode()
    with pytest.raises(FederationError) as info:
        parse_route(request, b"/federation/", 2)
    assert info.value.label == "invalid-endpoint"


def test_parse_route_returns_the_names():
    request = DummyRequest([b""])
    request.method = b"POST"
    request.uri = request.path = b"/federation/Brig_2/get-user"
    assert parse_route(request, b"/federation/", 2) == ("Brig_2", "get-user")


def test_a_raw_non_ascii_path_is_refused_by_the_http_channel():
    rig = make_rig()
    conn = inward(rig)
    conn.request(b"POST", "/federation/brig/get\u0661".encode(), b"{}", (ORIGIN,))
    assert conn.transport.value().startswith(b"HTTP/1.1 400 ")
    assert conn.transport.disconnecting
    assert rig.events == []


def test_the_message_of_a_bad_name():
    body = post(make_rig(), path=b"/federation/brig/a%2Fb").labelled(403, "invalid-endpoint")
    assert body["message"] == (
        "the path must be /federation/{name}/{name} with names of ASCII letters, digits, '_' and '-' only"
    )


def test_unknown_component():
    rig = make_rig()
    body = post(rig, path=b"/federation/cargohold/get-asset").labelled(403, "unknown-component")
    assert "cargohold" in body["message"]


def test_invalid_json():
    rig = make_rig()
    post(rig, body=b"{not json").labelled(400, "invalid-json")
    assert rig.component.calls == []


def test_request_too_large():
    rig = make_rig()
    post(rig, body=b"[" + b"0," * 600 + b"0]").labelled(413, "request-too-large")
    assert rig.events == []


def test_no_client_certificate_with_the_mtls_authenticator(dev_pki):
    rig = make_rig()
    rig.pipeline.authenticator = MutualTLSAuthenticator(dev_pki.material("fed.a.example"), "a.example")
    body = post(rig).labelled(403, "no-client-certificate")
    assert "requires mutual TLS" in body["message"]


@pytest.mark.parametrize(
    "rig_options, code, label",
    [
        ({"peer": AuthenticationFailure("bad", "no-origin-domain")}, 403, "no-origin-domain"),
        ({"peer": AuthenticationFailure("bad", "certificate-parse-error")}, 403, "certificate-parse-error"),
        ({"peer": AuthenticationFailure("bad signature")}, 403, "authentication-failure"),
        ({"peer": Peer(identities={"fed.c.example"}, claimed_domain="b.example")}, 403, "validation-error"),
        ({"table": {}}, 422, "invalid-domain"),
        ({"table": {"b.example": DiscoveryFailure("SRV lookup failed")}}, 400, "discovery-failure"),
        ({"deny": (False, True)}, 400, "federation-denied"),
    ],
)
def test_pipeline_failures_become_labelled_answers(rig_options, code, label):
    rig = make_rig(**rig_options)
    post(rig).labelled(code, label)
    assert rig.component.calls == []


def test_component_unavailable():
    rig = make_rig(answer=FederationError("brig is down", "component-unavailable"))
    assert post(rig).labelled(502, "component-unavailable")["message"] == "brig is down"


def test_validation_error_names_the_domain():
    rig = make_rig(
        table={"b.example": [target("fed.b.example")]},
        peer=Peer(identities={"fed.c.example"}, claimed_domain="b.example"),
    )
    body = post(rig).labelled(403, "validation-error")
    assert body["data"] == {"type": "federation", "domain": "b.example"}


def test_a_component_that_raises_is_an_internal_error_without_details():
    rig = make_rig(answer=ZeroDivisionError("secret: division by zero in brig"))
    answer = post(rig, headers=(ORIGIN, JSON, (b"Request-Id", b"req-77")))
    body = answer.labelled(500, "internal-error")
    assert body["message"] == "internal error; the server log has the details under request id req-77"
    assert b"secret" not in answer.body and b"ZeroDivision" not in answer.body
