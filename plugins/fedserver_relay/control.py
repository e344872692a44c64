"""
Control messages on the TLS stream between two linked relays.

Each message is length-prefixed and versioned; integers are big-endian::

    offset  size  field
         0     4  length      bytes that follow: 2 + payload, at most MAX_CONTROL
         4     1  version     CONTROL_VERSION (1)
         5     1  type        a MessageType
         6     n  payload     the type's layout below, nothing after it

Payloads are compact binary with exactly one encoding per message: sets are
written in strictly ascending order, so duplicates and reordering are
refused, and every count and string is bounded::

    HELLO        1  count (1-16) | count x version (1-255, ascending)
                 1  label length (0-128) | label (UTF-8, no control characters)
                 2  udp_port (0: this relay takes no UDP)
                 1  max_hops (1-255): the TTL this relay gives the frames it originates
    TRUST_CHAIN  2  count (0-1024) | count x 32-byte fingerprint (ascending)
    SUBSCRIBE    2  count (1-1024) | count x 8-byte room hash (ascending)
    UNSUBSCRIBE  same as SUBSCRIBE
    MEDIA        an encoded frame (fedserver_relay.frames), the whole payload
    UDP_ACK      8  nonce of the UDP probe being acknowledged
    PING         8  nonce
    PONG         8  the nonce of the PING answered

Conversation.  Each side sends HELLO first, listing the relay protocol
versions it speaks; both use the highest common one, and close the link when
there is none.  The HELLO layout is frozen at control version 1 so that
negotiation always works.  A forwarder then sends TRUST_CHAIN (the
fingerprints of the relays whose media it may forward), and again whenever
its peer set changes; the receiver accepts the list only from a peer it
trusts with C{delegate = true}.  The identity of the peer itself is its
certificate's fingerprint from the TLS handshake; no message carries it.

UDP.  Media goes on the TLS stream in MEDIA messages until UDP is known to
work in that direction.  A side with the peer's C{udp_port} sends a UDP
probe: a sealed datagram whose plaintext is
L{encode_probe <fedserver_relay.datagram.encode_probe>}(nonce) with a random
8-byte nonce.  The peer, on opening it, answers UDP_ACK with that nonce over
TLS (and may note the datagram's source address as the way back).  On the
UDP_ACK the prober sends frames over UDP.  Each direction is probed on its
own; a prober with no answer retries with backoff and keeps using the stream.

Malformed input.  Every refusal is a L{ControlError} naming the offset in the
stream, the field and the reason; after one, a L{ControlDecoder} refuses
everything, and the link should be closed.  A declared length over the bound
(overall, or for the declared type) is refused as soon as the header is read,
before any of the payload is buffered.
"""

from __future__ import annotations

import enum
import unicodedata
from typing import Any, Iterable, Optional, Union

import attrs

from fedserver_relay.fingerprint import parse_fingerprint
from fedserver_relay.frames import (
    MAX_FRAME_SIZE,
    MAX_TTL,
    ROOM_HASH_SIZE,
    DecodeError,
    Frame,
    FrameError,
    decode_frame,
    encode_frame,
    int_in,
)

__all__ = [
    "CONTROL_VERSION",
    "MAX_CONTROL",
    "MAX_LABEL_BYTES",
    "MAX_ROOMS",
    "MAX_VERSIONS",
    "MAX_VOUCHED",
    "NONCE_SIZE",
    "PROTOCOL_VERSIONS",
    "ControlDecoder",
    "ControlError",
    "ControlMessage",
    "Hello",
    "Media",
    "MessageType",
    "Ping",
    "Pong",
    "Subscribe",
    "TrustChain",
    "UdpAck",
    "Unsubscribe",
    "decode_control",
    "encode_control",
]

#: The envelope version of every control message so far.
CONTROL_VERSION = 1
#: The relay protocol versions this implementation speaks (listed in HELLO).
PROTOCOL_VERSIONS = frozenset({1})
#: The largest value of the length prefix (version, type and payload).
MAX_CONTROL = 64 * 1024
#: At most this many protocol versions in a HELLO.
MAX_VERSIONS = 16
#: The longest HELLO label, in UTF-8 bytes.
MAX_LABEL_BYTES = 128
#: At most this many fingerprints in a TRUST_CHAIN.
MAX_VOUCHED = 1024
#: At most this many room hashes in a SUBSCRIBE or UNSUBSCRIBE.
MAX_ROOMS = 1024
#: Bytes of a PING, PONG or UDP_ACK nonce.
NONCE_SIZE = 8

_LENGTH_SIZE = 4
_HEADER_SIZE = 2
_FINGERPRINT_SIZE = 32


class MessageType(enum.IntEnum):
    """The type byte of a control message."""

    HELLO = 1
    TRUST_CHAIN = 2
    SUBSCRIBE = 3
    UNSUBSCRIBE = 4
    MEDIA = 5
    UDP_ACK = 6
    PING = 7
    PONG = 8


#: The largest payload each type can have; a longer declared length is refused early.
_MAX_PAYLOAD: dict[int, int] = {
    MessageType.HELLO: 1 + MAX_VERSIONS + 1 + MAX_LABEL_BYTES + 2 + 1,
    MessageType.TRUST_CHAIN: 2 + MAX_VOUCHED * _FINGERPRINT_SIZE,
    MessageType.SUBSCRIBE: 2 + MAX_ROOMS * ROOM_HASH_SIZE,
    MessageType.UNSUBSCRIBE: 2 + MAX_ROOMS * ROOM_HASH_SIZE,
    MessageType.MEDIA: MAX_FRAME_SIZE,
    MessageType.UDP_ACK: NONCE_SIZE,
    MessageType.PING: NONCE_SIZE,
    MessageType.PONG: NONCE_SIZE,
}


class ControlError(DecodeError):
    """
    The bytes are not an acceptable control message; C{offset} counts from
    the start of the stream (or of the message, for L{decode_control}).
    """

    what = "relay control message"


# Value types; each checks its fields on construction, so each encodes.


def _nonce(instance: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if not isinstance(value, bytes) or len(value) != NONCE_SIZE:
        raise ValueError(f"{attribute.name} must be {NONCE_SIZE} bytes, not {value!r}")


def _not_a_single(value: Any, what: str) -> None:
    if isinstance(value, (str, bytes, bytearray, memoryview)):
        raise TypeError(f"{what} must be a collection, not a single {type(value).__name__}")


def _versions(value: Iterable[int]) -> frozenset[int]:
    _not_a_single(value, "versions")
    return frozenset(value)


def _check_versions(instance: object, attribute: attrs.Attribute[Any], value: frozenset[int]) -> None:
    if not 1 <= len(value) <= MAX_VERSIONS:
        raise ValueError(f"a HELLO lists 1 to {MAX_VERSIONS} protocol versions, not {len(value)}")
    for version in value:
        if not isinstance(version, int) or isinstance(version, bool) or not 1 <= version <= 255:
            raise ValueError(f"protocol version {version!r} is not an integer from 1 to 255")


def _label_problem(label: str) -> Optional[str]:
    """Why C{label} cannot be a HELLO label, or L{None}."""
    try:
        size = len(label.encode("utf-8"))
    except UnicodeEncodeError:
        return "is not valid Unicode text"
    if size > MAX_LABEL_BYTES:
        return f"is {size} bytes in UTF-8, over the limit of {MAX_LABEL_BYTES}"
    for char in label:
        if unicodedata.category(char) in ("Cc", "Zl", "Zp"):
            return f"holds the control character U+{ord(char):04X}"
    return None


def _check_label(instance: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if not isinstance(value, str):
        raise TypeError(f"label must be a string, not {type(value).__name__}")
    problem = _label_problem(value)
    if problem is not None:
        raise ValueError(f"label {value!r} {problem}")


def _fingerprints(value: Iterable[str]) -> frozenset[str]:
    _not_a_single(value, "vouched_relays")
    return frozenset(parse_fingerprint(fp) for fp in value)


def _check_vouched(instance: object, attribute: attrs.Attribute[Any], value: frozenset[str]) -> None:
    if len(value) > MAX_VOUCHED:
        raise ValueError(f"a TRUST_CHAIN vouches for at most {MAX_VOUCHED} relays, not {len(value)}")


def _room_hashes(value: Iterable[bytes]) -> frozenset[bytes]:
    _not_a_single(value, "room_hashes")
    return frozenset(value)


def _check_rooms(instance: object, attribute: attrs.Attribute[Any], value: frozenset[bytes]) -> None:
    if not 1 <= len(value) <= MAX_ROOMS:
        raise ValueError(f"a subscription names 1 to {MAX_ROOMS} rooms, not {len(value)}")
    for item in value:
        if not isinstance(item, bytes) or len(item) != ROOM_HASH_SIZE:
            raise ValueError(f"room hash {item!r} is not {ROOM_HASH_SIZE} bytes")


@attrs.frozen
class Hello:
    """
    The first message on a link.

    @ivar versions: the relay protocol versions the sender speaks.
    @ivar label: a name for people and logs; not an identity.
    @ivar udp_port: where the sender takes sealed datagrams, 0 for nowhere.
    @ivar max_hops: the TTL the sender gives the frames it originates.
    """

    versions: frozenset[int] = attrs.field(converter=_versions, validator=_check_versions)
    label: str = attrs.field(validator=_check_label)
    udp_port: int = attrs.field(validator=int_in(0, 65535))
    max_hops: int = attrs.field(validator=int_in(1, MAX_TTL))


@attrs.frozen
class TrustChain:
    """
    The relays whose media the sender may forward on this link, as canonical
    fingerprints (any form L{parse_fingerprint} accepts is converted).
    """

    vouched_relays: frozenset[str] = attrs.field(converter=_fingerprints, validator=_check_vouched)


@attrs.frozen
class Subscribe:
    """Send me the media of these rooms (8-byte room hashes)."""

    room_hashes: frozenset[bytes] = attrs.field(converter=_room_hashes, validator=_check_rooms)


@attrs.frozen
class Unsubscribe:
    """Stop sending me the media of these rooms (8-byte room hashes)."""

    room_hashes: frozenset[bytes] = attrs.field(converter=_room_hashes, validator=_check_rooms)


@attrs.frozen
class Media:
    """A frame sent on the stream, where UDP is blocked or not yet confirmed."""

    frame: Frame = attrs.field(validator=attrs.validators.instance_of(Frame))


@attrs.frozen
class UdpAck:
    """The sealed UDP probe carrying C{nonce} arrived."""

    nonce: bytes = attrs.field(validator=_nonce)


@attrs.frozen
class Ping:
    """Keepalive; answer with a L{Pong} carrying the same nonce."""

    nonce: bytes = attrs.field(validator=_nonce)


@attrs.frozen
class Pong:
    """The answer to the L{Ping} with this nonce."""

    nonce: bytes = attrs.field(validator=_nonce)


ControlMessage = Union[Hello, TrustChain, Subscribe, Unsubscribe, Media, UdpAck, Ping, Pong]


# Encoding


def _encode_payload(message: ControlMessage) -> tuple[MessageType, bytes]:
    if isinstance(message, Hello):
        label = message.label.encode("utf-8")
        return MessageType.HELLO, b"".join(
            (
                bytes((len(message.versions),)),
                bytes(sorted(message.versions)),
                bytes((len(label),)),
                label,
                message.udp_port.to_bytes(2, "big"),
                bytes((message.max_hops,)),
            )
        )
    if isinstance(message, TrustChain):
        fingerprints = sorted(bytes.fromhex(fp) for fp in message.vouched_relays)
        return MessageType.TRUST_CHAIN, len(fingerprints).to_bytes(2, "big") + b"".join(fingerprints)
    if isinstance(message, (Subscribe, Unsubscribe)):
        kind = MessageType.SUBSCRIBE if isinstance(message, Subscribe) else MessageType.UNSUBSCRIBE
        rooms = sorted(message.room_hashes)
        return kind, len(rooms).to_bytes(2, "big") + b"".join(rooms)
    if isinstance(message, Media):
        return MessageType.MEDIA, encode_frame(message.frame)
    if isinstance(message, UdpAck):
        return MessageType.UDP_ACK, message.nonce
    if isinstance(message, Ping):
        return MessageType.PING, message.nonce
    if isinstance(message, Pong):
        return MessageType.PONG, message.nonce
    raise TypeError(f"not a relay control message: {type(message).__name__}")


def encode_control(message: ControlMessage) -> bytes:
    """C{message} as it goes on the stream: length prefix, version, type, payload."""
    kind, payload = _encode_payload(message)
    length = _HEADER_SIZE + len(payload)
    return length.to_bytes(_LENGTH_SIZE, "big") + bytes((CONTROL_VERSION, kind)) + payload


# Decoding


class _Reader:
    """Reads C{data[pos:]}; offsets in errors are C{base + pos}."""

    __slots__ = ("base", "data", "pos")

    def __init__(self, data: bytes, base: int) -> None:
        self.data = data
        self.base = base
        self.pos = 0

    def fail(self, field: str, reason: str, pos: Optional[int] = None) -> ControlError:
        return ControlError(self.base + (self.pos if pos is None else pos), field, reason)

    def take(self, n: int, field: str) -> bytes:
        left = len(self.data) - self.pos
        if n > left:
            raise self.fail(field, f"truncated: needs {n} bytes, {left} left")
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def uint(self, size: int, field: str) -> int:
        return int.from_bytes(self.take(size, field), "big")

    def ascending(self, count: int, size: int, field: str) -> list[bytes]:
        """C{count} items of C{size} bytes, each greater than the one before."""
        items: list[bytes] = []
        for i in range(count):
            start = self.pos
            item = self.take(size, f"{field}[{i}]")
            if items and item <= items[-1]:
                what = "repeats" if item == items[-1] else "is out of order after"
                raise self.fail(f"{field}[{i}]", f"{what} the previous entry (entries are strictly ascending)", start)
            items.append(item)
        return items

    def end(self, field: str) -> None:
        left = len(self.data) - self.pos
        if left:
            raise self.fail(field, f"{left} trailing bytes")


def _decode_hello(r: _Reader) -> Hello:
    start = r.pos
    count = r.uint(1, "hello.versions")
    if not 1 <= count <= MAX_VERSIONS:
        raise r.fail("hello.versions", f"{count} versions, expected 1 to {MAX_VERSIONS}", start)
    versions = r.ascending(count, 1, "hello.versions")
    if versions[0] == b"\x00":
        raise r.fail("hello.versions[0]", "protocol version 0 does not exist", start + 1)
    start = r.pos
    size = r.uint(1, "hello.label")
    if size > MAX_LABEL_BYTES:
        raise r.fail("hello.label", f"{size} bytes, over the limit of {MAX_LABEL_BYTES}", start)
    raw = r.take(size, "hello.label")
    try:
        label = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise r.fail("hello.label", f"not UTF-8 ({e.reason})", start + 1 + e.start) from None
    problem = _label_problem(label)
    if problem is not None:
        raise r.fail("hello.label", f"label {problem}", start)
    udp_port = r.uint(2, "hello.udp_port")
    start = r.pos
    max_hops = r.uint(1, "hello.max_hops")
    if max_hops == 0:
        raise r.fail("hello.max_hops", f"0 is not between 1 and {MAX_TTL}", start)
    r.end("hello")
    return Hello(versions=frozenset(v[0] for v in versions), label=label, udp_port=udp_port, max_hops=max_hops)


def _decode_trust_chain(r: _Reader) -> TrustChain:
    start = r.pos
    count = r.uint(2, "trust_chain.vouched_relays")
    if count > MAX_VOUCHED:
        raise r.fail("trust_chain.vouched_relays", f"{count} relays, over the limit of {MAX_VOUCHED}", start)
    fingerprints = r.ascending(count, _FINGERPRINT_SIZE, "trust_chain.vouched_relays")
    r.end("trust_chain")
    return TrustChain(vouched_relays=frozenset(fp.hex() for fp in fingerprints))


def _decode_rooms(r: _Reader, name: str) -> frozenset[bytes]:
    start = r.pos
    count = r.uint(2, f"{name}.room_hashes")
    if not 1 <= count <= MAX_ROOMS:
        raise r.fail(f"{name}.room_hashes", f"{count} rooms, expected 1 to {MAX_ROOMS}", start)
    rooms = r.ascending(count, ROOM_HASH_SIZE, f"{name}.room_hashes")
    r.end(name)
    return frozenset(rooms)


def _decode_media(r: _Reader) -> Media:
    start = r.pos
    try:
        frame = decode_frame(r.data[start:])
    except FrameError as e:
        raise r.fail(f"media.{e.field}", e.reason, start + e.offset) from None
    return Media(frame)


def _decode_nonce(r: _Reader, name: str) -> bytes:
    nonce = r.take(NONCE_SIZE, f"{name}.nonce")
    r.end(name)
    return nonce


def _check_envelope(data: Union[bytes, bytearray], pos: int, base: int) -> int:
    """
    Refuse a message by as much of its envelope as C{data[pos:]} holds (at
    least the length prefix), before its payload is buffered; C{base} is the
    stream offset of C{data[0]}.  Returns the declared length.
    """
    length = int.from_bytes(data[pos : pos + _LENGTH_SIZE], "big")
    if length < _HEADER_SIZE:
        raise ControlError(base + pos, "length", f"{length} is too short for a message (at least {_HEADER_SIZE})")
    if length > MAX_CONTROL:
        raise ControlError(base + pos, "length", f"{length} bytes, over the limit of {MAX_CONTROL}")
    available = len(data) - pos
    if available > _LENGTH_SIZE:
        version = data[pos + _LENGTH_SIZE]
        if version != CONTROL_VERSION:
            raise ControlError(
                base + pos + _LENGTH_SIZE,
                "version",
                f"unsupported control version {version} (this relay reads {CONTROL_VERSION})",
            )
    if available > _LENGTH_SIZE + 1:
        kind = data[pos + _LENGTH_SIZE + 1]
        if kind not in _MAX_PAYLOAD:
            raise ControlError(base + pos + _LENGTH_SIZE + 1, "type", f"unknown message type {kind}")
        limit = _MAX_PAYLOAD[kind]
        if length - _HEADER_SIZE > limit:
            raise ControlError(
                base + pos,
                "length",
                f"declares a {length - _HEADER_SIZE}-byte payload, over the {limit} bytes a "
                f"{MessageType(kind).name} can need",
            )
    return length


def _decode_body(body: bytes, base: int) -> ControlMessage:
    """
    The message whose version, type and payload are C{body} (its envelope
    already checked); C{base} is the stream offset of C{body[0]}.
    """
    kind = body[1]
    r = _Reader(body[_HEADER_SIZE:], base + _HEADER_SIZE)
    if kind == MessageType.HELLO:
        return _decode_hello(r)
    if kind == MessageType.TRUST_CHAIN:
        return _decode_trust_chain(r)
    if kind == MessageType.SUBSCRIBE:
        return Subscribe(_decode_rooms(r, "subscribe"))
    if kind == MessageType.UNSUBSCRIBE:
        return Unsubscribe(_decode_rooms(r, "unsubscribe"))
    if kind == MessageType.MEDIA:
        return _decode_media(r)
    if kind == MessageType.UDP_ACK:
        return UdpAck(_decode_nonce(r, "udp_ack"))
    if kind == MessageType.PING:
        return Ping(_decode_nonce(r, "ping"))
    if kind == MessageType.PONG:
        return Pong(_decode_nonce(r, "pong"))
    raise AssertionError(f"type {kind} passed the header check")  # pragma: no cover


def decode_control(data: bytes) -> ControlMessage:
    """
    The one complete message C{data} holds (length prefix included).

    @raise ControlError: when C{data} is not exactly one acceptable message.
    """
    data = _as_bytes(data)
    messages, used = _decode_some(data, 0, limit=1)
    if not messages:
        if len(data) < _LENGTH_SIZE:
            raise ControlError(0, "length", f"truncated: needs {_LENGTH_SIZE} bytes, {len(data)} present")
        length = int.from_bytes(data[:_LENGTH_SIZE], "big")
        raise ControlError(
            len(data), "message", f"truncated: the length prefix declares {length} bytes, {len(data) - 4} present"
        )
    if used != len(data):
        raise ControlError(used, "message", f"{len(data) - used} trailing bytes")
    return messages[0]


def _as_bytes(data: bytes) -> bytes:
    if isinstance(data, (bytearray, memoryview)):
        return bytes(data)
    if not isinstance(data, bytes):
        raise TypeError(f"control data must be bytes, not {type(data).__name__}")
    return data


def _decode_some(
    data: Union[bytes, bytearray], base: int, limit: Optional[int] = None
) -> tuple[list[ControlMessage], int]:
    """
    The complete messages at the start of C{data} (which sits at stream
    offset C{base}) and how many bytes they use.  An incomplete message whose
    envelope is already refusable is refused.

    @raise ControlError: at the first malformation.
    """
    messages: list[ControlMessage] = []
    pos = 0
    size = len(data)
    while size - pos >= _LENGTH_SIZE and (limit is None or len(messages) < limit):
        length = _check_envelope(data, pos, base)
        end = pos + _LENGTH_SIZE + length
        if end > size:
            break
        messages.append(_decode_body(bytes(data[pos + _LENGTH_SIZE : end]), base + pos + _LENGTH_SIZE))
        pos = end
    return messages, pos


class ControlDecoder:
    """
    Turns the bytes of a stream, in chunks of any size, into messages.

    At most one incomplete message is kept between calls, and never more
    than C{4 + MAX_CONTROL} bytes of it.  After an error the decoder is
    spent: every later L{feed} raises the same error.
    """

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._offset = 0  # stream offset of self._buffer[0]
        self._error: Optional[ControlError] = None

    @property
    def buffered(self) -> int:
        """Bytes of an incomplete message held."""
        return len(self._buffer)

    @property
    def offset(self) -> int:
        """Stream offset of the first byte not yet part of a returned message."""
        return self._offset

    def feed(self, data: bytes) -> list[ControlMessage]:
        """
        The messages completed by C{data}, in order.

        @raise ControlError: at the first malformation in the stream; messages
            completed earlier in the same chunk are not returned.
        """
        if self._error is not None:
            raise self._error
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise TypeError(f"control data must be bytes, not {type(data).__name__}")
        self._buffer += data
        try:
            messages, used = _decode_some(self._buffer, self._offset)
        except ControlError as e:
            self._error = e
            self._buffer = bytearray()
            raise
        if used:
            del self._buffer[:used]
            self._offset += used
        return messages
