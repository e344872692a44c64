"""
What bounds the work and memory a linked relay can cause
(L{fedserver_relay.mesh.RelayMesh}): rooms and Subscribe messages per link,
announcements that look only at what changed and keep to the limits we
enforce ourselves, the per-link frame rate, rate-limit buckets forgotten
least recently used first, a duplicate filter marked only by accepted
frames, and frames for a backed-up link counted as C{congested}.

The relays: OURS; A in peers (no delegation); B trusted with delegate =
true; C trusted without; D and E unknown.
"""

from __future__ import annotations

from typing import Any, List

import pytest
from twisted.internet.task import Clock
from twisted.logger import capturedLogs

import fedserver_relay.mesh as mesh_module
from fedserver_relay.control import Subscribe, Unsubscribe
from fedserver_relay.frames import room_hash
from fedserver_relay.mesh import RelayMesh
from tests.unit.relay_helpers import OTHER_ROOM, OURS, ROOM, A, B, C, FakeLink, FakeParticipants, frame, policy


def make_mesh(clock: Any = None, *, participants: Any = None, rate: int = 1000, **more: Any) -> RelayMesh:
    return RelayMesh(OURS, policy(), max_hops=2, room_rate_limit=rate, clock=clock or Clock(),
                     participants=participants, **more)


def rooms(count: int, prefix: str = "room") -> List[bytes]:
    return [room_hash(f"{prefix} {i}") for i in range(count)]


def up(mesh: RelayMesh, *fingerprints: str) -> List[FakeLink]:
    links = [FakeLink(fp) for fp in fingerprints]
    for link in links:
        mesh.link_up(link)
    for link in links:
        link.take_controls()
    return links


def subscribe_messages(link: FakeLink) -> List[Any]:
    return [m for m in link.controls if isinstance(m, (Subscribe, Unsubscribe))]


# rooms per link


def test_a_link_may_subscribe_to_so_many_rooms():
    mesh = make_mesh()
    a, _b = up(mesh, A, B)
    limit = mesh_module.MAX_ROOMS_PER_LINK
    assert limit == 4096
    many = rooms(limit + 1)
    assert mesh.subscribe(a, many[:limit], True) is None
    # the same rooms again, or fewer, are fine
    assert mesh.subscribe(a, many[:10], True) is None
    reason = mesh.subscribe(a, many[limit:], True)
    assert reason is not None and f"more than {limit} rooms" in reason
    # refused as a whole: nothing of that Subscribe counts
    assert len(mesh.subscriptions[A]) == limit and many[limit] not in mesh.subscriptions[A]
    # and a room given up makes space for another
    assert mesh.subscribe(a, many[:1], False) is None
    assert mesh.subscribe(a, many[limit:], True) is None


def test_subscribe_and_unsubscribe_are_rate_limited_per_link():
    clock = Clock()
    mesh = make_mesh(clock)
    a, b = up(mesh, A, B)
    burst, rate = mesh_module.SUBSCRIPTION_BURST, mesh_module.SUBSCRIPTION_RATE
    assert (rate, burst) == (10, 20)
    answers = [mesh.subscribe(a, [ROOM], i % 2 == 0) for i in range(int(burst))]
    assert answers == [None] * int(burst)
    reason = mesh.subscribe(a, [ROOM], True)
    assert reason is not None and "more often than 10 a second" in reason
    # another link has its own allowance
    assert mesh.subscribe(b, [ROOM], True) is None
    # and the allowance comes back at `rate` a second
    clock.advance(1 / rate)
    assert mesh.subscribe(a, [ROOM], True) is None
    assert mesh.subscribe(a, [ROOM], True) is not None


def test_a_link_that_is_not_in_the_mesh_changes_nothing():
    mesh = make_mesh()
    (b,) = up(mesh, B)
    stranger = FakeLink(A)
    assert mesh.subscribe(stranger, [ROOM], True) is None
    assert mesh.subscriptions == {B: set()} and b.controls == []
    # nor does an old link to a relay whose new link replaced it
    old = FakeLink(B)
    assert mesh.subscribe(old, [ROOM], True) is None
    assert mesh.subscriptions == {B: set()}


# announcements


def test_announcing_looks_only_at_the_rooms_that_changed():
    # 60 links with 60 rooms each: every Subscribe used to recompute, for every link, the union of every
    # other link's rooms (some 200,000 set operations each time)
    clock = Clock()
    mesh = make_mesh(clock)
    fingerprints = [f"{i:064x}" for i in range(60)]
    links = up(mesh, *fingerprints)
    for i, link in enumerate(links):
        assert mesh.subscribe(link, rooms(60, f"link {i}"), True) is None
    clock.advance(10)
    before = {link.fingerprint: len(link.controls) for link in links}
    for round_ in range(2):
        for i, link in enumerate(links):
            assert mesh.subscribe(link, [room_hash(f"new {round_} {i}")], True) is None
    clock.advance(10)
    # only the new rooms were announced: every message sent since carries rooms that changed
    new = {room_hash(f"new {r} {i}") for r in range(2) for i in range(60)}
    for link in links:
        for message in link.controls[before[link.fingerprint]:]:
            assert set(getattr(message, "room_hashes", ())) <= new
    # each link was asked for every other link's rooms, not for its own
    for i, link in enumerate(links):
        asked = link.subscribed_rooms()
        assert len(asked) == 59 * 62
        assert room_hash(f"new 1 {(i + 1) % 60}") in asked and room_hash(f"new 1 {i}") not in asked


def test_we_ask_a_link_for_no_more_rooms_than_it_may_subscribe_to():
    clock = Clock()
    limit = mesh_module.MAX_ROOMS_PER_LINK
    participants = FakeParticipants({room: 1 for room in rooms(limit + 100)})
    mesh = make_mesh(clock, participants=participants)
    with capturedLogs() as events:
        a = FakeLink(A)
        mesh.link_up(a)
    assert len(a.subscribed_rooms()) == limit
    assert any("more rooms from" in e["log_format"] for e in events)
    # when rooms go, the held ones are asked for
    gone = sorted(a.subscribed_rooms())[:150]
    for room in gone:
        participants.members[room] = 0
    mesh.announce()
    clock.advance(5)
    assert a.subscribed_rooms() == participants.rooms()
    assert len(a.subscribed_rooms()) == limit - 50


def test_we_send_subscribe_messages_no_faster_than_we_accept_them():
    clock = Clock()
    participants = FakeParticipants()
    mesh = make_mesh(clock, participants=participants)
    a, b = up(mesh, A, B)
    # 50 rooms join one by one, at once: a relay like us would close the link if each were a message
    for room in rooms(50):
        participants.members[room] = 1
        mesh.announce()
    burst = int(mesh_module.ANNOUNCE_BURST)
    assert burst <= mesh_module.SUBSCRIPTION_BURST / 2
    assert len(subscribe_messages(a)) == burst
    # the rest follow, together, when the next message may go
    clock.advance(1 / mesh_module.ANNOUNCE_RATE)
    assert len(subscribe_messages(a)) == burst + 1
    for link in (a, b):
        assert link.subscribed_rooms() == participants.rooms()
    # a receiving mesh would have accepted every message
    receiver = make_mesh(Clock())
    (ours,) = up(receiver, A)
    for message in a.controls:
        assert receiver.subscribe(ours, message.room_hashes, isinstance(message, Subscribe)) is None


def test_the_announcement_timer_goes_with_the_last_link():
    clock = Clock()
    participants = FakeParticipants()
    mesh = make_mesh(clock, participants=participants)
    (a,) = up(mesh, A)
    for room in rooms(30):
        participants.members[room] = 1
        mesh.announce()
    assert clock.getDelayedCalls()
    mesh.link_down(a)
    assert clock.getDelayedCalls() == []


# frames per link


def test_each_link_has_its_own_frame_rate_limit():
    clock = Clock()
    mesh = make_mesh(clock, link_rate_limit=3)
    a, c = up(mesh, A, C)
    # different rooms, so the rooms' limit is not what stops them
    results = [mesh.frame_from_link(a, frame(A, packet_id=i, room=room)) for i, room in enumerate(rooms(5))]
    assert results == [True, True, True, False, False]
    assert mesh.counters.dropped["rate-limited"] == {"Relay A": 2}
    assert mesh.frame_from_link(c, frame(C, packet_id=1))
    clock.advance(1)
    assert mesh.frame_from_link(a, frame(A, packet_id=10))


def test_the_link_rate_limit_comes_before_the_duplicate_filter():
    mesh = make_mesh(link_rate_limit=1)
    a, b = up(mesh, A, B)
    assert mesh.frame_from_link(a, frame(A, packet_id=1))
    # over a's limit: a frame naming A's origin with B's next id must not keep B's copy out
    assert not mesh.frame_from_link(a, frame(A, packet_id=2))
    assert mesh.frame_from_link(b, frame(A, packet_id=2))


def test_a_rate_limited_frame_does_not_keep_the_genuine_one_out():
    # a frame over the room's limit used to be remembered by the duplicate filter all the same
    clock = Clock()
    mesh = make_mesh(clock, rate=1)
    a, c = up(mesh, A, C)
    assert mesh.frame_from_link(a, frame(A, packet_id=1))
    # C (trusted, no delegate) names A as the origin, with the id A's next frame has: rate-limited
    assert not mesh.frame_from_link(c, frame(A, packet_id=2))
    assert mesh.counters.dropped["rate-limited"] == {"Relay C": 1}
    clock.advance(1)
    assert mesh.frame_from_link(a, frame(A, packet_id=2))
    assert mesh.counters.dropped["duplicate"] == {}


def test_room_buckets_are_forgotten_least_recently_used_first(monkeypatch):
    # going over the bound used to forget every room's bucket at once, refilling the busy rooms too
    monkeypatch.setattr(mesh_module, "MAX_ROOM_BUCKETS", 3)
    clock = Clock()
    mesh = make_mesh(clock, rate=2)
    (a,) = up(mesh, A)
    busy = ROOM
    ids = iter(range(1000))
    assert mesh.frame_from_link(a, frame(A, packet_id=next(ids), room=busy))
    assert mesh.frame_from_link(a, frame(A, packet_id=next(ids), room=busy))
    for room in rooms(10, "one-off"):
        assert mesh.frame_from_link(a, frame(A, packet_id=next(ids), room=room))
        # the busy room stays over its limit: its bucket is used, so never the least recently used
        assert not mesh.frame_from_link(a, frame(A, packet_id=next(ids), room=busy))
    assert len(mesh._buckets) == 3


def test_the_link_rate_limit_is_a_setting():
    from fedserver_relay.settings import read_settings
    from tests.unit.helpers import options_for

    assert read_settings(options_for("relay", {"listen": "tcp:7443"}), OURS).link_rate_limit == 10_000
    read = read_settings(options_for("relay", {"listen": "tcp:7443", "link_rate_limit": 50}), OURS)
    assert read.link_rate_limit == 50
    from fedserver.errors import ConfigError

    for bad in (0, 1_000_001, "fast"):
        with pytest.raises(ConfigError, match="link_rate_limit"):
            read_settings(options_for("relay", {"listen": "tcp:7443", "link_rate_limit": bad}), OURS)


# congestion


def test_a_frame_for_a_backed_up_link_is_counted_as_congested():
    participants = FakeParticipants({ROOM: 1})
    mesh = make_mesh(participants=participants)
    a, b, c = up(mesh, A, B, C)
    for link in (b, c):
        mesh.subscribe(link, [ROOM], True)
    b.congested = True
    with capturedLogs() as events:
        assert mesh.frame_from_link(a, frame(A, packet_id=1))
        assert mesh.frame_from_participant("standup", b"ours", None) is not None
    assert b.frames == [] and len(c.frames) == 2
    assert mesh.counters.dropped["congested"] == {"Relay B": 2}
    assert mesh.counters.forwarded == 2
    (logged,) = [e for e in events if e["log_format"].startswith("dropped a frame")]
    assert logged["direction"] == "for" and logged["label"] == "Relay B"
    assert "congested" in mesh_module.DROP_REASONS


def test_other_room_subscribers_are_untouched_by_congestion():
    mesh = make_mesh()
    a, b = up(mesh, A, B)
    mesh.subscribe(b, [OTHER_ROOM], True)
    b.congested = True
    assert mesh.frame_from_link(a, frame(A, packet_id=1))
    assert mesh.counters.dropped["congested"] == {}
