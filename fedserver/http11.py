"""
A lean HTTP/1.1 client for fedserver's own hops (fedserver to fedserver, and
fedserver to a local component).

Twisted's C{Agent} costs about as much CPU per request as everything else a
federated call does, and its pool opens and closes a fresh connection for
every request beyond C{maxPersistentPerHost}, a TLS handshake each time under
load.  This client does one request at a time per connection, keeps idle
connections per key for reuse, opens at most C{max_per_key} connections to a
key and queues further requests until one is free, and bounds what it
accepts: the head of an answer (size and header count) and its body.
Cancelling a request aborts its connection.

It is not a general HTTP client: no redirects, no cookies, no
C{Expect: 100-continue} of its own (an interim 1xx answer is skipped), no
pipelining.
"""

from __future__ import annotations

import re
from collections import deque
from typing import Any, Callable, Deque, Dict, Hashable, List, Optional, Sequence, Tuple

from twisted.internet import defer, error
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.python.failure import Failure

from fedserver.values import Response

#: bytes the status line and headers of an answer may take
MAX_HEAD = 64 * 1024
#: header lines an answer may have
MAX_HEADERS = 200

#: chunks an answer may come in (many tiny chunks cost CPU, not memory)
MAX_CHUNKS = 16384

_NO_BODY = frozenset({204, 304})
_STATUS = re.compile(rb"[1-5][0-9][0-9]")
_LENGTH = re.compile(rb"[0-9]{1,18}")
_CHUNK_SIZE = re.compile(rb"[0-9A-Fa-f]{1,15}")
_METHOD = re.compile(r"[A-Z]{1,20}")
_TARGET = re.compile(r"[\x21-\x7e]{1,8192}")
_FORBIDDEN_IN_HEADERS = (b"\r", b"\n", b"\0")


class BodyTooLarge(Exception):
    """An answer's body (or head) is larger than the limit."""


class BadAnswer(Exception):
    """The other side's answer is not well-formed HTTP/1.1."""


class ConnectionClosed(Exception):
    """
    The connection closed before a complete answer arrived.

    @ivar reasons: the connection's own failure (as Twisted's web client
        errors carry theirs), telling a TLS failure from a reset.
    """

    def __init__(self, message: str, reason: Optional[Failure] = None) -> None:
        super().__init__(message)
        self.reasons = [reason] if reason is not None else []


def encode_request(method: str, path: str, host: str, headers: Sequence[Tuple[str, str]], body: bytes) -> bytes:
    """
    The request as bytes.  A header name or value with CR, LF or NUL is
    refused (C{ValueError}): it would smuggle a header or a request.
    """
    if not _METHOD.fullmatch(method) or not _TARGET.fullmatch(path) or not _TARGET.fullmatch(host):
        raise ValueError(f"cannot send {method[:20]!r} {path[:100]!r} to {host[:100]!r}: not visible ASCII")
    lines = [f"{method} {path} HTTP/1.1".encode("ascii"), b"Host: " + host.encode("ascii")]
    for name, value in headers:
        raw_name, raw_value = name.encode("latin-1"), value.encode("latin-1")
        if any(c in raw_name or c in raw_value for c in _FORBIDDEN_IN_HEADERS) or b":" in raw_name:
            raise ValueError(f"the header {name!r} cannot be sent: it holds a line break or NUL")
        lower = raw_name.lower()
        if lower in (b"host", b"content-length", b"transfer-encoding", b"connection"):
            continue  # ours to set
        lines.append(raw_name + b": " + raw_value)
    lines.append(b"Content-Length: %d" % len(body))
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


class _Buffer:
    """
    Received bytes with a read position.  Searches resume where the last one
    stopped and consumed bytes are dropped once per read, so that parsing
    costs time linear in what arrives, however it is cut into reads.
    """

    def __init__(self) -> None:
        self.data = bytearray()
        self.pos = 0
        self._scanned = 0

    def __len__(self) -> int:
        return len(self.data) - self.pos

    def feed(self, data: bytes) -> None:
        self.data += data

    def compact(self) -> None:
        if self.pos:
            del self.data[: self.pos]
            self._scanned = max(0, self._scanned - self.pos)
            self.pos = 0

    def find(self, separator: bytes) -> int:
        """Where C{separator} starts (an absolute index), or -1."""
        start = max(self.pos, self._scanned - len(separator) + 1)
        index = self.data.find(separator, start)
        if index < 0:
            self._scanned = len(self.data)
        return index

    def take(self, count: int) -> bytes:
        taken = bytes(self.data[self.pos: self.pos + count])
        self.pos += len(taken)
        self._scanned = max(self._scanned, self.pos)
        return taken

    def take_until(self, index: int, skip: int) -> bytes:
        """The bytes up to C{index}; then C{skip} more are dropped (the separator)."""
        taken = bytes(self.data[self.pos: index])
        self.pos = index + skip
        self._scanned = max(self._scanned, self.pos)
        return taken


class HTTP11Connection(Protocol):
    """One connection; answers one request at a time."""

    def __init__(self, max_body: int) -> None:
        self.max_body = max_body
        self._buffer = _Buffer()
        self._pending: Optional[Deferred[Response]] = None
        self._head: Optional[Tuple[int, List[Tuple[str, str]], bool]] = None
        self._body: List[bytes] = []
        self._body_size = 0
        self._remaining: Optional[int] = None  # Content-Length left; None: chunked or until close
        self._chunked = False
        self._chunk_state = "size"
        self._chunk_left = 0
        self._chunks = 0
        self._trailer_bytes = 0
        self._until_close = False
        self._no_body = False
        self.reusable = False
        self.lost = False
        #: closed by the pool while idle (not counted as active any more)
        self.closed_idle = False
        self.on_idle: Callable[[HTTP11Connection], None] = lambda c: None
        self.on_lost: Callable[[HTTP11Connection], None] = lambda c: None

    # sending

    def request(self, data: bytes, *, expect_body: bool = True) -> Deferred[Response]:
        """Send an encoded request; fire with its L{Response}."""
        assert self._pending is None, "one request at a time"
        self._pending = Deferred(self._cancel)
        self._buffer, self._head, self._body, self._body_size = _Buffer(), None, [], 0
        self._chunks, self._trailer_bytes = 0, 0
        self._no_body = not expect_body
        self._until_close = False
        self.reusable = False
        assert self.transport is not None
        self.transport.write(data)
        return self._pending

    def _cancel(self, d: Deferred[Response]) -> None:
        self._pending = None
        if self.transport is not None:
            self.transport.abortConnection()  # type: ignore[attr-defined]
        d.errback(defer.CancelledError())

    # receiving

    def dataReceived(self, data: bytes) -> None:
        if self._pending is None:
            # nothing was asked: a server talking out of turn cannot be trusted
            self.transport.abortConnection()  # type: ignore[union-attr]
            return
        self._buffer.feed(data)
        try:
            self._parse()
        except (BadAnswer, BodyTooLarge) as e:
            self._fail(e)
            self.transport.abortConnection()  # type: ignore[union-attr]
        else:
            self._buffer.compact()

    def _parse(self) -> None:
        buffer = self._buffer
        while self._pending is not None:
            if self._head is None:
                end = buffer.find(b"\r\n\r\n")
                if end < 0:
                    if len(buffer) > MAX_HEAD:
                        raise BodyTooLarge(len(buffer))
                    return
                if end - buffer.pos > MAX_HEAD:
                    raise BodyTooLarge(end - buffer.pos)
                self._start(buffer.take_until(end, 4))
                continue
            if not self._read_body():
                return

    def _start(self, head: bytes) -> None:
        lines = head.split(b"\r\n")
        parts = lines[0].split(b" ", 2)
        if (len(parts) < 2 or parts[0] not in (b"HTTP/1.1", b"HTTP/1.0")
                or not _STATUS.fullmatch(parts[1])):
            raise BadAnswer(f"not an HTTP status line: {lines[0][:80]!r}")
        code = int(parts[1])
        if len(lines) - 1 > MAX_HEADERS:
            raise BodyTooLarge(len(head))
        headers: List[Tuple[str, str]] = []
        length: Optional[int] = None
        chunked = False
        close = parts[0] == b"HTTP/1.0"
        for line in lines[1:]:
            name, sep, value = line.partition(b":")
            if not sep or not name or name != name.strip():
                raise BadAnswer(f"a malformed header line: {line[:80]!r}")
            value = value.strip()
            lower = name.lower()
            if lower == b"content-length":
                if not _LENGTH.fullmatch(value) or (length is not None and int(value) != length):
                    raise BadAnswer("a malformed Content-Length")
                length = int(value)
            elif lower == b"transfer-encoding":
                chunked = value.lower() == b"chunked"
                if not chunked:
                    raise BadAnswer(f"an unsupported Transfer-Encoding {value[:40]!r}")
            elif lower == b"connection":
                tokens = {t.strip().lower() for t in value.split(b",")}
                close = b"close" in tokens or (close and b"keep-alive" not in tokens)
            headers.append((name.decode("latin-1"), value.decode("latin-1")))
        if chunked and length is not None:
            # RFC 9112, 6.3: both framings at once is how answers get smuggled
            raise BadAnswer("both Content-Length and Transfer-Encoding")
        if code == 101:
            raise BadAnswer("a protocol switch nobody asked for")
        if 100 <= code < 200:
            return  # an interim answer: the real one follows
        self._head = (code, headers, not close)
        self._chunked = chunked
        self._chunk_state = "size"
        if self._no_body or code in _NO_BODY:
            self._remaining = 0
            self._chunked = False
        elif chunked:
            self._remaining = None
        elif length is not None:
            if length > self.max_body:
                raise BodyTooLarge(length)
            self._remaining = length
        else:
            self._remaining = None
            self._until_close = True

    def _take_body(self, data: bytes) -> None:
        self._body_size += len(data)
        if self._body_size > self.max_body:
            raise BodyTooLarge(self._body_size)
        self._body.append(data)

    def _read_body(self) -> bool:
        """Consume what the buffer holds of the body; C{True} when complete."""
        if self._chunked:
            return self._read_chunks()
        buffer = self._buffer
        if self._until_close:
            self._take_body(buffer.take(len(buffer)))
            return False
        assert self._remaining is not None
        take = buffer.take(self._remaining)
        self._remaining -= len(take)
        self._take_body(take)
        if self._remaining:
            return False
        self._complete()
        return True

    def _read_chunks(self) -> bool:
        """Chunked transfer coding: size line, data, CRLF, ..., 0, trailers, CRLF."""
        buffer = self._buffer
        while True:
            if self._chunk_state == "size":
                end = buffer.find(b"\r\n")
                if end < 0:
                    if len(buffer) > 1024:
                        raise BadAnswer("a chunk size line is too long")
                    return False
                text = buffer.take_until(end, 2).split(b";", 1)[0].strip()
                if not _CHUNK_SIZE.fullmatch(text):
                    raise BadAnswer(f"a malformed chunk size {text[:20]!r}")
                self._chunks += 1
                if self._chunks > MAX_CHUNKS:
                    raise BadAnswer(f"more than {MAX_CHUNKS} chunks")
                self._chunk_left = int(text, 16)
                self._chunk_state = "data" if self._chunk_left else "trailers"
            elif self._chunk_state == "data":
                take = buffer.take(self._chunk_left)
                self._take_body(take)
                self._chunk_left -= len(take)
                if self._chunk_left:
                    return False
                self._chunk_state = "crlf"
            elif self._chunk_state == "crlf":
                if len(buffer) < 2:
                    return False
                if buffer.take(2) != b"\r\n":
                    raise BadAnswer("chunk data longer than its size")
                self._chunk_state = "size"
            else:  # trailers, ended by an empty line
                end = buffer.find(b"\r\n")
                if end < 0:
                    if self._trailer_bytes + len(buffer) > MAX_HEAD:
                        raise BodyTooLarge(self._trailer_bytes + len(buffer))
                    return False
                line = buffer.take_until(end, 2)
                self._trailer_bytes += len(line) + 2
                if self._trailer_bytes > MAX_HEAD:
                    raise BodyTooLarge(self._trailer_bytes)
                if not line:
                    self._complete()
                    return True

    def _complete(self) -> None:
        assert self._head is not None and self._pending is not None
        code, headers, keep_alive = self._head
        d, self._pending = self._pending, None
        self.reusable = keep_alive and not len(self._buffer) and not self._until_close
        response = Response(code, headers, b"".join(self._body))
        self._head, self._body = None, []
        if self.reusable:
            self.on_idle(self)
        elif self.transport is not None:
            self.transport.loseConnection()
        d.callback(response)

    def _fail(self, reason: Exception) -> None:
        d, self._pending = self._pending, None
        self.reusable = False
        if d is not None:
            d.errback(reason)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.lost = True
        self.reusable = False
        self.on_lost(self)
        if self._pending is None:
            return
        if self._until_close and self._head is not None and reason.check(error.ConnectionDone):
            self._complete()
            return
        received = self._head is not None or bool(len(self._buffer))
        self._fail(ConnectionClosed(
            f"the connection closed {'in the middle of' if received else 'before'} the answer: "
            f"{reason.getErrorMessage()}",
            reason,
        ))


class _ConnectionFactory(Factory):
    def __init__(self, max_body: int) -> None:
        self.max_body = max_body

    def buildProtocol(self, addr: Any) -> HTTP11Connection:
        return HTTP11Connection(self.max_body)


class _Key:
    """The connections and waiting requests of one key."""

    def __init__(self, endpoint: Callable[[], Any]) -> None:
        self.endpoint = endpoint
        self.idle: List[HTTP11Connection] = []
        #: connections open or opening that are not idle
        self.active = 0
        self.waiting: Deque[Deferred[HTTP11Connection]] = deque()


class HTTP11Pool:
    """
    Connections by key (a hashable naming the endpoint and its TLS
    settings).

    @param max_per_key: connections open (or opening) to one key at most;
        further requests wait for one to be free.
    @param idle_timeout: seconds an idle connection is kept; shorter than
        the servers' own idle timeouts, so that we close first.
    """

    def __init__(self, reactor: Any, *, max_body: int, max_per_key: int = 64, idle_timeout: float = 50.0) -> None:
        self._reactor = reactor
        self._factory = _ConnectionFactory(max_body)
        self.max_per_key = max_per_key
        self.idle_timeout = idle_timeout
        self._keys: Dict[Hashable, _Key] = {}
        self._expiry: Dict[HTTP11Connection, Any] = {}
        # a waiting request -> the connection attempt made for it
        self._attempts: Dict[Deferred[HTTP11Connection], Deferred[HTTP11Connection]] = {}

    def request(self, key: Hashable, endpoint: Callable[[], Any], data: bytes, *,
                expect_body: bool = True) -> Deferred[Response]:
        """
        Send the encoded request C{data} on a connection for C{key}
        (C{endpoint()} makes a new one's endpoint when needed).
        """

        def send(connection: HTTP11Connection) -> Deferred[Response]:
            return connection.request(data, expect_body=expect_body)

        return self._acquire(key, endpoint).addCallback(send)

    def _acquire(self, key: Hashable, endpoint: Callable[[], Any]) -> Deferred[HTTP11Connection]:
        state = self._keys.get(key)
        if state is None:
            state = self._keys[key] = _Key(endpoint)
        state.endpoint = endpoint
        while state.idle:
            connection = state.idle.pop()
            self._cancel_expiry(connection)
            transport = connection.transport
            if not connection.lost and transport is not None and not getattr(transport, "disconnecting", False):
                state.active += 1
                return defer.succeed(connection)
        if state.active < self.max_per_key:
            return self._connect(state)
        waiting: Deferred[HTTP11Connection] = Deferred(lambda d: self._cancel_waiting(state, d))
        state.waiting.append(waiting)
        return waiting

    def _cancel_waiting(self, state: _Key, waiting: Deferred[HTTP11Connection]) -> None:
        if waiting in state.waiting:
            state.waiting.remove(waiting)  # Deferred.cancel then fails it
            return
        attempt = self._attempts.pop(waiting, None)
        if attempt is not None:
            attempt.cancel()

    def _connect(self, state: _Key) -> Deferred[HTTP11Connection]:
        state.active += 1
        d = state.endpoint().connect(self._factory)

        def connected(connection: HTTP11Connection) -> HTTP11Connection:
            connection.on_idle = lambda c: self._release(state, c)
            connection.on_lost = lambda c: self._lost(state, c)
            return connection

        def failed(failure: Failure) -> Failure:
            state.active -= 1
            self._serve_waiting(state)
            return failure

        return d.addCallbacks(connected, failed)

    def _release(self, state: _Key, connection: HTTP11Connection) -> None:
        if state.waiting:
            state.waiting.popleft().callback(connection)  # still active, for its next request
            return
        state.active -= 1
        state.idle.append(connection)
        self._expiry[connection] = self._reactor.callLater(self.idle_timeout, self._expire, connection)

    def _lost(self, state: _Key, connection: HTTP11Connection) -> None:
        self._cancel_expiry(connection)
        if connection in state.idle:
            state.idle.remove(connection)
        elif not connection.closed_idle:
            state.active -= 1
            self._serve_waiting(state)
        self._forget_if_empty(state)

    def _forget_if_empty(self, state: _Key) -> None:
        if not state.idle and not state.active and not state.waiting:
            for key, known in list(self._keys.items()):
                if known is state:
                    del self._keys[key]

    def _serve_waiting(self, state: _Key) -> None:
        if not state.waiting or state.active >= self.max_per_key:
            return
        waiting = state.waiting.popleft()
        attempt = self._connect(state)
        self._attempts[waiting] = attempt

        def deliver(result: Any) -> None:
            self._attempts.pop(waiting, None)
            if not waiting.called:
                if isinstance(result, Failure):
                    waiting.errback(result)
                else:
                    waiting.callback(result)
            elif isinstance(result, HTTP11Connection):
                self._release(state, result)  # its request went away meanwhile: keep it for the next

        attempt.addBoth(deliver)

    def _expire(self, connection: HTTP11Connection) -> None:
        self._expiry.pop(connection, None)
        for state in self._keys.values():
            if connection in state.idle:
                state.idle.remove(connection)  # closing: never handed out again
        connection.closed_idle = True
        if connection.transport is not None:
            connection.transport.loseConnection()

    def _cancel_expiry(self, connection: HTTP11Connection) -> None:
        call = self._expiry.pop(connection, None)
        if call is not None and call.active():
            call.cancel()

    def close(self, keys: Optional[Callable[[Hashable], bool]] = None) -> Deferred[None]:
        """
        Close the idle connections (of the keys C{keys} selects, else all);
        busy ones close when their request ends.
        """
        for key, state in list(self._keys.items()):
            if keys is not None and not keys(key):
                continue
            for connection in list(state.idle):
                self._cancel_expiry(connection)
                state.idle.remove(connection)
                connection.closed_idle = True
                if connection.transport is not None:
                    connection.transport.loseConnection()
            self._forget_if_empty(state)
        return defer.succeed(None)
