"""
L{fedserver.rpc_client}: RPCs to other backends through the pipeline, and
how their failures are labelled.
"""

from __future__ import annotations

import json

from twisted.internet.defer import Deferred

from fedserver.errors import FederationDenied
from fedserver.jsonapi import APIError
from fedserver.rpc_client import RPCClient
from fedserver.values import Response
from tests.unit.helpers import failure_result_of, json_response, labelled_failure, make_rig, success_result_of
from tests.unit.wire_helpers import RecordingPipeline, ok


def test_a_call_goes_through_the_pipeline_as_a_federated_call():
    pipeline = RecordingPipeline()
    pipeline.answer("b.example", "brig", "get-user-by-handle", ok({"handle": "bob"}))
    remote = RPCClient("a.example", lambda: pipeline)
    assert success_result_of(remote.call("b.example", "brig", "get-user-by-handle", {"handle": "bob"}, "r1")) == {
        "handle": "bob"
    }
    [call] = pipeline.calls
    assert (call.origin_domain, call.target_domain, call.component, call.rpc) == (
        "a.example", "b.example", "brig", "get-user-by-handle"
    )
    assert (call.method, call.request_id, call.header("content-type")) == ("POST", "r1", "application/json")
    assert json.loads(call.body) == {"handle": "bob"}


def test_the_real_pipeline_authorizes_discovers_and_sends():
    rig = make_rig(outcomes={"fed.b.example": json_response(200, ["ok"])})
    remote = RPCClient("a.example", lambda: rig.pipeline)
    assert success_result_of(remote.call("b.example", "galley", "on-message-sent", {}, "r2")) == ["ok"]
    assert [e[0] for e in rig.events] == ["authorize_outbound", "authorize_outbound", "discover", "prepare", "send"]
    target, request = rig.client.sent[0]
    assert target.infra_domain == "fed.b.example"
    assert request.path == "/federation/galley/on-message-sent"
    assert request.header("Request-Id") == "r2"


def test_a_refusal_by_an_authorizer_names_domain_and_path():
    rig = make_rig(deny=(True,))
    remote = RPCClient("a.example", lambda: rig.pipeline)
    error = labelled_failure(remote.call("b.example", "brig", "search-users", {}, "r"), "federation-denied")
    assert error.data == {"type": "federation", "domain": "b.example", "path": "/federation/brig/search-users"}
    assert not rig.client.sent


def test_a_non_2xx_answer_is_a_remote_error_with_the_inner_refusal():
    pipeline = RecordingPipeline()
    inner = {"code": 404, "label": "not-found", "message": "no such user"}
    pipeline.answer("b.example", "brig", "claim-prekey-bundle", json_response(404, inner))
    remote = RPCClient("a.example", lambda: pipeline)
    error = labelled_failure(remote.call("b.example", "brig", "claim-prekey-bundle", {}, "r"),
                             "federation-remote-error")
    assert error.code == 533
    assert error.inner == inner
    assert error.data == {"type": "federation", "domain": "b.example", "path": "/federation/brig/claim-prekey-bundle"}


def test_a_2xx_answer_that_is_not_json():
    pipeline = RecordingPipeline()
    pipeline.answer("b.example", "brig", "x", Response(200, [], b"<html>"))
    failure = failure_result_of(RPCClient("a.example", lambda: pipeline).call("b.example", "brig", "x", {}, "r"),
                                APIError)
    assert (failure.value.code, failure.value.label) == (533, "federation-unexpected-body")
    assert "b.example" in failure.value.message


def test_failures_of_the_pipeline_keep_their_label():
    pipeline = RecordingPipeline()
    pipeline.answer("b.example", "brig", "x", FederationDenied("b.example is not allowed"))
    error = labelled_failure(RPCClient("a.example", lambda: pipeline).call("b.example", "brig", "x", {}, "r"),
                             "federation-denied")
    assert error.data["domain"] == "b.example"
    # an unknown domain, as discovery says
    labelled_failure(RPCClient("a.example", lambda: pipeline).call("c.example", "brig", "x", {}, "r"), "invalid-domain")


def test_before_the_pipeline_exists():
    error = labelled_failure(RPCClient("a.example", lambda: None).call("b.example", "brig", "x", {}, "r"),
                             "federation-not-available")
    assert "starting" in error.message


def test_our_own_domain_is_never_federated():
    pipeline = RecordingPipeline()
    d: Deferred = RPCClient("a.example", lambda: pipeline).call("a.example", "brig", "x", {}, "r")
    assert "handled locally" in str(failure_result_of(d, ValueError).value)
    assert not pipeline.calls
