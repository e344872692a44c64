"""
DNS for discovery: SRV and address lookups on L{twisted.names}, and the
RFC 2782 ordering of SRV records.

The resolver is pinned: with C{nameservers} it asks exactly those servers,
otherwise, like the system, C{/etc/hosts} and then the servers of
C{/etc/resolv.conf}; it never falls back elsewhere.  Every
lookup is bounded by a timeout.  Failures are sorted into what the caller
must tell apart:

 - L{NoRecords}: the name exists with no such record, or does not exist
   (NXDOMAIN): the domain does not federate;
 - L{LookupFailed}: the lookup itself failed (timeout, SERVFAIL, refused):
   the answer is unknown, and a cached answer may still serve.

L{dns_lookup} builds a L{DNSLookup} from a discovery plugin's options.
"""

from __future__ import annotations

import ipaddress
import random
import re
import socket
from typing import Any, List, Optional, Sequence, Tuple

import attrs
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.names import client, dns, hosts, resolve
from twisted.names import error as dns_error
from twisted.python.failure import Failure

from fedserver.config import Options

#: the hosts file consulted when no nameservers are pinned
HOSTS_FILE = "/etc/hosts"


class NoRecords(Exception):
    """The name has no record of the asked type (or does not exist)."""


class LookupFailed(Exception):
    """The DNS lookup failed; nothing is known about the name."""


@attrs.frozen
class SRVRecord:
    priority: int
    weight: int
    port: int
    target: str
    ttl: int


def order_srv(records: Sequence[SRVRecord], rng: Optional[random.Random] = None) -> List[SRVRecord]:
    """
    The order to try C{records} in, per RFC 2782: lowest priority first;
    within one priority, a weighted random order (weight 0 records are
    chosen rarely, but still chosen).
    """
    rng = rng or random.SystemRandom()
    ordered: List[SRVRecord] = []
    for priority in sorted({r.priority for r in records}):
        # weight 0 first, as the RFC says, so that they come last only by chance
        pending = sorted((r for r in records if r.priority == priority), key=lambda r: r.weight != 0)
        while pending:
            total = sum(r.weight for r in pending)
            # the RFC's draw from 0 gives a weight 0 record its small chance;
            # without one, 0 would be an extra ticket for whichever record
            # happens to come first, so the draw starts at 1
            pick = rng.randint(0 if pending[0].weight == 0 else 1, total)
            running = 0
            for index, record in enumerate(pending):
                running += record.weight
                if running >= pick:
                    ordered.append(pending.pop(index))
                    break
    return ordered


def parse_nameservers(values: Sequence[str]) -> List[Tuple[str, int]]:
    """
    C{"address:port"} or C{"address"} (port 53) strings; IPv6 as
    C{"[::1]:53"}.  The address is an IP literal: Twisted's resolver sends
    its queries to addresses only, and a name would need DNS to find DNS.
    """
    servers = []
    for value in values:
        host, port = value, "53"
        if value.startswith("["):
            host, _, rest = value[1:].partition("]")
            if rest and not rest.startswith(":"):
                raise ValueError(f"{value!r} is not address:port")
            port = rest[1:] if rest else "53"
        elif value.count(":") == 1:
            host, port = value.split(":")
        if not port.isdigit() or not 0 < int(port) < 65536 or not host:
            raise ValueError(f"{value!r} is not address:port")
        try:
            ipaddress.ip_address(host)
        except ValueError:
            raise ValueError(f"{value!r} is not address:port: {host!r} is not an IP address") from None
        servers.append((host, int(port)))
    return servers


class DNSLookup:
    """
    SRV and address lookups against pinned servers.

    @param nameservers: C{(host, port)} pairs, or empty for the system's.
    @param timeout: seconds for one lookup (all servers together).
    """

    def __init__(self, reactor: Any, nameservers: Sequence[Tuple[str, int]] = (), *, timeout: float = 5.0,
                 resolver: Any = None) -> None:
        self.timeout = timeout
        self._reactor = reactor
        if resolver is None:
            if nameservers:
                resolver = client.Resolver(servers=list(nameservers), timeout=(timeout,), reactor=reactor)
            else:
                resolver = client.Resolver(resolv="/etc/resolv.conf", timeout=(timeout,), reactor=reactor)
            # the resolver asks its servers one after the other, each for its
            # timeout: share the lookup's timeout among them, or a first
            # server that never answers would use it all and the next never
            # be asked
            count = len(resolver.servers) + len(resolver.dynServers)
            resolver.timeout = (timeout / max(1, count),)
            if not nameservers:
                # as the system resolves: the hosts file first (localhost and
                # the operator's own entries), then the resolv.conf servers
                resolver = resolve.ResolverChain([hosts.Resolver(file=HOSTS_FILE), resolver])
        self.resolver = resolver

    def _bounded(self, d: Deferred[Any], name: str) -> Deferred[Any]:
        d.addTimeout(self.timeout, self._reactor)
        d.addErrback(_classify, name)
        return d

    def srv(self, name: str) -> Deferred[List[SRVRecord]]:
        """The SRV records of C{name}."""
        d = self._bounded(self.resolver.lookupService(name), name)

        def records(result: Tuple[list, list, list]) -> List[SRVRecord]:
            answers = [a for a in result[0] if a.type == dns.SRV]
            found = [
                SRVRecord(a.payload.priority, a.payload.weight, a.payload.port, target, a.ttl)
                for a in answers
                if (target := _srv_target(a.payload.target.name)) is not None
            ]
            if not found:
                if answers:
                    # what a broken or hostile server sends: as good as no answer
                    raise LookupFailed(f"the DNS answer for {name} has no SRV target that is a host name")
                raise NoRecords(f"{name} has no SRV record")
            return found

        return d.addCallback(records)

    def addresses(self, host: str) -> Deferred[List[Tuple[str, int]]]:
        """
        The IPv4 and IPv6 addresses of C{host}, as C{(address, ttl)}.  One
        family failing does not matter when the other answers.
        """
        lookups = [
            self._bounded(self.resolver.lookupAddress(host), host),
            self._bounded(self.resolver.lookupIPV6Address(host), host),
        ]
        d = defer.DeferredList(lookups, consumeErrors=True)

        def combine(results: List[Tuple[bool, Any]]) -> List[Tuple[str, int]]:
            found = []
            for ok, result in results:
                for answer in result[0] if ok else ():
                    if answer.type == dns.A:
                        found.append((socket.inet_ntop(socket.AF_INET, answer.payload.address), answer.ttl))
                    elif answer.type == dns.AAAA:
                        found.append((socket.inet_ntop(socket.AF_INET6, answer.payload.address), answer.ttl))
            if found:
                return found
            for ok, result in results:
                if not ok and result.check(LookupFailed):
                    result.raiseException()
            raise NoRecords(f"{host} has no A or AAAA record")

        return d.addCallback(combine)


#: a host name as an SRV target may give it: ASCII labels of letters, digits, "-" and "_"
_HOST_NAME = re.compile(rb"(?=.{1,253}$)[A-Za-z0-9_-]{1,63}(\.[A-Za-z0-9_-]{1,63})*")


def _srv_target(name: bytes) -> Optional[str]:
    """
    The target of an SRV record as text: C{"."} for "no such service", or a
    host name; C{None} for anything else (bytes outside ASCII, spaces, empty
    labels), which must never become a host to connect to, verify TLS for
    or name in a C{Host} header.
    """
    name = name[:-1] if name.endswith(b".") else name
    if not name:
        return "."
    return name.decode("ascii") if _HOST_NAME.fullmatch(name) else None


def dns_lookup(options: Options, context: Any) -> DNSLookup:
    """
    The C{nameservers} and C{timeout} options of a discovery plugin's table
    as a L{DNSLookup} on C{context.reactor}.
    """
    try:
        servers = parse_nameservers(options.get_str_list("nameservers", []))
    except ValueError as e:
        raise options.error("nameservers", str(e)) from None
    timeout = options.get_number("timeout", 5.0, minimum=0.1, maximum=60)
    return DNSLookup(context.reactor, servers, timeout=timeout)


def _classify(failure: Failure, name: str) -> None:
    if failure.check(dns_error.DNSNameError):
        raise NoRecords(f"{name} does not exist (NXDOMAIN)")
    if failure.check(dns_error.DNSQueryTimeoutError, defer.TimeoutError, defer.CancelledError):
        raise LookupFailed(f"the DNS lookup of {name} timed out")
    if failure.check(dns_error.DNSServerError):
        raise LookupFailed(f"the DNS server failed to answer for {name} (SERVFAIL)")
    if failure.check(dns_error.DNSQueryRefusedError):
        raise LookupFailed(f"the DNS server refused to answer for {name}")
    if failure.check(NoRecords, LookupFailed):
        failure.raiseException()
    raise LookupFailed(f"the DNS lookup of {name} failed: {failure.getErrorMessage()}")
