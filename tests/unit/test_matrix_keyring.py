"""
Tests for fedserver_matrix.keyring: fetching other servers' keys directly
and through notaries, the checks on what comes back, validity, merged
fetches, bounded waits, and keys kept in the store across keyrings.
"""

from __future__ import annotations

import json
import sqlite3
from typing import Any, Callable, Dict, List, Tuple

import attrs
import pytest
import pytest_twisted
from signedjson.key import get_verify_key
from signedjson.sign import sign_json
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from fedserver.client import NotDelivered
from fedserver.errors import FederationError
from fedserver.storage import Store
from fedserver.values import OutboundRequest, Response, Target
from fedserver_matrix.keyring import (
    MAX_VALIDITY_MS,
    SCHEMA,
    SCHEMA_OWNER,
    KeyLookupError,
    KeyResponseError,
    Keyring,
    keys_from_response,
)
from fedserver_matrix.keys import OldVerifyKey, encode_verify_key, generate_signing_key, server_keys_document
from tests.unit.helpers import (
    FakeDiscovery,
    assert_no_result,
    failure_result_of,
    json_response,
    outcome,
    success_result_of,
    target,
)

DAY_MS = 24 * 3600 * 1000
START = 1_700_000_000.0  # the clock's time in tests, seconds


def public(key) -> str:
    return encode_verify_key(get_verify_key(key))


@attrs.define
class Server:
    """A Matrix server's keys, as its key server publishes them."""

    name: str
    keys: List[Any] = attrs.Factory(lambda: [generate_signing_key("k1")])
    old: List[OldVerifyKey] = attrs.Factory(list)

    def document(self, valid_until_ms: int, **changes: Any) -> Dict[str, Any]:
        document = server_keys_document(self.name, self.keys, valid_until_ms, self.old)
        document.update(changes)
        return document

    def verify_key(self, index: int = 0) -> Any:
        return get_verify_key(self.keys[index])


@attrs.define
class Network:
    """Stands in for the FederationClient: an answer per (host, method, path)."""

    answers: Dict[Tuple[str, str, str], Any] = attrs.Factory(dict)
    sent: List[Tuple[Target, OutboundRequest]] = attrs.Factory(list)

    def serve(self, host: str, method: str, path: str, answer: Any) -> None:
        self.answers[(host, method, path)] = answer

    def send(self, target: Target, request: OutboundRequest) -> Deferred:
        self.sent.append((target, request))
        answer = self.answers.get((target.host, request.method, request.path))
        if answer is None:
            return defer.succeed(json_response(404, {"errcode": "M_UNRECOGNIZED"}))
        if callable(answer):
            answer = answer(request)
        return outcome(answer)

    def requests_to(self, host: str) -> List[OutboundRequest]:
        return [request for t, request in self.sent if t.host == host]


KEY_PATH = "/_matrix/key/v2/server"
QUERY_PATH = "/_matrix/key/v2/query"


@pytest.fixture
def clock():
    clock = Clock()
    clock.advance(START)
    return clock


def now_ms(clock) -> int:
    return int(clock.seconds() * 1000)


@pytest.fixture
def network():
    return Network()


@pytest.fixture
def b():
    return Server("b.example")


@pytest.fixture
def notary():
    return Server("notary.example", [generate_signing_key("n1")])


def make_keyring(clock, network, *, names=("b.example", "notary.example", "c.example"), **kwargs) -> Keyring:
    discovery = FakeDiscovery({name: [target(name, 8448)] for name in names})
    return Keyring(clock=clock, discovery=discovery, client=network, **kwargs)


def serve_keys(network, server, valid_until_ms, **changes):
    network.serve(server.name, "GET", KEY_PATH, json_response(200, server.document(valid_until_ms, **changes)))


def get(keyring, server_name, *key_ids, valid_at=None):
    return success_result_of(keyring.get_verify_keys(server_name, key_ids, valid_at))


def lookup_error(keyring, server_name, *key_ids) -> str:
    return str(failure_result_of(keyring.get_verify_keys(server_name, key_ids), KeyLookupError).value)


# directly from the server


def test_keys_are_fetched_from_the_server_and_kept(clock, network, b):
    serve_keys(network, b, now_ms(clock) + DAY_MS)
    prepared = []

    def prepare(request, target):
        prepared.append(target.infra_domain)
        return defer.succeed(request.with_header("Authorization", "X-Matrix signed"))

    keyring = make_keyring(clock, network, prepare=prepare)
    keys = get(keyring, "b.example", "ed25519:k1")
    assert list(keys) == ["ed25519:k1"]
    assert keys["ed25519:k1"].encode() == b.verify_key().encode()
    (request,) = network.requests_to("b.example")
    assert (request.method, request.path, request.destination) == ("GET", KEY_PATH, "b.example")
    assert request.header("Authorization") == "X-Matrix signed" and prepared == ["b.example"]
    # the second lookup is answered from memory
    assert list(get(keyring, "b.example", "ed25519:k1")) == ["ed25519:k1"]
    assert len(network.sent) == 1
    assert clock.getDelayedCalls() == []
    known = keyring.known_keys("b.example")["ed25519:k1"]
    assert (known.from_server, known.fetched_ts, known.expired_ts) == ("b.example", now_ms(clock), None)


def test_several_keys_and_unknown_algorithms(clock, network, b):
    b.keys.append(generate_signing_key("k2"))
    document = b.document(now_ms(clock) + DAY_MS)
    document["verify_keys"]["curve25519:x"] = {"key": "whatever"}
    # the unknown algorithm's key is outside the signed content now: sign again
    del document["signatures"]
    for key in b.keys:
        sign_json(document, "b.example", key)
    network.serve("b.example", "GET", KEY_PATH, json_response(200, document))
    keyring = make_keyring(clock, network)
    assert set(get(keyring, "b.example", "ed25519:k1", "ed25519:k2", "curve25519:x")) == {"ed25519:k1", "ed25519:k2"}


def test_a_key_the_server_does_not_list(clock, network, b):
    serve_keys(network, b, now_ms(clock) + DAY_MS)
    keyring = make_keyring(clock, network, refetch_interval=60)
    assert get(keyring, "b.example", "ed25519:nope") == {}
    # asking again soon does not ask the server again
    clock.advance(59)
    assert get(keyring, "b.example", "ed25519:nope") == {}
    assert len(network.sent) == 1
    # but after the interval it does (it may have a new key by now)
    b.keys.append(generate_signing_key("nope"))
    serve_keys(network, b, now_ms(clock) + DAY_MS)
    clock.advance(1)
    assert list(get(keyring, "b.example", "ed25519:nope")) == ["ed25519:nope"]
    assert len(network.sent) == 2


def test_only_the_keys_asked_for_are_answered(clock, network, b):
    b.keys.append(generate_signing_key("k2"))
    serve_keys(network, b, now_ms(clock) + DAY_MS)
    keyring = make_keyring(clock, network)
    assert list(get(keyring, "b.example", "ed25519:k2")) == ["ed25519:k2"]
    assert get(keyring, "b.example") == {}


def test_the_first_target_that_takes_the_request(clock, network, b):
    serve_keys(network, b, now_ms(clock) + DAY_MS)
    discovery = FakeDiscovery({"b.example": [target("b.example", host="down.example"), target("b.example")]})
    network.serve("down.example", "GET", KEY_PATH, NotDelivered("refused", "federation-connection-refused"))
    keyring = Keyring(clock=clock, discovery=discovery, client=network)
    assert list(get(keyring, "b.example", "ed25519:k1")) == ["ed25519:k1"]
    assert [t.host for t, _ in network.sent] == ["down.example", "b.example"]


# what is refused


def self_signed_by_another_key(clock, b):
    document = b.document(now_ms(clock) + DAY_MS)
    del document["signatures"]
    return sign_json(document, "b.example", generate_signing_key("k1"))


@pytest.mark.parametrize(
    ("answer", "reason"),
    [
        (lambda clock, b: b.document(now_ms(clock) + DAY_MS, server_name="c.example"),
         "b.example itself: b.example answered with the keys of 'c.example', not of b.example"),
        (lambda clock, b: {k: v for k, v in b.document(now_ms(clock) + DAY_MS).items() if k != "server_name"},
         "answered with the keys of 'None', not of b.example"),
        (self_signed_by_another_key,
         "the signature by ed25519:k1 of the keys of b.example (from b.example) does not verify"),
        (lambda clock, b: b.document(now_ms(clock) + DAY_MS, valid_until_ts=now_ms(clock) + 2 * DAY_MS),
         "the signature by ed25519:k1 of the keys of b.example (from b.example) does not verify"),
        (lambda clock, b: b.document(now_ms(clock) + DAY_MS, signatures={}),
         "the keys of b.example (from b.example) are not signed by b.example"),
        (lambda clock, b: b.document(now_ms(clock) + DAY_MS, signatures={"b.example": {"ed25519:other": "c2ln"}}),
         "are not signed by any of the verify_keys they list"),
        (lambda clock, b: b.document(now_ms(clock) + DAY_MS, valid_until_ts="soon"),
         "have no integer valid_until_ts"),
        (lambda clock, b: b.document(now_ms(clock) + DAY_MS, verify_keys=[]), "have no verify_keys object"),
        (lambda clock, b: b.document(now_ms(clock) + DAY_MS, verify_keys={"ed25519:k1": {"key": "Zm9v"}}),
         "verify_keys of b.example (from b.example): the key ed25519:k1 is 3 bytes, not 32"),
        (lambda clock, b: b.document(now_ms(clock) + DAY_MS, verify_keys={"ed25519:k1": "x"}),
         "verify_keys 'ed25519:k1' of b.example (from b.example) has no key"),
        (lambda clock, b: b.document(now_ms(clock) + DAY_MS, old_verify_keys={"ed25519:o": {"key": public(b.keys[0])}}),
         "old_verify_keys 'ed25519:o' of b.example (from b.example) has no integer expired_ts"),
        (lambda clock, b: [1, 2], "the keys from b.example are not a JSON object"),
    ],
)
def test_refused_answers(clock, network, b, answer, reason):
    network.serve("b.example", "GET", KEY_PATH, json_response(200, answer(clock, b)))
    keyring = make_keyring(clock, network)
    message = lookup_error(keyring, "b.example", "ed25519:k1")
    assert message.startswith("cannot get the keys of b.example: b.example itself: ")
    assert reason in message
    assert keyring.known_keys("b.example") == {}


@pytest.mark.parametrize(
    ("answer", "reason"),
    [
        (json_response(500, {"errcode": "M_UNKNOWN"}), "GET /_matrix/key/v2/server answered HTTP 500"),
        (Response(200, (), b"<html>"), "the answer to GET /_matrix/key/v2/server is not JSON"),
        (FederationError("b.example did not answer in time", "federation-timeout"),
         "federation-timeout: b.example did not answer in time"),
    ],
)
def test_failing_key_servers(clock, network, b, answer, reason):
    network.serve("b.example", "GET", KEY_PATH, answer)
    assert reason in lookup_error(make_keyring(clock, network), "b.example", "ed25519:k1")


def test_a_server_discovery_cannot_find(clock, network):
    message = lookup_error(make_keyring(clock, network, names=()), "b.example", "ed25519:k1")
    assert message == "cannot get the keys of b.example: b.example itself: invalid-domain: b.example unknown"


def test_a_failure_is_not_retried_at_once(clock, network, b):
    network.serve("b.example", "GET", KEY_PATH, json_response(500, {}))
    keyring = make_keyring(clock, network, refetch_interval=60)
    lookup_error(keyring, "b.example", "ed25519:k1")
    # within the interval the same failure is reported without asking again
    assert "answered HTTP 500" in lookup_error(keyring, "b.example", "ed25519:k1")
    assert len(network.sent) == 1
    serve_keys(network, b, now_ms(clock) + DAY_MS)
    clock.advance(60)
    assert list(get(keyring, "b.example", "ed25519:k1")) == ["ed25519:k1"]


# validity


def test_validity_is_capped_at_seven_days_from_fetching(clock, network, b):
    fetched = now_ms(clock)
    serve_keys(network, b, fetched + 30 * DAY_MS)
    keyring = make_keyring(clock, network)
    assert list(get(keyring, "b.example", "ed25519:k1")) == ["ed25519:k1"]
    assert keyring.known_keys("b.example")["ed25519:k1"].valid_until_ts == fetched + MAX_VALIDITY_MS
    assert list(get(keyring, "b.example", "ed25519:k1", valid_at=fetched + 7 * DAY_MS)) == ["ed25519:k1"]
    assert get(keyring, "b.example", "ed25519:k1", valid_at=fetched + 7 * DAY_MS + 1) == {}
    # past the cap the key is not used without fetching again
    clock.advance(7 * 24 * 3600 + 0.001)
    network.serve("b.example", "GET", KEY_PATH, json_response(503, {}))
    assert "HTTP 503" in lookup_error(keyring, "b.example", "ed25519:k1")
    assert len(network.sent) == 2


def test_keys_are_used_until_valid_until_ts_then_fetched_again(clock, network, b):
    serve_keys(network, b, now_ms(clock) + 3600 * 1000)
    keyring = make_keyring(clock, network)
    get(keyring, "b.example", "ed25519:k1")
    clock.advance(3600)
    assert list(get(keyring, "b.example", "ed25519:k1")) == ["ed25519:k1"]
    assert len(network.sent) == 1
    clock.advance(1)
    serve_keys(network, b, now_ms(clock) + DAY_MS)
    assert list(get(keyring, "b.example", "ed25519:k1")) == ["ed25519:k1"]
    assert len(network.sent) == 2


def test_keys_already_expired_are_not_used(clock, network, b):
    serve_keys(network, b, now_ms(clock) - 1)
    keyring = make_keyring(clock, network)
    assert get(keyring, "b.example", "ed25519:k1") == {}


def test_old_keys_are_valid_until_they_expired(clock, network, b):
    old_key = generate_signing_key("old")
    expired = now_ms(clock) - DAY_MS
    b.old.append(OldVerifyKey.from_base64("ed25519:old", public(old_key), expired))
    serve_keys(network, b, now_ms(clock) + DAY_MS)
    keyring = make_keyring(clock, network)
    assert list(get(keyring, "b.example", "ed25519:old", valid_at=expired - 5)) == ["ed25519:old"]
    assert get(keyring, "b.example", "ed25519:old", valid_at=expired + 1) == {}
    known = keyring.known_keys("b.example")["ed25519:old"]
    assert (known.expired_ts, known.valid_until_ts) == (expired, expired)
    # not for now: a request signed with it does not authenticate
    assert get(keyring, "b.example", "ed25519:old") == {}


def test_keys_from_response_helper(clock, b):
    document = b.document(now_ms(clock) + DAY_MS)
    (key,) = keys_from_response("b.example", document, now_ms(clock))
    assert (key.server_name, key.key_id, key.from_server) == ("b.example", "ed25519:k1", "b.example")
    assert key.response == document
    with pytest.raises(KeyResponseError, match=r"not of c\.example"):
        keys_from_response("c.example", document, now_ms(clock))


# one fetch at a time, bounded


def test_concurrent_lookups_share_one_fetch(clock, network, b):
    pending: Deferred = Deferred()
    network.serve("b.example", "GET", KEY_PATH, pending)
    keyring = make_keyring(clock, network)
    first = keyring.get_verify_keys("b.example", ["ed25519:k1"])
    second = keyring.get_verify_keys("b.example", ["ed25519:k1"])
    cancelled = keyring.get_verify_keys("b.example", ["ed25519:k1"])
    for d in (first, second, cancelled):
        assert_no_result(d)
    cancelled.cancel()
    failure_result_of(cancelled, defer.CancelledError)
    pending.callback(json_response(200, b.document(now_ms(clock) + DAY_MS)))
    assert list(success_result_of(first)) == list(success_result_of(second)) == ["ed25519:k1"]
    assert len(network.sent) == 1


def test_concurrent_lookups_share_one_failure(clock, network):
    pending: Deferred = Deferred()
    network.serve("b.example", "GET", KEY_PATH, pending)
    keyring = make_keyring(clock, network)
    lookups = [keyring.get_verify_keys("b.example", ["ed25519:k1"]) for _ in range(3)]
    pending.callback(json_response(404, {}))
    for d in lookups:
        assert "HTTP 404" in str(failure_result_of(d, KeyLookupError).value)
    assert len(network.sent) == 1


def test_a_key_server_that_does_not_answer(clock, network):
    network.serve("b.example", "GET", KEY_PATH, Deferred())
    keyring = make_keyring(clock, network, timeout=10)
    d = keyring.get_verify_keys("b.example", ["ed25519:k1"])
    clock.advance(9.9)
    assert_no_result(d)
    clock.advance(0.1)
    assert str(failure_result_of(d, KeyLookupError).value) == (
        "cannot get the keys of b.example: b.example itself did not answer within 10 s"
    )
    assert clock.getDelayedCalls() == []


# through notaries


def notary_answer(clock, notary, *servers, sign=True):
    entries = []
    for server in servers:
        entry = server.document(now_ms(clock) + DAY_MS)
        if sign:
            sign_json(entry, notary.name, notary.keys[0])
        entries.append(entry)
    return json_response(200, {"server_keys": entries})


def test_keys_through_a_notary(clock, network, b, notary):
    serve_keys(network, notary, now_ms(clock) + DAY_MS)
    network.serve("notary.example", "POST", QUERY_PATH, notary_answer(clock, notary, b))
    keyring = make_keyring(clock, network, trusted_key_servers=["notary.example"])
    keys = get(keyring, "b.example", "ed25519:k1")
    assert keys["ed25519:k1"].encode() == b.verify_key().encode()
    assert network.requests_to("b.example") == []
    query, get_keys = network.requests_to("notary.example")
    assert (get_keys.method, get_keys.path) == ("GET", KEY_PATH)
    assert (query.method, query.path, query.header("Content-Type")) == ("POST", QUERY_PATH, "application/json")
    assert json.loads(query.body) == {
        "server_keys": {"b.example": {"ed25519:k1": {"minimum_valid_until_ts": now_ms(clock)}}}
    }
    assert keyring.known_keys("b.example")["ed25519:k1"].from_server == "notary.example"
    # the notary's own keys were fetched from it directly, and are kept too
    assert list(keyring.known_keys("notary.example")) == ["ed25519:n1"]


def test_a_notary_answer_also_about_other_servers(clock, network, b, notary):
    c = Server("c.example")
    serve_keys(network, notary, now_ms(clock) + DAY_MS)
    network.serve("notary.example", "POST", QUERY_PATH, notary_answer(clock, notary, c, b))
    keyring = make_keyring(clock, network, trusted_key_servers=["notary.example"])
    assert list(get(keyring, "b.example", "ed25519:k1")) == ["ed25519:k1"]
    assert keyring.known_keys("c.example") == {}


def unsigned_by_notary(clock, notary, b):
    return notary_answer(clock, notary, b, sign=False)


def signed_by_another_notary_key(clock, notary, b):
    return notary_answer(clock, Server("notary.example", [generate_signing_key("n1")]), b)


def signed_by_an_unknown_notary_key(clock, notary, b):
    return notary_answer(clock, Server("notary.example", [generate_signing_key("n9")]), b)


def not_self_signed(clock, notary, b):
    entry = b.document(now_ms(clock) + DAY_MS, signatures={})
    return json_response(200, {"server_keys": [sign_json(entry, "notary.example", notary.keys[0])]})


def about_another_server(clock, notary, b):
    return notary_answer(clock, notary, Server("c.example"))


@pytest.mark.parametrize(
    ("answer", "reason"),
    [
        (unsigned_by_notary, "its entry for b.example is not signed by notary.example"),
        (signed_by_another_notary_key,
         "its signature by ed25519:n1 on the keys of b.example does not verify"),
        (signed_by_an_unknown_notary_key,
         "its entry for b.example is signed by ed25519:n9, none of which is a valid key of notary.example"),
        (not_self_signed, "the keys of b.example (from notary.example) are not signed by b.example"),
        (about_another_server, "it has no keys for b.example"),
        (lambda clock, notary, b: json_response(200, {"server_keys": {}}), "the answer has no server_keys list"),
    ],
)
def test_refused_notary_answers_fall_back_to_the_server(clock, network, b, notary, answer, reason):
    serve_keys(network, notary, now_ms(clock) + DAY_MS)
    network.serve("notary.example", "POST", QUERY_PATH, answer(clock, notary, b))
    keyring = make_keyring(clock, network, trusted_key_servers=["notary.example"])
    # the server itself is down too: the message says what each source did
    message = lookup_error(keyring, "b.example", "ed25519:k1")
    assert message.startswith("cannot get the keys of b.example: notary notary.example: ")
    assert reason in message
    assert message.endswith("; b.example itself: GET /_matrix/key/v2/server answered HTTP 404")
    # with the server up, its own answer is used
    serve_keys(network, b, now_ms(clock) + DAY_MS)
    clock.advance(60)
    assert list(get(keyring, "b.example", "ed25519:k1")) == ["ed25519:k1"]
    assert keyring.known_keys("b.example")["ed25519:k1"].from_server == "b.example"


def test_notaries_are_asked_in_order(clock, network, b, notary):
    serve_keys(network, notary, now_ms(clock) + DAY_MS)
    network.serve("notary.example", "POST", QUERY_PATH, notary_answer(clock, notary, b))
    network.serve("c.example", "POST", QUERY_PATH, json_response(502, {}))
    keyring = make_keyring(clock, network, trusted_key_servers=["c.example", "notary.example"])
    assert list(get(keyring, "b.example", "ed25519:k1")) == ["ed25519:k1"]
    assert [(t.host, r.method) for t, r in network.sent] == [
        ("c.example", "POST"), ("notary.example", "POST"), ("notary.example", "GET")]


def test_a_notary_keys_come_from_the_notary_itself(clock, network, notary):
    serve_keys(network, notary, now_ms(clock) + DAY_MS)
    other = Server("c.example", [generate_signing_key("c1")])
    network.serve("c.example", "POST", QUERY_PATH, notary_answer(clock, other, notary))
    keyring = make_keyring(clock, network, trusted_key_servers=["c.example", "notary.example"])
    assert list(get(keyring, "notary.example", "ed25519:n1")) == ["ed25519:n1"]
    assert [(t.host, r.method) for t, r in network.sent] == [("notary.example", "GET")]


def test_a_notary_that_does_not_answer(clock, network, b, notary):
    network.serve("notary.example", "POST", QUERY_PATH, Deferred())
    serve_keys(network, b, now_ms(clock) + DAY_MS)
    keyring = make_keyring(clock, network, trusted_key_servers=["notary.example"], timeout=5)
    d = keyring.get_verify_keys("b.example", ["ed25519:k1"])
    assert_no_result(d)
    clock.advance(5)
    assert list(success_result_of(d)) == ["ed25519:k1"]


# kept in the store


BOUND = 10


def bounded(d: Deferred) -> Deferred:
    from twisted.internet import reactor

    return d.addTimeout(BOUND, reactor)


@pytest.fixture
def store(tmp_path):
    from twisted.internet import reactor

    path = tmp_path / "fedserver.sqlite"
    store = Store(f"sqlite:{path}", reactor=reactor)
    store.register_schema(SCHEMA_OWNER, SCHEMA)
    store.migrate()
    store.startService()
    yield store
    store.stopService()


def real_keyring(network: Network, store: Any, **kwargs: Any) -> Keyring:
    from twisted.internet import reactor

    discovery = FakeDiscovery({"b.example": [target("b.example", 8448)]})
    return Keyring(clock=reactor, discovery=discovery, client=network, store=store, **kwargs)


@pytest_twisted.ensureDeferred
async def test_keys_survive_in_the_store(store, b):
    from twisted.internet import reactor

    network = Network()
    fetched = int(reactor.seconds() * 1000)
    network.serve("b.example", "GET", KEY_PATH, json_response(200, b.document(fetched + DAY_MS)))
    first = real_keyring(network, store)
    keys = await bounded(first.get_verify_keys("b.example", ["ed25519:k1"]))
    assert list(keys) == ["ed25519:k1"]
    rows = sqlite3.connect(store.path).execute(
        "SELECT server_name, key_id, verify_key, valid_until_ts, expired_ts, from_server, response_json "
        "FROM matrix_server_keys").fetchall()
    assert len(rows) == 1
    server_name, key_id, verify_key, valid_until_ts, expired_ts, from_server, response = rows[0]
    assert (server_name, key_id, verify_key, expired_ts, from_server) == (
        "b.example", "ed25519:k1", public(b.keys[0]), None, "b.example")
    assert fetched <= valid_until_ts <= fetched + DAY_MS + 1000
    assert json.loads(response)["server_name"] == "b.example"

    # a new keyring on the same database (a restart) asks nobody
    silent = Network()
    second = real_keyring(silent, store)
    keys = await bounded(second.get_verify_keys("b.example", ["ed25519:k1"]))
    assert keys["ed25519:k1"].encode() == b.verify_key().encode()
    assert silent.sent == []


@pytest_twisted.ensureDeferred
async def test_stored_keys_are_replaced_by_newer_ones(store, b):
    from twisted.internet import reactor

    network = Network()
    now = int(reactor.seconds() * 1000)
    network.serve("b.example", "GET", KEY_PATH, json_response(200, b.document(now + 1000)))
    await bounded(real_keyring(network, store).get_verify_keys("b.example", ["ed25519:k1"]))
    b.keys.append(generate_signing_key("k2"))
    network.serve("b.example", "GET", KEY_PATH, json_response(200, b.document(now + DAY_MS)))
    await bounded(real_keyring(network, store).get_verify_keys("b.example", ["ed25519:k2"]))
    rows = dict(sqlite3.connect(store.path).execute(
        "SELECT key_id, valid_until_ts FROM matrix_server_keys").fetchall())
    assert rows == {"ed25519:k1": now + DAY_MS, "ed25519:k2": now + DAY_MS}


@pytest_twisted.ensureDeferred
async def test_a_broken_store_does_not_stop_lookups(b):
    from twisted.internet import reactor

    class BrokenStore:
        def run_query(self, sql: str, params: Any = ()) -> Deferred:
            return defer.fail(sqlite3.OperationalError("disk I/O error"))

        def run_interaction(self, work: Callable[..., Any], *args: Any) -> Deferred:
            return defer.fail(sqlite3.OperationalError("disk I/O error"))

    network = Network()
    network.serve("b.example", "GET", KEY_PATH,
                  json_response(200, b.document(int(reactor.seconds() * 1000) + DAY_MS)))
    keys = await bounded(real_keyring(network, BrokenStore()).get_verify_keys("b.example", ["ed25519:k1"]))
    assert list(keys) == ["ed25519:k1"]


def test_an_unexpected_error_is_reported_and_logged(clock, network, b):
    from twisted.logger import globalLogPublisher

    class BrokenDiscovery:
        def discover(self, domain: str) -> Deferred:
            return defer.fail(RuntimeError("a bug"))

    logged: List[Any] = []
    globalLogPublisher.addObserver(logged.append)
    try:
        keyring = Keyring(clock=clock, discovery=BrokenDiscovery(), client=network)
        assert lookup_error(keyring, "b.example", "ed25519:k1") == (
            "cannot get the keys of b.example: b.example itself: an internal error (logged)")
    finally:
        globalLogPublisher.removeObserver(logged.append)
    failures = [event["log_failure"] for event in logged if "log_failure" in event]
    assert [f.value.args for f in failures] == [("a bug",)]
