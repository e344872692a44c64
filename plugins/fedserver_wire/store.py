"""
The reference components' data, kept with L{fedserver.storage}.

One schema, C{wire-reference}, holds what the reference brig and galley own:

- users with their handle and name, each with clients and their prekeys
  (brig);
- conversations, both the ones this backend owns and the remote ones that
  local users take part in, with their members, their messages, and each
  local user's inbox of events (galley).

For a conversation this backend owns, every member is recorded, local and
remote; for a remote conversation only the local members are (the owning
backend is the source of truth for the rest).

SQL is portable (C{?} placeholders, C{ON CONFLICT ... DO NOTHING}); every
write runs in one transaction through L{fedserver.storage.Store.run_interaction}.
"""

from __future__ import annotations

import json
from typing import Any, Callable, Dict, List, Optional, Sequence, Set, Tuple

import attrs
from twisted.internet import defer
from twisted.internet.defer import Deferred

from fedserver.jsonapi import APIError
from fedserver_wire.checks import QualifiedId

SCHEMA_OWNER = "wire-reference"

#: the id of a client's last-resort prekey, which a claim never consumes
LAST_RESORT_KEY_ID = 65535

SCHEMA_STEPS = [
    """
    CREATE TABLE wire_users (
        id TEXT PRIMARY KEY,
        handle TEXT NOT NULL UNIQUE,
        name TEXT NOT NULL,
        created REAL NOT NULL
    );
    CREATE TABLE wire_clients (
        user_id TEXT NOT NULL REFERENCES wire_users (id),
        client_id TEXT NOT NULL,
        PRIMARY KEY (user_id, client_id)
    );
    CREATE TABLE wire_prekeys (
        user_id TEXT NOT NULL,
        client_id TEXT NOT NULL,
        key_id INTEGER NOT NULL,
        prekey TEXT NOT NULL,
        PRIMARY KEY (user_id, client_id, key_id),
        FOREIGN KEY (user_id, client_id) REFERENCES wire_clients (user_id, client_id)
    );
    CREATE TABLE wire_conversations (
        domain TEXT NOT NULL,
        id TEXT NOT NULL,
        name TEXT NOT NULL,
        creator_domain TEXT NOT NULL,
        creator_id TEXT NOT NULL,
        created TEXT NOT NULL,
        PRIMARY KEY (domain, id)
    );
    CREATE TABLE wire_members (
        conv_domain TEXT NOT NULL,
        conv_id TEXT NOT NULL,
        user_domain TEXT NOT NULL,
        user_id TEXT NOT NULL,
        PRIMARY KEY (conv_domain, conv_id, user_domain, user_id),
        FOREIGN KEY (conv_domain, conv_id) REFERENCES wire_conversations (domain, id)
    );
    CREATE INDEX wire_members_by_user ON wire_members (user_domain, user_id);
    CREATE TABLE wire_messages (
        conv_domain TEXT NOT NULL,
        conv_id TEXT NOT NULL,
        id TEXT NOT NULL,
        sender_domain TEXT NOT NULL,
        sender_id TEXT NOT NULL,
        body TEXT NOT NULL,
        sent TEXT NOT NULL,
        PRIMARY KEY (conv_domain, conv_id, id),
        FOREIGN KEY (conv_domain, conv_id) REFERENCES wire_conversations (domain, id)
    );
    CREATE TABLE wire_events (
        user_id TEXT NOT NULL REFERENCES wire_users (id),
        seq INTEGER NOT NULL,
        event_key TEXT NOT NULL,
        type TEXT NOT NULL,
        conv_domain TEXT NOT NULL,
        conv_id TEXT NOT NULL,
        from_domain TEXT NOT NULL,
        from_id TEXT NOT NULL,
        event_time TEXT NOT NULL,
        data TEXT NOT NULL,
        PRIMARY KEY (user_id, seq),
        UNIQUE (user_id, event_key)
    )
    """,
]


@attrs.frozen
class User:
    """A local user as brig keeps it."""

    id: str
    handle: str
    name: str


@attrs.frozen
class NewUser:
    """A user to create, with its one client and that client's prekeys."""

    id: str
    handle: str
    name: str
    client_id: str
    #: C{(key id, base64 key)}, the last-resort key among them
    prekeys: Tuple[Tuple[int, str], ...]
    created: float


@attrs.frozen
class ClaimedPrekey:
    """One client's prekey, as a claim handed it out."""

    client_id: str
    key_id: int
    key: str


@attrs.frozen
class Conversation:
    """
    A conversation: its qualified id (the domain is the owning backend), its
    name, its creator and when it was created (ISO 8601).
    """

    qid: QualifiedId
    name: str
    creator: QualifiedId
    created: str


@attrs.frozen
class Message:
    """A message in a conversation, with the owner's id and time for it."""

    id: str
    conversation: QualifiedId
    sender: QualifiedId
    text: str
    time: str

    def to_json(self) -> Dict[str, Any]:
        """The message as answers and C{on-message-sent} carry it."""
        return {
            "id": self.id,
            "conversation": self.conversation.to_json(),
            "sender": self.sender.to_json(),
            "text": self.text,
            "time": self.time,
        }


@attrs.frozen
class Event:
    """
    One entry of a local user's inbox: C{conversation.create} or
    C{conversation.message-add}.  C{seq} grows by one per event of that
    user, so a client reads on from the last one it saw.
    """

    seq: int
    type: str
    conversation: QualifiedId
    sender: QualifiedId
    time: str
    data: Dict[str, Any]

    def to_json(self) -> Dict[str, Any]:
        """The event as the inbox shows it."""
        return {
            "seq": self.seq,
            "type": self.type,
            "conversation": self.conversation.to_json(),
            "from": self.sender.to_json(),
            "time": self.time,
            "data": self.data,
        }


@attrs.frozen
class NewEvent:
    """An event to put in the inbox of some local users."""

    key: str
    type: str
    conversation: QualifiedId
    sender: QualifiedId
    time: str
    data: Dict[str, Any]


def _placeholders(count: int) -> str:
    return ", ".join("?" * count)


def _like_prefix(term: str) -> str:
    """C{term} as a LIKE prefix pattern with C{\\} escaping the wildcards."""
    escaped = term.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return escaped + "%"


class WireStore:
    """
    The reference components' tables, over a running
    L{fedserver.storage.Store}.  Every method returns a L{Deferred}.

    @ivar backend_domain: our backend domain; members of that domain are the
        local ones.
    """

    def __init__(self, store: Any, backend_domain: str) -> None:
        self.store = store
        self.backend_domain = backend_domain

    # users (brig)

    def create_user(self, user: NewUser) -> Deferred[None]:
        """
        Add C{user} with its client and prekeys; fail with C{409
        handle-exists} when another user has the handle.
        """
        return self.store.run_interaction(self._create_user, user)

    @staticmethod
    def _create_user(cursor: Any, user: NewUser) -> None:
        cursor.execute("SELECT id FROM wire_users WHERE handle = ?", (user.handle,))
        if cursor.fetchone() is not None:
            raise APIError(409, "handle-exists", f"the handle {user.handle!r} is taken")
        cursor.execute(
            "INSERT INTO wire_users (id, handle, name, created) VALUES (?, ?, ?, ?)",
            (user.id, user.handle, user.name, user.created),
        )
        cursor.execute(
            "INSERT INTO wire_clients (user_id, client_id) VALUES (?, ?)", (user.id, user.client_id)
        )
        for key_id, key in user.prekeys:
            cursor.execute(
                "INSERT INTO wire_prekeys (user_id, client_id, key_id, prekey) VALUES (?, ?, ?, ?)",
                (user.id, user.client_id, key_id, key),
            )

    def user_by_handle(self, handle: str) -> Deferred[Optional[User]]:
        """The user with C{handle}, or C{None}."""
        d = self.store.run_query("SELECT id, handle, name FROM wire_users WHERE handle = ?", (handle,))
        return d.addCallback(lambda rows: User(*rows[0]) if rows else None)

    def users_by_ids(self, ids: Sequence[str]) -> Deferred[List[User]]:
        """The users among C{ids} that exist, in the order of C{ids}."""
        wanted = list(dict.fromkeys(ids))
        if not wanted:
            return defer.succeed([])
        d = self.store.run_query(
            f"SELECT id, handle, name FROM wire_users WHERE id IN ({_placeholders(len(wanted))})", wanted
        )

        def in_order(rows: List[Tuple]) -> List[User]:
            found = {row[0]: User(*row) for row in rows}
            return [found[i] for i in wanted if i in found]

        return d.addCallback(in_order)

    def search_users(self, term: str, *, full: bool, limit: int) -> Deferred[List[User]]:
        """
        Users whose handle is C{term}; with C{full} also those whose handle,
        name or a word of the name starts with C{term} (ASCII letters compared
        without case).  The exact handle comes first, then by handle; at most
        C{limit}.
        """
        if not full:
            return self.store.run_query(
                "SELECT id, handle, name FROM wire_users WHERE handle = ?", (term,)
            ).addCallback(lambda rows: [User(*row) for row in rows][:limit])
        prefix = _like_prefix(term.lower())
        d = self.store.run_query(
            "SELECT id, handle, name FROM wire_users "
            "WHERE handle = ? OR handle LIKE ? ESCAPE '\\' "
            "OR LOWER(name) LIKE ? ESCAPE '\\' OR LOWER(name) LIKE ? ESCAPE '\\' "
            "ORDER BY CASE WHEN handle = ? THEN 0 ELSE 1 END, handle LIMIT ?",
            (term, prefix, prefix, "% " + prefix, term, limit),
        )
        return d.addCallback(lambda rows: [User(*row) for row in rows])

    def claim_prekey_bundle(self, user_id: str) -> Deferred[Optional[List[ClaimedPrekey]]]:
        """
        One prekey of each client of C{user_id}, or C{None} for no such user.
        Each claimed prekey is consumed; when a client has none left, its
        last-resort key (id 65535) is handed out, and never consumed.
        """
        return self.store.run_interaction(self._claim, user_id)

    @staticmethod
    def _claim(cursor: Any, user_id: str) -> Optional[List[ClaimedPrekey]]:
        cursor.execute("SELECT id FROM wire_users WHERE id = ?", (user_id,))
        if cursor.fetchone() is None:
            return None
        cursor.execute("SELECT client_id FROM wire_clients WHERE user_id = ? ORDER BY client_id", (user_id,))
        clients = [row[0] for row in cursor.fetchall()]
        claimed = []
        for client_id in clients:
            cursor.execute(
                "SELECT key_id, prekey FROM wire_prekeys WHERE user_id = ? AND client_id = ? "
                "AND key_id <> ? ORDER BY key_id LIMIT 1",
                (user_id, client_id, LAST_RESORT_KEY_ID),
            )
            row = cursor.fetchone()
            if row is not None:
                cursor.execute(
                    "DELETE FROM wire_prekeys WHERE user_id = ? AND client_id = ? AND key_id = ?",
                    (user_id, client_id, row[0]),
                )
            else:
                cursor.execute(
                    "SELECT key_id, prekey FROM wire_prekeys WHERE user_id = ? AND client_id = ? "
                    "AND key_id = ?",
                    (user_id, client_id, LAST_RESORT_KEY_ID),
                )
                row = cursor.fetchone()
                if row is None:
                    continue  # a client without any key cannot be written to; leave it out
            claimed.append(ClaimedPrekey(client_id, row[0], row[1]))
        return claimed

    # conversations (galley)

    def create_conversation(
        self, conversation: Conversation, members: Sequence[QualifiedId], event: NewEvent,
        notify: Sequence[str],
    ) -> Deferred[None]:
        """
        Record a conversation this backend owns with all its C{members}, and
        put C{event} in the inbox of the local users C{notify}.
        """
        return self.store.run_interaction(self._create_conversation, conversation, members, event, notify)

    @staticmethod
    def _create_conversation(
        cursor: Any, conversation: Conversation, members: Sequence[QualifiedId], event: NewEvent,
        notify: Sequence[str],
    ) -> None:
        _insert_conversation(cursor, conversation, if_absent=False)
        for member in members:
            _insert_member(cursor, conversation.qid, member)
        for user_id in notify:
            _add_event(cursor, user_id, event)

    def register_remote_conversation(
        self, conversation: Conversation, local_members: Sequence[str], event: NewEvent
    ) -> Deferred[None]:
        """
        Record (again, harmlessly) a conversation another backend owns, with
        the C{local_members} it names, and give each of them C{event} once.
        """
        return self.store.run_interaction(self._register_remote, conversation, local_members, event)

    def _register_remote(
        self, cursor: Any, conversation: Conversation, local_members: Sequence[str], event: NewEvent
    ) -> None:
        _insert_conversation(cursor, conversation, if_absent=True)
        for user_id in local_members:
            _insert_member(cursor, conversation.qid, QualifiedId(self.backend_domain, user_id))
            _add_event(cursor, user_id, event)

    def conversation(self, qid: QualifiedId) -> Deferred[Optional[Conversation]]:
        """The conversation C{qid}, or C{None} when we know no such one."""
        d = self.store.run_query(
            "SELECT name, creator_domain, creator_id, created FROM wire_conversations "
            "WHERE domain = ? AND id = ?",
            (qid.domain, qid.id),
        )

        def row(rows: List[Tuple]) -> Optional[Conversation]:
            if not rows:
                return None
            name, creator_domain, creator_id, created = rows[0]
            return Conversation(qid, name, QualifiedId(creator_domain, creator_id), created)

        return d.addCallback(row)

    def members(self, qid: QualifiedId) -> Deferred[List[QualifiedId]]:
        """The members of C{qid} that we know, sorted."""
        d = self.store.run_query(
            "SELECT user_domain, user_id FROM wire_members WHERE conv_domain = ? AND conv_id = ? "
            "ORDER BY user_domain, user_id",
            (qid.domain, qid.id),
        )
        return d.addCallback(lambda rows: [QualifiedId(*row) for row in rows])

    def remove_members(self, qid: QualifiedId, users: Sequence[QualifiedId]) -> Deferred[int]:
        """Remove C{users} from C{qid}; fire with how many were members."""
        return self.store.run_interaction(self._remove_members, qid, users)

    @staticmethod
    def _remove_members(cursor: Any, qid: QualifiedId, users: Sequence[QualifiedId]) -> int:
        removed = 0
        for user in users:
            cursor.execute(
                "SELECT 1 FROM wire_members WHERE conv_domain = ? AND conv_id = ? "
                "AND user_domain = ? AND user_id = ?",
                (qid.domain, qid.id, user.domain, user.id),
            )
            if cursor.fetchone() is not None:
                cursor.execute(
                    "DELETE FROM wire_members WHERE conv_domain = ? AND conv_id = ? "
                    "AND user_domain = ? AND user_id = ?",
                    (qid.domain, qid.id, user.domain, user.id),
                )
                removed += 1
        return removed

    def record_message(
        self, message: Message, event: NewEvent, outbox: Optional[Callable[[Any, List[QualifiedId]], None]] = None,
    ) -> Deferred[Tuple[bool, List[QualifiedId]]]:
        """
        Store C{message} and put C{event} in the inbox of every local member
        of its conversation but the sender.  Fire with C{(new, members)}:
        C{new} is false when the message was already stored (then nobody gets
        it again), C{members} are the conversation's members we know, read
        in the same transaction.  C{outbox(cursor, members)}, if given, runs
        last in that transaction for a new message (the galley queues the
        message's notifications there).
        """
        return self.store.run_interaction(self._record_message, message, event, outbox)

    def _record_message(
        self, cursor: Any, message: Message, event: NewEvent,
        outbox: Optional[Callable[[Any, List[QualifiedId]], None]] = None,
    ) -> Tuple[bool, List[QualifiedId]]:
        conv = message.conversation
        cursor.execute(
            "SELECT user_domain, user_id FROM wire_members WHERE conv_domain = ? AND conv_id = ? "
            "ORDER BY user_domain, user_id",
            (conv.domain, conv.id),
        )
        members = [QualifiedId(*row) for row in cursor.fetchall()]
        cursor.execute(
            "SELECT 1 FROM wire_messages WHERE conv_domain = ? AND conv_id = ? AND id = ?",
            (conv.domain, conv.id, message.id),
        )
        if cursor.fetchone() is not None:
            return False, members
        cursor.execute(
            "INSERT INTO wire_messages (conv_domain, conv_id, id, sender_domain, sender_id, body, sent) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)",
            (conv.domain, conv.id, message.id, message.sender.domain, message.sender.id, message.text,
             message.time),
        )
        for member in members:
            if member.domain == self.backend_domain and member != message.sender:
                _add_event(cursor, member.id, event)
        if outbox is not None:
            outbox(cursor, members)
        return True, members

    def owned_conversations_of(
        self, user: QualifiedId, ids: Sequence[str]
    ) -> Deferred[List[Tuple[Conversation, List[QualifiedId]]]]:
        """
        The conversations among C{ids} that this backend owns and C{user} is
        a member of, each with its members, in the order of C{ids}.
        """
        return self.store.run_interaction(self._owned_conversations_of, user, ids)

    def _owned_conversations_of(
        self, cursor: Any, user: QualifiedId, ids: Sequence[str]
    ) -> List[Tuple[Conversation, List[QualifiedId]]]:
        result = []
        for conv_id in dict.fromkeys(ids):
            qid = QualifiedId(self.backend_domain, conv_id)
            cursor.execute(
                "SELECT 1 FROM wire_members WHERE conv_domain = ? AND conv_id = ? "
                "AND user_domain = ? AND user_id = ?",
                (qid.domain, qid.id, user.domain, user.id),
            )
            if cursor.fetchone() is None:
                continue
            cursor.execute(
                "SELECT name, creator_domain, creator_id, created FROM wire_conversations "
                "WHERE domain = ? AND id = ?",
                (qid.domain, qid.id),
            )
            name, creator_domain, creator_id, created = cursor.fetchone()
            cursor.execute(
                "SELECT user_domain, user_id FROM wire_members WHERE conv_domain = ? AND conv_id = ? "
                "ORDER BY user_domain, user_id",
                (qid.domain, qid.id),
            )
            members = [QualifiedId(*row) for row in cursor.fetchall()]
            result.append((Conversation(qid, name, QualifiedId(creator_domain, creator_id), created), members))
        return result

    def inbox(self, user_id: str, *, since: int, limit: int) -> Deferred[Tuple[List[Event], bool]]:
        """
        The events of C{user_id} after C{since}, oldest first, at most
        C{limit}; and whether more follow.
        """
        d = self.store.run_query(
            "SELECT seq, type, conv_domain, conv_id, from_domain, from_id, event_time, data "
            "FROM wire_events WHERE user_id = ? AND seq > ? ORDER BY seq LIMIT ?",
            (user_id, since, limit + 1),
        )

        def events(rows: List[Tuple]) -> Tuple[List[Event], bool]:
            result = [
                Event(seq, kind, QualifiedId(cd, ci), QualifiedId(fd, fi), when, json.loads(data))
                for seq, kind, cd, ci, fd, fi, when, data in rows[:limit]
            ]
            return result, len(rows) > limit

        return d.addCallback(events)

    def existing_users(self, ids: Sequence[str]) -> Deferred[Set[str]]:
        """Which of C{ids} are local users."""
        return self.users_by_ids(ids).addCallback(lambda users: {u.id for u in users})


def _insert_conversation(cursor: Any, conversation: Conversation, *, if_absent: bool) -> None:
    qid, creator = conversation.qid, conversation.creator
    conflict = " ON CONFLICT (domain, id) DO NOTHING" if if_absent else ""
    cursor.execute(
        "INSERT INTO wire_conversations (domain, id, name, creator_domain, creator_id, created) "
        "VALUES (?, ?, ?, ?, ?, ?)" + conflict,
        (qid.domain, qid.id, conversation.name, creator.domain, creator.id, conversation.created),
    )


def _insert_member(cursor: Any, conv: QualifiedId, member: QualifiedId) -> None:
    cursor.execute(
        "INSERT INTO wire_members (conv_domain, conv_id, user_domain, user_id) VALUES (?, ?, ?, ?) "
        "ON CONFLICT (conv_domain, conv_id, user_domain, user_id) DO NOTHING",
        (conv.domain, conv.id, member.domain, member.id),
    )


def _add_event(cursor: Any, user_id: str, event: NewEvent) -> None:
    """Append C{event} to C{user_id}'s inbox unless it is there already."""
    cursor.execute("SELECT 1 FROM wire_events WHERE user_id = ? AND event_key = ?", (user_id, event.key))
    if cursor.fetchone() is not None:
        return
    cursor.execute("SELECT COALESCE(MAX(seq), 0) FROM wire_events WHERE user_id = ?", (user_id,))
    seq = cursor.fetchone()[0] + 1
    cursor.execute(
        "INSERT INTO wire_events (user_id, seq, event_key, type, conv_domain, conv_id, from_domain, "
        "from_id, event_time, data) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (user_id, seq, event.key, event.type, event.conversation.domain, event.conversation.id,
         event.sender.domain, event.sender.id, event.time, json.dumps(event.data)),
    )
