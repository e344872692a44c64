"""
Tests for L{fedserver.dns}: RFC 2782 ordering, the C{nameservers} syntax,
and L{DNSLookup} against a fake twisted.names resolver (real records, real
errors) and against Twisted's own resolver over an in-memory UDP reactor.
"""

from __future__ import annotations

import collections
import random
from typing import Any, Dict, List, Tuple

import pytest
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.testing import MemoryReactorClock
from twisted.names import dns
from twisted.names import error as dns_error

from fedserver.dns import DNSLookup, LookupFailed, NoRecords, SRVRecord, order_srv, parse_nameservers
from tests.unit.helpers import assert_no_result, failure_result_of, success_result_of

# order_srv


def srv(target: str, priority: int = 0, weight: int = 0, port: int = 443, ttl: int = 300) -> SRVRecord:
    return SRVRecord(priority, weight, port, target, ttl)


def test_lowest_priority_first_whatever_the_weights() -> None:
    records = [srv("c", 30, 100), srv("a", 10, 0), srv("b", 20, 50)]
    for seed in range(20):
        assert [r.target for r in order_srv(records, random.Random(seed))] == ["a", "b", "c"]


def test_every_record_once() -> None:
    records = [srv(name, priority, weight) for name, priority, weight in
               [("a", 1, 0), ("b", 1, 10), ("c", 1, 5), ("d", 2, 0), ("e", 2, 0), ("f", 0, 1)]]
    for seed in range(50):
        ordered = order_srv(records, random.Random(seed))
        assert sorted(ordered, key=lambda r: r.target) == records
        assert [r.priority for r in ordered] == sorted(r.priority for r in records)


def test_nothing_in_nothing_out() -> None:
    assert order_srv([], random.Random(1)) == []


def first_choices(records: List[SRVRecord], draws: int = 20000, seed: int = 2782) -> Dict[str, float]:
    rng = random.Random(seed)
    counts = collections.Counter(order_srv(records, rng)[0].target for _ in range(draws))
    return {target: counts[target] / draws for target in {r.target for r in records}}


@pytest.mark.parametrize("reverse", [False, True])
def test_weights_give_the_odds_of_coming_first(reverse: bool) -> None:
    records = [srv("light", weight=1), srv("heavy", weight=3)]
    if reverse:
        records.reverse()
    shares = first_choices(records)
    # proportional to the weights, whatever order the records came in
    assert shares["heavy"] == pytest.approx(0.75, abs=0.015)
    assert shares["light"] == pytest.approx(0.25, abs=0.015)


def test_three_weights_within_one_priority() -> None:
    shares = first_choices([srv("a", weight=10), srv("b", weight=30), srv("c", weight=60), srv("z", 1, 99)])
    assert shares["a"] == pytest.approx(0.1, abs=0.015)
    assert shares["b"] == pytest.approx(0.3, abs=0.015)
    assert shares["c"] == pytest.approx(0.6, abs=0.015)
    assert shares["z"] == 0


def test_weight_zero_is_chosen_rarely_but_chosen() -> None:
    shares = first_choices([srv("heavy", weight=10), srv("zero", weight=0)])
    # RFC 2782: a weight 0 record has a very small chance of being selected
    assert 0 < shares["zero"] < 0.15
    assert shares["zero"] == pytest.approx(1 / 11, abs=0.015)


def test_only_weight_zero_records_are_all_returned() -> None:
    records = [srv("a"), srv("b"), srv("c")]
    assert sorted(r.target for r in order_srv(records, random.Random(3))) == ["a", "b", "c"]


def test_a_seeded_random_repeats_the_order() -> None:
    records = [srv(str(i), weight=i) for i in range(10)]
    assert order_srv(records, random.Random(42)) == order_srv(records, random.Random(42))


def test_without_a_random_source_the_system_one_is_used() -> None:
    records = [srv("a", 1), srv("b", 0, 5), srv("c", 0, 5)]
    ordered = order_srv(records)
    assert ordered[-1].target == "a"
    assert {r.target for r in ordered[:2]} == {"b", "c"}


# parse_nameservers


@pytest.mark.parametrize(
    "value, expected",
    [
        ("127.0.0.1:5353", ("127.0.0.1", 5353)),
        ("192.0.2.53", ("192.0.2.53", 53)),
        ("[::1]:5353", ("::1", 5353)),
        ("[2001:db8::53]", ("2001:db8::53", 53)),
        ("::1", ("::1", 53)),
        ("2001:db8::53", ("2001:db8::53", 53)),
        ("127.0.0.1:65535", ("127.0.0.1", 65535)),
    ],
)
def test_nameserver_syntax(value: str, expected: Tuple[str, int]) -> None:
    assert parse_nameservers([value]) == [expected]


def test_several_nameservers_keep_their_order() -> None:
    assert parse_nameservers(["127.0.0.2", "[::1]:54"]) == [("127.0.0.2", 53), ("::1", 54)]


@pytest.mark.parametrize(
    "value",
    [
        "",
        ":53",
        "127.0.0.1:",
        "127.0.0.1:0",
        "127.0.0.1:65536",
        "127.0.0.1:dns",
        "127.0.0.1:-1",
        "[::1]:",
        "[::1]x",
        "[::1]53",
        "[]:53",
        "ns.example:53",
        "ns.example",
        "999.1.1.1",
    ],
)
def test_bad_nameservers(value: str) -> None:
    with pytest.raises(ValueError, match="is not address:port"):
        parse_nameservers([value])


# DNSLookup against a fake resolver


class FakeResolver:
    """
    Answers like L{twisted.names.client.Resolver}: a three-tuple of lists of
    L{dns.RRHeader}, or a failure with one of twisted.names' errors.  An
    answer that is a L{Deferred} is handed out as is (to test timeouts).
    """

    def __init__(self) -> None:
        self.answers: Dict[Tuple[str, int], Any] = {}
        self.asked: List[Tuple[str, int]] = []

    def set(self, name: str, type: int, answer: Any) -> None:
        self.answers[(name, type)] = answer

    def _answer(self, name: str, type: int) -> Deferred:
        self.asked.append((name, type))
        answer = self.answers.get((name, type), ([], [], []))
        if isinstance(answer, Deferred):
            return answer
        if isinstance(answer, BaseException):
            return defer.fail(answer)
        return defer.succeed(answer)

    def lookupService(self, name: str, timeout: Any = None) -> Deferred:
        return self._answer(name, dns.SRV)

    def lookupAddress(self, name: str, timeout: Any = None) -> Deferred:
        return self._answer(name, dns.A)

    def lookupIPV6Address(self, name: str, timeout: Any = None) -> Deferred:
        return self._answer(name, dns.AAAA)


def answers(*records: dns.RRHeader) -> Tuple[List[dns.RRHeader], list, list]:
    return (list(records), [], [])


def srv_rr(name: str, target: Any, priority: int = 0, weight: int = 0, port: int = 443,
           ttl: int = 300) -> dns.RRHeader:
    return dns.RRHeader(name, dns.SRV, dns.IN, ttl, dns.Record_SRV(priority, weight, port, target, ttl))


def a_rr(name: str, address: str, ttl: int = 300) -> dns.RRHeader:
    return dns.RRHeader(name, dns.A, dns.IN, ttl, dns.Record_A(address, ttl))


def aaaa_rr(name: str, address: str, ttl: int = 300) -> dns.RRHeader:
    return dns.RRHeader(name, dns.AAAA, dns.IN, ttl, dns.Record_AAAA(address, ttl))


def rcode_error(kind: type, rcode: int) -> Exception:
    """One of twisted.names' errors, as the client resolver makes them from an answer."""
    return kind(dns.Message(rCode=rcode, answer=1))


NXDOMAIN = lambda: rcode_error(dns_error.DNSNameError, dns.ENAME)  # noqa: E731
SERVFAIL = lambda: rcode_error(dns_error.DNSServerError, dns.ESERVER)  # noqa: E731
REFUSED = lambda: rcode_error(dns_error.DNSQueryRefusedError, dns.EREFUSED)  # noqa: E731

NAME = "_wire-server-federator._tcp.b.example"


@pytest.fixture
def clock() -> MemoryReactorClock:
    return MemoryReactorClock()


@pytest.fixture
def resolver() -> FakeResolver:
    return FakeResolver()


@pytest.fixture
def lookup(clock: MemoryReactorClock, resolver: FakeResolver) -> DNSLookup:
    return DNSLookup(clock, timeout=3.0, resolver=resolver)


def test_srv_records(lookup: DNSLookup, resolver: FakeResolver) -> None:
    resolver.set(NAME, dns.SRV, answers(
        srv_rr(NAME, "fed1.infra.example.", 10, 60, 8443, ttl=120),
        dns.RRHeader(NAME, dns.CNAME, dns.IN, 30, dns.Record_CNAME("elsewhere.example")),
        srv_rr(NAME, "fed2.infra.example", 20, 0, 443, ttl=600),
    ))
    assert success_result_of(lookup.srv(NAME)) == [
        SRVRecord(10, 60, 8443, "fed1.infra.example", 120),
        SRVRecord(20, 0, 443, "fed2.infra.example", 600),
    ]


def test_a_dot_target_is_kept_as_a_dot(lookup: DNSLookup, resolver: FakeResolver) -> None:
    resolver.set(NAME, dns.SRV, answers(srv_rr(NAME, b".")))  # type: ignore[arg-type]
    assert [r.target for r in success_result_of(lookup.srv(NAME))] == ["."]


def test_no_srv_record_is_no_records(lookup: DNSLookup, resolver: FakeResolver) -> None:
    resolver.set(NAME, dns.SRV, answers(a_rr(NAME, "192.0.2.1")))
    failure = failure_result_of(lookup.srv(NAME), NoRecords)
    assert str(failure.value) == f"{NAME} has no SRV record"


def test_nxdomain_is_no_records(lookup: DNSLookup, resolver: FakeResolver) -> None:
    resolver.set(NAME, dns.SRV, NXDOMAIN())
    failure = failure_result_of(lookup.srv(NAME), NoRecords)
    assert str(failure.value) == f"{NAME} does not exist (NXDOMAIN)"


@pytest.mark.parametrize(
    "error, text",
    [
        (SERVFAIL, "the DNS server failed to answer for {} (SERVFAIL)"),
        (REFUSED, "the DNS server refused to answer for {}"),
        (lambda: dns_error.DNSQueryTimeoutError(17), "the DNS lookup of {} timed out"),
        (lambda: defer.TimeoutError("all servers"), "the DNS lookup of {} timed out"),
        (lambda: rcode_error(dns_error.DNSFormatError, dns.EFORMAT), "the DNS lookup of {} failed: "),
        (lambda: OSError("No domain name servers available"), "the DNS lookup of {} failed: No domain name"),
    ],
)
def test_failed_lookups(lookup: DNSLookup, resolver: FakeResolver, error: Any, text: str) -> None:
    resolver.set(NAME, dns.SRV, error())
    failure = failure_result_of(lookup.srv(NAME), LookupFailed)
    assert str(failure.value).startswith(text.format(NAME))


def test_a_lookup_that_never_ends_times_out_on_the_clock(
    lookup: DNSLookup, resolver: FakeResolver, clock: MemoryReactorClock
) -> None:
    cancelled: List[Deferred] = []
    resolver.set(NAME, dns.SRV, Deferred(cancelled.append))
    d = lookup.srv(NAME)
    clock.advance(2.9)
    assert_no_result(d)
    clock.advance(0.1)
    failure = failure_result_of(d, LookupFailed)
    assert str(failure.value) == f"the DNS lookup of {NAME} timed out"
    # the resolver's query was given up, not left running
    assert len(cancelled) == 1
    assert not clock.getDelayedCalls()


def test_a_quick_answer_leaves_no_timer(
    lookup: DNSLookup, resolver: FakeResolver, clock: MemoryReactorClock
) -> None:
    pending: Deferred = Deferred()
    resolver.set(NAME, dns.SRV, pending)
    d = lookup.srv(NAME)
    pending.callback(answers(srv_rr(NAME, "fed.example")))
    assert len(success_result_of(d)) == 1
    assert not clock.getDelayedCalls()


HOST = "fed.infra.example"


def test_addresses_of_both_families(lookup: DNSLookup, resolver: FakeResolver) -> None:
    resolver.set(HOST, dns.A, answers(a_rr(HOST, "192.0.2.1", 60), a_rr(HOST, "192.0.2.2", 70)))
    resolver.set(HOST, dns.AAAA, answers(aaaa_rr(HOST, "2001:db8::1", 80)))
    assert success_result_of(lookup.addresses(HOST)) == [
        ("192.0.2.1", 60), ("192.0.2.2", 70), ("2001:db8::1", 80)
    ]
    assert sorted(resolver.asked) == [(HOST, dns.A), (HOST, dns.AAAA)]


def test_records_of_another_type_are_ignored(lookup: DNSLookup, resolver: FakeResolver) -> None:
    resolver.set(HOST, dns.A, answers(
        dns.RRHeader(HOST, dns.CNAME, dns.IN, 60, dns.Record_CNAME("real.example")),
        a_rr("real.example", "192.0.2.9"),
    ))
    assert success_result_of(lookup.addresses(HOST)) == [("192.0.2.9", 300)]


@pytest.mark.parametrize("broken", [dns.A, dns.AAAA])
@pytest.mark.parametrize("error", [SERVFAIL, NXDOMAIN, REFUSED])
def test_one_family_failing_does_not_matter(
    lookup: DNSLookup, resolver: FakeResolver, broken: int, error: Any
) -> None:
    resolver.set(HOST, dns.A, answers(a_rr(HOST, "192.0.2.1")))
    resolver.set(HOST, dns.AAAA, answers(aaaa_rr(HOST, "2001:db8::1")))
    resolver.set(HOST, broken, error())
    expected = ["2001:db8::1"] if broken == dns.A else ["192.0.2.1"]
    assert [a for a, _ in success_result_of(lookup.addresses(HOST))] == expected


def test_one_family_timing_out_does_not_matter(
    lookup: DNSLookup, resolver: FakeResolver, clock: MemoryReactorClock
) -> None:
    resolver.set(HOST, dns.A, answers(a_rr(HOST, "192.0.2.1")))
    resolver.set(HOST, dns.AAAA, Deferred())
    d = lookup.addresses(HOST)
    assert_no_result(d)
    clock.advance(3)
    assert success_result_of(d) == [("192.0.2.1", 300)]


def test_no_address_at_all_is_no_records(lookup: DNSLookup, resolver: FakeResolver) -> None:
    resolver.set(HOST, dns.A, NXDOMAIN())
    failure = failure_result_of(lookup.addresses(HOST), NoRecords)
    assert str(failure.value) == f"{HOST} has no A or AAAA record"


def test_no_address_and_a_failure_is_a_failure(lookup: DNSLookup, resolver: FakeResolver) -> None:
    # one family is unknown: we cannot say the host has no address
    resolver.set(HOST, dns.A, NXDOMAIN())
    resolver.set(HOST, dns.AAAA, SERVFAIL())
    failure = failure_result_of(lookup.addresses(HOST), LookupFailed)
    assert "SERVFAIL" in str(failure.value)


def test_both_families_timing_out(
    lookup: DNSLookup, resolver: FakeResolver, clock: MemoryReactorClock
) -> None:
    resolver.set(HOST, dns.A, Deferred())
    resolver.set(HOST, dns.AAAA, Deferred())
    d = lookup.addresses(HOST)
    clock.advance(3)
    assert "timed out" in str(failure_result_of(d, LookupFailed).value)


# DNSLookup with Twisted's own resolver, over in-memory UDP


class MemoryUDP:
    """A UDP port of L{UDPReactor}: records what is sent, and from whom."""

    def __init__(self, reactor: UDPReactor, protocol: Any) -> None:
        self.reactor = reactor
        self.protocol = protocol
        self.listening = True

    def write(self, data: bytes, address: Tuple[str, int]) -> None:
        self.reactor.sent.append((self.protocol, data, address))

    def stopListening(self) -> None:
        self.listening = False
        self.protocol.doStop()


class UDPReactor(MemoryReactorClock):
    """A memory reactor that also hands out in-memory UDP ports."""

    def __init__(self) -> None:
        super().__init__()
        self.sent: List[Tuple[Any, bytes, Tuple[str, int]]] = []
        self.ports: List[MemoryUDP] = []

    def listenUDP(self, port: int, protocol: Any, interface: str = "", maxPacketSize: int = 8192) -> MemoryUDP:
        transport = MemoryUDP(self, protocol)
        self.ports.append(transport)
        protocol.makeConnection(transport)
        return transport

    def answer(self, index: int, *records: dns.RRHeader, rcode: int = dns.OK) -> None:
        """Answer the C{index}th query sent, from the server it was sent to."""
        protocol, data, address = self.sent[index]
        query = dns.Message()
        query.fromStr(data)
        response = dns.Message(id=query.id, answer=1, rCode=rcode)
        response.queries = query.queries
        response.answers = list(records)
        protocol.datagramReceived(response.toStr(), address)


SERVERS = [("127.0.0.1", 5353), ("::1", 5354)]


def test_pinned_servers_only() -> None:
    lookup = DNSLookup(UDPReactor(), SERVERS, timeout=4)
    assert lookup.resolver.servers == SERVERS
    assert lookup.resolver.resolv is None
    assert list(lookup.resolver.dynServers) == []
    # the lookup's timeout is shared among the servers
    assert lookup.resolver.timeout == (2.0,)


def test_system_servers_when_none_is_pinned() -> None:
    reactor = UDPReactor()
    lookup = DNSLookup(reactor, timeout=4)
    # as the system resolves: the hosts file, then the resolv.conf servers
    hosts_file, servers = lookup.resolver.resolvers
    assert hosts_file.file == b"/etc/hosts" or hosts_file.file == "/etc/hosts"
    assert servers.resolv == "/etc/resolv.conf"
    count = len(servers.dynServers)
    assert count >= 1
    assert servers.timeout == (4 / count,)
    servers._parseCall.cancel()


def test_real_resolver_answer() -> None:
    reactor = UDPReactor()
    lookup = DNSLookup(reactor, SERVERS[:1], timeout=2)
    d = lookup.srv(NAME)
    [(_, data, address)] = reactor.sent
    assert address == ("127.0.0.1", 5353)
    query = dns.Message()
    query.fromStr(data)
    assert [(q.name.name, q.type) for q in query.queries] == [(NAME.encode(), dns.SRV)]
    reactor.answer(0, srv_rr(NAME, "fed.infra.example", 5, 10, 8443, ttl=42))
    assert success_result_of(d) == [SRVRecord(5, 10, 8443, "fed.infra.example", 42)]
    assert not reactor.getDelayedCalls()
    assert all(not port.listening for port in reactor.ports)


@pytest.mark.parametrize(
    "rcode, kind",
    [(dns.ENAME, NoRecords), (dns.ESERVER, LookupFailed), (dns.EREFUSED, LookupFailed)],
)
def test_real_resolver_error_codes(rcode: int, kind: type) -> None:
    reactor = UDPReactor()
    lookup = DNSLookup(reactor, SERVERS[:1], timeout=2)
    d = lookup.srv(NAME)
    reactor.answer(0, rcode=rcode)
    failure_result_of(d, kind)


def test_real_resolver_fails_over_to_the_next_server_in_time() -> None:
    reactor = UDPReactor()
    lookup = DNSLookup(reactor, SERVERS, timeout=4)
    d = lookup.srv(NAME)
    assert [address for _, _, address in reactor.sent] == [SERVERS[0]]
    reactor.advance(2)
    # the first server said nothing in its share of the timeout: the second is asked
    assert [address for _, _, address in reactor.sent] == SERVERS
    reactor.answer(1, srv_rr(NAME, "fed.infra.example"))
    assert [r.target for r in success_result_of(d)] == ["fed.infra.example"]


def test_real_resolver_times_out_when_no_server_answers() -> None:
    reactor = UDPReactor()
    lookup = DNSLookup(reactor, SERVERS, timeout=4)
    d = lookup.srv(NAME)
    reactor.advance(3.9)
    assert_no_result(d)
    reactor.advance(0.1)
    assert "timed out" in str(failure_result_of(d, LookupFailed).value)
    assert len(reactor.sent) == 2
    assert all(not port.listening for port in reactor.ports)
    # whatever the resolver still has scheduled fires harmlessly
    reactor.advance(60)


def test_real_resolver_dot_target() -> None:
    # the root name travels as an empty name and comes back as "."
    reactor = UDPReactor()
    lookup = DNSLookup(reactor, SERVERS[:1], timeout=2)
    d = lookup.srv(NAME)
    reactor.answer(0, srv_rr(NAME, b"."))
    assert [r.target for r in success_result_of(d)] == ["."]


def test_an_answer_from_the_wrong_address_is_ignored() -> None:
    reactor = UDPReactor()
    lookup = DNSLookup(reactor, SERVERS[:1], timeout=2)
    d = lookup.srv(NAME)
    protocol, data, _ = reactor.sent[0]
    query = dns.Message()
    query.fromStr(data)
    forged = dns.Message(id=query.id, answer=1)
    forged.queries = query.queries
    forged.answers = [srv_rr(NAME, "attacker.example")]
    protocol.datagramReceived(forged.toStr(), ("192.0.2.66", 5353))
    assert_no_result(d)
    reactor.advance(2)
    failure_result_of(d, LookupFailed)
