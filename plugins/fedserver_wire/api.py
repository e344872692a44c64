"""
A small HTTP API for local clients of the reference brig and galley,
mounted under C{/wire/} on the outward listener (internal: like the rest of
that listener it must never be reachable from outside; it does not
authenticate its callers).

Routes (JSON in and out; ids are UUIDs, C{{domain}/{id}} qualifies an id):

- C{POST /wire/users} C{{"handle", "name"}} -> 201 the profile and client.
- C{GET /wire/users/{id}/inbox[?since=N&size=M]} -> C{{"events", "has_more"}}.
- C{GET /wire/search?q=TERM} or C{?q=@TERM@DOMAIN} -> C{{"documents"}}:
  local users, or another backend's C{search-users}.
- C{GET /wire/handles/{domain}/{handle}} -> a profile (C{get-user-by-handle}).
- C{GET /wire/profiles/{domain}/{id}} -> a profile (C{get-users-by-ids}).
- C{POST /wire/conversations} C{{"creator": id, "name", "members": [qids]}}
  -> 201 C{{"conversation", "prekey_bundles", "failed_to_add"}}: claims a
  prekey bundle of every other member (remote ones with
  C{claim-prekey-bundle}), creates the conversation here and tells the
  members' backends (C{on-conversation-created}).
- C{GET /wire/conversations/{domain}/{id}?user=ID} -> the metadata, for a
  member (remote conversations: the owner's C{get-conversations}).
- C{POST /wire/conversations/{domain}/{id}/messages} C{{"sender": id,
  "text"}} -> 201 C{{"message", "failed_to_send", "queued"}}.
- C{POST /wire/conversations/{domain}/{id}/leave} C{{"user": id}} -> 200.

Refusals are labelled JSON (C{400 bad-request}, C{400 invalid-handle},
C{404 not-found}, C{404 no-conversation}, C{403 access-denied}, C{409
handle-exists}, C{404 no-endpoint}, C{405 method-not-allowed}); a failed
federated call answers the labelled L{fedserver.errors.FederationError}
(e.g. C{533 federation-remote-error} with the remote's refusal under
C{inner}, or C{422 invalid-domain}).
"""

from __future__ import annotations

from typing import Any, Dict, Mapping, Sequence

from twisted.internet.defer import Deferred
from twisted.web import server

from fedserver.errors import FederationError
from fedserver.jsonapi import (
    APIError,
    JSONAPIResource,
    Router,
    bad_request,
    domain,
    json_object,
    json_response,
    parse_json,
    query_integer,
    query_params,
    text,
    uuid_id,
)
from fedserver.values import Response
from fedserver.web import labelled_json
from fedserver_wire.brig import WireBrig, search_term
from fedserver_wire.checks import (
    MAX_CONVERSATION_NAME,
    MAX_MEMBERS,
    MAX_NAME,
    MAX_TERM,
    MAX_TEXT,
    QualifiedId,
    handle,
    qualified_ids,
)
from fedserver_wire.galley import WireGalley

#: the first path segment the API is mounted under
SEGMENT = b"wire"
#: inbox events per answer, by default and at most
INBOX_PAGE = 100
MAX_INBOX_PAGE = 500


class WireAPI:
    """
    The client API over one backend's reference brig and galley.
    L{handle} is the whole API; L{WireAPIResource} puts it on the web.
    """

    def __init__(self, brig: WireBrig, galley: WireGalley) -> None:
        self.brig = brig
        self.galley = galley
        self.router = Router(SEGMENT.decode(), "the wire API")
        self.router.add("POST", ("users",), self._create_user)
        self.router.add("GET", ("users", "{}", "inbox"), self._inbox, query=("since", "size"))
        self.router.add("GET", ("search",), self._search, query=("q",))
        self.router.add("GET", ("handles", "{}", "{}"), self._by_handle)
        self.router.add("GET", ("profiles", "{}", "{}"), self._profile)
        self.router.add("POST", ("conversations",), self._create_conversation)
        self.router.add("GET", ("conversations", "{}", "{}"), self._conversation, query=("user",))
        self.router.add("POST", ("conversations", "{}", "{}", "messages"), self._send)
        self.router.add("POST", ("conversations", "{}", "{}", "leave"), self._leave)

    @property
    def backend_domain(self) -> str:
        """Our backend domain."""
        return self.brig.backend_domain

    def handle(
        self, method: str, path: str, args: Mapping[bytes, Sequence[bytes]], body: bytes, request_id: str
    ) -> Deferred[Response]:
        """
        Answer one request: C{path} is the whole path (C{/wire/...}), C{args}
        the decoded query parameters as Twisted gives them.  Always fires with
        a L{Response}: refusals and federation failures are labelled JSON.
        """
        return Deferred.fromCoroutine(self._handle(method, path, args, body, request_id))

    async def _handle(
        self, method: str, path: str, args: Mapping[bytes, Sequence[bytes]], body: bytes, request_id: str
    ) -> Response:
        try:
            handler, params, query_names = self.router.route(method, path)
            query = query_params(args, query_names)
            return await handler(*params, query=query, body=body, request_id=request_id)
        except APIError as e:
            return e.response()
        except FederationError as e:
            return labelled_json(e)

    def _body(self, body: bytes, *, required: Sequence[str]) -> Mapping[str, Any]:
        return json_object(parse_json(body, "the request body"), "the request body", required=required)

    # routes

    async def _create_user(self, *, query: Dict[str, str], body: bytes, request_id: str) -> Response:
        request = self._body(body, required=("handle", "name"))
        user_handle = handle(request["handle"], "handle")
        name = text(request["name"], "name", maximum=MAX_NAME)
        if not name.strip():
            raise bad_request("name must not be blank")
        return json_response(await self.brig.create_user(user_handle, name), 201)

    async def _inbox(self, user_id: str, *, query: Dict[str, str], body: bytes, request_id: str) -> Response:
        user_id = uuid_id(user_id, "the user id")
        since = query_integer(query.get("since"), "since", minimum=0, maximum=2**62, default=0)
        size = query_integer(query.get("size"), "size", minimum=1, maximum=MAX_INBOX_PAGE, default=INBOX_PAGE)
        await self.brig.require_local_users([user_id])
        return json_response(await self.galley.inbox(user_id, since=since, limit=size))

    async def _search(self, *, query: Dict[str, str], body: bytes, request_id: str) -> Response:
        if "q" not in query:
            raise bad_request("search needs q, e.g. ?q=@bob@b.example or ?q=bob")
        raw = text(query["q"], "q", maximum=MAX_TERM + 254).strip()
        raw = raw[1:] if raw.startswith("@") else raw
        where = self.backend_domain
        if "@" in raw:
            raw, where = raw.rsplit("@", 1)
            where = domain(where, "the domain of q")
        term = search_term(raw, "q")
        return json_response({"documents": await self.brig.search(term, where, request_id)})

    async def _by_handle(
        self, user_domain: str, user_handle: str, *, query: Dict[str, str], body: bytes, request_id: str
    ) -> Response:
        user_domain = domain(user_domain, "the domain")
        user_handle = handle(user_handle, "the handle")
        profile = await self.brig.lookup_handle(user_domain, user_handle, request_id)
        if profile is None:
            raise APIError(404, "not-found", f"there is no user @{user_handle}@{user_domain}")
        return json_response(profile)

    async def _profile(
        self, user_domain: str, user_id: str, *, query: Dict[str, str], body: bytes, request_id: str
    ) -> Response:
        qid = QualifiedId(domain(user_domain, "the domain"), uuid_id(user_id, "the user id"))
        profiles = await self.brig.profiles(qid.domain, [qid.id], request_id)
        if not profiles:
            raise APIError(404, "not-found", f"there is no user {qid}")
        return json_response(profiles[0])

    async def _create_conversation(self, *, query: Dict[str, str], body: bytes, request_id: str) -> Response:
        request = self._body(body, required=("creator", "name", "members"))
        creator_id = uuid_id(request["creator"], "creator")
        name = text(request["name"], "name", maximum=MAX_CONVERSATION_NAME)
        members = qualified_ids(request["members"], "members", maximum=MAX_MEMBERS)
        creator = QualifiedId(self.backend_domain, creator_id)
        others = [m for m in members if m != creator]
        if len(others) + 1 > MAX_MEMBERS:
            raise bad_request(f"a conversation has at most {MAX_MEMBERS} members, the creator included")
        await self.brig.require_local_users(
            [creator_id, *(m.id for m in others if m.domain == self.backend_domain)]
        )
        bundles = {}
        for member in others:
            bundle = await self.brig.claim_bundle(member, request_id)
            bundles[member] = {"user": member.to_json(), "clients": bundle["clients"]}
        answer = await self.galley.create_conversation(creator_id, name, others, request_id)
        kept = {QualifiedId.from_json(m, "member") for m in answer["conversation"]["members"]}
        answer["prekey_bundles"] = [bundle for member, bundle in bundles.items() if member in kept]
        return json_response(answer, 201)

    def _conversation_id(self, conv_domain: str, conv_id: str) -> QualifiedId:
        return QualifiedId(domain(conv_domain, "the conversation domain"), uuid_id(conv_id, "the conversation id"))

    async def _conversation(
        self, conv_domain: str, conv_id: str, *, query: Dict[str, str], body: bytes, request_id: str
    ) -> Response:
        qid = self._conversation_id(conv_domain, conv_id)
        if "user" not in query:
            raise bad_request("reading a conversation needs ?user=ID, a member")
        user_id = uuid_id(query["user"], "user")
        return json_response(await self.galley.conversation_for(qid, user_id, request_id))

    async def _send(
        self, conv_domain: str, conv_id: str, *, query: Dict[str, str], body: bytes, request_id: str
    ) -> Response:
        qid = self._conversation_id(conv_domain, conv_id)
        request = self._body(body, required=("sender", "text"))
        sender = uuid_id(request["sender"], "sender")
        message_text = text(request["text"], "text", maximum=MAX_TEXT, single_line=False)
        return json_response(await self.galley.send_message(qid, sender, message_text, request_id), 201)

    async def _leave(
        self, conv_domain: str, conv_id: str, *, query: Dict[str, str], body: bytes, request_id: str
    ) -> Response:
        qid = self._conversation_id(conv_domain, conv_id)
        request = self._body(body, required=("user",))
        user_id = uuid_id(request["user"], "user")
        return json_response(await self.galley.leave(qid, user_id, request_id))


class WireAPIResource(JSONAPIResource):
    """
    L{WireAPI} as a Twisted resource for C{/wire/}: bodies within
    C{max_body_bytes}, one log line per request with its request id, no
    traceback ever shown (L{JSONAPIResource}).
    """

    def __init__(self, api: WireAPI, *, max_body_bytes: int) -> None:
        super().__init__("wire API", self._serve, max_body_bytes=max_body_bytes)
        self.api = api

    def _serve(self, request: server.Request, body: bytes, request_id: str) -> Deferred[Response]:
        method = request.method.decode("latin-1")
        path = request.path.decode("latin-1")
        return self.api.handle(method, path, request.args or {}, body, request_id)
