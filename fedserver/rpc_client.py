"""
Calling another backend's component from inside a plugin.

Calls go in process through the configured L{fedserver.pipeline.Pipeline}
(C{call_remote}), so they pass the same authorizers, discovery and
authentication as any call that arrives on the outward listener.  A non-2xx
answer becomes C{533 federation-remote-error} with the remote's error under
C{inner}, exactly as the outward listener reports it; every labelled error
names the domain called and the route in C{data}.
"""

from __future__ import annotations

import json
from typing import Any, Callable

from twisted.internet.defer import Deferred

from fedserver.errors import FederationError
from fedserver.jsonapi import APIError
from fedserver.pipeline import remote_error
from fedserver.values import FederatedCall


def unexpected_body(domain: str, path: str, reason: str) -> APIError:
    """
    C{533 federation-unexpected-body}: the remote answered 2xx with a body
    that is not what the RPC returns (wire-server's label for this).
    """
    return APIError(533, "federation-unexpected-body", f"{domain} answered {path} with {reason}")


class RPCClient:
    """
    Sends JSON RPCs from our backend domain to other backends' components.

    @param pipeline: gives the running pipeline (C{context.pipeline}, which
        is set only after every component is built), or C{None}.
    """

    def __init__(self, backend_domain: str, pipeline: Callable[[], Any]) -> None:
        self.backend_domain = backend_domain
        self._pipeline = pipeline

    def call(self, domain: str, component: str, rpc: str, body: Any, request_id: str) -> Deferred[Any]:
        """
        Call C{rpc} of C{component} on backend C{domain} with the JSON
        C{body}; fire with the decoded JSON answer of a 2xx response.

        Fails with a labelled L{FederationError} when the pipeline refuses
        or cannot deliver the call or the remote answers non-2xx, and with
        L{APIError} C{federation-unexpected-body} when a 2xx answer is not
        JSON.
        """
        return Deferred.fromCoroutine(self._call(domain, component, rpc, body, request_id))

    async def _call(self, domain: str, component: str, rpc: str, body: Any, request_id: str) -> Any:
        path = f"/federation/{component}/{rpc}"
        if domain == self.backend_domain:
            raise ValueError(f"{path} for our own domain {domain} is handled locally, not federated")
        pipeline = self._pipeline()
        if pipeline is None:
            raise FederationError(
                "fedserver is still starting: the federation pipeline is not ready",
                "federation-not-available",
            )
        call = FederatedCall(
            origin_domain=self.backend_domain,
            target_domain=domain,
            component=component,
            rpc=rpc,
            method="POST",
            headers=(("Content-Type", "application/json"),),
            body=json.dumps(body).encode("utf-8"),
            request_id=request_id,
        )
        try:
            response = await pipeline.call_remote(call)
        except FederationError as e:
            # as the outward listener: the domain called and the route
            e.data = {"type": "federation", "domain": domain, "path": path}
            raise
        if not 200 <= response.code < 300:
            raise remote_error(response, domain, path)
        try:
            return json.loads(response.body)
        except ValueError:
            raise unexpected_body(domain, path, "a body that is not JSON") from None
