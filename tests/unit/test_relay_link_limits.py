"""
What bounds a relay link (L{fedserver_relay.link}) whatever the relay at
the other end does: backpressure from the connection under TLS (media
dropped as C{congested}, the link closed when it stays backed up or control
messages pile up), the bounded and quiet count of refused handshakes, the
UDP router taking datagrams only for links that joined and are open, and
the limits on subscriptions.
"""

from __future__ import annotations

from typing import Any, Tuple

import pytest
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import capturedLogs

import fedserver_relay.link as link_module
import fedserver_relay.mesh as mesh_module
from fedserver_relay.control import PROTOCOL_VERSIONS, Hello, Ping, Pong, Subscribe, encode_control
from fedserver_relay.datagram import LinkKeys
from fedserver_relay.fingerprint import short_id
from fedserver_relay.frames import Frame, encode_frame, room_hash
from fedserver_relay.link import IDLE_TIMEOUT, PING_EVERY, certificate_fingerprint
from tests.unit.relay_helpers import (
    FakeParticipants,
    FakeUDP,
    Relay,
    connect,
    make_relay,
    material,
    raw_peer_dials,
)

ROOM = room_hash("standup")
HELLO = encode_control(Hello(PROTOCOL_VERSIONS, "raw", 0, 2))


@pytest.fixture
def clock():
    return MemoryReactorClock()


def pair(clock: Any, *, udp: bool = False, participants: Any = None) -> Tuple[Relay, Relay]:
    """Relay 1 (which dials) and relay 2, which trusts it."""
    m1, m2 = material("r1"), material("r2")
    fp1, fp2 = certificate_fingerprint(m1.leaf), certificate_fingerprint(m2.leaf)
    r1 = make_relay("r1", clock, tls=m1, peers=[(fp2, "R2")], udp_port=7601 if udp else 0)
    r2 = make_relay("r2", clock, tls=m2, trusted=[(fp1, "R1", False)], udp_port=7602 if udp else 0,
                    participants=participants)
    if udp:
        r1.router.transport = FakeUDP()
        r2.router.transport = FakeUDP()
    return r1, r2


def under_tls(tls_protocol: Any) -> Any:
    """The transport under a TLS protocol: what tells its producer when its buffer is full."""
    return tls_protocol.transport


# backpressure


def test_a_link_is_the_producer_of_the_connection_under_its_tls(clock):
    r1, r2 = pair(clock)
    link = connect(r1, r2, clock)
    assert under_tls(link.client_tls).producer is link.client
    assert under_tls(link.server_tls).producer is link.server
    assert under_tls(link.client_tls).streamingProducer


def test_media_for_a_backed_up_link_is_dropped_as_congested(clock):
    participants = FakeParticipants({ROOM: 1})
    r1, r2 = pair(clock, participants=participants)
    link = connect(r1, r2, clock)
    under_tls(link.client_tls).producer.pauseProducing()  # relay 2 stopped reading: the buffer is full
    with capturedLogs() as events:
        assert r1.mesh.frame_from_participant("standup", b"one", ("192.0.2.1", 5000)) is not None
        link.pump.flush()
    assert participants.delivered == []
    assert r1.mesh.counters.dropped["congested"] == {"R2": 1}
    assert r1.mesh.counters.forwarded == 0
    assert any(e.get("reason") == "congested" and e.get("direction") == "for" for e in events)
    # control messages still go
    link.client.send_control(Ping(b"12345678"))
    link.pump.flush()
    # the buffer drained: media flows again
    under_tls(link.client_tls).producer.resumeProducing()
    sent = r1.mesh.frame_from_participant("standup", b"two", ("192.0.2.1", 5000))
    link.pump.flush()
    assert participants.delivered == [(sent, None)]
    assert r1.mesh.counters.dropped["congested"] == {"R2": 1} and r1.mesh.counters.forwarded == 1


def test_media_over_confirmed_udp_is_not_held_back_by_the_stream(clock):
    participants = FakeParticipants({ROOM: 1})
    r1, r2 = pair(clock, udp=True, participants=participants)
    link = connect(r1, r2, clock)
    (probe, _), = r1.router.transport.take()
    r2.router.datagramReceived(probe, ("10.0.0.1", 7601))
    link.pump.flush()
    assert link.client.udp_confirmed
    under_tls(link.client_tls).producer.pauseProducing()
    sent = r1.mesh.frame_from_participant("standup", b"media", ("192.0.2.1", 5000))
    (datagram, _), = r1.router.transport.take()
    r2.router.datagramReceived(datagram, ("10.0.0.1", 7601))
    assert participants.delivered == [(sent, None)]
    assert r1.mesh.counters.dropped["congested"] == {}


def test_a_link_that_stays_backed_up_is_closed(clock):
    r1, r2 = pair(clock)
    link = connect(r1, r2, clock)
    under_tls(link.client_tls).producer.pauseProducing()
    with capturedLogs() as events:
        # relay 2 keeps talking (so the link is not idle), but never reads what we send
        for _ in range(int(link_module.CONGESTED_TIMEOUT) - 1):
            clock.advance(1)
            link.server.send_control(Pong(b"12345678"))
            link.pump.flush()
        assert r1.mesh.links == {r2.fingerprint: link.client}
        clock.advance(1)
        link.pump.flush()
    assert r1.mesh.links == {} and r2.mesh.links == {}
    assert any("stayed backed up" in e["log_format"] for e in events)


def test_a_backed_up_link_is_not_closed_once_it_drained(clock):
    r1, r2 = pair(clock)
    link = connect(r1, r2, clock)
    producer = under_tls(link.client_tls).producer
    producer.pauseProducing()
    clock.advance(link_module.CONGESTED_TIMEOUT - 1)
    link.pump.flush()
    producer.resumeProducing()
    for _ in range(10):
        clock.advance(PING_EVERY)
        link.pump.flush()
    assert r1.mesh.links == {r2.fingerprint: link.client}


def test_a_peer_that_pings_but_never_reads_is_closed(clock):
    r1, r2 = pair(clock)
    pump, peer, link = raw_peer_dials(r1.tls, r2, clock, HELLO)
    assert r2.mesh.links == {r1.fingerprint: link}
    under_tls(link.transport).producer.pauseProducing()  # the peer does not read
    pings = encode_control(Ping(b"12345678"))
    pongs = link_module.MAX_CONGESTED_CONTROL_BYTES // len(encode_control(Pong(b"12345678"))) + 1
    with capturedLogs() as events:
        peer.transport.write(pings * pongs)
        pump.flush()
    assert peer.lost and r2.mesh.links == {}
    assert any("control messages" in e["log_format"] for e in events)


# refused handshakes


def test_refused_handshakes_are_counted_for_so_many_fingerprints_and_logged_now_and_then(clock, monkeypatch):
    monkeypatch.setattr(link_module, "MAX_REFUSED_FINGERPRINTS", 2)
    m2 = material("r2")
    r2 = make_relay("r2", clock, tls=m2)  # trusts nobody
    strangers = [make_relay(f"s{i}", clock, peers=[(r2.fingerprint, "R2")]) for i in range(4)]
    with capturedLogs() as events:
        for stranger in strangers:
            connect(stranger, r2, clock)
        connect(strangers[3], r2, clock)
    # the two refused most recently, with their counts; every refusal in the total
    assert r2.tls.refusals == {strangers[2].fingerprint: 1, strangers[3].fingerprint: 2}
    assert r2.tls.refused_total == 5
    logged = [e for e in events if "refused a relay link" in e["log_format"]]
    assert [(e["fp"], e["count"], e["total"]) for e in logged] == [(strangers[0].fingerprint, 1, 1)]
    clock.advance(link_module.REFUSAL_LOG_EVERY)
    with capturedLogs() as events:
        connect(strangers[0], r2, clock)
    logged = [e for e in events if "refused a relay link" in e["log_format"]]
    assert [(e["fp"], e["count"], e["total"]) for e in logged] == [(strangers[0].fingerprint, 1, 6)]
    assert len(r2.tls.refusals) == 2


# the UDP router


def test_a_link_that_has_not_joined_takes_no_datagrams(clock):
    participants = FakeParticipants({ROOM: 1})
    r1, r2 = pair(clock, udp=True, participants=participants)
    _pump, peer, link = raw_peer_dials(r1.tls, r2, clock)  # the handshake, but no Hello yet
    assert peer.handshake_done and link.keys is not None
    assert r2.router.links == {}
    # a datagram sealed with the link's keys (as the peer could) is for no link
    peer_keys = LinkKeys(link.keys.receive_key, link.keys.send_key, link.keys.receive_link_id,
                         link.keys.send_link_id)
    frame = Frame(ROOM, short_id(r1.fingerprint), 2, 1, b"media")
    r2.router.datagramReceived(peer_keys.sealer().seal(encode_frame(frame)), ("10.0.0.1", 7601))
    assert r2.router.unknown == 1 and participants.delivered == []
    assert r2.mesh.counters.accepted == {}


def test_a_link_joins_the_router_with_the_mesh(clock):
    r1, r2 = pair(clock, udp=True)
    link = connect(r1, r2, clock)
    assert r2.router.links == {link.server.keys.receive_link_id: link.server}
    assert r1.router.links == {link.client.keys.receive_link_id: link.client}


def test_a_closed_link_takes_no_datagrams_and_no_data(clock):
    participants = FakeParticipants({ROOM: 1})
    r1, r2 = pair(clock, udp=True, participants=participants)
    link = connect(r1, r2, clock)
    server = link.server
    datagram = link.client.sealer.seal(encode_frame(Frame(ROOM, short_id(r1.fingerprint), 2, 1, b"media")))
    clock.advance(10)
    timeout = server._TimeoutMixin__timeoutCall  # the idle timeout
    deadline = timeout.getTime()
    assert deadline == IDLE_TIMEOUT
    server._abort()  # (the transport reports the loss later)
    assert r2.router.links == {}
    r2.router.datagramReceived(datagram, ("10.0.0.1", 7601))
    assert participants.delivered == [] and r2.router.unknown == 1
    # what still arrives on the stream is not even a sign of life
    server.dataReceived(encode_control(Ping(b"12345678")))
    assert timeout.getTime() == deadline


def test_a_replaced_link_leaves_the_router(clock):
    m1, m2 = material("r1"), material("r2")
    fp1, fp2 = certificate_fingerprint(m1.leaf), certificate_fingerprint(m2.leaf)
    r1 = make_relay("r1", clock, tls=m1, peers=[(fp2, "R2")], udp_port=7601)
    r2 = make_relay("r2", clock, tls=m2, peers=[(fp1, "R1")], udp_port=7602)
    r1.router.transport, r2.router.transport = FakeUDP(), FakeUDP()
    small, large = (r1, r2) if fp1 < fp2 else (r2, r1)
    losing = connect(large, small, clock)  # replaced by the link the smaller fingerprint dials
    old_id = losing.server.keys.receive_link_id
    assert old_id in small.router.links
    keep = connect(small, large, clock)
    losing.pump.flush()
    assert small.router.links == {keep.client.keys.receive_link_id: keep.client}
    assert large.router.links == {keep.server.keys.receive_link_id: keep.server}


# subscriptions


def test_a_link_subscribing_to_too_many_rooms_is_closed(clock):
    r1, r2 = pair(clock)
    limit = mesh_module.MAX_ROOMS_PER_LINK
    many = [room_hash(f"room {i}") for i in range(limit + 1)]
    messages = b"".join(encode_control(Subscribe(many[i:i + 1024])) for i in range(0, limit + 1, 1024))
    with capturedLogs() as events:
        _pump, peer, _link = raw_peer_dials(r1.tls, r2, clock, HELLO + messages)
    assert peer.lost and r2.mesh.links == {}
    assert any(e.get("reason", "").endswith(f"more than {limit} rooms") for e in events)


def test_a_link_flooding_subscribe_is_closed(clock):
    r1, r2 = pair(clock)
    flood = encode_control(Subscribe([ROOM])) * (int(mesh_module.SUBSCRIPTION_BURST) + 1)
    with capturedLogs() as events:
        _pump, peer, _link = raw_peer_dials(r1.tls, r2, clock, HELLO + flood)
    assert peer.lost and r2.mesh.links == {}
    assert any("more often than" in e.get("reason", "") for e in events)
