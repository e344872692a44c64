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

from typing import Any, Callable, Dict, List, Optional

from OpenSSL import SSL
from service_identity import VerificationError
from twisted.internet import defer, error
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.interfaces import IConsumer, IStreamClientEndpoint
from twisted.internet.protocol import Protocol, connectionDone
from twisted.protocols import policies
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from twisted.web import client as web_client
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH, IAgentEndpointFactory, IBodyProducer
from zope.interface import implementer

from fedserver.errors import FederationError
from fedserver.values import OutboundRequest, Response, Target


@implementer(IBodyProducer)
class BytesProducer:
    """Send a request body that is already in memory, in one write."""

    def __init__(self, body: bytes) -> None:
        self.body = body
        self.length = len(body)

    def startProducing(self, consumer: IConsumer) -> Deferred[None]:
        consumer.write(self.body)
        return defer.succeed(None)

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


class BodyTooLarge(Exception):
    """An answer's body is larger than the limit."""


class _LimitedBodyReader(Protocol):
    """Collect a response body, giving up past C{limit} bytes."""

    def __init__(self, finished: Deferred[bytes], limit: int) -> None:
        self._finished = finished
        self._limit = limit
        self._parts: List[bytes] = []
        self._size = 0

    def dataReceived(self, data: bytes) -> None:
        if self._finished.called:
            return
        self._size += len(data)
        if self._size > self._limit:
            self._finished.errback(BodyTooLarge(self._size))
            self.transport.stopProducing()  # type: ignore[union-attr]
            return
        self._parts.append(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self._finished.called:
            return
        if reason.check(web_client.ResponseDone, web_client.PotentialDataLoss):
            self._finished.callback(b"".join(self._parts))
        else:
            self._finished.errback(reason)


def read_body(response: Any, limit: int) -> Deferred[bytes]:
    """
    The body of a Twisted web client response, failing with a
    C{federation-remote-error} past C{limit} bytes.
    """
    if response.length is not UNKNOWN_LENGTH and response.length > limit:
        response.deliverBody(_Discard())
        return defer.fail(BodyTooLarge(response.length))

    def stop_reading(_: Deferred[bytes]) -> None:
        # cancelled (a timeout): drop the connection rather than read on
        transport: Any = reader.transport
        if transport is not None:
            transport.stopProducing()

    finished: Deferred[bytes] = Deferred(stop_reading)
    reader = _LimitedBodyReader(finished, limit)
    response.deliverBody(reader)
    return finished


class _Discard(Protocol):
    def connectionMade(self) -> None:
        self.transport.stopProducing()  # type: ignore[union-attr]


#: bytes an answer's status line and headers may take beyond the body limit
HEAD_ALLOWANCE = 64 * 1024


class _BoundedAnswer(policies.ProtocolWrapper):
    """
    Cuts a connection whose answer to the last request grows past the
    limit, so that a remote cannot exhaust memory with endless headers
    (Twisted's client parser bounds neither their number nor their size).
    """

    def __init__(self, factory: Any, wrapped: Any, limit: int) -> None:
        super().__init__(factory, wrapped)
        self._limit = limit
        self._received = 0
        self._exceeded = False

    def write(self, data: bytes) -> None:
        self._received = 0  # a new request: its answer starts now
        super().write(data)

    def writeSequence(self, data: Any) -> None:
        self._received = 0
        super().writeSequence(data)

    def dataReceived(self, data: bytes) -> None:
        if self._exceeded:
            return
        self._received += len(data)
        if self._received > self._limit:
            self._exceeded = True
            self.transport.abortConnection()  # type: ignore[union-attr]
            return
        super().dataReceived(data)

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        if self._exceeded:
            reason = Failure(BodyTooLarge(self._received))
        super().connectionLost(reason)


class _BoundedAnswers(policies.WrappingFactory):
    def __init__(self, wrapped: Any, limit: int) -> None:
        super().__init__(wrapped)
        self.limit = limit

    def buildProtocol(self, addr: Any) -> Any:
        return _BoundedAnswer(self, self.wrappedFactory.buildProtocol(addr), self.limit)


@implementer(IStreamClientEndpoint)
class _TLSClientEndpoint:
    """
    TLS over another endpoint, like Twisted's C{wrapClientTLS}, but with the
    injected reactor as the TLS layer's clock.
    """

    def __init__(self, tls: Any, wrapped: IStreamClientEndpoint, clock: Any, answer_limit: int) -> None:
        self._tls = tls
        self._wrapped = wrapped
        self._clock = clock
        self._answer_limit = answer_limit

    def connect(self, factory: Any) -> Deferred[Any]:
        bounded_factory = _BoundedAnswers(factory, self._answer_limit)
        tls_factory = TLSMemoryBIOFactory(self._tls, True, bounded_factory, clock=self._clock)

        def unwrap(protocol: Any) -> Any:
            # TLS, then the size bound, then the HTTP protocol the pool wants
            return protocol.wrappedProtocol.wrappedProtocol

        return self._wrapped.connect(tls_factory).addCallback(unwrap)


@implementer(IAgentEndpointFactory)
class _TargetEndpoints:
    def __init__(self, reactor: Any, target: Target, tls: Any, connect_timeout: float, answer_limit: int) -> None:
        self._reactor = reactor
        self._target = target
        self._tls = tls
        self._timeout = connect_timeout
        self._answer_limit = answer_limit

    def endpointForURI(self, uri: Any) -> Any:
        tcp = HostnameEndpoint(
            self._reactor, self._target.host, self._target.port, timeout=self._timeout
        )
        return _TLSClientEndpoint(self._tls, tcp, self._reactor, self._answer_limit)


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
        if reason.check(error.ConnectionLost, error.ConnectionDone,
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
    Sends L{OutboundRequest}s to L{Target}s over a shared connection pool.

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
        pool: Optional[web_client.HTTPConnectionPool] = None,
    ) -> None:
        self._reactor = reactor
        self._tls_for = tls_for
        self.request_timeout = request_timeout
        self.connect_timeout = connect_timeout
        self.max_body_bytes = max_body_bytes
        self._tls_seen: Dict[str, Any] = {}
        if pool is None:
            pool = web_client.HTTPConnectionPool(reactor, persistent=True)
            pool.maxPersistentPerHost = 16
            pool.cachedConnectionTimeout = 120
            pool.retryAutomatically = False
        self.pool = pool

    def send(self, target: Target, request: OutboundRequest) -> Deferred[Response]:
        """
        Send C{request} to C{target}; fire with its L{Response} whatever the
        status code, or fail with a labelled L{FederationError}.
        """
        tls = self._tls_for(target)
        if self._tls_seen.setdefault(target.infra_domain, tls) is not tls:
            # our certificate or CA certificates changed: connections made and
            # verified with the old ones are not reused
            self._tls_seen[target.infra_domain] = tls
            self.pool.closeCachedConnections()
        agent = web_client.Agent.usingEndpointFactory(
            self._reactor,
            _TargetEndpoints(self._reactor, target, tls, self.connect_timeout,
                             self.max_body_bytes + HEAD_ALLOWANCE),
            pool=self.pool,
        )
        host = target.infra_domain
        uri = f"https://{host}:{target.port}{request.path}".encode("ascii")
        headers = Headers()
        for name, value in request.headers:
            headers.addRawHeader(name.encode("latin-1"), value.encode("latin-1"))
        producer = BytesProducer(request.body) if request.body or request.method in (
            "POST", "PUT", "PATCH") else None
        d = agent.request(request.method.encode("ascii"), uri, headers, producer)

        def got_response(response: Any) -> Deferred[Response]:
            header_pairs = [
                (name.decode("latin-1"), value.decode("latin-1"))
                for name, values in response.headers.getAllRawHeaders()
                for value in values
            ]

            def complete(body: bytes) -> Response:
                return Response(response.code, header_pairs, body)

            return read_body(response, self.max_body_bytes).addCallback(complete)

        d.addCallback(got_response)
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
        """Close every pooled connection."""
        return self.pool.closeCachedConnections()
