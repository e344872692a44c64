"""
Discovery C{matrix}: where a Matrix server name's federation API is served,
following "Resolving server names" of the Matrix server-server API.

    [discovery]
    plugin = "matrix"
    nameservers = ["127.0.0.1:5353"]   # default: those of /etc/resolv.conf
    timeout = 5                        # seconds for one DNS lookup
    well_known_timeout = 10            # seconds for the whole /.well-known/matrix/server fetch
    min_ttl = 60                       # bounds on how long a DNS answer is kept
    max_ttl = 86400
    negative_ttl = 60                  # how long "no such name" is kept
    stale_ttl = 86400                  # how long an expired answer (DNS or well-known) serves while lookups fail
    cache_entries = 10000              # names kept at most, in each cache

A server name is C{host[:port]}; the host is a DNS name, an IPv4 address or
an IPv6 address in brackets.  It resolves as follows:

 1. an IP literal: that address, with the port or 8448; no lookup;
 2. a DNS name with a port: the name's addresses, with that port;
 3. otherwise C{GET https://<host>/.well-known/matrix/server}, verified
    against C{<host>}; a valid C{m.server} delegates to another server
    name, which resolves by 1 or 2 when it is an IP literal or has a port,
    and otherwise by 4 to 6 in place of C{<host>};
 4. the SRV record C{_matrix-fed._tcp.<host>}: its targets' addresses, with
    their ports;
 5. else the deprecated C{_matrix._tcp.<host>}, the same way;
 6. else C{<host>}'s addresses, with port 8448.

Every L{Target}'s C{infra_domain} is the name the remote certificate must
match (and the TLS server name): the host of the server name after
delegation, never an SRV target.  Its C{host} is an address, checked by
the address policy (C{[outward] allow_ip_ranges}), as are the addresses the
well-known fetch connects to and IP literals in server names: a server name
comes from a peer, and must not point fedserver at a private network.

The well-known answer is cached as Synapse does: for its C{Cache-Control}
C{max-age} (C{no-store}: 0) or C{Expires}, bounded to [5 min, 48 h], for
24 h without either; a failed fetch (an answer other than 200, not JSON
with an C{m.server} server name, a body over 50 KiB, no connection, no
answer in time) means "no delegation" and is kept for 1 h.  A failure that
may be temporary (no connection, a 5xx status, too large a body, a
timeout) does not replace a good answer: that serves on, for up to
C{stale_ttl} after it expired, the fetch retried every two minutes.
Concurrent lookups of one name are merged, in both caches.  Redirects are
followed (https only, at most five).  The well-known certificate is
verified against the CA certificates of C{[tls] ca_certificates} when set
(as Synapse's C{federation_custom_ca_list}), else against the system's.

Failures are L{DiscoveryFailure}s naming the server name: C{invalid-domain}
for a name that is not a server name, whose SRV record says "no service"
(C{.}) or that resolves nowhere; C{discovery-failure} when a lookup failed
or every address was refused.
"""

from __future__ import annotations

import email.utils
import ipaddress
import json
import re
from typing import Any, Callable, Dict, List, NoReturn, Optional, Sequence, Set, Tuple
from urllib.parse import urljoin, urlsplit

import attrs
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from twisted.internet import defer, error
from twisted.internet import ssl as twisted_ssl
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from fedserver.addresses import AddressPolicy
from fedserver.client import TLSClientEndpoint, bounded
from fedserver.config import Options
from fedserver.discovery_cache import CacheSettings, DiscoveryCache, cache_settings
from fedserver.dns import DNSLookup, LookupFailed, NoRecords, SRVRecord, dns_lookup, order_srv
from fedserver.errors import ConfigError, DiscoveryFailure
from fedserver.hookspecs import hookimpl
from fedserver.http11 import BodyTooLarge, HTTP11Connection, encode_request
from fedserver.interfaces import IDiscovery
from fedserver.values import Response, Target

log = Logger(namespace="fedserver.discovery")

#: the port of a server name that names none, and of the last resort
DEFAULT_PORT = 8448
#: SRV services, in the order they are asked (C{_matrix._tcp} is deprecated)
SERVICES = ("_matrix-fed._tcp", "_matrix._tcp")
WELL_KNOWN_PATH = "/.well-known/matrix/server"
#: a larger well-known body is a failure
WELL_KNOWN_MAX_SIZE = 50 * 1024
#: how long a well-known answer is kept without cache headers
WELL_KNOWN_DEFAULT_PERIOD = 24 * 3600.0
#: bounds on the period the cache headers ask for
WELL_KNOWN_MIN_PERIOD = 5 * 60.0
WELL_KNOWN_MAX_PERIOD = 48 * 3600.0
#: how long a failed fetch (no delegation) is kept
WELL_KNOWN_FAILURE_PERIOD = 3600.0
#: while a good answer serves stale, the fetch is retried this often
WELL_KNOWN_RETRY_PERIOD = 120.0
#: redirects followed at most
WELL_KNOWN_MAX_REDIRECTS = 5
DEFAULT_CACHE = CacheSettings()
_REDIRECTS = frozenset({301, 302, 303, 307, 308})

_DNS_NAME = re.compile(r"[A-Za-z0-9-]{1,63}(\.[A-Za-z0-9-]{1,63})*")


# server names


@attrs.frozen
class ServerName:
    """
    A parsed Matrix server name.

    @ivar host: a lower-case DNS name, or an IP address (IPv6 without
        brackets, in its compressed form).
    @ivar port: the explicit port, or C{None}.
    @ivar is_ip: whether C{host} is an IP literal.
    """

    host: str
    port: Optional[int] = None
    is_ip: bool = False

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port is None else f"{host}:{self.port}"


def parse_server_name(value: str) -> ServerName:
    """
    C{value} as a L{ServerName} (the specification's grammar: C{hostname
    [":" port]}, the host an IPv4 address, C{"[" IPv6 address "]"} or a DNS
    name of at most 255 characters); a C{ValueError} if it is none.
    """
    if not isinstance(value, str) or not value.isascii():
        raise ValueError(f"{value!r} is not a server name")
    host, port_text = value, None
    if value.startswith("["):
        inside, bracket, rest = value[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            raise ValueError(f"{value!r} is not a server name: an IPv6 address goes in [brackets]")
        host, port_text = inside, (rest[1:] if rest else None)
        try:
            if not re.fullmatch(r"[0-9A-Fa-f:.]{2,45}", host):  # no zone ("%eth0") either
                raise ValueError(host)
            address = ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{value!r} is not a server name: {host!r} is not an IPv6 address") from None
        return ServerName(address.compressed, _port(value, port_text), True)
    if ":" in value:
        host, _, port_text = value.partition(":")
    port = _port(value, port_text)
    if re.fullmatch(r"[0-9.]+", host):
        try:
            return ServerName(str(ipaddress.IPv4Address(host)), port, True)
        except ValueError:
            raise ValueError(f"{value!r} is not a server name: {host!r} is not an IPv4 address") from None
    if len(host) > 255 or not _DNS_NAME.fullmatch(host):
        raise ValueError(f"{value!r} is not a server name: {host!r} is not a DNS name")
    return ServerName(host.lower(), port)


def _port(value: str, text: Optional[str]) -> Optional[int]:
    if text is None:
        return None
    if not (text.isdigit() and len(text) <= 5 and 0 < int(text) < 65536):
        raise ValueError(f"{value!r} is not a server name: {text!r} is not a port")
    return int(text)


# the well-known fetch


class WellKnownFailure(Exception):
    """
    The fetch of C{/.well-known/matrix/server} failed.

    @ivar temporary: the failure may pass (no connection, a 5xx status, too
        large a body, no answer in time): a good answer fetched earlier
        still serves.  Otherwise the host answered, and has no delegation.
    """

    def __init__(self, message: str, *, temporary: bool) -> None:
        super().__init__(message)
        self.temporary = temporary


@attrs.frozen
class WellKnown:
    """
    A valid answer: the delegated server name and how long to keep it.

    @ivar period: seconds per the cache headers, C{None} without any.
    """

    server: ServerName
    period: Optional[float]


def cache_period(response: Response, now: float) -> Optional[float]:
    """
    How long C{response} asks to be kept (seconds, before the bounds):
    C{Cache-Control: no-store} 0, else its C{max-age}, else the time left
    until C{Expires} (0 if that is not a date); C{None} without either.
    """
    directives: Dict[str, str] = {}
    expires: Optional[str] = None
    for name, value in response.headers:
        lower = name.lower()
        if lower == "cache-control":
            for part in value.split(","):
                key, _, argument = part.partition("=")
                directives[key.strip().lower()] = argument.strip().strip('"')
        elif lower == "expires":
            expires = value
    if "no-store" in directives:
        return 0.0
    max_age = directives.get("max-age", "")
    if max_age.isdigit():
        return float(max_age)
    if expires is not None:
        parsed = email.utils.parsedate_tz(expires)
        if parsed is None:
            # RFC 9111: an invalid date, "0" among them, is in the past
            return 0.0
        return email.utils.mktime_tz(parsed) - now
    return None


def _http_host(host: str, port: int) -> str:
    shown = f"[{host}]" if ":" in host else host
    return shown if port == 443 else f"{shown}:{port}"


class WellKnownFetcher:
    """
    Fetches C{https://<host>/.well-known/matrix/server} with the lean
    HTTP/1.1 client: the host's addresses (checked by the address policy)
    tried in turn, TLS verified against the host, redirects followed.

    @param tls_for: client TLS settings that verify a certificate for the
        given host name or IP address.
    @param port: the port fetched from: 443 as the specification says
        (tests on an unprivileged port change it).
    """

    def __init__(self, reactor: Any, lookup: DNSLookup, policy: AddressPolicy,
                 tls_for: Callable[[str], Any], *, timeout: float = 10.0, port: int = 443) -> None:
        self._reactor = reactor
        self.lookup = lookup
        self.policy = policy
        self.tls_for = tls_for
        self.timeout = timeout
        self.port = port

    def fetch(self, host: str) -> Deferred[WellKnown]:
        """
        The delegation of C{host}; fail with L{WellKnownFailure} if there is
        none, or after C{timeout} seconds in all.
        """
        d = Deferred.fromCoroutine(self._fetch(host))
        bounded(d, self.timeout, self._reactor)

        def timed_out(failure: Failure) -> NoReturn:
            failure.trap(defer.TimeoutError)
            raise WellKnownFailure(f"no answer within {self.timeout:g} s", temporary=True)

        return d.addErrback(timed_out)

    async def _fetch(self, host: str) -> WellKnown:
        url = f"https://{_http_host(host, self.port)}{WELL_KNOWN_PATH}"
        seen: Set[str] = set()
        for _ in range(WELL_KNOWN_MAX_REDIRECTS + 1):
            seen.add(url)
            parts = urlsplit(url)
            assert parts.hostname is not None
            where = parts.hostname
            port = parts.port or 443
            path = parts.path or "/"
            if parts.query:
                path += "?" + parts.query
            response = await self._get(where, port, path)
            if response.code not in _REDIRECTS:
                return self._parse(response)
            location = response.header("Location")
            if not location:
                raise WellKnownFailure(f"{url} redirects ({response.code}) without a Location", temporary=False)
            url = _redirect_target(url, location)
            if url in seen:
                raise WellKnownFailure(f"a redirect loop: {url} again", temporary=False)
        raise WellKnownFailure(f"more than {WELL_KNOWN_MAX_REDIRECTS} redirects", temporary=False)

    def _parse(self, response: Response) -> WellKnown:
        if 500 <= response.code < 600:
            raise WellKnownFailure(f"the server answered {response.code}", temporary=True)
        if response.code != 200:
            raise WellKnownFailure(f"the server answered {response.code}", temporary=False)
        try:
            body = json.loads(response.body.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            raise WellKnownFailure("the answer is not JSON", temporary=False) from None
        server = body.get("m.server") if isinstance(body, dict) else None
        if not isinstance(server, str):
            raise WellKnownFailure('the answer is not a JSON object with an "m.server" string', temporary=False)
        try:
            delegated = parse_server_name(server)
        except ValueError as e:
            raise WellKnownFailure(f'"m.server": {e}', temporary=False) from None
        return WellKnown(delegated, cache_period(response, self._reactor.seconds()))

    async def _addresses(self, host: str) -> List[str]:
        try:
            addresses = [str(ipaddress.ip_address(host))]
        except ValueError:
            try:
                addresses = [a for a, _ in await self.lookup.addresses(host)]
            except (NoRecords, LookupFailed) as e:
                raise WellKnownFailure(str(e), temporary=True) from None
        allowed = [a for a in addresses if self.policy.allows(a)]
        if not allowed:
            raise WellKnownFailure("; ".join(self.policy.reason(a) for a in addresses), temporary=True)
        return allowed

    async def _get(self, host: str, port: int, path: str) -> Response:
        problems = []
        for address in await self._addresses(host):
            try:
                return await self._request(address, host, port, path)
            except (defer.CancelledError, error.ConnectingCancelledError):
                raise  # the time is up: no other address
            except BodyTooLarge:
                raise WellKnownFailure(f"the answer is larger than {WELL_KNOWN_MAX_SIZE} bytes",
                                       temporary=True) from None
            except Exception as e:
                problems.append(f"{_http_host(address, port)}: {_describe(e)}")
        raise WellKnownFailure("; ".join(problems), temporary=True)

    async def _request(self, address: str, host: str, port: int, path: str) -> Response:
        # an address already checked: connect to it, with no name resolution in between
        kind = TCP6ClientEndpoint if ":" in address else TCP4ClientEndpoint
        tcp = kind(self._reactor, address, port, timeout=self.timeout)
        endpoint = TLSClientEndpoint(self.tls_for(host), tcp, self._reactor)
        connection: HTTP11Connection = await endpoint.connect(_OneConnection())
        try:
            data = encode_request("GET", path, _http_host(host, port), [("Accept", "application/json")], b"")
            return await connection.request(data)
        finally:
            if connection.transport is not None:
                connection.transport.loseConnection()


class _OneConnection(Factory):
    def buildProtocol(self, addr: Any) -> HTTP11Connection:
        return HTTP11Connection(WELL_KNOWN_MAX_SIZE)


def _redirect_target(url: str, location: str) -> str:
    try:
        target = urljoin(url, location.strip())
        parts = urlsplit(target)
        valid = (parts.scheme == "https" and bool(parts.hostname) and parts.port != 0
                 and all("!" <= c <= "~" for c in target))  # printable ASCII: it goes into the request line
    except ValueError:  # a port that is not a number, a bracket left open
        valid = False
    if not valid:
        raise WellKnownFailure(f"{url} redirects to {location!r}, which is not an https URL", temporary=False)
    return target


def _describe(e: BaseException) -> str:
    reasons = getattr(e, "reasons", None) or []
    for reason in reasons:
        inner = getattr(reason, "value", None)
        if inner is not None and type(inner).__module__.startswith("OpenSSL"):
            return f"TLS failed: {inner}"
    return str(e).strip() or type(e).__name__


# discovery


@attrs.frozen
class _Place:
    """Where one SRV record (or the server name itself) points: its allowed addresses."""

    record: SRVRecord
    addresses: Tuple[str, ...]


@attrs.frozen
class _Answer:
    """A resolved server name: the name TLS must verify and the places to connect to."""

    tls_name: str
    places: Tuple[_Place, ...]


@implementer(IDiscovery)
class MatrixDiscovery:
    """
    Matrix server name resolution with a well-known cache, a DNS answer
    cache and an address policy.

    @ivar well_known: the cache of delegations by host (C{None}: none).
    @ivar cache: the cache of DNS answers by server name (after delegation).
    """

    def __init__(self, lookup: DNSLookup, policy: AddressPolicy, clock: Any, *,
                 fetcher: WellKnownFetcher, settings: CacheSettings = DEFAULT_CACHE) -> None:
        self.lookup = lookup
        self.policy = policy
        self.fetcher = fetcher
        self.cache: DiscoveryCache[_Answer] = DiscoveryCache(
            clock, lambda name: Deferred.fromCoroutine(self._resolve(name)), settings
        )
        self.well_known: DiscoveryCache[Optional[ServerName]] = DiscoveryCache(
            clock, lambda host: Deferred.fromCoroutine(self._delegation(host)),
            CacheSettings(
                min_ttl=WELL_KNOWN_MIN_PERIOD,
                max_ttl=WELL_KNOWN_MAX_PERIOD,
                negative_ttl=WELL_KNOWN_RETRY_PERIOD,
                stale_ttl=settings.stale_ttl,
                max_entries=settings.max_entries,
                failure_ttl=WELL_KNOWN_FAILURE_PERIOD,
            ),
        )

    def discover(self, domain: str) -> Deferred[List[Target]]:
        try:
            name = parse_server_name(domain)
        except ValueError as e:
            return defer.fail(DiscoveryFailure(
                f"{e}: a Matrix server name is host[:port], the host a DNS name or an IP literal",
                "invalid-domain", data=_data(domain)))
        if name.is_ip or name.port is not None:
            return self._resolved(name, str(name))
        d = self.well_known.get(name.host)
        d.addErrback(_no_delegation)

        def delegated(server: Optional[ServerName]) -> Deferred[List[Target]]:
            if server is None:
                return self._resolved(name, str(name))
            return self._resolved(server, str(name))

        return d.addCallback(delegated)

    def _resolved(self, name: ServerName, asked: str) -> Deferred[List[Target]]:
        """The targets of C{name} (after delegation), failures naming C{asked}."""
        if name.is_ip:
            return self._literal(name, asked)
        d = self.cache.get(str(name)).addCallback(self.targets)
        if str(name) != asked:

            def name_both(failure: Failure) -> None:
                failure.trap(DiscoveryFailure)
                e = failure.value
                raise DiscoveryFailure(
                    f"{asked} delegates to {name} (its {WELL_KNOWN_PATH}): {e.message}", e.label,
                    data=_data(asked),
                )

            d.addErrback(name_both)
        return d

    def _literal(self, name: ServerName, asked: str) -> Deferred[List[Target]]:
        port = name.port or DEFAULT_PORT
        if not self.policy.allows(name.host):
            via = "" if str(name) == asked else f"delegates to {name}, and "
            return defer.fail(DiscoveryFailure(
                f"no usable federation target for {asked}: {via}{self.policy.reason(name.host)}",
                data=_data(asked)))
        return defer.succeed([Target(infra_domain=name.host, host=name.host, port=port)])

    @staticmethod
    def targets(answer: _Answer) -> List[Target]:
        """The targets of C{answer}: RFC 2782 order (random within a priority), each address."""
        by_record = {p.record: p for p in answer.places}
        return [
            Target(infra_domain=answer.tls_name, host=address, port=record.port, ttl=record.ttl,
                   priority=record.priority, weight=record.weight)
            for record in order_srv(list(by_record))
            for address in by_record[record].addresses
        ]

    # the well-known step

    async def _delegation(self, host: str) -> Tuple[Optional[ServerName], float]:
        try:
            answer = await self.fetcher.fetch(host)
        except WellKnownFailure as e:
            log.info("no delegation for {host}: https://{host}{path}: {error}", host=host, path=WELL_KNOWN_PATH,
                     error=str(e))
            if e.temporary:
                raise DiscoveryFailure(f"cannot fetch https://{host}{WELL_KNOWN_PATH}: {e}",
                                       data=_data(host)) from None
            return None, WELL_KNOWN_FAILURE_PERIOD
        period = WELL_KNOWN_DEFAULT_PERIOD if answer.period is None else answer.period
        return answer.server, period

    # the DNS steps

    async def _resolve(self, key: str) -> Tuple[_Answer, float]:
        name = parse_server_name(key)
        if name.port is not None:
            return await self._direct(key, name.host, name.port, [])
        missing = []
        for service in SERVICES:
            srv_name = f"{service}.{name.host}"
            try:
                records = await self.lookup.srv(srv_name)
            except NoRecords as e:
                missing.append(str(e))
                continue
            except LookupFailed as e:
                raise DiscoveryFailure(f"cannot discover {key}: {e}", data=_data(key)) from None
            return await self._srv(key, name.host, srv_name, records)
        return await self._direct(key, name.host, DEFAULT_PORT, missing)

    async def _srv(self, key: str, host: str, srv_name: str, records: Sequence[SRVRecord]) -> Tuple[_Answer, float]:
        real = [r for r in records if r.target != "."]
        if not real:
            raise DiscoveryFailure(f"{key} says it does not federate (the SRV target of {srv_name} is '.')",
                                   "invalid-domain", data=_data(key))
        resolved = await defer.gatherResults([Deferred.fromCoroutine(self._place(r)) for r in real])
        usable = [place for place, _ in resolved if place.addresses]
        if not usable:
            problems = "; ".join(problem for _, problem in resolved)
            raise DiscoveryFailure(f"no usable federation target for {key}: {problems}", data=_data(key))
        return _Answer(host, tuple(usable)), min(p.record.ttl for p in usable)

    async def _place(self, record: SRVRecord) -> Tuple[_Place, str]:
        try:
            found = await self.lookup.addresses(record.target)
        except (NoRecords, LookupFailed) as e:
            return _Place(record, ()), str(e)
        record = attrs.evolve(record, ttl=min([record.ttl, *(t for _, t in found)]))
        allowed = tuple(a for a, _ in found if self.policy.allows(a))
        problem = "; ".join(self.policy.reason(a) for a, _ in found) if not allowed else ""
        return _Place(record, allowed), problem

    async def _direct(self, key: str, host: str, port: int, missing: List[str]) -> Tuple[_Answer, float]:
        try:
            found = await self.lookup.addresses(host)
        except NoRecords as e:
            raise DiscoveryFailure(f"{key} resolves nowhere: {'; '.join([*missing, str(e)])}",
                                   "invalid-domain", data=_data(key)) from None
        except LookupFailed as e:
            raise DiscoveryFailure(f"cannot discover {key}: {e}", data=_data(key)) from None
        ttl = min(t for _, t in found)
        allowed = tuple(a for a, _ in found if self.policy.allows(a))
        if not allowed:
            reasons = "; ".join(self.policy.reason(a) for a, _ in found)
            raise DiscoveryFailure(f"no usable federation target for {key}: {reasons}", data=_data(key))
        return _Answer(host, (_Place(SRVRecord(0, 0, port, host, ttl), allowed),)), ttl


def _no_delegation(failure: Failure) -> None:
    """A failed well-known fetch means no delegation (it is cached, and was logged)."""
    failure.trap(DiscoveryFailure)


def _data(domain: str) -> Dict[str, str]:
    return {"type": "federation", "domain": domain}


# the plugin


def well_known_tls(context: Any) -> Callable[[str], Any]:
    """
    Client TLS settings for well-known fetches: TLS 1.2 or newer, the
    certificate verified against the host and the CA certificates of
    C{[tls] ca_certificates} (read now), or the system's without them.
    """
    paths = context.config.tls.ca_certificates
    if paths:
        certificates = []
        for path in paths:
            try:
                with open(path, "rb") as f:
                    certificates.extend(x509.load_pem_x509_certificates(f.read()))
            except OSError as e:
                raise ConfigError(f"cannot read {path}: {e.strerror}", path="[tls] ca_certificates") from None
            except ValueError as e:
                raise ConfigError(f"{path} holds no valid PEM certificate: {e}",
                                  path="[tls] ca_certificates") from None
        trust = twisted_ssl.trustRootFromCertificates(
            [twisted_ssl.Certificate.loadPEM(c.public_bytes(Encoding.PEM)) for c in certificates]
        )
    else:
        trust = twisted_ssl.platformTrust()

    def tls_for(host: str) -> Any:
        return twisted_ssl.optionsForClientTLS(
            host, trustRoot=trust, extraCertificateOptions={"raiseMinimumTo": twisted_ssl.TLSVersion.TLSv1_2}
        )

    return tls_for


def make_matrix_discovery(options: Options, context: Any) -> MatrixDiscovery:
    lookup = dns_lookup(options, context)
    settings = cache_settings(options)
    timeout = options.get_number("well_known_timeout", 10.0, minimum=0.1, maximum=120)
    fetcher = WellKnownFetcher(context.reactor, lookup, context.address_policy, well_known_tls(context),
                               timeout=timeout)
    return MatrixDiscovery(lookup, context.address_policy, context.reactor, fetcher=fetcher, settings=settings)


@hookimpl
def fedserver_discovery_plugins() -> Dict[str, Any]:
    return {"matrix": make_matrix_discovery}


__all__: Sequence[str] = [
    "MatrixDiscovery",
    "ServerName",
    "WellKnown",
    "WellKnownFailure",
    "WellKnownFetcher",
    "cache_period",
    "make_matrix_discovery",
    "parse_server_name",
    "well_known_tls",
]
