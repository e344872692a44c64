"""
fedserver plugin C{wire-reference}: Wire's brig and galley as in-process
reference components, and a small client API on the outward listener.

    [components.brig]
    plugin = "wire-brig"
    prekeys = 10                            # prekeys per new client (1-1000)
    search_policy = "exact_handle_search"   # or "no_search", "full_search"
    search_limit = 10                       # documents per search (1-100)

    [components.galley]
    plugin = "wire-galley"

The Wire protocol addresses these components as C{brig} and C{galley}, so
those are the table names they must have.  They go together: galley's
members are brig's users, and the client API (C{/wire/} on the outward
listener, see L{fedserver_wire.api}) needs both; it is mounted only when
both are configured.  Their data is kept in fedserver's store under the
schema C{wire-reference}; calls to other backends go through the pipeline,
with the same authorizers, discovery and authentication as every outbound
call.
"""

from __future__ import annotations

from typing import Any, Dict, List, Tuple

from twisted.web.resource import IResource

from fedserver.config import Options
from fedserver.context import Context
from fedserver.errors import ConfigError
from fedserver.hookspecs import hookimpl
from fedserver.rpc_client import RPCClient
from fedserver_wire.api import SEGMENT, WireAPI, WireAPIResource
from fedserver_wire.brig import MAX_SEARCH_RESULTS, SEARCH_POLICIES, WireBrig
from fedserver_wire.galley import WireGalley
from fedserver_wire.store import SCHEMA_OWNER, SCHEMA_STEPS, WireStore


def _store(context: Context) -> WireStore:
    context.storage.register_schema(SCHEMA_OWNER, SCHEMA_STEPS)
    return WireStore(context.storage, context.backend_domain)


def _remote(context: Context) -> RPCClient:
    # the pipeline is built after the components: look it up at call time
    return RPCClient(context.backend_domain, lambda: context.pipeline)


def _check_name(options: Options, expected: str) -> None:
    if options.name != expected:
        raise options.error(
            "plugin",
            f"{options.plugin!r} is Wire's {expected}, which other backends call as "
            f"/federation/{expected}/...: configure it as [components.{expected}]",
        )


def make_brig(options: Options, context: Context) -> WireBrig:
    """Factory of C{wire-brig}."""
    _check_name(options, "brig")
    prekeys = options.get_int("prekeys", 10, minimum=1, maximum=1000)
    policy = options.get_str("search_policy", "exact_handle_search")
    if policy not in SEARCH_POLICIES:
        raise options.error("search_policy", f"must be one of {', '.join(SEARCH_POLICIES)}, not {policy!r}")
    limit = options.get_int("search_limit", 10, minimum=1, maximum=MAX_SEARCH_RESULTS)
    return WireBrig(
        _store(context), _remote(context), clock=context.reactor,
        prekeys=prekeys, search_policy=policy, search_limit=limit,
    )


def make_galley(options: Options, context: Context) -> WireGalley:
    """Factory of C{wire-galley}."""
    _check_name(options, "galley")
    # on-message-sent goes through the durable outbound queue (docs/queue.md)
    return WireGalley(_store(context), _remote(context), clock=context.reactor, queue=lambda: context.queue,
                      notify_wait=context.config.limits.request_timeout)


@hookimpl
def fedserver_component_plugins() -> Dict[str, Any]:
    """C{wire-brig} and C{wire-galley}."""
    return {"wire-brig": make_brig, "wire-galley": make_galley}


@hookimpl
def fedserver_resources(context: Context) -> List[Tuple[str, bytes, IResource]]:
    """
    The client API under C{/wire/} on the outward listener, when both
    reference components are configured; one without the other stops
    startup.
    """
    brigs = [c for c in context.components.values() if isinstance(c, WireBrig)]
    galleys = [c for c in context.components.values() if isinstance(c, WireGalley)]
    if not brigs and not galleys:
        return []
    if not (brigs and galleys):
        have, missing = ("brig", "galley") if brigs else ("galley", "brig")
        raise ConfigError(
            f'[components.{have}] plugin = "wire-{have}" needs [components.{missing}] '
            f'plugin = "wire-{missing}" too: the reference brig and galley work together',
            path="[components]",
        )
    api = WireAPI(brigs[0], galleys[0])
    limit = context.config.limits.max_body_bytes
    return [("outward", SEGMENT, WireAPIResource(api, max_body_bytes=limit))]
