"""
Authorizer C{allow-list}: federate only with the listed backend domains, in
both directions.

    [[authorizers]]
    plugin = "allow-list"
    domains = ["b.example", "c.example"]   # or: allow_all = true
"""

from __future__ import annotations

from typing import FrozenSet, Optional

from twisted.internet import defer
from twisted.internet.defer import Deferred
from zope.interface import implementer

from fedserver.config import Options, check_domain
from fedserver.errors import FederationDenied
from fedserver.hookspecs import hookimpl
from fedserver.interfaces import IAuthorizer
from fedserver.values import FederatedCall, Peer


@implementer(IAuthorizer)
class AllowList:
    """
    @ivar domains: the allowed backend domains, or C{None} to allow all.
    """

    def __init__(self, domains: Optional[FrozenSet[str]]) -> None:
        self.domains = domains

    def _check(self, domain: str, direction: str) -> Deferred[None]:
        if self.domains is None or domain.lower() in self.domains:
            return defer.succeed(None)
        return defer.fail(
            FederationDenied(
                f"{domain} is not in this backend's federation allow list ({direction})",
                data={"type": "federation", "domain": domain},
            )
        )

    def authorize_inbound(self, peer: Peer, call: FederatedCall) -> Deferred[None]:
        return self._check(peer.claimed_domain, "inbound")

    def authorize_outbound(self, domain: str, call: FederatedCall) -> Deferred[None]:
        return self._check(domain, "outbound")


def make_allow_list(options: Options, context: object) -> AllowList:
    allow_all = options.get_bool("allow_all", False)
    domains = options.get_str_list("domains", None)
    if allow_all and domains is not None:
        raise options.error("allow_all", "set either allow_all = true or domains, not both")
    if not allow_all and domains is None:
        raise options.error("domains", "is required (or allow_all = true)")
    if allow_all:
        return AllowList(None)
    return AllowList(frozenset(_server_name(options, d.lower()) for d in domains))


def _server_name(options: Options, name: str) -> str:
    # a domain, or a Matrix server name with its port (localhost:8448)
    host, sep, port = name.rpartition(":") if ":" in name else (name, "", "")
    if sep and not (port.isdigit() and 0 < int(port) < 65536):
        raise options.error("domains", f"{name!r} is not a domain or domain:port")
    check_domain(options, "domains", host)
    return name


@hookimpl
def fedserver_authorizer_plugins() -> dict:
    return {"allow-list": make_allow_list}
