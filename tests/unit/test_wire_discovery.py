"""
Tests for the C{wire-srv} discovery plugin (fedserver_wire.discovery),
built through the real plugin registry (and once through L{build_service}),
with a fake twisted.names resolver on a L{MemoryReactorClock}.
"""

from __future__ import annotations

import textwrap
from typing import Any, Dict, List, Optional

import pytest
from twisted.internet.defer import Deferred
from twisted.internet.testing import MemoryReactorClock
from twisted.names import dns
from zope.interface.verify import verifyObject

import fedserver_wire.discovery as wire_discovery
from fedserver.discovery_cache import CacheSettings
from fedserver.errors import ConfigError
from fedserver.interfaces import IDiscovery
from fedserver.registry import make_plugin_manager
from fedserver.service import build_service
from fedserver.values import Target
from fedserver_wire.discovery import SRVDiscovery, make_wire_srv
from tests.unit.helpers import (
    DevPKI,
    assert_no_result,
    build_plugin,
    labelled_failure,
    make_context,
    options_for,
    success_result_of,
)
from tests.unit.test_dns import NXDOMAIN, SERVFAIL, FakeResolver, a_rr, aaaa_rr, answers, srv_rr

SRV_B = "_wire-server-federator._tcp.b.example"
TEST_RANGES = ["192.0.2.0/24", "2001:db8::/32"]


def build(options: Optional[Dict[str, Any]] = None, *, allow: Optional[List[str]] = None,
          reactor: Optional[MemoryReactorClock] = None) -> SRVDiscovery:
    """wire-srv from the table [discovery] C{options}, as startup builds it."""
    context = make_context(
        tables={"outward": {"allow_ip_ranges": TEST_RANGES if allow is None else allow}},
        reactor=reactor or MemoryReactorClock(),
    )
    values = {"plugin": "wire-srv", "nameservers": ["127.0.0.1:5353"], **(options or {})}
    return build_plugin(wire_discovery, "discovery", options_for("discovery", values), context)


@pytest.fixture
def clock() -> MemoryReactorClock:
    return MemoryReactorClock()


@pytest.fixture
def resolver() -> FakeResolver:
    return FakeResolver()


def wired(resolver: FakeResolver, clock: MemoryReactorClock, **options: Any) -> SRVDiscovery:
    allow = options.pop("allow", None)
    discovery = build({"timeout": 2, "min_ttl": 0, "max_ttl": 3600, "negative_ttl": 30, "stale_ttl": 600,
                       **options}, allow=allow, reactor=clock)
    discovery.lookup.resolver = resolver
    return discovery


@pytest.fixture
def discovery(resolver: FakeResolver, clock: MemoryReactorClock) -> SRVDiscovery:
    return wired(resolver, clock)


def serve_b(resolver: FakeResolver) -> None:
    """b.example: fed-b1 (priority 5, two addresses) before fed-b2 (priority 10)."""
    resolver.set(SRV_B, dns.SRV, answers(
        srv_rr(SRV_B, "fed-b2.infra.example", 10, 0, 9443, ttl=300),
        srv_rr(SRV_B, "fed-b1.infra.example", 5, 0, 8443, ttl=300),
    ))
    resolver.set("fed-b1.infra.example", dns.A, answers(a_rr("fed-b1.infra.example", "192.0.2.1", ttl=60)))
    resolver.set("fed-b1.infra.example", dns.AAAA, answers(aaaa_rr("fed-b1.infra.example", "2001:db8::1")))
    resolver.set("fed-b2.infra.example", dns.A, answers(a_rr("fed-b2.infra.example", "192.0.2.2")))


def srv_queries(resolver: FakeResolver) -> int:
    return sum(1 for _, type in resolver.asked if type == dns.SRV)


# the plugin and its options


def test_the_hook_registers_wire_srv() -> None:
    assert wire_discovery.fedserver_discovery_plugins() == {"wire-srv": make_wire_srv}


def test_provides_idiscovery() -> None:
    assert verifyObject(IDiscovery, build())


def test_defaults() -> None:
    discovery = build({"nameservers": []})
    assert discovery.cache.settings == CacheSettings()
    assert discovery.lookup.timeout == 5.0
    assert discovery.lookup.resolver.resolvers[1].resolv == "/etc/resolv.conf"
    assert discovery.service == "_wire-server-federator._tcp"


def test_every_option() -> None:
    discovery = build({"nameservers": ["127.0.0.1:5353", "[::1]:5354"], "timeout": 3, "min_ttl": 1,
                       "max_ttl": 120, "negative_ttl": 5, "stale_ttl": 7200})
    assert discovery.lookup.resolver.servers == [("127.0.0.1", 5353), ("::1", 5354)]
    assert discovery.lookup.resolver.resolv is None
    assert discovery.lookup.timeout == 3.0
    assert discovery.cache.settings == CacheSettings(min_ttl=1, max_ttl=120, negative_ttl=5, stale_ttl=7200)


@pytest.mark.parametrize(
    "options, message",
    [
        ({"nameserver": ["127.0.0.1"]}, r"\[discovery\] nameserver: is not a known option"),
        ({"ttl": 60}, r"\[discovery\] ttl: is not a known option here \(known options: cache_entries, max_ttl, "),
        ({"nameservers": ["ns.example:53"]}, r"\[discovery\] nameservers: 'ns.example:53' is not address:port"),
        ({"nameservers": ["127.0.0.1:99999"]}, r"\[discovery\] nameservers: '127.0.0.1:99999' is not address"),
        ({"nameservers": "127.0.0.1"}, r"\[discovery\] nameservers: must be a list of strings"),
        ({"nameservers": [53]}, r"\[discovery\] nameservers: item 0 must be a non-empty string"),
        ({"timeout": 0}, r"\[discovery\] timeout: must be at least 0.1"),
        ({"timeout": 61}, r"\[discovery\] timeout: must be at most 60"),
        ({"timeout": "5"}, r"\[discovery\] timeout: must be a number, not a string"),
        ({"min_ttl": -1}, r"\[discovery\] min_ttl: must be at least 0"),
        ({"negative_ttl": True}, r"\[discovery\] negative_ttl: must be a number, not true or false"),
        ({"stale_ttl": 31 * 86400}, r"\[discovery\] stale_ttl: must be at most"),
        ({"min_ttl": 600, "max_ttl": 300}, r"\[discovery\] min_ttl: must not exceed max_ttl \(300.0\)"),
    ],
)
def test_bad_options_name_the_key(options: Dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        build(options)


# answers


def test_targets_per_address_in_rfc_2782_order(discovery: SRVDiscovery, resolver: FakeResolver) -> None:
    serve_b(resolver)
    targets = success_result_of(discovery.discover("b.example"))
    assert targets == [
        Target("fed-b1.infra.example", "192.0.2.1", 8443, ttl=60, priority=5, weight=0),
        Target("fed-b1.infra.example", "2001:db8::1", 8443, ttl=60, priority=5, weight=0),
        Target("fed-b2.infra.example", "192.0.2.2", 9443, ttl=300, priority=10, weight=0),
    ]
    assert resolver.asked[0] == (SRV_B, dns.SRV)


def test_infra_domain_is_the_srv_target_never_the_backend_domain(
    discovery: SRVDiscovery, resolver: FakeResolver
) -> None:
    serve_b(resolver)
    targets = success_result_of(discovery.discover("b.example"))
    assert {t.infra_domain for t in targets} == {"fed-b1.infra.example", "fed-b2.infra.example"}
    assert all(t.host != "b.example" for t in targets)


def test_weights_order_targets_of_one_priority_randomly(discovery: SRVDiscovery, resolver: FakeResolver) -> None:
    resolver.set(SRV_B, dns.SRV, answers(
        srv_rr(SRV_B, "one.infra.example", 1, 50, 443), srv_rr(SRV_B, "two.infra.example", 1, 50, 443),
    ))
    resolver.set("one.infra.example", dns.A, answers(a_rr("one.infra.example", "192.0.2.1")))
    resolver.set("two.infra.example", dns.A, answers(a_rr("two.infra.example", "192.0.2.2")))
    firsts = {success_result_of(discovery.discover("b.example"))[0].infra_domain for _ in range(200)}
    assert firsts == {"one.infra.example", "two.infra.example"}
    # one lookup served all 200
    assert srv_queries(resolver) == 1


def test_names_are_case_insensitive(discovery: SRVDiscovery, resolver: FakeResolver) -> None:
    serve_b(resolver)
    assert len(success_result_of(discovery.discover("B.Example"))) == 3
    assert len(success_result_of(discovery.discover("b.example"))) == 3
    assert srv_queries(resolver) == 1


def test_a_target_without_addresses_is_skipped(discovery: SRVDiscovery, resolver: FakeResolver) -> None:
    serve_b(resolver)
    resolver.set("fed-b1.infra.example", dns.A, NXDOMAIN())
    resolver.set("fed-b1.infra.example", dns.AAAA, SERVFAIL())
    targets = success_result_of(discovery.discover("b.example"))
    assert [(t.infra_domain, t.host) for t in targets] == [("fed-b2.infra.example", "192.0.2.2")]


def test_the_answer_is_cached_for_the_smallest_ttl(
    discovery: SRVDiscovery, resolver: FakeResolver, clock: MemoryReactorClock
) -> None:
    serve_b(resolver)
    success_result_of(discovery.discover("b.example"))
    clock.advance(59)
    success_result_of(discovery.discover("b.example"))
    assert srv_queries(resolver) == 1
    clock.advance(1)  # fed-b1's A record had a TTL of 60
    success_result_of(discovery.discover("b.example"))
    assert srv_queries(resolver) == 2


def test_concurrent_discoveries_are_one_lookup(discovery: SRVDiscovery, resolver: FakeResolver) -> None:
    serve_b(resolver)
    pending: Deferred = Deferred()
    resolver.set(SRV_B, dns.SRV, pending)
    first, second = discovery.discover("b.example"), discovery.discover("b.example")
    assert_no_result(first)
    pending.callback(answers(srv_rr(SRV_B, "fed-b2.infra.example", 0, 0, 9443)))
    assert success_result_of(first) == success_result_of(second)
    assert srv_queries(resolver) == 1


# invalid-domain and discovery-failure


def test_a_dot_target_is_invalid_domain(discovery: SRVDiscovery, resolver: FakeResolver) -> None:
    resolver.set(SRV_B, dns.SRV, answers(srv_rr(SRV_B, b".", 0, 0, 0)))
    error = labelled_failure(discovery.discover("b.example"), "invalid-domain")
    assert error.code == 422
    assert error.message == f"b.example says it does not federate (the SRV target of {SRV_B} is '.')"
    assert error.data == {"type": "federation", "domain": "b.example"}


def test_a_dot_among_real_targets_is_ignored(discovery: SRVDiscovery, resolver: FakeResolver) -> None:
    serve_b(resolver)
    resolver.set(SRV_B, dns.SRV, answers(srv_rr(SRV_B, b".", 0), srv_rr(SRV_B, "fed-b2.infra.example", 10)))
    targets = success_result_of(discovery.discover("b.example"))
    assert [t.infra_domain for t in targets] == ["fed-b2.infra.example"]


@pytest.mark.parametrize("answer", [lambda: answers(), NXDOMAIN], ids=["no-record", "nxdomain"])
def test_no_record_is_invalid_domain(discovery: SRVDiscovery, resolver: FakeResolver, answer: Any) -> None:
    resolver.set(SRV_B, dns.SRV, answer())
    error = labelled_failure(discovery.discover("b.example"), "invalid-domain")
    assert error.code == 422
    assert error.message.startswith("b.example does not federate: ")
    assert SRV_B in error.message
    assert error.data == {"type": "federation", "domain": "b.example"}


def test_invalid_domain_is_cached_for_negative_ttl(
    discovery: SRVDiscovery, resolver: FakeResolver, clock: MemoryReactorClock
) -> None:
    resolver.set(SRV_B, dns.SRV, NXDOMAIN())
    labelled_failure(discovery.discover("b.example"), "invalid-domain")
    clock.advance(29)
    labelled_failure(discovery.discover("b.example"), "invalid-domain")
    assert srv_queries(resolver) == 1
    clock.advance(1)
    serve_b(resolver)
    assert len(success_result_of(discovery.discover("b.example"))) == 3


def test_servfail_with_nothing_cached_is_discovery_failure(discovery: SRVDiscovery, resolver: FakeResolver) -> None:
    resolver.set(SRV_B, dns.SRV, SERVFAIL())
    error = labelled_failure(discovery.discover("b.example"), "discovery-failure")
    assert error.code == 400
    assert error.message == f"cannot discover b.example: the DNS server failed to answer for {SRV_B} (SERVFAIL)"
    assert error.data == {"type": "federation", "domain": "b.example"}
    # not cached: the next call asks again
    labelled_failure(discovery.discover("b.example"), "discovery-failure")
    assert srv_queries(resolver) == 2


def test_a_timeout_with_nothing_cached_is_discovery_failure(
    discovery: SRVDiscovery, resolver: FakeResolver, clock: MemoryReactorClock
) -> None:
    resolver.set(SRV_B, dns.SRV, Deferred())
    d = discovery.discover("b.example")
    clock.advance(1.9)
    assert_no_result(d)
    clock.advance(0.1)
    error = labelled_failure(d, "discovery-failure")
    assert error.message == f"cannot discover b.example: the DNS lookup of {SRV_B} timed out"


def test_a_known_peer_is_served_stale_while_dns_fails(
    discovery: SRVDiscovery, resolver: FakeResolver, clock: MemoryReactorClock
) -> None:
    serve_b(resolver)
    before = success_result_of(discovery.discover("b.example"))
    clock.advance(300)
    resolver.set(SRV_B, dns.SRV, SERVFAIL())
    assert sorted(success_result_of(discovery.discover("b.example")), key=lambda t: t.host) == sorted(
        before, key=lambda t: t.host)
    clock.advance(600)  # 60 s of TTL, then 600 s of stale_ttl are over
    labelled_failure(discovery.discover("b.example"), "discovery-failure")


def test_a_known_peer_is_served_stale_while_address_lookups_time_out(
    discovery: SRVDiscovery, resolver: FakeResolver, clock: MemoryReactorClock
) -> None:
    serve_b(resolver)
    success_result_of(discovery.discover("b.example"))
    clock.advance(300)
    for host in ("fed-b1.infra.example", "fed-b2.infra.example"):
        resolver.set(host, dns.A, Deferred())
        resolver.set(host, dns.AAAA, Deferred())
    d = discovery.discover("b.example")
    clock.advance(2)
    assert len(success_result_of(d)) == 3


# the address policy


def test_refused_addresses_never_become_targets(resolver: FakeResolver, clock: MemoryReactorClock) -> None:
    discovery = wired(resolver, clock, allow=["127.0.0.0/8"])
    resolver.set(SRV_B, dns.SRV, answers(srv_rr(SRV_B, "fed-b.infra.example", 0, 0, 8443)))
    resolver.set("fed-b.infra.example", dns.A, answers(
        a_rr("fed-b.infra.example", "10.0.0.1"), a_rr("fed-b.infra.example", "127.0.0.1"),
        a_rr("fed-b.infra.example", "169.254.169.254"), a_rr("fed-b.infra.example", "8.8.8.8"),
    ))
    resolver.set("fed-b.infra.example", dns.AAAA, answers(
        aaaa_rr("fed-b.infra.example", "::ffff:10.0.0.1"), aaaa_rr("fed-b.infra.example", "fe80::1"),
    ))
    targets = success_result_of(discovery.discover("b.example"))
    assert [t.host for t in targets] == ["127.0.0.1", "8.8.8.8"]


def test_nothing_allowed_is_discovery_failure_naming_the_address(
    resolver: FakeResolver, clock: MemoryReactorClock
) -> None:
    discovery = wired(resolver, clock, allow=[])
    resolver.set(SRV_B, dns.SRV, answers(srv_rr(SRV_B, "fed-b.infra.example", 0, 0, 8443)))
    resolver.set("fed-b.infra.example", dns.A, answers(a_rr("fed-b.infra.example", "10.0.0.1")))
    resolver.set("fed-b.infra.example", dns.AAAA, answers(aaaa_rr("fed-b.infra.example", "::ffff:127.0.0.1")))
    error = labelled_failure(discovery.discover("b.example"), "discovery-failure")
    assert error.code == 400
    assert error.message == (
        "no usable federation target for b.example: 10.0.0.1 is not a public address; list its range in "
        "[outward] allow_ip_ranges to federate with it; ::ffff:127.0.0.1 is not a public address; list its "
        "range in [outward] allow_ip_ranges to federate with it"
    )
    assert error.data == {"type": "federation", "domain": "b.example"}


def test_the_policy_is_applied_to_every_target(resolver: FakeResolver, clock: MemoryReactorClock) -> None:
    discovery = wired(resolver, clock, allow=["192.0.2.2/32"])
    serve_b(resolver)
    targets = success_result_of(discovery.discover("b.example"))
    assert [(t.infra_domain, t.host) for t in targets] == [("fed-b2.infra.example", "192.0.2.2")]


def test_explain_shows_every_record_and_verdict(resolver: FakeResolver, clock: MemoryReactorClock) -> None:
    discovery = wired(resolver, clock, allow=["192.0.2.0/24"])
    serve_b(resolver)
    resolver.set("fed-b2.infra.example", dns.A, answers(a_rr("fed-b2.infra.example", "10.0.0.2")))
    success_result_of(discovery.discover("b.example"))
    answer = success_result_of(discovery.explain("B.example"))
    # explain always asks DNS
    assert srv_queries(resolver) == 2
    assert answer.name == SRV_B
    by_target = {r.record.target: r for r in answer.records}
    assert by_target["fed-b1.infra.example"].allowed == ("192.0.2.1",)
    assert by_target["fed-b1.infra.example"].refused == ("2001:db8::1",)
    assert by_target["fed-b1.infra.example"].problem == ""
    assert by_target["fed-b2.infra.example"].allowed == ()
    assert by_target["fed-b2.infra.example"].refused == ("10.0.0.2",)
    assert "10.0.0.2 is not a public address" in by_target["fed-b2.infra.example"].problem
    assert [t.host for t in SRVDiscovery.targets(answer)] == ["192.0.2.1"]


# through build_service and the installed entry points


def write_config(tmp_path: Any, dev_pki: DevPKI, outward: str) -> str:
    cert, key = dev_pki.issue_files("fed-a.infra.example")
    path = tmp_path / "a.toml"
    path.write_text(textwrap.dedent(f"""
        [server]
        backend_domain = "a.example"
        infra_domain = "fed-a.infra.example"
        [inward]
        listen = "tcp:0"
        [outward]
        {outward}
        [tls]
        certificate = "{cert}"
        private_key = "{key}"
        ca_certificates = ["{dev_pki.ca_path}"]
        [discovery]
        plugin = "wire-srv"
        nameservers = ["127.0.0.1:5353"]
        timeout = 2
        [authenticator]
        plugin = "mtls"
        [[authorizers]]
        plugin = "allow-list"
        allow_all = true
    """))
    return str(path)


def test_build_service_with_wire_srv(tmp_path: Any, dev_pki: DevPKI) -> None:
    path = write_config(tmp_path, dev_pki, 'allow_ip_ranges = ["127.0.0.0/8"]')
    top = build_service(path, reactor=MemoryReactorClock(), plugin_manager=make_plugin_manager(), migrate=False)
    discovery = top.context.discovery
    assert isinstance(discovery, SRVDiscovery)
    assert top.pipeline.discovery is discovery
    assert discovery.lookup.resolver.servers == [("127.0.0.1", 5353)]
    assert discovery.policy is top.context.address_policy
    assert discovery.policy.allows("127.0.0.1")


def test_build_service_refuses_a_bad_allowed_range(tmp_path: Any, dev_pki: DevPKI) -> None:
    path = write_config(tmp_path, dev_pki, 'allow_ip_ranges = ["127.0.0.0/8", "10.0.0.0/33"]')
    with pytest.raises(ConfigError) as caught:
        build_service(path, reactor=MemoryReactorClock(), plugin_manager=make_plugin_manager(), migrate=False)
    assert caught.value.file == path
    assert caught.value.path == "[outward] allow_ip_ranges"
    assert "'10.0.0.0/33' is not an IP network in CIDR form" in str(caught.value)
