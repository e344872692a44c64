"""
Tests for fedserver.outbound_queue: the durable outbound queue on a real
SQLite L{Store} (its adbapi threads need the real reactor, so these tests
run under pytest-twisted, every wait bounded) with its timers on a
L{Clock}, and a fake pipeline that records calls and answers them as told.
Also the C{[queue]} table, the outward listener's queued delivery and
C{fedserver queue}.
"""

from __future__ import annotations

import io
import json
import sqlite3
from types import SimpleNamespace
from typing import Any, Dict, List, Optional, Tuple

import attrs
import pytest
import pytest_twisted
from prometheus_client.metrics_core import Metric
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.logger import capturedLogs

from fedserver.config import QueueSettings, parse_config
from fedserver.errors import ConfigError, FederationError
from fedserver.outbound_queue import (
    STOP_TIMEOUT,
    OutboundQueue,
    backoff_delay,
    dead_letters,
    delete_dead,
    describe_destinations,
    drop_destination,
    queue_metrics,
    requeue_dead,
    retry_destination,
)
from fedserver.outward import OutwardRPCResource
from fedserver.pipeline import CallOutcome
from fedserver.queue_cli import duration, run_queue_command
from fedserver.storage import Store
from fedserver.values import FederatedCall, Response
from fedserver.web import ListenerRoot
from tests.unit.helpers import HTTPConnection, json_response, make_rig, minimal_config_file, outcome, site_for
from tests.unit.wire_helpers import bounded, eventually

A, B, C = "a.example", "b.example", "c.example"
KEY_HEADER = "Fedserver-Idempotency-Key"
#: where the queue's clock starts (seconds since the epoch)
START = 1_700_000_000.0


def ok() -> Response:
    return json_response(200, {})


def refused() -> FederationError:
    return FederationError("no connection", "federation-connection-refused")


@attrs.define
class Remote:
    """
    Stands in for the pipeline: records every call; answers each with the
    next of C{answers[destination]} (the last one again and again; by
    default 200), or, while C{hold}, with a L{Deferred} the test fires.
    """

    answers: Dict[str, List[Any]] = attrs.Factory(dict)
    calls: List[FederatedCall] = attrs.Factory(list)
    held: List[Tuple[FederatedCall, Deferred]] = attrs.Factory(list)
    hold: bool = False

    def call_remote(self, call: FederatedCall) -> Deferred:
        self.calls.append(call)
        if self.hold:
            d: Deferred = Deferred()
            self.held.append((call, d))
            return d
        answers = self.answers.get(call.target_domain, [ok()])
        value = answers.pop(0) if len(answers) > 1 else answers[0]
        return outcome(value)

    def to(self, destination: str) -> List[FederatedCall]:
        return [c for c in self.calls if c.target_domain == destination]

    def bodies(self, destination: str) -> List[Any]:
        return [json.loads(c.body) for c in self.to(destination)]


@pytest.fixture
def store(tmp_path):
    """A migrated, running store with the queue's schema; stopped afterwards."""
    from twisted.internet import reactor

    made = Store(f"sqlite:{tmp_path / 'queue.sqlite'}", reactor=reactor)
    made.path_for_tests = tmp_path / "queue.sqlite"  # type: ignore[attr-defined]
    yield made
    made.stopService()


@pytest.fixture
def queues(store):
    """C{make(remote, clock=None, worker="w1", **settings)}: a running queue on the store, stopped afterwards."""
    made: List[OutboundQueue] = []

    def make(remote: Any, *, clock: Optional[Clock] = None, worker: str = "w1", rand: Any = lambda: 0.5,
             start: bool = True, **settings: Any) -> OutboundQueue:
        if clock is None:
            clock = Clock()
            clock.advance(START)
        queue = OutboundQueue(store, lambda: remote, backend_domain=A, settings=QueueSettings(**settings),
                              clock=clock, worker_id=worker, delivery_timeout=30.0, rand=rand)
        if not store.running:
            store.migrate()
            store.startService()
        if start:
            queue.startService()
        made.append(queue)
        return queue

    yield make
    for queue in made:
        if queue.running:
            queue.stopService()


def rows(store: Store, sql: str, params: tuple = ()) -> list:
    connection = sqlite3.connect(str(store.path_for_tests))  # type: ignore[attr-defined]
    try:
        return connection.execute(sql, params).fetchall()
    finally:
        connection.close()


async def tick(queue: OutboundQueue, clock: Clock, seconds: float = 1.0) -> None:
    """Once the next poll is due, advance C{clock} by C{seconds} and wait for that poll."""
    await eventually(lambda: queue._poll_call is not None, what="the next poll to be due")
    polls = queue.polls
    clock.advance(seconds)
    await eventually(lambda: queue.polls > polls, what="a poll")


async def state(queue: OutboundQueue, destination: str = B) -> Dict[str, Any]:
    found = await bounded(queue.describe(destination))
    assert found is not None
    return found


def body(n: int) -> bytes:
    return json.dumps({"n": n}).encode()


# the backoff


def test_backoff_doubles_up_to_the_cap_with_jitter():
    settings = QueueSettings(initial_backoff=10, backoff_multiplier=2, max_backoff=4000, jitter=0.2)
    assert [backoff_delay(n, settings, 0.5) for n in range(1, 11)] == [
        10, 20, 40, 80, 160, 320, 640, 1280, 2560, 4000]
    assert backoff_delay(1, settings, 0.0) == pytest.approx(8)
    assert backoff_delay(1, settings, 1.0) == pytest.approx(12)
    assert backoff_delay(30, settings, 0.999) == pytest.approx(4000 * 1.1996)
    # no float overflow however long a destination is down
    assert backoff_delay(10**9, settings, 0.5) == 4000
    # Retry-After is honoured, up to the cap
    assert backoff_delay(1, settings, 0.5, retry_after=300) == 300
    assert backoff_delay(1, settings, 0.5, retry_after=10**6) == 4000
    assert backoff_delay(1, QueueSettings(jitter=0, backoff_multiplier=1), 0.9) == 10


# the [queue] table


def parse_queue(table: Dict[str, Any]) -> QueueSettings:
    raw = {"server": {"backend_domain": A}, "inward": {"listen": "tcp:1"}, "discovery": {"plugin": "static"},
           "authenticator": {"plugin": "mtls"}, "queue": table}
    return parse_config(raw, file="/etc/f.toml", base_dir="/etc").queue


def test_queue_settings_defaults_and_values():
    assert parse_queue({}) == QueueSettings()
    defaults = QueueSettings()
    assert (defaults.initial_backoff, defaults.max_backoff, defaults.max_lifetime, defaults.dedup_ttl) == (
        10.0, 4000.0, 5 * 86400.0, 6 * 86400.0)
    settings = parse_queue({"initial_backoff": 1, "backoff_multiplier": 3, "max_backoff": 60, "jitter": 0,
                            "max_lifetime": 3600, "dead_letter_ttl": 86400, "dedup_ttl": 7200,
                            "poll_interval": 0.5, "concurrency": 8, "worker_id": "host-1"})
    assert settings == QueueSettings(1.0, 3.0, 60.0, 0.0, 3600.0, 86400.0, 7200.0, 0.5, 8, "host-1")
    # a small initial backoff without max_backoff keeps the default cap
    assert parse_queue({"initial_backoff": 0.5}).max_backoff == 4000


@pytest.mark.parametrize("table, key, message", [
    ({"initial_backoff": 0}, "initial_backoff", "at least 0.01"),
    ({"jitter": 1}, "jitter", "at most 0.9"),
    ({"max_backoff": 5, "initial_backoff": 10}, "max_backoff", "must not be less than initial_backoff"),
    ({"max_lifetime": "5d"}, "max_lifetime", "must be a number"),
    ({"concurrency": 0}, "concurrency", "at least 1"),
    ({"poll_interval": 0.001}, "poll_interval", "at least 0.05"),
    ({"worker_id": "a\nb"}, "worker_id", "printable"),
    ({"retries": 3}, "retries", "not a known option"),
])
def test_queue_settings_refusals(table, key, message):
    with pytest.raises(ConfigError, match=message) as info:
        parse_queue(table)
    assert info.value.path == f"[queue] {key}"


# putting items in


@pytest_twisted.ensureDeferred
async def test_an_item_is_acknowledged_once_committed(queues, store):
    remote = Remote(hold=True)
    queue = queues(remote, start=False)
    item_id = await bounded(queue.enqueue(B, "galley", "on-message-sent", body(1),
                                          headers=[("X-Wire-API-Version", "v6"), ("Cookie", "c")]))
    # another connection sees it: it is committed
    [row] = rows(store, "SELECT id, destination, seq, component, rpc, headers, body, idempotency_key, attempts "
                        "FROM fedserver_queue")
    assert row == (item_id, B, 1, "galley", "on-message-sent", '[["X-Wire-API-Version", "v6"]]', body(1),
                   item_id, 0)
    # a stopped queue sends nothing
    assert remote.calls == []


def test_what_an_item_may_be(store):
    queue = OutboundQueue(store, lambda: None, backend_domain=A, settings=QueueSettings(), clock=Clock(),
                          worker_id="w", delivery_timeout=1)
    with pytest.raises(FederationError) as info:
        queue.item(B, "galley", "x", b"{not json")
    assert info.value.label == "invalid-json"
    with pytest.raises(FederationError) as info:
        queue.item(B, "galley", "x", b"{}", idempotency_key="has space")
    assert info.value.label == "invalid-idempotency-key"
    for destination, component, rpc in [("B.example", "galley", "x"), (B, "gal/ley", "x"), (B, "galley", "")]:
        with pytest.raises(ValueError):
            queue.item(destination, component, rpc, b"{}")
    item = queue.item(B, "galley", "x", b"", idempotency_key="k-1", request_id="r-1")
    assert (item.idempotency_key, item.request_id, item.body) == ("k-1", "r-1", b"")


# delivering


@pytest_twisted.ensureDeferred
async def test_items_are_delivered_in_order_once_each_with_their_key(queues, store):
    remote = Remote()
    queue = queues(remote)
    ids = [await bounded(queue.enqueue(B, "galley", "on-message-sent", body(n), request_id=f"r{n}"))
           for n in range(5)]
    ids_c = [await bounded(queue.enqueue(C, "galley", "on-message-sent", body(n))) for n in range(3)]
    await eventually(lambda: len(remote.calls) == 8, what="every delivery")
    assert remote.bodies(B) == [{"n": n} for n in range(5)]
    assert remote.bodies(C) == [{"n": n} for n in range(3)]
    assert [c.header(KEY_HEADER) for c in remote.to(B)] == ids
    assert [c.header(KEY_HEADER) for c in remote.to(C)] == ids_c
    first = remote.to(B)[0]
    assert (first.origin_domain, first.component, first.rpc, first.method, first.request_id) == (
        A, "galley", "on-message-sent", "POST", "r0")
    await bounded(queue.idle())
    assert rows(store, "SELECT COUNT(*) FROM fedserver_queue") == [(0,)]
    assert (await state(queue))["failures"] == 0
    assert queue.delivered == 8


@pytest_twisted.ensureDeferred
async def test_one_call_in_flight_per_destination(queues):
    remote = Remote(hold=True)
    queue = queues(remote)
    for n in range(3):
        await bounded(queue.enqueue(B, "galley", "x", body(n)))
    await bounded(queue.enqueue(C, "galley", "x", body(9)))
    await eventually(lambda: len(remote.held) == 2, what="one call to each destination")
    assert sorted(json.loads(c.body)["n"] for c, _ in remote.held) == [0, 9]
    await defer.succeed(None)
    assert len(remote.held) == 2  # b's next waits for its head
    for n in (1, 2):
        [(_, d)] = [(c, d) for c, d in remote.held if c.target_domain == B and not d.called]
        d.callback(ok())
        await eventually(lambda n=n: len(remote.to(B)) == n + 1, what=f"b's item {n}")
        assert remote.bodies(B)[-1] == {"n": n}
    for _, d in remote.held:
        if not d.called:
            d.callback(ok())
    await bounded(queue.idle())


@pytest_twisted.ensureDeferred
async def test_a_failure_that_may_mend_backs_off_and_retries(queues, store):
    clock = Clock()
    clock.advance(START)
    remote = Remote(answers={B: [refused(), json_response(503, {"label": "down"}), ok()]})
    queue = queues(remote, clock=clock)
    await bounded(queue.enqueue(B, "galley", "x", body(1)))
    await bounded(queue.enqueue(B, "galley", "x", body(2)))
    await eventually(lambda: len(remote.calls) == 1, what="the first attempt")
    await bounded(queue.idle())
    found = await state(queue)
    assert (found["depth"], found["failures"], found["next_attempt_in"]) == (2, 1, 10)
    assert found["last_error"].startswith("federation-connection-refused")
    assert found["oldest_age"] == 0
    # nothing is sent before the backoff ends
    for _ in range(9):
        await tick(queue, clock)
    assert len(remote.calls) == 1
    await tick(queue, clock)
    await eventually(lambda: len(remote.calls) == 2, what="the retry")
    await bounded(queue.idle())
    found = await state(queue)
    assert (found["failures"], found["next_attempt_in"]) == (2, 20)  # doubled
    assert "503" in found["last_error"]
    for _ in range(20):
        await tick(queue, clock)
    await eventually(lambda: len(remote.calls) == 4, what="both items")
    assert [json.loads(c.body)["n"] for c in remote.calls] == [1, 1, 1, 2]
    # every attempt of an item carries its key
    assert len({c.header(KEY_HEADER) for c in remote.calls[:3]}) == 1
    await bounded(queue.idle())
    assert (await state(queue))["failures"] == 0
    assert rows(store, "SELECT COUNT(*) FROM fedserver_queue") == [(0,)]


@pytest_twisted.ensureDeferred
async def test_jitter_and_retry_after(queues):
    clock = Clock()
    clock.advance(START)
    remote = Remote(answers={B: [refused()], C: [Response(429, [("Retry-After", "120")], b"")]})
    queue = queues(remote, clock=clock, rand=lambda: 0.0)
    await bounded(queue.enqueue(B, "galley", "x", body(1)))
    await bounded(queue.enqueue(C, "galley", "x", body(1)))
    await eventually(lambda: len(remote.calls) == 2, what="both attempts")
    await bounded(queue.idle())
    assert (await state(queue, B))["next_attempt_in"] == 8  # 10 s less 20 %
    assert (await state(queue, C))["next_attempt_in"] == 120


@pytest.mark.parametrize("answer, label", [
    (json_response(404, {"code": 404, "label": "no-conversation", "message": "no"}), "federation-remote-error"),
    (json_response(409, {"code": 409, "label": "stale-epoch", "message": "no"}), "federation-remote-error"),
    (FederationError("not allowed", "federation-denied"), "federation-denied"),
    (FederationError("no such domain", "invalid-domain"), "invalid-domain"),
])
@pytest_twisted.ensureDeferred
async def test_a_refusal_for_good_is_a_dead_letter_at_once(queues, store, answer, label):
    remote = Remote(answers={B: [answer, ok()]})
    queue = queues(remote)
    with capturedLogs() as events:
        first = await bounded(queue.enqueue(B, "galley", "x", body(1)))
        await bounded(queue.enqueue(B, "galley", "x", body(2)))
        await eventually(lambda: len(remote.calls) == 2, what="both items")
        await bounded(queue.idle())
    assert any("dead letters" in str(e.get("log_format")) for e in events)
    [letter] = await bounded(store.run_interaction(dead_letters))
    assert (letter["id"], letter["destination"], letter["reason"], letter["attempts"]) == (first, B, "refused", 1)
    assert letter["error"]["label"] == label
    assert letter["error"]["data"] == {"type": "federation", "domain": B, "path": "/federation/galley/x"}
    found = await state(queue)
    assert (found["depth"], found["failures"], found["dead"]) == (0, 0, 1)
    assert queue.dead == 1


@pytest_twisted.ensureDeferred
async def test_in_progress_elsewhere_and_timeouts_are_retried(queues, store):
    clock = Clock()
    clock.advance(START)
    busy = json_response(409, {"code": 409, "label": "request-in-progress", "message": "later"})
    remote = Remote(answers={B: [busy], C: [Response(408, [], b"")]})
    queue = queues(remote, clock=clock)
    await bounded(queue.enqueue(B, "galley", "x", body(1)))
    await bounded(queue.enqueue(C, "galley", "x", body(1)))
    await eventually(lambda: len(remote.calls) == 2, what="both attempts")
    await bounded(queue.idle())
    assert (await state(queue, B))["failures"] == 1
    assert (await state(queue, C))["failures"] == 1
    assert rows(store, "SELECT COUNT(*) FROM fedserver_queue_dead") == [(0,)]


@pytest_twisted.ensureDeferred
async def test_an_attempt_that_takes_too_long_is_retried(queues):
    clock = Clock()
    clock.advance(START)
    remote = Remote(hold=True)
    queue = queues(remote, clock=clock)
    await bounded(queue.enqueue(B, "galley", "x", body(1)))
    await eventually(lambda: len(remote.held) == 1, what="the attempt")
    clock.advance(30)  # delivery_timeout
    await bounded(queue.idle())
    found = await state(queue)
    assert found["failures"] == 1 and found["last_error"].startswith("federation-timeout")


@pytest_twisted.ensureDeferred
async def test_an_item_past_its_lifetime_is_given_up(queues, store):
    clock = Clock()
    clock.advance(START)
    remote = Remote(answers={B: [refused()]})
    queue = queues(remote, clock=clock, max_lifetime=100, initial_backoff=60, max_backoff=60)
    old = await bounded(queue.enqueue(B, "galley", "x", body(1)))
    await eventually(lambda: len(remote.calls) == 1, what="the first attempt")
    await bounded(queue.idle())
    clock.advance(61)
    young = await bounded(queue.enqueue(B, "galley", "x", body(2)))
    await eventually(lambda: len(remote.calls) == 2, what="the second attempt")
    await bounded(queue.idle())
    # the next attempt is when the head's lifetime ends, not a backoff later
    assert (await state(queue))["next_attempt_in"] == 39
    with capturedLogs() as events:
        await tick(queue, clock, 39)
        await eventually(lambda: len(remote.calls) == 3, what="the third attempt")
        await bounded(queue.idle())
    assert any("max_lifetime" in str(e.get("log_format")) for e in events)
    [letter] = await bounded(store.run_interaction(dead_letters))
    assert (letter["id"], letter["reason"]) == (old, "expired")
    assert letter["error"] is not None and "federation-connection-refused" in json.dumps(letter["error"])
    # the young one was tried at once, and stays
    assert json.loads(remote.calls[-1].body) == {"n": 2}
    assert rows(store, "SELECT id FROM fedserver_queue") == [(young,)]


@pytest_twisted.ensureDeferred
async def test_a_destination_heard_from_again_is_retried_at_once(queues):
    clock = Clock()
    clock.advance(START)
    remote = Remote(answers={B: [refused(), refused(), ok()]})
    queue = queues(remote, clock=clock)
    await bounded(queue.enqueue(B, "galley", "x", body(1)))
    await eventually(lambda: len(remote.calls) == 1, what="the first attempt")
    await bounded(queue.idle())

    def outcome_of(direction: str, domain: str, label: Optional[str] = None) -> CallOutcome:
        return CallOutcome(direction, domain, "brig", "get-user", label, None, "", 0.1, "r")

    # an error answer, or news of another domain, does not end the backoff
    queue.observe(outcome_of("outbound", B, "federation-remote-error"))
    queue.observe(outcome_of("outbound", C))
    queue.observe(outcome_of("inbound", None))
    await tick(queue, clock)
    assert len(remote.calls) == 1
    # a call from b does, long before the backoff would end
    queue.observe(outcome_of("inbound", B))
    await eventually(lambda: len(remote.calls) == 2, what="the retry")
    await bounded(queue.idle())
    # at most once per initial_backoff
    queue.observe(outcome_of("outbound", B))
    await tick(queue, clock)
    assert len(remote.calls) == 2
    clock.advance(10)
    queue.observe(outcome_of("outbound", B))
    await eventually(lambda: len(remote.calls) == 3, what="the next retry")
    await bounded(queue.idle())
    assert (await state(queue))["depth"] == 0


@pytest_twisted.ensureDeferred
async def test_a_restarted_worker_sends_again_what_was_in_flight(queues, store):
    remote = Remote(hold=True)
    killed = queues(remote, worker="w1")
    ids = [await bounded(killed.enqueue(B, "galley", "x", body(n))) for n in range(3)]
    await eventually(lambda: len(remote.held) == 1, what="the first attempt")
    assert rows(store, "SELECT claimed_by FROM fedserver_queue_destinations") == [("w1",)]
    assert rows(store, "SELECT attempts FROM fedserver_queue ORDER BY seq") == [(1,), (0,), (0,)]
    # "killed": it never does anything again (its clock stands still, its call never answers)
    killed.running = False
    # another worker waits for the claim to expire
    clock = Clock()
    clock.advance(START)
    other_remote = Remote()
    other = queues(other_remote, clock=clock, worker="w2")
    await tick(other, clock)
    await tick(other, clock)
    assert other_remote.calls == []
    await other.stopService()
    # the same worker, restarted, takes its claim back at once and sends everything in order
    again_remote = Remote()
    restarted_clock = Clock()
    restarted_clock.advance(START)
    restarted = queues(again_remote, worker="w1", clock=restarted_clock)
    await tick(restarted, restarted_clock)
    await eventually(lambda: len(again_remote.calls) == 3, what="the deliveries after the restart")
    assert [c.header(KEY_HEADER) for c in again_remote.calls] == ids
    assert again_remote.calls[0].header(KEY_HEADER) == remote.held[0][0].header(KEY_HEADER)
    await bounded(restarted.idle())
    assert rows(store, "SELECT COUNT(*) FROM fedserver_queue") == [(0,)]


@pytest_twisted.ensureDeferred
async def test_a_claim_that_expired_is_taken_over(queues, store):
    remote = Remote(hold=True)
    killed = queues(remote, worker="w1")
    await bounded(killed.enqueue(B, "galley", "x", body(1)))
    await eventually(lambda: len(remote.held) == 1, what="the first attempt")
    killed.running = False
    clock = Clock()
    clock.advance(START + 30 + 60 + 1)  # past delivery_timeout + CLAIM_MARGIN
    other_remote = Remote()
    other = queues(other_remote, clock=clock, worker="w2")
    await tick(other, clock)
    await eventually(lambda: len(other_remote.calls) == 1, what="the take-over")
    await bounded(other.idle())


@pytest_twisted.ensureDeferred
async def test_waiting_for_what_became_of_items(queues, store):
    remote = Remote(answers={B: [json_response(200, {"welcomed": ["x"]})], C: [refused()],
                             "d.example": [json_response(422, {"label": "nope"})]})
    queue = queues(remote)
    items = [queue.item(d, "mimi", "deliver-welcome", body(1)) for d in (B, C, "d.example")]
    # queued in the caller's own transaction
    await bounded(store.run_interaction(queue.insert, items))
    attempts = await bounded(queue.submitted(items, wait=5))
    assert [(a.item_id, a.destination, a.state) for a in attempts] == [
        (items[0].id, B, "delivered"), (items[1].id, C, "queued"), (items[2].id, "d.example", "dead")]
    assert json.loads(attempts[0].response.body) == {"welcomed": ["x"]}
    assert attempts[1].error["label"] == "federation-connection-refused"
    assert attempts[2].error["inner"] == {"label": "nope"}
    await bounded(queue.idle())
    # c backs off: a new item for it is not attempted now, and says so at once
    later = queue.item(C, "mimi", "deliver-welcome", body(2))
    await bounded(store.run_interaction(queue.insert, [later]))
    [attempt] = await bounded(queue.submitted([later], wait=5))
    assert (attempt.state, attempt.error) == ("queued", None)
    assert len(remote.to(C)) == 1


@pytest_twisted.ensureDeferred
async def test_waiting_is_bounded(queues, store):
    clock = Clock()
    clock.advance(START)
    remote = Remote(hold=True)
    queue = queues(remote, clock=clock)
    item = queue.item(B, "mimi", "deliver-welcome", body(1))
    await bounded(store.run_interaction(queue.insert, [item]))
    waiting = queue.submitted([item], wait=3)
    await eventually(lambda: len(remote.held) == 1, what="the attempt")
    clock.advance(3)
    [attempt] = await bounded(waiting)
    assert attempt.state == "queued"
    remote.held[0][1].callback(ok())
    await bounded(queue.idle())


@pytest_twisted.ensureDeferred
async def test_stopping_waits_then_cancels_and_releases(queues, store):
    clock = Clock()
    clock.advance(START)
    remote = Remote(hold=True)
    queue = queues(remote, clock=clock)
    await bounded(queue.enqueue(B, "galley", "x", body(1)))
    await eventually(lambda: len(remote.held) == 1, what="the attempt")
    stopped = queue.stopService()
    await defer.succeed(None)
    assert not stopped.called
    clock.advance(STOP_TIMEOUT)
    await bounded(stopped)
    assert remote.held[0][1].called  # cancelled
    # the item stays, for the next start; nobody holds the destination
    assert rows(store, "SELECT attempts FROM fedserver_queue") == [(1,)]
    assert rows(store, "SELECT claimed_by, failures FROM fedserver_queue_destinations") == [(None, 0)]


@pytest_twisted.ensureDeferred
async def test_concurrency_bounds_the_destinations_delivered_at_once(queues):
    remote = Remote(hold=True)
    queue = queues(remote, concurrency=2)
    for destination in (B, C, "d.example"):
        await bounded(queue.enqueue(destination, "galley", "x", body(1)))
    await eventually(lambda: len(remote.held) == 2, what="two deliveries")
    for _, d in remote.held:
        d.callback(ok())
    await bounded(queue.idle())
    # the third waited for a free place; the next poll starts it
    clock = queue._clock
    await tick(queue, clock)
    await eventually(lambda: len(remote.held) == 3, what="the third")
    remote.held[2][1].callback(ok())
    await bounded(queue.idle())


@pytest_twisted.ensureDeferred
async def test_metrics_and_status(queues):
    clock = Clock()
    clock.advance(START)
    remote = Remote(answers={B: [refused()]})
    queue = queues(remote, clock=clock)
    await bounded(queue.enqueue(B, "galley", "x", body(1)))
    await eventually(lambda: len(remote.calls) == 1, what="the attempt")
    await bounded(queue.idle())
    clock.advance(5)
    await tick(queue, clock)
    assert queue.destinations() == [B]
    families: Dict[str, Metric] = {m.name: m for m in queue_metrics(queue)()}
    [depth] = families["fedserver_queue_depth"].samples
    assert (depth.labels, depth.value) == ({"destination": B}, 1)
    [age] = families["fedserver_queue_oldest_age_seconds"].samples
    assert age.value == pytest.approx(6)
    [failures] = families["fedserver_queue_failures"].samples
    assert failures.value == 1
    attempts = {s.labels["outcome"]: s.value for s in families["fedserver_queue_attempts"].samples}
    assert attempts == {"delivered": 0, "dead": 0, "retry": 1}
    found = await state(queue)
    assert found["delivering"] is None and found["last_attempt"] == START
    assert await bounded(queue.describe("nowhere.example")) is None


# what operators do


@pytest_twisted.ensureDeferred
async def test_operators_retry_drop_and_requeue(queues, store):
    clock = Clock()
    clock.advance(START)
    remote = Remote(answers={B: [refused()]})
    queue = queues(remote, clock=clock)
    ids = [await bounded(queue.enqueue(B, "galley", "x", body(n))) for n in range(3)]
    await eventually(lambda: len(remote.calls) == 1, what="the first attempt")
    await bounded(queue.idle())
    now = int(clock.seconds() * 1000)
    [listed] = await bounded(store.run_interaction(describe_destinations, now))
    assert (listed["destination"], listed["depth"], listed["failures"]) == (B, 3, 1)
    # retry: the running queue takes it up at its next poll
    assert await bounded(store.run_interaction(retry_destination, B)) == 3
    await tick(queue, clock)
    await eventually(lambda: len(remote.calls) == 2, what="the retry")
    await bounded(queue.idle())
    # drop: everything to the dead letters, in order
    assert await bounded(store.run_interaction(drop_destination, B, now)) == 3
    letters = await bounded(store.run_interaction(dead_letters, B))
    assert sorted(letter["id"] for letter in letters) == sorted(ids)
    assert {letter["reason"] for letter in letters} == {"dropped"}
    [listed] = await bounded(store.run_interaction(describe_destinations, now))
    assert (listed["depth"], listed["dead"]) == (0, 3)
    # requeue: back in the queue, in their order, with their keys, tried now
    remote.answers[B] = [ok()]
    assert await bounded(store.run_interaction(requeue_dead, B, now)) == 3
    await tick(queue, clock)
    await eventually(lambda: len(remote.calls) == 5, what="the requeued items")
    assert [c.header(KEY_HEADER) for c in remote.calls[2:]] == ids
    await bounded(queue.idle())
    assert await bounded(store.run_interaction(delete_dead, B)) == 0
    # delete for good
    remote.answers[B] = [json_response(400, {"label": "bad"})]
    await bounded(queue.enqueue(B, "galley", "x", body(9)))
    await eventually(lambda: len(remote.calls) == 6, what="the refused item")
    await bounded(queue.idle())
    assert await bounded(store.run_interaction(delete_dead, B)) == 1
    assert await bounded(store.run_interaction(dead_letters)) == []


def queue_args(config: str, action: str = "list", **values: Any) -> SimpleNamespace:
    return SimpleNamespace(config=config, json=values.pop("json", False), action=action,
                           domain=values.pop("domain", None), dead=values.pop("dead", False),
                           limit=values.pop("limit", 100))


@pytest_twisted.ensureDeferred
async def test_the_queue_command(tmp_path):
    from twisted.internet import reactor

    config = minimal_config_file(tmp_path, A, f"fed.{A}")()

    async def run(action: str = "list", **values: Any) -> Tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        code = await bounded(Deferred.fromCoroutine(
            run_queue_command(reactor, queue_args(config, action, **values), out, err)))
        return code, out.getvalue(), err.getvalue()

    assert await run() == (0, "the outbound queue is empty, and there are no dead letters\n", "")
    # put something in as a running fedserver would
    from fedserver.config import load_config

    store = Store(load_config(config).storage_database, reactor=reactor)
    queue = OutboundQueue(store, lambda: None, backend_domain=A, settings=QueueSettings(), clock=reactor,
                          worker_id="w", delivery_timeout=1)
    store.migrate()
    store.startService()
    try:
        ids = [await bounded(queue.enqueue(B, "galley", "on-message-sent", body(n))) for n in range(2)]
        await bounded(store.run_operation(
            "UPDATE fedserver_queue_destinations SET failures = 3, next_attempt = ?, last_error = ?",
            (int((reactor.seconds() + 125) * 1000), "federation-connection-refused: no")))
    finally:
        store.stopService()
    code, out, _ = await run()
    assert code == 0
    header, line = out.splitlines()
    assert header.split() == ["DESTINATION", "DEPTH", "OLDEST", "NEXT", "ATTEMPT", "FAILURES", "DEAD", "LAST",
                              "ERROR"]
    assert line.split()[:2] == [B, "2"] and " in 2m" in line and "federation-connection-refused: no" in line
    code, out, _ = await run(json=True)
    [listed] = json.loads(out)["destinations"]
    assert (listed["depth"], listed["failures"], listed["next_attempt_in"] > 120) == (2, 3, True)
    assert await run("retry", domain=B, json=True) == (0, json.dumps({"domain": B, "waiting": 2}) + "\n", "")
    code, out, _ = await run("drop", domain=B)
    assert code == 0 and "2 items moved to the dead letters" in out
    code, out, _ = await run("dead")
    assert code == 0 and len(out.splitlines()) == 3 and "dropped" in out
    code, out, _ = await run("dead", domain=B, json=True, limit=1)
    assert [letter["id"] for letter in json.loads(out)["dead"]] == [ids[1]]
    assert (await run("retry", domain=B, dead=True))[1].startswith(f"{B}: 2 dead letters are back")
    assert (await run("drop", domain=B, dead=True))[1] == f"{B}: 0 dead letters deleted for good\n"
    code, _, err = await run("retry", domain="B..example")
    assert code == 2 and "not a lower-case domain name" in err
    bad = queue_args(str(tmp_path / "missing.toml"))
    err_io = io.StringIO()
    assert await bounded(Deferred.fromCoroutine(run_queue_command(reactor, bad, io.StringIO(), err_io))) == 1
    assert "does not exist" in err_io.getvalue()


def test_the_queue_command_line():
    from fedserver.cli import make_parser

    args = make_parser().parse_args(["queue", "--config", "f.toml"])
    assert (args.action, args.json) == ("list", False)
    args = make_parser().parse_args(["queue", "--config", "f.toml", "--json", "retry", "b.example", "--dead"])
    assert (args.action, args.domain, args.dead, args.json) == ("retry", "b.example", True, True)
    args = make_parser().parse_args(["queue", "--config", "f.toml", "dead"])
    assert (args.action, args.domain, args.limit) == ("dead", None, 100)
    assert [duration(s) for s in (None, 4.4, 192, 7500, 4 * 86400 + 3 * 3600)] == ["-", "4s", "3m12s", "2h05m",
                                                                                  "4d03h"]


# the outward listener: Fedserver-Delivery: queued


@attrs.define
class FakeQueue:
    enqueued: List[Tuple[Any, ...]] = attrs.Factory(list)

    def enqueue(self, destination: str, component: str, rpc: str, body: bytes, **kwargs: Any) -> Deferred:
        self.enqueued.append((destination, component, rpc, body, kwargs))
        return defer.succeed("item-1")


def post_outward(rig: Any, queue: Any, headers: Tuple[Tuple[bytes, bytes], ...], body: bytes = b'{"a": 1}') -> Any:
    root = ListenerRoot("outward listener")
    root.mount(b"rpc", OutwardRPCResource(rig.pipeline, max_body_bytes=1000, queue=queue))
    conn = HTTPConnection.to(site_for(root))
    with capturedLogs():
        conn.request(b"POST", b"/rpc/b.example/galley/on-message-sent", body,
                     ((b"Content-Type", b"application/json"), *headers))
    return conn.answer()


def test_a_queued_call_is_answered_202_once_queued():
    rig = make_rig()
    queue = FakeQueue()
    answer = post_outward(rig, queue, ((b"Fedserver-Delivery", b"Queued"), (b"Fedserver-Idempotency-Key", b"k1"),
                                       (b"Wire-Origin-Request-Id", b"rid-1"), (b"X-Wire-API-Version", b"v6")))
    assert (answer.code, json.loads(answer.body)) == (202, {"queued": "item-1"})
    [(destination, component, rpc, data, kwargs)] = queue.enqueued
    assert (destination, component, rpc, data) == (B, "galley", "on-message-sent", b'{"a": 1}')
    assert (kwargs["idempotency_key"], kwargs["request_id"]) == ("k1", "rid-1")
    assert ("x-wire-api-version", "v6") in [(n.lower(), v) for n, v in kwargs["headers"]]
    assert rig.client.sent == []  # nothing went out now


def test_a_queued_call_is_checked_first():
    queue = FakeQueue()
    post_outward(make_rig(deny=(False, True)), queue, ((b"Fedserver-Delivery", b"queued"),)).labelled(
        400, "federation-denied")
    post_outward(make_rig(), queue, ((b"Fedserver-Delivery", b"queued"),), b"{no").labelled(400, "invalid-json")
    post_outward(make_rig(), queue, ((b"Fedserver-Delivery", b"later"),)).labelled(403, "invalid-endpoint")
    post_outward(make_rig(), None, ((b"Fedserver-Delivery", b"queued"),)).labelled(500, "federation-not-available")
    assert queue.enqueued == []
    # direct, said or not, goes out now
    rig = make_rig(outcomes={"fed.b.example": ok()})
    assert post_outward(rig, queue, ((b"Fedserver-Delivery", b"direct"),)).code == 200
    assert len(rig.client.sent) == 1 and queue.enqueued == []


@pytest_twisted.ensureDeferred
async def test_the_outward_listener_puts_calls_in_a_real_queue(queues, store):
    remote = Remote(hold=True)
    queue = queues(remote)
    rig = make_rig()
    root = ListenerRoot("outward listener")
    root.mount(b"rpc", OutwardRPCResource(rig.pipeline, max_body_bytes=1000, queue=queue))
    conn = HTTPConnection.to(site_for(root))
    with capturedLogs():
        conn.request(b"POST", b"/rpc/b.example/galley/on-message-sent", b'{"a": 1}',
                     ((b"Content-Type", b"application/json"), (b"Fedserver-Delivery", b"queued")))
        await eventually(lambda: conn.transport.value().startswith(b"HTTP/1.1 202"), what="the answer")
    item_id = json.loads(conn.transport.value().split(b"\r\n\r\n", 1)[1])["queued"]
    assert rows(store, "SELECT id FROM fedserver_queue") == [(item_id,)]
    await eventually(lambda: len(remote.held) == 1, what="the delivery")
    remote.held[0][1].callback(ok())
    await bounded(queue.idle())



def test_build_service_wires_the_queue_and_the_deduplicator(tmp_path):
    from twisted.internet.testing import MemoryReactorClock

    import fedserver.builtin.allow_list
    import fedserver.builtin.http_forward
    import fedserver.builtin.mtls
    import fedserver.builtin.static_discovery
    from fedserver.idempotency import Deduplicator
    from fedserver.registry import make_plugin_manager
    from fedserver.service import build_service

    write = minimal_config_file(tmp_path, A, f"fed.{A}", outward=True)
    manager = make_plugin_manager(load_entrypoints=False, plugins=[
        fedserver.builtin.allow_list, fedserver.builtin.http_forward, fedserver.builtin.mtls,
        fedserver.builtin.static_discovery,
    ])
    top = build_service(write('[queue]\nmax_lifetime = 3600\nworker_id = "w-7"\n'), reactor=MemoryReactorClock(),
                        plugin_manager=manager)
    queue = top.context.queue
    assert isinstance(queue, OutboundQueue) and isinstance(top.pipeline.deduplicator, Deduplicator)
    assert (queue.settings.max_lifetime, queue.worker_id, queue.backend_domain) == (3600, "w-7", A)
    assert queue.delivery_timeout == 60  # request_timeout + component_timeout
    assert queue.observe in top.pipeline.observers
    assert top.outward_resource.getStaticEntity(b"rpc").queue is queue
    children = list(top)
    # started after the store, so stopped before it
    assert children.index(top.context.storage) < children.index(queue)
    assert children.index(top.context.storage) < children.index(top.pipeline.deduplicator)
    with sqlite3.connect(top.context.storage.path) as connection:
        versions = dict(connection.execute("SELECT owner, version FROM fedserver_schema"))
    assert versions == {"fedserver-queue": 1, "fedserver-idempotency": 1}
    # without [queue] worker_id: the host name and the inward listener
    other = build_service(write(), reactor=MemoryReactorClock(), plugin_manager=manager)
    assert other.context.queue.worker_id.endswith("/tcp:0:interface=127.0.0.1")
