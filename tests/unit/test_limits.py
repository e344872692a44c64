"""
Tests for the load limits of fedserver.pipeline: bounded outbound
concurrency per destination (with a bounded FIFO of waiting calls) and the
per-peer inbound concurrency and rate limits.
"""

from __future__ import annotations

import json
from typing import Any, List, Tuple

import attrs
from twisted.internet.defer import CancelledError, Deferred
from twisted.logger import capturedLogs

from fedserver.config import Limits
from fedserver.errors import LABELS
from fedserver.inward import InwardFederationResource
from fedserver.values import OutboundRequest, Response
from fedserver.web import ListenerRoot
from tests.unit.helpers import (
    HTTPConnection,
    assert_no_result,
    failure_result_of,
    json_response,
    labelled_failure,
    make_call,
    make_inbound,
    make_rig,
    site_for,
    success_result_of,
    target,
)


@attrs.define
class PendingClient:
    """A client whose every send waits until the test fires it."""

    sent: List[Tuple[Any, OutboundRequest, Deferred]] = attrs.Factory(list)

    def send(self, target: Any, request: OutboundRequest) -> Deferred:
        d: Deferred = Deferred()
        self.sent.append((target, request, d))
        return d

    def answer(self, index: int, code: int = 200) -> None:
        self.sent[index][2].callback(json_response(code, {"n": index}))


def outbound_rig(limit: int = 2, queue: int = 3):
    rig = make_rig(table={"b.example": [target("fed.b.example")], "c.example": [target("fed.c.example")]})
    client = PendingClient()
    rig.pipeline.client = client  # type: ignore[assignment]
    rig.pipeline.max_outbound_per_destination = limit
    rig.pipeline.max_outbound_queue_per_destination = queue
    return rig, client


def call(rig, n: int, domain: str = "b.example") -> Deferred:
    return rig.pipeline.call_remote(make_call(target_domain=domain, request_id=f"req-{n}"))


def request_ids(client: PendingClient) -> List[str]:
    return [r.header("Request-Id") for _, r, _ in client.sent]


def test_the_defaults():
    limits = Limits()
    assert (limits.max_outbound_per_destination, limits.max_outbound_queue_per_destination) == (32, 1000)
    assert (limits.max_inbound_per_peer, limits.inbound_rate_per_peer) == (64, 5000.0)
    assert LABELS["federation-overloaded"] == 503 and LABELS["too-many-requests"] == 429


# outbound


def test_at_most_n_calls_in_flight_per_destination():
    rig, client = outbound_rig(limit=2)
    calls = [call(rig, n) for n in range(4)]
    assert request_ids(client) == ["req-0", "req-1"]
    assert rig.pipeline.outbound_load("b.example") == (2, 2)
    for d in calls:
        assert_no_result(d)


def test_other_destinations_are_not_held_up():
    rig, client = outbound_rig(limit=1)
    call(rig, 0)
    call(rig, 1)
    call(rig, 2, "c.example")
    assert request_ids(client) == ["req-0", "req-2"]


def test_waiting_calls_go_out_first_come_first_served():
    rig, client = outbound_rig(limit=2, queue=10)
    calls = [call(rig, n) for n in range(6)]
    client.answer(1)
    assert success_result_of(calls[1]).code == 200
    assert request_ids(client) == ["req-0", "req-1", "req-2"]
    client.answer(0)
    client.answer(2)
    assert request_ids(client) == ["req-0", "req-1", "req-2", "req-3", "req-4"]
    assert rig.pipeline.outbound_load("b.example") == (2, 1)
    # a failed call frees its slot too
    client.sent[3][2].errback(RuntimeError("boom"))
    failure_result_of(calls[3], RuntimeError)
    assert request_ids(client)[-1] == "req-5"
    client.answer(4)
    client.answer(5)
    for d in calls[4:]:
        assert success_result_of(d).code == 200
    assert rig.pipeline.outbound_load("b.example") == (0, 0)
    assert rig.pipeline._outbound == {}


def test_a_full_queue_refuses_at_once():
    rig, client = outbound_rig(limit=1, queue=2)
    calls = [call(rig, n) for n in range(3)]
    refused = call(rig, 3)
    error = labelled_failure(refused, "federation-overloaded")
    assert error.code == 503
    assert "max_outbound_per_destination" in error.message
    assert error.data == {"type": "federation", "domain": "b.example", "path": "/federation/brig/get-user"}
    assert len(client.sent) == 1
    # once one is answered there is room again
    client.answer(0)
    assert success_result_of(calls[0]).code == 200
    assert_no_result(call(rig, 4))
    assert rig.pipeline.outbound_load("b.example") == (1, 2)


def test_no_queue_at_all():
    rig, _ = outbound_rig(limit=1, queue=0)
    call(rig, 0)
    labelled_failure(call(rig, 1), "federation-overloaded")


def test_a_cancelled_waiter_leaves_the_queue():
    rig, client = outbound_rig(limit=1, queue=2)
    first = call(rig, 0)
    second = call(rig, 1)
    third = call(rig, 2)
    second.cancel()
    failure_result_of(second, CancelledError)
    assert rig.pipeline.outbound_load("b.example") == (1, 1)
    # its place is free: one more may wait
    fourth = call(rig, 3)
    assert rig.pipeline.outbound_load("b.example") == (1, 2)
    client.answer(0)
    assert success_result_of(first).code == 200
    assert request_ids(client) == ["req-0", "req-2"]
    client.answer(1)
    assert success_result_of(third).code == 200
    assert request_ids(client) == ["req-0", "req-2", "req-3"]
    client.answer(2)
    assert success_result_of(fourth).code == 200
    assert rig.pipeline._outbound == {}


def test_a_cancelled_call_in_flight_frees_its_slot():
    rig, client = outbound_rig(limit=1, queue=2)
    first = call(rig, 0)
    second = call(rig, 1)
    first.cancel()
    failure_result_of(first, CancelledError)
    assert request_ids(client) == ["req-0", "req-1"]
    client.answer(1)
    assert success_result_of(second).code == 200


def test_the_wait_counts_against_the_deadline():
    from twisted.internet.task import Clock

    clock = Clock()
    rig, _ = outbound_rig(limit=1, queue=2)
    call(rig, 0)
    waiting = call(rig, 1)
    waiting.addTimeout(5, clock)
    clock.advance(5)
    failure_result_of(waiting, Exception)
    assert rig.pipeline.outbound_load("b.example") == (1, 0)


def test_overload_is_reported_to_observers():
    rig, _ = outbound_rig(limit=1, queue=0)
    seen: list = []
    rig.pipeline.observers.append(seen.append)
    call(rig, 0)
    labelled_failure(call(rig, 1), "federation-overloaded")
    assert [(o.direction, o.domain, o.label, o.code) for o in seen] == [
        ("outbound", "b.example", "federation-overloaded", 503)
    ]


# inbound


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def inbound_rig(*, concurrent: int = 64, rate: float = 200.0, pending: bool = False):
    rig = make_rig()
    rig.pipeline.max_inbound_per_peer = concurrent
    rig.pipeline.inbound_rate_per_peer = rate
    clock = Clock()
    rig.pipeline.timer = clock
    held: List[Deferred] = []
    if pending:
        rig.pipeline.components["brig"] = HeldComponent(held)
    return rig, clock, held


class HeldComponent:
    """A component whose every answer waits until the test fires it."""

    def __init__(self, held: List[Deferred]) -> None:
        self.held = held

    def handle(self, call: Any) -> Deferred:
        d: Deferred = Deferred()
        self.held.append(d)
        return d


def handle(rig, n: int = 0) -> Deferred:
    return rig.pipeline.handle_inbound(make_inbound(), "brig", "get-user", f"req-{n}")


def test_concurrent_inbound_calls_per_peer_are_bounded():
    rig, _, held = inbound_rig(concurrent=2, pending=True)
    first, second = handle(rig, 0), handle(rig, 1)
    assert len(held) == 2
    error = labelled_failure(handle(rig, 2), "too-many-requests")
    assert error.code == 429
    assert ("Retry-After", "1") in error.headers
    assert "max_inbound_per_peer" in error.message
    assert len(held) == 2  # the component never saw it
    held[0].callback(json_response(200, {}))
    assert success_result_of(first).code == 200
    third = handle(rig, 3)
    assert len(held) == 3
    held[1].callback(json_response(200, {}))
    held[2].errback(RuntimeError("boom"))
    success_result_of(second)
    failure_result_of(third, RuntimeError)
    assert rig.pipeline._inbound["b.example"].active == 0


def test_the_rate_per_peer_is_a_token_bucket():
    rig, clock, _ = inbound_rig(rate=2)
    assert success_result_of(handle(rig)).code == 200
    assert success_result_of(handle(rig)).code == 200
    error = labelled_failure(handle(rig), "too-many-requests")
    assert error.headers == [("Retry-After", "1")]
    assert "inbound_rate_per_peer" in error.message
    assert len(rig.component.calls) == 2
    clock.now += 0.5  # one token back
    assert success_result_of(handle(rig)).code == 200
    labelled_failure(handle(rig), "too-many-requests")
    clock.now += 100  # the bucket holds no more than the burst
    for _ in range(2):
        success_result_of(handle(rig))
    labelled_failure(handle(rig), "too-many-requests")


def test_retry_after_for_a_slow_rate():
    rig, clock, _ = inbound_rig(rate=0.25)
    labelled_failure(handle(rig), "too-many-requests")  # the burst is under one call
    clock.now += 1
    error = labelled_failure(handle(rig), "too-many-requests")
    assert error.headers == [("Retry-After", "3")]


def test_limits_are_per_peer_and_come_after_authentication():
    from fedserver.errors import AuthenticationFailure

    rig, _, _ = inbound_rig(rate=1)
    success_result_of(handle(rig))
    labelled_failure(handle(rig), "too-many-requests")
    rig.authenticator.peer = AuthenticationFailure("no")
    labelled_failure(handle(rig), "authentication-failure")


def test_idle_peers_are_forgotten(monkeypatch):
    import fedserver.pipeline as pipeline

    monkeypatch.setattr(pipeline, "_PEERS_KEPT", 1)
    rig, clock, _ = inbound_rig(rate=1)
    success_result_of(handle(rig))
    assert list(rig.pipeline._inbound) == ["b.example"]
    clock.now += 10
    rig.pipeline._admit_inbound("c.example")
    assert list(rig.pipeline._inbound) == ["c.example"]


def test_429_with_retry_after_on_the_inward_listener():
    rig, _, held = inbound_rig(concurrent=1, pending=True)
    root = ListenerRoot("inward listener")
    root.mount(b"federation", InwardFederationResource(rig.pipeline, max_body_bytes=1000))
    headers = ((b"Wire-Origin-Domain", b"b.example"), (b"Content-Type", b"application/json"))
    first = HTTPConnection.to(site_for(root, max_body_bytes=1000))
    second = HTTPConnection.to(site_for(root, max_body_bytes=1000))
    with capturedLogs():
        first.request(b"POST", b"/federation/brig/get-user", b"{}", headers)
        second.request(b"POST", b"/federation/brig/get-user", b"{}", headers)
    answer = second.answer()
    answer.labelled(429, "too-many-requests")
    assert answer.header("retry-after") == "1"
    assert len(held) == 1
    with capturedLogs():
        held[0].callback(Response(200, [("Content-Type", "application/json")], b"{}"))
    assert first.answer().code == 200
    assert json.loads(answer.body)["data"] == {"type": "federation", "domain": "b.example"}
