"""
The durable outbound queue: one-way notifications to other backends that
must arrive even when the other backend is down for a while.

A caller hands over a call (destination, component, RPC, JSON body); it is
acknowledged only once it is committed to the store (SQLite with
C{synchronous=FULL}: it survives a crash of the process or the machine).
Then, per destination:

- **in order, one at a time**: the oldest item (the head) is sent; the next
  waits until the head is delivered or given up (head-of-line, as a
  Matrix server's per-destination transaction queue);
- **at least once, deduplicated**: every attempt carries the same
  C{Fedserver-Idempotency-Key}, which the receiving fedserver deduplicates
  on (L{fedserver.idempotency}), so the remote component sees the call
  once even when an answer was lost and the call is sent again;
- **retries with jittered exponential backoff**: a failure that may mend
  (no connection, a timeout, a TLS or discovery failure, an answer 5xx,
  408, 429, or C{409 request-in-progress}) waits C{initial_backoff}
  seconds, then C{backoff_multiplier} times longer after each further
  failure, up to C{max_backoff}, each wait changed at random by up to
  C{jitter} (C{Retry-After} is honoured up to C{max_backoff});
- **dead letters**: an item the remote refuses for good (any other 4xx, or
  a local refusal such as C{federation-denied}) is moved to the dead
  letters at once, with the answer; an item not delivered after
  C{max_lifetime} seconds (5 days) is moved there at its next attempt;
- **recovery**: when the destination is heard from again (a 2xx answer to
  any call to it, or an authenticated call from it), its queue is retried
  at once instead of at the end of its backoff.

The queue is kept in three tables (schema C{fedserver-queue}):
C{fedserver_queue} (the items, ordered by a per-destination sequence
number), C{fedserver_queue_destinations} (per destination: the next
sequence number, the backoff, the last error and which worker delivers it
now) and C{fedserver_queue_dead} (the dead letters).  The running queue
looks at the tables every C{poll_interval} seconds, so what another worker
or C{fedserver queue retry} changes is taken up then.

Several workers on one database deliver each destination from one worker
only: a worker claims a destination for a while (C{claimed_by},
C{claimed_until}), renews the claim with every item, and releases it when
the destination is empty, backs off, or the worker stops.  A worker killed
mid-delivery leaves its claim behind; restarted with the same
C{worker_id} it takes the claim back at once (another worker waits until
the claim expires), and the item in flight is simply sent again.

docs/queue.md describes it for operators; C{fedserver queue} lists, retries
and drops.
"""

from __future__ import annotations

import json
import random
import socket
import uuid
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Set, Tuple

import attrs
from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.defer import CancelledError, Deferred
from twisted.logger import Logger

from fedserver.config import QueueSettings, is_domain_name
from fedserver.errors import FederationError
from fedserver.idempotency import IDEMPOTENCY_HEADER, check_key
from fedserver.pipeline import PASSED_THROUGH, check_json, remote_error
from fedserver.values import FederatedCall, Response
from fedserver.web import NAME

log = Logger(namespace="fedserver.outbound_queue")

#: the outward listener queues a call that carries this header with the value C{queued}
DELIVERY_HEADER = "Fedserver-Delivery"

SCHEMA_OWNER = "fedserver-queue"
SCHEMA_STEPS = [
    """
    CREATE TABLE fedserver_queue_destinations (
        destination TEXT PRIMARY KEY,
        next_seq BIGINT NOT NULL,
        next_attempt BIGINT NOT NULL,
        failures INTEGER NOT NULL,
        last_error TEXT,
        last_attempt BIGINT,
        last_success BIGINT,
        claimed_by TEXT,
        claimed_until BIGINT
    );
    CREATE TABLE fedserver_queue (
        id TEXT PRIMARY KEY,
        destination TEXT NOT NULL,
        seq BIGINT NOT NULL,
        component TEXT NOT NULL,
        rpc TEXT NOT NULL,
        headers TEXT NOT NULL,
        body BLOB NOT NULL,
        idempotency_key TEXT NOT NULL,
        request_id TEXT NOT NULL,
        created BIGINT NOT NULL,
        attempts INTEGER NOT NULL,
        UNIQUE (destination, seq)
    );
    CREATE TABLE fedserver_queue_dead (
        id TEXT PRIMARY KEY,
        destination TEXT NOT NULL,
        seq BIGINT NOT NULL,
        component TEXT NOT NULL,
        rpc TEXT NOT NULL,
        headers TEXT NOT NULL,
        body BLOB NOT NULL,
        idempotency_key TEXT NOT NULL,
        request_id TEXT NOT NULL,
        created BIGINT NOT NULL,
        attempts INTEGER NOT NULL,
        died BIGINT NOT NULL,
        reason TEXT NOT NULL,
        error TEXT
    );
    CREATE INDEX fedserver_queue_dead_by_destination ON fedserver_queue_dead (destination, died)
    """,
]

#: labels of failures before anything was sent that no retry can mend
PERMANENT_LABELS = frozenset({"federation-denied", "invalid-domain", "invalid-json", "request-too-large",
                              "invalid-endpoint"})

#: seconds stopping waits for deliveries in flight before cancelling them
STOP_TIMEOUT = 5.0
#: seconds a claim on a destination outlives the longest attempt
CLAIM_MARGIN = 60.0
#: seconds between two prunings of old dead letters
PRUNE_INTERVAL = 3600.0

_ITEM_COLUMNS = "id, destination, seq, component, rpc, headers, body, idempotency_key, request_id, created, attempts"


@attrs.frozen
class Outgoing:
    """
    A call on its way into the queue (L{OutboundQueue.item}).

    @ivar id: the item's id (a UUID); the default idempotency key.
    @ivar created: when it was made, in milliseconds since the epoch (its
        lifetime counts from then).
    """

    id: str
    destination: str
    component: str
    rpc: str
    headers: Tuple[Tuple[str, str], ...]
    body: bytes
    idempotency_key: str
    request_id: str
    created: int


@attrs.frozen
class Attempt:
    """
    What became of an item, for whoever waits on it
    (L{OutboundQueue.submitted}).

    @ivar state: C{delivered} (the remote answered 2xx: C{response}),
        C{dead} (given up: C{error}, and the refusal as C{response} when
        the remote answered) or C{queued} (not delivered yet: it will be
        retried; C{error} says why the last attempt failed, if one was made).
    @ivar error: the labelled error, as JSON.
    """

    item_id: str
    destination: str
    state: str
    response: Optional[Response] = None
    error: Optional[Dict[str, Any]] = None


@attrs.frozen
class _Item:
    id: str
    destination: str
    seq: int
    component: str
    rpc: str
    headers: Tuple[Tuple[str, str], ...]
    body: bytes
    idempotency_key: str
    request_id: str
    created: int
    attempts: int

    @property
    def path(self) -> str:
        return f"/federation/{self.component}/{self.rpc}"


@attrs.frozen
class _Outcome:
    state: str  # delivered, dead, retry, stopped
    response: Optional[Response] = None
    error: Optional[Dict[str, Any]] = None
    retry_after: Optional[float] = None


@attrs.frozen
class _Step:
    """What a transaction of the delivery loop found: whether it holds the destination, and the next head."""

    claimed: bool
    head: Optional[_Item]
    expired: List[str]
    next_attempt: int


@attrs.frozen
class DestinationState:
    """A destination with items, as the last look at the table saw it."""

    depth: int
    oldest: Optional[int]
    next_attempt: int
    failures: int


def backoff_delay(failures: int, settings: QueueSettings, fraction: float,
                  retry_after: Optional[float] = None) -> float:
    """
    Seconds to wait after the C{failures}-th failure in a row:
    C{initial_backoff * backoff_multiplier ** (failures - 1)}, at most
    C{max_backoff}, changed by C{jitter * (2 * fraction - 1)} of itself
    (C{fraction} is uniform in [0, 1)); at least C{retry_after} (bounded by
    C{max_backoff}) when the remote asked for it.
    """
    exponent = min(max(failures - 1, 0), 200)  # the cap is reached long before; no float overflow
    delay = min(settings.initial_backoff * settings.backoff_multiplier ** exponent, settings.max_backoff)
    delay *= 1 + settings.jitter * (2 * fraction - 1)
    if retry_after is not None:
        delay = max(delay, min(retry_after, settings.max_backoff))
    return delay


def default_worker_id(inward_listen: str) -> str:
    """The host name and the inward listener: stable across restarts, different for two workers."""
    return f"{socket.gethostname()}/{inward_listen}"[:200]


class OutboundQueue(Service):
    """
    The durable outbound queue (see the module docstring).

    @param store: the L{fedserver.storage.Store}; the schema
        C{fedserver-queue} is registered on it here.
    @param pipeline: gives the running L{fedserver.pipeline.Pipeline} (or
        C{None} while fedserver starts); calls go out through its
        C{call_remote}, so authorizers, discovery and authentication apply.
    @param delivery_timeout: seconds one attempt may take.
    @param rand: uniform numbers in [0, 1) for the jitter.
    """

    def __init__(
        self,
        store: Any,
        pipeline: Callable[[], Any],
        *,
        backend_domain: str,
        settings: QueueSettings,
        clock: Any,
        worker_id: str,
        delivery_timeout: float,
        rand: Callable[[], float] = random.random,
    ) -> None:
        self._store = store
        # Group commit pays on SQLite, where one writer syncs the disk at every commit. On PostgreSQL
        # each work keeps its own transaction: every work updates its destination's row, a group holds
        # the rows it updated until its commit, and the groups of several workers wait on each other.
        self._run_short = store.run_grouped if store.dialect.name == "sqlite" else store.run_interaction
        self._pipeline = pipeline
        self.backend_domain = backend_domain
        self.settings = settings
        self._clock = clock
        self.worker_id = worker_id
        self.delivery_timeout = delivery_timeout
        self._rand = rand
        store.register_schema(SCHEMA_OWNER, SCHEMA_STEPS)
        #: destinations being delivered by this worker -> fires when that stops
        self._active: Dict[str, Deferred[None]] = {}
        #: destinations that got items while being delivered: look again when done
        self._again: Set[str] = set()
        #: destinations known to be backing off -> when their next attempt is (seconds)
        self._waiting: Dict[str, float] = {}
        #: destination -> when a recovery last woke it (seconds)
        self._woken: Dict[str, float] = {}
        #: the attempt in flight per destination
        self._in_flight: Dict[str, Deferred[Any]] = {}
        #: item id -> (destination, those waiting for its outcome)
        self._waiters: Dict[str, Tuple[str, List[Deferred[Attempt]]]] = {}
        self._poll_call: Any = None
        #: whether this run has delivered to any destination (and may hold claims)
        self._claimed = False
        self._last_prune = 0.0
        self._idle: List[Deferred[None]] = []
        #: the destinations with items as the last poll saw them
        self.snapshot: Dict[str, DestinationState] = {}
        #: counters since start: items delivered, given up, attempts that failed and will be retried
        self.delivered = 0
        self.dead = 0
        self.retried = 0
        #: looks at the table so far
        self.polls = 0

    def _now(self) -> float:
        return float(self._clock.seconds())

    def _now_ms(self) -> int:
        return int(self._clock.seconds() * 1000)

    @property
    def _claim_ms(self) -> int:
        return int((self.delivery_timeout + CLAIM_MARGIN) * 1000)

    @property
    def _lifetime_ms(self) -> int:
        return int(self.settings.max_lifetime * 1000)

    # putting calls in

    def item(
        self,
        destination: str,
        component: str,
        rpc: str,
        body: bytes,
        *,
        headers: Iterable[Tuple[str, str]] = (),
        idempotency_key: Optional[str] = None,
        request_id: Optional[str] = None,
    ) -> Outgoing:
        """
        A call to queue: C{rpc} of C{destination}'s C{component} with the
        JSON C{body}.  Of C{headers}, those the pipeline passes through
        (L{fedserver.pipeline.PASSED_THROUGH}) are kept.  Without
        C{idempotency_key}, the item's id is the key.

        @raise FederationError: C{invalid-json}, C{invalid-idempotency-key}.
        @raise ValueError: a destination, component or RPC name that is
            not one.
        """
        if not is_domain_name(destination):
            raise ValueError(f"{destination!r} is not a lower-case domain name")
        if not (NAME.fullmatch(component.encode()) and NAME.fullmatch(rpc.encode())):
            raise ValueError(f"{component!r} and {rpc!r} must be ASCII letters, digits, '_' and '-'")
        check_json(body, "the request body")
        item_id = str(uuid.uuid4())
        key = check_key(idempotency_key) if idempotency_key is not None else item_id
        given = list(headers)
        kept = tuple(
            (name, value) for name in PASSED_THROUGH if name != IDEMPOTENCY_HEADER
            for key_, value in given if key_.lower() == name.lower()
        )
        return Outgoing(item_id, destination, component, rpc, kept, bytes(body), key,
                        request_id or f"queue-{item_id}", self._now_ms())

    def insert(self, cursor: Any, items: Sequence[Outgoing]) -> None:
        """
        Put C{items} in the queue within the caller's transaction (in a
        L{fedserver.storage.Store.run_interaction}), so that they are
        queued exactly when the caller's own writes are committed.  Call
        L{submitted} once the transaction is committed.
        """
        _insert(cursor, items)

    def submitted(self, items: Sequence[Outgoing], *, wait: Optional[float] = None) -> Deferred[List[Attempt]]:
        """
        Start delivering C{items}, committed to the store by L{insert}.
        With C{wait}, fire with what became of each within C{wait} seconds
        (C{queued} for those still waiting then, or behind older items);
        otherwise fire at once, with nothing.
        """
        waiting: List[Deferred[Attempt]] = []
        if wait is not None:
            for item in items:
                waiting.append(self._wait_for(item, wait))
        for destination in dict.fromkeys(i.destination for i in items):
            self._kick(destination)
        return defer.gatherResults(waiting) if waiting else defer.succeed([])

    def enqueue(
        self,
        destination: str,
        component: str,
        rpc: str,
        body: bytes,
        *,
        headers: Iterable[Tuple[str, str]] = (),
        idempotency_key: Optional[str] = None,
        request_id: Optional[str] = None,
    ) -> Deferred[str]:
        """
        Queue one call (see L{item}); fire with its id once it is committed
        (on SQLite in a commit it may share with other calls, see
        L{fedserver.storage.Store.run_grouped}; if that commit fails, so does
        this).  Authorization is the caller's: the
        pipeline authorizes each attempt again, and a refusal then is a
        dead letter.
        """
        try:
            outgoing = self.item(destination, component, rpc, body, headers=headers,
                                 idempotency_key=idempotency_key, request_id=request_id)
        except (FederationError, ValueError):
            return defer.fail()
        # on SQLite, calls queued at the same moment share one commit
        d = self._run_short(_insert, [outgoing])

        def committed(_: Any) -> str:
            self.submitted([outgoing])
            return outgoing.id

        return d.addCallback(committed)

    def _wait_for(self, item: Outgoing, wait: float) -> Deferred[Attempt]:
        d: Deferred[Attempt] = Deferred()
        self._waiters.setdefault(item.id, (item.destination, []))[1].append(d)

        def timed_out() -> None:
            if not d.called:
                self._forget_waiter(item.id, d)
                d.callback(Attempt(item.id, item.destination, "queued"))

        call = self._clock.callLater(wait, timed_out)

        def cancel_timer(result: Any) -> Any:
            if call.active():
                call.cancel()
            return result

        return d.addBoth(cancel_timer)

    def _forget_waiter(self, item_id: str, d: Deferred[Attempt]) -> None:
        entry = self._waiters.get(item_id)
        if entry is not None and d in entry[1]:
            entry[1].remove(d)
            if not entry[1]:
                del self._waiters[item_id]

    def _announce(self, attempt: Attempt) -> None:
        entry = self._waiters.pop(attempt.item_id, None)
        for d in entry[1] if entry else ():
            if not d.called:
                d.callback(attempt)

    def _settle(self, destination: Optional[str] = None, error: Optional[Dict[str, Any]] = None) -> None:
        """Tell those waiting on items of C{destination} (or all) that they stay queued."""
        for item_id, (dest, _) in list(self._waiters.items()):
            if destination is None or dest == destination:
                self._announce(Attempt(item_id, dest, "queued", error=error))

    # the service

    def startService(self) -> None:
        super().startService()
        # the first look at the table as soon as the reactor runs
        self._poll_call = self._clock.callLater(0, self._poll)

    def stopService(self) -> Deferred[None]:
        super().stopService()
        if self._poll_call is not None and self._poll_call.active():
            self._poll_call.cancel()
        self._poll_call = None
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        if self._active:
            log.info("waiting up to {t} s for deliveries in flight to {n} destinations", t=STOP_TIMEOUT,
                     n=len(self._active))
            everything = defer.DeferredList(list(self._active.values()))
            timer = self._clock.callLater(STOP_TIMEOUT, self._cancel_in_flight)
            await everything
            if timer.active():
                timer.cancel()
        self._settle()
        if self._claimed:
            try:
                await self._release_claims()
            except Exception:
                log.failure("releasing the claims of worker {worker} failed", worker=self.worker_id)
        self._claimed = False

    def _release_claims(self) -> Deferred[None]:
        return self._store.run_operation(
            "UPDATE fedserver_queue_destinations SET claimed_by = NULL, claimed_until = NULL WHERE claimed_by = ?",
            (self.worker_id,),
        )

    def _cancel_in_flight(self) -> None:
        for destination, d in list(self._in_flight.items()):
            log.info("stopping: the delivery in flight to {destination} is cancelled; it is sent again at the "
                     "next start", destination=destination)
            d.cancel()

    def idle(self) -> Deferred[None]:
        """Fire once no destination is being delivered by this worker."""
        if not self._active:
            return defer.succeed(None)
        d: Deferred[None] = Deferred()
        self._idle.append(d)
        return d

    # looking at the table

    def _poll(self) -> None:
        self._poll_call = None
        d = Deferred.fromCoroutine(self._poll_once())
        d.addErrback(lambda f: log.failure("looking at the outbound queue failed", f))

        def again(_: Any) -> None:
            if self.running and self._poll_call is None:
                self._poll_call = self._clock.callLater(self.settings.poll_interval, self._poll)
            self.polls += 1

        d.addBoth(again)

    async def _poll_once(self) -> None:
        now = self._now_ms()
        rows = await self._store.run_query(
            "SELECT d.destination, d.next_attempt, d.claimed_by, d.claimed_until, d.failures, "
            "(SELECT COUNT(*) FROM fedserver_queue q WHERE q.destination = d.destination), "
            "(SELECT q.created FROM fedserver_queue q WHERE q.destination = d.destination ORDER BY q.seq LIMIT 1) "
            "FROM fedserver_queue_destinations d "
            "WHERE EXISTS (SELECT 1 FROM fedserver_queue q WHERE q.destination = d.destination)"
        )
        snapshot = {}
        for destination, next_attempt, claimed_by, claimed_until, failures, depth, oldest in rows:
            snapshot[destination] = DestinationState(int(depth), oldest, int(next_attempt), int(failures))
            if next_attempt > now:
                self._waiting[destination] = next_attempt / 1000
                continue
            self._waiting.pop(destination, None)
            if claimed_by is None or claimed_by == self.worker_id or (claimed_until or 0) < now:
                self._start(destination)
        for destination in list(self._waiting):
            if destination not in snapshot:
                del self._waiting[destination]
        self.snapshot = snapshot
        if self._now() - self._last_prune >= PRUNE_INTERVAL:
            self._last_prune = self._now()
            cutoff = now - int(self.settings.dead_letter_ttl * 1000)
            await self._store.run_operation("DELETE FROM fedserver_queue_dead WHERE died < ?", (cutoff,))

    # recovery

    def observe(self, outcome: Any) -> None:
        """
        A pipeline observer (L{fedserver.pipeline.CallOutcome}): a 2xx
        answer from a destination, or an authenticated call from it, ends
        its backoff (at most once per C{initial_backoff}).
        """
        domain = outcome.domain
        if domain is None or domain not in self._waiting or domain in self._active:
            return
        if outcome.direction == "outbound" and outcome.label is not None:
            return
        now = self._now()
        if now - self._woken.get(domain, float("-inf")) < self.settings.initial_backoff:
            return
        self._woken[domain] = now
        log.info("{domain} is answering again: its queue is retried now", domain=domain)
        self.retry_now(domain).addErrback(
            lambda f: log.failure("retrying the queue of {domain} failed", f, domain=domain))

    def retry_now(self, destination: str) -> Deferred[None]:
        """End C{destination}'s backoff: its head is sent now."""
        self._waiting.pop(destination, None)
        d = self._store.run_operation(
            "UPDATE fedserver_queue_destinations SET next_attempt = 0 WHERE destination = ? AND next_attempt > 0",
            (destination,),
        )
        return d.addCallback(lambda _: self._start(destination))

    # delivering

    def _kick(self, destination: str) -> None:
        if destination in self._active:
            self._again.add(destination)
            return
        if self._waiting.get(destination, 0) > self._now():
            self._settle(destination)
            return
        self._start(destination)

    def _start(self, destination: str) -> None:
        if not self.running:
            self._settle(destination)
            return
        if destination in self._active:
            self._again.add(destination)
            return
        if len(self._active) >= self.settings.concurrency:
            self._settle(destination)  # a later poll takes it up
            return
        done: Deferred[None] = Deferred()
        self._active[destination] = done
        self._claimed = True
        d = Deferred.fromCoroutine(self._drain(destination))
        d.addErrback(lambda f: log.failure("delivering to {destination} failed", f, destination=destination))
        d.addBoth(lambda _: self._drained(destination, done))

    def _drained(self, destination: str, done: Deferred[None]) -> None:
        if self._active.get(destination) is done:
            del self._active[destination]
        done.callback(None)
        if destination in self._again and self.running:
            # items came while it was delivered: look again (or tell their waiters it backs off)
            self._again.discard(destination)
            self._kick(destination)
        else:
            self._again.discard(destination)
            self._settle(destination)
        if not self._active:
            waiting, self._idle = self._idle, []
            for d in waiting:
                d.callback(None)

    async def _drain(self, destination: str) -> None:
        now = self._now_ms()
        step = await self._run_short(
            _begin, destination, self.worker_id, now, now + self._claim_ms, now - self._lifetime_ms)
        self._expired(step.expired, destination)
        if not step.claimed:
            if step.next_attempt > now:
                self._waiting[destination] = step.next_attempt / 1000
            return
        self._waiting.pop(destination, None)
        head = step.head
        while head is not None:
            outcome = await self._attempt(head)
            if outcome.state == "stopped":
                await self._store.run_operation(
                    "UPDATE fedserver_queue_destinations SET claimed_by = NULL, claimed_until = NULL "
                    "WHERE destination = ? AND claimed_by = ?",
                    (destination, self.worker_id),
                )
                return
            now = self._now_ms()
            step = await self._run_short(
                _complete, destination, self.worker_id, head, outcome, now, now + self._claim_ms,
                now - self._lifetime_ms, self.settings, self._rand(), self.running,
            )
            self._report(head, outcome, step)
            self._expired(step.expired, destination)
            if outcome.state == "retry":
                self._waiting[destination] = step.next_attempt / 1000
                self._settle(destination, outcome.error)
                return
            if not step.claimed:
                return
            head = step.head

    def _report(self, head: _Item, outcome: _Outcome, step: _Step) -> None:
        error = outcome.error or {}
        if outcome.state == "delivered":
            self.delivered += 1
            self._announce(Attempt(head.id, head.destination, "delivered", outcome.response))
        elif outcome.state == "dead":
            self.dead += 1
            log.warn("gave up {rpc} to {destination} ({component}, item {id}): {label}: {message}; it is in "
                     "the dead letters (fedserver queue dead) [request {request_id}]",
                     rpc=head.rpc, destination=head.destination, component=head.component, id=head.id,
                     label=error.get("label"), message=error.get("message"), request_id=head.request_id)
            self._announce(Attempt(head.id, head.destination, "dead", outcome.response, outcome.error))
        else:
            self.retried += 1
            wait = max(0.0, step.next_attempt / 1000 - self._now())
            log.info("{rpc} to {destination} (item {id}, attempt {attempt}) failed: {label}: {message}; "
                     "retrying in {wait:.1f} s [request {request_id}]",
                     rpc=head.rpc, destination=head.destination, id=head.id, attempt=head.attempts + 1,
                     label=error.get("label"), message=error.get("message"), wait=wait,
                     request_id=head.request_id)
            self._announce(Attempt(head.id, head.destination, "queued", error=outcome.error))

    def _expired(self, expired: List[str], destination: str) -> None:
        for item_id in expired:
            self.dead += 1
            log.warn("an item to {destination} (item {id}) was not delivered within {lifetime} s "
                     "([queue] max_lifetime): it is in the dead letters", destination=destination, id=item_id,
                     lifetime=self.settings.max_lifetime)
            error = FederationError(f"not delivered to {destination} within {self.settings.max_lifetime} s",
                                    "federation-not-available").to_json()
            self._announce(Attempt(item_id, destination, "dead", error=error))

    async def _attempt(self, head: _Item) -> _Outcome:
        pipeline = self._pipeline()
        path = head.path
        if pipeline is None:
            return _Outcome("retry", error=FederationError(
                "fedserver is still starting: the federation pipeline is not ready", "federation-not-available",
                data={"type": "federation", "domain": head.destination, "path": path}).to_json())
        call = FederatedCall(
            origin_domain=self.backend_domain,
            target_domain=head.destination,
            component=head.component,
            rpc=head.rpc,
            method="POST",
            headers=(*head.headers, (IDEMPOTENCY_HEADER, head.idempotency_key)),
            body=head.body,
            request_id=head.request_id,
        )
        d = pipeline.call_remote(call)
        d.addTimeout(self.delivery_timeout, self._clock)
        self._in_flight[head.destination] = d
        try:
            response = await d
        except defer.TimeoutError:
            return _Outcome("retry", error=FederationError(
                f"{head.destination} did not answer within {self.delivery_timeout} s", "federation-timeout",
                data={"type": "federation", "domain": head.destination, "path": path}).to_json())
        except CancelledError:
            if not self.running:
                return _Outcome("stopped")
            return _Outcome("retry", error=FederationError("the attempt was cancelled", "federation-timeout",
                                                           data={"type": "federation",
                                                                 "domain": head.destination,
                                                                 "path": path}).to_json())
        except FederationError as e:
            e.data = {"type": "federation", "domain": head.destination, "path": path}
            return _Outcome("dead" if e.label in PERMANENT_LABELS else "retry", error=e.to_json())
        except Exception:
            log.failure("{rpc} to {destination} (item {id}) failed unexpectedly [request {request_id}]",
                        rpc=head.rpc, destination=head.destination, id=head.id, request_id=head.request_id)
            return _Outcome("retry", error=FederationError(
                f"internal error; the log has the details under request id {head.request_id}",
                "internal-error", data={"type": "federation", "domain": head.destination, "path": path},
            ).to_json())
        finally:
            self._in_flight.pop(head.destination, None)
        return classify(response, head.destination, path)

    # what operators and the status route see

    def destinations(self) -> List[str]:
        """The destinations with items, as of the last look at the table."""
        return sorted(self.snapshot)

    def describe(self, destination: str) -> Deferred[Optional[Dict[str, Any]]]:
        """C{destination}'s queue (see L{describe_destinations}), or C{None} when nothing is known."""
        d = self._store.run_interaction(describe_destinations, self._now_ms(), destination)
        return d.addCallback(lambda found: found[0] if found else None)


def classify(response: Response, destination: str, path: str) -> _Outcome:
    """What an answer means for the item: delivered, to retry, or dead."""
    if 200 <= response.code < 300:
        return _Outcome("delivered", response)
    error = remote_error(response, destination, path).to_json()
    inner = error.get("inner")
    label = inner.get("label") if isinstance(inner, dict) else None
    if response.code in (408, 429) or response.code >= 500 or (response.code == 409 and label == "request-in-progress"):
        retry_after = None
        value = response.header("Retry-After")
        if value is not None and value.strip().isdigit():
            retry_after = float(int(value.strip()))
        return _Outcome("retry", response, error, retry_after)
    return _Outcome("dead", response, error)


# the transactions, each run on the database thread


def _row_item(row: Sequence[Any]) -> _Item:
    headers = tuple((str(n), str(v)) for n, v in json.loads(row[5]))
    return _Item(row[0], row[1], int(row[2]), row[3], row[4], headers, bytes(row[6]), row[7], row[8], int(row[9]),
                 int(row[10]))


def _insert(cursor: Any, items: Sequence[Outgoing]) -> None:
    for item in items:
        cursor.execute(
            "INSERT INTO fedserver_queue_destinations (destination, next_seq, next_attempt, failures) "
            "VALUES (?, 1, 0, 0) ON CONFLICT (destination) DO NOTHING",
            (item.destination,),
        )
        # the update locks the destination's row: concurrent writers number their items one after the other
        cursor.execute("UPDATE fedserver_queue_destinations SET next_seq = next_seq + 1 WHERE destination = ?",
                       (item.destination,))
        cursor.execute("SELECT next_seq FROM fedserver_queue_destinations WHERE destination = ?",
                       (item.destination,))
        seq = int(cursor.fetchone()[0]) - 1
        cursor.execute(
            f"INSERT INTO fedserver_queue ({_ITEM_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 0)",
            (item.id, item.destination, seq, item.component, item.rpc, json.dumps([list(h) for h in item.headers]),
             item.body, item.idempotency_key, item.request_id, item.created),
        )


def _to_dead(cursor: Any, item_id: str, now: int, reason: str, error: Optional[str]) -> None:
    cursor.execute(
        f"INSERT INTO fedserver_queue_dead ({_ITEM_COLUMNS}, died, reason, error) "
        f"SELECT {_ITEM_COLUMNS}, ?, ?, ? FROM fedserver_queue WHERE id = ?",
        (now, reason, error, item_id),
    )
    cursor.execute("DELETE FROM fedserver_queue WHERE id = ?", (item_id,))


def _next_head(cursor: Any, destination: str, now: int, expired_before: int) -> Tuple[Optional[_Item], List[str]]:
    """The destination's oldest item, after moving those past their lifetime to the dead letters."""
    expired: List[str] = []
    while True:
        cursor.execute(
            f"SELECT {_ITEM_COLUMNS} FROM fedserver_queue WHERE destination = ? ORDER BY seq LIMIT 1",
            (destination,),
        )
        row = cursor.fetchone()
        if row is None:
            return None, expired
        item = _row_item(row)
        if item.created > expired_before:
            cursor.execute("UPDATE fedserver_queue SET attempts = attempts + 1 WHERE id = ?", (item.id,))
            return item, expired
        cursor.execute("SELECT last_error FROM fedserver_queue_destinations WHERE destination = ?", (destination,))
        last = cursor.fetchone()
        error = FederationError(
            f"not delivered to {destination} within its lifetime ([queue] max_lifetime); the last attempt "
            f"failed with {last[0] if last and last[0] else 'nothing recorded'}",
            "federation-not-available", data={"type": "federation", "domain": destination, "path": item.path},
        )
        _to_dead(cursor, item.id, now, "expired", json.dumps(error.to_json()))
        expired.append(item.id)


def _release(cursor: Any, destination: str, worker: str) -> None:
    cursor.execute(
        "UPDATE fedserver_queue_destinations SET claimed_by = NULL, claimed_until = NULL "
        "WHERE destination = ? AND claimed_by = ?",
        (destination, worker),
    )


def _begin(cursor: Any, destination: str, worker: str, now: int, claim_until: int, expired_before: int) -> _Step:
    cursor.execute(
        "UPDATE fedserver_queue_destinations SET claimed_by = ?, claimed_until = ? WHERE destination = ? "
        "AND next_attempt <= ? AND (claimed_by IS NULL OR claimed_by = ? OR claimed_until < ?)",
        (worker, claim_until, destination, now, worker, now),
    )
    if cursor.rowcount != 1:
        cursor.execute("SELECT next_attempt FROM fedserver_queue_destinations WHERE destination = ?", (destination,))
        row = cursor.fetchone()
        return _Step(False, None, [], int(row[0]) if row else 0)
    head, expired = _next_head(cursor, destination, now, expired_before)
    if head is None:
        _release(cursor, destination, worker)
    return _Step(head is not None, head, expired, 0)


def _complete(
    cursor: Any, destination: str, worker: str, head: _Item, outcome: _Outcome, now: int, claim_until: int,
    expired_before: int, settings: QueueSettings, fraction: float, go_on: bool,
) -> _Step:
    error = json.dumps(outcome.error) if outcome.error is not None else None
    summary = _summary(outcome.error)
    if outcome.state == "delivered":
        cursor.execute("DELETE FROM fedserver_queue WHERE id = ?", (head.id,))
        cursor.execute(
            "UPDATE fedserver_queue_destinations SET failures = 0, next_attempt = 0, last_error = NULL, "
            "last_attempt = ?, last_success = ? WHERE destination = ?",
            (now, now, destination),
        )
    elif outcome.state == "dead":
        _to_dead(cursor, head.id, now, "refused", error)
        cursor.execute(
            "UPDATE fedserver_queue_destinations SET failures = 0, next_attempt = 0, last_error = ?, "
            "last_attempt = ? WHERE destination = ?",
            (summary, now, destination),
        )
    else:
        cursor.execute("SELECT failures FROM fedserver_queue_destinations WHERE destination = ?", (destination,))
        failures = int(cursor.fetchone()[0]) + 1
        delay = backoff_delay(failures, settings, fraction, outcome.retry_after)
        # the head is given up on time, not up to max_backoff later
        next_attempt = min(now + int(delay * 1000), head.created + int(settings.max_lifetime * 1000))
        cursor.execute(
            "UPDATE fedserver_queue_destinations SET failures = ?, next_attempt = ?, last_error = ?, "
            "last_attempt = ?, claimed_by = NULL, claimed_until = NULL WHERE destination = ? AND claimed_by = ?",
            (failures, max(next_attempt, now + 1), summary, now, destination, worker),
        )
        return _Step(False, None, [], max(next_attempt, now + 1))
    if not go_on:
        _release(cursor, destination, worker)
        return _Step(False, None, [], 0)
    cursor.execute(
        "UPDATE fedserver_queue_destinations SET claimed_until = ? WHERE destination = ? AND claimed_by = ?",
        (claim_until, destination, worker),
    )
    if cursor.rowcount != 1:  # another worker took the destination over (this one was too slow)
        return _Step(False, None, [], 0)
    head_, expired = _next_head(cursor, destination, now, expired_before)
    if head_ is None:
        _release(cursor, destination, worker)
    return _Step(head_ is not None, head_, expired, 0)


def _summary(error: Optional[Dict[str, Any]]) -> Optional[str]:
    if error is None:
        return None
    text = f"{error.get('label')}: {error.get('message')}"
    inner = error.get("inner")
    if isinstance(inner, dict) and inner.get("label"):
        text += f" ({inner.get('label')}: {inner.get('message')})"
    return text[:1000]


# for operators: fedserver queue, the status route


def describe_destinations(cursor: Any, now: int, destination: Optional[str] = None) -> List[Dict[str, Any]]:
    """
    Every destination with items, dead letters or failures (or only
    C{destination}): depth, oldest age, next attempt, failures in a row,
    last error, last success, the worker delivering it and its dead letters.
    """
    where = "WHERE d.destination = ?" if destination is not None else ""
    cursor.execute(
        "SELECT d.destination, d.next_attempt, d.failures, d.last_error, d.last_attempt, d.last_success, "
        "d.claimed_by, d.claimed_until, "
        "(SELECT COUNT(*) FROM fedserver_queue q WHERE q.destination = d.destination), "
        "(SELECT q.created FROM fedserver_queue q WHERE q.destination = d.destination ORDER BY q.seq LIMIT 1), "
        "(SELECT COUNT(*) FROM fedserver_queue_dead x WHERE x.destination = d.destination) "
        f"FROM fedserver_queue_destinations d {where} ORDER BY d.destination",
        (destination,) if destination is not None else (),
    )
    found = []
    for (name, next_attempt, failures, last_error, last_attempt, last_success, claimed_by, claimed_until, depth,
         oldest, dead) in cursor.fetchall():
        if destination is None and not (depth or dead or failures):
            continue
        found.append({
            "destination": name,
            "depth": int(depth),
            "oldest_age": round((now - oldest) / 1000, 3) if oldest is not None else None,
            "next_attempt": next_attempt / 1000 if next_attempt > now else None,
            "next_attempt_in": round(max(0, next_attempt - now) / 1000, 3),
            "failures": int(failures),
            "last_error": last_error,
            "last_attempt": last_attempt / 1000 if last_attempt is not None else None,
            "last_success": last_success / 1000 if last_success is not None else None,
            "delivering": claimed_by if claimed_by is not None and (claimed_until or 0) >= now else None,
            "dead": int(dead),
        })
    return found


def retry_destination(cursor: Any, destination: str) -> int:
    """End C{destination}'s backoff (a running queue takes it up at its next poll); the items waiting."""
    cursor.execute("UPDATE fedserver_queue_destinations SET next_attempt = 0 WHERE destination = ?", (destination,))
    cursor.execute("SELECT COUNT(*) FROM fedserver_queue WHERE destination = ?", (destination,))
    return int(cursor.fetchone()[0])


def drop_destination(cursor: Any, destination: str, now: int) -> int:
    """Move C{destination}'s items to the dead letters (reason C{dropped}); how many."""
    cursor.execute("SELECT id FROM fedserver_queue WHERE destination = ? ORDER BY seq", (destination,))
    ids = [row[0] for row in cursor.fetchall()]
    for item_id in ids:
        _to_dead(cursor, item_id, now, "dropped", None)
    return len(ids)


def requeue_dead(cursor: Any, destination: str, now: int) -> int:
    """
    Put C{destination}'s dead letters back at the end of its queue, in the
    order they were first queued, with a new lifetime and their idempotency
    keys; how many.
    """
    cursor.execute(f"SELECT {_ITEM_COLUMNS} FROM fedserver_queue_dead WHERE destination = ? ORDER BY created, seq",
                   (destination,))
    items = [_row_item(row) for row in cursor.fetchall()]
    _insert(cursor, [Outgoing(i.id, i.destination, i.component, i.rpc, i.headers, i.body, i.idempotency_key,
                              i.request_id, now) for i in items])
    cursor.execute("DELETE FROM fedserver_queue_dead WHERE destination = ?", (destination,))
    cursor.execute("UPDATE fedserver_queue_destinations SET next_attempt = 0 WHERE destination = ?", (destination,))
    return len(items)


def delete_dead(cursor: Any, destination: str) -> int:
    """Delete C{destination}'s dead letters for good; how many."""
    cursor.execute("SELECT COUNT(*) FROM fedserver_queue_dead WHERE destination = ?", (destination,))
    count = int(cursor.fetchone()[0])
    cursor.execute("DELETE FROM fedserver_queue_dead WHERE destination = ?", (destination,))
    return count


def dead_letters(cursor: Any, destination: Optional[str] = None, limit: int = 100) -> List[Dict[str, Any]]:
    """The most recent dead letters (of C{destination}), newest first."""
    where = "WHERE destination = ?" if destination is not None else ""
    cursor.execute(
        "SELECT id, destination, component, rpc, idempotency_key, request_id, created, attempts, died, reason, "
        f"error FROM fedserver_queue_dead {where} ORDER BY died DESC, seq DESC LIMIT ?",
        ((destination,) if destination is not None else ()) + (limit,),
    )
    return [
        {"id": row[0], "destination": row[1], "component": row[2], "rpc": row[3], "idempotency_key": row[4],
         "request_id": row[5], "created": row[6] / 1000, "attempts": int(row[7]), "died": row[8] / 1000,
         "reason": row[9], "error": json.loads(row[10]) if row[10] else None}
        for row in cursor.fetchall()
    ]


def queue_metrics(queue: OutboundQueue) -> Callable[[], List[Any]]:
    """
    A collector for L{fedserver.metrics.Metrics.register_collector}: depth,
    oldest age and failures in a row per destination (as of the last poll),
    and this worker's deliveries, dead letters and retries.
    """
    from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily

    def collect() -> List[Any]:
        now = queue._now_ms()
        depth = GaugeMetricFamily("fedserver_queue_depth", "Items in the outbound queue, by destination",
                                  labels=["destination"])
        age = GaugeMetricFamily("fedserver_queue_oldest_age_seconds",
                                "Age of the oldest item in the outbound queue, by destination", labels=["destination"])
        failures = GaugeMetricFamily("fedserver_queue_failures",
                                     "Failed attempts in a row to a destination of the outbound queue",
                                     labels=["destination"])
        for destination, state in sorted(queue.snapshot.items())[:1000]:
            depth.add_metric([destination], state.depth)
            if state.oldest is not None:
                age.add_metric([destination], max(0, now - state.oldest) / 1000)
            failures.add_metric([destination], state.failures)
        outcomes = CounterMetricFamily("fedserver_queue_attempts",
                                       "Attempts of the outbound queue by this worker, by outcome "
                                       "(delivered, dead, retry)", labels=["outcome"])
        outcomes.add_metric(["delivered"], queue.delivered)
        outcomes.add_metric(["dead"], queue.dead)
        outcomes.add_metric(["retry"], queue.retried)
        return [depth, age, failures, outcomes]

    return collect


__all__ = [
    "DELIVERY_HEADER",
    "Attempt",
    "OutboundQueue",
    "Outgoing",
    "backoff_delay",
    "classify",
    "default_worker_id",
    "queue_metrics",
]
