"""
Relay links: mutually authenticated TLS 1.3 connections between relays, the
control messages they carry, and the sealed UDP datagrams beside them.

A relay's identity is the SHA-256 fingerprint of the certificate it presents
in the handshake (fedserver's C{[tls]} certificate); no CA is involved, and
nothing a relay says about itself is believed.  The handshake fails for a
relay in neither C{peers} nor C{trusted} (and, when we dial, for any
certificate but the one configured for that address); the refusal is
logged.  Session resumption is off, so every link is judged afresh.

After the handshake each side sends C{Hello}; the mesh then announces its
C{TrustChain} and subscriptions.  Datagram keys come from the TLS exporter
(L{fedserver_relay.datagram.LinkKeys}).  A side that takes UDP (its
C{Hello} names a port) is sent a sealed probe; frames go on the TLS stream
(C{Media}) until the probe is acknowledged there (C{UdpAck}), and on UDP
after.  Links send C{Ping} every L{PING_EVERY} seconds and close after
L{IDLE_TIMEOUT} seconds of silence; dialled links reconnect with
exponential backoff.

Backpressure.  A link is a push producer for the TCP connection under its
TLS (registered there rather than on the TLS transport, which would hold
back its close until the producer is unregistered, whoever closes it).
While that connection's write buffer is full, media for the link is not
written to the stream but dropped and counted as C{congested}; control
messages still are, but a link that stays backed up for
L{CONGESTED_TIMEOUT} seconds, or has more than
L{MAX_CONGESTED_CONTROL_BYTES} bytes of control messages written while
backed up (Pongs to a peer that sends Ping but never reads, say), is closed.

Datagrams are taken for a link only once it joined the mesh, and no longer
once it is closed or replaced.
"""

from __future__ import annotations

import collections
import hashlib
import os
import time
from typing import Any, Callable, Dict, Optional, Tuple

from cryptography.hazmat.primitives.serialization import Encoding
from OpenSSL import SSL, crypto
from twisted.internet import protocol
from twisted.internet.interfaces import (
    IHandshakeListener,
    IOpenSSLClientConnectionCreator,
    IOpenSSLServerConnectionCreator,
    IPushProducer,
)
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.protocols.policies import TimeoutMixin
from zope.interface import implementer

from fedserver.tls import TLSMaterial
from fedserver_relay.control import (
    PROTOCOL_VERSIONS,
    ControlDecoder,
    ControlError,
    ControlMessage,
    Hello,
    Media,
    Ping,
    Pong,
    Subscribe,
    TrustChain,
    UdpAck,
    Unsubscribe,
    encode_control,
)
from fedserver_relay.datagram import (
    PROBE_TAG,
    DatagramError,
    LinkKeys,
    Opener,
    ReplayedDatagram,
    Sealer,
    SequenceExhausted,
    decode_probe,
    encode_probe,
    peek_link_id,
)
from fedserver_relay.frames import Frame, FrameError, decode_frame, encode_frame
from fedserver_relay.mesh import RelayMesh

log = Logger(namespace="fedserver_relay.link")

#: seconds between pings
PING_EVERY = 15.0
#: a link silent this long is closed
IDLE_TIMEOUT = 45.0
#: the handshake and hello must be done within this many seconds
HELLO_TIMEOUT = 10.0
#: probes sent before a side settles for the TLS stream
PROBES = 5
PROBE_EVERY = 1.0
#: a link whose TLS stream stays backed up this long is closed
CONGESTED_TIMEOUT = IDLE_TIMEOUT
#: a link with more bytes of control messages written while its TLS stream is backed up is closed
MAX_CONGESTED_CONTROL_BYTES = 256 * 1024
#: handshake refusals are counted by fingerprint for at most this many (the least recently refused is forgotten)
MAX_REFUSED_FINGERPRINTS = 1000
#: a refused handshake is logged at most once per this many seconds, with the counts
REFUSAL_LOG_EVERY = 10.0


def certificate_fingerprint(certificate: Any) -> str:
    """The SHA-256 of a pyOpenSSL or cryptography certificate's DER, hex."""
    if isinstance(certificate, crypto.X509):
        certificate = certificate.to_cryptography()
    return hashlib.sha256(certificate.public_bytes(Encoding.DER)).hexdigest()


class RelayTLS:
    """
    The TLS settings of relay links: our certificate and key, TLS 1.3 only,
    no session resumption, and a peer certificate judged by its fingerprint
    alone.

    @param allowed: whether a fingerprint may hold a link with us.
    @param clock: C{IReactorTime}, for spacing the warnings (by default the monotonic clock).
    """

    def __init__(self, material: TLSMaterial, allowed: Callable[[str], bool], label: Callable[[str], str],
                 *, clock: Any = None) -> None:
        self._material = material
        self._allowed = allowed
        self._label = label
        self._clock = clock
        # refusals by fingerprint, the least recently refused first: bounded, whoever keeps trying
        self._refusals: collections.OrderedDict[str, int] = collections.OrderedDict()
        #: every handshake refused
        self.refused_total = 0
        self._last_logged = float("-inf")

    def _refused(self, fingerprint: str) -> None:
        """Count a refused handshake, and log it now and then (never once per attempt or per fingerprint)."""
        self.refused_total += 1
        count = self._refusals.pop(fingerprint, 0) + 1
        self._refusals[fingerprint] = count
        if len(self._refusals) > MAX_REFUSED_FINGERPRINTS:
            self._refusals.popitem(last=False)
        now = float(self._clock.seconds()) if self._clock is not None else time.monotonic()
        if now - self._last_logged >= REFUSAL_LOG_EVERY:
            self._last_logged = now
            log.warn("refused a relay link during the TLS handshake: certificate fingerprint {fp} is not "
                     "in [[relay.peers]] or [[relay.trusted]] ({count} refusals of it, {total} in all; logged "
                     "at most every {every:g} s)", fp=fingerprint, count=count, total=self.refused_total,
                     every=REFUSAL_LOG_EVERY)

    def _context(self, method: int, check: Callable[[str], bool]) -> SSL.Context:
        ctx = SSL.Context(method)
        ctx.set_min_proto_version(SSL.TLS1_3_VERSION)
        ctx.use_certificate(self._material.chain[0])
        for extra in self._material.chain[1:]:
            ctx.add_extra_chain_cert(extra)
        ctx.use_privatekey(self._material.private_key)
        ctx.set_session_cache_mode(SSL.SESS_CACHE_OFF)
        ctx.set_options(SSL.OP_NO_TICKET)

        def verify(connection: SSL.Connection, certificate: crypto.X509, errnum: int, depth: int, ok: int) -> bool:
            if depth > 0:
                return True  # identities are pinned fingerprints: CA chains play no part
            fingerprint = certificate_fingerprint(certificate)
            if check(fingerprint):
                return True
            self._refused(fingerprint)
            return False

        ctx.set_verify(SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT, verify)
        return ctx

    def server(self) -> IOpenSSLServerConnectionCreator:
        return _ServerCreator(self._context(SSL.TLS_SERVER_METHOD, self._allowed))

    def client(self, expected: str) -> IOpenSSLClientConnectionCreator:
        """Client settings for dialling the relay whose certificate has fingerprint C{expected}."""
        return _ClientCreator(self._context(SSL.TLS_CLIENT_METHOD, lambda fp: fp == expected))

    @property
    def refusals(self) -> Dict[str, int]:
        """
        Handshakes refused, by the presented fingerprint, for the
        L{MAX_REFUSED_FINGERPRINTS} refused most recently (C{refused_total}
        counts them all).
        """
        return dict(self._refusals)


@implementer(IOpenSSLServerConnectionCreator)
class _ServerCreator:
    def __init__(self, context: SSL.Context) -> None:
        self._context = context

    def serverConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        return SSL.Connection(self._context, None)


@implementer(IOpenSSLClientConnectionCreator)
class _ClientCreator:
    def __init__(self, context: SSL.Context) -> None:
        self._context = context

    def clientConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        connection = SSL.Connection(self._context, None)
        connection.set_connect_state()
        return connection


class DatagramRouter(protocol.DatagramProtocol):
    """
    The federation UDP port: finds each datagram's link by its link id,
    opens it with that link's keys, and hands probes and frames on.
    """

    def __init__(self, mesh: RelayMesh) -> None:
        self.mesh = mesh
        self.links: Dict[bytes, RelayLink] = {}
        self.unknown = 0

    def send(self, datagram: bytes, address: Tuple[str, int]) -> None:
        if self.transport is not None:
            self.transport.write(datagram, address)

    def datagramReceived(self, datagram: bytes, address: Any) -> None:
        try:
            link = self.links.get(peek_link_id(datagram))
        except DatagramError:
            link = None
        if link is None or link.opener is None or link._closed:
            self.unknown += 1  # not for any link: never answered, never logged per datagram
            return
        try:
            plaintext = link.opener.open(datagram)
        except ReplayedDatagram:
            self.mesh.dropped("replayed", link.fingerprint)
            return
        except DatagramError:
            self.mesh.dropped("malformed", link.fingerprint)
            return
        if plaintext[0] == PROBE_TAG:  # is_probe: an opened plaintext is never empty
            try:
                link.send_control(UdpAck(decode_probe(plaintext)))
            except DatagramError:
                self.mesh.dropped("malformed", link.fingerprint)
            return
        try:
            frame = decode_frame(plaintext)
        except FrameError:
            self.mesh.dropped("malformed", link.fingerprint)
            return
        self.mesh.frame_from_link(link, frame)


@implementer(IHandshakeListener, IPushProducer)
class RelayLink(protocol.Protocol, TimeoutMixin):
    """
    One relay link over TLS.  C{fingerprint} is known once the handshake is
    done; the link joins the mesh once the other side's C{Hello} arrives.
    """

    def __init__(self, owner: RelayLinks, *, is_client: bool, clock: Any) -> None:
        self.owner = owner
        self.is_client = is_client
        self.clock = clock
        self.fingerprint = ""
        self.hello: Optional[Hello] = None
        self.keys: Optional[LinkKeys] = None
        self.sealer: Optional[Sealer] = None
        self.opener: Optional[Opener] = None
        self.udp_address: Optional[Tuple[str, int]] = None
        self.udp_confirmed = False
        self._probe_nonce = os.urandom(8)
        self._probe_call: Optional[LoopingCall] = None
        self._probe_count = 0
        self._pinger: Optional[LoopingCall] = None
        self._decoder = ControlDecoder()
        self._joined = False
        self._closed = False
        # backpressure: the TCP transport we are the producer of, and while it is backed up, since when and the
        # control bytes written since
        self._consumer: Any = None
        self._paused_at: Optional[float] = None
        self._congested_bytes = 0
        self._congestion_call: Any = None

    @property
    def mesh(self) -> RelayMesh:
        return self.owner.mesh

    @property
    def _t(self) -> Any:
        """The TLS transport (C{ISSLTransport} and C{ITCPTransport})."""
        return self.transport

    def callLater(self, period: float, func: Callable[..., Any]) -> Any:  # TimeoutMixin on the injected clock
        return self.clock.callLater(period, func)

    def connectionMade(self) -> None:
        self.setTimeout(HELLO_TIMEOUT)
        # told by the connection under TLS when its write buffer is full (see the module docstring)
        consumer = getattr(self.transport, "transport", None)
        if consumer is not None and getattr(consumer, "producer", None) is None:
            consumer.registerProducer(self, True)
            self._consumer = consumer

    def handshakeCompleted(self) -> None:
        certificate = self._t.getPeerCertificate()
        if certificate is None:
            self._t.abortConnection()
            return
        self.fingerprint = certificate_fingerprint(certificate)
        try:
            self.keys = LinkKeys.from_connection(self._t.getHandle(), is_client=self.is_client)
        except ValueError as e:
            log.warn("relay link with {fp}: no datagram keys ({error}); using the TLS stream only",
                     fp=self.fingerprint, error=str(e))
        else:
            self.sealer = self.keys.sealer()
            self.opener = self.keys.opener()
            # (the router learns of the link once it joined the mesh)
        udp_port = self.owner.udp_port
        self.send_control(Hello(PROTOCOL_VERSIONS, self.owner.label, udp_port, self.mesh.max_hops))

    def dataReceived(self, data: bytes) -> None:
        if self._closed:
            return  # closed, or replaced: what still arrives counts for nothing, not even as a sign of life
        self.resetTimeout()
        try:
            messages = self._decoder.feed(data)
        except ControlError as e:
            log.warn("relay link with {label}: closing on a malformed control message: {error}",
                     label=self.mesh.label(self.fingerprint), error=str(e))
            self.mesh.dropped("malformed", self.fingerprint)
            self._abort()
            return
        for message in messages:
            if self._closed:
                return
            self._received(message)

    def _received(self, message: ControlMessage) -> None:
        if self.hello is None:
            if not isinstance(message, Hello):
                log.warn("relay link with {fp}: the first message was {kind}, not Hello; closing",
                         fp=self.fingerprint, kind=type(message).__name__)
                self._abort()
                return
            self._hello(message)
            return
        if isinstance(message, Media):
            self.mesh.frame_from_link(self, message.frame)
        elif isinstance(message, TrustChain):
            self.mesh.trust_chain(self, message)
        elif isinstance(message, (Subscribe, Unsubscribe)):
            problem = self.mesh.subscribe(self, message.room_hashes, isinstance(message, Subscribe))
            if problem is not None:
                log.warn("relay link with {label} ({fp}): closing: {reason}", label=self.mesh.label(self.fingerprint),
                         fp=self.fingerprint, reason=problem)
                self._abort()
        elif isinstance(message, UdpAck):
            if message.nonce == self._probe_nonce and not self.udp_confirmed:
                self.udp_confirmed = True
                self._stop_probing()
                log.info("relay link with {label}: UDP confirmed", label=self.mesh.label(self.fingerprint))
        elif isinstance(message, Ping):
            self.send_control(Pong(message.nonce))
        elif isinstance(message, Hello):
            log.warn("relay link with {fp}: a second Hello; closing", fp=self.fingerprint)
            self._abort()

    def _hello(self, hello: Hello) -> None:
        if not hello.versions & PROTOCOL_VERSIONS:
            log.warn("relay link with {fp}: no common protocol version ({theirs}); closing", fp=self.fingerprint,
                     theirs=sorted(hello.versions))
            self._abort()
            return
        self.hello = hello
        self.setTimeout(IDLE_TIMEOUT)
        if not self.owner.admit(self):
            self._lose()  # the other link to that relay stays: nothing more on this one counts
            return
        self._joined = True
        if self.keys is not None:
            self.owner.router.links[self.keys.receive_link_id] = self
        self.mesh.link_up(self)
        self._pinger = LoopingCall(lambda: self.send_control(Ping(os.urandom(8))))
        self._pinger.clock = self.clock
        self._pinger.start(PING_EVERY, now=False)
        if hello.udp_port and self.sealer is not None and self.owner.udp_port:
            self.udp_address = (self._t.getPeer().host, hello.udp_port)
            self._probe_call = LoopingCall(self._probe)
            self._probe_call.clock = self.clock
            self._probe_call.start(PROBE_EVERY, now=True)

    def _probe(self) -> None:
        assert self._probe_call is not None
        if self.udp_confirmed or self._probe_count >= PROBES or self.sealer is None:
            if not self.udp_confirmed:
                log.info("relay link with {label}: no answer to UDP probes; frames use the TLS stream",
                         label=self.mesh.label(self.fingerprint))
            self._stop_probing()
            return
        self._probe_count += 1
        self._send_datagram(encode_probe(self._probe_nonce))

    def _stop_probing(self) -> None:
        if self._probe_call is not None and self._probe_call.running:
            self._probe_call.stop()

    def _send_datagram(self, plaintext: bytes) -> bool:
        if self.sealer is None or self.udp_address is None:
            return False
        try:
            datagram = self.sealer.seal(plaintext)
        except SequenceExhausted:
            self._lose()  # new keys come with a new handshake
            return False
        self.owner.router.send(datagram, self.udp_address)
        return True

    # LinkHandle

    def send_frame(self, frame: Frame) -> bool:
        if self.udp_confirmed and self.sealer is not None and self.udp_address is not None:
            # _send_datagram, spelled out: this runs for every frame
            try:
                datagram = self.sealer.seal(encode_frame(frame))
            except SequenceExhausted:
                self._lose()  # new keys come with a new handshake
            else:
                self.owner.router.send(datagram, self.udp_address)
                return True
        if self._paused_at is not None:
            return False  # the stream is backed up: media waits for nobody (the mesh counts it as congested)
        self.send_control(Media(frame))
        return True

    def send_control(self, message: ControlMessage) -> None:
        if self._closed:
            return
        data = encode_control(message)
        if self._paused_at is not None:
            self._congested_bytes += len(data)
            if self._congested_bytes > MAX_CONGESTED_CONTROL_BYTES:
                log.warn("relay link with {label} ({fp}): closing: its TLS stream is backed up, and {count} bytes of "
                         "control messages were written since (at most {limit})",
                         label=self.mesh.label(self.fingerprint), fp=self.fingerprint, count=self._congested_bytes,
                         limit=MAX_CONGESTED_CONTROL_BYTES)
                self._abort()
                return
        self._t.write(data)

    # IPushProducer: the connection under TLS says when its write buffer is full, and when it drained

    def pauseProducing(self) -> None:
        if self._paused_at is not None or self._closed:
            return
        self._paused_at = float(self.clock.seconds())
        self._congested_bytes = 0
        self._congestion_call = self.clock.callLater(CONGESTED_TIMEOUT, self._congested_too_long)

    def resumeProducing(self) -> None:
        self._not_congested()
        consumer = self._consumer
        if consumer is not None and getattr(consumer, "disconnecting", False):
            # closing, and it waited for us rather than close: we have nothing more to write
            self._unregister()

    def stopProducing(self) -> None:
        self._not_congested()
        self._consumer = None  # the connection is going

    def _not_congested(self) -> None:
        self._paused_at = None
        if self._congestion_call is not None and self._congestion_call.active():
            self._congestion_call.cancel()
        self._congestion_call = None

    def _congested_too_long(self) -> None:
        self._congestion_call = None
        log.warn("relay link with {label} ({fp}): closing: its TLS stream stayed backed up for {seconds:g} s",
                 label=self.mesh.label(self.fingerprint) if self.fingerprint else "(no handshake yet)",
                 fp=self.fingerprint, seconds=CONGESTED_TIMEOUT)
        self._abort()

    def _unregister(self) -> None:
        consumer, self._consumer = self._consumer, None
        if consumer is not None and getattr(consumer, "producer", None) is self:
            consumer.unregisterProducer()

    def _leave_router(self) -> None:
        """Datagrams for this link are no longer taken."""
        if self.keys is not None and self.owner.router.links.get(self.keys.receive_link_id) is self:
            del self.owner.router.links[self.keys.receive_link_id]

    def timeoutConnection(self) -> None:
        log.info("relay link with {fp}: silent for too long; closing", fp=self.fingerprint or "(no handshake yet)")
        self._abort()

    def _abort(self) -> None:
        """
        Close at once.  The transport reports the loss later, so the rest of
        what already arrived (e.g. a Hello after a refused first message)
        must not be acted on: from now on nothing is read or sent.
        """
        self._closed = True
        self._leave_router()
        self._t.abortConnection()

    def _lose(self) -> None:
        """
        Close once what was written is sent; as with L{_abort}, nothing more
        on this link is read or sent.
        """
        self._closed = True
        self._leave_router()
        self._unregister()
        self._t.loseConnection()

    def connectionLost(self, reason: Any = None) -> None:
        self._closed = True
        self.setTimeout(None)
        self._not_congested()
        self._consumer = None
        self._stop_probing()
        if self._pinger is not None and self._pinger.running:
            self._pinger.stop()
        self._leave_router()
        if self._joined:
            self.mesh.link_down(self)
        self.owner.forget(self)


class RelayLinks:
    """
    What every link of one relay shares: the mesh, the UDP router, our
    label and UDP port, and the rule for two links to one relay (the one
    dialled by the relay with the smaller fingerprint stays).
    """

    def __init__(self, mesh: RelayMesh, router: DatagramRouter, *, label: str, udp_port: int, clock: Any) -> None:
        self.mesh = mesh
        self.router = router
        self.label = label
        self.udp_port = udp_port
        self.clock = clock
        self.open: set = set()

    def factory(self, *, is_client: bool) -> protocol.Factory:
        links = self

        class LinkFactory(protocol.Factory):
            def buildProtocol(self, addr: Any) -> RelayLink:
                link = RelayLink(links, is_client=is_client, clock=links.clock)
                links.open.add(link)
                return link

        return LinkFactory()

    def admit(self, link: RelayLink) -> bool:
        """Whether C{link} may join the mesh; closes a duplicate link it replaces."""
        existing = self.mesh.links.get(link.fingerprint)
        if existing is None or existing is link:
            return True
        assert isinstance(existing, RelayLink)
        ours, theirs = self.mesh.fingerprint, link.fingerprint
        if link.is_client == existing.is_client:
            # dialled the same way again: the dialler dials only once its old link is gone (which we may not
            # have noticed yet), so the new link replaces it rather than waiting out its idle timeout
            replaces = True
        else:
            replaces = (ours < theirs) == link.is_client  # the link dialled by the smaller fingerprint stays
        if replaces:
            existing._lose()  # what still arrives on it must not touch the new link's state, nor its datagrams
            self.mesh.link_down(existing)
            return True
        return False

    def forget(self, link: RelayLink) -> None:
        self.open.discard(link)
