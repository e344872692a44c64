"""
The federation pipeline: the protocol-independent steps between a listener
and a component (see docs/architecture.md, "The request pipeline").

Outbound: authorize (every authorizer) -> discover -> prepare (authenticator)
-> send to the first reachable target.  Inbound: authenticate -> validate the
claimed origin through discovery unless the authenticator proved it ->
authorize (every authorizer) -> the component.
"""

from __future__ import annotations

import json
import math
import time
from collections import deque
from typing import Any, Awaitable, Callable, Deque, Dict, List, Mapping, Optional, Sequence, Tuple

import attrs
from twisted.internet.defer import CancelledError, Deferred
from twisted.logger import Logger

from fedserver.client import FederationClient, NotDelivered
from fedserver.errors import DiscoveryFailure, FederationError, ValidationError
from fedserver.interfaces import IAuthenticator, IAuthorizer, IComponentHandler, IDiscovery
from fedserver.values import FederatedCall, InboundRequest, OutboundRequest, Peer, Response

#: the headers of a call relayed through a hub (fedserver_relay.delegation):
#: the origin's certificate fingerprint and domain, the hubs crossed, and
#: where the hub is asked to send it
RELAY_ORIGIN = "Fedserver-Relay-Origin"
RELAY_ORIGIN_DOMAIN = "Fedserver-Relay-Origin-Domain"
RELAY_HOPS = "Fedserver-Relay-Hops"
RELAY_TO = "Fedserver-Relay-To"
RELAY_COMPONENT = "Fedserver-Relay-Component"
#: the headers that mark a call as relayed
RELAYED_MARKERS = (RELAY_ORIGIN, RELAY_ORIGIN_DOMAIN, RELAY_HOPS)
RELAY_HEADERS = (*RELAYED_MARKERS, RELAY_TO, RELAY_COMPONENT)

#: headers a component's outbound call may carry through to the remote
#: component (besides the ones the pipeline sets itself): Wire's API version,
#: the relay headers, and the idempotency key
PASSED_THROUGH = (
    "X-Wire-API-Version",
    *RELAY_HEADERS,
    # names a call for deduplication at the receiver (fedserver.idempotency)
    "Fedserver-Idempotency-Key",
)

log = Logger(namespace="fedserver.pipeline")


@attrs.frozen
class CallOutcome:
    """
    What the pipeline tells its observers about one finished call.

    @ivar direction: C{"outbound"} (L{Pipeline.send}: every call to a remote
        backend) or C{"inbound"} (L{Pipeline.handle_inbound}).
    @ivar domain: the destination, or the authenticated peer's backend
        domain; C{None} for an inbound call refused before its peer was
        established.
    @ivar component: the component (outbound: from the path, see
        L{route_names}).
    @ivar rpc: the RPC (likewise).
    @ivar label: C{None} for a 2xx answer; C{federation-remote-error}
        (outbound) or C{component-error} (inbound) for another answer;
        otherwise the failure's label (C{internal-error} for an unlabelled
        exception, C{cancelled} when the caller gave up).
    @ivar code: the HTTP status of the answer or error, if any.
    @ivar message: the error message (empty on success).
    @ivar seconds: how long the call took.
    @ivar request_id: the request id, if known.
    """

    direction: str
    domain: Optional[str]
    component: str
    rpc: str
    label: Optional[str]
    code: Optional[int]
    message: str
    seconds: float
    request_id: Optional[str]


#: called with each L{CallOutcome}; must not raise (what it raises is logged)
Observer = Callable[[CallOutcome], None]


def route_names(path: str) -> Tuple[str, str]:
    """
    The component and RPC an outbound path is for: C{/federation/{c}/{r}}
    gives C{(c, r)}, C{/_matrix/{api}/{version}/{name}/...} gives
    C{("matrix", name)}, anything else C{("other", "other")}.
    """
    parts = path.split("?", 1)[0].split("/")
    if len(parts) == 4 and parts[1] == "federation":
        return parts[2], parts[3]
    if len(parts) >= 5 and parts[1] == "_matrix":
        return "matrix", parts[4]
    return "other", "other"


def _failure_outcome(error: BaseException) -> Tuple[str, Optional[int], str]:
    if isinstance(error, FederationError):
        return error.label, error.code, error.message
    if isinstance(error, CancelledError):
        return "cancelled", None, "the caller gave up (a deadline, or the client went away)"
    return "internal-error", 500, f"{type(error).__name__}: {error}"[:500]


def check_json(body: bytes, what: str) -> None:
    """Raise C{invalid-json} unless C{body} is empty or a JSON document."""
    if not body:
        return
    try:
        json.loads(body)
    except ValueError as e:
        raise FederationError(f"{what} is not valid JSON: {e}", "invalid-json") from None
    except RecursionError:
        raise FederationError(f"{what} is JSON nested too deeply", "invalid-json") from None


@attrs.define
class _Slots:
    """Outbound calls to one destination: how many are in flight, who waits."""

    active: int = 0
    waiting: Deque[Deferred[None]] = attrs.Factory(deque)


@attrs.define
class _PeerLoad:
    """One peer's inbound calls in progress and its token bucket."""

    active: int
    tokens: float
    updated: float


#: peers remembered before idle ones (none in progress, bucket full) are dropped
_PEERS_KEPT = 4096


class Pipeline:
    """
    The configured providers, wired in the order the design gives.

    @ivar backend_domain: our backend domain (the origin of outbound calls).
    @ivar max_outbound_per_destination: outbound calls in flight at once to
        one destination; more wait, first come first served.
    @ivar max_outbound_queue_per_destination: calls that may wait for one
        destination; more fail at once with C{federation-overloaded}.
    @ivar max_inbound_per_peer: inbound calls one authenticated peer domain
        may have in progress; more are refused with C{too-many-requests}.
    @ivar inbound_rate_per_peer: inbound calls per second one peer domain may
        make (token bucket, burst of the same size); more are refused with
        C{too-many-requests}.
    """

    def __init__(
        self,
        *,
        backend_domain: str,
        discovery: IDiscovery,
        authenticator: IAuthenticator,
        authorizers: Sequence[IAuthorizer],
        components: Mapping[str, IComponentHandler],
        client: FederationClient,
        max_outbound_per_destination: int = 32,
        max_outbound_queue_per_destination: int = 1000,
        max_inbound_per_peer: int = 64,
        inbound_rate_per_peer: float = 200.0,
    ) -> None:
        self.backend_domain = backend_domain
        self.discovery = discovery
        self.authenticator = authenticator
        self.authorizers = list(authorizers)
        self.components = dict(components)
        self.client = client
        #: told about every finished call (metrics, the per-domain status);
        #: see L{CallOutcome}
        self.observers: List[Observer] = []
        #: the clock for the seconds a call took
        self.timer: Callable[[], float] = time.monotonic
        #: runs inbound calls that carry an idempotency key once
        #: (L{fedserver.idempotency.Deduplicator}); without it the key is
        #: not looked at
        self.deduplicator: Any = None
        self.max_outbound_per_destination = max_outbound_per_destination
        self.max_outbound_queue_per_destination = max_outbound_queue_per_destination
        self.max_inbound_per_peer = max_inbound_per_peer
        self.inbound_rate_per_peer = inbound_rate_per_peer
        self._outbound: Dict[str, _Slots] = {}
        self._inbound: Dict[str, _PeerLoad] = {}

    def _notify(self, outcome: CallOutcome) -> None:
        for observer in self.observers:
            try:
                observer(outcome)
            except Exception:
                log.failure("a pipeline observer failed on {outcome!r}", outcome=outcome)

    # outbound

    def call_remote(self, call: FederatedCall) -> Deferred[Response]:
        """
        Send C{call} (from a local component) to C{call.target_domain}'s
        component C{call.component}; fire with the remote's L{Response}
        whatever its status, or fail with a labelled L{FederationError}.
        """
        return Deferred.fromCoroutine(self._call_remote(call))

    async def _call_remote(self, call: FederatedCall) -> Response:
        check_json(call.body, "the request body")
        domain = call.target_domain
        await self.authorize_outbound(domain, call)
        headers = [("Content-Type", "application/json"), ("Request-Id", call.request_id)]
        headers += [(n, v) for n in PASSED_THROUGH if (v := call.header(n)) is not None]
        request = OutboundRequest(
            destination=domain,
            method="POST",
            path=f"/federation/{call.component}/{call.rpc}",
            headers=headers,
            body=call.body,
        )
        return await self.send(request)

    def send(self, request: OutboundRequest) -> Deferred[Response]:
        """
        Discover C{request.destination} and send C{request} to the first
        target that takes it, prepared by the authenticator for each.  Only
        failures that prove the request was not delivered move on to the next
        target.  No authorization here: callers authorize first.
        """
        return Deferred.fromCoroutine(self._send(request))

    async def _send(self, request: OutboundRequest) -> Response:
        if not self.observers:
            return await self._limited_deliver(request)
        component, rpc = route_names(request.path)
        return await self._observed(
            "outbound", component, rpc, request.header("Request-Id"), lambda: request.destination,
            self._limited_deliver(request),
            lambda code: ("federation-remote-error", f"{request.destination} answered {code}"),
        )

    async def _observed(
        self, direction: str, component: str, rpc: str, request_id: Optional[str],
        domain: Callable[[], Optional[str]], call: Awaitable[Response],
        refused: Callable[[int], Tuple[str, str]],
    ) -> Response:
        """
        Await C{call} and tell the observers how it went (L{CallOutcome});
        C{domain()} is the call's domain once known, C{refused(code)} the
        label and message of an answer that is not 2xx.
        """
        started = self.timer()

        def notify(label: Optional[str], code: Optional[int], message: str) -> None:
            self._notify(CallOutcome(direction, domain(), component, rpc, label, code, message,
                                     self.timer() - started, request_id))

        try:
            response = await call
        except Exception as e:
            notify(*_failure_outcome(e))
            raise
        if 200 <= response.code < 300:
            notify(None, response.code, "")
        else:
            label, message = refused(response.code)
            notify(label, response.code, message)
        return response

    def outbound_load(self, destination: str) -> Tuple[int, int]:
        """The calls to C{destination} in flight and waiting."""
        slots = self._outbound.get(destination.lower())
        return (slots.active, len(slots.waiting)) if slots is not None else (0, 0)

    async def _limited_deliver(self, request: OutboundRequest) -> Response:
        destination = request.destination.lower()
        await self._acquire_outbound(destination, request)
        try:
            return await self._deliver(request)
        finally:
            self._release_outbound(destination)

    async def _acquire_outbound(self, destination: str, request: OutboundRequest) -> None:
        slots = self._outbound.get(destination)
        if slots is None:
            slots = self._outbound[destination] = _Slots()
        if slots.active < self.max_outbound_per_destination and not slots.waiting:
            slots.active += 1
            return
        if len(slots.waiting) >= self.max_outbound_queue_per_destination:
            raise FederationError(
                f"{slots.active} calls to {request.destination} are in flight and {len(slots.waiting)} "
                "more wait ([limits] max_outbound_per_destination, max_outbound_queue_per_destination); "
                "try again later",
                "federation-overloaded",
                data={"type": "federation", "domain": request.destination, "path": request.path},
            )
        turn: Deferred[None] = Deferred()
        slots.waiting.append(turn)
        try:
            # a released slot is handed over with the callback (active stays)
            await turn
        except BaseException:
            if turn in slots.waiting:  # cancelled while waiting: leave the queue
                slots.waiting.remove(turn)
            raise

    def _release_outbound(self, destination: str) -> None:
        slots = self._outbound[destination]
        if slots.waiting:
            slots.waiting.popleft().callback(None)
            return
        slots.active -= 1
        if slots.active == 0:
            del self._outbound[destination]

    async def _deliver(self, request: OutboundRequest) -> Response:
        targets = await self.discovery.discover(request.destination)
        if not targets:
            raise DiscoveryFailure(f"discovery found no target for {request.destination}")
        last: Optional[FederationError] = None
        for target in targets:
            prepared = await self.authenticator.prepare_outbound(request, target)
            try:
                return await self.client.send(target, prepared)
            except NotDelivered as e:
                log.info(
                    "{destination}: target {host}:{port} failed ({label}); "
                    "{remaining} more to try [request {request_id}]",
                    destination=request.destination,
                    request_id=request.header("Request-Id"),
                    host=target.host,
                    port=target.port,
                    label=e.label,
                    remaining=len(targets) - targets.index(target) - 1,
                )
                last = e
        assert last is not None  # targets is not empty
        raise last

    # inbound

    def handle_inbound(
        self, request: InboundRequest, component: str, rpc: str, request_id: str, *,
        serve: Optional[Callable[[Peer], Awaitable[Response]]] = None,
    ) -> Deferred[Response]:
        """
        Authenticate C{request}, validate and authorize its origin, and hand
        it to C{component}; fire with the component's L{Response}.

        A plugin route that answers in its own way (Matrix's transactions)
        passes C{serve}: it is called with the authenticated L{Peer} once
        the peer's limits admit the call, and does the authorization and
        the component call itself; the limits, the observers (metrics,
        per-domain status) and the accounting stay the pipeline's.
        """
        return Deferred.fromCoroutine(self._handle_inbound(request, component, rpc, request_id, serve))

    async def _handle_inbound(
        self, request: InboundRequest, component: str, rpc: str, request_id: str,
        serve: Optional[Callable[[Peer], Awaitable[Response]]],
    ) -> Response:
        established: List[Peer] = []
        dispatched = self._dispatch_inbound(request, component, rpc, request_id, established, serve)
        if not self.observers:
            return await dispatched
        return await self._observed(
            "inbound", component, rpc, request_id,
            lambda: established[0].claimed_domain if established else None, dispatched,
            lambda code: ("component-error", f"the component {component} answered {code}"),
        )

    async def _dispatch_inbound(
        self, request: InboundRequest, component: str, rpc: str, request_id: str, established: List[Peer],
        serve: Optional[Callable[[Peer], Awaitable[Response]]],
    ) -> Response:
        peer = await self.authenticate(request)
        established.append(peer)
        domain = peer.claimed_domain.lower()
        self._admit_inbound(domain)
        try:
            if serve is not None:
                return await serve(peer)
            return await self._dispatch_admitted(request, component, rpc, request_id, peer)
        finally:
            load = self._inbound[domain]
            load.active -= 1

    def _admit_inbound(self, domain: str) -> None:
        """Count a call from C{domain} in, or refuse it with C{too-many-requests}."""
        now = self.timer()
        rate = self.inbound_rate_per_peer
        load = self._inbound.get(domain)
        if load is None:
            if len(self._inbound) >= _PEERS_KEPT:
                self._forget_idle_peers(now)
            load = self._inbound[domain] = _PeerLoad(0, rate, now)
        else:
            load.tokens = min(rate, load.tokens + (now - load.updated) * rate)
            load.updated = now
        if load.active >= self.max_inbound_per_peer:
            raise FederationError(
                f"{domain} has {load.active} calls in progress here, the most allowed "
                "([limits] max_inbound_per_peer); try again later",
                "too-many-requests",
                data={"type": "federation", "domain": domain},
                headers=[("Retry-After", "1")],
            )
        if load.tokens < 1:
            wait = max(1, math.ceil((1 - load.tokens) / rate))
            raise FederationError(
                f"{domain} calls more often than {rate:g} times a second "
                f"([limits] inbound_rate_per_peer); try again in {wait} s",
                "too-many-requests",
                data={"type": "federation", "domain": domain},
                headers=[("Retry-After", str(wait))],
            )
        load.tokens -= 1
        load.active += 1

    def _forget_idle_peers(self, now: float) -> None:
        rate = self.inbound_rate_per_peer
        for domain, load in list(self._inbound.items()):
            if load.active == 0 and load.tokens + (now - load.updated) * rate >= rate:
                del self._inbound[domain]

    async def _dispatch_admitted(
        self, request: InboundRequest, component: str, rpc: str, request_id: str, peer: Peer
    ) -> Response:
        call = FederatedCall(
            origin_domain=peer.claimed_domain,
            target_domain=self.backend_domain,
            component=component,
            rpc=rpc,
            method=request.method,
            headers=request.headers,
            body=request.body,
            request_id=request_id,
            peer=peer,
        )
        await self.authorize_inbound(peer, call)
        handler = self.components.get(component)
        if handler is None:
            raise FederationError(
                f"this backend has no federated component {component!r}",
                "unknown-component",
            )
        check_json(request.body, "the request body")
        if self.deduplicator is not None:
            return await self.deduplicator.handle(call, handler)
        return await handler.handle(call)

    async def authenticate(self, request: InboundRequest) -> Peer:
        """The authenticated peer, its claimed domain validated."""
        peer = await self.authenticator.authenticate(request)
        if not peer.domain_proven:
            await self.validate_origin(peer)
        return peer

    async def authorize_outbound(self, domain: str, call: FederatedCall) -> None:
        """Every authorizer must allow sending C{call} to C{domain}."""
        for authorizer in self.authorizers:
            await authorizer.authorize_outbound(domain, call)

    async def authorize_inbound(self, peer: Peer, call: FederatedCall) -> None:
        """Every authorizer must allow C{call} from C{peer}."""
        for authorizer in self.authorizers:
            await authorizer.authorize_inbound(peer, call)

    async def validate_origin(self, peer: Peer) -> None:
        """
        Require that one infrastructure domain discovered for the peer's
        claimed backend domain is among the identities it proved.
        """
        claimed = peer.claimed_domain
        try:
            targets = await self.discovery.discover(claimed)
            if not targets:
                raise DiscoveryFailure(f"discovery found no target for {claimed}")
        except DiscoveryFailure as e:
            raise DiscoveryFailure(
                f"cannot validate the origin domain {claimed}: {e.message}", e.label
            ) from None
        served_by = {t.infra_domain.lower() for t in targets}
        if served_by & peer.identities:
            return
        raise ValidationError(
            f"the client certificate is for {', '.join(sorted(peer.identities)) or 'no name'}, "
            f"but discovery says {claimed} is served by {', '.join(sorted(served_by))}",
            data={"type": "federation", "domain": claimed},
        )


def remote_error(response: Response, domain: str, path: str) -> FederationError:
    """A non-2xx answer from a remote backend, as C{federation-remote-error}."""
    inner: Any
    try:
        inner = json.loads(response.body)
    except (ValueError, RecursionError):
        inner = {"code": response.code, "body": response.body[:1024].decode("utf-8", "replace")}
    return FederationError(
        f"{domain} answered {response.code}",
        "federation-remote-error",
        data={"type": "federation", "domain": domain, "path": path},
        inner=inner,
    )
