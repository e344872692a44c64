"""
fedserver: a plugin-based federation server framework on Twisted.

The public surface: the value types that travel the pipeline, the labelled
errors, the hook marker for plugins, and L{build_service} for embedding.
Interfaces are in L{fedserver.interfaces}; the configuration reader that
plugins use for their options is L{fedserver.config.Options}.
"""

from fedserver.errors import (
    AuthenticationFailure,
    ConfigError,
    DiscoveryFailure,
    FederationDenied,
    FederationError,
    ValidationError,
)
from fedserver.hookspecs import hookimpl
from fedserver.values import (
    FederatedCall,
    Identity,
    InboundRequest,
    OutboundRequest,
    Peer,
    Response,
    Target,
)


def build_service(*args, **kwargs):
    """See L{fedserver.service.build_service}."""
    from fedserver.service import build_service as build

    return build(*args, **kwargs)


__all__ = [
    "AuthenticationFailure",
    "ConfigError",
    "DiscoveryFailure",
    "FederatedCall",
    "FederationDenied",
    "FederationError",
    "Identity",
    "InboundRequest",
    "OutboundRequest",
    "Peer",
    "Response",
    "Target",
    "ValidationError",
    "build_service",
    "hookimpl",
]
