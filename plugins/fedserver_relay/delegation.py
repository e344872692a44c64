"""
Delegated trust for the HTTP federation pipeline: the media relay's rules
applied to federated requests relayed through a hub fedserver.

A hub runs the component C{relay-forward}.  A backend sends it an ordinary
federated call, naming where the call should go with
C{Fedserver-Relay-To: DOMAIN} and C{Fedserver-Relay-Component: COMPONENT}
(the RPC is the hub's). The hub calls that component of DOMAIN through its
own pipeline, adding

- C{Fedserver-Relay-Origin}: the SHA-256 fingerprint of the certificate the
  caller presented to the hub (or, when the call was already relayed, the
  origin it arrived with);
- C{Fedserver-Relay-Origin-Domain}: the caller's validated backend domain;
- C{Fedserver-Relay-Hops}: hubs crossed so far (1 after the first).

The receiving backend's authorizer C{delegated-trust} accepts a call:

- without those headers, when the peer's certificate fingerprint is in its
  C{trusted} list;
- with any of them, only when the peer is trusted with C{delegate = true}
  (the headers are the peer's unauthenticated claim: a peer that is no
  delegate could otherwise name any trusted relay as the origin), the
  origin is a certificate fingerprint, the origin domain is a domain name
  or absent, and the hops do not exceed C{max_federation_hops}.

Otherwise the call is refused with C{403 federation-denied}, saying which
rule failed.

The hub believes the relay headers of a call it relays again only from a
caller its own C{delegated-trust} authorizer lists with C{delegate = true};
C{components = [...]} limits the components it relays to (default: all).

    [[authorizers]]
    plugin = "delegated-trust"
    max_federation_hops = 2
    trusted = [
        { fingerprint = "...", label = "hub", delegate = true },
        { fingerprint = "...", label = "c.example" },
    ]

    [components.relay]
    plugin = "relay-forward"          # on the hub
    components = ["brig", "galley"]   # optional: the components it relays to (default: all)
"""

from __future__ import annotations

import re
from typing import Any, Dict, FrozenSet, Optional, Tuple

from twisted.internet import defer
from twisted.internet.defer import Deferred
from zope.interface import implementer

from fedserver.config import Options, is_domain_name
from fedserver.context import Context
from fedserver.errors import FederationDenied, FederationError
from fedserver.hookspecs import hookimpl
from fedserver.interfaces import IAuthorizer, IComponentHandler
from fedserver.pipeline import (
    RELAY_COMPONENT,
    RELAY_HEADERS,
    RELAY_HOPS,
    RELAY_ORIGIN,
    RELAY_ORIGIN_DOMAIN,
    RELAY_TO,
)
from fedserver.values import FederatedCall, Peer, Response
from fedserver_relay.fingerprint import parse_fingerprint
from fedserver_relay.frames import MAX_TTL

ORIGIN = RELAY_ORIGIN
ORIGIN_DOMAIN = RELAY_ORIGIN_DOMAIN
HOPS = RELAY_HOPS
TO = RELAY_TO
TO_COMPONENT = RELAY_COMPONENT
#: the headers of relayed calls, which the pipeline passes through on outbound calls


def _denied(message: str, peer: Optional[Peer]) -> FederationDenied:
    if peer is None:
        return FederationDenied(message)
    return FederationDenied(message, data={"type": "federation", "domain": peer.claimed_domain})


def check_relay_headers(raw_origin: str, raw_hops: Optional[str], raw_domain: Optional[str], max_hops: int,
                        peer: Optional[Peer]) -> Tuple[str, int]:
    """
    The origin fingerprint and hop count of a relayed call's headers, or
    L{FederationDenied} saying what is wrong with them.
    """
    try:
        origin = parse_fingerprint(raw_origin)
    except ValueError:
        raise _denied(f"{ORIGIN} is not a certificate fingerprint: {raw_origin[:80]!r}", peer) from None
    hops = raw_hops.strip() if raw_hops is not None else ""
    if not (hops.isascii() and hops.isdigit()) or not 1 <= int(hops) <= MAX_TTL:
        raise _denied(f"{HOPS} must be a number of hubs from 1 to {MAX_TTL}, not {hops[:20]!r}", peer)
    if int(hops) > max_hops:
        raise _denied(
            f"the call crossed {hops} hubs; this backend accepts at most {max_hops} (max_federation_hops)", peer,
        )
    if raw_domain is not None and not is_domain_name(raw_domain):
        raise _denied(f"{ORIGIN_DOMAIN} must be a domain name, not {raw_domain[:80]!r}", peer)
    return origin, int(hops)


@implementer(IAuthorizer)
class DelegatedTrust:
    """
    @param trusted: fingerprint -> (label, delegate).
    """

    def __init__(self, trusted: Dict[str, tuple], max_hops: int) -> None:
        self.trusted = dict(trusted)
        self.max_hops = max_hops

    def label(self, fingerprint: str) -> str:
        entry = self.trusted.get(fingerprint)
        return f"{entry[0]} ({fingerprint[:16]})" if entry else fingerprint[:16]

    def check(self, peer: Peer, call: FederatedCall) -> None:
        """Raise L{FederationDenied} unless C{call} from C{peer} is acceptable."""
        sender = peer.fingerprint
        if sender is None or sender not in self.trusted:
            raise _denied(
                f"{peer.claimed_domain}'s certificate ({(sender or 'none')[:16]}) is not in this backend's "
                "delegated-trust list", peer,
            )
        raw_origin = call.header(ORIGIN)
        raw_hops = call.header(HOPS)
        raw_domain = call.header(ORIGIN_DOMAIN)
        present = [name for name, value in ((ORIGIN, raw_origin), (HOPS, raw_hops), (ORIGIN_DOMAIN, raw_domain))
                   if value is not None]
        if not present:
            return
        # the relay headers are the peer's claim, which nothing authenticates: only a delegate may make it
        if not self.trusted[sender][1]:
            raise _denied(
                f"{self.label(sender)} sent relay headers ({', '.join(present)}) but is not trusted with "
                "delegate = true: only a delegate may relay calls", peer,
            )
        if raw_origin is None:
            raise _denied(f"{present[0]} came without {ORIGIN}", peer)
        check_relay_headers(raw_origin, raw_hops, raw_domain, self.max_hops, peer)

    def authorize_inbound(self, peer: Peer, call: FederatedCall) -> Deferred[None]:
        try:
            self.check(peer, call)
        except FederationError as e:
            return defer.fail(e)
        return defer.succeed(None)

    def authorize_outbound(self, domain: str, call: FederatedCall) -> Deferred[None]:
        return defer.succeed(None)


def make_delegated_trust(options: Options, context: object) -> DelegatedTrust:
    """Factory of C{delegated-trust}."""
    max_hops = options.get_int("max_federation_hops", 2, minimum=1, maximum=MAX_TTL)
    trusted: Dict[str, tuple] = {}
    for entry in options.get_table_list("trusted"):
        raw = entry.get_str("fingerprint")
        try:
            fingerprint = parse_fingerprint(raw)
        except ValueError as e:
            raise entry.error("fingerprint", str(e)) from None
        if fingerprint in trusted:
            raise entry.error("fingerprint", f"{fingerprint[:16]}... is listed twice")
        trusted[fingerprint] = (entry.get_str("label", fingerprint[:16]), entry.get_bool("delegate", False))
        entry.check_all_used()
    if not trusted:
        raise options.error("trusted", "lists nobody: every call would be refused")
    return DelegatedTrust(trusted, max_hops)


#: what a component name looks like (as in C{[components.NAME]})
_COMPONENT_NAME = re.compile(r"[A-Za-z0-9_-]+")


@implementer(IComponentHandler)
class RelayForward:
    """
    The hub's component: sends a call on to the backend it names, with its origin and hop count.

    @param components: the components it relays to; C{None}: any.
    """

    def __init__(self, context: Context, max_hops: int, components: Optional[FrozenSet[str]] = None) -> None:
        self._context = context
        self.max_hops = max_hops
        self.components = components

    def handle(self, call: FederatedCall) -> Deferred[Response]:
        return Deferred.fromCoroutine(self._handle(call))

    def _delegates(self, fingerprint: Optional[str]) -> bool:
        """Whether one of this hub's delegated-trust authorizers lists C{fingerprint} with delegate = true."""
        return fingerprint is not None and any(
            isinstance(a, DelegatedTrust) and a.trusted.get(fingerprint, ("", False))[1]
            for a in self._context.authorizers
        )

    async def _handle(self, call: FederatedCall) -> Response:
        target = call.header(TO)
        component = call.header(TO_COMPONENT)
        if target is None or component is None:
            raise FederationError(
                f"a relayed call names its destination with {TO} and {TO_COMPONENT}", "invalid-endpoint"
            )
        target = target.strip().lower()
        component = component.strip()
        if not is_domain_name(target):
            raise FederationError(f"{TO}: {target[:80]!r} is not a backend domain", "invalid-domain")
        if target == self._context.backend_domain:
            raise FederationError(f"{TO} names this hub itself ({target})", "invalid-domain")
        if self.components is not None and component not in self.components:
            raise FederationDenied(
                f"this hub does not relay to the component {component[:80]!r} ({TO_COMPONENT}); it relays to: "
                f"{', '.join(sorted(self.components))}"
            )
        present = [name for name in (ORIGIN, HOPS, ORIGIN_DOMAIN) if call.header(name) is not None]
        origin_domain: Optional[str]
        if not present:
            if call.peer is None or call.peer.fingerprint is None:
                raise FederationError("the caller presented no certificate to relay for", "no-client-certificate")
            origin, origin_domain, hops = call.peer.fingerprint, call.origin_domain, 1
        else:
            # the relay headers a caller sends are its claim: believed only from a caller this hub's own
            # delegated-trust authorizer lists with delegate = true (which also judged them on the way in)
            caller = call.peer.fingerprint if call.peer is not None else None
            if not self._delegates(caller):
                raise FederationDenied(
                    f"{call.origin_domain} sent a call that was already relayed ({', '.join(present)}); this hub "
                    "relays such calls only from a caller its delegated-trust authorizer lists with "
                    "delegate = true"
                )
            raw_origin = call.header(ORIGIN)
            if raw_origin is None:
                raise FederationDenied(f"{present[0]} came without {ORIGIN}")
            origin_domain = call.header(ORIGIN_DOMAIN)
            origin, arrived = check_relay_headers(raw_origin, call.header(HOPS), origin_domain, MAX_TTL, None)
            hops = arrived + 1
        if hops > self.max_hops:
            raise FederationDenied(f"relaying would make {hops} hubs; at most {self.max_hops} are allowed")
        headers = [(n, v) for n, v in call.headers if n.lower() not in {h.lower() for h in RELAY_HEADERS}]
        headers += [(ORIGIN, origin), (HOPS, str(hops))]
        if origin_domain:
            headers.append((ORIGIN_DOMAIN, origin_domain))
        onward = FederatedCall(
            origin_domain=self._context.backend_domain, target_domain=target, component=component, rpc=call.rpc,
            method=call.method, headers=headers, body=call.body, request_id=call.request_id,
        )
        pipeline = self._context.pipeline
        if pipeline is None:
            raise FederationError("the hub is still starting", "federation-not-available")
        response: Response = await pipeline.call_remote(onward)
        return response


def make_relay_forward(options: Options, context: Context) -> RelayForward:
    """Factory of C{relay-forward}."""
    max_hops = options.get_int("max_federation_hops", 2, minimum=1, maximum=MAX_TTL)
    names = options.get_str_list("components", None)
    components = None
    if names is not None:
        if not names:
            raise options.error("components", "lists no component: every call would be refused (leave it out "
                                              "to relay to any component)")
        for name in names:
            if not _COMPONENT_NAME.fullmatch(name):
                raise options.error("components", f"{name[:80]!r} is not a component name (ASCII letters, digits, "
                                                  "'_' and '-')")
        components = frozenset(names)
    return RelayForward(context, max_hops, components)


@hookimpl
def fedserver_authorizer_plugins() -> Dict[str, Any]:
    return {"delegated-trust": make_delegated_trust}


@hookimpl
def fedserver_component_plugins() -> Dict[str, Any]:
    return {"relay-forward": make_relay_forward}

