"""
Component C{http-forward}: hand federated calls to a local HTTP service, as
Wire's federator hands them to brig or galley.

    [components.brig]
    plugin = "http-forward"
    url = "http://127.0.0.1:8081"
    timeout = 10            # seconds; default [limits] component_timeout

A call for RPC C{r} becomes C{POST {url}/federation/r} with the body as it
came, C{Content-Type: application/json}, C{Wire-Origin-Domain} (the validated
origin), C{Request-Id} and any C{X-Wire-API-Version}.  The service's status
and body go back to the peer with its C{Content-Type} only.  When the service
cannot be reached or does not answer in time the peer gets
C{component-unavailable}.
"""

from __future__ import annotations

from typing import Any, Callable
from urllib.parse import urlsplit

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.ssl import optionsForClientTLS
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from fedserver.client import TLSClientEndpoint, bounded, was_cancelled
from fedserver.config import Options
from fedserver.context import Context
from fedserver.errors import FederationError
from fedserver.hookspecs import hookimpl
from fedserver.http11 import BodyTooLarge, HTTP11Pool, encode_request
from fedserver.interfaces import IComponentHandler
from fedserver.values import FederatedCall, Response

log = Logger(namespace="fedserver.http_forward")


@implementer(IComponentHandler)
class HTTPForwardComponent:
    """
    @param pool: the L{HTTP11Pool} that connections to local components
        share.
    @param endpoint: makes the endpoint of a new connection to the service.
    """

    def __init__(self, name: str, url: str, pool: HTTP11Pool, endpoint: Callable[[], Any], *,
                 timeout: float, reactor: Any) -> None:
        self.name = name
        self.url = url.rstrip("/")
        parts = urlsplit(self.url)
        #: the URL's path, which every request path is put under
        self.prefix = parts.path
        #: the Host header of requests to the service
        self.host = parts.netloc
        self._pool = pool
        self._endpoint = endpoint
        self.timeout = timeout
        self.reactor = reactor

    def handle(self, call: FederatedCall) -> Deferred[Response]:
        headers = [
            ("Content-Type", "application/json"),
            ("Wire-Origin-Domain", call.origin_domain),
            ("Request-Id", call.request_id),
        ]
        version = call.header("X-Wire-API-Version")
        if version is not None:
            headers.append(("X-Wire-API-Version", version))
        data = encode_request("POST", f"{self.prefix}/federation/{call.rpc}", self.host, headers, call.body)
        return self.send(data, call.request_id)

    def send(self, data: bytes, request_id: str, *, expect_body: bool = True) -> Deferred[Response]:
        """
        Send an encoded request to the service within the timeout; fire with
        its status, body and Content-Type, or fail with
        C{component-unavailable} (the details logged under C{request_id}).
        """
        d = self._pool.request(self.url, self._endpoint, data, expect_body=expect_body)
        d.addCallback(_content_type_only)
        bounded(d, self.timeout, self.reactor)
        d.addErrback(self._failed, request_id)
        return d

    def _failed(self, failure: Failure, request_id: str) -> None:
        failure.trap(Exception)
        if failure.check(FederationError) or was_cancelled(failure):
            failure.raiseException()
        if failure.check(BodyTooLarge):
            reason = "its answer is larger than [limits] max_body_bytes"
        elif failure.check(defer.TimeoutError):
            reason = f"no answer within {self.timeout} s"
        else:
            reason = str(failure.value).strip() or type(failure.value).__name__
        # the details are for our log; the peer learns only that it failed
        log.warn("component {name} ({url}) failed: {reason} [request {request_id}]",
                 name=self.name, url=self.url, reason=reason, request_id=request_id)
        raise FederationError(
            f"the component {self.name} is unavailable; the log of this backend has the details "
            f"under request id {request_id}",
            "component-unavailable",
        )


def _content_type_only(response: Response) -> Response:
    return Response(response.code, [("Content-Type", response.header("Content-Type") or "application/json")],
                    response.body)


def service_endpoint(reactor: Any, url: str, connect_timeout: float) -> Callable[[], Any]:
    """New connections to the service at C{url}: TCP, or TLS for https (verified against its host)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    port = parts.port or (443 if parts.scheme == "https" else 80)
    tls = optionsForClientTLS(host) if parts.scheme == "https" else None

    def endpoint() -> Any:
        tcp = HostnameEndpoint(reactor, host, port, timeout=connect_timeout)
        return TLSClientEndpoint(tls, tcp, reactor) if tls is not None else tcp

    return endpoint


def make_http_forward(options: Options, context: Context) -> HTTPForwardComponent:
    url = options.get_str("url")
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - a bad port raises here rather than on every call
    except ValueError as e:
        raise options.error("url", f"{url!r} is not a valid URL: {e}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.query or parts.fragment:
        raise options.error("url", f"must be an http:// or https:// URL without query, not {url!r}")
    if parts.username is not None or parts.password is not None:
        raise options.error("url", "must not carry credentials (user:password@)")
    if not url.isascii() or any(c.isspace() for c in url):
        raise options.error("url", f"{url!r} must be ASCII without spaces: percent-encode the path, "
                            "use the IDNA form of the host")
    limits = context.config.limits
    timeout = options.get_number("timeout", limits.component_timeout, minimum=0.1, maximum=3600)
    name = options.name or options.path
    return HTTPForwardComponent(
        name, url, context.component_pool, service_endpoint(context.reactor, url, limits.connect_timeout),
        timeout=timeout, reactor=context.reactor,
    )


@hookimpl
def fedserver_component_plugins() -> dict:
    return {"http-forward": make_http_forward}
