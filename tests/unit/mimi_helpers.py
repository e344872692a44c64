"""
Helpers for the tests of the MIMI gateway (L{fedserver_mimi.gateway}).

A gateway is built as at startup: its identity providers and the component
itself by their plugins' factories through a registry (so the configuration
is parsed and checked), its data in a real L{Store} (a SQLite file under
C{tmp_path}; the adbapi threads need the real reactor, so these tests run
under pytest-twisted, each step bounded), and its internal interface is the
resource the plugin's C{fedserver_resources} hook mounts, served by a real
L{FederationSite} over an in-memory connection: bearer tokens, query
strings, body limits and labelled errors all take the production path.
The gateway's clock is a L{Clock} set to L{NOW}, so lifetimes are exact.

Several gateways are joined by real pipelines with
L{tests.unit.wire_helpers.federate}.
"""

from __future__ import annotations

import base64
import datetime
import json
import os
import urllib.parse
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import attrs
import nacl.signing
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat
from twisted.internet.task import Clock

import fedserver_mimi.identity
import fedserver_mimi.plugin
from fedserver.config import Options
from fedserver.context import Context
from fedserver.storage import Store
from fedserver.values import FederatedCall, Peer, Response
from fedserver.web import FederationSite, ListenerRoot
from fedserver_mimi import encode
from fedserver_mimi.gateway import Gateway
from fedserver_mimi.keypackage import parse_key_package, parse_key_package_message
from fedserver_mimi.messages import CONTENT_COMMIT, key_package_ref
from tests.unit.helpers import HTTPAnswer, HTTPConnection, build_plugin, parse_answer
from tests.unit.test_mimi_identity import certificate, new_key
from tests.unit.wire_helpers import bounded, context_for, start_queue, stop_queue, with_queue

#: the gateways' clock: 2026-01-01T00:00:00Z
NOW = 1_767_225_600
HOUR = 3600
DAY = 24 * HOUR

#: the ids of the applications most tests declare
CHAT = "6c1d3ad0-5b0e-4b6e-9d43-5a2a3c0f7e11"
OTHER = "0f1e2d3c-4b5a-4968-8776-a5b4c3d2e1f0"
LOCAL = "11111111-2222-4333-8444-555555555555"
CERTS = "9e8d7c6b-5a49-4837-a625-140f2e3d4c5b"
UNKNOWN = "00000000-0000-4000-8000-000000000000"


@attrs.frozen
class AppSpec:
    """An C{[[components.mimi.apps]]} entry."""

    name: str
    id: str
    provider: str = "simple"
    federate: bool = True


#: chat and other share the basic configuration; local does not federate
DEFAULT_APPS = (
    AppSpec("chat", CHAT),
    AppSpec("other", OTHER, provider="plain"),
    AppSpec("local", LOCAL, federate=False),
)

#: two basic providers (equal identity configurations under different names)
DEFAULT_PROVIDERS: Mapping[str, Mapping[str, Any]] = {"simple": {"plugin": "basic"}, "plain": {"plugin": "basic"}}


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def unb64(text: str) -> bytes:
    return base64.b64decode(text)


def ref_of(key_package: bytes) -> bytes:
    """The KeyPackageRef of an encoded KeyPackage (framed or bare)."""
    if key_package[:4] == b"\x00\x01\x00\x05":
        return key_package_ref(parse_key_package_message(key_package))
    return key_package_ref(parse_key_package(key_package))


def token_for(domain: str, name: str) -> str:
    """A distinct, deterministic bearer token."""
    return f"token-{name}-{domain}-0123456789abcdef"


# configuration


def table(folder: Any, path: str, values: Mapping[str, Any], name: Optional[str] = None) -> Options:
    """The table C{[path]} of C{folder/fedserver.toml} holding C{values}."""
    return Options(values, file=os.path.join(str(folder), "fedserver.toml"), path=path, base_dir=str(folder),
                   name=name)


def write_file(folder: Any, name: str, content: str) -> str:
    """Write C{content} to C{folder/name}; returns C{name} (relative, as a configuration names it)."""
    os.makedirs(str(folder), exist_ok=True)
    with open(os.path.join(str(folder), name), "w", encoding="utf-8") as f:
        f.write(content)
    return name


def gateway_table(
    folder: Any, tokens: Mapping[str, str], apps: Sequence[AppSpec] = DEFAULT_APPS, **values: Any
) -> Dict[str, Any]:
    """
    The values of C{[components.mimi]}, with a token file per application
    (and the admin's, when C{tokens} has C{"admin"}) in C{folder}.
    """
    result: Dict[str, Any] = {"plugin": "mimi-gateway", **values}
    if "admin" in tokens:
        result["admin_token_file"] = write_file(folder, "admin.token", tokens["admin"] + "\n")
    result["apps"] = [
        {"id": app.id, "name": app.name, "identity_provider": app.provider,
         "token_file": write_file(folder, f"{app.name}.token", tokens[app.name]), "federate": app.federate}
        for app in apps
    ]
    return result


def gateway_context(
    folder: Any, domain: str, store: Any, providers: Mapping[str, Mapping[str, Any]] = DEFAULT_PROVIDERS,
) -> Context:
    """A context for C{domain} on a L{Clock} at L{NOW}, with C{providers} built by their plugin."""
    context = context_for(domain, store, Clock())
    context.reactor.advance(NOW)
    context.identity_providers = {
        name: build_plugin(fedserver_mimi.identity, "identity_provider",
                           table(folder, f"identity_providers.{name}", values, name), context)
        for name, values in providers.items()
    }
    return context


def build_gateway(folder: Any, context: Context, values: Mapping[str, Any], name: str = "mimi") -> Gateway:
    """C{[components.NAME]} built by the C{mimi-gateway} factory through a registry."""
    gateway = build_plugin(fedserver_mimi.plugin, "component", table(folder, f"components.{name}", values, name),
                           context)
    assert isinstance(gateway, Gateway)
    return gateway


# a running gateway


def _complete(data: bytes) -> bool:
    head, found, rest = data.partition(b"\r\n\r\n")
    if not found:
        return False
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return len(rest) >= int(value)
    return False


@attrs.define
class MimiBackend:
    """One gateway on a running store, with its internal interface behind a real site."""

    domain: str
    folder: Any
    store: Store
    context: Context
    gateway: Gateway
    site: FederationSite
    #: bearer tokens by application name, and the admin's as "admin"
    tokens: Dict[str, str]
    #: application ids by name
    app_ids: Dict[str, str]

    @property
    def clock(self) -> Clock:
        return self.context.reactor

    @property
    def components(self) -> Dict[str, Any]:
        return {"mimi": self.gateway}

    def stop(self) -> None:
        stop_queue(self.context)
        self.store.stopService()

    # the internal interface, over HTTP

    async def http(self, method: str, path: str, body: bytes = b"",
                   headers: Sequence[Tuple[bytes, bytes]] = ()) -> HTTPAnswer:
        """One request on a fresh connection to the outward site; its answer, within the bound."""
        connection = HTTPConnection.to(self.site)
        try:
            connection.request(method.encode("ascii"), path.encode("utf-8"), body, headers)
            if not _complete(connection.transport.value()):
                channel = getattr(connection.protocol, "_channel", connection.protocol)  # under the HTTP/2 negotiator
                await bounded(channel.requests[-1].notifyFinish())
            return parse_answer(connection.transport.value())
        finally:
            connection.close()

    async def api(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        app: Optional[str] = "chat",
        token: Optional[str] = None,
        query: Optional[Mapping[str, Any]] = None,
        raw: Optional[bytes] = None,
    ) -> HTTPAnswer:
        """
        C{method /mimi/PATH?QUERY} with a JSON C{body} (or C{raw} bytes),
        authorized by the token of application C{app} (C{"admin"}: the
        admin's; C{None}: no header) or by C{token}.
        """
        target = "/mimi" + path
        if query:
            target += "?" + urllib.parse.urlencode({k: str(v) for k, v in query.items()})
        data = raw if raw is not None else (b"" if body is None else json.dumps(body).encode())
        headers: List[Tuple[bytes, bytes]] = []
        if token is None and app is not None:
            token = self.tokens[app]
        if token is not None:
            headers.append((b"Authorization", b"Bearer " + token.encode("utf-8")))
        if data:
            headers.append((b"Content-Type", b"application/json"))
        return await self.http(method, target, data, headers)

    async def ok(self, method: str, path: str, body: Any = None, *, code: int = 200, **kwargs: Any) -> Any:
        """L{api}, which must answer C{code}; the decoded body."""
        answer = await self.api(method, path, body, **kwargs)
        assert answer.code == code, (method, path, answer.code, answer.body[:2000])
        assert answer.header("content-type") == "application/json"
        return answer.json()

    # shortcuts for the common steps, each of which must succeed

    async def register(self, handle: bytes, tags: Sequence[str] = (), *, app: str = "chat") -> str:
        app_id = self.app_id(app)
        body = {"clientHandle": b64(handle), "tags": list(tags)}
        return str((await self.ok("POST", f"/apps/{app_id}/clients", body, code=201, app=app))["clientId"])

    async def queue(self, client: str, *, app: str = "chat", version: int = 1, suite: int = 1,
                    label: Optional[str] = None) -> str:
        body: Dict[str, Any] = {"protocolVersion": version, "cipherSuite": suite}
        if label is not None:
            body["appLabel"] = label
        path = f"/apps/{self.app_id(app)}/clients/{client}/queues"
        return str((await self.ok("POST", path, body, code=201, app=app))["queueId"])

    def fill(self, client: str, queue: str, key_packages: Sequence[bytes] = (), *, app: str = "chat",
             final: Optional[bytes] = None, reset: Optional[bool] = None) -> Any:
        """C{PATCH} the queue (the L{HTTPAnswer}, a coroutine)."""
        body: Dict[str, Any] = {"keyPackages": [b64(k) for k in key_packages]}
        if final is not None:
            body["finalKey"] = b64(final)
        if reset is not None:
            body["isReset"] = reset
        return self.api("PATCH", f"/apps/{self.app_id(app)}/clients/{client}/queues/{queue}", body, app=app)

    def claim(self, client: str, receiver: str, *, app: str = "chat", version: int = 1, suite: int = 1,
              label: Optional[str] = None, domain: Optional[str] = None, of: Optional[str] = None) -> Any:
        """
        C{GET .../keyPackage}: application C{app} claims a KeyPackage of
        C{client} (of application C{of} at C{domain}, if given) for its
        client C{receiver}; the L{HTTPAnswer} (a coroutine).
        """
        params: Dict[str, Any] = {"protocolVersion": version, "cipherSuite": suite, "receiverClientId": receiver}
        if label is not None:
            params["appLabel"] = label
        if domain is not None:
            params["domain"] = domain
        if of is not None:
            params["app"] = of
        return self.api("GET", f"/apps/{self.app_id(app)}/clients/{client}/keyPackage", app=app, query=params)

    async def create_group(self, group_id: bytes, *, app: str = "chat", key: Any = None, suite: int = 1,
                           tree: Optional[bytes] = None) -> str:
        info = encode.make_group_info(key or nacl.signing.SigningKey.generate(), group_id=group_id, epoch=0,
                                      cipher_suite=suite)
        body: Dict[str, Any] = {"groupInfo": b64(info)}
        if tree is not None:
            body["ratchetTree"] = b64(tree)
        answer = await self.ok("PUT", f"/apps/{self.app_id(app)}/groups", body, code=201, app=app)
        return str(answer["groupId"])

    def commit(self, group_id: bytes, epoch: int, *, app: str = "chat", welcome_refs: Sequence[bytes] = (),
               suite: int = 1, **extra: Any) -> Any:
        """C{PUT .../epochs} with a commit of C{epoch} and a Welcome for C{welcome_refs} (a coroutine)."""
        body: Dict[str, Any] = {"commitPacket": b64(commit_message(group_id, epoch))}
        if welcome_refs:
            body["welcomePacket"] = b64(encode.make_welcome(cipher_suite=suite, key_package_refs=welcome_refs))
        body.update(extra)
        return self.api("PUT", f"/apps/{self.app_id(app)}/groups/{group_path(group_id)}/epochs", body, app=app)

    def app_id(self, app: str) -> str:
        """The id of application C{app} (a name, or an id, given back)."""
        return self.app_ids.get(app, app)

    # the external interface, straight to the component

    async def call(self, rpc: str, body: Any, *, origin: str = "b.example", raw: Optional[bytes] = None,
                   headers: Sequence[Tuple[str, str]] = ()) -> Response:
        """An inbound RPC from C{origin}, with more C{headers}, to the component as the pipeline gives it; bounded."""
        call = FederatedCall(
            origin_domain=origin,
            target_domain=self.domain,
            component="mimi",
            rpc=rpc,
            method="POST",
            headers=(("Content-Type", "application/json"), *headers),
            body=raw if raw is not None else json.dumps(body).encode(),
            request_id="req-test",
            peer=Peer(identities={f"fed.{origin}"}, claimed_domain=origin),
        )
        return await bounded(self.gateway.handle(call))


def make_gateway(
    tmp_path: Any,
    domain: str = "a.example",
    *,
    apps: Sequence[AppSpec] = DEFAULT_APPS,
    providers: Mapping[str, Mapping[str, Any]] = DEFAULT_PROVIDERS,
    admin: bool = True,
    database: Optional[str] = None,
    tokens: Optional[Mapping[str, str]] = None,
    **values: Any,
) -> MimiBackend:
    """
    The gateway of C{domain}: configuration and token files in
    C{tmp_path/domain}, built through the registries, on a migrated,
    running store (C{database}, by default C{tmp_path/domain.sqlite}), its
    internal interface mounted by the plugin's resource hook on a
    L{FederationSite}.  C{values} are more options of C{[components.mimi]};
    C{tokens} replace the default tokens (L{token_for}) by name.
    """
    from twisted.internet import reactor

    folder = tmp_path / domain
    names = [app.name for app in apps] + (["admin"] if admin else [])
    all_tokens = {name: token_for(domain, name) for name in names}
    all_tokens.update(tokens or {})
    store = Store(f"sqlite:{database or tmp_path / (domain + '.sqlite')}", reactor=reactor)
    context = with_queue(gateway_context(folder, domain, store, providers))
    gateway = build_gateway(folder, context, gateway_table(folder, all_tokens, apps, **values))
    context.components = {"mimi": gateway}
    root = ListenerRoot("outward listener")
    for listener, segment, resource in fedserver_mimi.plugin.fedserver_resources(context):
        assert listener == "outward"
        root.mount(segment, resource)
    site = FederationSite(root, max_body_bytes=context.config.limits.max_body_bytes, reactor=Clock())
    store.migrate()
    store.startService()
    start_queue(context)
    return MimiBackend(domain, folder, store, context, gateway, site, all_tokens, {a.name: a.id for a in apps})


# MLS material


def group_path(group_id: bytes) -> str:
    """A group id as the API's paths write it: base64url without padding."""
    return base64.urlsafe_b64encode(group_id).rstrip(b"=").decode("ascii")


def commit_message(group_id: bytes, epoch: int, *, public: bool = False) -> bytes:
    """A commit of C{epoch} (a PrivateMessage, or a PublicMessage)."""
    if public:
        return encode.make_public_commit(group_id=group_id, epoch=epoch)
    return encode.make_private_message(group_id=group_id, epoch=epoch, content_type=CONTENT_COMMIT)


def proposal_message(group_id: bytes, epoch: int) -> bytes:
    """A Remove proposal of C{epoch}, in a PublicMessage."""
    return encode.make_public_proposal(group_id=group_id, epoch=epoch, proposal=encode.encode_remove_proposal(1))


@attrs.define
class Device:
    """An MLS client's signing key and credential; makes its KeyPackages."""

    identity: Optional[bytes] = b"alice"
    certificates: Sequence[bytes] = ()
    key: nacl.signing.SigningKey = attrs.Factory(nacl.signing.SigningKey.generate)

    def key_package(self, *, not_before: int = NOW - HOUR, not_after: int = NOW + DAY, suite: int = 1,
                    wrap: bool = True) -> bytes:
        return encode.make_key_package(
            self.key, identity=None if self.certificates else self.identity, certificates=self.certificates,
            cipher_suite=suite, not_before=not_before, not_after=not_after, wrap=wrap,
        )


def utc(seconds: int) -> datetime.datetime:
    return datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc)


@attrs.define
class CertificateChain:
    """
    root (domain CN, P-256) -> intermediate (account CN, P-256) -> leaf
    (device CN, Ed25519): the leaf's key signs the device's KeyPackages.
    """

    root: x509.Certificate
    intermediate: x509.Certificate
    leaf: x509.Certificate
    leaf_key: ed25519.Ed25519PrivateKey
    root_key: Any

    @classmethod
    def make(cls, *, device: str = "phone", account: str = "alice", domain: str = "example.com",
             leaf_from: int = NOW - DAY, leaf_until: int = NOW + 30 * DAY,
             root: Optional[Tuple[x509.Certificate, Any]] = None) -> CertificateChain:
        root_key = root[1] if root else new_key("p256")
        root_cert = root[0] if root else certificate(domain, root_key, None, root_key, ca=True)
        inter_key, leaf_key = new_key("p256"), ed25519.Ed25519PrivateKey.generate()
        inter = certificate(account, inter_key, root_cert, root_key, ca=True)
        leaf = certificate(device, leaf_key, inter, inter_key, ca=False, not_before=leaf_from, not_after=leaf_until)
        return cls(root_cert, inter, leaf, leaf_key, root_key)

    @property
    def ders(self) -> List[bytes]:
        return [c.public_bytes(Encoding.DER) for c in (self.leaf, self.intermediate, self.root)]

    def device(self, *, key: Optional[nacl.signing.SigningKey] = None) -> Device:
        """A device whose credential is this chain and whose key is the leaf's (or C{key})."""
        if key is None:
            seed = self.leaf_key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
            key = nacl.signing.SigningKey(seed)
        return Device(identity=None, certificates=self.ders, key=key)

    def root_pem(self) -> str:
        return self.root.public_bytes(Encoding.PEM).decode("ascii")


def x509_providers(folder: Any, chain: CertificateChain) -> Dict[str, Mapping[str, Any]]:
    """L{DEFAULT_PROVIDERS} and C{devices}, an x509 provider trusting C{chain}'s root."""
    roots = write_file(folder, "roots.pem", chain.root_pem())
    devices = {"plugin": "x509", "trust_roots": [roots], "device_range": {"start": 0, "end": 0},
               "account_offset": 1, "domain_offset": 2}
    return {**DEFAULT_PROVIDERS, "devices": devices}
