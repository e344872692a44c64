"""
Federation transactions (C{PUT /_matrix/federation/v1/send/{txnId}}) as
the specification and Synapse's experience ask:

 - at most 50 PDUs and 100 EDUs, else 400;
 - a repeated C{(origin, txnId)} is answered with the first successful
   answer, for 24 hours and across restarts, without being processed again;
 - one transaction in flight per origin: another gets 429.
"""

from __future__ import annotations

import json
from typing import Any, Callable, Set

from twisted.application.internet import TimerService
from twisted.internet.defer import Deferred
from twisted.logger import Logger

from fedserver.values import Response
from fedserver_matrix.errors import matrix_response

log = Logger(namespace="fedserver.matrix.transactions")

MAX_PDUS = 50
MAX_EDUS = 100
#: how long a transaction's answer is replayed, in milliseconds
REPLAY_FOR_MS = 24 * 3600 * 1000

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
]


class Transactions:
    """
    @param store: the L{fedserver.storage.Store}; the schema is registered here.
    """

    def __init__(self, store: Any, clock: Any) -> None:
        store.register_schema("matrix-transactions", SCHEMA)
        self._store = store
        self._clock = clock
        self._in_flight: Set[str] = set()

    def _now_ms(self) -> int:
        return int(self._clock.seconds() * 1000)

    def check(self, body: bytes) -> Response | None:
        """A 400 answer when the transaction breaks the size rules, else C{None}."""
        document = json.loads(body or b"{}")
        if not isinstance(document, dict):
            return matrix_response(400, "M_BAD_JSON", "a transaction is a JSON object")
        pdus, edus = document.get("pdus", []), document.get("edus", [])
        if not isinstance(pdus, list) or not isinstance(edus, list):
            return matrix_response(400, "M_BAD_JSON", "pdus and edus must be lists")
        if len(pdus) > MAX_PDUS or len(edus) > MAX_EDUS:
            return matrix_response(
                400, "M_BAD_JSON",
                f"a transaction carries at most {MAX_PDUS} PDUs and {MAX_EDUS} EDUs, "
                f"not {len(pdus)} and {len(edus)}",
            )
        return None

    def handle(self, origin: str, txn_id: str, body: bytes,
               process: Callable[[], Deferred[Response]]) -> Deferred[Response]:
        """Answer the transaction: replayed, refused, or C{process()}ed once."""
        return Deferred.fromCoroutine(self._handle(origin, txn_id, body, process))

    async def _handle(self, origin: str, txn_id: str, body: bytes,
                      process: Callable[[], Deferred[Response]]) -> Response:
        refusal = self.check(body)
        if refusal is not None:
            return refusal
        rows = await self._store.run_query(
            "SELECT code, body FROM matrix_transactions WHERE origin = ? AND txn_id = ? AND received_ms > ?",
            (origin, txn_id, self._now_ms() - REPLAY_FOR_MS),
        )
        if rows:
            code, stored = rows[0]
            log.info("transaction {txn_id} from {origin} seen before: answered again", txn_id=txn_id,
                     origin=origin)
            return Response(code, [("Content-Type", "application/json")], bytes(stored))
        if origin in self._in_flight:
            return matrix_response(429, "M_LIMIT_EXCEEDED",
                                   f"a transaction from {origin} is still being processed")
        self._in_flight.add(origin)
        try:
            response = await process()
            if 200 <= response.code < 300:
                await self._store.run_operation(
                    "INSERT INTO matrix_transactions (origin, txn_id, code, body, received_ms) "
                    "VALUES (?, ?, ?, ?, ?) ON CONFLICT (origin, txn_id) DO UPDATE SET "
                    "code = excluded.code, body = excluded.body, received_ms = excluded.received_ms",
                    (origin, txn_id, response.code, response.body, self._now_ms()),
                )
            return response
        finally:
            self._in_flight.discard(origin)

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
