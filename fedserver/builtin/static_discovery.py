"""
Discovery C{static}: a table the operator writes.

    [discovery]
    plugin = "static"

    [discovery.domains."b.example"]
    infra_domain = "fed.b.example"   # default: the domain itself
    host = "127.0.0.1"               # default: the infrastructure domain
    port = 8443

A domain may also list several targets, tried in order, as an array of
tables (C{[[discovery.domains."b.example"]]}).  Targets written here are
trusted as they are: no address policy applies.
"""

from __future__ import annotations

import ipaddress
from typing import Dict, List

from twisted.internet import defer
from twisted.internet.defer import Deferred
from zope.interface import implementer

from fedserver.config import Options, check_domain
from fedserver.errors import DiscoveryFailure
from fedserver.hookspecs import hookimpl
from fedserver.interfaces import IDiscovery
from fedserver.values import Target


@implementer(IDiscovery)
class StaticDiscovery:
    """Answers from a fixed table of domain -> targets."""

    def __init__(self, table: Dict[str, List[Target]]) -> None:
        self.table = table

    def discover(self, domain: str) -> Deferred[List[Target]]:
        targets = self.table.get(domain.lower())
        if not targets:
            return defer.fail(
                DiscoveryFailure(
                    f"{domain} is not in the static discovery table ([discovery.domains])",
                    "invalid-domain",
                )
            )
        return defer.succeed(list(targets))


def _host(options: Options, default: str) -> str:
    host = options.get_str("host", default)
    try:
        ipaddress.ip_address(host)
    except ValueError:
        check_domain(options, "host", host.lower())
    return host


def _target(options: Options, domain: str) -> Target:
    infra = check_domain(options, "infra_domain", options.get_str("infra_domain", domain))
    target = Target(
        infra_domain=infra,
        host=_host(options, infra),
        port=options.get_int("port", 443, minimum=1, maximum=65535),
    )
    options.check_all_used()
    return target


def make_static_discovery(options: Options, context: object) -> StaticDiscovery:
    domains = options.get_table("domains", None)
    table: Dict[str, List[Target]] = {}
    if domains is not None:
        for domain in domains.keys():
            check_domain(domains, domain, domain)
            entries = domains.get_table_list(domain, single_ok=True)
            table[domain] = [_target(entry, domain) for entry in entries]
        domains.check_all_used()
    return StaticDiscovery(table)


@hookimpl
def fedserver_discovery_plugins() -> dict:
    return {"static": make_static_discovery}
