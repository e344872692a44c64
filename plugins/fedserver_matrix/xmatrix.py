"""
The X-Matrix request signature of the server-server API.

A request is signed as the JSON object C{{"method", "uri", "origin",
"destination", "content"}} (C{uri}: the path and query as sent, raw;
C{content}: the parsed body, only when there is one), and the signature
travels in an C{Authorization} header::

    Authorization: X-Matrix origin="a.example",destination="b.example",key="ed25519:k",sig="..."

Parsing follows the specification (RFC 7235 credentials): the scheme, one or
more spaces, then comma-separated C{name=value} parameters in any order,
names case-insensitive, values a token or a quoted string with backslash
escapes; unquoted values may hold colons (and, as Synapse sends them, C{/}
and C{=}); unknown parameters are ignored.  A request may carry several
X-Matrix headers (one per signing key) for one origin.

Failures are L{XMatrixError}s, L{AuthenticationFailure}s that also carry the
Matrix error a route answers with (C{errcode}, C{matrix_status}) and a
Matrix-specific C{matrix_label}; see L{MATRIX_LABELS}.
"""

from __future__ import annotations

import functools
import ipaddress
import json
import re
from typing import Any, Dict, Iterable, List, Mapping, Optional, Tuple

import attrs
from signedjson.sign import sign_json
from signedjson.types import SigningKey

from fedserver.errors import AuthenticationFailure
from fedserver_matrix.keys import KeyFormatError, key_id_of, split_key_id

SCHEME = "X-Matrix"

#: Matrix label -> (HTTP status, Matrix errcode) of the authenticator's failures
MATRIX_LABELS: Mapping[str, Tuple[int, str]] = {
    # no X-Matrix Authorization header at all
    "missing-authorization": (401, "M_UNAUTHORIZED"),
    # an X-Matrix header that cannot be parsed, lacks a parameter, or
    # several that disagree about the origin
    "malformed-authorization": (400, "M_UNAUTHORIZED"),
    # the destination parameter is not our server name
    "wrong-destination": (401, "M_UNAUTHORIZED"),
    # the origin's keys could not be had (its key server and notaries failed)
    "keys-unavailable": (401, "M_UNAUTHORIZED"),
    # no signature by a key of the origin that is known and valid now
    "unknown-key": (401, "M_UNAUTHORIZED"),
    # a signature by a known, valid key does not verify
    "bad-signature": (401, "M_UNAUTHORIZED"),
    # the body is not JSON, so the signed content cannot be rebuilt
    "not-json": (400, "M_NOT_JSON"),
}


class XMatrixError(AuthenticationFailure):
    """
    An X-Matrix authentication failure.

    @ivar matrix_label: the key of L{MATRIX_LABELS} that says why.
    @ivar errcode: the Matrix error code (C{M_UNAUTHORIZED}, C{M_NOT_JSON}).
    @ivar matrix_status: the HTTP status a Matrix route answers with.

    The fedserver C{label} is C{invalid-json} for C{not-json}, else
    C{authentication-failure}.
    """

    def __init__(self, message: str, matrix_label: str) -> None:
        status, errcode = MATRIX_LABELS[matrix_label]
        super().__init__(message, "invalid-json" if matrix_label == "not-json" else "authentication-failure")
        self.matrix_label = matrix_label
        self.errcode = errcode
        self.matrix_status = status

    def __repr__(self) -> str:
        return f"<XMatrixError {self.matrix_label}: {self.message}>"


@attrs.frozen
class XMatrixAuthorization:
    """
    One X-Matrix credential.

    @ivar destination: C{None} when the header had none (older servers).
    """

    origin: str
    destination: Optional[str]
    key: str
    sig: str


# RFC 7230 tchar
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
# an unquoted value: anything but whitespace, comma, quote and backslash
_BARE_VALUE = re.compile(r'[^\s,"\\]+')
_OWS = re.compile(r"[ \t]*")
_SCHEME_RE = re.compile(r"x-matrix[ \t]+", re.IGNORECASE)
_PRINTABLE = re.compile(r"[\t\x20-\x7e]*")
# one parameter and what ends it, after any empty list elements: the fast
# path of _parse_params, for well-formed headers (quoted value: group 2,
# escapes still in; unquoted value: group 3)
_PARAM = re.compile(
    r"(?:[ \t]*,)*[ \t]*"
    r"([!#$%&'*+.^_`|~0-9A-Za-z-]+)[ \t]*=[ \t]*"
    r'(?:"([^"\\]*(?:\\.[^"\\]*)*)"|([^\s,"\\]+))'
    r"[ \t]*(?:,|\Z)",
    re.DOTALL,
)
_LIST_END = re.compile(r"[ \t,]*")
_ESCAPE = re.compile(r"\\(.)", re.DOTALL)


def _malformed(reason: str) -> XMatrixError:
    return XMatrixError(f"malformed X-Matrix Authorization header: {reason}", "malformed-authorization")


def is_x_matrix(value: str) -> bool:
    """Whether an Authorization header value uses the X-Matrix scheme."""
    scheme = value.lstrip(" \t").split(" ", 1)[0].split("\t", 1)[0]
    return scheme.lower() == SCHEME.lower()


def parse_authorization(value: str) -> XMatrixAuthorization:
    """
    Parse one C{Authorization} header value.

    @raise XMatrixError: C{malformed-authorization}, saying what is wrong.
    """
    if not _PRINTABLE.fullmatch(value):
        raise _malformed("it holds characters other than printable ASCII")
    value = value.strip(" \t")
    match = _SCHEME_RE.match(value)
    if match is None:
        raise _malformed(f"it does not start with '{SCHEME} ' (found {value[:20]!r})")
    params = _parse_params(value, match.end())
    if not (params.get("origin") and params.get("key") and params.get("sig")):
        missing = [name for name in ("origin", "key", "sig") if not params.get(name)]
        raise _malformed(f"{', '.join(missing)} {'is' if len(missing) == 1 else 'are'} missing or empty")
    origin = params["origin"]
    if not (_is_origin(origin) if len(origin) <= _CACHED_NAME_LENGTH else is_server_name(origin)):
        raise _malformed(f"origin {origin[:100]!r} is not a Matrix server name")
    try:
        split_key_id(params["key"])
    except KeyFormatError as e:
        raise _malformed(str(e)) from None
    return XMatrixAuthorization(origin, params.get("destination"), params["key"], params["sig"])


def _parse_params(value: str, pos: int) -> Dict[str, str]:
    """
    The parameters from C{pos} on: one regular expression per parameter
    when the list is well formed (the common case, and the per-request
    cost); anything it does not take (no parameter, a name twice, a syntax
    error) is left to L{_parse_params_stepwise}, which accepts or refuses
    it and says why.
    """
    params: Dict[str, str] = {}
    start, end = pos, len(value)
    while pos < end:
        match = _PARAM.match(value, pos)
        if match is None:
            if _LIST_END.fullmatch(value, pos):
                break
            return _parse_params_stepwise(value, start)
        name, quoted, bare = match.groups()
        name = name.lower()
        if name in params:
            return _parse_params_stepwise(value, start)
        if quoted is None:
            params[name] = bare
        else:
            params[name] = _ESCAPE.sub(r"\1", quoted) if "\\" in quoted else quoted
        pos = match.end()
    return params or _parse_params_stepwise(value, start)


def _parse_params_stepwise(value: str, pos: int) -> Dict[str, str]:
    params: Dict[str, str] = {}
    end = len(value)
    while True:
        pos = _skip(value, pos)
        if pos < end and value[pos] == ",":  # empty list elements are allowed (RFC 7230 #rule)
            pos += 1
            continue
        if pos >= end:
            break
        name_match = _TOKEN.match(value, pos)
        if name_match is None:
            raise _malformed(f"expected a parameter name at character {pos + 1}, found {value[pos:pos + 10]!r}")
        name = name_match.group().lower()
        pos = _skip(value, name_match.end())
        if pos >= end or value[pos] != "=":
            raise _malformed(f"the parameter {name!r} has no '=value'")
        pos = _skip(value, pos + 1)
        if pos < end and value[pos] == '"':
            text, pos = _quoted(value, pos)
        else:
            bare = _BARE_VALUE.match(value, pos)
            if bare is None:
                raise _malformed(f"the parameter {name!r} has no value")
            text, pos = bare.group(), bare.end()
        if name in params:
            raise _malformed(f"the parameter {name!r} appears twice")
        params[name] = text
        pos = _skip(value, pos)
        if pos < end and value[pos] != ",":
            raise _malformed(f"expected ',' after the parameter {name!r}, found {value[pos:pos + 10]!r}")
        pos += 1
    if not params:
        raise _malformed("it has no parameters")
    return params


def _skip(value: str, pos: int) -> int:
    match = _OWS.match(value, pos)
    assert match is not None  # the pattern matches the empty string
    return match.end()


def _quoted(value: str, pos: int) -> Tuple[str, int]:
    out: List[str] = []
    pos += 1
    while pos < len(value):
        char = value[pos]
        if char == "\\":
            if pos + 1 >= len(value):
                break
            out.append(value[pos + 1])
            pos += 2
        elif char == '"':
            return "".join(out), pos + 1
        else:
            out.append(char)
            pos += 1
    raise _malformed("a quoted value is not closed")


def authorizations_of(headers: Iterable[Tuple[str, str]]) -> List[XMatrixAuthorization]:
    """
    Every X-Matrix credential of a request's headers (other Authorization
    schemes are ignored).  All must name the same origin and destination.

    @raise XMatrixError: C{missing-authorization} when there is none,
        C{malformed-authorization} when one cannot be parsed or they disagree.
    """
    found = [
        parse_authorization(value)
        for name, value in headers
        if name.lower() == "authorization" and is_x_matrix(value)
    ]
    if not found:
        raise XMatrixError("the request has no 'Authorization: X-Matrix ...' header", "missing-authorization")
    first = found[0]
    for other in found[1:]:
        if other.origin != first.origin:
            raise _malformed(f"the headers name different origins ({first.origin!r} and {other.origin!r})")
        if other.destination != first.destination:
            raise _malformed("the headers name different destinations")
    keys = [a.key for a in found]
    if len(set(keys)) != len(keys):
        raise _malformed("two headers carry a signature by the same key")
    return found


def request_uri(path: str, query: str = "") -> str:
    """The C{uri} that is signed: the raw path, and the raw query if any."""
    return f"{path}?{query}" if query else path


def request_json(method: str, uri: str, origin: str, destination: str, content: Any = None) -> Dict[str, Any]:
    """
    The object that is signed; C{content} (the parsed body) is left out
    when it is C{None}, as when there is no body.
    """
    signed: Dict[str, Any] = {"method": method, "uri": uri, "origin": origin, "destination": destination}
    if content is not None:
        signed["content"] = content
    return signed


def parse_body(body: bytes) -> Any:
    """
    The C{content} of a request's body: C{None} for no body, else its JSON.

    @raise XMatrixError: C{not-json}.
    """
    if not body:
        return None
    try:
        if isinstance(body, (bytes, bytearray)):
            # what json.loads(body, parse_constant=_no_constant) does, without a new decoder per call
            return _DECODER.decode(body.decode(json.detect_encoding(body), "surrogatepass"))
        return json.loads(body, parse_constant=_no_constant)
    except (ValueError, RecursionError) as e:
        raise XMatrixError(f"the request body is not JSON ({e}), so its signature cannot be checked",
                           "not-json") from None


def _no_constant(name: str) -> Any:
    # NaN and Infinity are not JSON, and canonical JSON cannot encode them
    raise ValueError(f"{name} is not a JSON value")


_DECODER = json.JSONDecoder(parse_constant=_no_constant)


def sign_request(
    signing_key: SigningKey, origin: str, destination: str, method: str, uri: str, content: Any = None
) -> XMatrixAuthorization:
    """The X-Matrix credential of a request, signed with C{signing_key}."""
    signed = sign_json(request_json(method, uri, origin, destination, content), origin, signing_key)
    key_id = key_id_of(signing_key)
    return XMatrixAuthorization(origin, destination, key_id, signed["signatures"][origin][key_id])


def _quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def format_authorization(authorization: XMatrixAuthorization) -> str:
    """
    The C{Authorization} header value, as the specification writes it:
    one space after the scheme, lower-case names, quoted values.
    """
    params = [("origin", authorization.origin)]
    if authorization.destination is not None:
        params.append(("destination", authorization.destination))
    params += [("key", authorization.key), ("sig", authorization.sig)]
    return f"{SCHEME} " + ",".join(f"{name}={_quote(value)}" for name, value in params)


_PORT = re.compile(r"[0-9]{1,5}")
_DNS_NAME = re.compile(r"[A-Za-z0-9.-]{1,255}")
_IPV4 = re.compile(r"[0-9]{1,3}(\.[0-9]{1,3}){3}")


def split_server_name(name: str) -> Tuple[str, Optional[int]]:
    """
    C{(host, port)} of a Matrix server name (C{host[:port]}, host an IPv4
    literal, a bracketed IPv6 literal or a DNS name); the port is C{None}
    when not given.

    @raise ValueError: C{name} is not a server name.
    """
    if name.startswith("["):
        close = name.find("]")
        if close < 0:
            raise ValueError(f"{name!r}: the IPv6 literal is not closed")
        host, rest = name[: close + 1], name[close + 1:]
        try:
            ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            raise ValueError(f"{name!r}: {host} is not an IPv6 address") from None
        if rest and not rest.startswith(":"):
            raise ValueError(f"{name!r}: unexpected {rest!r} after the IPv6 literal")
        port_text = rest[1:] if rest else None
    else:
        host, sep, port_text_ = name.partition(":")
        port_text = port_text_ if sep else None
        if _IPV4.fullmatch(host):
            try:
                ipaddress.IPv4Address(host)
            except ValueError:
                raise ValueError(f"{name!r}: {host} is not an IPv4 address") from None
        elif not _DNS_NAME.fullmatch(host) or host.startswith(".") or ".." in host:
            raise ValueError(f"{name!r}: {host!r} is not a DNS name")
    if port_text is None:
        return host, None
    if not _PORT.fullmatch(port_text) or not 0 < int(port_text) < 65536:
        raise ValueError(f"{name!r}: {port_text!r} is not a port number")
    return host, int(port_text)


def is_server_name(name: str) -> bool:
    """Whether C{name} is a Matrix server name (see L{split_server_name})."""
    try:
        split_server_name(name)
    except ValueError:
        return False
    return True


#: origins up to this length have their check remembered (longer ones are no server name anyway)
_CACHED_NAME_LENGTH = 300


@functools.lru_cache(maxsize=1024)
def _is_origin(name: str) -> bool:
    """L{is_server_name}, remembered: the same few origins sign every request."""
    return is_server_name(name)
