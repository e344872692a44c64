"""
What the reference brig, galley and client API check in every value from a
peer or a client before it is used: handles, qualified ids, times and the
limits below.  Refusals, JSON answers and the generic checks (objects,
lists, texts, ids, domains) are L{fedserver.jsonapi}'s.

Refusals are L{fedserver.jsonapi.APIError}s with the labels of wire-server's
brig and galley (C{bad-request}, C{invalid-handle}, C{handle-exists},
C{not-found}, C{no-conversation}, C{access-denied}, ...), which are not
federator labels, so they are not in L{fedserver.errors.LABELS}: they are
the components' own answers, which the pipeline hands back to the peer
unchanged.

Limits: handles match C{^[a-z0-9._-]{2,64}$}; user, client and conversation
ids are canonical (lower-case, hyphenated) UUIDs; domains are lower-case DNS
names; names are 1 to 128 characters without control characters;
conversation names 1 to 256; message texts 1 to 4096 characters; a search
term 1 to 128; a conversation has at most L{MAX_MEMBERS} members; a list of
ids at most L{MAX_IDS}.
"""

from __future__ import annotations

import re
import time
from typing import Any, Dict, List

import attrs

from fedserver.jsonapi import APIError, bad_request, describe, domain, json_list, json_object, uuid_id

HANDLE = re.compile(r"[a-z0-9._-]{2,64}")
MAX_NAME = 128
MAX_CONVERSATION_NAME = 256
MAX_TEXT = 4096
MAX_TERM = 128
MAX_MEMBERS = 128
MAX_IDS = 500


def handle(value: Any, where: str) -> str:
    """A user handle; C{400 invalid-handle} unless it matches C{^[a-z0-9._-]{2,64}$}."""
    if not isinstance(value, str) or not HANDLE.fullmatch(value):
        shown = repr(value) if isinstance(value, str) else describe(value)
        raise APIError(
            400,
            "invalid-handle",
            f"{where} {shown[:80]} is not a handle: 2 to 64 of a-z, 0-9, '.', '_' and '-'",
        )
    return value


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

