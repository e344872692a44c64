"""
Tests for the matrix-signature authenticator (fedserver_matrix.authenticator):
the factory and its options, TLS in both directions, inbound X-Matrix
verification end to end with another server's key pair, outbound signing,
and our keys document.
"""

from __future__ import annotations

import json
from typing import Any, Dict, Optional

import pytest
from canonicaljson import encode_canonical_json
from OpenSSL import SSL
from signedjson.key import get_verify_key
from signedjson.sign import verify_signed_json
from twisted.internet import defer
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from zope.interface.verify import verifyObject

from fedserver.errors import ConfigError, FederationError
from fedserver.interfaces import IAuthenticator
from fedserver.storage import Store
from fedserver.values import InboundRequest, OutboundRequest, Peer, Target
from fedserver_matrix import authenticator as matrix_authenticator
from fedserver_matrix.authenticator import (
    MatrixSignatureAuthenticator,
    ServerTLSOptions,
    make_matrix_signature,
)
from fedserver_matrix.errors import matrix_error
from fedserver_matrix.keyring import Keyring
from fedserver_matrix.keys import (
    encode_verify_key,
    generate_signing_key,
    read_signing_keys,
    server_keys_document,
    write_signing_keys,
)
from fedserver_matrix.xmatrix import (
    XMatrixAuthorization,
    XMatrixError,
    format_authorization,
    parse_authorization,
    request_json,
    sign_request,
)
from tests.unit.helpers import (
    FakeDiscovery,
    build_plugin,
    failure_result_of,
    json_response,
    make_context,
    outcome,
    success_result_of,
    target,
    tls_pump,
)

START = 1_700_000_000.0
DAY = 86400
KEY_PATH = "/_matrix/key/v2/server"


class Network:
    """Stands in for the FederationClient: answers per host, records what was sent."""

    def __init__(self) -> None:
        self.answers: Dict[str, Any] = {}
        self.sent: list = []

    def send(self, target: Target, request: OutboundRequest) -> Any:
        self.sent.append((target, request))
        answer = self.answers.get(target.host, json_response(404, {}))
        return outcome(answer(request) if callable(answer) else answer)


@pytest.fixture
def clock():
    clock = Clock()
    clock.advance(START)
    return clock


@pytest.fixture
def key_file(tmp_path):
    path = tmp_path / "signing.key"
    write_signing_keys(str(path), [generate_signing_key("a1"), generate_signing_key("a2")])
    return str(path)


@pytest.fixture
def tls_table(dev_pki):
    cert, key = dev_pki.issue_files("a.example")
    return {"certificate": cert, "private_key": key, "ca_certificates": [dev_pki.ca_path]}


def make_context_for(clock, tls_table, network=None, **authenticator):
    context = make_context(
        tables={"tls": tls_table, "authenticator": {"plugin": "matrix-signature", **authenticator}}, reactor=clock
    )
    context.discovery = FakeDiscovery({"b.example": [target("b.example", 8448)],
                                       "notary.example": [target("notary.example", 8448)]})
    context.client = network or Network()
    return context


def build(context):
    return build_plugin(matrix_authenticator, "authenticator", context.config.authenticator, context)


@pytest.fixture
def network():
    return Network()


@pytest.fixture
def ours(clock, tls_table, key_file, network):
    """The authenticator of a.example."""
    return build(make_context_for(clock, tls_table, network, signing_key=key_file))


class Remote:
    """b.example: its key pair, its published keys, and requests signed by it."""

    def __init__(self, network: Network, clock: Clock, name: str = "b.example") -> None:
        self.name = name
        self.key = generate_signing_key("b1")
        self.clock = clock
        network.answers[name] = self.keys_answer

    def keys_answer(self, request: OutboundRequest) -> Any:
        valid_until = int((self.clock.seconds() + DAY) * 1000)
        return json_response(200, server_keys_document(self.name, [self.key], valid_until))

    def request(self, method: str = "GET", path: str = "/_matrix/federation/v1/query/profile",
                query: str = "user_id=%40alice%3Ab.example", body: Optional[Any] = None,
                destination: Optional[str] = "a.example", headers: Any = None, key: Any = None) -> InboundRequest:
        raw = b"" if body is None else json.dumps(body).encode()
        uri = f"{path}?{query}" if query else path
        authorization = sign_request(key or self.key, self.name, destination or "a.example", method, uri, body)
        if destination is None:
            authorization = XMatrixAuthorization(authorization.origin, None, authorization.key, authorization.sig)
        if headers is None:
            headers = [("Authorization", format_authorization(authorization)), ("Content-Type", "application/json")]
        return InboundRequest(method=method, path=path, query=query, headers=headers, body=raw)


@pytest.fixture
def remote(network, clock):
    return Remote(network, clock)


def refused(d, matrix_label: str) -> XMatrixError:
    error = failure_result_of(d, XMatrixError).value
    assert error.matrix_label == matrix_label, error
    return error


# the plugin and its options


def test_the_hook_registers_matrix_signature():
    assert matrix_authenticator.fedserver_authenticator_plugins() == {"matrix-signature": make_matrix_signature}


def test_built_from_its_options(clock, tls_table, key_file, network):
    context = make_context_for(clock, tls_table, network, signing_key=key_file, server_name="a.example:8448",
                               key_valid_for=3600, trusted_key_servers=["notary.example", "[::1]:8448"])
    authenticator = build(context)
    assert verifyObject(IAuthenticator, authenticator)
    assert authenticator.server_name == "a.example:8448"
    assert [k.version for k in authenticator.signing_keys] == ["a1", "a2"]
    assert authenticator.signing_key.version == "a1"
    assert authenticator.key_valid_for == 3600
    assert isinstance(authenticator.keyring, Keyring)
    assert authenticator.keyring.trusted_key_servers == ["notary.example", "[::1]:8448"]
    assert authenticator.keyring.timeout == context.config.limits.request_timeout


def test_defaults(ours, key_file):
    assert ours.server_name == "a.example"  # [server] backend_domain
    assert ours.key_valid_for == 86400
    assert ours.keyring.trusted_key_servers == []
    assert ours.old_keys == []
    assert [k.encode() for k in ours.signing_keys] == [k.encode() for k in read_signing_keys(key_file)]


def test_old_signing_keys(clock, tls_table, key_file):
    old = generate_signing_key("old")
    public = encode_verify_key(get_verify_key(old))
    authenticator = build(make_context_for(clock, tls_table, signing_key=key_file, old_signing_keys={
        "ed25519:old": {"key": public, "expired_ts": 1_600_000_000_000}}))
    (old_key,) = authenticator.old_keys
    assert (old_key.key_id, old_key.expired_ts) == ("ed25519:old", 1_600_000_000_000)
    assert authenticator.server_keys()["old_verify_keys"] == {
        "ed25519:old": {"key": public, "expired_ts": 1_600_000_000_000}}


def test_the_store_gets_the_keyring_schema(clock, tls_table, key_file, tmp_path):
    context = make_context_for(clock, tls_table, signing_key=key_file)
    context.storage = Store(f"sqlite:{tmp_path / 'db.sqlite'}", reactor=clock)
    authenticator = build(context)
    assert ("matrix-keys", 1) in context.storage.migrate()
    assert authenticator.keyring._store is context.storage


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({}, r"\[authenticator\] signing_key: is required"),
        ({"signing_key": "/nonexistent/signing.key"},
         r"\[authenticator\] signing_key: cannot read the signing key file /nonexistent/signing.key: No such file"),
        ({"server_name": "a example"}, r"\[authenticator\] server_name: 'a example' is not a Matrix server name"),
        ({"server_name": "a.example:99999"}, r"\[authenticator\] server_name: .* is not a Matrix server name"),
        ({"key_valid_for": 10}, r"\[authenticator\] key_valid_for: "),
        ({"key_valid_for": 8 * DAY}, r"\[authenticator\] key_valid_for: "),
        ({"trusted_key_servers": ["ok.example", "not ok"]},
         r"\[authenticator\] trusted_key_servers: 'not ok' is not a Matrix server name"),
        ({"trusted_key_servers": "matrix.org"}, r"\[authenticator\] trusted_key_servers: must be a list"),
        ({"old_signing_keys": {"ed25519:old": {"key": "Zm9v", "expired_ts": 1}}},
         r"\[authenticator.old_signing_keys.\"ed25519:old\"\] key: the key ed25519:old is 3 bytes, not 32"),
        ({"old_signing_keys": {"ed25519:old": {"key": "Zm9v"}}},
         r"\[authenticator.old_signing_keys.\"ed25519:old\"\] expired_ts: is required"),
        ({"old_signing_keys": {"ed25519:old": {"key": "Zm9v", "expired_ts": 1, "when": 2}}},
         r"\[authenticator.old_signing_keys.\"ed25519:old\"\] when: is not a known option"),
        ({"old_signing_keys": {"old": {"key": "Zm9v", "expired_ts": 1}}}, "key id 'old' is not ALGORITHM:VERSION"),
        ({"signing_kee": "x"}, r"\[authenticator\] signing_kee: is not a known option here"),
    ],
)
def test_bad_options(clock, tls_table, key_file, options, message):
    if "signing_key: is required" not in message:
        options = {"signing_key": key_file, **options}
    with pytest.raises(ConfigError, match=message):
        build(make_context_for(clock, tls_table, **options))


def test_a_bad_key_file_names_the_option_the_file_and_the_line(clock, tls_table, tmp_path):
    path = tmp_path / "signing.key"
    path.write_text("ed25519 a1 Zm9vYmFy\n")
    with pytest.raises(ConfigError) as info:
        build(make_context_for(clock, tls_table, signing_key=str(path)))
    assert info.value.path == "[authenticator] signing_key"
    assert info.value.reason == f"{path} line 1: the seed is 6 bytes, not 32"


def test_an_old_key_that_is_also_current(clock, tls_table, key_file):
    current = read_signing_keys(key_file)[0]
    public = encode_verify_key(get_verify_key(current))
    with pytest.raises(ConfigError, match=r"ed25519:a1 is also a current key in"):
        build(make_context_for(clock, tls_table, signing_key=key_file,
                               old_signing_keys={"ed25519:a1": {"key": public, "expired_ts": 1}}))


def test_tls_certificate_is_required(clock, key_file):
    with pytest.raises(ConfigError, match=r"\[tls\]: the matrix-signature authenticator needs \[tls\] certificate"):
        build(make_context_for(clock, {}, signing_key=key_file))


# TLS


class Recorder(Protocol):
    def connectionMade(self) -> None:
        self.factory.received = b""
        self.factory.connection = self.transport

    def dataReceived(self, data: bytes) -> None:
        self.factory.received += data


class Greeter(Protocol):
    def connectionMade(self) -> None:
        self.transport.write(b"hello")


def handshake(server_options: Any, client_options: Any) -> Any:
    server = Factory.forProtocol(Recorder)
    server.received = b""
    tls_pump(server_options, server, client_options, Factory.forProtocol(Greeter))
    return server


def test_server_tls_presents_our_certificate_and_asks_for_none(ours, dev_pki):
    options = ours.server_tls_options()
    assert isinstance(options, ServerTLSOptions)
    assert options.context.get_verify_mode() == SSL.VERIFY_NONE
    assert ours.server_tls_options() is options  # cached while the files do not change
    # a client with no certificate, checking ours against the CA and our name
    from twisted.internet import ssl

    client = ssl.optionsForClientTLS("a.example", trustRoot=dev_pki.material("b.example").trust_root())
    assert handshake(options, client).received == b"hello"


def test_server_tls_ignores_a_client_certificate(ours, dev_pki):
    client = dev_pki.material("b.example").client_options("a.example")  # presents one
    server = handshake(ours.server_tls_options(), client)
    assert server.received == b"hello"
    assert server.connection.getHandle().get_peer_certificate() is None


def test_client_tls_verifies_the_remote_name_with_the_ca(ours, dev_pki):
    remote = ServerTLSOptions(dev_pki.material("b.example"))
    assert handshake(remote, ours.client_tls_options(target("b.example", 8448))).received == b"hello"
    assert ours.client_tls_options(target("b.example")) is ours.client_tls_options(target("b.example", 8448))
    # a certificate for another name is refused
    assert handshake(remote, ours.client_tls_options(target("c.example"))).received == b""


def test_client_tls_refuses_another_ca(ours, other_pki):
    remote = ServerTLSOptions(other_pki.material("b.example"))
    assert handshake(remote, ours.client_tls_options(target("b.example"))).received == b""


def test_without_ca_certificates_the_system_roots_verify(clock, dev_pki, key_file):
    cert, key = dev_pki.issue_files("a.example")
    authenticator = build(make_context_for(clock, {"certificate": cert, "private_key": key}, signing_key=key_file))
    assert authenticator.tls.system_roots
    # our test CA is not among the system's roots
    remote = ServerTLSOptions(dev_pki.material("b.example"))
    assert handshake(remote, authenticator.client_tls_options(target("b.example"))).received == b""
    # the server side still presents our certificate
    from twisted.internet import ssl

    client = ssl.optionsForClientTLS("a.example", trustRoot=dev_pki.material("b.example").trust_root())
    assert handshake(authenticator.server_tls_options(), client).received == b"hello"


def test_without_ca_certificates_a_mismatched_key_is_refused(clock, dev_pki, key_file):
    cert, _ = dev_pki.issue_files("a.example")
    _, other_key = dev_pki.issue_files("other.example")
    with pytest.raises(ConfigError, match=r"\[tls\] private_key: .* is not the key of the certificate"):
        build(make_context_for(clock, {"certificate": cert, "private_key": other_key}, signing_key=key_file))


# inbound


def test_a_signed_request_authenticates(ours, remote, network):
    peer = success_result_of(ours.authenticate(remote.request()))
    assert peer == Peer(identities={"b.example"}, claimed_domain="b.example", domain_proven=True)
    # b.example's keys were fetched from it, signed by us
    ((sent_to, request),) = network.sent
    assert (sent_to.host, request.path) == ("b.example", KEY_PATH)
    fetch = parse_authorization(request.header("Authorization"))
    assert (fetch.origin, fetch.destination, fetch.key) == ("a.example", "b.example", "ed25519:a1")
    # and are kept: the next request is checked without asking again
    success_result_of(ours.authenticate(remote.request(method="PUT", path="/_matrix/federation/v1/send/1",
                                                       query="", body={"pdus": [], "edus": []})))
    assert len(network.sent) == 1


def test_a_request_without_destination_is_accepted(ours, remote):
    request = remote.request(destination=None)
    assert "destination" not in request.header("Authorization")
    assert success_result_of(ours.authenticate(request)).claimed_domain == "b.example"


def test_two_signatures_one_by_an_unknown_key(ours, remote):
    request = remote.request()
    other = sign_request(generate_signing_key("zz"), "b.example", "a.example", "GET",
                         "/_matrix/federation/v1/query/profile?user_id=%40alice%3Ab.example")
    headers = [*request.headers, ("Authorization", format_authorization(other))]
    success_result_of(ours.authenticate(InboundRequest(request.method, request.path, request.query, headers, b"")))


def test_every_known_signature_must_verify(ours, remote, network, clock):
    # b.example publishes two keys; the second signature is by the second key but wrong
    second = generate_signing_key("b2")

    def keys(request):
        document = server_keys_document("b.example", [remote.key, second], int((clock.seconds() + DAY) * 1000))
        return json_response(200, document)

    network.answers["b.example"] = keys
    request = remote.request()
    bad = XMatrixAuthorization("b.example", "a.example", "ed25519:b2", parse_authorization(
        request.header("Authorization")).sig)
    headers = [*request.headers, ("Authorization", format_authorization(bad))]
    error = refused(ours.authenticate(InboundRequest(request.method, request.path, request.query, headers, b"")),
                    "bad-signature")
    assert "by ed25519:b2 does not verify" in error.message


@pytest.mark.parametrize(
    ("tamper", "what"),
    [
        (lambda r: InboundRequest("POST", r.path, r.query, r.headers, r.body), "method"),
        (lambda r: InboundRequest(r.method, r.path + "x", r.query, r.headers, r.body), "path"),
        (lambda r: InboundRequest(r.method, r.path, r.query + "&x=1", r.headers, r.body), "query"),
        (lambda r: InboundRequest(r.method, r.path, "", r.headers, r.body), "no query"),
        (lambda r: InboundRequest(r.method, r.path, r.query, r.headers, b'{"evil": true}'), "body"),
    ],
)
def test_a_changed_request_does_not_verify(ours, remote, tamper, what):
    error = refused(ours.authenticate(tamper(remote.request())), "bad-signature")
    assert (error.errcode, error.matrix_status, error.label) == ("M_UNAUTHORIZED", 401, "authentication-failure")
    assert "the signature of b.example by ed25519:b1 does not verify" in error.message


def test_a_request_with_a_body(ours, remote):
    request = remote.request(method="PUT", path="/_matrix/federation/v1/send/txn1", query="",
                             body={"origin": "b.example", "pdus": [], "edus": [{"edu_type": "m.typing"}]})
    success_result_of(ours.authenticate(request))
    # the same content, written differently, verifies too: the signature covers the parsed body
    success_result_of(ours.authenticate(InboundRequest(
        request.method, request.path, request.query, request.headers,
        b'{ "edus" : [ {"edu_type":"m.typing"} ], "pdus": [], "origin": "b.example" }')))


def test_no_authorization_header(ours, remote):
    request = remote.request(headers=[("Content-Type", "application/json")])
    error = refused(ours.authenticate(request), "missing-authorization")
    assert (error.errcode, error.matrix_status) == ("M_UNAUTHORIZED", 401)


def test_a_malformed_authorization_header(ours, remote):
    request = remote.request(headers=[("Authorization", 'X-Matrix origin="b.example",key="ed25519:b1"')])
    error = refused(ours.authenticate(request), "malformed-authorization")
    assert (error.errcode, error.matrix_status) == ("M_UNAUTHORIZED", 400)


def test_a_request_for_another_server(ours, remote, network):
    error = refused(ours.authenticate(remote.request(destination="c.example")), "wrong-destination")
    assert error.message == "the request is for 'c.example', but this server is a.example"
    assert (error.errcode, error.matrix_status) == ("M_UNAUTHORIZED", 401)
    assert network.sent == []


def test_destination_with_a_port_is_compared_exactly(clock, tls_table, key_file, network, remote):
    authenticator = build(make_context_for(clock, tls_table, network, signing_key=key_file,
                                           server_name="a.example:8448"))
    refused(authenticator.authenticate(remote.request(destination="a.example")), "wrong-destination")
    request = remote.request(destination="a.example:8448")
    assert success_result_of(authenticator.authenticate(request)).claimed_domain == "b.example"


def test_a_body_that_is_not_json(ours, remote):
    request = remote.request(method="PUT", body={"a": 1})
    request = InboundRequest(request.method, request.path, request.query, request.headers, b"{nope")
    error = refused(ours.authenticate(request), "not-json")
    assert (error.label, error.errcode, error.matrix_status) == ("invalid-json", "M_NOT_JSON", 400)


@pytest.mark.parametrize("body", [b'{"a": "\\ud800"}', b'{"a": "\xed\xa0\x80"}'])
def test_a_body_with_a_lone_surrogate_cannot_be_signed(ours, remote, body):
    # JSON, but not canonical JSON: found by tests/unit/test_fuzz.py (it was an internal error)
    request = remote.request(method="PUT", body={"a": 1})
    request = InboundRequest(request.method, request.path, request.query, request.headers, body)
    error = refused(ours.authenticate(request), "not-json")
    assert (error.label, error.errcode, error.matrix_status) == ("invalid-json", "M_NOT_JSON", 400)
    assert "lone surrogate" in error.message


def test_a_key_the_origin_does_not_have(ours, remote):
    error = refused(ours.authenticate(remote.request(key=generate_signing_key("other"))), "unknown-key")
    assert error.message == "b.example signed with ed25519:other, but no such key of b.example is known and valid now"


def test_only_unsupported_algorithms(ours, remote):
    request = remote.request()
    sig = parse_authorization(request.header("Authorization")).sig
    header = format_authorization(XMatrixAuthorization("b.example", "a.example", "curve25519:b1", sig))
    error = refused(ours.authenticate(remote.request(headers=[("Authorization", header)])), "unknown-key")
    assert "no signature with an algorithm this server supports (ed25519)" in error.message


def test_the_origin_keys_cannot_be_fetched(ours, remote, network):
    network.answers["b.example"] = json_response(502, {})
    error = refused(ours.authenticate(remote.request()), "keys-unavailable")
    assert error.message == (
        "cannot get the keys of b.example: b.example itself: GET /_matrix/key/v2/server answered HTTP 502")
    assert (error.errcode, error.matrix_status) == ("M_UNAUTHORIZED", 401)


def test_an_origin_discovery_does_not_know(ours, network):
    c = Remote(network, Clock(), "c.example")
    error = refused(ours.authenticate(c.request()), "keys-unavailable")
    assert "c.example itself: invalid-domain" in error.message


def test_keys_past_their_validity_are_fetched_again(ours, remote, network, clock):
    success_result_of(ours.authenticate(remote.request()))
    clock.advance(DAY + 1)
    network.answers["b.example"] = json_response(503, {})
    refused(ours.authenticate(remote.request()), "keys-unavailable")
    assert len(network.sent) == 2


def test_requests_from_ourselves_use_our_keys(ours, network):
    signer = ours.signing_keys[1]
    authorization = sign_request(signer, "a.example", "a.example", "GET", "/_matrix/federation/v1/version")
    request = InboundRequest("GET", "/_matrix/federation/v1/version", "",
                             [("Authorization", format_authorization(authorization))], b"")
    assert success_result_of(ours.authenticate(request)).claimed_domain == "a.example"
    assert network.sent == []


def test_the_errors_become_matrix_errors(ours, remote):
    """The routes' matrix_error turns each failure into Matrix's {"errcode", "error"}."""
    cases = [
        (remote.request(headers=[]), 401, "M_UNAUTHORIZED"),
        (remote.request(headers=[("Authorization", "X-Matrix bad")]), 400, "M_UNAUTHORIZED"),
        (remote.request(destination="c.example"), 401, "M_UNAUTHORIZED"),
        (remote.request(key=generate_signing_key("x")), 401, "M_UNAUTHORIZED"),
    ]
    for request, status, errcode in cases:
        error = failure_result_of(ours.authenticate(request), XMatrixError).value
        answer = matrix_error(error)
        assert answer.code == status
        body = json.loads(answer.body)
        assert (body["errcode"], body["error"]) == (errcode, error.message)


# outbound


def test_outbound_requests_are_signed_with_our_first_key(ours):
    request = OutboundRequest(destination="b.example:8448", method="PUT",
                              path="/_matrix/federation/v1/send/1?x=y",
                              headers=[("Content-Type", "application/json")], body=b'{"edus": []}')
    prepared = success_result_of(ours.prepare_outbound(request, target("b.example", 8448)))
    assert prepared.header("Content-Type") == "application/json"
    authorization = parse_authorization(prepared.header("Authorization"))
    assert (authorization.origin, authorization.destination, authorization.key) == (
        "a.example", "b.example:8448", "ed25519:a1")
    signed = request_json("PUT", "/_matrix/federation/v1/send/1?x=y", "a.example", "b.example:8448", {"edus": []})
    signed["signatures"] = {"a.example": {"ed25519:a1": authorization.sig}}
    verify_signed_json(signed, "a.example", get_verify_key(ours.signing_key))


def test_outbound_without_a_body_signs_no_content(ours):
    request = OutboundRequest(destination="b.example", method="GET", path="/_matrix/key/v2/server", headers=())
    prepared = success_result_of(ours.prepare_outbound(request, target("b.example")))
    authorization = parse_authorization(prepared.header("Authorization"))
    signed = request_json("GET", "/_matrix/key/v2/server", "a.example", "b.example")
    signed["signatures"] = {"a.example": {"ed25519:a1": authorization.sig}}
    verify_signed_json(signed, "a.example", get_verify_key(ours.signing_key))


def test_outbound_with_a_body_that_is_not_json(ours):
    request = OutboundRequest(destination="b.example", method="PUT", path="/x", headers=(), body=b"<xml/>")
    error = failure_result_of(ours.prepare_outbound(request, target("b.example")), FederationError).value
    assert error.label == "invalid-json"
    assert "cannot be signed" in error.message


def test_what_we_sign_another_fedserver_verifies(ours, clock, tls_table, tmp_path, network):
    """a.example signs; b.example's authenticator fetches a.example's keys document and verifies."""
    key_file = tmp_path / "b.key"
    write_signing_keys(str(key_file), [generate_signing_key("b1")])
    theirs_network = Network()
    theirs_network.answers["a.example"] = lambda request: json_response(200, json.loads(ours.server_keys_json()))
    context = make_context_for(clock, tls_table, theirs_network, signing_key=str(key_file), server_name="b.example")
    context.discovery = FakeDiscovery({"a.example": [target("a.example", 8448)]})
    theirs = build(context)
    outbound = OutboundRequest(destination="b.example", method="POST",
                               path="/_matrix/federation/v1/user/keys/query?a=1",
                               headers=[("Content-Type", "application/json")], body=b'{"device_keys": {}}')
    prepared = success_result_of(ours.prepare_outbound(outbound, target("b.example")))
    path, _, query = prepared.path.partition("?")
    inbound = InboundRequest(prepared.method, path, query, prepared.headers, prepared.body)
    peer = success_result_of(theirs.authenticate(inbound))
    assert peer.claimed_domain == "a.example" and peer.domain_proven


# our keys


def test_server_keys_document(ours, clock):
    document = ours.server_keys()
    assert document["server_name"] == "a.example"
    assert document["valid_until_ts"] == int((START + DAY) * 1000)
    assert set(document["verify_keys"]) == {"ed25519:a1", "ed25519:a2"}
    for key in ours.signing_keys:
        verify_signed_json(document, "a.example", get_verify_key(key))


def test_server_keys_json_is_signed_once_per_half_validity(ours, clock):
    first = ours.server_keys_json()
    assert json.loads(first)["valid_until_ts"] == int((START + DAY) * 1000)
    assert first == encode_canonical_json(json.loads(first))
    clock.advance(DAY / 2 - 1)
    assert ours.server_keys_json() is first
    clock.advance(1)
    second = ours.server_keys_json()
    assert json.loads(second)["valid_until_ts"] == int((START + DAY + DAY / 2) * 1000)


def test_the_keyring_sends_through_the_context_client(clock, tls_table, key_file, remote, network):
    context = make_context_for(clock, tls_table, network, signing_key=key_file)
    authenticator = build(context)
    replacement = Network()
    replacement.answers["b.example"] = remote.keys_answer
    context.client = replacement  # the client the context has when a request comes
    success_result_of(authenticator.authenticate(remote.request()))
    assert network.sent == [] and len(replacement.sent) == 1


def test_an_authenticator_without_keyring(remote, clock):
    authenticator = MatrixSignatureAuthenticator(server_name="a.example", signing_keys=[generate_signing_key("k")],
                                                 clock=clock)
    assert authenticator.server_tls_options() is None
    refused(authenticator.authenticate(remote.request()), "keys-unavailable")
    with pytest.raises(FederationError, match="no \\[tls\\] settings"):
        authenticator.client_tls_options(target("b.example"))
    with pytest.raises(ValueError):
        MatrixSignatureAuthenticator(server_name="a.example", signing_keys=[], clock=clock)


def test_a_pending_key_fetch_is_shared_by_requests(ours, remote, network):
    pending = defer.Deferred()
    network.answers["b.example"] = pending
    first = ours.authenticate(remote.request())
    second = ours.authenticate(remote.request(query="user_id=%40bob%3Ab.example"))
    pending.callback(remote.keys_answer(None))
    assert success_result_of(first).claimed_domain == success_result_of(second).claimed_domain == "b.example"
    assert len(network.sent) == 1
