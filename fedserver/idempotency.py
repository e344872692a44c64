"""
Deduplication of inbound calls that carry an idempotency key.

A sender that may send a call more than once (the durable outbound queue,
L{fedserver.outbound_queue}, retries until it hears an answer) names the
call with C{Fedserver-Idempotency-Key}.  The receiving pipeline hands such a
call to the component once per C{(origin domain, key)} and keeps the answer
for C{[queue] dedup_ttl} seconds (6 days by default: longer than a sender's
C{max_lifetime}, 5 days); a repeat gets the kept answer without the
component being called.  This follows the IETF draft "The Idempotency-Key
HTTP Header Field" (draft-ietf-httpapi-idempotency-key-header):

- a repeat with another component, RPC or body is refused:
  C{422 idempotency-key-reused};
- a repeat while the first is still being handled waits for it and gets
  its answer when both arrive at this process; when the first is being
  handled by another process on the same database (PostgreSQL workers),
  the repeat is refused with C{409 request-in-progress}, which a sender
  retries later;
- a key that is not 1 to 128 of C{A-Za-z0-9_.:@/+=-} is
  C{400 invalid-idempotency-key}.

What is kept: answers under 500 except 408 and 429, so that a component's
deterministic refusal is repeated too.  A 5xx answer, a failure to reach
the component (C{component-unavailable}), or any exception is not kept:
the key is released and the sender's retry runs again.

Once the component has the call, it finishes even if the sender goes away
(its connection is cut, or the route's deadline passes): the answer is
kept for the retry, which is how a sender killed mid-delivery gets its
answer without the component seeing the call twice.

A claim is a row with no answer yet.  One left by a process that died is
taken over when it is older than C{pending_timeout} (the inward route's
deadline: a live process has given up on it by then).
"""

from __future__ import annotations

import hashlib
import re
from typing import Any, Dict, List, Optional, Tuple

from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from fedserver.errors import FederationError
from fedserver.interfaces import IComponentHandler
from fedserver.values import FederatedCall, Response

log = Logger(namespace="fedserver.idempotency")

#: the header that names a call for deduplication
IDEMPOTENCY_HEADER = "Fedserver-Idempotency-Key"

#: what a key may be
KEY = re.compile(r"[A-Za-z0-9_.:@/+=-]{1,128}")

SCHEMA_OWNER = "fedserver-idempotency"
SCHEMA_STEPS = [
    """
    CREATE TABLE fedserver_idempotency (
        origin TEXT NOT NULL,
        idem_key TEXT NOT NULL,
        fingerprint TEXT NOT NULL,
        code INTEGER,
        content_type TEXT,
        body BLOB,
        created BIGINT NOT NULL,
        PRIMARY KEY (origin, idem_key)
    );
    CREATE INDEX fedserver_idempotency_by_created ON fedserver_idempotency (created)
    """,
]

#: seconds between two prunings of expired answers
PRUNE_INTERVAL = 3600.0
#: seconds from start to the first pruning (not while everything starts)
FIRST_PRUNE = 60.0


def check_key(value: str) -> str:
    """C{value} if it is a usable idempotency key; C{400 invalid-idempotency-key} otherwise."""
    if not KEY.fullmatch(value):
        raise FederationError(
            f"the {IDEMPOTENCY_HEADER} header must be 1 to 128 characters of A-Z, a-z, 0-9 and _.:@/+=-",
            "invalid-idempotency-key",
        )
    return value


def fingerprint(call: FederatedCall) -> str:
    """What a repeat must match: the component, the RPC and the body."""
    digest = hashlib.sha256()
    for part in (call.component.encode(), call.rpc.encode(), call.body):
        digest.update(len(part).to_bytes(8, "big"))
        digest.update(part)
    return digest.hexdigest()


def kept(code: int) -> bool:
    """Whether an answer with status C{code} is kept for repeats."""
    return code < 500 and code not in (408, 429)


class Deduplicator(Service):
    """
    Runs each keyed inbound call once per origin and key (see the module
    docstring); the pipeline hands it calls that carry
    L{IDEMPOTENCY_HEADER}.

    @param store: the L{fedserver.storage.Store}; the schema
        C{fedserver-idempotency} is registered on it here.
    @param ttl: seconds an answer is kept.
    @param pending_timeout: seconds after which a claim without an answer
        counts as abandoned.
    """

    def __init__(self, store: Any, *, clock: Any, ttl: float, pending_timeout: float) -> None:
        self._store = store
        self._clock = clock
        self.ttl = ttl
        self.pending_timeout = pending_timeout
        store.register_schema(SCHEMA_OWNER, SCHEMA_STEPS)
        #: (origin, key) -> (fingerprint, the shared outcome) of calls being handled here
        self._running: Dict[Tuple[str, str], Tuple[str, _Shared]] = {}
        self._prune_call: Any = None
        #: answers given again without calling the component, so far
        self.replayed = 0

    def _now_ms(self) -> int:
        return int(self._clock.seconds() * 1000)

    # the service: prunes expired answers now and then

    def startService(self) -> None:
        super().startService()
        self._prune_call = self._clock.callLater(FIRST_PRUNE, self._prune)

    def stopService(self) -> None:
        super().stopService()
        if self._prune_call is not None and self._prune_call.active():
            self._prune_call.cancel()
        self._prune_call = None

    def _prune(self) -> None:
        self._prune_call = None
        d = self.prune()
        d.addErrback(lambda f: log.failure("pruning expired idempotency keys failed", f))

        def again(_: Any) -> None:
            if self.running:
                self._prune_call = self._clock.callLater(PRUNE_INTERVAL, self._prune)

        d.addBoth(again)

    def prune(self) -> Deferred[None]:
        """Forget answers older than the TTL, and claims that were abandoned as long ago."""
        return self._store.run_operation(
            "DELETE FROM fedserver_idempotency WHERE created < ?", (self._now_ms() - int(self.ttl * 1000),)
        )

    # the calls

    def handle(self, call: FederatedCall, handler: IComponentHandler) -> Deferred[Response]:
        """
        Hand C{call} to C{handler} unless it was handled already; fire with
        the component's answer or the kept one.  Cancelling the returned
        L{Deferred} does not cancel the component's work.
        """
        key = call.header(IDEMPOTENCY_HEADER)
        if key is None:
            return handler.handle(call)
        try:
            check_key(key)
        except FederationError:
            return defer.fail()
        ident = (call.origin_domain, key)
        print_ = fingerprint(call)
        running = self._running.get(ident)
        if running is not None:
            if running[0] != print_:
                return defer.fail(_reused(key))
            log.info("{origin} repeated call {key} while it is handled: waiting for its answer "
                     "[request {request_id}]", origin=call.origin_domain, key=key, request_id=call.request_id)
            return running[1].follow()
        work = Deferred.fromCoroutine(self._handle(call, handler, ident, print_))

        def done(result: Any) -> Any:
            self._running.pop(ident, None)
            return result

        work.addBoth(done)
        shared = _Shared(work)
        if not work.called:
            self._running[ident] = (print_, shared)
        return shared.follow()

    async def _handle(
        self, call: FederatedCall, handler: IComponentHandler, ident: Tuple[str, str], print_: str
    ) -> Response:
        origin, key = ident
        now = self._now_ms()
        # calls arriving at the same moment share one commit
        state, answer = await self._store.run_grouped(
            _claim, origin, key, print_, now, now - int(self.ttl * 1000), now - int(self.pending_timeout * 1000)
        )
        if state == "kept":
            self.replayed += 1
            log.info("{origin} repeated call {key}: answered {code} as the first time, without calling "
                     "{component} [request {request_id}]", origin=origin, key=key, code=answer.code,
                     component=call.component, request_id=call.request_id)
            return answer
        if state == "reused":
            raise _reused(key)
        if state == "busy":
            raise FederationError(
                f"call {key} from {origin} is being handled by another worker; try again later",
                "request-in-progress",
            )
        try:
            response = await handler.handle(call)
        except BaseException:
            failure = Failure()
            await self._release(origin, key, call.request_id)
            failure.raiseException()
        if isinstance(response, Response) and isinstance(response.body, bytes) and kept(response.code):
            try:
                await self._store.run_grouped(_keep, origin, key, response)
            except Exception:
                # the answer stands; a repeat finds the claim and, once it is abandoned, runs again
                log.failure("keeping the answer to call {key} from {origin} failed [request {request_id}]",
                            origin=origin, key=key, request_id=call.request_id)
        else:
            await self._release(origin, key, call.request_id)
        return response

    async def _release(self, origin: str, key: str, request_id: str) -> None:
        try:
            await self._store.run_operation(
                "DELETE FROM fedserver_idempotency WHERE origin = ? AND idem_key = ? AND code IS NULL",
                (origin, key),
            )
        except Exception:
            log.failure("releasing call {key} from {origin} failed [request {request_id}]",
                        origin=origin, key=key, request_id=request_id)


def _keep(cursor: Any, origin: str, key: str, response: Response) -> None:
    cursor.execute(
        "UPDATE fedserver_idempotency SET code = ?, content_type = ?, body = ? WHERE origin = ? AND idem_key = ?",
        (response.code, response.header("Content-Type"), response.body, origin, key),
    )


def _reused(key: str) -> FederationError:
    return FederationError(
        f"the idempotency key {key} was used before for another call (another component, RPC or body); "
        "a new call needs a new key",
        "idempotency-key-reused",
    )


class _Shared:
    """
    The outcome of one call, handed to every caller waiting for it; a
    caller that gives up (cancels its L{Deferred}) leaves the call running.
    """

    def __init__(self, d: Deferred[Response]) -> None:
        self._outcome: Any = None
        self._done = False
        self._waiting: List[Deferred[Response]] = []
        d.addBoth(self._finished)

    def _finished(self, outcome: Any) -> None:
        self._outcome, self._done = outcome, True
        waiting, self._waiting = self._waiting, []
        for follower in waiting:
            _fire(follower, outcome)
        # the outcome went to the followers (each reports its own unhandled failure)

    def follow(self) -> Deferred[Response]:
        follower: Deferred[Response] = Deferred()
        if self._done:
            _fire(follower, self._outcome)
        else:
            self._waiting.append(follower)
        return follower


def _fire(follower: Deferred[Response], outcome: Any) -> None:
    if follower.called:  # cancelled: its caller went away
        return
    if isinstance(outcome, Failure):
        follower.errback(outcome)
    else:
        follower.callback(outcome)


def _claim(
    cursor: Any, origin: str, key: str, print_: str, now: int, expired_before: int, abandoned_before: int
) -> Tuple[str, Optional[Response]]:
    """
    Claim C{(origin, key)}: C{("claimed", None)}, C{("kept", answer)},
    C{("busy", None)} (another worker has it) or C{("reused", None)}.
    """
    cursor.execute(
        "SELECT fingerprint, code, content_type, body, created FROM fedserver_idempotency "
        "WHERE origin = ? AND idem_key = ?",
        (origin, key),
    )
    row = cursor.fetchone()
    if row is not None:
        old_print, code, content_type, body, created = row
        if created < expired_before:
            cursor.execute("DELETE FROM fedserver_idempotency WHERE origin = ? AND idem_key = ?", (origin, key))
        elif old_print != print_:
            return "reused", None
        elif code is not None:
            headers = [("Content-Type", content_type)] if content_type else []
            return "kept", Response(int(code), headers, bytes(body or b""))
        elif created >= abandoned_before:
            return "busy", None
        else:
            cursor.execute(
                "UPDATE fedserver_idempotency SET created = ? WHERE origin = ? AND idem_key = ? AND created = ? "
                "AND code IS NULL",
                (now, origin, key, created),
            )
            return ("claimed", None) if cursor.rowcount == 1 else ("busy", None)
    cursor.execute(
        "INSERT INTO fedserver_idempotency (origin, idem_key, fingerprint, code, content_type, body, created) "
        "VALUES (?, ?, ?, NULL, NULL, NULL, ?) ON CONFLICT (origin, idem_key) DO NOTHING",
        (origin, key, print_, now),
    )
    return ("claimed", None) if cursor.rowcount == 1 else ("busy", None)


__all__ = ["IDEMPOTENCY_HEADER", "Deduplicator", "check_key", "fingerprint", "kept"]
