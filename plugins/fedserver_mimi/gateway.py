"""
The MIMI gateway: what it does for application servers (the internal
interface, L{fedserver_mimi.gateway_api}) and what it answers other gateways
(the external interface: this component's RPCs, reached through the
federation pipeline as C{/federation/mimi/{rpc}}).

An application server acts for one application (its bearer token says
which).  It writes only its own application's clients, queues and groups.
It reads another application's clients, claims their KeyPackages and reads
its groups' group info only when that application uses the same identity
configuration, whether the other application is on this gateway
(C{app=ID}) or on another one (C{domain=D&app=ID}, through the external
interface).

External RPCs, each C{POST} with a JSON body naming the requesting
application as C{requester: {appId, identityConfiguration}}:

- C{list-apps} -> C{{apps: [{appId, name, identityConfiguration}]}}, the
  applications that federate;
- C{list-clients} C{{appId, tag}} -> C{{identities}};
- C{claim-key-package} C{{appId, clientId, protocolVersion, cipherSuite,
  appLabel, receiverClientId}} -> C{{keyPackage, isFinalKey}}; the receiver
  is C{receiverClientId} at the calling domain;
- C{group-info} C{{appId, groupId}} -> C{{groupId, epoch, groupInfo,
  ratchetTree?}};
- C{deliver-welcome} C{{groupId, epoch, welcome}} -> C{{welcomed}}: a
  Welcome for KeyPackages the calling gateway claimed here.

Claims and Welcome messages are kept by the calling domain, so a call
relayed through a relay hub (L{fedserver_relay.delegation}) is refused
(C{403 access-denied}): the gateway would take the hub's domain for the
caller's.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import attrs
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from twisted.logger import Logger
from zope.interface import implementer

from fedserver.errors import FederationError
from fedserver.interfaces import IComponentHandler
from fedserver.jsonapi import (
    RPC,
    APIError,
    RPCComponent,
    bad_request,
    boolean,
    domain,
    integer,
    json_list,
    json_object,
    text,
    uuid_id,
)
from fedserver.pipeline import RELAYED_MARKERS
from fedserver.rpc_client import RPCClient, unexpected_body
from fedserver.values import FederatedCall, Identity, Response
from fedserver_mimi.gateway_store import (
    DEFAULT_CLAIM_TTL,
    DEFAULT_WELCOMES_PER_CLIENT,
    MAX_LISTING,
    App,
    Claimed,
    Client,
    GatewayStore,
    NewKeyPackage,
    WelcomeTarget,
)
from fedserver_mimi.identity import BasicIdentityProvider, X509IdentityProvider
from fedserver_mimi.keypackage import (
    KeyPackage,
    KeyPackageError,
    parse_key_package,
    parse_key_package_message,
    verify_key_package_signature,
    verify_leaf_node_signature,
)
from fedserver_mimi.messages import (
    CONTENT_COMMIT,
    CONTENT_PROPOSAL,
    MLSMessageError,
    key_package_ref,
    parse_group_info,
    parse_handshake,
    parse_welcome,
)

log = Logger(namespace="fedserver_mimi.gateway")

#: the component name other gateways call
COMPONENT = "mimi"

CREDENTIAL_TYPES = {1: "basic", 2: "x509"}

#: an MLSMessage's version (mls10) and wire format (mls_key_package): KeyPackages are kept and served so framed
MLS_KEY_PACKAGE_HEADER = b"\x00\x01\x00\x05"

#: the largest identity configuration of another gateway's application taken from its list-apps, in characters of
#: JSON
MAX_IDENTITY_CONFIGURATION = 16 * 1024


@attrs.frozen
class GatewayLimits:
    """The gateway's bounds (configurable under C{[components.mimi]})."""

    key_packages_per_upload: int = 100
    key_packages_per_queue: int = 1000
    tags_per_client: int = 64
    tag_length: int = 256
    handle_bytes: int = 1024
    label_length: int = 64
    proposals_per_epoch: int = 100
    #: unconsumed KeyPackages one other domain may hold of one queue (and claims of its final key)
    claims_per_peer_per_queue: int = 100
    #: seconds after which a claim that no Welcome used is released
    claim_ttl: int = DEFAULT_CLAIM_TTL
    #: Welcome messages a client keeps at most
    welcomes_per_client: int = DEFAULT_WELCOMES_PER_CLIENT


def token_hash(token: str) -> str:
    """How a bearer token is stored and looked up: its SHA-256, hex."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def b64decode(value: Any, where: str, *, maximum: int) -> bytes:
    """Standard base64 (padded), decoded; C{400 bad-request} otherwise."""
    if not isinstance(value, str):
        raise bad_request(f"{where} must be a base64 string")
    if len(value) > maximum * 4 // 3 + 4:
        raise bad_request(f"{where} is longer than {maximum} bytes")
    try:
        data = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise bad_request(f"{where} is not standard base64") from None
    if not data:
        raise bad_request(f"{where} is empty")
    if len(data) > maximum:  # the length check above lets up to 2 more bytes through
        raise bad_request(f"{where} is longer than {maximum} bytes")
    return data


def b64encode(data: bytes) -> str:
    """Standard base64 (padded)."""
    return base64.b64encode(data).decode("ascii")


def group_id_text(group_id: bytes) -> str:
    """How an MLS group id is written in paths: base64url without padding."""
    return base64.urlsafe_b64encode(group_id).rstrip(b"=").decode("ascii")


def group_id_bytes(value: str) -> bytes:
    """The MLS group id of a path's C{groupId}; C{400 bad-request} if it is not base64url."""
    if not value or len(value) > 344 or not all(c.isalnum() or c in "-_" for c in value):
        raise bad_request(f"the group id {value[:80]!r} is not base64url without padding")
    try:
        data = base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))
    except (binascii.Error, ValueError):
        raise bad_request(f"the group id {value[:80]!r} is not base64url without padding") from None
    if group_id_text(data) != value:
        raise bad_request(f"the group id {value[:80]!r} is not canonical base64url without padding")
    return data


def identity_configuration(provider: Any) -> Dict[str, Any]:
    """
    An identity provider's type and parameters, as gateways compare them:
    two applications interoperate only when theirs are equal.
    """
    declared = getattr(provider, "identity_configuration", None)
    if isinstance(declared, Mapping):
        return dict(declared)
    if isinstance(provider, X509IdentityProvider):
        return {
            "type": "x509",
            "parameters": {
                "deviceRange": [provider.start, provider.end],
                "accountOffset": provider.account_offset,
                "domainOffset": provider.domain_offset,
                # the agreed trust roots (the draft leaves their negotiation open): SHA-256 of each, sorted
                "trustRoots": sorted(hashlib.sha256(der).hexdigest() for der in provider.trust_roots),
            },
        }
    if isinstance(provider, BasicIdentityProvider):
        return {"type": "basic"}
    return {"type": f"{type(provider).__module__}.{type(provider).__qualname__}"}


def _mls_error(where: str, error: ValueError) -> APIError:
    return APIError(400, "invalid-mls-message", f"{where}: {error}")


def client_json(client: Client) -> Dict[str, Any]:
    """A client as the API shows it."""
    return {"clientId": client.id, "clientIdentity": b64encode(client.handle), "tags": list(client.tags)}


@implementer(IComponentHandler)
class Gateway(RPCComponent):
    """
    The gateway's operations.  Every method takes the calling application
    (already authenticated) and fires with a JSON value, or fails with an
    L{APIError} or a labelled L{FederationError}.

    @param providers: the configured identity providers by name.
    """

    name = COMPONENT

    def __init__(
        self,
        store: GatewayStore,
        remote: RPCClient,
        providers: Mapping[str, Any],
        *,
        backend_domain: str,
        clock: Any,
        limits: GatewayLimits = GatewayLimits(),
        declared: Sequence[Tuple[str, str, str, str, bool]] = (),
        admin_token_hash: Optional[str] = None,
        queue: Callable[[], Any] = lambda: None,
        welcome_wait: float = 30.0,
    ) -> None:
        self.store = store
        #: gives the durable outbound queue (C{context.queue}) that Welcome messages for other gateways go through
        self.queue = queue
        #: seconds a commit waits for the Welcome to reach the other gateways before it answers C{queued}
        self.welcome_wait = welcome_wait
        self.remote = remote
        self.providers = dict(providers)
        self.backend_domain = backend_domain
        self.clock = clock
        self.limits = limits
        self._declared = tuple(declared)
        self._declared_recorded = False
        self.admin_token_hash = admin_token_hash
        #: token hash -> its application, for tokens that were valid once ready() had run; applications are
        #: never deleted and their tokens change only in ready() (at start), so an entry stays true
        self._apps_by_token: Dict[str, App] = {}

    def now(self) -> int:
        return int(self.clock.seconds())

    # applications and tokens

    async def ready(self) -> None:
        """
        Record the applications declared in the configuration, and retire
        those no longer declared, once (upserts: a race repeats them
        harmlessly).
        """
        if not self._declared_recorded:
            # retire first: an application declared again under a new id may reuse a retired one's token file
            retired = await self.store.retire_undeclared_apps(app_id for app_id, *_ in self._declared)
            for app_id in retired:
                log.warn("application {app} is no longer configured: its token no longer works and it no "
                         "longer federates (its data is kept)", app=app_id)
            for app_id, name, provider, digest, federate in self._declared:
                await self.store.upsert_declared_app(app_id, name, provider, digest, federate)
            self._declared_recorded = True

    def provider_of(self, app: App) -> Any:
        provider = self.providers.get(app.identity_provider)
        if provider is None:
            raise APIError(
                503, "identity-provider-missing",
                f"application {app.id} uses identity provider {app.identity_provider!r}, which is no longer "
                "configured",
            )
        return provider

    async def authenticate(self, token: Optional[str]) -> Tuple[Optional[App], bool]:
        """The application a bearer token belongs to, and whether it is the admin token."""
        await self.ready()
        if token is None:
            raise APIError(401, "missing-token", "send Authorization: Bearer TOKEN (an application's or the admin's)")
        digest = token_hash(token)
        if self.admin_token_hash is not None and digest == self.admin_token_hash:
            return None, True
        app = self._apps_by_token.get(digest)
        if app is None:
            app = await self.store.app_by_token(digest)
            if app is None:  # not remembered: an application created later must be found
                raise APIError(401, "invalid-token", "the bearer token is not an application's or the admin's")
            self._apps_by_token[digest] = app
        return app, False

    def app_json(self, app: App) -> Dict[str, Any]:
        """
        An application as the API shows it; C{identityConfiguration} is
        C{null} when its identity provider is no longer configured, so the
        admin can still list it and find the broken one.
        """
        answer = app.to_json()
        answer["identityProvider"] = app.identity_provider
        provider = self.providers.get(app.identity_provider)
        answer["identityConfiguration"] = None if provider is None else identity_configuration(provider)
        return answer

    async def create_app(self, name: str, provider: str, federate: bool, token: str) -> Dict[str, Any]:
        if provider not in self.providers:
            known = ", ".join(sorted(self.providers)) or "none"
            raise bad_request(f"there is no identity provider {provider[:80]!r} (configured: {known})")
        app = await self.store.create_app(name, provider, token_hash(token), federate)
        answer = self.app_json(app)
        answer["token"] = token
        return answer

    async def require_app(self, app_id: str) -> App:
        app = await self.store.app(app_id)
        if app is None or app.retired:  # a retired application is not there for anybody (its data is kept)
            raise APIError(404, "not-found", f"there is no application {app_id}")
        return app

    async def target_app(self, caller: App, app_id: Optional[str]) -> App:
        """
        The application a read or claim by C{caller} is for: itself, or
        another application on this gateway with the same identity
        configuration.
        """
        if app_id is None or app_id == caller.id:
            return caller
        app = await self.require_app(app_id)
        self.require_same_identity(app, identity_configuration(self.provider_of(caller)), f"application {caller.id}")
        return app

    def require_same_identity(self, app: App, theirs: Any, who: str) -> None:
        ours = identity_configuration(self.provider_of(app))
        if ours != theirs:
            raise APIError(
                409, "identity-mismatch",
                f"application {app.id} uses the identity configuration {ours}, and {who} uses {theirs}; "
                "applications federate only with the same identity provider configuration",
            )

    # clients

    def handle_bytes(self, value: Any, where: str) -> bytes:
        return b64decode(value, where, maximum=self.limits.handle_bytes)

    def tags(self, value: Any, where: str) -> List[str]:
        items = json_list(value, where, maximum=self.limits.tags_per_client)
        return [text(t, f"a tag of {where}", maximum=self.limits.tag_length) for t in items]

    async def register_client(self, app: App, body: Mapping[str, Any]) -> Dict[str, Any]:
        request = json_object(body, "the request body", required=("clientHandle",), optional=("tags",))
        handle = self.handle_bytes(request["clientHandle"], "clientHandle")
        tags = self.tags(request.get("tags", []), "tags")
        client_id = await self.store.register_client(app.id, handle, tags)
        log.info("application {app} registered client {client}", app=app.id, client=client_id)
        return {"clientId": client_id}

    async def patch_client(self, app: App, client_id: str, body: Mapping[str, Any]) -> Dict[str, Any]:
        request = json_object(body, "the request body", optional=("clientHandle", "tagsToAdd", "tagsToRemove"))
        handle = self.handle_bytes(request["clientHandle"], "clientHandle") if "clientHandle" in request else None
        add = self.tags(request.get("tagsToAdd", []), "tagsToAdd")
        remove = self.tags(request.get("tagsToRemove", []), "tagsToRemove")
        client = await self.store.patch_client(app.id, client_id, handle, add, remove, self.limits.tags_per_client)
        return client_json(client)

    async def list_clients(
        self, caller: App, tag: str, *, where: Optional[str], app_id: Optional[str], request_id: str
    ) -> Dict[str, Any]:
        if where is not None and where != self.backend_domain:
            if app_id is None:
                raise bad_request("listing another gateway's clients needs app=ID, the application there")
            answer = await self.call_remote(caller, where, "list-clients", {"appId": app_id, "tag": tag}, request_id)
            identities = remote_identities(answer, where)
            # the handles listed, to check the KeyPackages claimed from these clients later
            await self.store.record_remote_clients(
                where, app_id, [(i["clientId"], base64.b64decode(i["clientIdentity"])) for i in identities],
                keep=self.limits.claim_ttl,
            )
            return {"identities": identities}
        target = await self.target_app(caller, app_id)
        clients = await self.store.clients_by_tag(target.id, tag)
        return {"identities": [client_json(c) for c in clients]}

    # key queues and KeyPackages

    async def create_queue(self, app: App, client_id: str, body: Mapping[str, Any]) -> Dict[str, Any]:
        request = json_object(body, "the request body", required=("protocolVersion", "cipherSuite"),
                              optional=("appLabel",))
        version = integer(request["protocolVersion"], "protocolVersion", minimum=1, maximum=0xFFFF)
        suite = integer(request["cipherSuite"], "cipherSuite", minimum=1, maximum=0xFFFF)
        label = self.app_label(request.get("appLabel", ""), "appLabel")
        queue_id = await self.store.create_queue(app.id, client_id, version, suite, label)
        return {"queueId": queue_id}

    def app_label(self, value: Any, where: str) -> str:
        if value == "":
            return ""
        return text(value, where, maximum=self.limits.label_length)

    async def queues(self, app: App, client_id: str) -> Dict[str, Any]:
        rows = await self.store.queues(app.id, client_id)
        return {
            "queues": [
                {
                    "queueId": q.id, "protocolVersion": q.protocol_version, "cipherSuite": q.cipher_suite,
                    "appLabel": q.app_label, "keyPackagesInPool": count, "hasFinalKey": q.has_final_key,
                }
                for q, count in rows
            ]
        }

    async def fill_queue(self, app: App, client_id: str, queue_id: str, body: Mapping[str, Any]) -> Dict[str, Any]:
        request = json_object(body, "the request body", optional=("keyPackages", "isReset", "finalKey"))
        encoded = json_list(request.get("keyPackages", []), "keyPackages", maximum=self.limits.key_packages_per_upload)
        reset = boolean(request.get("isReset", False), "isReset")
        queue = await self.store.queue(app.id, client_id, queue_id)
        client = await self.store.client(app.id, client_id)
        provider = self.provider_of(app)
        checked = []
        for i, value in enumerate(encoded):
            checked.append(await self.check_key_package(value, f"keyPackages[{i}]", queue, client, provider))
        final = None
        if "finalKey" in request:
            final = await self.check_key_package(request["finalKey"], "finalKey", queue, client, provider)
        available = await self.store.fill_queue(
            app.id, client_id, queue_id, checked, reset=reset, final_key=final,
            max_in_pool=self.limits.key_packages_per_queue,
        )
        log.info(
            "application {app} filed {count} KeyPackages in queue {queue} of client {client}; {available} available",
            app=app.id, count=len(checked), queue=queue_id, client=client_id, available=available,
        )
        return {"keyPackagesInPool": available}

    async def check_key_package(
        self, value: Any, where: str, queue: Any, client: Client, provider: Any
    ) -> NewKeyPackage:
        """
        Decode, parse and check one KeyPackage for C{queue} of C{client}:
        the queue's version and cipher suite, what L{check_credential}
        checks, and a credential that gives the client's handle.
        """
        data = b64decode(value, where, maximum=64 * 1024)
        kp = parse_uploaded(data, where)
        if (kp.version, kp.cipher_suite) != (queue.protocol_version, queue.cipher_suite):
            raise APIError(
                422, "key-package-mismatch",
                f"{where} is for protocol version {kp.version} and cipher suite {kp.cipher_suite}, but queue "
                f"{queue.id} holds version {queue.protocol_version} and cipher suite {queue.cipher_suite}",
            )
        handle = await self.check_credential(kp, where, provider)
        if handle.encode("utf-8") != client.handle:
            raise APIError(
                422, "key-package-mismatch",
                f"{where} has the client handle {handle[:120]!r}, but client {client.id} is registered as "
                f"{client.handle[:120].decode('utf-8', 'replace')!r}",
            )
        return NewKeyPackage(ref=key_package_ref(kp), data=MLS_KEY_PACKAGE_HEADER + kp.raw,
                             not_before=kp.lifetime.not_before, not_after=kp.lifetime.not_after)

    async def check_credential(self, kp: KeyPackage, where: str, provider: Any) -> str:
        """
        Check a parsed KeyPackage as every one the gateway takes (uploaded,
        or claimed from another gateway): both signatures, a lifetime that
        has not ended, a credential that C{provider} accepts now and, for
        x509, whose leaf certificate's key is the LeafNode's signature key;
        fire with the client handle the credential gives.  C{422
        invalid-key-package}, C{key-package-expired} or C{invalid-credential}
        otherwise.
        """
        check_signatures(kp, where)
        now = self.now()
        if kp.lifetime.not_after < now:
            raise APIError(422, "key-package-expired", f"{where} expired at {kp.lifetime.not_after} (now {now})")
        identity = identity_of(kp, where)
        try:
            await provider.validate(identity, (), {"msg_timestamp": now})
            handle = provider.client_handle(identity)
        except FederationError as e:
            raise APIError(422, "invalid-credential", f"{where}: {e.message}") from None
        if identity.credential_type == "x509" and leaf_signature_key(kp.credential.certificates[0]) != \
                kp.leaf_node.signature_key:
            # else anyone could present somebody else's (public) chain with a key of their own
            raise APIError(
                422, "invalid-credential",
                f"{where}: the public key of the leaf certificate is not the LeafNode's signature_key "
                "(RFC 9420, section 5.3.1)",
            )
        return str(handle)

    async def claim(
        self,
        caller: App,
        client_id: str,
        version: int,
        suite: int,
        label: str,
        receiver_client_id: str,
        *,
        where: Optional[str],
        app_id: Optional[str],
        request_id: str,
    ) -> Dict[str, Any]:
        local = where is None or where == self.backend_domain
        # the receiver is one of the caller's clients: checked first, within the claim's own transaction when
        # the claim is from the caller's application (nothing else comes before it then)
        receiver_client = (caller.id, receiver_client_id) if local and app_id in (None, caller.id) else None
        if receiver_client is None:
            await self.store.client(caller.id, receiver_client_id)
        if where is not None and not local:
            if app_id is None:
                raise bad_request("claiming from another gateway needs app=ID, the application there")
            answer = await self.call_remote(
                caller, where, "claim-key-package",
                {"appId": app_id, "clientId": client_id, "protocolVersion": version, "cipherSuite": suite,
                 "appLabel": label, "receiverClientId": receiver_client_id},
                request_id,
            )
            data = await self.remote_key_package(
                answer, where, version, suite, self.provider_of(caller),
                await self.store.remote_client_handle(where, app_id, client_id, self.limits.claim_ttl), client_id,
            )
            try:
                await self.store.record_remote_claim(key_package_ref(data), where, app_id, client_id, caller.id)
            except APIError as e:
                if e.label != "key-package-exists":
                    raise
                raise unexpected_body(where, f"/federation/{COMPONENT}/claim-key-package", e.message) from None
            return {"keyPackage": b64encode(MLS_KEY_PACKAGE_HEADER + data.raw), "isFinalKey": answer["isFinalKey"]}
        target = await self.target_app(caller, app_id)
        claimed = await self.store.claim(
            target.id, client_id, version, suite, label, f"{self.backend_domain}/{receiver_client_id}",
            receiver_client=receiver_client, claim_ttl=self.limits.claim_ttl,
        )
        return claimed_json(claimed)

    async def remote_key_package(
        self, answer: Any, where: str, version: int, suite: int, provider: Any, handle: Optional[bytes],
        client_id: str,
    ) -> KeyPackage:
        """
        The KeyPackage another gateway answered a claim with, checked as an
        upload is (L{check_credential}, with the claiming application's
        identity provider C{provider}), for the version and suite asked
        for, and with C{handle} as its client handle when it is known (from
        that gateway's C{list-clients}); C{533 federation-unexpected-body}
        otherwise.
        """
        path = f"/federation/{COMPONENT}/claim-key-package"
        try:
            answer = json_object(answer, "the answer", required=("keyPackage", "isFinalKey"), strict=False)
            boolean(answer["isFinalKey"], "isFinalKey")
            data = b64decode(answer["keyPackage"], "keyPackage", maximum=64 * 1024)
            kp = parse_uploaded(data, "the KeyPackage")
        except APIError as e:
            raise unexpected_body(where, path, e.message) from None
        if (kp.version, kp.cipher_suite) != (version, suite):
            raise unexpected_body(
                where, path, f"a KeyPackage for version {kp.version} and cipher suite {kp.cipher_suite}, "
                f"not the {version} and {suite} asked for",
            )
        try:
            given = await self.check_credential(kp, "the KeyPackage", provider)
        except APIError as e:
            raise unexpected_body(where, path, e.message) from None
        if handle is not None and given.encode("utf-8") != handle:
            raise unexpected_body(
                where, path, f"a KeyPackage with the client handle {given[:120]!r}, but it listed client {client_id} "
                f"as {handle[:120].decode('utf-8', 'replace')!r}",
            )
        return kp

    # groups

    async def create_group(self, app: App, body: Mapping[str, Any]) -> Dict[str, Any]:
        request = json_object(body, "the request body", required=("groupInfo",), optional=("ratchetTree",))
        group_info = b64decode(request["groupInfo"], "groupInfo", maximum=1 << 20)
        tree = b64decode(request["ratchetTree"], "ratchetTree", maximum=1 << 20) if "ratchetTree" in request else None
        try:
            info = parse_group_info(group_info)
        except MLSMessageError as e:
            raise _mls_error("groupInfo", e) from None
        if info.epoch != 0:
            raise APIError(422, "bad-epoch", f"a new group starts at epoch 0; groupInfo is for epoch {info.epoch}")
        group_id = group_id_text(info.group_id)
        await self.store.create_group(app.id, group_id, info.cipher_suite, group_info, tree)
        log.info("application {app} created group {group}", app=app.id, group=group_id)
        return {"groupId": group_id, "epoch": 0}

    async def add_proposal(self, app: App, group_id: str, body: Mapping[str, Any]) -> Dict[str, Any]:
        request = json_object(body, "the request body", required=("proposal",))
        proposal = b64decode(request["proposal"], "proposal", maximum=1 << 20)
        summary = self.handshake(proposal, "proposal", group_id, CONTENT_PROPOSAL)
        await self.store.add_proposal(app.id, group_id, summary.epoch, proposal, self.limits.proposals_per_epoch)
        return {"epoch": summary.epoch}

    async def proposals(self, app: App, group_id: str, start: int = 0) -> Dict[str, Any]:
        epoch, proposals, truncated = await self.store.proposals(app.id, group_id, start)
        return {"epoch": epoch, "proposals": [b64encode(p) for p in proposals], "truncated": truncated}

    def handshake(self, data: bytes, where: str, group_id: str, content_type: int) -> Any:
        try:
            summary = parse_handshake(data)
        except MLSMessageError as e:
            raise _mls_error(where, e) from None
        if summary.content_type != content_type:
            kind = {CONTENT_PROPOSAL: "proposal", CONTENT_COMMIT: "commit"}[content_type]
            raise APIError(422, "wrong-content-type", f"{where} is not a {kind} (content type {summary.content_type})")
        if group_id_text(summary.group_id) != group_id:
            raise APIError(
                422, "wrong-group", f"{where} is for group {group_id_text(summary.group_id)}, not {group_id}"
            )
        return summary

    async def commit(self, app: App, group_id: str, body: Mapping[str, Any], request_id: str) -> Dict[str, Any]:
        request = json_object(body, "the request body", required=("commitPacket",),
                              optional=("groupInfo", "welcomePacket", "ratchetTree"))
        group = await self.store.group(app.id, group_id)
        commit = b64decode(request["commitPacket"], "commitPacket", maximum=1 << 20)
        epoch = self.handshake(commit, "commitPacket", group_id, CONTENT_COMMIT).epoch
        group_info = None
        if "groupInfo" in request:
            group_info = b64decode(request["groupInfo"], "groupInfo", maximum=1 << 20)
            try:
                info = parse_group_info(group_info)
            except MLSMessageError as e:
                raise _mls_error("groupInfo", e) from None
            if group_id_text(info.group_id) != group_id or info.epoch != epoch + 1:
                raise APIError(
                    422, "bad-epoch",
                    f"groupInfo is for group {group_id_text(info.group_id)} at epoch {info.epoch}; the commit "
                    f"makes group {group_id} epoch {epoch + 1}",
                )
        tree = b64decode(request["ratchetTree"], "ratchetTree", maximum=1 << 20) if "ratchetTree" in request else None
        welcome = None
        refs: Tuple[bytes, ...] = ()
        if "welcomePacket" in request:
            welcome = b64decode(request["welcomePacket"], "welcomePacket", maximum=1 << 20)
            try:
                summary = parse_welcome(welcome)
            except MLSMessageError as e:
                raise _mls_error("welcomePacket", e) from None
            if summary.cipher_suite != group.cipher_suite:
                raise APIError(
                    422, "key-package-mismatch",
                    f"the Welcome is for cipher suite {summary.cipher_suite}; group {group_id} uses "
                    f"{group.cipher_suite}",
                )
            refs = summary.new_members
        # only the KeyPackages this application claimed from other gateways: another one's are not its to use
        remote = await self.store.remote_claims(refs, app.id)
        failed: List[Dict[str, Any]] = []
        outgoing = self.welcome_items(app, group_id, epoch + 1, welcome, remote, failed, request_id)
        queue = self.queue()
        welcomed = await self.store.commit(
            app.id, group_id, epoch, commit, group_info, tree, welcome, refs, list(remote), self.backend_domain,
            max_welcomes=self.limits.welcomes_per_client,
            outbox=(lambda cursor: queue.insert(cursor, outgoing)) if outgoing else None,
        )
        log.info("group {group} of application {app} moved to epoch {epoch}", group=group_id, app=app.id,
                 epoch=epoch + 1)
        answer: Dict[str, Any] = {
            "epoch": epoch + 1,
            "welcomed": [{"domain": self.backend_domain, "clientId": t.client_id} for t in welcomed],
            "queued": [],
            "failed": failed,
        }
        if outgoing:
            await self.send_welcomes(outgoing, answer, request_id)
        return answer

    def welcome_items(
        self, app: App, group_id: str, epoch: int, welcome: Optional[bytes],
        remote: Mapping[bytes, Tuple[str, str, str]], failed: List[Dict[str, Any]], request_id: str,
    ) -> List[Any]:
        """
        The Welcome's C{deliver-welcome} for every other gateway whose
        KeyPackages it consumes, as items of the outbound queue (an
        application that does not federate sends none: each gateway is
        added to C{failed}).
        """
        domains = sorted({d for d, _, _ in remote.values()}) if welcome is not None else []
        if not domains:
            return []
        if not app.federate:
            refusal = APIError(403, "federation-disabled", f"application {app.id} does not federate (federate = false)")
            failed.extend({"domain": where, "error": refusal.to_json()} for where in domains)
            return []
        queue = self.queue()
        if queue is None:
            raise FederationError("this gateway has no outbound queue for Welcome messages", "federation-not-available")
        body = {"groupId": group_id, "epoch": epoch, "welcome": b64encode(welcome or b""),
                "requester": {"appId": app.id, "identityConfiguration": identity_configuration(self.provider_of(app))}}
        data = json.dumps(body).encode("utf-8")
        return [queue.item(where, COMPONENT, "deliver-welcome", data, request_id=request_id) for where in domains]

    async def send_welcomes(self, outgoing: Sequence[Any], answer: Dict[str, Any], request_id: str) -> None:
        """
        Deliver the queued Welcome to the other gateways, waiting at most
        C{welcome_wait} seconds: a gateway that took it adds its clients to
        C{welcomed}; one that refused it for good is in C{failed}; one not
        reached yet is in C{queued} (with the error of the attempt, if one
        was made), and the queue goes on trying (docs/queue.md).
        """
        path = f"/federation/{COMPONENT}/deliver-welcome"
        attempts = await self.queue().submitted(outgoing, wait=self.welcome_wait)
        for attempt in attempts:
            where = attempt.destination
            if attempt.state == "delivered":
                try:
                    delivered = json_object(json.loads(attempt.response.body), "the answer", required=("welcomed",),
                                            strict=False)
                    welcomed = json_list(delivered["welcomed"], "welcomed", maximum=MAX_LISTING)
                except (ValueError, RecursionError, APIError):  # iterating a peer's number was a 500 after the commit
                    error = unexpected_body(where, path, "an object without the list 'welcomed'").to_json()
                    answer["failed"].append({"domain": where, "error": error})
                    continue
                for client_id in welcomed:
                    answer["welcomed"].append({"domain": where, "clientId": str(client_id)[:64]})
            elif attempt.state == "dead":
                log.warn("the Welcome (item {id}) was refused by {domain}: {label} [request {request_id}]",
                         id=attempt.item_id, domain=where, label=(attempt.error or {}).get("label"),
                         request_id=request_id)
                answer["failed"].append({"domain": where, "error": attempt.error})
            else:
                entry: Dict[str, Any] = {"domain": where}
                if attempt.error is not None:
                    entry["error"] = attempt.error
                answer["queued"].append(entry)

    async def group_info(
        self, caller: App, group_id: str, *, where: Optional[str], app_id: Optional[str], request_id: str
    ) -> Dict[str, Any]:
        if where is not None and where != self.backend_domain:
            if app_id is None:
                raise bad_request("reading another gateway's group needs app=ID, the application there")
            answer = await self.call_remote(caller, where, "group-info", {"appId": app_id, "groupId": group_id},
                                            request_id)
            return remote_group_info(answer, where, group_id)
        target = await self.target_app(caller, app_id)
        group = await self.store.group(target.id, group_id)
        answer = {"groupId": group.id, "epoch": group.epoch, "groupInfo": b64encode(group.group_info)}
        if group.ratchet_tree is not None:
            answer["ratchetTree"] = b64encode(group.ratchet_tree)
        return answer

    async def control_messages(self, app: App, group_id: str, start: int, end: Optional[int]) -> Dict[str, Any]:
        epoch, commits, truncated = await self.store.commits(app.id, group_id, start, end)
        return {
            "epoch": epoch,
            "messages": [{"epoch": e, "commitPacket": b64encode(c)} for e, c in commits],
            "truncated": truncated,
        }

    async def welcomes(self, app: App, client_id: str, since: int) -> Dict[str, Any]:
        rows, truncated = await self.store.welcomes(app.id, client_id, since)
        return {
            "welcomeMessages": [
                {"id": i, "domain": origin, "groupId": group, "epoch": epoch, "welcomePacket": b64encode(w)}
                for i, origin, group, epoch, w in rows
            ],
            "truncated": truncated,
        }

    # the external interface

    async def call_remote(self, caller: App, where: str, rpc: str, body: Dict[str, Any], request_id: str) -> Any:
        """Call C{rpc} of the gateway of C{where} for C{caller}."""
        if not caller.federate:
            raise APIError(403, "federation-disabled", f"application {caller.id} does not federate (federate = false)")
        body = dict(body)
        body["requester"] = {"appId": caller.id,
                             "identityConfiguration": identity_configuration(self.provider_of(caller))}
        answer = await self.remote.call(where, COMPONENT, rpc, body, request_id)
        if not isinstance(answer, dict):
            raise unexpected_body(where, f"/federation/{COMPONENT}/{rpc}", "a JSON value that is not an object")
        return answer

    async def remote_apps(self, caller: App, where: str, request_id: str) -> Dict[str, Any]:
        """The applications of C{where}'s gateway that federate, as its C{list-apps} gives them, checked."""
        return {"apps": remote_apps(await self.call_remote(caller, where, "list-apps", {}, request_id), where)}

    async def _handle(self, call: FederatedCall) -> Response:
        if any(call.header(name) is not None for name in RELAYED_MARKERS):
            # claims and Welcome messages are keyed on the calling domain, which here would be the hub's
            refusal = APIError(
                403, "access-denied",
                "relayed calls are not accepted by the MIMI gateway: the gateway of the calling domain must call it "
                "itself",
            )
            log.info("{component} refused {rpc} from {origin}, relayed by a hub: {label} [request {request_id}]",
                     component=self.name, rpc=call.rpc[:80], origin=call.origin_domain, label=refusal.label,
                     request_id=call.request_id)
            return refusal.response()
        return await super()._handle(call)

    def rpcs(self) -> Dict[str, RPC]:
        return {
            "list-apps": self._rpc_list_apps,
            "list-clients": self._rpc_list_clients,
            "claim-key-package": self._rpc_claim,
            "group-info": self._rpc_group_info,
            "deliver-welcome": self._rpc_deliver_welcome,
        }

    async def _federating_app(self, body: Mapping[str, Any], origin: str) -> App:
        """The federating application a peer's request is for, after the identity check."""
        await self.ready()
        app_id = uuid_id(body["appId"], "appId")
        requester = json_object(body.get("requester"), "requester", required=("appId", "identityConfiguration"),
                                strict=False)
        app = await self.store.app(app_id)
        if app is None or not app.federate or app.retired:
            raise APIError(404, "not-found", f"{self.backend_domain} has no federating application {app_id}")
        self.require_same_identity(app, requester["identityConfiguration"],
                                   f"application {str(requester['appId'])[:40]} of {origin}")
        return app

    async def _rpc_list_apps(self, call: FederatedCall, body: Any) -> Any:
        await self.ready()
        apps = await self.store.apps(federating_only=True)
        return {"apps": [{"appId": a.id, "name": a.name,
                          "identityConfiguration": identity_configuration(self.provider_of(a))} for a in apps
                         if a.identity_provider in self.providers]}

    async def _rpc_list_clients(self, call: FederatedCall, body: Any) -> Any:
        request = json_object(body, "the body", required=("appId", "tag", "requester"), strict=False)
        app = await self._federating_app(request, call.origin_domain)
        tag = text(request["tag"], "tag", maximum=self.limits.tag_length)
        return {"identities": [client_json(c) for c in await self.store.clients_by_tag(app.id, tag)]}

    async def _rpc_claim(self, call: FederatedCall, body: Any) -> Any:
        request = json_object(
            body, "the body",
            required=("appId", "clientId", "protocolVersion", "cipherSuite", "receiverClientId", "requester"),
            optional=("appLabel",), strict=False,
        )
        app = await self._federating_app(request, call.origin_domain)
        client_id = uuid_id(request["clientId"], "clientId")
        version = integer(request["protocolVersion"], "protocolVersion", minimum=1, maximum=0xFFFF)
        suite = integer(request["cipherSuite"], "cipherSuite", minimum=1, maximum=0xFFFF)
        label = self.app_label(request.get("appLabel", ""), "appLabel")
        receiver = uuid_id(request["receiverClientId"], "receiverClientId")
        origin = domain(call.origin_domain, "the calling domain")
        # the receiver is a client of the calling domain, which names it as it likes: so that a peer cannot take a
        # queue's KeyPackages for receivers it makes up, it holds at most claims_per_peer_per_queue at once
        claimed = await self.store.claim(
            app.id, client_id, version, suite, label, f"{origin}/{receiver}", claim_ttl=self.limits.claim_ttl,
            max_per_origin=self.limits.claims_per_peer_per_queue,
        )
        log.info("{origin} claimed a KeyPackage of client {client} for {receiver}", origin=call.origin_domain,
                 client=client_id, receiver=receiver)
        return claimed_json(claimed)

    async def _rpc_group_info(self, call: FederatedCall, body: Any) -> Any:
        request = json_object(body, "the body", required=("appId", "groupId", "requester"), strict=False)
        app = await self._federating_app(request, call.origin_domain)
        group_id = text(request["groupId"], "groupId", maximum=344)
        group_id_bytes(group_id)
        group = await self.store.group(app.id, group_id)
        answer = {"groupId": group.id, "epoch": group.epoch, "groupInfo": b64encode(group.group_info)}
        if group.ratchet_tree is not None:
            answer["ratchetTree"] = b64encode(group.ratchet_tree)
        return answer

    async def _rpc_deliver_welcome(self, call: FederatedCall, body: Any) -> Any:
        await self.ready()
        request = json_object(body, "the body", required=("groupId", "epoch", "welcome"), strict=False)
        group_id = text(request["groupId"], "groupId", maximum=344)
        group_id_bytes(group_id)
        epoch = integer(request["epoch"], "epoch", minimum=1, maximum=2**63 - 1)
        welcome = b64decode(request["welcome"], "welcome", maximum=1 << 20)
        try:
            summary = parse_welcome(welcome)
        except MLSMessageError as e:
            raise _mls_error("welcome", e) from None
        welcomed: List[WelcomeTarget] = await self.store.deliver_welcome(
            call.origin_domain, group_id, epoch, welcome, summary.new_members,
            max_welcomes=self.limits.welcomes_per_client,
        )
        log.info("{origin} delivered the Welcome of group {group} epoch {epoch} to {count} clients",
                 origin=call.origin_domain, group=group_id, epoch=epoch, count=len(welcomed))
        return {"welcomed": [t.client_id for t in welcomed]}


def claimed_json(claimed: Claimed) -> Dict[str, Any]:
    return {"keyPackage": b64encode(claimed.key_package), "isFinalKey": claimed.is_final_key}


def parse_uploaded(data: bytes, where: str) -> KeyPackage:
    """A KeyPackage as an MLSMessage (C{mls_key_package}) or bare."""
    try:
        if data[:4] == MLS_KEY_PACKAGE_HEADER:
            return parse_key_package_message(data)
        return parse_key_package(data)
    except KeyPackageError as e:
        raise APIError(400, "invalid-key-package", f"{where}: {e}") from None


def check_signatures(kp: KeyPackage, where: str) -> None:
    try:
        valid = verify_leaf_node_signature(kp) and verify_key_package_signature(kp)
    except (KeyPackageError, ValueError) as e:
        raise APIError(422, "invalid-key-package", f"{where}: {e}") from None
    if not valid:
        raise APIError(422, "invalid-key-package", f"{where} has a signature that does not verify")


def leaf_signature_key(der: bytes) -> Optional[bytes]:
    """
    The public key of a DER certificate as an MLS signature_key: raw for
    EdDSA, the uncompressed point for ECDSA (RFC 9420, section 5.1.1);
    C{None} if it cannot be read.
    """
    try:
        key = x509.load_der_x509_certificate(der).public_key()
    except ValueError:
        return None
    if isinstance(key, (ed25519.Ed25519PublicKey, ed448.Ed448PublicKey)):
        return key.public_bytes(Encoding.Raw, PublicFormat.Raw)
    if isinstance(key, ec.EllipticCurvePublicKey):
        return key.public_bytes(Encoding.X962, PublicFormat.UncompressedPoint)
    return key.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)


def identity_of(kp: KeyPackage, where: str) -> Identity:
    credential = kp.credential
    kind = CREDENTIAL_TYPES.get(credential.credential_type)
    if kind is None:
        raise APIError(
            422, "invalid-credential", f"{where} has a credential of type {credential.credential_type}, which the "
            "gateway's identity providers do not know",
        )
    content: Any = credential.identity if kind == "basic" else list(credential.certificates)
    return Identity(credential_type=kind, credential=content, public_key=kp.leaf_node.signature_key)


def remote_identities(answer: Mapping[str, Any], where: str) -> List[Dict[str, Any]]:
    """Another gateway's C{list-clients} answer, checked and rebuilt from its known fields only."""
    path = f"/federation/{COMPONENT}/list-clients"
    try:
        items = json_list(json_object(answer, "the answer", required=("identities",), strict=False)["identities"],
                          "identities", maximum=1000)
        identities = []
        for item in items:
            entry = json_object(item, "an identity", required=("clientId", "clientIdentity", "tags"), strict=False)
            b64decode(entry["clientIdentity"], "clientIdentity", maximum=64 * 1024)
            tags = json_list(entry["tags"], "tags", maximum=1000)
            identities.append({
                "clientId": uuid_id(entry["clientId"], "clientId"),
                "clientIdentity": entry["clientIdentity"],
                "tags": [text(t, "a tag", maximum=1024) for t in tags],
            })
    except APIError as e:
        raise unexpected_body(where, path, e.message) from None
    return identities


def remote_identity_configuration(value: Any) -> Dict[str, Any]:
    """
    Another gateway's identity configuration of an application, rebuilt
    from its known fields: C{type} (text) and C{parameters} (an object of
    at most L{MAX_IDENTITY_CONFIGURATION} characters of JSON);
    C{400 bad-request} otherwise.
    """
    config = json_object(value, "identityConfiguration", required=("type",), strict=False)
    rebuilt: Dict[str, Any] = {"type": text(config["type"], "the identity configuration's type", maximum=256)}
    if "parameters" in config:
        parameters = json_object(config["parameters"], "the identity configuration's parameters", strict=False)
        try:
            size = len(json.dumps(parameters, ensure_ascii=False))
        except (ValueError, RecursionError):
            raise bad_request("the identity configuration's parameters cannot be written as JSON") from None
        if size > MAX_IDENTITY_CONFIGURATION:
            raise bad_request(f"the identity configuration's parameters are longer than {MAX_IDENTITY_CONFIGURATION} "
                              "characters of JSON")
        rebuilt["parameters"] = parameters
    return rebuilt


def remote_apps(answer: Mapping[str, Any], where: str) -> List[Dict[str, Any]]:
    """Another gateway's C{list-apps} answer, checked and rebuilt from its known fields only."""
    path = f"/federation/{COMPONENT}/list-apps"
    try:
        items = json_list(json_object(answer, "the answer", required=("apps",), strict=False)["apps"], "apps",
                          maximum=MAX_LISTING)
        apps = []
        for item in items:
            entry = json_object(item, "an application", required=("appId", "name", "identityConfiguration"),
                                strict=False)
            apps.append({
                "appId": uuid_id(entry["appId"], "appId"),
                "name": text(entry["name"], "name", maximum=128),
                "identityConfiguration": remote_identity_configuration(entry["identityConfiguration"]),
            })
    except APIError as e:
        raise unexpected_body(where, path, e.message) from None
    return apps


def remote_group_info(answer: Mapping[str, Any], where: str, group_id: str) -> Dict[str, Any]:
    """Another gateway's C{group-info} answer, checked: a GroupInfo of the group asked for, at its epoch."""
    path = f"/federation/{COMPONENT}/group-info"
    try:
        fields = json_object(answer, "the answer", required=("groupId", "epoch", "groupInfo"), strict=False)
        data = b64decode(fields["groupInfo"], "groupInfo", maximum=1 << 20)
        info = parse_group_info(data)
        epoch = integer(fields["epoch"], "epoch", minimum=0, maximum=2**63 - 1)
        tree = fields.get("ratchetTree")
        if tree is not None:
            b64decode(tree, "ratchetTree", maximum=1 << 20)
    except APIError as e:
        raise unexpected_body(where, path, e.message) from None
    except MLSMessageError as e:
        raise unexpected_body(where, path, f"a groupInfo that is not a GroupInfo: {e}") from None
    # a commit sent without a new GroupInfo leaves the last one, of an earlier epoch, in place
    if fields["groupId"] != group_id or group_id_text(info.group_id) != group_id or info.epoch > epoch:
        raise unexpected_body(where, path, f"the GroupInfo of group {group_id_text(info.group_id)} epoch {info.epoch}, "
                              f"not of group {group_id}")
    answer = {"groupId": group_id, "epoch": epoch, "groupInfo": fields["groupInfo"]}
    if tree is not None:
        answer["ratchetTree"] = tree
    return answer
