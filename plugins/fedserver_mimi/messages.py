"""
Strict, bounded parsers of the cleartext framing of RFC 9420 (MLS 1.0)
messages, for the MIMI gateway.

The gateway is a delivery service: it never holds group secrets, so it cannot
decrypt or fully authenticate what members send.  What it can and must do is
refuse anything that is not a well-formed MLSMessage of the expected kind and
read the few cleartext fields it routes and orders by (group, epoch, content
type, the KeyPackageRefs of a Welcome's new members).  Each parser here takes
the bytes of an MLSMessage (RFC 9420 section 6)::

    struct {
        ProtocolVersion version = mls10;    // uint16
        WireFormat wire_format;             // uint16
        select (MLSMessage.wire_format) { ... };
    } MLSMessage;

and reads the whole of it, refusing trailing bytes:

  - L{parse_group_info}: mls_group_info (4), the GroupInfo of section 12.4.3
    with its GroupContext (section 8.1), extensions, confirmation_tag, signer
    and signature.
  - L{parse_handshake}: mls_public_message (1) or mls_private_message (2).  A
    PrivateMessage (section 6.3) is cleartext framing around two ciphertexts.
    A PublicMessage (section 6.2) is parsed completely: the FramedContent with
    its Sender, and for a proposal or a commit the whole Proposal (section
    12.1: Add with its KeyPackage, Update with its LeafNode, Remove,
    PreSharedKey, ReInit, ExternalInit, GroupContextExtensions) or Commit
    (section 12.4: ProposalOrRef list and optional UpdatePath with its
    LeafNode and UpdatePathNodes), since those bodies have no length prefix
    and the signature, confirmation_tag (commits) and membership_tag (member
    senders) that follow can only be found by reading through them.
  - L{parse_welcome}: mls_welcome (3), the Welcome of section 12.4.3.1.

What is checked, beyond the shape and the lengths of every field:

  - the MLSMessage and GroupContext versions are mls10; the wire format is
    the one the parser is for;
  - content types are application (1), proposal (2) or commit (3); sender
    types member, external, new_member_proposal or new_member_commit; the
    sender fits the content as section 6.1 requires (external senders send
    only the proposal types the registry of section 17.4 allows them,
    new_member_proposal only Add, new_member_commit only commits);
  - a PublicMessage does not carry application data (section 6: application
    messages MUST use PrivateMessage), unless the caller asks to allow it;
  - proposal types, PSK types and resumption usages are registered ones (an
    unknown proposal has no known encoding, so it cannot be skipped); the
    LeafNode of an Update has the update source, that of an UpdatePath the
    commit source; an optional's presence octet is 0 or 1;
  - embedded KeyPackages, LeafNodes and extension lists are held to the rules
    of L{fedserver_mimi.keypackage} (credential types, key sizes for the
    registered suites, no duplicate extensions, bounded counts);
  - signatures, MACs, ciphertexts and proposal references are not empty;
  - a Welcome has at least one EncryptedGroupSecrets; with a registered
    cipher suite each new_member is a KeyPackageRef of the suite's hash size
    and each kem_output an HPKE public key of the suite's KEM size.

Signatures and MACs are not verified here (the gateway has no group context
or membership key), except a GroupInfo's, on request, with
L{verify_group_info_signature} and the signer's key.

The whole message is refused up front when larger than L{MAX_MESSAGE_SIZE}, and
no length is trusted before it is checked against the data, so parsing is
linear in a bounded input.  Every refusal is an L{MLSMessageError} (a
L{ValueError}) naming the byte offset in the message and the dotted field.

L{key_package_ref} computes the KeyPackageRef of section 5.2 that a Welcome
names its new members by.
"""

from __future__ import annotations

from typing import Optional

import attrs

from fedserver_mimi.codec import (
    KEY_SIZES,
    MLSDecodeError,
    Reader,
    as_bytes,
    hash_size,
    ref_hash,
    verify_with_label,
)
from fedserver_mimi.keypackage import (
    LEAF_NODE_SOURCE_COMMIT,
    LEAF_NODE_SOURCE_UPDATE,
    MLS10,
    WIRE_FORMAT_KEY_PACKAGE,
    Extension,
    KeyPackage,
    _extensions,
    _key_package,
    _leaf_node_head,
    _leaf_node_source,
)

__all__ = [
    "CONTENT_APPLICATION",
    "CONTENT_COMMIT",
    "CONTENT_PROPOSAL",
    "CONTENT_TYPE_NAMES",
    "KEY_PACKAGE_REF_LABEL",
    "MAX_MESSAGE_SIZE",
    "PROPOSAL_ADD",
    "PROPOSAL_EXTERNAL_INIT",
    "PROPOSAL_GROUP_CONTEXT_EXTENSIONS",
    "PROPOSAL_PSK",
    "PROPOSAL_REINIT",
    "PROPOSAL_REMOVE",
    "PROPOSAL_UPDATE",
    "PSK_EXTERNAL",
    "PSK_RESUMPTION",
    "SENDER_EXTERNAL",
    "SENDER_MEMBER",
    "SENDER_NEW_MEMBER_COMMIT",
    "SENDER_NEW_MEMBER_PROPOSAL",
    "WIRE_FORMAT_GROUP_INFO",
    "WIRE_FORMAT_KEY_PACKAGE",
    "WIRE_FORMAT_NAMES",
    "WIRE_FORMAT_PRIVATE_MESSAGE",
    "WIRE_FORMAT_PUBLIC_MESSAGE",
    "WIRE_FORMAT_WELCOME",
    "GroupInfoSummary",
    "HandshakeSummary",
    "MLSMessageError",
    "WelcomeSummary",
    "key_package_ref",
    "parse_group_info",
    "parse_handshake",
    "parse_welcome",
    "verify_group_info_signature",
]

#: WireFormat values (RFC 9420 section 17.2).
WIRE_FORMAT_PUBLIC_MESSAGE = 1
WIRE_FORMAT_PRIVATE_MESSAGE = 2
WIRE_FORMAT_WELCOME = 3
WIRE_FORMAT_GROUP_INFO = 4
# WIRE_FORMAT_KEY_PACKAGE (5) comes from fedserver_mimi.keypackage.

WIRE_FORMAT_NAMES: dict[int, str] = {
    WIRE_FORMAT_PUBLIC_MESSAGE: "mls_public_message",
    WIRE_FORMAT_PRIVATE_MESSAGE: "mls_private_message",
    WIRE_FORMAT_WELCOME: "mls_welcome",
    WIRE_FORMAT_GROUP_INFO: "mls_group_info",
    WIRE_FORMAT_KEY_PACKAGE: "mls_key_package",
}

#: ContentType values (RFC 9420 section 6).
CONTENT_APPLICATION = 1
CONTENT_PROPOSAL = 2
CONTENT_COMMIT = 3

CONTENT_TYPE_NAMES: dict[int, str] = {
    CONTENT_APPLICATION: "application",
    CONTENT_PROPOSAL: "proposal",
    CONTENT_COMMIT: "commit",
}

#: SenderType values (RFC 9420 section 6).
SENDER_MEMBER = 1
SENDER_EXTERNAL = 2
SENDER_NEW_MEMBER_PROPOSAL = 3
SENDER_NEW_MEMBER_COMMIT = 4

_SENDER_NAMES = {
    SENDER_MEMBER: "member",
    SENDER_EXTERNAL: "external",
    SENDER_NEW_MEMBER_PROPOSAL: "new_member_proposal",
    SENDER_NEW_MEMBER_COMMIT: "new_member_commit",
}

#: ProposalType values (RFC 9420 section 17.4).
PROPOSAL_ADD = 1
PROPOSAL_UPDATE = 2
PROPOSAL_REMOVE = 3
PROPOSAL_PSK = 4
PROPOSAL_REINIT = 5
PROPOSAL_EXTERNAL_INIT = 6
PROPOSAL_GROUP_CONTEXT_EXTENSIONS = 7

_PROPOSAL_NAMES = {
    PROPOSAL_ADD: "add",
    PROPOSAL_UPDATE: "update",
    PROPOSAL_REMOVE: "remove",
    PROPOSAL_PSK: "psk",
    PROPOSAL_REINIT: "reinit",
    PROPOSAL_EXTERNAL_INIT: "external_init",
    PROPOSAL_GROUP_CONTEXT_EXTENSIONS: "group_context_extensions",
}

# The proposal types an external sender may send (the "External" column of
# the registry in RFC 9420 section 17.4).
_EXTERNAL_PROPOSALS = frozenset(
    {PROPOSAL_ADD, PROPOSAL_REMOVE, PROPOSAL_PSK, PROPOSAL_REINIT, PROPOSAL_GROUP_CONTEXT_EXTENSIONS}
)

#: PSKType values (RFC 9420 section 8.4).
PSK_EXTERNAL = 1
PSK_RESUMPTION = 2

# ResumptionPSKUsage values: application(1), reinit(2), branch(3).
_RESUMPTION_USAGES = frozenset({1, 2, 3})

# ProposalOrRefType values (RFC 9420 section 12.4).
_BY_VALUE = 1
_BY_REFERENCE = 2

#: The label of MakeKeyPackageRef (RFC 9420 section 5.2).
KEY_PACKAGE_REF_LABEL = b"MLS 1.0 KeyPackage Reference"

#: An MLSMessage larger than this (1 MiB) is refused before any parsing.
MAX_MESSAGE_SIZE = 1024 * 1024


class MLSMessageError(MLSDecodeError):
    """
    The bytes are not an acceptable MLSMessage of the kind asked for (a
    L{ValueError}).

    @ivar offset: the byte offset in the message where the problem was found.
    @ivar field: the dotted name of the field being read.
    @ivar reason: what is wrong, in words.
    """

    what = "MLS message"


@attrs.frozen
class GroupInfoSummary:
    """
    What the gateway reads from a GroupInfo.

    @ivar version: the GroupContext's protocol version (always mls10, 1).
    @ivar cipher_suite: the group's cipher suite.
    @ivar group_id: the group's ID.
    @ivar epoch: the epoch the GroupInfo describes.
    @ivar signer: the leaf index of the member that signed it.
    @ivar group_context_extensions: the GroupContext's extensions.
    @ivar extensions: the GroupInfo's own extensions (e.g. ratchet_tree,
        external_pub).
    @ivar signature: the GroupInfo signature.
    @ivar to_be_signed: the encoded GroupInfoTBS the signature covers.
    """

    version: int
    cipher_suite: int
    group_id: bytes
    epoch: int
    signer: int
    group_context_extensions: tuple[Extension, ...] = ()
    extensions: tuple[Extension, ...] = ()
    signature: bytes = attrs.field(default=b"", repr=False)
    to_be_signed: bytes = attrs.field(default=b"", repr=False)


@attrs.frozen
class HandshakeSummary:
    """
    What the gateway reads from a PublicMessage or PrivateMessage.

    @ivar wire_format: L{WIRE_FORMAT_PUBLIC_MESSAGE} or
        L{WIRE_FORMAT_PRIVATE_MESSAGE}.
    @ivar group_id: the group's ID.
    @ivar epoch: the epoch the message was sent in.
    @ivar content_type: L{CONTENT_APPLICATION}, L{CONTENT_PROPOSAL}
        or L{CONTENT_COMMIT}.
    @ivar sender_type: the SENDER_* type of a PublicMessage's sender; L{None}
        for a PrivateMessage, whose sender is encrypted.
    @ivar sender_index: the leaf index of a member sender or the index of an
        external sender in the group's external_senders; L{None} otherwise.
    @ivar proposal_type: for a PublicMessage proposal, its PROPOSAL_* type.
    """

    wire_format: int
    group_id: bytes
    epoch: int
    content_type: int
    sender_type: Optional[int] = None
    sender_index: Optional[int] = None
    proposal_type: Optional[int] = None


@attrs.frozen
class WelcomeSummary:
    """
    What the gateway reads from a Welcome.

    @ivar cipher_suite: the group's cipher suite.
    @ivar new_members: the KeyPackageRef of each new member, in order (see
        L{key_package_ref}).
    """

    cipher_suite: int
    new_members: tuple[bytes, ...]


def _open(data: bytes, wire_formats: tuple[int, ...]) -> tuple[Reader, int]:
    """A reader past the MLSMessage header, and the wire format (one of C{wire_formats})."""
    r = Reader(as_bytes(data, MAX_MESSAGE_SIZE, MLSMessageError, "MLSMessage"), error=MLSMessageError)
    version = r.uint16("MLSMessage.version")
    if version != MLS10:
        raise r.fail("MLSMessage.version", f"unknown protocol version {version}", 0)
    wire_format = r.uint16("MLSMessage.wire_format")
    if wire_format not in wire_formats:
        name = WIRE_FORMAT_NAMES.get(wire_format, "unknown")
        wanted = " or ".join(f"{WIRE_FORMAT_NAMES[w]} ({w})" for w in wire_formats)
        raise r.fail("MLSMessage.wire_format", f"wire format {wire_format} ({name}) is not {wanted}", 2)
    return r, wire_format


def _nonempty(r: Reader, field: str) -> bytes:
    """An opaque<V> that must not be empty (signatures, MACs, ciphertexts)."""
    start = r.pos
    value = r.vector(field)
    if not value:
        raise r.fail(field, "empty", start)
    return value


def _content_type(r: Reader, field: str) -> int:
    start = r.pos
    content_type = r.uint8(field)
    if content_type not in CONTENT_TYPE_NAMES:
        raise r.fail(field, f"unknown content type {content_type}", start)
    return content_type


# -- GroupInfo


def parse_group_info(data: bytes) -> GroupInfoSummary:
    """
    Parse an MLSMessage carrying a GroupInfo (wire format mls_group_info)::

        struct {
            GroupContext group_context;
            Extension extensions<V>;
            MAC confirmation_tag;
            uint32 signer;
            opaque signature<V>;    // SignWithLabel(., "GroupInfoTBS", GroupInfoTBS)
        } GroupInfo;

    @raise MLSMessageError: when the bytes are not exactly one well-formed
        GroupInfo MLSMessage within the limits of this module.
    @raise TypeError: when C{data} is not bytes-like.
    """
    r, _ = _open(data, (WIRE_FORMAT_GROUP_INFO,))
    begin = r.pos
    with r.nested("group_info."):
        version_at = r.pos
        version = r.uint16("group_context.version")
        if version != MLS10:
            raise r.fail("group_context.version", f"unknown protocol version {version}", version_at)
        cipher_suite = r.uint16("group_context.cipher_suite")
        group_id = r.vector("group_context.group_id")
        epoch = r.uint64("group_context.epoch")
        r.vector("group_context.tree_hash")
        r.vector("group_context.confirmed_transcript_hash")
        context_extensions = _extensions(r, "group_context.extensions")
        extensions = _extensions(r, "extensions")
        _nonempty(r, "confirmation_tag")
        signer = r.uint32("signer")
        tbs = r.data[begin : r.pos]
        signature = _nonempty(r, "signature")
        r.expect_end("GroupInfo")
    return GroupInfoSummary(
        version=version,
        cipher_suite=cipher_suite,
        group_id=group_id,
        epoch=epoch,
        signer=signer,
        group_context_extensions=context_extensions,
        extensions=extensions,
        signature=signature,
        to_be_signed=tbs,
    )


def verify_group_info_signature(info: GroupInfoSummary, signature_key: bytes) -> bool:
    """
    Whether the GroupInfo's signature is SignWithLabel(signature_key,
    "GroupInfoTBS", GroupInfoTBS) under its cipher suite.  C{signature_key}
    is the signer's, from the leaf C{info.signer} of the group's ratchet tree.

    @raise MLSMessageError: for a cipher suite outside RFC 9420's 1-7.
    """
    valid = verify_with_label(info.cipher_suite, signature_key, info.signature, b"GroupInfoTBS", info.to_be_signed)
    if valid is None:
        field = "group_info.group_context.cipher_suite"
        raise MLSMessageError(6, field, f"cannot verify signatures of cipher suite {info.cipher_suite}")
    return valid


# -- PublicMessage and PrivateMessage


def parse_handshake(data: bytes, *, allow_public_application: bool = False) -> HandshakeSummary:
    """
    Parse an MLSMessage carrying a PublicMessage or a PrivateMessage (wire
    format mls_public_message or mls_private_message), as the module
    docstring describes.

    A PrivateMessage may carry any content type (the name is for what the
    gateway mostly sees); C{content_type} tells which.

    @param allow_public_application: accept a PublicMessage of application
        data, which RFC 9420 section 6 forbids (the MLS test vectors have
        one, to test codecs).
    @raise MLSMessageError: when the bytes are not exactly one well-formed
        PublicMessage or PrivateMessage within the limits of this module.
    @raise TypeError: when C{data} is not bytes-like.
    """
    r, wire_format = _open(data, (WIRE_FORMAT_PUBLIC_MESSAGE, WIRE_FORMAT_PRIVATE_MESSAGE))
    if wire_format == WIRE_FORMAT_PRIVATE_MESSAGE:
        with r.nested("private_message."):
            return _private_message(r)
    with r.nested("public_message."):
        return _public_message(r, allow_public_application)


def _private_message(r: Reader) -> HandshakeSummary:
    # struct { opaque group_id<V>; uint64 epoch; ContentType content_type;
    #          opaque authenticated_data<V>; opaque encrypted_sender_data<V>;
    #          opaque ciphertext<V>; } PrivateMessage;
    group_id = r.vector("group_id")
    epoch = r.uint64("epoch")
    content_type = _content_type(r, "content_type")
    r.vector("authenticated_data")
    _nonempty(r, "encrypted_sender_data")
    _nonempty(r, "ciphertext")
    r.expect_end("PrivateMessage")
    return HandshakeSummary(WIRE_FORMAT_PRIVATE_MESSAGE, group_id, epoch, content_type)


def _public_message(r: Reader, allow_application: bool) -> HandshakeSummary:
    # struct { FramedContent content; FramedContentAuthData auth;
    #          select (sender_type) { case member: MAC membership_tag; ... }; } PublicMessage;
    group_id = r.vector("content.group_id")
    epoch = r.uint64("content.epoch")
    sender_at = r.pos
    sender_type = r.uint8("content.sender.sender_type")
    sender_index: Optional[int] = None
    if sender_type == SENDER_MEMBER:
        sender_index = r.uint32("content.sender.leaf_index")
    elif sender_type == SENDER_EXTERNAL:
        sender_index = r.uint32("content.sender.sender_index")
    elif sender_type not in (SENDER_NEW_MEMBER_PROPOSAL, SENDER_NEW_MEMBER_COMMIT):
        raise r.fail("content.sender.sender_type", f"unknown sender type {sender_type}", sender_at)
    r.vector("content.authenticated_data")
    type_at = r.pos
    content_type = _content_type(r, "content.content_type")
    sender = _SENDER_NAMES[sender_type]
    if content_type == CONTENT_APPLICATION and not allow_application:
        raise r.fail(
            "content.content_type", "application data must be sent as a PrivateMessage (RFC 9420 section 6)", type_at
        )
    required = {
        SENDER_EXTERNAL: CONTENT_PROPOSAL,
        SENDER_NEW_MEMBER_PROPOSAL: CONTENT_PROPOSAL,
        SENDER_NEW_MEMBER_COMMIT: CONTENT_COMMIT,
    }.get(sender_type)
    if required is not None and content_type != required:
        raise r.fail(
            "content.content_type",
            f"{sender} senders send {CONTENT_TYPE_NAMES[required]}s, not {CONTENT_TYPE_NAMES[content_type]}",
            type_at,
        )
    proposal_type: Optional[int] = None
    if content_type == CONTENT_APPLICATION:
        r.vector("content.application_data")
    elif content_type == CONTENT_PROPOSAL:
        proposal_at = r.pos
        with r.nested("content."):
            proposal_type = _proposal(r, "proposal")
        if sender_type == SENDER_EXTERNAL and proposal_type not in _EXTERNAL_PROPOSALS:
            raise r.fail(
                "content.proposal.proposal_type",
                f"external senders may not send {_PROPOSAL_NAMES[proposal_type]} proposals",
                proposal_at,
            )
        if sender_type == SENDER_NEW_MEMBER_PROPOSAL and proposal_type != PROPOSAL_ADD:
            raise r.fail(
                "content.proposal.proposal_type",
                f"new_member_proposal senders send add proposals, not {_PROPOSAL_NAMES[proposal_type]}",
                proposal_at,
            )
    else:
        with r.nested("content.commit."):
            _commit(r)
    _nonempty(r, "auth.signature")
    if content_type == CONTENT_COMMIT:
        _nonempty(r, "auth.confirmation_tag")
    if sender_type == SENDER_MEMBER:
        _nonempty(r, "membership_tag")
    r.expect_end("PublicMessage")
    return HandshakeSummary(
        WIRE_FORMAT_PUBLIC_MESSAGE,
        group_id,
        epoch,
        content_type,
        sender_type=sender_type,
        sender_index=sender_index,
        proposal_type=proposal_type,
    )


def _leaf_node(r: Reader, source: int, where: str) -> None:
    """A LeafNode whose source must be C{source} (update or commit), skipped."""
    _leaf_node_head(r)
    _leaf_node_source(r, source, where)
    if source == LEAF_NODE_SOURCE_COMMIT:
        r.vector("leaf_node.parent_hash")
    _extensions(r, "leaf_node.extensions")
    _nonempty(r, "leaf_node.signature")


def _psk_id(r: Reader) -> None:
    # struct { PSKType psktype; select (psktype) {
    #     case external: opaque psk_id<V>;
    #     case resumption: ResumptionPSKUsage usage; opaque psk_group_id<V>; uint64 psk_epoch; };
    #   opaque psk_nonce<V>; } PreSharedKeyID;
    start = r.pos
    psk_type = r.uint8("psk.psktype")
    if psk_type == PSK_EXTERNAL:
        r.vector("psk.psk_id")
    elif psk_type == PSK_RESUMPTION:
        usage_at = r.pos
        usage = r.uint8("psk.usage")
        if usage not in _RESUMPTION_USAGES:
            raise r.fail("psk.usage", f"unknown resumption PSK usage {usage}", usage_at)
        r.vector("psk.psk_group_id")
        r.uint64("psk.psk_epoch")
    else:
        raise r.fail("psk.psktype", f"unknown PSK type {psk_type}", start)
    r.vector("psk.psk_nonce")


def _proposal(r: Reader, field: str) -> int:
    """Read a Proposal (RFC 9420 section 12.1) through; its type."""
    start = r.pos
    proposal_type = r.uint16(field + ".proposal_type")
    name = _PROPOSAL_NAMES.get(proposal_type)
    if name is None:
        raise r.fail(field + ".proposal_type", f"unsupported proposal type {proposal_type}", start)
    with r.nested(f"{field}.{name}."):
        if proposal_type == PROPOSAL_ADD:
            _key_package(r, to_end=False)
        elif proposal_type == PROPOSAL_UPDATE:
            _leaf_node(r, LEAF_NODE_SOURCE_UPDATE, "an Update proposal")
        elif proposal_type == PROPOSAL_REMOVE:
            r.uint32("removed")
        elif proposal_type == PROPOSAL_PSK:
            _psk_id(r)
        elif proposal_type == PROPOSAL_REINIT:
            r.vector("group_id")
            r.uint16("version")
            r.uint16("cipher_suite")
            _extensions(r, "extensions")
        elif proposal_type == PROPOSAL_EXTERNAL_INIT:
            _nonempty(r, "kem_output")
        else:
            _extensions(r, "extensions")
    return proposal_type


def _commit(r: Reader) -> None:
    # struct { ProposalOrRef proposals<V>; optional<UpdatePath> path; } Commit;
    proposals = r.sub("proposals")
    index = 0
    while not proposals.at_end():
        field = f"proposals[{index}]"
        start = proposals.pos
        kind = proposals.uint8(field + ".type")
        if kind == _BY_VALUE:
            _proposal(proposals, field + ".proposal")
        elif kind == _BY_REFERENCE:
            _nonempty(proposals, field + ".reference")
        else:
            raise proposals.fail(field + ".type", f"unknown ProposalOrRef type {kind}", start)
        index += 1
    if r.optional("path"):
        # struct { LeafNode leaf_node; UpdatePathNode nodes<V>; } UpdatePath;
        with r.nested("path."):
            _leaf_node(r, LEAF_NODE_SOURCE_COMMIT, "an UpdatePath")
        nodes = r.sub("path.nodes")
        node = 0
        while not nodes.at_end():
            # struct { HPKEPublicKey encryption_key; HPKECiphertext encrypted_path_secret<V>; } UpdatePathNode;
            field = f"path.nodes[{node}]"
            _nonempty(nodes, field + ".encryption_key")
            secrets = nodes.sub(field + ".encrypted_path_secret")
            n = 0
            while not secrets.at_end():
                _nonempty(secrets, f"{field}.encrypted_path_secret[{n}].kem_output")
                _nonempty(secrets, f"{field}.encrypted_path_secret[{n}].ciphertext")
                n += 1
            node += 1


# -- Welcome


def parse_welcome(data: bytes) -> WelcomeSummary:
    """
    Parse an MLSMessage carrying a Welcome (wire format mls_welcome)::

        struct { opaque kem_output<V>; opaque ciphertext<V>; } HPKECiphertext;
        struct { KeyPackageRef new_member; HPKECiphertext encrypted_group_secrets; } EncryptedGroupSecrets;
        struct {
            CipherSuite cipher_suite;
            EncryptedGroupSecrets secrets<V>;
            opaque encrypted_group_info<V>;
        } Welcome;

    @raise MLSMessageError: when the bytes are not exactly one well-formed
        Welcome MLSMessage within the limits of this module, or it has no
        secrets.
    @raise TypeError: when C{data} is not bytes-like.
    """
    r, _ = _open(data, (WIRE_FORMAT_WELCOME,))
    with r.nested("welcome."):
        cipher_suite = r.uint16("cipher_suite")
        ref_size = hash_size(cipher_suite)
        kem_size = KEY_SIZES[cipher_suite][0] if cipher_suite in KEY_SIZES else None
        secrets = r.sub("secrets")
        new_members: list[bytes] = []
        while not secrets.at_end():
            field = f"secrets[{len(new_members)}]"
            start = secrets.pos
            ref = _nonempty(secrets, field + ".new_member")
            if ref_size is not None and len(ref) != ref_size:
                raise secrets.fail(
                    field + ".new_member", f"{len(ref)} bytes, a KeyPackageRef of this suite has {ref_size}", start
                )
            start = secrets.pos
            kem_output = _nonempty(secrets, field + ".encrypted_group_secrets.kem_output")
            if kem_size is not None and len(kem_output) != kem_size:
                raise secrets.fail(
                    field + ".encrypted_group_secrets.kem_output",
                    f"{len(kem_output)} bytes, this suite's KEM output has {kem_size}",
                    start,
                )
            _nonempty(secrets, field + ".encrypted_group_secrets.ciphertext")
            new_members.append(ref)
        if not new_members:
            raise r.fail("secrets", "no EncryptedGroupSecrets: a Welcome welcomes at least one member", secrets.pos)
        _nonempty(r, "encrypted_group_info")
        r.expect_end("Welcome")
    return WelcomeSummary(cipher_suite, tuple(new_members))


# -- KeyPackageRef


def key_package_ref(kp: KeyPackage) -> bytes:
    """
    The KeyPackageRef of C{kp} (RFC 9420 section 5.2)::

        MakeKeyPackageRef(value) = RefHash("MLS 1.0 KeyPackage Reference", value)
        RefHash(label, value) = Hash(struct { opaque label<V>; opaque value<V>; })

    where C{value} is the encoded KeyPackage (C{kp.raw}, without any
    MLSMessage header) and Hash the cipher suite's: SHA-256 for suites 1-3,
    SHA-512 for 4-6, SHA-384 for 7.

    @raise MLSMessageError: (a L{ValueError}, at the cipher_suite field of the
        KeyPackage) for a cipher suite outside RFC 9420's 1-7, whose hash is
        unknown.
    """
    ref = ref_hash(kp.cipher_suite, KEY_PACKAGE_REF_LABEL, kp.raw)
    if ref is None:
        raise MLSMessageError(2, "cipher_suite", f"no hash function is known for cipher suite {kp.cipher_suite}")
    return ref
