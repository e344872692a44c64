"""Tests for fedserver.pipeline: the order of the steps, fail-over and origin validation."""

from __future__ import annotations

import pytest
from twisted.internet.defer import Deferred
from zope.interface.verify import verifyObject

from fedserver.client import NotDelivered
from fedserver.errors import AuthenticationFailure, DiscoveryFailure, FederationError
from fedserver.interfaces import IAuthenticator, IAuthorizer, IComponentHandler, IDiscovery
from fedserver.pipeline import check_json, remote_error
from fedserver.values import OutboundRequest, Peer, Response
from tests.unit.helpers import (
    PEER_B,
    assert_no_result,
    json_response,
    labelled_failure,
    make_call,
    make_inbound,
    make_rig,
    success_result_of,
    target,
)

TWO_TARGETS = {"b.example": [target("fed.b.example", host="10.0.0.1"), target("fed.b.example", host="10.0.0.2")]}


def refused(host):
    return NotDelivered(f"cannot connect to {host}", "federation-connection-refused")


def test_the_fakes_provide_their_interfaces():
    rig = make_rig()
    assert verifyObject(IDiscovery, rig.discovery)
    assert verifyObject(IAuthenticator, rig.authenticator)
    assert verifyObject(IAuthorizer, rig.authorizers[0])
    assert verifyObject(IComponentHandler, rig.component)


# outbound


def test_outbound_order_authorize_then_discover_then_prepare_then_send():
    rig = make_rig()
    response = success_result_of(rig.pipeline.call_remote(make_call()))
    assert response.code == 200
    assert rig.events == [
        ("authorize_outbound", "authorizer-0"),
        ("authorize_outbound", "authorizer-1"),
        ("discover", "b.example"),
        ("prepare", "fed.b.example"),
        ("send", "fed.b.example"),
    ]


def test_outbound_request_shape():
    rig = make_rig()
    call = make_call(
        headers=[("X-Wire-API-Version", "v6"), ("Authorization", "secret"), ("Cookie", "c")],
        request_id="abc",
    )
    success_result_of(rig.pipeline.call_remote(call))
    ((sent_to, request),) = rig.client.sent
    assert sent_to == target("fed.b.example")
    assert (request.destination, request.method, request.path) == ("b.example", "POST", "/federation/brig/get-user")
    assert request.body == call.body
    assert dict(request.headers) == {
        "Content-Type": "application/json",
        "Request-Id": "abc",
        "X-Wire-API-Version": "v6",
        "Wire-Origin-Domain": "a.example",
    }


def test_outbound_body_must_be_json_before_anything_else():
    rig = make_rig()
    error = labelled_failure(rig.pipeline.call_remote(make_call(body=b"{nope")), "invalid-json")
    assert error.code == 400
    assert error.message.startswith("the request body is not valid JSON")
    assert rig.events == []


def test_outbound_empty_body_is_fine():
    rig = make_rig()
    success_result_of(rig.pipeline.call_remote(make_call(body=b"")))
    assert rig.client.sent[0][1].body == b""


def test_outbound_denied_stops_before_discovery():
    rig = make_rig(deny=(True, False))
    labelled_failure(rig.pipeline.call_remote(make_call()), "federation-denied")
    assert rig.events == [("authorize_outbound", "authorizer-0")]


def test_outbound_discovery_failure_is_passed_on():
    rig = make_rig(table={})
    error = labelled_failure(rig.pipeline.call_remote(make_call()), "invalid-domain")
    assert error.code == 422
    assert ("prepare", "fed.b.example") not in rig.events


def test_outbound_waits_for_a_slow_authorizer():
    rig = make_rig(deny=(False,))
    pending: Deferred = Deferred()
    rig.authorizers[0].pending = pending
    d = rig.pipeline.call_remote(make_call())
    assert_no_result(d)
    assert rig.events == [("authorize_outbound", "authorizer-0")]
    pending.callback(None)
    assert success_result_of(d).code == 200


def test_fail_over_to_the_next_target_when_not_delivered():
    rig = make_rig(table=TWO_TARGETS, outcomes={"10.0.0.1": refused("10.0.0.1")})
    assert success_result_of(rig.pipeline.call_remote(make_call())).code == 200
    assert [e for e in rig.events if e[0] in ("prepare", "send")] == [
        ("prepare", "fed.b.example"),
        ("send", "10.0.0.1"),
        ("prepare", "fed.b.example"),
        ("send", "10.0.0.2"),
    ]


def test_the_last_not_delivered_error_when_every_target_fails():
    rig = make_rig(
        table=TWO_TARGETS,
        outcomes={
            "10.0.0.1": refused("10.0.0.1"),
            "10.0.0.2": NotDelivered("tls failed", "federation-tls-error"),
        },
    )
    labelled_failure(rig.pipeline.call_remote(make_call()), "federation-tls-error")
    assert len(rig.client.sent) == 2


@pytest.mark.parametrize("label", ["federation-timeout", "federation-connection-refused"])
def test_no_fail_over_once_the_request_may_have_been_delivered(label):
    rig = make_rig(table=TWO_TARGETS, outcomes={"10.0.0.1": FederationError("timed out", label)})
    labelled_failure(rig.pipeline.call_remote(make_call()), label)
    assert [host for _, host in rig.events if _ == "send"] == ["10.0.0.1"]


def test_an_error_answer_of_the_remote_is_a_response():
    rig = make_rig(outcomes={"fed.b.example": json_response(404, {"label": "not-found"})})
    assert success_result_of(rig.pipeline.call_remote(make_call())).code == 404


def test_send_leaves_authorization_to_the_caller():
    rig = make_rig(deny=(True,))
    outbound = OutboundRequest("b.example", "GET", "/federation/api-version", [])
    assert success_result_of(rig.pipeline.send(outbound)).code == 200
    assert rig.events == [("discover", "b.example"), ("prepare", "fed.b.example"), ("send", "fed.b.example")]


# inbound


def handle(rig, **changes):
    return rig.pipeline.handle_inbound(make_inbound(**changes), "brig", "get-user", "req-9")


def test_inbound_order_authenticate_validate_authorize_handle():
    rig = make_rig()
    assert success_result_of(handle(rig)).code == 200
    assert rig.events == [
        ("authenticate", "b.example"),
        ("discover", "b.example"),
        ("authorize_inbound", "authorizer-0"),
        ("authorize_inbound", "authorizer-1"),
        ("handle", "brig"),
    ]


def test_inbound_call_carries_the_validated_peer():
    rig = make_rig()
    success_result_of(handle(rig, headers=[("Wire-Origin-Domain", "b.example"), ("X-Wire-API-Version", "v6")]))
    (call,) = rig.component.calls
    assert (call.origin_domain, call.target_domain) == ("b.example", "a.example")
    assert (call.component, call.rpc, call.request_id, call.method) == ("brig", "get-user", "req-9", "POST")
    assert call.peer == PEER_B
    assert call.header("x-wire-api-version") == "v6"
    assert call.body == b"{}"


def test_origin_validation_is_skipped_when_the_authenticator_proved_the_domain():
    rig = make_rig(table={}, peer=Peer(identities={"b.example"}, claimed_domain="b.example", domain_proven=True))
    assert success_result_of(handle(rig)).code == 200
    assert not [e for e in rig.events if e[0] == "discover"]


def test_validation_error_when_no_discovered_domain_is_proven():
    rig = make_rig(
        table={"b.example": [target("fed.b.example"), target("backup.b.example")]},
        peer=Peer(identities={"fed.c.example"}, claimed_domain="b.example"),
    )
    error = labelled_failure(handle(rig), "validation-error")
    assert error.code == 403
    assert error.message == (
        "the client certificate is for fed.c.example, "
        "but discovery says b.example is served by backup.b.example, fed.b.example"
    )
    assert error.data == {"type": "federation", "domain": "b.example"}
    assert [e[0] for e in rig.events] == ["authenticate", "discover"]


def test_validation_accepts_any_discovered_domain_in_any_case():
    rig = make_rig(
        table={"b.example": [target("FED.B.example"), target("backup.b.example")]},
        peer=Peer(identities={"fed.b.example"}, claimed_domain="b.example"),
    )
    assert success_result_of(handle(rig)).code == 200


@pytest.mark.parametrize("label", ["invalid-domain", "discovery-failure"])
def test_validation_when_discovery_fails_keeps_the_label(label):
    rig = make_rig(table={"b.example": DiscoveryFailure("no SRV record", label)})
    error = labelled_failure(handle(rig), label)
    assert error.message == "cannot validate the origin domain b.example: no SRV record"
    assert ("authorize_inbound", "authorizer-0") not in rig.events


def test_authentication_failure_stops_everything():
    rig = make_rig(peer=AuthenticationFailure("bad certificate"))
    labelled_failure(handle(rig), "authentication-failure")
    assert rig.events == [("authenticate", "b.example")]


def test_inbound_denied_does_not_reach_the_component():
    rig = make_rig(deny=(False, True))
    labelled_failure(handle(rig), "federation-denied")
    assert rig.component.calls == []
    assert rig.events[-1] == ("authorize_inbound", "authorizer-1")


def test_unknown_component_is_refused_after_authorization():
    rig = make_rig()
    d = rig.pipeline.handle_inbound(make_inbound(), "cargohold", "get-asset", "r")
    error = labelled_failure(d, "unknown-component")
    assert "'cargohold'" in error.message
    assert rig.events[-1] == ("authorize_inbound", "authorizer-1")


def test_inbound_body_must_be_json():
    rig = make_rig()
    labelled_failure(handle(rig, body=b"\xff not json"), "invalid-json")
    assert rig.component.calls == []


def test_the_component_answer_goes_back_unchanged():
    answer = Response(418, [("Content-Type", "text/plain"), ("X-Extra", "1")], b"teapot")
    rig = make_rig(answer=answer)
    assert success_result_of(handle(rig)) is answer


def test_a_component_failure_is_passed_on():
    rig = make_rig(answer=FederationError("brig is down", "component-unavailable"))
    assert labelled_failure(handle(rig), "component-unavailable").code == 502


# helpers


def test_check_json():
    check_json(b"", "x")
    check_json(b'{"a": [1]}', "x")
    with pytest.raises(FederationError, match=r"^the answer is not valid JSON"):
        check_json(b"[1,", "the answer")


def test_remote_error_carries_the_remote_json_under_inner():
    inner = {"code": 404, "label": "not-found", "message": "no such user"}
    error = remote_error(json_response(404, inner), "b.example", "/federation/brig/get-user")
    assert (error.code, error.label, error.message) == (533, "federation-remote-error", "b.example answered 404")
    assert error.inner == inner
    assert error.data == {"type": "federation", "domain": "b.example", "path": "/federation/brig/get-user"}


def test_remote_error_with_a_body_that_is_not_json():
    error = remote_error(Response(502, [], b"<html>" + b"x" * 2000), "b.example", "/p")
    assert error.inner["code"] == 502
    assert error.inner["body"].startswith("<html>")
    assert len(error.inner["body"]) == 1024


def test_deeply_nested_json_is_invalid_json_not_an_internal_error():
    with pytest.raises(FederationError) as info:
        check_json(b"[" * 100000, "the body")
    assert info.value.label == "invalid-json"


def test_a_cancelled_send_does_not_fail_over():
    from twisted.internet.defer import CancelledError, Deferred

    from fedserver.client import FederationClient
    from fedserver.pipeline import Pipeline
    from fedserver.values import OutboundRequest
    from tests.unit.helpers import FakeAuthenticator, FakeDiscovery, failure_result_of, target

    sent = []

    class Hanging(FederationClient):
        def __init__(self):
            pass

        def send(self, target, request):
            sent.append(target)
            return Deferred(lambda d: d.errback(CancelledError()))

    discovery = FakeDiscovery({"b.example": [target("fed.b.example", 1), target("fed.b.example", 2)]})
    pipeline = Pipeline(backend_domain="a.example", discovery=discovery, authenticator=FakeAuthenticator(),
                        authorizers=[], components={}, client=Hanging())
    d = pipeline.send(OutboundRequest(destination="b.example", method="POST", path="/federation/x/y", headers=()))
    d.cancel()
    assert failure_result_of(d, CancelledError)
    assert [t.port for t in sent] == [1]
