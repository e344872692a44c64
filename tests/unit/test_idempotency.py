"""
Tests for fedserver.idempotency: inbound calls with C{Fedserver-Idempotency-Key}
run once per origin and key, on a real SQLite L{Store} (its threads need the
real reactor: pytest-twisted, every wait bounded) with the deduplicator's
clock a L{Clock}.
"""

from __future__ import annotations

import json
import sqlite3
from typing import Any, List, Optional

import attrs
import pytest
import pytest_twisted
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.logger import capturedLogs

from fedserver.errors import FederationError
from fedserver.idempotency import IDEMPOTENCY_HEADER, Deduplicator, check_key, fingerprint, kept
from fedserver.storage import Store
from fedserver.values import FederatedCall, Peer, Response
from tests.unit.helpers import json_response, make_inbound, make_rig, outcome
from tests.unit.wire_helpers import bounded

B, C = "b.example", "c.example"
START = 1_700_000_000.0
TTL = 3600.0
PENDING = 60.0


@attrs.define
class Component:
    """Records calls; answers with C{answers} in turn (the last again and again), or holds them."""

    answers: List[Any] = attrs.Factory(lambda: [json_response(200, {"done": 1})])
    calls: List[FederatedCall] = attrs.Factory(list)
    held: List[Deferred] = attrs.Factory(list)
    hold: bool = False

    def handle(self, call: FederatedCall) -> Deferred:
        self.calls.append(call)
        if self.hold:
            d: Deferred = Deferred()
            self.held.append(d)
            return d
        value = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        return outcome(value)


@pytest.fixture
def clock() -> Clock:
    clock = Clock()
    clock.advance(START)
    return clock


@pytest.fixture
def store(tmp_path):
    from twisted.internet import reactor

    made = Store(f"sqlite:{tmp_path / 'd.sqlite'}", reactor=reactor)
    yield made
    made.stopService()


@pytest.fixture
def dedup(store, clock) -> Deduplicator:
    made = Deduplicator(store, clock=clock, ttl=TTL, pending_timeout=PENDING)
    store.migrate()
    store.startService()
    return made


def call(key: Optional[str] = "k-1", *, origin: str = B, body: bytes = b'{"a": 1}', rpc: str = "on-x") -> FederatedCall:
    headers = [("Content-Type", "application/json")]
    if key is not None:
        headers.append((IDEMPOTENCY_HEADER, key))
    return FederatedCall(origin_domain=origin, target_domain="a.example", component="galley", rpc=rpc,
                         method="POST", headers=headers, body=body, request_id="r",
                         peer=Peer(identities={f"fed.{origin}"}, claimed_domain=origin))


def rows(store: Store) -> list:
    connection = sqlite3.connect(store.path)
    try:
        return connection.execute(
            "SELECT origin, idem_key, code, content_type, body FROM fedserver_idempotency ORDER BY origin"
        ).fetchall()
    finally:
        connection.close()


def label_of(d: Deferred) -> str:
    results: list = []
    d.addBoth(results.append)
    assert results and results[0].check(FederationError), results
    return results[0].value.label


def test_keys_fingerprints_and_what_is_kept():
    assert check_key("a-Z_0.9:@/+=") == "a-Z_0.9:@/+="
    for bad in ("", "a b", "x" * 129, "é", "a\n"):
        with pytest.raises(FederationError) as info:
            check_key(bad)
        assert info.value.label == "invalid-idempotency-key"
    assert fingerprint(call()) == fingerprint(call(origin=C, key="other"))
    assert fingerprint(call()) != fingerprint(call(body=b'{"a": 2}'))
    assert fingerprint(call()) != fingerprint(call(rpc="on-y"))
    assert [kept(code) for code in (200, 201, 400, 404, 408, 409, 422, 429, 500, 503)] == [
        True, True, True, True, False, True, True, False, False, False]


@pytest_twisted.ensureDeferred
async def test_a_repeat_gets_the_kept_answer_without_the_component(dedup, store):
    component = Component(answers=[Response(201, [("Content-Type", "application/x"), ("X-Other", "1")], b"\x00ok")])
    first = await bounded(dedup.handle(call(), component))
    assert (first.code, first.body) == (201, b"\x00ok")
    with capturedLogs() as events:
        again = await bounded(dedup.handle(call(), component))
    assert (again.code, again.headers, again.body) == (201, (("Content-Type", "application/x"),), b"\x00ok")
    assert len(component.calls) == 1 and dedup.replayed == 1
    assert any("as the first time" in str(e.get("log_format")) for e in events)
    # the same key from another origin is another call; no key, no deduplication
    await bounded(dedup.handle(call(origin=C), component))
    await bounded(dedup.handle(call(key=None), component))
    await bounded(dedup.handle(call(key=None), component))
    assert len(component.calls) == 4
    assert rows(store) == [(B, "k-1", 201, "application/x", b"\x00ok"), (C, "k-1", 201, "application/x", b"\x00ok")]


@pytest_twisted.ensureDeferred
async def test_a_deterministic_refusal_is_kept_too(dedup):
    refusal = json_response(422, {"code": 422, "label": "unknown-key-package", "message": "used up"})
    component = Component(answers=[refusal, json_response(200, {})])
    assert (await bounded(dedup.handle(call(), component))).code == 422
    assert (await bounded(dedup.handle(call(), component))).code == 422
    assert len(component.calls) == 1


@pytest.mark.parametrize("failure", [
    json_response(503, {"label": "down"}),
    Response(429, [], b""),
    FederationError("the component is down", "component-unavailable"),
    RuntimeError("a bug"),
])
@pytest_twisted.ensureDeferred
async def test_what_may_mend_is_not_kept(dedup, store, failure):
    component = Component(answers=[failure, json_response(200, {"done": 2})])
    first = dedup.handle(call(), component)
    try:
        await bounded(first)
    except (FederationError, RuntimeError):
        pass
    assert rows(store) == []  # the key is released
    again = await bounded(dedup.handle(call(), component))
    assert json.loads(again.body) == {"done": 2} and len(component.calls) == 2


@pytest_twisted.ensureDeferred
async def test_a_repeat_while_the_first_runs_waits_for_its_answer(dedup):
    component = Component(hold=True)
    first = dedup.handle(call(), component)
    await defer.succeed(None)
    with capturedLogs():
        second = dedup.handle(call(), component)
    # another body under the same key is refused at once
    assert label_of(dedup.handle(call(body=b"{}"), component)) == "idempotency-key-reused"
    from tests.unit.wire_helpers import eventually

    await eventually(lambda: len(component.held) == 1, what="the component's call")
    component.held[0].callback(json_response(200, {"once": True}))
    assert json.loads((await bounded(first)).body) == {"once": True}
    assert json.loads((await bounded(second)).body) == {"once": True}
    assert len(component.calls) == 1


@pytest_twisted.ensureDeferred
async def test_the_component_finishes_when_the_sender_goes_away(dedup, store):
    from tests.unit.wire_helpers import eventually

    component = Component(hold=True)
    first = dedup.handle(call(), component)
    await eventually(lambda: len(component.held) == 1, what="the component's call")
    first.cancel()  # the sender's connection was cut, or the route's deadline passed
    assert not component.held[0].called
    component.held[0].callback(json_response(200, {"kept": True}))
    await eventually(lambda: rows(store) and rows(store)[0][2] == 200, what="the answer to be kept")
    again = await bounded(dedup.handle(call(), component))
    assert json.loads(again.body) == {"kept": True} and len(component.calls) == 1


@pytest_twisted.ensureDeferred
async def test_a_key_reused_for_another_call_is_refused(dedup):
    component = Component()
    await bounded(dedup.handle(call(), component))
    for other in (call(body=b'{"a": 2}'), call(rpc="on-y")):
        with pytest.raises(FederationError) as info:
            await bounded(dedup.handle(other, component))
        assert info.value.label == "idempotency-key-reused" and info.value.code == 422
    assert len(component.calls) == 1


@pytest_twisted.ensureDeferred
async def test_a_bad_key_is_refused(dedup):
    component = Component()
    assert label_of(dedup.handle(call(key="not ok"), component)) == "invalid-idempotency-key"
    assert component.calls == []


@pytest_twisted.ensureDeferred
async def test_a_claim_of_another_worker(dedup, store, clock):
    component = Component()
    now = int(clock.seconds() * 1000)
    await bounded(store.run_operation(
        "INSERT INTO fedserver_idempotency (origin, idem_key, fingerprint, created) VALUES (?, ?, ?, ?)",
        (B, "k-1", fingerprint(call()), now - 1000)))
    # fresh: that worker is handling it
    with pytest.raises(FederationError) as info:
        await bounded(dedup.handle(call(), component))
    assert (info.value.label, info.value.code) == ("request-in-progress", 409)
    assert component.calls == []
    # abandoned (its worker died): taken over
    clock.advance(PENDING)
    assert (await bounded(dedup.handle(call(), component))).code == 200
    assert len(component.calls) == 1


@pytest_twisted.ensureDeferred
async def test_answers_expire_and_are_pruned(dedup, store, clock):
    component = Component()
    await bounded(dedup.handle(call("old"), component))
    clock.advance(TTL / 2)
    await bounded(dedup.handle(call("new"), component))
    clock.advance(TTL / 2 + 1)
    # past the TTL the call runs again (and is kept anew)
    await bounded(dedup.handle(call("old", body=b'{"other": 1}'), component))
    assert len(component.calls) == 3
    clock.advance(TTL / 2)
    await bounded(dedup.prune())
    assert [key for _, key, *_ in rows(store)] == ["old"]


@pytest_twisted.ensureDeferred
async def test_the_service_prunes(store, clock):
    dedup = Deduplicator(store, clock=clock, ttl=TTL, pending_timeout=PENDING)
    store.migrate()
    store.startService()
    await bounded(dedup.handle(call(), Component()))
    dedup.startService()
    clock.advance(TTL + 60)  # the first pruning, a minute after start
    from tests.unit.wire_helpers import eventually

    await eventually(lambda: rows(store) == [] and dedup._prune_call is not None, what="the pruning")
    dedup.stopService()
    assert dedup._prune_call is None


@pytest_twisted.ensureDeferred
async def test_the_pipeline_deduplicates_keyed_inbound_calls(dedup):
    rig = make_rig()
    rig.pipeline.deduplicator = dedup
    keyed = make_inbound(headers=(("Wire-Origin-Domain", B), ("Content-Type", "application/json"),
                                  (IDEMPOTENCY_HEADER, "k-9")))
    for _ in range(2):
        answer = await bounded(rig.pipeline.handle_inbound(keyed, "brig", "get-user", "r"))
        assert answer.code == 200
    assert len(rig.component.calls) == 1
    # still authenticated and authorized every time
    assert [e for e, _ in rig.events].count("authenticate") == 2
    await bounded(rig.pipeline.handle_inbound(make_inbound(), "brig", "get-user", "r"))
    assert len(rig.component.calls) == 2
