"""
The five replaceable steps of the federation pipeline.

A plugin provides one of these through a factory registered with a hook (see
L{fedserver.hookspecs}); the loader checks every product with
L{zope.interface.verify.verifyObject}.  Methods that do I/O return a
L{Deferred}; failures are L{fedserver.errors.FederationError} subclasses, whose
label and message the peer or component is shown.
"""

from __future__ import annotations

from typing import Any, List, Optional, Sequence

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import (
    IOpenSSLClientConnectionCreator,
    IOpenSSLServerConnectionCreator,
)
from zope.interface import Interface

from fedserver.values import (
    FederatedCall,
    Identity,
    InboundRequest,
    OutboundRequest,
    Peer,
    Response,
    Target,
)


class IDiscovery(Interface):
    """
    Finds where a backend domain is served.
    """

    def discover(domain: str) -> Deferred[List[Target]]:
        """
        Where C{domain} can be reached, most preferred first.

        The list is never empty: no answer fails with
        L{fedserver.errors.DiscoveryFailure} (label C{invalid-domain} when the
        domain has no federation record at all, C{discovery-failure} when the
        lookup itself failed).  Callers try the targets in order and may call
        again at any time: caching is the provider's job.
        """


class IAuthenticator(Interface):
    """
    Proves who we are to peers and establishes who a peer is.
    """

    def server_tls_options() -> Optional[IOpenSSLServerConnectionCreator]:
        """
        TLS settings for the inward listener, or C{None} when the inward
        listener does not terminate TLS itself (a proxy in front does).

        Called for every new connection, so a provider may reload its
        certificates; it should return a cached object when nothing changed.
        """

    def client_tls_options(target: Target) -> IOpenSSLClientConnectionCreator:
        """
        TLS settings for a connection to C{target}: what we present and how
        the remote certificate is checked (against C{target.infra_domain}).
        """

    def authenticate(request: InboundRequest) -> Deferred[Peer]:
        """
        Establish who sent C{request}.

        Fails with L{fedserver.errors.AuthenticationFailure} whose label says
        why (C{no-client-certificate}, C{authentication-failure},
        C{no-origin-domain}, ...).  The resulting L{Peer} says whether the
        claimed domain is proven; if it is not, the pipeline validates it
        through discovery.
        """

    def prepare_outbound(request: OutboundRequest, target: Target) -> Deferred[OutboundRequest]:
        """
        Add to C{request} what the remote needs to authenticate us (an origin
        header, a signature), for sending to C{target}.
        """


class IConnectionGate(Interface):
    """
    Optional, for authenticators that can judge a peer by its connection
    alone (mutual TLS).  The inward listener asks it as soon as a request's
    headers are in, and refuses a peer it rejects before reading the body,
    so that strangers cannot make fedserver buffer their uploads.
    """

    def check_connection(tls: Optional[Any]) -> None:
        """
        Raise L{fedserver.errors.AuthenticationFailure} if the connection's
        client certificate (a L{fedserver.tls.PeerCertificate}, or C{None}
        when none was presented) can never be authenticated.
        """


class IAuthorizer(Interface):
    """
    Decides whom we federate with.  Every configured authorizer must allow a
    call; the first refusal wins.
    """

    def authorize_inbound(peer: Peer, call: FederatedCall) -> Deferred[None]:
        """
        Fire with C{None} to allow C{call} from C{peer}, or fail with
        L{fedserver.errors.FederationDenied}.  C{peer.claimed_domain} has
        already been validated when this is called.
        """

    def authorize_outbound(domain: str, call: FederatedCall) -> Deferred[None]:
        """
        Fire with C{None} to allow sending C{call} to backend C{domain}, or
        fail with L{fedserver.errors.FederationDenied}.
        """


class IIdentityProvider(Interface):
    """
    An MLS identity provider as the MIMI gateway draft defines it.
    """

    def supported_credentials() -> Sequence[str]:
        """The MLS credential type names this provider accepts."""

    def validate(
        identity: Identity,
        group_context_extensions: Sequence[Any],
        application_context: Any,
    ) -> Deferred[None]:
        """
        Fire with C{None} when C{identity} is valid in that context (for X.509,
        the application context carries the message timestamp); otherwise
        fail with a L{fedserver.errors.FederationError} saying why.
        """

    def client_handle(identity: Identity) -> str:
        """The human-readable handle of the client C{identity} belongs to."""

    def valid_successor(predecessor: Identity, successor: Identity) -> bool:
        """Whether C{successor} may replace C{predecessor} (same client)."""


class IComponentHandler(Interface):
    """
    A local component that federated calls are routed to.
    """

    def handle(call: FederatedCall) -> Deferred[Response]:
        """
        Answer C{call}.  The L{Response} goes back to the peer unchanged, so
        a component answers its own errors as it wants peers to see them;
        failing with a L{fedserver.errors.FederationError} sends that labelled
        error instead (for example C{component-unavailable}).
        """
