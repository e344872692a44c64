"""
The outbound HTTP client that talks to remote backends' inward listeners.

One persistent connection pool serves every target.  A connection is made to
the target's host and port and TLS-verified against its infrastructure domain,
which is also the pool key's host: any pooled connection to that domain and
port was verified for that domain and may be reused.  Every request is bounded
in time (connect, then the whole exchange) and in the size of the answer.
Failures become labelled L{FederationError}s:

 - C{federation-connection-refused} (521): nothing answered, or the
   connection broke before an answer;
 - C{federation-tls-error} (525): the TLS handshake failed (for instance, the
   remote certificate does not match the infrastructure domain);
 - C{federation-timeout} (504): no complete answer in time.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List

from OpenSSL import SSL
from service_identity import VerificationError
from twisted.internet import defer, error
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from twisted.web import client as web_client
from zope.interface import implementer

from fedserver.errors import FederationError
from fedserver.http11 import BadAnswer, BodyTooLarge, ConnectionClosed, HTTP11Pool, encode_request
from fedserver.values import OutboundRequest, Response, Target


@implementer(IStreamClientEndpoint)
class TLSClientEndpoint:
    """
    TLS over another endpoint, like Twisted's C{wrapClientTLS}, but with the
    injected reactor as the TLS layer's clock.
    """

    def __init__(self, tls: Any, wrapped: IStreamClientEndpoint, clock: Any) -> None:
        self._tls = tls
        self._wrapped = wrapped
        self._clock = clock

    def connect(self, factory: Any) -> Deferred[Any]:
        tls_factory = TLSMemoryBIOFactory(self._tls, True, factory, clock=self._clock)

        def unwrap(protocol: Any) -> Any:
            return protocol.wrappedProtocol

        return self._wrapped.connect(tls_factory).addCallback(unwrap)


class NotDelivered(FederationError):
    """
    The request certainly did not reach the remote backend (no connection,
    or the TLS handshake failed), so another target may be tried.
    """


def bounded(d: Deferred[Any], seconds: float, clock: Any) -> Deferred[Any]:
    """
    Cancel C{d} after C{seconds}; a failure after that is a
    L{defer.TimeoutError}.  Unlike C{Deferred.addTimeout}, this also holds
    when the cancellation surfaces as another error, as Twisted's web client
    reports a cancelled connection attempt (C{ConnectingCancelledError}).
    """
    expired: List[bool] = []

    def expire() -> None:
        expired.append(True)
        d.cancel()

    timer = clock.callLater(seconds, expire)

    def settle(result: Any) -> Any:
        if timer.active():
            timer.cancel()
        if expired and isinstance(result, Failure):
            return Failure(defer.TimeoutError(f"no answer within {seconds} s"))
        return result

    return d.addBoth(settle)


def was_cancelled(failure: Failure) -> bool:
    """Whether C{failure} comes from a cancellation (not from our own timeout)."""
    if failure.check(defer.TimeoutError):
        return False
    return any(r.check(defer.CancelledError, error.ConnectingCancelledError) for r in _reasons(failure))


def _reasons(failure: Failure) -> List[Failure]:
    """C{failure} and every failure nested in Twisted's web client wrappers."""
    found = [failure]
    for nested in getattr(failure.value, "reasons", None) or ():
        found.extend(_reasons(nested))
    return found


def classify_failure(failure: Failure, target: Target) -> FederationError:
    """Turn a failed outbound exchange with C{target} into a labelled error."""
    where = f"{target.infra_domain} ({target.host}:{target.port})"
    data = {"type": "federation", "domain": target.infra_domain}
    for reason in _reasons(failure):
        if reason.check(FederationError):
            return reason.value
        if reason.check(SSL.Error, VerificationError):
            return NotDelivered(
                f"TLS with {where} failed: {_tls_text(reason.value)}",
                "federation-tls-error",
                data=data,
            )
        if reason.check(defer.TimeoutError):
            return FederationError(
                f"{where} did not answer in time", "federation-timeout", data=data
            )
        if reason.check(BodyTooLarge):
            return FederationError(
                f"the answer from {where} is larger than [limits] max_body_bytes",
                "federation-remote-error",
                data=data,
            )
        if reason.check(BadAnswer):
            return FederationError(
                f"{where} answered with malformed HTTP: {_plain(reason.value)}",
                "federation-remote-error",
                data=data,
            )
    for reason in _reasons(failure):
        # error.TimeoutError is the connect timeout (a ConnectError): nothing was sent
        if reason.check(error.TimeoutError):
            return NotDelivered(
                f"connecting to {where} took too long", "federation-timeout", data=data
            )
        if reason.check(error.ConnectError, error.DNSLookupError):
            return NotDelivered(
                f"cannot connect to {where}: {_plain(reason.value)}",
                "federation-connection-refused",
                data=data,
            )
    for reason in _reasons(failure):
        if reason.check(ConnectionClosed, error.ConnectionLost, error.ConnectionDone,
                        web_client.ResponseNeverReceived, web_client.ResponseFailed):
            return FederationError(
                f"cannot reach {where}: {_plain(reason.value)}",
                "federation-connection-refused",
                data=data,
            )
    return FederationError(
        f"talking to {where} failed: {_plain(failure.value)}",
        "federation-connection-refused",
        data=data,
    )


def _plain(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.rstrip(".")


def _tls_text(exc: BaseException) -> str:
    if isinstance(exc, SSL.Error) and exc.args and isinstance(exc.args[0], list):
        parts = [item[-1] for item in exc.args[0] if isinstance(item, tuple) and item]
        if parts:
            return "; ".join(str(p) for p in parts)
    return _plain(exc)


class FederationClient:
    """
    Sends L{OutboundRequest}s to L{Target}s over a shared connection pool
    (L{fedserver.http11}): at most C{max_connections} connections to one
    target, further requests queued until one is free.

    @param tls_for: gives the client TLS settings for a target (the
        authenticator's C{client_tls_options}).
    """

    def __init__(
        self,
        reactor: Any,
        tls_for: Callable[[Target], Any],
        *,
        request_timeout: float = 30.0,
        connect_timeout: float = 10.0,
        max_body_bytes: int = 1024 * 1024,
        max_connections: int = 64,
        idle_timeout: float = 50.0,
    ) -> None:
        self._reactor = reactor
        self._tls_for = tls_for
        self.request_timeout = request_timeout
        self.connect_timeout = connect_timeout
        self.max_body_bytes = max_body_bytes
        self._tls_seen: Dict[str, Any] = {}
        self.pool = HTTP11Pool(reactor, max_body=max_body_bytes, max_per_key=max_connections,
                               idle_timeout=idle_timeout)

    def send(self, target: Target, request: OutboundRequest) -> Deferred[Response]:
        """
        Send C{request} to C{target}; fire with its L{Response} whatever the
        status code, or fail with a labelled L{FederationError}.
        """
        tls = self._tls_for(target)
        if self._tls_seen.setdefault(target.infra_domain, tls) is not tls:
            # our certificate or CA certificates changed: idle connections made
            # and verified with the old ones are closed, new ones use the new
            self._tls_seen[target.infra_domain] = tls
            self.pool.close(lambda key: isinstance(key, tuple) and key[0] == target.infra_domain)
        host = target.infra_domain if target.port == 443 else f"{target.infra_domain}:{target.port}"
        data = encode_request(request.method, request.path, host, request.headers, request.body)

        def endpoint() -> Any:
            tcp = HostnameEndpoint(self._reactor, target.host, target.port, timeout=self.connect_timeout)
            return TLSClientEndpoint(tls, tcp, self._reactor)

        key = (target.infra_domain, target.host, target.port, id(tls))
        d = self.pool.request(key, endpoint, data, expect_body=request.method != "HEAD")
        bounded(d, self.request_timeout, self._reactor)
        d.addErrback(self._failed, target)
        return d

    @staticmethod
    def _failed(failure: Failure, target: Target) -> None:
        if was_cancelled(failure):
            # whoever cancelled (a caller that went away) wants no answer, and
            # certainly no fail-over to another target
            raise defer.CancelledError()
        raise classify_failure(failure, target)

    def close(self) -> Deferred[None]:
        """Close every idle pooled connection."""
        return self.pool.close()
