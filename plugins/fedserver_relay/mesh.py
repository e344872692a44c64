"""
The relay's decisions, free of I/O: which frames are accepted, where they go,
what each link is told, and the counters that say what happened.

Every frame that arrives on a link is judged in this order:

1. our own frame coming back: dropped as C{duplicate};
2. authorization (L{authorize}): accepted when the origin is the sending
   relay, or the origin is itself in C{peers} or C{trusted}, or the sender
   is trusted with C{delegate = true} and listed the origin in its last
   C{TrustChain}; otherwise dropped as C{no-delegation} (the sender may not
   forward others' media) or C{unknown-origin} (it may, but did not vouch
   for this origin);
3. a frame whose (origin, packet id) was seen in the last seconds: dropped as
   C{duplicate}, so a loop cannot storm;
4. the room's rate limit: dropped as C{rate-limited};
5. accepted: delivered to the local participants of its room, and forwarded
   with its TTL one less (never more than C{max_federation_hops}) to every
   other link that subscribed to the room; a frame whose TTL is spent is
   delivered locally only, and counted as C{ttl-exhausted} when a link
   wanted it.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Dict, FrozenSet, Iterable, List, Optional, Protocol, Set

import attrs
from twisted.logger import Logger

from fedserver_relay.control import ControlMessage, Subscribe, TrustChain, Unsubscribe
from fedserver_relay.fingerprint import short_id
from fedserver_relay.frames import MAX_PACKET_ID, DuplicateFilter, Frame, next_hop, room_hash, with_ttl
from fedserver_relay.settings import TrustPolicy

log = Logger(namespace="fedserver_relay")

#: the reasons a frame is dropped, as counted and shown
DROP_REASONS = ("unknown-origin", "no-delegation", "ttl-exhausted", "duplicate", "rate-limited", "replayed",
                "malformed")
#: a drop of one reason from one peer is logged at most once per this many seconds
LOG_EVERY = 10.0


class LinkHandle(Protocol):
    """What the mesh needs of an established relay link."""

    fingerprint: str

    def send_frame(self, frame: Frame) -> None:
        """Send C{frame} to the relay (sealed UDP when confirmed, else the TLS stream)."""

    def send_control(self, message: ControlMessage) -> None:
        """Send a control message on the TLS stream."""


class Participants(Protocol):
    """What the mesh needs of the local participants."""

    def deliver(self, frame: Frame, exclude: Optional[Any] = None) -> int:
        """Send C{frame}'s payload to the room's participants but C{exclude}; how many got it."""

    def rooms(self) -> FrozenSet[bytes]:
        """The room hashes that have local participants."""


@attrs.define
class TokenBucket:
    """C{rate} tokens per second, at most C{rate} held."""

    rate: float
    tokens: float
    updated: float

    def take(self, now: float) -> bool:
        self.tokens = min(self.rate, self.tokens + (now - self.updated) * self.rate)
        self.updated = now
        if self.tokens >= 1:
            self.tokens -= 1
            return True
        return False


@attrs.define
class Counters:
    """Frames accepted per peer, and dropped per reason and peer."""

    accepted: Dict[str, int] = attrs.Factory(dict)
    dropped: Dict[str, Dict[str, int]] = attrs.Factory(lambda: {r: {} for r in DROP_REASONS})
    originated: int = 0
    delivered: int = 0
    forwarded: int = 0

    def accept(self, peer: str) -> None:
        self.accepted[peer] = self.accepted.get(peer, 0) + 1

    def drop(self, reason: str, peer: str) -> int:
        by_peer = self.dropped[reason]
        by_peer[peer] = by_peer.get(peer, 0) + 1
        return by_peer[peer]

    def to_json(self) -> Dict[str, Any]:
        return {
            "accepted": dict(self.accepted),
            "dropped": {reason: dict(by_peer) for reason, by_peer in self.dropped.items()},
            "originated": self.originated,
            "delivered": self.delivered,
            "forwarded": self.forwarded,
        }


class RelayMesh:
    """
    The links of one relay and what flows between them.

    @param fingerprint: our certificate's fingerprint.
    @param clock: C{IReactorTime}.
    """

    def __init__(
        self,
        fingerprint: str,
        policy: TrustPolicy,
        *,
        max_hops: int,
        room_rate_limit: int,
        clock: Any,
        participants: Optional[Participants] = None,
    ) -> None:
        self.fingerprint = fingerprint
        self.origin = short_id(fingerprint)
        self.policy = policy
        self.max_hops = max_hops
        self.room_rate_limit = room_rate_limit
        self.clock = clock
        self.participants = participants
        self.links: Dict[str, LinkHandle] = {}
        #: what each link's relay vouched for (short ids), kept only from delegates
        self.vouched: Dict[str, FrozenSet[bytes]] = {}
        #: rooms each link subscribed to
        self.subscriptions: Dict[str, Set[bytes]] = {}
        #: rooms we told each link we want
        self._announced_rooms: Dict[str, FrozenSet[bytes]] = {}
        self._announced_chain: Dict[str, FrozenSet[str]] = {}
        self.duplicates = DuplicateFilter(clock)
        self.counters = Counters()
        self._buckets: Dict[bytes, TokenBucket] = {}
        self._next_packet_id = int.from_bytes(os.urandom(8), "big") >> 1
        self._last_logged: Dict[tuple, float] = {}

    def label(self, fingerprint: str) -> str:
        return self.policy.label(fingerprint)

    # links coming and going

    def link_up(self, link: LinkHandle) -> None:
        """A link finished its handshake and hello: announce to everyone what changed."""
        self.links[link.fingerprint] = link
        self.subscriptions.setdefault(link.fingerprint, set())
        log.info("relay link to {label} ({fp}) is up", label=self.label(link.fingerprint), fp=link.fingerprint)
        self.announce()

    def link_down(self, link: LinkHandle) -> None:
        """A link closed."""
        if self.links.get(link.fingerprint) is not link:
            return
        del self.links[link.fingerprint]
        self.subscriptions.pop(link.fingerprint, None)
        self.vouched.pop(link.fingerprint, None)
        self._announced_rooms.pop(link.fingerprint, None)
        self._announced_chain.pop(link.fingerprint, None)
        log.info("relay link to {label} ({fp}) is down", label=self.label(link.fingerprint), fp=link.fingerprint)
        self.announce()

    def announce(self) -> None:
        """
        Tell every link, where it changed: the relays we may forward from
        (our other links) and the rooms we want (our participants' and the
        other links' subscriptions).
        """
        local = self.participants.rooms() if self.participants is not None else frozenset()
        for fp, link in list(self.links.items()):
            chain = frozenset(other for other in self.links if other != fp)
            if self._announced_chain.get(fp) != chain:
                self._announced_chain[fp] = chain
                link.send_control(TrustChain(chain))
            wanted = set(local)
            for other, theirs in self.subscriptions.items():
                if other != fp:
                    wanted |= theirs
            rooms = frozenset(wanted)
            before = self._announced_rooms.get(fp, frozenset())
            if rooms != before:
                self._announced_rooms[fp] = rooms
                for chunk in _chunks(rooms - before):
                    link.send_control(Subscribe(chunk))
                for chunk in _chunks(before - rooms):
                    link.send_control(Unsubscribe(chunk))

    def trust_chain(self, link: LinkHandle, message: TrustChain) -> None:
        """A link's relay announced whom it forwards from; kept only from a delegate."""
        if not self.policy.delegates(link.fingerprint):
            self.vouched.pop(link.fingerprint, None)
            if message.vouched_relays:
                log.info("ignoring the trust chain of {label}: it is not trusted with delegate = true",
                         label=self.label(link.fingerprint))
            return
        self.vouched[link.fingerprint] = frozenset(short_id(fp) for fp in message.vouched_relays)

    def subscribe(self, link: LinkHandle, rooms: Iterable[bytes], subscribed: bool) -> None:
        current = self.subscriptions.setdefault(link.fingerprint, set())
        if subscribed:
            current.update(rooms)
        else:
            current.difference_update(rooms)
        self.announce()

    # frames

    def authorize(self, sender: str, origin: bytes) -> Optional[str]:
        """Why a frame from C{origin} arriving from C{sender} is refused, or C{None}."""
        if origin == short_id(sender) or self.policy.directly_trusted(origin):
            return None
        if not self.policy.delegates(sender):
            return "no-delegation"
        if origin not in self.vouched.get(sender, frozenset()):
            return "unknown-origin"
        return None

    def dropped(self, reason: str, sender: str, frame: Optional[Frame] = None) -> None:
        """Count (and now and then log) a dropped frame."""
        label = self.label(sender)
        count = self.counters.drop(reason, label)
        now = float(self.clock.seconds())
        key = (reason, sender)
        if now - self._last_logged.get(key, -LOG_EVERY) >= LOG_EVERY:
            self._last_logged[key] = now
            log.warn(
                "dropped a frame from {label} ({fp}): {reason}{origin} ({count} so far)",
                label=label, fp=sender, reason=reason, count=count,
                origin=f", origin {frame.origin.hex()}" if frame is not None else "",
            )

    def frame_from_link(self, link: LinkHandle, frame: Frame) -> bool:
        """Judge and route a frame that arrived on C{link}; whether it was accepted."""
        sender = link.fingerprint
        if frame.origin == self.origin:
            self.dropped("duplicate", sender, frame)
            return False
        reason = self.authorize(sender, frame.origin)
        if reason is not None:
            self.dropped(reason, sender, frame)
            return False
        if self.duplicates.seen_frame(frame):
            self.dropped("duplicate", sender, frame)
            return False
        if not self._within_rate(frame.room_hash):
            self.dropped("rate-limited", sender, frame)
            return False
        self.counters.accept(self.label(sender))
        if frame.ttl > self.max_hops:
            frame = with_ttl(frame, self.max_hops)
        self._deliver(frame, None)
        onward = next_hop(frame)
        targets = self._targets(frame.room_hash, exclude=sender)
        if onward is None:
            if targets:
                self.dropped("ttl-exhausted", sender, frame)
            return True
        for target in targets:
            target.send_frame(onward)
            self.counters.forwarded += 1
        return True

    def frame_from_participant(self, room: str, payload: bytes, participant: Any) -> Optional[Frame]:
        """
        A local participant's media: a new frame with us as its origin, or
        C{None} when the room is over its rate limit (counted for C{local}).
        """
        hashed = room_hash(room)
        if not self._within_rate(hashed):
            self.counters.drop("rate-limited", "local")
            return None
        frame = Frame(hashed, self.origin, self.max_hops, self._packet_id(), payload)
        self.duplicates.seen_frame(frame)
        self.counters.originated += 1
        self._deliver(frame, participant)
        for target in self._targets(frame.room_hash, exclude=None):
            target.send_frame(frame)
            self.counters.forwarded += 1
        return frame

    def _packet_id(self) -> int:
        packet_id = self._next_packet_id
        self._next_packet_id = (packet_id + 1) & MAX_PACKET_ID
        return packet_id

    def _deliver(self, frame: Frame, exclude: Any) -> None:
        if self.participants is not None:
            self.counters.delivered += self.participants.deliver(frame, exclude)

    def _targets(self, room: bytes, exclude: Optional[str]) -> List[LinkHandle]:
        return [
            link for fp, link in self.links.items()
            if fp != exclude and room in self.subscriptions.get(fp, ())
        ]

    def _within_rate(self, room: bytes) -> bool:
        now = float(self.clock.seconds())
        bucket = self._buckets.get(room)
        if bucket is None:
            if len(self._buckets) > 100_000:
                self._buckets.clear()
            bucket = self._buckets[room] = TokenBucket(self.room_rate_limit, self.room_rate_limit, now)
        return bucket.take(now)

    def status(self, link_details: Callable[[str], Dict[str, Any]]) -> Dict[str, Any]:
        """What the status route shows."""
        return {
            "fingerprint": self.fingerprint,
            "maxFederationHops": self.max_hops,
            "links": [
                {
                    "fingerprint": fp,
                    "label": self.label(fp),
                    "delegate": self.policy.delegates(fp),
                    "vouched": sorted(v.hex() for v in self.vouched.get(fp, ())),
                    "subscribedRooms": len(self.subscriptions.get(fp, ())),
                    **link_details(fp),
                }
                for fp in sorted(self.links)
            ],
            "counters": self.counters.to_json(),
        }


def _chunks(rooms: FrozenSet[bytes], size: int = 1024) -> List[FrozenSet[bytes]]:
    ordered = sorted(rooms)
    return [frozenset(ordered[i:i + size]) for i in range(0, len(ordered), size)]


