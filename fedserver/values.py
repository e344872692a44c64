"""
Value types that travel through the federation pipeline.

All are frozen: a step of the pipeline that wants to change a value makes a new
one with L{attrs.evolve}.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional, Tuple

import attrs


def _headers(value: Any) -> Tuple[Tuple[str, str], ...]:
    if isinstance(value, Mapping):
        value = value.items()
    return tuple((str(k), str(v)) for k, v in value)


class _HeaderLookup:
    __slots__ = ()
    headers: Tuple[Tuple[str, str], ...]

    def header(self, name: str) -> Optional[str]:
        """The first value of header C{name} (case-insensitive), or C{None}."""
        lname = name.lower()
        for key, value in self.headers:
            if key.lower() == lname:
                return value
        return None


@attrs.frozen
class Target:
    """
    One place a remote backend can be reached, as discovery found it.

    @ivar infra_domain: the name the backend authenticates as (TLS server name).
    @ivar host: the address or host name to connect to.
    @ivar port: the TCP port.
    @ivar ttl: seconds the answer may be cached, when discovery knows it.
    @ivar priority: lower is preferred; discovery already orders its answer.
    @ivar weight: the RFC 2782 weight, kept for display.
    """

    infra_domain: str
    host: str
    port: int
    ttl: Optional[int] = None
    priority: int = 0
    weight: int = 0


@attrs.frozen
class Peer:
    """
    A remote backend as an authenticator established it.

    @ivar identities: the names it proved (SAN DNS names of its client
        certificate, or the Matrix server name whose key verified).
    @ivar claimed_domain: the backend domain it says it speaks for.
    @ivar domain_proven: C{True} when the authenticator itself proved the
        claimed domain (as a Matrix signature does); otherwise the pipeline
        validates the claim through discovery.
    @ivar fingerprint: SHA-256 of the presented certificate (DER), hex, if any.
    """

    identities: frozenset = attrs.field(converter=frozenset)
    claimed_domain: str
    domain_proven: bool = False
    fingerprint: Optional[str] = None


@attrs.frozen
class InboundRequest(_HeaderLookup):
    """
    What a remote backend sent to the inward listener, before authentication.

    @ivar tls: the L{fedserver.tls.PeerCertificate} the client presented, or
        C{None} when it presented none (or the listener is not TLS).
    """

    method: str
    path: str
    query: str
    headers: Tuple[Tuple[str, str], ...] = attrs.field(converter=_headers)
    body: bytes
    tls: Optional[object] = None


@attrs.frozen
class OutboundRequest(_HeaderLookup):
    """
    A request on its way to a remote backend's inward listener; the
    authenticator's C{prepare_outbound} adds what proves who we are.

    @ivar destination: the backend domain (Matrix: server name) it is for.
    """

    destination: str
    method: str
    path: str
    headers: Tuple[Tuple[str, str], ...] = attrs.field(converter=_headers)
    body: bytes = b""

    def with_header(self, name: str, value: str) -> OutboundRequest:
        """A copy with header C{name} set to C{value} (replacing any)."""
        kept = tuple(h for h in self.headers if h[0].lower() != name.lower())
        return attrs.evolve(self, headers=(*kept, (name, value)))


@attrs.frozen
class FederatedCall(_HeaderLookup):
    """
    One federated RPC, inbound or outbound.

    @ivar origin_domain: the backend domain of the caller (inbound: the
        validated peer's domain; outbound: our own backend domain).
    @ivar target_domain: the backend domain the call is for.
    @ivar component: the component name, e.g. C{brig}.
    @ivar rpc: the RPC name, e.g. C{get-user-by-handle}.
    @ivar request_id: carried end to end and logged on every line.
    @ivar peer: the authenticated L{Peer} (inbound only).
    @ivar path: the request path as received, for protocols whose routes are
        paths rather than a component and an RPC (Matrix).
    @ivar query: the raw query string, if any (without C{?}).
    """

    origin_domain: str
    target_domain: str
    component: str
    rpc: str
    method: str
    headers: Tuple[Tuple[str, str], ...] = attrs.field(converter=_headers)
    body: bytes
    request_id: str
    peer: Optional[Peer] = None
    path: str = ""
    query: str = ""


@attrs.frozen
class Identity:
    """
    An MLS identity as the MIMI draft's identity providers see it.

    @ivar credential_type: the MLS credential type name (C{basic}, C{x509}).
    @ivar credential: the credential's content: the asserted identity for
        Basic, the DER certificates leaf first for X.509.
    @ivar public_key: the HPKE/signature public key bytes, when known.
    """

    credential_type: str
    credential: object
    public_key: bytes = b""


@attrs.frozen
class Response(_HeaderLookup):
    """An HTTP answer: status code, headers and body."""

    code: int
    headers: Tuple[Tuple[str, str], ...] = attrs.field(converter=_headers, default=())
    body: bytes = b""
