"""
The hooks a fedserver plugin implements.

Hooks run once, at startup, and only register named factories; the
configuration then picks a factory by name (C{plugin = "name"}) and calls it as
C{factory(options, context)}, where C{options} is that table of the
configuration as an L{fedserver.config.Options} and C{context} is the
L{fedserver.context.Context}.  Nothing here runs on the request path.

When several plugins answer one of the C{*_plugins} hooks, their dictionaries
are merged; a name given by two plugins stops startup with a message naming
both distributions.
"""

# mypy: disable-error-code="empty-body"
from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Dict, Iterable, List, Tuple

import pluggy

if TYPE_CHECKING:
    from twisted.application.service import IService
    from twisted.web.resource import IResource

    from fedserver.context import Context

PROJECT = "fedserver"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)

#: A plugin factory: C{factory(options, context)} returns a provider of the
#: interface its hook names.
Factory = Callable[..., object]


@hookspec
def fedserver_discovery_plugins() -> Dict[str, Factory]:
    """Discovery factories by name; each product provides L{IDiscovery}."""


@hookspec
def fedserver_authenticator_plugins() -> Dict[str, Factory]:
    """Authenticator factories by name; each product provides L{IAuthenticator}."""


@hookspec
def fedserver_authorizer_plugins() -> Dict[str, Factory]:
    """Authorizer factories by name; each product provides L{IAuthorizer}."""


@hookspec
def fedserver_identity_provider_plugins() -> Dict[str, Factory]:
    """Identity provider factories by name; products provide L{IIdentityProvider}."""


@hookspec
def fedserver_component_plugins() -> Dict[str, Factory]:
    """Component factories by name; each product provides L{IComponentHandler}."""


@hookspec
def fedserver_resources(context: Context) -> Iterable[Tuple[str, bytes, IResource]]:
    """
    Extra web resources, as C{(listener, path_segment, resource)} where
    C{listener} is C{"inward"} or C{"outward"}.  Called after every configured
    provider is built, so C{context} gives access to them.  A path segment
    claimed twice on one listener stops startup.
    """


@hookspec
def fedserver_services(context: Context) -> List[IService]:
    """
    Extra long-lived services, started and stopped with fedserver's own.
    Called after every configured provider is built.
    """
