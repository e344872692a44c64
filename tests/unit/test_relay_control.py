"""Tests for fedserver_relay.control, the control messages on a relay link."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedserver_relay.control import (
    CONTROL_VERSION,
    MAX_CONTROL,
    MAX_LABEL_BYTES,
    MAX_ROOMS,
    MAX_VERSIONS,
    MAX_VOUCHED,
    PROTOCOL_VERSIONS,
    ControlDecoder,
    ControlError,
    Hello,
    Media,
    MessageType,
    Ping,
    Pong,
    Subscribe,
    TrustChain,
    UdpAck,
    Unsubscribe,
    decode_control,
    encode_control,
)
from fedserver_relay.frames import MAX_PACKET_ID, Frame, encode_frame, room_hash

FP_A = "aa" * 32
FP_B = "0b" * 32
FRAME = Frame(room_hash=room_hash("android"), origin=b"\x01" * 8, ttl=2, packet_id=7, payload=b"opus")


def envelope(kind: int, payload: bytes, version: int = CONTROL_VERSION) -> bytes:
    return (2 + len(payload)).to_bytes(4, "big") + bytes((version, kind)) + payload


def hello_payload(
    versions: bytes = b"\x01\x01", label: bytes = b"\x05relay", port: bytes = b"\x27\x10", hops: bytes = b"\x02"
) -> bytes:
    return versions + label + port + hops


# strategies

labels = st.text(alphabet=st.characters(blacklist_categories=("Cc", "Cs", "Zl", "Zp")), max_size=32)
hellos = st.builds(
    Hello,
    versions=st.frozensets(st.integers(1, 255), min_size=1, max_size=MAX_VERSIONS),
    label=labels,
    udp_port=st.integers(0, 65535),
    max_hops=st.integers(1, 255),
)
trust_chains = st.builds(
    TrustChain, vouched_relays=st.frozensets(st.binary(min_size=32, max_size=32).map(bytes.hex), max_size=20)
)
rooms = st.frozensets(st.binary(min_size=8, max_size=8), min_size=1, max_size=20)
frames = st.builds(
    Frame,
    room_hash=st.binary(min_size=8, max_size=8),
    origin=st.binary(min_size=8, max_size=8),
    ttl=st.integers(0, 255),
    packet_id=st.integers(0, MAX_PACKET_ID),
    payload=st.binary(min_size=1, max_size=64),
)
nonces = st.binary(min_size=8, max_size=8)
messages = st.one_of(
    hellos,
    trust_chains,
    st.builds(Subscribe, rooms),
    st.builds(Unsubscribe, rooms),
    st.builds(Media, frames),
    st.builds(UdpAck, nonces),
    st.builds(Ping, nonces),
    st.builds(Pong, nonces),
)


# layouts


def test_hello_layout():
    message = Hello(versions={3, 1}, label="Relay 2 (Hub)", udp_port=10000, max_hops=2)
    assert encode_control(message) == envelope(1, b"\x02\x01\x03" + b"\x0dRelay 2 (Hub)" + b"\x27\x10" + b"\x02")


def test_trust_chain_layout_is_sorted():
    message = TrustChain([FP_A, FP_B])
    payload = b"\x00\x02" + bytes.fromhex(FP_B) + bytes.fromhex(FP_A)
    assert encode_control(message) == envelope(2, payload)


def test_empty_trust_chain():
    assert encode_control(TrustChain([])) == envelope(2, b"\x00\x00")
    assert decode_control(envelope(2, b"\x00\x00")) == TrustChain(frozenset())


def test_subscribe_and_unsubscribe_layouts():
    a, b = room_hash("a"), room_hash("b")
    payload = b"\x00\x02" + b"".join(sorted([a, b]))
    assert encode_control(Subscribe([a, b])) == envelope(3, payload)
    assert encode_control(Unsubscribe([b, a])) == envelope(4, payload)


def test_media_layout():
    assert encode_control(Media(FRAME)) == envelope(5, encode_frame(FRAME))


@pytest.mark.parametrize(("cls", "kind"), [(UdpAck, 6), (Ping, 7), (Pong, 8)])
def test_nonce_layouts(cls, kind):
    assert encode_control(cls(b"12345678")) == envelope(kind, b"12345678")


def test_message_types():
    assert [t.value for t in MessageType] == list(range(1, 9))
    assert PROTOCOL_VERSIONS == {1}


# round trips and chunking


@given(messages)
def test_round_trip(message):
    encoded = encode_control(message)
    assert decode_control(encoded) == message
    assert ControlDecoder().feed(encoded) == [message]


@given(st.lists(messages, max_size=8), st.data())
def test_any_chunking_gives_the_same_messages(items, data):
    stream = b"".join(encode_control(m) for m in items)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=12)))
    decoder = ControlDecoder()
    received = []
    for start, end in zip([0, *cuts], [*cuts, len(stream)], strict=True):
        received += decoder.feed(stream[start:end])
    assert received == items
    assert decoder.buffered == 0
    assert decoder.offset == len(stream)


def test_byte_by_byte():
    items = [Hello({1}, "r", 0, 2), TrustChain([FP_A]), Media(FRAME), Ping(b"p" * 8)]
    stream = b"".join(encode_control(m) for m in items)
    decoder = ControlDecoder()
    received = []
    for i in range(len(stream)):
        received += decoder.feed(stream[i : i + 1])
    assert received == items


def test_partial_message_is_kept():
    encoded = encode_control(Ping(b"p" * 8))
    decoder = ControlDecoder()
    assert decoder.feed(encoded[:7]) == []
    assert decoder.buffered == 7
    assert decoder.feed(bytearray(encoded[7:])) == [Ping(b"p" * 8)]
    assert decoder.feed(memoryview(encoded)) == [Ping(b"p" * 8)]


@pytest.mark.parametrize(
    "message",
    [
        Hello(versions=range(1, MAX_VERSIONS + 1), label="é" * (MAX_LABEL_BYTES // 2), udp_port=65535, max_hops=255),
        TrustChain(bytes([i >> 8, i & 0xFF]).hex() * 16 for i in range(MAX_VOUCHED)),
        Subscribe(i.to_bytes(8, "big") for i in range(MAX_ROOMS)),
        Unsubscribe(i.to_bytes(8, "big") for i in range(MAX_ROOMS)),
        Media(Frame(room_hash=b"r" * 8, origin=b"o" * 8, ttl=0, packet_id=0, payload=b"x" * 1171)),
    ],
    ids=["hello", "trust_chain", "subscribe", "unsubscribe", "media"],
)
def test_largest_messages(message):
    encoded = encode_control(message)
    assert len(encoded) - 4 <= MAX_CONTROL
    assert decode_control(encoded) == message


# refusals


def refused(stream: bytes) -> ControlError:
    """The error the decoder gives for C{stream}, fed at once; it must be the same fed byte by byte."""
    with pytest.raises(ControlError) as info:
        ControlDecoder().feed(stream)
    error = info.value
    assert isinstance(error, ValueError)
    assert str(error) == f"invalid relay control message at offset {error.offset} ({error.field}): {error.reason}"
    decoder = ControlDecoder()
    with pytest.raises(ControlError) as again:
        for i in range(len(stream)):
            decoder.feed(stream[i : i + 1])
    assert (again.value.offset, again.value.field, again.value.reason) == (error.offset, error.field, error.reason)
    return error


@pytest.mark.parametrize("length", [0, 1])
def test_length_too_short(length):
    error = refused(length.to_bytes(4, "big"))
    assert (error.offset, error.field) == (0, "length")


def test_length_over_the_bound_is_refused_before_buffering():
    decoder = ControlDecoder()
    with pytest.raises(ControlError) as info:
        decoder.feed((MAX_CONTROL + 1).to_bytes(4, "big"))
    assert (info.value.offset, info.value.field) == (0, "length")
    assert "over the limit of 65536" in info.value.reason
    assert decoder.buffered == 0
    refused(b"\xff\xff\xff\xff")


def test_length_at_the_bound_waits_for_the_type():
    decoder = ControlDecoder()
    assert decoder.feed(MAX_CONTROL.to_bytes(4, "big") + b"\x01") == []
    assert decoder.buffered == 5
    # no message type needs that much
    with pytest.raises(ControlError, match="over the 32770 bytes a TRUST_CHAIN can need"):
        decoder.feed(bytes((MessageType.TRUST_CHAIN,)))


@pytest.mark.parametrize(
    ("kind", "payload_size"),
    [
        (MessageType.PING, 9),
        (MessageType.PONG, 100),
        (MessageType.UDP_ACK, 9),
        (MessageType.HELLO, 1 + 16 + 1 + 128 + 2 + 1 + 1),
        (MessageType.MEDIA, 1200),
        (MessageType.SUBSCRIBE, 2 + 8 * 1024 + 1),
        (MessageType.TRUST_CHAIN, 2 + 32 * 1024 + 1),
    ],
)
def test_a_length_over_what_the_type_needs_is_refused_at_the_header(kind, payload_size):
    decoder = ControlDecoder()
    with pytest.raises(ControlError) as info:
        decoder.feed((2 + payload_size).to_bytes(4, "big") + bytes((1, kind)))
    assert (info.value.offset, info.value.field) == (0, "length")
    assert MessageType(kind).name in info.value.reason


@pytest.mark.parametrize("version", [0, 2, 255])
def test_unknown_version_is_refused_at_the_header(version):
    decoder = ControlDecoder()
    with pytest.raises(ControlError) as info:
        decoder.feed(b"\x00\x00\x00\x0a" + bytes((version,)))
    assert (info.value.offset, info.value.field) == (4, "version")
    assert f"unsupported control version {version}" in info.value.reason


@pytest.mark.parametrize("kind", [0, 9, 255])
def test_unknown_type_is_refused_at_the_header(kind):
    decoder = ControlDecoder()
    with pytest.raises(ControlError) as info:
        decoder.feed(b"\x00\x00\x00\x0a\x01" + bytes((kind,)))
    assert (info.value.offset, info.value.field, info.value.reason) == (5, "type", f"unknown message type {kind}")


def test_offsets_count_from_the_start_of_the_stream():
    first = encode_control(Ping(b"p" * 8))
    error = refused(first + envelope(MessageType.PING, b"1234567"))
    assert (error.offset, error.field) == (len(first) + 6, "ping.nonce")


def test_a_spent_decoder_refuses_everything():
    decoder = ControlDecoder()
    with pytest.raises(ControlError) as info:
        decoder.feed(b"\x00\x00\x00\x00")
    with pytest.raises(ControlError) as again:
        decoder.feed(encode_control(Ping(b"p" * 8)))
    assert again.value is info.value


def test_not_bytes():
    with pytest.raises(TypeError):
        ControlDecoder().feed("ping")
    with pytest.raises(TypeError):
        decode_control("ping")


# HELLO refusals


@pytest.mark.parametrize(
    ("payload", "offset", "field", "reason"),
    [
        (hello_payload(versions=b"\x00"), 6, "hello.versions", "0 versions, expected 1 to 16"),
        (hello_payload(versions=b"\x11" + bytes(range(1, 18))), 6, "hello.versions", "17 versions, expected 1 to 16"),
        (hello_payload(versions=b"\x01\x00"), 7, "hello.versions[0]", "protocol version 0 does not exist"),
        (hello_payload(versions=b"\x02\x02\x01"), 8, "hello.versions[1]", "out of order"),
        (hello_payload(versions=b"\x02\x01\x01"), 8, "hello.versions[1]", "repeats"),
        (hello_payload(label=b"\x81" + b"x" * 129), 8, "hello.label", "129 bytes, over the limit of 128"),
        (hello_payload(label=b"\x02\xc3\x28"), 9, "hello.label", "not UTF-8"),
        (hello_payload(label=b"\x02\xc0\xaf"), 9, "hello.label", "not UTF-8"),  # overlong "/"
        (hello_payload(label=b"\x03\xed\xa0\x80"), 9, "hello.label", "not UTF-8"),  # a surrogate
        (hello_payload(label=b"\x03a\nb"), 8, "hello.label", "control character U+000A"),
        (hello_payload(label=b"\x03\xe2\x80\xa8"), 8, "hello.label", "control character U+2028"),
        (hello_payload(hops=b"\x00"), 16, "hello.max_hops", "0 is not between 1 and 255"),
        (hello_payload(hops=b""), 16, "hello.max_hops", "truncated"),
        (hello_payload(port=b"\x01", hops=b""), 14, "hello.udp_port", "truncated"),
        (hello_payload() + b"\x00", 17, "hello", "1 trailing bytes"),
        (b"", 6, "hello.versions", "truncated"),
        (b"\x03\x01\x02", 9, "hello.versions[2]", "truncated"),
    ],
)
def test_hello_refusals(payload, offset, field, reason):
    error = refused(envelope(MessageType.HELLO, payload))
    assert (error.offset, error.field) == (offset, field)
    assert reason in error.reason


def test_a_valid_hello_payload():
    assert decode_control(envelope(1, hello_payload())) == Hello({1}, "relay", 10000, 2)


# TRUST_CHAIN refusals


def fingerprints(*hexes: str) -> bytes:
    return b"".join(bytes.fromhex(h) for h in hexes)


@pytest.mark.parametrize(
    ("payload", "offset", "field", "reason"),
    [
        (b"\x04\x01", 6, "trust_chain.vouched_relays", "1025 relays, over the limit of 1024"),
        (b"\x00\x02" + fingerprints(FP_A, FP_B), 40, "trust_chain.vouched_relays[1]", "out of order"),
        (b"\x00\x02" + fingerprints(FP_A, FP_A), 40, "trust_chain.vouched_relays[1]", "repeats"),
        (b"\x00\x01" + fingerprints(FP_A)[:31], 8, "trust_chain.vouched_relays[0]", "truncated"),
        (b"\x00\x01" + fingerprints(FP_A) + b"\x00", 40, "trust_chain", "1 trailing bytes"),
        (b"\x00\x00\x00", 8, "trust_chain", "1 trailing bytes"),
        (b"\x00", 6, "trust_chain.vouched_relays", "truncated"),
    ],
)
def test_trust_chain_refusals(payload, offset, field, reason):
    error = refused(envelope(MessageType.TRUST_CHAIN, payload))
    assert (error.offset, error.field) == (offset, field)
    assert reason in error.reason


def test_trust_chain_values_are_canonical_fingerprints():
    colons = ":".join(FP_A[i : i + 2] for i in range(0, 64, 2)).upper()
    assert TrustChain([colons, FP_A]) == TrustChain([FP_A])


@pytest.mark.parametrize(
    ("value", "error", "match"),
    [
        (["relay-2-tls-fingerprint"], ValueError, "'relay-2-tls-fingerprint' is not a relay fingerprint"),
        (FP_A, TypeError, "not a single str"),
        ([FP_A.encode()], TypeError, "must be a string"),
        ([bytes([i >> 8, i & 0xFF]).hex() * 16 for i in range(MAX_VOUCHED + 1)], ValueError, "at most 1024"),
    ],
)
def test_trust_chain_construction_checks(value, error, match):
    with pytest.raises(error, match=match):
        TrustChain(value)


# SUBSCRIBE / UNSUBSCRIBE refusals


@pytest.mark.parametrize("kind", [MessageType.SUBSCRIBE, MessageType.UNSUBSCRIBE])
@pytest.mark.parametrize(
    ("payload", "offset", "field", "reason"),
    [
        (b"\x00\x00", 6, "room_hashes", "0 rooms, expected 1 to 1024"),
        (b"\x04\x01", 6, "room_hashes", "1025 rooms, expected 1 to 1024"),
        (b"\x00\x02" + b"\x02" * 8 + b"\x01" * 8, 16, "room_hashes[1]", "out of order"),
        (b"\x00\x02" + b"\x01" * 16, 16, "room_hashes[1]", "repeats"),
        (b"\x00\x02" + b"\x01" * 8, 16, "room_hashes[1]", "truncated"),
        (b"\x00\x01" + b"\x01" * 9, 16, "", "1 trailing bytes"),
    ],
)
def test_subscription_refusals(kind, payload, offset, field, reason):
    name = kind.name.lower()
    error = refused(envelope(kind, payload))
    assert (error.offset, error.field) == (offset, f"{name}.{field}" if field else name)
    assert reason in error.reason


@pytest.mark.parametrize(
    ("value", "error"),
    [([], ValueError), ([b"short"], ValueError), (["8 chars!"], ValueError), (b"\x00" * 8, TypeError)],
)
def test_subscription_construction_checks(value, error):
    with pytest.raises(error):
        Subscribe(value)
    with pytest.raises(error):
        Unsubscribe(value)


# MEDIA refusals


def test_media_with_a_bad_frame_points_into_the_frame():
    encoded = encode_frame(FRAME)
    error = refused(envelope(MessageType.MEDIA, b"\x02" + encoded[1:]))
    assert (error.offset, error.field) == (6, "media.version")
    error = refused(envelope(MessageType.MEDIA, encoded + b"\x00"))
    assert (error.offset, error.field, error.reason) == (6 + len(encoded), "media.payload", "1 trailing bytes")
    error = refused(envelope(MessageType.MEDIA, encoded[:20]))
    assert (error.offset, error.field) == (6 + 18, "media.packet id")


def test_empty_media():
    error = refused(envelope(MessageType.MEDIA, b""))
    assert (error.offset, error.field, error.reason) == (6, "media.version", "empty input")


def test_media_wants_a_frame():
    with pytest.raises(TypeError):
        Media(encode_frame(FRAME))


# nonce messages


@pytest.mark.parametrize("kind", [MessageType.UDP_ACK, MessageType.PING, MessageType.PONG])
def test_short_nonce(kind):
    error = refused(envelope(kind, b"1234567"))
    assert (error.offset, error.field) == (6, f"{kind.name.lower()}.nonce")


@pytest.mark.parametrize("cls", [UdpAck, Ping, Pong])
@pytest.mark.parametrize("nonce", [b"", b"1234567", b"123456789", "12345678"])
def test_nonce_construction_checks(cls, nonce):
    with pytest.raises(ValueError):
        cls(nonce)


# HELLO construction


@pytest.mark.parametrize(
    ("changes", "error"),
    [
        ({"versions": []}, ValueError),
        ({"versions": range(1, 18)}, ValueError),
        ({"versions": [0]}, ValueError),
        ({"versions": [256]}, ValueError),
        ({"versions": [True]}, ValueError),
        ({"versions": "1"}, TypeError),
        ({"label": "x" * 129}, ValueError),
        ({"label": "\u00e9" * 65}, ValueError),
        ({"label": "a\tb"}, ValueError),
        ({"label": "\x85"}, ValueError),
        ({"label": "\ud800"}, ValueError),
        ({"label": b"relay"}, TypeError),
        ({"udp_port": -1}, ValueError),
        ({"udp_port": 65536}, ValueError),
        ({"max_hops": 0}, ValueError),
        ({"max_hops": 256}, ValueError),
        ({"max_hops": "2"}, TypeError),
    ],
)
def test_hello_construction_checks(changes, error):
    values = {"versions": [1], "label": "relay", "udp_port": 0, "max_hops": 2}
    values.update(changes)
    with pytest.raises(error):
        Hello(**values)


def test_encode_refuses_other_objects():
    with pytest.raises(TypeError, match="not a relay control message"):
        encode_control(FRAME)


# decode_control


def test_decode_control_wants_exactly_one_message():
    ping = encode_control(Ping(b"p" * 8))
    with pytest.raises(ControlError) as info:
        decode_control(ping + ping)
    assert (info.value.offset, info.value.field) == (len(ping), "message")
    with pytest.raises(ControlError) as info:
        decode_control(ping[:-1])
    assert (info.value.offset, info.value.field) == (len(ping) - 1, "message")
    with pytest.raises(ControlError) as info:
        decode_control(ping[:3])
    assert (info.value.offset, info.value.field) == (0, "length")


# fuzzing


@settings(max_examples=300)
@given(st.binary(max_size=300))
def test_arbitrary_streams_give_messages_or_control_error(data):
    try:
        items = ControlDecoder().feed(data)
    except ControlError:
        return
    assert b"".join(encode_control(m) for m in items) == data[: sum(len(encode_control(m)) for m in items)]


@settings(max_examples=300)
@given(st.lists(messages, min_size=1, max_size=4), st.data())
def test_mutated_streams_give_messages_or_control_error(items, data):
    stream = bytearray(b"".join(encode_control(m) for m in items))
    for _ in range(data.draw(st.integers(1, 4))):
        action = data.draw(st.sampled_from(["flip", "cut", "insert", "delete"]))
        position = data.draw(st.integers(0, len(stream)))
        if action == "flip" and position < len(stream):
            stream[position] ^= data.draw(st.integers(1, 255))
        elif action == "cut":
            del stream[position:]
        elif action == "delete":
            del stream[position : position + data.draw(st.integers(1, 8))]
        else:
            stream[position:position] = data.draw(st.binary(min_size=1, max_size=8))
    decoder = ControlDecoder()
    try:
        received = decoder.feed(bytes(stream))
    except ControlError as e:
        assert 0 <= e.offset <= len(stream)
        return
    # whatever decodes re-encodes to the same bytes: one encoding per message
    assert b"".join(encode_control(m) for m in received) == bytes(stream[: decoder.offset])


@given(st.lists(messages, max_size=4), st.binary(min_size=1, max_size=40), st.data())
def test_a_bad_tail_gives_the_same_error_whatever_the_chunking(items, tail, data):
    stream = b"".join(encode_control(m) for m in items) + tail
    try:
        ControlDecoder().feed(stream)
    except ControlError as e:
        expected = (e.offset, e.field, e.reason)
    else:
        return
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=8)))
    decoder = ControlDecoder()
    with pytest.raises(ControlError) as info:
        for start, end in zip([0, *cuts], [*cuts, len(stream)], strict=True):
            decoder.feed(stream[start:end])
    assert (info.value.offset, info.value.field, info.value.reason) == expected
