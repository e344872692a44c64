"""
Component C{matrix-http}: the homeserver logic behind fedserver, reached over
HTTP.

    [components.matrix]
    plugin = "matrix-http"
    url = "http://127.0.0.1:8008"
    timeout = 30            # seconds; default [limits] component_timeout

A federation request that fedserver has authenticated and authorized is sent
on as it came (method, path, query and body, Content-Type) to the same path
under C{url}, with C{X-Matrix-Origin} naming the origin server whose
signature verified and C{Request-Id}.  The homeserver's status, body and
Content-Type go back to the peer.
"""

from __future__ import annotations

from typing import Any, Dict

from twisted.internet.defer import Deferred
from zope.interface import implementer

from fedserver.builtin.http_forward import HTTPForwardComponent, make_http_forward
from fedserver.config import Options
from fedserver.hookspecs import hookimpl
from fedserver.http11 import encode_request
from fedserver.interfaces import IComponentHandler
from fedserver.values import FederatedCall, Response

ORIGIN_HEADER = "X-Matrix-Origin"


@implementer(IComponentHandler)
class MatrixHTTPComponent:
    """Sends a verified federation request on to the homeserver."""

    def __init__(self, forward: HTTPForwardComponent) -> None:
        # the connection pool, endpoint, limits and failure handling of http-forward
        self._forward = forward

    def handle(self, call: FederatedCall) -> Deferred[Response]:
        forward = self._forward
        headers = [("Request-Id", call.request_id), (ORIGIN_HEADER, call.origin_domain)]
        content_type = call.header("Content-Type")
        if content_type is not None:
            headers.append(("Content-Type", content_type))
        target = forward.prefix + call.path + (f"?{call.query}" if call.query else "")
        data = encode_request(call.method, target, forward.host, headers, call.body)
        return forward.send(data, call.request_id, expect_body=call.method != "HEAD")


def make_matrix_http(options: Options, context: Any) -> MatrixHTTPComponent:
    return MatrixHTTPComponent(make_http_forward(options, context))


@hookimpl
def fedserver_component_plugins() -> Dict[str, Any]:
    return {"matrix-http": make_matrix_http}


__all__ = ["MatrixHTTPComponent"]
