"""
The RFC 9420 (MLS 1.0) wire-format primitives shared by the MIMI parsers.

L{fedserver_mimi.keypackage} and L{fedserver_mimi.messages} read MLS
structures with one L{Reader}: TLS presentation-language integers and the
variable-size vectors of RFC 9420 section 2.1.2 (the QUIC varint of RFC 9000
section 16 without its 8-byte form, minimally encoded, the prefix C{0b11}
invalid), and C{optional<T>} values of section 2.1.1.  Every failure is an
L{MLSDecodeError} (a L{ValueError}) naming the byte offset, the dotted field
and the reason; each parser raises its own subclass, chosen when it makes its
reader.

This module also has the few pieces of cryptography the parsers and the
encoder share: the SignContent of SignWithLabel (section 5.1.2), signature
verification for the seven registered cipher suites (section 17.1), and the
cipher suites' hash functions and key sizes.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator
from typing import Optional

__all__ = [
    "HASH_NAMES",
    "KEY_SIZES",
    "VARINT_MAX",
    "MLSDecodeError",
    "Reader",
    "as_bytes",
    "hash_size",
    "ref_hash",
    "sign_content",
    "varint",
    "vec",
    "verify_with_label",
]

#: The largest length an MLS varint can carry (30 bits).
VARINT_MAX = (1 << 30) - 1

#: The hash function of each registered cipher suite (RFC 9420 section 17.1),
#: by its L{hashlib} name.
HASH_NAMES: dict[int, str] = {
    1: "sha256",
    2: "sha256",
    3: "sha256",
    4: "sha512",
    5: "sha512",
    6: "sha512",
    7: "sha384",
}

#: (HPKE public key size, signature public key size) of the registered
#: suites: X25519 32, P-256 65 (uncompressed), X448 56, P-521 133, P-384 97;
#: Ed25519 32, Ed448 57.  A DHKEM's kem_output is an HPKE public key too.
KEY_SIZES: dict[int, tuple[int, int]] = {
    1: (32, 32),
    2: (65, 65),
    3: (32, 32),
    4: (56, 57),
    5: (133, 133),
    6: (56, 57),
    7: (97, 97),
}


class MLSDecodeError(ValueError):
    """
    The bytes are not an acceptable encoding of an MLS structure.

    Subclasses name what was being parsed in L{what}, which starts the message.

    @ivar offset: the byte offset in the input where the problem was found.
    @ivar field: the dotted name of the field being read.
    @ivar reason: what is wrong, in words.
    """

    what = "MLS structure"

    def __init__(self, offset: int, field: str, reason: str) -> None:
        super().__init__(f"invalid {self.what} at offset {offset} ({field}): {reason}")
        self.offset = offset
        self.field = field
        self.reason = reason


class Reader:
    """
    Reads TLS presentation-language values from C{data[pos:end]}.

    Offsets are always those of C{data}, so errors in nested structures point
    into the whole input.

    @ivar error: the L{MLSDecodeError} subclass raised by L{fail}.
    @ivar prefix: prepended to every field name in errors (see L{nested}).
    """

    __slots__ = ("data", "end", "error", "pos", "prefix")

    def __init__(
        self,
        data: bytes,
        pos: int = 0,
        end: Optional[int] = None,
        *,
        error: type[MLSDecodeError] = MLSDecodeError,
        prefix: str = "",
    ) -> None:
        self.data = data
        self.pos = pos
        self.end = len(data) if end is None else end
        self.error = error
        self.prefix = prefix

    def fail(self, field: str, reason: str, offset: Optional[int] = None) -> MLSDecodeError:
        """The error to raise for C{field}, at C{offset} (default: here)."""
        return self.error(self.pos if offset is None else offset, self.prefix + field, reason)

    @contextlib.contextmanager
    def nested(self, prefix: str) -> Iterator[Reader]:
        """Within the block, field names in errors start with C{prefix} too."""
        saved = self.prefix
        self.prefix = saved + prefix
        try:
            yield self
        finally:
            self.prefix = saved

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

    def uint32(self, field: str) -> int:
        return int.from_bytes(self._take(4, field), "big")

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

    def sub(self, field: str) -> Reader:
        """A reader over the contents of the next vector, which this one skips."""
        start = self.pos
        length = self.varint(field)
        if length > self.end - self.pos:
            raise self.fail(field, f"vector length {length} beyond the data ({self.end - self.pos} bytes left)", start)
        inner = Reader(self.data, self.pos, self.pos + length, error=self.error, prefix=self.prefix)
        self.pos += length
        return inner

    def optional(self, field: str) -> bool:
        """The presence octet of an optional<T> (RFC 9420 section 2.1.1): 0 or 1."""
        start = self.pos
        present = self.uint8(field)
        if present > 1:
            raise self.fail(field, f"presence octet {present} is neither 0 nor 1", start)
        return present == 1

    def at_end(self) -> bool:
        return self.pos >= self.end

    def expect_end(self, field: str) -> None:
        """Refuse anything left in this reader's span."""
        if not self.at_end():
            raise self.fail(field, f"{self.end - self.pos} trailing bytes")


def as_bytes(data: bytes, limit: int, error: type[MLSDecodeError], what: str) -> bytes:
    """
    C{data} as L{bytes} (copying a bytearray or memoryview), refused with
    C{error} at offset 0 when longer than C{limit}.

    @raise TypeError: for anything that is not bytes-like.
    """
    if isinstance(data, (bytearray, memoryview)):
        data = bytes(data)
    if not isinstance(data, bytes):
        raise TypeError(f"{what} must be bytes, not {type(data).__name__}")
    if len(data) > limit:
        raise error(0, what, f"{len(data)} bytes, over the limit of {limit}")
    return data


def varint(n: int) -> bytes:
    """The minimal MLS variable-size length encoding of C{n} (0 to 2**30 - 1)."""
    if n < 0 or n > VARINT_MAX:
        raise ValueError(f"{n} cannot be an MLS vector length")
    if n < 1 << 6:
        return n.to_bytes(1, "big")
    if n < 1 << 14:
        return (n | 0x4000).to_bytes(2, "big")
    return (n | 0x80000000).to_bytes(4, "big")


def vec(data: bytes) -> bytes:
    """C{data} as an opaque<V>: its varint length, then its bytes."""
    return varint(len(data)) + bytes(data)


def sign_content(label: bytes, content: bytes) -> bytes:
    """
    The encoded SignContent of RFC 9420 section 5.1.2, what SignWithLabel
    signs::

        struct { opaque label<V> = "MLS 1.0 " + Label; opaque content<V>; } SignContent;
    """
    return vec(b"MLS 1.0 " + label) + vec(content)


def hash_size(cipher_suite: int) -> Optional[int]:
    """The output size of the suite's hash function, or L{None} when unregistered."""
    name = HASH_NAMES.get(cipher_suite)
    return None if name is None else hashlib.new(name).digest_size


def ref_hash(cipher_suite: int, label: bytes, value: bytes) -> Optional[bytes]:
    """
    RefHash(label, value) of RFC 9420 section 5.2: the suite's hash of
    C{struct { opaque label<V>; opaque value<V>; }}, or L{None} for an
    unregistered suite.
    """
    name = HASH_NAMES.get(cipher_suite)
    if name is None:
        return None
    return hashlib.new(name, vec(label) + vec(value)).digest()


def verify_with_label(
    cipher_suite: int, public_key: bytes, signature: bytes, label: bytes, content: bytes
) -> Optional[bool]:
    """
    VerifyWithLabel of RFC 9420 section 5.1.2: whether C{signature} is
    C{public_key}'s signature of SignContent(C{label}, C{content}) under the
    suite's signature scheme (Ed25519 with PyNaCl for suites 1 and 3; Ed448
    and ECDSA with cryptography for the others).

    @return: L{None} for a suite outside RFC 9420's 1-7, which the caller
        reports as it sees fit.
    """
    message = sign_content(label, content)
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
    if cipher_suite not in HASH_NAMES:
        return None
    # Imported here: parsing needs no cryptography.
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec, ed448

    try:
        if cipher_suite in (4, 6):
            ed448.Ed448PublicKey.from_public_bytes(public_key).verify(signature, message)
            return True
        curves: dict[int, tuple[ec.EllipticCurve, hashes.HashAlgorithm]] = {
            2: (ec.SECP256R1(), hashes.SHA256()),
            5: (ec.SECP521R1(), hashes.SHA512()),
            7: (ec.SECP384R1(), hashes.SHA384()),
        }
        curve, digest = curves[cipher_suite]
        key = ec.EllipticCurvePublicKey.from_encoded_point(curve, public_key)
        key.verify(signature, message, ec.ECDSA(digest))
        return True
    except (InvalidSignature, ValueError, TypeError):
        return False
