"""
The Matrix federation routes and transactions (L{fedserver_matrix.routes},
L{fedserver_matrix.transactions}, L{fedserver_matrix.errors}) driven through
a real L{FederationSite}, with fake providers and a synchronous store.
"""

from __future__ import annotations

import json
import sqlite3
from types import SimpleNamespace
from typing import Any, List, Sequence, Set

import pytest
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import capturedLogs, formatEvent

from fedserver.builtin.allow_list import AllowList
from fedserver.config import Limits
from fedserver.errors import AuthenticationFailure, FederationError
from fedserver.pipeline import CallOutcome, Pipeline
from fedserver.service import build_service
from fedserver.values import Peer, Response, Target
from fedserver.web import ListenerRoot
from fedserver_matrix.errors import matrix_error
from fedserver_matrix.routes import MatrixInward, MatrixOutward, MatrixRoot
from fedserver_matrix.transactions import MAX_EDUS, MAX_PDUS, REPLAY_FOR_MS, Transactions
from tests.unit.helpers import (
    FakeClient,
    FakeComponent,
    FakeDiscovery,
    HTTPConnection,
    json_response,
    minimal_config_file,
    site_for,
)


class SyncStore:
    """The storage methods Transactions uses, on in-memory SQLite, synchronously."""

    def __init__(self) -> None:
        self.db = sqlite3.connect(":memory:")
        self.owners: Set[str] = set()

    def register_schema(self, owner: str, steps: Sequence[str]) -> None:
        if owner not in self.owners:  # two rigs may share one store, as two processes share a database
            self.owners.add(owner)
            for step in steps:
                self.db.executescript(step)

    def run_query(self, sql: str, params: Sequence[Any] = ()) -> Deferred:
        return defer.succeed(self.db.execute(sql, params).fetchall())

    def run_operation(self, sql: str, params: Sequence[Any] = ()) -> Deferred:
        self.db.execute(sql, params)
        return defer.succeed(None)

    def run_interaction(self, work: Any, *args: Any) -> Deferred:
        with self.db:
            return defer.succeed(work(self.db.cursor(), *args))


class SlowStore(SyncStore):
    """A store whose interactions wait until the test runs them, as a database thread would."""

    def __init__(self) -> None:
        super().__init__()
        self.pending: List[Any] = []
        self.fail_next = False

    def run_interaction(self, work: Any, *args: Any) -> Deferred:
        d: Deferred = Deferred()  # no canceller: the database cannot be stopped half-way
        self.pending.append((work, args, d))
        return d

    def run_pending(self) -> None:
        """Run the interactions asked for so far (not those they lead to)."""
        pending, self.pending = self.pending, []
        for work, args, d in pending:
            if self.fail_next:
                self.fail_next = False
                d.errback(sqlite3.OperationalError("disk I/O error"))
                continue
            with self.db:
                result = work(self.db.cursor(), *args)
            if not d.called:
                d.callback(result)
            else:
                d.result = None  # the caller cancelled: what the database did is done all the same


class SignatureAuthenticator:
    """Accepts a request whose X-Test-Origin header names the origin (as X-Matrix would prove)."""

    def server_tls_options(self) -> None:
        return None

    def client_tls_options(self, target: Target) -> None:
        return None

    def authenticate(self, request: Any) -> Deferred:
        origin = request.header("X-Test-Origin")
        if origin is None:
            return defer.fail(AuthenticationFailure("no X-Matrix signature"))
        return defer.succeed(Peer(identities={origin}, claimed_domain=origin, domain_proven=True))

    def prepare_outbound(self, request: Any, target: Target) -> Deferred:
        return defer.succeed(request.with_header("Authorization", "X-Matrix signed"))


def make_rig(component: Any = None, client: Any = None, store: Any = None, **limits: Any) -> Any:
    clock = Clock()
    component = component or FakeComponent(json_response(200, {"ok": True}))
    client = client or FakeClient()
    pipeline = Pipeline(
        backend_domain="a.example", discovery=FakeDiscovery({"b.example": [Target("b.example", "127.0.0.1", 8448)]}),
        authenticator=SignatureAuthenticator(), authorizers=[AllowList(frozenset({"b.example", "c.example"}))],
        components={"matrix": component}, client=client, **limits,
    )
    config = SimpleNamespace(limits=Limits(max_body_bytes=4000))
    context = SimpleNamespace(pipeline=pipeline, reactor=clock, config=config)
    transactions = Transactions(store or SyncStore(), clock, lease_seconds=LEASE_SECONDS)
    inward, outward = ListenerRoot("inward listener"), ListenerRoot("outward listener")
    inward.mount(b"_matrix", MatrixRoot(MatrixInward(context, "a.example", transactions)))
    outward.mount(b"_matrix", MatrixRoot(MatrixOutward(context, "a.example")))
    return SimpleNamespace(clock=clock, component=component, client=client, transactions=transactions,
                           pipeline=pipeline, inward=site_for(inward, max_body_bytes=4000),
                           outward=site_for(outward, max_body_bytes=4000))


def ask(site: Any, method: bytes, path: bytes, body: bytes = b"", headers: List = ()) -> Any:  # type: ignore[assignment]
    connection = HTTPConnection.to(site)
    connection.request(method, path, body, headers)
    return connection.answer()


def matrix(answer: Any, status: int, errcode: str) -> dict:
    body = answer.json()
    assert (answer.code, body["errcode"]) == (status, errcode), body
    assert isinstance(body["error"], str) and body["error"]
    return body


FROM_B = [(b"X-Test-Origin", b"b.example")]
LEASE_SECONDS = 90


def test_an_authenticated_request_reaches_the_component_as_it_came():
    rig = make_rig()
    answer = ask(rig.inward, b"GET", b"/_matrix/federation/v1/query/profile?user_id=%40a%3Aa.example&field=x", b"",
                 FROM_B)
    assert answer.code == 200 and answer.json() == {"ok": True}
    (call,) = rig.component.calls
    assert (call.method, call.path, call.query) == ("GET", "/_matrix/federation/v1/query/profile",
                                                    "user_id=%40a%3Aa.example&field=x")
    assert (call.origin_domain, call.target_domain, call.rpc) == ("b.example", "a.example", "query")


@pytest.mark.parametrize(
    "method, path, body, headers, status, errcode",
    [
        (b"GET", b"/_matrix/federation/v1/version", b"", [], 401, "M_UNAUTHORIZED"),
        (b"GET", b"/_matrix/federation/v1/version", b"", [(b"X-Test-Origin", b"evil.example")], 403, "M_FORBIDDEN"),
        (b"PUT", b"/_matrix/federation/v1/send/1", b"{not json", FROM_B, 400, "M_NOT_JSON"),
        (b"GET", b"/_matrix/client/v3/sync", b"", FROM_B, 404, "M_UNRECOGNIZED"),
        (b"GET", b"/_matrix/federationx", b"", FROM_B, 404, "M_UNRECOGNIZED"),
    ],
)
def test_refusals_are_matrix_errors(method, path, body, headers, status, errcode):
    matrix(ask(make_rig().inward, method, path, body, headers), status, errcode)


@pytest.mark.parametrize("listener", ["inward", "outward"])
@pytest.mark.parametrize("method", [b"GET", b"PUT", b"DELETE", b"OPTIONS", b"FOO"])
def test_the_matrix_root_itself_is_not_served(listener, method):
    # found by tests/unit/test_fuzz.py: /_matrix was Twisted's HTML 405 or 501 (500 for HEAD)
    answer = ask(getattr(make_rig(), listener), method, b"/_matrix", b"", FROM_B)
    assert matrix(answer, 404, "M_UNRECOGNIZED")["error"] == "/_matrix is not served here"


def test_an_oversized_body_is_m_too_large_before_it_is_read():
    rig = make_rig()
    connection = HTTPConnection.to(rig.inward)
    connection.send(b"PUT /_matrix/federation/v1/send/1 HTTP/1.1\r\nHost: a\r\nContent-Length: 9999\r\n\r\n")
    body = matrix(connection.answer(), 413, "M_TOO_LARGE")
    assert body["fedserver_label"] == "request-too-large"


def transaction(pdus: int = 1, edus: int = 0) -> bytes:
    return json.dumps({"origin": "b.example", "pdus": [{}] * pdus, "edus": [{}] * edus}).encode()


@pytest.mark.parametrize("pdus, edus", [(MAX_PDUS + 1, 0), (0, MAX_EDUS + 1)])
def test_a_transaction_over_the_limits_is_refused(pdus, edus):
    rig = make_rig()
    matrix(ask(rig.inward, b"PUT", b"/_matrix/federation/v1/send/t1", transaction(pdus, edus), FROM_B), 400,
           "M_BAD_JSON")
    assert rig.component.calls == []


def test_a_repeated_transaction_is_answered_from_the_first_result():
    rig = make_rig(FakeComponent(json_response(200, {"pdus": {"$e": {}}})))
    first = ask(rig.inward, b"PUT", b"/_matrix/federation/v1/send/t1", transaction(), FROM_B)
    again = ask(rig.inward, b"PUT", b"/_matrix/federation/v1/send/t1", transaction(), FROM_B)
    assert first.json() == again.json() == {"pdus": {"$e": {}}}
    assert len(rig.component.calls) == 1
    # another origin may use the same id; after 24 h the id is new again
    ask(rig.inward, b"PUT", b"/_matrix/federation/v1/send/t1", transaction(), [(b"X-Test-Origin", b"c.example")])
    assert len(rig.component.calls) == 2
    rig.clock.advance(REPLAY_FOR_MS / 1000 + 1)
    ask(rig.inward, b"PUT", b"/_matrix/federation/v1/send/t1", transaction(), FROM_B)
    assert len(rig.component.calls) == 3


def test_a_failed_transaction_is_processed_again():
    component = FakeComponent(json_response(500, {"errcode": "M_UNKNOWN"}))
    rig = make_rig(component)
    ask(rig.inward, b"PUT", b"/_matrix/federation/v1/send/t1", transaction(), FROM_B)
    component.answer = json_response(200, {"pdus": {}})
    assert ask(rig.inward, b"PUT", b"/_matrix/federation/v1/send/t1", transaction(), FROM_B).code == 200
    assert len(component.calls) == 2


def test_one_transaction_in_flight_per_origin():
    pending: Deferred = Deferred()
    rig = make_rig(FakeComponent(pending))
    first = HTTPConnection.to(rig.inward)
    first.request(b"PUT", b"/_matrix/federation/v1/send/t1", transaction(), FROM_B)
    refused = ask(rig.inward, b"PUT", b"/_matrix/federation/v1/send/t2", transaction(), FROM_B)
    assert matrix(refused, 429, "M_LIMIT_EXCEEDED")["retry_after_ms"] == 1000
    assert refused.header("Retry-After") == "1"
    pending.callback(json_response(200, {"pdus": {}}))
    assert first.answer().code == 200
    rig.component.answer = json_response(200, {"pdus": {}})
    assert ask(rig.inward, b"PUT", b"/_matrix/federation/v1/send/t2", transaction(), FROM_B).code == 200


def test_the_origin_is_held_for_every_process_sharing_the_database():
    """Two fedserver processes on one database: the lease row, not process memory, holds the origin."""
    store = SyncStore()
    pending: Deferred = Deferred()
    one, two = make_rig(FakeComponent(pending), store=store), make_rig(store=store)
    first = HTTPConnection.to(one.inward)
    first.request(b"PUT", b"/_matrix/federation/v1/send/t1", transaction(), FROM_B)
    matrix(ask(two.inward, b"PUT", b"/_matrix/federation/v1/send/t2", transaction(), FROM_B), 429,
           "M_LIMIT_EXCEEDED")
    assert two.component.calls == []
    # another origin is not held back
    assert ask(two.inward, b"PUT", b"/_matrix/federation/v1/send/t2", transaction(),
               [(b"X-Test-Origin", b"c.example")]).code == 200
    pending.callback(json_response(200, {"pdus": {}}))
    assert first.answer().code == 200
    assert store.db.execute("SELECT COUNT(*) FROM matrix_transactions_in_flight").fetchone() == (0,)
    assert ask(two.inward, b"PUT", b"/_matrix/federation/v1/send/t2", transaction(), FROM_B).code == 200


def test_the_lease_of_a_process_that_died_runs_out():
    store = SyncStore()
    rig = make_rig(store=store)
    # a process that took b.example's lease and died before letting it go
    now_ms = int(rig.clock.seconds() * 1000)
    store.db.execute("INSERT INTO matrix_transactions_in_flight VALUES ('b.example', 'dead', ?)",
                     (now_ms + LEASE_SECONDS * 1000,))
    matrix(ask(rig.inward, b"PUT", b"/_matrix/federation/v1/send/t1", transaction(), FROM_B), 429,
           "M_LIMIT_EXCEEDED")
    rig.clock.advance(LEASE_SECONDS)
    assert ask(rig.inward, b"PUT", b"/_matrix/federation/v1/send/t1", transaction(), FROM_B).code == 200
    assert len(rig.component.calls) == 1


def leases(store: SyncStore) -> int:
    return store.db.execute("SELECT COUNT(*) FROM matrix_transactions_in_flight").fetchone()[0]


def test_a_caller_that_gives_up_while_the_lease_is_taken_lets_it_go():
    store = SlowStore()
    transactions = Transactions(store, Clock(), lease_seconds=LEASE_SECONDS)
    called = []
    d = transactions.handle("b.example", "t1", transaction(), lambda: called.append(1) or defer.succeed(None))
    d.addErrback(lambda f: f.trap(defer.CancelledError))
    d.cancel()  # the deadline, or the peer went away, while the database takes the lease
    store.run_pending()  # the lease is taken for nobody, then let go
    store.run_pending()
    assert called == [] and leases(store) == 0


def test_a_database_failure_after_processing_keeps_the_answer():
    store = SlowStore()
    transactions = Transactions(store, Clock(), lease_seconds=LEASE_SECONDS)
    answer = json_response(200, {"pdus": {}})
    d = transactions.handle("b.example", "t1", transaction(), lambda: defer.succeed(answer))
    store.run_pending()  # the lease
    store.fail_next = True
    with capturedLogs() as events:
        store.run_pending()  # storing the answer fails
    assert d.result is answer  # the peer still gets the homeserver's answer
    assert any("storing the answer to transaction t1 from b.example" in formatEvent(e) for e in events)


def test_the_lease_outlasts_the_route_deadline(tmp_path):
    """A lease shorter than the route's deadline would let a second transaction start beside a slow first."""
    from signedjson.key import generate_signing_key

    from fedserver_matrix.keys import write_signing_keys

    key_path = str(tmp_path / "signing.key")
    write_signing_keys(key_path, [generate_signing_key("k1")])
    path = minimal_config_file(
        tmp_path, "a.example", "a.example",
        authenticator=f'plugin = "matrix-signature"\nsigning_key = "{key_path}"',
    )('[limits]\nrequest_timeout = 100\ncomponent_timeout = 40\n')
    service = build_service(path, reactor=MemoryReactorClock(), listen=False)
    assert service.context.plugin_state["matrix.transactions"]._lease_ms == (100 + 40 + 30) * 1000


def test_a_transaction_that_fails_lets_the_origin_go():
    rig = make_rig(FakeComponent(defer.fail(FederationError("the homeserver is down", "component-unavailable"))))
    assert ask(rig.inward, b"PUT", b"/_matrix/federation/v1/send/t1", transaction(), FROM_B).code == 502
    assert rig.transactions._store.db.execute("SELECT COUNT(*) FROM matrix_transactions_in_flight").fetchone() == (0,)
    rig.component.answer = json_response(200, {"pdus": {}})
    assert ask(rig.inward, b"PUT", b"/_matrix/federation/v1/send/t1", transaction(), FROM_B).code == 200


def test_inbound_calls_are_told_to_the_pipeline_observers():
    """The metrics and the per-domain status see Matrix's inbound calls as they see Wire's."""
    rig = make_rig()
    seen: List[CallOutcome] = []
    rig.pipeline.observers.append(seen.append)
    ask(rig.inward, b"GET", b"/_matrix/federation/v1/query/profile?user_id=%40a%3Aa.example", b"", FROM_B)
    ask(rig.inward, b"GET", b"/_matrix/federation/v1/version", b"", [(b"X-Test-Origin", b"evil.example")])
    assert [(o.direction, o.domain, o.component, o.rpc, o.label, o.code) for o in seen] == [
        ("inbound", "b.example", "matrix", "query", None, 200),
        # the label's own status (Wire's 400); the Matrix peer was answered 403 M_FORBIDDEN
        ("inbound", "evil.example", "matrix", "version", "federation-denied", 400),
    ]


def test_a_peer_over_its_limit_gets_m_limit_exceeded_with_retry_after():
    pending: Deferred = Deferred()
    rig = make_rig(FakeComponent(pending), max_inbound_per_peer=1)
    first = HTTPConnection.to(rig.inward)
    first.request(b"GET", b"/_matrix/federation/v1/query/profile?user_id=%40a%3Aa.example", b"", FROM_B)
    refused = ask(rig.inward, b"GET", b"/_matrix/federation/v1/version", b"", FROM_B)
    body = matrix(refused, 429, "M_LIMIT_EXCEEDED")
    assert (body["fedserver_label"], body["retry_after_ms"], refused.header("Retry-After")) == (
        "too-many-requests", 1000, "1")
    pending.callback(json_response(200, {"ok": True}))
    assert first.answer().code == 200
    rig.component.answer = json_response(200, {"ok": True})
    assert ask(rig.inward, b"GET", b"/_matrix/federation/v1/version", b"", FROM_B).code == 200  # counted back


def test_pruning_forgets_answers_older_than_the_window():
    rig = make_rig()
    ask(rig.inward, b"PUT", b"/_matrix/federation/v1/send/t1", transaction(), FROM_B)
    rig.clock.advance(REPLAY_FOR_MS / 1000 + 1)
    rig.transactions.prune()
    assert rig.transactions._store.db.execute("SELECT COUNT(*) FROM matrix_transactions").fetchone() == (0,)


def test_the_homeserver_sends_through_the_outward_route():
    client = FakeClient(outcomes={"127.0.0.1": json_response(404, {"errcode": "M_NOT_FOUND", "error": "no"})})
    rig = make_rig(client=client)
    answer = ask(rig.outward, b"GET", b"/_matrix/federation/v1/query/profile?user_id=%40b%3Ab.example", b"",
                 [(b"X-Matrix-Destination", b"b.example")])
    # the remote's answer comes back as it is, errors included
    assert (answer.code, answer.json()) == (404, {"errcode": "M_NOT_FOUND", "error": "no"})
    ((target, request),) = client.sent
    assert (target.infra_domain, request.destination) == ("b.example", "b.example")
    assert request.path == "/_matrix/federation/v1/query/profile?user_id=%40b%3Ab.example"
    assert request.header("Authorization") == "X-Matrix signed"


@pytest.mark.parametrize(
    "headers, status, errcode",
    [([], 400, "M_MISSING_PARAM"), ([(b"X-Matrix-Destination", b"evil.example")], 403, "M_FORBIDDEN")],
)
def test_outward_refusals(headers, status, errcode):
    rig = make_rig()
    matrix(ask(rig.outward, b"GET", b"/_matrix/federation/v1/version", b"", headers), status, errcode)
    assert rig.client.sent == []


def test_errors_carry_their_own_errcode_and_status():
    error = FederationError("bad header", "authentication-failure")
    error.errcode, error.matrix_status = "M_UNAUTHORIZED", 400  # type: ignore[attr-defined]
    answer = matrix_error(error)
    assert (answer.code, json.loads(answer.body)["errcode"]) == (400, "M_UNAUTHORIZED")
    assert json.loads(matrix_error(FederationError("x", "internal-error")).body)["errcode"] == "M_UNKNOWN"


def test_the_component_answer_keeps_only_its_content_type():
    rig = make_rig(FakeComponent(Response(200, [("Content-Type", "application/json"), ("X-Secret", "1")], b"{}")))
    answer = ask(rig.inward, b"GET", b"/_matrix/federation/v1/version", b"", FROM_B)
    assert answer.header("x-secret") is None


class Keys:
    def server_keys_json(self) -> bytes:
        return b'{"server_name":"a.example"}'


@pytest.mark.parametrize(
    "method, path, status, document",
    [
        (b"GET", b"/_matrix/key/v2/server", 200, {"server_name": "a.example"}),
        (b"GET", b"/_matrix/key/v2/server/ed25519:a", 200, {"server_name": "a.example"}),
        (b"POST", b"/_matrix/key/v2/server", 405, None),
        (b"GET", b"/_matrix/key/v1/server", 404, None),
    ],
)
def test_the_key_server(method, path, status, document):
    from fedserver_matrix.keyserver import KeyServer

    rig = make_rig()
    root = ListenerRoot("inward listener")
    federation = rig.inward.resource.children[b"_matrix"].children[b"federation"]
    root.mount(b"_matrix", MatrixRoot(federation, KeyServer(Keys())))
    answer = ask(site_for(root), method, path)
    assert answer.code == status
    if document is not None:
        assert answer.json() == document
    else:
        assert answer.json()["errcode"] in ("M_UNRECOGNIZED",)
