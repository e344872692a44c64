"""
fedserver plugin C{relay}: a media relay that federates with other relays
under delegated trust, configured by the C{[relay]} table
(L{fedserver_relay.settings}), with its status at C{GET /relay/status} on
the outward listener.

The relay's identity is fedserver's own C{[tls]} certificate; its
fingerprint is what other relays put in their C{peers} and C{trusted}
lists (C{fedserver relay-fingerprint CERT.pem} prints it).
"""

from __future__ import annotations

import json
from typing import Any, Callable, Dict, List, Optional, Tuple

from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from twisted.application import service
from twisted.application.internet import ClientService, backoffPolicy
from twisted.internet.endpoints import HostnameEndpoint, serverFromString, wrapClientTLS
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.web import resource, server

from fedserver.context import Context
from fedserver.hookspecs import hookimpl
from fedserver.jsonapi import APIError
from fedserver.metrics import BoundedLabel
from fedserver_relay.fingerprint import fingerprint_of_certificate
from fedserver_relay.link import DatagramRouter, RelayLinks, RelayTLS
from fedserver_relay.mesh import RelayMesh
from fedserver_relay.participants import ParticipantPort
from fedserver_relay.settings import RelaySettings, TrustPolicy, read_settings

log = Logger(namespace="fedserver_relay")

_STATE = "relay.runtime"


class RelayService(service.MultiService):
    """The relay's listeners and dialled links, started and stopped with fedserver."""

    def __init__(self, settings: RelaySettings, policy: TrustPolicy, tls: RelayTLS, mesh: RelayMesh,
                 *, reactor: Any) -> None:
        super().__init__()
        self.settings = settings
        self.policy = policy
        self.tls = tls
        self.mesh = mesh
        self.reactor = reactor
        self.router = DatagramRouter(mesh)
        self.participants: Optional[ParticipantPort] = None
        if settings.participants is not None:
            self.participants = ParticipantPort(settings.rooms, clock=reactor)
            self.participants.mesh = mesh
            mesh.participants = self.participants
        udp_port = settings.udp_advertise_port if settings.udp is not None else 0
        self.links = RelayLinks(mesh, self.router, label=settings.label, udp_port=udp_port, clock=reactor)
        self._ports: List[Any] = []
        self._listening: Any = None
        for peer in settings.peers:
            endpoint = wrapClientTLS(
                tls.client(peer.fingerprint),
                HostnameEndpoint(reactor, peer.host, peer.port, timeout=10),
            )
            dialler = ClientService(
                endpoint, self.links.factory(is_client=True),
                retryPolicy=backoffPolicy(initialDelay=0.5, maxDelay=30.0, factor=2.0), clock=reactor,
            )
            dialler.setServiceParent(self)

    def startService(self) -> None:
        if self.settings.udp is not None:
            host, port = self.settings.udp
            self._ports.append(self.reactor.listenUDP(port, self.router, interface=host))
        if self.participants is not None and self.settings.participants is not None:
            host, port = self.settings.participants
            self._ports.append(self.reactor.listenUDP(port, self.participants, interface=host))
        endpoint = serverFromString(self.reactor, self.settings.listen)
        factory = TLSMemoryBIOFactory(self.tls.server(), False, self.links.factory(is_client=False))
        self._listening = endpoint.listen(factory)
        self._listening.addCallback(self._listened)
        self._listening.addErrback(lambda f: log.failure("the relay link listener did not start", f))
        log.info("relay {label} ({fp}) starting: links on {listen}, UDP {udp}, participants {participants}",
                 label=self.settings.label, fp=self.mesh.fingerprint, listen=self.settings.listen,
                 udp=self.settings.udp, participants=self.settings.participants)
        super().startService()

    def _listened(self, port: Any) -> Any:
        self._ports.append(port)
        return port

    def stopService(self) -> Any:
        d = super().stopService()
        for port in self._ports:
            port.stopListening()
        self._ports = []
        for link in list(self.links.open):
            link.transport.abortConnection()
        return d

    def status(self) -> Dict[str, Any]:
        def details(fp: str) -> Dict[str, Any]:
            link = self.mesh.links.get(fp)
            return {
                "direction": "out" if getattr(link, "is_client", False) else "in",
                "udp": bool(getattr(link, "udp_confirmed", False)),
            }

        answer = self.mesh.status(details)
        answer["label"] = self.settings.label
        answer["participants"] = self.participants.count if self.participants is not None else 0
        answer["refusedHandshakes"] = self.tls.refusals
        answer["refusedHandshakesTotal"] = self.tls.refused_total
        answer["unknownDatagrams"] = self.router.unknown
        return answer


class StatusResource(resource.Resource):
    """C{GET /relay/status}: the relay's links, trust and counters as JSON."""

    isLeaf = True

    def __init__(self, relay: RelayService) -> None:
        super().__init__()
        self.relay = relay

    def render(self, request: server.Request) -> bytes:
        # every answer is JSON, errors included (Twisted's own 405 is an HTML page)
        request.setHeader(b"content-type", b"application/json")
        if request.postpath != [b"status"]:
            return _error(request, 404, "no-endpoint", "the relay serves only GET /relay/status")
        if request.method not in (b"GET", b"HEAD"):
            request.setHeader(b"allow", b"GET, HEAD")
            return _error(request, 405, "method-not-allowed", "/relay/status takes GET")
        return json.dumps(self.relay.status()).encode("utf-8")


def relay_metrics(relay: RelayService) -> Callable[[], List[Metric]]:
    """
    A collector (for C{context.metrics.register_collector}) that reads the
    mesh's own counters, the ones C{/relay/status} shows, at each scrape.
    """
    peers = BoundedLabel(1000)

    def collect() -> List[Metric]:
        counters = relay.mesh.counters
        accepted = CounterMetricFamily("fedserver_relay_frames_accepted",
                                       "Media frames accepted from a relay link, by peer relay label",
                                       labels=["peer"])
        for peer, count in sorted(counters.accepted.items()):
            accepted.add_metric([peers(peer)], count)
        dropped = CounterMetricFamily("fedserver_relay_frames_dropped",
                                      "Media frames dropped, by reason and peer relay label (local: our "
                                      "own participants)", labels=["reason", "peer"])
        for reason, by_peer in sorted(counters.dropped.items()):
            for peer, count in sorted(by_peer.items()):
                dropped.add_metric([reason, peers(peer)], count)
        frames = CounterMetricFamily("fedserver_relay_frames",
                                     "Media frames originated by local participants, delivered to local "
                                     "participants, and forwarded to relay links", labels=["kind"])
        for kind in ("originated", "delivered", "forwarded"):
            frames.add_metric([kind], getattr(counters, kind))
        links = GaugeMetricFamily("fedserver_relay_links", "Relay links up", value=len(relay.mesh.links))
        participants = GaugeMetricFamily("fedserver_relay_participants", "Local participants",
                                         value=relay.participants.count if relay.participants is not None else 0)
        refused = CounterMetricFamily("fedserver_relay_handshakes_refused",
                                      "Relay link handshakes refused (a certificate in neither peers nor trusted)",
                                      value=relay.tls.refused_total)
        unknown = CounterMetricFamily("fedserver_relay_datagrams_unknown",
                                      "UDP datagrams for no link, dropped unanswered", value=relay.router.unknown)
        return [accepted, dropped, frames, links, participants, refused, unknown]

    return collect


def _error(request: server.Request, code: int, label: str, message: str) -> bytes:
    answer = APIError(code, label, message).response()
    request.setResponseCode(answer.code)
    return answer.body


def _runtime(context: Context) -> Optional[RelayService]:
    if _STATE in context.plugin_state:
        return context.plugin_state[_STATE]
    options = context.config.section("relay")
    relay = None
    if options is not None:
        material = context.tls_material("the relay")
        fingerprint = fingerprint_of_certificate(material.leaf)
        settings = read_settings(options, fingerprint)
        policy = TrustPolicy(settings.peers, settings.trusted)
        tls = RelayTLS(material, policy.may_connect, policy.label, clock=context.reactor)
        mesh = RelayMesh(fingerprint, policy, max_hops=settings.max_hops, room_rate_limit=settings.room_rate_limit,
                         link_rate_limit=settings.link_rate_limit, clock=context.reactor)
        relay = RelayService(settings, policy, tls, mesh, reactor=context.reactor)
        context.metrics.register_collector(relay_metrics(relay))
    context.plugin_state[_STATE] = relay
    return relay


@hookimpl
def fedserver_resources(context: Context) -> List[Tuple[str, bytes, Any]]:
    """C{/relay/status} on the outward listener, when C{[relay]} is configured."""
    relay = _runtime(context)
    return [] if relay is None else [("outward", b"relay", StatusResource(relay))]


@hookimpl
def fedserver_services(context: Context) -> List[Any]:
    """The relay service, when C{[relay]} is configured."""
    relay = _runtime(context)
    return [] if relay is None else [relay]
