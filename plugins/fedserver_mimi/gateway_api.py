"""
The MIMI gateway's internal interface: the HTTP API application servers
use, under C{/mimi/} on the outward listener (which is never exposed
publicly unless the operator says so).  Every route but the OpenAPI
description needs C{Authorization: Bearer TOKEN}: an application's token
acts for that application only (its C{appId} must be the one in the path),
and the admin token lists and creates applications.

The routes follow the MIMI gateway draft, with queries in the query string
rather than in GET bodies; L{fedserver_mimi.openapi} describes them all.
"""

from __future__ import annotations

import secrets
from typing import Any, Dict, Mapping, Optional, Sequence

from twisted.internet.defer import Deferred
from twisted.web import server

from fedserver.jsonapi import (
    APIError,
    JSONAPIResource,
    Router,
    bad_request,
    boolean,
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
from fedserver_mimi.gateway import Gateway, client_json, group_id_bytes
from fedserver_mimi.gateway_store import App
from fedserver_mimi.openapi import openapi_document

#: the first path segment the API is mounted under
SEGMENT = "mimi"
#: applications' names
MAX_APP_NAME = 128


class Caller:
    """Who made a request: an application, or the admin (C{app} is C{None})."""

    def __init__(self, app: Optional[App], admin: bool) -> None:
        self.app = app
        self.admin = admin


class GatewayAPI:
    """The internal interface over a L{Gateway}; L{handle} is the whole API."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self.document = openapi_document()
        r = self.router = Router(SEGMENT, "the MIMI gateway API")
        clients = ("apps", "{}", "clients")
        client = (*clients, "{}")
        groups = ("apps", "{}", "groups")
        group = (*groups, "{}")
        r.add("GET", ("openapi.json",), self._openapi)
        r.add("GET", ("apps",), self._list_apps, ("domain",))
        r.add("POST", ("apps",), self._create_app)
        r.add("GET", ("apps", "{}"), self._app)
        r.add("POST", clients, self._register)
        r.add("GET", clients, self._list_clients, ("tag", "domain", "app"))
        r.add("GET", client, self._client)
        r.add("PATCH", client, self._patch)
        r.add("DELETE", client, self._delete)
        r.add("POST", (*client, "queues"), self._create_queue)
        r.add("GET", (*client, "queues"), self._queues)
        r.add("PATCH", (*client, "queues", "{}"), self._fill_queue)
        r.add("GET", (*client, "keyPackage"), self._claim,
              ("protocolVersion", "cipherSuite", "appLabel", "receiverClientId", "domain", "app"))
        r.add("GET", (*client, "welcome-msgs"), self._welcomes, ("since",))
        r.add("PUT", groups, self._create_group)
        r.add("GET", (*group, "group-info"), self._group_info, ("domain", "app"))
        r.add("PUT", (*group, "proposals"), self._add_proposal)
        r.add("GET", (*group, "proposals"), self._proposals, ("start",))
        r.add("PUT", (*group, "epochs"), self._commit)
        r.add("GET", (*group, "control-msgs"), self._control_messages, ("startEpochId", "endEpochId"))

    def handle(self, request: server.Request, body: bytes, request_id: str) -> Deferred[Response]:
        """Answer one request (for L{JSONAPIResource})."""
        method = request.method.decode("latin-1")
        path = request.path.decode("latin-1")
        authorization = request.getHeader(b"authorization")
        return Deferred.fromCoroutine(
            self._handle(method, path, request.args or {}, authorization, body, request_id)
        )

    async def _handle(
        self, method: str, path: str, args: Mapping[bytes, Sequence[bytes]], authorization: Optional[bytes],
        body: bytes, request_id: str,
    ) -> Response:
        handler, params, query_names = self.router.route(method, path)
        query = query_params(args, query_names)
        if handler == self._openapi:
            return await handler()
        # parsed here, inside the coroutine: a refusal raised before it would be answered 500 internal-error
        token = _bearer(authorization)
        app, admin = await self.gateway.authenticate(token)
        caller = Caller(app, admin)
        if params:
            # every route with parameters starts with /apps/{appId}: only that application may use it
            app_id = uuid_id(params[0], "the application id")
            if app is None or app.id != app_id:
                raise APIError(403, "access-denied", f"this token does not act for application {app_id}")
        return await handler(caller, *params, query=query, body=body, request_id=request_id)

    def _body(self, body: bytes) -> Any:
        return parse_json(body, "the request body")

    async def _openapi(self) -> Response:
        return json_response(self.document)

    # applications

    async def _list_apps(self, caller: Caller, *, query: Dict[str, str], body: bytes, request_id: str) -> Response:
        if "domain" in query and query["domain"] != self.gateway.backend_domain:
            if caller.app is None:
                raise APIError(403, "access-denied", "listing another gateway's applications needs an application's "
                                                     "token: the request goes out for that application")
            where = domain(query["domain"], "domain")
            # rebuilt field by field: the peer's answer is not passed on as it came
            return json_response(await self.gateway.remote_apps(caller.app, where, request_id))
        if caller.admin:
            apps = await self.gateway.store.apps()
        else:
            assert caller.app is not None
            apps = [caller.app]
        return json_response({"apps": [self.gateway.app_json(a) for a in apps]})

    async def _create_app(self, caller: Caller, *, query: Dict[str, str], body: bytes, request_id: str) -> Response:
        if not caller.admin:
            raise APIError(403, "access-denied", "creating applications needs the admin token")
        request = json_object(self._body(body), "the request body", required=("name", "identityProvider"),
                              optional=("federate",))
        name = text(request["name"], "name", maximum=MAX_APP_NAME)
        provider = text(request["identityProvider"], "identityProvider", maximum=128)
        federate = boolean(request.get("federate", True), "federate")
        answer = await self.gateway.create_app(name, provider, federate, secrets.token_urlsafe(32))
        return json_response(answer, 201)

    async def _app(self, caller: Caller, app_id: str, *, query: Dict[str, str], body: bytes,
                   request_id: str) -> Response:
        assert caller.app is not None
        self.gateway.provider_of(caller.app)  # 503 identity-provider-missing: the application cannot work
        return json_response(self.gateway.app_json(caller.app))

    # clients

    def _app_of(self, caller: Caller) -> App:
        assert caller.app is not None
        return caller.app

    def _target(self, query: Dict[str, str]) -> Dict[str, Any]:
        where = domain(query["domain"], "domain") if "domain" in query else None
        app_id = uuid_id(query["app"], "app") if "app" in query else None
        return {"where": where, "app_id": app_id}

    async def _register(self, caller: Caller, app_id: str, *, query: Dict[str, str], body: bytes,
                        request_id: str) -> Response:
        return json_response(await self.gateway.register_client(self._app_of(caller), self._body(body)), 201)

    async def _list_clients(self, caller: Caller, app_id: str, *, query: Dict[str, str], body: bytes,
                            request_id: str) -> Response:
        if "tag" not in query:
            raise bad_request("listing clients needs ?tag=TAG")
        tag = text(query["tag"], "tag", maximum=self.gateway.limits.tag_length)
        return json_response(
            await self.gateway.list_clients(self._app_of(caller), tag, request_id=request_id, **self._target(query))
        )

    async def _client(self, caller: Caller, app_id: str, client_id: str, *, query: Dict[str, str], body: bytes,
                      request_id: str) -> Response:
        client = await self.gateway.store.client(app_id, uuid_id(client_id, "the client id"))
        return json_response(client_json(client))

    async def _patch(self, caller: Caller, app_id: str, client_id: str, *, query: Dict[str, str], body: bytes,
                     request_id: str) -> Response:
        client_id = uuid_id(client_id, "the client id")
        return json_response(await self.gateway.patch_client(self._app_of(caller), client_id, self._body(body)))

    async def _delete(self, caller: Caller, app_id: str, client_id: str, *, query: Dict[str, str], body: bytes,
                      request_id: str) -> Response:
        await self.gateway.store.delete_client(app_id, uuid_id(client_id, "the client id"))
        return json_response({})

    # key queues

    async def _create_queue(self, caller: Caller, app_id: str, client_id: str, *, query: Dict[str, str],
                            body: bytes, request_id: str) -> Response:
        client_id = uuid_id(client_id, "the client id")
        return json_response(await self.gateway.create_queue(self._app_of(caller), client_id, self._body(body)), 201)

    async def _queues(self, caller: Caller, app_id: str, client_id: str, *, query: Dict[str, str], body: bytes,
                      request_id: str) -> Response:
        return json_response(await self.gateway.queues(self._app_of(caller), uuid_id(client_id, "the client id")))

    async def _fill_queue(self, caller: Caller, app_id: str, client_id: str, queue_id: str, *,
                          query: Dict[str, str], body: bytes, request_id: str) -> Response:
        client_id = uuid_id(client_id, "the client id")
        queue_id = uuid_id(queue_id, "the queue id")
        return json_response(
            await self.gateway.fill_queue(self._app_of(caller), client_id, queue_id, self._body(body))
        )

    async def _claim(self, caller: Caller, app_id: str, client_id: str, *, query: Dict[str, str], body: bytes,
                     request_id: str) -> Response:
        client_id = uuid_id(client_id, "the client id")
        version = query_integer(query.get("protocolVersion"), "protocolVersion", minimum=1, maximum=0xFFFF,
                                default=None)
        suite = query_integer(query.get("cipherSuite"), "cipherSuite", minimum=1, maximum=0xFFFF, default=None)
        label = self.gateway.app_label(query.get("appLabel", ""), "appLabel")
        if "receiverClientId" not in query:
            raise bad_request("claiming a KeyPackage needs ?receiverClientId=ID, the client that will use it")
        receiver = uuid_id(query["receiverClientId"], "receiverClientId")
        return json_response(
            await self.gateway.claim(
                self._app_of(caller), client_id, version, suite, label, receiver, request_id=request_id,
                **self._target(query),
            )
        )

    async def _welcomes(self, caller: Caller, app_id: str, client_id: str, *, query: Dict[str, str], body: bytes,
                        request_id: str) -> Response:
        since = query_integer(query.get("since"), "since", minimum=0, maximum=2**62, default=0)
        return json_response(
            await self.gateway.welcomes(self._app_of(caller), uuid_id(client_id, "the client id"), since)
        )

    # groups

    def _group_id(self, group_id: str) -> str:
        group_id_bytes(group_id)
        return group_id

    async def _create_group(self, caller: Caller, app_id: str, *, query: Dict[str, str], body: bytes,
                            request_id: str) -> Response:
        return json_response(await self.gateway.create_group(self._app_of(caller), self._body(body)), 201)

    async def _group_info(self, caller: Caller, app_id: str, group_id: str, *, query: Dict[str, str], body: bytes,
                          request_id: str) -> Response:
        return json_response(
            await self.gateway.group_info(
                self._app_of(caller), self._group_id(group_id), request_id=request_id, **self._target(query)
            )
        )

    async def _add_proposal(self, caller: Caller, app_id: str, group_id: str, *, query: Dict[str, str],
                            body: bytes, request_id: str) -> Response:
        group_id = self._group_id(group_id)
        return json_response(await self.gateway.add_proposal(self._app_of(caller), group_id, self._body(body)), 201)

    async def _proposals(self, caller: Caller, app_id: str, group_id: str, *, query: Dict[str, str], body: bytes,
                         request_id: str) -> Response:
        start = query_integer(query.get("start"), "start", minimum=0, maximum=2**31 - 1, default=0)
        return json_response(await self.gateway.proposals(self._app_of(caller), self._group_id(group_id), start))

    async def _commit(self, caller: Caller, app_id: str, group_id: str, *, query: Dict[str, str], body: bytes,
                      request_id: str) -> Response:
        group_id = self._group_id(group_id)
        return json_response(
            await self.gateway.commit(self._app_of(caller), group_id, self._body(body), request_id), 201
        )

    async def _control_messages(self, caller: Caller, app_id: str, group_id: str, *, query: Dict[str, str],
                                body: bytes, request_id: str) -> Response:
        start = query_integer(query.get("startEpochId"), "startEpochId", minimum=0, maximum=2**63 - 1, default=0)
        end = None
        if "endEpochId" in query:
            end = query_integer(query["endEpochId"], "endEpochId", minimum=0, maximum=2**63 - 1, default=None)
            if end < start:
                raise bad_request(f"endEpochId ({end}) is before startEpochId ({start})")
        return json_response(
            await self.gateway.control_messages(self._app_of(caller), self._group_id(group_id), start, end)
        )


def _bearer(header: Optional[bytes]) -> Optional[str]:
    if header is None:
        return None
    scheme, _, token = header.partition(b" ")
    if scheme.lower() != b"bearer" or not token.strip():
        raise APIError(401, "missing-token", "the Authorization header must be 'Bearer TOKEN'")
    try:
        return token.strip().decode("ascii")
    except UnicodeDecodeError:
        raise APIError(401, "invalid-token", "the bearer token is not ASCII") from None


def api_resource(gateway: Gateway, *, max_body_bytes: int) -> JSONAPIResource:
    """The internal interface as a Twisted resource for C{/mimi/}."""
    api = GatewayAPI(gateway)
    return JSONAPIResource("MIMI gateway API", api.handle, max_body_bytes=max_body_bytes)
