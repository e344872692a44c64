"""Tests for the mtls authenticator (fedserver.builtin.mtls)."""

from __future__ import annotations

import pytest
from cryptography.x509.oid import ExtendedKeyUsageOID
from twisted.internet import ssl
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from twisted.internet.protocol import Factory
from twisted.internet.task import Clock
from zope.interface.verify import verifyObject

from fedserver import pki
from fedserver.builtin import mtls
from fedserver.builtin.allow_list import AllowList
from fedserver.builtin.mtls import MutualTLSAuthenticator, make_mtls
from fedserver.builtin.static_discovery import StaticDiscovery
from fedserver.errors import AuthenticationFailure, ConfigError
from fedserver.interfaces import IAuthenticator
from fedserver.inward import InwardFederationResource
from fedserver.pipeline import Pipeline
from fedserver.tls import ClientCertificateServerOptions, PeerCertificate
from fedserver.values import OutboundRequest, Peer
from fedserver.web import ListenerRoot
from tests.unit.helpers import (
    FakeClient,
    FakeComponent,
    RawHTTPClient,
    build_plugin,
    garbled_san_certificate,
    ip_only_certificate,
    labelled_failure,
    make_context,
    make_inbound,
    parse_answer,
    raw_request,
    site_for,
    success_result_of,
    target,
    tls_pump,
)

ORIGIN = ("Wire-Origin-Domain", "b.example")


@pytest.fixture
def authenticator(dev_pki):
    return MutualTLSAuthenticator(dev_pki.material("fed.a.example"), "a.example")


def presented(cert, verify_error=None, headers=(ORIGIN,)):
    """An inbound request over TLS with client certificate C{cert}."""
    return make_inbound(headers=headers, tls=PeerCertificate(cert, verify_error))


def context_for(tls_table):
    return make_context(tables={} if tls_table is None else {"tls": tls_table}, reactor=Clock())


# the plugin


def test_the_hook_registers_mtls():
    assert mtls.fedserver_authenticator_plugins() == {"mtls": make_mtls}


def test_make_mtls_uses_the_tls_table(dev_pki):
    cert, key = dev_pki.issue_files("fed.a.example")
    context = context_for({"certificate": cert, "private_key": key, "ca_certificates": [dev_pki.ca_path]})
    authenticator = build_plugin(mtls, "authenticator", context.config.authenticator, context)
    assert verifyObject(IAuthenticator, authenticator)
    assert authenticator.backend_domain == "a.example"
    assert context.tls_material("again") is authenticator.material


def test_make_mtls_without_tls_table():
    context = context_for(None)
    with pytest.raises(ConfigError) as info:
        make_mtls(context.config.authenticator, context)
    assert str(info.value) == (
        "/etc/fedserver.toml: [tls]: the mtls authenticator needs [tls] certificate, "
        "private_key and ca_certificates"
    )


def test_make_mtls_with_a_bad_key_names_file_and_key(dev_pki):
    cert, _ = dev_pki.issue_files("fed.a.example")
    _, other_key = dev_pki.issue_files("other.example")
    context = context_for({"certificate": cert, "private_key": other_key, "ca_certificates": [dev_pki.ca_path]})
    with pytest.raises(ConfigError) as info:
        make_mtls(context.config.authenticator, context)
    assert info.value.file == "/etc/fedserver.toml"
    assert info.value.path == "[tls] private_key"


# authenticate


def test_a_verified_certificate_gives_a_peer_to_validate(authenticator, dev_pki):
    cert = pki.issue(dev_pki.ca, ["fed.b.example", "alt.b.example"]).certificate
    request = presented(cert, headers=[("wire-origin-domain", " B.Example ")])
    peer = success_result_of(authenticator.authenticate(request))
    assert peer == Peer(
        identities={"fed.b.example", "alt.b.example"},
        claimed_domain="b.example",
        domain_proven=False,
        fingerprint=request.tls.fingerprint,
    )


def test_no_certificate_is_no_client_certificate(authenticator):
    error = labelled_failure(authenticator.authenticate(make_inbound(tls=None)), "no-client-certificate")
    assert isinstance(error, AuthenticationFailure)
    assert "requires mutual TLS" in error.message


def test_a_certificate_that_did_not_verify_is_authentication_failure(authenticator, dev_pki):
    cert = pki.issue(dev_pki.ca, ["fed.b.example"]).certificate
    d = authenticator.authenticate(presented(cert, "the issuer is not among the configured CA certificates"))
    error = labelled_failure(d, "authentication-failure")
    assert error.message == (
        "the client certificate (CN=fed.b.example) is not accepted: "
        "the issuer is not among the configured CA certificates"
    )


def test_a_certificate_without_dns_names_is_certificate_parse_error(authenticator, dev_pki):
    d = authenticator.authenticate(presented(ip_only_certificate(dev_pki.ca)))
    assert "names no DNS identity" in labelled_failure(d, "certificate-parse-error").message


def test_a_certificate_that_cannot_be_parsed_is_certificate_parse_error(authenticator, dev_pki):
    d = authenticator.authenticate(presented(garbled_san_certificate(dev_pki.ca)))
    assert "cannot be parsed" in labelled_failure(d, "certificate-parse-error").message


@pytest.mark.parametrize("headers", [(), (("Wire-Origin-Domain", ""),)])
def test_a_missing_origin_header_is_no_origin_domain(authenticator, dev_pki, headers):
    cert = pki.issue(dev_pki.ca, ["fed.b.example"]).certificate
    error = labelled_failure(authenticator.authenticate(presented(cert, headers=headers)), "no-origin-domain")
    assert error.message == "the Wire-Origin-Domain header is missing"


# outbound


def test_prepare_outbound_claims_our_backend_domain(authenticator):
    request = OutboundRequest(
        destination="b.example", method="POST", path="/federation/brig/x", headers=[("Wire-Origin-Domain", "x")]
    )
    prepared = success_result_of(authenticator.prepare_outbound(request, target("fed.b.example")))
    assert prepared.headers == (("Wire-Origin-Domain", "a.example"),)


def test_client_tls_options_are_cached_per_infrastructure_domain(authenticator):
    first = authenticator.client_tls_options(target("fed.b.example", 443))
    assert verifyObject(IOpenSSLClientConnectionCreator, first)
    assert authenticator.client_tls_options(target("fed.b.example", 8443, host="10.0.0.1")) is first
    assert authenticator.client_tls_options(target("fed.c.example")) is not first


def test_server_tls_options_are_built_once(authenticator):
    options = authenticator.server_tls_options()
    assert isinstance(options, ClientCertificateServerOptions)
    assert authenticator.server_tls_options() is options


# the whole inward path over real TLS, in memory


def inward_over_tls(authenticator, client_options, headers=(ORIGIN,)):
    """POST /federation/brig/get-user over TLS; the answer and the component."""
    component = FakeComponent()
    pipeline = Pipeline(
        backend_domain="a.example",
        discovery=StaticDiscovery({"b.example": [target("fed.b.example")]}),
        authenticator=authenticator,
        authorizers=[AllowList(frozenset({"b.example"}))],
        components={"brig": component},
        client=FakeClient(),
    )
    root = ListenerRoot("inward listener")
    root.mount(b"federation", InwardFederationResource(pipeline, max_body_bytes=1000))
    client_factory = Factory.forProtocol(RawHTTPClient)
    encoded = [(name.encode(), value.encode()) for name, value in headers]
    client_factory.request = raw_request(b"/federation/brig/get-user", b"{}", encoded)
    tls_pump(authenticator.server_tls_options(), site_for(root), client_options, client_factory)
    return parse_answer(client_factory.received), component


def test_over_tls_a_good_peer_reaches_the_component(authenticator, dev_pki):
    client = dev_pki.material("fed.b.example")
    answer, component = inward_over_tls(authenticator, client.client_options("fed.a.example"))
    assert answer.code == 200
    assert answer.json() == {"ok": True}
    (call,) = component.calls
    assert call.origin_domain == "b.example"
    assert call.peer.identities == frozenset({"fed.b.example"})


def test_over_tls_without_a_client_certificate(authenticator, dev_pki):
    options = ssl.optionsForClientTLS("fed.a.example", trustRoot=authenticator.material.trust_root())
    answer, component = inward_over_tls(authenticator, options)
    assert (answer.code, answer.json()["label"]) == (403, "no-client-certificate")
    assert component.calls == []


def test_over_tls_a_certificate_from_another_ca(authenticator, dev_pki, other_pki):
    client = other_pki.material("fed.b.example", trust_ca=dev_pki.ca_path)
    answer, component = inward_over_tls(authenticator, client.client_options("fed.a.example"))
    assert (answer.code, answer.json()["label"]) == (403, "authentication-failure")
    assert "is not accepted" in answer.json()["message"]
    assert component.calls == []


def test_over_tls_a_certificate_for_another_backend_is_validation_error(authenticator, dev_pki):
    client = dev_pki.material("fed.c.example")
    answer, component = inward_over_tls(authenticator, client.client_options("fed.a.example"))
    body = answer.json()
    assert (answer.code, body["label"]) == (403, "validation-error")
    assert body["data"] == {"type": "federation", "domain": "b.example"}
    assert component.calls == []


@pytest.mark.parametrize(
    "names, usages, message",
    [
        (["fed.other.example"], None, "is for fed.other.example, not for [server] infra_domain fed.a.example"),
        (["fed.a.example"], [ExtendedKeyUsageOID.SERVER_AUTH], "lacks the clientAuth extended key usage"),
    ],
)
def test_our_own_certificate_must_fit_mutual_tls(dev_pki, names, usages, message):
    kwargs = {} if usages is None else {"usages": usages}
    cert, key = dev_pki.issue_files(names[0], **kwargs)
    context = context_for({"certificate": cert, "private_key": key, "ca_certificates": [dev_pki.ca_path]})
    with pytest.raises(ConfigError) as info:
        make_mtls(context.config.authenticator, context)
    assert "[tls] certificate" in str(info.value)
    assert message in str(info.value)


@pytest.mark.parametrize("origin", ["../etc", "a example", "a.example/x", "-a.example", "\u00e4.example"])
def test_a_malformed_origin_domain_is_refused(dev_pki, authenticator, origin):
    leaf = pki.issue(dev_pki.ca, ["fed.a.example"]).certificate
    inbound = make_inbound(headers=[("Wire-Origin-Domain", origin)], tls=PeerCertificate(leaf, None))
    error = labelled_failure(authenticator.authenticate(inbound), "validation-error")
    assert "is not a domain name" in error.message
