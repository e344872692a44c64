"""
Tests for the notary endpoints of fedserver_matrix.keyserver
(C{POST /_matrix/key/v2/query}, C{GET /_matrix/key/v2/query/{serverName}}):
a real authenticator and keyring over a fake network and a L{Clock}, served
by a real L{fedserver.web.FederationSite} in memory.
"""

from __future__ import annotations

import json
import sqlite3
from typing import Any, Dict, List, Sequence, Tuple

import attrs
import pytest
from signedjson.key import get_verify_key
from signedjson.sign import SignatureVerifyException, sign_json, verify_signed_json
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from fedserver.values import OutboundRequest, Target
from fedserver.web import ListenerRoot
from fedserver_matrix.authenticator import MatrixSignatureAuthenticator
from fedserver_matrix.keyring import SCHEMA, Keyring
from fedserver_matrix.keys import OldVerifyKey, generate_signing_key, server_keys_document
from fedserver_matrix.keyserver import MAX_KEY_IDS, MAX_SERVERS, KeyServer
from fedserver_matrix.routes import MatrixRoot
from tests.unit.helpers import FakeDiscovery, HTTPConnection, json_response, outcome, site_for, target

DAY_MS = 24 * 3600 * 1000
START = 1_700_000_000.0
QUERY = b"/_matrix/key/v2/query"
KEY_PATH = "/_matrix/key/v2/server"
US = "a.example"


@attrs.define
class Server:
    """A Matrix server's keys, as its key server publishes them."""

    name: str
    keys: List[Any] = attrs.Factory(lambda: [generate_signing_key("k1")])
    old: List[OldVerifyKey] = attrs.Factory(list)

    def document(self, valid_until_ms: int) -> Dict[str, Any]:
        return server_keys_document(self.name, self.keys, valid_until_ms, self.old)


@attrs.define
class Network:
    """Stands in for the FederationClient: an answer per (host, method, path), or 404."""

    answers: Dict[Tuple[str, str, str], Any] = attrs.Factory(dict)
    sent: List[Tuple[Target, OutboundRequest]] = attrs.Factory(list)

    def serve(self, host: str, method: str, path: str, answer: Any) -> None:
        self.answers[(host, method, path)] = answer

    def serve_keys(self, server: Server, valid_until_ms: int) -> None:
        self.serve(server.name, "GET", KEY_PATH, json_response(200, server.document(valid_until_ms)))

    def send(self, target: Target, request: OutboundRequest) -> Deferred:
        self.sent.append((target, request))
        answer = self.answers.get((target.host, request.method, request.path))
        if answer is None:
            return defer.succeed(json_response(404, {"errcode": "M_UNRECOGNIZED", "error": "no"}))
        return outcome(answer(request) if callable(answer) else answer)

    def fetches_from(self, host: str) -> int:
        return sum(1 for t, _ in self.sent if t.host == host)


class SyncStore:
    """What the keyring uses of a Store, on in-memory SQLite, synchronously."""

    def __init__(self) -> None:
        self.db = sqlite3.connect(":memory:")
        for step in SCHEMA:
            self.db.executescript(step)

    def run_query(self, sql: str, params: Sequence[Any] = ()) -> Deferred:
        return defer.succeed(self.db.execute(sql, params).fetchall())

    def run_interaction(self, work: Any, *args: Any) -> Deferred:
        cursor = self.db.cursor()
        work(cursor, *args)
        self.db.commit()
        return defer.succeed(None)


@attrs.define
class Rig:
    clock: Clock
    network: Network
    authenticator: MatrixSignatureAuthenticator
    site: Any

    @property
    def keyring(self) -> Keyring:
        keyring = self.authenticator.keyring
        assert keyring is not None
        return keyring

    def now_ms(self) -> int:
        return int(self.clock.seconds() * 1000)

    def ask(self, method: bytes, path: bytes, body: Any = None, raw: bytes = b"") -> Any:
        connection = HTTPConnection.to(self.site)
        data = raw or (json.dumps(body).encode() if body is not None else b"")
        headers = [(b"Content-Type", b"application/json")] if data else []
        connection.request(method, path, data, headers)
        return connection.answer()

    def query(self, server_keys: Any) -> List[Dict[str, Any]]:
        answer = self.ask(b"POST", QUERY, {"server_keys": server_keys})
        assert answer.code == 200, answer.body
        assert answer.header("content-type") == "application/json"
        return list(answer.json()["server_keys"])


def make_rig(network: Any = None, *, store: Any = None, our_keys: Any = None, max_body_bytes: int = 100_000,
             names: Sequence[str] = ("b.example", "c.example", "notary.example")) -> Rig:
    clock = Clock()
    clock.advance(START)
    network = network or Network()
    authenticator = MatrixSignatureAuthenticator(
        server_name=US, signing_keys=our_keys or [generate_signing_key("a1"), generate_signing_key("a2")],
        clock=clock,
    )
    discovery = FakeDiscovery({name: [target(name, 8448)] for name in names})
    authenticator.keyring = Keyring(clock=clock, discovery=discovery, client=network, store=store)
    root = ListenerRoot("inward listener")
    root.mount(b"_matrix", MatrixRoot(_NoFederation(), KeyServer(authenticator)))
    return Rig(clock, network, authenticator, site_for(root, max_body_bytes=max_body_bytes))


class _NoFederation:
    isLeaf = True

    def render(self, request: Any) -> bytes:  # pragma: no cover - not asked here
        raise AssertionError("no federation request in these tests")


@pytest.fixture
def b() -> Server:
    return Server("b.example")


def assert_signed_by(document: Dict[str, Any], server_name: str, keys: Sequence[Any]) -> None:
    assert set(document["signatures"][server_name]) == {f"ed25519:{k.version}" for k in keys}
    for key in keys:
        verify_signed_json(document, server_name, get_verify_key(key))


def matrix_error(answer: Any, status: int, errcode: str) -> Dict[str, Any]:
    body = answer.json()
    assert (answer.code, body["errcode"]) == (status, errcode), body
    assert isinstance(body["error"], str) and body["error"]
    return dict(body)


# answers


def test_a_server_s_keys_re_signed_by_us(b):
    rig = make_rig()
    rig.network.serve_keys(b, rig.now_ms() + DAY_MS)
    (document,) = rig.query({"b.example": {"ed25519:k1": {"minimum_valid_until_ts": rig.now_ms()}}})
    # as b signed it ...
    assert document["server_name"] == "b.example"
    assert document["valid_until_ts"] == rig.now_ms() + DAY_MS
    assert_signed_by(document, "b.example", b.keys)
    # ... and signed by us with every current key
    assert_signed_by(document, US, rig.authenticator.signing_keys)
    assert set(document["signatures"]) == {"b.example", US}
    # the content is b's: nothing but the signatures was added
    unsigned = {k: v for k, v in document.items() if k != "signatures"}
    original = b.document(rig.now_ms() + DAY_MS)
    assert unsigned == {k: v for k, v in original.items() if k != "signatures"}
    # a signature by another key does not pass for ours
    with pytest.raises(SignatureVerifyException):
        verify_signed_json(document, US, get_verify_key(generate_signing_key("a1")))


def test_the_get_form(b):
    rig = make_rig()
    rig.network.serve_keys(b, rig.now_ms() + DAY_MS)
    answer = rig.ask(b"GET", b"/_matrix/key/v2/query/b.example")
    assert answer.code == 200
    (document,) = answer.json()["server_keys"]
    assert_signed_by(document, "b.example", b.keys)
    assert_signed_by(document, US, rig.authenticator.signing_keys)
    # percent-encoded, with the deprecated key id and a trailing slash
    for path in (b"/_matrix/key/v2/query/b.example%2E", b"/_matrix/key/v2/query/b%2Eexample/ed25519:k1/"):
        answer = rig.ask(b"GET", path)
        assert answer.code == 200
        names = [d["server_name"] for d in answer.json()["server_keys"]]
        assert names == ([] if path.endswith(b"%2E") else ["b.example"])


def test_an_empty_key_map_asks_for_all_keys(b):
    b.keys.append(generate_signing_key("k2"))
    b.old.append(OldVerifyKey("ed25519:k0", get_verify_key(generate_signing_key("k0")), 1000))
    rig = make_rig()
    rig.network.serve_keys(b, rig.now_ms() + DAY_MS)
    (document,) = rig.query({"b.example": {}})
    assert set(document["verify_keys"]) == {"ed25519:k1", "ed25519:k2"}
    assert set(document["old_verify_keys"]) == {"ed25519:k0"}
    assert_signed_by(document, "b.example", b.keys)
    assert_signed_by(document, US, rig.authenticator.signing_keys)


def test_no_servers_no_documents():
    rig = make_rig()
    assert rig.query({}) == []
    assert rig.network.sent == []


def test_our_own_server_name_answers_our_document():
    rig = make_rig()
    (document,) = rig.query({US: {}})
    assert document == json.loads(rig.authenticator.server_keys_json())
    assert_signed_by(document, US, rig.authenticator.signing_keys)
    answer = rig.ask(b"GET", b"/_matrix/key/v2/query/a.example")
    assert answer.json()["server_keys"] == [document]
    assert rig.network.sent == []


def test_several_servers_in_one_query(b):
    c = Server("c.example", [generate_signing_key("c1")])
    rig = make_rig()
    rig.network.serve_keys(b, rig.now_ms() + DAY_MS)
    rig.network.serve_keys(c, rig.now_ms() + DAY_MS)
    documents = rig.query({"b.example": {}, "c.example": {"ed25519:c1": {}}, US: {}, "gone.example": {}})
    assert sorted(d["server_name"] for d in documents) == sorted(["b.example", "c.example", US])
    for document in documents:
        assert_signed_by(document, US, rig.authenticator.signing_keys)


# caching and minimum_valid_until_ts


def test_keys_are_fetched_once_while_valid(b):
    rig = make_rig()
    rig.network.serve_keys(b, rig.now_ms() + DAY_MS)
    first = rig.query({"b.example": {"ed25519:k1": {}}})
    rig.clock.advance(3600)
    assert rig.query({"b.example": {"ed25519:k1": {"minimum_valid_until_ts": rig.now_ms() + 3600_000}}}) == first
    assert rig.network.fetches_from("b.example") == 1
    assert set(rig.keyring.known_keys("b.example")) == {"ed25519:k1"}


def test_minimum_valid_until_ts_makes_us_fetch_keys_that_expire_sooner(b):
    rig = make_rig()
    first_until = rig.now_ms() + DAY_MS
    rig.network.serve_keys(b, first_until)
    rig.query({"b.example": {}})
    rig.clock.advance(120)  # past the keyring's refetch interval
    later = rig.now_ms() + 3 * DAY_MS
    rig.network.serve_keys(b, later)
    # a day is enough: what we have answers
    (document,) = rig.query({"b.example": {"ed25519:k1": {"minimum_valid_until_ts": first_until}}})
    assert document["valid_until_ts"] == first_until
    assert rig.network.fetches_from("b.example") == 1
    # two days is not: fetched again
    (document,) = rig.query({"b.example": {"ed25519:k1": {"minimum_valid_until_ts": first_until + 1}}})
    assert document["valid_until_ts"] == later
    assert rig.network.fetches_from("b.example") == 2
    assert_signed_by(document, US, rig.authenticator.signing_keys)


def test_minimum_valid_until_ts_in_the_get_form(b):
    rig = make_rig()
    first_until = rig.now_ms() + DAY_MS
    rig.network.serve_keys(b, first_until)
    rig.ask(b"GET", b"/_matrix/key/v2/query/b.example")
    rig.clock.advance(120)
    rig.network.serve_keys(b, first_until + DAY_MS)
    answer = rig.ask(b"GET", b"/_matrix/key/v2/query/b.example?minimum_valid_until_ts=%d" % first_until)
    assert answer.json()["server_keys"][0]["valid_until_ts"] == first_until
    answer = rig.ask(b"GET", b"/_matrix/key/v2/query/b.example?minimum_valid_until_ts=%d" % (first_until + 1))
    assert answer.json()["server_keys"][0]["valid_until_ts"] == first_until + DAY_MS
    assert rig.network.fetches_from("b.example") == 2


def test_expired_keys_are_fetched_again_by_default(b):
    rig = make_rig()
    rig.network.serve_keys(b, rig.now_ms() + 3600_000)
    rig.query({"b.example": {}})
    rig.clock.advance(2 * 3600)
    rig.network.serve_keys(b, rig.now_ms() + DAY_MS)
    (document,) = rig.query({"b.example": {}})
    assert document["valid_until_ts"] == rig.now_ms() + DAY_MS
    assert rig.network.fetches_from("b.example") == 2


def test_a_key_the_server_dropped_does_not_make_every_query_fetch(b):
    rig = make_rig()
    rig.network.serve_keys(b, rig.now_ms() + 3600_000)
    rig.query({"b.example": {}})
    rig.clock.advance(2 * 3600)
    b.keys = [generate_signing_key("k2")]  # k1 is gone, not even among the old keys
    rig.network.serve_keys(b, rig.now_ms() + DAY_MS)
    documents = rig.query({"b.example": {}})
    assert rig.network.fetches_from("b.example") == 2
    # the newest document first, then the one that had k1
    assert [set(d["verify_keys"]) for d in documents] == [{"ed25519:k2"}, {"ed25519:k1"}]
    rig.clock.advance(120)
    assert rig.query({"b.example": {}}) == documents
    assert rig.network.fetches_from("b.example") == 2
    (document,) = rig.query({"b.example": {"ed25519:k2": {}}})
    assert set(document["verify_keys"]) == {"ed25519:k2"}


def test_a_server_now_offline_is_answered_from_what_was_fetched(b):
    rig = make_rig()
    until = rig.now_ms() + 3600_000
    rig.network.serve_keys(b, until)
    rig.query({"b.example": {}})
    rig.clock.advance(2 * 3600)
    rig.network.answers.clear()
    # the keys have expired and b cannot be reached: the last document still answers
    (document,) = rig.query({"b.example": {}})
    assert document["valid_until_ts"] == until
    assert_signed_by(document, "b.example", b.keys)
    assert_signed_by(document, US, rig.authenticator.signing_keys)
    assert rig.network.fetches_from("b.example") == 2


def test_keys_come_from_the_store_after_a_restart(b):
    store = SyncStore()
    rig = make_rig(store=store)
    rig.network.serve_keys(b, rig.now_ms() + DAY_MS)
    first = rig.query({"b.example": {}})
    restarted = make_rig(store=store, our_keys=rig.authenticator.signing_keys)
    assert restarted.query({"b.example": {}}) == first
    assert restarted.network.sent == []


def test_a_key_the_server_does_not_list_answers_its_current_document(b):
    rig = make_rig()
    rig.network.serve_keys(b, rig.now_ms() + DAY_MS)
    (document,) = rig.query({"b.example": {"ed25519:nope": {}}})
    assert set(document["verify_keys"]) == {"ed25519:k1"}


def test_only_the_origin_s_signatures_are_kept(b):
    """Keys our keyring had from a notary are served with b's signature and ours, not the notary's."""
    notary = Server("notary.example", [generate_signing_key("n1")])
    network = Network()
    rig = make_rig(network)
    rig.keyring.trusted_key_servers = ["notary.example"]
    network.serve_keys(notary, rig.now_ms() + DAY_MS)
    entry = b.document(rig.now_ms() + DAY_MS)
    sign_json(entry, "notary.example", notary.keys[0])
    network.serve("notary.example", "POST", QUERY.decode(), json_response(200, {"server_keys": [entry]}))
    (document,) = rig.query({"b.example": {}})
    assert rig.keyring.known_keys("b.example")["ed25519:k1"].from_server == "notary.example"
    assert set(document["signatures"]) == {"b.example", US}
    assert_signed_by(document, "b.example", b.keys)
    assert_signed_by(document, US, rig.authenticator.signing_keys)


def test_our_keyring_uses_our_notary(b):
    """Another fedserver's keyring, trusting us as its notary, accepts what we answer."""
    rig = make_rig()
    rig.network.serve_keys(b, rig.now_ms() + DAY_MS)
    client_side = Network()

    def through_our_site(path: bytes) -> Any:
        def answer(request: OutboundRequest) -> Any:
            got = rig.ask(request.method.encode(), path, raw=request.body)
            return json_response(got.code, got.json())
        return answer

    client_side.serve(US, "GET", KEY_PATH, through_our_site(KEY_PATH.encode()))
    client_side.serve(US, "POST", QUERY.decode(), through_our_site(QUERY))
    discovery = FakeDiscovery({US: [target(US, 8448)], "b.example": [target("b.example", 8448)]})
    other = Keyring(clock=rig.clock, discovery=discovery, client=client_side, trusted_key_servers=[US])
    keys: List[Any] = []
    other.get_verify_keys("b.example", ["ed25519:k1"]).addCallback(keys.append)
    assert keys[0]["ed25519:k1"].encode() == get_verify_key(b.keys[0]).encode()
    assert other.known_keys("b.example")["ed25519:k1"].from_server == US
    assert client_side.fetches_from("b.example") == 0


# left out


def test_a_server_that_cannot_be_reached_is_left_out(b):
    rig = make_rig()
    assert rig.query({"c.example": {"ed25519:k1": {}}}) == []
    assert rig.network.fetches_from("c.example") == 1
    assert rig.query({"unknown.example": {}}) == []  # discovery cannot find it
    answer = rig.ask(b"GET", b"/_matrix/key/v2/query/c.example")
    assert (answer.code, answer.json()) == (200, {"server_keys": []})


def test_a_server_with_bad_keys_is_left_out(b):
    rig = make_rig()
    document = b.document(rig.now_ms() + DAY_MS)
    document["signatures"] = {}
    rig.network.serve("b.example", "GET", KEY_PATH, json_response(200, document))
    assert rig.query({"b.example": {}}) == []


def test_names_that_are_not_server_names_are_left_out_unasked():
    rig = make_rig()
    assert rig.query({"not a name": {}, "": {}, "x" * 300: {}}) == []
    assert rig.network.sent == []


# limits and malformed queries


def test_limits():
    rig = make_rig()
    servers = {f"s{i}.example": {} for i in range(MAX_SERVERS + 1)}
    matrix_error(rig.ask(b"POST", QUERY, {"server_keys": servers}), 413, "M_TOO_LARGE")
    keys = {f"ed25519:k{i}": {} for i in range(MAX_KEY_IDS + 1)}
    matrix_error(rig.ask(b"POST", QUERY, {"server_keys": {"b.example": keys}}), 413, "M_TOO_LARGE")
    spread = {f"s{i}.example": {"ed25519:a": {}, "ed25519:b": {}} for i in range(MAX_KEY_IDS // 2 + 1)}
    matrix_error(rig.ask(b"POST", QUERY, {"server_keys": spread}), 413, "M_TOO_LARGE")
    assert rig.network.sent == []


def test_a_body_over_the_limit():
    rig = make_rig()
    body = {"server_keys": {}, "padding": "x" * 70_000}
    matrix_error(rig.ask(b"POST", QUERY, body), 413, "M_TOO_LARGE")
    small = make_rig(max_body_bytes=100)
    matrix_error(small.ask(b"POST", QUERY, body), 413, "M_TOO_LARGE")


@pytest.mark.parametrize(
    "raw, errcode",
    [
        (b"{not json", "M_NOT_JSON"),
        (b"\xff\xfe", "M_NOT_JSON"),
        (b"", "M_NOT_JSON"),
        (b"[]", "M_BAD_JSON"),
        (b"{}", "M_BAD_JSON"),
        (b'{"server_keys": []}', "M_BAD_JSON"),
        (b'{"server_keys": {"b.example": []}}', "M_BAD_JSON"),
        (b'{"server_keys": {"b.example": {"ed25519:k1": 5}}}', "M_BAD_JSON"),
        (b'{"server_keys": {"b.example": {"ed25519:k1": {"minimum_valid_until_ts": "1"}}}}', "M_BAD_JSON"),
        (b'{"server_keys": {"b.example": {"ed25519:k1": {"minimum_valid_until_ts": -1}}}}', "M_BAD_JSON"),
        (b'{"server_keys": {"b.example": {"ed25519:k1": {"minimum_valid_until_ts": true}}}}', "M_BAD_JSON"),
        (b'{"server_keys": {"b.example": {"ed25519:k1": {"minimum_valid_until_ts": 1.5}}}}', "M_BAD_JSON"),
        (b"[" * 100_000, "M_NOT_JSON"),
    ],
)
def test_malformed_queries(raw, errcode):
    rig = make_rig(max_body_bytes=200_000)
    if len(raw) > 64 * 1024:
        matrix_error(rig.ask(b"POST", QUERY, raw=raw), 413, "M_TOO_LARGE")
        raw = b"[" * 60_000
    body = matrix_error(rig.ask(b"POST", QUERY, raw=raw), 400, errcode)
    assert body["fedserver_label"] == "invalid-json"
    assert rig.network.sent == []


@pytest.mark.parametrize(
    "query", [b"?minimum_valid_until_ts=soon", b"?minimum_valid_until_ts=-5", b"?minimum_valid_until_ts=",
              b"?minimum_valid_until_ts=1&minimum_valid_until_ts=2", b"?minimum_valid_until_ts=" + b"9" * 30],
)
def test_a_bad_minimum_valid_until_ts_parameter(query):
    rig = make_rig()
    matrix_error(rig.ask(b"GET", b"/_matrix/key/v2/query/b.example" + query), 400, "M_INVALID_PARAM")
    assert rig.network.sent == []


@pytest.mark.parametrize(
    "method, path, status",
    [
        (b"GET", b"/_matrix/key/v2/query", 405),
        (b"PUT", b"/_matrix/key/v2/query", 405),
        (b"POST", b"/_matrix/key/v2/query/b.example", 405),
        (b"DELETE", b"/_matrix/key/v2/query/b.example", 405),
        (b"GET", b"/_matrix/key/v2/query/b.example/ed25519:k1/more", 404),
        (b"POST", b"/_matrix/key/v1/query", 404),
        (b"GET", b"/_matrix/key/v2/queryx", 404),
    ],
)
def test_other_methods_and_paths(method, path, status):
    rig = make_rig()
    matrix_error(rig.ask(method, path, raw=b"{}" if method != b"GET" else b""), status, "M_UNRECOGNIZED")


def test_no_authentication_is_needed(b):
    """The notary answers a request without an Authorization header (the others above had none either)."""
    rig = make_rig()
    rig.network.serve_keys(b, rig.now_ms() + DAY_MS)
    connection = HTTPConnection.to(rig.site)
    connection.request(b"POST", QUERY, b'{"server_keys": {"b.example": {}}}')
    assert connection.answer().code == 200
