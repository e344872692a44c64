"""
The outward listener's route for local components:
C{POST /rpc/{domain}/{component}/{rpc}}.

The call goes through the pipeline to C{domain}'s component; a 2xx answer
comes back with its body and C{Content-Type}, anything else as
C{federation-remote-error} (533) with the remote's error under C{inner}.
"""

from __future__ import annotations

from typing import Tuple

from twisted.internet.defer import Deferred
from twisted.web import server

from fedserver.config import is_domain_name
from fedserver.errors import FederationError
from fedserver.inward import headers_of
from fedserver.pipeline import Pipeline, remote_error
from fedserver.values import FederatedCall, Response
from fedserver.web import NAME, RouteResource, require_post, serve


class OutwardRPCResource(RouteResource):
    """C{/rpc/...} on the outward listener."""

    pipeline: Pipeline
    request_id_header = b"wire-origin-request-id"

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

        def call_remote() -> Deferred[Response]:
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

    def parse(self, request: server.Request) -> Tuple[str, ...]:
        require_post(request)
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


def _relay_answer(response: Response, domain: str, path: str) -> Response:
    if 200 <= response.code < 300:
        return response
    raise remote_error(response, domain, path)
