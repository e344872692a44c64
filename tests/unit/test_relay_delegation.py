"""
L{fedserver_relay.delegation}: the C{delegated-trust} authorizer and the
hub's C{relay-forward} component, through real L{Pipeline}s: a call from
c.example goes to the hub h.example, which relays it to a.example.
"""

from __future__ import annotations

import json
from typing import Any, Dict, List, Optional

import pytest
from zope.interface.verify import verifyObject

import fedserver_relay.delegation as delegation
from fedserver.config import Options
from fedserver.context import Context
from fedserver.errors import ConfigError
from fedserver.interfaces import IAuthorizer, IComponentHandler
from fedserver.pipeline import Pipeline
from fedserver.values import FederatedCall, OutboundRequest, Peer
from fedserver_relay.delegation import HOPS, ORIGIN, ORIGIN_DOMAIN, TO, TO_COMPONENT
from tests.unit.helpers import (
    FakeAuthenticator,
    FakeClient,
    FakeComponent,
    FakeDiscovery,
    build_plugin,
    labelled_failure,
    make_inbound,
    success_result_of,
    target,
)
from tests.unit.wire_helpers import context_for

HUB = "11" * 32
CEE = "22" * 32
DEE = "33" * 32
STRANGER = "44" * 32


def options(path: str, **values: Any) -> Options:
    return Options(values, file="/etc/fedserver.toml", path=path, base_dir="/etc")


def authorizer(*trusted: Dict[str, Any], max_hops: int = 2) -> Any:
    made = build_plugin(delegation, "authorizer",
                        options("authorizers[0]", plugin="delegated-trust", max_federation_hops=max_hops,
                                trusted=list(trusted)))
    assert verifyObject(IAuthorizer, made)
    return made


def receiver(auth: Any, peer: Peer) -> tuple:
    """a.example's pipeline: C{auth} decides, a brig component records."""
    brig = FakeComponent()
    pipeline = Pipeline(
        backend_domain="a.example",
        discovery=FakeDiscovery({"h.example": [target("fed.h.example")], "c.example": [target("fed.c.example")]}),
        authenticator=FakeAuthenticator(peer),
        authorizers=[auth],
        components={"brig": brig},
        client=FakeClient(),  # type: ignore[arg-type]
    )
    return pipeline, brig


def hub_peer(fingerprint: str = HUB) -> Peer:
    return Peer(identities={"fed.h.example"}, claimed_domain="h.example", fingerprint=fingerprint)


def relayed(pipeline: Pipeline, headers: List[tuple]) -> Any:
    request = make_inbound(headers=(("Content-Type", "application/json"), *headers), body=b"{}")
    return pipeline.handle_inbound(request, "brig", "get-user", "r1")


def test_a_trusted_peer_calling_directly_is_accepted():
    pipeline, brig = receiver(authorizer({"fingerprint": HUB}), hub_peer())
    assert success_result_of(relayed(pipeline, [])).code == 200
    assert len(brig.calls) == 1


def test_a_peer_outside_the_list_is_refused():
    pipeline, brig = receiver(authorizer({"fingerprint": HUB}), hub_peer(STRANGER))
    error = labelled_failure(relayed(pipeline, []), "federation-denied")
    assert "is not in this backend's delegated-trust list" in error.message
    assert brig.calls == []


def test_a_relayed_call_needs_the_hub_to_delegate():
    without = authorizer({"fingerprint": HUB, "label": "hub"})
    pipeline, brig = receiver(without, hub_peer())
    error = labelled_failure(relayed(pipeline, [(ORIGIN, CEE), (HOPS, "1")]), "federation-denied")
    assert "is not trusted with delegate = true" in error.message and "hub" in error.message

    with_delegate = authorizer({"fingerprint": HUB, "delegate": True})
    pipeline, brig = receiver(with_delegate, hub_peer())
    assert success_result_of(relayed(pipeline, [(ORIGIN, CEE), (HOPS, "1")])).code == 200
    colons = ":".join(CEE[i:i + 2] for i in range(0, 64, 2))
    assert success_result_of(relayed(pipeline, [(ORIGIN, colons.upper()), (HOPS, "1"),
                                                (ORIGIN_DOMAIN, "c.example")])).code == 200
    assert len(brig.calls) == 2


def test_a_peer_that_is_no_delegate_cannot_impersonate_a_trusted_origin():
    # the origin is trusted, but the claim is the sender's: a non-delegate naming it is refused, whatever it names
    origin_trusted = authorizer({"fingerprint": HUB, "label": "hub"}, {"fingerprint": CEE, "label": "c"})
    pipeline, brig = receiver(origin_trusted, hub_peer())
    for headers in ([(ORIGIN, CEE), (HOPS, "1")], [(ORIGIN, CEE), (HOPS, "1"), (ORIGIN_DOMAIN, "c.example")],
                    [(ORIGIN_DOMAIN, "c.example")], [(HOPS, "1")]):
        error = labelled_failure(relayed(pipeline, headers), "federation-denied")
        assert "sent relay headers" in error.message and "not trusted with delegate = true" in error.message
        assert "hub" in error.message
    assert brig.calls == []
    # without relay headers the same peer is welcome
    assert success_result_of(relayed(pipeline, [])).code == 200


@pytest.mark.parametrize("domain", ["", "C.Example", "c.example, d.example", "-c.example", "c..example"])
def test_the_origin_domain_must_be_a_domain_name(domain):
    pipeline, brig = receiver(authorizer({"fingerprint": HUB, "delegate": True}), hub_peer())
    error = labelled_failure(relayed(pipeline, [(ORIGIN, CEE), (HOPS, "1"), (ORIGIN_DOMAIN, domain)]),
                             "federation-denied")
    assert "Fedserver-Relay-Origin-Domain must be a domain name" in error.message
    assert brig.calls == []


@pytest.mark.parametrize(
    "headers, message",
    [
        ([(ORIGIN, CEE), (HOPS, "3")], "crossed 3 hubs; this backend accepts at most 2"),
        ([(ORIGIN, CEE), (HOPS, "0")], "must be a number of hubs from 1 to 255"),
        ([(ORIGIN, CEE)], "must be a number of hubs"),
        ([(ORIGIN, "not-a-fingerprint"), (HOPS, "1")], "is not a certificate fingerprint"),
        ([(HOPS, "1")], "came without Fedserver-Relay-Origin"),
        ([(ORIGIN_DOMAIN, "c.example")], "came without Fedserver-Relay-Origin"),
    ],
)
def test_bad_relay_headers_are_refused(headers, message):
    pipeline, brig = receiver(authorizer({"fingerprint": HUB, "delegate": True}), hub_peer())
    assert message in labelled_failure(relayed(pipeline, headers), "federation-denied").message
    assert brig.calls == []


@pytest.mark.parametrize(
    "table, message",
    [
        ({"trusted": []}, "trusted: lists nobody"),
        ({"trusted": [{"fingerprint": "abc"}]}, "fingerprint:"),
        ({"trusted": [{"fingerprint": HUB}, {"fingerprint": HUB}]}, "is listed twice"),
        ({"trusted": [{"fingerprint": HUB, "colour": "red"}]}, "colour"),
        ({"trusted": [{"fingerprint": HUB}], "max_federation_hops": 0}, "max_federation_hops"),
    ],
)
def test_configuration_errors(table, message):
    with pytest.raises(ConfigError, match=message):
        build_plugin(delegation, "authorizer", options("authorizers[0]", plugin="delegated-trust", **table))


# the hub


class RecordingPipeline:
    def __init__(self, answer: Any) -> None:
        self.answer = answer
        self.calls: List[FederatedCall] = []

    def call_remote(self, call: FederatedCall) -> Any:
        from twisted.internet import defer

        self.calls.append(call)
        return defer.succeed(self.answer)


def hub(max_hops: int = 2, authorizers: Optional[List[Any]] = None) -> tuple:
    context: Context = context_for("h.example", store=None)
    context.authorizers = authorizers or []
    forward = build_plugin(delegation, "component",
                           options("components.relay", plugin="relay-forward", max_federation_hops=max_hops), context)
    assert verifyObject(IComponentHandler, forward)
    recorder = RecordingPipeline(FakeComponent().answer)
    context.pipeline = recorder  # type: ignore[assignment]
    return forward, recorder


def hub_call(headers: List[tuple], peer: Optional[Peer] = None) -> FederatedCall:
    peer = peer or Peer(identities={"fed.c.example"}, claimed_domain="c.example", fingerprint=CEE)
    return FederatedCall(origin_domain=peer.claimed_domain, target_domain="h.example", component="relay",
                         rpc="get-user", method="POST", headers=headers, body=b'{"id": 1}', request_id="r9",
                         peer=peer)


def test_the_hub_relays_with_the_callers_fingerprint_and_one_hop():
    forward, recorder = hub()
    response = success_result_of(forward.handle(hub_call([(TO, "a.example"), (TO_COMPONENT, "brig"),
                                                          ("Content-Type", "application/json")])))
    assert response.code == 200
    [onward] = recorder.calls
    assert (onward.origin_domain, onward.target_domain, onward.component, onward.rpc, onward.body) == (
        "h.example", "a.example", "brig", "get-user", b'{"id": 1}')
    assert onward.header(ORIGIN) == CEE and onward.header(HOPS) == "1"
    assert onward.header(ORIGIN_DOMAIN) == "c.example"


def test_an_asserted_origin_is_refused_by_a_hub_without_delegated_trust():
    forward, recorder = hub()
    forged = hub_call([(TO, "a.example"), (TO_COMPONENT, "brig"), (ORIGIN, DEE), (HOPS, "1")])
    assert "already relayed" in labelled_failure(forward.handle(forged), "federation-denied").message
    assert recorder.calls == []


@pytest.mark.parametrize("headers", [
    [(ORIGIN, DEE), (HOPS, "1")],
    [(ORIGIN, DEE), (HOPS, "1"), (ORIGIN_DOMAIN, "d.example")],
    [(ORIGIN_DOMAIN, "d.example")],
    [(HOPS, "1")],
])
def test_the_hub_believes_relay_headers_only_from_a_delegate(headers):
    # the hub runs delegated-trust, and trusts the caller CEE, but not with delegate = true: what it claims
    # about an origin is not believed (before, any DelegatedTrust authorizer was enough)
    forward, recorder = hub(max_hops=3, authorizers=[
        authorizer({"fingerprint": CEE, "label": "c"}, {"fingerprint": DEE, "label": "d"}),
    ])
    call = hub_call([(TO, "a.example"), (TO_COMPONENT, "brig"), *headers])
    error = labelled_failure(forward.handle(call), "federation-denied")
    assert "already relayed" in error.message and "delegate = true" in error.message
    assert recorder.calls == []


def test_the_hub_checks_the_relay_headers_of_a_delegate():
    forward, recorder = hub(max_hops=3, authorizers=[authorizer({"fingerprint": HUB, "delegate": True})])
    peer = Peer(identities={"fed.g.example"}, claimed_domain="g.example", fingerprint=HUB)
    for headers, message in (
        ([(ORIGIN, "nonsense"), (HOPS, "1")], "is not a certificate fingerprint"),
        ([(ORIGIN, CEE), (HOPS, "x")], "must be a number of hubs"),
        ([(ORIGIN, CEE), (HOPS, "1"), (ORIGIN_DOMAIN, "Not A Domain")], "must be a domain name"),
        ([(HOPS, "1")], "came without Fedserver-Relay-Origin"),
    ):
        call = hub_call([(TO, "a.example"), (TO_COMPONENT, "brig"), *headers], peer)
        assert message in labelled_failure(forward.handle(call), "federation-denied").message
    assert recorder.calls == []


def test_the_hub_relays_only_to_the_components_it_lists():
    context: Context = context_for("h.example", store=None)
    context.authorizers = []
    forward = build_plugin(delegation, "component",
                           options("components.relay", plugin="relay-forward", components=["brig"]), context)
    recorder = RecordingPipeline(FakeComponent().answer)
    context.pipeline = recorder  # type: ignore[assignment]
    error = labelled_failure(forward.handle(hub_call([(TO, "a.example"), (TO_COMPONENT, "galley")])),
                             "federation-denied")
    assert "does not relay to the component 'galley'" in error.message and "brig" in error.message
    assert recorder.calls == []
    success_result_of(forward.handle(hub_call([(TO, "a.example"), (TO_COMPONENT, "brig")])))
    assert [call.component for call in recorder.calls] == ["brig"]


@pytest.mark.parametrize("value, message", [
    ([], "lists no component"),
    (["brig", "no/slash"], "is not a component name"),
    ("brig", "components"),
])
def test_the_components_option_is_checked(value, message):
    context: Context = context_for("h.example", store=None)
    with pytest.raises(ConfigError, match=message):
        build_plugin(delegation, "component",
                     options("components.relay", plugin="relay-forward", components=value), context)


def test_a_call_relayed_again_keeps_its_origin_and_counts_the_hop():
    forward, recorder = hub(max_hops=3, authorizers=[authorizer({"fingerprint": HUB, "delegate": True})])
    peer = Peer(identities={"fed.g.example"}, claimed_domain="g.example", fingerprint=HUB)
    call = hub_call([(TO, "a.example"), (TO_COMPONENT, "brig"), (ORIGIN, CEE), (ORIGIN_DOMAIN, "c.example"),
                     (HOPS, "1")], peer)
    success_result_of(forward.handle(call))
    [onward] = recorder.calls
    assert (onward.header(ORIGIN), onward.header(ORIGIN_DOMAIN), onward.header(HOPS)) == (CEE, "c.example", "2")


def test_the_hub_refuses_what_it_cannot_relay():
    forward, recorder = hub(max_hops=1, authorizers=[authorizer({"fingerprint": HUB, "delegate": True})])
    assert "Fedserver-Relay-To" in labelled_failure(forward.handle(hub_call([])), "invalid-endpoint").message
    labelled_failure(forward.handle(hub_call([(TO, "Not A Domain!"), (TO_COMPONENT, "brig")])), "invalid-domain")
    labelled_failure(forward.handle(hub_call([(TO, "h.example"), (TO_COMPONENT, "brig")])), "invalid-domain")
    relayed_once = hub_call([(TO, "a.example"), (TO_COMPONENT, "brig"), (ORIGIN, CEE), (HOPS, "1")],
                            Peer(identities={"x"}, claimed_domain="g.example", fingerprint=HUB))
    assert "at most 1" in labelled_failure(forward.handle(relayed_once), "federation-denied").message
    assert recorder.calls == []


def test_relay_headers_pass_through_the_outbound_pipeline():
    """The hub's call leaves through a real Pipeline with its relay headers on the wire."""
    client = FakeClient()
    pipeline = Pipeline(
        backend_domain="h.example",
        discovery=FakeDiscovery({"a.example": [target("fed.a.example")]}),
        authenticator=FakeAuthenticator(None),
        authorizers=[],
        components={},
        client=client,  # type: ignore[arg-type]
    )
    call = FederatedCall(origin_domain="h.example", target_domain="a.example", component="brig", rpc="get-user",
                         method="POST", headers=[(ORIGIN, CEE), (ORIGIN_DOMAIN, "c.example"), (HOPS, "1")],
                         body=b"{}", request_id="r2")
    success_result_of(pipeline.call_remote(call))
    [(_, sent)] = client.sent
    assert isinstance(sent, OutboundRequest)
    assert (sent.header(ORIGIN), sent.header(ORIGIN_DOMAIN), sent.header(HOPS)) == (CEE, "c.example", "1")
    assert json.loads(sent.body) == {}
