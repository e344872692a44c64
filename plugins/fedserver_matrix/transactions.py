"""
Federation transactions (C{PUT /_matrix/federation/v1/send/{txnId}}) as
the specification and Synapse's experience ask:

 - at most 50 PDUs and 100 EDUs, else 400;
 - a repeated C{(origin, txnId)} is answered with the first successful
   answer, for 24 hours and across restarts, without being processed again;
 - one transaction in flight per origin: another gets 429 C{M_LIMIT_EXCEEDED}
   with C{retry_after_ms} and C{Retry-After} (label C{too-many-requests}).
   The claim on an origin is a lease row in the database, so fedserver
   processes sharing a PostgreSQL database hold it together; a lease left
   behind (a process that died, a database that failed while letting go)
   runs out after C{lease_seconds}, measured by each process's clock.
"""

from __future__ import annotations

import json
import uuid
from typing import Any, Callable, Optional, Tuple, Union

from twisted.application.internet import TimerService
from twisted.internet.defer import CancelledError, Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from fedserver.errors import FederationError
from fedserver.values import Response
from fedserver_matrix.errors import MatrixRefusal

log = Logger(namespace="fedserver.matrix.transactions")

MAX_PDUS = 50
MAX_EDUS = 100
#: how long a transaction's answer is replayed, in milliseconds
REPLAY_FOR_MS = 24 * 3600 * 1000
#: what an origin whose transaction is in flight is told to wait
RETRY_AFTER_SECONDS = 1

SCHEMA = [
    """
    CREATE TABLE matrix_transactions (
        origin TEXT NOT NULL,
        txn_id TEXT NOT NULL,
        code INTEGER NOT NULL,
        body BLOB NOT NULL,
        received_ms BIGINT NOT NULL,
        PRIMARY KEY (origin, txn_id)
    );
    CREATE INDEX matrix_transactions_received ON matrix_transactions (received_ms)
    """,
    """
    CREATE TABLE matrix_transactions_in_flight (
        origin TEXT PRIMARY KEY,
        holder TEXT NOT NULL,
        expires_ms BIGINT NOT NULL
    )
    """,
]

#: what L{Transactions._begin} found: a stored answer, the lease, or neither
_Begun = Union[Tuple[int, bytes], bool]


class Transactions:
    """
    @param store: the L{fedserver.storage.Store}; the schema is registered here.
    @param lease_seconds: how long an origin stays claimed by a transaction
        whose process died before it finished; longer than processing may
        take (the route's deadline), or a second transaction of the origin
        could start while the first is still processed.
    """

    def __init__(self, store: Any, clock: Any, *, lease_seconds: float = 60.0) -> None:
        store.register_schema("matrix-transactions", SCHEMA)
        self._store = store
        self._clock = clock
        self._lease_ms = int(lease_seconds * 1000)

    def _now_ms(self) -> int:
        return int(self._clock.seconds() * 1000)

    def check(self, body: bytes) -> None:
        """
        Refuse a transaction that breaks the size rules (400 C{M_BAD_JSON},
        labelled C{invalid-json}).
        """
        document = json.loads(body or b"{}")
        if not isinstance(document, dict):
            raise MatrixRefusal("a transaction is a JSON object")
        pdus, edus = document.get("pdus", []), document.get("edus", [])
        if not isinstance(pdus, list) or not isinstance(edus, list):
            raise MatrixRefusal("pdus and edus must be lists")
        if len(pdus) > MAX_PDUS or len(edus) > MAX_EDUS:
            raise MatrixRefusal(f"a transaction carries at most {MAX_PDUS} PDUs and {MAX_EDUS} EDUs, "
                                f"not {len(pdus)} and {len(edus)}")

    def handle(self, origin: str, txn_id: str, body: bytes,
               process: Callable[[], Deferred[Response]]) -> Deferred[Response]:
        """
        Answer the transaction: replayed, or C{process()}ed once; fails with
        C{invalid-json} (the size rules) or C{too-many-requests} (another
        transaction of the origin is in flight).
        """
        return Deferred.fromCoroutine(self._handle(origin, txn_id, body, process))

    async def _handle(self, origin: str, txn_id: str, body: bytes,
                      process: Callable[[], Deferred[Response]]) -> Response:
        self.check(body)
        holder = uuid.uuid4().hex
        begun = await self._begun(origin, txn_id, holder)
        if isinstance(begun, tuple):
            code, stored = begun
            log.info("transaction {txn_id} from {origin} seen before: answered again", txn_id=txn_id,
                     origin=origin)
            return Response(code, [("Content-Type", "application/json")], bytes(stored))
        if not begun:
            raise FederationError(
                f"a transaction from {origin} is still being processed; try again in {RETRY_AFTER_SECONDS} s",
                "too-many-requests", data={"type": "federation", "domain": origin},
                headers=[("Retry-After", str(RETRY_AFTER_SECONDS))],
            )
        answer: Optional[Response] = None
        try:
            response = await process()
            if 200 <= response.code < 300:
                answer = response
            return response
        finally:
            await self._finish(origin, txn_id, holder, answer)

    def _begun(self, origin: str, txn_id: str, holder: str) -> Deferred[_Begun]:
        """
        L{_begin} in the database.  The caller may give up (a deadline, the
        peer went away) while it runs, and the database cannot be stopped
        half-way: a lease taken for a caller that gave up is let go again.
        """
        taking = self._store.run_interaction(self._begin, origin, txn_id, holder, self._now_ms())
        waiting: Deferred[_Begun] = Deferred()

        def settle(result: Any) -> None:
            if not waiting.called:
                waiting.callback(result)
            elif result is True:
                Deferred.fromCoroutine(self._finish(origin, txn_id, holder, None))
            elif isinstance(result, Failure):
                log.failure("taking the lease of {origin} failed after its caller gave up", result, origin=origin)

        taking.addBoth(settle)
        return waiting

    async def _finish(self, origin: str, txn_id: str, holder: str, answer: Optional[Response]) -> None:
        """
        Store a successful answer and let the origin go, in one database
        transaction.  A failure is logged, not raised: the homeserver's
        answer still goes to the peer; the lease runs out by itself.
        """
        try:
            await self._store.run_interaction(self._end, origin, txn_id, holder, answer, self._now_ms())
        except CancelledError:
            pass  # the caller gave up waiting; the database does it all the same
        except Exception:
            log.failure("storing the answer to transaction {txn_id} from {origin} or letting {origin} go failed: "
                        "a repeat will be processed again, and {origin} waits until the lease runs out "
                        "({lease} s)", txn_id=txn_id, origin=origin, lease=self._lease_ms / 1000)

    def _begin(self, cursor: Any, origin: str, txn_id: str, holder: str, now_ms: int) -> _Begun:
        # take the origin's lease unless another holds it and it has not run out; on PostgreSQL
        # this waits for a holder that is letting go right now, so the answer read next is its own
        cursor.execute(
            "INSERT INTO matrix_transactions_in_flight (origin, holder, expires_ms) VALUES (?, ?, ?) "
            "ON CONFLICT (origin) DO UPDATE SET holder = excluded.holder, expires_ms = excluded.expires_ms "
            "WHERE matrix_transactions_in_flight.expires_ms <= ?",
            (origin, holder, now_ms + self._lease_ms, now_ms),
        )
        leased = cursor.rowcount == 1
        cursor.execute(
            "SELECT code, body FROM matrix_transactions WHERE origin = ? AND txn_id = ? AND received_ms > ?",
            (origin, txn_id, now_ms - REPLAY_FOR_MS),
        )
        row = cursor.fetchone()
        if row is None:
            return leased
        if leased:
            cursor.execute("DELETE FROM matrix_transactions_in_flight WHERE origin = ? AND holder = ?",
                           (origin, holder))
        return int(row[0]), bytes(row[1])

    @staticmethod
    def _end(cursor: Any, origin: str, txn_id: str, holder: str, answer: Optional[Response], now_ms: int) -> None:
        if answer is not None:
            cursor.execute(
                "INSERT INTO matrix_transactions (origin, txn_id, code, body, received_ms) "
                "VALUES (?, ?, ?, ?, ?) ON CONFLICT (origin, txn_id) DO UPDATE SET "
                "code = excluded.code, body = excluded.body, received_ms = excluded.received_ms",
                (origin, txn_id, answer.code, answer.body, now_ms),
            )
        cursor.execute("DELETE FROM matrix_transactions_in_flight WHERE origin = ? AND holder = ?",
                       (origin, holder))

    def prune(self) -> Deferred[None]:
        """Forget the answers older than the replay window."""
        return self._store.run_operation(
            "DELETE FROM matrix_transactions WHERE received_ms < ?", (self._now_ms() - REPLAY_FOR_MS,)
        )

    def pruning_service(self, interval: float = 3600.0) -> TimerService:
        """A service that prunes every C{interval} seconds."""
        service = TimerService(interval, self._prune_logged)
        service.clock = self._clock
        return service

    def _prune_logged(self) -> Deferred[None]:
        d = self.prune()
        d.addErrback(lambda f: log.failure("pruning old transactions failed", f))
        return d
