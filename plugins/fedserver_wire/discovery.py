"""
Discovery C{wire-srv}: a backend domain's federator is announced by the SRV
record C{_wire-server-federator._tcp.<backend domain>}, whose target is the
backend's infrastructure domain.

    [discovery]
    plugin = "wire-srv"
    nameservers = ["127.0.0.1:5353"]   # default: those of /etc/resolv.conf
    timeout = 5                        # seconds for one DNS lookup
    min_ttl = 60                       # bounds on how long an answer is kept
    max_ttl = 86400
    negative_ttl = 60                  # how long "no such record" is kept
    stale_ttl = 86400                  # how long an expired answer serves while DNS fails
    cache_entries = 10000              # names kept at most (least recently used go first)

Unlike wire-server, which uses the first record only, every record is used:
targets come in RFC 2782 order (priority, then weighted random), each with
every address of its target that the address policy allows, so the pipeline
fails over from one to the next.  No record, a C{.} target or NXDOMAIN is
C{invalid-domain}; a DNS failure with nothing cached is C{discovery-failure}.
"""

from __future__ import annotations

from typing import Any, Dict, List, Sequence, Tuple

import attrs
from twisted.internet import defer
from twisted.internet.defer import Deferred
from zope.interface import implementer

from fedserver.addresses import AddressPolicy
from fedserver.config import Options
from fedserver.discovery_cache import CacheSettings, DiscoveryCache, cache_settings
from fedserver.dns import DNSLookup, LookupFailed, NoRecords, SRVRecord, dns_lookup, order_srv
from fedserver.errors import DiscoveryFailure
from fedserver.hookspecs import hookimpl
from fedserver.interfaces import IDiscovery
from fedserver.values import Target

SERVICE = "_wire-server-federator._tcp"
DEFAULT_CACHE = CacheSettings()


@attrs.frozen
class ResolvedRecord:
    """An SRV record with the addresses of its target and what became of them."""

    record: SRVRecord
    allowed: Tuple[str, ...]
    refused: Tuple[str, ...] = ()
    problem: str = ""


@attrs.frozen
class SRVAnswer:
    """Everything one discovery learnt: records, addresses, verdicts."""

    name: str
    records: Tuple[ResolvedRecord, ...]


@implementer(IDiscovery)
class SRVDiscovery:
    """
    SRV-based discovery with an address policy and a cache; C{service} is
    the SRV prefix (C{_wire-server-federator._tcp} for Wire).
    """

    def __init__(self, lookup: DNSLookup, policy: AddressPolicy, clock: Any, *,
                 service: str = SERVICE, settings: CacheSettings = DEFAULT_CACHE) -> None:
        self.lookup = lookup
        self.policy = policy
        self.service = service
        self.cache: DiscoveryCache[SRVAnswer] = DiscoveryCache(
            clock, lambda domain: Deferred.fromCoroutine(self._resolve(domain)), settings
        )

    def discover(self, domain: str) -> Deferred[List[Target]]:
        return self.cache.get(domain.lower()).addCallback(self.targets)

    def explain(self, domain: str) -> Deferred[SRVAnswer]:
        """Everything a fresh lookup of C{domain} finds, bypassing the cache."""
        return Deferred.fromCoroutine(self._answer(domain.lower()))

    @staticmethod
    def targets(answer: SRVAnswer) -> List[Target]:
        """The allowed targets of C{answer}, in RFC 2782 order (random within a priority)."""
        by_record = {r.record: r for r in answer.records}
        return [
            Target(infra_domain=record.target, host=address, port=record.port, ttl=record.ttl,
                   priority=record.priority, weight=record.weight)
            for record in order_srv(list(by_record))
            for address in by_record[record].allowed
        ]

    async def _resolve(self, domain: str) -> Tuple[SRVAnswer, float]:
        answer = await self._answer(domain)
        usable = [r for r in answer.records if r.allowed]
        if not usable:
            problems = "; ".join(r.problem for r in answer.records if r.problem)
            raise DiscoveryFailure(f"no usable federation target for {domain}: {problems}",
                                   data={"type": "federation", "domain": domain})
        return answer, min(r.record.ttl for r in usable)

    async def _answer(self, domain: str) -> SRVAnswer:
        name = f"{self.service}.{domain}"
        try:
            records = await self.lookup.srv(name)
        except NoRecords as e:
            raise DiscoveryFailure(f"{domain} does not federate: {e}", "invalid-domain",
                                   data={"type": "federation", "domain": domain}) from None
        except LookupFailed as e:
            raise DiscoveryFailure(f"cannot discover {domain}: {e}",
                                   data={"type": "federation", "domain": domain}) from None
        if all(r.target == "." for r in records):
            raise DiscoveryFailure(f"{domain} says it does not federate (the SRV target of {name} is '.')",
                                   "invalid-domain", data={"type": "federation", "domain": domain})
        records = [r for r in records if r.target != "."]
        resolved = await defer.gatherResults([Deferred.fromCoroutine(self._addresses(r)) for r in records])
        return SRVAnswer(name, tuple(resolved))

    async def _addresses(self, record: SRVRecord) -> ResolvedRecord:
        try:
            found = await self.lookup.addresses(record.target)
        except (NoRecords, LookupFailed) as e:
            return ResolvedRecord(record, (), (), str(e))
        ttl = min([record.ttl, *(t for _, t in found)])
        record = attrs.evolve(record, ttl=ttl)
        allowed = tuple(a for a, _ in found if self.policy.allows(a))
        refused = tuple(a for a, _ in found if not self.policy.allows(a))
        problem = "; ".join(self.policy.reason(a) for a in refused) if not allowed else ""
        return ResolvedRecord(record, allowed, refused, problem)


def make_wire_srv(options: Options, context: Any) -> SRVDiscovery:
    return SRVDiscovery(dns_lookup(options, context), context.address_policy, context.reactor,
                        settings=cache_settings(options))


@hookimpl
def fedserver_discovery_plugins() -> Dict[str, Any]:
    return {"wire-srv": make_wire_srv}


__all__: Sequence[str] = ["SRVDiscovery", "make_wire_srv"]
