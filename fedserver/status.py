"""
What fedserver knows about each remote backend domain, for operators:
C{GET /status/domains} and C{GET /status/domains/{domain}} on the outward
listener.

L{DomainStatus} is a pipeline observer: every call to or from a domain
updates its last success, its last error and how many calls in a row have
failed.  The route adds what the discovery caches hold for the domain and,
when fedserver has an outbound queue, the domain's queue and backoff.
"""

from __future__ import annotations

import datetime
from collections import OrderedDict
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

import attrs
from twisted.internet.defer import Deferred
from twisted.web import resource, server

from fedserver.discovery_cache import DiscoveryCache
from fedserver.jsonapi import APIError, JSONAPIResource, Router, deferred, json_response
from fedserver.pipeline import CallOutcome
from fedserver.values import Response

#: domains remembered at most; the one seen least recently goes first
MAX_DOMAINS = 10000


def timestamp(seconds: float) -> Dict[str, Any]:
    """A time as ISO 8601 (UTC) and as seconds since the epoch."""
    moment = datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc)
    return {"time": moment.isoformat(timespec="milliseconds").replace("+00:00", "Z"), "timestamp": seconds}


@attrs.define
class DirectionStatus:
    """Calls in one direction (to or from a domain)."""

    requests: int = 0
    failures: int = 0
    #: calls since the last success that did not succeed
    consecutive_failures: int = 0
    last_success: Optional[float] = None
    last_error: Optional[Dict[str, Any]] = None

    def to_json(self) -> Dict[str, Any]:
        error = self.last_error
        return {
            "requests": self.requests,
            "failures": self.failures,
            "consecutive_failures": self.consecutive_failures,
            "last_success": timestamp(self.last_success) if self.last_success is not None else None,
            "last_error": None if error is None else {
                **{k: v for k, v in error.items() if k != "at"}, **timestamp(error["at"])
            },
        }


class DomainStatus:
    """
    The last success and error of calls to and from each remote domain, fed
    by the pipeline (L{observe}).  Inbound calls count once their peer is
    authenticated: a stranger cannot make up domains here.  An answer that
    is not 2xx counts as an error (C{federation-remote-error} outbound,
    C{component-error} inbound).

    @param clock: C{IReactorTime}, for the times shown.
    """

    def __init__(self, clock: Any, *, max_domains: int = MAX_DOMAINS) -> None:
        self._clock = clock
        self.max_domains = max_domains
        self._domains: OrderedDict[str, Dict[str, DirectionStatus]] = OrderedDict()

    def observe(self, outcome: CallOutcome) -> None:
        """Record one finished call (a L{fedserver.pipeline.Pipeline} observer)."""
        if outcome.domain is None:
            return
        now = self._clock.seconds()
        directions = self._domains.get(outcome.domain)
        if directions is None:
            directions = self._domains[outcome.domain] = {}
            while len(self._domains) > self.max_domains:
                self._domains.popitem(last=False)
        self._domains.move_to_end(outcome.domain)
        status = directions.setdefault(outcome.direction, DirectionStatus())
        status.requests += 1
        if outcome.label is None:
            status.last_success = now
            status.consecutive_failures = 0
            return
        status.failures += 1
        status.consecutive_failures += 1
        status.last_error = {
            "label": outcome.label,
            "message": outcome.message,
            "code": outcome.code,
            "component": outcome.component,
            "rpc": outcome.rpc,
            "request_id": outcome.request_id,
            "at": now,
        }

    def domains(self) -> List[str]:
        """The domains seen, in the order they were last seen (oldest first)."""
        return list(self._domains)

    def get(self, domain: str, direction: str) -> Optional[DirectionStatus]:
        """What is known of calls C{direction} (C{inbound}, C{outbound}) for C{domain}."""
        return self._domains.get(domain, {}).get(direction)


#: the outbound queue as the status route sees it: the destinations it holds,
#: and what it says about one (depth, oldest age, backoff), or C{None}
QueueView = Tuple[Callable[[], Iterable[str]], Callable[[str], Deferred[Optional[Dict[str, Any]]]]]


class StatusAPI:
    """
    The C{/status/} routes.

    @param caches: the discovery caches, named (see
        L{fedserver.metrics.discovery_caches}).
    @param queue: reads the outbound queue, when there is one.
    """

    def __init__(self, status: DomainStatus, *, caches: Iterable[Tuple[str, DiscoveryCache[Any]]] = (),
                 queue: Optional[Callable[[], Optional[QueueView]]] = None) -> None:
        self.status = status
        self.caches = list(caches)
        self.queue = queue
        self.router = Router("status", "the status API")
        self.router.add("GET", ("domains",), self.all_domains)
        self.router.add("GET", ("domains", "{}"), self.one_domain)

    @deferred
    async def handle(self, request: server.Request, body: bytes, request_id: str) -> Response:
        handler, params, _ = self.router.route(request.method.decode("latin-1"), request.path.decode("latin-1"))
        if request.args:
            raise APIError(400, "bad-request", "the status routes take no query parameters")
        return await handler(*params)

    def _queue(self) -> Optional[QueueView]:
        return self.queue() if self.queue is not None else None

    async def all_domains(self) -> Response:
        queue = self._queue()
        names = set(self.status.domains())
        if queue is not None:
            names.update(queue[0]())
        return json_response({"domains": [await self._report(name, queue) for name in sorted(names)]})

    async def one_domain(self, domain: str) -> Response:
        queue = self._queue()
        report = await self._report(domain, queue)
        if all(report[part] is None for part in ("outbound", "inbound", "queue")):
            raise APIError(404, "not-found", f"no call to or from {domain[:255]!r} is known here")
        return json_response(report)

    async def _report(self, domain: str, queue: Optional[QueueView]) -> Dict[str, Any]:
        report: Dict[str, Any] = {"domain": domain}
        for direction in ("outbound", "inbound"):
            status = self.status.get(domain, direction)
            report[direction] = status.to_json() if status is not None else None
        discovery = {name: state for name, cache in self.caches if (state := cache.describe(domain)) is not None}
        report["discovery"] = discovery or None
        report["queue"] = await queue[1](domain) if queue is not None else None
        return report


def status_resource(api: StatusAPI, *, max_body_bytes: int) -> resource.IResource:
    """C{/status/} as a resource for the outward listener."""
    return JSONAPIResource("status", api.handle, max_body_bytes=max_body_bytes)


__all__ = ["DirectionStatus", "DomainStatus", "StatusAPI", "status_resource"]
