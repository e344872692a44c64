"""
Authenticator C{matrix-signature}: Matrix servers prove who they are by
signing every request (X-Matrix), not by TLS client certificates.

    [authenticator]
    plugin = "matrix-signature"
    server_name = "a.example:8448"     # our Matrix server name; default [server] backend_domain
    signing_key = "signing.key"        # Synapse's format; fedserver generate-signing-key FILE
    key_valid_for = 86400              # seconds our published keys are valid (default one day)
    trusted_key_servers = ["matrix.org"]   # notaries asked for keys first; default none

    [authenticator.old_signing_keys."ed25519:old"]
    key = "BASE64 PUBLIC KEY"
    expired_ts = 1700000000000         # when it stopped being used, ms

Inbound, the C{Authorization: X-Matrix} headers are parsed; a C{destination}
other than our server name is refused (a request without one is accepted,
as the specification asks for older servers: the signature then covers our
name anyway); the origin's keys come from the L{Keyring}; every signature by
a key of the origin that is known and valid now must verify, and at least
one must.  The peer is the origin server, its name proven by the signature.
Failures are L{XMatrixError}s whose C{errcode} and C{matrix_status} a Matrix
route answers with.  Outbound, every request is signed with our first key.

TLS: the inward listener presents C{[tls] certificate} and asks for no client
certificate.  Remote certificates are verified against the target's name
with C{[tls] ca_certificates} when given, else with the system's roots.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

from canonicaljson import encode_canonical_json
from OpenSSL import SSL
from signedjson.key import get_verify_key
from signedjson.sign import SignatureVerifyException, verify_signed_json
from signedjson.types import SigningKey, VerifyKey
from twisted.internet import defer
from twisted.internet import ssl as twisted_ssl
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator
from zope.interface import implementer

from fedserver.config import Options
from fedserver.context import Context
from fedserver.errors import ConfigError, FederationError
from fedserver.hookspecs import hookimpl
from fedserver.interfaces import IAuthenticator
from fedserver.tls import TLSFiles, TLSMaterial
from fedserver.values import InboundRequest, OutboundRequest, Peer, Target
from fedserver_matrix.keyring import SCHEMA, SCHEMA_OWNER, KeyLookupError, Keyring
from fedserver_matrix.keys import (
    ALGORITHM,
    KeyFormatError,
    OldVerifyKey,
    key_id_of,
    read_signing_keys,
    server_keys_document,
)
from fedserver_matrix.xmatrix import (
    XMatrixError,
    authorizations_of,
    format_authorization,
    is_server_name,
    parse_body,
    request_json,
    request_uri,
    sign_request,
)

PLUGIN = "matrix-signature"
DEFAULT_KEY_VALID_FOR = 86400
#: verified origins whose Peer is kept for the next requests
_REMEMBERED_PEERS = 1024


@implementer(IOpenSSLServerConnectionCreator)
class ServerTLSOptions:
    """
    Server TLS settings that present our certificate and chain, TLS 1.2 or
    newer, and ask for no client certificate.
    """

    def __init__(self, material: TLSMaterial) -> None:
        self.material = material
        ctx = SSL.Context(SSL.TLS_METHOD)
        ctx.set_min_proto_version(SSL.TLS1_2_VERSION)
        ctx.use_certificate(material.chain[0])
        for extra in material.chain[1:]:
            ctx.add_extra_chain_cert(extra)
        ctx.use_privatekey(material.private_key)
        ctx.set_options(SSL.OP_NO_COMPRESSION | SSL.OP_CIPHER_SERVER_PREFERENCE)
        ctx.set_mode(SSL.MODE_RELEASE_BUFFERS)  # idle connections give their buffers back
        ctx.set_session_id(b"fedserver-matrix")
        self.context = ctx

    def serverConnectionForTLS(self, tlsProtocol: object) -> SSL.Connection:
        return SSL.Connection(self.context, None)


class MatrixTLS:
    """
    Our TLS material, followed as the files change, and the settings built
    from it.

    @param system_roots: verify remote certificates with the system's
        roots rather than the material's CA certificates.
    """

    def __init__(self, files: TLSFiles, *, system_roots: bool) -> None:
        self._files = files
        self.system_roots = system_roots
        self._use(files.current)

    def _use(self, material: TLSMaterial) -> None:
        self.material = material
        self._server = ServerTLSOptions(material)
        self._clients: Dict[str, Any] = {}

    def _refresh(self) -> None:
        material = self._files.material()
        if material is not self.material:
            self._use(material)

    def server_options(self) -> ServerTLSOptions:
        self._refresh()
        return self._server

    def client_options(self, hostname: str) -> Any:
        self._refresh()
        options = self._clients.get(hostname)
        if options is None:
            trust = twisted_ssl.platformTrust() if self.system_roots else self.material.trust_root()
            options = twisted_ssl.optionsForClientTLS(
                hostname, trustRoot=trust, extraCertificateOptions={"raiseMinimumTo": twisted_ssl.TLSVersion.TLSv1_2}
            )
            self._clients[hostname] = options
        return options


@implementer(IAuthenticator)
class MatrixSignatureAuthenticator:
    """
    @ivar server_name: our Matrix server name.
    @ivar signing_keys: our current keys; the first signs.
    @ivar old_keys: keys we no longer use, still published.
    @ivar key_valid_for: seconds our published keys document is valid.
    @ivar keyring: where the keys of other servers come from.
    """

    def __init__(
        self,
        *,
        server_name: str,
        signing_keys: Sequence[SigningKey],
        clock: Any,
        keyring: Optional[Keyring] = None,
        old_keys: Sequence[OldVerifyKey] = (),
        key_valid_for: int = DEFAULT_KEY_VALID_FOR,
        tls: Optional[MatrixTLS] = None,
    ) -> None:
        if not signing_keys:
            raise ValueError("at least one signing key is needed")
        self.server_name = server_name
        self.signing_keys = list(signing_keys)
        self.signing_key = self.signing_keys[0]
        self.old_keys = list(old_keys)
        self.key_valid_for = key_valid_for
        self.keyring = keyring
        self.tls = tls
        self._clock = clock
        self._own_keys: Dict[str, VerifyKey] = {key_id_of(k): get_verify_key(k) for k in self.signing_keys}
        self._keys_json: Optional[bytes] = None
        self._keys_json_until = 0.0
        self._peers: Dict[str, Peer] = {}

    # TLS

    def server_tls_options(self) -> Optional[ServerTLSOptions]:
        return self.tls.server_options() if self.tls is not None else None

    def client_tls_options(self, target: Target) -> Any:
        if self.tls is None:
            raise FederationError("no [tls] settings to connect with", "federation-tls-error")
        return self.tls.client_options(target.infra_domain)

    # inbound

    def authenticate(self, request: InboundRequest) -> Deferred[Peer]:
        # When the origin's keys are in memory and valid (the common case),
        # the whole check runs here; else the keyring loads or fetches them.
        try:
            origin, uri, signed, key_ids = self._signed_request(request)
            keys = self._keys_in_memory(origin, key_ids)
            if keys is not None:
                return defer.succeed(self._verified(request, origin, uri, signed, key_ids, keys))
        except Exception:
            return defer.fail()
        return Deferred.fromCoroutine(self._authenticate(request, origin, uri, signed, key_ids))

    async def _authenticate(
        self, request: InboundRequest, origin: str, uri: str, signed: Dict[str, Any], key_ids: List[str]
    ) -> Peer:
        keys = await self._keys_of(origin, key_ids)
        return self._verified(request, origin, uri, signed, key_ids, keys)

    def _signed_request(self, request: InboundRequest) -> Tuple[str, str, Dict[str, Any], List[str]]:
        """The origin, the signed C{uri}, the signed object and the key ids of the supported signatures."""
        authorizations = authorizations_of(request.headers)
        origin = authorizations[0].origin
        destination = authorizations[0].destination
        if destination is not None and destination != self.server_name:
            raise XMatrixError(
                f"the request is for {destination[:100]!r}, but this server is {self.server_name}",
                "wrong-destination",
            )
        uri = request_uri(request.path, request.query)
        signed = request_json(request.method, uri, origin, self.server_name, parse_body(request.body))
        signed["signatures"] = {origin: {a.key: a.sig for a in authorizations}}
        key_ids = [a.key for a in authorizations if a.key.startswith(ALGORITHM + ":")]
        if not key_ids:
            raise XMatrixError(
                f"the request from {origin} has no signature with an algorithm this server supports ({ALGORITHM})",
                "unknown-key",
            )
        return origin, uri, signed, key_ids

    def _verified(
        self, request: InboundRequest, origin: str, uri: str, signed: Dict[str, Any], key_ids: List[str],
        keys: Dict[str, VerifyKey],
    ) -> Peer:
        """The origin as a peer, if every signature by one of C{keys} verifies, and there is one."""
        if not keys:
            raise XMatrixError(
                f"{origin} signed with {', '.join(key_ids)}, but no such key of {origin} is known and valid now",
                "unknown-key",
            )
        for key_id, key in keys.items():
            try:
                verify_signed_json(signed, origin, key)
            except SignatureVerifyException:
                raise XMatrixError(
                    f"the signature of {origin} by {key_id} does not verify for {request.method} {uri[:200]}",
                    "bad-signature",
                ) from None
            except UnicodeEncodeError:
                # JSON may escape a lone surrogate ("\ud800"); canonical JSON, which is signed, cannot hold one
                raise XMatrixError(
                    "the request body is not JSON that can be signed: a string holds a lone surrogate",
                    "not-json",
                ) from None
        # a Peer is immutable: one per verified origin serves every request
        peer = self._peers.get(origin)
        if peer is None:
            if len(self._peers) >= _REMEMBERED_PEERS:
                self._peers.clear()
            identities: frozenset = frozenset((origin,))
            peer = self._peers[origin] = Peer(identities=identities, claimed_domain=origin, domain_proven=True)
        return peer

    def _keys_in_memory(self, origin: str, key_ids: List[str]) -> Optional[Dict[str, VerifyKey]]:
        """
        What L{_keys_of} would answer, when that needs no lookup: our own
        keys, or every one of C{key_ids} known to the keyring and valid now.
        C{None} when the keyring must be asked.
        """
        if origin == self.server_name:
            return {k: self._own_keys[k] for k in key_ids if k in self._own_keys}
        if self.keyring is None:
            return None
        return self.keyring.keys_in_memory(origin, key_ids)

    async def _keys_of(self, origin: str, key_ids: List[str]) -> Dict[str, VerifyKey]:
        if origin == self.server_name:
            return {k: self._own_keys[k] for k in key_ids if k in self._own_keys}
        if self.keyring is None:
            raise XMatrixError(f"this server has no keyring to get the keys of {origin}", "keys-unavailable")
        try:
            return await self.keyring.get_verify_keys(origin, key_ids)
        except KeyLookupError as e:
            raise XMatrixError(str(e), "keys-unavailable") from None

    # outbound

    def prepare_outbound(self, request: OutboundRequest, target: Target) -> Deferred[OutboundRequest]:
        try:
            content = parse_body(request.body)
        except XMatrixError:
            return defer.fail(FederationError(
                f"the request to {request.destination} cannot be signed: its body is not JSON", "invalid-json"
            ))
        authorization = sign_request(
            self.signing_key, self.server_name, request.destination, request.method, request.path, content
        )
        return defer.succeed(request.with_header("Authorization", format_authorization(authorization)))

    # our keys

    def server_keys(self) -> Dict[str, Any]:
        """Our keys document (C{GET /_matrix/key/v2/server}), valid for C{key_valid_for} from now."""
        valid_until = int((self._clock.seconds() + self.key_valid_for) * 1000)
        return server_keys_document(self.server_name, self.signing_keys, valid_until, self.old_keys)

    def server_keys_json(self) -> bytes:
        """
        L{server_keys} as canonical JSON, signed once and served until half
        of its validity has passed.
        """
        now = self._clock.seconds()
        if self._keys_json is None or now >= self._keys_json_until:
            self._keys_json = encode_canonical_json(self.server_keys())
            self._keys_json_until = now + self.key_valid_for / 2
        return self._keys_json


class _ContextClient:
    """The context's federation client, which exists only once the authenticator is built."""

    def __init__(self, context: Context) -> None:
        self._context = context

    def send(self, target: Target, request: OutboundRequest) -> Deferred[Any]:
        return self._context.client.send(target, request)


def _tls(options: Options, context: Context) -> MatrixTLS:
    tls = context.config.tls
    if not tls.certificate or not tls.private_key:
        raise ConfigError(
            f"the {PLUGIN} authenticator needs [tls] certificate and private_key: "
            "Matrix servers are reached over TLS",
            file=context.config.file, path="[tls]",
        )
    if tls.ca_certificates:
        return MatrixTLS(context.tls_files(f"the {PLUGIN} authenticator"), system_roots=False)
    # No CA certificates: remote certificates are checked with the system's
    # roots.  TLSFiles wants CA certificates, which only verify peers; hand
    # it our own certificate file in their place (they are never used) to
    # get the loading, the key check and the reloading.
    try:
        files = TLSFiles.load(tls.certificate, tls.private_key, [tls.certificate], context.reactor)
    except ConfigError as e:
        raise ConfigError(e.reason, file=context.config.file, path=e.path) from None
    return MatrixTLS(files, system_roots=True)


def make_matrix_signature(options: Options, context: Context) -> MatrixSignatureAuthenticator:
    server_name = options.get_str("server_name", context.backend_domain)
    if not is_server_name(server_name):
        raise options.error("server_name", f"{server_name!r} is not a Matrix server name (host or host:port)")
    key_path = options.get_path("signing_key")
    try:
        signing_keys = read_signing_keys(key_path)
    except ConfigError as e:
        raise options.error("signing_key", e.reason) from None
    current = {key_id_of(k) for k in signing_keys}
    old_keys = []
    for key_id, table in options.get_tables("old_signing_keys", {}).items():
        key = table.get_str("key")
        expired_ts = table.get_int("expired_ts", minimum=0)
        table.check_all_used()
        if key_id in current:
            raise table.error(None, f"{key_id} is also a current key in {key_path}")
        try:
            old_keys.append(OldVerifyKey.from_base64(key_id, key, expired_ts))
        except KeyFormatError as e:
            raise table.error("key", str(e)) from None
    key_valid_for = options.get_int("key_valid_for", DEFAULT_KEY_VALID_FOR, minimum=60, maximum=7 * 86400)
    trusted = options.get_str_list("trusted_key_servers", [])
    for name in trusted:
        if not is_server_name(name):
            raise options.error("trusted_key_servers", f"{name!r} is not a Matrix server name")
    tls = _tls(options, context)
    store = context.storage
    if store is not None:
        store.register_schema(SCHEMA_OWNER, SCHEMA)
    authenticator = MatrixSignatureAuthenticator(
        server_name=server_name, signing_keys=signing_keys, clock=context.reactor, old_keys=old_keys,
        key_valid_for=key_valid_for, tls=tls,
    )
    authenticator.keyring = Keyring(
        clock=context.reactor, discovery=context.discovery, client=_ContextClient(context),
        prepare=authenticator.prepare_outbound, store=store, trusted_key_servers=trusted,
        timeout=context.config.limits.request_timeout,
    )
    return authenticator


@hookimpl
def fedserver_authenticator_plugins() -> dict:
    return {PLUGIN: make_matrix_signature}
