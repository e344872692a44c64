"""
Tests for fedserver.outward: C{POST /rpc/{domain}/{component}/{rpc}} from
local components, through a real site and HTTP channel.
"""

from __future__ import annotations

import pytest
from twisted.logger import capturedLogs

from fedserver.client import NotDelivered
from fedserver.errors import DiscoveryFailure, FederationError
from fedserver.outward import OutwardRPCResource
from fedserver.values import Response
from fedserver.web import ListenerRoot
from tests.unit.helpers import HTTPConnection, json_response, make_rig, site_for, target

PATH = b"/rpc/b.example/brig/get-user"
FEDERATION_PATH = "/federation/brig/get-user"
JSON = (b"Content-Type", b"application/json")


def post(rig, path=PATH, body=b'{"handle": "alice"}', headers=(JSON,), method=b"POST"):
    """The answer to one request on the outward listener of C{rig}."""
    root = ListenerRoot("outward listener")
    root.mount(b"rpc", OutwardRPCResource(rig.pipeline, max_body_bytes=1000))
    conn = HTTPConnection.to(site_for(root))
    with capturedLogs():
        conn.request(method, path, body, headers)
    return conn.answer()


def test_a_call_goes_to_the_remote_and_its_answer_comes_back():
    remote = Response(200, [("Content-Type", "application/json"), ("Set-Cookie", "s")], b'{"id": "u1"}')
    rig = make_rig(outcomes={"fed.b.example": remote})
    headers = (JSON, (b"Wire-Origin-Request-Id", b"rid-5"), (b"X-Wire-API-Version", b"v6"), (b"Cookie", b"c"))
    answer = post(rig, headers=headers)
    assert (answer.code, answer.body) == (200, b'{"id": "u1"}')
    assert answer.header("content-type") == "application/json"
    assert answer.header("set-cookie") is None
    ((sent_to, request),) = rig.client.sent
    assert sent_to.infra_domain == "fed.b.example"
    assert request.path == FEDERATION_PATH
    assert dict(request.headers) == {
        "Content-Type": "application/json",
        "Request-Id": "rid-5",
        "X-Wire-API-Version": "v6",
        "Wire-Origin-Domain": "a.example",
    }
    assert request.body == b'{"handle": "alice"}'


def test_a_remote_error_comes_back_as_federation_remote_error_with_inner():
    inner = {"code": 404, "label": "not-found", "message": "no such handle"}
    rig = make_rig(outcomes={"fed.b.example": json_response(404, inner)})
    body = post(rig).labelled(533, "federation-remote-error")
    assert body["inner"] == inner
    assert body["data"] == {"type": "federation", "domain": "b.example", "path": FEDERATION_PATH}
    assert body["message"] == "b.example answered 404"


def test_a_remote_error_that_is_not_json():
    rig = make_rig(outcomes={"fed.b.example": Response(500, [], b"oops")})
    body = post(rig).labelled(533, "federation-remote-error")
    assert body["inner"] == {"code": 500, "body": "oops"}


@pytest.mark.parametrize(
    "method, path",
    [
        (b"GET", PATH),
        (b"POST", PATH + b"?x=1"),
        (b"POST", b"/rpc/b.example/brig"),
        (b"POST", b"/rpc/b.example/brig/get-user/more"),
        (b"POST", b"/rpc/B.example/brig/get-user"),
        (b"POST", b"/rpc/b..example/brig/get-user"),
        (b"POST", b"/rpc/-b.example/brig/get-user"),
        (b"POST", b"/rpc/b.example./brig/get-user"),
        (b"POST", b"/rpc/b_x.example/brig/get-user"),
        (b"POST", b"/rpc/%D9%A1.example/brig/get-user"),
        (b"POST", b"/rpc/" + b"a" * 64 + b".example/brig/get-user"),
        (b"POST", b"/rpc/b.example/br.ig/get-user"),
        (b"POST", b"/rpc/b.example/brig/%D9%A1"),
        (b"POST", b"/rpc/b.example//get-user"),
        (b"POST", b"/rpc"),
        (b"POST", b"/"),
    ],
)
def test_invalid_endpoint(method, path):
    rig = make_rig()
    post(rig, path=path, method=method).labelled(403, "invalid-endpoint")
    assert rig.events == []


def test_a_long_but_valid_domain():
    domain = ("x" * 63 + ".") * 3 + "example"
    rig = make_rig(table={domain: [target("fed.b.example")]})
    assert post(rig, path=f"/rpc/{domain}/brig/get-user".encode()).code == 200
    assert rig.client.sent[0][1].destination == domain


def test_invalid_json():
    rig = make_rig()
    post(rig, body=b"{").labelled(400, "invalid-json")
    assert rig.events == []


def test_request_too_large():
    rig = make_rig()
    post(rig, body=b'"' + b"x" * 1000 + b'"').labelled(413, "request-too-large")
    assert rig.events == []


@pytest.mark.parametrize(
    "rig_options, code, label",
    [
        ({"deny": (True,)}, 400, "federation-denied"),
        ({"table": {}}, 422, "invalid-domain"),
        ({"table": {"b.example": DiscoveryFailure("no SRV record")}}, 400, "discovery-failure"),
        (
            {"outcomes": {"fed.b.example": NotDelivered("refused", "federation-connection-refused")}},
            521,
            "federation-connection-refused",
        ),
        ({"outcomes": {"fed.b.example": NotDelivered("bad", "federation-tls-error")}}, 525, "federation-tls-error"),
        ({"outcomes": {"fed.b.example": FederationError("slow", "federation-timeout")}}, 504, "federation-timeout"),
    ],
)
def test_failures_carry_the_domain_and_path(rig_options, code, label):
    body = post(make_rig(**rig_options)).labelled(code, label)
    assert body["data"] == {"type": "federation", "domain": "b.example", "path": FEDERATION_PATH}


def test_data_names_the_backend_domain_and_path_whatever_step_failed():
    # a connection error names the infrastructure domain; the component
    # that called sees the backend domain and path it asked for, as in wire-server
    error = FederationError("x", "federation-tls-error", data={"type": "federation", "domain": "fed.b.example"})
    body = post(make_rig(outcomes={"fed.b.example": error})).labelled(525, "federation-tls-error")
    assert body["data"]["domain"] == "b.example"
    assert body["data"]["path"].startswith("/federation/")


def test_an_unexpected_failure_is_an_internal_error_without_details():
    rig = make_rig(outcomes={"fed.b.example": RuntimeError("secret pool state")})
    answer = post(rig, headers=(JSON, (b"Wire-Origin-Request-Id", b"rid-9")))
    body = answer.labelled(500, "internal-error")
    assert "rid-9" in body["message"]
    assert b"secret" not in answer.body
