"""Tests for fedserver.tls: TLS material, certificate names and real in-memory handshakes."""

from __future__ import annotations

import hashlib

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import BestAvailableEncryption, Encoding, PrivateFormat
from cryptography.x509.oid import ExtendedKeyUsageOID
from OpenSSL import SSL
from twisted.internet import ssl as twisted_ssl
from twisted.internet.interfaces import (
    IHandshakeListener,
    IOpenSSLClientConnectionCreator,
    IOpenSSLServerConnectionCreator,
)
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import StringTransport
from zope.interface import implementer
from zope.interface.verify import verifyObject

from fedserver import pki
from fedserver.errors import ConfigError
from fedserver.tls import (
    ClientCertificateServerOptions,
    PeerCertificate,
    TLSMaterial,
    certificate_names,
    has_client_auth_usage,
    peer_certificate,
    verify_error_text,
)
from tests.unit.helpers import ip_only_certificate, tls_pump

SERVER = "fed.a.example"


@pytest.fixture
def server_material(dev_pki):
    return dev_pki.material(SERVER)


# names and usages


def test_certificate_names_come_from_the_san(dev_pki):
    cert = pki.issue(dev_pki.ca, ["Fed.B.example", "alt.b.example"], common_name="ignored.example").certificate
    assert certificate_names(cert) == frozenset({"fed.b.example", "alt.b.example"})


def test_certificate_names_fall_back_to_the_common_name_only_without_san(dev_pki):
    cert = pki.issue(dev_pki.ca, ["Fed.B.example"], san=False).certificate
    assert certificate_names(cert) == frozenset({"fed.b.example"})


def test_a_san_without_dns_names_names_nothing(dev_pki):
    assert certificate_names(ip_only_certificate(dev_pki.ca)) == frozenset()


@pytest.mark.parametrize(
    "usages, allowed",
    [
        ((), True),
        ((ExtendedKeyUsageOID.CLIENT_AUTH,), True),
        ((ExtendedKeyUsageOID.SERVER_AUTH,), False),
        ((ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH), True),
    ],
)
def test_client_auth_usage(dev_pki, usages, allowed):
    assert has_client_auth_usage(pki.issue(dev_pki.ca, ["b.example"], usages=usages).certificate) is allowed


def test_verify_error_text():
    assert verify_error_text(10) == "a certificate has expired"
    assert "clientAuth" in verify_error_text(26)
    assert verify_error_text(99) == "OpenSSL certificate verification error 99"


def test_peer_certificate_value(dev_pki):
    cert = pki.issue(dev_pki.ca, ["fed.b.example"]).certificate
    peer = PeerCertificate(cert, None)
    assert peer.fingerprint == hashlib.sha256(cert.public_bytes(Encoding.DER)).hexdigest()
    assert peer.names == frozenset({"fed.b.example"})


# loading the [tls] files


def test_load_good_material(dev_pki):
    cert, key = dev_pki.issue_files(SERVER)
    material = TLSMaterial.load(cert, key, [dev_pki.ca_path])
    assert len(material.chain) == 2
    assert certificate_names(material.leaf) == frozenset({SERVER})
    assert material.ca_certificates == (dev_pki.ca.certificate,)
    assert isinstance(material.private_certificate(), twisted_ssl.PrivateCertificate)
    assert verifyObject(IOpenSSLClientConnectionCreator, material.client_options("fed.b.example"))


def load_error(dev_pki, *, cert=None, key=None, cas=None) -> ConfigError:
    good_cert, good_key = dev_pki.issue_files(SERVER)
    with pytest.raises(ConfigError) as info:
        TLSMaterial.load(cert or good_cert, key or good_key, [dev_pki.ca_path] if cas is None else cas)
    return info.value


def test_a_missing_certificate_file_names_the_key(dev_pki, tmp_path):
    error = load_error(dev_pki, cert=str(tmp_path / "missing.pem"))
    assert error.path == "[tls] certificate"
    assert "cannot read" in error.reason and "missing.pem" in error.reason


def test_a_missing_key_file_names_the_key(dev_pki, tmp_path):
    assert load_error(dev_pki, key=str(tmp_path / "missing.key")).path == "[tls] private_key"


def test_a_missing_ca_file_names_the_key(dev_pki, tmp_path):
    assert load_error(dev_pki, cas=[str(tmp_path / "missing.pem")]).path == "[tls] ca_certificates"


def test_no_ca_certificates(dev_pki):
    error = load_error(dev_pki, cas=[])
    assert (error.path, error.reason) == ("[tls] ca_certificates", "at least one CA certificate is needed")


def test_a_key_that_does_not_match_the_certificate(dev_pki):
    _, other_key = dev_pki.issue_files("other.example")
    error = load_error(dev_pki, key=other_key)
    assert error.path == "[tls] private_key"
    assert "is not the key of the certificate in" in error.reason


def test_a_file_without_pem_certificates(dev_pki, tmp_path):
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    error = load_error(dev_pki, cert=str(junk))
    assert error.path == "[tls] certificate"
    assert "holds no valid PEM certificate" in error.reason


def test_an_encrypted_key_is_refused(dev_pki, tmp_path):
    issued = pki.issue(dev_pki.ca, [SERVER])
    cert, _ = pki.write_issued(str(tmp_path), "enc", issued)
    encrypted = tmp_path / "enc.key"
    encrypted.write_bytes(issued.key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, BestAvailableEncryption(b"pw")))
    error = load_error(dev_pki, cert=cert, key=str(encrypted))
    assert error.path == "[tls] private_key"
    assert "holds no usable unencrypted PEM private key" in error.reason


# handshakes in memory


@implementer(IHandshakeListener)
class RecordPeer(Protocol):
    """Records what L{peer_certificate} says once the handshake is done."""

    def handshakeCompleted(self):
        self.factory.seen.append(peer_certificate(self.transport))


def server_sees(server_material, client_options):
    """What the server learns about the client in one handshake."""
    server_factory = Factory.forProtocol(RecordPeer)
    server_factory.seen = []
    tls_pump(
        ClientCertificateServerOptions(server_material),
        server_factory,
        client_options,
        Factory.forProtocol(Protocol),
    )
    assert len(server_factory.seen) == 1, "the handshake did not complete"
    return server_factory.seen[0]


def test_server_options_provide_the_interface(server_material):
    assert verifyObject(IOpenSSLServerConnectionCreator, ClientCertificateServerOptions(server_material))


def test_a_client_certificate_from_our_ca_verifies(dev_pki, server_material):
    seen = server_sees(server_material, dev_pki.material("fed.b.example").client_options(SERVER))
    assert seen.verify_error is None
    assert seen.names == frozenset({"fed.b.example"})


def test_a_client_certificate_from_another_ca_is_recorded_not_refused(dev_pki, other_pki, server_material):
    client = other_pki.material("fed.b.example", trust_ca=dev_pki.ca_path)
    seen = server_sees(server_material, client.client_options(SERVER))
    assert seen.names == frozenset({"fed.b.example"})
    assert seen.verify_error == verify_error_text(19)


def test_a_client_certificate_without_client_auth_usage(dev_pki, server_material):
    material = dev_pki.material("fed.b.example", usages=[ExtendedKeyUsageOID.SERVER_AUTH])
    seen = server_sees(server_material, material.client_options(SERVER))
    assert seen.verify_error == verify_error_text(26)


def test_no_client_certificate(server_material):
    options = twisted_ssl.optionsForClientTLS(SERVER, trustRoot=server_material.trust_root())
    assert server_sees(server_material, options) is None


def test_peer_certificate_of_a_plain_transport():
    assert peer_certificate(StringTransport()) is None
    assert peer_certificate(object()) is None


# session resumption must not skip client certificate verification


def _pyopenssl_client(issued: pki.Issued, max_version=None) -> SSL.Context:
    context = SSL.Context(SSL.TLS_METHOD)
    context.use_certificate(issued.certificate)
    context.use_privatekey(issued.key)
    if max_version is not None:
        context.set_max_proto_version(max_version)
    return context


def _shuttle(one: SSL.Connection, other: SSL.Connection) -> None:
    for _ in range(20):
        for source, sink in ((one, other), (other, one)):
            try:
                sink.bio_write(source.bio_read(65536))
            except SSL.WantReadError:
                pass


def _handshake(server_options, client_context, session=None):
    server = server_options.serverConnectionForTLS(None)
    server.set_accept_state()
    client = SSL.Connection(client_context, None)
    client.set_connect_state()
    if session is not None:
        client.set_session(session)
    for _ in range(10):
        for connection in (client, server):
            try:
                connection.do_handshake()
            except SSL.WantReadError:
                pass
        _shuttle(client, server)
    # application data carries TLS 1.3 session tickets to the client
    server.send(b"x")
    _shuttle(server, client)
    assert client.recv(1) == b"x"
    return server, client


class _Handle:
    def __init__(self, connection):
        self.connection = connection

    def getHandle(self):
        return self.connection


@pytest.mark.parametrize("max_version", [SSL.TLS1_2_VERSION, None], ids=["tls1.2", "tls1.3"])
def test_a_resumed_session_does_not_hide_a_bad_client_certificate(other_pki, server_material, max_version):
    client_context = _pyopenssl_client(pki.issue(other_pki.ca, ["fed.b.example"]), max_version)
    server_options = ClientCertificateServerOptions(server_material)
    first, client = _handshake(server_options, client_context)
    assert peer_certificate(_Handle(first)).verify_error is not None
    second, _ = _handshake(server_options, client_context, client.get_session())
    seen = peer_certificate(_Handle(second))
    assert seen is None or seen.verify_error is not None


def test_peer_certificate_is_computed_once_per_connection(dev_pki, server_material):
    client_context = _pyopenssl_client(pki.issue(dev_pki.ca, ["fed.b.example"]))
    server, _ = _handshake(ClientCertificateServerOptions(server_material), client_context)
    first = peer_certificate(_Handle(server))
    assert first is not None and first.verify_error is None
    assert peer_certificate(_Handle(server)) is first
    assert isinstance(first.certificate, x509.Certificate)
