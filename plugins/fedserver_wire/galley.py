"""
The reference galley: conversations, their members and messages, and each
local user's inbox, under Wire's ownership rules.

A conversation is owned by the backend where it was created: the domain of
its qualified id.  The owner records every member and is the source of
truth; another backend records the conversation only to know which of its
own users take part.  RPCs named C{on-*} are sent by the owner, the others
to the owner.

Federated RPCs (C{POST /federation/galley/{rpc}}), each authorized against
the call's validated origin domain:

- C{on-conversation-created} C{{"conversation": {"id", "domain"}, "name",
  "creator": qid, "members": [qids], "time"}}: accepted only when the
  conversation's domain is the calling backend (else C{403
  not-conversation-owner}) and the creator is one of its users; registers the
  conversation with the members that are our users (all must exist, C{404
  not-found}) and tells each of them (a C{conversation.create} event).
  Repeating it changes nothing.
- C{on-message-sent} C{{"conversation": qid, "sender": qid, "message":
  {"id", "text", "time"}}}: only from the owner (C{403
  not-conversation-owner}), only for a conversation registered here (C{404
  no-conversation}); each local member but the sender gets a
  C{conversation.message-add} event, once per message id.
- C{leave-conversation} C{{"conversation": id, "user": qid}}: to the owner,
  from the leaving user's backend (C{403 access-denied} for a user of
  another domain or a non-member, C{404 no-conversation}).
- C{send-message} C{{"conversation": id, "sender": qid, "text"}}: to the
  owner, from the sender's backend; the sender must be of the calling
  domain and a member (C{403 access-denied}).  The owner stores the
  message, gives it to its local members and sends C{on-message-sent} to
  every other backend with members (the sender's own included, for the
  sender's fellow users there); it answers C{{"message": {...},
  "failed_to_send": [...], "queued": [...]}}.
- C{get-conversations} C{{"user": qid, "ids": [ids]}}: the metadata of
  those of our conversations that the user is a member of, only when the
  user is of the calling domain (C{403 access-denied} otherwise):
  C{{"conversations": [...]}}.  Unknown ids and conversations the user is
  not in are left out, so nothing is learnt about them.

When a remote backend cannot be told (C{on-conversation-created},
C{on-message-sent}), the answer says so (C{failed_to_add},
C{failed_to_send}, with the labelled error) instead of failing the whole
operation, as wire-server reports them; members whose backend never learnt
of a new conversation are taken out of it.

C{on-message-sent} goes through fedserver's durable outbound queue
(L{fedserver.outbound_queue}), queued in the transaction that stores the
message: a backend that cannot be reached now is told when it is back, in
order and once (the answer lists it under C{queued}); only a backend that
refuses the notification for good is in C{failed_to_send}.
C{on-conversation-created} is still sent at once, because a member whose
backend was not told is taken out of the new conversation.
"""

from __future__ import annotations

import json
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from zope.interface import implementer

from fedserver.errors import FederationError
from fedserver.interfaces import IComponentHandler
from fedserver.jsonapi import (
    RPC,
    APIError,
    RPCComponent,
    bad_request,
    deferred,
    json_list,
    json_object,
    new_id,
    text,
    uuid_id,
)
from fedserver.rpc_client import RPCClient, unexpected_body
from fedserver.values import FederatedCall
from fedserver_wire.checks import (
    MAX_CONVERSATION_NAME,
    MAX_IDS,
    MAX_MEMBERS,
    MAX_TEXT,
    QualifiedId,
    iso_time,
    qualified_ids,
    timestamp,
)
from fedserver_wire.store import Conversation, Message, NewEvent, WireStore

log = Logger(namespace="fedserver_wire.galley")

CREATE_EVENT = "conversation.create"
MESSAGE_EVENT = "conversation.message-add"


def not_owner(conversation: QualifiedId, origin: str) -> APIError:
    """C{403 not-conversation-owner}: an C{on-*} RPC from a backend that does not own the conversation."""
    return APIError(
        403,
        "not-conversation-owner",
        f"{origin} does not own the conversation {conversation}: only {conversation.domain} "
        "may send this",
    )


def no_conversation(conversation: QualifiedId) -> APIError:
    """C{404 no-conversation}."""
    return APIError(404, "no-conversation", f"there is no conversation {conversation} here")


def access_denied(message: str) -> APIError:
    """C{403 access-denied}."""
    return APIError(403, "access-denied", message)


def conversation_json(conversation: Conversation, members: Sequence[QualifiedId]) -> Dict[str, Any]:
    """A conversation's metadata as answers show it."""
    return {
        "qualified_id": conversation.qid.to_json(),
        "name": conversation.name,
        "creator": conversation.creator.to_json(),
        "members": [m.to_json() for m in sorted(members)],
        "created": conversation.created,
    }


def message_event(message: Message) -> NewEvent:
    """The inbox event for C{message}."""
    return NewEvent(
        key=f"{MESSAGE_EVENT}:{message.conversation}/{message.id}",
        type=MESSAGE_EVENT,
        conversation=message.conversation,
        sender=message.sender,
        time=message.time,
        data={"id": message.id, "text": message.text},
    )


def by_domain(users: Sequence[QualifiedId], *, skip: Sequence[str]) -> Dict[str, List[QualifiedId]]:
    """C{users} grouped by domain, leaving out the domains in C{skip}."""
    groups: Dict[str, List[QualifiedId]] = {}
    for user in users:
        if user.domain not in skip:
            groups.setdefault(user.domain, []).append(user)
    return dict(sorted(groups.items()))


@implementer(IComponentHandler)
class WireGalley(RPCComponent):
    """
    The reference galley of one backend.

    @param store: the shared L{WireStore}.
    @param remote: calls other backends' galleys.
    @param clock: an C{IReactorTime} (C{context.reactor}) for the times of
        conversations and messages.
    """

    name = "galley"

    def __init__(self, store: WireStore, remote: RPCClient, *, clock: Any, queue: Callable[[], Any] = lambda: None,
                 notify_wait: float = 30.0) -> None:
        self.store = store
        self.remote = remote
        self.clock = clock
        #: gives the durable outbound queue (C{context.queue}) that C{on-message-sent} goes through, if any
        self.queue = queue
        #: seconds sending a message waits for the other backends to be told before it answers
        self.notify_wait = notify_wait

    @property
    def backend_domain(self) -> str:
        """Our backend domain."""
        return self.store.backend_domain

    def now(self) -> str:
        """The current time, ISO 8601."""
        return iso_time(self.clock.seconds())

    # federated RPCs

    def rpcs(self) -> Dict[str, RPC]:
        return {
            "on-conversation-created": self._on_conversation_created,
            "on-message-sent": self._on_message_sent,
            "leave-conversation": self._leave_conversation,
            "send-message": self._send_message,
            "get-conversations": self._get_conversations,
        }

    def _owned_by_caller(self, call: FederatedCall, value: Any) -> QualifiedId:
        """The conversation of an C{on-*} RPC, which must be the caller's and not ours."""
        qid = QualifiedId.from_json(value, "conversation")
        if qid.domain != call.origin_domain or qid.domain == self.backend_domain:
            raise not_owner(qid, call.origin_domain)
        return qid

    def _caller_user(self, call: FederatedCall, value: Any, where: str) -> QualifiedId:
        """A user named by the caller, who must be one of the caller's users."""
        user = QualifiedId.from_json(value, where)
        if user.domain != call.origin_domain:
            raise access_denied(f"{call.origin_domain} may act only for its own users, not for {user}")
        return user

    async def _owned_here(self, value: Any) -> Conversation:
        """A conversation of ours named by its unqualified id, which must exist."""
        qid = QualifiedId(self.backend_domain, uuid_id(value, "conversation"))
        conversation = await self.store.conversation(qid)
        if conversation is None:
            raise no_conversation(qid)
        return conversation

    async def _on_conversation_created(self, call: FederatedCall, body: Any) -> Any:
        request = json_object(
            body, "the request", required=("conversation", "name", "creator", "members", "time"), strict=False
        )
        qid = self._owned_by_caller(call, request["conversation"])
        name = text(request["name"], "name", maximum=MAX_CONVERSATION_NAME)
        creator = QualifiedId.from_json(request["creator"], "creator")
        if creator.domain != qid.domain:
            raise access_denied(
                f"the creator {creator} is not a user of {qid.domain}, which owns the conversation"
            )
        members = qualified_ids(request["members"], "members", maximum=MAX_MEMBERS)
        if creator not in members:
            raise bad_request("members must include the creator")
        when = timestamp(request["time"], "time")
        local = [m.id for m in members if m.domain == self.backend_domain]
        if not local:
            raise bad_request(f"no member of the conversation is a user of {self.backend_domain}")
        existing = await self.store.existing_users(local)
        for user_id in local:
            if user_id not in existing:
                raise APIError(404, "not-found", f"there is no user {user_id} on {self.backend_domain}")
        event = NewEvent(
            key=f"{CREATE_EVENT}:{qid}",
            type=CREATE_EVENT,
            conversation=qid,
            sender=creator,
            time=when,
            data={"name": name, "members": [m.to_json() for m in members]},
        )
        await self.store.register_remote_conversation(Conversation(qid, name, creator, when), local, event)
        return {}

    async def _on_message_sent(self, call: FederatedCall, body: Any) -> Any:
        request = json_object(body, "the request", required=("conversation", "sender", "message"), strict=False)
        qid = self._owned_by_caller(call, request["conversation"])
        sender = QualifiedId.from_json(request["sender"], "sender")
        content = json_object(request["message"], "message", required=("id", "text", "time"), strict=False)
        message = Message(
            id=uuid_id(content["id"], "message.id"),
            conversation=qid,
            sender=sender,
            text=text(content["text"], "message.text", maximum=MAX_TEXT, single_line=False),
            time=timestamp(content["time"], "message.time"),
        )
        if await self.store.conversation(qid) is None:
            raise no_conversation(qid)
        await self.store.record_message(message, message_event(message))
        return {}

    async def _leave_conversation(self, call: FederatedCall, body: Any) -> Any:
        request = json_object(body, "the request", required=("conversation", "user"), strict=False)
        user = self._caller_user(call, request["user"], "user")
        conversation = await self._owned_here(request["conversation"])
        if not await self.store.remove_members(conversation.qid, [user]):
            raise access_denied(f"{user} is not a member of the conversation {conversation.qid}")
        return {}

    async def _send_message(self, call: FederatedCall, body: Any) -> Any:
        request = json_object(body, "the request", required=("conversation", "sender", "text"), strict=False)
        sender = self._caller_user(call, request["sender"], "sender")
        message_text = text(request["text"], "text", maximum=MAX_TEXT, single_line=False)
        conversation = await self._owned_here(request["conversation"])
        if sender not in await self.store.members(conversation.qid):
            raise access_denied(f"{sender} is not a member of the conversation {conversation.qid}")
        return await self._send_as_owner(conversation, sender, message_text, call.request_id)

    async def _get_conversations(self, call: FederatedCall, body: Any) -> Any:
        request = json_object(body, "the request", required=("user", "ids"), strict=False)
        user = self._caller_user(call, request["user"], "user")
        ids = [uuid_id(v, f"ids[{i}]") for i, v in enumerate(json_list(request["ids"], "ids", maximum=MAX_IDS))]
        found = await self.store.owned_conversations_of(user, ids)
        return {"conversations": [conversation_json(c, members) for c, members in found]}

    # the owner's side of sending

    async def _send_as_owner(
        self, conversation: Conversation, sender: QualifiedId, message_text: str, request_id: str
    ) -> Dict[str, Any]:
        message = Message(new_id(), conversation.qid, sender, message_text, self.now())
        body = {
            "conversation": conversation.qid.to_json(),
            "sender": sender.to_json(),
            "message": {"id": message.id, "text": message.text, "time": message.time},
        }
        queue = self.queue()
        if queue is not None:
            return await self._queue_message(queue, message, sender, body, request_id)
        _, members = await self.store.record_message(message, message_event(message))
        recipients = [m for m in members if m != sender]
        groups = by_domain(recipients, skip=[self.backend_domain])
        failures = await self._tell(groups, "on-message-sent", body, request_id)
        failed = [
            {"domain": domain, "users": [u.to_json() for u in groups[domain]], "error": error}
            for domain, error in failures
        ]
        return {"message": message.to_json(), "failed_to_send": failed, "queued": []}

    async def _queue_message(
        self, queue: Any, message: Message, sender: QualifiedId, body: Dict[str, Any], request_id: str
    ) -> Dict[str, Any]:
        """
        Store C{message} and queue C{on-message-sent} for every other
        backend with recipients in the same transaction (the durable
        outbound queue, docs/queue.md), then wait at most C{notify_wait}
        seconds for them to be told: a backend that refused it for good is
        in C{failed_to_send}, one not reached yet in C{queued} (the queue
        goes on trying).
        """
        groups: Dict[str, List[QualifiedId]] = {}
        outgoing: List[Any] = []
        data = json.dumps(body).encode("utf-8")

        def outbox(cursor: Any, members: List[QualifiedId]) -> None:
            groups.update(by_domain([m for m in members if m != sender], skip=[self.backend_domain]))
            outgoing[:] = [queue.item(domain, "galley", "on-message-sent", data, request_id=request_id)
                           for domain in groups]
            queue.insert(cursor, outgoing)

        await self.store.record_message(message, message_event(message), outbox)
        failed: List[Dict[str, Any]] = []
        queued: List[Dict[str, Any]] = []
        for attempt in await queue.submitted(outgoing, wait=self.notify_wait):
            entry: Dict[str, Any] = {"domain": attempt.destination,
                                     "users": [u.to_json() for u in groups[attempt.destination]]}
            if attempt.state == "dead":
                failed.append({**entry, "error": attempt.error})
            elif attempt.state == "queued":
                queued.append({**entry, **({"error": attempt.error} if attempt.error is not None else {})})
        return {"message": message.to_json(), "failed_to_send": failed, "queued": queued}

    async def _tell(
        self, groups: Dict[str, List[QualifiedId]], rpc: str, body: Any, request_id: str
    ) -> List[Tuple[str, Dict[str, Any]]]:
        """
        Send C{rpc} to the galley of every domain of C{groups}, all at once;
        return C{(domain, labelled error)} for those that failed.
        """
        outcomes = await defer.gatherResults(
            [Deferred.fromCoroutine(self._tell_one(d, rpc, body, request_id)) for d in groups]
        )
        return [(domain, error) for domain, error in outcomes if error is not None]

    async def _tell_one(
        self, domain: str, rpc: str, body: Any, request_id: str
    ) -> Tuple[str, Optional[Dict[str, Any]]]:
        try:
            await self.remote.call(domain, "galley", rpc, body, request_id)
        except (FederationError, APIError) as e:
            log.warn(
                "galley: {rpc} to {domain} failed: {label}: {message} [request {request_id}]",
                rpc=rpc, domain=domain, label=e.label, message=e.message, request_id=request_id,
            )
            return domain, e.to_json()
        return domain, None

    # local operations, for the client API

    async def _local_member(self, qid: QualifiedId, user_id: str) -> Tuple[Conversation, QualifiedId]:
        """The conversation C{qid}, which local user C{user_id} must be a member of."""
        conversation = await self.store.conversation(qid)
        if conversation is None:
            raise no_conversation(qid)
        user = QualifiedId(self.backend_domain, user_id)
        if user not in await self.store.members(qid):
            raise access_denied(f"{user} is not a member of the conversation {qid}")
        return conversation, user

    @deferred
    async def create_conversation(
        self, creator_id: str, name: str, members: Sequence[QualifiedId], request_id: str
    ) -> Dict[str, Any]:
        """
        Create a conversation owned here by local user C{creator_id} with
        C{members} (the creator is added when missing; local ones must
        exist, which the caller checked) and tell the backend of each
        remote member with C{on-conversation-created}.  Members whose
        backend could not be told are taken out and listed under
        C{failed_to_add}.
        """
        creator = QualifiedId(self.backend_domain, creator_id)
        everyone = [creator, *(m for m in members if m != creator)]
        conversation = Conversation(QualifiedId(self.backend_domain, new_id()), name, creator, self.now())
        event = NewEvent(
            key=f"{CREATE_EVENT}:{conversation.qid}",
            type=CREATE_EVENT,
            conversation=conversation.qid,
            sender=creator,
            time=conversation.created,
            data={"name": name, "members": [m.to_json() for m in everyone]},
        )
        notify = [m.id for m in everyone if m.domain == self.backend_domain and m != creator]
        await self.store.create_conversation(conversation, everyone, event, notify)
        groups = by_domain(everyone, skip=[self.backend_domain])
        body = {
            "conversation": conversation.qid.to_json(),
            "name": name,
            "creator": creator.to_json(),
            "members": [m.to_json() for m in everyone],
            "time": conversation.created,
        }
        failures = await self._tell(groups, "on-conversation-created", body, request_id)
        failed_to_add = []
        for domain, error in failures:
            await self.store.remove_members(conversation.qid, groups[domain])
            failed_to_add.append({"domain": domain, "users": [u.to_json() for u in groups[domain]], "error": error})
        members_now = await self.store.members(conversation.qid)
        return {"conversation": conversation_json(conversation, members_now), "failed_to_add": failed_to_add}

    @deferred
    async def send_message(
        self, qid: QualifiedId, sender_id: str, message_text: str, request_id: str
    ) -> Dict[str, Any]:
        """
        Send a message from local member C{sender_id}: as the owner when the
        conversation is ours, else through the owner's C{send-message}.
        """
        conversation, sender = await self._local_member(qid, sender_id)
        if qid.domain == self.backend_domain:
            return await self._send_as_owner(conversation, sender, message_text, request_id)
        path = "/federation/galley/send-message"
        answer = await self.remote.call(
            qid.domain, "galley", "send-message",
            {"conversation": qid.id, "sender": sender.to_json(), "text": message_text}, request_id,
        )
        try:
            result = json_object(answer, "the answer", required=("message", "failed_to_send"), strict=False)
            sent = json_object(result["message"], "message", required=("id", "time"), strict=False)
            message = {
                "id": uuid_id(sent["id"], "message.id"),
                "conversation": qid.to_json(),
                "sender": sender.to_json(),
                "text": message_text,
                "time": timestamp(sent["time"], "message.time"),
            }
            failed = json_list(result["failed_to_send"], "failed_to_send", maximum=MAX_MEMBERS)
            queued = json_list(result.get("queued", []), "queued", maximum=MAX_MEMBERS)
        except APIError as e:
            raise unexpected_body(qid.domain, path, e.message) from None
        return {"message": message, "failed_to_send": failed, "queued": queued}

    @deferred
    async def leave(self, qid: QualifiedId, user_id: str, request_id: str) -> Dict[str, Any]:
        """
        Take local member C{user_id} out of C{qid}; for a remote conversation
        the owner is asked first (C{leave-conversation}) and only its
        consent removes the local record.
        """
        _, user = await self._local_member(qid, user_id)
        if qid.domain != self.backend_domain:
            await self.remote.call(
                qid.domain, "galley", "leave-conversation", {"conversation": qid.id, "user": user.to_json()},
                request_id,
            )
        await self.store.remove_members(qid, [user])
        return {"conversation": qid.to_json(), "user": user.to_json()}

    @deferred
    async def conversation_for(self, qid: QualifiedId, user_id: str, request_id: str) -> Dict[str, Any]:
        """
        The metadata of C{qid} for local member C{user_id}: from here when
        we own it, else from the owner's C{get-conversations}.
        """
        conversation, user = await self._local_member(qid, user_id)
        if qid.domain == self.backend_domain:
            return conversation_json(conversation, await self.store.members(qid))
        path = "/federation/galley/get-conversations"
        answer = await self.remote.call(
            qid.domain, "galley", "get-conversations", {"user": user.to_json(), "ids": [qid.id]}, request_id
        )
        try:
            found = json_object(answer, "the answer", required=("conversations",), strict=False)
            items = json_list(found["conversations"], "conversations", maximum=1)
            metadata = [remote_conversation(item) for item in items]
        except APIError as e:
            raise unexpected_body(qid.domain, path, e.message) from None
        if not metadata or metadata[0]["qualified_id"] != qid.to_json():
            raise APIError(
                404, "no-conversation", f"{qid.domain} does not show the conversation {qid} to {user}"
            )
        return metadata[0]

    @deferred
    async def inbox(self, user_id: str, *, since: int, limit: int) -> Dict[str, Any]:
        """The inbox of local user C{user_id} after event C{since} (the caller checked the user)."""
        events, more = await self.store.inbox(user_id, since=since, limit=limit)
        return {"events": [e.to_json() for e in events], "has_more": more}


def remote_conversation(value: Any) -> Dict[str, Any]:
    """Conversation metadata from an owner's C{get-conversations}, checked and rebuilt."""
    item = json_object(
        value, "a conversation", required=("qualified_id", "name", "creator", "members", "created"), strict=False
    )
    return {
        "qualified_id": QualifiedId.from_json(item["qualified_id"], "qualified_id").to_json(),
        "name": text(item["name"], "name", maximum=MAX_CONVERSATION_NAME),
        "creator": QualifiedId.from_json(item["creator"], "creator").to_json(),
        "members": [m.to_json() for m in qualified_ids(item["members"], "members", maximum=MAX_MEMBERS)],
        "created": timestamp(item["created"], "created"),
    }
