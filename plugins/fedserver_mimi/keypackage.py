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

Every error is a L{KeyPackageError} naming the byte offset and the field.
Nothing here trusts a length before checking it against the data that is
actually there, and the whole package is refused up front when it is larger
than L{MAX_KEY_PACKAGE_SIZE}, so parsing is linear in a bounded input.

Signatures are verified only on request, with L{verify_key_package_signature}
(and L{verify_leaf_node_signature}), following SignWithLabel of RFC 9420
section 5.1.2.
"""

from __future__ import annotations

from typing import Optional

import attrs

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

# (HPKE public key size, signature public key size) of the registered suites:
# X25519 32, P-256 65 (uncompressed), X448 56, P-521 133, P-384 97; Ed25519 32,
# Ed448 57.  Keys of another size cannot belong to the suite.
_KEY_SIZES: dict[int, tuple[int, int]] = {
    1: (32, 32),
    2: (65, 65),
    3: (32, 32),
    4: (56, 57),
    5: (133, 133),
    6: (56, 57),
    7: (97, 97),
}

#: A KeyPackage larger than this is refused before any parsing.
MAX_KEY_PACKAGE_SIZE = 64 * 1024
#: At most this many certificates in an X.509 credential.
MAX_CERTIFICATES = 16
#: At most this many extensions in one extension list.
MAX_EXTENSIONS = 64
#: At most this many entries in each capabilities list.
MAX_CAPABILITY_ENTRIES = 256

# The largest length a 4-byte MLS varint can carry.
_VARINT_MAX = (1 << 30) - 1


class KeyPackageError(ValueError):
    """
    The bytes are not an acceptable RFC 9420 KeyPackage.

    @ivar offset: the byte offset in the input where the problem was found.
    @ivar field: the dotted name of the field being read.
    """

    def __init__(self, offset: int, field: str, reason: str) -> None:
        super().__init__(f"invalid KeyPackage at offset {offset} ({field}): {reason}")
        self.offset = offset
        self.field = field
        self.reason = reason


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


class _Reader:
    """Reads TLS presentation-language values from C{data[pos:end]}."""

    __slots__ = ("data", "end", "pos")

    def __init__(self, data: bytes, pos: int = 0, end: Optional[int] = None) -> None:
        self.data = data
        self.pos = pos
        self.end = len(data) if end is None else end

    def fail(self, field: str, reason: str, offset: Optional[int] = None) -> KeyPackageError:
        return KeyPackageError(self.pos if offset is None else offset, field, reason)

    def _take(self, n: int, field: str) -> bytes:
        if n > self.end - self.pos:
            raise self.fail(field, f"truncated: needs {n} bytes, {self.end - self.pos} left")
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def uint8(self, field: str) -> int:
        return self._take(1, field)[0]

    def uint16(self, field: str) -> int:
        return int.from_bytes(self._take(2, field), "big")

    def uint64(self, field: str) -> int:
        return int.from_bytes(self._take(8, field), "big")

    def varint(self, field: str) -> int:
        """A vector length (RFC 9420 section 2.1.2)."""
        start = self.pos
        if self.pos >= self.end:
            raise self.fail(field, "truncated: missing vector length")
        first = self.data[self.pos]
        prefix = first >> 6
        if prefix == 3:
            raise self.fail(field, "invalid vector length prefix 0b11")
        size = 1 << prefix
        raw = self._take(size, field + " length")
        value = int.from_bytes(raw, "big") & ((1 << (8 * size - 2)) - 1)
        if (size == 2 and value < 64) or (size == 4 and value < 16384):
            raise self.fail(field, f"vector length {value} not minimally encoded in {size} bytes", start)
        return value

    def vector(self, field: str, limit: Optional[int] = None) -> bytes:
        """An opaque<V>: its bytes, with the length checked against the data."""
        start = self.pos
        length = self.varint(field)
        if limit is not None and length > limit:
            raise self.fail(field, f"length {length} over the limit of {limit}", start)
        if length > self.end - self.pos:
            raise self.fail(field, f"vector length {length} beyond the data ({self.end - self.pos} bytes left)", start)
        return self._take(length, field)

    def sub(self, field: str) -> _Reader:
        """A reader over the contents of the next vector, which this one skips."""
        start = self.pos
        length = self.varint(field)
        if length > self.end - self.pos:
            raise self.fail(field, f"vector length {length} beyond the data ({self.end - self.pos} bytes left)", start)
        inner = _Reader(self.data, self.pos, self.pos + length)
        self.pos += length
        return inner

    def at_end(self) -> bool:
        return self.pos >= self.end


def _uint16_list(r: _Reader, field: str) -> tuple[int, ...]:
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


def _extensions(r: _Reader, field: str) -> tuple[Extension, ...]:
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


def _credential(r: _Reader) -> Credential:
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


def _capabilities(r: _Reader) -> Capabilities:
    return Capabilities(
        versions=_uint16_list(r, "leaf_node.capabilities.versions"),
        cipher_suites=_uint16_list(r, "leaf_node.capabilities.cipher_suites"),
        extensions=_uint16_list(r, "leaf_node.capabilities.extensions"),
        proposals=_uint16_list(r, "leaf_node.capabilities.proposals"),
        credentials=_uint16_list(r, "leaf_node.capabilities.credentials"),
    )


def _leaf_node(r: _Reader) -> LeafNode:
    begin = r.pos
    encryption_key = r.vector("leaf_node.encryption_key")
    signature_key = r.vector("leaf_node.signature_key")
    credential = _credential(r)
    capabilities = _capabilities(r)
    source_at = r.pos
    source = r.uint8("leaf_node.leaf_node_source")
    if source != LEAF_NODE_SOURCE_KEY_PACKAGE:
        names = {LEAF_NODE_SOURCE_UPDATE: "update", LEAF_NODE_SOURCE_COMMIT: "commit"}
        what = names.get(source, "unknown")
        raise r.fail(
            "leaf_node.leaf_node_source", f"{what} source {source}, a KeyPackage needs key_package (1)", source_at
        )
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


def _key_package(r: _Reader) -> KeyPackage:
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
    if not r.at_end():
        raise r.fail("KeyPackage", f"{r.end - r.pos} trailing bytes")
    sizes = _KEY_SIZES.get(cipher_suite)
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
        raw=r.data[begin : r.end],
    )


def _as_bytes(data: bytes) -> bytes:
    if isinstance(data, (bytearray, memoryview)):
        data = bytes(data)
    if not isinstance(data, bytes):
        raise TypeError(f"a KeyPackage is bytes, not {type(data).__name__}")
    if len(data) > MAX_KEY_PACKAGE_SIZE:
        raise KeyPackageError(0, "KeyPackage", f"{len(data)} bytes, over the limit of {MAX_KEY_PACKAGE_SIZE}")
    return data


def parse_key_package(data: bytes) -> KeyPackage:
    """
    Parse an encoded KeyPackage (the bare struct, as RFC 9420 section 10).

    @raise KeyPackageError: when the bytes are not exactly one well-formed
        mls10 KeyPackage within the limits of this module.
    """
    return _key_package(_Reader(_as_bytes(data)))


def parse_key_package_message(data: bytes) -> KeyPackage:
    """
    Parse an MLSMessage carrying a KeyPackage (version mls10, wire_format
    mls_key_package), the form the MLS test vectors and many clients use.
    Offsets in errors count from the start of the message.
    """
    r = _Reader(_as_bytes(data))
    version = r.uint16("MLSMessage.version")
    if version != MLS10:
        raise r.fail("MLSMessage.version", f"unknown protocol version {version}", 0)
    wire_format = r.uint16("MLSMessage.wire_format")
    if wire_format != WIRE_FORMAT_KEY_PACKAGE:
        raise r.fail("MLSMessage.wire_format", f"wire format {wire_format} is not mls_key_package (5)", 2)
    return _key_package(r)


def _sign_content(label: bytes, content: bytes) -> bytes:
    """The encoded SignContent of RFC 9420 section 5.1.2."""

    def vec(value: bytes) -> bytes:
        n = len(value)
        if n < 1 << 6:
            prefix = n.to_bytes(1, "big")
        elif n < 1 << 14:
            prefix = (n | 0x4000).to_bytes(2, "big")
        else:
            prefix = (n | 0x80000000).to_bytes(4, "big")
        return prefix + value

    return vec(b"MLS 1.0 " + label) + vec(content)


def _verify(cipher_suite: int, public_key: bytes, signature: bytes, message: bytes) -> bool:
    # Imported here: parsing needs no cryptography.
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec, ed448

    if cipher_suite in (1, 3):
        import nacl.exceptions
        import nacl.signing

        if len(public_key) != 32 or len(signature) != 64:
            return False
        try:
            nacl.signing.VerifyKey(public_key).verify(message, signature)
        except (nacl.exceptions.BadSignatureError, ValueError):
            return False
        return True
    try:
        if cipher_suite in (4, 6):
            ed448.Ed448PublicKey.from_public_bytes(public_key).verify(signature, message)
            return True
        curves: dict[int, tuple[ec.EllipticCurve, hashes.HashAlgorithm]] = {
            2: (ec.SECP256R1(), hashes.SHA256()),
            5: (ec.SECP521R1(), hashes.SHA512()),
            7: (ec.SECP384R1(), hashes.SHA384()),
        }
        if cipher_suite in curves:
            curve, digest = curves[cipher_suite]
            key = ec.EllipticCurvePublicKey.from_encoded_point(curve, public_key)
            key.verify(signature, message, ec.ECDSA(digest))
            return True
    except (InvalidSignature, ValueError, TypeError):
        return False
    raise KeyPackageError(2, "cipher_suite", f"cannot verify signatures of cipher suite {cipher_suite}")


def verify_leaf_node_signature(kp: KeyPackage) -> bool:
    """
    Whether the leaf node's signature is SignWithLabel(signature_key,
    "LeafNodeTBS", LeafNodeTBS) under the KeyPackage's cipher suite.

    @raise KeyPackageError: for a cipher suite outside RFC 9420's 1-7.
    """
    leaf = kp.leaf_node
    content = _sign_content(b"LeafNodeTBS", leaf.to_be_signed)
    return _verify(kp.cipher_suite, leaf.signature_key, leaf.signature, content)


def verify_key_package_signature(kp: KeyPackage) -> bool:
    """
    Whether the KeyPackage's signature is SignWithLabel(leaf signature_key,
    "KeyPackageTBS", KeyPackageTBS) under its cipher suite (Ed25519 with
    PyNaCl for suites 1 and 3; ECDSA and Ed448 with cryptography for the
    others).  The leaf node's own signature is L{verify_leaf_node_signature}.

    @raise KeyPackageError: for a cipher suite outside RFC 9420's 1-7.
    """
    content = _sign_content(b"KeyPackageTBS", kp.to_be_signed)
    return _verify(kp.cipher_suite, kp.leaf_node.signature_key, kp.signature, content)
