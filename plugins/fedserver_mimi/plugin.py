"""
fedserver plugin C{mimi-gateway}: the MIMI gateway as a component with
storage.

    [components.mimi]
    plugin = "mimi-gateway"
    admin_token_file = "admin.token"      # optional: lists and creates applications
    key_packages_per_upload = 100         # 1-1000
    key_packages_per_queue = 1000         # 1-100000
    tags_per_client = 64                  # 1-1000
    proposals_per_epoch = 100             # 1-10000
    claims_per_peer_per_queue = 100       # 1-100000 unconsumed claims of one queue by one other domain
    claim_ttl = 604800                    # 60-31536000 seconds until an unused claim is released
    welcomes_per_client = 1000            # 1-100000 Welcome messages kept per client

    [[components.mimi.apps]]
    id = "6c1d3ad0-5b0e-4b6e-9d43-5a2a3c0f7e11"
    name = "chat"
    identity_provider = "devices"         # an [identity_providers.NAME]
    token_file = "chat.token"             # the application server's bearer token
    federate = true                       # other gateways may read it and claim its KeyPackages

Other gateways address the component as C{mimi}, so that is the table name
it must have.  Its external interface is the component's RPCs
(L{fedserver_mimi.gateway}); its internal interface is mounted under
C{/mimi/} on the outward listener (L{fedserver_mimi.gateway_api}).  Its data
is kept in fedserver's store under the schema C{mimi-gateway}.
"""

from __future__ import annotations

from typing import Any, Dict, List, Tuple

from twisted.web.resource import IResource

from fedserver.config import Options
from fedserver.context import Context
from fedserver.hookspecs import hookimpl
from fedserver.jsonapi import uuid_id
from fedserver.rpc_client import RPCClient
from fedserver_mimi.gateway import COMPONENT, Gateway, GatewayLimits, token_hash
from fedserver_mimi.gateway_api import SEGMENT, api_resource
from fedserver_mimi.gateway_store import (
    DEFAULT_CLAIM_TTL,
    DEFAULT_WELCOMES_PER_CLIENT,
    SCHEMA_OWNER,
    SCHEMA_STEPS,
    GatewayStore,
)

#: a bearer token has at least this many characters
MIN_TOKEN_LENGTH = 16


def _read_token(options: Options, key: str) -> str:
    path = options.get_path(key)
    try:
        with open(path, encoding="utf-8") as f:
            token = f.read().strip()
    except (OSError, UnicodeDecodeError) as e:
        raise options.error(key, f"cannot read {path}: {getattr(e, 'strerror', None) or e}") from None
    if len(token) < MIN_TOKEN_LENGTH or not token.isascii() or any(c.isspace() for c in token):
        raise options.error(
            key, f"{path} must hold one token of at least {MIN_TOKEN_LENGTH} ASCII characters without spaces"
        )
    return token


def _apps(options: Options, context: Context) -> List[Tuple[str, str, str, str, bool]]:
    declared = []
    seen_ids: Dict[str, str] = {}
    seen_tokens: Dict[str, str] = {}
    for app in options.get_table_list("apps", []):
        raw_id = app.get_str("id")
        try:
            app_id = uuid_id(raw_id, "id")
        except Exception:
            raise app.error("id", f"{raw_id!r} is not a lower-case UUID") from None
        if app_id in seen_ids:
            raise app.error("id", f"{app_id} is declared twice")
        name = app.get_str("name")
        if not 1 <= len(name) <= 128:
            raise app.error("name", "must have 1 to 128 characters")
        provider = app.get_str("identity_provider")
        if provider not in context.identity_providers:
            known = ", ".join(sorted(context.identity_providers)) or "none"
            raise app.error("identity_provider", f"there is no [identity_providers.{provider}] (configured: {known})")
        digest = token_hash(_read_token(app, "token_file"))
        if digest in seen_tokens:
            raise app.error("token_file", f"holds the same token as application {seen_tokens[digest]}")
        federate = app.get_bool("federate", True)
        app.check_all_used()
        seen_ids[app_id] = name
        seen_tokens[digest] = app_id
        declared.append((app_id, name, provider, digest, federate))
    return declared


def make_gateway(options: Options, context: Context) -> Gateway:
    """Factory of C{mimi-gateway}."""
    if options.name != COMPONENT:
        raise options.error(
            "plugin",
            f"the MIMI gateway is called by other gateways as /federation/{COMPONENT}/...: configure it as "
            f"[components.{COMPONENT}]",
        )
    limits = GatewayLimits(
        key_packages_per_upload=options.get_int("key_packages_per_upload", 100, minimum=1, maximum=1000),
        key_packages_per_queue=options.get_int("key_packages_per_queue", 1000, minimum=1, maximum=100_000),
        tags_per_client=options.get_int("tags_per_client", 64, minimum=1, maximum=1000),
        proposals_per_epoch=options.get_int("proposals_per_epoch", 100, minimum=1, maximum=10_000),
        claims_per_peer_per_queue=options.get_int("claims_per_peer_per_queue", 100, minimum=1, maximum=100_000),
        claim_ttl=options.get_int("claim_ttl", DEFAULT_CLAIM_TTL, minimum=60, maximum=365 * 24 * 3600),
        welcomes_per_client=options.get_int("welcomes_per_client", DEFAULT_WELCOMES_PER_CLIENT, minimum=1,
                                            maximum=100_000),
    )
    admin = token_hash(_read_token(options, "admin_token_file")) if "admin_token_file" in options else None
    declared = _apps(options, context)
    if admin is not None and any(digest == admin for _, _, _, digest, _ in declared):
        raise options.error("admin_token_file", "holds the token of an application; the admin needs its own")
    context.storage.register_schema(SCHEMA_OWNER, SCHEMA_STEPS)
    return Gateway(
        GatewayStore(context.storage, clock=context.reactor),
        RPCClient(context.backend_domain, lambda: context.pipeline),
        context.identity_providers,
        backend_domain=context.backend_domain,
        clock=context.reactor,
        limits=limits,
        declared=declared,
        admin_token_hash=admin,
        # Welcome messages for other gateways go through the durable outbound queue (docs/queue.md)
        queue=lambda: context.queue,
        welcome_wait=context.config.limits.request_timeout,
    )


@hookimpl
def fedserver_component_plugins() -> Dict[str, Any]:
    """C{mimi-gateway}."""
    return {"mimi-gateway": make_gateway}


@hookimpl
def fedserver_resources(context: Context) -> List[Tuple[str, bytes, IResource]]:
    """The internal interface under C{/mimi/} on the outward listener, when the gateway is configured."""
    gateways = [c for c in context.components.values() if isinstance(c, Gateway)]
    if not gateways:
        return []
    limit = context.config.limits.max_body_bytes
    return [("outward", SEGMENT.encode(), api_resource(gateways[0], max_body_bytes=limit))]
