"""
Small helpers shared by the unit tests: Deferred results without a running
reactor, fake pipeline providers that record what they were asked, a
development PKI in a temporary folder, and an in-memory HTTP connection to a
L{fedserver.web.FederationSite}.
"""

from __future__ import annotations

import ipaddress
import json
import os
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import attrs
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from twisted.test import iosim
from twisted.web.resource import IResource
from zope.interface import implementer

from fedserver import pki
from fedserver.config import Options, parse_config
from fedserver.context import Context
from fedserver.errors import DiscoveryFailure, FederationError
from fedserver.interfaces import IAuthenticator, IAuthorizer, IComponentHandler, IDiscovery
from fedserver.pipeline import Pipeline
from fedserver.registry import PluginRegistry, make_plugin_manager
from fedserver.tls import TLSMaterial
from fedserver.values import (
    FederatedCall,
    InboundRequest,
    OutboundRequest,
    Peer,
    Response,
    Target,
)
from fedserver.web import FederationSite

# Deferred results, synchronously


def success_result_of(d: Deferred) -> Any:
    """The result C{d} already has; fail the test if it has none or failed."""
    results: List[Any] = []
    d.addBoth(results.append)
    assert results, f"{d!r} has no result yet"
    if isinstance(results[0], Failure):
        raise AssertionError(f"{d!r} failed:\n{results[0].getTraceback()}")
    return results[0]


def failure_result_of(d: Deferred, *types: type) -> Failure:
    """The failure C{d} already has, which must be one of C{types}."""
    results: List[Any] = []
    d.addBoth(results.append)
    assert results, f"{d!r} has no result yet"
    assert isinstance(results[0], Failure), f"{d!r} succeeded with {results[0]!r}"
    if types:
        assert results[0].check(*types), results[0].getTraceback()
    return results[0]


def assert_no_result(d: Deferred) -> None:
    """C{d} has not fired yet (and is left untouched)."""
    results: List[Any] = []

    def keep(result: Any) -> Any:
        results.append(result)
        return result

    d.addBoth(keep)
    assert not results, f"{d!r} fired with {results[0]!r}"


def labelled_failure(d: Deferred, label: str) -> FederationError:
    """The L{FederationError} C{d} failed with, whose label must be C{label}."""
    error = failure_result_of(d, FederationError).value
    assert error.label == label, f"expected {label}, got {error!r}"
    return error


# Values


def make_call(**changes: Any) -> FederatedCall:
    """An outbound call from a.example to b.example's brig."""
    values: Dict[str, Any] = dict(
        origin_domain="a.example",
        target_domain="b.example",
        component="brig",
        rpc="get-user",
        method="POST",
        headers=(("Content-Type", "application/json"),),
        body=b'{"handle": "alice"}',
        request_id="req-1",
    )
    values.update(changes)
    return FederatedCall(**values)


def make_inbound(**changes: Any) -> InboundRequest:
    """An inbound request from b.example to our brig."""
    values: Dict[str, Any] = dict(
        method="POST",
        path="/federation/brig/get-user",
        query="",
        headers=(("Wire-Origin-Domain", "b.example"), ("Content-Type", "application/json")),
        body=b"{}",
        tls=None,
    )
    values.update(changes)
    return InboundRequest(**values)


def target(name: str, port: int = 443, host: Optional[str] = None) -> Target:
    """A target whose infrastructure domain is C{name}."""
    return Target(infra_domain=name, host=host or name, port=port)


def json_response(code: int, value: Any) -> Response:
    return Response(code, [("Content-Type", "application/json")], json.dumps(value).encode())


def outcome(value: Any) -> Deferred:
    """A Deferred for C{value}: failed for an exception, as is for a Deferred."""
    if isinstance(value, Deferred):
        return value
    if isinstance(value, BaseException):
        return defer.fail(value)
    return defer.succeed(value)


def make_context(
    *, tables: Optional[Mapping[str, Any]] = None, reactor: Any = None, http: Any = None
) -> Context:
    """
    A L{Context} for a.example whose configuration (file /etc/fedserver.toml)
    holds the required tables plus C{tables}.
    """
    raw: Dict[str, Any] = {
        "server": {"backend_domain": "a.example", "infra_domain": "fed.a.example"},
        "inward": {"listen": "tcp:8443"},
        "discovery": {"plugin": "static"},
        "authenticator": {"plugin": "mtls"},
        **(tables or {}),
    }
    config = parse_config(raw, file="/etc/fedserver.toml", base_dir="/etc")
    return Context(reactor=reactor, config=config, storage=None, http=http)


def options_for(path: str, values: Mapping[str, Any]) -> Options:
    """The configuration table C{[path]} holding C{values}."""
    return Options(values, file="/etc/fedserver.toml", path=path, base_dir="/etc")


def build_plugin(module: Any, kind: str, options: Options, context: Any = None) -> Any:
    """
    What the built-in plugin C{module} builds from C{options}, through a
    registry that holds only that plugin: the startup path, with its checks.
    """
    registry = PluginRegistry(make_plugin_manager(load_entrypoints=False, plugins=[module]))
    return registry.build(kind, options, context)


# Fake providers; each appends (step, argument) to a shared event list


@implementer(IDiscovery)
@attrs.define
class FakeDiscovery:
    table: Mapping[str, Any]
    events: List[Tuple[str, Any]] = attrs.Factory(list)

    def discover(self, domain: str) -> Deferred:
        self.events.append(("discover", domain))
        if domain not in self.table:
            return defer.fail(DiscoveryFailure(f"{domain} unknown", "invalid-domain"))
        return outcome(self.table[domain])


@implementer(IAuthenticator)
@attrs.define
class FakeAuthenticator:
    peer: Any = None
    events: List[Tuple[str, Any]] = attrs.Factory(list)

    def server_tls_options(self) -> None:
        return None

    def client_tls_options(self, target: Target) -> None:
        return None

    def authenticate(self, request: InboundRequest) -> Deferred:
        self.events.append(("authenticate", request.header("Wire-Origin-Domain")))
        return outcome(self.peer)

    def prepare_outbound(self, request: OutboundRequest, target: Target) -> Deferred:
        self.events.append(("prepare", target.infra_domain))
        return defer.succeed(request.with_header("Wire-Origin-Domain", "a.example"))


@implementer(IAuthorizer)
@attrs.define
class FakeAuthorizer:
    name: str = "authorizer"
    deny: bool = False
    events: List[Tuple[str, Any]] = attrs.Factory(list)
    #: when set, every decision is this Deferred (to test waiting)
    pending: Optional[Deferred] = None

    def _decide(self, step: str, subject: str) -> Deferred:
        self.events.append((step, self.name))
        if self.pending is not None:
            return self.pending
        if self.deny:
            return defer.fail(FederationError(f"{subject} denied by {self.name}", "federation-denied"))
        return defer.succeed(None)

    def authorize_inbound(self, peer: Peer, call: FederatedCall) -> Deferred:
        return self._decide("authorize_inbound", peer.claimed_domain)

    def authorize_outbound(self, domain: str, call: FederatedCall) -> Deferred:
        return self._decide("authorize_outbound", domain)


@implementer(IComponentHandler)
@attrs.define
class FakeComponent:
    answer: Any = attrs.Factory(lambda: json_response(200, {"ok": True}))
    events: List[Tuple[str, Any]] = attrs.Factory(list)
    calls: List[FederatedCall] = attrs.Factory(list)

    def handle(self, call: FederatedCall) -> Deferred:
        self.events.append(("handle", call.component))
        self.calls.append(call)
        return outcome(self.answer)


@attrs.define
class FakeClient:
    """Stands in for L{fedserver.client.FederationClient}: outcome by host."""

    outcomes: Mapping[str, Any] = attrs.Factory(dict)
    events: List[Tuple[str, Any]] = attrs.Factory(list)
    sent: List[Tuple[Target, OutboundRequest]] = attrs.Factory(list)

    def send(self, target: Target, request: OutboundRequest) -> Deferred:
        self.events.append(("send", target.host))
        self.sent.append((target, request))
        return outcome(self.outcomes.get(target.host, json_response(200, {"ok": True})))

    def close(self) -> Deferred:
        return defer.succeed(None)


# A development PKI


@attrs.define
class DevPKI:
    """A CA written to C{directory}, issuing certificates next to it."""

    directory: str
    ca: pki.Issued
    ca_path: str

    @classmethod
    def create(cls, directory: str, common_name: str = "test CA") -> DevPKI:
        ca = pki.make_ca(common_name)
        ca_path, _ = pki.write_issued(directory, "ca", ca)
        return cls(directory, ca, ca_path)

    def issue_files(self, name: str, **kwargs: Any) -> Tuple[str, str]:
        """Certificate (chain) and key files for C{name}; C{kwargs} go to L{pki.issue}."""
        issued = pki.issue(self.ca, [name], **kwargs)
        return pki.write_issued(self.directory, name, issued, chain=[self.ca])

    def material(self, name: str, *, trust_ca: Optional[str] = None, **kwargs: Any) -> TLSMaterial:
        """L{TLSMaterial} for C{name}, trusting this CA or the one in C{trust_ca}."""
        cert, key = self.issue_files(name, **kwargs)
        return TLSMaterial.load(cert, key, [trust_ca or self.ca_path])


def make_pki(directory: Any, common_name: str = "test CA") -> DevPKI:
    os.makedirs(str(directory), exist_ok=True)
    return DevPKI.create(str(directory), common_name)


def certificate_with_san(ca: pki.Issued, san: x509.ExtensionType) -> x509.Certificate:
    """A certificate signed by C{ca} whose subjectAltName extension is C{san}."""
    leaf = pki.issue(ca, ["ignored.example"], san=False).certificate
    builder = (
        x509.CertificateBuilder()
        .subject_name(leaf.subject)
        .issuer_name(ca.certificate.subject)
        .public_key(leaf.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(leaf.not_valid_before_utc)
        .not_valid_after(leaf.not_valid_after_utc)
        .add_extension(san, critical=False)
    )
    return builder.sign(ca.key, hashes.SHA256())


def ip_only_certificate(ca: pki.Issued) -> x509.Certificate:
    """A certificate whose subjectAltName holds an IP address and no DNS name."""
    return certificate_with_san(
        ca, x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("192.0.2.1"))])
    )


def garbled_san_certificate(ca: pki.Issued) -> x509.Certificate:
    """A certificate whose subjectAltName is not valid DER."""
    return certificate_with_san(
        ca, x509.UnrecognizedExtension(x509.oid.ExtensionOID.SUBJECT_ALTERNATIVE_NAME, b"\x30\x03\x82\x05a")
    )


# HTTP over an in-memory connection


class RawHTTPClient(Protocol):
    """Writes C{factory.request} when connected and keeps what comes back."""

    def connectionMade(self) -> None:
        self.factory.received = b""
        self.transport.write(self.factory.request)

    def dataReceived(self, data: bytes) -> None:
        self.factory.received += data


def raw_request(
    path: bytes, body: bytes = b"", headers: Sequence[Tuple[bytes, bytes]] = (), *, method: bytes = b"POST"
) -> bytes:
    """A complete HTTP/1.1 request."""
    lines = [method + b" " + path + b" HTTP/1.1", b"Host: fed.example", b"Content-Length: %d" % len(body)]
    lines += [name + b": " + value for name, value in headers]
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


@attrs.define
class HTTPAnswer:
    code: int
    headers: Dict[str, List[str]]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    def header(self, name: str) -> Optional[str]:
        values = self.headers.get(name.lower())
        return values[0] if values else None

    def labelled(self, code: int, label: str) -> Dict[str, Any]:
        """The JSON error this answer must be: C{code} and C{label}."""
        body = self.json()
        assert (self.code, body["code"], body["label"]) == (code, code, label), body
        assert self.header("content-type") == "application/json"
        return body


def parse_answer(data: bytes) -> HTTPAnswer:
    """The first HTTP response in C{data} (which must be complete)."""
    head, _, rest = data.partition(b"\r\n\r\n")
    status, *lines = head.decode("latin-1").split("\r\n")
    headers: Dict[str, List[str]] = {}
    for line in lines:
        name, _, value = line.partition(":")
        headers.setdefault(name.strip().lower(), []).append(value.strip())
    length = int(headers["content-length"][0])
    assert len(rest) >= length, f"incomplete response body: {data!r}"
    return HTTPAnswer(int(status.split()[1]), headers, rest[:length])


@attrs.define
class HTTPConnection:
    """One client connection to a site, over a L{StringTransport}."""

    protocol: Any
    transport: StringTransport

    @classmethod
    def to(cls, site: FederationSite) -> HTTPConnection:
        protocol = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
        transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 40000))
        protocol.makeConnection(transport)
        return cls(protocol, transport)

    def send(self, data: bytes) -> None:
        self.protocol.dataReceived(data)

    def request(
        self,
        method: bytes,
        path: bytes,
        body: bytes = b"",
        headers: Sequence[Tuple[bytes, bytes]] = (),
    ) -> None:
        self.send(raw_request(path, body, headers, method=method))

    def answer(self) -> HTTPAnswer:
        return parse_answer(self.transport.value())

    def close(self) -> None:
        if not self.transport.disconnected:
            self.protocol.connectionLost(Failure(ConnectionResetError()))


def site_for(root: IResource, *, max_body_bytes: int = 1000) -> FederationSite:
    """A L{FederationSite} on a L{Clock}, so nothing reaches the global reactor."""
    return FederationSite(root, max_body_bytes=max_body_bytes, reactor=Clock())


# TLS over an in-memory pump


def tls_pump(
    server_options: Any,
    server_factory: Any,
    client_options: Any,
    client_factory: Any,
    clock: Optional[MemoryReactorClock] = None,
) -> iosim.IOPump:
    """
    Connect a TLS client and server (each a L{TLSMemoryBIOFactory} around the
    given factory) in memory and run the exchange until nothing moves.
    """
    clock = clock or MemoryReactorClock()
    server = TLSMemoryBIOFactory(server_options, False, server_factory, clock=clock).buildProtocol(None)
    client = TLSMemoryBIOFactory(client_options, True, client_factory, clock=clock).buildProtocol(None)
    return pump_between(server, client, clock)


def pump_between(server: Any, client: Any, clock: MemoryReactorClock) -> iosim.IOPump:
    """Connect two built protocols with iosim and flush."""
    pump = iosim.connect(
        server, iosim.makeFakeServer(server), client, iosim.makeFakeClient(client), greet=False, clock=clock
    )
    pump.flush()
    return pump


# A pipeline of fakes


PEER_B = Peer(identities={"fed.b.example"}, claimed_domain="b.example")


@attrs.define
class Rig:
    """A L{Pipeline} wired to fakes that share one event list."""

    pipeline: Pipeline
    events: List[Tuple[str, Any]]
    discovery: FakeDiscovery
    authenticator: FakeAuthenticator
    authorizers: List[FakeAuthorizer]
    component: FakeComponent
    client: FakeClient


def make_rig(
    *,
    table: Optional[Mapping[str, Any]] = None,
    peer: Any = PEER_B,
    deny: Sequence[bool] = (False, False),
    answer: Any = None,
    outcomes: Optional[Mapping[str, Any]] = None,
) -> Rig:
    """
    A pipeline for a.example whose discovery knows C{table} (by default
    b.example at fed.b.example), whose authenticator finds C{peer}, with one
    authorizer per item of C{deny}, a C{brig} component answering C{answer}
    and a client whose outcome per target host is C{outcomes}.
    """
    events: List[Tuple[str, Any]] = []
    discovery = FakeDiscovery(
        table if table is not None else {"b.example": [target("fed.b.example")]}, events
    )
    authenticator = FakeAuthenticator(peer, events)
    authorizers = [FakeAuthorizer(f"authorizer-{i}", d, events) for i, d in enumerate(deny)]
    component = FakeComponent(events=events)
    if answer is not None:
        component.answer = answer
    client = FakeClient(outcomes or {}, events)
    pipeline = Pipeline(
        backend_domain="a.example",
        discovery=discovery,
        authenticator=authenticator,
        authorizers=authorizers,
        components={"brig": component},
        client=client,  # type: ignore[arg-type]
    )
    return Rig(pipeline, events, discovery, authenticator, authorizers, component, client)




def local_config_head(cert: str, key: str, ca_path: str) -> str:
    """
    The first tables of a test configuration of a.example (fed.a.example,
    data in C{var}): C{[inward]} and C{[outward]} on 127.0.0.1, C{[tls]} with
    C{cert}, C{key} and C{ca_path}, and C{[discovery]} with plugin static;
    the caller appends discovery's domains, the authenticator and the rest.
    """
    return f"""
[server]
backend_domain = "a.example"
infra_domain = "fed.a.example"
data_dir = "var"

[inward]
listen = "tcp:0:interface=127.0.0.1"

[outward]
listen = "tcp:0:interface=127.0.0.1"

[tls]
certificate = "{cert}"
private_key = "{key}"
ca_certificates = ["{ca_path}"]

[discovery]
plugin = "static"
"""


def minimal_config_file(directory: Any, backend: str, infra: str, *, outward: bool = False,
                        authenticator: str = 'plugin = "mtls"') -> Callable[..., str]:
    """
    A writer of a minimal, complete configuration for C{backend} (mtls, or
    the C{[authenticator]} table's lines C{authenticator}, with a fresh CA
    and certificate, static discovery, allow-all): call it with extra TOML
    to append; it returns the file's path.
    """
    ca = pki.make_ca()
    ca_path, _ = pki.write_issued(str(directory), "ca", ca)
    cert, key = pki.write_issued(str(directory), infra, pki.issue(ca, [infra]), chain=[ca])
    inward = 'listen = "tcp:0:interface=127.0.0.1"' if outward else 'listen = "tcp:0"'
    outward_table = '[outward]\nlisten = "tcp:0:interface=127.0.0.1"\n' if outward else ""

    def write(extra: str = "") -> str:
        path = os.path.join(str(directory), f"{backend.split('.')[0]}.toml")
        with open(path, "w") as f:
            f.write(
                f"""
[server]
backend_domain = "{backend}"
infra_domain = "{infra}"
[inward]
{inward}
{outward_table}[tls]
certificate = "{cert}"
private_key = "{key}"
ca_certificates = ["{ca_path}"]
[discovery]
plugin = "static"
[authenticator]
{authenticator}
[[authorizers]]
plugin = "allow-list"
allow_all = true
{extra}
"""
            )
        return path

    return write
