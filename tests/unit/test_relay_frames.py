"""Tests for fedserver_relay.frames, the media frame and duplicate suppression."""

from __future__ import annotations

import hashlib

import attrs
import pytest
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.task import Clock

from fedserver_relay import datagram
from fedserver_relay.frames import (
    DEFAULT_TTL,
    FRAME_HEADER_SIZE,
    FRAME_VERSION,
    IP_UDP_OVERHEAD,
    IPV6_MIN_MTU,
    MAX_FRAME_SIZE,
    MAX_PACKET_ID,
    MAX_PAYLOAD,
    SEAL_OVERHEAD,
    DuplicateFilter,
    Frame,
    FrameError,
    decode_frame,
    encode_frame,
    next_hop,
    room_hash,
    with_ttl,
)

ROOM = room_hash("android")
ORIGIN = bytes.fromhex("0011223344556677")


def make_frame(**changes) -> Frame:
    values = dict(room_hash=ROOM, origin=ORIGIN, ttl=DEFAULT_TTL, packet_id=0x0102030405060708, payload=b"media")
    values.update(changes)
    return Frame(**values)


frames = st.builds(
    Frame,
    room_hash=st.binary(min_size=8, max_size=8),
    origin=st.binary(min_size=8, max_size=8),
    ttl=st.integers(0, 255),
    packet_id=st.integers(0, MAX_PACKET_ID),
    payload=st.binary(min_size=1, max_size=MAX_PAYLOAD),
)


# layout


def test_the_layout_byte_by_byte():
    encoded = encode_frame(make_frame())
    assert FRAME_VERSION == 1
    assert encoded == (
        b"\x01"
        + ROOM
        + ORIGIN
        + b"\x02"
        + bytes.fromhex("0102030405060708")
        + b"\x00\x05"
        + b"media"
    )
    assert FRAME_HEADER_SIZE == 28
    assert len(encoded) == FRAME_HEADER_SIZE + 5


def test_the_size_budget_fits_the_ipv6_minimum_mtu():
    assert SEAL_OVERHEAD == datagram.DATAGRAM_OVERHEAD == 33
    assert MAX_PAYLOAD == 1171
    assert MAX_FRAME_SIZE == 1199
    assert IP_UDP_OVERHEAD + datagram.MAX_DATAGRAM == IPV6_MIN_MTU
    sealer = datagram.Sealer(bytes(32), bytes(8))
    largest = encode_frame(make_frame(payload=b"x" * MAX_PAYLOAD))
    assert len(largest) == MAX_FRAME_SIZE
    assert len(sealer.seal(largest)) + 40 + 8 == 1280


def test_room_hash_is_the_first_eight_bytes_of_sha256_of_utf8():
    assert room_hash("android") == hashlib.sha256(b"android").digest()[:8]
    assert room_hash("café") == hashlib.sha256("café".encode()).digest()[:8]
    # no normalization: composed and decomposed forms are different rooms
    assert room_hash("caf\u00e9") != room_hash("cafe\u0301")


@pytest.mark.parametrize(("name", "error"), [("", ValueError), ("\ud800", ValueError), (b"room", TypeError)])
def test_room_hash_refusals(name, error):
    with pytest.raises(error):
        room_hash(name)


# round trips


@given(frames)
def test_round_trip(frame):
    assert decode_frame(encode_frame(frame)) == frame


@pytest.mark.parametrize("size", [1, 2, MAX_PAYLOAD - 1, MAX_PAYLOAD])
def test_payload_boundaries(size):
    frame = make_frame(payload=bytes(range(256))[: size % 256] + b"p" * (size - size % 256))
    assert len(frame.payload) == size
    assert decode_frame(encode_frame(frame)) == frame


@pytest.mark.parametrize(("ttl", "packet_id"), [(0, 0), (255, MAX_PACKET_ID)])
def test_field_extremes(ttl, packet_id):
    frame = make_frame(ttl=ttl, packet_id=packet_id)
    assert decode_frame(encode_frame(frame)) == frame


def test_bytearray_and_memoryview_decode():
    encoded = encode_frame(make_frame())
    assert decode_frame(bytearray(encoded)) == decode_frame(memoryview(encoded)) == make_frame()


def test_repr_shows_the_payload_size_only():
    assert "<5 bytes>" in repr(make_frame())
    assert "media" not in repr(make_frame())


# refusals


def refusal(data: bytes) -> FrameError:
    with pytest.raises(FrameError) as info:
        decode_frame(data)
    assert isinstance(info.value, ValueError)
    assert str(info.value).startswith(f"invalid relay frame at offset {info.value.offset} ({info.value.field}): ")
    return info.value


def test_empty():
    error = refusal(b"")
    assert (error.offset, error.field) == (0, "version")


@pytest.mark.parametrize("version", [0, 2, 0xFF])
def test_other_versions(version):
    error = refusal(bytes((version,)) + encode_frame(make_frame())[1:])
    assert (error.offset, error.field) == (0, "version")
    assert f"unsupported frame version {version}" in error.reason


@pytest.mark.parametrize(
    ("size", "offset", "field"),
    [
        (1, 1, "room hash"),
        (8, 1, "room hash"),
        (9, 9, "origin"),
        (16, 9, "origin"),
        (17, 17, "ttl"),
        (18, 18, "packet id"),
        (25, 18, "packet id"),
        (26, 26, "payload length"),
        (27, 26, "payload length"),
    ],
)
def test_truncated_header(size, offset, field):
    error = refusal(encode_frame(make_frame())[:size])
    assert (error.offset, error.field) == (offset, field)
    assert error.reason.startswith("truncated")


def test_truncated_payload():
    encoded = encode_frame(make_frame())
    error = refusal(encoded[:-1])
    assert (error.offset, error.field) == (FRAME_HEADER_SIZE, "payload")
    assert error.reason == "truncated: needs 5 bytes, 4 left"
    error = refusal(encoded[:FRAME_HEADER_SIZE])
    assert (error.offset, error.field) == (FRAME_HEADER_SIZE, "payload")


def test_trailing_bytes():
    error = refusal(encode_frame(make_frame()) + b"\x00\x00")
    assert (error.offset, error.field, error.reason) == (FRAME_HEADER_SIZE + 5, "payload", "2 trailing bytes")


def test_zero_payload_length():
    header = encode_frame(make_frame())[:26]
    error = refusal(header + b"\x00\x00")
    assert (error.offset, error.field) == (26, "payload length")


def test_payload_length_over_the_limit():
    header = encode_frame(make_frame())[:26]
    error = refusal(header + (MAX_PAYLOAD + 1).to_bytes(2, "big") + b"x" * 10)
    assert (error.offset, error.field) == (26, "payload length")
    error = refusal(header + b"\xff\xff")
    assert (error.offset, error.field) == (26, "payload length")


def test_oversized_input_is_refused_before_parsing():
    error = refusal(b"\x01" + b"\x00" * MAX_FRAME_SIZE)
    assert (error.offset, error.field) == (0, "frame")
    assert "over the limit of 1199" in error.reason


def test_not_bytes():
    with pytest.raises(TypeError):
        decode_frame("frame")


@given(st.binary(max_size=MAX_FRAME_SIZE + 10))
def test_arbitrary_input_gives_a_frame_or_frame_error(data):
    try:
        frame = decode_frame(data)
    except FrameError:
        return
    assert encode_frame(frame) == data


@given(frames, st.data())
def test_mutated_frames_give_a_frame_or_frame_error(frame, data):
    encoded = bytearray(encode_frame(frame))
    for _ in range(data.draw(st.integers(1, 4))):
        action = data.draw(st.sampled_from(["flip", "cut", "insert"]))
        position = data.draw(st.integers(0, len(encoded)))
        if action == "flip" and position < len(encoded):
            encoded[position] ^= data.draw(st.integers(1, 255))
        elif action == "cut":
            del encoded[position:]
        else:
            encoded[position:position] = data.draw(st.binary(min_size=1, max_size=4))
    try:
        decoded = decode_frame(bytes(encoded))
    except FrameError:
        return
    assert encode_frame(decoded) == bytes(encoded)


# construction checks


@pytest.mark.parametrize(
    ("changes", "error"),
    [
        ({"room_hash": b"short"}, ValueError),
        ({"room_hash": "x" * 8}, TypeError),
        ({"origin": b"\x00" * 9}, ValueError),
        ({"origin": bytearray(8)}, TypeError),
        ({"ttl": -1}, ValueError),
        ({"ttl": 256}, ValueError),
        ({"ttl": True}, TypeError),
        ({"ttl": 2.0}, TypeError),
        ({"packet_id": -1}, ValueError),
        ({"packet_id": MAX_PACKET_ID + 1}, ValueError),
        ({"payload": b""}, ValueError),
        ({"payload": b"x" * (MAX_PAYLOAD + 1)}, ValueError),
        ({"payload": "media"}, TypeError),
    ],
)
def test_a_frame_checks_its_fields(changes, error):
    with pytest.raises(error):
        make_frame(**changes)


def test_frames_are_frozen():
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        make_frame().ttl = 1


# TTL


def test_with_ttl():
    frame = make_frame(ttl=2)
    assert with_ttl(frame, 7) == attrs.evolve(frame, ttl=7)
    assert frame.ttl == 2
    with pytest.raises(ValueError):
        with_ttl(frame, 256)


def test_default_ttl_allows_one_intermediate_relay():
    # A originates with the default TTL, B forwards, C delivers only.
    at_b = make_frame(ttl=DEFAULT_TTL)
    at_c = next_hop(at_b)
    assert at_c is not None and at_c.ttl == 1
    assert next_hop(at_c) is None


def test_next_hop_at_zero():
    assert next_hop(make_frame(ttl=0)) is None


def test_next_hop_keeps_everything_else():
    frame = make_frame(ttl=9)
    assert next_hop(frame) == attrs.evolve(frame, ttl=8)


# duplicate suppression


def test_first_sighting_then_duplicate():
    dedup = DuplicateFilter(Clock())
    assert not dedup.seen_before(ORIGIN, 1)
    assert dedup.seen_before(ORIGIN, 1)
    assert dedup.seen_before(ORIGIN, 1)
    assert len(dedup) == 1


def test_the_key_is_origin_and_packet_id():
    dedup = DuplicateFilter(Clock())
    assert not dedup.seen_before(ORIGIN, 1)
    assert not dedup.seen_before(ORIGIN, 2)
    assert not dedup.seen_before(b"\xff" * 8, 1)
    assert len(dedup) == 3


def test_seen_frame_ignores_ttl_and_payload():
    dedup = DuplicateFilter(Clock())
    assert not dedup.seen_frame(make_frame(ttl=2))
    assert dedup.seen_frame(make_frame(ttl=1, payload=b"other"))


def test_entries_expire_after_the_window():
    clock = Clock()
    dedup = DuplicateFilter(clock, window=10)
    assert not dedup.seen_before(ORIGIN, 1)
    clock.advance(9.9)
    assert dedup.seen_before(ORIGIN, 1)  # not refreshed by a repeat
    clock.advance(0.1)
    assert not dedup.seen_before(ORIGIN, 1)
    assert len(dedup) == 1


def test_expiry_frees_memory():
    clock = Clock()
    dedup = DuplicateFilter(clock, window=10)
    for packet_id in range(100):
        dedup.seen_before(ORIGIN, packet_id)
    clock.advance(11)
    dedup.seen_before(ORIGIN, 1000)
    assert len(dedup) == 1


def test_count_bound_forgets_the_oldest():
    dedup = DuplicateFilter(Clock(), max_entries=3)
    for packet_id in range(4):
        assert not dedup.seen_before(ORIGIN, packet_id)
    assert len(dedup) == 3
    assert dedup.seen_before(ORIGIN, 3)
    assert not dedup.seen_before(ORIGIN, 0)  # pushed out


def test_a_clock_stepping_back_does_not_break_expiry():
    clock = Clock()
    clock.advance(100)
    dedup = DuplicateFilter(clock, window=10)
    dedup.seen_before(ORIGIN, 1)
    clock.rightNow = 50.0
    dedup.seen_before(ORIGIN, 2)  # treated as seen at 100
    clock.rightNow = 109.0
    assert dedup.seen_before(ORIGIN, 1)
    assert dedup.seen_before(ORIGIN, 2)
    clock.rightNow = 110.0
    assert not dedup.seen_before(ORIGIN, 1)


def test_the_defaults():
    clock = Clock()
    dedup = DuplicateFilter(clock)
    for packet_id in range(65537):
        dedup.seen_before(ORIGIN, packet_id)
    assert len(dedup) == 65536
    clock.advance(10)
    assert not dedup.seen_before(ORIGIN, 70000)
    assert len(dedup) == 1


@pytest.mark.parametrize("kwargs", [{"window": 0}, {"window": -1}, {"max_entries": 0}])
def test_bad_bounds(kwargs):
    with pytest.raises(ValueError):
        DuplicateFilter(Clock(), **kwargs)


def test_a_loop_cannot_storm():
    """
    Relays A, B, C linked in a triangle, each forwarding every frame to both
    other relays: a frame from A reaches each relay once and stops.
    """
    clock = Clock()
    links = {"A": ["B", "C"], "B": ["A", "C"], "C": ["A", "B"]}
    filters = {name: DuplicateFilter(clock) for name in links}
    delivered = {name: 0 for name in links}
    sent = 0
    origin_frame = make_frame(ttl=255)
    filters["A"].seen_frame(origin_frame)
    queue = [(peer, origin_frame) for peer in links["A"]]
    while queue:
        relay, frame = queue.pop(0)
        sent += 1
        assert sent < 100, "storm"
        if filters[relay].seen_frame(frame):
            continue
        delivered[relay] += 1
        onward = next_hop(frame)
        if onward is not None:
            queue.extend((peer, onward) for peer in links[relay])
    assert delivered == {"A": 0, "B": 1, "C": 1}
    assert sent == 6
