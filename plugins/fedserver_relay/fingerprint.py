"""
Relay identities: SHA-256 fingerprints of TLS certificates.

A relay is known by the SHA-256 digest of its certificate's DER encoding,
written canonically as 64 lower-case hexadecimal digits, the same value as
L{fedserver.tls.PeerCertificate.fingerprint}.  The fingerprint is taken from
the certificate the peer presented in the verified mutual-TLS handshake;
nothing the peer says about itself is an identity.

Configuration may write a fingerprint in either common form, and
L{parse_fingerprint} turns both into the canonical one::

    3f1c...e09a                          64 hex digits, any case
    3F:1C:...:E0:9A                      32 colon-separated pairs, any case

Media frames name their origin relay by a short id, the first 8 bytes of the
digest (L{short_id}).  Short ids are not identities: a relay that knows a
short id maps it back to a full fingerprint it has configured or been vouched
for, and should refuse a configuration in which two relays share one.
"""

from __future__ import annotations

import hashlib
import re

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

__all__ = [
    "FINGERPRINT_HEX_LENGTH",
    "SHORT_ID_SIZE",
    "fingerprint_of_certificate",
    "fingerprint_of_der",
    "fingerprint_of_pem",
    "format_fingerprint",
    "parse_fingerprint",
    "short_id",
]

#: Hex digits in a canonical fingerprint (a SHA-256 digest is 32 bytes).
FINGERPRINT_HEX_LENGTH = 64

#: Bytes of the digest that frames carry to name their origin relay.
SHORT_ID_SIZE = 8

#: Longest input quoted back in an error message.
_QUOTE_LIMIT = 100

_PLAIN = re.compile(r"[0-9a-fA-F]{64}")
_COLONS = re.compile(r"[0-9a-fA-F]{2}(?::[0-9a-fA-F]{2}){31}")


def _quote(text: str) -> str:
    if len(text) > _QUOTE_LIMIT:
        return repr(text[:_QUOTE_LIMIT]) + f"... ({len(text)} characters)"
    return repr(text)


def parse_fingerprint(text: str) -> str:
    """
    The canonical form (64 lower-case hex digits) of the fingerprint C{text}.

    Accepted: exactly 64 hexadecimal digits, or 32 two-digit groups separated
    by single colons, in any case.  Nothing else: no surrounding spaces, no
    other separators, no C{sha256:} prefix, no non-ASCII digits.

    @raise ValueError: naming C{text}, when it is not such a fingerprint.
    @raise TypeError: when C{text} is not a L{str}.
    """
    if not isinstance(text, str):
        raise TypeError(f"a relay fingerprint must be a string, not {type(text).__name__}")
    if _PLAIN.fullmatch(text) or _COLONS.fullmatch(text):
        return text.replace(":", "").lower()
    raise ValueError(
        f"{_quote(text)} is not a relay fingerprint: expected the SHA-256 of the relay's certificate as "
        "64 hex digits, optionally written as 32 colon-separated pairs (AB:CD:...)"
    )


def fingerprint_of_der(der: bytes) -> str:
    """
    The fingerprint of the certificate whose DER encoding is C{der}.

    The bytes are hashed as given, after checking that they are one X.509
    certificate, so that a PEM file or a key passed by mistake is refused
    rather than turned into an identity nobody has.

    @raise ValueError: when C{der} is not a DER certificate.
    """
    if isinstance(der, (bytearray, memoryview)):
        der = bytes(der)
    if not isinstance(der, bytes):
        raise TypeError(f"a DER certificate must be bytes, not {type(der).__name__}")
    try:
        x509.load_der_x509_certificate(der)
    except ValueError as e:
        hint = " (this looks like PEM; use fingerprint_of_pem)" if der.lstrip().startswith(b"-----BEGIN") else ""
        raise ValueError(f"not a DER X.509 certificate{hint}: {e}") from None
    return hashlib.sha256(der).hexdigest()


def fingerprint_of_certificate(certificate: x509.Certificate) -> str:
    """The fingerprint of a C{cryptography} certificate."""
    return hashlib.sha256(certificate.public_bytes(Encoding.DER)).hexdigest()


def fingerprint_of_pem(pem: bytes) -> str:
    """
    The fingerprint of the first certificate in the PEM text C{pem} (for a
    chain file, the leaf).  Other PEM blocks before it, such as a private
    key, are skipped.

    @raise ValueError: when C{pem} holds no readable certificate.
    """
    if isinstance(pem, (bytearray, memoryview)):
        pem = bytes(pem)
    if not isinstance(pem, bytes):
        raise TypeError(f"PEM text must be bytes, not {type(pem).__name__}")
    try:
        certificate = x509.load_pem_x509_certificate(pem)
    except ValueError as e:
        raise ValueError(f"no PEM certificate found: {e}") from None
    return fingerprint_of_certificate(certificate)


def short_id(fingerprint: str) -> bytes:
    """
    The first L{SHORT_ID_SIZE} bytes of the digest C{fingerprint} names (in
    any form L{parse_fingerprint} accepts), as frames carry it.
    """
    return bytes.fromhex(parse_fingerprint(fingerprint))[:SHORT_ID_SIZE]


def format_fingerprint(fingerprint: str, colons: bool = True) -> str:
    """
    C{fingerprint} for people: lower-case hex pairs joined by colons, or the
    canonical 64 digits when C{colons} is false.
    """
    canonical = parse_fingerprint(fingerprint)
    if not colons:
        return canonical
    return ":".join(canonical[i : i + 2] for i in range(0, FINGERPRINT_HEX_LENGTH, 2))
