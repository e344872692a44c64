"""
Local participants (L{fedserver_relay.participants.ParticipantPort}) on a
fake UDP transport: joining with the room's token, media in and out,
leaving, and forgetting the silent.
"""

from __future__ import annotations

from typing import Any, List, Tuple

import pytest
from twisted.internet.task import Clock

from fedserver_relay.fingerprint import short_id
from fedserver_relay.frames import MAX_PAYLOAD, room_hash
from fedserver_relay.participants import (
    ERROR,
    IDLE_AFTER,
    JOIN,
    JOINED,
    KEEPALIVE,
    LEAVE,
    MEDIA_OUT,
    VERSION,
    ParticipantPort,
    join_datagram,
    media_datagram,
)
from fedserver_relay.settings import Room
from tests.unit.relay_helpers import OURS, A, FakeLink, FakeUDP, frame, make_mesh_for

TOKEN = "s3cret-token-0123"
ALICE = ("192.0.2.1", 5000)
BOB = ("192.0.2.2", 5000)
CAROL = ("198.51.100.3", 6000)
STANDUP = room_hash("standup")


class FakeMesh:
    """Keeps what the port hands the mesh."""

    def __init__(self) -> None:
        self.media: List[Tuple[str, bytes, Any]] = []
        self.announced = 0

    def frame_from_participant(self, room: str, payload: bytes, participant: Any) -> None:
        self.media.append((room, payload, participant))

    def announce(self) -> None:
        self.announced += 1


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def port(clock):
    port = ParticipantPort([Room("standup", TOKEN), Room("retro", "another token of 16")], clock=clock)
    port.transport = FakeUDP()
    port.mesh = FakeMesh()
    port.startProtocol()
    yield port
    port.stopProtocol()


def sent(port: ParticipantPort) -> List[Tuple[bytes, Any]]:
    return port.transport.take()  # type: ignore[union-attr,no-any-return]


def error(reason: str) -> bytes:
    return bytes((VERSION, ERROR)) + reason.encode()


def joined(port: ParticipantPort, address: Any, room: str = "standup", token: str = TOKEN) -> None:
    port.datagramReceived(join_datagram(room, token), address)
    assert sent(port) == [(bytes((VERSION, JOINED)) + room_hash(room), address)]


# joining


def test_join_with_the_right_token(port):
    port.datagramReceived(join_datagram("standup", TOKEN), ALICE)
    assert sent(port) == [(bytes((VERSION, JOINED)) + STANDUP, ALICE)]
    assert port.count == 1 and port.rooms() == {STANDUP}
    assert port.mesh.announced == 1
    assert port.refused == 0


@pytest.mark.parametrize("room, token", [
    ("standup", "wrong token 0123456"), ("standup", TOKEN[:-1]), ("standup", TOKEN + "x"), ("standup", ""),
    ("retro", TOKEN), ("unknown", TOKEN), ("Standup", TOKEN),
])
def test_join_with_a_wrong_token_or_an_unknown_room(port, room, token):
    port.datagramReceived(join_datagram(room, token), ALICE)
    assert sent(port) == []  # ALICE has not joined: it is not answered
    assert port.count == 0 and port.rooms() == frozenset()
    assert port.mesh.announced == 0 and port.refused == 1


def test_a_refused_join_leaves_the_participant_where_it_was(port):
    joined(port, ALICE)
    port.datagramReceived(join_datagram("retro", "wrong token 0123456"), ALICE)
    assert sent(port) == [(error("unknown room or wrong token"), ALICE)]
    assert port.rooms() == {STANDUP}


def test_joining_another_room_leaves_the_first(port):
    joined(port, ALICE)
    joined(port, ALICE, "retro", "another token of 16")
    assert port.count == 1 and port.rooms() == {room_hash("retro")}
    assert port.mesh.announced == 2


@pytest.mark.parametrize("body, reason", [
    (b"", "malformed JOIN"),
    (b"\x08stand", "malformed JOIN"),
    (b"\x02\xff\xfe" + TOKEN.encode(), "malformed JOIN: not UTF-8"),
    (b"\x07standup\xff", "malformed JOIN: not UTF-8"),
])
def test_a_malformed_join(port, body, reason):
    port.datagramReceived(bytes((VERSION, JOIN)) + body, ALICE)
    assert sent(port) == [] and port.count == 0 and port.refused == 1
    # a participant is told
    joined(port, BOB)
    port.datagramReceived(bytes((VERSION, JOIN)) + body, BOB)
    assert sent(port) == [(error(reason), BOB)]
    assert port.rooms() == {STANDUP}


def test_join_datagram_checks_the_name():
    with pytest.raises(ValueError):
        join_datagram("", TOKEN)
    with pytest.raises(ValueError):
        join_datagram("x" * 256, TOKEN)


def test_participants_are_limited(port, monkeypatch):
    monkeypatch.setattr("fedserver_relay.participants.MAX_PARTICIPANTS", 1)
    joined(port, ALICE)
    port.datagramReceived(join_datagram("standup", TOKEN), BOB)
    assert sent(port) == [] and port.count == 1 and port.refused == 1
    # one already in may change rooms
    joined(port, ALICE, "retro", "another token of 16")


# media


def test_media_goes_to_the_mesh(port):
    joined(port, ALICE)
    port.datagramReceived(media_datagram(b"opus"), ALICE)
    assert port.mesh.media == [("standup", b"opus", ALICE)]
    assert sent(port) == []


def test_media_before_join(port):
    port.datagramReceived(media_datagram(b"opus"), ALICE)
    assert sent(port) == []
    assert port.mesh.media == [] and port.refused == 1


@pytest.mark.parametrize("size", [0, MAX_PAYLOAD + 1])
def test_media_of_a_bad_size(port, size):
    joined(port, ALICE)
    port.datagramReceived(media_datagram(b"x" * size), ALICE)
    assert sent(port) == [(error(f"media payloads have 1 to {MAX_PAYLOAD} bytes"), ALICE)]
    assert port.mesh.media == []


def test_the_largest_media(port):
    joined(port, ALICE)
    port.datagramReceived(media_datagram(b"x" * MAX_PAYLOAD), ALICE)
    assert len(port.mesh.media) == 1


def test_media_without_a_mesh_is_dropped(port):
    joined(port, ALICE)
    port.mesh = None
    port.datagramReceived(media_datagram(b"opus"), ALICE)
    assert sent(port) == []


@pytest.mark.parametrize("data", [b"", b"\x01", b"\x02\x02opus", b"\x00\x01"])
def test_datagrams_that_are_not_version_1_are_ignored(port, data):
    port.datagramReceived(data, ALICE)
    assert sent(port) == [] and port.refused == 1


def test_an_unknown_type(port):
    port.datagramReceived(bytes((VERSION, 0x42)), ALICE)
    assert sent(port) == [] and port.refused == 1
    joined(port, ALICE)
    port.datagramReceived(bytes((VERSION, 0x42)), ALICE)
    assert sent(port) == [(error("unknown datagram type 66"), ALICE)]


def test_an_address_that_has_not_joined_is_never_answered(port, clock):
    # its source may be forged: an answer would go to whoever the sender named
    for data in (join_datagram("standup", "wrong token 0123456"), join_datagram("nowhere", TOKEN),
                 bytes((VERSION, JOIN)), media_datagram(b"opus"), bytes((VERSION, 0x42)), b"\x02\x01"):
        port.datagramReceived(data, CAROL)
    assert sent(port) == []
    assert port.refused == 6 and port.count == 0


def test_refusals_are_logged_now_and_then_with_the_count(port, clock):
    from twisted.logger import capturedLogs

    from fedserver_relay.participants import LOG_EVERY

    with capturedLogs() as events:
        for i in range(50):
            port.datagramReceived(join_datagram("standup", f"wrong token {i:08}"), ("203.0.113.7", 1000 + i))
        clock.advance(LOG_EVERY)
        port.datagramReceived(media_datagram(b"opus"), ALICE)
    logged = [e for e in events if "refused a participant" in e["log_format"]]
    assert [(e["count"], e["address"], e["reason"]) for e in logged] == [
        (1, ("203.0.113.7", 1000), "unknown room or wrong token"),
        (51, ALICE, "join a room first"),
    ]
    assert port.refused == 51


# delivery


def test_deliver_sends_to_the_room_but_the_sender(port):
    joined(port, ALICE)
    joined(port, BOB)
    joined(port, CAROL, "retro", "another token of 16")
    media = frame(A, payload=b"media", room=STANDUP)
    assert port.deliver(media, exclude=ALICE) == 1
    assert sent(port) == [(bytes((VERSION, MEDIA_OUT)) + short_id(A) + b"media", BOB)]
    assert port.deliver(media) == 2
    assert sorted(address for _, address in sent(port)) == [ALICE, BOB]
    assert port.deliver(frame(A, room=room_hash("empty"))) == 0
    assert sent(port) == []


def test_with_the_real_mesh_the_sender_hears_nothing_back(clock):
    port = ParticipantPort([Room("standup", TOKEN)], clock=clock)
    port.transport = FakeUDP()
    mesh = make_mesh_for(port, clock)
    port.mesh = mesh
    link = FakeLink(A)
    mesh.link_up(link)
    joined(port, ALICE)
    joined(port, BOB)
    # the link was asked for the room when the first participant joined
    assert link.subscribed_rooms() == {STANDUP}
    mesh.subscribe(link, [STANDUP], True)
    port.datagramReceived(media_datagram(b"hello"), ALICE)
    assert sent(port) == [(bytes((VERSION, MEDIA_OUT)) + short_id(OURS) + b"hello", BOB)]
    assert [f.payload for f in link.frames] == [b"hello"]
    assert mesh.counters.delivered == 1 and mesh.counters.originated == 1


# leaving and forgetting


def test_leave(port):
    joined(port, ALICE)
    joined(port, BOB)
    port.datagramReceived(bytes((VERSION, LEAVE)), ALICE)
    assert port.count == 1 and port.rooms() == {STANDUP}
    port.datagramReceived(bytes((VERSION, LEAVE)), BOB)
    assert port.count == 0 and port.rooms() == frozenset()
    assert port.mesh.announced == 4
    # leaving again, or never having joined, changes nothing
    port.datagramReceived(bytes((VERSION, LEAVE)), BOB)
    assert port.mesh.announced == 4 and sent(port) == []
    # one that left is not answered any more
    port.datagramReceived(media_datagram(b"opus"), ALICE)
    assert sent(port) == [] and port.refused == 1


def test_the_silent_are_forgotten(port, clock):
    joined(port, ALICE)
    joined(port, BOB)
    announced = port.mesh.announced
    for _ in range(5):
        clock.advance(IDLE_AFTER / 4)
        port.datagramReceived(bytes((VERSION, KEEPALIVE)), BOB)
    # the sweep runs every IDLE_AFTER / 4 seconds
    assert port.count == 1 and port.mesh.announced == announced + 1
    assert port.deliver(frame(A, room=STANDUP)) == 1
    assert [address for _, address in sent(port)] == [BOB]
    clock.advance(IDLE_AFTER + IDLE_AFTER / 4)
    assert port.count == 0 and port.rooms() == frozenset()
    assert port.mesh.announced == announced + 2


def test_media_and_joins_count_as_signs_of_life(port, clock):
    joined(port, ALICE)
    for _ in range(8):
        clock.advance(IDLE_AFTER / 4)
        port.datagramReceived(media_datagram(b"x"), ALICE)
    assert port.count == 1


def test_a_sweep_that_forgets_nobody_announces_nothing(port, clock):
    joined(port, ALICE)
    announced = port.mesh.announced
    clock.advance(IDLE_AFTER / 4)
    assert port.mesh.announced == announced


def test_stopping_stops_the_sweep(clock):
    port = ParticipantPort([Room("standup", TOKEN)], clock=clock)
    port.startProtocol()
    assert clock.getDelayedCalls()
    port.stopProtocol()
    assert clock.getDelayedCalls() == []
    port.stopProtocol()


def test_nothing_is_sent_without_a_transport(clock):
    port = ParticipantPort([Room("standup", TOKEN)], clock=clock)
    port.datagramReceived(join_datagram("standup", TOKEN), ALICE)
    assert port.count == 1
