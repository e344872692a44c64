"""
Tests for the C{matrix} discovery plugin (fedserver_matrix.discovery): the
server name resolution of the Matrix server-server API, the well-known
cache, the address policy.  In memory: a fake twisted.names resolver, and
the well-known fetch answered by a twisted.web resource over in-memory TLS
with certificates of a development CA, on a L{MemoryReactorClock}.
"""

from __future__ import annotations

import email.utils
import json
import textwrap
from typing import Any, Dict, List, Optional, Sequence, Tuple

import pytest
from twisted.internet import error
from twisted.internet.testing import MemoryReactorClock
from twisted.names import dns
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from twisted.web import server
from twisted.web.resource import Resource
from zope.interface.verify import verifyObject

import fedserver_matrix.discovery as matrix_discovery
from fedserver.discovery_cache import CacheSettings
from fedserver.errors import ConfigError
from fedserver.interfaces import IDiscovery
from fedserver.registry import make_plugin_manager
from fedserver.service import build_service
from fedserver.tls import ClientCertificateServerOptions
from fedserver.values import Response, Target
from fedserver_matrix.discovery import (
    MatrixDiscovery,
    ServerName,
    cache_period,
    make_matrix_discovery,
    parse_server_name,
)
from tests.unit.helpers import (
    DevPKI,
    assert_no_result,
    build_plugin,
    labelled_failure,
    make_context,
    options_for,
    pump_between,
    site_for,
    success_result_of,
)
from tests.unit.test_dns import NXDOMAIN, SERVFAIL, FakeResolver, a_rr, aaaa_rr, answers, srv_rr

TEST_RANGES = ["192.0.2.0/24", "198.51.100.0/24", "2001:db8::/32"]
HOUR = 3600.0
#: the well-known host's address
ORG_ADDRESS = "192.0.2.10"
FED = "_matrix-fed._tcp"
LEGACY = "_matrix._tcp"


def build(options: Optional[Dict[str, Any]] = None, *, allow: Optional[List[str]] = None,
          reactor: Optional[MemoryReactorClock] = None, ca: Optional[str] = None) -> MatrixDiscovery:
    """matrix discovery from the table [discovery] C{options}, as startup builds it."""
    tables: Dict[str, Any] = {"outward": {"allow_ip_ranges": TEST_RANGES if allow is None else allow}}
    if ca is not None:
        tables["tls"] = {"ca_certificates": [ca]}
    context = make_context(tables=tables, reactor=reactor or MemoryReactorClock())
    values = {"plugin": "matrix", "nameservers": ["127.0.0.1:5353"], **(options or {})}
    return build_plugin(matrix_discovery, "discovery", options_for("discovery", values), context)


@pytest.fixture
def clock() -> MemoryReactorClock:
    return MemoryReactorClock()


@pytest.fixture
def resolver() -> FakeResolver:
    resolver = FakeResolver()
    resolver.set("example.org", dns.A, answers(a_rr("example.org", ORG_ADDRESS)))
    return resolver


def wired(resolver: FakeResolver, clock: MemoryReactorClock, pki: DevPKI, **options: Any) -> MatrixDiscovery:
    allow = options.pop("allow", None)
    discovery = build({"timeout": 2, "well_known_timeout": 5, "min_ttl": 0, "max_ttl": 3600, "negative_ttl": 30,
                       "stale_ttl": 600, **options}, allow=allow, reactor=clock, ca=pki.ca_path)
    discovery.lookup.resolver = resolver
    return discovery


@pytest.fixture
def discovery(resolver: FakeResolver, clock: MemoryReactorClock, dev_pki: DevPKI) -> MatrixDiscovery:
    return wired(resolver, clock, dev_pki)


class WellKnownSite(Resource):
    """Answers every GET with C{code}, C{headers} and C{body} (by default, delegating to C{server})."""

    isLeaf = True

    def __init__(self, server: Any = None, *, code: int = 200, body: Optional[bytes] = None,
                 headers: Sequence[Tuple[str, str]] = (), hang: bool = False) -> None:
        super().__init__()
        self.code = code
        self.body = body if body is not None else json.dumps({"m.server": server}).encode()
        self.headers = headers
        self.hang = hang
        self.requests: List[Tuple[bytes, bytes, Optional[bytes]]] = []

    def render_GET(self, request: Any) -> Any:
        self.requests.append((request.method, request.uri, request.getHeader(b"host")))
        if self.hang:
            return server.NOT_DONE_YET
        request.setResponseCode(self.code)
        for name, value in self.headers:
            request.setHeader(name, value)
        return self.body


def answer(clock: MemoryReactorClock, pki: DevPKI, site: Resource, *, certificate_for: str = "example.org",
           address: str = ORG_ADDRESS, port: int = 443) -> Any:
    """Complete the pending well-known connection to C{address} with a TLS server for C{certificate_for}."""
    host, port_, factory, _, _ = clock.tcpClients[-1]
    assert (host, port_) == (address, port)
    server_factory = TLSMemoryBIOFactory(
        ClientCertificateServerOptions(pki.material(certificate_for)), False, site_for(site), clock=clock
    )
    return pump_between(server_factory.buildProtocol(None), factory.buildProtocol(None), clock)


def refuse(clock: MemoryReactorClock) -> None:
    """Refuse the pending connection."""
    clock.tcpClients[-1][2].clientConnectionFailed(clock.connectors[-1], Failure(error.ConnectionRefusedError()))
    clock.advance(0)


def delegate(discovery: MatrixDiscovery, clock: MemoryReactorClock, pki: DevPKI, site: Resource,
             name: str = "example.org", **kwargs: Any) -> List[Target]:
    """Discover C{name}, answering the well-known fetch with C{site}."""
    d = discovery.discover(name)
    answer(clock, pki, site, **kwargs)
    return success_result_of(d)


def fetches(clock: MemoryReactorClock) -> int:
    """Connections made so far (every one is a well-known fetch)."""
    return len(clock.tcpClients)


def queries(resolver: FakeResolver, type: Optional[int] = None) -> List[str]:
    return [name for name, t in resolver.asked if type is None or t == type]


def serve_srv(resolver: FakeResolver, name: str, *records: Tuple[str, int, str]) -> None:
    """SRV C{name} with records (target, port, address), priority by position."""
    resolver.set(name, dns.SRV, answers(*(srv_rr(name, target, i, 0, port) for i, (target, port, _) in
                                          enumerate(records))))
    for target, _, address in records:
        resolver.set(target, dns.A, answers(a_rr(target, address)))


def hosts(targets: List[Target]) -> List[Tuple[str, str, int]]:
    return [(t.infra_domain, t.host, t.port) for t in targets]


# the plugin and its options


def test_the_hook_registers_matrix() -> None:
    assert matrix_discovery.fedserver_discovery_plugins() == {"matrix": make_matrix_discovery}


def test_provides_idiscovery() -> None:
    assert verifyObject(IDiscovery, build())


def test_defaults() -> None:
    discovery = build({"nameservers": []})
    assert discovery.cache.settings == CacheSettings()
    assert discovery.lookup.timeout == 5.0
    assert discovery.fetcher.timeout == 10.0
    assert discovery.fetcher.lookup is discovery.lookup
    assert discovery.well_known.settings == CacheSettings(
        min_ttl=300, max_ttl=48 * HOUR, negative_ttl=120, stale_ttl=86400, max_entries=10000, failure_ttl=HOUR)


def test_every_option() -> None:
    discovery = build({"nameservers": ["127.0.0.1:5353", "[::1]:5354"], "timeout": 3, "well_known_timeout": 7,
                       "min_ttl": 1, "max_ttl": 120, "negative_ttl": 5, "stale_ttl": 7200, "cache_entries": 50})
    assert discovery.lookup.resolver.servers == [("127.0.0.1", 5353), ("::1", 5354)]
    assert discovery.lookup.timeout == 3.0
    assert discovery.fetcher.timeout == 7.0
    assert discovery.cache.settings == CacheSettings(min_ttl=1, max_ttl=120, negative_ttl=5, stale_ttl=7200,
                                                     max_entries=50)
    assert (discovery.well_known.settings.stale_ttl, discovery.well_known.settings.max_entries) == (7200, 50)


@pytest.mark.parametrize(
    "options, message",
    [
        ({"well_known": True}, r"\[discovery\] well_known: is not a known option"),
        ({"srv": "_matrix._tcp"}, r"\[discovery\] srv: is not a known option here \(known options: cache_entries, "),
        ({"nameservers": ["ns.example:53"]}, r"\[discovery\] nameservers: 'ns.example:53' is not address:port"),
        ({"timeout": 0}, r"\[discovery\] timeout: must be at least 0.1"),
        ({"well_known_timeout": 0}, r"\[discovery\] well_known_timeout: must be at least 0.1"),
        ({"well_known_timeout": 121}, r"\[discovery\] well_known_timeout: must be at most 120"),
        ({"well_known_timeout": "10"}, r"\[discovery\] well_known_timeout: must be a number, not a string"),
        ({"min_ttl": 600, "max_ttl": 300}, r"\[discovery\] min_ttl: must not exceed max_ttl \(300.0\)"),
        ({"cache_entries": 0}, r"\[discovery\] cache_entries: must be at least 1"),
    ],
)
def test_bad_options_name_the_key(options: Dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        build(options)


def test_unreadable_ca_certificates_are_a_config_error(tmp_path: Any) -> None:
    with pytest.raises(ConfigError, match=r"\[tls\] ca_certificates: cannot read .*missing.pem"):
        build(ca=str(tmp_path / "missing.pem"))
    (tmp_path / "bad.pem").write_text("not a certificate")
    with pytest.raises(ConfigError, match=r"\[tls\] ca_certificates: .*bad.pem holds no valid PEM certificate"):
        build(ca=str(tmp_path / "bad.pem"))


# server names


@pytest.mark.parametrize(
    "value, expected",
    [
        ("matrix.org", ServerName("matrix.org")),
        ("Matrix.ORG", ServerName("matrix.org")),
        ("matrix.org:8448", ServerName("matrix.org", 8448)),
        ("localhost", ServerName("localhost")),
        ("my-server.example:1", ServerName("my-server.example", 1)),
        ("1.2.3.4", ServerName("1.2.3.4", None, True)),
        ("1.2.3.4:1234", ServerName("1.2.3.4", 1234, True)),
        ("[1234:5678::abcd]", ServerName("1234:5678::abcd", None, True)),
        ("[1234:5678::ABCD]:5678", ServerName("1234:5678::abcd", 5678, True)),
        ("[::ffff:192.0.2.1]", ServerName("::ffff:c000:201", None, True)),
        ("example.org:65535", ServerName("example.org", 65535)),
    ],
)
def test_server_names(value: str, expected: ServerName) -> None:
    assert parse_server_name(value) == expected


@pytest.mark.parametrize(
    "value",
    ["", ":8448", "example.org:", "example.org:0", "example.org:65536", "example.org:123456", "example.org:+80",
     "example.org:http", "exa mple.org", "example..org", ".example.org", "example_org", "ex@mple.org",
     "1.2.3.256", "1.2.3", "[1234:5678::abcd", "[1234:5678::abcd]x", "[not-v6]:80", "1234:5678::abcd",
     "[fe80::1%eth0]", "bücher.example", "a" * 64 + ".example", "a." * 128 + "a"],
)
def test_not_server_names(value: str) -> None:
    with pytest.raises(ValueError, match="is not a server name"):
        parse_server_name(value)


def test_server_names_print_as_written() -> None:
    assert [str(parse_server_name(v)) for v in ("Example.org:80", "[2001:DB8::1]:8448", "[2001:db8::1]", "1.2.3.4")] \
        == ["example.org:80", "[2001:db8::1]:8448", "[2001:db8::1]", "1.2.3.4"]


@pytest.mark.parametrize("value", ["exa mple.org", "example.org:0", "[::1", "a" * 300])
def test_a_name_that_is_no_server_name_is_invalid_domain(discovery: MatrixDiscovery, value: str) -> None:
    e = labelled_failure(discovery.discover(value), "invalid-domain")
    assert e.code == 422
    assert e.message.startswith(f"{value!r} is not a server name")
    assert "a Matrix server name is host[:port]" in e.message
    assert e.data == {"type": "federation", "domain": value}


# 1. IP literals: no lookup at all


@pytest.mark.parametrize(
    "name, expected",
    [
        ("192.0.2.7", ("192.0.2.7", "192.0.2.7", 8448)),
        ("192.0.2.7:8443", ("192.0.2.7", "192.0.2.7", 8443)),
        ("[2001:db8::7]", ("2001:db8::7", "2001:db8::7", 8448)),
        ("[2001:DB8::7]:443", ("2001:db8::7", "2001:db8::7", 443)),
    ],
)
def test_an_ip_literal_is_used_as_it_is(discovery: MatrixDiscovery, resolver: FakeResolver,
                                        clock: MemoryReactorClock, name: str, expected: Tuple[str, str, int]) -> None:
    assert hosts(success_result_of(discovery.discover(name))) == [expected]
    assert resolver.asked == []
    assert fetches(clock) == 0


def test_an_ip_literal_is_subject_to_the_address_policy(discovery: MatrixDiscovery) -> None:
    e = labelled_failure(discovery.discover("10.0.0.1:8448"), "discovery-failure")
    assert e.message == ("no usable federation target for 10.0.0.1:8448: 10.0.0.1 is not a public address; "
                         "list its range in [outward] allow_ip_ranges to federate with it")
    assert e.data == {"type": "federation", "domain": "10.0.0.1:8448"}
    labelled_failure(discovery.discover("[::1]"), "discovery-failure")


# 2. a DNS name with a port: its addresses, no well-known, no SRV


def test_a_name_with_a_port_is_its_addresses_at_that_port(discovery: MatrixDiscovery, resolver: FakeResolver,
                                                          clock: MemoryReactorClock) -> None:
    resolver.set("example.org", dns.AAAA, answers(aaaa_rr("example.org", "2001:db8::10", ttl=60)))
    targets = success_result_of(discovery.discover("example.org:8443"))
    assert hosts(targets) == [("example.org", ORG_ADDRESS, 8443), ("example.org", "2001:db8::10", 8443)]
    assert {t.ttl for t in targets} == {60}
    assert queries(resolver) == ["example.org", "example.org"]
    assert fetches(clock) == 0


def test_a_name_with_a_port_that_resolves_nowhere_is_invalid_domain(discovery: MatrixDiscovery) -> None:
    e = labelled_failure(discovery.discover("nowhere.example:8448"), "invalid-domain")
    assert e.message == "nowhere.example:8448 resolves nowhere: nowhere.example has no A or AAAA record"
    assert e.data == {"type": "federation", "domain": "nowhere.example:8448"}


def test_a_name_with_a_port_whose_dns_fails_is_discovery_failure(discovery: MatrixDiscovery,
                                                                 resolver: FakeResolver) -> None:
    resolver.set("example.org", dns.A, SERVFAIL())
    resolver.set("example.org", dns.AAAA, SERVFAIL())
    e = labelled_failure(discovery.discover("example.org:8448"), "discovery-failure")
    assert e.message == "cannot discover example.org:8448: the DNS server failed to answer for example.org (SERVFAIL)"


def test_the_addresses_of_a_name_with_a_port_are_checked(discovery: MatrixDiscovery, resolver: FakeResolver) -> None:
    resolver.set("example.org", dns.A, answers(a_rr("example.org", "10.0.0.1"), a_rr("example.org", "192.0.2.1")))
    resolver.set("example.org", dns.AAAA, answers(aaaa_rr("example.org", "::1")))
    assert hosts(success_result_of(discovery.discover("example.org:8448"))) == [("example.org", "192.0.2.1", 8448)]
    resolver.set("inside.example", dns.A, answers(a_rr("inside.example", "10.0.0.1")))
    resolver.set("inside.example", dns.AAAA, answers(aaaa_rr("inside.example", "::1")))
    e = labelled_failure(discovery.discover("inside.example:8448"), "discovery-failure")
    assert e.message == (
        "no usable federation target for inside.example:8448: 10.0.0.1 is not a public address; list its range "
        "in [outward] allow_ip_ranges to federate with it; ::1 is not a public address; list its range in "
        "[outward] allow_ip_ranges to federate with it"
    )


# 3. the well-known delegation


def test_the_well_known_is_fetched_over_tls_from_the_host(discovery: MatrixDiscovery, resolver: FakeResolver,
                                                          clock: MemoryReactorClock, dev_pki: DevPKI) -> None:
    serve_srv(resolver, f"{FED}.matrix.example", ("fed1.hosting.example", 8443, "192.0.2.21"))
    site = WellKnownSite("matrix.example")
    d = discovery.discover("example.org")
    assert queries(resolver) == ["example.org", "example.org"]  # A and AAAA of the well-known host
    host, port, _, timeout, _ = clock.tcpClients[0]
    assert (host, port, timeout) == (ORG_ADDRESS, 443, 5)
    answer(clock, dev_pki, site)
    assert site.requests == [(b"GET", b"/.well-known/matrix/server", b"example.org")]
    # the delegated name's SRV; its target is where to connect, not what TLS verifies
    assert hosts(success_result_of(d)) == [("matrix.example", "192.0.2.21", 8443)]
    assert queries(resolver, dns.SRV) == [f"{FED}.matrix.example"]


def test_a_delegation_to_a_name_with_a_port(discovery: MatrixDiscovery, resolver: FakeResolver,
                                            clock: MemoryReactorClock, dev_pki: DevPKI) -> None:
    resolver.set("matrix.example", dns.A, answers(a_rr("matrix.example", "192.0.2.20")))
    targets = delegate(discovery, clock, dev_pki, WellKnownSite("Matrix.Example:443"))
    assert hosts(targets) == [("matrix.example", "192.0.2.20", 443)]
    assert queries(resolver, dns.SRV) == []


@pytest.mark.parametrize(
    "server, expected",
    [
        ("192.0.2.30", [("192.0.2.30", "192.0.2.30", 8448)]),
        ("192.0.2.30:443", [("192.0.2.30", "192.0.2.30", 443)]),
        ("[2001:db8::30]:8443", [("2001:db8::30", "2001:db8::30", 8443)]),
    ],
)
def test_a_delegation_to_an_ip_literal(discovery: MatrixDiscovery, resolver: FakeResolver, clock: MemoryReactorClock,
                                       dev_pki: DevPKI, server: str, expected: List[Tuple[str, str, int]]) -> None:
    assert hosts(delegate(discovery, clock, dev_pki, WellKnownSite(server))) == expected
    assert queries(resolver, dns.SRV) == []


def test_a_delegation_to_a_private_ip_literal_is_refused(discovery: MatrixDiscovery, clock: MemoryReactorClock,
                                                         dev_pki: DevPKI) -> None:
    d = discovery.discover("example.org")
    answer(clock, dev_pki, WellKnownSite("169.254.169.254"))
    e = labelled_failure(d, "discovery-failure")
    assert e.message == ("no usable federation target for example.org: delegates to 169.254.169.254, and "
                         "169.254.169.254 is not a public address; list its range in [outward] allow_ip_ranges "
                         "to federate with it")


def test_a_delegated_name_falls_back_to_the_deprecated_srv(discovery: MatrixDiscovery, resolver: FakeResolver,
                                                           clock: MemoryReactorClock, dev_pki: DevPKI) -> None:
    serve_srv(resolver, f"{LEGACY}.matrix.example", ("old.hosting.example", 8448, "192.0.2.22"))
    targets = delegate(discovery, clock, dev_pki, WellKnownSite("matrix.example"))
    assert hosts(targets) == [("matrix.example", "192.0.2.22", 8448)]
    assert queries(resolver, dns.SRV) == [f"{FED}.matrix.example", f"{LEGACY}.matrix.example"]


def test_a_delegated_name_without_srv_is_itself_at_8448(discovery: MatrixDiscovery, resolver: FakeResolver,
                                                        clock: MemoryReactorClock, dev_pki: DevPKI) -> None:
    resolver.set("matrix.example", dns.A, answers(a_rr("matrix.example", "192.0.2.20", ttl=120)))
    targets = delegate(discovery, clock, dev_pki, WellKnownSite("matrix.example"))
    assert hosts(targets) == [("matrix.example", "192.0.2.20", 8448)]
    assert targets[0].ttl == 120
    assert queries(resolver, dns.SRV) == [f"{FED}.matrix.example", f"{LEGACY}.matrix.example"]


def test_the_new_srv_comes_before_the_deprecated_one(discovery: MatrixDiscovery, resolver: FakeResolver,
                                                     clock: MemoryReactorClock, dev_pki: DevPKI) -> None:
    serve_srv(resolver, f"{FED}.matrix.example", ("new.hosting.example", 8443, "192.0.2.21"))
    serve_srv(resolver, f"{LEGACY}.matrix.example", ("old.hosting.example", 8448, "192.0.2.22"))
    targets = delegate(discovery, clock, dev_pki, WellKnownSite("matrix.example"))
    assert hosts(targets) == [("matrix.example", "192.0.2.21", 8443)]
    assert queries(resolver, dns.SRV) == [f"{FED}.matrix.example"]


def test_srv_targets_come_in_rfc_2782_order_each_address(discovery: MatrixDiscovery, resolver: FakeResolver,
                                                         clock: MemoryReactorClock, dev_pki: DevPKI) -> None:
    name = f"{FED}.matrix.example"
    resolver.set(name, dns.SRV, answers(srv_rr(name, "b.hosting.example", 20, 0, 8449, ttl=50),
                                        srv_rr(name, "a.hosting.example", 10, 0, 8448, ttl=300)))
    resolver.set("a.hosting.example", dns.A, answers(a_rr("a.hosting.example", "192.0.2.1")))
    resolver.set("a.hosting.example", dns.AAAA, answers(aaaa_rr("a.hosting.example", "2001:db8::1")))
    resolver.set("b.hosting.example", dns.A, answers(a_rr("b.hosting.example", "192.0.2.2")))
    targets = delegate(discovery, clock, dev_pki, WellKnownSite("matrix.example"))
    assert targets == [
        Target("matrix.example", "192.0.2.1", 8448, ttl=300, priority=10),
        Target("matrix.example", "2001:db8::1", 8448, ttl=300, priority=10),
        Target("matrix.example", "192.0.2.2", 8449, ttl=50, priority=20),
    ]


# 4 to 6: no delegation


@pytest.mark.parametrize("site", [WellKnownSite(code=404, body=b"not found"), WellKnownSite(code=403, body=b"{}")])
def test_without_well_known_the_srv_of_the_name_itself(discovery: MatrixDiscovery, resolver: FakeResolver,
                                                       clock: MemoryReactorClock, dev_pki: DevPKI,
                                                       site: WellKnownSite) -> None:
    serve_srv(resolver, f"{FED}.example.org", ("fed.hosting.example", 8443, "192.0.2.23"))
    targets = delegate(discovery, clock, dev_pki, site)
    # TLS verifies the server name, never the SRV target
    assert hosts(targets) == [("example.org", "192.0.2.23", 8443)]


def test_without_well_known_the_deprecated_srv_then_port_8448(discovery: MatrixDiscovery, resolver: FakeResolver,
                                                              clock: MemoryReactorClock, dev_pki: DevPKI) -> None:
    serve_srv(resolver, f"{LEGACY}.example.org", ("old.hosting.example", 8447, "192.0.2.24"))
    assert hosts(delegate(discovery, clock, dev_pki, WellKnownSite(code=404))) == [
        ("example.org", "192.0.2.24", 8447)]
    assert queries(resolver, dns.SRV) == [f"{FED}.example.org", f"{LEGACY}.example.org"]


def test_without_well_known_or_srv_the_name_at_8448(discovery: MatrixDiscovery, resolver: FakeResolver,
                                                    clock: MemoryReactorClock) -> None:
    d = discovery.discover("example.org")
    refuse(clock)
    assert hosts(success_result_of(d)) == [("example.org", ORG_ADDRESS, 8448)]


def test_a_dot_srv_target_says_the_name_does_not_federate(discovery: MatrixDiscovery, resolver: FakeResolver,
                                                          clock: MemoryReactorClock) -> None:
    name = f"{FED}.example.org"
    resolver.set(name, dns.SRV, answers(srv_rr(name, b".", 0, 0, 0)))  # type: ignore[arg-type]
    d = discovery.discover("example.org")
    refuse(clock)
    e = labelled_failure(d, "invalid-domain")
    assert e.message == f"example.org says it does not federate (the SRV target of {name} is '.')"
    # not a reason to ask the deprecated record
    assert queries(resolver, dns.SRV) == [name]


def test_a_name_that_resolves_nowhere_is_invalid_domain(discovery: MatrixDiscovery, resolver: FakeResolver,
                                                        clock: MemoryReactorClock) -> None:
    resolver.set(f"{FED}.nowhere.example", dns.SRV, NXDOMAIN())
    resolver.set("nowhere.example", dns.A, NXDOMAIN())
    e = labelled_failure(discovery.discover("nowhere.example"), "invalid-domain")
    assert e.message == (
        f"nowhere.example resolves nowhere: {FED}.nowhere.example does not exist (NXDOMAIN); "
        f"{LEGACY}.nowhere.example has no SRV record; nowhere.example has no A or AAAA record"
    )
    assert e.data == {"type": "federation", "domain": "nowhere.example"}
    assert fetches(clock) == 0  # no address, no well-known fetch


def test_a_delegated_name_that_resolves_nowhere_names_both(discovery: MatrixDiscovery, clock: MemoryReactorClock,
                                                           dev_pki: DevPKI) -> None:
    d = discovery.discover("example.org")
    answer(clock, dev_pki, WellKnownSite("gone.example"))
    e = labelled_failure(d, "invalid-domain")
    assert e.message.startswith(
        "example.org delegates to gone.example (its /.well-known/matrix/server): gone.example resolves nowhere: ")
    assert e.data == {"type": "federation", "domain": "example.org"}


def test_a_srv_lookup_failure_is_discovery_failure(discovery: MatrixDiscovery, resolver: FakeResolver,
                                                   clock: MemoryReactorClock) -> None:
    resolver.set(f"{FED}.example.org", dns.SRV, SERVFAIL())
    d = discovery.discover("example.org")
    refuse(clock)
    e = labelled_failure(d, "discovery-failure")
    assert e.code == 400
    assert e.message == f"cannot discover example.org: the DNS server failed to answer for {FED}.example.org (SERVFAIL)"
    # a failed lookup is no "no record": the deprecated record is not asked
    assert queries(resolver, dns.SRV) == [f"{FED}.example.org"]


def test_a_dns_timeout_is_discovery_failure(discovery: MatrixDiscovery, resolver: FakeResolver,
                                            clock: MemoryReactorClock) -> None:
    from twisted.internet.defer import Deferred

    resolver.set("example.org", dns.A, Deferred())
    resolver.set("example.org", dns.AAAA, Deferred())
    resolver.set(f"{FED}.example.org", dns.SRV, Deferred())
    d = discovery.discover("example.org")
    clock.advance(2)  # the well-known host's addresses: timed out, no delegation
    assert fetches(clock) == 0
    assert_no_result(d)
    clock.advance(2)  # the SRV lookup
    e = labelled_failure(d, "discovery-failure")
    assert e.message == f"cannot discover example.org: the DNS lookup of {FED}.example.org timed out"


# what makes a well-known answer a failure (no delegation)


@pytest.mark.parametrize(
    "site",
    [
        WellKnownSite(body=b"not json"),
        WellKnownSite(body=b"\xff\xfe"),
        WellKnownSite(body=b'["m.server"]'),
        WellKnownSite(body=b"{}"),
        WellKnownSite(body=b'{"m.server": 8448}'),
        WellKnownSite(body=b'{"m.server": null}'),
        WellKnownSite("matrix.example:99999"),
        WellKnownSite("https://matrix.example"),
        WellKnownSite(""),
        WellKnownSite(code=204, body=b""),
        WellKnownSite(code=500),
        WellKnownSite(code=503),
        WellKnownSite("matrix.example", body=b'{"m.server": "matrix.example", "pad": "' + b"x" * 51200 + b'"}'),
    ],
    ids=["not-json", "not-utf8", "a-list", "no-m.server", "a-number", "null", "bad-port", "a-url", "empty",
         "204", "500", "503", "too-large"],
)
def test_an_unusable_answer_is_no_delegation(discovery: MatrixDiscovery, clock: MemoryReactorClock,
                                             dev_pki: DevPKI, site: WellKnownSite) -> None:
    assert hosts(delegate(discovery, clock, dev_pki, site)) == [("example.org", ORG_ADDRESS, 8448)]


def test_a_body_of_50_kib_is_not_too_large(discovery: MatrixDiscovery, resolver: FakeResolver,
                                           clock: MemoryReactorClock, dev_pki: DevPKI) -> None:
    resolver.set("matrix.example", dns.A, answers(a_rr("matrix.example", "192.0.2.20")))
    head = b'{"m.server": "matrix.example", "pad": "'
    body = head + b"x" * (50 * 1024 - len(head) - 2) + b'"}'
    assert len(body) == 50 * 1024
    assert hosts(delegate(discovery, clock, dev_pki, WellKnownSite(body=body)))[0][0] == "matrix.example"


def test_a_certificate_for_another_name_is_no_delegation(discovery: MatrixDiscovery, clock: MemoryReactorClock,
                                                         dev_pki: DevPKI) -> None:
    site = WellKnownSite("evil.example")
    targets = delegate(discovery, clock, dev_pki, site, certificate_for="other.example")
    assert hosts(targets) == [("example.org", ORG_ADDRESS, 8448)]
    assert site.requests == []


def test_a_certificate_of_an_untrusted_ca_is_no_delegation(discovery: MatrixDiscovery, clock: MemoryReactorClock,
                                                           other_pki: DevPKI) -> None:
    site = WellKnownSite("evil.example")
    assert hosts(delegate(discovery, clock, other_pki, site)) == [("example.org", ORG_ADDRESS, 8448)]
    assert site.requests == []


def test_no_answer_within_well_known_timeout_is_no_delegation(discovery: MatrixDiscovery, clock: MemoryReactorClock,
                                                              dev_pki: DevPKI) -> None:
    site = WellKnownSite("matrix.example", hang=True)
    d = discovery.discover("example.org")
    pump = answer(clock, dev_pki, site)
    assert len(site.requests) == 1
    clock.advance(4.9)
    assert_no_result(d)
    clock.advance(0.1)
    pump.flush()
    assert hosts(success_result_of(d)) == [("example.org", ORG_ADDRESS, 8448)]
    assert pump.clientIO.disconnected  # the connection is given up


def test_no_connection_within_well_known_timeout_is_no_delegation(discovery: MatrixDiscovery,
                                                                  clock: MemoryReactorClock) -> None:
    d = discovery.discover("example.org")
    clock.advance(4.9)
    assert_no_result(d)
    clock.advance(0.1)
    assert hosts(success_result_of(d)) == [("example.org", ORG_ADDRESS, 8448)]
    assert fetches(clock) == 1


def test_every_address_of_the_host_is_tried(discovery: MatrixDiscovery, resolver: FakeResolver,
                                            clock: MemoryReactorClock, dev_pki: DevPKI) -> None:
    resolver.set("example.org", dns.AAAA, answers(aaaa_rr("example.org", "2001:db8::10")))
    resolver.set("matrix.example", dns.A, answers(a_rr("matrix.example", "192.0.2.20")))
    d = discovery.discover("example.org")
    refuse(clock)
    answer(clock, dev_pki, WellKnownSite("matrix.example"), address="2001:db8::10")
    assert hosts(success_result_of(d)) == [("matrix.example", "192.0.2.20", 8448)]


# redirects


def test_a_redirect_is_followed_and_verified_against_its_host(discovery: MatrixDiscovery, resolver: FakeResolver,
                                                              clock: MemoryReactorClock, dev_pki: DevPKI) -> None:
    resolver.set("www.example.org", dns.A, answers(a_rr("www.example.org", "192.0.2.11")))
    resolver.set("matrix.example", dns.A, answers(a_rr("matrix.example", "192.0.2.20")))
    first = WellKnownSite(code=301, body=b"", headers=[("Location", "https://www.example.org:8443/mx?s=1")])
    second = WellKnownSite("matrix.example")
    d = discovery.discover("example.org")
    answer(clock, dev_pki, first)
    answer(clock, dev_pki, second, certificate_for="www.example.org", address="192.0.2.11", port=8443)
    assert second.requests == [(b"GET", b"/mx?s=1", b"www.example.org:8443")]
    assert hosts(success_result_of(d)) == [("matrix.example", "192.0.2.20", 8448)]


@pytest.mark.parametrize(
    "location",
    ["http://example.org/.well-known/matrix/server", "ftp://example.org/", "https://:443/", "https://x:0/",
     "https://x:https/", "https://[oops/", "/a path", "/b\u00fccher", "/.well-known/matrix/server"],
    ids=["http", "ftp", "no-host", "port-0", "port-name", "bad-ipv6", "space", "non-ascii", "loop"],
)
def test_a_bad_redirect_is_no_delegation(discovery: MatrixDiscovery, clock: MemoryReactorClock, dev_pki: DevPKI,
                                         location: str) -> None:
    site = WellKnownSite(code=302, body=b"", headers=[("Location", location)])
    assert hosts(delegate(discovery, clock, dev_pki, site)) == [("example.org", ORG_ADDRESS, 8448)]
    assert fetches(clock) == 1


def test_at_most_five_redirects(discovery: MatrixDiscovery, clock: MemoryReactorClock, dev_pki: DevPKI) -> None:
    d = discovery.discover("example.org")
    for hop in range(6):
        answer(clock, dev_pki, WellKnownSite(code=307, body=b"", headers=[("Location", f"/hop{hop}")]))
    assert hosts(success_result_of(d)) == [("example.org", ORG_ADDRESS, 8448)]
    assert fetches(clock) == 6


# the address policy


def test_the_well_known_hosts_own_address_is_checked(resolver: FakeResolver, clock: MemoryReactorClock,
                                                     dev_pki: DevPKI) -> None:
    discovery = wired(resolver, clock, dev_pki, allow=["198.51.100.0/24"])
    resolver.set("example.org", dns.A, answers(a_rr("example.org", "10.0.0.1"), a_rr("example.org", "127.0.0.1")))
    serve_srv(resolver, f"{FED}.example.org", ("fed.hosting.example", 8443, "198.51.100.1"))
    targets = success_result_of(discovery.discover("example.org"))
    assert fetches(clock) == 0  # nothing connects to a refused address
    assert hosts(targets) == [("example.org", "198.51.100.1", 8443)]


def test_a_redirect_to_a_private_address_is_not_followed(discovery: MatrixDiscovery, clock: MemoryReactorClock,
                                                         dev_pki: DevPKI) -> None:
    site = WellKnownSite(code=302, body=b"", headers=[("Location", "https://127.0.0.1/.well-known/matrix/server")])
    assert hosts(delegate(discovery, clock, dev_pki, site)) == [("example.org", ORG_ADDRESS, 8448)]
    assert fetches(clock) == 1


def test_srv_target_addresses_are_checked(resolver: FakeResolver, clock: MemoryReactorClock, dev_pki: DevPKI) -> None:
    discovery = wired(resolver, clock, dev_pki)
    name = f"{FED}.example.org"
    resolver.set(name, dns.SRV, answers(srv_rr(name, "inside.example", 0, 0, 8448),
                                        srv_rr(name, "outside.example", 10, 0, 8448)))
    resolver.set("inside.example", dns.A, answers(a_rr("inside.example", "10.1.2.3")))
    resolver.set("outside.example", dns.A, answers(a_rr("outside.example", "169.254.169.254"),
                                                   a_rr("outside.example", "192.0.2.99")))
    d = discovery.discover("example.org")
    refuse(clock)
    assert hosts(success_result_of(d)) == [("example.org", "192.0.2.99", 8448)]


def test_srv_targets_all_refused_is_discovery_failure(discovery: MatrixDiscovery, resolver: FakeResolver,
                                                      clock: MemoryReactorClock) -> None:
    serve_srv(resolver, f"{FED}.example.org", ("inside.example", 8448, "10.1.2.3"))
    d = discovery.discover("example.org")
    refuse(clock)
    e = labelled_failure(d, "discovery-failure")
    assert e.message == ("no usable federation target for example.org: 10.1.2.3 is not a public address; list its "
                         "range in [outward] allow_ip_ranges to federate with it")


def test_the_8448_fallback_addresses_are_checked(discovery: MatrixDiscovery, resolver: FakeResolver,
                                                 clock: MemoryReactorClock, dev_pki: DevPKI) -> None:
    resolver.set("matrix.example", dns.A, answers(a_rr("matrix.example", "127.0.0.1")))
    d = discovery.discover("example.org")
    answer(clock, dev_pki, WellKnownSite("matrix.example"))
    e = labelled_failure(d, "discovery-failure")
    assert e.message.startswith("example.org delegates to matrix.example (its /.well-known/matrix/server): "
                                "no usable federation target for matrix.example: 127.0.0.1 is not a public address")


# caching of the well-known answer


def test_without_cache_headers_the_answer_is_kept_24_hours(discovery: MatrixDiscovery, resolver: FakeResolver,
                                                           clock: MemoryReactorClock, dev_pki: DevPKI) -> None:
    resolver.set("matrix.example", dns.A, answers(a_rr("matrix.example", "192.0.2.20")))
    delegate(discovery, clock, dev_pki, WellKnownSite("matrix.example"))
    clock.advance(24 * HOUR - 1)
    assert hosts(success_result_of(discovery.discover("example.org")))[0][0] == "matrix.example"
    assert fetches(clock) == 1
    clock.advance(1)
    d = discovery.discover("example.org")
    assert fetches(clock) == 2
    answer(clock, dev_pki, WellKnownSite("matrix.example"))
    success_result_of(d)


@pytest.mark.parametrize(
    "headers, kept",
    [
        ([("Cache-Control", "max-age=600")], 600),
        ([("Cache-Control", "public, max-age=7200, must-revalidate")], 7200),
        ([("Cache-Control", "max-age=60")], 300),  # at least 5 minutes
        ([("Cache-Control", "max-age=0")], 300),
        ([("Cache-Control", "no-store")], 300),
        ([("Cache-Control", "no-store, max-age=7200")], 300),
        ([("Cache-Control", "max-age=1000000")], 48 * HOUR),  # at most 48 hours
        ([("Expires", "+2h")], 2 * HOUR),
        ([("Expires", "+100h")], 48 * HOUR),
        ([("Expires", "+1m")], 300),
        ([("Expires", "-1h")], 300),
        ([("Expires", "0")], 300),
        ([("Expires", "+2h"), ("Cache-Control", "max-age=600")], 600),  # max-age wins
        ([("Cache-Control", "max-age=soon")], 24 * HOUR),
    ],
)
def test_cache_headers_are_honoured_within_bounds(discovery: MatrixDiscovery, resolver: FakeResolver,
                                                  clock: MemoryReactorClock, dev_pki: DevPKI,
                                                  headers: List[Tuple[str, str]], kept: float) -> None:
    clock.advance(1_700_000_000)  # Expires is a date
    resolver.set("matrix.example", dns.A, answers(a_rr("matrix.example", "192.0.2.20")))
    headers = [(n, _expires(clock, v) if n == "Expires" else v) for n, v in headers]
    delegate(discovery, clock, dev_pki, WellKnownSite("matrix.example", headers=headers))
    clock.advance(kept - 1)
    success_result_of(discovery.discover("example.org"))
    assert fetches(clock) == 1
    clock.advance(1)
    assert_no_result(discovery.discover("example.org"))
    assert fetches(clock) == 2


def _expires(clock: MemoryReactorClock, value: str) -> str:
    if value[0] not in "+-":
        return value
    seconds = {"h": HOUR, "m": 60}[value[-1]] * float(value[1:-1])
    return email.utils.formatdate(clock.seconds() + (seconds if value[0] == "+" else -seconds), usegmt=True)


def test_cache_period_of_headers() -> None:
    def period(*headers: Tuple[str, str]) -> Optional[float]:
        return cache_period(Response(200, headers), 1_700_000_000)

    assert period() is None
    assert period(("cache-control", 'max-age="90"')) == 90
    assert period(("Cache-Control", "private"), ("Cache-Control", "max-age=30")) == 30
    assert period(("Expires", "Tue, 14 Nov 2023 22:13:20 GMT")) == 0
    assert period(("Expires", "Tue, 14 Nov 2023 23:13:20 GMT")) == 3600
    assert period(("Expires", "yesterday")) == 0


def test_a_failed_fetch_is_kept_an_hour(discovery: MatrixDiscovery, resolver: FakeResolver,
                                        clock: MemoryReactorClock, dev_pki: DevPKI) -> None:
    delegate(discovery, clock, dev_pki, WellKnownSite(code=404))
    clock.advance(HOUR - 1)
    assert hosts(success_result_of(discovery.discover("example.org"))) == [("example.org", ORG_ADDRESS, 8448)]
    assert fetches(clock) == 1
    clock.advance(1)
    resolver.set("matrix.example", dns.A, answers(a_rr("matrix.example", "192.0.2.20")))
    assert hosts(delegate(discovery, clock, dev_pki, WellKnownSite("matrix.example")))[0][0] == "matrix.example"


@pytest.mark.parametrize("fail", ["refused", "invalid", "5xx"])
def test_any_failure_is_kept_an_hour(discovery: MatrixDiscovery, clock: MemoryReactorClock, dev_pki: DevPKI,
                                     fail: str) -> None:
    d = discovery.discover("example.org")
    if fail == "refused":
        refuse(clock)
    else:
        answer(clock, dev_pki, WellKnownSite(code=502) if fail == "5xx" else WellKnownSite(body=b"{"))
    success_result_of(d)
    clock.advance(HOUR - 1)
    success_result_of(discovery.discover("example.org"))
    assert fetches(clock) == 1
    clock.advance(1)
    assert_no_result(discovery.discover("example.org"))
    assert fetches(clock) == 2


@pytest.mark.parametrize("fail", ["refused", "5xx", "too-large", "timeout"])
def test_the_last_good_answer_serves_on_while_fetches_fail(discovery: MatrixDiscovery, resolver: FakeResolver,
                                                           clock: MemoryReactorClock, dev_pki: DevPKI,
                                                           fail: str) -> None:
    resolver.set("matrix.example", dns.A, answers(a_rr("matrix.example", "192.0.2.20")))
    good = WellKnownSite("matrix.example", headers=[("Cache-Control", "max-age=600")])
    delegate(discovery, clock, dev_pki, good)
    clock.advance(600)

    def failing_fetch() -> Any:
        d = discovery.discover("example.org")
        if fail == "refused":
            refuse(clock)
        elif fail == "5xx":
            answer(clock, dev_pki, WellKnownSite(code=503))
        elif fail == "too-large":
            answer(clock, dev_pki, WellKnownSite(body=b" " * 60000))
        else:
            clock.advance(5)
        return success_result_of(d)

    assert hosts(failing_fetch())[0][0] == "matrix.example"
    # retried after two minutes, not on every call
    clock.advance(119)
    assert hosts(success_result_of(discovery.discover("example.org")))[0][0] == "matrix.example"
    assert fetches(clock) == 2
    clock.advance(1)
    assert hosts(failing_fetch())[0][0] == "matrix.example"
    assert fetches(clock) == 3
    # stale_ttl (600 s) after it expired, the last good answer is over
    clock.advance(600 - 120 - (5 if fail == "timeout" else 0))
    assert hosts(failing_fetch()) == [("example.org", ORG_ADDRESS, 8448)]


def test_a_definite_answer_replaces_the_last_good_one(discovery: MatrixDiscovery, resolver: FakeResolver,
                                                      clock: MemoryReactorClock, dev_pki: DevPKI) -> None:
    resolver.set("matrix.example", dns.A, answers(a_rr("matrix.example", "192.0.2.20")))
    delegate(discovery, clock, dev_pki, WellKnownSite("matrix.example"))
    clock.advance(24 * HOUR)
    # the host answers: no delegation any more
    assert hosts(delegate(discovery, clock, dev_pki, WellKnownSite(code=404))) == [("example.org", ORG_ADDRESS, 8448)]


def test_a_new_delegation_replaces_the_old_one(discovery: MatrixDiscovery, resolver: FakeResolver,
                                               clock: MemoryReactorClock, dev_pki: DevPKI) -> None:
    resolver.set("matrix.example", dns.A, answers(a_rr("matrix.example", "192.0.2.20")))
    resolver.set("synapse.example", dns.A, answers(a_rr("synapse.example", "192.0.2.25")))
    delegate(discovery, clock, dev_pki, WellKnownSite("matrix.example"))
    clock.advance(24 * HOUR)
    assert hosts(delegate(discovery, clock, dev_pki, WellKnownSite("synapse.example"))) == [
        ("synapse.example", "192.0.2.25", 8448)]


def test_concurrent_discoveries_are_one_fetch_and_one_lookup(discovery: MatrixDiscovery, resolver: FakeResolver,
                                                             clock: MemoryReactorClock, dev_pki: DevPKI) -> None:
    serve_srv(resolver, f"{FED}.matrix.example", ("fed1.hosting.example", 8443, "192.0.2.21"))
    first, second = discovery.discover("example.org"), discovery.discover("Example.ORG")
    assert_no_result(first)
    assert fetches(clock) == 1
    answer(clock, dev_pki, WellKnownSite("matrix.example"))
    assert success_result_of(first) == success_result_of(second)
    assert queries(resolver, dns.SRV) == [f"{FED}.matrix.example"]
    assert queries(resolver).count("fed1.hosting.example") == 2  # A and AAAA, once


def test_the_dns_answer_after_delegation_is_cached_for_its_ttl(discovery: MatrixDiscovery, resolver: FakeResolver,
                                                               clock: MemoryReactorClock, dev_pki: DevPKI) -> None:
    name = f"{FED}.matrix.example"
    resolver.set(name, dns.SRV, answers(srv_rr(name, "fed1.hosting.example", 0, 0, 8443, ttl=100)))
    resolver.set("fed1.hosting.example", dns.A, answers(a_rr("fed1.hosting.example", "192.0.2.21", ttl=100)))
    delegate(discovery, clock, dev_pki, WellKnownSite("matrix.example"))
    clock.advance(99)
    success_result_of(discovery.discover("example.org"))
    assert queries(resolver, dns.SRV) == [name]
    clock.advance(1)
    success_result_of(discovery.discover("example.org"))
    assert queries(resolver, dns.SRV) == [name, name]
    assert fetches(clock) == 1


def test_the_dns_answer_serves_stale_while_dns_fails(discovery: MatrixDiscovery, resolver: FakeResolver,
                                                     clock: MemoryReactorClock) -> None:
    serve_srv(resolver, f"{FED}.example.org", ("fed.hosting.example", 8443, "192.0.2.23"))
    d = discovery.discover("example.org")
    refuse(clock)
    before = success_result_of(d)
    clock.advance(300 + 599)  # the records' TTL, then all but a second of stale_ttl
    resolver.set(f"{FED}.example.org", dns.SRV, SERVFAIL())
    assert success_result_of(discovery.discover("example.org")) == before
    assert fetches(clock) == 1  # the failed well-known fetch is still kept


# through build_service and the installed entry points


def test_build_service_with_matrix(tmp_path: Any, dev_pki: DevPKI) -> None:
    cert, key = dev_pki.issue_files("fed.a.example")
    path = tmp_path / "a.toml"
    path.write_text(textwrap.dedent(f"""
        [server]
        backend_domain = "a.example"
        infra_domain = "fed.a.example"
        [inward]
        listen = "tcp:0"
        [outward]
        allow_ip_ranges = ["127.0.0.0/8"]
        [tls]
        certificate = "{cert}"
        private_key = "{key}"
        ca_certificates = ["{dev_pki.ca_path}"]
        [discovery]
        plugin = "matrix"
        nameservers = ["127.0.0.1:5353"]
        well_known_timeout = 3
        [authenticator]
        plugin = "mtls"
        [[authorizers]]
        plugin = "allow-list"
        allow_all = true
    """))
    top = build_service(str(path), reactor=MemoryReactorClock(), plugin_manager=make_plugin_manager(), migrate=False)
    discovery = top.context.discovery
    assert isinstance(discovery, MatrixDiscovery)
    assert discovery.policy is top.context.address_policy
    assert discovery.fetcher.policy is top.context.address_policy
    assert discovery.fetcher.timeout == 3
    assert discovery.lookup.resolver.servers == [("127.0.0.1", 5353)]
    assert hosts(success_result_of(discovery.discover("127.0.0.1:8448"))) == [("127.0.0.1", "127.0.0.1", 8448)]
