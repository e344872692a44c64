"""
Helpers shared by the relay unit tests: made-up fingerprints, fake links
and participants that record what the mesh tells them, and relays with real
certificates whose links run over an in-memory TLS pump.
"""

from __future__ import annotations

import hashlib
from typing import Any, Dict, FrozenSet, List, Optional, Sequence, Tuple

import attrs
from twisted.internet.address import IPv4Address
from twisted.internet.interfaces import IHandshakeListener
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactorClock
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.test import iosim
from zope.interface import implementer

from fedserver import pki
from fedserver.tls import TLSMaterial
from fedserver_relay.control import ControlDecoder, ControlMessage, Subscribe, TrustChain, Unsubscribe
from fedserver_relay.fingerprint import fingerprint_of_certificate, short_id
from fedserver_relay.frames import Frame, room_hash
from fedserver_relay.link import DatagramRouter, RelayLink, RelayLinks, RelayTLS
from fedserver_relay.mesh import RelayMesh
from fedserver_relay.settings import PeerEntry, TrustedEntry, TrustPolicy


def fingerprint(name: str) -> str:
    """A made-up certificate fingerprint for the relay C{name}."""
    return hashlib.sha256(name.encode()).hexdigest()


OURS = fingerprint("ours")
#: in [[relay.peers]]; not a delegate
A = fingerprint("a")
#: in [[relay.trusted]] with delegate = true
B = fingerprint("b")
#: in [[relay.trusted]] with delegate = false
C = fingerprint("c")
#: in neither list
D = fingerprint("d")
E = fingerprint("e")

ROOM = room_hash("standup")
OTHER_ROOM = room_hash("retro")


def policy() -> TrustPolicy:
    return TrustPolicy(
        [PeerEntry("127.0.0.1", 7444, A, "Relay A")],
        [TrustedEntry(B, "Relay B", True), TrustedEntry(C, "Relay C", False)],
    )


def frame(origin: str, *, ttl: int = 2, packet_id: int = 1, room: bytes = ROOM, payload: bytes = b"opus") -> Frame:
    return Frame(room, short_id(origin), ttl, packet_id, payload)


@attrs.define(eq=False)
class FakeLink:
    """A L{fedserver_relay.mesh.LinkHandle} that keeps what it is sent."""

    fingerprint: str
    frames: List[Frame] = attrs.Factory(list)
    controls: List[ControlMessage] = attrs.Factory(list)
    #: whether the link is backed up: frames sent to it are dropped, and it says so
    congested: bool = False

    def send_frame(self, frame: Frame) -> bool:
        if self.congested:
            return False
        self.frames.append(frame)
        return True

    def send_control(self, message: ControlMessage) -> None:
        self.controls.append(message)

    def take_controls(self) -> List[ControlMessage]:
        sent, self.controls = self.controls, []
        return sent

    def subscribed_rooms(self) -> FrozenSet[bytes]:
        """The rooms the Subscribe and Unsubscribe messages so far leave subscribed."""
        rooms: set = set()
        for message in self.controls:
            if isinstance(message, Subscribe):
                rooms |= message.room_hashes
            elif isinstance(message, Unsubscribe):
                rooms -= message.room_hashes
        return frozenset(rooms)

    def chains(self) -> List[FrozenSet[str]]:
        return [m.vouched_relays for m in self.controls if isinstance(m, TrustChain)]


@attrs.define
class FakeParticipants:
    """A L{fedserver_relay.mesh.Participants}: C{members} per room hash."""

    members: Dict[bytes, int] = attrs.Factory(dict)
    delivered: List[Tuple[Frame, Any]] = attrs.Factory(list)

    def deliver(self, frame: Frame, exclude: Optional[Any] = None) -> int:
        self.delivered.append((frame, exclude))
        return self.members.get(frame.room_hash, 0)

    def rooms(self) -> FrozenSet[bytes]:
        return frozenset(room for room, count in self.members.items() if count)


# Relays with real certificates, linked in memory


_CA: List[pki.Issued] = []


def _ca() -> pki.Issued:
    if not _CA:
        _CA.append(pki.make_ca("relay test CA"))
    return _CA[0]


def material(name: str) -> TLSMaterial:
    """TLS material for a relay named C{name}: a fresh certificate from a shared CA."""
    ca = _ca()
    issued = pki.issue(ca, [f"{name}.example"])
    return TLSMaterial((issued.certificate, ca.certificate), issued.key, (ca.certificate,))


@attrs.define(eq=False)
class Relay:
    """The link layer of one relay, as L{fedserver_relay.plugin.RelayService} assembles it."""

    name: str
    material: TLSMaterial
    fingerprint: str
    mesh: RelayMesh
    tls: RelayTLS
    router: DatagramRouter
    links: RelayLinks


def make_relay(
    name: str,
    clock: Any,
    *,
    peers: Sequence[Tuple[str, str]] = (),
    trusted: Sequence[Tuple[str, str, bool]] = (),
    udp_port: int = 0,
    max_hops: int = 2,
    participants: Any = None,
    tls: Optional[TLSMaterial] = None,
) -> Relay:
    """
    A relay named C{name}: C{peers} are (fingerprint, label), C{trusted}
    (fingerprint, label, delegate).
    """
    tls = tls or material(name)
    fp = fingerprint_of_certificate(tls.leaf)
    trust = TrustPolicy(
        [PeerEntry("127.0.0.1", 7000 + i, peer, label) for i, (peer, label) in enumerate(peers)],
        [TrustedEntry(t, label, delegate) for t, label, delegate in trusted],
    )
    mesh = RelayMesh(fp, trust, max_hops=max_hops, room_rate_limit=1000, clock=clock, participants=participants)
    router = DatagramRouter(mesh)
    links = RelayLinks(mesh, router, label=name, udp_port=udp_port, clock=clock)
    return Relay(name, tls, fp, mesh, RelayTLS(tls, trust.may_connect, trust.label, clock=clock), router, links)


@attrs.define(eq=False)
class Connection:
    """A relay link between two relays over an in-memory TLS pump."""

    pump: iosim.IOPump
    client: RelayLink
    server: RelayLink
    client_tls: Any
    server_tls: Any


def pump_tls(
    client_creator: Any,
    client_factory: Any,
    server_creator: Any,
    server_factory: Any,
    clock: MemoryReactorClock,
    *,
    client_address: str = "10.0.0.1",
    server_address: str = "10.0.0.2",
) -> Tuple[iosim.IOPump, Any, Any]:
    """
    A TLS client and server (each a L{TLSMemoryBIOFactory} protocol around
    the given factory's) connected in memory, with IPv4 addresses, pumped
    until nothing moves: the pump and both TLS protocols.
    """
    client_tls = TLSMemoryBIOFactory(client_creator, True, client_factory, clock=clock).buildProtocol(None)
    server_tls = TLSMemoryBIOFactory(server_creator, False, server_factory, clock=clock).buildProtocol(None)
    client_at = IPv4Address("TCP", client_address, 40001)
    server_at = IPv4Address("TCP", server_address, 7443)
    pump = iosim.connect(
        server_tls, iosim.FakeTransport(server_tls, True, hostAddress=server_at, peerAddress=client_at),
        client_tls, iosim.FakeTransport(client_tls, False, hostAddress=client_at, peerAddress=server_at),
        greet=False, clock=clock,
    )
    pump.flush()
    return pump, client_tls, server_tls


def connect(client: Relay, server: Relay, clock: MemoryReactorClock, *, expected: Optional[str] = None) -> Connection:
    """
    C{client} dials C{server}, expecting the certificate fingerprint
    C{expected} (by default C{server}'s); the exchange runs until nothing
    moves.
    """
    built: List[Any] = []
    pump, client_tls, server_tls = pump_tls(
        client.tls.client(expected or server.fingerprint), _recording(client.links.factory(is_client=True), built),
        server.tls.server(), _recording(server.links.factory(is_client=False), built), clock,
    )
    # (kept because a TLSMemoryBIOProtocol forgets its wrapped protocol when the connection is lost)
    return Connection(pump, built[0], built[1], client_tls, server_tls)


def _recording(factory: Any, built: List[Any]) -> Any:
    """C{factory}, keeping what it builds in C{built}."""
    build = factory.buildProtocol

    def buildProtocol(addr: Any) -> Any:
        built.append(build(addr))
        return built[-1]

    factory.buildProtocol = buildProtocol
    return factory


@implementer(IHandshakeListener)
class RawPeer(Protocol):
    """
    The other end of a relay link, speaking raw bytes: sends C{first} once
    the TLS handshake is done and keeps the control messages it receives.
    """

    def __init__(self, first: bytes = b"") -> None:
        self.first = first
        self.received: List[ControlMessage] = []
        self.decoder = ControlDecoder()
        self.handshake_done = False
        self.lost = False

    def handshakeCompleted(self) -> None:
        self.handshake_done = True
        if self.first:
            self.transport.write(self.first)

    def dataReceived(self, data: bytes) -> None:
        self.received.extend(self.decoder.feed(data))

    def connectionLost(self, reason: Any = None) -> None:
        self.lost = True


def raw_peer_dials(
    peer_tls: RelayTLS, server: Relay, clock: MemoryReactorClock, first: bytes = b""
) -> Tuple[iosim.IOPump, RawPeer, RelayLink]:
    """A L{RawPeer} with C{peer_tls}'s certificate dials C{server}: the pump, the peer, C{server}'s link."""
    peer = RawPeer(first)
    built: List[Any] = []
    pump, _, _ = pump_tls(
        peer_tls.client(server.fingerprint), Factory.forProtocol(lambda: peer),
        server.tls.server(), _recording(server.links.factory(is_client=False), built), clock,
    )
    return pump, peer, built[0]


@attrs.define
class FakeUDP:
    """A datagram transport that keeps what is written."""

    written: List[Tuple[bytes, Tuple[str, int]]] = attrs.Factory(list)

    def write(self, data: bytes, address: Tuple[str, int]) -> None:
        self.written.append((data, address))

    def take(self) -> List[Tuple[bytes, Tuple[str, int]]]:
        sent, self.written = self.written, []
        return sent


def make_mesh_for(participants: Any, clock: Any, *, max_hops: int = 2, rate: int = 1000) -> RelayMesh:
    """A mesh for OURS with L{policy} and C{participants}."""
    return RelayMesh(OURS, policy(), max_hops=max_hops, room_rate_limit=rate, clock=clock, participants=participants)
