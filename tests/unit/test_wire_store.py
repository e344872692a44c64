"""
L{fedserver_wire.store} on a real L{Store} (SQLite under C{tmp_path}); the
adbapi threads need the real reactor, so these run under pytest-twisted,
each step bounded.
"""

from __future__ import annotations

import sqlite3

import pytest
import pytest_twisted

from fedserver.jsonapi import APIError
from fedserver.storage import Store
from fedserver_wire.checks import QualifiedId
from fedserver_wire.store import (
    LAST_RESORT_KEY_ID,
    SCHEMA_OWNER,
    SCHEMA_STEPS,
    Conversation,
    Message,
    NewEvent,
    NewUser,
    User,
    WireStore,
)
from tests.unit.wire_helpers import bounded

A = "a.example"
B = "b.example"


def uid(n: int) -> str:
    return f"00000000-0000-4000-8000-{n:012d}"


def new_user(n: int, handle: str, name: str = "Someone", keys: int = 2) -> NewUser:
    prekeys = (*((i, f"key{n}-{i}") for i in range(keys)), (LAST_RESORT_KEY_ID, f"last{n}"))
    return NewUser(uid(n), handle, name, f"c{n}", prekeys, 0.0)


@pytest.fixture
def db(tmp_path):
    return tmp_path / "wire.sqlite"


@pytest.fixture
def wire(db):
    from twisted.internet import reactor

    store = Store(f"sqlite:{db}", reactor=reactor)
    store.register_schema(SCHEMA_OWNER, SCHEMA_STEPS)
    store.migrate()
    store.startService()
    yield WireStore(store, A)
    store.stopService()


def rows(db, sql, params=()):
    connection = sqlite3.connect(str(db))
    try:
        return connection.execute(sql, params).fetchall()
    finally:
        connection.close()


def event(key: str, conv: QualifiedId, sender: QualifiedId, kind: str = "conversation.create") -> NewEvent:
    return NewEvent(key, kind, conv, sender, "2024-05-08T12:00:00.000Z", {"k": key})


def test_the_schema_migrates_once(db):
    store = Store(f"sqlite:{db}", reactor=None)
    store.register_schema(SCHEMA_OWNER, SCHEMA_STEPS)
    assert store.migrate() == [(SCHEMA_OWNER, 1)]
    assert store.migrate() == []
    tables = {r[0] for r in rows(db, "SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert {"wire_users", "wire_clients", "wire_prekeys", "wire_conversations", "wire_members",
            "wire_messages", "wire_events"} <= tables


# users


@pytest_twisted.ensureDeferred
async def test_users_by_handle_and_id(wire, db):
    await bounded(wire.create_user(new_user(1, "alice", "Alice")))
    await bounded(wire.create_user(new_user(2, "bob", "Bob")))
    assert await bounded(wire.user_by_handle("alice")) == User(uid(1), "alice", "Alice")
    assert await bounded(wire.user_by_handle("carol")) is None
    found = await bounded(wire.users_by_ids([uid(2), uid(9), uid(1), uid(2)]))
    assert [u.handle for u in found] == ["bob", "alice"]
    assert await bounded(wire.users_by_ids([])) == []
    assert await bounded(wire.existing_users([uid(1), uid(3)])) == {uid(1)}
    assert rows(db, "SELECT user_id, client_id FROM wire_clients ORDER BY user_id") == [
        (uid(1), "c1"), (uid(2), "c2")
    ]


@pytest_twisted.ensureDeferred
async def test_a_taken_handle_is_refused_and_nothing_is_written(wire, db):
    await bounded(wire.create_user(new_user(1, "alice")))
    with pytest.raises(APIError) as info:
        await bounded(wire.create_user(new_user(2, "alice")))
    assert (info.value.code, info.value.label) == (409, "handle-exists")
    assert rows(db, "SELECT count(*) FROM wire_users") == [(1,)]
    assert rows(db, "SELECT count(*) FROM wire_prekeys WHERE user_id = ?", (uid(2),)) == [(0,)]


@pytest_twisted.ensureDeferred
async def test_exact_and_full_search(wire):
    for n, handle, name in [(1, "bob", "Bob Marley"), (2, "bobby", "Robert"), (3, "rob", "Bobbie Smith"),
                            (4, "carol", "Carol Bob"), (5, "b_x", "Underscore")]:
        await bounded(wire.create_user(new_user(n, handle, name)))
    exact = await bounded(wire.search_users("bob", full=False, limit=10))
    assert [u.handle for u in exact] == ["bob"]
    full = await bounded(wire.search_users("bob", full=True, limit=10))
    # the exact handle first, then by handle: handle prefix, name prefix, word of the name
    assert [u.handle for u in full] == ["bob", "bobby", "carol", "rob"]
    assert [u.handle for u in await bounded(wire.search_users("bob", full=True, limit=2))] == ["bob", "bobby"]
    # LIKE wildcards in the term are literal
    assert [u.handle for u in await bounded(wire.search_users("b_", full=True, limit=10))] == ["b_x"]
    assert await bounded(wire.search_users("%", full=True, limit=10)) == []
    assert [u.handle for u in await bounded(wire.search_users("robert", full=True, limit=10))] == ["bobby"]


@pytest_twisted.ensureDeferred
async def test_claims_consume_prekeys_then_hand_out_the_last_resort_key(wire, db):
    await bounded(wire.create_user(new_user(1, "alice", keys=2)))
    claims = [await bounded(wire.claim_prekey_bundle(uid(1))) for _ in range(4)]
    assert [[(c.client_id, c.key_id, c.key) for c in claim] for claim in claims] == [
        [("c1", 0, "key1-0")],
        [("c1", 1, "key1-1")],
        [("c1", LAST_RESORT_KEY_ID, "last1")],
        [("c1", LAST_RESORT_KEY_ID, "last1")],
    ]
    assert rows(db, "SELECT key_id FROM wire_prekeys") == [(LAST_RESORT_KEY_ID,)]
    assert await bounded(wire.claim_prekey_bundle(uid(2))) is None


@pytest_twisted.ensureDeferred
async def test_a_client_without_keys_is_left_out_of_a_bundle(wire, db):
    await bounded(wire.create_user(NewUser(uid(1), "alice", "A", "c1", (), 0.0)))
    assert await bounded(wire.claim_prekey_bundle(uid(1))) == []


# conversations


@pytest_twisted.ensureDeferred
async def test_a_conversation_with_members_and_inbox_events(wire):
    for n, handle in [(1, "alice"), (2, "bob")]:
        await bounded(wire.create_user(new_user(n, handle)))
    conv = Conversation(QualifiedId(A, uid(100)), "Chat", QualifiedId(A, uid(1)), "2024-05-08T12:00:00.000Z")
    members = [QualifiedId(A, uid(1)), QualifiedId(A, uid(2)), QualifiedId(B, uid(3))]
    created = event("create", conv.qid, conv.creator)
    await bounded(wire.create_conversation(conv, members, created, [uid(2)]))
    assert await bounded(wire.conversation(conv.qid)) == conv
    assert await bounded(wire.conversation(QualifiedId(B, uid(100)))) is None
    assert await bounded(wire.members(conv.qid)) == sorted(members)
    events, more = await bounded(wire.inbox(uid(2), since=0, limit=10))
    assert [(e.seq, e.type, e.data) for e in events] == [(1, "conversation.create", {"k": "create"})]
    assert not more
    assert await bounded(wire.inbox(uid(1), since=0, limit=10)) == ([], False)
    with pytest.raises(sqlite3.IntegrityError):
        await bounded(wire.create_conversation(conv, members, created, [uid(2)]))


@pytest_twisted.ensureDeferred
async def test_messages_reach_local_members_but_the_sender_once(wire, db):
    for n, handle in [(1, "alice"), (2, "bob"), (3, "carol")]:
        await bounded(wire.create_user(new_user(n, handle)))
    conv = Conversation(QualifiedId(A, uid(100)), "Chat", QualifiedId(A, uid(1)), "t")
    members = [QualifiedId(A, uid(1)), QualifiedId(A, uid(2)), QualifiedId(B, uid(9))]
    await bounded(wire.create_conversation(conv, members, event("c", conv.qid, conv.creator), []))
    message = Message(uid(500), conv.qid, QualifiedId(A, uid(1)), "hi", "2024-05-08T12:00:00.000Z")
    add = event("m", conv.qid, message.sender, "conversation.message-add")
    new, seen = await bounded(wire.record_message(message, add))
    assert new and seen == sorted(members)
    again, _ = await bounded(wire.record_message(message, add))
    assert not again
    assert rows(db, "SELECT user_id FROM wire_events") == [(uid(2),)]
    assert rows(db, "SELECT body, sender_id FROM wire_messages") == [("hi", uid(1))]
    # carol is no member
    assert await bounded(wire.inbox(uid(3), since=0, limit=10)) == ([], False)


@pytest_twisted.ensureDeferred
async def test_registering_a_remote_conversation_twice_gives_one_event(wire):
    await bounded(wire.create_user(new_user(1, "alice")))
    conv = Conversation(QualifiedId(B, uid(100)), "Theirs", QualifiedId(B, uid(7)), "t")
    created = event("create-b", conv.qid, conv.creator)
    await bounded(wire.register_remote_conversation(conv, [uid(1)], created))
    await bounded(wire.register_remote_conversation(conv, [uid(1)], created))
    assert await bounded(wire.members(conv.qid)) == [QualifiedId(A, uid(1))]
    events, _ = await bounded(wire.inbox(uid(1), since=0, limit=10))
    assert len(events) == 1
    assert events[0].to_json()["conversation"] == {"id": uid(100), "domain": B}


@pytest_twisted.ensureDeferred
async def test_removing_members_counts_those_that_were(wire):
    conv = Conversation(QualifiedId(A, uid(100)), "Chat", QualifiedId(A, uid(1)), "t")
    members = [QualifiedId(A, uid(1)), QualifiedId(B, uid(2)), QualifiedId(B, uid(3))]
    await bounded(wire.create_conversation(conv, members, event("c", conv.qid, conv.creator), []))
    assert await bounded(wire.remove_members(conv.qid, [QualifiedId(B, uid(2)), QualifiedId(B, uid(4))])) == 1
    assert await bounded(wire.members(conv.qid)) == [QualifiedId(A, uid(1)), QualifiedId(B, uid(3))]


@pytest_twisted.ensureDeferred
async def test_owned_conversations_only_for_their_members(wire):
    alice, bob = QualifiedId(A, uid(1)), QualifiedId(B, uid(2))
    mine = Conversation(QualifiedId(A, uid(100)), "Mine", alice, "t")
    other = Conversation(QualifiedId(A, uid(101)), "Other", alice, "t")
    theirs = Conversation(QualifiedId(B, uid(102)), "Theirs", bob, "t")
    await bounded(wire.create_conversation(mine, [alice, bob], event("1", mine.qid, alice), []))
    await bounded(wire.create_conversation(other, [alice], event("2", other.qid, alice), []))
    await bounded(wire.create_conversation(theirs, [bob, alice], event("3", theirs.qid, bob), []))
    found = await bounded(wire.owned_conversations_of(bob, [uid(101), uid(100), uid(102), uid(999), uid(100)]))
    assert [(c.name, m) for c, m in found] == [("Mine", [alice, bob])]


@pytest_twisted.ensureDeferred
async def test_the_inbox_pages_by_sequence(wire):
    await bounded(wire.create_user(new_user(1, "alice")))
    conv = QualifiedId(B, uid(100))
    for n in range(5):
        theirs = Conversation(QualifiedId(B, uid(100 + n)), f"c{n}", QualifiedId(B, uid(7)), "t")
        await bounded(wire.register_remote_conversation(theirs, [uid(1)], event(f"e{n}", conv, theirs.creator)))
    first, more = await bounded(wire.inbox(uid(1), since=0, limit=2))
    assert [e.seq for e in first] == [1, 2] and more
    rest, more = await bounded(wire.inbox(uid(1), since=2, limit=10))
    assert [e.seq for e in rest] == [3, 4, 5] and not more
    assert rest[0].to_json() == {
        "seq": 3,
        "type": "conversation.create",
        "conversation": {"id": uid(100), "domain": B},
        "from": {"id": uid(7), "domain": B},
        "time": "2024-05-08T12:00:00.000Z",
        "data": {"k": "e2"},
    }
