"""
Relay links (L{fedserver_relay.link}) between relays with real certificates,
over an in-memory TLS pump: the fingerprint check in the handshake, the
hello, control messages, keepalives and timeouts, sealed UDP beside the
stream, and the rule for two links to one relay.
"""

from __future__ import annotations

from typing import Any, Tuple

import pytest
from OpenSSL import SSL
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import capturedLogs

from fedserver_relay.control import (
    PROTOCOL_VERSIONS,
    Hello,
    Media,
    Ping,
    Pong,
    Subscribe,
    TrustChain,
    UdpAck,
    encode_control,
)
from fedserver_relay.datagram import LinkKeys, encode_probe
from fedserver_relay.fingerprint import short_id
from fedserver_relay.frames import Frame, encode_frame, room_hash
from fedserver_relay.link import HELLO_TIMEOUT, IDLE_TIMEOUT, PING_EVERY, PROBE_EVERY, PROBES, certificate_fingerprint
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


@pytest.fixture
def clock():
    return MemoryReactorClock()


def pair(clock: Any, *, udp: bool = False, participants: Any = None, **trust: Any) -> Tuple[Relay, Relay]:
    """Relay 1 (which dials) and relay 2; 2 trusts 1 unless told otherwise."""
    m1, m2 = material("r1"), material("r2")
    fp1, fp2 = certificate_fingerprint(m1.leaf), certificate_fingerprint(m2.leaf)
    r1 = make_relay("r1", clock, tls=m1, peers=[(fp2, "R2")], udp_port=7601 if udp else 0)
    r2 = make_relay("r2", clock, tls=m2, trusted=trust.get("trusted", [(fp1, "R1", False)]),
                    udp_port=7602 if udp else 0, participants=participants)
    if udp:
        r1.router.transport = FakeUDP()
        r2.router.transport = FakeUDP()
    return r1, r2


HELLO = encode_control(Hello(PROTOCOL_VERSIONS, "raw", 0, 2))


# the handshake


def test_a_link_between_relays_that_know_each_other(clock):
    r1, r2 = pair(clock)
    link = connect(r1, r2, clock)
    assert link.client.fingerprint == r2.fingerprint
    assert link.server.fingerprint == r1.fingerprint
    assert r1.mesh.links == {r2.fingerprint: link.client}
    assert r2.mesh.links == {r1.fingerprint: link.server}
    assert link.client.hello == Hello(PROTOCOL_VERSIONS, "r2", 0, 2)
    assert link.server.hello == Hello(PROTOCOL_VERSIONS, "r1", 0, 2)
    assert r1.tls.refusals == r2.tls.refusals == {}
    assert r1.links.open == {link.client} and r2.links.open == {link.server}


def test_the_tls_is_1_3_without_resumption(clock):
    r1, r2 = pair(clock)
    link = connect(r1, r2, clock)
    handle = link.client_tls.getHandle()
    assert handle.get_protocol_version_name() == "TLSv1.3"
    assert handle.get_context().get_session_cache_mode() == SSL.SESS_CACHE_OFF
    assert link.client.keys is not None and link.client.keys.send_key == link.server.keys.receive_key


def test_a_relay_in_neither_list_is_refused_in_the_handshake(clock):
    r1, r2 = pair(clock, trusted=[])
    with capturedLogs() as events:
        link = connect(r1, r2, clock)
        connect(r1, r2, clock)
    assert r2.tls.refusals == {r1.fingerprint: 2}
    assert r1.mesh.links == r2.mesh.links == {}
    assert link.client.hello is None and link.server.fingerprint == ""
    assert link.client_tls.disconnected or link.pump.clientIO.disconnected
    # logged once, not for every attempt
    refusals = [e for e in events if "refused a relay link" in e["log_format"]]
    assert [(e["fp"], e["count"]) for e in refusals] == [(r1.fingerprint, 1)]
    assert r1.links.open == r2.links.open == set()


def test_a_dialled_relay_must_present_the_configured_certificate(clock):
    r1, r2 = pair(clock)
    someone_else = certificate_fingerprint(material("r3").leaf)
    connect(r1, r2, clock, expected=someone_else)
    assert r1.tls.refusals == {r2.fingerprint: 1}
    assert r2.tls.refusals == {}
    assert r1.mesh.links == r2.mesh.links == {}


def test_a_dialled_relay_is_refused_even_when_trusted_otherwise(clock):
    # the client settings accept the expected fingerprint only, not the whole policy
    m3 = material("r3")
    r1, r2 = pair(clock)
    r1 = make_relay("r1", clock, tls=r1.material, peers=[(r2.fingerprint, "R2"),
                                                          (certificate_fingerprint(m3.leaf), "R3")])
    r3 = make_relay("r3", clock, tls=m3, trusted=[(r1.fingerprint, "R1", False)])
    connect(r1, r3, clock, expected=r2.fingerprint)
    assert r1.tls.refusals == {r3.fingerprint: 1}
    assert r1.mesh.links == {}


# the hello


def test_the_hello_exchange_joins_the_mesh_and_announces(clock):
    participants = FakeParticipants({ROOM: 1})
    r1, r2 = pair(clock, participants=participants)
    link = connect(r1, r2, clock)
    # relay 2 asked relay 1 for the room of its participants, over the link
    assert r1.mesh.subscriptions == {r2.fingerprint: {ROOM}}
    assert r2.mesh.subscriptions == {r1.fingerprint: set()}
    assert link.client.hello is not None and link.server.hello is not None


def test_the_first_message_must_be_hello(clock):
    r1, r2 = pair(clock)
    with capturedLogs() as events:
        _pump, peer, link = raw_peer_dials(r1.tls, r2, clock, encode_control(Ping(b"12345678")))
    assert peer.lost and link.hello is None
    assert r2.mesh.links == {}
    assert any("not Hello" in e["log_format"] for e in events)
    assert all(isinstance(m, Hello) for m in peer.received)


def test_nothing_after_a_refused_first_message_counts(clock):
    r1, r2 = pair(clock)
    _pump, peer, link = raw_peer_dials(r1.tls, r2, clock, encode_control(Ping(b"12345678")) + HELLO)
    assert peer.lost and link.hello is None
    assert r2.mesh.links == {}
    assert all(isinstance(m, Hello) for m in peer.received)


def test_a_second_hello_closes(clock):
    r1, r2 = pair(clock)
    pump, peer, link = raw_peer_dials(r1.tls, r2, clock, HELLO)
    assert r2.mesh.links == {r1.fingerprint: link}
    peer.transport.write(HELLO)
    pump.flush()
    assert peer.lost and r2.mesh.links == {}


def test_no_common_protocol_version_closes(clock):
    r1, r2 = pair(clock)
    hello = encode_control(Hello(frozenset({7, 9}), "future", 0, 2))
    _pump, peer, _link = raw_peer_dials(r1.tls, r2, clock, hello)
    assert peer.lost and r2.mesh.links == {}


def test_a_malformed_control_message_closes_and_counts(clock):
    r1, r2 = pair(clock)
    pump, peer, link = raw_peer_dials(r1.tls, r2, clock, HELLO)
    assert r2.mesh.links == {r1.fingerprint: link}
    with capturedLogs() as events:
        peer.transport.write(b"\x00\x00\x00\x03\x01\x63\x00")  # type 99
        pump.flush()
    assert peer.lost and r2.mesh.links == {}
    assert r2.mesh.counters.dropped["malformed"] == {"R1": 1}
    assert any("malformed control message" in e["log_format"] for e in events)


def test_a_malformed_message_before_the_hello_closes_too(clock):
    r1, r2 = pair(clock)
    _pump, peer, link = raw_peer_dials(r1.tls, r2, clock, b"\xff\xff\xff\xff")
    assert peer.lost and link.hello is None
    assert r2.mesh.counters.dropped["malformed"] == {"R1": 1}


def test_ping_is_answered_with_pong(clock):
    r1, r2 = pair(clock)
    _pump, peer, _link = raw_peer_dials(r1.tls, r2, clock, HELLO + encode_control(Ping(b"abcdefgh")))
    assert Pong(b"abcdefgh") in peer.received
    assert not peer.lost


def test_media_on_the_stream_reaches_the_mesh(clock):
    participants = FakeParticipants({ROOM: 1})
    r1, r2 = pair(clock, participants=participants)
    frame = Frame(ROOM, short_id(r1.fingerprint), 2, 1, b"media")
    _pump, _peer, _link = raw_peer_dials(r1.tls, r2, clock, HELLO + encode_control(Media(frame)))
    assert participants.delivered == [(frame, None)]
    assert r2.mesh.counters.accepted == {"R1": 1}


def test_subscriptions_and_trust_chains_reach_the_mesh(clock):
    r1, r2 = pair(clock, trusted=[])
    r2 = make_relay("r2", clock, tls=r2.material, trusted=[(r1.fingerprint, "R1", True)])
    other = certificate_fingerprint(material("r3").leaf)
    _pump, _peer, _link = raw_peer_dials(
        r1.tls, r2, clock, HELLO + encode_control(Subscribe([ROOM])) + encode_control(TrustChain([other]))
    )
    assert r2.mesh.subscriptions == {r1.fingerprint: {ROOM}}
    assert r2.mesh.vouched == {r1.fingerprint: frozenset({short_id(other)})}


# keepalive and timeouts


def test_links_ping_each_other_and_stay_up(clock):
    r1, r2 = pair(clock)
    link = connect(r1, r2, clock)
    for _ in range(10):
        clock.advance(PING_EVERY)
        link.pump.flush()
    assert r1.mesh.links == {r2.fingerprint: link.client}
    assert r2.mesh.links == {r1.fingerprint: link.server}


def test_a_silent_link_is_closed(clock):
    r1, r2 = pair(clock)
    pump, peer, link = raw_peer_dials(r1.tls, r2, clock, HELLO)
    for _ in range(int(IDLE_TIMEOUT) - 1):
        clock.advance(1)
        pump.flush()
    # it was pinged, and got no answer
    assert [type(m) for m in peer.received].count(Ping) == int((IDLE_TIMEOUT - 1) // PING_EVERY)
    assert r2.mesh.links == {r1.fingerprint: link} and not peer.lost
    clock.advance(1)
    pump.flush()
    assert peer.lost and r2.mesh.links == {}
    assert clock.getDelayedCalls() == []


def test_data_keeps_a_link_alive(clock):
    r1, r2 = pair(clock)
    pump, peer, _link = raw_peer_dials(r1.tls, r2, clock, HELLO)
    for _ in range(5):
        clock.advance(IDLE_TIMEOUT - 1)
        peer.transport.write(encode_control(Pong(b"12345678")))
        pump.flush()
    assert not peer.lost


def test_a_link_without_a_hello_is_closed_sooner(clock):
    r1, r2 = pair(clock)
    pump, peer, _link = raw_peer_dials(r1.tls, r2, clock)
    assert peer.handshake_done and not peer.lost
    clock.advance(HELLO_TIMEOUT)
    pump.flush()
    assert peer.lost and r2.mesh.links == {}


# UDP beside the stream


def udp_pair(clock: Any) -> Tuple[Relay, Relay, Any, FakeParticipants]:
    participants = FakeParticipants({ROOM: 1})
    r1, r2 = pair(clock, udp=True, participants=participants)
    link = connect(r1, r2, clock)
    return r1, r2, link, participants


def test_the_hello_names_the_udp_port(clock):
    _r1, _r2, link, _ = udp_pair(clock)
    assert (link.client.hello.udp_port, link.server.hello.udp_port) == (7602, 7601)
    # the peer's address from the TCP connection, its port from the hello
    assert link.client.udp_address == ("10.0.0.2", 7602)
    assert link.server.udp_address == ("10.0.0.1", 7601)


def test_a_probe_is_acknowledged_and_frames_then_go_sealed_over_udp(clock):
    r1, r2, link, participants = udp_pair(clock)
    # each side sent a probe at once
    (probe, address), = r1.router.transport.take()
    assert address == ("10.0.0.2", 7602)
    assert not link.client.udp_confirmed
    r2.router.datagramReceived(probe, ("10.0.0.1", 7601))
    link.pump.flush()
    assert link.client.udp_confirmed and not link.server.udp_confirmed
    # no more probes from relay 1
    clock.advance(PROBE_EVERY * 3)
    assert r1.router.transport.take() == []
    # relay 2 wants the room: relay 1's participant media goes over UDP, sealed
    sent = r1.mesh.frame_from_participant("standup", b"media", ("192.0.2.1", 5000))
    link.pump.flush()
    assert participants.delivered == []
    (datagram, address), = r1.router.transport.take()
    assert address == ("10.0.0.2", 7602)
    assert encode_frame(sent) not in datagram
    r2.router.datagramReceived(datagram, ("10.0.0.1", 7601))
    assert participants.delivered == [(sent, None)]
    assert r2.mesh.counters.accepted == {"R1": 1}
    # the same datagram again is a replay
    r2.router.datagramReceived(datagram, ("10.0.0.1", 7601))
    assert r2.mesh.counters.dropped["replayed"] == {"R1": 1}
    # a forged one does not open, and does not keep the genuine one out
    second = r1.mesh.frame_from_participant("standup", b"more", ("192.0.2.1", 5000))
    (datagram, _), = r1.router.transport.take()
    for i in (0, 5, 12, len(datagram) - 1):
        forged = datagram[:i] + bytes((datagram[i] ^ 1,)) + datagram[i + 1:]
        r2.router.datagramReceived(forged, ("203.0.113.9", 9999))
    assert r2.mesh.counters.dropped["malformed"] == {"R1": 2}  # (bytes 0 and 5 are the version and link id)
    assert r2.router.unknown == 2
    r2.router.datagramReceived(datagram, ("203.0.113.9", 9999))
    assert participants.delivered == [(sent, None), (second, None)]
    # only an authentic copy counts as a replay: a forgery with an old sequence number is malformed
    r2.router.datagramReceived(datagram[:9] + bytes(8) + datagram[17:], ("10.0.0.1", 7601))
    assert r2.mesh.counters.dropped["replayed"] == {"R1": 1}
    assert r2.mesh.counters.dropped["malformed"] == {"R1": 3}
    r2.router.datagramReceived(datagram, ("10.0.0.1", 7601))
    assert r2.mesh.counters.dropped["replayed"] == {"R1": 2}


def test_frames_use_the_stream_until_udp_is_confirmed(clock):
    r1, _r2, link, participants = udp_pair(clock)
    r1.router.transport.take()
    sent = r1.mesh.frame_from_participant("standup", b"media", ("192.0.2.1", 5000))
    link.pump.flush()
    assert participants.delivered == [(sent, None)]
    assert r1.router.transport.take() == []


def test_unanswered_probes_stop(clock):
    r1, _r2, link, _ = udp_pair(clock)
    for _ in range(PROBES + 3):
        clock.advance(PROBE_EVERY)
    assert len(r1.router.transport.take()) == PROBES
    assert not link.client.udp_confirmed


def test_a_datagram_for_no_link_is_ignored(clock):
    _r1, r2, link, _participants = udp_pair(clock)
    r2.router.transport.take()
    keys = LinkKeys(b"k" * 32, b"k" * 32, b"unknown!", b"unknown!")
    datagram = keys.sealer().seal(encode_probe(b"12345678"))
    with capturedLogs() as events:
        r2.router.datagramReceived(datagram, ("10.0.0.1", 7601))
        r2.router.datagramReceived(b"\x01garbage", ("10.0.0.1", 7601))
    link.pump.flush()
    assert r2.router.unknown == 2
    assert r2.router.transport.take() == [] and events == []
    assert all(not by_peer for by_peer in r2.mesh.counters.dropped.values())


def test_a_sealed_datagram_that_is_no_frame_is_malformed(clock):
    _r1, r2, link, _participants = udp_pair(clock)
    datagram = link.client.sealer.seal(b"\x01not a frame")
    r2.router.datagramReceived(datagram, ("10.0.0.1", 7601))
    assert r2.mesh.counters.dropped["malformed"] == {"R1": 1}


def test_a_malformed_probe(clock):
    _r1, r2, link, _participants = udp_pair(clock)
    datagram = link.client.sealer.seal(encode_probe(b"12345678") + b"x")
    r2.router.datagramReceived(datagram, ("10.0.0.1", 7601))
    assert r2.mesh.counters.dropped["malformed"] == {"R1": 1}


def test_an_ack_with_another_nonce_confirms_nothing(clock):
    _r1, _r2, link, _ = udp_pair(clock)
    link.server.send_control(UdpAck(b"notmine!"))
    link.pump.flush()
    assert not link.client.udp_confirmed


def test_a_closed_link_leaves_the_router(clock):
    r1, r2, link, _ = udp_pair(clock)
    assert r2.router.links == {link.server.keys.receive_link_id: link.server}
    link.server_tls.loseConnection()
    link.pump.flush()
    assert r2.router.links == {} and r1.router.links == {}
    assert r1.mesh.links == r2.mesh.links == {}
    assert r1.links.open == r2.links.open == set()


def test_without_a_udp_port_nothing_is_probed(clock):
    r1, r2 = pair(clock)
    r1.router.transport = FakeUDP()
    link = connect(r1, r2, clock)
    clock.advance(PROBE_EVERY * 2)
    assert r1.router.transport.take() == [] and link.client.udp_address is None


# two links to one relay


def both_ways(clock: Any) -> Tuple[Relay, Relay]:
    m1, m2 = material("r1"), material("r2")
    fp1, fp2 = certificate_fingerprint(m1.leaf), certificate_fingerprint(m2.leaf)
    r1 = make_relay("r1", clock, tls=m1, peers=[(fp2, "R2")])
    r2 = make_relay("r2", clock, tls=m2, peers=[(fp1, "R1")])
    return r1, r2


@pytest.mark.parametrize("smaller_first", [True, False])
def test_of_two_links_the_one_dialled_by_the_smaller_fingerprint_stays(clock, smaller_first):
    r1, r2 = both_ways(clock)
    small, large = (r1, r2) if r1.fingerprint < r2.fingerprint else (r2, r1)
    order = [(small, large), (large, small)] if smaller_first else [(large, small), (small, large)]
    first = connect(*order[0], clock)
    second = connect(*order[1], clock)
    first.pump.flush()
    second.pump.flush()
    keep, drop = (first, second) if smaller_first else (second, first)
    assert small.mesh.links == {large.fingerprint: keep.client}
    assert large.mesh.links == {small.fingerprint: keep.server}
    assert small.links.open == {keep.client} and large.links.open == {keep.server}
    assert drop.pump.clientIO.disconnected and drop.pump.serverIO.disconnected
    # the link that stays works
    for _ in range(4):
        clock.advance(PING_EVERY)
        keep.pump.flush()
    assert small.mesh.links == {large.fingerprint: keep.client}


def test_the_link_that_stays_carries_the_subscriptions(clock):
    m1, m2 = material("r1"), material("r2")
    fp1, fp2 = certificate_fingerprint(m1.leaf), certificate_fingerprint(m2.leaf)
    p1, p2 = FakeParticipants({ROOM: 1}), FakeParticipants({room_hash("retro"): 1})
    r1 = make_relay("r1", clock, tls=m1, peers=[(fp2, "R2")], participants=p1)
    r2 = make_relay("r2", clock, tls=m2, peers=[(fp1, "R1")], participants=p2)
    small, large = (r1, r2) if fp1 < fp2 else (r2, r1)
    # the losing link first, then the one that stays
    connect(large, small, clock)
    connect(small, large, clock)
    assert r1.mesh.subscriptions == {fp2: {room_hash("retro")}}
    assert r2.mesh.subscriptions == {fp1: {ROOM}}


def test_a_relay_that_dials_again_replaces_its_old_link(clock):
    # the relay with the larger fingerprint dials the smaller one, which does not dial back; its first link went
    # dead without the smaller relay noticing (no FIN), and it dials again: the new link must not wait for the
    # old one's idle timeout
    r1, r2 = both_ways(clock)
    small, large = (r1, r2) if r1.fingerprint < r2.fingerprint else (r2, r1)
    old = connect(large, small, clock)
    old.client._t.loseConnection = lambda: None  # the dialler's side of the old link is gone already
    large.mesh.link_down(old.client)
    new = connect(large, small, clock)
    assert small.mesh.links == {large.fingerprint: new.server}
    assert large.mesh.links == {small.fingerprint: new.client}
    old.pump.flush()
    assert old.server not in small.links.open


def test_nothing_on_a_refused_second_link_counts(clock):
    r1, r2 = both_ways(clock)
    small, large = (r1, r2) if r1.fingerprint < r2.fingerprint else (r2, r1)
    keep = connect(small, large, clock)
    other = certificate_fingerprint(material("r3").leaf)
    # the larger relay dials too (its link loses) and says more in the same breath
    _, peer, refused = raw_peer_dials(
        large.tls, small, clock,
        HELLO + encode_control(Subscribe([ROOM])) + encode_control(TrustChain([other]))
        + encode_control(Ping(b"12345678")),
    )
    assert peer.lost and refused not in small.links.open
    assert small.mesh.links == {large.fingerprint: keep.client}
    assert small.mesh.subscriptions == {large.fingerprint: set()}
    assert Pong(b"12345678") not in peer.received
