"""
The identity providers of the MIMI gateway draft (seed
C{mimi-gateway-draft.md}, "Identity Providers"): C{basic} and C{x509}.

Configure them by name::

    [identity_providers.devices]
    plugin = "x509"
    trust_roots = ["mimi-roots.pem"]        # PEM files; relative to the config file
    device_range = { start = 0, end = 1 }   # client handle: CNs of leaf (0) and its issuer (1)
    account_offset = 2                      # optional: the account's CN
    domain_offset = 3                       # optional: the domain's CN

    [identity_providers.simple]
    plugin = "basic"

Offsets count from the leaf certificate (0) upward along the chain as the
credential gives it (leaf first).  The draft's rules are checked at startup:
C{end >= start}, the account and domain offsets lie beyond the range's end,
and the domain offset lies beyond the account offset when both are set.

An X.509 credential is the list of DER certificates, leaf first, which may
end with the trust root or leave it out.  C{validate} checks the chain per
RFC 5280 against the trust roots at the message timestamp of the
application context (an C{int} of Unix seconds, or a mapping with
C{msg_timestamp}), with pyhanko-certvalidator (which handles Ed25519 and
Ed448, unlike C{cryptography}'s verifier).  The credential must be exactly
the validated path (root optional), long enough for every configured
offset, and the Common Names used must not contain C{@ / # $ :}.
"""

from __future__ import annotations

import datetime
from typing import Any, Coroutine, Dict, List, Mapping, Optional, Sequence, TypeVar, Union

from asn1crypto import x509 as asn1_x509
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID
from pyhanko_certvalidator import CertificateValidator, ValidationContext
from pyhanko_certvalidator import errors as cv_errors
from twisted.internet import defer
from twisted.internet.defer import Deferred
from zope.interface import implementer

from fedserver import hookimpl
from fedserver.config import Options
from fedserver.errors import FederationError
from fedserver.interfaces import IIdentityProvider
from fedserver.values import Identity

#: The characters a Common Name used in an identifier may not contain.
FORBIDDEN_CHARACTERS = "@/#$:"

BASIC = "basic"
X509 = "x509"

_T = TypeVar("_T")


def _refuse(message: str, label: str = "authentication-failure") -> FederationError:
    return FederationError(message, label)


# --- basic --------------------------------------------------------------------------


def _basic_assertion(identity: Identity) -> Union[bytes, str]:
    if identity.credential_type != BASIC:
        raise _refuse(
            f"the basic identity provider accepts only basic credentials, not {identity.credential_type!r}"
        )
    credential = identity.credential
    if not isinstance(credential, (bytes, str)):
        raise _refuse(
            "a basic credential must be the asserted identity (bytes or text), "
            f"not {type(credential).__name__}",
            "certificate-parse-error",
        )
    return credential


@implementer(IIdentityProvider)
class BasicIdentityProvider:
    """
    The draft's basic identity provider: basic credentials only, always
    valid, and every identifier is the bare asserted identity.
    """

    def supported_credentials(self) -> Sequence[str]:
        return (BASIC,)

    def validate(
        self, identity: Identity, group_context_extensions: Sequence[Any], application_context: Any
    ) -> Deferred[None]:
        try:
            _basic_assertion(identity)
        except FederationError as e:
            return defer.fail(e)
        return defer.succeed(None)

    def client_identifier(self, identity: Identity) -> Union[bytes, str]:
        """The asserted identity, unchanged."""
        return _basic_assertion(identity)

    def client_handle(self, identity: Identity) -> str:
        assertion = _basic_assertion(identity)
        if isinstance(assertion, str):
            return assertion
        try:
            return assertion.decode("utf-8")
        except UnicodeDecodeError:
            raise _refuse(
                "the basic credential is not UTF-8 text, so it has no readable client handle",
                "certificate-parse-error",
            ) from None

    def valid_successor(self, predecessor: Identity, successor: Identity) -> bool:
        try:
            before, after = _basic_assertion(predecessor), _basic_assertion(successor)
        except FederationError:
            return False
        as_bytes = [v.encode("utf-8") if isinstance(v, str) else v for v in (before, after)]
        return as_bytes[0] == as_bytes[1]


def make_basic_provider(options: Options, context: object) -> BasicIdentityProvider:
    """The factory of C{basic}: it has no options."""
    return BasicIdentityProvider()


# --- x509 ---------------------------------------------------------------------------


def check_offsets(start: int, end: int, account: Optional[int], domain: Optional[int]) -> Optional[str]:
    """What is wrong with these offsets per the draft, or C{None}."""
    if end < start:
        return f"device_range end ({end}) must be at least its start ({start})"
    if account is not None and account <= end:
        return f"account_offset ({account}) must be greater than the device_range end ({end})"
    if domain is not None and domain <= end:
        return f"domain_offset ({domain}) must be greater than the device_range end ({end})"
    if account is not None and domain is not None and domain <= account:
        return f"domain_offset ({domain}) must be greater than account_offset ({account})"
    return None


def parse_chain(identity: Identity) -> List[x509.Certificate]:
    """The certificates of an X.509 credential, leaf first."""
    if identity.credential_type != X509:
        raise _refuse(
            f"the x509 identity provider accepts only x509 credentials, not {identity.credential_type!r}"
        )
    credential = identity.credential
    if isinstance(credential, (bytes, str)) or not isinstance(credential, Sequence) or not credential:
        raise _refuse(
            "an x509 credential must be a non-empty list of DER certificates, leaf first",
            "certificate-parse-error",
        )
    chain = []
    for i, der in enumerate(credential):
        if not isinstance(der, bytes):
            raise _refuse(f"certificate {i} of the x509 credential is not DER bytes", "certificate-parse-error")
        try:
            chain.append(x509.load_der_x509_certificate(der))
        except ValueError as e:
            raise _refuse(
                f"certificate {i} of the x509 credential cannot be parsed: {e}", "certificate-parse-error"
            ) from None
    return chain


def common_name(certificate: x509.Certificate, offset: int) -> str:
    """The subject Common Name of C{certificate}, checked for the forbidden characters."""
    names = certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(names) != 1:
        what = "has no subject Common Name" if not names else "has more than one subject Common Name"
        raise _refuse(f"certificate {offset} (counting from the leaf) {what}; identifiers need exactly one")
    value = names[0].value
    name = value if isinstance(value, str) else value.decode("utf-8", "replace")
    if not name:
        raise _refuse(f"certificate {offset} (counting from the leaf) has an empty subject Common Name")
    bad = sorted({c for c in name if c in FORBIDDEN_CHARACTERS})
    if bad:
        raise _refuse(
            f"the Common Name {name!r} of certificate {offset} (counting from the leaf) contains "
            f"{' '.join(bad)}; Common Names may not contain any of @ / # $ :"
        )
    return name


def identifier(chain: Sequence[x509.Certificate], start: int, end: int) -> str:
    """The draft's C{identifier}: the Common Names of C{chain[start..end]} joined with C{:}."""
    if end >= len(chain):
        raise _refuse(
            f"the certificate chain has {len(chain)} certificates, but the identity provider uses "
            f"the Common Name at offset {end} from the leaf; send a longer chain (with the root)"
        )
    return ":".join(common_name(chain[i], i) for i in range(start, end + 1))


def message_moment(application_context: Any) -> datetime.datetime:
    """The message timestamp of an X.509 application context, as an aware datetime."""
    timestamp = application_context
    if isinstance(application_context, Mapping):
        timestamp = application_context.get("msg_timestamp")
    if isinstance(timestamp, bool) or not isinstance(timestamp, int):
        raise _refuse(
            "the x509 identity provider needs the message timestamp (msg_timestamp, Unix seconds) "
            f"in the application context, not {application_context!r}"
        )
    try:
        return datetime.datetime.fromtimestamp(timestamp, datetime.timezone.utc)
    except (OverflowError, OSError, ValueError):
        raise _refuse(f"the message timestamp {timestamp} is out of range") from None


def _run_now(coroutine: Coroutine[Any, Any, _T]) -> _T:
    """
    Run a coroutine that does not wait for anything (pyhanko-certvalidator
    without fetching) to completion, here and now.
    """
    try:
        coroutine.send(None)
    except StopIteration as stop:
        return stop.value
    coroutine.close()
    raise RuntimeError("certificate validation tried to wait for I/O")


def _when(moment: datetime.datetime) -> str:
    return moment.strftime("%Y-%m-%d %H:%M:%S UTC")


@implementer(IIdentityProvider)
class X509IdentityProvider:
    """
    The draft's X.509 identity provider.

    @ivar trust_roots: the DER trust root certificates.
    """

    def __init__(
        self,
        trust_roots: Sequence[bytes],
        start: int,
        end: int,
        account_offset: Optional[int] = None,
        domain_offset: Optional[int] = None,
    ) -> None:
        problem = check_offsets(start, end, account_offset, domain_offset)
        if problem:
            raise ValueError(problem)
        if not trust_roots:
            raise ValueError("at least one trust root is needed")
        self.trust_roots = list(trust_roots)
        self._anchors = [asn1_x509.Certificate.load(der) for der in self.trust_roots]
        self.start = start
        self.end = end
        self.account_offset = account_offset
        self.domain_offset = domain_offset

    def supported_credentials(self) -> Sequence[str]:
        return (X509,)

    def _deepest_offset(self) -> int:
        return max(o for o in (self.end, self.account_offset, self.domain_offset) if o is not None)

    def check_chain(self, identity: Identity, application_context: Any) -> None:
        """
        L{validate}, synchronously.

        @raise FederationError: the identity is not valid at that moment.
        """
        chain = parse_chain(identity)
        moment = message_moment(application_context)
        context = ValidationContext(
            trust_roots=self._anchors, moment=moment, allow_fetching=False, revocation_mode="soft-fail"
        )
        ders = [c.public_bytes(Encoding.DER) for c in chain]
        leaf = asn1_x509.Certificate.load(ders[0])
        intermediates = [asn1_x509.Certificate.load(d) for d in ders[1:]]
        validator = CertificateValidator(leaf, intermediates, validation_context=context)
        try:
            path = _run_now(validator.async_validate_path())
        except cv_errors.ExpiredError:
            raise _refuse(f"a certificate of the chain had expired at the message time {_when(moment)}") from None
        except cv_errors.NotYetValidError:
            raise _refuse(f"a certificate of the chain was not yet valid at the message time {_when(moment)}") from None
        except cv_errors.PathBuildingError:
            raise _refuse(
                "the certificate chain does not lead to a trust root of this identity provider"
            ) from None
        except (cv_errors.ValidationError, cv_errors.PathError) as e:
            raise _refuse(f"the certificate chain is not valid at {_when(moment)}: {e}") from None
        except Exception as e:  # pyhanko asserts, e.g. on an Ed25519 signature by an ECDSA issuer key
            raise _refuse(
                f"the certificate chain could not be verified at {_when(moment)} "
                f"({type(e).__name__}{': ' + str(e) if str(e) else ''}; for example, a signature "
                "made with another algorithm than its issuer's key)"
            ) from None
        validated = [c.dump() for c in path.iter_certs(include_root=True)][::-1]
        if ders != validated[: len(ders)] or len(ders) < len(validated) - 1:
            raise _refuse(
                "the credential's certificates are not the validated chain in order "
                "(leaf first, each followed by its issuer, the root optional)"
            )
        identifier(chain, self.start, self.end)
        for offset in (self.account_offset, self.domain_offset):
            if offset is not None:
                identifier(chain, offset, offset)

    def validate(
        self, identity: Identity, group_context_extensions: Sequence[Any], application_context: Any
    ) -> Deferred[None]:
        try:
            self.check_chain(identity, application_context)
        except FederationError as e:
            return defer.fail(e)
        return defer.succeed(None)

    def client_identifier(self, identity: Identity) -> str:
        """The client handle: the Common Names of the device range joined with C{:}."""
        return identifier(parse_chain(identity), self.start, self.end)

    def client_handle(self, identity: Identity) -> str:
        return self.client_identifier(identity)

    def account_identifier(self, identity: Identity) -> Optional[str]:
        """The Common Name at C{account_offset}, or C{None} when none is configured."""
        if self.account_offset is None:
            return None
        return identifier(parse_chain(identity), self.account_offset, self.account_offset)

    def domain_identifier(self, identity: Identity) -> Optional[str]:
        """The Common Name at C{domain_offset}, or C{None} when none is configured."""
        if self.domain_offset is None:
            return None
        return identifier(parse_chain(identity), self.domain_offset, self.domain_offset)

    def valid_successor(self, predecessor: Identity, successor: Identity) -> bool:
        try:
            return self.client_identifier(predecessor) == self.client_identifier(successor)
        except FederationError:
            return False


def _load_roots(options: Options) -> List[bytes]:
    paths = options.get_path_list("trust_roots")
    if not paths:
        raise options.error("trust_roots", "must list at least one PEM file")
    roots: List[bytes] = []
    for path in paths:
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as e:
            raise options.error("trust_roots", f"cannot read {path}: {e.strerror}") from None
        try:
            certificates = x509.load_pem_x509_certificates(data)
        except ValueError:
            raise options.error("trust_roots", f"{path} holds no PEM certificate") from None
        roots.extend(c.public_bytes(Encoding.DER) for c in certificates)
    return roots


def make_x509_provider(options: Options, context: object) -> X509IdentityProvider:
    """The factory of C{x509}: C{options} is its C{[identity_providers.NAME]} table."""
    uint8 = {"minimum": 0, "maximum": 255}
    device_range = options.get_table("device_range")
    start = device_range.get_int("start", **uint8)
    end = device_range.get_int("end", **uint8)
    device_range.check_all_used()
    account = options.get_int("account_offset", None, **uint8)
    domain = options.get_int("domain_offset", None, **uint8)
    problem = check_offsets(start, end, account, domain)
    if problem:
        key = "device_range" if end < start else ("domain_offset" if "domain_offset (" in problem else "account_offset")
        raise options.error(key, problem)
    roots = _load_roots(options)
    return X509IdentityProvider(roots, start, end, account, domain)


@hookimpl
def fedserver_identity_provider_plugins() -> Dict[str, object]:
    return {BASIC: make_basic_provider, X509: make_x509_provider}
