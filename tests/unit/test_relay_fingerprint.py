"""Tests for fedserver_relay.fingerprint, relay identities."""

from __future__ import annotations

import hashlib

import pytest
from cryptography.hazmat.primitives.serialization import Encoding
from hypothesis import given
from hypothesis import strategies as st

from fedserver import pki
from fedserver.tls import PeerCertificate
from fedserver_relay.fingerprint import (
    FINGERPRINT_HEX_LENGTH,
    SHORT_ID_SIZE,
    fingerprint_of_certificate,
    fingerprint_of_der,
    fingerprint_of_pem,
    format_fingerprint,
    parse_fingerprint,
    short_id,
)

CANONICAL = "3f1c" + "0123456789abcdef" * 3 + "e09a" + "55aa" + "0f" * 2
assert len(CANONICAL) == 64


@pytest.fixture(scope="module")
def issued() -> tuple[pki.Issued, pki.Issued]:
    ca = pki.make_ca("relay test CA")
    return ca, pki.issue(ca, ["relay-1.example"])


# parse_fingerprint


def test_canonical_is_accepted_as_is():
    assert parse_fingerprint(CANONICAL) == CANONICAL


def test_upper_case_is_lowered():
    assert parse_fingerprint(CANONICAL.upper()) == CANONICAL


def test_colon_pairs_in_any_case():
    pairs = ":".join(CANONICAL[i : i + 2] for i in range(0, 64, 2))
    assert parse_fingerprint(pairs) == CANONICAL
    assert parse_fingerprint(pairs.upper()) == CANONICAL


@pytest.mark.parametrize(
    "text",
    [
        "",
        CANONICAL[:-1],
        CANONICAL + "0",
        CANONICAL[:-1] + "g",
        " " + CANONICAL,
        CANONICAL + "\n",
        "sha256:" + CANONICAL,
        "0x" + CANONICAL[2:],
        ":".join(CANONICAL[i : i + 2] for i in range(0, 64, 2)) + ":",
        ":" + ":".join(CANONICAL[i : i + 2] for i in range(0, 64, 2)),
        "::".join(CANONICAL[i : i + 2] for i in range(0, 64, 2)),
        CANONICAL[:2] + ":" + CANONICAL[2:],  # colons must be all or nothing
        "-".join(CANONICAL[i : i + 2] for i in range(0, 64, 2)),
        " ".join(CANONICAL[i : i + 2] for i in range(0, 64, 2)),
        ":".join(CANONICAL[i : i + 4] for i in range(0, 64, 4)),
        CANONICAL[:-1] + "\u0661",  # ARABIC-INDIC DIGIT ONE: a digit, not hex
        CANONICAL[:-1] + "\uff41",  # FULLWIDTH LATIN SMALL LETTER A
        "0" * 40,  # a SHA-1 fingerprint
        "0" * 128,
    ],
)
def test_anything_else_is_refused_naming_it(text):
    with pytest.raises(ValueError, match="is not a relay fingerprint") as info:
        parse_fingerprint(text)
    assert repr(text)[:50] in str(info.value)


def test_a_long_input_is_quoted_only_in_part():
    with pytest.raises(ValueError) as info:
        parse_fingerprint("x" * 10_000)
    assert len(str(info.value)) < 400
    assert "10000 characters" in str(info.value)


@pytest.mark.parametrize("value", [None, 42, CANONICAL.encode(), bytes.fromhex(CANONICAL)])
def test_non_strings_are_a_type_error(value):
    with pytest.raises(TypeError, match="must be a string"):
        parse_fingerprint(value)


@given(st.binary(min_size=32, max_size=32), st.booleans(), st.booleans())
def test_every_written_form_parses_back(digest, colons, upper):
    canonical = digest.hex()
    written = format_fingerprint(canonical, colons=colons)
    if upper:
        written = written.upper()
    assert parse_fingerprint(written) == canonical


@given(st.text(max_size=100))
def test_arbitrary_text_gives_a_fingerprint_or_value_error(text):
    try:
        result = parse_fingerprint(text)
    except ValueError:
        return
    assert len(result) == FINGERPRINT_HEX_LENGTH
    assert set(result) <= set("0123456789abcdef")


# fingerprints of certificates


def test_fingerprint_of_der_is_sha256_of_the_bytes(issued):
    _, leaf = issued
    der = leaf.certificate.public_bytes(Encoding.DER)
    assert fingerprint_of_der(der) == hashlib.sha256(der).hexdigest()
    assert fingerprint_of_der(bytearray(der)) == fingerprint_of_der(der)
    assert fingerprint_of_der(memoryview(der)) == fingerprint_of_der(der)


def test_it_matches_the_tls_layer(issued):
    _, leaf = issued
    der = leaf.certificate.public_bytes(Encoding.DER)
    assert fingerprint_of_der(der) == PeerCertificate(leaf.certificate, None).fingerprint
    assert fingerprint_of_certificate(leaf.certificate) == fingerprint_of_der(der)


def test_fingerprint_of_pem_takes_the_first_certificate(issued):
    ca, leaf = issued
    chain = leaf.certificate_pem() + ca.certificate_pem()
    assert fingerprint_of_pem(chain) == fingerprint_of_certificate(leaf.certificate)
    assert fingerprint_of_pem(ca.certificate_pem() + leaf.certificate_pem()) == fingerprint_of_certificate(
        ca.certificate
    )


def test_fingerprint_of_pem_skips_a_key_before_the_certificate(issued):
    _, leaf = issued
    assert fingerprint_of_pem(leaf.key_pem() + leaf.certificate_pem()) == fingerprint_of_certificate(
        leaf.certificate
    )


@pytest.mark.parametrize("data", [b"", b"junk", b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"])
def test_fingerprint_of_pem_without_a_certificate(data):
    with pytest.raises(ValueError, match="no PEM certificate found"):
        fingerprint_of_pem(data)


def test_fingerprint_of_pem_of_a_key_only(issued):
    _, leaf = issued
    with pytest.raises(ValueError, match="no PEM certificate found"):
        fingerprint_of_pem(leaf.key_pem())


def test_fingerprint_of_pem_wants_bytes(issued):
    _, leaf = issued
    with pytest.raises(TypeError):
        fingerprint_of_pem(leaf.certificate_pem().decode())


def test_pem_given_to_fingerprint_of_der_is_refused_with_a_hint(issued):
    _, leaf = issued
    with pytest.raises(ValueError, match="looks like PEM"):
        fingerprint_of_der(leaf.certificate_pem())


@pytest.mark.parametrize("data", [b"", b"\x30\x03\x02\x01\x01", b"not a certificate"])
def test_fingerprint_of_der_refuses_what_is_not_a_certificate(data):
    with pytest.raises(ValueError, match=r"not a DER X\.509 certificate"):
        fingerprint_of_der(data)


def test_fingerprint_of_der_refuses_trailing_bytes(issued):
    _, leaf = issued
    with pytest.raises(ValueError, match=r"not a DER X\.509 certificate"):
        fingerprint_of_der(leaf.certificate.public_bytes(Encoding.DER) + b"\x00")


def test_fingerprint_of_der_wants_bytes():
    with pytest.raises(TypeError):
        fingerprint_of_der("3082")


# short ids and formatting


def test_short_id_is_the_first_eight_bytes_of_the_digest():
    assert short_id(CANONICAL) == bytes.fromhex(CANONICAL)[:8]
    assert len(short_id(CANONICAL)) == SHORT_ID_SIZE
    assert short_id(format_fingerprint(CANONICAL).upper()) == short_id(CANONICAL)


def test_short_id_refuses_a_bad_fingerprint():
    with pytest.raises(ValueError, match="is not a relay fingerprint"):
        short_id("abcd")


def test_format_with_and_without_colons():
    assert format_fingerprint(CANONICAL.upper(), colons=False) == CANONICAL
    formatted = format_fingerprint(CANONICAL)
    assert formatted.split(":") == [CANONICAL[i : i + 2] for i in range(0, 64, 2)]
    assert len(formatted) == 64 + 31


def test_format_refuses_a_bad_fingerprint():
    with pytest.raises(ValueError, match="'nope' is not a relay fingerprint"):
        format_fingerprint("nope")
