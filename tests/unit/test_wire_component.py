"""
L{fedserver.jsonapi.RPCComponent}: the RPC dispatch the reference brig and
galley share, and what a peer sees when an RPC is refused or breaks.
"""

from __future__ import annotations

from typing import Any, Dict

from twisted.web.resource import Resource
from zope.interface import implementer
from zope.interface.verify import verifyObject

from fedserver.errors import FederationError
from fedserver.interfaces import IComponentHandler
from fedserver.inward import InwardFederationResource
from fedserver.jsonapi import RPC, APIError, RPCComponent
from fedserver.values import FederatedCall
from tests.unit.helpers import (
    HTTPConnection,
    failure_result_of,
    make_call,
    make_rig,
    raw_request,
    site_for,
    success_result_of,
)
from tests.unit.wire_helpers import answer_json, refusal


@implementer(IComponentHandler)
class Echo(RPCComponent):
    name = "echo"

    def rpcs(self) -> Dict[str, RPC]:
        return {"echo": self._echo, "refuse": self._refuse, "deny": self._deny, "break": self._break}

    async def _echo(self, call: FederatedCall, body: Any) -> Any:
        return {"origin": call.origin_domain, "body": body}

    async def _refuse(self, call: FederatedCall, body: Any) -> Any:
        raise APIError(403, "access-denied", "not you")

    async def _deny(self, call: FederatedCall, body: Any) -> Any:
        raise FederationError("the backing store is down", "component-unavailable")

    async def _break(self, call: FederatedCall, body: Any) -> Any:
        raise KeyError("secret internals")


def test_it_provides_the_interface():
    assert verifyObject(IComponentHandler, Echo())


def test_an_rpc_answers_json():
    response = success_result_of(Echo().handle(make_call(rpc="echo", body=b'{"a": [1]}')))
    assert response.code == 200
    assert answer_json(response) == {"origin": "a.example", "body": {"a": [1]}}


def test_an_unknown_rpc_is_404_no_endpoint():
    response = success_result_of(Echo().handle(make_call(rpc="get-user")))
    body = refusal(response, 404, "no-endpoint")
    assert "'get-user'" in body["message"] and "echo" in body["message"]


def test_a_body_that_is_not_json_is_400_bad_request():
    refusal(success_result_of(Echo().handle(make_call(rpc="echo", body=b"{"))), 400, "bad-request")


def test_a_refusal_is_an_answer_not_a_failure():
    refusal(success_result_of(Echo().handle(make_call(rpc="refuse"))), 403, "access-denied")


def test_labelled_errors_and_bugs_are_left_to_the_pipeline():
    assert failure_result_of(Echo().handle(make_call(rpc="deny")), FederationError).value.label == (
        "component-unavailable"
    )
    failure_result_of(Echo().handle(make_call(rpc="break")), KeyError)


def test_a_peer_never_sees_a_traceback():
    rig = make_rig()
    rig.pipeline.components["brig"] = Echo()
    root = Resource()
    root.putChild(b"federation", InwardFederationResource(rig.pipeline, max_body_bytes=1000))
    for rpc, code, label in [("break", 500, "internal-error"), ("refuse", 403, "access-denied"),
                             ("deny", 502, "component-unavailable")]:
        connection = HTTPConnection.to(site_for(root))
        connection.send(raw_request(b"/federation/brig/" + rpc.encode(), b"{}",
                                    [(b"Wire-Origin-Domain", b"b.example")]))
        answer = connection.answer()
        body = answer.labelled(code, label)
        assert "secret internals" not in body["message"] and "Traceback" not in answer.body.decode()
        connection.close()
