"""
An encoder of correctly framed RFC 9420 (MLS 1.0) messages, for MLS-less
application servers in examples, benchmarks and tests.

The MIMI gateway never decrypts anything, so a server (or a test) that speaks
to it without an MLS implementation needs only messages that are framed
exactly as RFC 9420 says, with whatever it cannot compute filled in.  This
module builds them:

  - KeyPackages (L{make_key_package}, or the lower-level L{KeyPackageSpec}),
    really signed with Ed25519 (SignWithLabel, for the LeafNode and for the
    KeyPackage), so they parse with L{fedserver_mimi.keypackage} and verify;
  - GroupInfos (L{make_group_info}), really signed ("GroupInfoTBS");
  - PublicMessages (L{make_public_message}, L{make_public_proposal},
    L{make_public_commit}), with proposals and commits built from the
    C{encode_*} helpers, optionally signed ("FramedContentTBS");
  - PrivateMessages (L{make_private_message}) and Welcomes
    (L{make_welcome}).

B{The cryptography an MLS group would need is not done here.}  Encrypted
fields (a PrivateMessage's sender data and ciphertext, a Welcome's
kem_outputs, ciphertexts and encrypted GroupInfo, an UpdatePath's
ciphertexts) are whatever the caller passes, or random bytes of a plausible
size; so are hashes and MACs that need group secrets or state (tree_hash,
confirmed_transcript_hash, confirmation_tag, membership_tag).  No member of a
real group could process these messages; a delivery service that only reads
their framing, like the gateway, cannot tell.

The low-level helpers (L{u8}, L{u16}, L{u32}, L{u64}, L{varint}, L{vec},
L{optional}, the C{encode_*} functions, L{KeyPackageSpec}) check nothing, so
tests can build malformed structures with them too; the C{make_*} functions
refuse arguments that would not give a valid message.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Optional

import attrs
import nacl.public
import nacl.signing

from fedserver_mimi.codec import KEY_SIZES, hash_size, sign_content, varint, vec
from fedserver_mimi.keypackage import (
    CREDENTIAL_BASIC,
    CREDENTIAL_X509,
    LEAF_NODE_SOURCE_COMMIT,
    LEAF_NODE_SOURCE_KEY_PACKAGE,
    LEAF_NODE_SOURCE_UPDATE,
    MLS10,
    WIRE_FORMAT_KEY_PACKAGE,
    Capabilities,
)
from fedserver_mimi.messages import (
    CONTENT_APPLICATION,
    CONTENT_COMMIT,
    CONTENT_PROPOSAL,
    CONTENT_TYPE_NAMES,
    PROPOSAL_ADD,
    PROPOSAL_EXTERNAL_INIT,
    PROPOSAL_GROUP_CONTEXT_EXTENSIONS,
    PROPOSAL_PSK,
    PROPOSAL_REINIT,
    PROPOSAL_REMOVE,
    PROPOSAL_UPDATE,
    PSK_EXTERNAL,
    PSK_RESUMPTION,
    SENDER_EXTERNAL,
    SENDER_MEMBER,
    SENDER_NEW_MEMBER_COMMIT,
    WIRE_FORMAT_GROUP_INFO,
    WIRE_FORMAT_PRIVATE_MESSAGE,
    WIRE_FORMAT_PUBLIC_MESSAGE,
    WIRE_FORMAT_WELCOME,
)

__all__ = [
    "EMPTY_VECTOR",
    "ExtensionList",
    "KeyPackageSpec",
    "encode_add_proposal",
    "encode_basic_credential",
    "encode_capabilities",
    "encode_commit",
    "encode_commit_source",
    "encode_extensions",
    "encode_external_init_proposal",
    "encode_external_psk_id",
    "encode_group_context",
    "encode_group_context_extensions_proposal",
    "encode_hpke_ciphertext",
    "encode_key_package_source",
    "encode_leaf_node",
    "encode_proposal_by_reference",
    "encode_proposal_by_value",
    "encode_psk_proposal",
    "encode_reinit_proposal",
    "encode_remove_proposal",
    "encode_resumption_psk_id",
    "encode_update_path",
    "encode_update_path_node",
    "encode_update_proposal",
    "encode_update_source",
    "encode_x509_credential",
    "make_group_info",
    "make_key_package",
    "make_private_message",
    "make_public_commit",
    "make_public_message",
    "make_public_proposal",
    "make_welcome",
    "mls_message",
    "optional",
    "sign_content",
    "sign_with_label",
    "u8",
    "u16",
    "u16_list",
    "u32",
    "u64",
    "varint",
    "vec",
]

#: An empty vector (a zero length): an empty extension list, for instance.
EMPTY_VECTOR = b"\x00"

#: Extensions as (extension_type, extension_data) pairs.
ExtensionList = Sequence[tuple[int, bytes]]

# The cipher suites whose signature scheme is Ed25519, the one this module signs with.
_ED25519_SUITES = (1, 3)

# Sizes of the random stand-ins for what cannot be computed here.
_SIGNATURE_SIZE = 64  # Ed25519
_SENDER_DATA_SIZE = 28  # SenderData (4 + 4 + 4 bytes) plus a 16-byte AEAD tag
_PRIVATE_CIPHERTEXT_SIZE = 96
_GROUP_INFO_CIPHERTEXT_SIZE = 256


# -- Primitives (RFC 9420 section 2.1)


def u8(n: int) -> bytes:
    """C{n} as a uint8."""
    return n.to_bytes(1, "big")


def u16(n: int) -> bytes:
    """C{n} as a uint16."""
    return n.to_bytes(2, "big")


def u32(n: int) -> bytes:
    """C{n} as a uint32."""
    return n.to_bytes(4, "big")


def u64(n: int) -> bytes:
    """C{n} as a uint64."""
    return n.to_bytes(8, "big")


def optional(value: Optional[bytes]) -> bytes:
    """An optional<T>: the presence octet, then the encoded C{value} if present."""
    return b"\x00" if value is None else b"\x01" + value


def u16_list(values: Sequence[int]) -> bytes:
    """A uint16 values<V>."""
    return vec(b"".join(u16(v) for v in values))


def sign_with_label(signing_key: nacl.signing.SigningKey, label: bytes, content: bytes) -> bytes:
    """SignWithLabel (RFC 9420 section 5.1.2) with an Ed25519 key: the 64-byte signature."""
    return signing_key.sign(sign_content(label, content)).signature


def mls_message(wire_format: int, body: bytes, version: int = MLS10) -> bytes:
    """An MLSMessage: version, wire_format, then the encoded C{body}."""
    return u16(version) + u16(wire_format) + body


# -- Structures


def encode_extensions(extensions: ExtensionList) -> bytes:
    """An Extension extensions<V> list."""
    return vec(b"".join(u16(t) + vec(d) for t, d in extensions))


def encode_basic_credential(identity: bytes) -> bytes:
    """A basic Credential."""
    return u16(CREDENTIAL_BASIC) + vec(identity)


def encode_x509_credential(certificates: Sequence[bytes]) -> bytes:
    """An x509 Credential: DER certificates, leaf first."""
    return u16(CREDENTIAL_X509) + vec(b"".join(vec(c) for c in certificates))


def encode_capabilities(capabilities: Capabilities) -> bytes:
    """Capabilities."""
    return (
        u16_list(capabilities.versions)
        + u16_list(capabilities.cipher_suites)
        + u16_list(capabilities.extensions)
        + u16_list(capabilities.proposals)
        + u16_list(capabilities.credentials)
    )


def encode_key_package_source(not_before: int, not_after: int) -> bytes:
    """leaf_node_source key_package and its Lifetime."""
    return u8(LEAF_NODE_SOURCE_KEY_PACKAGE) + u64(not_before) + u64(not_after)


def encode_update_source() -> bytes:
    """leaf_node_source update (nothing follows it)."""
    return u8(LEAF_NODE_SOURCE_UPDATE)


def encode_commit_source(parent_hash: bytes) -> bytes:
    """leaf_node_source commit and its parent_hash."""
    return u8(LEAF_NODE_SOURCE_COMMIT) + vec(parent_hash)


def encode_leaf_node(
    signing_key: nacl.signing.SigningKey,
    *,
    encryption_key: bytes,
    credential: bytes,
    capabilities: bytes,
    source: bytes,
    extensions: bytes = EMPTY_VECTOR,
    signature_key: Optional[bytes] = None,
    group_id: Optional[bytes] = None,
    leaf_index: int = 0,
    signature: Optional[bytes] = None,
) -> bytes:
    """
    A LeafNode (RFC 9420 section 7.2), signed with SignWithLabel(.,
    "LeafNodeTBS", LeafNodeTBS).

    @param credential: the encoded Credential (L{encode_basic_credential}).
    @param capabilities: the encoded Capabilities.
    @param source: the encoded leaf_node_source and what its select adds
        (L{encode_key_package_source}, L{encode_update_source},
        L{encode_commit_source}).
    @param extensions: the encoded extension list.
    @param signature_key: the signature_key field; by default the public key
        of C{signing_key}.
    @param group_id: for the update and commit sources, the group the leaf is
        in, which LeafNodeTBS covers with C{leaf_index}.
    @param signature: the signature field instead of a real one.
    """
    if signature_key is None:
        signature_key = bytes(signing_key.verify_key)
    body = vec(encryption_key) + vec(signature_key) + credential + capabilities + source + extensions
    if signature is None:
        tbs = body if group_id is None else body + vec(group_id) + u32(leaf_index)
        signature = sign_with_label(signing_key, b"LeafNodeTBS", tbs)
    return body + vec(signature)


def encode_group_context(
    *,
    cipher_suite: int,
    group_id: bytes,
    epoch: int,
    tree_hash: bytes,
    confirmed_transcript_hash: bytes,
    extensions: ExtensionList = (),
    version: int = MLS10,
) -> bytes:
    """A GroupContext (RFC 9420 section 8.1)."""
    return (
        u16(version)
        + u16(cipher_suite)
        + vec(group_id)
        + u64(epoch)
        + vec(tree_hash)
        + vec(confirmed_transcript_hash)
        + encode_extensions(extensions)
    )


def encode_hpke_ciphertext(kem_output: bytes, ciphertext: bytes) -> bytes:
    """An HPKECiphertext."""
    return vec(kem_output) + vec(ciphertext)


# -- Proposals and commits (RFC 9420 section 12)


def encode_add_proposal(key_package: bytes) -> bytes:
    """An Add Proposal of a bare encoded KeyPackage (not an MLSMessage)."""
    return u16(PROPOSAL_ADD) + key_package


def encode_update_proposal(leaf_node: bytes) -> bytes:
    """An Update Proposal of an encoded LeafNode (its source is update)."""
    return u16(PROPOSAL_UPDATE) + leaf_node


def encode_remove_proposal(removed: int) -> bytes:
    """A Remove Proposal of the leaf C{removed}."""
    return u16(PROPOSAL_REMOVE) + u32(removed)


def encode_external_psk_id(psk_id: bytes, psk_nonce: bytes) -> bytes:
    """A PreSharedKeyID of an external PSK."""
    return u8(PSK_EXTERNAL) + vec(psk_id) + vec(psk_nonce)


def encode_resumption_psk_id(usage: int, psk_group_id: bytes, psk_epoch: int, psk_nonce: bytes) -> bytes:
    """A PreSharedKeyID of a resumption PSK (usage: 1 application, 2 reinit, 3 branch)."""
    return u8(PSK_RESUMPTION) + u8(usage) + vec(psk_group_id) + u64(psk_epoch) + vec(psk_nonce)


def encode_psk_proposal(psk_id: bytes) -> bytes:
    """A PreSharedKey Proposal of an encoded PreSharedKeyID."""
    return u16(PROPOSAL_PSK) + psk_id


def encode_reinit_proposal(
    *, group_id: bytes, version: int = MLS10, cipher_suite: int = 1, extensions: ExtensionList = ()
) -> bytes:
    """A ReInit Proposal."""
    return u16(PROPOSAL_REINIT) + vec(group_id) + u16(version) + u16(cipher_suite) + encode_extensions(extensions)


def encode_external_init_proposal(kem_output: bytes) -> bytes:
    """An ExternalInit Proposal."""
    return u16(PROPOSAL_EXTERNAL_INIT) + vec(kem_output)


def encode_group_context_extensions_proposal(extensions: ExtensionList) -> bytes:
    """A GroupContextExtensions Proposal."""
    return u16(PROPOSAL_GROUP_CONTEXT_EXTENSIONS) + encode_extensions(extensions)


def encode_proposal_by_value(proposal: bytes) -> bytes:
    """A ProposalOrRef carrying an encoded Proposal."""
    return u8(1) + proposal


def encode_proposal_by_reference(reference: bytes) -> bytes:
    """A ProposalOrRef carrying a ProposalRef."""
    return u8(2) + vec(reference)


def encode_update_path_node(encryption_key: bytes, encrypted_path_secret: Sequence[tuple[bytes, bytes]]) -> bytes:
    """An UpdatePathNode: a public key and (kem_output, ciphertext) pairs."""
    return vec(encryption_key) + vec(b"".join(encode_hpke_ciphertext(k, c) for k, c in encrypted_path_secret))


def encode_update_path(leaf_node: bytes, nodes: Sequence[bytes]) -> bytes:
    """An UpdatePath of an encoded LeafNode (its source is commit) and encoded UpdatePathNodes."""
    return leaf_node + vec(b"".join(nodes))


def encode_commit(proposals: Sequence[bytes] = (), path: Optional[bytes] = None) -> bytes:
    """A Commit of encoded ProposalOrRefs and an optional encoded UpdatePath."""
    return vec(b"".join(proposals)) + optional(path)


# -- KeyPackages (RFC 9420 section 10)


@attrs.frozen
class KeyPackageSpec:
    """
    The parts of a KeyPackage, most already encoded, which L{encode} puts
    together and signs with Ed25519 (SignWithLabel, "LeafNodeTBS" and
    "KeyPackageTBS").  Nothing is checked: tests build malformed packages
    with it.  L{make_key_package} is the checked way to a valid one.

    @ivar signing_key: signs the leaf node and the package.
    @ivar init_key: the HPKE init_key.
    @ivar encryption_key: the leaf node's HPKE encryption_key.
    @ivar credential: the encoded Credential.
    @ivar capabilities: the encoded Capabilities.
    @ivar source: the encoded leaf_node_source and Lifetime
        (L{encode_key_package_source}).
    @ivar signature_key: the leaf's signature_key; by default that of
        C{signing_key}.
    @ivar leaf_extensions: the leaf node's encoded extension list.
    @ivar extensions: the KeyPackage's encoded extension list.
    @ivar leaf_signature: the leaf node's signature instead of a real one.
    @ivar signature: the KeyPackage's signature instead of a real one.
    """

    signing_key: nacl.signing.SigningKey
    init_key: bytes
    encryption_key: bytes
    credential: bytes
    capabilities: bytes
    source: bytes
    version: int = MLS10
    cipher_suite: int = 1
    signature_key: Optional[bytes] = None
    leaf_extensions: bytes = EMPTY_VECTOR
    extensions: bytes = EMPTY_VECTOR
    leaf_signature: Optional[bytes] = None
    signature: Optional[bytes] = None

    def leaf_node(self) -> bytes:
        """The encoded LeafNode."""
        return encode_leaf_node(
            self.signing_key,
            encryption_key=self.encryption_key,
            credential=self.credential,
            capabilities=self.capabilities,
            source=self.source,
            extensions=self.leaf_extensions,
            signature_key=self.signature_key,
            signature=self.leaf_signature,
        )

    def to_be_signed(self) -> bytes:
        """The encoded KeyPackageTBS."""
        return u16(self.version) + u16(self.cipher_suite) + vec(self.init_key) + self.leaf_node() + self.extensions

    def encode(self) -> bytes:
        """The bare encoded KeyPackage."""
        tbs = self.to_be_signed()
        signature = self.signature
        if signature is None:
            signature = sign_with_label(self.signing_key, b"KeyPackageTBS", tbs)
        return tbs + vec(signature)

    def message(self) -> bytes:
        """The KeyPackage in an MLSMessage (wire format mls_key_package)."""
        return mls_message(WIRE_FORMAT_KEY_PACKAGE, self.encode())


def _x25519_public_key() -> bytes:
    return bytes(nacl.public.PrivateKey.generate().public_key)


def _check_ed25519_suite(cipher_suite: int) -> None:
    if cipher_suite not in _ED25519_SUITES:
        raise ValueError(f"cipher suite {cipher_suite} does not sign with Ed25519; only suites 1 and 3 are supported")


def make_key_package(
    signing_key: nacl.signing.SigningKey,
    *,
    identity: Optional[bytes] = None,
    certificates: Sequence[bytes] = (),
    cipher_suite: int = 1,
    not_before: int,
    not_after: int,
    init_key: Optional[bytes] = None,
    encryption_key: Optional[bytes] = None,
    capabilities: Optional[Capabilities] = None,
    extensions: ExtensionList = (),
    leaf_extensions: ExtensionList = (),
    wrap: bool = True,
) -> bytes:
    """
    A valid KeyPackage, signed by C{signing_key} (an Ed25519 key, so for
    cipher suites 1 and 3 only).

    @param identity: for a basic credential, the identity.
    @param certificates: for an x509 credential, DER certificates, leaf first
        (the leaf's key should be C{signing_key}'s; that is not checked).
    @param not_before: the start of the lifetime, Unix seconds.
    @param not_after: the end of the lifetime, Unix seconds.
    @param init_key: the HPKE init_key; by default a fresh X25519 public key.
    @param encryption_key: the leaf's HPKE encryption_key; by default a
        fresh X25519 public key.
    @param capabilities: by default version mls10, the package's cipher
        suite, the types of C{leaf_extensions}, no proposals and the
        credential's type.
    @param extensions: the KeyPackage's extensions.
    @param leaf_extensions: the leaf node's extensions.
    @param wrap: give an MLSMessage (wire format mls_key_package) rather
        than the bare KeyPackage.
    @raise ValueError: for another cipher suite, neither or both of
        C{identity} and C{certificates}, an empty certificate, a reversed
        lifetime, keys of the wrong size, or equal init and encryption keys.
    """
    _check_ed25519_suite(cipher_suite)
    if (identity is None) == (not certificates):
        raise ValueError("give either an identity (basic credential) or certificates (x509 credential)")
    if identity is not None:
        credential, credential_type = encode_basic_credential(identity), CREDENTIAL_BASIC
    else:
        if not all(certificates):
            raise ValueError("empty certificate")
        credential, credential_type = encode_x509_credential(certificates), CREDENTIAL_X509
    if not 0 <= not_before <= not_after < 1 << 64:
        raise ValueError(f"lifetime {not_before}..{not_after} is not a range of uint64 seconds")
    init_key = _x25519_public_key() if init_key is None else init_key
    encryption_key = _x25519_public_key() if encryption_key is None else encryption_key
    hpke_size = KEY_SIZES[cipher_suite][0]
    for name, key in (("init_key", init_key), ("encryption_key", encryption_key)):
        if len(key) != hpke_size:
            raise ValueError(f"{name} has {len(key)} bytes, cipher suite {cipher_suite} uses {hpke_size}")
    if init_key == encryption_key:
        raise ValueError("init_key and encryption_key must differ")
    if capabilities is None:
        capabilities = Capabilities(
            versions=(MLS10,),
            cipher_suites=(cipher_suite,),
            extensions=tuple(sorted({t for t, _ in leaf_extensions})),
            proposals=(),
            credentials=(credential_type,),
        )
    spec = KeyPackageSpec(
        signing_key=signing_key,
        init_key=init_key,
        encryption_key=encryption_key,
        credential=credential,
        capabilities=encode_capabilities(capabilities),
        source=encode_key_package_source(not_before, not_after),
        cipher_suite=cipher_suite,
        leaf_extensions=encode_extensions(leaf_extensions),
        extensions=encode_extensions(extensions),
    )
    return spec.message() if wrap else spec.encode()


# -- GroupInfo (RFC 9420 section 12.4.3)


def _random_or(value: Optional[bytes], size: int) -> bytes:
    return os.urandom(size) if value is None else value


def make_group_info(
    signing_key: nacl.signing.SigningKey,
    *,
    group_id: bytes,
    epoch: int,
    cipher_suite: int = 1,
    signer: int = 0,
    tree_hash: Optional[bytes] = None,
    confirmed_transcript_hash: Optional[bytes] = None,
    group_context_extensions: ExtensionList = (),
    extensions: ExtensionList = (),
    confirmation_tag: Optional[bytes] = None,
) -> bytes:
    """
    An MLSMessage (wire format mls_group_info) carrying a GroupInfo signed by
    C{signing_key}, the key of the leaf C{signer}, with SignWithLabel(.,
    "GroupInfoTBS", GroupInfoTBS).

    C{tree_hash}, C{confirmed_transcript_hash} and C{confirmation_tag} are
    random hash-sized bytes unless given: they depend on group state this
    module does not have.

    @raise ValueError: for a cipher suite other than 1 and 3.
    """
    _check_ed25519_suite(cipher_suite)
    size = hash_size(cipher_suite) or 32
    context = encode_group_context(
        cipher_suite=cipher_suite,
        group_id=group_id,
        epoch=epoch,
        tree_hash=_random_or(tree_hash, size),
        confirmed_transcript_hash=_random_or(confirmed_transcript_hash, size),
        extensions=group_context_extensions,
    )
    tbs = context + encode_extensions(extensions) + vec(_random_or(confirmation_tag, size)) + u32(signer)
    return mls_message(WIRE_FORMAT_GROUP_INFO, tbs + vec(sign_with_label(signing_key, b"GroupInfoTBS", tbs)))


# -- PublicMessage and PrivateMessage (RFC 9420 section 6)


def make_public_message(
    *,
    group_id: bytes,
    epoch: int,
    content_type: int,
    content: bytes,
    sender_type: int = SENDER_MEMBER,
    sender_index: int = 0,
    authenticated_data: bytes = b"",
    signing_key: Optional[nacl.signing.SigningKey] = None,
    group_context: bytes = b"",
    signature: Optional[bytes] = None,
    confirmation_tag: Optional[bytes] = None,
    membership_tag: Optional[bytes] = None,
) -> bytes:
    """
    An MLSMessage (wire format mls_public_message) carrying a PublicMessage.

    @param content: the encoded content for C{content_type}: C{vec(data)}
        for application data, an encoded Proposal (C{encode_*_proposal}) or
        an encoded Commit (L{encode_commit}).
    @param sender_type: a SENDER_* type; C{sender_index} is the leaf index of
        a member or the index of an external sender, and unused otherwise.
    @param signing_key: signs FramedContentTBS with SignWithLabel(.,
        "FramedContentTBS", .).  For member and new_member_commit senders that
        covers the GroupContext: pass the encoded one as C{group_context}
        (L{encode_group_context}).  Without a key (and no C{signature}) the
        signature is 64 random bytes.
    @param confirmation_tag: for a commit; random 32 bytes by default.
    @param membership_tag: for a member sender; random 32 bytes by default
        (the membership key is a group secret).
    @raise ValueError: for an unknown content type, or a signing key for a
        member or new_member_commit sender without C{group_context}.
    """
    if content_type not in CONTENT_TYPE_NAMES:
        raise ValueError(f"unknown content type {content_type}")
    sender = u8(sender_type)
    if sender_type in (SENDER_MEMBER, SENDER_EXTERNAL):
        sender += u32(sender_index)
    framed = vec(group_id) + u64(epoch) + sender + vec(authenticated_data) + u8(content_type) + content
    if signature is None:
        if signing_key is None:
            signature = os.urandom(_SIGNATURE_SIZE)
        else:
            needs_context = sender_type in (SENDER_MEMBER, SENDER_NEW_MEMBER_COMMIT)
            if needs_context and not group_context:
                raise ValueError("a member's or new member's commit signature covers the GroupContext: pass it")
            tbs = u16(MLS10) + u16(WIRE_FORMAT_PUBLIC_MESSAGE) + framed + (group_context if needs_context else b"")
            signature = sign_with_label(signing_key, b"FramedContentTBS", tbs)
    auth = vec(signature)
    if content_type == CONTENT_COMMIT:
        auth += vec(_random_or(confirmation_tag, 32))
    if sender_type == SENDER_MEMBER:
        auth += vec(_random_or(membership_tag, 32))
    return mls_message(WIRE_FORMAT_PUBLIC_MESSAGE, framed + auth)


def make_public_proposal(
    *,
    group_id: bytes,
    epoch: int,
    proposal: bytes,
    sender_type: int = SENDER_MEMBER,
    sender_index: int = 0,
    authenticated_data: bytes = b"",
    signing_key: Optional[nacl.signing.SigningKey] = None,
    group_context: bytes = b"",
    signature: Optional[bytes] = None,
    membership_tag: Optional[bytes] = None,
) -> bytes:
    """
    A PublicMessage MLSMessage of an encoded Proposal (C{encode_*_proposal});
    the other parameters are those of L{make_public_message}.
    """
    return make_public_message(
        group_id=group_id,
        epoch=epoch,
        content_type=CONTENT_PROPOSAL,
        content=proposal,
        sender_type=sender_type,
        sender_index=sender_index,
        authenticated_data=authenticated_data,
        signing_key=signing_key,
        group_context=group_context,
        signature=signature,
        membership_tag=membership_tag,
    )


def make_public_commit(
    *,
    group_id: bytes,
    epoch: int,
    proposals: Sequence[bytes] = (),
    path: Optional[bytes] = None,
    sender_type: int = SENDER_MEMBER,
    sender_index: int = 0,
    authenticated_data: bytes = b"",
    signing_key: Optional[nacl.signing.SigningKey] = None,
    group_context: bytes = b"",
    signature: Optional[bytes] = None,
    confirmation_tag: Optional[bytes] = None,
    membership_tag: Optional[bytes] = None,
) -> bytes:
    """
    A PublicMessage MLSMessage of a Commit of encoded ProposalOrRefs
    (L{encode_proposal_by_value}, L{encode_proposal_by_reference}) and an
    optional encoded UpdatePath (L{encode_update_path}); a commit with no
    proposals and no path is valid framing.  The other parameters are those
    of L{make_public_message}.
    """
    return make_public_message(
        group_id=group_id,
        epoch=epoch,
        content_type=CONTENT_COMMIT,
        content=encode_commit(proposals, path),
        sender_type=sender_type,
        sender_index=sender_index,
        authenticated_data=authenticated_data,
        signing_key=signing_key,
        group_context=group_context,
        signature=signature,
        confirmation_tag=confirmation_tag,
        membership_tag=membership_tag,
    )


def make_private_message(
    *,
    group_id: bytes,
    epoch: int,
    content_type: int = CONTENT_APPLICATION,
    authenticated_data: bytes = b"",
    encrypted_sender_data: Optional[bytes] = None,
    ciphertext: Optional[bytes] = None,
) -> bytes:
    """
    An MLSMessage (wire format mls_private_message) carrying a
    PrivateMessage.  Its encrypted fields are opaque here: random bytes
    unless given (28 for the sender data, an encrypted 12-byte SenderData
    with its 16-byte tag; 96 for the ciphertext).

    @raise ValueError: for an unknown content type or an empty encrypted field.
    """
    if content_type not in CONTENT_TYPE_NAMES:
        raise ValueError(f"unknown content type {content_type}")
    encrypted_sender_data = _random_or(encrypted_sender_data, _SENDER_DATA_SIZE)
    ciphertext = _random_or(ciphertext, _PRIVATE_CIPHERTEXT_SIZE)
    if not encrypted_sender_data or not ciphertext:
        raise ValueError("an AEAD ciphertext is never empty")
    body = (
        vec(group_id)
        + u64(epoch)
        + u8(content_type)
        + vec(authenticated_data)
        + vec(encrypted_sender_data)
        + vec(ciphertext)
    )
    return mls_message(WIRE_FORMAT_PRIVATE_MESSAGE, body)


# -- Welcome (RFC 9420 section 12.4.3.1)


def make_welcome(
    *,
    cipher_suite: int,
    key_package_refs: Sequence[bytes],
    encrypted_group_info: Optional[bytes] = None,
) -> bytes:
    """
    An MLSMessage (wire format mls_welcome) carrying a Welcome to the
    KeyPackages named by C{key_package_refs} (see
    L{fedserver_mimi.messages.key_package_ref}).  Each member's
    HPKECiphertext is random: a kem_output of the suite's KEM size and a
    GroupSecrets-sized ciphertext; so is C{encrypted_group_info} (256 bytes)
    unless given.

    @raise ValueError: without refs, or with refs not of the suite's hash
        size (for a registered suite), or an empty C{encrypted_group_info}.
    """
    if not key_package_refs:
        raise ValueError("a Welcome welcomes at least one member")
    ref_size = hash_size(cipher_suite)
    size = ref_size or 32
    for ref in key_package_refs:
        if not ref or (ref_size is not None and len(ref) != ref_size):
            raise ValueError(f"a KeyPackageRef of cipher suite {cipher_suite} has {size} bytes, not {len(ref)}")
    kem_size = KEY_SIZES.get(cipher_suite, (32, 32))[0]
    # GroupSecrets: joiner_secret<V>, optional<PathSecret>, psks<V>; then the AEAD tag.
    secrets_size = (1 + size) + (2 + size) + 1 + 16
    secrets = b"".join(
        vec(ref) + encode_hpke_ciphertext(os.urandom(kem_size), os.urandom(secrets_size)) for ref in key_package_refs
    )
    encrypted_group_info = _random_or(encrypted_group_info, _GROUP_INFO_CIPHERTEXT_SIZE)
    if not encrypted_group_info:
        raise ValueError("an AEAD ciphertext is never empty")
    return mls_message(WIRE_FORMAT_WELCOME, u16(cipher_suite) + vec(secrets) + vec(encrypted_group_info))
