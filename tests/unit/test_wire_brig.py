"""
L{fedserver_wire.brig}: the federated RPCs of the reference brig (each
answer and each refusal) and its lookups on other backends through a fake
pipeline.  Real store, so pytest-twisted, each step bounded.
"""

from __future__ import annotations

import base64
import json
import sqlite3

import pytest
import pytest_twisted
from zope.interface.verify import verifyObject

from fedserver.errors import FederationError
from fedserver.interfaces import IComponentHandler
from fedserver.jsonapi import APIError
from fedserver_wire.checks import QualifiedId
from fedserver_wire.store import LAST_RESORT_KEY_ID
from tests.unit.helpers import json_response
from tests.unit.wire_helpers import RecordingPipeline, answer_json, backend_factory, bounded, ok, refusal, uid

B_ID = "00000000-0000-4000-8000-00000000000b"
UNKNOWN = "00000000-0000-4000-8000-000000000999"


@pytest.fixture
def backends(tmp_path):
    yield from backend_factory(tmp_path)


@pytest.fixture
def pipeline():
    return RecordingPipeline()


def profile_of(handle: str, domain: str = "b.example", user_id: str = B_ID, name: str = "Bob") -> dict:
    return {"qualified_id": {"id": user_id, "domain": domain}, "handle": handle, "name": name}


async def refused(d, code: int, label: str) -> APIError:
    with pytest.raises(APIError) as info:
        await bounded(d)
    assert (info.value.code, info.value.label) == (code, label), info.value
    return info.value


def test_brig_provides_the_interface(backends):
    assert verifyObject(IComponentHandler, backends().brig)


# get-user-by-handle


@pytest_twisted.ensureDeferred
async def test_get_user_by_handle(backends):
    a = backends()
    alice = await a.user("alice", "Alice")
    response = await a.call("brig", "get-user-by-handle", {"handle": "alice"}, origin="b.example")
    assert response.code == 200
    assert answer_json(response) == {
        "qualified_id": {"id": uid(alice), "domain": "a.example"}, "handle": "alice", "name": "Alice"
    }
    missing = await a.call("brig", "get-user-by-handle", {"handle": "nobody"}, origin="b.example")
    assert (missing.code, missing.body) == (200, b"null")


@pytest_twisted.ensureDeferred
async def test_get_user_by_handle_refusals(backends):
    a = backends()
    refusal(await a.call("brig", "get-user-by-handle", {"handle": "Alice!"}, origin="b.example"), 400,
            "invalid-handle")
    refusal(await a.call("brig", "get-user-by-handle", {}, origin="b.example"), 400, "bad-request")
    refusal(await a.call("brig", "get-user-by-handle", "alice", origin="b.example"), 400, "bad-request")
    refusal(await a.call("brig", "get-user-by-handle", None, raw=b"nope", origin="b.example"), 400, "bad-request")
    refusal(await a.call("brig", "get-user", {}, origin="b.example"), 404, "no-endpoint")


# search-users


@pytest_twisted.ensureDeferred
async def test_search_users_finds_the_exact_handle_by_default(backends):
    a = backends()
    bob = await a.user("bob", "Bob")
    await a.user("bobby", "Bobby")
    response = await a.call("brig", "search-users", {"term": " @Bob "}, origin="b.example")
    assert answer_json(response) == {
        "documents": [{"qualified_id": {"id": uid(bob), "domain": "a.example"}, "handle": "bob", "name": "Bob"}],
        "search_policy": "exact_handle_search",
    }
    nothing = await a.call("brig", "search-users", {"term": "bo"}, origin="b.example")
    assert answer_json(nothing)["documents"] == []


@pytest_twisted.ensureDeferred
async def test_search_users_full_search_and_its_limit(backends):
    a = backends(search_policy="full_search", search_limit=2)
    for handle, name in [("bob", "Bob"), ("bobby", "Bobby"), ("carol", "Carol Bobsleigh")]:
        await a.user(handle, name)
    answer = answer_json(await a.call("brig", "search-users", {"term": "bob"}, origin="b.example"))
    assert [d["handle"] for d in answer["documents"]] == ["bob", "bobby"]
    assert answer["search_policy"] == "full_search"


@pytest_twisted.ensureDeferred
async def test_search_users_no_search(backends):
    a = backends(search_policy="no_search")
    await a.user("bob")
    answer = answer_json(await a.call("brig", "search-users", {"term": "bob"}, origin="b.example"))
    assert answer == {"documents": [], "search_policy": "no_search"}


@pytest_twisted.ensureDeferred
async def test_search_users_refusals(backends):
    a = backends()
    for body in [{}, {"term": 3}, {"term": "@ "}, {"term": "x" * 129}, ["bob"]]:
        refusal(await a.call("brig", "search-users", body, origin="b.example"), 400, "bad-request")


# get-users-by-ids


@pytest_twisted.ensureDeferred
async def test_get_users_by_ids(backends):
    a = backends()
    alice, bob = await a.user("alice"), await a.user("bob")
    answer = answer_json(await a.call("brig", "get-users-by-ids", [uid(bob), UNKNOWN, uid(alice)],
                                      origin="b.example"))
    assert [p["handle"] for p in answer] == ["bob", "alice"]
    assert all(p["qualified_id"]["domain"] == "a.example" for p in answer)
    assert answer_json(await a.call("brig", "get-users-by-ids", [], origin="b.example")) == []


@pytest_twisted.ensureDeferred
async def test_get_users_by_ids_refusals(backends):
    a = backends()
    for body in [{"ids": []}, ["not-an-id"], [B_ID.upper()], [UNKNOWN] * 501, [None]]:
        refusal(await a.call("brig", "get-users-by-ids", body, origin="b.example"), 400, "bad-request")


# claim-prekey-bundle


@pytest_twisted.ensureDeferred
async def test_claim_prekey_bundle_consumes_prekeys_but_not_the_last_resort_key(backends, tmp_path):
    a = backends(prekeys=2)
    alice = await a.user("alice")
    [client] = alice["clients"]
    claims = []
    for _ in range(4):
        response = await a.call("brig", "claim-prekey-bundle", {"user": uid(alice)}, origin="b.example")
        claims.append(answer_json(response))
    assert [c["user"] for c in claims] == [uid(alice)] * 4
    assert [[(x["client"], x["prekey"]["id"]) for x in c["clients"]] for c in claims] == [
        [(client, 0)], [(client, 1)], [(client, LAST_RESORT_KEY_ID)], [(client, LAST_RESORT_KEY_ID)]
    ]
    keys = [c["clients"][0]["prekey"]["key"] for c in claims]
    assert len(set(keys)) == 3 and keys[2] == keys[3]
    assert all(len(base64.b64decode(k, validate=True)) == 32 for k in keys)
    with sqlite3.connect(str(tmp_path / "a.example.sqlite")) as connection:
        assert connection.execute("SELECT key_id FROM wire_prekeys").fetchall() == [(LAST_RESORT_KEY_ID,)]


@pytest_twisted.ensureDeferred
async def test_claim_prekey_bundle_refusals(backends):
    a = backends()
    body = refusal(await a.call("brig", "claim-prekey-bundle", {"user": UNKNOWN}, origin="b.example"), 404,
                   "not-found")
    assert UNKNOWN in body["message"]
    refusal(await a.call("brig", "claim-prekey-bundle", {"user": "bob"}, origin="b.example"), 400, "bad-request")
    refusal(await a.call("brig", "claim-prekey-bundle", {}, origin="b.example"), 400, "bad-request")


# local operations


@pytest_twisted.ensureDeferred
async def test_new_users_get_a_client_with_prekeys(backends, tmp_path):
    a = backends(prekeys=3)
    a.clock.advance(1715170000)
    created = await bounded(a.brig.create_user("alice", "Alice"))
    assert created["handle"] == "alice" and len(created["clients"][0]) == 16
    with sqlite3.connect(str(tmp_path / "a.example.sqlite")) as connection:
        ids = [r[0] for r in connection.execute("SELECT key_id FROM wire_prekeys ORDER BY key_id")]
        assert connection.execute("SELECT created FROM wire_users").fetchall() == [(1715170000.0,)]
    assert ids == [0, 1, 2, LAST_RESORT_KEY_ID]
    await refused(a.brig.create_user("alice", "Other"), 409, "handle-exists")


@pytest_twisted.ensureDeferred
async def test_require_local_users(backends):
    a = backends()
    alice = await a.user("alice")
    await bounded(a.brig.require_local_users([uid(alice)]))
    error = await refused(a.brig.require_local_users([uid(alice), UNKNOWN]), 404, "not-found")
    assert UNKNOWN in error.message


@pytest_twisted.ensureDeferred
async def test_lookups_on_our_own_domain_stay_local(backends, pipeline):
    a = backends(pipeline=pipeline)
    alice = await a.user("alice", "Alice Liddell")
    assert (await bounded(a.brig.lookup_handle("a.example", "alice", "r")))["handle"] == "alice"
    assert await bounded(a.brig.lookup_handle("a.example", "nobody", "r")) is None
    assert [p["handle"] for p in await bounded(a.brig.search("lid", "a.example", "r"))] == ["alice"]
    assert [p["handle"] for p in await bounded(a.brig.profiles("a.example", [uid(alice)], "r"))] == ["alice"]
    bundle = await bounded(a.brig.claim_bundle(QualifiedId("a.example", uid(alice)), "r"))
    assert bundle["user"] == uid(alice)
    assert pipeline.calls == []


# the same on other backends


@pytest_twisted.ensureDeferred
async def test_lookup_handle_on_another_backend(backends, pipeline):
    a = backends(pipeline=pipeline)
    pipeline.answer("b.example", "brig", "get-user-by-handle", ok(profile_of("bob")))
    assert await bounded(a.brig.lookup_handle("b.example", "bob", "r")) == profile_of("bob")
    assert pipeline.bodies("get-user-by-handle") == [("b.example", {"handle": "bob"})]
    pipeline.answer("b.example", "brig", "get-user-by-handle", json_response(200, None))
    assert await bounded(a.brig.lookup_handle("b.example", "bob", "r")) is None


@pytest.mark.parametrize(
    "answer, reason",
    [
        (profile_of("bob", domain="c.example"), "a user of c.example: b.example does not own it"),
        (profile_of("robert"), "not of 'bob'"),
        ({"handle": "bob"}, "qualified_id"),
        ([], "must be an object"),
        (profile_of("bob", name=""), "name"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_a_remote_profile_that_is_wrong_is_refused(backends, pipeline, answer, reason):
    a = backends(pipeline=pipeline)
    pipeline.answer("b.example", "brig", "get-user-by-handle", ok(answer))
    error = await refused(a.brig.lookup_handle("b.example", "bob", "r"), 533, "federation-unexpected-body")
    assert reason in error.message


@pytest_twisted.ensureDeferred
async def test_search_on_another_backend(backends, pipeline):
    a = backends(pipeline=pipeline)
    pipeline.answer("b.example", "brig", "search-users",
                    ok({"documents": [profile_of("bob")], "search_policy": "full_search"}))
    assert await bounded(a.brig.search("bob", "b.example", "r")) == [profile_of("bob")]
    assert pipeline.bodies("search-users") == [("b.example", {"term": "bob"})]
    assert pipeline.calls[0].origin_domain == "a.example"
    for bad in [{"results": []}, {"documents": {}}, {"documents": [profile_of("x", domain="c.example")]}]:
        pipeline.answer("b.example", "brig", "search-users", ok(bad))
        await refused(a.brig.search("bob", "b.example", "r"), 533, "federation-unexpected-body")


@pytest_twisted.ensureDeferred
async def test_profiles_on_another_backend(backends, pipeline):
    a = backends(pipeline=pipeline)
    pipeline.answer("b.example", "brig", "get-users-by-ids", ok([profile_of("bob")]))
    assert await bounded(a.brig.profiles("b.example", [B_ID], "r")) == [profile_of("bob")]
    assert pipeline.bodies("get-users-by-ids") == [("b.example", [B_ID])]
    pipeline.answer("b.example", "brig", "get-users-by-ids", ok([profile_of("eve", user_id=UNKNOWN)]))
    error = await refused(a.brig.profiles("b.example", [B_ID], "r"), 533, "federation-unexpected-body")
    assert "not asked for" in error.message
    pipeline.answer("b.example", "brig", "get-users-by-ids", ok({"profiles": []}))
    await refused(a.brig.profiles("b.example", [B_ID], "r"), 533, "federation-unexpected-body")


def bundle(user: str = B_ID, client: str = "0123abcd", key_id=1, key: str = "AAAA") -> dict:
    return {"user": user, "clients": [{"client": client, "prekey": {"id": key_id, "key": key}}]}


@pytest_twisted.ensureDeferred
async def test_claim_bundle_on_another_backend(backends, pipeline):
    a = backends(pipeline=pipeline)
    pipeline.answer("b.example", "brig", "claim-prekey-bundle", ok(bundle()))
    assert await bounded(a.brig.claim_bundle(QualifiedId("b.example", B_ID), "r")) == bundle()
    assert pipeline.bodies("claim-prekey-bundle") == [("b.example", {"user": B_ID})]


@pytest.mark.parametrize(
    "answer, reason",
    [
        (bundle(user=UNKNOWN), "not of"),
        (bundle(client="XYZ"), "client id"),
        (bundle(key_id=70000), "prekey id"),
        (bundle(key_id=True), "prekey id"),
        (bundle(key="not base64!"), "base64"),
        ({"user": B_ID}, "clients"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_a_remote_bundle_that_is_wrong_is_refused(backends, pipeline, answer, reason):
    a = backends(pipeline=pipeline)
    pipeline.answer("b.example", "brig", "claim-prekey-bundle", ok(answer))
    error = await refused(a.brig.claim_bundle(QualifiedId("b.example", B_ID), "r"), 533, "federation-unexpected-body")
    assert reason in error.message


@pytest_twisted.ensureDeferred
async def test_a_remote_refusal_comes_back_labelled(backends, pipeline):
    a = backends(pipeline=pipeline)
    inner = {"code": 404, "label": "not-found", "message": "no"}
    pipeline.answer("b.example", "brig", "claim-prekey-bundle", json_response(404, inner))
    with pytest.raises(FederationError) as info:
        await bounded(a.brig.claim_bundle(QualifiedId("b.example", B_ID), "r"))
    assert (info.value.label, info.value.inner) == ("federation-remote-error", inner)
    assert json.loads(info.value.to_bytes())["data"]["path"] == "/federation/brig/claim-prekey-bundle"
