"""
A strict, bounded parser for RFC 9420 (MLS 1.0) KeyPackages.

The MIMI gateway files uploaded KeyPackages into key queues by protocol
version, cipher suite and lifetime, and refuses malformed ones.  This module
reads the wire format of RFC 9420 section 10::

    struct {
        ProtocolVersion version;            // uint16, mls10 = 1
        CipherSuite cipher_suite;           // uint16
        HPKEPublicKey init_key;             // opaque<V>
        LeafNode leaf_node;
        Extension extensions<V>;
        opaque signature<V>;
    } KeyPackage;

with the LeafNode, Credential, Capabilities, Lifetime and Extension structures
of sections 5.3, 7.2 and 13.  Vectors carry the variable-length size prefix of
RFC 9420 section 2.1.2 (the QUIC varint of RFC 9000 section 16 without the
8-byte form): the prefix C{0b11} is invalid and lengths must be minimally
encoded.

Every error is a L{KeyPackageError} naming the byte offset and the field
(an L{MLSDecodeError <fedserver_mimi.codec.MLSDecodeError>}, read with the
shared L{Reader <fedserver_mimi.codec.Reader>}).
Nothing here trusts a length before checking it against the data that is
actually there, and the whole package is refused up front when it is larger
than L{MAX_KEY_PACKAGE_SIZE}, so parsing is linear in a bounded input.

Signatures are verified only on request, with L{verify_key_package_signature}
(and L{verify_leaf_node_signature}), following SignWithLabel of RFC 9420
section 5.1.2.

The LeafNode, Credential, Capabilities and Extension readers here are shared
with L{fedserver_mimi.messages}, which finds the same structures inside Add
and Update proposals and UpdatePaths.
"""

from __future__ import annotations

from typing import Optional

import attrs

from fedserver_mimi.codec import KEY_SIZES, MLSDecodeError, Reader, as_bytes, verify_with_label

__all__ = [
    "CIPHER_SUITE_NAMES",
    "CREDENTIAL_BASIC",
    "CREDENTIAL_X509",
    "LEAF_NODE_SOURCE_KEY_PACKAGE",
    "MAX_KEY_PACKAGE_SIZE",
    "MLS10",
    "WIRE_FORMAT_KEY_PACKAGE",
    "Capabilities",
    "Credential",
    "Extension",
    "KeyPackage",
    "KeyPackageError",
    "LeafNode",
    "Lifetime",
    "parse_key_package",
    "parse_key_package_message",
    "verify_key_package_signature",
    "verify_leaf_node_signature",
]

#: ProtocolVersion mls10.
MLS10 = 1

#: WireFormat mls_key_package, for KeyPackages wrapped in an MLSMessage.
WIRE_FORMAT_KEY_PACKAGE = 5

#: CredentialType values this parser understands (RFC 9420 section 17.5).
CREDENTIAL_BASIC = 1
CREDENTIAL_X509 = 2

#: LeafNodeSource values (RFC 9420 section 7.2); a KeyPackage's is key_package.
LEAF_NODE_SOURCE_KEY_PACKAGE = 1
LEAF_NODE_SOURCE_UPDATE = 2
LEAF_NODE_SOURCE_COMMIT = 3

#: The cipher suites registered by RFC 9420 section 17.1.
CIPHER_SUITE_NAMES: dict[int, str] = {
    1: "MLS_128_DHKEMX25519_AES128GCM_SHA256_Ed25519",
    2: "MLS_128_DHKEMP256_AES128GCM_SHA256_P256",
    3: "MLS_128_DHKEMX25519_CHACHA20POLY1305_SHA256_Ed25519",
    4: "MLS_256_DHKEMX448_AES256GCM_SHA512_Ed448",
    5: "MLS_256_DHKEMP521_AES256GCM_SHA512_P521",
    6: "MLS_256_DHKEMX448_CHACHA20POLY1305_SHA512_Ed448",
    7: "MLS_256_DHKEMP384_AES256GCM_SHA384_P384",
}

#: A KeyPackage larger than this is refused before any parsing.
MAX_KEY_PACKAGE_SIZE = 64 * 1024
#: At most this many certificates in an X.509 credential.
MAX_CERTIFICATES = 16
#: At most this many extensions in one extension list.
MAX_EXTENSIONS = 64
#: At most this many entries in each capabilities list.
MAX_CAPABILITY_ENTRIES = 256

_LEAF_NODE_SOURCE_NAMES = {
    LEAF_NODE_SOURCE_KEY_PACKAGE: "key_package",
    LEAF_NODE_SOURCE_UPDATE: "update",
    LEAF_NODE_SOURCE_COMMIT: "commit",
}


class KeyPackageError(MLSDecodeError):
    """
    The bytes are not an acceptable RFC 9420 KeyPackage (a L{ValueError}).

    @ivar offset: the byte offset in the input where the problem was found.
    @ivar field: the dotted name of the field being read.
    @ivar reason: what is wrong, in words.
    """

    what = "KeyPackage"


@attrs.frozen
class Extension:
    """An Extension: C{extension_type} (uint16) and opaque C{extension_data}."""

    extension_type: int
    extension_data: bytes


@attrs.frozen
class Credential:
    """
    A Credential.  C{identity} is set for basic credentials, C{certificates}
    (DER certificates, leaf first) for X.509 ones.
    """

    credential_type: int
    identity: Optional[bytes] = None
    certificates: tuple[bytes, ...] = ()


@attrs.frozen
class Capabilities:
    """The Capabilities a client advertises in its leaf node."""

    versions: tuple[int, ...]
    cipher_suites: tuple[int, ...]
    extensions: tuple[int, ...]
    proposals: tuple[int, ...]
    credentials: tuple[int, ...]


@attrs.frozen
class Lifetime:
    """Lifetime, in seconds since the Unix epoch, inclusive at both ends."""

    not_before: int
    not_after: int

    def contains(self, when: int) -> bool:
        """Whether C{when} (Unix seconds) is within the lifetime."""
        return self.not_before <= when <= self.not_after


@attrs.frozen
class LeafNode:
    """
    A LeafNode whose source is key_package (the only one a KeyPackage may
    carry), so it always has a L{Lifetime}.

    @ivar to_be_signed: the encoded LeafNodeTBS the signature covers (for the
        key_package source it is the leaf node without its signature).
    """

    encryption_key: bytes
    signature_key: bytes
    credential: Credential
    capabilities: Capabilities
    leaf_node_source: int
    lifetime: Lifetime
    extensions: tuple[Extension, ...]
    signature: bytes
    to_be_signed: bytes = attrs.field(repr=False)


@attrs.frozen
class KeyPackage:
    """
    A parsed KeyPackage.

    @ivar to_be_signed: the encoded KeyPackageTBS (everything but the
        signature), the content of SignWithLabel(., "KeyPackageTBS", .).
    @ivar raw: the exact bytes parsed.
    """

    version: int
    cipher_suite: int
    init_key: bytes
    leaf_node: LeafNode
    extensions: tuple[Extension, ...]
    signature: bytes
    to_be_signed: bytes = attrs.field(repr=False)
    raw: bytes = attrs.field(repr=False)

    @property
    def cipher_suite_name(self) -> Optional[str]:
        """The registered name of the cipher suite, or L{None}."""
        return CIPHER_SUITE_NAMES.get(self.cipher_suite)

    @property
    def lifetime(self) -> Lifetime:
        """The leaf node's lifetime."""
        return self.leaf_node.lifetime

    @property
    def credential(self) -> Credential:
        """The leaf node's credential."""
        return self.leaf_node.credential


def _uint16_list(r: Reader, field: str) -> tuple[int, ...]:
    inner = r.sub(field)
    count = inner.end - inner.pos
    if count % 2:
        raise inner.fail(field, f"length {count} is not a multiple of 2")
    if count // 2 > MAX_CAPABILITY_ENTRIES:
        raise inner.fail(field, f"{count // 2} entries, over the limit of {MAX_CAPABILITY_ENTRIES}")
    values: list[int] = []
    while not inner.at_end():
        values.append(inner.uint16(field))
    return tuple(values)


def _extensions(r: Reader, field: str) -> tuple[Extension, ...]:
    inner = r.sub(field)
    seen: set[int] = set()
    result: list[Extension] = []
    while not inner.at_end():
        if len(result) >= MAX_EXTENSIONS:
            raise inner.fail(field, f"more than {MAX_EXTENSIONS} extensions")
        start = inner.pos
        ext_type = inner.uint16(f"{field}[{len(result)}].extension_type")
        if ext_type in seen:
            raise inner.fail(field, f"duplicate extension type {ext_type}", start)
        seen.add(ext_type)
        data = inner.vector(f"{field}[{len(result)}].extension_data")
        result.append(Extension(ext_type, data))
    return tuple(result)


def _credential(r: Reader) -> Credential:
    start = r.pos
    ctype = r.uint16("leaf_node.credential.credential_type")
    if ctype == CREDENTIAL_BASIC:
        return Credential(ctype, identity=r.vector("leaf_node.credential.identity"))
    if ctype == CREDENTIAL_X509:
        inner = r.sub("leaf_node.credential.certificates")
        certs: list[bytes] = []
        while not inner.at_end():
            if len(certs) >= MAX_CERTIFICATES:
                raise inner.fail("leaf_node.credential.certificates", f"more than {MAX_CERTIFICATES} certificates")
            field = f"leaf_node.credential.certificates[{len(certs)}].cert_data"
            cert_start = inner.pos
            cert = inner.vector(field)
            if not cert:
                raise inner.fail(field, "empty certificate", cert_start)
            certs.append(cert)
        if not certs:
            raise inner.fail("leaf_node.credential.certificates", "no certificates")
        return Credential(ctype, certificates=tuple(certs))
    raise r.fail("leaf_node.credential.credential_type", f"unsupported credential type {ctype}", start)


def _capabilities(r: Reader) -> Capabilities:
    return Capabilities(
        versions=_uint16_list(r, "leaf_node.capabilities.versions"),
        cipher_suites=_uint16_list(r, "leaf_node.capabilities.cipher_suites"),
        extensions=_uint16_list(r, "leaf_node.capabilities.extensions"),
        proposals=_uint16_list(r, "leaf_node.capabilities.proposals"),
        credentials=_uint16_list(r, "leaf_node.capabilities.credentials"),
    )


def _leaf_node_head(r: Reader) -> tuple[bytes, bytes, Credential, Capabilities]:
    """The LeafNode fields before leaf_node_source, alike for every source."""
    encryption_key = r.vector("leaf_node.encryption_key")
    signature_key = r.vector("leaf_node.signature_key")
    credential = _credential(r)
    capabilities = _capabilities(r)
    return encryption_key, signature_key, credential, capabilities


def _leaf_node_source(r: Reader, expected: int, where: str) -> int:
    """
    Read leaf_node_source and refuse any but C{expected}: RFC 9420 section 7.3
    fixes the source of each place a LeafNode appears (C{where}, e.g. "a
    KeyPackage"), and the source decides the shape of what follows.
    """
    source_at = r.pos
    source = r.uint8("leaf_node.leaf_node_source")
    if source != expected:
        what = _LEAF_NODE_SOURCE_NAMES.get(source, "unknown")
        want = _LEAF_NODE_SOURCE_NAMES[expected]
        reason = f"{what} source {source}, {where} needs {want} ({expected})"
        raise r.fail("leaf_node.leaf_node_source", reason, source_at)
    return source


def _leaf_node(r: Reader) -> LeafNode:
    begin = r.pos
    encryption_key, signature_key, credential, capabilities = _leaf_node_head(r)
    source = _leaf_node_source(r, LEAF_NODE_SOURCE_KEY_PACKAGE, "a KeyPackage")
    lifetime_at = r.pos
    not_before = r.uint64("leaf_node.lifetime.not_before")
    not_after = r.uint64("leaf_node.lifetime.not_after")
    if not_after < not_before:
        raise r.fail("leaf_node.lifetime", f"not_after {not_after} is before not_before {not_before}", lifetime_at)
    extensions = _extensions(r, "leaf_node.extensions")
    tbs = r.data[begin : r.pos]
    signature = r.vector("leaf_node.signature")
    return LeafNode(
        encryption_key=encryption_key,
        signature_key=signature_key,
        credential=credential,
        capabilities=capabilities,
        leaf_node_source=source,
        lifetime=Lifetime(not_before, not_after),
        extensions=extensions,
        signature=signature,
        to_be_signed=tbs,
    )


def _key_package(r: Reader, to_end: bool = True) -> KeyPackage:
    """
    Read a KeyPackage at C{r}.  With C{to_end} it must fill the rest of the
    reader; without, it is embedded (an Add proposal) and the reader is left
    after it.
    """
    begin = r.pos
    version = r.uint16("version")
    if version != MLS10:
        raise r.fail("version", f"unknown protocol version {version}", begin)
    cipher_suite = r.uint16("cipher_suite")
    init_at = r.pos
    init_key = r.vector("init_key")
    leaf_at = r.pos
    leaf_node = _leaf_node(r)
    extensions = _extensions(r, "extensions")
    tbs = r.data[begin : r.pos]
    signature = r.vector("signature")
    end = r.pos
    if to_end:
        r.expect_end("KeyPackage")
    # Keys of another size than the registered suite's cannot belong to it.
    sizes = KEY_SIZES.get(cipher_suite)
    if sizes is not None:
        hpke_size, sig_size = sizes
        name = CIPHER_SUITE_NAMES[cipher_suite]
        if len(init_key) != hpke_size:
            raise r.fail("init_key", f"{len(init_key)} bytes, {name} uses {hpke_size}", init_at)
        if len(leaf_node.encryption_key) != hpke_size:
            raise r.fail(
                "leaf_node.encryption_key", f"{len(leaf_node.encryption_key)} bytes, {name} uses {hpke_size}", leaf_at
            )
        if len(leaf_node.signature_key) != sig_size:
            raise r.fail(
                "leaf_node.signature_key", f"{len(leaf_node.signature_key)} bytes, {name} uses {sig_size}", leaf_at
            )
    if not init_key:
        raise r.fail("init_key", "empty", init_at)
    if init_key == leaf_node.encryption_key:
        raise r.fail("init_key", "equal to the leaf node's encryption_key (RFC 9420 section 10)", init_at)
    return KeyPackage(
        version=version,
        cipher_suite=cipher_suite,
        init_key=init_key,
        leaf_node=leaf_node,
        extensions=extensions,
        signature=signature,
        to_be_signed=tbs,
        raw=r.data[begin:end],
    )


def _as_bytes(data: bytes) -> bytes:
    return as_bytes(data, MAX_KEY_PACKAGE_SIZE, KeyPackageError, "KeyPackage")


def parse_key_package(data: bytes) -> KeyPackage:
    """
    Parse an encoded KeyPackage (the bare struct, as RFC 9420 section 10).

    @raise KeyPackageError: when the bytes are not exactly one well-formed
        mls10 KeyPackage within the limits of this module.
    """
    return _key_package(Reader(_as_bytes(data), error=KeyPackageError))


def parse_key_package_message(data: bytes) -> KeyPackage:
    """
    Parse an MLSMessage carrying a KeyPackage (version mls10, wire_format
    mls_key_package), the form the MLS test vectors and many clients use.
    Offsets in errors count from the start of the message.
    """
    r = Reader(_as_bytes(data), error=KeyPackageError)
    version = r.uint16("MLSMessage.version")
    if version != MLS10:
        raise r.fail("MLSMessage.version", f"unknown protocol version {version}", 0)
    wire_format = r.uint16("MLSMessage.wire_format")
    if wire_format != WIRE_FORMAT_KEY_PACKAGE:
        raise r.fail("MLSMessage.wire_format", f"wire format {wire_format} is not mls_key_package (5)", 2)
    return _key_package(r)


def _verify(cipher_suite: int, public_key: bytes, signature: bytes, label: bytes, content: bytes) -> bool:
    valid = verify_with_label(cipher_suite, public_key, signature, label, content)
    if valid is None:
        raise KeyPackageError(2, "cipher_suite", f"cannot verify signatures of cipher suite {cipher_suite}")
    return valid


def verify_leaf_node_signature(kp: KeyPackage) -> bool:
    """
    Whether the leaf node's signature is SignWithLabel(signature_key,
    "LeafNodeTBS", LeafNodeTBS) under the KeyPackage's cipher suite.

    @raise KeyPackageError: for a cipher suite outside RFC 9420's 1-7.
    """
    leaf = kp.leaf_node
    return _verify(kp.cipher_suite, leaf.signature_key, leaf.signature, b"LeafNodeTBS", leaf.to_be_signed)


def verify_key_package_signature(kp: KeyPackage) -> bool:
    """
    Whether the KeyPackage's signature is SignWithLabel(leaf signature_key,
    "KeyPackageTBS", KeyPackageTBS) under its cipher suite (Ed25519 with
    PyNaCl for suites 1 and 3; ECDSA and Ed448 with cryptography for the
    others).  The leaf node's own signature is L{verify_leaf_node_signature}.

    @raise KeyPackageError: for a cipher suite outside RFC 9420's 1-7.
    """
    return _verify(kp.cipher_suite, kp.leaf_node.signature_key, kp.signature, b"KeyPackageTBS", kp.to_be_signed)
