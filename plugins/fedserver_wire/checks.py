"""
What the reference brig, galley and client API share about their inputs and
outputs: labelled refusals, JSON answers, and the checks every value from a
peer or a client goes through before it is used.

A refusal is a L{WireError}: an HTTP status, a label and a sentence, answered
as JSON C{{"code", "label", "message"}} like every other fedserver error.
Its labels are those of wire-server's brig and galley (C{bad-request},
C{invalid-handle}, C{handle-exists}, C{not-found}, C{no-conversation},
C{access-denied}, ...), which are not federator labels, so they are not in
L{fedserver.errors.LABELS}: they are the components' own answers, which the
pipeline hands back to the peer unchanged.

Limits: handles match C{^[a-z0-9._-]{2,64}$}; user, client and conversation
ids are canonical (lower-case, hyphenated) UUIDs; domains are lower-case DNS
names; names are 1 to 128 characters without control characters;
conversation names 1 to 256; message texts 1 to 4096 characters; a search
term 1 to 128; a conversation has at most L{MAX_MEMBERS} members; a list of
ids at most L{MAX_IDS}.
"""

from __future__ import annotations

import json
import re
import time
import unicodedata
import uuid
from typing import Any, Dict, Iterable, List, Mapping, Optional

import attrs

from fedserver.config import is_domain_name
from fedserver.values import Response

HANDLE = re.compile(r"[a-z0-9._-]{2,64}")
MAX_NAME = 128
MAX_CONVERSATION_NAME = 256
MAX_TEXT = 4096
MAX_TERM = 128
MAX_MEMBERS = 128
MAX_IDS = 500

JSON_HEADERS = (("Content-Type", "application/json"),)


class WireError(Exception):
    """
    A refusal by a reference component or the client API.

    @ivar code: the HTTP status.
    @ivar label: the machine-readable label.
    @ivar message: what was refused and why, for a person.
    """

    def __init__(self, code: int, label: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.label = label
        self.message = message

    def to_json(self) -> Dict[str, Any]:
        """The refusal as the JSON object the caller receives."""
        return {"code": self.code, "label": self.label, "message": self.message}

    def response(self) -> Response:
        """The refusal as an HTTP answer."""
        return json_response(self.to_json(), self.code)

    def __repr__(self) -> str:
        return f"<WireError {self.code} {self.label}: {self.message}>"


def bad_request(message: str) -> WireError:
    """C{400 bad-request}: the input has the wrong shape."""
    return WireError(400, "bad-request", message)


def json_response(value: Any, code: int = 200) -> Response:
    """C{value} as a JSON answer with status C{code}."""
    return Response(code, JSON_HEADERS, json.dumps(value).encode("utf-8"))


def parse_json(body: bytes, what: str) -> Any:
    """The JSON document in C{body}; C{400 bad-request} when there is none."""
    try:
        return json.loads(body)
    except ValueError as e:
        raise bad_request(f"{what} is not a JSON document: {e}") from None


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
                raise bad_request(f"{where} has an unknown key {key!r} (known keys: {expected})")
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


def handle(value: Any, where: str) -> str:
    """A user handle; C{400 invalid-handle} unless it matches C{^[a-z0-9._-]{2,64}$}."""
    if not isinstance(value, str) or not HANDLE.fullmatch(value):
        shown = repr(value) if isinstance(value, str) else describe(value)
        raise WireError(
            400,
            "invalid-handle",
            f"{where} {shown[:80]} is not a handle: 2 to 64 of a-z, 0-9, '.', '_' and '-'",
        )
    return value


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


@attrs.frozen(order=True)
class QualifiedId:
    """
    An id qualified with the backend domain that owns it, written
    C{{"id": ..., "domain": ...}} in bodies and C{{domain}/{id}} in paths.
    """

    domain: str
    id: str

    @classmethod
    def from_json(cls, value: Any, where: str) -> QualifiedId:
        """Read C{{"id", "domain"}}, checking both."""
        obj = json_object(value, where, required=("id", "domain"), strict=False)
        return cls(domain(obj["domain"], f"{where}.domain"), uuid_id(obj["id"], f"{where}.id"))

    def to_json(self) -> Dict[str, str]:
        """C{{"id", "domain"}}."""
        return {"id": self.id, "domain": self.domain}

    def __str__(self) -> str:
        return f"{self.id}@{self.domain}"


def qualified_ids(value: Any, where: str, *, maximum: int) -> List[QualifiedId]:
    """A list of distinct qualified ids, in the order given."""
    items = json_list(value, where, maximum=maximum)
    result: List[QualifiedId] = []
    for i, item in enumerate(items):
        qid = QualifiedId.from_json(item, f"{where}[{i}]")
        if qid in result:
            raise bad_request(f"{where} names {qid} twice")
        result.append(qid)
    return result


def iso_time(seconds: float) -> str:
    """C{seconds} since the epoch as ISO 8601 UTC with milliseconds, as wire-server writes times."""
    whole = int(seconds)
    millis = round((seconds - whole) * 1000)
    if millis == 1000:
        whole, millis = whole + 1, 0
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole)) + f".{millis:03d}Z"


_ISO_TIME = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{1,6})?Z")


def timestamp(value: Any, where: str) -> str:
    """An ISO 8601 UTC time as L{iso_time} writes it (fractions optional)."""
    if not isinstance(value, str) or not _ISO_TIME.fullmatch(value):
        shown = repr(value)[:80] if isinstance(value, str) else describe(value)
        raise bad_request(f"{where} {shown} is not a UTC time such as 2024-05-08T12:00:00.000Z")
    return value


def optional_int(value: Optional[str], where: str, *, minimum: int, maximum: int, default: int) -> int:
    """A decimal integer from a query parameter, within bounds; C{default} when absent."""
    if value is None:
        return default
    if not value.isascii() or not value.isdigit() or len(value) > 18:
        raise bad_request(f"{where} must be a decimal integer, not {value[:40]!r}")
    number = int(value)
    if not minimum <= number <= maximum:
        raise bad_request(f"{where} must be between {minimum} and {maximum}, not {number}")
    return number
