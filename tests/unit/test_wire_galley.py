"""
L{fedserver_wire.galley}: every federated RPC of the reference galley with
its ownership and per-request authorization rules (each refusal), and the
owner's fan-out to other backends through a fake pipeline.  Real store, so
pytest-twisted, each step bounded.
"""

from __future__ import annotations

from typing import Any, Dict, List

import pytest
import pytest_twisted
from zope.interface.verify import verifyObject

from fedserver.errors import FederationError
from fedserver.interfaces import IComponentHandler
from fedserver.jsonapi import APIError
from fedserver_wire.checks import QualifiedId
from tests.unit.helpers import json_response
from tests.unit.wire_helpers import (
    Backend,
    RecordingPipeline,
    answer_json,
    backend_factory,
    bounded,
    eventually,
    ok,
    qid,
    refusal,
    uid,
)

A, B, C = "a.example", "b.example", "c.example"
TIME = "2024-05-08T12:00:00.000Z"


def remote_user(n: int, domain: str) -> Dict[str, str]:
    return {"id": f"00000000-0000-4000-8000-{n:012d}", "domain": domain}


CONV_B = {"id": "00000000-0000-4000-8000-0000000000cb", "domain": B}
BOB = remote_user(2, B)
BEA = remote_user(3, B)
CAROL = remote_user(4, C)


@pytest.fixture
def backends(tmp_path):
    yield from backend_factory(tmp_path)


@pytest.fixture
def pipeline():
    return RecordingPipeline()


async def events(backend: Backend, user: Dict[str, Any]) -> List[Dict[str, Any]]:
    response = await backend.request("GET", f"/wire/users/{uid(user)}/inbox")
    assert response.code == 200, response
    return answer_json(response)["events"]


def created(members: List[Dict[str, str]], conversation=CONV_B, creator=BOB, **changes) -> Dict[str, Any]:
    body = {"conversation": conversation, "name": "Their chat", "creator": creator, "members": members,
            "time": TIME}
    body.update(changes)
    return body


def sent(message_id: str = "00000000-0000-4000-8000-0000000000f1", conversation=CONV_B, sender=BOB,
         text: str = "hello") -> Dict[str, Any]:
    return {"conversation": conversation, "sender": sender,
            "message": {"id": message_id, "text": text, "time": TIME}}


def test_galley_provides_the_interface(backends):
    assert verifyObject(IComponentHandler, backends().galley)


# on-conversation-created


@pytest_twisted.ensureDeferred
async def test_on_conversation_created_registers_for_local_members(backends):
    a = backends()
    alice, dave = await a.user("alice"), await a.user("dave")
    members = [BOB, qid(alice), CAROL, qid(dave)]
    response = await a.call("galley", "on-conversation-created", created(members), origin=B)
    assert (response.code, answer_json(response)) == (200, {})
    [event] = await events(a, alice)
    assert event == {
        "seq": 1,
        "type": "conversation.create",
        "conversation": CONV_B,
        "from": BOB,
        "time": TIME,
        "data": {"name": "Their chat", "members": members},
    }
    assert len(await events(a, dave)) == 1
    # only our users are recorded for a conversation another backend owns
    recorded = await bounded(a.galley.store.members(QualifiedId(B, CONV_B["id"])))
    assert recorded == sorted([QualifiedId(A, uid(alice)), QualifiedId(A, uid(dave))])
    # told again: nothing new
    await a.call("galley", "on-conversation-created", created(members), origin=B)
    assert len(await events(a, alice)) == 1


@pytest_twisted.ensureDeferred
async def test_on_conversation_created_only_from_the_owner(backends):
    a = backends()
    alice = await a.user("alice")
    body = refusal(await a.call("galley", "on-conversation-created", created([BOB, qid(alice)]), origin=C),
                   403, "not-conversation-owner")
    assert C in body["message"] and B in body["message"]
    assert await events(a, alice) == []
    assert await bounded(a.galley.store.conversation(QualifiedId(B, CONV_B["id"]))) is None


@pytest_twisted.ensureDeferred
async def test_nobody_creates_our_conversations_for_us(backends):
    a = backends()
    alice = await a.user("alice")
    ours = {"id": CONV_B["id"], "domain": A}
    body = created([qid(alice)], conversation=ours, creator=qid(alice))
    refusal(await a.call("galley", "on-conversation-created", body, origin=A), 403, "not-conversation-owner")


@pytest_twisted.ensureDeferred
async def test_on_conversation_created_creator_of_the_owner(backends):
    a = backends()
    alice = await a.user("alice")
    body = created([CAROL, qid(alice)], creator=CAROL)
    refusal(await a.call("galley", "on-conversation-created", body, origin=B), 403, "access-denied")


@pytest_twisted.ensureDeferred
async def test_on_conversation_created_needs_existing_local_members(backends):
    a = backends()
    ghost = remote_user(77, A)
    body = refusal(await a.call("galley", "on-conversation-created", created([BOB, ghost]), origin=B),
                   404, "not-found")
    assert ghost["id"] in body["message"]
    refusal(await a.call("galley", "on-conversation-created", created([BOB, CAROL]), origin=B), 400, "bad-request")


@pytest.mark.parametrize(
    "changes",
    [
        {"members": [BEA, {"id": "00000000-0000-4000-8000-00000000000a", "domain": A}]},  # no creator
        {"members": [BOB, BOB]},
        {"members": [BOB] + [remote_user(n, B) for n in range(100, 228)]},
        {"name": ""},
        {"name": "x" * 257},
        {"time": "today"},
        {"conversation": {"id": "x", "domain": B}},
        {"creator": "bob"},
    ],
)
@pytest_twisted.ensureDeferred
async def test_on_conversation_created_bad_input(backends, changes):
    a = backends()
    alice = await a.user("alice")
    body = {**created([BOB, qid(alice)]), **changes}
    refusal(await a.call("galley", "on-conversation-created", body, origin=B), 400, "bad-request")


@pytest_twisted.ensureDeferred
async def test_on_conversation_created_missing_keys(backends):
    a = backends()
    body = created([BOB])
    del body["time"]
    refusal(await a.call("galley", "on-conversation-created", body, origin=B), 400, "bad-request")


# on-message-sent


async def registered(a: Backend) -> Dict[str, Any]:
    alice = await a.user("alice")
    response = await a.call("galley", "on-conversation-created", created([BOB, BEA, qid(alice)]), origin=B)
    assert response.code == 200
    return alice


@pytest_twisted.ensureDeferred
async def test_on_message_sent_reaches_local_members_once(backends):
    a = backends()
    alice = await registered(a)
    response = await a.call("galley", "on-message-sent", sent(), origin=B)
    assert (response.code, answer_json(response)) == (200, {})
    await a.call("galley", "on-message-sent", sent(), origin=B)
    inbox = await events(a, alice)
    assert [e["type"] for e in inbox] == ["conversation.create", "conversation.message-add"]
    assert inbox[1]["data"] == {"id": "00000000-0000-4000-8000-0000000000f1", "text": "hello"}
    assert (inbox[1]["from"], inbox[1]["conversation"], inbox[1]["time"]) == (BOB, CONV_B, TIME)


@pytest_twisted.ensureDeferred
async def test_on_message_sent_only_from_the_owner(backends):
    a = backends()
    alice = await registered(a)
    refusal(await a.call("galley", "on-message-sent", sent(), origin=C), 403, "not-conversation-owner")
    assert len(await events(a, alice)) == 1


@pytest_twisted.ensureDeferred
async def test_on_message_sent_only_for_a_known_conversation(backends):
    a = backends()
    await registered(a)
    unknown = {"id": "00000000-0000-4000-8000-0000000000aa", "domain": B}
    body = refusal(await a.call("galley", "on-message-sent", sent(conversation=unknown), origin=B),
                   404, "no-conversation")
    assert unknown["id"] in body["message"]


@pytest.mark.parametrize(
    "body",
    [
        sent(message_id="nope"),
        sent(text=""),
        sent(text="x" * 4097),
        {"conversation": CONV_B, "sender": BOB},
        {"conversation": CONV_B, "sender": BOB, "message": {"id": "00000000-0000-4000-8000-0000000000f1",
                                                              "text": "x", "time": 5}},
    ],
)
@pytest_twisted.ensureDeferred
async def test_on_message_sent_bad_input(backends, body):
    a = backends()
    await registered(a)
    refusal(await a.call("galley", "on-message-sent", body, origin=B), 400, "bad-request")


# the owner's side: a conversation of ours with remote members


async def owned(a: Backend, pipeline: RecordingPipeline, *extra: Dict[str, str]) -> Dict[str, Any]:
    """a.example's conversation of alice and dave (local), bob and bea (b), carol (c)."""
    for domain in (B, C):
        pipeline.answer(domain, "galley", "on-conversation-created", ok())
    alice, dave = await a.user("alice"), await a.user("dave")
    members = [QualifiedId.from_json(m, "m") for m in [qid(dave), BOB, BEA, CAROL, *extra]]
    answer = await bounded(a.galley.create_conversation(uid(alice), "Ours", members, "req-create"))
    return {"alice": alice, "dave": dave, "conversation": answer["conversation"]["qualified_id"],
            "answer": answer}


@pytest_twisted.ensureDeferred
async def test_creating_a_conversation_tells_each_remote_backend(backends, pipeline):
    a = backends(pipeline=pipeline)
    a.clock.advance(1715170000)
    setup = await owned(a, pipeline)
    conv, alice, dave = setup["conversation"], setup["alice"], setup["dave"]
    assert conv["domain"] == A
    told = pipeline.bodies("on-conversation-created")
    assert [d for d, _ in told] == [B, C]
    everyone = [qid(alice), qid(dave), BOB, BEA, CAROL]
    assert told[0][1] == {"conversation": conv, "name": "Ours", "creator": qid(alice), "members": everyone,
                          "time": "2024-05-08T12:06:40.000Z"}
    assert all(c.request_id == "req-create" and c.origin_domain == A for c in pipeline.calls)
    assert setup["answer"]["failed_to_add"] == []
    assert setup["answer"]["conversation"]["members"] == sorted(everyone, key=lambda m: (m["domain"], m["id"]))
    # dave is told, alice created it
    assert [e["type"] for e in await events(a, dave)] == ["conversation.create"]
    assert await events(a, alice) == []


@pytest_twisted.ensureDeferred
async def test_members_whose_backend_was_not_told_are_taken_out(backends, pipeline):
    a = backends(pipeline=pipeline)
    pipeline.answer(C, "galley", "on-conversation-created",
                    json_response(403, {"code": 403, "label": "not-conversation-owner", "message": "no"}))
    alice = await a.user("alice")
    members = [QualifiedId.from_json(m, "m") for m in [BOB, CAROL]]
    pipeline.answer(B, "galley", "on-conversation-created", ok())
    answer = await bounded(a.galley.create_conversation(uid(alice), "Ours", members, "r"))
    [failed] = answer["failed_to_add"]
    assert (failed["domain"], failed["users"]) == (C, [CAROL])
    assert failed["error"]["label"] == "federation-remote-error"
    assert failed["error"]["inner"]["label"] == "not-conversation-owner"
    assert answer["conversation"]["members"] == [qid(alice), BOB]


@pytest_twisted.ensureDeferred
async def test_send_message_from_a_member_of_the_calling_domain(backends, pipeline):
    a = backends(pipeline=pipeline)
    setup = await owned(a, pipeline)
    conv = setup["conversation"]
    for domain in (B, C):
        pipeline.answer(domain, "galley", "on-message-sent", ok())
    a.clock.advance(60)
    response = await a.call("galley", "send-message", {"conversation": conv["id"], "sender": BOB, "text": "hi"},
                            origin=B)
    answer = answer_json(response)
    assert response.code == 200
    message = answer["message"]
    assert (message["conversation"], message["sender"], message["text"], message["time"]) == (
        conv, BOB, "hi", "1970-01-01T00:01:00.000Z"
    )
    assert answer["failed_to_send"] == []
    # the owner delivers to its own members ...
    for user in (setup["alice"], setup["dave"]):
        assert (await events(a, user))[-1]["data"] == {"id": message["id"], "text": "hi"}
    # ... and tells every other backend with recipients: bea's (the caller's) and carol's
    told = pipeline.bodies("on-message-sent")
    assert [d for d, _ in told] == [B, C]
    assert told[0][1] == {"conversation": conv, "sender": BOB,
                          "message": {"id": message["id"], "text": "hi", "time": message["time"]}}


@pytest_twisted.ensureDeferred
async def test_send_message_skips_a_backend_whose_only_member_is_the_sender(backends, pipeline):
    a = backends(pipeline=pipeline)
    pipeline.answer(C, "galley", "on-conversation-created", ok())
    pipeline.answer(C, "galley", "on-message-sent", ok())
    alice = await a.user("alice")
    answer = await bounded(a.galley.create_conversation(uid(alice), "Ours", [QualifiedId.from_json(CAROL, "m")],
                                                        "r"))
    conv = answer["conversation"]["qualified_id"]
    response = await a.call("galley", "send-message", {"conversation": conv["id"], "sender": CAROL, "text": "x"},
                            origin=C)
    assert response.code == 200
    assert pipeline.bodies("on-message-sent") == []


@pytest_twisted.ensureDeferred
async def test_send_message_refusals(backends, pipeline):
    a = backends(pipeline=pipeline)
    setup = await owned(a, pipeline)
    conv = setup["conversation"]

    async def send(body, origin=B):
        return await a.call("galley", "send-message", body, origin=origin)

    # a sender of another domain than the caller
    body = refusal(await send({"conversation": conv["id"], "sender": CAROL, "text": "x"}), 403, "access-denied")
    assert B in body["message"]
    # not a member
    outsider = remote_user(99, B)
    refusal(await send({"conversation": conv["id"], "sender": outsider, "text": "x"}), 403, "access-denied")
    # no such conversation here
    refusal(await send({"conversation": CONV_B["id"], "sender": BOB, "text": "x"}), 404, "no-conversation")
    # bad input
    refusal(await send({"conversation": conv["id"], "sender": BOB, "text": ""}), 400, "bad-request")
    refusal(await send({"conversation": conv, "sender": BOB, "text": "x"}), 400, "bad-request")
    refusal(await send({"conversation": conv["id"], "text": "x"}), 400, "bad-request")
    assert pipeline.bodies("on-message-sent") == []


@pytest_twisted.ensureDeferred
async def test_send_message_reports_backends_that_could_not_be_told(backends, pipeline):
    a = backends(pipeline=pipeline)
    setup = await owned(a, pipeline)
    # b refuses for good; c is down, and is told once it is back
    pipeline.answer(B, "galley", "on-message-sent", json_response(
        404, {"code": 404, "label": "no-conversation", "message": "no"}))
    pipeline.answer(C, "galley", "on-message-sent", FederationError("c is down", "federation-connection-refused"))
    response = await a.call("galley", "send-message",
                            {"conversation": setup["conversation"]["id"], "sender": BOB, "text": "hi"}, origin=B)
    answer = answer_json(response)
    assert response.code == 200
    [failed] = answer["failed_to_send"]
    assert (failed["domain"], failed["users"]) == (B, [BEA])
    assert (failed["error"]["label"], failed["error"]["inner"]["label"]) == ("federation-remote-error",
                                                                             "no-conversation")
    [queued] = answer["queued"]
    assert (queued["domain"], queued["users"]) == (C, [CAROL])
    assert queued["error"]["label"] == "federation-connection-refused"
    assert queued["error"]["data"]["path"] == "/federation/galley/on-message-sent"
    # the queue tries c again at the end of its backoff, with the same idempotency key
    pipeline.answer(C, "galley", "on-message-sent", ok())
    await eventually(lambda: len(pipeline.bodies("on-message-sent")) == 3, clock=a.clock, what="the retry to c")
    to_c = [c for c in pipeline.calls if c.rpc == "on-message-sent" and c.target_domain == C]
    keys = {c.header("Fedserver-Idempotency-Key") for c in to_c}
    assert len(to_c) == 2 and len(keys) == 1 and None not in keys
    assert to_c[0].body == to_c[1].body
    await bounded(a.context.queue.idle())
    state = await a.context.queue.describe(C)
    assert (state["depth"], state["failures"]) == (0, 0)


# leave-conversation


@pytest_twisted.ensureDeferred
async def test_leave_conversation_by_the_leavers_backend(backends, pipeline):
    a = backends(pipeline=pipeline)
    setup = await owned(a, pipeline)
    conv = setup["conversation"]
    response = await a.call("galley", "leave-conversation", {"conversation": conv["id"], "user": BOB}, origin=B)
    assert (response.code, answer_json(response)) == (200, {})
    members = await bounded(a.galley.store.members(QualifiedId(A, conv["id"])))
    assert QualifiedId(B, BOB["id"]) not in members and QualifiedId(B, BEA["id"]) in members
    # bob is gone: a second leave is refused
    refusal(await a.call("galley", "leave-conversation", {"conversation": conv["id"], "user": BOB}, origin=B),
            403, "access-denied")


@pytest_twisted.ensureDeferred
async def test_leave_conversation_refusals(backends, pipeline):
    a = backends(pipeline=pipeline)
    setup = await owned(a, pipeline)
    conv = setup["conversation"]

    async def leave(body, origin=B):
        return await a.call("galley", "leave-conversation", body, origin=origin)

    # c cannot take b's user out
    body = refusal(await leave({"conversation": conv["id"], "user": BOB}, origin=C), 403, "access-denied")
    assert "its own users" in body["message"]
    # nor our own users
    refusal(await leave({"conversation": conv["id"], "user": qid(setup["alice"])}), 403, "access-denied")
    refusal(await leave({"conversation": conv["id"], "user": remote_user(99, B)}), 403, "access-denied")
    refusal(await leave({"conversation": CONV_B["id"], "user": BOB}), 404, "no-conversation")
    refusal(await leave({"conversation": conv["id"]}), 400, "bad-request")
    refusal(await leave({"conversation": "x", "user": BOB}), 400, "bad-request")
    members = await bounded(a.galley.store.members(QualifiedId(A, conv["id"])))
    assert len(members) == 5


@pytest_twisted.ensureDeferred
async def test_leave_conversation_is_only_for_conversations_we_own(backends):
    a = backends()
    alice = await registered(a)
    # b's conversation is registered here, but b owns it: leaving is b's business
    refusal(await a.call("galley", "leave-conversation", {"conversation": CONV_B["id"], "user": BOB}, origin=B),
            404, "no-conversation")
    assert QualifiedId(A, uid(alice)) in await bounded(a.galley.store.members(QualifiedId(B, CONV_B["id"])))


# get-conversations


@pytest_twisted.ensureDeferred
async def test_get_conversations_for_a_member_of_the_calling_domain(backends, pipeline):
    a = backends(pipeline=pipeline)
    setup = await owned(a, pipeline)
    conv = setup["conversation"]
    alone = await bounded(a.galley.create_conversation(uid(setup["alice"]), "Alone", [], "r"))
    other = alone["conversation"]["qualified_id"]
    ids = [conv["id"], other["id"], CONV_B["id"]]
    answer = answer_json(await a.call("galley", "get-conversations", {"user": BOB, "ids": ids}, origin=B))
    [metadata] = answer["conversations"]
    assert metadata["qualified_id"] == conv
    assert metadata["name"] == "Ours" and metadata["creator"] == qid(setup["alice"])
    assert len(metadata["members"]) == 5 and BOB in metadata["members"]
    # somebody of b who is in none of them learns nothing
    nobody = answer_json(await a.call("galley", "get-conversations", {"user": remote_user(99, B), "ids": ids},
                                      origin=B))
    assert nobody == {"conversations": []}


@pytest_twisted.ensureDeferred
async def test_get_conversations_never_for_users_of_another_domain(backends, pipeline):
    a = backends(pipeline=pipeline)
    setup = await owned(a, pipeline)
    body = {"user": BOB, "ids": [setup["conversation"]["id"]]}
    refusal(await a.call("galley", "get-conversations", body, origin=C), 403, "access-denied")
    body = {"user": qid(setup["alice"]), "ids": [setup["conversation"]["id"]]}
    refusal(await a.call("galley", "get-conversations", body, origin=B), 403, "access-denied")


@pytest.mark.parametrize("body", [{"user": BOB}, {"user": BOB, "ids": "x"}, {"user": BOB, "ids": ["x"]},
                                  {"ids": []}, {"user": BOB, "ids": [CONV_B["id"]] * 501}])
@pytest_twisted.ensureDeferred
async def test_get_conversations_bad_input(backends, body):
    a = backends()
    refusal(await a.call("galley", "get-conversations", body, origin=B), 400, "bad-request")


# local operations on remote conversations


@pytest_twisted.ensureDeferred
async def test_sending_to_a_remote_conversation_goes_to_its_owner(backends, pipeline):
    a = backends(pipeline=pipeline)
    alice = await registered(a)
    owner_answer = {"message": {"id": "00000000-0000-4000-8000-0000000000f9", "conversation": CONV_B,
                                "sender": qid(alice), "text": "hi", "time": TIME},
                    "failed_to_send": [{"domain": C, "users": [CAROL], "error": {"label": "x"}}]}
    pipeline.answer(B, "galley", "send-message", ok(owner_answer))
    answer = await bounded(a.galley.send_message(QualifiedId(B, CONV_B["id"]), uid(alice), "hi", "r"))
    assert answer == {**owner_answer, "queued": []}
    assert pipeline.bodies("send-message") == [(B, {"conversation": CONV_B["id"], "sender": qid(alice),
                                                    "text": "hi"})]
    for bad in [{"message": {}}, {"failed_to_send": []}, []]:
        pipeline.answer(B, "galley", "send-message", ok(bad))
        with pytest.raises(APIError) as info:
            await bounded(a.galley.send_message(QualifiedId(B, CONV_B["id"]), uid(alice), "hi", "r"))
        assert info.value.label == "federation-unexpected-body"


@pytest_twisted.ensureDeferred
async def test_leaving_a_remote_conversation_needs_the_owners_consent(backends, pipeline):
    a = backends(pipeline=pipeline)
    alice = await registered(a)
    conv = QualifiedId(B, CONV_B["id"])
    pipeline.answer(B, "galley", "leave-conversation",
                    json_response(403, {"code": 403, "label": "access-denied", "message": "no"}))
    with pytest.raises(FederationError) as info:
        await bounded(a.galley.leave(conv, uid(alice), "r"))
    assert info.value.label == "federation-remote-error"
    assert QualifiedId(A, uid(alice)) in await bounded(a.galley.store.members(conv))
    pipeline.answer(B, "galley", "leave-conversation", ok())
    assert await bounded(a.galley.leave(conv, uid(alice), "r")) == {"conversation": CONV_B, "user": qid(alice)}
    assert await bounded(a.galley.store.members(conv)) == []
    assert pipeline.bodies("leave-conversation")[-1] == (B, {"conversation": CONV_B["id"], "user": qid(alice)})


@pytest_twisted.ensureDeferred
async def test_remote_metadata_comes_from_the_owner(backends, pipeline):
    a = backends(pipeline=pipeline)
    alice = await registered(a)
    conv = QualifiedId(B, CONV_B["id"])
    metadata = {"qualified_id": CONV_B, "name": "Their chat", "creator": BOB, "members": [BOB, qid(alice)],
                "created": TIME}
    pipeline.answer(B, "galley", "get-conversations", ok({"conversations": [metadata]}))
    assert await bounded(a.galley.conversation_for(conv, uid(alice), "r")) == metadata
    assert pipeline.bodies("get-conversations") == [(B, {"user": qid(alice), "ids": [CONV_B["id"]]})]
    pipeline.answer(B, "galley", "get-conversations", ok({"conversations": []}))
    with pytest.raises(APIError) as info:
        await bounded(a.galley.conversation_for(conv, uid(alice), "r"))
    assert (info.value.code, info.value.label) == (404, "no-conversation")
    other = dict(metadata, qualified_id={"id": CONV_B["id"], "domain": C})
    for bad in [{"conversations": [other]}, {"conversations": [{"name": "x"}]}, {"x": 1}]:
        pipeline.answer(B, "galley", "get-conversations", ok(bad))
        with pytest.raises(APIError) as info:
            await bounded(a.galley.conversation_for(conv, uid(alice), "r"))
        assert info.value.label in ("federation-unexpected-body", "no-conversation")


@pytest_twisted.ensureDeferred
async def test_local_operations_need_a_member(backends, pipeline):
    a = backends(pipeline=pipeline)
    await registered(a)
    eve = await a.user("eve")
    conv = QualifiedId(B, CONV_B["id"])
    for operation in (
        a.galley.send_message(conv, uid(eve), "hi", "r"),
        a.galley.leave(conv, uid(eve), "r"),
        a.galley.conversation_for(conv, uid(eve), "r"),
    ):
        with pytest.raises(APIError) as info:
            await bounded(operation)
        assert (info.value.code, info.value.label) == (403, "access-denied")
    unknown = QualifiedId(B, "00000000-0000-4000-8000-0000000000aa")
    with pytest.raises(APIError) as info:
        await bounded(a.galley.send_message(unknown, uid(eve), "hi", "r"))
    assert (info.value.code, info.value.label) == (404, "no-conversation")
    assert pipeline.calls == []
