"""
Property tests over the parsers that read what peers (and operators) send
(issue 8, item 5): whatever comes in, each answers with its documented
outcome or its documented error, in bounded time (each example has a
hypothesis deadline), never with another exception and never with a 5xx.

 - requests on both listeners: the request line, the routes
   (C{/federation/...}, C{/rpc/...}, C{/_matrix/...}), headers, bodies, cut
   into pieces at random, through a real L{FederationSite} and HTTP channel;
 - the C{Wire-Origin-Domain} header (C{mtls}) and the C{Authorization:
   X-Matrix} header (C{matrix-signature}, and its parser on its own);
 - DNS answers to SRV and address lookups, over (in-memory) UDP through
   Twisted's own resolver, and what discovery makes of them;
 - configuration files: any bytes, any TOML document, and valid
   configurations with one value changed, up to building every plugin.

KeyPackages and the other MLS messages (test_mimi_keypackage.py,
test_mimi_messages.py), relay frames, control messages and datagrams
(test_relay_frames.py, test_relay_control.py, test_relay_datagram.py) have
their own properties; the MIMI HTTP API is fuzzed with schemathesis
(tests/integration/test_mimi_fuzz.py).
"""

from __future__ import annotations

import datetime
import json
import os
import re
import string
import tempfile
from typing import Any, Dict, List, Tuple

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from signedjson.key import generate_signing_key
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import capturedLogs
from twisted.names import dns
from twisted.python.failure import Failure

from fedserver import pki
from fedserver.addresses import AddressPolicy, parse_networks
from fedserver.builtin.mtls import MutualTLSAuthenticator
from fedserver.config import Config, load_config, parse_config
from fedserver.dns import DNSLookup, LookupFailed, NoRecords, SRVRecord
from fedserver.errors import AuthenticationFailure, ConfigError, FederationError
from fedserver.inward import InwardFederationResource
from fedserver.outward import OutwardRPCResource
from fedserver.registry import make_plugin_manager
from fedserver.service import FederationService, build_service
from fedserver.tls import PeerCertificate, TLSMaterial
from fedserver.values import InboundRequest, Peer, Target
from fedserver.web import FederationSite, ListenerRoot
from fedserver_matrix.authenticator import MatrixSignatureAuthenticator
from fedserver_matrix.xmatrix import (
    XMatrixAuthorization,
    XMatrixError,
    authorizations_of,
    format_authorization,
    is_server_name,
    parse_authorization,
    split_server_name,
)
from fedserver_wire.discovery import SRVDiscovery
from tests.unit.helpers import make_rig
from tests.unit.test_dns import UDPReactor
from tests.unit.test_matrix_routes import make_rig as make_matrix_rig

#: examples per property; FEDSERVER_FUZZ_SCALE=20 runs twenty times as many (a longer hunt)
SCALE = int(os.environ.get("FEDSERVER_FUZZ_SCALE", "1"))
FUZZ = settings(max_examples=300 * SCALE, deadline=2000,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
SLOW_FUZZ = settings(FUZZ, max_examples=150 * SCALE)

# ---------------------------------------------------------------------------
# requests on the listeners

HEADER_TIMEOUT, BODY_TIMEOUT, IDLE_TIMEOUT, DEADLINE = 10.0, 60.0, 60.0, 60.0
MAX_BODY = 4000

TOKEN = st.text(alphabet=string.ascii_letters + string.digits + "!#$%&'*+-.^_`|~", min_size=1, max_size=12)
METHODS = st.sampled_from([b"GET", b"POST", b"PUT", b"DELETE", b"HEAD", b"OPTIONS"]) | TOKEN.map(str.encode)
SEGMENTS = st.sampled_from([
    b"federation", b"rpc", b"_matrix", b"key", b"v2", b"server", b"query", b"notary", b"v1", b"send", b"txn1",
    b"brig", b"get-user", b"make_join", b"state", b"b.example", b"B.example", b"a.example", b"..", b".", b"",
    b"%2F", b"%00", b"%ff", b"%E2%80%8B", "\u0661".encode(), b"x" * 300,
]) | st.binary(max_size=10)
#: the routes' own paths, so that the fuzzer starts next to what is served
KNOWN_PATHS = st.sampled_from([
    b"", b"/", b"/federation", b"/federation/", b"/federation/brig", b"/federation/brig/get-user", b"/rpc",
    b"/rpc/", b"/rpc/b.example/brig/get-user", b"/_matrix", b"/_matrix/", b"/_matrix/federation",
    b"/_matrix/federation/", b"/_matrix/federation/v1/version", b"/_matrix/federation/v1/send/txn1",
    b"/_matrix/federation/v1/query/profile", b"/_matrix/federation/v1/make_join/!r:b.example/@u:b.example",
    b"/_matrix/key", b"/_matrix/key/v2/server", b"/_matrix/key/v2/query", b"*", b"http://a.example/rpc",
])
PATHS = (st.lists(SEGMENTS, max_size=7).map(lambda s: b"/" + b"/".join(s))
         | st.tuples(KNOWN_PATHS, st.lists(SEGMENTS, max_size=2)).map(lambda t: b"/".join([t[0], *t[1]]))
         | KNOWN_PATHS)
QUERIES = st.none() | st.sampled_from([b"", b"x=1", b"user_id=%40a%3Ab.example&field=displayname", b"%zz",
                                       b"a=1&a=2"]) | st.binary(max_size=30)
KNOWN_HEADERS = [
    b"Content-Type", b"Content-Length", b"Transfer-Encoding", b"Wire-Origin-Domain", b"Request-Id",
    b"Wire-Origin-Request-Id", b"Authorization", b"Expect", b"Connection", b"Host", b"X-Test-Origin",
    b"X-Wire-API-Version",
]
HEADER_NAMES = st.sampled_from(KNOWN_HEADERS) | TOKEN.map(str.encode) | st.binary(max_size=10)
HEADER_VALUES = st.sampled_from([
    b"application/json", b"application/x-www-form-urlencoded; charset=utf-8", b"chunked", b"gzip, chunked",
    b"100-continue", b"close", b"keep-alive", b"b.example", b"B.EXAMPLE", b"a.example", b"0", b"-1", b"5",
    b"99999999999999999999", b"req-1", b"x" * 200,
    b'X-Matrix origin="b.example",destination="a.example",key="ed25519:k",sig="c2ln"',
    b"X-Matrix origin=b.example,key=ed25519:k,sig=x,sig=y",
]) | st.binary(max_size=40)
JSON_BODIES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
).map(lambda value: json.dumps(value).encode())
BODIES = JSON_BODIES | st.binary(max_size=300) | st.sampled_from([
    b"[" * 5000 + b"]" * 5000, b'{"a": NaN}', b'"\\ud800"', b'{"origin": "\\udfff"}', b"\xff\xfe{}",
])


@st.composite
def raw_requests(draw: Any) -> Tuple[bytes, List[int]]:
    """
    An HTTP/1.1 request and where to cut it into reads: mostly well formed
    (so that it reaches the routes, with odd paths, headers and bodies), or
    not (so that the HTTP channel refuses it).
    """
    well_formed = draw(st.booleans())
    target = draw(KNOWN_PATHS | PATHS if well_formed else PATHS)
    query = draw(QUERIES)
    if query is not None:
        target += b"?" + query
    if well_formed:
        method = draw(st.sampled_from([b"GET", b"POST", b"PUT", b"DELETE", b"HEAD", b"OPTIONS"])
                      | TOKEN.map(str.encode))
        version = b"HTTP/1.1"
        names = st.sampled_from(KNOWN_HEADERS) | TOKEN.map(str.encode)
        values = HEADER_VALUES.map(lambda v: v.translate(None, b"\r\n\0").strip())
    else:
        method = draw(METHODS)
        version = draw(st.sampled_from([b"HTTP/1.1", b"HTTP/1.0", b"HTTP/2", b"HTTX", b""]))
        names, values = HEADER_NAMES, HEADER_VALUES
    headers = draw(st.lists(st.tuples(names, values), max_size=8))
    body = draw(BODIES)
    framing = draw(st.sampled_from(["length", "length", "chunked", "none", "wrong-length"]))
    if framing == "length":
        headers.append((b"Content-Length", str(len(body)).encode()))
    elif framing == "wrong-length":
        headers.append((b"Content-Length", str(draw(st.integers(0, 2 * len(body) + 5))).encode()))
    elif framing == "chunked":
        headers.append((b"Transfer-Encoding", b"chunked"))
        body = b"".join(b"%x\r\n%s\r\n" % (len(part), part) for part in (body[:50], body[50:]) if part) + b"0\r\n\r\n"
    head = method + b" " + target + b" " + version + b"\r\n"
    head += b"".join(name + b": " + value + b"\r\n" for name, value in headers)
    data = head + b"\r\n" + body
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=4)))
    return data, cuts


def listeners(clock: Clock) -> Dict[str, FederationSite]:
    """Both listeners with their routes over pipelines of fakes (and the Matrix routes)."""
    rig = make_rig()
    matrix = make_matrix_rig()
    route = {"max_body_bytes": MAX_BODY, "deadline": DEADLINE, "clock": clock}
    inward, outward = ListenerRoot("inward listener"), ListenerRoot("outward listener")
    inward.mount(b"federation", InwardFederationResource(rig.pipeline, **route))
    inward.mount(b"_matrix", matrix.inward.resource.children[b"_matrix"])
    outward.mount(b"rpc", OutwardRPCResource(rig.pipeline, **route))
    outward.mount(b"_matrix", matrix.outward.resource.children[b"_matrix"])
    return {
        name: FederationSite(root, max_body_bytes=MAX_BODY, reactor=clock, timeout=IDLE_TIMEOUT,
                             header_timeout=HEADER_TIMEOUT, body_timeout=BODY_TIMEOUT)
        for name, root in (("inward", inward), ("outward", outward))
    }


STATUS = re.compile(rb"HTTP/1\.[01] (\d{3}) ")


class ClosingTransport(StringTransport):
    """
    A L{StringTransport} that closes as a socket does: closing it (or
    aborting) ends the connection with C{connectionLost}, once.
    """

    protocol: Any = None
    closed = False

    def unregisterProducer(self) -> None:
        self.producer = None

    def _close(self) -> None:
        if not self.closed:
            self.closed = True
            self.protocol.connectionLost(Failure(ConnectionDone()))

    def loseConnection(self) -> None:
        super().loseConnection()
        self._close()

    def abortConnection(self) -> None:
        super().abortConnection()
        self._close()


def connect(site: FederationSite) -> Tuple[Any, ClosingTransport]:
    protocol = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
    transport = ClosingTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 40000))
    transport.protocol = protocol
    protocol.makeConnection(transport)
    return protocol, transport


@settings(FUZZ, max_examples=1000 * SCALE)
@given(st.sampled_from(["inward", "outward"]), raw_requests())
def test_any_request_gets_a_non_5xx_answer_or_a_closed_connection(listener: str, request: Any) -> None:
    data, cuts = request
    clock = Clock()
    channel, transport = connect(listeners(clock)[listener])
    with capturedLogs() as events:
        start = 0
        for cut in [*cuts, len(data)]:
            if transport.closed:
                break
            channel.dataReceived(data[start:cut])
            start = cut
        # no hang: after the deadlines, every request was answered and the connection is idle, or it is closed
        clock.advance(HEADER_TIMEOUT + BODY_TIMEOUT + DEADLINE + 1)
    output = transport.value()
    statuses = [int(code) for code in STATUS.findall(output)]
    assert all(code < 500 for code in statuses), output[:2000]
    assert not [e for e in events if "log_failure" in e], [e.get("log_format") for e in events]
    assert transport.closed or not channel.requests


# ---------------------------------------------------------------------------
# the headers authenticators read


@pytest.fixture(scope="module")
def client_certificate() -> PeerCertificate:
    """A verified client certificate for fed.b.example, as the TLS layer would record it."""
    ca = pki.make_ca("fuzz CA")
    return PeerCertificate(pki.issue(ca, ["fed.b.example"]).certificate, None)


@pytest.fixture(scope="module")
def mtls() -> MutualTLSAuthenticator:
    directory = tempfile.mkdtemp(prefix="fedserver-fuzz-")
    ca = pki.make_ca("our CA")
    ca_path, _ = pki.write_issued(directory, "ca", ca)
    cert, key = pki.write_issued(directory, "fed.a.example", pki.issue(ca, ["fed.a.example"]), chain=[ca])
    return MutualTLSAuthenticator(TLSMaterial.load(cert, key, [ca_path]), "a.example")


HEADER_TEXT = st.text(alphabet=st.characters(codec="latin-1"), max_size=60)
INBOUND_HEADERS = st.lists(
    st.tuples(st.sampled_from(["Wire-Origin-Domain", "wire-origin-domain", "Authorization", "Content-Type"])
              | HEADER_TEXT, HEADER_TEXT | st.sampled_from(["b.example", " B.Example ", "b.example.", "-b.example"])),
    max_size=5,
)


def settled(d: Any) -> Any:
    results: List[Any] = []
    d.addBoth(results.append)
    assert results, "no outcome"
    return results[0]


@FUZZ
@given(INBOUND_HEADERS)
def test_mtls_reads_any_origin_header_into_a_peer_or_a_labelled_refusal(
    mtls: MutualTLSAuthenticator, client_certificate: PeerCertificate, headers: List[Tuple[str, str]],
) -> None:
    request = InboundRequest(method="POST", path="/federation/brig/x", query="", headers=tuple(headers), body=b"{}",
                             tls=client_certificate)
    outcome = settled(mtls.authenticate(request))
    if isinstance(outcome, Failure):
        assert outcome.check(AuthenticationFailure), outcome.getTraceback()
        assert outcome.value.code < 500
    else:
        assert isinstance(outcome, Peer)
        assert outcome.identities == frozenset({"fed.b.example"})


# X-Matrix

PARAM_NAMES = st.sampled_from(["origin", "destination", "key", "sig", "Origin", "x"]) | TOKEN
PARAM_VALUES = (st.sampled_from(["b.example", "a.example", "[::1]:8448", "1.2.3.4", "ed25519:k", "ed25519:", "c2ln",
                                 "", "b.example:0", "b.example:65536"])
                | st.text(alphabet=string.printable, max_size=20))


@st.composite
def x_matrix_values(draw: Any) -> str:
    """An Authorization header value near the X-Matrix grammar."""
    params = []
    for name, value in draw(st.lists(st.tuples(PARAM_NAMES, PARAM_VALUES), max_size=6)):
        if draw(st.booleans()):
            value = '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
        params.append(f"{name}{draw(st.sampled_from(['=', ' = ', '']))}{value}")
    separator = draw(st.sampled_from([",", ", ", " ,", ";"]))
    scheme = draw(st.sampled_from(["X-Matrix", "x-matrix", "X-Matrix", "Bearer", "X-Matrix\t", ""]))
    return f"{scheme} {separator.join(params)}"


AUTHORIZATION_VALUES = x_matrix_values() | st.text(max_size=120)


@FUZZ
@given(AUTHORIZATION_VALUES)
def test_x_matrix_parses_or_says_malformed(value: str) -> None:
    try:
        authorization = parse_authorization(value)
    except XMatrixError as e:
        assert e.label == "authentication-failure" and e.matrix_label == "malformed-authorization"
        return
    assert is_server_name(authorization.origin)
    # what was read is what would be written
    assert parse_authorization(format_authorization(authorization)) == authorization


@FUZZ
@given(st.lists(st.tuples(st.sampled_from(["Authorization", "authorization", "X-Other"]), AUTHORIZATION_VALUES),
                max_size=4))
def test_x_matrix_headers_of_a_request(headers: List[Tuple[str, str]]) -> None:
    try:
        found = authorizations_of(headers)
    except XMatrixError as e:
        assert e.matrix_label in ("missing-authorization", "malformed-authorization")
        return
    assert found and all(isinstance(a, XMatrixAuthorization) for a in found)
    assert len({a.origin for a in found}) == 1


@FUZZ
@given(st.text(max_size=40) | st.from_regex(r"\[?[0-9a-f:.]{0,20}\]?(:[0-9]{0,6})?", fullmatch=True))
def test_server_names_split_or_are_refused(name: str) -> None:
    try:
        host, port = split_server_name(name)
    except ValueError:
        assert not is_server_name(name)
        return
    assert is_server_name(name)
    assert name.startswith(host) and host
    assert port is None or 0 < port < 65536


@pytest.fixture(scope="module")
def matrix_signature() -> MatrixSignatureAuthenticator:
    return MatrixSignatureAuthenticator(server_name="a.example", signing_keys=[generate_signing_key("k")],
                                        clock=Clock())


MATRIX_HEADERS = st.lists(
    st.tuples(st.just("Authorization"),
              st.builds(lambda origin, key, sig: f'X-Matrix origin="{origin}",key="{key}",sig="{sig}"',
                        st.sampled_from(["a.example", "b.example"]), st.sampled_from(["ed25519:k", "ed25519:z"]),
                        st.text(alphabet=string.ascii_letters + string.digits + "+/=", max_size=90))
              | AUTHORIZATION_VALUES),
    max_size=3,
)


@FUZZ
@given(MATRIX_HEADERS, st.sampled_from(["GET", "PUT", "POST"]), PATHS.map(lambda p: p.decode("latin-1")),
       st.text(max_size=20), BODIES)
def test_matrix_signature_checks_any_request_into_a_peer_or_a_labelled_refusal(
    matrix_signature: MatrixSignatureAuthenticator, headers: List[Tuple[str, str]], method: str, path: str,
    query: str, body: bytes,
) -> None:
    request = InboundRequest(method=method, path=path, query=query, headers=tuple(headers), body=body, tls=None)
    outcome = settled(matrix_signature.authenticate(request))
    if isinstance(outcome, Failure):
        assert outcome.check(FederationError), outcome.getTraceback()
        assert outcome.value.code < 500
    else:  # only our own key can have signed it, and the fuzzer does not forge ed25519
        assert isinstance(outcome, Peer)


# ---------------------------------------------------------------------------
# DNS answers

NAME = "_wire-server-federator._tcp.b.example"
LABELS = st.sampled_from([b"fed", b"infra", b"example", b"b", b"-x", b"x-", b"_srv", b"A", b"xn--e1afmkfd"]) | \
    st.binary(min_size=1, max_size=12).map(lambda b: b.replace(b".", b"")[:63]).filter(bool)
DNS_NAMES = st.lists(LABELS, max_size=5).map(lambda labels: b".".join(labels)) | st.sampled_from([b"", b"."])
TTLS = st.integers(0, 2**31 - 1)


@st.composite
def resource_records(draw: Any, owner: bytes) -> dns.RRHeader:
    name = draw(st.just(owner) | DNS_NAMES)
    kind = draw(st.sampled_from(["SRV", "SRV", "SRV", "A", "AAAA", "CNAME", "TXT"]))
    ttl = draw(TTLS)
    if kind == "SRV":
        payload: Any = dns.Record_SRV(draw(st.integers(0, 65535)), draw(st.integers(0, 65535)),
                                      draw(st.integers(0, 65535)), draw(DNS_NAMES), ttl)
    elif kind == "A":
        payload = dns.Record_A(".".join(str(b) for b in draw(st.binary(min_size=4, max_size=4))), ttl)
    elif kind == "AAAA":
        payload = dns.Record_AAAA(f"::{draw(st.integers(0, 0xFFFF)):x}", ttl)
    elif kind == "CNAME":
        payload = dns.Record_CNAME(draw(DNS_NAMES), ttl)
    else:
        payload = dns.Record_TXT(draw(st.binary(max_size=40)), ttl=ttl)
    return dns.RRHeader(name, payload.TYPE, dns.IN, ttl, payload)


ANSWERS = st.lists(resource_records(NAME.encode()), max_size=6)
RCODES = st.sampled_from([dns.OK, dns.OK, dns.OK, dns.ENAME, dns.ESERVER, dns.EREFUSED, dns.EFORMAT, dns.ENOTIMP]) | \
    st.integers(0, 15)


def answer_datagram(query_data: bytes, records: List[dns.RRHeader], rcode: int, truncated: bool) -> bytes:
    query = dns.Message()
    query.fromStr(query_data)
    response = dns.Message(id=query.id, answer=1, rCode=rcode, trunc=int(truncated))
    response.queries = query.queries
    response.answers = list(records)
    return response.toStr()


def check_srv_outcome(outcome: Any) -> None:
    if isinstance(outcome, Failure):
        assert outcome.check(NoRecords, LookupFailed), outcome.getTraceback()
        return
    assert outcome and all(isinstance(r, SRVRecord) for r in outcome)
    for record in outcome:
        assert record.target == "." or re.fullmatch(r"[A-Za-z0-9_.-]+", record.target), record
        assert 0 <= record.port < 65536


@FUZZ
@given(ANSWERS, RCODES, st.booleans())
def test_any_srv_answer_is_records_or_a_lookup_outcome(records: List[dns.RRHeader], rcode: int,
                                                       truncated: bool) -> None:
    reactor = UDPReactor()
    lookup = DNSLookup(reactor, [("127.0.0.1", 53)], timeout=2)
    d = lookup.srv(NAME)
    protocol, data, address = reactor.sent[0]
    protocol.datagramReceived(answer_datagram(data, records, rcode, truncated), address)
    reactor.advance(3)  # a truncated answer goes on over TCP, which never connects here: the timeout ends it
    check_srv_outcome(settled(d))


@FUZZ
@given(st.binary(max_size=600))
def test_any_datagram_as_an_answer_is_records_or_a_lookup_outcome(garbage: bytes) -> None:
    reactor = UDPReactor()
    lookup = DNSLookup(reactor, [("127.0.0.1", 53)], timeout=2)
    d = lookup.srv(NAME)
    protocol, data, address = reactor.sent[0]
    with capturedLogs():  # Twisted logs a datagram it cannot parse
        protocol.datagramReceived(data[:2] + garbage, address)
    reactor.advance(3)
    check_srv_outcome(settled(d))


@FUZZ
@given(st.lists(resource_records(b"fed.b.example"), max_size=6), RCODES)
def test_any_address_answer_is_addresses_or_a_lookup_outcome(records: List[dns.RRHeader], rcode: int) -> None:
    reactor = UDPReactor()
    lookup = DNSLookup(reactor, [("127.0.0.1", 53)], timeout=2)
    d = lookup.addresses("fed.b.example")
    for protocol, data, address in list(reactor.sent):
        protocol.datagramReceived(answer_datagram(data, records, rcode, False), address)
    reactor.advance(3)
    outcome = settled(d)
    if isinstance(outcome, Failure):
        assert outcome.check(NoRecords, LookupFailed), outcome.getTraceback()
    else:
        assert outcome and all(isinstance(address, str) and isinstance(ttl, int) for address, ttl in outcome)


class AnsweringResolver:
    """Answers every lookup at once with records drawn by the test (A/AAAA by host name)."""

    def __init__(self, srv: Any, addresses: Dict[str, Any]) -> None:
        self.srv = srv
        self.addresses = addresses

    def _answer(self, value: Any) -> Any:
        from twisted.internet import defer

        if isinstance(value, BaseException):
            return defer.fail(value)
        return defer.succeed((value, [], []))

    def lookupService(self, name: str, timeout: Any = None) -> Any:
        return self._answer(self.srv)

    def lookupAddress(self, name: str, timeout: Any = None) -> Any:
        return self._answer(self.addresses.get(name, []))

    def lookupIPV6Address(self, name: str, timeout: Any = None) -> Any:
        return self._answer([])


@FUZZ
@given(ANSWERS, st.lists(st.sampled_from(["127.0.0.1", "10.0.0.1", "192.0.2.7", "8.8.8.8"]), max_size=3))
def test_wire_discovery_of_any_answer_is_targets_or_a_labelled_failure(records: List[dns.RRHeader],
                                                                       addresses: List[str]) -> None:
    by_host = {}
    for record in records:
        if record.type == dns.SRV:
            host = record.payload.target.name
            by_host[host.decode("latin-1")] = [dns.RRHeader(host, dns.A, dns.IN, 60, dns.Record_A(a, 60))
                                               for a in addresses]
    clock = MemoryReactorClock()
    lookup = DNSLookup(clock, timeout=2, resolver=AnsweringResolver(records, by_host))
    discovery = SRVDiscovery(lookup, AddressPolicy(parse_networks(["127.0.0.0/8"], "allow_ip_ranges")), clock)
    outcome = settled(discovery.discover("b.example"))
    if isinstance(outcome, Failure):
        assert outcome.check(FederationError), outcome.getTraceback()
        assert outcome.value.label in ("invalid-domain", "discovery-failure")
    else:
        assert outcome and all(isinstance(t, Target) for t in outcome)
        for target in outcome:
            # a public address, or one of the ranges allowed: never 10.0.0.1 or 192.0.2.7
            assert re.fullmatch(r"[A-Za-z0-9_.-]+", target.infra_domain)
            assert target.host in ("127.0.0.1", "8.8.8.8")


# ---------------------------------------------------------------------------
# configuration files


@pytest.fixture(scope="module")
def config_dir() -> str:
    """A folder with a configuration's TLS files, for configurations that name them."""
    directory = tempfile.mkdtemp(prefix="fedserver-fuzz-config-")
    ca = pki.make_ca("config CA")
    pki.write_issued(directory, "ca", ca)
    pki.write_issued(directory, "fed.a.example", pki.issue(ca, ["fed.a.example"]), chain=[ca])
    return directory


def load_text(directory: str, data: bytes) -> Any:
    path = os.path.join(directory, "fuzz.toml")
    with open(path, "wb") as f:
        f.write(data)
    try:
        return load_config(path)
    except ConfigError as e:
        assert e.file == path and str(e)
        return e


TOML_LINES = st.lists(
    st.sampled_from([
        "[server]", "[inward]", "[outward]", "[tls]", "[limits]", "[storage]", "[discovery]", "[authenticator]",
        "[[authorizers]]", "[components.brig]", "[discovery.domains.\"b.example\"]", "[matrix]", "[queue]",
        'backend_domain = "a.example"', 'listen = "tcp:8443"', 'plugin = "static"', 'plugin = "mtls"',
        'plugin = "allow-list"', "domains = []", "idle_timeout = nan", "header_timeout = inf",
        "request_timeout = -0.0", "max_body_bytes = 9223372036854775807", "x = 1979-05-27T07:32:00Z",
        'data_dir = "\\u0000"', "a = [[[]]]", "a = {b = {c = 1}}", "port = 8443", 'url = "http://[::1"',
    ]) | st.text(max_size=40),
    max_size=25,
).map(lambda lines: "\n".join(lines).encode())


@FUZZ
@given(st.binary(max_size=300) | TOML_LINES | st.just(b"a = " + b"[" * 3000 + b"]" * 3000))
def test_any_configuration_file_is_a_config_or_a_config_error(config_dir: str, data: bytes) -> None:
    outcome = load_text(config_dir, data)
    assert isinstance(outcome, (Config, ConfigError))


TOML_SCALARS = (
    st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.floats() | st.text(max_size=30)
    | st.sampled_from(["", "a.example", "fed.a.example", "tcp:0:interface=127.0.0.1", "unix:/tmp/x.sock",
                       "http://127.0.0.1:9", "https://c.example/x", "sqlite:", "sqlite:/nonexistent/\0/x",
                       "postgresql://", "static", "mtls", "allow-list", "http-forward", "wire-srv", "wire-brig",
                       "wire-galley", "matrix", "nonsense", "127.0.0.1:5353", "[::1]:53", "10.0.0.0/8", "::/0",
                       "exact_handle_search", "ca.pem", "fed.a.example.pem", "fed.a.example.key"])
    | st.datetimes().map(lambda d: d.replace(tzinfo=datetime.timezone.utc)) | st.dates()
)
TOML_VALUES = st.recursive(
    TOML_SCALARS,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=10), inner, max_size=3),
    max_leaves=6,
)


def base_config(directory: str) -> Dict[str, Any]:
    return {
        "server": {"backend_domain": "a.example", "infra_domain": "fed.a.example", "data_dir": "var"},
        "inward": {"listen": "tcp:0:interface=127.0.0.1"},
        "outward": {"listen": "tcp:0:interface=127.0.0.1", "allow_ip_ranges": ["127.0.0.0/8"]},
        "tls": {"certificate": "fed.a.example.pem", "private_key": "fed.a.example.key",
                "ca_certificates": ["ca.pem"]},
        "limits": {"request_timeout": 5, "max_body_bytes": 10000, "header_timeout": 2},
        "storage": {"database": "sqlite:var/fedserver.sqlite"},
        "discovery": {"plugin": "static",
                      "domains": {"b.example": {"infra_domain": "fed.b.example", "host": "127.0.0.1", "port": 8443}}},
        "authenticator": {"plugin": "mtls"},
        "authorizers": [{"plugin": "allow-list", "domains": ["b.example"]}],
        "components": {"brig": {"plugin": "http-forward", "url": "http://127.0.0.1:9", "timeout": 3}},
    }


#: other plugin tables to swap in, so that their options are fuzzed too
VARIANTS = {
    "discovery": [{"plugin": "wire-srv", "nameservers": ["127.0.0.1:5353"], "timeout": 1, "min_ttl": 0,
                   "max_ttl": 60, "negative_ttl": 1, "stale_ttl": 10}],
    "components": [{"brig": {"plugin": "wire-brig", "prekeys": 2, "search_policy": "full_search"},
                    "galley": {"plugin": "wire-galley"}}],
    "authorizers": [[{"plugin": "allow-list", "allow_all": True}]],
}


@st.composite
def mutated_configs(draw: Any, directory: str) -> Dict[str, Any]:
    """A valid configuration with up to three changes: a value replaced, a key removed or added."""
    config = json.loads(json.dumps(base_config(directory)))
    for table, choices in VARIANTS.items():
        if draw(st.booleans()):
            config[table] = json.loads(json.dumps(draw(st.sampled_from(choices))))
    for _ in range(draw(st.integers(1, 3))):
        # walk down to a table, then change one of its keys
        here: Any = config
        while True:
            keys = list(here) if isinstance(here, dict) else list(range(len(here)))
            if not keys:
                break
            key = draw(st.sampled_from(keys))
            if isinstance(here[key], (dict, list)) and here[key] and draw(st.booleans()):
                here = here[key]
                continue
            break
        if not isinstance(here, dict):
            continue
        action = draw(st.sampled_from(["replace", "replace", "remove", "add"]))
        if action == "replace" and here:
            here[draw(st.sampled_from(list(here)))] = draw(TOML_VALUES)
        elif action == "remove" and here:
            del here[draw(st.sampled_from(list(here)))]
        else:
            here[draw(st.text(max_size=12) | st.sampled_from(["plugin", "timeout", "url", "listen", "port"]))] = \
                draw(TOML_VALUES)
    return config


@pytest.fixture(scope="module")
def plugin_manager() -> Any:
    return make_plugin_manager()


@SLOW_FUZZ
@given(st.data())
def test_any_changed_configuration_builds_or_is_a_config_error(config_dir: str, plugin_manager: Any,
                                                               data: Any) -> None:
    raw = data.draw(mutated_configs(config_dir))
    file = os.path.join(config_dir, "fedserver.toml")
    try:
        config = parse_config(raw, file=file, base_dir=config_dir)
        service = build_service(config, reactor=MemoryReactorClock(), plugin_manager=plugin_manager,
                                migrate=False, listen=False)
    except ConfigError as e:
        assert str(e)
        return
    assert isinstance(service, FederationService)


def test_the_base_configuration_builds(config_dir: str, plugin_manager: Any) -> None:
    # else every changed one would fail for the same reason, and prove little
    for table, choices in [(None, [None]), *VARIANTS.items()]:
        for choice in choices:
            raw = base_config(config_dir)
            if table is not None:
                raw[table] = choice
            config = parse_config(raw, file=os.path.join(config_dir, "fedserver.toml"), base_dir=config_dir)
            build_service(config, reactor=MemoryReactorClock(), plugin_manager=plugin_manager, migrate=False,
                          listen=False)


def test_known_bad_files_are_config_errors(config_dir: str) -> None:
    # found by the properties above: each raised something other than ConfigError
    assert "not UTF-8" in str(load_text(config_dir, b"\xff\xfe = 1"))
    assert "nested too deeply" in str(load_text(config_dir, b"a = " + b"[" * 3000 + b"]" * 3000))
    raw = base_config(config_dir)
    raw["limits"]["idle_timeout"] = float("nan")
    with pytest.raises(ConfigError, match=r"\[limits\] idle_timeout: must be a number, not nan"):
        parse_config(raw, file=os.path.join(config_dir, "f.toml"), base_dir=config_dir)


def test_known_bad_srv_targets_are_a_lookup_failure() -> None:
    # found by the properties above: a non-ASCII target raised UnicodeDecodeError
    reactor = UDPReactor()
    lookup = DNSLookup(reactor, [("127.0.0.1", 53)], timeout=2)
    d = lookup.srv(NAME)
    protocol, data, address = reactor.sent[0]
    bad = dns.RRHeader(NAME, dns.SRV, dns.IN, 60, dns.Record_SRV(0, 0, 8443, b"fed\xff.example", 60))
    spaced = dns.RRHeader(NAME, dns.SRV, dns.IN, 60, dns.Record_SRV(0, 0, 8443, b"fed b.example", 60))
    protocol.datagramReceived(answer_datagram(data, [bad, spaced], dns.OK, False), address)
    failure = settled(d)
    assert failure.check(LookupFailed)
    assert str(failure.value) == f"the DNS answer for {NAME} has no SRV target that is a host name"
