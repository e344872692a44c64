"""
The outward listener's route for local components:
C{POST /rpc/{domain}/{component}/{rpc}}.

The call goes through the pipeline to C{domain}'s component; a 2xx answer
comes back with its body and C{Content-Type}, anything else as
C{federation-remote-error} (533) with the remote's error under C{inner}.

With C{Fedserver-Delivery: queued}, a one-way call is checked (JSON body,
every authorizer) and put in the durable outbound queue instead
(L{fedserver.outbound_queue}); the answer, once it is committed to the
store, is C{202 {"queued": ID}}.  The queue delivers it in order, retrying
until the remote answers, with C{Fedserver-Idempotency-Key} (the caller's,
if it sent one, else the item's id) so that the remote runs it once.
C{Fedserver-Delivery: direct} is the default.
"""

from __future__ import annotations

import json
from typing import Any, Optional, Tuple

from twisted.internet.defer import Deferred
from twisted.web import server

from fedserver.config import is_domain_name
from fedserver.errors import FederationError
from fedserver.idempotency import IDEMPOTENCY_HEADER
from fedserver.inward import headers_of
from fedserver.pipeline import Pipeline, check_json, remote_error
from fedserver.values import FederatedCall, Response
from fedserver.web import NAME, RouteResource, require_post, serve


class OutwardRPCResource(RouteResource):
    """C{/rpc/...} on the outward listener."""

    pipeline: Pipeline
    request_id_header = b"wire-origin-request-id"

    def __init__(self, pipeline: Any, *, queue: Any = None, **kwargs: Any) -> None:
        super().__init__(pipeline, **kwargs)
        #: the L{fedserver.outbound_queue.OutboundQueue} for queued calls, if any
        self.queue = queue

    def dispatch(self, request: server.Request, names: Tuple[str, ...], body: bytes, request_id: str) -> int:
        domain, component, rpc = names
        call = FederatedCall(
            origin_domain=self.pipeline.backend_domain,
            target_domain=domain,
            component=component,
            rpc=rpc,
            method="POST",
            headers=headers_of(request),
            body=body,
            request_id=request_id,
        )
        path = f"/federation/{component}/{rpc}"
        delivery = _delivery(request)

        def call_remote() -> Deferred[Response]:
            if delivery == "queued":
                return Deferred.fromCoroutine(self._enqueue(call))
            d = self.pipeline.call_remote(call)
            d.addCallback(_relay_answer, domain, path)
            return d

        def with_context(error: FederationError) -> FederationError:
            # as wire-server: the backend domain called and the path, whatever
            # step failed (a connection error names the infrastructure domain)
            error.data = {"type": "federation", "domain": domain, "path": path}
            return error

        return serve(
            request,
            call_remote,
            describe=f"outward {component}/{rpc} to {domain}",
            request_id=request_id,
            only=("content-type",),
            on_error=with_context,
            deadline=self.deadline,
            clock=self.clock,
        )

    async def _enqueue(self, call: FederatedCall) -> Response:
        if self.queue is None:
            raise FederationError("this fedserver has no outbound queue", "federation-not-available")
        check_json(call.body, "the request body")
        await self.pipeline.authorize_outbound(call.target_domain, call)
        item_id = await self.queue.enqueue(
            call.target_domain, call.component, call.rpc, call.body, headers=call.headers,
            idempotency_key=call.header(IDEMPOTENCY_HEADER), request_id=call.request_id,
        )
        body = json.dumps({"queued": item_id}).encode()
        return Response(202, [("Content-Type", "application/json")], body)

    def parse(self, request: server.Request) -> Tuple[str, ...]:
        require_post(request)
        _delivery(request)
        parts = request.path.split(b"/")
        # ["", "rpc", domain, component, rpc]
        if len(parts) != 5 or parts[1] != b"rpc":
            raise FederationError(
                "the path must be /rpc/{domain}/{component}/{rpc}", "invalid-endpoint"
            )
        domain, component, rpc = parts[2:]
        if not is_domain_name(domain.decode("latin-1")):
            raise FederationError(
                f"{domain.decode('latin-1')!r} is not a lower-case domain name", "invalid-endpoint"
            )
        if not (NAME.fullmatch(component) and NAME.fullmatch(rpc)):
            raise FederationError(
                "component and RPC names are ASCII letters, digits, '_' and '-' only",
                "invalid-endpoint",
            )
        return domain.decode("ascii"), component.decode("ascii"), rpc.decode("ascii")


def _delivery(request: server.Request) -> str:
    """The C{Fedserver-Delivery} asked for: C{direct} (the default) or C{queued}."""
    value: Optional[bytes] = request.getHeader(b"fedserver-delivery")
    if value is None:
        return "direct"
    mode = value.strip().lower()
    if mode not in (b"direct", b"queued"):
        raise FederationError(
            f"Fedserver-Delivery must be direct or queued, not {value.decode('latin-1')[:40]!r}",
            "invalid-endpoint",
        )
    return mode.decode()


def _relay_answer(response: Response, domain: str, path: str) -> Response:
    if 200 <= response.code < 300:
        return response
    raise remote_error(response, domain, path)
