"""
Helpers for the tests of the Wire reference components: backends whose
components are built by the plugin's factories on a real L{Store} (a SQLite
file under C{tmp_path}; its adbapi threads need the real reactor, so the
tests that touch it run under pytest-twisted, each step bounded), a fake
pipeline that records outbound calls and answers them from a table, and an
in-memory network that joins several backends through real L{Pipeline}s.

L{federate}, L{bounded}, L{context_for} and L{backend_factory} serve any
plugin's backends (the MIMI gateway's tests use them too): a backend is
anything with a C{domain}, a C{context} and its C{components}
(L{Federable}).
"""

from __future__ import annotations

import json
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Protocol, Sequence, Tuple

import attrs
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from zope.interface import implementer

from fedserver.config import Options, QueueSettings, parse_config
from fedserver.context import Context
from fedserver.errors import AuthenticationFailure, DiscoveryFailure, FederationError
from fedserver.idempotency import Deduplicator
from fedserver.interfaces import IAuthenticator
from fedserver.outbound_queue import OutboundQueue
from fedserver.pipeline import Pipeline
from fedserver.storage import Store
from fedserver.values import FederatedCall, InboundRequest, OutboundRequest, Peer, Response, Target
from fedserver_wire import reference
from fedserver_wire.api import WireAPI
from fedserver_wire.brig import WireBrig
from fedserver_wire.galley import WireGalley
from tests.unit.helpers import FakeAuthorizer, FakeDiscovery, build_plugin, json_response, outcome

#: seconds any one database or federation step may take in these tests
BOUND = 10


def bounded(d: Deferred) -> Deferred:
    """C{d}, failing with a timeout after L{BOUND} seconds of the real reactor."""
    from twisted.internet import reactor

    return d.addTimeout(BOUND, reactor)


async def eventually(check: Callable[[], Any], *, clock: Optional[Clock] = None, step: float = 1.0,
                     what: str = "the condition") -> None:
    """
    Wait, for at most L{BOUND} seconds of the real reactor (whose threads
    run the store), until C{check()} (or the coroutine it returns) is true;
    with C{clock}, advance it by C{step} seconds each round (backoffs and
    polls of an outbound queue on that clock run).
    """
    from twisted.internet import reactor, task

    deadline = reactor.seconds() + BOUND
    while True:
        value = check()
        if hasattr(value, "__await__"):
            value = await value
        if value:
            return
        if reactor.seconds() > deadline:
            raise AssertionError(f"{what} did not come true within {BOUND} s")
        if clock is not None:
            clock.advance(step)
        await task.deferLater(reactor, 0.01, lambda: None)


def answer_json(response: Response) -> Any:
    """The decoded JSON body of C{response}."""
    assert response.header("Content-Type") == "application/json", response
    return json.loads(response.body)


def refusal(response: Response, code: int, label: str) -> Dict[str, Any]:
    """The labelled JSON refusal C{response} must be; returns it."""
    body = answer_json(response)
    assert (response.code, body.get("code"), body.get("label")) == (code, code, label), (response.code, body)
    assert isinstance(body["message"], str) and body["message"]
    assert "Traceback" not in body["message"]
    return body


def wire_options(name: str, **values: Any) -> Options:
    """The table C{[components.NAME]} with C{values}."""
    return Options(values, file="/etc/fedserver.toml", path=f"components.{name}", base_dir="/etc", name=name)


def with_queue(context: Context) -> Context:
    """
    Give C{context} fedserver's durable outbound queue (C{context.queue})
    and the deduplicator of keyed inbound calls (C{plugin_state
    ["deduplicator"]}, which L{federate} puts in the pipeline), on its store
    and clock, as C{build_service} does; before the store is migrated.
    L{start_queue} starts both once the store runs.
    """
    context.queue = OutboundQueue(
        context.storage, lambda: context.pipeline, backend_domain=context.backend_domain, settings=QueueSettings(),
        clock=context.reactor, worker_id=f"test/{context.backend_domain}", delivery_timeout=BOUND,
        rand=lambda: 0.5,
    )
    context.plugin_state["deduplicator"] = Deduplicator(context.storage, clock=context.reactor,
                                                        ttl=QueueSettings().dedup_ttl, pending_timeout=BOUND)
    return context


def start_queue(context: Context) -> None:
    """Start what L{with_queue} gave C{context} (its store runs)."""
    context.queue.startService()
    context.plugin_state["deduplicator"].startService()


def stop_queue(context: Context) -> None:
    """Stop what L{with_queue} gave C{context}, before its store."""
    if context.queue is not None and context.queue.running:
        context.queue.stopService()
        context.plugin_state["deduplicator"].stopService()


def context_for(domain: str, store: Any, clock: Any = None) -> Context:
    """A L{Context} for backend C{domain} with C{store}, on C{clock} (a fresh L{Clock})."""
    raw = {
        "server": {"backend_domain": domain, "infra_domain": f"fed.{domain}"},
        "inward": {"listen": "tcp:8443"},
        "discovery": {"plugin": "static"},
        "authenticator": {"plugin": "mtls"},
    }
    config = parse_config(raw, file="/etc/fedserver.toml", base_dir="/etc")
    return Context(reactor=clock if clock is not None else Clock(), config=config, storage=store, http=None)


class Federable(Protocol):
    """What L{federate} needs of a backend: its domain, its context and its components by name."""

    @property
    def domain(self) -> str: ...

    @property
    def context(self) -> Context: ...

    @property
    def components(self) -> Dict[str, Any]: ...


@attrs.define
class Backend:
    """One backend's reference components over a running store."""

    domain: str
    store: Store
    context: Context
    brig: WireBrig
    galley: WireGalley
    api: WireAPI

    @property
    def clock(self) -> Clock:
        return self.context.reactor

    @property
    def components(self) -> Dict[str, Any]:
        return {"brig": self.brig, "galley": self.galley}

    def call(self, component: str, rpc: str, body: Any, *, origin: str, raw: Optional[bytes] = None) -> Deferred:
        """An inbound call from C{origin} straight to C{component}, bounded."""
        call = FederatedCall(
            origin_domain=origin,
            target_domain=self.domain,
            component=component,
            rpc=rpc,
            method="POST",
            headers=(("Content-Type", "application/json"),),
            body=raw if raw is not None else json.dumps(body).encode(),
            request_id="req-test",
            peer=Peer(identities={f"fed.{origin}"}, claimed_domain=origin),
        )
        return bounded(self.components[component].handle(call))

    def request(
        self, method: str, path: str, body: Any = None, *, query: Optional[Mapping[str, Any]] = None,
        raw: Optional[bytes] = None,
    ) -> Deferred:
        """A client API request, bounded; fires with the L{Response}."""
        data = raw if raw is not None else (b"" if body is None else json.dumps(body).encode())
        args = {k.encode(): (v if isinstance(v, list) else [v]) for k, v in (query or {}).items()}
        args = {k: [x.encode() for x in v] for k, v in args.items()}
        return bounded(self.api.handle(method, path, args, data, "req-api"))

    async def user(self, user_handle: str, name: Optional[str] = None) -> Dict[str, Any]:
        """Create a local user through the API; its profile and client."""
        body = {"handle": user_handle, "name": name or user_handle.title()}
        response = await self.request("POST", "/wire/users", body)
        assert response.code == 201, response
        return answer_json(response)

    def stop(self) -> None:
        stop_queue(self.context)
        self.store.stopService()


def make_backend(tmp_path: Any, domain: str, pipeline: Any = None, *, clock: Any = None, **brig: Any) -> Backend:
    """
    C{domain}'s reference brig and galley, built by the plugin's factories
    through a registry (with C{verifyObject}), on a migrated, running store
    in C{tmp_path}; outbound calls go to C{pipeline}.
    """
    from twisted.internet import reactor

    store = Store(f"sqlite:{tmp_path / (domain + '.sqlite')}", reactor=reactor)
    context = with_queue(context_for(domain, store, clock))
    brig_component = build_plugin(reference, "component", wire_options("brig", plugin="wire-brig", **brig), context)
    galley_component = build_plugin(reference, "component", wire_options("galley", plugin="wire-galley"), context)
    context.components = {"brig": brig_component, "galley": galley_component}
    context.pipeline = pipeline
    store.migrate()
    store.startService()
    start_queue(context)
    return Backend(domain, store, context, brig_component, galley_component, WireAPI(brig_component, galley_component))


# a fake pipeline


Answer = Any  # a Response, an exception, or a callable(call) -> either


@attrs.define
class RecordingPipeline:
    """
    Stands in for L{Pipeline} on the outbound side: records every call and
    answers it from C{answers}, keyed by C{(domain, component, rpc)}; a call
    nobody expected fails with C{invalid-domain}, as discovery would.
    """

    answers: Dict[Tuple[str, str, str], Answer] = attrs.Factory(dict)
    calls: List[FederatedCall] = attrs.Factory(list)

    def answer(self, domain: str, component: str, rpc: str, value: Answer) -> None:
        self.answers[(domain, component, rpc)] = value

    def call_remote(self, call: FederatedCall) -> Deferred:
        self.calls.append(call)
        value = self.answers.get((call.target_domain, call.component, call.rpc))
        if value is None:
            return defer.fail(DiscoveryFailure(f"{call.target_domain} is not known here", "invalid-domain"))
        if callable(value) and not isinstance(value, Response):
            value = value(call)
        return outcome(value)

    def bodies(self, rpc: str) -> List[Tuple[str, Any]]:
        """C{(domain, decoded body)} of every call of C{rpc}."""
        return [(c.target_domain, json.loads(c.body)) for c in self.calls if c.rpc == rpc]


def ok(value: Any = None) -> Response:
    """A 200 JSON answer."""
    return json_response(200, {} if value is None else value)


# several backends joined by real pipelines, in memory


@implementer(IAuthenticator)
@attrs.define
class OriginHeaderAuthenticator:
    """
    For the memory network: a peer "proves" the infrastructure domain
    C{fed.<claimed domain>} and claims what its C{Wire-Origin-Domain} says;
    the pipeline then validates the claim through discovery as with mTLS.
    """

    backend_domain: str

    def server_tls_options(self) -> None:
        return None

    def client_tls_options(self, target: Target) -> None:
        return None

    def authenticate(self, request: InboundRequest) -> Deferred:
        origin = request.header("Wire-Origin-Domain")
        if not origin:
            return defer.fail(AuthenticationFailure("no Wire-Origin-Domain", "no-origin-domain"))
        proven = request.header("X-Test-Proven-As") or f"fed.{origin}"
        return defer.succeed(Peer(identities={proven}, claimed_domain=origin))

    def prepare_outbound(self, request: OutboundRequest, target: Target) -> Deferred:
        return defer.succeed(request.with_header("Wire-Origin-Domain", self.backend_domain))


@attrs.define
class MemoryNetwork:
    """
    Delivers outbound requests to the inward side of the backend whose
    infrastructure domain is the target's, as the inward listener would:
    labelled errors become JSON answers.
    """

    pipelines: Dict[str, Pipeline] = attrs.Factory(dict)
    sent: List[Tuple[str, OutboundRequest]] = attrs.Factory(list)
    down: set = attrs.Factory(set)

    def send(self, target: Target, request: OutboundRequest) -> Deferred:
        self.sent.append((target.infra_domain, request))
        if target.infra_domain in self.down:
            from fedserver.client import NotDelivered

            return defer.fail(NotDelivered(f"{target.host} refused the connection", "federation-connection-refused"))
        pipeline = self.pipelines[target.infra_domain]
        _, _, component, rpc = request.path.split("/")
        inbound = InboundRequest(
            method=request.method, path=request.path, query="", headers=request.headers, body=request.body
        )
        d = pipeline.handle_inbound(inbound, component, rpc, request.header("Request-Id") or "?")

        def labelled(failure: Any) -> Response:
            failure.trap(FederationError)
            error = failure.value
            return Response(error.code, [("Content-Type", "application/json")], error.to_bytes())

        return d.addErrback(labelled)

    def close(self) -> Deferred:
        return defer.succeed(None)


def federate(backends: Sequence[Federable], *, denied: Optional[Mapping[str, bool]] = None) -> MemoryNetwork:
    """
    Join C{backends}: each gets a real L{Pipeline} with discovery of every
    backend (C{fed.<domain>}), the header authenticator, one authorizer (that
    refuses everything when C{denied[domain]}) and the shared network.
    """
    network = MemoryNetwork()
    table = {b.domain: [Target(f"fed.{b.domain}", f"fed.{b.domain}", 443)] for b in backends}
    for backend in backends:
        pipeline = Pipeline(
            backend_domain=backend.domain,
            discovery=FakeDiscovery(table),
            authenticator=OriginHeaderAuthenticator(backend.domain),
            authorizers=[FakeAuthorizer(deny=bool((denied or {}).get(backend.domain)))],
            components=backend.components,
            client=network,  # type: ignore[arg-type]
        )
        backend.context.pipeline = pipeline
        # as build_service: keyed calls run once, and a backend heard from again gets its queue retried
        pipeline.deduplicator = backend.context.plugin_state.get("deduplicator")
        if backend.context.queue is not None:
            pipeline.observers.append(backend.context.queue.observe)
        network.pipelines[f"fed.{backend.domain}"] = pipeline
    return network


def qid(user: Mapping[str, Any]) -> Dict[str, str]:
    """The qualified id of a profile."""
    return dict(user["qualified_id"])


def uid(user: Mapping[str, Any]) -> str:
    """The id of a profile."""
    return str(user["qualified_id"]["id"])


Factory = Callable[..., Backend]


def backend_factory(tmp_path: Any, build: Callable[..., Any] = make_backend) -> Iterator[Callable[..., Any]]:
    """
    For a fixture: yields C{make(domain="a.example", *args, **kwargs)}, which
    calls C{build(tmp_path, domain, *args, **kwargs)} (by default
    L{make_backend}: C{pipeline} and brig's options), and stops every
    backend it made afterwards.
    """
    made: List[Any] = []

    def make(domain: str = "a.example", *args: Any, **kwargs: Any) -> Any:
        backend = build(tmp_path, domain, *args, **kwargs)
        made.append(backend)
        return backend

    yield make
    for backend in made:
        backend.stop()
