"""
Building a running fedserver: the one place where configuration, plugins,
listeners and storage are put together.

C{twistd fedserver}, C{fedserver check-config} and applications that embed
fedserver all call L{build_service}.  An embedding application may add the
returned L{FederationService} to its own application, or mount
C{inward_resource} / C{outward_resource} in a L{twisted.web.server.Site} of
its own (then the inward side needs a TLS listener whose server options come
from C{authenticator.server_tls_options()}).
"""

from __future__ import annotations

import itertools
from typing import Any, Iterable, List, Optional, Sequence, Union

from treq.client import HTTPClient
from twisted.application import strports
from twisted.application.service import IService, MultiService, Service
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator
from twisted.logger import Logger
from twisted.protocols import policies
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.web import client as web_client
from twisted.web import resource, server
from zope.interface import implementer

from fedserver.client import FederationClient
from fedserver.config import Config, load_config
from fedserver.context import Context
from fedserver.errors import ConfigError, FederationError
from fedserver.http11 import HTTP11Pool
from fedserver.idempotency import Deduplicator
from fedserver.interfaces import IConnectionGate
from fedserver.inward import InwardFederationResource
from fedserver.metrics import (
    Metrics,
    MetricsResource,
    connection_metrics,
    discovery_cache_metrics,
    discovery_caches,
)
from fedserver.outbound_queue import OutboundQueue, default_worker_id, queue_metrics
from fedserver.outward import OutwardRPCResource
from fedserver.pipeline import Pipeline
from fedserver.registry import PluginRegistry, check_provides, make_plugin_manager
from fedserver.status import DomainStatus, StatusAPI, status_resource
from fedserver.storage import Store
from fedserver.tls import peer_certificate
from fedserver.web import FederationSite, ListenerRoot

log = Logger(namespace="fedserver.service")

#: seconds that stopping waits for requests in flight
DRAIN_TIMEOUT = 10.0
#: seconds that stopping then waits for connections to deliver what they hold
CLOSE_TIMEOUT = 5.0


@implementer(IOpenSSLServerConnectionCreator)
class _CurrentServerTLS:
    """Asks the authenticator for its server TLS settings on every connection."""

    def __init__(self, authenticator: Any) -> None:
        self._authenticator = authenticator

    def serverConnectionForTLS(self, tlsProtocol: Any) -> Any:
        return self._authenticator.server_tls_options().serverConnectionForTLS(tlsProtocol)


class _InFlight:
    """Counts requests being answered, so that stopping can wait for them."""

    def __init__(self) -> None:
        self.count = 0
        self._idle: List[Deferred] = []

    def track(self, request: server.Request) -> None:
        self.count += 1
        request.notifyFinish().addBoth(self._finished)

    def _finished(self, _: Any) -> None:
        self.count -= 1
        if self.count == 0:
            waiting, self._idle = self._idle, []
            for d in waiting:
                d.callback(None)

    def idle(self) -> Deferred[None]:
        if self.count == 0:
            return defer.succeed(None)
        d: Deferred = Deferred()
        self._idle.append(d)
        return d


class _TrackingSite(FederationSite):
    def __init__(self, root: Any, in_flight: _InFlight, **kwargs: Any) -> None:
        super().__init__(root, **kwargs)
        self._in_flight = in_flight

    def getResourceFor(self, request: server.Request) -> Any:
        self._in_flight.track(request)
        return super().getResourceFor(request)


class _Drain(Service):
    """
    Stopped right after the listeners: waits, bounded by L{DRAIN_TIMEOUT},
    for the requests in flight to be answered, then closes the listeners'
    connections once their answers are sent.
    """

    def __init__(self, reactor: Any, in_flight: _InFlight, connections: Sequence[ConnectionLimit] = ()) -> None:
        self._reactor = reactor
        self._in_flight = in_flight
        self._connections = list(connections)

    def stopService(self) -> Deferred[None]:
        super().stopService()
        if self._in_flight.count:
            log.info("waiting up to {t} s for {n} requests in flight", t=DRAIN_TIMEOUT,
                     n=self._in_flight.count)
        d = self._in_flight.idle()
        d.addTimeout(DRAIN_TIMEOUT, self._reactor)
        d.addErrback(lambda f: log.warn("stopped with {n} requests still in flight",
                                        n=self._in_flight.count))

        def close_connections(_: Any) -> Deferred[Any]:
            return defer.gatherResults(
                [c.close_all(self._reactor, CLOSE_TIMEOUT) for c in self._connections], consumeErrors=True
            )

        return d.addCallback(close_connections)


class _ClosePools(Service):
    """Stopped last: closes the HTTP client pools."""

    def __init__(self, closers: List[Any]) -> None:
        self._closers = closers

    def stopService(self) -> Deferred[Any]:
        super().stopService()
        d = defer.gatherResults([defer.maybeDeferred(c) for c in self._closers], consumeErrors=True)
        d.addErrback(lambda f: log.failure("closing client pools failed", f))
        return d


class FederationService(MultiService):
    """
    A configured fedserver: storage, plugin services and both listeners.

    Children start in order and stop one after the other in reverse order:
    the listeners stop accepting, the requests in flight are answered (for
    at most L{DRAIN_TIMEOUT} seconds), then plugin services, the store and
    the client pools stop.

    @ivar context: the L{Context} every plugin was built with.
    @ivar pipeline: the L{Pipeline}.
    @ivar inward_resource: the inward listener's root resource.
    @ivar outward_resource: the outward listener's root resource.
    @ivar inward_factory: the inward protocol factory (TLS-wrapped when the
        authenticator terminates TLS).
    @ivar outward_site: the outward L{FederationSite}.
    @ivar domain_status: the L{DomainStatus} behind C{/status/domains}.
    """

    context: Context
    pipeline: Pipeline
    inward_resource: ListenerRoot
    outward_resource: ListenerRoot
    inward_factory: Any
    outward_site: Any
    domain_status: DomainStatus

    def stopService(self) -> Deferred[None]:
        Service.stopService(self)
        return Deferred.fromCoroutine(self._stop_in_order())

    async def _stop_in_order(self) -> None:
        for child in reversed(list(self)):
            try:
                await defer.maybeDeferred(child.stopService)
            except Exception:
                log.failure("stopping {child} failed", child=child)


def build_service(
    config: Union[Config, str],
    *,
    reactor: Any = None,
    plugin_manager: Any = None,
    migrate: bool = True,
    listen: bool = True,
) -> FederationService:
    """
    Build fedserver from C{config} (a L{Config} or a file path): every
    plugin, the pipeline, both resources and, with C{listen}, the listener
    services.  Nothing listens until the service starts.

    @param plugin_manager: a pluggy manager (L{make_plugin_manager}); by
        default, one with every installed plugin.
    @param migrate: bring the database schema up to date now (blocking).
    @raise ConfigError: anything in the configuration is wrong; the message
        names the file, the table and the key.
    """
    if isinstance(config, str):
        config = load_config(config)
    if reactor is None:
        from twisted.internet import reactor as default_reactor

        reactor = default_reactor
    try:
        return _build(config, reactor, plugin_manager, migrate, listen)
    except ConfigError as e:
        if e.file is None:
            raise ConfigError(e.reason, file=config.file, path=e.path) from None
        raise


def _build(config: Config, reactor: Any, plugin_manager: Any, migrate: bool, listen: bool) -> FederationService:
    registry = PluginRegistry(plugin_manager or make_plugin_manager())
    limits = config.limits
    store = Store(config.storage_database, reactor=reactor)
    local_pool = web_client.HTTPConnectionPool(reactor, persistent=True)
    local_pool.maxPersistentPerHost = 32
    http = HTTPClient(
        web_client.Agent(reactor, pool=local_pool, connectTimeout=limits.connect_timeout)
    )
    component_pool = HTTP11Pool(reactor, max_body=limits.max_body_bytes, max_per_key=128,
                                idle_timeout=min(50.0, limits.idle_timeout))
    context = Context(reactor=reactor, config=config, storage=store, http=http, component_pool=component_pool,
                      metrics=Metrics(backend_domain=config.server.backend_domain))
    context.address_policy  # noqa: B018 - a bad [outward] allow_ip_ranges is reported now
    # the durable outbound queue and the deduplication of keyed inbound calls (docs/queue.md); built before
    # the plugins, whose factories may keep context.queue
    deadline = limits.request_timeout + limits.component_timeout
    context.queue = OutboundQueue(
        store, lambda: context.pipeline, backend_domain=config.server.backend_domain, settings=config.queue,
        clock=reactor, worker_id=config.queue.worker_id or default_worker_id(config.inward_listen),
        delivery_timeout=deadline,
    )
    deduplicator = Deduplicator(store, clock=reactor, ttl=config.queue.dedup_ttl, pending_timeout=deadline)

    context.discovery = registry.build("discovery", config.discovery, context)
    context.authenticator = registry.build("authenticator", config.authenticator, context)
    context.client = FederationClient(
        reactor,
        context.authenticator.client_tls_options,
        request_timeout=limits.request_timeout,
        connect_timeout=limits.connect_timeout,
        max_body_bytes=limits.max_body_bytes,
    )
    if not config.authorizers:
        raise ConfigError(
            "no [[authorizers]] table: name whom this backend federates with, for example "
            '[[authorizers]] plugin = "allow-list" with domains = [...] (or allow_all = true)'
        )
    context.authorizers = [registry.build("authorizer", o, context) for o in config.authorizers]
    context.identity_providers = {
        name: registry.build("identity_provider", o, context)
        for name, o in config.identity_providers.items()
    }
    context.components = {
        name: registry.build("component", o, context) for name, o in config.components.items()
    }
    pipeline = Pipeline(
        backend_domain=config.server.backend_domain,
        discovery=context.discovery,
        authenticator=context.authenticator,
        authorizers=context.authorizers,
        components=context.components,
        client=context.client,
        max_outbound_per_destination=limits.max_outbound_per_destination,
        max_outbound_queue_per_destination=limits.max_outbound_queue_per_destination,
        max_inbound_per_peer=limits.max_inbound_per_peer,
        inbound_rate_per_peer=limits.inbound_rate_per_peer,
    )
    context.pipeline = pipeline
    pipeline.deduplicator = deduplicator
    domain_status = DomainStatus(reactor)
    pipeline.observers += [context.metrics.observe, domain_status.observe, context.queue.observe]
    context.metrics.register_collector(queue_metrics(context.queue))
    caches = discovery_caches(context.discovery)
    context.metrics.register_collector(discovery_cache_metrics(caches))

    inward = ListenerRoot("inward listener")
    # a bound on everything a request may wait for: discovery, the remote, the component
    route = {"max_body_bytes": limits.max_body_bytes, "clock": reactor,
             "deadline": limits.request_timeout + limits.component_timeout}
    inward.mount(b"federation", InwardFederationResource(pipeline, **route))
    outward = ListenerRoot("outward listener")
    outward.mount(b"rpc", OutwardRPCResource(pipeline, queue=context.queue, **route))
    outward.mount(b"metrics", MetricsResource(context.metrics))
    outward.mount(b"status", status_resource(StatusAPI(domain_status, caches=caches,
                                                       queue=lambda: (context.queue.destinations,
                                                                      context.queue.describe)),
                                             max_body_bytes=limits.max_body_bytes))
    roots = {"inward": inward, "outward": outward}
    for listener, segment, child in _flatten(registry.hook.fedserver_resources(context=context)):
        if listener not in roots:
            raise ConfigError(f"a plugin mounted /{segment!r} on unknown listener {listener!r}")
        check_provides(resource.IResource, child, f"the resource for /{segment.decode()}")
        try:
            roots[listener].mount(segment, child)
        except ValueError as e:
            raise ConfigError(str(e)) from None
    plugin_services = list(_flatten(registry.hook.fedserver_services(context=context)))
    for service in plugin_services:
        check_provides(IService, service, "a plugin service")

    for section in config.sections.values():
        if not section.was_read():
            raise section.error(None, "is not a table that fedserver or an installed plugin reads")
        section.check_all_used()

    if migrate:
        store.migrate()
    else:
        store.check()

    in_flight = _InFlight()

    def site(root: ListenerRoot, gate: Any = None) -> _TrackingSite:
        return _TrackingSite(root, in_flight, max_body_bytes=limits.max_body_bytes, gate=gate,
                             timeout=limits.idle_timeout, header_timeout=limits.header_timeout,
                             body_timeout=limits.body_timeout, reactor=reactor)

    inward_site = site(inward, _connection_gate(context.authenticator))
    inward_factory: Any = (
        TLSMemoryBIOFactory(_CurrentServerTLS(context.authenticator), False, inward_site, clock=reactor)
        if context.authenticator.server_tls_options() is not None
        else inward_site
    )
    top = FederationService()
    top.context = context
    top.pipeline = pipeline
    top.inward_resource = inward
    top.outward_resource = outward
    top.outward_site = site(outward)
    top.inward_factory = ConnectionLimit(inward_factory, limits.max_connections)
    outward_connections = ConnectionLimit(top.outward_site)
    top.domain_status = domain_status
    context.metrics.register_collector(connection_metrics([("inward", top.inward_factory),
                                                           ("outward", outward_connections)]))

    # started in this order, stopped one by one in the reverse order
    _ClosePools([context.client.close, local_pool.closeCachedConnections, component_pool.close]).setServiceParent(top)
    store.setServiceParent(top)
    context.queue.setServiceParent(top)
    deduplicator.setServiceParent(top)
    for service in plugin_services:
        service.setServiceParent(top)
    _Drain(reactor, in_flight, [top.inward_factory, outward_connections]).setServiceParent(top)
    if listen:
        _listener(config.inward_listen, "[inward] listen", top.inward_factory, reactor,
                  tls=inward_factory is not inward_site).setServiceParent(top)
        if config.outward_listen:
            _listener(config.outward_listen, "[outward] listen", outward_connections, reactor).setServiceParent(top)
    return top


class ConnectionLimit(policies.WrappingFactory):
    """
    A listener's connections: closes those that arrive while C{limit} are
    open, and closes them all in an orderly way when fedserver stops.
    """

    def __init__(self, wrapped: Any, limit: Optional[int] = None) -> None:
        super().__init__(wrapped)
        self.limit = limit
        self.refused = 0
        self._all_closed: List[Deferred[None]] = []

    def unregisterProtocol(self, p: Any) -> None:
        super().unregisterProtocol(p)
        if not self.protocols:
            waiting, self._all_closed = self._all_closed, []
            for d in waiting:
                d.callback(None)

    def close_all(self, clock: Any, timeout: float) -> Deferred[None]:
        """
        Close every connection after what was written to it is sent (so
        answers to requests that finished are delivered, and keep-alive
        connections bring no new requests); abort those still open after
        C{timeout} seconds.
        """
        if not self.protocols:
            return defer.succeed(None)
        for protocol in list(self.protocols):
            protocol.loseConnection()
        d: Deferred[None] = Deferred()
        self._all_closed.append(d)

        def abort(failure: Any) -> None:
            for protocol in list(self.protocols):
                protocol.transport.abortConnection()

        return d.addTimeout(timeout, clock).addErrback(abort)

    def buildProtocol(self, addr: Any) -> Any:
        if self.limit is not None and len(self.protocols) >= self.limit:
            self.refused += 1
            if self.refused == 1 or self.refused % 1000 == 0:
                log.warn("{limit} connections are open ([limits] max_connections): "
                         "refused {refused} so far, the latest from {peer}",
                         limit=self.limit, refused=self.refused, peer=addr)
            return None
        return super().buildProtocol(addr)


def _connection_gate(authenticator: Any) -> Any:
    """The inward site's gate, if the authenticator can judge connections."""
    if not IConnectionGate.providedBy(authenticator):
        return None

    def gate(request: server.Request) -> Optional[FederationError]:
        try:
            authenticator.check_connection(peer_certificate(request.transport))
        except FederationError as e:
            return e
        return None

    return gate


def _listener(description: str, key: str, factory: Any, reactor: Any, *, tls: bool = False) -> IService:
    if tls and description.startswith("ssl:"):
        raise ConfigError(
            f"{description!r} would wrap the inward listener in a second TLS layer: the authenticator "
            "already terminates TLS; use a tcp: endpoint",
            path=key,
        )
    try:
        return strports.service(description, factory, reactor=reactor)
    except Exception as e:  # the endpoint parsers raise several kinds
        raise ConfigError(
            f"{description!r} is not a Twisted server endpoint description "
            f"(such as tcp:8443:interface=127.0.0.1): {e}",
            path=key,
        ) from None


def _flatten(answers: Iterable[Optional[Iterable[Any]]]) -> Iterable[Any]:
    return itertools.chain.from_iterable(a for a in answers if a)


