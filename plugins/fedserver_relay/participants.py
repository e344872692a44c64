"""
Local participants: clients on this relay's participant UDP port that join a
room with its token and send and receive media.

Datagrams, version 1 (byte 0), then a type (byte 1):

    client -> relay
      0x01 JOIN       [1 byte room name length][room name, UTF-8][token, UTF-8]
      0x02 MEDIA      [payload, 1 to MAX_PAYLOAD bytes]
      0x03 LEAVE
      0x04 KEEPALIVE
    relay -> client
      0x81 JOINED     [8 byte room hash]
      0x82 MEDIA      [8 byte origin relay short id][payload]
      0x83 ERROR      [reason, UTF-8]

A participant is its UDP address.  It is in one room at a time; it is
forgotten after L{IDLE_AFTER} seconds without a datagram.  A JOIN with an
unknown room or a wrong token changes nothing.  Media from a participant
enters the federation with this relay as its origin
(L{fedserver_relay.mesh.RelayMesh.frame_from_participant}).

UDP source addresses are not authenticated, so the relay never answers an
address that has not joined: a refused JOIN, or anything else from such an
address, is dropped without a reply (a forged source would otherwise make
the relay send its ERROR to someone else).  A client learns that its JOIN
failed from the absence of JOINED: it sends JOIN again now and then (say
every half second) and gives up after a few seconds.  A joined participant
is told what is wrong with ERROR.  Refusals are counted (C{refused}) and
logged at most once every L{LOG_EVERY} seconds, with the count.
"""

from __future__ import annotations

import hmac
from typing import Any, Dict, FrozenSet, Optional, Sequence, Set, Tuple

import attrs
from twisted.internet import protocol
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from fedserver_relay.frames import MAX_PAYLOAD, Frame, room_hash
from fedserver_relay.settings import Room

log = Logger(namespace="fedserver_relay.participants")

VERSION = 1
JOIN, MEDIA, LEAVE, KEEPALIVE = 0x01, 0x02, 0x03, 0x04
JOINED, MEDIA_OUT, ERROR = 0x81, 0x82, 0x83
_MEDIA_OUT = bytes((VERSION, MEDIA_OUT))
#: a participant silent this long is forgotten
IDLE_AFTER = 60.0
#: at most this many participants at once
MAX_PARTICIPANTS = 10_000
#: refused datagrams are logged at most once per this many seconds
LOG_EVERY = 10.0

Address = Tuple[str, int]


@attrs.define
class Participant:
    address: Address
    room: str
    room_hash: bytes
    last_seen: float


def join_datagram(room: str, token: str) -> bytes:
    """A JOIN datagram (for clients and tests)."""
    name = room.encode("utf-8")
    if not 1 <= len(name) <= 255:
        raise ValueError("a room name has 1 to 255 bytes")
    return bytes((VERSION, JOIN, len(name))) + name + token.encode("utf-8")


def media_datagram(payload: bytes) -> bytes:
    """A MEDIA datagram from a client."""
    return bytes((VERSION, MEDIA)) + payload


class ParticipantPort(protocol.DatagramProtocol):
    """The participant UDP port; the mesh's L{fedserver_relay.mesh.Participants}."""

    def __init__(self, rooms: Sequence[Room], *, clock: Any) -> None:
        self._rooms = {room.name: room for room in rooms}
        self.clock = clock
        self.mesh: Any = None
        self._by_address: Dict[Address, Participant] = {}
        self._by_room: Dict[bytes, Set[Address]] = {}
        self._sweeper: Optional[LoopingCall] = None
        #: datagrams refused (answered with ERROR only when from a participant)
        self.refused = 0
        self._last_logged = float("-inf")

    def startProtocol(self) -> None:
        self._sweeper = LoopingCall(self._sweep)
        self._sweeper.clock = self.clock
        self._sweeper.start(IDLE_AFTER / 4, now=False)

    def stopProtocol(self) -> None:
        if self._sweeper is not None and self._sweeper.running:
            self._sweeper.stop()

    def _send(self, data: bytes, address: Address) -> None:
        if self.transport is not None:
            self.transport.write(data, address)

    def _error(self, address: Address, reason: str, *, answer: bool = True) -> None:
        """
        Refuse a datagram: count it, log it now and then, and say why with
        ERROR (when C{answer}) only to an address that has joined (see the
        module docstring).
        """
        self.refused += 1
        now = float(self.clock.seconds())
        if now - self._last_logged >= LOG_EVERY:
            self._last_logged = now
            log.info("refused a participant datagram from {address}: {reason} ({count} refused so far; logged "
                     "at most every {every:g} s)", address=address, reason=reason, count=self.refused,
                     every=LOG_EVERY)
        if answer and address in self._by_address:
            self._send(bytes((VERSION, ERROR)) + reason.encode("utf-8"), address)

    def datagramReceived(self, data: bytes, address: Address) -> None:
        if len(data) < 2 or data[0] != VERSION:
            self._error(address, "not a version 1 datagram", answer=False)  # (nor is an ERROR one to them)
            return
        kind, body = data[1], data[2:]
        now = float(self.clock.seconds())
        participant = self._by_address.get(address)
        if participant is not None:
            participant.last_seen = now
        if kind == JOIN:
            self._join(address, body, now)
        elif kind == MEDIA:
            if participant is None:
                self._error(address, "join a room first")
            elif not 1 <= len(body) <= MAX_PAYLOAD:
                self._error(address, f"media payloads have 1 to {MAX_PAYLOAD} bytes")
            elif self.mesh is not None:
                self.mesh.frame_from_participant(participant.room, body, address)
        elif kind == LEAVE:
            self._leave(address)
        elif kind != KEEPALIVE:
            self._error(address, f"unknown datagram type {kind}")

    def _join(self, address: Address, body: bytes, now: float) -> None:
        if not body or len(body) < 1 + body[0]:
            self._error(address, "malformed JOIN")
            return
        try:
            name = body[1 : 1 + body[0]].decode("utf-8")
            token = body[1 + body[0] :].decode("utf-8")
        except UnicodeDecodeError:
            self._error(address, "malformed JOIN: not UTF-8")
            return
        room = self._rooms.get(name)
        if room is None or not hmac.compare_digest(room.token.encode("utf-8"), token.encode("utf-8")):
            self._error(address, "unknown room or wrong token")
            return
        if address not in self._by_address and len(self._by_address) >= MAX_PARTICIPANTS:
            self._error(address, "this relay has no room for more participants")
            return
        self._leave(address, announce=False)
        hashed = room_hash(name)
        self._by_address[address] = Participant(address, name, hashed, now)
        self._by_room.setdefault(hashed, set()).add(address)
        self._send(bytes((VERSION, JOINED)) + hashed, address)
        self._changed()

    def _leave(self, address: Address, announce: bool = True) -> None:
        participant = self._by_address.pop(address, None)
        if participant is None:
            return
        members = self._by_room.get(participant.room_hash, set())
        members.discard(address)
        if not members:
            self._by_room.pop(participant.room_hash, None)
        if announce:
            self._changed()

    def _changed(self) -> None:
        if self.mesh is not None:
            self.mesh.announce()

    def _sweep(self) -> None:
        horizon = float(self.clock.seconds()) - IDLE_AFTER
        gone = [a for a, p in self._by_address.items() if p.last_seen < horizon]
        for address in gone:
            self._leave(address, announce=False)
        if gone:
            self._changed()

    # Participants (for the mesh)

    def rooms(self) -> FrozenSet[bytes]:
        return frozenset(self._by_room)

    def deliver(self, frame: Frame, exclude: Optional[Any] = None) -> int:
        members = self._by_room.get(frame.room_hash)
        if not members:
            return 0
        datagram = None  # made for the first member it goes to: often the only member is the sender
        sent = 0
        for address in members:
            if address != exclude:
                if datagram is None:
                    datagram = _MEDIA_OUT + frame.origin + frame.payload
                self._send(datagram, address)
                sent += 1
        return sent

    @property
    def count(self) -> int:
        return len(self._by_address)
