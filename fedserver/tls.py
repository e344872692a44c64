"""
TLS material and the TLS settings built from it.

The inward listener asks for a client certificate and lets OpenSSL verify the
chain during the handshake, but does not abort the handshake when the chain is
missing or bad: the verification outcome is recorded for the connection, and
the authenticator turns it into a labelled JSON answer
(C{no-client-certificate}, C{authentication-failure}) that names the reason.
A peer that gets the handshake wrong thus learns why instead of seeing a bare
TLS alert, and no request is ever handled before it has been authenticated.
"""

from __future__ import annotations

import hashlib
import os
import weakref
from typing import Any, Dict, List, Optional, Sequence, Tuple

import attrs
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.serialization import Encoding, load_pem_private_key
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from OpenSSL import SSL, crypto
from twisted.internet import ssl as twisted_ssl
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator
from twisted.logger import Logger
from zope.interface import implementer

from fedserver.errors import ConfigError

_log = Logger(namespace="fedserver.tls")

# OpenSSL's X509_V_ERR_* codes that operators meet in practice.
_VERIFY_ERRORS: Dict[int, str] = {
    2: "the issuer certificate is not known",
    7: "a certificate signature does not verify",
    9: "a certificate is not yet valid",
    10: "a certificate has expired",
    18: "the certificate is self-signed and not a configured CA",
    19: "the chain ends in a self-signed certificate that is not a configured CA",
    20: "the issuer is not among the configured CA certificates",
    21: "the first certificate cannot be verified",
    24: "an intermediate is not a CA certificate",
    26: "the certificate may not be used for TLS client authentication "
    "(its extended key usage lacks clientAuth)",
}


_TLS_KEY_TYPES = (
    ec.EllipticCurvePrivateKey,
    rsa.RSAPrivateKey,
    ed25519.Ed25519PrivateKey,
    ed448.Ed448PrivateKey,
)


def verify_error_text(errnum: int) -> str:
    """A sentence for OpenSSL certificate verification error C{errnum}."""
    return _VERIFY_ERRORS.get(errnum, f"OpenSSL certificate verification error {errnum}")


@attrs.frozen
class PeerCertificate:
    """
    What the client presented on one TLS connection.

    @ivar certificate: the leaf (C{cryptography} certificate).
    @ivar verify_error: C{None} when the chain verified against our CA
        certificates, else why it did not.
    @ivar chain: the certificates the client sent after the leaf.
    @ivar context: the OpenSSL context the connection was made with, which
        tells which version of our TLS material verified it.
    """

    certificate: x509.Certificate
    verify_error: Optional[str]
    chain: Tuple[x509.Certificate, ...] = ()
    context: Any = attrs.field(default=None, eq=False)
    # one PeerCertificate serves every request of its connection: work once
    _cache: Dict[str, Any] = attrs.field(factory=dict, eq=False, repr=False, init=False)

    @property
    def fingerprint(self) -> str:
        """SHA-256 of the leaf in DER, lower-case hex."""
        if "fingerprint" not in self._cache:
            self._cache["fingerprint"] = hashlib.sha256(self.certificate.public_bytes(Encoding.DER)).hexdigest()
        return self._cache["fingerprint"]

    @property
    def names(self) -> frozenset:
        """
        The identities the certificate proves; see L{certificate_names}.
        Raises C{ValueError} for a malformed subjectAltName.
        """
        if "names" not in self._cache:
            self._cache["names"] = certificate_names(self.certificate)
        return self._cache["names"]


def certificate_names(cert: x509.Certificate) -> frozenset:
    """
    The DNS names a certificate is for: its subjectAltName DNS entries, or
    its subject common name only when it has no subjectAltName at all.
    Lower-cased.
    """
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return frozenset(
            str(attr.value).lower() for attr in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        )
    return frozenset(name.lower() for name in san.value.get_values_for_type(x509.DNSName))


def has_client_auth_usage(cert: x509.Certificate) -> bool:
    """Whether C{cert} may authenticate a TLS client (no EKU, or EKU with clientAuth)."""
    try:
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage)
    except x509.ExtensionNotFound:
        return True
    return ExtendedKeyUsageOID.CLIENT_AUTH in eku.value


def _read(path: str, key: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise ConfigError(f"cannot read {path}: {e.strerror}", path=f"[tls] {key}") from None


def _load_certificates(path: str, key: str) -> List[x509.Certificate]:
    data = _read(path, key)
    try:
        return x509.load_pem_x509_certificates(data)
    except ValueError as e:
        raise ConfigError(f"{path} holds no valid PEM certificate: {e}", path=f"[tls] {key}") from None


@attrs.frozen
class TLSMaterial:
    """
    Our certificate chain (leaf first), its private key and the CA
    certificates peers must chain to, loaded from the C{[tls]} files.
    """

    chain: Tuple[x509.Certificate, ...]
    private_key: Any
    ca_certificates: Tuple[x509.Certificate, ...]

    @classmethod
    def load(
        cls, certificate: str, private_key: str, ca_certificates: Sequence[str]
    ) -> TLSMaterial:
        """Load and cross-check the files; raise L{ConfigError} naming the bad one."""
        chain = _load_certificates(certificate, "certificate")
        try:
            key = load_pem_private_key(_read(private_key, "private_key"), password=None)
        except (ValueError, TypeError) as e:
            raise ConfigError(
                f"{private_key} holds no usable unencrypted PEM private key: {e}",
                path="[tls] private_key",
            ) from None
        if not isinstance(key, _TLS_KEY_TYPES):
            raise ConfigError(
                f"{private_key} holds a {type(key).__name__}, which TLS cannot use; "
                "use an ECDSA, RSA or Ed25519 key",
                path="[tls] private_key",
            )
        roots: List[x509.Certificate] = []
        for path in ca_certificates:
            roots.extend(_load_certificates(path, "ca_certificates"))
        if not roots:
            raise ConfigError("at least one CA certificate is needed", path="[tls] ca_certificates")
        ctx = SSL.Context(SSL.TLS_METHOD)
        ctx.use_certificate(chain[0])
        try:
            # OpenSSL 3 already refuses a mismatched key in use_privatekey
            ctx.use_privatekey(key)
            ctx.check_privatekey()
        except SSL.Error:
            raise ConfigError(
                f"{private_key} is not the key of the certificate in {certificate}",
                path="[tls] private_key",
            ) from None
        return cls(tuple(chain), key, tuple(roots))

    @property
    def leaf(self) -> x509.Certificate:
        """Our own certificate."""
        return self.chain[0]

    def private_certificate(self) -> twisted_ssl.PrivateCertificate:
        """Our leaf and key for L{twisted.internet.ssl.optionsForClientTLS}."""
        return twisted_ssl.PrivateCertificate.fromCertificateAndKeyPair(
            _twisted_certificate(self.chain[0]),
            twisted_ssl.KeyPair(crypto.PKey.from_cryptography_key(self.private_key)),
        )

    def trust_root(self) -> Any:
        """The CA certificates as a Twisted trust root."""
        return twisted_ssl.trustRootFromCertificates(
            [_twisted_certificate(c) for c in self.ca_certificates]
        )

    def client_options(self, hostname: str) -> object:
        """
        Client TLS settings for a connection that must reach C{hostname}:
        TLS 1.2 or newer, our certificate and chain presented, the remote's
        certificate verified against our CA certificates and C{hostname}.
        """
        return twisted_ssl.optionsForClientTLS(
            hostname,
            trustRoot=self.trust_root(),
            clientCertificate=self.private_certificate(),
            extraCertificateOptions={
                "raiseMinimumTo": twisted_ssl.TLSVersion.TLSv1_2,
                "extraCertChain": [crypto.X509.from_cryptography(c) for c in self.chain[1:]],
            },
        )


def _twisted_certificate(cert: x509.Certificate) -> twisted_ssl.Certificate:
    # Twisted's client TLS API still takes pyOpenSSL objects
    return twisted_ssl.Certificate(crypto.X509.from_cryptography(cert))


# SSL.Connection -> the first verification error OpenSSL reported for it.
_verify_errors: weakref.WeakKeyDictionary[SSL.Connection, int] = weakref.WeakKeyDictionary()
# SSL.Connection -> PeerCertificate (or None), computed once per connection.
_peers: weakref.WeakKeyDictionary[SSL.Connection, Optional[PeerCertificate]] = (
    weakref.WeakKeyDictionary()
)


def _record_verify_result(
    connection: SSL.Connection, cert: crypto.X509, errnum: int, depth: int, ok: int
) -> bool:
    if not ok and connection not in _verify_errors:
        _verify_errors[connection] = errnum
    return True


def verify_client_chain(material: TLSMaterial, peer: PeerCertificate) -> Optional[str]:
    """
    Verify what a client presented against C{material}'s CA certificates
    now, as the handshake did against the material of its day: C{None} when
    it verifies (and may authenticate a client), else why not.
    """
    store = crypto.X509Store()
    for ca in material.ca_certificates:
        store.add_cert(crypto.X509.from_cryptography(ca))
    leaf = crypto.X509.from_cryptography(peer.certificate)
    chain = [crypto.X509.from_cryptography(c) for c in peer.chain]
    try:
        crypto.X509StoreContext(store, leaf, chain).verify_certificate()
    except crypto.X509StoreContextError as e:
        return verify_error_text(e.errors[0])
    if not has_client_auth_usage(peer.certificate):
        return verify_error_text(26)
    return None


def recording_context(method: int, material: Optional[TLSMaterial]) -> SSL.Context:
    """
    An OpenSSL context for TLS 1.2 or newer that presents C{material}'s
    certificate, chain and key, verifies the other side against its CA
    certificates (the system's when C{material} is C{None}) and records the
    outcome for L{verify_error_of} instead of aborting the handshake.
    """
    ctx = SSL.Context(method)
    ctx.set_min_proto_version(SSL.TLS1_2_VERSION)
    # an idle connection gives its read and write buffers (about 34 KB) back
    ctx.set_mode(SSL.MODE_RELEASE_BUFFERS)
    if material is not None:
        ctx.use_certificate(material.chain[0])
        for extra in material.chain[1:]:
            ctx.add_extra_chain_cert(extra)
        ctx.use_privatekey(material.private_key)
        store = ctx.get_cert_store()
        assert store is not None
        for ca in material.ca_certificates:
            store.add_cert(crypto.X509.from_cryptography(ca))
    else:
        ctx.set_default_verify_paths()
    ctx.set_verify(SSL.VERIFY_PEER, _record_verify_result)
    return ctx


def verify_error_of(connection: SSL.Connection) -> Optional[str]:
    """Why the other side's chain did not verify on C{connection}, or C{None}."""
    errnum = _verify_errors.get(connection)
    return None if errnum is None else verify_error_text(errnum)


@implementer(IOpenSSLServerConnectionCreator)
class ClientCertificateServerOptions:
    """
    Server TLS settings that request (not require) a client certificate and
    record how its verification went; see the module docstring.
    """

    def __init__(self, material: TLSMaterial) -> None:
        self.material = material
        ctx = recording_context(SSL.TLS_METHOD, material)
        ctx.set_options(SSL.OP_NO_COMPRESSION | SSL.OP_CIPHER_SERVER_PREFERENCE)
        for ca in material.ca_certificates:
            ctx.add_client_ca(ca)
        ctx.set_session_id(b"fedserver")
        # No session resumption: a resumed session skips certificate
        # verification, so _record_verify_result would never see a bad
        # chain and the peer would pass as verified.
        ctx.set_session_cache_mode(SSL.SESS_CACHE_OFF)
        ctx.set_options(SSL.OP_NO_TICKET)
        self._context = ctx

    @property
    def context(self) -> SSL.Context:
        """The OpenSSL context of the connections these settings make."""
        return self._context

    def serverConnectionForTLS(self, tlsProtocol: object) -> SSL.Connection:
        return SSL.Connection(self._context, None)


def peer_certificate(transport: object) -> Optional[PeerCertificate]:
    """
    The client certificate of the TLS connection C{transport}, with its
    verification outcome; C{None} when it presented none or is not TLS.
    Computed once per connection.
    """
    get_handle = getattr(transport, "getHandle", None)
    connection = get_handle() if get_handle is not None else None
    if not isinstance(connection, SSL.Connection):
        return None
    if connection in _peers:
        return _peers[connection]
    cert = connection.get_peer_certificate(as_cryptography=True)
    result = None
    if cert is not None:
        # OpenSSL lists the leaf first in what a server sees of the chain
        chain = tuple(c for c in connection.get_peer_cert_chain(as_cryptography=True) or () if c != cert)
        result = PeerCertificate(cert, verify_error_of(connection), chain, connection.get_context())
    _peers[connection] = result
    return result


class TLSFiles:
    """
    The C{[tls]} files, reloaded when they change: operators rotate
    certificates without restarting.

    L{material} looks at the files at most every C{interval} seconds (size,
    modification time and inode of each).  When they changed, it loads them;
    if the new set is unusable (half-written, a key that does not match, or
    refused by C{check}), it keeps serving the current material and logs the
    problem once for that version of the files.
    """

    def __init__(self, paths: Sequence[str], material: TLSMaterial, clock: Any, *,
                 interval: float = 1.0, check: Any = None) -> None:
        self.paths = list(paths)
        self.current = material
        self._clock = clock
        self._interval = interval
        self._check = check
        self._stamp = self._stat()
        self._refused_stamp: Any = None
        self._next_check = clock.seconds() + interval

    @classmethod
    def load(cls, certificate: str, private_key: str, ca_certificates: Sequence[str], clock: Any,
             **kwargs: Any) -> TLSFiles:
        """Load the files now (a L{ConfigError} names the bad one) and watch them."""
        material = TLSMaterial.load(certificate, private_key, ca_certificates)
        if kwargs.get("check") is not None:
            kwargs["check"](material)
        return cls([certificate, private_key, *ca_certificates], material, clock, **kwargs)

    def _stat(self) -> Tuple[Any, ...]:
        stamp: List[Any] = []
        for path in self.paths:
            try:
                st = os.stat(path)
            except OSError:
                stamp.append(None)
            else:
                stamp.append((st.st_size, st.st_mtime_ns, st.st_ino))
        return tuple(stamp)

    def material(self) -> TLSMaterial:
        """The current material, reloaded first if the files changed."""
        now = self._clock.seconds()
        if now < self._next_check:
            return self.current
        self._next_check = now + self._interval
        stamp = self._stat()
        if stamp == self._stamp or stamp == self._refused_stamp:
            return self.current
        certificate, private_key, *cas = self.paths
        try:
            material = TLSMaterial.load(certificate, private_key, cas)
            if self._check is not None:
                self._check(material)
        except ConfigError as e:
            self._refused_stamp = stamp
            _log.error("the changed [tls] files are not usable, keeping the current ones: {error}", error=e)
            return self.current
        self.current = material
        self._stamp = stamp
        self._refused_stamp = None
        _log.info("reloaded the [tls] files: our certificate is now {subject}, serial {serial}",
                  subject=material.leaf.subject.rfc4514_string(), serial=material.leaf.serial_number)
        return material
