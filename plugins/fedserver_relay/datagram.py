"""
Sealed UDP datagrams between two linked relays.

Relays that hold an authenticated TLS link (mutual TLS, certificates
fingerprinted by L{fedserver_relay.fingerprint}) send frames over UDP
protected by keys exported from that link (RFC 5705; RFC 8446 section 7.5)::

    exported = TLS-Exporter(label=EXPORTER_LABEL, context=EXPORTER_CONTEXT, length=80)

    bytes  0-31  key for datagrams from the TLS client to the TLS server
          32-63  key for datagrams from the TLS server to the TLS client
          64-71  link id of the client-to-server direction
          72-79  link id of the server-to-client direction

Both ends compute the same 80 bytes, and each seals with the key of the
direction it sends in and opens with the other, so nothing secret crosses
the wire and no key is ever used by both sides.  Use TLS 1.3 (required by
L{LinkKeys.from_connection}): TLS 1.2 exporters are safe only with the
extended master secret.

A datagram, integers big-endian::

    offset  size  field
         0     1  version     DATAGRAM_VERSION (1)
         1     8  link id     of the sending direction, so the receiver finds
                              the link whatever the (unauthenticated) UDP source
         9     8  sequence    0, 1, 2, ... per direction, never reused
        17   n+16 ciphertext  ChaCha20-Poly1305 (RFC 8439) of the n-byte plaintext,
                              with its 16-byte tag; nonce = 4 zero bytes + sequence;
                              associated data = bytes 0-16 (the header)

so sealing adds L{DATAGRAM_OVERHEAD} = 33 bytes, and a frame of
L{MAX_FRAME_SIZE <fedserver_relay.frames.MAX_FRAME_SIZE>} (1199) bytes makes
a 1232-byte datagram, which with the IPv6 and UDP headers is the 1280-byte
IPv6 minimum MTU.

The plaintext is a frame (first byte L{FRAME_VERSION
<fedserver_relay.frames.FRAME_VERSION>}) or a UDP probe (first byte
L{PROBE_TAG}, then an 8-byte nonce), which the receiver acknowledges with a
UDP_ACK control message over TLS (see L{fedserver_relay.control}).

Replay.  The opener keeps a sliding window of L{REPLAY_WINDOW} sequence
numbers (RFC 4303 section 3.4.3, RFC 6479): a new highest number is
accepted and slides the window, an unseen number within the window is
accepted, a seen one or one below the window is dropped.  The window is
updated only after the tag verifies, so forged datagrams cannot move it.

Keys are never logged: they do not appear in any C{repr}.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import attrs
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from fedserver_relay.frames import FRAME_VERSION, MAX_FRAME_SIZE

__all__ = [
    "DATAGRAM_HEADER_SIZE",
    "DATAGRAM_OVERHEAD",
    "DATAGRAM_VERSION",
    "EXPORTER_CONTEXT",
    "EXPORTER_LABEL",
    "KEY_SIZE",
    "LINK_ID_SIZE",
    "MAX_DATAGRAM",
    "MAX_PLAINTEXT",
    "MAX_SEQUENCE",
    "PROBE_SIZE",
    "PROBE_TAG",
    "REPLAY_WINDOW",
    "DatagramError",
    "LinkKeys",
    "Opener",
    "ReplayWindow",
    "Sealer",
    "SequenceExhausted",
    "decode_probe",
    "encode_probe",
    "is_probe",
    "peek_link_id",
]

#: The version byte of the datagram layout.
DATAGRAM_VERSION = 1
#: The RFC 5705 exporter label (exporter labels start with "EXPORTER").
EXPORTER_LABEL = b"EXPORTER-fedserver-relay-udp"
#: The exporter context: the datagram version, so a new layout gets new keys.
EXPORTER_CONTEXT = bytes((DATAGRAM_VERSION,))
#: Bytes of a ChaCha20-Poly1305 key.
KEY_SIZE = 32
#: Bytes of a link id.
LINK_ID_SIZE = 8
#: Version, link id and sequence number.
DATAGRAM_HEADER_SIZE = 1 + LINK_ID_SIZE + 8
#: The Poly1305 tag.
TAG_SIZE = 16
#: What sealing adds to a plaintext.
DATAGRAM_OVERHEAD = DATAGRAM_HEADER_SIZE + TAG_SIZE
#: The largest plaintext: a frame of the largest size.
MAX_PLAINTEXT = MAX_FRAME_SIZE
#: The largest datagram (1232 bytes).
MAX_DATAGRAM = MAX_PLAINTEXT + DATAGRAM_OVERHEAD
#: The last sequence number a sealer uses.
MAX_SEQUENCE = 2**64 - 1
#: Sequence numbers the replay window covers.
REPLAY_WINDOW = 1024
#: The first plaintext byte of a UDP probe (never a frame version).
PROBE_TAG = 0xFF
#: A probe plaintext: the tag and an 8-byte nonce.
PROBE_SIZE = 1 + 8

_EXPORT_SIZE = 2 * KEY_SIZE + 2 * LINK_ID_SIZE
_NONCE_PAD = bytes(4)

assert PROBE_TAG != FRAME_VERSION


class DatagramError(ValueError):
    """
    A datagram was refused: malformed, not for this link, forged, or replayed.
    Drop it; never answer it (the source address is not authenticated).

    @ivar reason: what is wrong, in words.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(f"relay datagram refused: {reason}")
        self.reason = reason


class ReplayedDatagram(DatagramError):
    """A datagram whose sequence number was already received, or is older than the replay window."""


class SequenceExhausted(Exception):
    """
    A sealer has used every sequence number; the link must be re-established
    (a new TLS handshake gives new keys).
    """


def _redacted(value: bytes) -> str:
    return "<redacted>"


def _check_size(size: int) -> Callable[[Any, attrs.Attribute[Any], Any], None]:
    def check(instance: object, attribute: attrs.Attribute[Any], value: object) -> None:
        if not isinstance(value, bytes) or len(value) != size:
            raise ValueError(f"{attribute.name} must be {size} bytes")

    return check


@attrs.frozen
class LinkKeys:
    """
    One end's datagram keys for a TLS link.

    @ivar send_key: seals what this end sends.
    @ivar receive_key: opens what this end receives.
    @ivar send_link_id: put in what this end sends.
    @ivar receive_link_id: found in what this end receives; index links by it.
    """

    send_key: bytes = attrs.field(validator=_check_size(KEY_SIZE), repr=_redacted)
    receive_key: bytes = attrs.field(validator=_check_size(KEY_SIZE), repr=_redacted)
    send_link_id: bytes = attrs.field(validator=_check_size(LINK_ID_SIZE), repr=lambda v: v.hex())
    receive_link_id: bytes = attrs.field(validator=_check_size(LINK_ID_SIZE), repr=lambda v: v.hex())

    @classmethod
    def from_exporter(cls, export: Callable[[bytes, int, Optional[bytes]], bytes], is_client: bool) -> LinkKeys:
        """
        Derive the keys with a TLS exporter, such as a finished pyOpenSSL
        connection's C{export_keying_material}.

        @param is_client: whether this end was the TLS client of the link.
        """
        material = export(EXPORTER_LABEL, _EXPORT_SIZE, EXPORTER_CONTEXT)
        if not isinstance(material, bytes) or len(material) != _EXPORT_SIZE:
            raise ValueError("the TLS exporter gave no keying material (is the handshake finished?)")
        client_key = material[:KEY_SIZE]
        server_key = material[KEY_SIZE : 2 * KEY_SIZE]
        client_id = material[2 * KEY_SIZE : 2 * KEY_SIZE + LINK_ID_SIZE]
        server_id = material[2 * KEY_SIZE + LINK_ID_SIZE :]
        if is_client:
            return cls(client_key, server_key, client_id, server_id)
        return cls(server_key, client_key, server_id, client_id)

    @classmethod
    def from_connection(cls, connection: Any, *, is_client: bool) -> LinkKeys:
        """
        Derive the keys from a pyOpenSSL C{SSL.Connection} whose handshake is
        finished, refusing any protocol older than TLS 1.3.
        """
        from OpenSSL import SSL

        if connection.get_finished() is None or connection.get_peer_finished() is None:
            raise ValueError("relay datagram keys need a finished TLS handshake")
        version = connection.get_protocol_version_name()
        if version != "TLSv1.3":
            raise ValueError(f"relay datagram keys need a TLS 1.3 link, not {version}")
        try:
            return cls.from_exporter(connection.export_keying_material, is_client)
        except SSL.Error as e:
            raise ValueError(f"the TLS exporter failed: {e}") from None

    def sealer(self) -> Sealer:
        """A L{Sealer} for what this end sends."""
        return Sealer(self.send_key, self.send_link_id)

    def opener(self) -> Opener:
        """An L{Opener} for what this end receives."""
        return Opener(self.receive_key, self.receive_link_id)


class Sealer:
    """
    Seals plaintexts for one direction of a link, numbering them in order.

    @param first_sequence: where numbering starts (0; tests start near the end).
    """

    def __init__(self, key: bytes, link_id: bytes, *, first_sequence: int = 0) -> None:
        if len(key) != KEY_SIZE or len(link_id) != LINK_ID_SIZE:
            raise ValueError(f"a sealer needs a {KEY_SIZE}-byte key and an {LINK_ID_SIZE}-byte link id")
        if not 0 <= first_sequence <= MAX_SEQUENCE + 1:
            raise ValueError(f"first_sequence {first_sequence} is out of range")
        self._aead = ChaCha20Poly1305(bytes(key))
        self._prefix = bytes((DATAGRAM_VERSION,)) + bytes(link_id)
        self._next = first_sequence

    def __repr__(self) -> str:
        return f"<Sealer link {self._prefix[1:].hex()} next sequence {self._next}>"

    @property
    def next_sequence(self) -> int:
        """The sequence number of the next datagram."""
        return self._next

    def seal(self, plaintext: bytes) -> bytes:
        """
        The datagram carrying C{plaintext} (1 to L{MAX_PLAINTEXT} bytes).

        @raise SequenceExhausted: after sequence number 2**64 - 1 was used.
        """
        if not 1 <= len(plaintext) <= MAX_PLAINTEXT:
            raise ValueError(f"a datagram carries 1 to {MAX_PLAINTEXT} bytes, not {len(plaintext)}")
        sequence = self._next
        if sequence > MAX_SEQUENCE:
            raise SequenceExhausted("every datagram sequence number of this link is used; reconnect to re-key")
        self._next = sequence + 1
        counter = sequence.to_bytes(8, "big")
        header = self._prefix + counter
        return header + self._aead.encrypt(_NONCE_PAD + counter, bytes(plaintext), header)


class ReplayWindow:
    """
    The sequence numbers seen in one direction, as a sliding window of
    C{size} numbers below the highest one seen (RFC 4303 section 3.4.3).
    """

    def __init__(self, size: int = REPLAY_WINDOW) -> None:
        if size < 1:
            raise ValueError(f"a replay window holds at least 1 number, not {size}")
        self._size = size
        self._highest = -1
        # bit i set: highest - i was seen
        self._bits = 0
        self._mask = (1 << size) - 1

    @property
    def highest(self) -> int:
        """The highest number accepted so far, -1 before any."""
        return self._highest

    def check(self, sequence: int) -> Optional[str]:
        """Why C{sequence} must be dropped, or L{None} when it is acceptable."""
        if sequence > self._highest:
            return None
        behind = self._highest - sequence
        if behind >= self._size:
            return f"sequence {sequence} is too old (highest {self._highest}, window {self._size})"
        if self._bits >> behind & 1:
            return f"sequence {sequence} was already received"
        return None

    def update(self, sequence: int) -> None:
        """Record C{sequence}, which L{check} accepted."""
        if sequence > self._highest:
            shift = sequence - self._highest
            self._bits = ((self._bits << shift) | 1) & self._mask if shift < self._size else 1
            self._highest = sequence
        else:
            self._bits |= 1 << (self._highest - sequence)


def peek_link_id(datagram: bytes) -> bytes:
    """
    The link id of C{datagram}, to find the link (and its L{Opener}) it
    claims to belong to; nothing is authenticated yet.

    @raise DatagramError: when it cannot be a datagram.
    """
    _check_envelope(datagram)
    return bytes(datagram[1 : 1 + LINK_ID_SIZE])


def _check_envelope(datagram: bytes) -> None:
    if not isinstance(datagram, (bytes, bytearray, memoryview)):
        raise TypeError(f"a datagram must be bytes, not {type(datagram).__name__}")
    size = len(datagram)
    if size < DATAGRAM_OVERHEAD + 1:
        raise DatagramError(f"{size} bytes is too short (at least {DATAGRAM_OVERHEAD + 1})")
    if size > MAX_DATAGRAM:
        raise DatagramError(f"{size} bytes, over the limit of {MAX_DATAGRAM}")
    if datagram[0] != DATAGRAM_VERSION:
        raise DatagramError(f"unsupported datagram version {datagram[0]} (this relay reads {DATAGRAM_VERSION})")


class Opener:
    """Opens the datagrams of one direction of a link, refusing replays."""

    def __init__(self, key: bytes, link_id: bytes, *, window: int = REPLAY_WINDOW) -> None:
        if len(key) != KEY_SIZE or len(link_id) != LINK_ID_SIZE:
            raise ValueError(f"an opener needs a {KEY_SIZE}-byte key and an {LINK_ID_SIZE}-byte link id")
        self._aead = ChaCha20Poly1305(bytes(key))
        self._link_id = bytes(link_id)
        self._window = ReplayWindow(window)

    def __repr__(self) -> str:
        return f"<Opener link {self._link_id.hex()} highest sequence {self._window.highest}>"

    @property
    def link_id(self) -> bytes:
        return self._link_id

    def open(self, datagram: bytes) -> bytes:
        """
        The plaintext of C{datagram}.

        @raise DatagramError: for a bad version or size, another link's id, a
            tag that does not verify, or a replayed or too old sequence number.
        """
        _check_envelope(datagram)
        datagram = bytes(datagram)
        if datagram[1 : 1 + LINK_ID_SIZE] != self._link_id:
            raise DatagramError(f"link id {datagram[1 : 1 + LINK_ID_SIZE].hex()} is not this link's")
        counter = datagram[1 + LINK_ID_SIZE : DATAGRAM_HEADER_SIZE]
        sequence = int.from_bytes(counter, "big")
        header = datagram[:DATAGRAM_HEADER_SIZE]
        try:
            plaintext = self._aead.decrypt(_NONCE_PAD + counter, datagram[DATAGRAM_HEADER_SIZE:], header)
        except InvalidTag:
            raise DatagramError(f"authentication failed (sequence {sequence})") from None
        # judged after the tag: only an authentic copy counts as a replay, so forgeries cannot raise that count
        window = self._window
        problem = window.check(sequence)
        if problem is not None:
            raise ReplayedDatagram(problem)
        window.update(sequence)
        return plaintext


def encode_probe(nonce: bytes) -> bytes:
    """The plaintext of a UDP probe carrying the 8-byte C{nonce}."""
    if not isinstance(nonce, bytes) or len(nonce) != PROBE_SIZE - 1:
        raise ValueError(f"a probe nonce is {PROBE_SIZE - 1} bytes")
    return bytes((PROBE_TAG,)) + nonce


def is_probe(plaintext: bytes) -> bool:
    """Whether an opened plaintext is a probe (else it should be a frame)."""
    return len(plaintext) > 0 and plaintext[0] == PROBE_TAG


def decode_probe(plaintext: bytes) -> bytes:
    """
    The nonce of the probe C{plaintext}.

    @raise DatagramError: when it is not a well-formed probe.
    """
    if not is_probe(plaintext):
        raise DatagramError("not a UDP probe")
    if len(plaintext) != PROBE_SIZE:
        raise DatagramError(f"a UDP probe is {PROBE_SIZE} bytes, not {len(plaintext)}")
    return bytes(plaintext[1:])
