"""Tests for fedserver_relay.datagram, sealed UDP datagrams between linked relays."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from hypothesis import given, settings
from hypothesis import strategies as st
from OpenSSL import SSL, crypto

from fedserver import pki
from fedserver_relay.datagram import (
    DATAGRAM_HEADER_SIZE,
    DATAGRAM_OVERHEAD,
    DATAGRAM_VERSION,
    EXPORTER_CONTEXT,
    EXPORTER_LABEL,
    MAX_DATAGRAM,
    MAX_PLAINTEXT,
    MAX_SEQUENCE,
    PROBE_TAG,
    REPLAY_WINDOW,
    DatagramError,
    LinkKeys,
    Opener,
    ReplayWindow,
    Sealer,
    SequenceExhausted,
    decode_probe,
    encode_probe,
    is_probe,
    peek_link_id,
)
from fedserver_relay.fingerprint import fingerprint_of_certificate
from fedserver_relay.frames import FRAME_VERSION, Frame, decode_frame, encode_frame, room_hash

KEY = bytes(range(32))
LINK = bytes.fromhex("1122334455667788")
FRAME = Frame(room_hash=room_hash("android"), origin=b"\x01" * 8, ttl=2, packet_id=1, payload=b"opus packet")


def pair(window: int = REPLAY_WINDOW, first_sequence: int = 0) -> tuple[Sealer, Opener]:
    return Sealer(KEY, LINK, first_sequence=first_sequence), Opener(KEY, LINK, window=window)


def refused(opener: Opener, datagram: bytes, match: str) -> DatagramError:
    with pytest.raises(DatagramError, match=match) as info:
        opener.open(datagram)
    assert isinstance(info.value, ValueError)
    return info.value


# layout


def test_the_layout():
    sealer, opener = pair()
    plaintext = encode_frame(FRAME)
    sealer.seal(plaintext)
    datagram = sealer.seal(plaintext)
    assert datagram[0] == DATAGRAM_VERSION == 1
    assert datagram[1:9] == LINK
    assert datagram[9:17] == (1).to_bytes(8, "big")
    assert DATAGRAM_HEADER_SIZE == 17 and DATAGRAM_OVERHEAD == 33
    assert len(datagram) == len(plaintext) + 33
    nonce = bytes(4) + (1).to_bytes(8, "big")
    assert ChaCha20Poly1305(KEY).decrypt(nonce, datagram[17:], datagram[:17]) == plaintext
    assert decode_frame(opener.open(datagram)) == FRAME


def test_sizes():
    sealer, opener = pair()
    largest = sealer.seal(b"x" * MAX_PLAINTEXT)
    assert len(largest) == MAX_DATAGRAM == 1232
    assert opener.open(largest) == b"x" * MAX_PLAINTEXT
    smallest = sealer.seal(b"x")
    assert len(smallest) == 34
    assert opener.open(smallest) == b"x"


@pytest.mark.parametrize("size", [0, MAX_PLAINTEXT + 1])
def test_seal_refuses_sizes(size):
    sealer, _ = pair()
    with pytest.raises(ValueError, match="carries 1 to 1199 bytes"):
        sealer.seal(b"x" * size)
    assert sealer.next_sequence == 0


def test_open_refuses_sizes_and_versions():
    sealer, opener = pair()
    datagram = sealer.seal(b"x")
    refused(opener, datagram[:-1], "33 bytes is too short")
    refused(opener, b"", "0 bytes is too short")
    refused(opener, sealer.seal(b"x" * MAX_PLAINTEXT) + b"\x00", "1233 bytes, over the limit of 1232")
    for version in (0, 2, 255):
        refused(opener, bytes((version,)) + datagram[1:], f"unsupported datagram version {version}")
    assert opener.open(datagram) == b"x"


def test_open_wants_bytes():
    _, opener = pair()
    with pytest.raises(TypeError):
        opener.open("datagram" * 10)
    sealer, _ = pair()
    assert opener.open(bytearray(sealer.seal(b"x"))) == b"x"


def test_peek_link_id():
    sealer, _ = pair()
    assert peek_link_id(sealer.seal(b"x")) == LINK
    with pytest.raises(DatagramError):
        peek_link_id(b"\x01" + LINK)
    with pytest.raises(DatagramError):
        peek_link_id(b"\x02" + sealer.seal(b"x")[1:])


def test_another_links_datagram():
    sealer = Sealer(KEY, b"\x00" * 8)
    _, opener = pair()
    refused(opener, sealer.seal(b"x"), "link id 0000000000000000 is not this link's")


def test_another_key():
    sealer = Sealer(bytes(32), LINK)
    _, opener = pair()
    refused(opener, sealer.seal(b"x"), "authentication failed")


@pytest.mark.parametrize(("key", "link"), [(b"short", LINK), (KEY, b"short"), (KEY + b"x", LINK)])
def test_bad_key_or_link_id(key, link):
    with pytest.raises(ValueError):
        Sealer(key, link)
    with pytest.raises(ValueError):
        Opener(key, link)


# tampering


def test_every_tampered_byte_is_refused():
    sealer, opener = pair()
    sealer.seal(b"skip")
    datagram = sealer.seal(encode_frame(FRAME))
    for position in range(len(datagram)):
        for flip in (0x01, 0x80, 0xFF):
            tampered = bytearray(datagram)
            tampered[position] ^= flip
            with pytest.raises(DatagramError) as info:
                opener.open(bytes(tampered))
            if position == 0:
                assert "unsupported datagram version" in info.value.reason
            elif position < 9:
                assert "is not this link's" in info.value.reason
            else:
                assert "authentication failed" in info.value.reason
    # failures moved nothing: the genuine datagram still opens, once
    assert decode_frame(opener.open(datagram)) == FRAME
    refused(opener, datagram, "already received")


def test_truncated_or_extended_ciphertext():
    sealer, opener = pair()
    datagram = sealer.seal(b"hello world")
    refused(opener, datagram[:-1], "authentication failed")
    refused(opener, datagram + b"\x00", "authentication failed")


def test_a_forged_high_sequence_does_not_move_the_window():
    sealer, opener = pair()
    genuine = sealer.seal(b"x")
    forged = bytearray(sealer.seal(b"y"))
    forged[9:17] = (10_000).to_bytes(8, "big")
    refused(opener, bytes(forged), "authentication failed")
    assert opener.open(genuine) == b"x"


# replay window


def test_in_order():
    sealer, opener = pair()
    for i in range(2000):
        assert opener.open(sealer.seal(i.to_bytes(2, "big"))) == i.to_bytes(2, "big")


def test_out_of_order_within_the_window():
    sealer, opener = pair()
    datagrams = [sealer.seal(bytes([i + 1])) for i in range(10)]
    assert opener.open(datagrams[9]) == b"\x0a"
    for i in (3, 0, 8, 1, 2, 7, 4, 6, 5):
        assert opener.open(datagrams[i]) == bytes([i + 1])


def test_duplicate():
    sealer, opener = pair()
    first = sealer.seal(b"1")
    second = sealer.seal(b"2")
    opener.open(first)
    refused(opener, first, "sequence 0 was already received")
    opener.open(second)
    refused(opener, second, "sequence 1 was already received")
    refused(opener, first, "sequence 0 was already received")


def test_too_old_and_the_window_edge():
    sealer, opener = pair()
    datagrams = [sealer.seal(b"x") for _ in range(1101)]
    opener.open(datagrams[1100])
    refused(opener, datagrams[0], "sequence 0 is too old")
    refused(opener, datagrams[76], "sequence 76 is too old")  # 1100 - 76 = 1024
    assert opener.open(datagrams[77]) == b"x"  # 1100 - 77 = 1023: the oldest still in the window
    refused(opener, datagrams[77], "already received")


def test_far_ahead_is_accepted_and_slides_the_window():
    sealer, opener = pair()
    far = 10**12
    opener.open(sealer.seal(b"a"))
    late = sealer.seal(b"b")
    opener.open(Sealer(KEY, LINK, first_sequence=far).seal(b"far"))
    refused(opener, late, "sequence 1 is too old")
    assert opener.open(Sealer(KEY, LINK, first_sequence=far - 1).seal(b"just before")) == b"just before"
    assert opener.open(Sealer(KEY, LINK, first_sequence=far - REPLAY_WINDOW + 1).seal(b"edge")) == b"edge"
    refused(opener, Sealer(KEY, LINK, first_sequence=far - REPLAY_WINDOW).seal(b"x"), "too old")


def test_the_first_datagram_may_have_any_sequence():
    _, opener = pair()
    assert opener.open(Sealer(KEY, LINK, first_sequence=5000).seal(b"x")) == b"x"


def test_sequence_numbers_are_never_reused():
    sealer, opener = pair(first_sequence=MAX_SEQUENCE - 1)
    opener.open(sealer.seal(b"a"))
    last = sealer.seal(b"b")
    assert last[9:17] == b"\xff" * 8
    assert opener.open(last) == b"b"
    with pytest.raises(SequenceExhausted, match="reconnect to re-key"):
        sealer.seal(b"c")
    with pytest.raises(SequenceExhausted):
        sealer.seal(b"c")
    assert sealer.next_sequence == MAX_SEQUENCE + 1


def test_first_sequence_bounds():
    with pytest.raises(ValueError):
        Sealer(KEY, LINK, first_sequence=-1)
    with pytest.raises(ValueError):
        Sealer(KEY, LINK, first_sequence=MAX_SEQUENCE + 2)


def test_replay_window_directly():
    window = ReplayWindow(4)
    assert window.highest == -1
    for sequence in (0, 3, 1):
        assert window.check(sequence) is None
        window.update(sequence)
    assert window.check(3) == "sequence 3 was already received"
    assert window.check(2) is None
    window.update(10)
    assert window.check(6) == "sequence 6 is too old (highest 10, window 4)"
    assert window.check(7) is None
    with pytest.raises(ValueError):
        ReplayWindow(0)


@settings(max_examples=300)
@given(st.integers(1, 70), st.lists(st.integers(0, 200), max_size=60))
def test_replay_window_matches_a_model(size, sequences):
    window = ReplayWindow(size)
    seen: set[int] = set()
    highest = -1
    for sequence in sequences:
        acceptable = sequence not in seen and sequence > highest - size
        assert (window.check(sequence) is None) == acceptable
        if acceptable:
            window.update(sequence)
            seen.add(sequence)
            highest = max(highest, sequence)
        assert window.highest == highest


# probes


def test_probe():
    probe = encode_probe(b"12345678")
    assert probe == bytes((PROBE_TAG,)) + b"12345678"
    assert PROBE_TAG != FRAME_VERSION
    assert is_probe(probe)
    assert not is_probe(encode_frame(FRAME))
    assert not is_probe(b"")
    assert decode_probe(probe) == b"12345678"
    sealer, opener = pair()
    assert decode_probe(opener.open(sealer.seal(probe))) == b"12345678"


@pytest.mark.parametrize(("plaintext", "match"), [(b"\xff1234567", "is 9 bytes, not 8"), (b"\xff" * 10, "not 10")])
def test_malformed_probes(plaintext, match):
    with pytest.raises(DatagramError, match=match):
        decode_probe(plaintext)


def test_a_frame_is_not_a_probe():
    with pytest.raises(DatagramError, match="not a UDP probe"):
        decode_probe(encode_frame(FRAME))


@pytest.mark.parametrize("nonce", [b"", b"1234567", b"123456789", "12345678"])
def test_probe_nonce_size(nonce):
    with pytest.raises(ValueError):
        encode_probe(nonce)


# keys from the exporter


def fake_exporter(material: bytes):
    calls = []

    def export(label, size, context):
        calls.append((label, size, context))
        return material

    return export, calls


def test_derivation_from_an_exporter():
    material = bytes(range(80))
    export, calls = fake_exporter(material)
    client = LinkKeys.from_exporter(export, is_client=True)
    server = LinkKeys.from_exporter(fake_exporter(material)[0], is_client=False)
    assert calls == [(EXPORTER_LABEL, 80, EXPORTER_CONTEXT)]
    assert EXPORTER_LABEL == b"EXPORTER-fedserver-relay-udp"
    assert client.send_key == material[:32] == server.receive_key
    assert client.receive_key == material[32:64] == server.send_key
    assert client.send_link_id == material[64:72] == server.receive_link_id
    assert client.receive_link_id == material[72:80] == server.send_link_id


@pytest.mark.parametrize("material", [None, b"", bytes(79), bytes(81)])
def test_an_exporter_without_material(material):
    with pytest.raises(ValueError, match="no keying material"):
        LinkKeys.from_exporter(fake_exporter(material)[0], is_client=True)


def test_keys_are_never_in_a_repr():
    keys = LinkKeys.from_exporter(fake_exporter(bytes(range(100, 180)))[0], is_client=True)
    for text in (repr(keys), str(keys), repr(keys.sealer()), repr(keys.opener())):
        assert keys.send_key.hex() not in text
        assert keys.receive_key.hex() not in text
        assert repr(keys.send_key) not in text and repr(keys.receive_key) not in text
    assert "<redacted>" in repr(keys)
    assert keys.send_link_id.hex() in repr(keys)


def test_link_keys_check_sizes():
    with pytest.raises(ValueError):
        LinkKeys(b"k" * 31, b"k" * 32, b"i" * 8, b"i" * 8)
    with pytest.raises(ValueError):
        LinkKeys(b"k" * 32, b"k" * 32, b"i" * 8, b"i" * 9)


# with a real TLS connection, in memory


@pytest.fixture(scope="module")
def relays() -> tuple[pki.Issued, pki.Issued, pki.Issued]:
    ca = pki.make_ca("relay test CA")
    return ca, pki.issue(ca, ["relay-1.example"]), pki.issue(ca, ["relay-2.example"])


def relay_context(ca: pki.Issued, issued: pki.Issued, max_version: int | None) -> SSL.Context:
    context = SSL.Context(SSL.TLS_METHOD)
    context.use_certificate(issued.certificate)
    context.use_privatekey(issued.key)
    context.check_privatekey()
    store = context.get_cert_store()
    assert store is not None
    store.add_cert(crypto.X509.from_cryptography(ca.certificate))
    context.set_verify(SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT, lambda conn, cert, err, depth, ok: bool(ok))
    context.set_min_proto_version(SSL.TLS1_2_VERSION)
    if max_version is not None:
        context.set_max_proto_version(max_version)
    return context


def shuttle(one: SSL.Connection, other: SSL.Connection) -> None:
    for source, sink in ((one, other), (other, one)):
        try:
            sink.bio_write(source.bio_read(65536))
        except SSL.WantReadError:
            pass


def handshake(relays, max_version: int | None = None) -> tuple[SSL.Connection, SSL.Connection]:
    """A mutually authenticated TLS connection, relay 1 the client, over memory BIOs."""
    ca, client_cert, server_cert = relays
    client = SSL.Connection(relay_context(ca, client_cert, max_version), None)
    client.set_connect_state()
    server = SSL.Connection(relay_context(ca, server_cert, max_version), None)
    server.set_accept_state()
    done = {"client": False, "server": False}
    for _ in range(20):
        for name, connection in (("client", client), ("server", server)):
            if not done[name]:
                try:
                    connection.do_handshake()
                    done[name] = True
                except SSL.WantReadError:
                    pass
        shuttle(client, server)
        if all(done.values()):
            break
    assert all(done.values()), "the handshake did not finish"
    return client, server


@pytest.mark.parametrize(
    ("max_version", "name"), [(None, "TLSv1.3"), (SSL.TLS1_2_VERSION, "TLSv1.2")], ids=["tls1.3", "tls1.2"]
)
def test_both_ends_of_a_tls_link_derive_matching_keys(relays, max_version, name):
    client, server = handshake(relays, max_version)
    assert client.get_protocol_version_name() == server.get_protocol_version_name() == name
    exported = client.export_keying_material(EXPORTER_LABEL, 80, EXPORTER_CONTEXT)
    assert exported == server.export_keying_material(EXPORTER_LABEL, 80, EXPORTER_CONTEXT)
    at_client = LinkKeys.from_exporter(client.export_keying_material, is_client=True)
    at_server = LinkKeys.from_exporter(server.export_keying_material, is_client=False)
    assert at_client.send_key == at_server.receive_key
    assert at_client.receive_key == at_server.send_key
    assert at_client.send_key != at_client.receive_key
    assert at_client.send_link_id == at_server.receive_link_id
    assert at_client.receive_link_id == at_server.send_link_id
    assert at_client.send_link_id != at_client.receive_link_id


def test_datagrams_flow_both_ways_over_a_tls_link(relays):
    _, client_cert, server_cert = relays
    client, server = handshake(relays)
    # identities come from the handshake
    assert fingerprint_of_certificate(server.get_peer_certificate(as_cryptography=True)) == (
        fingerprint_of_certificate(client_cert.certificate)
    )
    assert fingerprint_of_certificate(client.get_peer_certificate(as_cryptography=True)) == (
        fingerprint_of_certificate(server_cert.certificate)
    )
    at_client = LinkKeys.from_connection(client, is_client=True)
    at_server = LinkKeys.from_connection(server, is_client=False)
    to_server, from_server = at_client.sealer(), at_client.opener()
    to_client, from_client = at_server.sealer(), at_server.opener()
    frame = encode_frame(FRAME)
    upstream = to_server.seal(frame)
    assert peek_link_id(upstream) == at_server.receive_link_id
    assert from_client.open(upstream) == frame
    downstream = to_client.seal(encode_probe(b"n" * 8))
    assert decode_probe(from_server.open(downstream)) == b"n" * 8
    # a datagram reflected back to its sender is refused
    with pytest.raises(DatagramError, match="not this link's"):
        from_server.open(to_server.seal(frame))


def test_another_tls_link_has_other_keys(relays):
    one = LinkKeys.from_connection(handshake(relays)[0], is_client=True)
    two = LinkKeys.from_connection(handshake(relays)[0], is_client=True)
    assert one.send_key != two.send_key
    assert one.send_link_id != two.send_link_id
    with pytest.raises(DatagramError):
        two.opener().open(one.sealer().seal(b"x"))


def test_from_connection_requires_tls_1_3(relays):
    client, _ = handshake(relays, SSL.TLS1_2_VERSION)
    with pytest.raises(ValueError, match=r"need a TLS 1\.3 link, not TLSv1\.2"):
        LinkKeys.from_connection(client, is_client=True)


def test_from_connection_before_the_handshake(relays):
    ca, client_cert, _ = relays
    connection = SSL.Connection(relay_context(ca, client_cert, None), None)
    connection.set_connect_state()
    with pytest.raises(ValueError, match="need a finished TLS handshake"):
        LinkKeys.from_connection(connection, is_client=True)


# fuzzing


@settings(max_examples=300)
@given(st.binary(max_size=MAX_DATAGRAM + 10))
def test_arbitrary_datagrams_are_refused(data):
    _, opener = pair()
    with pytest.raises(DatagramError):
        opener.open(data)


@settings(max_examples=300)
@given(st.binary(min_size=1, max_size=64), st.data())
def test_mutated_datagrams_are_refused(plaintext, data):
    sealer, opener = pair()
    datagram = bytearray(sealer.seal(plaintext))
    original = bytes(datagram)
    for _ in range(data.draw(st.integers(1, 3))):
        action = data.draw(st.sampled_from(["flip", "cut", "insert"]))
        position = data.draw(st.integers(0, len(datagram)))
        if action == "flip" and position < len(datagram):
            datagram[position] ^= data.draw(st.integers(1, 255))
        elif action == "cut":
            del datagram[position:]
        else:
            datagram[position:position] = data.draw(st.binary(min_size=1, max_size=4))
    if bytes(datagram) == original:
        assert opener.open(original) == plaintext
        return
    with pytest.raises(DatagramError):
        opener.open(bytes(datagram))
    assert opener.open(original) == plaintext
