"""
The inward listener's federation route: C{POST /federation/{component}/{rpc}}
from remote backends.

The shape of the request is checked before anything else (a wrong method, a
query string or a name outside C{[A-Za-z0-9_-]+} is C{invalid-endpoint});
then the pipeline authenticates, validates the origin, authorizes and
dispatches.  Only the component's status, body and C{Content-Type} go back.
"""

from __future__ import annotations

from typing import Tuple

from twisted.web import server

from fedserver.errors import FederationError
from fedserver.pipeline import Pipeline
from fedserver.tls import peer_certificate
from fedserver.values import InboundRequest
from fedserver.web import NAME, RouteResource, require_post, serve


def parse_route(request: server.Request, prefix: bytes, count: int) -> Tuple[str, ...]:
    """
    Check that C{request} is a C{POST} to C{prefix} followed by exactly
    C{count} name segments, with no query string; return the names.
    """
    require_post(request)
    path = request.path
    if not path.startswith(prefix):
        raise FederationError("no such federation endpoint", "invalid-endpoint")
    names = path[len(prefix):].split(b"/")
    if len(names) != count or not all(NAME.fullmatch(n) for n in names):
        raise FederationError(
            "the path must be "
            + prefix.decode()
            + "/".join(["{name}"] * count)
            + " with names of ASCII letters, digits, '_' and '-' only",
            "invalid-endpoint",
        )
    return tuple(n.decode("ascii") for n in names)


def headers_of(request: server.Request) -> Tuple[Tuple[str, str], ...]:
    """The request's headers as decoded pairs, in order."""
    return tuple(
        (name.decode("latin-1"), value.decode("latin-1"))
        for name, values in request.requestHeaders.getAllRawHeaders()
        for value in values
    )


class InwardFederationResource(RouteResource):
    """C{/federation/...} on the inward listener."""

    pipeline: Pipeline
    request_id_header = b"request-id"

    def parse(self, request: server.Request) -> Tuple[str, ...]:
        return parse_route(request, b"/federation/", 2)

    def dispatch(self, request: server.Request, names: Tuple[str, ...], body: bytes, request_id: str) -> int:
        component, rpc = names
        inbound = InboundRequest(
            method="POST",
            path=request.path.decode("ascii"),
            query="",
            headers=headers_of(request),
            body=body,
            tls=peer_certificate(request.transport),
        )
        origin = inbound.header("Wire-Origin-Domain") or "?"
        return serve(
            request,
            lambda: self.pipeline.handle_inbound(inbound, component, rpc, request_id),
            describe=f"inward {component}/{rpc} from {origin}",
            request_id=request_id,
            only=("content-type",),
            deadline=self.deadline,
            clock=self.clock,
        )
