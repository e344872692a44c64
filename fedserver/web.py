"""
HTTP plumbing shared by fedserver's listeners: a L{Site} whose requests
enforce the body size limit before the body is read, and helpers that write
L{Response}s and labelled errors, log one line per request and never show a
traceback to the other side.
"""

from __future__ import annotations

import abc
import io
import re
import time
import uuid
from typing import Any, Callable, Optional, Sequence, Tuple

from twisted.internet import defer
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import http, resource, server

from fedserver.errors import FederationError
from fedserver.values import Response

log = Logger(namespace="fedserver.web")

#: component and RPC names: ASCII letters, digits, "_" and "-" only.
NAME = re.compile(rb"[A-Za-z0-9_-]+")

#: a request id we accept from others: short, printable, no separators.
_REQUEST_ID = re.compile(rb"[A-Za-z0-9_.:@/+=-]{1,128}")


def request_id_from(request: server.Request, header: bytes) -> str:
    """The request id in C{header} if it is sane, else a new one."""
    value = request.requestHeaders.getRawHeaders(header)
    if value and _REQUEST_ID.fullmatch(value[0]):
        return value[0].decode("ascii")
    return str(uuid.uuid4())


def body_of(request: server.Request, limit: int) -> bytes:
    """
    The request body.  L{FederationRequest} has already refused a body over
    the limit; a plain L{server.Request} (an embedding application's own
    L{server.Site}) is checked here, after the fact.
    """
    content: Any = request.content
    if isinstance(content, io.BytesIO):
        body = content.getvalue()
    else:
        content.seek(0)
        body = content.read(limit + 1)
    if len(body) > limit:
        raise FederationError(
            f"the request body is larger than the limit of {limit} bytes ([limits] max_body_bytes)",
            "request-too-large",
        )
    return body


def require_post(request: server.Request) -> None:
    """Federation routes take C{POST} without a query string: else C{invalid-endpoint}."""
    if request.method != b"POST":
        raise FederationError(
            f"only POST is accepted here, not {request.method.decode('latin-1')}",
            "invalid-endpoint",
        )
    if b"?" in request.uri:
        raise FederationError("federation requests take no query string", "invalid-endpoint")


#: seconds a refused peer gets to read our answer before the connection is cut
_ABORT_AFTER = 2.0

#: the Server header of every answer: no software versions for strangers
SERVER_HEADER = b"fedserver"


class FederationRequest(server.Request):
    """
    A request that is refused as soon as its headers are in when the site's
    C{gate} rejects the peer, and answered 413 C{request-too-large} as soon as
    its body is known to exceed the site's C{max_body_bytes}; either way the
    body is never read.  Bodies are kept in memory (they are bounded) instead
    of temporary files.
    """

    _rejected = False
    _received = 0
    _content_type: Optional[Sequence[bytes]] = None
    content: Any

    @property
    def _limit(self) -> int:
        return self.channel.site.max_body_bytes  # type: ignore[attr-defined]

    def gotLength(self, length: Optional[int]) -> None:
        self.content = io.BytesIO()
        gate = self.channel.site.gate  # type: ignore[attr-defined]
        refusal = gate(self) if gate is not None else None
        if refusal is not None:
            self._refuse_early(refusal)
        elif length is not None and length > self._limit:
            self._reject_too_large(length)

    def handleContentChunk(self, data: bytes) -> None:
        if self._rejected:
            return
        self._received += len(data)
        if self._received > self._limit:
            self._reject_too_large(None)
            return
        self.content.write(data)

    def _reject_too_large(self, length: Optional[int]) -> None:
        limit = self._limit
        size = f"{length} bytes, more" if length is not None else "more bytes"
        self._refuse_early(FederationError(
            f"the request body has {size} than the limit of {limit} bytes "
            "([limits] max_body_bytes)",
            "request-too-large",
        ))

    def _refuse_early(self, error: FederationError) -> None:
        self._rejected = True
        # the request line is parsed, but not yet handed to this request
        channel: Any = self.channel
        answer = error_response_for(channel.site.resource, getattr(channel, "_path", b""), error)
        peer = self.getClientAddress()
        log.info(
            "{method} {path} from {peer} -> {code} {label} before reading the body: {message} "
            "[request {request_id}]",
            method=getattr(channel, "_command", b"?").decode("latin-1", "replace"),
            path=getattr(channel, "_path", b"?").decode("latin-1", "replace")[:200],
            peer=f"{getattr(peer, 'host', '?')}:{getattr(peer, 'port', '?')}",
            code=error.code,
            label=error.label,
            message=error.message,
            request_id=request_id_from(self, b"request-id"),
        )
        reason = http.RESPONSES.get(answer.code, b"Refused")
        body = answer.body
        # The request was never dispatched, so answer on the raw transport,
        # stop reading from the socket at once (a TLS transport would otherwise
        # read on while it waits for the peer's close_notify, and TCP flow
        # control now holds the peer back), close through the channel, and cut
        # the connection if the peer does not let it close in time.
        transport = channel.transport
        transport.write(
            b"HTTP/1.1 %d %s\r\n" % (answer.code, reason) +
            b"Server: " + SERVER_HEADER + b"\r\n"
            b"Content-Type: application/json\r\n"
            b"Content-Length: " + str(len(body)).encode() + b"\r\n"
            b"Connection: close\r\n\r\n" + body
        )
        socket_transport = getattr(transport, "transport", None) or transport  # under TLS, the TCP one
        socket_transport.pauseProducing()
        channel.loseConnection()
        channel.callLater(_ABORT_AFTER, transport.abortConnection)
        # else the channel answers "Expect: 100-continue" after our 413
        self.requestHeaders.removeHeader(b"expect")

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        if self._rejected:
            return
        # Twisted would parse the Content-Type (through the email package,
        # a tenth of our time per request) to decode form bodies into
        # arguments; federation bodies are JSON and must stay bodies.  The
        # header is set aside until process() runs.
        self._content_type = self.requestHeaders.getRawHeaders(b"content-type")
        if self._content_type is not None:
            self.requestHeaders.removeHeader(b"content-type")
        super().requestReceived(command, path, version)

    def process(self) -> None:
        if self._content_type is not None:
            self.requestHeaders.setRawHeaders(b"content-type", self._content_type)
        super().process()

    def write(self, data: bytes) -> None:
        if not self.startedWriting:
            self.setHeader(b"server", SERVER_HEADER)
        super().write(data)


class FederationChannel(http.HTTPChannel):
    """
    An HTTP/1.1 connection of a listener that bounds how long a request may
    take to arrive, besides Twisted's idle timeout (which every byte
    resets, so it alone lets a peer that trickles a byte now and then hold
    the connection for ever):

     - its request line and headers must be in within the site's
       C{header_timeout} seconds of its first byte;
     - its body within C{body_timeout} seconds of the end of its headers.

    A request too slow to arrive was never dispatched, so nothing is lost:
    the connection is aborted without an answer, and a line is logged.
    HTTP/1.1 only: fedserver never offers HTTP/2 (no ALPN), so Twisted's
    HTTP/2 negotiator is not used.
    """

    site: Any
    _deadline: Any = None

    def _start(self, what: str, seconds: Optional[float], key: str) -> None:
        self._stop()
        if seconds is not None:
            # the site's reactor (set by HTTPFactory.buildProtocol), as Twisted's idle timeout uses
            call_later: Any = self.callLater
            self._deadline = call_later(seconds, self._too_slow, what, seconds, key)

    def _stop(self) -> None:
        if self._deadline is not None:
            if self._deadline.active():
                self._deadline.cancel()
            self._deadline = None

    def _too_slow(self, what: str, seconds: float, key: str) -> None:
        self._deadline = None
        transport: Any = self.transport
        peer = transport.getPeer() if transport is not None else None
        log.info(
            "closed the connection from {peer}: {what} did not arrive within {seconds} s ([limits] {key})",
            peer=f"{getattr(peer, 'host', '?')}:{getattr(peer, 'port', '?')}",
            what=what,
            seconds=seconds,
            key=key,
        )
        if transport is not None:
            transport.abortConnection()

    def _awaiting_head(self) -> bool:
        # in line mode and not answering a request: the next bytes are a request line or headers
        return bool(self.line_mode) and not self._handlingRequest

    def dataReceived(self, data: bytes) -> None:
        # also the part of a next request that came while one was answered,
        # which requestDone hands back through here
        if self._deadline is None and self._awaiting_head():
            self._start("the request line and headers", self.site.header_timeout, "header_timeout")
        super().dataReceived(data)

    def allHeadersReceived(self) -> None:
        self._stop()
        super().allHeadersReceived()
        refused = getattr(self.requests[-1], "_rejected", False) if self.requests else False
        if self.length != 0 and not refused:
            self._start("the request body", self.site.body_timeout, "body_timeout")

    def allContentReceived(self) -> None:
        self._stop()
        super().allContentReceived()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._stop()
        super().connectionLost(reason)


class FederationSite(server.Site):
    """
    The site for a fedserver listener.

    @ivar max_body_bytes: larger request bodies are refused unread.
    @ivar gate: called with each request once its headers are in; returns a
        L{FederationError} to refuse it before its body is read, or C{None}.
    @ivar header_timeout: seconds a request's line and headers may take to
        arrive, from its first byte; C{None} for no bound.
    @ivar body_timeout: seconds a request's body may take to arrive, from
        the end of its headers; C{None} for no bound.
    """

    protocol = FederationChannel  # type: ignore[assignment]
    requestFactory = FederationRequest
    displayTracebacks = False

    def __init__(self, root: resource.IResource, *, max_body_bytes: int,
                 gate: Optional[Callable[[server.Request], Optional[FederationError]]] = None,
                 header_timeout: Optional[float] = None, body_timeout: Optional[float] = None,
                 **kwargs: Any) -> None:
        super().__init__(root, **kwargs)
        self.max_body_bytes = max_body_bytes
        self.gate = gate
        self.header_timeout = header_timeout
        self.body_timeout = body_timeout

    def log(self, request: Any) -> None:
        # fedserver logs each request itself, with its request id and outcome
        pass


def write_response(request: server.Request, response: Response, *, only: Optional[tuple] = None) -> None:
    """
    Send C{response}.  With C{only}, pass just those headers (lower-case
    names) of C{response}.
    """
    if getattr(request, "_disconnected", False):  # the client went away
        return
    request.setResponseCode(response.code)
    for name, value in response.headers:
        if only is None or name.lower() in only:
            request.responseHeaders.addRawHeader(name, value)
    request.setHeader(b"content-length", b"%d" % len(response.body))
    request.write(response.body)
    request.finish()


def labelled_json(error: FederationError) -> Response:
    """C{error} as fedserver's labelled JSON answer."""
    return Response(error.code, [("Content-Type", "application/json"), *error.headers], error.to_bytes())


def error_response_for(root: Any, path: bytes, error: FederationError) -> Response:
    """
    C{error} as the resource serving C{path} wants errors to look: a route
    mounted under the first path segment may define C{render_error(error)}
    (Matrix routes answer Matrix errors); otherwise labelled JSON.
    """
    segment = path.split(b"?", 1)[0].split(b"/")[1:2]
    child = getattr(root, "children", {}).get(segment[0]) if segment else None
    render = getattr(child, "render_error", None)
    return render(error) if render is not None else labelled_json(error)


def refuse(request: server.Request, error: FederationError, request_id: str,
           render_error: Callable[[FederationError], Response] = labelled_json) -> int:
    """
    Answer a request that was refused before any work started (a bad route,
    a body over the limit), logging it like any other; returns
    C{NOT_DONE_YET} for C{render}.
    """
    method = request.method.decode("latin-1", "replace")
    path = request.path.decode("latin-1", "replace")[:200]
    answer = render_error(error)
    _log_outcome(f"{method} {path}", request_id, answer.code, error.label, time.monotonic(), error.message)
    write_response(request, answer)
    return server.NOT_DONE_YET


def serve(
    request: server.Request,
    work: Callable[[], Deferred[Response]],
    *,
    describe: str,
    request_id: str,
    only: Optional[tuple] = None,
    on_error: Callable[[FederationError], FederationError] = lambda e: e,
    deadline: Optional[float] = None,
    clock: Any = None,
    render_error: Callable[[FederationError], Response] = labelled_json,
) -> int:
    """
    Run C{work} for C{request} and send its L{Response}, or the labelled
    error it fails with; any other failure is logged here with its traceback
    and answered as C{internal-error}.  Cancels C{work} if the client goes
    away, or after C{deadline} seconds (answered C{federation-timeout}).
    Logs one line with C{describe}, the outcome and the time taken.  Returns
    C{NOT_DONE_YET} for C{render}.
    """
    started = time.monotonic()
    try:
        d = work()
    except Exception:
        d = defer.fail()
    if deadline is not None:
        d.addTimeout(deadline, clock)

    def done(response: Response) -> None:
        if not isinstance(response, Response) or not isinstance(response.body, bytes):
            raise TypeError(f"the answer must be a Response with a bytes body, not {response!r:.200}")
        _log_outcome(describe, request_id, response.code, None, started)
        write_response(request, response, only=only)

    def failed(failure: Failure) -> None:
        if failure.check(CancelledError) and getattr(request, "_disconnected", False):
            _log_outcome(describe, request_id, 499, "client-gone", started)
            return
        if request.startedWriting:
            # an answer is half sent: nothing sensible can follow it
            log.failure("{describe} failed while answering [request {request_id}]", failure,
                        describe=describe, request_id=request_id)
            request.channel.transport.abortConnection()  # type: ignore[union-attr]
            return
        if failure.check(defer.TimeoutError):
            error = FederationError(
                f"this backend did not finish the request within {deadline} s", "federation-timeout"
            )
        elif failure.check(FederationError):
            error = on_error(failure.value)
        else:
            log.failure(
                "{describe} failed unexpectedly [request {request_id}]",
                failure,
                describe=describe,
                request_id=request_id,
            )
            error = FederationError(
                f"internal error; the server log has the details under request id {request_id}",
                "internal-error",
            )
        answer = render_error(error)
        _log_outcome(describe, request_id, answer.code, error.label, started, error.message)
        write_response(request, answer)

    d.addCallback(done)
    d.addErrback(failed)
    request.notifyFinish().addErrback(lambda _: d.cancel())
    return server.NOT_DONE_YET


def _log_outcome(
    describe: str,
    request_id: str,
    code: int,
    label: Optional[str],
    started: float,
    message: str = "",
) -> None:
    log.info(
        "{describe} -> {code}{label_text} in {ms:.1f} ms [request {request_id}]{detail}",
        describe=describe,
        code=code,
        label=label,
        label_text=f" {label}" if label else "",
        ms=(time.monotonic() - started) * 1000,
        request_id=request_id,
        detail=f": {message}" if message else "",
    )


class RouteResource(resource.Resource, metaclass=abc.ABCMeta):
    """
    A federation route: C{parse} checks the request's shape, then the body is
    read within the limit, then C{dispatch} answers; a refusal at either of
    the first two steps is answered and logged here.

    @cvar request_id_header: where the caller's request id comes from.
    @ivar deadline: seconds a request may take in all (for L{serve}), or
        C{None} for none.
    """

    isLeaf = True
    request_id_header: bytes = b"request-id"

    def __init__(self, pipeline: Any, *, max_body_bytes: int, deadline: Optional[float] = None,
                 clock: Any = None) -> None:
        super().__init__()
        self.pipeline = pipeline
        self.max_body_bytes = max_body_bytes
        self.deadline = deadline
        self.clock = clock

    def render(self, request: server.Request) -> int:
        request_id = request_id_from(request, self.request_id_header)
        try:
            names = self.parse(request)
            body = body_of(request, self.max_body_bytes)
        except FederationError as e:
            return refuse(request, e, request_id)
        return self.dispatch(request, names, body, request_id)

    @abc.abstractmethod
    def parse(self, request: server.Request) -> Tuple[str, ...]:
        """The names in the path; raise C{invalid-endpoint} for a bad request."""

    @abc.abstractmethod
    def dispatch(self, request: server.Request, names: Tuple[str, ...], body: bytes, request_id: str) -> int:
        """Answer the request (usually through L{serve})."""


class ErrorResource(resource.Resource):
    """Answers every request with one labelled error."""

    isLeaf = True

    def __init__(self, error: FederationError) -> None:
        super().__init__()
        self.error = error

    def render(self, request: server.Request) -> int:
        return refuse(request, self.error, request_id_from(request, b"request-id"))


class ListenerRoot(resource.Resource):
    """
    The root of a listener: known first path segments go to their resource,
    anything else is C{invalid-endpoint}.
    """

    def __init__(self, description: str) -> None:
        super().__init__()
        self.description = description

    def mount(self, segment: bytes, child: resource.IResource) -> None:
        """Serve C{child} under C{/segment}; a segment may be mounted once."""
        if segment in self.children:
            raise ValueError(f"/{segment.decode()} is mounted twice on the {self.description}")
        self.putChild(segment, child)

    def getChild(self, path: bytes, request: server.Request) -> resource.IResource:
        return ErrorResource(
            FederationError(
                f"the {self.description} serves no such path", "invalid-endpoint"
            )
        )

    def render(self, request: server.Request) -> bytes:
        return self.getChild(b"", request).render(request)


