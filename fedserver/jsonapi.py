"""
A small toolkit for the JSON APIs that plugins put on fedserver's listeners
and the JSON RPCs their components answer: labelled refusals, checks of
request values, a route table and the Twisted resource that serves it.

A refusal is an L{APIError}: an HTTP status, a label and a sentence for a
person, answered as C{{"code", "label", "message"[, "data"]}} like every
other fedserver error.  Its labels are the plugin's own (C{bad-request},
C{not-found}, ...), not federator labels, so they are not in
L{fedserver.errors.LABELS}: a component's refusal is handed back to the peer
unchanged by the pipeline.
"""

from __future__ import annotations

import abc
import functools
import json
import unicodedata
import uuid
from typing import (
    Any,
    Awaitable,
    Callable,
    Coroutine,
    Dict,
    Iterable,
    List,
    Mapping,
    Optional,
    ParamSpec,
    Sequence,
    Tuple,
    TypeVar,
)

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.web import resource, server

from fedserver.config import is_domain_name
from fedserver.errors import FederationError
from fedserver.values import FederatedCall, Response
from fedserver.web import body_of, refuse, request_id_from, serve

log = Logger(namespace="fedserver.jsonapi")

JSON_HEADERS = (("Content-Type", "application/json"),)

P = ParamSpec("P")
T = TypeVar("T")


class APIError(Exception):
    """
    A refusal by a plugin's API or component.

    @ivar code: the HTTP status.
    @ivar label: the machine-readable label.
    @ivar message: what was refused and why, for a person.
    @ivar data: optional machine-readable context (e.g. the current epoch).
    """

    def __init__(self, code: int, label: str, message: str, *, data: Optional[Mapping[str, Any]] = None) -> None:
        super().__init__(message)
        self.code = code
        self.label = label
        self.message = message
        self.data = dict(data) if data else None

    def to_json(self) -> Dict[str, Any]:
        """The refusal as the JSON object the caller receives."""
        body: Dict[str, Any] = {"code": self.code, "label": self.label, "message": self.message}
        if self.data:
            body["data"] = self.data
        return body

    def response(self) -> Response:
        """The refusal as an HTTP answer."""
        return json_response(self.to_json(), self.code)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.code} {self.label}: {self.message}>"


def bad_request(message: str) -> APIError:
    """C{400 bad-request}: the input has the wrong shape."""
    return APIError(400, "bad-request", message)


def json_response(value: Any, code: int = 200) -> Response:
    """C{value} as a JSON answer with status C{code}."""
    return Response(code, JSON_HEADERS, json.dumps(value).encode("utf-8"))


def parse_json(body: bytes, what: str) -> Any:
    """The JSON document in C{body}; C{400 bad-request} when there is none."""
    try:
        return json.loads(body)
    except ValueError as e:
        raise bad_request(f"{what} is not a JSON document: {e}") from None
    except RecursionError:
        raise bad_request(f"{what} nests too deeply") from None


def describe(value: Any) -> str:
    """A JSON type name for messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def json_object(
    value: Any,
    where: str,
    *,
    required: Iterable[str] = (),
    optional: Iterable[str] = (),
    strict: bool = True,
) -> Mapping[str, Any]:
    """
    C{value} as a JSON object holding every key of C{required}.  With
    C{strict}, a key outside C{required} and C{optional} is refused (client
    requests: a misspelt key shows); without, it is ignored (peers' RPCs: a
    newer peer may add fields).
    """
    if not isinstance(value, dict):
        raise bad_request(f"{where} must be an object, not {describe(value)}")
    required = tuple(required)
    for key in required:
        if key not in value:
            raise bad_request(f"{where} has no {key!r}")
    if strict:
        known = set(required) | set(optional)
        for key in value:
            if key not in known:
                expected = ", ".join(repr(k) for k in sorted(known)) or "none"
                raise bad_request(f"{where} has an unknown key {key[:40]!r} (known keys: {expected})")
    return value


def json_list(value: Any, where: str, *, maximum: int, minimum: int = 0) -> List[Any]:
    """C{value} as a list of C{minimum} to C{maximum} items."""
    if not isinstance(value, list):
        raise bad_request(f"{where} must be a list, not {describe(value)}")
    if len(value) > maximum:
        raise bad_request(f"{where} has {len(value)} items; at most {maximum} are accepted")
    if len(value) < minimum:
        raise bad_request(f"{where} needs at least {minimum} item{'s' if minimum > 1 else ''}")
    return value


def text(value: Any, where: str, *, maximum: int, minimum: int = 1, single_line: bool = True) -> str:
    """
    C{value} as a string of C{minimum} to C{maximum} characters.  With
    C{single_line}, no control characters at all; else tabs and line breaks
    are allowed.
    """
    if not isinstance(value, str):
        raise bad_request(f"{where} must be a string, not {describe(value)}")
    if not minimum <= len(value) <= maximum:
        raise bad_request(f"{where} must have {minimum} to {maximum} characters, not {len(value)}")
    allowed = "" if single_line else "\t\n\r"
    for char in value:
        if char not in allowed and unicodedata.category(char) in ("Cc", "Cs"):
            raise bad_request(f"{where} contains the control character U+{ord(char):04X}")
    return value


def integer(value: Any, where: str, *, minimum: int, maximum: int) -> int:
    """C{value} as a JSON integer (not a boolean) from C{minimum} to C{maximum}."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise bad_request(f"{where} must be an integer, not {describe(value)}")
    if not minimum <= value <= maximum:
        raise bad_request(f"{where} must be from {minimum} to {maximum}, not {value}")
    return value


def boolean(value: Any, where: str) -> bool:
    """C{value} as a JSON boolean."""
    if not isinstance(value, bool):
        raise bad_request(f"{where} must be true or false, not {describe(value)}")
    return value


def query_integer(value: Optional[str], where: str, *, minimum: int, maximum: int, default: Optional[int]) -> int:
    """
    A decimal query parameter from C{minimum} to C{maximum}; C{default} when
    it is absent (C{None}: it is required).
    """
    if value is None:
        if default is None:
            raise bad_request(f"the query parameter {where} is required")
        return default
    if not (value.isascii() and value.isdigit()) or len(value) > 20:
        raise bad_request(f"{where} must be a decimal number, not {value[:40]!r}")
    number = int(value)
    if not minimum <= number <= maximum:
        raise bad_request(f"{where} must be from {minimum} to {maximum}, not {number}")
    return number


def uuid_id(value: Any, where: str) -> str:
    """A canonical UUID (lower case, hyphenated), as ids are written."""
    if isinstance(value, str) and len(value) == 36:
        try:
            if str(uuid.UUID(value)) == value:
                return value
        except ValueError:
            pass
    shown = repr(value)[:80] if isinstance(value, str) else describe(value)
    raise bad_request(f"{where} {shown} is not an id (a lower-case UUID)")


def domain(value: Any, where: str) -> str:
    """A backend domain: a lower-case DNS name."""
    if not isinstance(value, str) or not is_domain_name(value):
        shown = repr(value)[:80] if isinstance(value, str) else describe(value)
        raise bad_request(f"{where} {shown} is not a backend domain (a lower-case DNS name)")
    return value


def new_id() -> str:
    """A fresh random id."""
    return str(uuid.uuid4())


def query_params(args: Mapping[bytes, Sequence[bytes]], names: Sequence[str]) -> Dict[str, str]:
    """The query parameters, decoded; each at most once and only those in C{names}."""
    query: Dict[str, str] = {}
    for raw_name, values in args.items():
        try:
            name = raw_name.decode("utf-8")
            decoded = [v.decode("utf-8") for v in values]
        except UnicodeDecodeError:
            raise bad_request("the query string is not UTF-8") from None
        if name not in names:
            known = ", ".join(names) or "none"
            raise bad_request(f"unknown query parameter {name[:40]!r} (known: {known})")
        if len(decoded) != 1:
            raise bad_request(f"the query parameter {name!r} is given {len(decoded)} times")
        query[name] = decoded[0]
    return query


#: a route's handler: C{handler(*path_params, request=...)} -> answer
Handler = Callable[..., Awaitable[Response]]


class Router:
    """
    A table of routes under one mount segment.  A template is a tuple of
    path segments where C{"{}"} matches any one segment and passes it to the
    handler; a path no template matches is C{404 no-endpoint}, and one that
    matches with another method is C{405 method-not-allowed}.

    @param segment: the first path segment (the mount point), e.g. C{"wire"}.
    """

    def __init__(self, segment: str, what: str) -> None:
        self.segment = segment
        self.what = what
        self._routes: List[Tuple[Tuple[str, ...], str, Handler, Tuple[str, ...]]] = []

    def add(self, method: str, template: Tuple[str, ...], handler: Handler, query: Sequence[str] = ()) -> None:
        """Route C{method} on C{template} to C{handler}, which accepts the query parameters C{query}."""
        self._routes.append((template, method, handler, tuple(query)))

    def routes(self) -> List[Tuple[str, Tuple[str, ...], Tuple[str, ...]]]:
        """Every route as C{(method, template, query names)}, in the order added (for descriptions and tests)."""
        return [(method, template, query) for template, method, _, query in self._routes]

    def route(self, method: str, path: str) -> Tuple[Handler, List[str], Tuple[str, ...]]:
        """The handler of C{method path}, the path's parameters and the query names it takes."""
        segments = path.split("/")
        if segments[:2] != ["", self.segment]:
            raise APIError(404, "no-endpoint", f"{self.what} is under /{self.segment}/")
        segments = segments[2:]
        allowed = []
        for template, route_method, handler, query_names in self._routes:
            if len(template) != len(segments):
                continue
            params = []
            for expected, actual in zip(template, segments, strict=True):
                if expected == "{}":
                    params.append(actual)
                elif expected != actual:
                    break
            else:
                if route_method == method:
                    return handler, params, query_names
                allowed.append(route_method)
        if allowed:
            raise APIError(405, "method-not-allowed", f"{path[:200]} takes {', '.join(allowed)}, not {method}")
        raise APIError(404, "no-endpoint", f"{self.what} has no route {path[:200]}")


class JSONAPIResource(resource.Resource):
    """
    A JSON API as a Twisted resource: bodies within C{max_body_bytes}, one
    log line per request with its request id (C{Request-Id} when the client
    sends one), no traceback ever shown.

    @param handle: C{handle(request, body, request_id)} fires with the
        L{Response}; it may fail with L{APIError} or L{FederationError},
        which are answered as their labelled JSON.
    """

    isLeaf = True

    def __init__(
        self,
        name: str,
        handle: Callable[[server.Request, bytes, str], Deferred[Response]],
        *,
        max_body_bytes: int,
    ) -> None:
        super().__init__()
        self.name = name
        self._handle = handle
        self.max_body_bytes = max_body_bytes

    def render(self, request: server.Request) -> int:
        request_id = request_id_from(request, b"request-id")
        try:
            body = body_of(request, self.max_body_bytes)
        except FederationError as e:
            return refuse(request, e, request_id)
        method = request.method.decode("latin-1")
        path = request.path.decode("latin-1")
        return serve(
            request,
            lambda: _answering_refusals(self._handle(request, body, request_id)),
            describe=f"{self.name} {method} {path[:120]}",
            request_id=request_id,
        )


def _answering_refusals(d: Deferred[Response]) -> Deferred[Response]:
    def answer(failure: Any) -> Response:
        failure.trap(APIError)
        return failure.value.response()

    return d.addErrback(answer)


def deferred(method: Callable[P, Coroutine[Any, Any, T]]) -> Callable[P, Deferred[T]]:
    """Make an C{async def} return a L{Deferred}, as Twisted APIs do."""

    @functools.wraps(method)
    def run(*args: P.args, **kwargs: P.kwargs) -> Deferred[T]:
        return Deferred.fromCoroutine(method(*args, **kwargs))

    return run


#: an RPC implementation: C{(call, decoded body) -> JSON answer}
RPC = Callable[[FederatedCall, Any], Awaitable[Any]]


class RPCComponent(metaclass=abc.ABCMeta):
    """
    A component that answers federated calls by RPC name (C{rpcs}), with
    JSON bodies.  An L{APIError} becomes its JSON answer with its status; a
    L{FederationError} is left to the pipeline, which answers it labelled;
    anything else is a bug, which the pipeline logs and answers as
    C{internal-error} without a traceback.

    @ivar name: the component name, for messages.
    """

    name: str

    @abc.abstractmethod
    def rpcs(self) -> Dict[str, RPC]:
        """The RPCs this component answers, by name."""

    def handle(self, call: FederatedCall) -> Deferred[Response]:
        """Answer C{call} (L{fedserver.interfaces.IComponentHandler})."""
        return Deferred.fromCoroutine(self._handle(call))

    async def _handle(self, call: FederatedCall) -> Response:
        try:
            rpc = self.rpcs().get(call.rpc)
            if rpc is None:
                known = ", ".join(sorted(self.rpcs()))
                raise APIError(404, "no-endpoint", f"{self.name} has no RPC {call.rpc[:80]!r} (it has: {known})")
            body = parse_json(call.body, f"the body of {call.rpc}")
            return json_response(await rpc(call, body))
        except APIError as e:
            log.info(
                "{component} refused {rpc} from {origin}: {code} {label}: {message} [request {request_id}]",
                component=self.name,
                rpc=call.rpc[:80],
                origin=call.origin_domain,
                code=e.code,
                label=e.label,
                message=e.message,
                request_id=call.request_id,
            )
            return e.response()
