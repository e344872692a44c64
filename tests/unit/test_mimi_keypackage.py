"""Tests for fedserver_mimi.keypackage, the RFC 9420 KeyPackage parser."""

from __future__ import annotations

import typing

import attrs
import nacl.signing
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedserver_mimi.encode import (
    KeyPackageSpec,
    encode_extensions,
    encode_x509_credential,
    sign_content,
    u16,
    u16_list,
    varint,
    vec,
)
from fedserver_mimi.keypackage import (
    CIPHER_SUITE_NAMES,
    MAX_CERTIFICATES,
    MAX_KEY_PACKAGE_SIZE,
    Capabilities,
    Credential,
    Extension,
    KeyPackageError,
    Lifetime,
    parse_key_package,
    parse_key_package_message,
    verify_key_package_signature,
    verify_leaf_node_signature,
)
from tests.unit.mls_helpers import MUTATIONS, mutate

# The "mls_key_package" values of the first two entries of test-vectors/messages.json
# in mlswg/mls-implementations (the MLS working group's interoperability test
# vectors, which OpenMLS and mlspp run; stored version at commit
# 4a523efa3e184d807334f80e1905eb4055e64623): MLSMessages (version 0x0001, wire
# format 0x0005 mls_key_package) carrying a cipher suite 1 KeyPackage with the
# basic credential "Alice", both signatures valid.
PUBLISHED_KEY_PACKAGES = [
    "000100050001000120c749ea08b3d33784ecf799c150ed8a43580e1cc12a1a893822547ba3c021ac76201e44ee2a27540d5c65a3f1e0"
    "7bcb2ba558959ad22168d4de7f180201a9b666222038a5e7481e20afe7e500cb3065a67ebe9c2c3ecd537d4479309159fe2215c4b500"
    "0105416c696365020001060001000200030200010c0001000200030004000500070200010100000000640884240000000064775034"
    "0040404cdfef1fdc8d04758353f3f07c2fe7282fa0215ddc72441a33124ef5106df858f86f57aefe08f255450df1243b630b8dd391"
    "2cbf2d94af7612fa4a07420cb70d004040136da188e3b773e12e76c9be654f7b51fc94bb8f7d53059e7ce2421d9226e8d1637209d3"
    "d65ed1ab0a198e1e63e2052dfdae85609f7d06951cf62ef66a12b300",
    "0001000500010001205cdfb5d5c43d19b31971fc5f87ce8acbdd1c4184e7234afbcc75f02f924c686320dc698945721de67ee6954988"
    "ee2964ed2452aea80c278679b7698765c2a3c71e20745ea11834d7b08915c3c84a780ef96618f34399fbbeb904d8a1c3bca00a9203"
    "000105416c696365020001060001000200030200010c000100020003000400050007020001010000000064088424000000006477"
    "5034004040a74c69339c71381a1f8058018846e89f95d118f8b389ad7832a43ba991e253986d0abe754bc011373ead298a589927da"
    "cdd093764acb282056ba10cf266e670b004040e9ec3813d20728ba58245e8a85a52f4496fecd5acf6c7c54419725199d47aab5e9"
    "421c1edab91ad99767fc34f6f1a2b00959263840588b9589fe4e3212e8020e",
]


# KeyPackages for the tests are built with fedserver_mimi.encode's KeyPackageSpec,
# which checks nothing, so malformed packages can be built too: each field but
# the keys is given encoded.

SIGNING_KEY = nacl.signing.SigningKey(b"\x07" * 32)

BUILDER_DEFAULTS: dict[str, typing.Any] = {
    "signing_key": SIGNING_KEY,
    "init_key": b"\x01" * 32,
    "encryption_key": b"\x02" * 32,
    "credential": u16(1) + vec(b"alice@example.com"),
    "capabilities": u16_list([1]) + u16_list([1, 3]) + u16_list([]) + u16_list([]) + u16_list([1, 2]),
    "source": b"\x01" + (1_700_000_000).to_bytes(8, "big") + (1_700_086_400).to_bytes(8, "big"),
}


def Builder(**fields: typing.Any) -> KeyPackageSpec:
    """The tests' default KeyPackage with C{fields} replaced; C{encode()} signs it with Ed25519."""
    return KeyPackageSpec(**{**BUILDER_DEFAULTS, **fields})


def x509_credential(*certs: bytes) -> bytes:
    return encode_x509_credential(certs)


def error_of(data: bytes) -> KeyPackageError:
    with pytest.raises(KeyPackageError) as info:
        parse_key_package(data)
    return info.value


class TestParse:
    def test_basic_round_trip(self):
        b = Builder(
            leaf_extensions=encode_extensions([(0xF000, b"app")]),
            extensions=encode_extensions([(0x000A, b""), (0xF001, b"last resort")]),
        )
        kp = parse_key_package(b.encode())
        assert kp.version == 1
        assert kp.cipher_suite == 1
        assert kp.cipher_suite_name == "MLS_128_DHKEMX25519_AES128GCM_SHA256_Ed25519"
        assert kp.init_key == b"\x01" * 32
        leaf = kp.leaf_node
        assert leaf.encryption_key == b"\x02" * 32
        assert leaf.signature_key == bytes(b.signing_key.verify_key)
        assert leaf.credential == Credential(1, identity=b"alice@example.com")
        assert kp.credential is leaf.credential
        assert leaf.capabilities == Capabilities((1,), (1, 3), (), (), (1, 2))
        assert leaf.leaf_node_source == 1
        assert kp.lifetime == Lifetime(1_700_000_000, 1_700_086_400)
        assert kp.lifetime.contains(1_700_000_000) and not kp.lifetime.contains(1_700_086_401)
        assert leaf.extensions == (Extension(0xF000, b"app"),)
        assert kp.extensions == (Extension(0x000A, b""), Extension(0xF001, b"last resort"))
        assert len(kp.signature) == 64 and len(leaf.signature) == 64
        assert kp.raw == b.encode()
        assert kp.to_be_signed == kp.raw[: -len(vec(kp.signature))]

    def test_x509_round_trip(self):
        certs = (b"\x30\x82" + b"L" * 300, b"\x30\x81" + b"I" * 150)
        kp = parse_key_package(Builder(credential=x509_credential(*certs)).encode())
        assert kp.credential.credential_type == 2
        assert kp.credential.identity is None
        assert kp.credential.certificates == certs

    def test_all_cipher_suite_names(self):
        assert sorted(CIPHER_SUITE_NAMES) == [1, 2, 3, 4, 5, 6, 7]
        kp = parse_key_package(Builder(cipher_suite=0xF0F0, init_key=b"i", encryption_key=b"e").encode())
        assert kp.cipher_suite == 0xF0F0
        assert kp.cipher_suite_name is None

    def test_long_vectors(self):
        """Two- and four-byte vector lengths are read."""
        big = b"\x30" + b"x" * 20000
        kp = parse_key_package(Builder(credential=x509_credential(big, b"\x30" + b"y" * 100)).encode())
        assert kp.credential.certificates[0] == big

    def test_accepts_bytearray_and_memoryview(self):
        data = Builder().encode()
        assert parse_key_package(bytearray(data)) == parse_key_package(memoryview(data))

    def test_not_bytes(self):
        with pytest.raises(TypeError):
            parse_key_package(typing.cast(bytes, "0001"))


class TestPublishedVectors:
    @pytest.mark.parametrize("hexdata", PUBLISHED_KEY_PACKAGES)
    def test_parse(self, hexdata):
        kp = parse_key_package_message(bytes.fromhex(hexdata))
        assert kp.version == 1
        assert kp.cipher_suite == 1
        assert kp.credential == Credential(1, identity=b"Alice")
        assert kp.leaf_node.capabilities == Capabilities((1,), (1, 2, 3), (1,), (1, 2, 3, 4, 5, 7), (1,))
        assert kp.lifetime == Lifetime(0x64088424, 0x64775034)
        assert kp.extensions == ()
        # The bare KeyPackage after the 4-byte MLSMessage header parses alike.
        assert parse_key_package(bytes.fromhex(hexdata)[4:]) == kp

    @pytest.mark.parametrize("hexdata", PUBLISHED_KEY_PACKAGES)
    def test_signatures(self, hexdata):
        kp = parse_key_package_message(bytes.fromhex(hexdata))
        assert verify_key_package_signature(kp)
        assert verify_leaf_node_signature(kp)

    def test_message_wrong_wire_format(self):
        data = bytearray.fromhex(PUBLISHED_KEY_PACKAGES[0])
        data[3] = 1
        with pytest.raises(KeyPackageError, match=r"offset 2 \(MLSMessage.wire_format\)"):
            parse_key_package_message(bytes(data))

    def test_message_wrong_version(self):
        with pytest.raises(KeyPackageError, match=r"MLSMessage\.version"):
            parse_key_package_message(b"\x00\x02" + bytes.fromhex(PUBLISHED_KEY_PACKAGES[0])[2:])


class TestSignatures:
    def test_ed25519(self):
        b = Builder()
        kp = parse_key_package(b.encode())
        assert verify_key_package_signature(kp)
        assert verify_leaf_node_signature(kp)

    def test_ed25519_bad_signatures(self):
        kp = parse_key_package(Builder(signature=b"\x00" * 64).encode())
        assert not verify_key_package_signature(kp)
        assert verify_leaf_node_signature(kp)
        kp = parse_key_package(Builder(leaf_signature=b"\x00" * 64).encode())
        assert not verify_leaf_node_signature(kp)
        # The right signature over the wrong label.
        b = Builder()
        b = attrs.evolve(b, signature=b.signing_key.sign(sign_content(b"LeafNodeTBS", b.encode()[:-66])).signature)
        assert not verify_key_package_signature(parse_key_package(b.encode()))
        # A signature of the wrong size.
        assert not verify_key_package_signature(parse_key_package(Builder(signature=b"short").encode()))

    def test_ed25519_other_key(self):
        other = bytes(nacl.signing.SigningKey(b"\x09" * 32).verify_key)
        kp = parse_key_package(Builder(signature_key=other).encode())
        assert not verify_key_package_signature(kp)

    def test_p256(self):
        """Cipher suite 2: ECDSA P-256 with SHA-256, signed here with cryptography."""
        private = ec.derive_private_key(12345, ec.SECP256R1())
        public = private.public_key().public_bytes(
            serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
        )
        b = Builder(
            cipher_suite=2,
            init_key=b"\x04" + b"i" * 64,
            encryption_key=b"\x04" + b"e" * 64,
            signature_key=public,
            leaf_signature=b"\x00",
            signature=b"\x00",
        )
        leaf_tbs = parse_key_package(b.encode()).leaf_node.to_be_signed
        leaf_signature = private.sign(sign_content(b"LeafNodeTBS", leaf_tbs), ec.ECDSA(hashes.SHA256()))
        b = attrs.evolve(b, leaf_signature=leaf_signature)
        tbs = parse_key_package(b.encode()).to_be_signed
        signature = private.sign(sign_content(b"KeyPackageTBS", tbs), ec.ECDSA(hashes.SHA256()))
        b = attrs.evolve(b, signature=signature)
        kp = parse_key_package(b.encode())
        assert verify_leaf_node_signature(kp)
        assert verify_key_package_signature(kp)
        b = attrs.evolve(b, signature=signature[:-1] + bytes([signature[-1] ^ 1]))
        assert not verify_key_package_signature(parse_key_package(b.encode()))

    def test_unknown_suite(self):
        kp = parse_key_package(Builder(cipher_suite=0x0A0A, init_key=b"i", encryption_key=b"e").encode())
        with pytest.raises(KeyPackageError, match="cannot verify"):
            verify_key_package_signature(kp)


class TestMalformed:
    def test_every_truncation(self):
        data = Builder(credential=x509_credential(b"\x30abc")).encode()
        for n in range(len(data)):
            err = error_of(data[:n])
            assert "truncated" in str(err) or "beyond the data" in str(err), (n, err)

    def test_trailing_bytes(self):
        data = Builder().encode()
        err = error_of(data + b"\x00")
        assert err.offset == len(data)
        assert "trailing" in str(err)

    @pytest.mark.parametrize(("source", "name"), [(2, "update"), (3, "commit"), (0, "unknown"), (9, "unknown")])
    def test_wrong_leaf_node_source(self, source, name):
        b = Builder(source=bytes([source]) + b"\x00" * 16)
        err = error_of(b.encode())
        assert err.field == "leaf_node.leaf_node_source"
        assert name in str(err)

    def test_update_source_shape(self):
        """An update leaf node (no lifetime) is refused at the source byte."""
        err = error_of(Builder(source=b"\x02").encode())
        assert err.field == "leaf_node.leaf_node_source"

    def test_vector_length_beyond_data(self):
        data = Builder().encode()
        # init_key's length byte is at offset 4: claim 63 bytes more than there are.
        corrupt = data[:4] + b"\x3f" + data[5:]
        err = error_of(corrupt[: 4 + 1 + 40])
        assert err.offset == 4
        assert err.field == "init_key"
        assert "beyond the data" in str(err)

    def test_signature_length_beyond_data(self):
        data = Builder().encode()
        err = error_of(data[:-65] + b"\x7f\xff" + data[-64:])
        assert err.field == "signature"
        assert "beyond the data" in str(err)

    def test_non_minimal_two_byte_length(self):
        data = Builder().encode()
        # init_key: 0x20 (32) re-encoded in two bytes as 0x4020.
        err = error_of(data[:4] + b"\x40\x20" + data[5:])
        assert (err.offset, err.field) == (4, "init_key")
        assert "not minimally encoded" in str(err)

    def test_non_minimal_four_byte_length(self):
        data = Builder().encode()
        err = error_of(data[:4] + b"\x80\x00\x00\x20" + data[5:])
        assert "not minimally encoded" in str(err)
        # 16383 fits in two bytes, so a four-byte form of it is refused too.
        err = error_of(data[:4] + b"\x80\x00\x3f\xff" + data[5:])
        assert "not minimally encoded" in str(err)

    def test_length_prefix_11(self):
        data = Builder().encode()
        err = error_of(data[:4] + b"\xc0" + data[5:])
        assert "0b11" in str(err)
        assert err.offset == 4

    @pytest.mark.parametrize("version", [0, 2, 0xFFFF])
    def test_unknown_version(self, version):
        err = error_of(Builder(version=version).encode())
        assert (err.offset, err.field) == (0, "version")
        assert str(version) in str(err)

    def test_oversize_refused_up_front(self):
        data = Builder().encode()
        err = error_of(data + b"\x00" * (MAX_KEY_PACKAGE_SIZE - len(data) + 1))
        assert err.offset == 0
        assert "limit" in str(err)
        # Up front: even a package whose first bytes are nonsense.
        err = error_of(b"\xff" * (MAX_KEY_PACKAGE_SIZE + 1))
        assert "limit" in str(err)
        with pytest.raises(KeyPackageError, match="limit"):
            parse_key_package_message(b"\x00" * (MAX_KEY_PACKAGE_SIZE + 1))

    def test_unknown_credential_type(self):
        err = error_of(Builder(credential=u16(3) + vec(b"x")).encode())
        assert err.field == "leaf_node.credential.credential_type"
        assert "unsupported credential type 3" in str(err)

    def test_x509_without_certificates(self):
        err = error_of(Builder(credential=x509_credential()).encode())
        assert "no certificates" in str(err)

    def test_x509_empty_certificate(self):
        err = error_of(Builder(credential=x509_credential(b"\x30a", b"")).encode())
        assert err.field == "leaf_node.credential.certificates[1].cert_data"

    def test_x509_too_many_certificates(self):
        err = error_of(Builder(credential=x509_credential(*[b"\x30"] * (MAX_CERTIFICATES + 1))).encode())
        assert "more than" in str(err)

    def test_x509_certificate_overruns_list(self):
        # The list says 3 bytes, the certificate inside claims 10.
        cred = u16(2) + varint(3) + varint(10) + b"ab"
        err = error_of(Builder(credential=cred).encode())
        assert err.field == "leaf_node.credential.certificates[0].cert_data"
        assert "beyond the data" in str(err)

    def test_odd_capabilities_length(self):
        caps = vec(b"\x00\x01\x00") + u16_list([1]) + u16_list([]) + u16_list([]) + u16_list([1])
        err = error_of(Builder(capabilities=caps).encode())
        assert err.field == "leaf_node.capabilities.versions"
        assert "multiple of 2" in str(err)

    def test_duplicate_extension(self):
        err = error_of(Builder(extensions=encode_extensions([(5, b"a"), (5, b"b")])).encode())
        assert err.field == "extensions"
        assert "duplicate extension type 5" in str(err)

    def test_too_many_extensions(self):
        err = error_of(Builder(leaf_extensions=encode_extensions([(i, b"") for i in range(65)])).encode())
        assert err.field == "leaf_node.extensions"

    def test_extension_overruns_list(self):
        exts = varint(3) + u16(1) + varint(5)
        err = error_of(Builder(extensions=exts).encode())
        assert err.field == "extensions[0].extension_data"

    def test_lifetime_reversed(self):
        source = b"\x01" + (20).to_bytes(8, "big") + (10).to_bytes(8, "big")
        err = error_of(Builder(source=source).encode())
        assert err.field == "leaf_node.lifetime"

    def test_key_sizes_of_the_suite(self):
        err = error_of(Builder(init_key=b"\x01" * 31).encode())
        assert err.field == "init_key"
        assert "uses 32" in str(err)
        err = error_of(Builder(encryption_key=b"\x01" * 33).encode())
        assert err.field == "leaf_node.encryption_key"
        err = error_of(Builder(signature_key=b"\x01" * 31).encode())
        assert err.field == "leaf_node.signature_key"

    def test_init_key_equals_encryption_key(self):
        err = error_of(Builder(init_key=b"\x02" * 32).encode())
        assert err.field == "init_key"

    def test_empty_init_key_unknown_suite(self):
        err = error_of(Builder(cipher_suite=0x0A0A, init_key=b"").encode())
        assert err.field == "init_key"

    def test_empty_input(self):
        err = error_of(b"")
        assert (err.offset, err.field) == (0, "version")

    def test_message_mentions_offset_and_field(self):
        err = error_of(Builder(credential=u16(7)).encode())
        assert str(err).startswith("invalid KeyPackage at offset ")
        assert "(leaf_node.credential.credential_type)" in str(err)
        assert isinstance(err, ValueError)


VALID = [
    Builder().encode(),
    Builder(
        credential=x509_credential(b"\x30" + b"c" * 70, b"\x30d"), extensions=encode_extensions([(10, b"x" * 80)])
    ).encode(),
    bytes.fromhex(PUBLISHED_KEY_PACKAGES[0])[4:],
]

FUZZ = settings(max_examples=400, deadline=500, suppress_health_check=[HealthCheck.too_slow])


def parse_or_refuse(data: bytes) -> None:
    """Parse; a KeyPackageError is fine, anything else fails the test."""
    try:
        kp = parse_key_package(data)
    except KeyPackageError as e:
        assert str(e).startswith("invalid KeyPackage at offset ")
        assert 0 <= e.offset <= len(data)
        return
    # Whatever parses is a well-formed package that re-parses identically.
    assert kp.raw == data
    assert parse_key_package(kp.raw) == kp
    if kp.cipher_suite in CIPHER_SUITE_NAMES:
        assert verify_key_package_signature(kp) in (True, False)
        assert verify_leaf_node_signature(kp) in (True, False)


class TestFuzz:
    @FUZZ
    @given(st.binary(max_size=2048))
    def test_random_bytes(self, data):
        parse_or_refuse(data)

    @FUZZ
    @given(st.binary(max_size=512))
    def test_random_after_valid_header(self, tail):
        parse_or_refuse(b"\x00\x01\x00\x01" + tail)
        try:
            parse_key_package_message(b"\x00\x01\x00\x05" + tail)
        except KeyPackageError:
            pass

    @FUZZ
    @given(st.sampled_from(VALID), MUTATIONS)
    def test_mutated_packages(self, data, mutations):
        parse_or_refuse(mutate(data, mutations))

    @FUZZ
    @given(
        st.sampled_from(VALID),
        st.integers(min_value=0, max_value=400),
        st.sampled_from([b"\x7f\xff", b"\xbf\xff\xff\xff", b"\xc0"]),
    )
    def test_huge_lengths_spliced_in(self, data, pos, length):
        i = pos % len(data)
        parse_or_refuse(data[:i] + length + data[i:])
