"""
The Matrix federation routes, mounted when the authenticator is
C{matrix-signature}:

 - inward C{/_matrix/federation/...} (any method, the query kept): the
   X-Matrix signature authenticates the origin server (which proves its own
   name: no discovery-based origin check), every authorizer runs (e.g.
   C{allow-list} over server names), and the component C{[components.matrix]}
   answers; transactions (C{PUT .../send/{txnId}}) go through
   L{fedserver_matrix.transactions};
 - outward C{/_matrix/federation/...} for the homeserver behind fedserver:
   the same request with the header C{X-Matrix-Destination: SERVER_NAME};
   fedserver authorizes, discovers, signs and sends it, and answers with the
   remote's answer as it is.

Errors are Matrix errors (L{fedserver_matrix.errors}).
"""

from __future__ import annotations

import re
from typing import Any, List, Tuple

from twisted.internet.defer import Deferred
from twisted.web import resource, server

from fedserver.errors import FederationError
from fedserver.hookspecs import hookimpl
from fedserver.inward import headers_of
from fedserver.pipeline import check_json
from fedserver.tls import peer_certificate
from fedserver.values import FederatedCall, InboundRequest, OutboundRequest, Peer, Response
from fedserver.web import body_of, refuse, request_id_from, serve
from fedserver_matrix.errors import matrix_error
from fedserver_matrix.keyserver import KeyServer
from fedserver_matrix.transactions import Transactions

#: C{PUT /_matrix/federation/v1/send/{txnId}}
_TRANSACTION = re.compile(rb"/_matrix/federation/v1/send/([^/]+)")
#: what a route name may be made of (the path segment after the version)
_SEGMENT = re.compile(r"[A-Za-z0-9_.-]+")

DESTINATION_HEADER = b"x-matrix-destination"
#: headers of a homeserver's outbound request that go to the remote
_PASSED_ON = ("content-type",)


def _split(request: server.Request) -> Tuple[str, str]:
    path, _, query = request.uri.partition(b"?")
    return path.decode("latin-1"), query.decode("latin-1")


def _route_name(path: str) -> str:
    # /_matrix/federation/v1/send/txn -> "send"
    parts = path.split("/")
    name = parts[4] if len(parts) > 4 else ""
    return name if _SEGMENT.fullmatch(name) else "-"


class MatrixRoute(resource.Resource):
    """Common ground of the inward and outward Matrix routes."""

    isLeaf = True

    def __init__(self, context: Any, server_name: str) -> None:
        super().__init__()
        self.context = context
        self.server_name = server_name
        limits = context.config.limits
        self.max_body_bytes = limits.max_body_bytes
        self.deadline = limits.request_timeout + limits.component_timeout

    def render_error(self, error: FederationError) -> Response:
        return matrix_error(error)

    def _start(self, request: server.Request, request_id: str) -> Tuple[str, str, bytes]:
        path, query = _split(request)
        if not path.startswith("/_matrix/federation/"):
            raise FederationError(f"{path} is not a federation endpoint", "invalid-endpoint")
        body = body_of(request, self.max_body_bytes)
        if body:
            check_json(body, "the request body")
        return path, query, body

    def _serve(self, request: server.Request, work: Any, describe: str, request_id: str) -> int:
        # of the homeserver's (or the remote's) headers, only what Matrix defines passes
        return serve(request, work, describe=describe, request_id=request_id, only=("content-type", "retry-after"),
                     deadline=self.deadline, clock=self.context.reactor, render_error=matrix_error)


class MatrixInward(MatrixRoute):
    """C{/_matrix/federation/...} on the inward listener."""

    def __init__(self, context: Any, server_name: str, transactions: Transactions) -> None:
        super().__init__(context, server_name)
        self.transactions = transactions

    def render(self, request: server.Request) -> int:
        request_id = request_id_from(request, b"request-id")
        try:
            path, query, body = self._start(request, request_id)
        except FederationError as e:
            return refuse(request, e, request_id, matrix_error)
        inbound = InboundRequest(
            method=request.method.decode("ascii", "replace"), path=path, query=query,
            headers=headers_of(request), body=body, tls=peer_certificate(request.transport),
        )
        return self._serve(
            request, lambda: Deferred.fromCoroutine(self._handle(inbound, request_id)),
            f"matrix inward {inbound.method} {path[:120]}", request_id,
        )

    async def _handle(self, inbound: InboundRequest, request_id: str) -> Response:
        # the pipeline authenticates, applies the peer's limits and counts the call
        rpc = _route_name(inbound.path)
        return await self.context.pipeline.handle_inbound(
            inbound, "matrix", rpc, request_id,
            serve=lambda peer: Deferred.fromCoroutine(self._serve_peer(inbound, rpc, request_id, peer)),
        )

    async def _serve_peer(self, inbound: InboundRequest, rpc: str, request_id: str, peer: Peer) -> Response:
        pipeline = self.context.pipeline
        call = FederatedCall(
            origin_domain=peer.claimed_domain, target_domain=self.server_name, component="matrix",
            rpc=rpc, method=inbound.method, headers=inbound.headers, body=inbound.body,
            request_id=request_id, peer=peer, path=inbound.path, query=inbound.query,
        )
        await pipeline.authorize_inbound(peer, call)
        component = pipeline.components.get("matrix")
        if component is None:
            raise FederationError("this server has no [components.matrix] to answer federation requests",
                                  "unknown-component")
        transaction = _TRANSACTION.fullmatch(inbound.path.encode("latin-1"))
        if transaction is not None and inbound.method == "PUT":
            txn_id = transaction.group(1).decode("latin-1")
            return await self.transactions.handle(peer.claimed_domain, txn_id, inbound.body,
                                                  lambda: component.handle(call))
        return await component.handle(call)


class MatrixOutward(MatrixRoute):
    """C{/_matrix/federation/...} on the outward listener, for the homeserver."""

    def render(self, request: server.Request) -> int:
        request_id = request_id_from(request, b"request-id")
        try:
            path, query, body = self._start(request, request_id)
            destinations = request.requestHeaders.getRawHeaders(DESTINATION_HEADER) or []
            if len(destinations) != 1:
                missing = FederationError(
                    "say which server the request is for in one X-Matrix-Destination header",
                    "invalid-endpoint",
                )
                missing.errcode, missing.matrix_status = "M_MISSING_PARAM", 400  # type: ignore[attr-defined]
                raise missing
            destination = destinations[0].decode("latin-1").strip().lower()
        except FederationError as e:
            return refuse(request, e, request_id, matrix_error)
        method = request.method.decode("ascii", "replace")
        headers: List[Tuple[str, str]] = [(n, v) for n, v in headers_of(request) if n.lower() in _PASSED_ON]
        headers.append(("Request-Id", request_id))
        outbound = OutboundRequest(destination=destination, method=method,
                                   path=path + (f"?{query}" if query else ""), headers=headers, body=body)
        call = FederatedCall(
            origin_domain=self.server_name, target_domain=destination, component="matrix",
            rpc=_route_name(path), method=method, headers=headers, body=body, request_id=request_id,
            path=path, query=query,
        )
        return self._serve(
            request, lambda: Deferred.fromCoroutine(self._send(call, outbound)),
            f"matrix outward {method} {path[:120]} to {destination}", request_id,
        )

    async def _send(self, call: FederatedCall, outbound: OutboundRequest) -> Response:
        pipeline = self.context.pipeline
        await pipeline.authorize_outbound(call.target_domain, call)
        return await pipeline.send(outbound)


class MatrixRoot(resource.Resource):
    """C{/_matrix/...}: the federation routes, and on the inward listener the key server."""

    def __init__(self, federation: MatrixRoute, keys: Any = None) -> None:
        super().__init__()
        self.putChild(b"federation", federation)
        if keys is not None:
            self.putChild(b"key", keys)

    def render_error(self, error: FederationError) -> Response:
        return matrix_error(error)

    def getChild(self, path: bytes, request: server.Request) -> resource.IResource:
        return _MatrixNotFound()

    def render(self, request: server.Request) -> int:
        # /_matrix itself: as any other path it does not serve (not Twisted's HTML 405 or 501)
        return _MatrixNotFound().render(request)


class _MatrixNotFound(resource.Resource):
    isLeaf = True

    def render(self, request: server.Request) -> int:
        error = FederationError(f"{request.path.decode('latin-1')[:200]} is not served here", "invalid-endpoint")
        return refuse(request, error, request_id_from(request, b"request-id"), matrix_error)


def server_name_of(context: Any) -> str:
    """Our Matrix server name: the authenticator's, else the backend domain."""
    return str(getattr(context.authenticator, "server_name", None) or context.backend_domain)


def _matrix_configured(context: Any) -> bool:
    return bool(context.config.authenticator.plugin == "matrix-signature")


@hookimpl
def fedserver_resources(context: Any) -> List[Tuple[str, bytes, resource.IResource]]:
    if not _matrix_configured(context):
        return []
    name = server_name_of(context)
    # a transaction's lease outlasts the route's deadline (MatrixRoute.deadline)
    limits = context.config.limits
    transactions = Transactions(context.storage, context.reactor,
                                lease_seconds=limits.request_timeout + limits.component_timeout + 30)
    context.plugin_state["matrix.transactions"] = transactions
    return [
        ("inward", b"_matrix", MatrixRoot(MatrixInward(context, name, transactions),
                                          KeyServer(context.authenticator))),
        ("outward", b"_matrix", MatrixRoot(MatrixOutward(context, name))),
    ]


@hookimpl
def fedserver_services(context: Any) -> List[Any]:
    transactions = context.plugin_state.get("matrix.transactions")
    return [transactions.pruning_service()] if transactions is not None else []


__all__ = ["MatrixInward", "MatrixOutward", "MatrixRoot"]
