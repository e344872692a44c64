"""Tests for C{fedserver relay-fingerprint} (fedserver.cli)."""

from __future__ import annotations

import hashlib

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from fedserver.cli import main
from fedserver_relay.fingerprint import parse_fingerprint


def _der_of_first(path: str) -> bytes:
    with open(path, "rb") as f:
        return x509.load_pem_x509_certificates(f.read())[0].public_bytes(Encoding.DER)


def test_prints_the_leaf_fingerprint_with_and_without_colons(dev_pki, capsys):
    cert, _ = dev_pki.issue_files("relay-1.example")  # leaf, then the CA
    assert main(["relay-fingerprint", cert]) == 0
    out, err = capsys.readouterr()
    colons, plain = out.splitlines()
    expected = hashlib.sha256(_der_of_first(cert)).hexdigest()
    assert plain == expected
    assert colons == ":".join(expected[i:i + 2] for i in range(0, 64, 2))
    assert parse_fingerprint(colons) == parse_fingerprint(plain) == expected  # both go in a [relay] table
    assert "2 certificates" in err and "the leaf" in err


def test_a_single_certificate_prints_no_note(dev_pki, tmp_path, capsys):
    cert, _ = dev_pki.issue_files("relay-2.example")
    single = tmp_path / "leaf.pem"
    single.write_bytes(x509.load_der_x509_certificate(_der_of_first(cert)).public_bytes(Encoding.PEM))
    assert main(["relay-fingerprint", str(single)]) == 0
    out, err = capsys.readouterr()
    assert out.splitlines()[1] == hashlib.sha256(_der_of_first(cert)).hexdigest()
    assert err == ""


def test_der_certificate(dev_pki, tmp_path, capsys):
    cert, _ = dev_pki.issue_files("relay-3.example")
    der = tmp_path / "leaf.der"
    der.write_bytes(_der_of_first(cert))
    assert main(["relay-fingerprint", str(der)]) == 0
    assert capsys.readouterr().out.splitlines()[1] == hashlib.sha256(der.read_bytes()).hexdigest()


def test_refuses_a_private_key(dev_pki, capsys):
    _, key = dev_pki.issue_files("relay-4.example")
    assert main(["relay-fingerprint", key]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert f"fedserver: {key} holds no certificate" in err


def test_refuses_text_that_is_not_a_certificate(tmp_path, capsys):
    path = tmp_path / "notes.txt"
    path.write_text("ab:cd:ef\n")
    assert main(["relay-fingerprint", str(path)]) == 1
    assert "holds no certificate" in capsys.readouterr().err


def test_refuses_a_missing_file(tmp_path, capsys):
    missing = tmp_path / "missing.pem"
    assert main(["relay-fingerprint", str(missing)]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err == f"fedserver: cannot read {missing}: No such file or directory\n"
