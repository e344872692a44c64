"""
Authenticator C{mtls}: mutual TLS, as Wire federates.

Inbound, the client certificate must chain to C{[tls] ca_certificates} and
allow client authentication; the peer's identities are its subjectAltName DNS
names (the common name only when it has none), and the backend domain it
claims is its C{Wire-Origin-Domain} header, which the pipeline then validates
through discovery.  Outbound, we present C{[tls] certificate} with its chain,
verify the remote's certificate against the target's infrastructure domain,
and claim our backend domain in C{Wire-Origin-Domain}.  TLS 1.2 at least, in
both directions.  The table takes no options:

    [authenticator]
    plugin = "mtls"
"""

from __future__ import annotations

from typing import Any, Dict, Optional

from twisted.internet import defer
from twisted.internet.defer import Deferred
from zope.interface import implementer

from fedserver.config import Options, is_domain_name
from fedserver.context import Context
from fedserver.errors import AuthenticationFailure, ConfigError
from fedserver.hookspecs import hookimpl
from fedserver.interfaces import IAuthenticator, IConnectionGate
from fedserver.tls import (
    ClientCertificateServerOptions,
    PeerCertificate,
    TLSFiles,
    TLSMaterial,
    certificate_names,
    has_client_auth_usage,
    verify_client_chain,
)
from fedserver.values import InboundRequest, OutboundRequest, Peer, Target

ORIGIN_HEADER = "Wire-Origin-Domain"


@implementer(IAuthenticator, IConnectionGate)
class MutualTLSAuthenticator:
    """
    @param material: our TLS material.
    @param files: when given, the files it came from: the authenticator
        follows their changes (new connections use the new material).
    """

    def __init__(self, material: TLSMaterial, backend_domain: str, *, files: Optional[TLSFiles] = None) -> None:
        self.backend_domain = backend_domain
        self._files = files
        self._use(material)

    def _use(self, material: TLSMaterial) -> None:
        self.material = material
        self._server_options = ClientCertificateServerOptions(material)
        self._client_options: Dict[str, Any] = {}

    def _refresh(self) -> None:
        if self._files is not None:
            material = self._files.material()
            if material is not self.material:
                self._use(material)

    def server_tls_options(self) -> ClientCertificateServerOptions:
        self._refresh()
        return self._server_options

    def client_tls_options(self, target: Target) -> Any:
        self._refresh()
        options = self._client_options.get(target.infra_domain)
        if options is None:
            options = self.material.client_options(target.infra_domain)
            self._client_options[target.infra_domain] = options
        return options

    def authenticate(self, request: InboundRequest) -> Deferred[Peer]:
        try:
            return defer.succeed(self._authenticate(request))
        except AuthenticationFailure:
            return defer.fail()

    def check_connection(self, tls: Optional[PeerCertificate]) -> None:
        """The certificate part of authentication (L{IConnectionGate})."""
        self._names(tls)

    def _names(self, tls: Any) -> frozenset:
        if not isinstance(tls, PeerCertificate):
            raise AuthenticationFailure(
                "no client certificate was presented; federation requires mutual TLS",
                "no-client-certificate",
            )
        verify_error = tls.verify_error
        self._refresh()
        if tls.context is not None and tls.context is not self._server_options.context:
            # verified with [tls] files that have changed since: judge it by the current ones
            verify_error = verify_client_chain(self.material, tls)
        if verify_error is not None:
            raise AuthenticationFailure(
                f"the client certificate ({_subject(tls)}) is not accepted: {verify_error}"
            )
        try:
            names = tls.names
        except ValueError as e:
            raise AuthenticationFailure(
                f"the client certificate ({_subject(tls)}) cannot be parsed: {e}",
                "certificate-parse-error",
            ) from None
        if not names:
            raise AuthenticationFailure(
                f"the client certificate ({_subject(tls)}) names no DNS identity",
                "certificate-parse-error",
            )
        return names

    def _authenticate(self, request: InboundRequest) -> Peer:
        tls = request.tls
        names = self._names(tls)
        assert isinstance(tls, PeerCertificate)  # _names made sure
        origin = request.header(ORIGIN_HEADER)
        if not origin:
            raise AuthenticationFailure(
                f"the {ORIGIN_HEADER} header is missing", "no-origin-domain"
            )
        claimed = origin.strip().lower()
        if not is_domain_name(claimed):
            raise AuthenticationFailure(
                f"the {ORIGIN_HEADER} header {origin[:100]!r} is not a domain name", "validation-error"
            )
        return Peer(
            identities=names,
            claimed_domain=claimed,
            domain_proven=False,
            fingerprint=tls.fingerprint,
        )

    def prepare_outbound(self, request: OutboundRequest, target: Target) -> Deferred[OutboundRequest]:
        return defer.succeed(request.with_header(ORIGIN_HEADER, self.backend_domain))


def _subject(tls: PeerCertificate) -> str:
    return tls.certificate.subject.rfc4514_string() or "no subject"


def make_mtls(options: Options, context: Context) -> MutualTLSAuthenticator:
    files = context.tls_files(
        "the mtls authenticator", check=lambda material: check_own_certificate(material, context.infra_domain)
    )
    return MutualTLSAuthenticator(files.current, context.backend_domain, files=files)


def check_own_certificate(material: TLSMaterial, infra_domain: str) -> None:
    """
    Our certificate must name our infrastructure domain (peers validate our
    origin against it) and allow TLS client authentication (we present it
    as a client): refuse to start otherwise, rather than fail every call.
    """
    names = certificate_names(material.leaf)
    subject = material.leaf.subject.rfc4514_string()
    if infra_domain not in names:
        raise ConfigError(
            f"our certificate ({subject}) is for {', '.join(sorted(names)) or 'no DNS name'}, "
            f"not for [server] infra_domain {infra_domain}",
            path="[tls] certificate",
        )
    if not has_client_auth_usage(material.leaf):
        raise ConfigError(
            f"our certificate ({subject}) lacks the clientAuth extended key usage, "
            "which mutual TLS needs to present it to peers",
            path="[tls] certificate",
        )


@hookimpl
def fedserver_authenticator_plugins() -> dict:
    return {"mtls": make_mtls}
