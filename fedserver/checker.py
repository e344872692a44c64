"""
The federation checker behind C{fedserver discover}: can this backend
federate with a domain, and if not, why?

For each target discovery finds, it connects and completes a TLS handshake
presenting our client certificate, as a federated call would.  It records
the chain verification outcome instead of aborting, and checks the remote
certificate's names against the target's infrastructure domain itself, so
the report always shows what the remote presented: protocol, names, expiry,
chain.  The verdict is positive when at least one target is reachable with
a certificate that verifies and names its infrastructure domain.
"""

from __future__ import annotations

import json
from typing import Any, Dict, List, Optional

import attrs
from OpenSSL import SSL
from service_identity import VerificationError
from service_identity.pyopenssl import verify_hostname
from twisted.internet import defer, error
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.interfaces import IHandshakeListener, IOpenSSLClientConnectionCreator
from twisted.internet.protocol import Factory, Protocol
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from zope.interface import implementer

from fedserver.errors import FederationError
from fedserver.tls import TLSMaterial, certificate_names, recording_context, verify_error_of
from fedserver.values import Target


@attrs.frozen
class HandshakeReport:
    """What one TLS handshake with a target showed."""

    connected: bool
    protocol: Optional[str] = None
    names: List[str] = attrs.Factory(list)
    subject: Optional[str] = None
    not_after: Optional[str] = None
    chain: List[str] = attrs.Factory(list)
    verify_error: Optional[str] = None
    name_matches: bool = False
    error: Optional[str] = None
    #: why the remote refused our client certificate, when it did
    refused_us: Optional[str] = None

    @property
    def ok(self) -> bool:
        return (self.connected and self.verify_error is None and self.name_matches and self.error is None
                and self.refused_us is None)


@attrs.frozen
class TargetReport:
    target: Target
    handshake: HandshakeReport


@attrs.frozen
class Report:
    """The checker's findings about one domain."""

    domain: str
    records: List[Dict[str, Any]]
    targets: List[TargetReport]
    discovery_error: Optional[Dict[str, Any]] = None

    @property
    def reachable(self) -> bool:
        return any(t.handshake.ok for t in self.targets)

    @property
    def verdict(self) -> str:
        if self.discovery_error is not None:
            return f"not federating: {self.discovery_error['message']}"
        good = [t for t in self.targets if t.handshake.ok]
        if good:
            first = good[0].target
            return f"reachable: {first.infra_domain} at {first.host}:{first.port}"
        reasons = [f"{t.target.host}:{t.target.port}: {_problem(t.handshake)}" for t in self.targets]
        reasons += [f"{r['target']}: {r['problem']}" for r in self.records if r.get("problem")]
        return f"not reachable: {'; '.join(reasons) or 'no target'}"

    def to_json(self) -> Dict[str, Any]:
        return {
            "domain": self.domain,
            "reachable": self.reachable,
            "verdict": self.verdict,
            "discovery_error": self.discovery_error,
            "records": self.records,
            "targets": [
                {**attrs.asdict(t.target), "handshake": {**attrs.asdict(t.handshake), "ok": t.handshake.ok}}
                for t in self.targets
            ],
        }


def _problem(h: HandshakeReport) -> str:
    if h.error:
        return h.error
    if h.verify_error:
        return f"the certificate does not verify: {h.verify_error}"
    if not h.name_matches:
        return "the certificate does not name the infrastructure domain"
    if h.refused_us:
        return f"it does not accept our certificate ({h.refused_us})"
    return "?"


#: how much of the remote's answer to our probe request is read
_PROBE_ANSWER = 64 * 1024
#: labels with which a fedserver peer refuses our client certificate
_REFUSED_US = ("no-client-certificate", "authentication-failure", "certificate-parse-error")


@implementer(IHandshakeListener)
class _Handshake(Protocol):
    """
    Completes the handshake, then sends one request and reads the answer:
    under TLS 1.3 the server judges our certificate only after our side of
    the handshake is done, so only what follows tells whether it accepted us.
    """

    def __init__(self, done: Deferred[None], answered: Deferred[bytes], host: str) -> None:
        self.done = done
        self.answered = answered
        self.host = host
        self.received = b""

    def handshakeCompleted(self) -> None:
        if not self.done.called:
            self.done.callback(None)
        self.transport.write(  # type: ignore[union-attr]
            b"GET / HTTP/1.1\r\nHost: " + self.host.encode("idna") + b"\r\nConnection: close\r\n\r\n"
        )

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        if len(self.received) >= _PROBE_ANSWER:
            self.transport.loseConnection()  # type: ignore[union-attr]

    def connectionLost(self, reason: Failure = error.ConnectionDone) -> None:  # type: ignore[assignment]
        if not self.done.called:
            self.done.errback(reason)
        elif not self.answered.called:
            if self.received or reason.check(error.ConnectionDone):
                self.answered.callback(self.received)
            else:
                self.answered.errback(reason)


def refusal_of(answer: bytes) -> Optional[str]:
    """Why a fedserver-like peer refused our certificate, from its answer, if it did."""
    _, _, body = answer.partition(b"\r\n\r\n")
    try:
        document = json.loads(body)
    except ValueError:
        return None
    if isinstance(document, dict) and document.get("label") in _REFUSED_US:
        return f"{document['label']}: {document.get('message', '')}"
    return None


class _CheckingClientTLS:
    """
    Client TLS that presents our certificate, records the chain verification
    outcome and accepts the handshake either way (the checker judges).
    """

    def __init__(self, material: Optional[TLSMaterial]) -> None:
        self._context = recording_context(SSL.TLS_CLIENT_METHOD, material)

    def connection_for(self, hostname: str) -> SSL.Connection:
        connection = SSL.Connection(self._context, None)
        connection.set_tlsext_host_name(hostname.encode("idna"))
        connection.set_connect_state()
        return connection


@implementer(IOpenSSLClientConnectionCreator)
class _Creator:
    def __init__(self, tls: _CheckingClientTLS, hostname: str) -> None:
        self.tls = tls
        self.hostname = hostname
        self.connection: Optional[SSL.Connection] = None

    def clientConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        self.connection = self.tls.connection_for(self.hostname)
        return self.connection


async def handshake(reactor: Any, target: Target, tls: _CheckingClientTLS, timeout: float) -> HandshakeReport:
    """Connect to C{target}, complete a TLS handshake, and describe it."""
    creator = _Creator(tls, target.infra_domain)
    done: Deferred[None] = Deferred()
    answered: Deferred[bytes] = Deferred()
    factory = TLSMemoryBIOFactory(
        creator, True, Factory.forProtocol(lambda: _Handshake(done, answered, target.infra_domain)), clock=reactor
    )
    endpoint = HostnameEndpoint(reactor, target.host, target.port, timeout=timeout)
    try:
        connecting = endpoint.connect(factory)
        connecting.addTimeout(timeout, reactor)
        await connecting
        done.addTimeout(timeout, reactor)
        await done
    except Exception as e:  # every way a connection can fail is a finding
        return HandshakeReport(connected=False, error=_describe_failure(e))
    refused: Optional[str] = None
    try:
        answered.addTimeout(timeout, reactor)
        refused = refusal_of(await answered)
    except Exception as e:
        refused = f"the remote ended the connection after the handshake: {_describe_failure(e)}"
    connection = creator.connection
    assert connection is not None
    leaf = connection.get_peer_certificate(as_cryptography=True)
    chain = connection.get_peer_cert_chain(as_cryptography=True) or []
    try:
        verify_hostname(connection, target.infra_domain)
        matches = True
    except VerificationError:
        matches = False
    return HandshakeReport(
        connected=True,
        protocol=connection.get_protocol_version_name(),
        names=sorted(certificate_names(leaf)) if leaf is not None else [],
        subject=leaf.subject.rfc4514_string() if leaf is not None else None,
        not_after=leaf.not_valid_after_utc.isoformat() if leaf is not None else None,
        chain=[c.subject.rfc4514_string() for c in chain],
        verify_error=verify_error_of(connection),
        name_matches=matches,
        refused_us=refused,
    )


def _describe_failure(e: BaseException) -> str:
    if isinstance(e, SSL.Error):
        return f"TLS failed: {e}"
    if isinstance(e, (defer.TimeoutError, error.TimeoutError, defer.CancelledError)):
        return "no answer in time"
    if isinstance(e, error.ConnectionRefusedError):
        return "connection refused"
    return str(e) or type(e).__name__


async def check(reactor: Any, discovery: Any, domain: str, material: Optional[TLSMaterial], *,
                timeout: float = 10.0) -> Report:
    """Discover C{domain} and try a TLS handshake with every target."""
    records: List[Dict[str, Any]] = []
    explain = getattr(discovery, "explain", None)
    try:
        if explain is not None:
            answer = await explain(domain)
            records = [
                {**attrs.asdict(r.record), "allowed": list(r.allowed), "refused": list(r.refused),
                 "problem": r.problem}
                for r in answer.records
            ]
            targets = discovery.targets(answer)
        else:
            targets = await discovery.discover(domain)
    except FederationError as e:
        return Report(domain, records, [], e.to_json())
    tls = _CheckingClientTLS(material)
    reports = []
    for target in targets:
        reports.append(TargetReport(target, await handshake(reactor, target, tls, timeout)))
    return Report(domain, records, reports)


def format_report(report: Report) -> str:
    """The report for a person."""
    lines = [f"federation check of {report.domain}"]
    if report.records:
        lines.append("SRV records:")
        for r in report.records:
            lines.append(
                f"  priority {r['priority']} weight {r['weight']} port {r['port']} target {r['target']} "
                f"ttl {r['ttl']}"
            )
            for address in r["allowed"]:
                lines.append(f"    {address}: allowed")
            for address in r["refused"]:
                lines.append(f"    {address}: refused by the address policy ([outward] allow_ip_ranges)")
            if r["problem"] and not r["allowed"] and not r["refused"]:
                lines.append(f"    {r['problem']}")
    for t in report.targets:
        h = t.handshake
        lines.append(f"target {t.target.infra_domain} at {t.target.host}:{t.target.port}:")
        if not h.connected:
            lines.append(f"  {h.error}")
            continue
        lines.append(f"  TLS {h.protocol}; certificate {h.subject}, for {', '.join(h.names) or 'no name'}")
        lines.append(f"  expires {h.not_after}; chain: {' <- '.join(h.chain)}")
        lines.append(f"  chain verifies: {'yes' if h.verify_error is None else 'no, ' + h.verify_error}")
        lines.append(f"  names {t.target.infra_domain}: {'yes' if h.name_matches else 'no'}")
        lines.append(f"  accepts our certificate: {'yes' if h.refused_us is None else 'no, ' + h.refused_us}")
    lines.append(f"verdict: {report.verdict}")
    return "\n".join(lines)


