"""
L{fedserver_wire.api}: the local client API, route by route with its
refusals, calling other backends through a fake pipeline; and the resource
on a real L{FederationSite} over an in-memory connection.  Real store, so
pytest-twisted, each step bounded.
"""

from __future__ import annotations

import io
import json
from typing import Any, Dict, List

import pytest
import pytest_twisted
from twisted.web.resource import Resource
from twisted.web.test.requesthelper import DummyRequest

from fedserver.errors import FederationError
from fedserver.web import FederationSite
from fedserver_wire.api import WireAPIResource
from tests.unit.helpers import HTTPConnection, json_response
from tests.unit.wire_helpers import (
    Backend,
    RecordingPipeline,
    answer_json,
    backend_factory,
    bounded,
    ok,
    qid,
    refusal,
    uid,
)

A, B, C = "a.example", "b.example", "c.example"
BOB_ID = "00000000-0000-4000-8000-0000000000b0"
BOB = {"id": BOB_ID, "domain": B}
CAROL = {"id": "00000000-0000-4000-8000-0000000000c0", "domain": C}
UNKNOWN = "00000000-0000-4000-8000-000000000999"
CONV_B = {"id": "00000000-0000-4000-8000-0000000000cb", "domain": B}
TIME = "2024-05-08T12:00:00.000Z"


def bob_profile(domain: str = B) -> Dict[str, Any]:
    return {"qualified_id": {"id": BOB_ID, "domain": domain}, "handle": "bob", "name": "Bob"}


def bundle_of(user_id: str) -> Dict[str, Any]:
    return {"user": user_id, "clients": [{"client": "00ff", "prekey": {"id": 3, "key": "AAAA"}}]}


@pytest.fixture
def backends(tmp_path):
    yield from backend_factory(tmp_path)


@pytest.fixture
def pipeline():
    return RecordingPipeline()


@pytest.fixture
def a(backends, pipeline) -> Backend:
    return backends(pipeline=pipeline)


# users


@pytest_twisted.ensureDeferred
async def test_create_a_user(a):
    response = await a.request("POST", "/wire/users", {"handle": "alice", "name": "Alice Liddell"})
    assert response.code == 201
    user = answer_json(response)
    assert user["handle"] == "alice" and user["name"] == "Alice Liddell"
    assert user["qualified_id"]["domain"] == A and len(user["clients"]) == 1


@pytest_twisted.ensureDeferred
async def test_create_user_refusals(a):
    await a.user("alice")
    refusal(await a.request("POST", "/wire/users", {"handle": "alice", "name": "A"}), 409, "handle-exists")
    refusal(await a.request("POST", "/wire/users", {"handle": "Al ice", "name": "A"}), 400, "invalid-handle")
    refusal(await a.request("POST", "/wire/users", {"handle": "x", "name": "A"}), 400, "invalid-handle")
    for body in [{"handle": "bob", "name": "   "}, {"handle": "bob", "name": "x" * 129}, {"handle": "bob"},
                 {"handle": "bob", "name": "B", "admin": True}, ["bob"], {"handle": "bob", "name": 5}]:
        refusal(await a.request("POST", "/wire/users", body), 400, "bad-request")
    refusal(await a.request("POST", "/wire/users", raw=b"handle=bob"), 400, "bad-request")


@pytest_twisted.ensureDeferred
async def test_the_inbox_and_its_pages(a, pipeline):
    alice, bob = await a.user("alice"), await a.user("bob")
    for n in range(3):
        created = await a.request("POST", "/wire/conversations",
                                  {"creator": uid(alice), "name": f"c{n}", "members": [qid(bob)]})
        assert created.code == 201
    first = answer_json(await a.request("GET", f"/wire/users/{uid(bob)}/inbox", query={"size": "2"}))
    assert [e["seq"] for e in first["events"]] == [1, 2] and first["has_more"]
    rest = answer_json(await a.request("GET", f"/wire/users/{uid(bob)}/inbox", query={"since": "2"}))
    assert [e["data"]["name"] for e in rest["events"]] == ["c2"] and not rest["has_more"]


@pytest_twisted.ensureDeferred
async def test_inbox_refusals(a):
    alice = await a.user("alice")
    refusal(await a.request("GET", f"/wire/users/{UNKNOWN}/inbox"), 404, "not-found")
    refusal(await a.request("GET", "/wire/users/alice/inbox"), 400, "bad-request")
    path = f"/wire/users/{uid(alice)}/inbox"
    refusal(await a.request("GET", path, query={"size": "0"}), 400, "bad-request")
    refusal(await a.request("GET", path, query={"size": "501"}), 400, "bad-request")
    refusal(await a.request("GET", path, query={"since": "-1"}), 400, "bad-request")
    refusal(await a.request("GET", path, query={"from": "1"}), 400, "bad-request")
    refusal(await a.request("GET", path, query={"since": ["1", "2"]}), 400, "bad-request")
    bad_utf8 = await bounded(a.api.handle("GET", path, {b"since": [b"\xff"]}, b"", "r"))
    refusal(bad_utf8, 400, "bad-request")


# finding users


@pytest_twisted.ensureDeferred
async def test_search_locally(a, pipeline):
    await a.user("alice", "Alice Liddell")
    for q in ["ali", "@alice", "liddell", "@alice@a.example"]:
        answer = answer_json(await a.request("GET", "/wire/search", query={"q": q}))
        assert [d["handle"] for d in answer["documents"]] == ["alice"], q
    assert pipeline.calls == []


@pytest_twisted.ensureDeferred
async def test_search_on_another_backend(a, pipeline):
    pipeline.answer(B, "brig", "search-users", ok({"documents": [bob_profile()], "search_policy": "full_search"}))
    response = await a.request("GET", "/wire/search", query={"q": "@bob@b.example"})
    assert answer_json(response) == {"documents": [bob_profile()]}
    assert pipeline.bodies("search-users") == [(B, {"term": "bob"})]
    assert pipeline.calls[0].request_id == "req-api"


@pytest_twisted.ensureDeferred
async def test_a_failed_remote_search_is_the_labelled_federation_error(a, pipeline):
    inner = {"code": 403, "label": "federation-denied", "message": "a.example is not allowed"}
    pipeline.answer(B, "brig", "search-users", json_response(403, inner))
    body = refusal(await a.request("GET", "/wire/search", query={"q": "@bob@b.example"}), 533,
                   "federation-remote-error")
    assert body["inner"] == inner
    assert body["data"] == {"type": "federation", "domain": B, "path": "/federation/brig/search-users"}
    # a domain discovery does not know
    body = refusal(await a.request("GET", "/wire/search", query={"q": "bob@nowhere.example"}), 422,
                   "invalid-domain")
    assert body["data"]["domain"] == "nowhere.example"


@pytest_twisted.ensureDeferred
async def test_search_refusals(a):
    refusal(await a.request("GET", "/wire/search"), 400, "bad-request")
    for q in ["", "@", "@@b.example", "bob@B..example", "x" * 400]:
        refusal(await a.request("GET", "/wire/search", query={"q": q}), 400, "bad-request")
    refusal(await a.request("GET", "/wire/search", query={"q": "bob", "domain": B}), 400, "bad-request")


@pytest_twisted.ensureDeferred
async def test_handles_here_and_elsewhere(a, pipeline):
    alice = await a.user("alice")
    assert answer_json(await a.request("GET", "/wire/handles/a.example/alice"))["qualified_id"] == qid(alice)
    refusal(await a.request("GET", "/wire/handles/a.example/nobody"), 404, "not-found")
    pipeline.answer(B, "brig", "get-user-by-handle", ok(bob_profile()))
    assert answer_json(await a.request("GET", "/wire/handles/b.example/bob")) == bob_profile()
    pipeline.answer(B, "brig", "get-user-by-handle", json_response(200, None))
    refusal(await a.request("GET", "/wire/handles/b.example/bob"), 404, "not-found")
    refusal(await a.request("GET", "/wire/handles/b.example/B0B"), 400, "invalid-handle")
    refusal(await a.request("GET", "/wire/handles/B.example/bob"), 400, "bad-request")
    # b answered with somebody c owns
    pipeline.answer(B, "brig", "get-user-by-handle", ok(bob_profile(domain=C)))
    refusal(await a.request("GET", "/wire/handles/b.example/bob"), 533, "federation-unexpected-body")


@pytest_twisted.ensureDeferred
async def test_profiles_here_and_elsewhere(a, pipeline):
    alice = await a.user("alice")
    assert answer_json(await a.request("GET", f"/wire/profiles/a.example/{uid(alice)}"))["handle"] == "alice"
    refusal(await a.request("GET", f"/wire/profiles/a.example/{UNKNOWN}"), 404, "not-found")
    pipeline.answer(B, "brig", "get-users-by-ids", ok([bob_profile()]))
    assert answer_json(await a.request("GET", f"/wire/profiles/b.example/{BOB_ID}")) == bob_profile()
    assert pipeline.bodies("get-users-by-ids") == [(B, [BOB_ID])]
    pipeline.answer(B, "brig", "get-users-by-ids", ok([]))
    refusal(await a.request("GET", f"/wire/profiles/b.example/{BOB_ID}"), 404, "not-found")
    refusal(await a.request("GET", "/wire/profiles/b.example/bob"), 400, "bad-request")


# conversations


def answer_remote_members(pipeline: RecordingPipeline, *domains: str) -> None:
    def claim(call):
        return ok(bundle_of(json.loads(call.body)["user"]))

    for domain in domains:
        pipeline.answer(domain, "brig", "claim-prekey-bundle", claim)
        pipeline.answer(domain, "galley", "on-conversation-created", ok())
        pipeline.answer(domain, "galley", "on-message-sent", ok())


@pytest_twisted.ensureDeferred
async def test_create_a_conversation(a, pipeline):
    answer_remote_members(pipeline, B, C)
    alice, dave = await a.user("alice"), await a.user("dave")
    body = {"creator": uid(alice), "name": "Plans", "members": [BOB, qid(dave), CAROL, qid(alice)]}
    response = await a.request("POST", "/wire/conversations", body)
    assert response.code == 201
    answer = answer_json(response)
    conv = answer["conversation"]
    assert conv["qualified_id"]["domain"] == A and conv["name"] == "Plans"
    assert conv["creator"] == qid(alice)
    assert len(conv["members"]) == 4 and answer["failed_to_add"] == []
    # a bundle for every other member: remote ones claimed from their brig, dave's here
    bundles = {b["user"]["id"]: b for b in answer["prekey_bundles"]}
    assert set(bundles) == {BOB_ID, CAROL["id"], uid(dave)}
    assert bundles[BOB_ID] == {"user": BOB, "clients": bundle_of(BOB_ID)["clients"]}
    assert bundles[uid(dave)]["clients"][0]["prekey"]["id"] == 0
    assert pipeline.bodies("claim-prekey-bundle") == [(B, {"user": BOB_ID}), (C, {"user": CAROL["id"]})]
    # claims came first, then the owner told each backend
    rpcs = [c.rpc for c in pipeline.calls]
    assert rpcs == ["claim-prekey-bundle"] * 2 + ["on-conversation-created"] * 2
    inbox = answer_json(await a.request("GET", f"/wire/users/{uid(dave)}/inbox"))["events"]
    assert [e["type"] for e in inbox] == ["conversation.create"]


@pytest_twisted.ensureDeferred
async def test_a_remote_member_that_does_not_exist_stops_creation(a, pipeline):
    answer_remote_members(pipeline, C)
    pipeline.answer(B, "brig", "claim-prekey-bundle",
                    json_response(404, {"code": 404, "label": "not-found", "message": "no such user"}))
    alice = await a.user("alice")
    body = {"creator": uid(alice), "name": "Plans", "members": [CAROL, BOB]}
    error = refusal(await a.request("POST", "/wire/conversations", body), 533, "federation-remote-error")
    assert error["inner"]["label"] == "not-found"
    assert [c.rpc for c in pipeline.calls] == ["claim-prekey-bundle"] * 2
    assert answer_json(await a.request("GET", f"/wire/users/{uid(alice)}/inbox"))["events"] == []


@pytest_twisted.ensureDeferred
async def test_members_whose_backend_failed_are_reported(a, pipeline):
    answer_remote_members(pipeline, B, C)
    pipeline.answer(C, "galley", "on-conversation-created", FederationError("no route", "discovery-failure"))
    alice = await a.user("alice")
    answer = answer_json(await a.request("POST", "/wire/conversations",
                                         {"creator": uid(alice), "name": "P", "members": [BOB, CAROL]}))
    assert [(f["domain"], f["users"], f["error"]["label"]) for f in answer["failed_to_add"]] == [
        (C, [CAROL], "discovery-failure")
    ]
    assert [b["user"] for b in answer["prekey_bundles"]] == [BOB]
    assert CAROL not in answer["conversation"]["members"]


@pytest_twisted.ensureDeferred
async def test_create_conversation_refusals(a, pipeline):
    alice = await a.user("alice")
    ghost = {"id": UNKNOWN, "domain": A}
    refusal(await a.request("POST", "/wire/conversations", {"creator": UNKNOWN, "name": "P", "members": []}),
            404, "not-found")
    refusal(await a.request("POST", "/wire/conversations", {"creator": uid(alice), "name": "P",
                                                            "members": [BOB, ghost]}), 404, "not-found")
    many = [{"id": f"00000000-0000-4000-8000-{n:012d}", "domain": B} for n in range(128)]
    for body in [
        {"creator": uid(alice), "name": "", "members": []},
        {"creator": uid(alice), "members": []},
        {"creator": "alice", "name": "P", "members": []},
        {"creator": uid(alice), "name": "P", "members": [BOB, BOB]},
        {"creator": uid(alice), "name": "P", "members": [{"id": BOB_ID}]},
        {"creator": uid(alice), "name": "P", "members": many},
        {"creator": uid(alice), "name": "P", "members": {"a": 1}},
    ]:
        refusal(await a.request("POST", "/wire/conversations", body), 400, "bad-request")
    assert pipeline.calls == []


async def local_conversation(a: Backend, pipeline: RecordingPipeline) -> Dict[str, Any]:
    answer_remote_members(pipeline, B)
    alice, dave, eve = await a.user("alice"), await a.user("dave"), await a.user("eve")
    answer = answer_json(await a.request("POST", "/wire/conversations",
                                         {"creator": uid(alice), "name": "P", "members": [BOB, qid(dave)]}))
    conv = answer["conversation"]["qualified_id"]
    return {"alice": alice, "dave": dave, "eve": eve, "conv": conv,
            "path": f"/wire/conversations/{conv['domain']}/{conv['id']}"}


@pytest_twisted.ensureDeferred
async def test_read_a_local_conversation(a, pipeline):
    s = await local_conversation(a, pipeline)
    metadata = answer_json(await a.request("GET", s["path"], query={"user": uid(s["dave"])}))
    assert metadata["qualified_id"] == s["conv"] and BOB in metadata["members"]
    refusal(await a.request("GET", s["path"], query={"user": uid(s["eve"])}), 403, "access-denied")
    refusal(await a.request("GET", s["path"]), 400, "bad-request")
    refusal(await a.request("GET", s["path"], query={"user": "dave"}), 400, "bad-request")
    refusal(await a.request("GET", f"/wire/conversations/a.example/{UNKNOWN}", query={"user": uid(s["dave"])}),
            404, "no-conversation")
    refusal(await a.request("GET", "/wire/conversations/a.example/x", query={"user": uid(s["dave"])}),
            400, "bad-request")


@pytest_twisted.ensureDeferred
async def test_send_to_a_local_conversation(a, pipeline):
    s = await local_conversation(a, pipeline)
    response = await a.request("POST", s["path"] + "/messages", {"sender": uid(s["alice"]), "text": "hi\nthere"})
    assert response.code == 201
    answer = answer_json(response)
    assert answer["message"]["text"] == "hi\nthere" and answer["failed_to_send"] == []
    inbox = answer_json(await a.request("GET", f"/wire/users/{uid(s['dave'])}/inbox"))["events"]
    assert inbox[-1]["type"] == "conversation.message-add"
    assert inbox[-1]["data"] == {"id": answer["message"]["id"], "text": "hi\nthere"}
    [(domain, body)] = pipeline.bodies("on-message-sent")
    assert domain == B and body["sender"] == qid(s["alice"])


@pytest_twisted.ensureDeferred
async def test_send_refusals(a, pipeline):
    s = await local_conversation(a, pipeline)
    path = s["path"] + "/messages"
    refusal(await a.request("POST", path, {"sender": uid(s["eve"]), "text": "hi"}), 403, "access-denied")
    refusal(await a.request("POST", f"/wire/conversations/a.example/{UNKNOWN}/messages",
                            {"sender": uid(s["alice"]), "text": "hi"}), 404, "no-conversation")
    for body in [{"sender": uid(s["alice"]), "text": ""}, {"sender": uid(s["alice"]), "text": "x" * 4097},
                 {"sender": uid(s["alice"])}, {"sender": uid(s["alice"]), "text": "x", "to": []}]:
        refusal(await a.request("POST", path, body), 400, "bad-request")
    assert pipeline.bodies("on-message-sent") == []


@pytest_twisted.ensureDeferred
async def test_leave_a_local_conversation(a, pipeline):
    s = await local_conversation(a, pipeline)
    response = await a.request("POST", s["path"] + "/leave", {"user": uid(s["dave"])})
    assert (response.code, answer_json(response)) == (200, {"conversation": s["conv"], "user": qid(s["dave"])})
    refusal(await a.request("POST", s["path"] + "/leave", {"user": uid(s["dave"])}), 403, "access-denied")
    refusal(await a.request("POST", s["path"] + "/leave", {"member": uid(s["dave"])}), 400, "bad-request")
    # dave left: he gets no more messages
    await a.request("POST", s["path"] + "/messages", {"sender": uid(s["alice"]), "text": "bye"})
    inbox = answer_json(await a.request("GET", f"/wire/users/{uid(s['dave'])}/inbox"))["events"]
    assert [e["type"] for e in inbox] == ["conversation.create"]


async def remote_conversation(a: Backend) -> Dict[str, Any]:
    alice = await a.user("alice")
    body = {"conversation": CONV_B, "name": "Theirs", "creator": BOB, "members": [BOB, qid(alice)], "time": TIME}
    assert (await a.call("galley", "on-conversation-created", body, origin=B)).code == 200
    return alice


@pytest_twisted.ensureDeferred
async def test_remote_conversations_go_through_their_owner(a, pipeline):
    alice = await remote_conversation(a)
    path = f"/wire/conversations/{B}/{CONV_B['id']}"
    sent = {"message": {"id": UNKNOWN, "time": TIME}, "failed_to_send": []}
    pipeline.answer(B, "galley", "send-message", ok(sent))
    response = await a.request("POST", path + "/messages", {"sender": uid(alice), "text": "hi"})
    assert response.code == 201
    assert answer_json(response)["message"] == {"id": UNKNOWN, "conversation": CONV_B, "sender": qid(alice),
                                                "text": "hi", "time": TIME}
    metadata = {"qualified_id": CONV_B, "name": "Theirs", "creator": BOB, "members": [BOB, qid(alice)],
                "created": TIME}
    pipeline.answer(B, "galley", "get-conversations", ok({"conversations": [metadata]}))
    assert answer_json(await a.request("GET", path, query={"user": uid(alice)})) == metadata
    pipeline.answer(B, "galley", "leave-conversation", ok())
    assert (await a.request("POST", path + "/leave", {"user": uid(alice)})).code == 200
    assert [c.rpc for c in pipeline.calls] == ["send-message", "get-conversations", "leave-conversation"]


@pytest_twisted.ensureDeferred
async def test_an_owners_refusal_is_shown_labelled(a, pipeline):
    alice = await remote_conversation(a)
    inner = {"code": 403, "label": "access-denied", "message": "not a member"}
    pipeline.answer(B, "galley", "send-message", json_response(403, inner))
    body = refusal(await a.request("POST", f"/wire/conversations/{B}/{CONV_B['id']}/messages",
                                   {"sender": uid(alice), "text": "hi"}), 533, "federation-remote-error")
    assert body["inner"] == inner
    assert body["data"] == {"type": "federation", "domain": B, "path": "/federation/galley/send-message"}


# routing


@pytest_twisted.ensureDeferred
async def test_unknown_routes_and_methods(a):
    for path in ["/wire/", "/wire/nothing", "/wire/users/x/y/z", "/other", "/wire/users/"]:
        refusal(await a.request("GET", path), 404, "no-endpoint")
    body = refusal(await a.request("GET", "/wire/users"), 405, "method-not-allowed")
    assert "POST" in body["message"]
    refusal(await a.request("DELETE", f"/wire/conversations/{B}/{UNKNOWN}"), 405, "method-not-allowed")


# the resource on a real site


class RecordingSite(FederationSite):
    """A site that keeps, for each request, the Deferred of its end."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.finished: List[Any] = []

    def getResourceFor(self, request: Any) -> Any:
        self.finished.append(request.notifyFinish())
        return super().getResourceFor(request)


@pytest.fixture
def site(a):
    from twisted.internet.task import Clock

    root = Resource()
    root.putChild(b"wire", WireAPIResource(a.api, max_body_bytes=200))
    return RecordingSite(root, max_body_bytes=200, reactor=Clock())


async def exchange(site: RecordingSite, method: bytes, path: bytes, body: bytes = b"", headers=()) -> Any:
    connection = HTTPConnection.to(site)
    connection.request(method, path, body, headers)
    if site.finished:
        await bounded(site.finished.pop())
    answer = connection.answer()
    connection.close()
    return answer


@pytest_twisted.ensureDeferred
async def test_over_http(site):
    answer = await exchange(site, b"POST", b"/wire/users", b'{"handle": "alice", "name": "Alice"}')
    assert answer.code == 201 and answer.header("content-type") == "application/json"
    alice = answer.json()
    found = await exchange(site, b"GET", b"/wire/search?q=%40alice")
    assert found.code == 200 and found.json()["documents"][0]["qualified_id"] == alice["qualified_id"]
    refused = await exchange(site, b"GET", b"/wire/handles/a.example/nobody", headers=[(b"Request-Id", b"rq-7")])
    refused.labelled(404, "not-found")


@pytest_twisted.ensureDeferred
async def test_over_http_a_body_over_the_limit(site):
    answer = await exchange(site, b"POST", b"/wire/users", json.dumps({"handle": "a", "name": "x" * 300}).encode())
    answer.labelled(413, "request-too-large")


@pytest_twisted.ensureDeferred
async def test_over_http_a_plain_request_over_the_limit(a):
    """In an embedding application's own Site the limit is checked after reading."""
    request = DummyRequest([b""])
    request.method = b"POST"
    request.path = b"/wire/users"
    request.content = io.BytesIO(b"x" * 300)
    WireAPIResource(a.api, max_body_bytes=200).render(request)
    assert request.responseCode == 413
    assert json.loads(b"".join(request.written))["label"] == "request-too-large"
