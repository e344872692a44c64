"""
The relay's decisions, free of I/O: which frames are accepted, where they go,
what each link is told, and the counters that say what happened.

Every frame that arrives on a link is judged in this order:

1. a frame that arrived with TTL 0 (the TTL counts the link it arrived on,
   so none was left for it): dropped as C{ttl-exhausted};
2. our own frame coming back: dropped as C{duplicate};
3. authorization (L{authorize}): accepted when the origin is the sending
   relay, or the origin is itself in C{peers} or C{trusted}, or the sender
   is trusted with C{delegate = true} and listed the origin in its last
   C{TrustChain}; otherwise dropped as C{no-delegation} (the sender may not
   forward others' media) or C{unknown-origin} (it may, but did not vouch
   for this origin);
4. the link's rate limit (C{link_rate_limit} frames a second): dropped as
   C{rate-limited};
5. a frame whose (origin, packet id) was seen in the last seconds: dropped as
   C{duplicate}, so a loop cannot storm;
6. the room's rate limit: dropped as C{rate-limited};
7. accepted: its (origin, packet id) is remembered as seen (only now, so a
   frame refused above cannot keep the genuine one out), it is delivered to
   the local participants of its room, and forwarded with its TTL one less
   (never more than C{max_federation_hops}) to every other link that
   subscribed to the room; a frame whose TTL is spent is delivered locally
   only, and counted as C{ttl-exhausted} when a link wanted it.  A link
   whose TLS stream is backed up does not get it: counted as C{congested}
   for that link.

Origins are not authenticated: a frame's origin is what the sending relay
wrote.  Rule 3 accepts a directly trusted origin from any link, so any
relay we link with can send media in the name of any relay in C{peers} or
C{trusted} (as the delegated-trust PRD intends).  Our packet ids are drawn
at random, so it cannot guess the ids of our next frames to have them
dropped as duplicates elsewhere.

Subscriptions.  A link may subscribe to at most L{MAX_ROOMS_PER_LINK} rooms
and send at most L{SUBSCRIPTION_RATE} Subscribe or Unsubscribe messages a
second (bursts of L{SUBSCRIPTION_BURST}); more closes it.  We keep to the
same limits (half the rate) in what we send, and keep per room the links
subscribed to it, so that a change looks only at the rooms it changes.
"""

from __future__ import annotations

import collections
import os
from typing import Any, Callable, Dict, FrozenSet, Iterable, Iterator, List, Optional, Protocol, Set

import attrs
from twisted.logger import Logger

from fedserver_relay.control import ControlMessage, Subscribe, TrustChain, Unsubscribe
from fedserver_relay.fingerprint import short_id
from fedserver_relay.frames import (
    DuplicateFilter,
    Frame,
    check_payload,
    check_ttl,
    next_hop,
    room_hash,
    unchecked_frame,
    with_ttl,
)
from fedserver_relay.settings import TrustPolicy

log = Logger(namespace="fedserver_relay")

#: the reasons a frame is dropped, as counted and shown
DROP_REASONS = ("unknown-origin", "no-delegation", "ttl-exhausted", "duplicate", "rate-limited", "replayed",
                "malformed", "congested")
#: a drop of one reason from one peer is logged at most once per this many seconds
LOG_EVERY = 10.0
#: rooms a link may subscribe to; a Subscribe beyond closes the link (and we ask a link for at most as many)
MAX_ROOMS_PER_LINK = 4096
#: Subscribe and Unsubscribe messages a link may send per second, and in a burst; more closes the link
SUBSCRIPTION_RATE = 10.0
SUBSCRIPTION_BURST = 20.0
#: what we send a link ourselves: half of that, so that delays on the way cannot bunch it over the limit
ANNOUNCE_RATE = SUBSCRIPTION_RATE / 2
ANNOUNCE_BURST = SUBSCRIPTION_BURST / 2
#: rooms per Subscribe or Unsubscribe message we send
ROOMS_PER_MESSAGE = 1024
#: the rooms whose rate-limit buckets are kept (the least recently used is forgotten first)
MAX_ROOM_BUCKETS = 100_000
#: frames per second a link may send, unless configured otherwise ([relay] link_rate_limit)
DEFAULT_LINK_RATE_LIMIT = 10_000
#: packet ids drawn from os.urandom at a time
_PACKET_ID_POOL = 512
#: short ids of fingerprints and hashes of room names remembered (then forgotten all at once)
_MEMO_SIZE = 4096


class LinkHandle(Protocol):
    """What the mesh needs of an established relay link."""

    fingerprint: str

    def send_frame(self, frame: Frame) -> Optional[bool]:
        """
        Send C{frame} to the relay (sealed UDP when confirmed, else the TLS
        stream); C{False} when it was dropped instead because the TLS stream
        is backed up (counted as C{congested}).
        """

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
    """C{rate} tokens per second, at most C{burst} (by default C{rate}) held."""

    rate: float
    tokens: float
    updated: float
    burst: float = 0.0

    def __attrs_post_init__(self) -> None:
        self.burst = self.burst or self.rate

    def ready(self, now: float) -> bool:
        """Whether a token could be taken now (none is)."""
        return self.tokens + (now - self.updated) * self.rate >= 1

    def take(self, now: float) -> bool:
        self.tokens = min(self.burst, self.tokens + (now - self.updated) * self.rate)
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
        link_rate_limit: int = DEFAULT_LINK_RATE_LIMIT,
    ) -> None:
        self.fingerprint = fingerprint
        self.origin = short_id(fingerprint)
        self.policy = policy
        self.max_hops = max_hops
        self.room_rate_limit = room_rate_limit
        self.link_rate_limit = link_rate_limit
        self.clock = clock
        self.participants = participants
        self.links: Dict[str, LinkHandle] = {}
        #: what each link's relay vouched for (short ids), kept only from delegates
        self.vouched: Dict[str, FrozenSet[bytes]] = {}
        #: rooms each link subscribed to
        self.subscriptions: Dict[str, Set[bytes]] = {}
        #: the links subscribed to each room
        self._subscribers: Dict[bytes, Set[str]] = {}
        #: our participants' rooms, when last looked at
        self._local: FrozenSet[bytes] = frozenset()
        #: rooms we told each link we want
        self._announced_rooms: Dict[str, Set[bytes]] = {}
        #: per link, the rooms whose wanting may have changed since it was last told
        self._dirty: Dict[str, Set[bytes]] = {}
        #: per link, rooms we want but did not ask for: MAX_ROOMS_PER_LINK were asked for already
        self._held: Dict[str, Set[bytes]] = {}
        self._announced_chain: Dict[str, FrozenSet[str]] = {}
        #: per link: the Subscribe and Unsubscribe messages we send, those we accept, the frames we accept
        self._announce_buckets: Dict[str, TokenBucket] = {}
        self._subscription_buckets: Dict[str, TokenBucket] = {}
        self._link_buckets: Dict[str, TokenBucket] = {}
        self._announce_call: Any = None
        self.duplicates = DuplicateFilter(clock)
        self.counters = Counters()
        #: the rooms' rate-limit buckets, least recently used first
        self._buckets: collections.OrderedDict[bytes, TokenBucket] = collections.OrderedDict()
        self._packet_ids: Iterator[int] = iter(())
        self._last_logged: Dict[tuple, float] = {}
        # computed once, not for every frame
        self._short_ids: Dict[str, bytes] = {}
        self._room_hashes: Dict[str, bytes] = {}

    def label(self, fingerprint: str) -> str:
        return self.policy.label(fingerprint)

    # links coming and going

    def link_up(self, link: LinkHandle) -> None:
        """A link finished its handshake and hello: announce to everyone what changed."""
        fp = link.fingerprint
        old = self.links.get(fp)
        if old is not None and old is not link:
            self._forget(old)  # replaced without going down first: nothing of the old link's counts
        self._refresh_local()
        self.links[fp] = link
        self.subscriptions[fp] = set()
        self._announced_rooms[fp] = set()
        self._held[fp] = set()
        # a new link hears everything wanted so far: our participants' rooms and the other links' subscriptions
        self._dirty[fp] = set(self._local).union(self._subscribers)
        now = float(self.clock.seconds())
        self._announce_buckets[fp] = TokenBucket(ANNOUNCE_RATE, ANNOUNCE_BURST, now, ANNOUNCE_BURST)
        self._subscription_buckets[fp] = TokenBucket(SUBSCRIPTION_RATE, SUBSCRIPTION_BURST, now, SUBSCRIPTION_BURST)
        self._link_buckets[fp] = TokenBucket(self.link_rate_limit, self.link_rate_limit, now)
        log.info("relay link to {label} ({fp}) is up", label=self.label(fp), fp=fp)
        self._announce_chains()
        self._flush()

    def link_down(self, link: LinkHandle) -> None:
        """A link closed."""
        if self.links.get(link.fingerprint) is not link:
            return
        self._forget(link)
        log.info("relay link to {label} ({fp}) is down", label=self.label(link.fingerprint), fp=link.fingerprint)
        self._announce_chains()
        self._flush()

    def _forget(self, link: LinkHandle) -> None:
        """Everything of C{link}, which is in C{links}: its subscriptions no longer count."""
        fp = link.fingerprint
        del self.links[fp]
        for room in self.subscriptions.pop(fp, ()):
            self._remove_subscriber(fp, room)
        for state in (self.vouched, self._announced_rooms, self._announced_chain, self._dirty, self._held,
                      self._announce_buckets, self._subscription_buckets, self._link_buckets):
            state.pop(fp, None)
        if not self.links and self._announce_call is not None and self._announce_call.active():
            self._announce_call.cancel()
            self._announce_call = None

    def announce(self) -> None:
        """
        Tell every link, where it changed, the rooms we want: our
        participants' (read again now) and the other links' subscriptions.
        Only the rooms that changed are looked at.
        """
        self._refresh_local()
        self._flush()

    def _refresh_local(self) -> None:
        """Read our participants' rooms again; those that changed are to be judged again for every link."""
        local = frozenset(self.participants.rooms()) if self.participants is not None else frozenset()
        if local != self._local:
            changed = local.symmetric_difference(self._local)
            self._local = local
            for dirty in self._dirty.values():
                dirty |= changed

    def _announce_chains(self) -> None:
        """Tell every link, where it changed, the relays we may forward from (our other links)."""
        for fp, link in list(self.links.items()):
            chain = frozenset(other for other in self.links if other != fp)
            if self._announced_chain.get(fp) != chain:
                self._announced_chain[fp] = chain
                link.send_control(TrustChain(chain))

    def _wants(self, fp: str, room: bytes) -> bool:
        """Whether we want C{room} from the link C{fp}: a participant of ours, or another link, wants it."""
        if room in self._local:
            return True
        subscribers = self._subscribers.get(room)
        return subscribers is not None and (len(subscribers) > 1 or fp not in subscribers)

    def _add_subscriber(self, fp: str, room: bytes) -> None:
        subscribers = self._subscribers.setdefault(room, set())
        subscribers.add(fp)
        if room in self._local:
            return  # wanted from every link already
        if len(subscribers) == 1:  # now every other link is asked for it
            for other, dirty in self._dirty.items():
                if other != fp:
                    dirty.add(room)
        elif len(subscribers) == 2:  # the one that subscribed first is now asked for it too
            for other in subscribers:
                if other != fp:
                    self._dirty[other].add(room)

    def _remove_subscriber(self, fp: str, room: bytes) -> None:
        subscribers = self._subscribers.get(room)
        if subscribers is None:
            return
        subscribers.discard(fp)
        if not subscribers:
            del self._subscribers[room]
        if room in self._local:
            return
        if not subscribers:  # no other link is asked for it any longer
            for other, dirty in self._dirty.items():
                if other != fp:
                    dirty.add(room)
        elif len(subscribers) == 1:  # nor is the one subscriber left
            self._dirty[next(iter(subscribers))].add(room)

    def _flush(self) -> None:
        """
        Send each link the Subscribe and Unsubscribe messages its changed
        rooms call for: removals first, at most L{MAX_ROOMS_PER_LINK} rooms
        announced (the rest held until there is space), and at most
        L{ANNOUNCE_RATE} messages a second (the rest a little later).
        """
        now = float(self.clock.seconds())
        later = False
        for fp, dirty in list(self._dirty.items()):
            if fp not in self.links:
                continue  # went down while another link was told
            held = self._held[fp]
            if not dirty and not (held and len(self._announced_rooms[fp]) < MAX_ROOMS_PER_LINK):
                continue
            bucket = self._announce_buckets[fp]
            if not bucket.ready(now):
                later = True  # judged when the next message may go, not at every change before
                continue
            announced = self._announced_rooms[fp]
            adds: Set[bytes] = set()
            removes: List[bytes] = []
            for room in dirty:
                if self._wants(fp, room):
                    if room not in announced:
                        adds.add(room)
                else:
                    held.discard(room)
                    if room in announced:
                        removes.append(room)
            dirty.clear()
            # what goes over the link's limit is held (any of it: nothing says which rooms matter more), and
            # asked for when rooms asked for before are given up; only what changed is looked at
            space = MAX_ROOMS_PER_LINK - (len(announced) - len(removes))
            candidates: List[bytes] = []
            for room in adds:
                if len(candidates) < space:
                    candidates.append(room)
                else:
                    held.add(room)
            while held and len(candidates) < space:
                candidates.append(held.pop())
            if held:
                self._log_once(("held", fp), "we want {count} more rooms from {label} ({fp}) than the "
                               "{limit} a link may subscribe to; they are asked for when there is space",
                               count=len(held), label=self.label(fp), fp=fp, limit=MAX_ROOMS_PER_LINK)
            link = self.links[fp]
            pending: List[Any] = [(Unsubscribe, chunk) for chunk in _chunks(removes)]
            pending += [(Subscribe, chunk) for chunk in _chunks(candidates)]
            for i, (kind, chunk) in enumerate(pending):
                if not bucket.take(now):
                    for _, unsent in pending[i:]:
                        dirty.update(unsent)  # judged again when the next message may go
                    later = True
                    break
                if kind is Subscribe:
                    announced.update(chunk)
                else:
                    announced.difference_update(chunk)
                link.send_control(kind(chunk))
        if later and (self._announce_call is None or not self._announce_call.active()):
            self._announce_call = self.clock.callLater(1 / ANNOUNCE_RATE, self._flush)

    def _log_once(self, key: tuple, message: str, **fields: Any) -> None:
        """Log C{message} at most once per L{LOG_EVERY} seconds for C{key}."""
        now = float(self.clock.seconds())
        if now - self._last_logged.get(key, -LOG_EVERY) >= LOG_EVERY:
            self._last_logged[key] = now
            log.warn(message, **fields)

    def trust_chain(self, link: LinkHandle, message: TrustChain) -> None:
        """A link's relay announced whom it forwards from; kept only from a delegate."""
        if not self.policy.delegates(link.fingerprint):
            self.vouched.pop(link.fingerprint, None)
            if message.vouched_relays:
                log.info("ignoring the trust chain of {label}: it is not trusted with delegate = true",
                         label=self.label(link.fingerprint))
            return
        self.vouched[link.fingerprint] = frozenset(short_id(fp) for fp in message.vouched_relays)

    def subscribe(self, link: LinkHandle, rooms: Iterable[bytes], subscribed: bool) -> Optional[str]:
        """
        A link's Subscribe (C{subscribed}) or Unsubscribe: C{None}, or why the
        link must be closed (too many rooms, or messages too often).  A link
        that is not (or no longer) in the mesh changes nothing.
        """
        fp = link.fingerprint
        if self.links.get(fp) is not link:
            return None
        if not self._subscription_buckets[fp].take(float(self.clock.seconds())):
            return (f"it sent Subscribe and Unsubscribe more often than {SUBSCRIPTION_RATE:g} a second "
                    f"(bursts of {SUBSCRIPTION_BURST:g})")
        current = self.subscriptions[fp]
        if subscribed:
            new = set(rooms).difference(current)
            if len(current) + len(new) > MAX_ROOMS_PER_LINK:
                return f"it subscribed to more than {MAX_ROOMS_PER_LINK} rooms"
            current |= new
            for room in new:
                self._add_subscriber(fp, room)
        else:
            gone = current.intersection(rooms)
            current -= gone
            for room in gone:
                self._remove_subscriber(fp, room)
        self._flush()
        return None

    # frames

    def _short_id(self, fingerprint: str) -> bytes:
        found = self._short_ids.get(fingerprint)
        if found is None:
            found = short_id(fingerprint)
            if len(self._short_ids) >= _MEMO_SIZE:
                self._short_ids.clear()
            self._short_ids[fingerprint] = found
        return found

    def _room_hash(self, room: str) -> bytes:
        found = self._room_hashes.get(room) if isinstance(room, str) else None
        if found is None:
            found = room_hash(room)
            if len(self._room_hashes) >= _MEMO_SIZE:
                self._room_hashes.clear()
            self._room_hashes[room] = found
        return found

    def authorize(self, sender: str, origin: bytes) -> Optional[str]:
        """Why a frame from C{origin} arriving from C{sender} is refused, or C{None}."""
        if origin == self._short_id(sender) or self.policy.directly_trusted(origin):
            return None
        if not self.policy.delegates(sender):
            return "no-delegation"
        if origin not in self.vouched.get(sender, frozenset()):
            return "unknown-origin"
        return None

    def dropped(self, reason: str, sender: str, frame: Optional[Frame] = None) -> None:
        """
        Count (and now and then log) a dropped frame: from C{sender}, or for
        it when the C{reason} is C{congested} (the link to it was backed up).
        """
        label = self.label(sender)
        count = self.counters.drop(reason, label)
        now = float(self.clock.seconds())
        key = (reason, sender)
        if now - self._last_logged.get(key, -LOG_EVERY) >= LOG_EVERY:
            self._last_logged[key] = now
            log.warn(
                "dropped a frame {direction} {label} ({fp}): {reason}{origin} ({count} so far)",
                direction="for" if reason == "congested" else "from",
                label=label, fp=sender, reason=reason, count=count,
                origin=f", origin {frame.origin.hex()}" if frame is not None else "",
            )

    def frame_from_link(self, link: LinkHandle, frame: Frame) -> bool:
        """Judge and route a frame that arrived on C{link}; whether it was accepted."""
        sender = link.fingerprint
        if frame.ttl == 0:  # the TTL counts the link it arrived on: none was left for it
            self.dropped("ttl-exhausted", sender, frame)
            return False
        if frame.origin == self.origin:
            self.dropped("duplicate", sender, frame)
            return False
        reason = self.authorize(sender, frame.origin)
        if reason is not None:
            self.dropped(reason, sender, frame)
            return False
        if not self._link_within_rate(sender):
            self.dropped("rate-limited", sender, frame)
            return False
        # (origin, packet id) is marked as seen only once the frame is accepted: a frame refused here must
        # not keep out the genuine one
        if self.duplicates.seen_frame(frame, remember=False):
            self.dropped("duplicate", sender, frame)
            return False
        if not self._within_rate(frame.room_hash):
            self.dropped("rate-limited", sender, frame)
            return False
        self.duplicates.seen_frame(frame)
        self.counters.accept(self.label(sender))
        if frame.ttl > self.max_hops:
            frame = with_ttl(frame, self.max_hops)
        self._deliver(frame, None)
        targets = self._targets(frame.room_hash, exclude=sender)
        if not targets:
            return True
        onward = next_hop(frame)  # made only when a link wants it
        if onward is None:
            self.dropped("ttl-exhausted", sender, frame)
            return True
        self._send(targets, onward)
        return True

    def frame_from_participant(self, room: str, payload: bytes, participant: Any) -> Optional[Frame]:
        """
        A local participant's media: a new frame with us as its origin, or
        C{None} when the room is over its rate limit (counted for C{local}).
        """
        hashed = self._room_hash(room)
        if not self._within_rate(hashed):
            self.counters.drop("rate-limited", "local")
            return None
        packet_id = self._packet_id()
        # the room hash, our origin and the packet id are valid by construction; the rest is checked
        check_ttl(self.max_hops)
        check_payload(payload)
        frame = unchecked_frame(hashed, self.origin, self.max_hops, packet_id, payload)
        self.duplicates.seen_frame(frame)
        self.counters.originated += 1
        self._deliver(frame, participant)
        self._send(self._targets(frame.room_hash, exclude=None), frame)
        return frame

    def _send(self, targets: List[LinkHandle], frame: Frame) -> None:
        """Forward C{frame} to C{targets}; a link too backed up to take it counts it as C{congested}."""
        for target in targets:
            if target.send_frame(frame) is False:
                self.dropped("congested", target.fingerprint, frame)
            else:
                self.counters.forwarded += 1

    def _packet_id(self) -> int:
        """
        A packet id for a frame of ours: 64 random bits, so that nobody can
        send forged frames ahead with the ids ours will have.
        """
        packet_id = next(self._packet_ids, None)
        if packet_id is None:
            self._packet_ids = iter(memoryview(os.urandom(8 * _PACKET_ID_POOL)).cast("Q").tolist())
            packet_id = next(self._packet_ids)
        return packet_id

    def _deliver(self, frame: Frame, exclude: Any) -> None:
        if self.participants is not None:
            self.counters.delivered += self.participants.deliver(frame, exclude)

    def _targets(self, room: bytes, exclude: Optional[str]) -> List[LinkHandle]:
        subscribers = self._subscribers.get(room)
        if not subscribers:
            return []
        links = self.links
        return [links[fp] for fp in subscribers if fp != exclude]

    def _within_rate(self, room: bytes) -> bool:
        now = float(self.clock.seconds())
        buckets = self._buckets
        bucket = buckets.get(room)
        if bucket is None:
            bucket = buckets[room] = TokenBucket(self.room_rate_limit, self.room_rate_limit, now)
            if len(buckets) > MAX_ROOM_BUCKETS:
                buckets.popitem(last=False)  # the room heard from least recently
        else:
            buckets.move_to_end(room)
        return bucket.take(now)

    def _link_within_rate(self, sender: str) -> bool:
        now = float(self.clock.seconds())
        bucket = self._link_buckets.get(sender)
        if bucket is None:  # (a link the mesh does not hold: tests hand the mesh frames directly)
            bucket = self._link_buckets[sender] = TokenBucket(self.link_rate_limit, self.link_rate_limit, now)
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


def _chunks(rooms: Iterable[bytes], size: int = ROOMS_PER_MESSAGE) -> List[FrozenSet[bytes]]:
    ordered = sorted(rooms)
    return [frozenset(ordered[i:i + size]) for i in range(0, len(ordered), size)]


