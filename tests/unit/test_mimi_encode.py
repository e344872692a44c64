"""Tests for fedserver_mimi.encode, the encoder of framed MLS messages."""

from __future__ import annotations

import nacl.exceptions
import nacl.signing
import pytest

from fedserver_mimi.codec import MLSDecodeError, Reader
from fedserver_mimi.encode import (
    EMPTY_VECTOR,
    KeyPackageSpec,
    encode_basic_credential,
    encode_capabilities,
    encode_commit,
    encode_commit_source,
    encode_extensions,
    encode_group_context,
    encode_key_package_source,
    encode_leaf_node,
    encode_proposal_by_reference,
    encode_proposal_by_value,
    encode_remove_proposal,
    encode_update_path,
    encode_update_path_node,
    encode_x509_credential,
    make_group_info,
    make_key_package,
    make_private_message,
    make_public_commit,
    make_public_message,
    make_public_proposal,
    make_welcome,
    mls_message,
    optional,
    sign_content,
    sign_with_label,
    u8,
    u16,
    u16_list,
    u32,
    u64,
    varint,
    vec,
)
from fedserver_mimi.keypackage import (
    Capabilities,
    Credential,
    Extension,
    Lifetime,
    parse_key_package,
    parse_key_package_message,
    verify_key_package_signature,
    verify_leaf_node_signature,
)
from fedserver_mimi.messages import (
    CONTENT_APPLICATION,
    CONTENT_COMMIT,
    CONTENT_PROPOSAL,
    PROPOSAL_REMOVE,
    SENDER_EXTERNAL,
    SENDER_MEMBER,
    SENDER_NEW_MEMBER_COMMIT,
    SENDER_NEW_MEMBER_PROPOSAL,
    WIRE_FORMAT_PRIVATE_MESSAGE,
    WIRE_FORMAT_PUBLIC_MESSAGE,
    HandshakeSummary,
    WelcomeSummary,
    key_package_ref,
    parse_group_info,
    parse_handshake,
    parse_welcome,
    verify_group_info_signature,
)

KEY = nacl.signing.SigningKey(b"\x03" * 32)
OTHER_KEY = nacl.signing.SigningKey(b"\x04" * 32)
GROUP = b"room-42"
LIFETIME = {"not_before": 1_700_000_000, "not_after": 1_700_086_400}


class TestPrimitives:
    @pytest.mark.parametrize(
        ("n", "encoded"),
        [
            (0, "00"),
            (37, "25"),
            (63, "3f"),
            (64, "4040"),
            (15293, "7bbd"),
            (16383, "7fff"),
            (16384, "80004000"),
            (494878333, "9d7f3e7d"),
            (2**30 - 1, "bfffffff"),
        ],
    )
    def test_varint(self, n, encoded):
        """The examples of RFC 9000 section A.1 that fit MLS's 1-, 2- and 4-byte forms, and the edges."""
        assert varint(n).hex() == encoded
        assert Reader(varint(n)).varint("x") == n

    @pytest.mark.parametrize("n", [-1, 2**30])
    def test_varint_out_of_range(self, n):
        with pytest.raises(ValueError):
            varint(n)

    def test_vec_and_integers(self):
        assert vec(b"") == b"\x00"
        assert vec(b"ab") == b"\x02ab"
        assert vec(b"x" * 100) == b"\x40\x64" + b"x" * 100
        assert EMPTY_VECTOR == vec(b"")
        assert (u8(1), u16(0x0102), u32(0x01020304), u64(1)) == (
            b"\x01",
            b"\x01\x02",
            b"\x01\x02\x03\x04",
            b"\x00" * 7 + b"\x01",
        )
        assert optional(None) == b"\x00"
        assert optional(b"\x05x") == b"\x01\x05x"
        assert u16_list([1, 0xABCD]) == b"\x04\x00\x01\xab\xcd"
        assert encode_extensions([(3, b"ab"), (10, b"")]) == b"\x08\x00\x03\x02ab\x00\x0a\x00"
        assert mls_message(4, b"body") == b"\x00\x01\x00\x04body"

    def test_sign_content(self):
        """SignContent of RFC 9420 section 5.1.2, spelled out by hand."""
        assert sign_content(b"GroupInfoTBS", b"abc") == bytes([20]) + b"MLS 1.0 GroupInfoTBS" + b"\x03abc"
        signature = sign_with_label(KEY, b"LeafNodeTBS", b"content")
        KEY.verify_key.verify(b"\x13MLS 1.0 LeafNodeTBS\x07content", signature)


class TestKeyPackages:
    def test_basic(self):
        data = make_key_package(KEY, identity=b"alice@example.com", **LIFETIME)
        assert data[:4] == b"\x00\x01\x00\x05"
        kp = parse_key_package_message(data)
        assert verify_key_package_signature(kp)
        assert verify_leaf_node_signature(kp)
        assert kp.cipher_suite == 1
        assert kp.credential == Credential(1, identity=b"alice@example.com")
        assert kp.lifetime == Lifetime(1_700_000_000, 1_700_086_400)
        assert kp.leaf_node.capabilities == Capabilities((1,), (1,), (), (), (1,))
        assert kp.leaf_node.signature_key == bytes(KEY.verify_key)
        assert len(kp.init_key) == len(kp.leaf_node.encryption_key) == 32
        assert kp.init_key != kp.leaf_node.encryption_key
        assert kp.extensions == kp.leaf_node.extensions == ()

    def test_fresh_keys(self):
        one = parse_key_package_message(make_key_package(KEY, identity=b"a", **LIFETIME))
        two = parse_key_package_message(make_key_package(KEY, identity=b"a", **LIFETIME))
        assert one.init_key != two.init_key
        assert one.leaf_node.encryption_key != two.leaf_node.encryption_key

    def test_bare_x509_suite_3(self):
        certs = [b"\x30\x82" + b"c" * 400, b"\x30\x81" + b"d" * 130]
        data = make_key_package(
            KEY,
            certificates=certs,
            cipher_suite=3,
            init_key=b"\x01" * 32,
            encryption_key=b"\x02" * 32,
            extensions=[(0x000A, b"last resort")],
            leaf_extensions=[(0xF001, b"app"), (0x0001, b"id")],
            wrap=False,
            **LIFETIME,
        )
        kp = parse_key_package(data)
        assert kp.raw == data
        assert verify_key_package_signature(kp) and verify_leaf_node_signature(kp)
        assert kp.cipher_suite == 3
        assert kp.credential == Credential(2, certificates=tuple(certs))
        assert (kp.init_key, kp.leaf_node.encryption_key) == (b"\x01" * 32, b"\x02" * 32)
        assert kp.extensions == (Extension(0x000A, b"last resort"),)
        assert kp.leaf_node.extensions == (Extension(0xF001, b"app"), Extension(0x0001, b"id"))
        assert kp.leaf_node.capabilities == Capabilities((1,), (3,), (0x0001, 0xF001), (), (2,))

    def test_capabilities_given(self):
        caps = Capabilities((1,), (1, 3), (5,), (7,), (1, 2))
        kp = parse_key_package_message(make_key_package(KEY, identity=b"a", capabilities=caps, **LIFETIME))
        assert kp.leaf_node.capabilities == caps

    @pytest.mark.parametrize("suite", [0, 2, 4, 5, 6, 7, 0xF000])
    def test_only_ed25519_suites(self, suite):
        with pytest.raises(ValueError, match="Ed25519"):
            make_key_package(KEY, identity=b"a", cipher_suite=suite, **LIFETIME)

    @pytest.mark.parametrize(
        ("kwargs", "match"),
        [
            ({}, "either an identity"),
            ({"identity": b"a", "certificates": [b"\x30"]}, "either an identity"),
            ({"certificates": [b"\x30", b""]}, "empty certificate"),
            ({"identity": b"a", "not_before": 2, "not_after": 1}, "lifetime"),
            ({"identity": b"a", "not_before": -1, "not_after": 1}, "lifetime"),
            ({"identity": b"a", "init_key": b"k" * 31}, "init_key has 31 bytes"),
            ({"identity": b"a", "encryption_key": b"k" * 33}, "encryption_key has 33 bytes"),
            ({"identity": b"a", "init_key": b"k" * 32, "encryption_key": b"k" * 32}, "must differ"),
        ],
    )
    def test_refused(self, kwargs, match):
        with pytest.raises(ValueError, match=match):
            make_key_package(KEY, **{**LIFETIME, **kwargs})

    def test_spec(self):
        """KeyPackageSpec's pieces are those the parser finds."""
        spec = KeyPackageSpec(
            signing_key=KEY,
            init_key=b"\x01" * 32,
            encryption_key=b"\x02" * 32,
            credential=encode_basic_credential(b"bob"),
            capabilities=encode_capabilities(Capabilities((1,), (1,), (), (), (1,))),
            source=encode_key_package_source(1, 2),
        )
        kp = parse_key_package(spec.encode())
        assert kp.to_be_signed == spec.to_be_signed()
        assert kp.leaf_node.to_be_signed + vec(kp.leaf_node.signature) == spec.leaf_node()
        assert parse_key_package_message(spec.message()) == kp
        assert verify_key_package_signature(kp) and verify_leaf_node_signature(kp)

    def test_x509_credential_encoding(self):
        assert encode_x509_credential([b"ab", b"c"]) == b"\x00\x02\x05\x02ab\x01c"


class TestGroupInfo:
    def test_round_trip(self):
        data = make_group_info(
            KEY,
            group_id=GROUP,
            epoch=7,
            signer=2,
            tree_hash=b"t" * 32,
            confirmed_transcript_hash=b"h" * 32,
            group_context_extensions=[(3, b"\x00\x00\x00")],
            extensions=[(2, b"tree"), (4, b"x" * 32)],
            confirmation_tag=b"c" * 32,
        )
        info = parse_group_info(data)
        assert (info.version, info.cipher_suite, info.group_id, info.epoch, info.signer) == (1, 1, GROUP, 7, 2)
        assert info.group_context_extensions == (Extension(3, b"\x00\x00\x00"),)
        assert info.extensions == (Extension(2, b"tree"), Extension(4, b"x" * 32))
        context = encode_group_context(
            cipher_suite=1,
            group_id=GROUP,
            epoch=7,
            tree_hash=b"t" * 32,
            confirmed_transcript_hash=b"h" * 32,
            extensions=[(3, b"\x00\x00\x00")],
        )
        tbs = context + encode_extensions([(2, b"tree"), (4, b"x" * 32)]) + vec(b"c" * 32) + u32(2)
        assert info.to_be_signed == tbs
        assert data == mls_message(4, tbs + vec(info.signature))
        # Checked by hand too, not only with the module's own verifier.
        KEY.verify_key.verify(b"\x14MLS 1.0 GroupInfoTBS" + varint(len(tbs)) + tbs, info.signature)
        assert verify_group_info_signature(info, bytes(KEY.verify_key))
        assert not verify_group_info_signature(info, bytes(OTHER_KEY.verify_key))

    def test_defaults_are_random_hashes(self):
        one = parse_group_info(make_group_info(KEY, group_id=GROUP, epoch=0, cipher_suite=3))
        two = parse_group_info(make_group_info(KEY, group_id=GROUP, epoch=0, cipher_suite=3))
        assert one.cipher_suite == 3
        assert one.to_be_signed != two.to_be_signed
        assert len(one.to_be_signed) == len(two.to_be_signed)
        assert verify_group_info_signature(one, bytes(KEY.verify_key))

    def test_only_ed25519_suites(self):
        with pytest.raises(ValueError, match="Ed25519"):
            make_group_info(KEY, group_id=GROUP, epoch=0, cipher_suite=2)


class TestPublicMessages:
    def test_commit_bytes(self):
        """An empty commit, spelled out field by field."""
        data = make_public_commit(
            group_id=GROUP,
            epoch=9,
            sender_index=3,
            authenticated_data=b"ad",
            signature=b"s" * 64,
            confirmation_tag=b"c" * 32,
            membership_tag=b"m" * 32,
        )
        expected = (
            b"\x00\x01\x00\x01"  # mls10, mls_public_message
            + b"\x07room-42"
            + (9).to_bytes(8, "big")
            + b"\x01\x00\x00\x00\x03"  # member, leaf 3
            + b"\x02ad"
            + b"\x03"  # commit
            + b"\x00\x00"  # no proposals, no path
            + b"\x40\x40" + b"s" * 64
            + b"\x20" + b"c" * 32
            + b"\x20" + b"m" * 32
        )
        assert data == expected
        assert parse_handshake(data) == HandshakeSummary(
            WIRE_FORMAT_PUBLIC_MESSAGE, GROUP, 9, CONTENT_COMMIT, sender_type=SENDER_MEMBER, sender_index=3
        )

    def test_signed_by_member(self):
        context = encode_group_context(
            cipher_suite=1, group_id=GROUP, epoch=9, tree_hash=b"t" * 32, confirmed_transcript_hash=b"h" * 32
        )
        proposal = encode_remove_proposal(1)
        data = make_public_proposal(
            group_id=GROUP, epoch=9, proposal=proposal, signing_key=KEY, group_context=context, membership_tag=b"m"
        )
        framed = vec(GROUP) + u64(9) + b"\x01" + u32(0) + EMPTY_VECTOR + b"\x02" + proposal
        assert data[4 : 4 + len(framed)] == framed
        signature = data[4 + len(framed) + 2 : -2]
        tbs = b"\x00\x01\x00\x01" + framed + context
        KEY.verify_key.verify(sign_content(b"FramedContentTBS", tbs), signature)
        with pytest.raises(nacl.exceptions.BadSignatureError):
            KEY.verify_key.verify(sign_content(b"FramedContentTBS", tbs[:-1]), signature)
        assert parse_handshake(data).proposal_type == PROPOSAL_REMOVE

    def test_signed_by_external_sender(self):
        """An external sender's signature covers no GroupContext."""
        proposal = encode_remove_proposal(1)
        data = make_public_proposal(
            group_id=GROUP, epoch=1, proposal=proposal, sender_type=SENDER_EXTERNAL, sender_index=0, signing_key=KEY
        )
        framed = vec(GROUP) + u64(1) + b"\x02" + u32(0) + EMPTY_VECTOR + b"\x02" + proposal
        assert data == mls_message(1, framed + vec(data[-64:]))
        KEY.verify_key.verify(sign_content(b"FramedContentTBS", b"\x00\x01\x00\x01" + framed), data[-64:])
        assert parse_handshake(data).sender_type == SENDER_EXTERNAL

    @pytest.mark.parametrize("sender_type", [SENDER_MEMBER, SENDER_NEW_MEMBER_COMMIT])
    def test_signature_needs_group_context(self, sender_type):
        with pytest.raises(ValueError, match="GroupContext"):
            make_public_commit(group_id=GROUP, epoch=1, sender_type=sender_type, signing_key=KEY)

    def test_new_member_proposal_has_no_index_or_tag(self):
        kp = make_key_package(KEY, identity=b"n", wrap=False, **LIFETIME)
        data = make_public_proposal(
            group_id=GROUP, epoch=1, proposal=u16(1) + kp, sender_type=SENDER_NEW_MEMBER_PROPOSAL, signature=b"s"
        )
        assert data.endswith(kp + b"\x01s")
        assert parse_handshake(data).sender_type == SENDER_NEW_MEMBER_PROPOSAL

    def test_commit_with_path_and_references(self):
        leaf = encode_leaf_node(
            KEY,
            encryption_key=b"e" * 32,
            credential=encode_basic_credential(b"alice"),
            capabilities=encode_capabilities(Capabilities((1,), (1,), (), (), (1,))),
            source=encode_commit_source(b"p" * 32),
            group_id=GROUP,
            leaf_index=1,
        )
        path = encode_update_path(leaf, [encode_update_path_node(b"n" * 32, [(b"k" * 32, b"c" * 48)])])
        proposals = [encode_proposal_by_reference(b"r" * 32), encode_proposal_by_value(encode_remove_proposal(4))]
        data = make_public_commit(group_id=GROUP, epoch=2, proposals=proposals, path=path, sender_index=1)
        assert encode_commit(proposals, path) in data
        assert parse_handshake(data).content_type == CONTENT_COMMIT
        # The leaf node's signature covers the group and the leaf index (LeafNodeTBS, commit source).
        tbs, signature = leaf[:-66], leaf[-64:]
        KEY.verify_key.verify(sign_content(b"LeafNodeTBS", tbs + vec(GROUP) + u32(1)), signature)

    def test_application(self):
        data = make_public_message(group_id=GROUP, epoch=1, content_type=CONTENT_APPLICATION, content=vec(b"hi"))
        summary = parse_handshake(data, allow_public_application=True)
        assert (summary.content_type, summary.sender_type) == (CONTENT_APPLICATION, SENDER_MEMBER)

    def test_unknown_content_type(self):
        with pytest.raises(ValueError, match="content type 4"):
            make_public_message(group_id=GROUP, epoch=1, content_type=4, content=b"")


class TestPrivateMessages:
    def test_round_trip(self):
        data = make_private_message(
            group_id=GROUP,
            epoch=3,
            content_type=CONTENT_PROPOSAL,
            authenticated_data=b"ad",
            encrypted_sender_data=b"s" * 28,
            ciphertext=b"c" * 10,
        )
        expected = b"\x00\x01\x00\x02\x07room-42" + u64(3) + b"\x02\x02ad\x1c" + b"s" * 28 + b"\x0a" + b"c" * 10
        assert data == expected
        assert parse_handshake(data) == HandshakeSummary(WIRE_FORMAT_PRIVATE_MESSAGE, GROUP, 3, CONTENT_PROPOSAL)

    def test_random_fields(self):
        one = make_private_message(group_id=GROUP, epoch=3)
        two = make_private_message(group_id=GROUP, epoch=3)
        assert one != two
        assert len(one) == 4 + 8 + 8 + 1 + 1 + 29 + 2 + 96
        assert parse_handshake(one).content_type == CONTENT_APPLICATION

    def test_refused(self):
        with pytest.raises(ValueError, match="content type 0"):
            make_private_message(group_id=GROUP, epoch=1, content_type=0)
        with pytest.raises(ValueError, match="never empty"):
            make_private_message(group_id=GROUP, epoch=1, ciphertext=b"")


class TestWelcome:
    @pytest.mark.parametrize("suite", [1, 3])
    def test_for_key_packages(self, suite):
        refs = []
        for name in (b"bob", b"carol"):
            data = make_key_package(KEY, identity=name, cipher_suite=suite, **LIFETIME)
            refs.append(key_package_ref(parse_key_package_message(data)))
        welcome = make_welcome(cipher_suite=suite, key_package_refs=refs, encrypted_group_info=b"egi")
        assert parse_welcome(welcome) == WelcomeSummary(suite, tuple(refs))
        assert welcome.endswith(b"\x03egi")

    @pytest.mark.parametrize(("suite", "ref_size", "kem_size"), [(2, 32, 65), (4, 64, 56), (5, 64, 133), (7, 48, 97)])
    def test_suite_sizes(self, suite, ref_size, kem_size):
        welcome = make_welcome(cipher_suite=suite, key_package_refs=[b"r" * ref_size])
        assert parse_welcome(welcome) == WelcomeSummary(suite, (b"r" * ref_size,))
        assert vec(b"r" * ref_size) + varint(kem_size) in welcome

    def test_unknown_suite(self):
        assert parse_welcome(make_welcome(cipher_suite=0xF000, key_package_refs=[b"r" * 5])).new_members == (
            b"r" * 5,
        )

    @pytest.mark.parametrize(
        ("refs", "match"), [([], "at least one"), ([b"r" * 31], "has 32 bytes"), ([b""], "has 32 bytes")]
    )
    def test_refused(self, refs, match):
        with pytest.raises(ValueError, match=match):
            make_welcome(cipher_suite=1, key_package_refs=refs)
        with pytest.raises(ValueError, match="never empty"):
            make_welcome(cipher_suite=1, key_package_refs=[b"r" * 32], encrypted_group_info=b"")


def test_low_level_helpers_build_malformed_structures():
    """The unchecked helpers make what the parsers refuse, for negative tests."""
    bad = make_welcome(cipher_suite=1, key_package_refs=[b"r" * 32])
    with pytest.raises(MLSDecodeError):
        parse_welcome(bad[:-1])
    with pytest.raises(MLSDecodeError, match="external senders send proposals"):
        parse_handshake(make_public_commit(group_id=GROUP, epoch=1, sender_type=SENDER_EXTERNAL))
    with pytest.raises(MLSDecodeError, match="is before not_before"):
        spec = KeyPackageSpec(
            signing_key=KEY,
            init_key=b"\x01" * 32,
            encryption_key=b"\x02" * 32,
            credential=encode_basic_credential(b"x"),
            capabilities=encode_capabilities(Capabilities((1,), (1,), (), (), (1,))),
            source=encode_key_package_source(5, 4),
        )
        parse_key_package(spec.encode())
