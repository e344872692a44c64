"""Tests for fedserver.pki, the development certificate authority."""

from __future__ import annotations

import datetime
import os
import stat

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedserver import pki
from fedserver.tls import certificate_names


@pytest.fixture(scope="module")
def ca():
    return pki.make_ca("unit CA")


def extension(cert, cls):
    return cert.extensions.get_extension_for_class(cls).value


def common_name(cert):
    return cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value


def test_a_ca_is_self_signed_and_may_sign(ca):
    cert = ca.certificate
    assert cert.subject == cert.issuer
    assert common_name(cert) == "unit CA"
    assert extension(cert, x509.BasicConstraints).ca is True
    assert extension(cert, x509.KeyUsage).key_cert_sign is True
    cert.verify_directly_issued_by(cert)
    now = datetime.datetime.now(datetime.timezone.utc)
    assert cert.not_valid_before_utc < now < cert.not_valid_after_utc


def test_issue_names_in_san_and_common_name(ca):
    issued = pki.issue(ca, ["fed.b.example", "alt.b.example"])
    cert = issued.certificate
    cert.verify_directly_issued_by(ca.certificate)
    assert extension(cert, x509.BasicConstraints).ca is False
    assert extension(cert, x509.SubjectAlternativeName).get_values_for_type(x509.DNSName) == [
        "fed.b.example",
        "alt.b.example",
    ]
    assert common_name(cert) == "fed.b.example"
    assert list(extension(cert, x509.ExtendedKeyUsage)) == [
        ExtendedKeyUsageOID.SERVER_AUTH,
        ExtendedKeyUsageOID.CLIENT_AUTH,
    ]
    assert issued.key.public_key().public_numbers() == cert.public_key().public_numbers()


def test_issue_options(ca):
    start = datetime.datetime(2020, 1, 1, tzinfo=datetime.timezone.utc)
    end = datetime.datetime(2021, 1, 1, tzinfo=datetime.timezone.utc)
    cert = pki.issue(
        ca, ["fed.b.example"], common_name="Backend B", san=False, usages=(), not_before=start, not_after=end
    ).certificate
    assert common_name(cert) == "Backend B"
    assert certificate_names(cert) == frozenset({"backend b"})
    for cls in (x509.SubjectAlternativeName, x509.ExtendedKeyUsage):
        with pytest.raises(x509.ExtensionNotFound):
            cert.extensions.get_extension_for_class(cls)
    assert (cert.not_valid_before_utc, cert.not_valid_after_utc) == (start, end)


def test_write_issued_writes_a_chain_and_a_private_key(ca, tmp_path):
    leaf = pki.issue(ca, ["fed.b.example"])
    cert_path, key_path = pki.write_issued(str(tmp_path), "fed.b.example", leaf, chain=[ca])
    assert (cert_path, key_path) == (str(tmp_path / "fed.b.example.pem"), str(tmp_path / "fed.b.example.key"))
    chain = x509.load_pem_x509_certificates((tmp_path / "fed.b.example.pem").read_bytes())
    assert chain == [leaf.certificate, ca.certificate]
    key = serialization.load_pem_private_key((tmp_path / "fed.b.example.key").read_bytes(), password=None)
    assert key.public_key().public_numbers() == leaf.key.public_key().public_numbers()
    assert stat.S_IMODE(os.stat(key_path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(cert_path).st_mode) == 0o644 & ~_umask()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_dev_pki_writes_a_ca_and_one_certificate_per_domain(tmp_path):
    folder = tmp_path / "pki"
    pki.create_dev_pki(str(folder), ["fed.a.example", "fed.b.example"])
    assert sorted(os.listdir(folder)) == [
        "ca.key",
        "ca.pem",
        "fed.a.example.key",
        "fed.a.example.pem",
        "fed.b.example.key",
        "fed.b.example.pem",
    ]
    ca_cert = x509.load_pem_x509_certificate((folder / "ca.pem").read_bytes())
    leaf, issuer = x509.load_pem_x509_certificates((folder / "fed.a.example.pem").read_bytes())
    assert issuer == ca_cert
    leaf.verify_directly_issued_by(ca_cert)
    assert certificate_names(leaf) == frozenset({"fed.a.example"})


def test_dev_pki_reuses_its_ca_for_more_domains(tmp_path):
    pki.create_dev_pki(str(tmp_path), ["fed.a.example"])
    first_ca = (tmp_path / "ca.pem").read_bytes()
    pki.create_dev_pki(str(tmp_path), ["fed.c.example"])
    assert (tmp_path / "ca.pem").read_bytes() == first_ca
    leaf = x509.load_pem_x509_certificates((tmp_path / "fed.c.example.pem").read_bytes())[0]
    leaf.verify_directly_issued_by(x509.load_pem_x509_certificate(first_ca))


def test_dev_pki_refuses_a_ca_key_it_did_not_make(tmp_path, ca):
    pki.write_issued(str(tmp_path), "ca", ca)
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    (tmp_path / "ca.key").write_bytes(
        rsa_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    with pytest.raises(ValueError, match="is not an ECDSA key made by dev-pki"):
        pki.create_dev_pki(str(tmp_path), ["fed.a.example"])
