"""
The reference brig: users with handles, their profiles, and the prekeys of
their clients.

Federated RPCs (C{POST /federation/brig/{rpc}} from other backends):

- C{get-user-by-handle} C{{"handle": "bob"}} -> a profile, or C{null}.
- C{search-users} C{{"term": "bob"}} -> C{{"documents": [profiles],
  "search_policy": ...}}, as the C{search_policy} option allows:
  C{no_search} (nothing), C{exact_handle_search} (the user whose handle is
  the term; the default) or C{full_search} (also handle, name and word
  prefixes).
- C{get-users-by-ids} C{[ids]} -> C{[profiles]} of those that exist.
- C{claim-prekey-bundle} C{{"user": id}} -> C{{"user": id, "clients":
  [{"client": cid, "prekey": {"id": n, "key": b64}}]}}; C{404 not-found}
  for no such user.

A profile is C{{"qualified_id": {"id", "domain"}, "handle", "name"}}, its
domain our backend domain.  Each user gets one client at creation with
C{prekeys} prekeys (ids 0, 1, ...) and a last-resort prekey (id 65535): a
claim consumes one prekey per client, and hands out the last-resort key,
never consumed, once the others are gone.  The keys are X25519 public keys;
as a server-side reference, brig keeps no private halves: there is no
device to hold them.

The client API (L{fedserver_wire.api}) uses the local methods: creating
users, and looking users up here or, through federation, on their own
backend's brig.
"""

from __future__ import annotations

import base64
import re
import secrets
from typing import Any, Dict, List, Optional, Sequence

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from zope.interface import implementer

from fedserver.interfaces import IComponentHandler
from fedserver.jsonapi import RPC, APIError, RPCComponent, deferred, json_list, json_object, new_id, text, uuid_id
from fedserver.rpc_client import RPCClient, unexpected_body
from fedserver.values import FederatedCall
from fedserver_wire.checks import MAX_IDS, MAX_NAME, MAX_TERM, QualifiedId, handle
from fedserver_wire.store import LAST_RESORT_KEY_ID, NewUser, User, WireStore

SEARCH_POLICIES = ("no_search", "exact_handle_search", "full_search")

#: what a remote brig may answer: client ids as wire-server writes them,
#: at most this many clients per user, keys of at most this many characters
CLIENT_ID = re.compile(r"[0-9a-f]{1,16}")
MAX_CLIENTS = 64
MAX_KEY = 4096
#: at most this many documents per search, ours (the search_limit option) or a remote's
MAX_SEARCH_RESULTS = 100


def new_prekey() -> str:
    """A fresh X25519 public key, base64."""
    public = X25519PrivateKey.generate().public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    return base64.b64encode(public).decode("ascii")


def profile_json(user: User, domain: str) -> Dict[str, Any]:
    """C{user}'s profile, qualified with C{domain} (ours)."""
    return {"qualified_id": {"id": user.id, "domain": domain}, "handle": user.handle, "name": user.name}


def search_term(value: Any, where: str) -> str:
    """A search term: 1 to 128 characters; spaces and a leading C{@} are dropped, lower-cased."""
    term = text(value, where, maximum=MAX_TERM).strip().lstrip("@").lower()
    if not term:
        raise APIError(400, "bad-request", f"{where} has nothing to search for")
    return term


@implementer(IComponentHandler)
class WireBrig(RPCComponent):
    """
    The reference brig of one backend.

    @param store: the shared L{WireStore}.
    @param remote: calls other backends' brigs.
    @param clock: an C{IReactorTime} (C{context.reactor}).
    @param prekeys: how many prekeys (besides the last-resort one) a new
        user's client gets.
    @param search_policy: what C{search-users} answers other backends.
    @param search_limit: at most this many documents per search.
    """

    name = "brig"

    def __init__(
        self,
        store: WireStore,
        remote: RPCClient,
        *,
        clock: Any,
        prekeys: int = 10,
        search_policy: str = "exact_handle_search",
        search_limit: int = 10,
    ) -> None:
        if search_policy not in SEARCH_POLICIES:
            raise ValueError(f"unknown search policy {search_policy!r}")
        self.store = store
        self.remote = remote
        self.clock = clock
        self.prekeys = prekeys
        self.search_policy = search_policy
        self.search_limit = search_limit

    @property
    def backend_domain(self) -> str:
        """Our backend domain."""
        return self.store.backend_domain

    def profile(self, user: User) -> Dict[str, Any]:
        """A local user's profile."""
        return profile_json(user, self.backend_domain)

    # federated RPCs

    def rpcs(self) -> Dict[str, RPC]:
        return {
            "get-user-by-handle": self._get_user_by_handle,
            "search-users": self._search_users,
            "get-users-by-ids": self._get_users_by_ids,
            "claim-prekey-bundle": self._claim_prekey_bundle,
        }

    async def _get_user_by_handle(self, call: FederatedCall, body: Any) -> Any:
        request = json_object(body, "the request", required=("handle",), strict=False)
        user = await self.store.user_by_handle(handle(request["handle"], "handle"))
        return self.profile(user) if user is not None else None

    async def _search_users(self, call: FederatedCall, body: Any) -> Any:
        request = json_object(body, "the request", required=("term",), strict=False)
        term = search_term(request["term"], "term")
        users: List[User] = []
        if self.search_policy != "no_search":
            full = self.search_policy == "full_search"
            users = await self.store.search_users(term, full=full, limit=self.search_limit)
        return {"documents": [self.profile(u) for u in users], "search_policy": self.search_policy}

    async def _get_users_by_ids(self, call: FederatedCall, body: Any) -> Any:
        ids = [uuid_id(v, f"ids[{i}]") for i, v in enumerate(json_list(body, "the request", maximum=MAX_IDS))]
        return [self.profile(u) for u in await self.store.users_by_ids(ids)]

    async def _claim_prekey_bundle(self, call: FederatedCall, body: Any) -> Any:
        request = json_object(body, "the request", required=("user",), strict=False)
        return await self.local_bundle(uuid_id(request["user"], "user"))

    # local operations, for the client API

    @deferred
    async def create_user(self, user_handle: str, name: str) -> Dict[str, Any]:
        """
        Create a user with C{user_handle} and C{name} (both already
        checked), one client and its prekeys; C{409 handle-exists} when the
        handle is taken.  Returns the profile with the client id.
        """
        keys = [(i, new_prekey()) for i in range(self.prekeys)] + [(LAST_RESORT_KEY_ID, new_prekey())]
        user = NewUser(
            id=new_id(),
            handle=user_handle,
            name=name,
            client_id=secrets.token_hex(8),
            prekeys=tuple(keys),
            created=self.clock.seconds(),
        )
        await self.store.create_user(user)
        return {**self.profile(User(user.id, user.handle, user.name)), "clients": [user.client_id]}

    @deferred
    async def require_local_users(self, ids: Sequence[str]) -> None:
        """C{404 not-found} for the first of C{ids} that is no local user."""
        existing = await self.store.existing_users(ids)
        for user_id in ids:
            if user_id not in existing:
                raise APIError(404, "not-found", f"there is no user {user_id} on {self.backend_domain}")

    @deferred
    async def local_bundle(self, user_id: str) -> Dict[str, Any]:
        """Claim a prekey bundle of local user C{user_id}."""
        claimed = await self.store.claim_prekey_bundle(user_id)
        if claimed is None:
            raise APIError(404, "not-found", f"there is no user {user_id} on {self.backend_domain}")
        return {
            "user": user_id,
            "clients": [{"client": c.client_id, "prekey": {"id": c.key_id, "key": c.key}} for c in claimed],
        }

    @deferred
    async def lookup_handle(self, domain: str, user_handle: str, request_id: str) -> Optional[Dict[str, Any]]:
        """The profile of C{@user_handle@domain}, here or from its backend's brig; C{None} if none."""
        if domain == self.backend_domain:
            user = await self.store.user_by_handle(user_handle)
            return self.profile(user) if user is not None else None
        path = "/federation/brig/get-user-by-handle"
        answer = await self.remote.call(domain, "brig", "get-user-by-handle", {"handle": user_handle}, request_id)
        if answer is None:
            return None
        profile = remote_profile(answer, domain, path)
        if profile["handle"] != user_handle:
            raise unexpected_body(domain, path, f"the profile of {profile['handle']!r}, not of {user_handle!r}")
        return profile

    @deferred
    async def search(self, term: str, domain: str, request_id: str) -> List[Dict[str, Any]]:
        """
        Users matching C{term} on C{domain}: here every local user whose
        handle, name or a word of the name starts with it; elsewhere what
        that backend's C{search-users} answers.
        """
        if domain == self.backend_domain:
            users = await self.store.search_users(term, full=True, limit=self.search_limit)
            return [self.profile(u) for u in users]
        path = "/federation/brig/search-users"
        answer = await self.remote.call(domain, "brig", "search-users", {"term": term}, request_id)
        try:
            found = json_object(answer, "the answer", required=("documents",), strict=False)["documents"]
            documents = json_list(found, "documents", maximum=MAX_SEARCH_RESULTS)
        except APIError as e:
            raise unexpected_body(domain, path, e.message) from None
        return [remote_profile(d, domain, path) for d in documents]

    @deferred
    async def profiles(self, domain: str, ids: Sequence[str], request_id: str) -> List[Dict[str, Any]]:
        """The profiles of the users C{ids} of C{domain} that exist, here or through federation."""
        if domain == self.backend_domain:
            return [self.profile(u) for u in await self.store.users_by_ids(ids)]
        path = "/federation/brig/get-users-by-ids"
        answer = await self.remote.call(domain, "brig", "get-users-by-ids", list(ids), request_id)
        try:
            items = json_list(answer, "the answer", maximum=len(ids))
        except APIError as e:
            raise unexpected_body(domain, path, e.message) from None
        profiles = [remote_profile(p, domain, path) for p in items]
        for p in profiles:
            if p["qualified_id"]["id"] not in ids:
                raise unexpected_body(domain, path, f"a profile of {p['qualified_id']['id']}, which was not asked for")
        return profiles

    @deferred
    async def claim_bundle(self, user: QualifiedId, request_id: str) -> Dict[str, Any]:
        """A prekey bundle of C{user}: claimed here, or from their backend's C{claim-prekey-bundle}."""
        if user.domain == self.backend_domain:
            return await self.local_bundle(user.id)
        path = "/federation/brig/claim-prekey-bundle"
        answer = await self.remote.call(user.domain, "brig", "claim-prekey-bundle", {"user": user.id}, request_id)
        try:
            bundle = prekey_bundle(answer)
        except APIError as e:
            raise unexpected_body(user.domain, path, e.message) from None
        if bundle["user"] != user.id:
            raise unexpected_body(user.domain, path, f"the bundle of {bundle['user']}, not of {user.id}")
        return bundle


def remote_profile(value: Any, domain: str, path: str) -> Dict[str, Any]:
    """
    A profile from C{domain}'s brig, checked: a user of another backend than
    the one that answered is refused, as anything not shaped like a profile.
    """
    try:
        profile = json_object(value, "a profile", required=("qualified_id", "handle", "name"), strict=False)
        qid = QualifiedId.from_json(profile["qualified_id"], "qualified_id")
        result = {
            "qualified_id": qid.to_json(),
            "handle": handle(profile["handle"], "handle"),
            "name": text(profile["name"], "name", maximum=MAX_NAME),
        }
    except APIError as e:
        raise unexpected_body(domain, path, e.message) from None
    if qid.domain != domain:
        raise unexpected_body(domain, path, f"a profile of a user of {qid.domain}: {domain} does not own it")
    return result


def prekey_bundle(value: Any) -> Dict[str, Any]:
    """A prekey bundle as a remote brig answers it, checked and rebuilt."""
    bundle = json_object(value, "the bundle", required=("user", "clients"), strict=False)
    clients = []
    for i, item in enumerate(json_list(bundle["clients"], "clients", maximum=MAX_CLIENTS)):
        where = f"clients[{i}]"
        client = json_object(item, where, required=("client", "prekey"), strict=False)
        client_id = client["client"]
        if not isinstance(client_id, str) or not CLIENT_ID.fullmatch(client_id):
            raise APIError(400, "bad-request", f"{where}.client is not a client id (1 to 16 hex digits)")
        prekey = json_object(client["prekey"], f"{where}.prekey", required=("id", "key"), strict=False)
        key_id = prekey["id"]
        if not isinstance(key_id, int) or isinstance(key_id, bool) or not 0 <= key_id <= LAST_RESORT_KEY_ID:
            raise APIError(400, "bad-request", f"{where}.prekey.id is not a prekey id (0 to 65535)")
        key = text(prekey["key"], f"{where}.prekey.key", maximum=MAX_KEY)
        try:
            base64.b64decode(key, validate=True)
        except ValueError:
            raise APIError(400, "bad-request", f"{where}.prekey.key is not base64") from None
        clients.append({"client": client_id, "prekey": {"id": key_id, "key": key}})
    return {"user": uuid_id(bundle["user"], "user"), "clients": clients}
