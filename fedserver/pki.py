"""
A small certificate authority for trying fedserver locally and for tests.

C{fedserver dev-pki DIR --domain NAME ...} writes C{ca.pem}, C{ca.key} and,
for each name, C{NAME.pem} (the certificate, then the CA: a chain, leaf first)
and C{NAME.key}.  Certificates use ECDSA P-256, carry the name as a DNS
subjectAltName and allow both TLS server and client authentication, which is
what a federating backend needs.  Not for production: keys are unencrypted.
"""

from __future__ import annotations

import datetime
import os
from typing import Iterable, Optional, Sequence, Tuple

import attrs
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

_DAY = datetime.timedelta(days=1)


@attrs.frozen
class Issued:
    """A certificate and its private key."""

    certificate: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    def certificate_pem(self) -> bytes:
        return self.certificate.public_bytes(serialization.Encoding.PEM)

    def key_pem(self) -> bytes:
        return self.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def make_ca(common_name: str = "fedserver development CA", *, days: int = 3650) -> Issued:
    """A new self-signed CA."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _DAY)
        .not_valid_after(now + days * _DAY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return Issued(cert, key)


def issue(
    ca: Issued,
    names: Sequence[str],
    *,
    common_name: Optional[str] = None,
    usages: Iterable[x509.ObjectIdentifier] = (
        ExtendedKeyUsageOID.SERVER_AUTH,
        ExtendedKeyUsageOID.CLIENT_AUTH,
    ),
    san: bool = True,
    not_before: Optional[datetime.datetime] = None,
    not_after: Optional[datetime.datetime] = None,
) -> Issued:
    """
    A certificate for C{names}, signed by C{ca}.

    @param san: put C{names} in a subjectAltName (else only the common name).
    @param usages: the extended key usages; empty for none at all.
    """
    key = ec.generate_private_key(ec.SECP256R1())
    now = _now()
    subject = x509.Name(
        [x509.NameAttribute(NameOID.COMMON_NAME, common_name or (names[0] if names else "peer"))]
    )
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca.certificate.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before or now - _DAY)
        .not_valid_after(not_after or now + 825 * _DAY)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()), critical=False
        )
    )
    if san and names:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName(n) for n in names]), critical=False
        )
    usages = list(usages)
    if usages:
        builder = builder.add_extension(x509.ExtendedKeyUsage(usages), critical=False)
    return Issued(builder.sign(ca.key, hashes.SHA256()), key)


def _write(path: str, data: bytes, private: bool = False) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def write_issued(directory: str, stem: str, issued: Issued, chain: Sequence[Issued] = ()) -> Tuple[str, str]:
    """Write C{stem}.pem (leaf then C{chain}) and C{stem}.key; return both paths."""
    cert_path = os.path.join(directory, f"{stem}.pem")
    key_path = os.path.join(directory, f"{stem}.key")
    _write(cert_path, issued.certificate_pem() + b"".join(c.certificate_pem() for c in chain))
    _write(key_path, issued.key_pem(), private=True)
    return cert_path, key_path


def create_dev_pki(directory: str, domains: Sequence[str]) -> None:
    """
    Write a CA and one certificate per domain into C{directory}.  An existing
    C{ca.pem}/C{ca.key} pair there is reused, so further domains can be added.
    """
    os.makedirs(directory, exist_ok=True)
    ca_cert = os.path.join(directory, "ca.pem")
    ca_key = os.path.join(directory, "ca.key")
    if os.path.exists(ca_cert) and os.path.exists(ca_key):
        with open(ca_cert, "rb") as f:
            cert = x509.load_pem_x509_certificate(f.read())
        with open(ca_key, "rb") as f:
            key = serialization.load_pem_private_key(f.read(), password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ValueError(f"{ca_key} is not an ECDSA key made by dev-pki")
        ca = Issued(cert, key)
    else:
        ca = make_ca()
        write_issued(directory, "ca", ca)
    for domain in domains:
        write_issued(directory, domain, issue(ca, [domain]), chain=[ca])
