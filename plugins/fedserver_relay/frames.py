"""
The relay media frame: one versioned layout carrying room, origin, TTL and
packet id.

The delegated-trust PRD sketches two federation datagrams,
C{[room_hash 8][origin_fp 8][media]} and C{[room_hash 8][ttl 1][media]}, and
neither holds both the origin (needed for the trust decision) and the TTL
(needed to bound chains), nor anything to suppress loops.  fedserver uses
this single frame instead, on UDP (sealed by L{fedserver_relay.datagram}) and
on the TLS stream (inside a MEDIA control message) alike.  Version 1, all
integers big-endian::

    offset  size  field
         0     1  version          0x01 (FRAME_VERSION); 0xFF is never a frame version
         1     8  room hash        first 8 bytes of SHA-256(UTF-8 room name), see room_hash()
         9     8  origin           short id of the relay that produced the media:
                                   first 8 bytes of its certificate fingerprint
        17     1  ttl              relay-to-relay links the frame may still cross,
                                   counting the one it arrived on
        18     8  packet id        chosen by the origin, unique per origin;
                                   (origin, packet id) is the duplicate-suppression key
        26     2  payload length   1 to MAX_PAYLOAD
        28     n  payload          the media packet, opaque to relays

The header is L{FRAME_HEADER_SIZE} = 28 bytes.  The explicit length makes the
frame self-delimiting, so bytes after the payload are detected and refused.

Size budget.  A sealed frame must fit an IPv6 path with the minimum MTU of
1280 bytes (RFC 8200 section 5) without fragmentation::

    1280  IPv6 minimum link MTU
    - 40  IPv6 header
    -  8  UDP header
    - 33  datagram protection: version 1 + link id 8 + sequence 8 + Poly1305 tag 16
    - 28  frame header
    = 1171 bytes of payload (MAX_PAYLOAD)

(A 1200-byte payload, a common WebRTC figure, would make a 1309-byte IPv6
packet and does not fit.)  Over IPv4 the same frame leaves 20 bytes spare.

TTL.  The origin sends with TTL = its C{max_federation_hops} (default
L{DEFAULT_TTL} = 2: one intermediate relay, A -> B -> C).  A relay that
receives a frame delivers it to its local participants and forwards it only
when L{next_hop} gives a frame back, with the TTL one less: received with
TTL 1 or 0, a frame is delivered locally and goes no further.

Loops.  TTL bounds a chain's length but not the copies a mesh with cycles
makes; every relay also drops a frame whose (origin, packet id) it has
already seen, with a L{DuplicateFilter}.  The origin must therefore not
repeat a packet id within the filter's window, and since origins are not
authenticated (a linked relay can send frames naming another origin), ids
must not be predictable either, or forged frames sent ahead would make the
genuine ones drop as duplicates: the relay draws each one at random (64
bits from C{os.urandom}), and marks a frame as seen only once it was
accepted.  A receiver treats TTL 0 as spent: a frame never arrives with it
from a relay that follows these rules.
"""

from __future__ import annotations

import collections
import hashlib
import struct
from typing import Any, Callable, Optional, Protocol

import attrs

from fedserver_relay.fingerprint import SHORT_ID_SIZE

__all__ = [
    "DEFAULT_TTL",
    "FRAME_HEADER_SIZE",
    "FRAME_VERSION",
    "IPV6_MIN_MTU",
    "IP_UDP_OVERHEAD",
    "MAX_FRAME_SIZE",
    "MAX_PACKET_ID",
    "MAX_PAYLOAD",
    "MAX_TTL",
    "ROOM_HASH_SIZE",
    "SEAL_OVERHEAD",
    "DecodeError",
    "DuplicateFilter",
    "Frame",
    "FrameError",
    "Validator",
    "check_payload",
    "check_ttl",
    "decode_frame",
    "encode_frame",
    "int_in",
    "next_hop",
    "room_hash",
    "unchecked_frame",
    "with_ttl",
]

#: The version byte of the only frame layout so far.
FRAME_VERSION = 1
#: Bytes of a room hash.
ROOM_HASH_SIZE = 8
#: The header before the payload: version, room hash, origin, ttl, packet id, length.
FRAME_HEADER_SIZE = 1 + ROOM_HASH_SIZE + SHORT_ID_SIZE + 1 + 8 + 2
#: The IPv6 minimum link MTU (RFC 8200 section 5), and the IPv6 and UDP headers.
IPV6_MIN_MTU = 1280
IP_UDP_OVERHEAD = 40 + 8
#: What sealing adds (L{fedserver_relay.datagram.DATAGRAM_OVERHEAD}; a test keeps them equal).
SEAL_OVERHEAD = 1 + 8 + 8 + 16
#: The IPv6 minimum MTU, less IPv6 and UDP headers, datagram protection and
#: the frame header (see the module docstring): 1171.
MAX_PAYLOAD = IPV6_MIN_MTU - IP_UDP_OVERHEAD - SEAL_OVERHEAD - FRAME_HEADER_SIZE
#: The largest encoded frame.
MAX_FRAME_SIZE = FRAME_HEADER_SIZE + MAX_PAYLOAD
#: The TTL an origin uses unless configured otherwise (one intermediate relay).
DEFAULT_TTL = 2
#: The largest TTL the byte can carry; relays clamp to their own limit.
MAX_TTL = 255
#: The largest packet id.
MAX_PACKET_ID = 2**64 - 1

_OFFSET_ROOM = 1
_OFFSET_ORIGIN = _OFFSET_ROOM + ROOM_HASH_SIZE
_OFFSET_TTL = _OFFSET_ORIGIN + SHORT_ID_SIZE
_OFFSET_PACKET_ID = _OFFSET_TTL + 1
_OFFSET_LENGTH = _OFFSET_PACKET_ID + 8
#: the header as one struct: version, room hash, origin, ttl, packet id, payload length
_HEADER = struct.Struct(f">B{ROOM_HASH_SIZE}s{SHORT_ID_SIZE}sBQH")
assert _HEADER.size == FRAME_HEADER_SIZE


class DecodeError(ValueError):
    """
    Bytes of the relay protocol that are not acceptable; the subclass says
    what they should have been (C{what}).

    @ivar offset: the byte offset in the input where the problem was found.
    @ivar field: the (dotted) name of the field being read.
    @ivar reason: what is wrong, in words.
    """

    what = "relay protocol data"

    def __init__(self, offset: int, field: str, reason: str) -> None:
        super().__init__(f"invalid {self.what} at offset {offset} ({field}): {reason}")
        self.offset = offset
        self.field = field
        self.reason = reason


class FrameError(DecodeError):
    """The bytes are not an acceptable relay frame."""

    what = "relay frame"


#: an attrs validator
Validator = Callable[[Any, "attrs.Attribute[Any]", Any], None]


def _fixed_bytes(size: int) -> Validator:
    def check(instance: object, attribute: attrs.Attribute[Any], value: object) -> None:
        if not isinstance(value, bytes):
            raise TypeError(f"{attribute.name} must be bytes, not {type(value).__name__}")
        if len(value) != size:
            raise ValueError(f"{attribute.name} must be {size} bytes, not {len(value)}")

    return check


def int_in(low: int, high: int) -> Validator:
    """An attrs validator: an integer (not a bool) from C{low} to C{high}."""

    def check(instance: object, attribute: attrs.Attribute[Any], value: object) -> None:
        if not isinstance(value, int) or isinstance(value, bool):
            raise TypeError(f"{attribute.name} must be an integer, not {type(value).__name__}")
        if not low <= value <= high:
            raise ValueError(f"{attribute.name} must be between {low} and {high}, not {value}")

    return check


def check_payload(value: object) -> None:
    """
    Refuse what is not a frame payload: bytes, 1 to L{MAX_PAYLOAD} of them.

    @raise TypeError: when C{value} is not bytes.
    @raise ValueError: for a size out of bounds.
    """
    if not isinstance(value, bytes):
        raise TypeError(f"payload must be bytes, not {type(value).__name__}")
    if not 1 <= len(value) <= MAX_PAYLOAD:
        raise ValueError(f"payload must be 1 to {MAX_PAYLOAD} bytes, not {len(value)}")


def _payload(instance: object, attribute: attrs.Attribute[Any], value: object) -> None:
    check_payload(value)


def check_ttl(value: object) -> None:
    """
    Refuse what is not a TTL: an integer from 0 to L{MAX_TTL}.

    @raise TypeError: when C{value} is not an integer.
    @raise ValueError: for one out of bounds.
    """
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"ttl must be an integer, not {type(value).__name__}")
    if not 0 <= value <= MAX_TTL:
        raise ValueError(f"ttl must be between 0 and {MAX_TTL}, not {value}")


def _payload_repr(payload: bytes) -> str:
    return f"<{len(payload)} bytes>"


@attrs.frozen
class Frame:
    """
    A media frame.  Every field is checked on construction, so any L{Frame}
    encodes.

    @ivar room_hash: L{room_hash} of the room, 8 bytes.
    @ivar origin: the origin relay's L{short_id <fedserver_relay.fingerprint.short_id>}, 8 bytes.
    @ivar ttl: links the frame may still cross, 0 to 255.
    @ivar packet_id: the origin's id for this packet, 0 to 2**64 - 1.
    @ivar payload: the media packet, 1 to L{MAX_PAYLOAD} bytes.
    """

    room_hash: bytes = attrs.field(validator=_fixed_bytes(ROOM_HASH_SIZE))
    origin: bytes = attrs.field(validator=_fixed_bytes(SHORT_ID_SIZE))
    ttl: int = attrs.field(validator=int_in(0, MAX_TTL))
    packet_id: int = attrs.field(validator=int_in(0, MAX_PACKET_ID))
    payload: bytes = attrs.field(validator=_payload, repr=_payload_repr)


_new = object.__new__
# the slots' own setters: what a frozen class's __init__ uses, bypassing its __setattr__ as object.__setattr__ does
_set_room_hash, _set_origin, _set_ttl, _set_packet_id, _set_payload = (
    Frame.__dict__[name].__set__ for name in ("room_hash", "origin", "ttl", "packet_id", "payload")
)


def unchecked_frame(room_hash: bytes, origin: bytes, ttl: int, packet_id: int, payload: bytes,
                    cls: type[Frame] = Frame) -> Frame:
    """
    A L{Frame} of fields the caller knows to be valid, made without the checks
    of C{Frame(...)}: the relay's per-frame path makes frames from fields that
    were checked already (a decoded frame's, a TTL one less, its own origin).
    Anything else must call C{Frame(...)}.
    """
    # what the __init__ attrs generates for a frozen class does, less the validators
    frame = _new(cls)
    _set_room_hash(frame, room_hash)
    _set_origin(frame, origin)
    _set_ttl(frame, ttl)
    _set_packet_id(frame, packet_id)
    _set_payload(frame, payload)
    return frame


def room_hash(name: str) -> bytes:
    """
    The 8-byte hash frames carry for the room C{name}: the first 8 bytes of
    the SHA-256 of its UTF-8 encoding.  Names are hashed exactly as given (no
    Unicode normalization or case folding): relays must agree on the name.

    @raise ValueError: for an empty name or one that is not valid Unicode text.
    """
    if not isinstance(name, str):
        raise TypeError(f"a room name must be a string, not {type(name).__name__}")
    if not name:
        raise ValueError("a room name must not be empty")
    try:
        encoded = name.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"room name {name!r} is not valid Unicode text: {e.reason}") from None
    return hashlib.sha256(encoded).digest()[:ROOM_HASH_SIZE]


def encode_frame(frame: Frame) -> bytes:
    """The version 1 encoding of C{frame}."""
    payload = frame.payload
    return _HEADER.pack(FRAME_VERSION, frame.room_hash, frame.origin, frame.ttl, frame.packet_id,
                        len(payload)) + payload


def decode_frame(data: bytes) -> Frame:
    """
    The frame C{data} encodes, which must be exactly one version 1 frame.

    @raise FrameError: for anything else: too large, truncated, another
        version, a payload length of 0 or over L{MAX_PAYLOAD}, bytes after
        the payload.
    @raise TypeError: when C{data} is not bytes-like.
    """
    if isinstance(data, (bytearray, memoryview)):
        data = bytes(data)
    if not isinstance(data, bytes):
        raise TypeError(f"a frame must be bytes, not {type(data).__name__}")
    size = len(data)
    # every well-formed frame: the header, then as many bytes as its length says (1 to MAX_PAYLOAD)
    if FRAME_HEADER_SIZE < size <= MAX_FRAME_SIZE and data[0] == FRAME_VERSION:
        _, room, origin, ttl, packet_id, length = _HEADER.unpack_from(data)
        if length == size - FRAME_HEADER_SIZE:
            return unchecked_frame(room, origin, ttl, packet_id, data[FRAME_HEADER_SIZE:])
    # anything else is refused below, each problem in its own words
    if size > MAX_FRAME_SIZE:
        raise FrameError(0, "frame", f"{size} bytes, over the limit of {MAX_FRAME_SIZE}")
    if size == 0:
        raise FrameError(0, "version", "empty input")
    if data[0] != FRAME_VERSION:
        raise FrameError(0, "version", f"unsupported frame version {data[0]} (this relay reads {FRAME_VERSION})")
    for offset, end, field in (
        (_OFFSET_ROOM, _OFFSET_ORIGIN, "room hash"),
        (_OFFSET_ORIGIN, _OFFSET_TTL, "origin"),
        (_OFFSET_TTL, _OFFSET_PACKET_ID, "ttl"),
        (_OFFSET_PACKET_ID, _OFFSET_LENGTH, "packet id"),
        (_OFFSET_LENGTH, FRAME_HEADER_SIZE, "payload length"),
    ):
        if size < end:
            raise FrameError(offset, field, f"truncated: needs {end - offset} bytes, {max(size - offset, 0)} left")
    length = int.from_bytes(data[_OFFSET_LENGTH:FRAME_HEADER_SIZE], "big")
    if not 1 <= length <= MAX_PAYLOAD:
        raise FrameError(_OFFSET_LENGTH, "payload length", f"{length} is not between 1 and {MAX_PAYLOAD}")
    left = size - FRAME_HEADER_SIZE
    if left < length:
        raise FrameError(FRAME_HEADER_SIZE, "payload", f"truncated: needs {length} bytes, {left} left")
    if left > length:
        raise FrameError(FRAME_HEADER_SIZE + length, "payload", f"{left - length} trailing bytes")
    return Frame(
        room_hash=data[_OFFSET_ROOM:_OFFSET_ORIGIN],
        origin=data[_OFFSET_ORIGIN:_OFFSET_TTL],
        ttl=data[_OFFSET_TTL],
        packet_id=int.from_bytes(data[_OFFSET_PACKET_ID:_OFFSET_LENGTH], "big"),
        payload=data[FRAME_HEADER_SIZE:],
    )


def with_ttl(frame: Frame, ttl: int) -> Frame:
    """C{frame} with its TTL replaced by C{ttl} (0 to 255)."""
    check_ttl(ttl)  # the other fields are a frame's, so valid
    return unchecked_frame(frame.room_hash, frame.origin, ttl, frame.packet_id, frame.payload, frame.__class__)


def next_hop(frame: Frame) -> Optional[Frame]:
    """
    What to forward of a received C{frame}: the frame with its TTL one less,
    or L{None} when it arrived with TTL 1 or 0 and must go no further.
    """
    ttl = frame.ttl
    if ttl <= 1:
        return None
    return unchecked_frame(frame.room_hash, frame.origin, ttl - 1, frame.packet_id, frame.payload, frame.__class__)


class Clock(Protocol):
    """What L{DuplicateFilter} needs of a clock: C{IReactorTime.seconds}."""

    def seconds(self) -> float: ...


class DuplicateFilter:
    """
    Remembers the (origin, packet id) of recent frames so that copies coming
    back around a loop (A -> B -> C -> A) or over parallel paths are dropped.

    Memory is bounded twice: an entry is forgotten C{window} seconds after it
    was first seen, and when C{max_entries} are held the oldest is forgotten
    to make room.  Each check is amortized O(1).  A sender that floods more
    than C{max_entries} distinct packets within C{window} seconds can push
    entries out early, so a copy of those may pass once more; TTL still ends
    it.

    @param clock: an C{IReactorTime} (only C{seconds()} is used).
    """

    def __init__(self, clock: Clock, *, window: float = 10.0, max_entries: int = 65536) -> None:
        if not window > 0:
            raise ValueError(f"window must be positive, not {window!r}")
        if max_entries < 1:
            raise ValueError(f"max_entries must be at least 1, not {max_entries!r}")
        self._clock = clock
        self._window = float(window)
        self._max_entries = max_entries
        # (origin, packet id) -> first-seen time, oldest first
        self._seen: collections.OrderedDict[tuple[bytes, int], float] = collections.OrderedDict()
        self._latest = float("-inf")
        # at most the first-seen time of the oldest entry (infinity when there is none): nothing expires
        # before; only when it may does seen_before look at the entries
        self._oldest = float("inf")

    def __len__(self) -> int:
        return len(self._seen)

    def seen_before(self, origin: bytes, packet_id: int, *, remember: bool = True) -> bool:
        """
        Whether (C{origin}, C{packet_id}) was seen within the window.  When it
        was not, it is remembered from now on (unless C{remember} is false:
        the caller remembers it later, once the frame was accepted), and the
        answer is C{False}.
        """
        # A clock stepping backwards must not unsort the entries.
        now = self._clock.seconds()
        if now < self._latest:
            now = self._latest
        else:
            self._latest = now
        seen = self._seen
        horizon = now - self._window
        if self._oldest <= horizon:
            while seen:
                key, first = next(iter(seen.items()))
                if first > horizon:
                    self._oldest = first
                    break
                del seen[key]
            else:
                self._oldest = float("inf")
        key = (origin, packet_id)
        if key in seen:
            return True
        if not remember:
            return False
        seen[key] = now
        if len(seen) > self._max_entries:
            _, self._oldest = seen.popitem(last=False)  # the new oldest was first seen then or later
        elif len(seen) == 1:
            self._oldest = now
        return False

    def seen_frame(self, frame: Frame, *, remember: bool = True) -> bool:
        """L{seen_before} for C{frame}'s origin and packet id."""
        return self.seen_before(frame.origin, frame.packet_id, remember=remember)
