"""
L{fedserver_wire.checks} and the L{fedserver.jsonapi} checks the Wire plugin
uses: labelled refusals and the checks on every value a peer or a client
sends.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from typing import Any, Iterator

import pytest

from fedserver.jsonapi import (
    APIError,
    bad_request,
    domain,
    json_list,
    json_object,
    json_response,
    parse_json,
    query_integer,
    text,
    uuid_id,
)
from fedserver_wire.checks import QualifiedId, handle, iso_time, qualified_ids, timestamp

ID = "d389b370-5f7d-4efd-9f9a-8d525540ad93"


@contextmanager
def refused(label: str, code: int = 400) -> Iterator[Any]:
    """Assert that the block raises an L{APIError} with C{label} and C{code}."""
    with pytest.raises(APIError) as info:
        yield info
    assert (info.value.code, info.value.label) == (code, label), info.value


def test_a_refusal_is_labelled_json():
    error = APIError(403, "access-denied", "no")
    response = error.response()
    assert response.code == 403
    assert response.header("content-type") == "application/json"
    assert json.loads(response.body) == {"code": 403, "label": "access-denied", "message": "no"}
    assert "access-denied" in repr(error)
    assert bad_request("x").to_json() == {"code": 400, "label": "bad-request", "message": "x"}


def test_json_response_keeps_unicode_and_null():
    assert json_response(None).body == b"null"
    response = json_response({"name": "Zoë"}, 201)
    assert response.code == 201
    assert json.loads(response.body) == {"name": "Zoë"}


def test_parse_json():
    assert parse_json(b'{"a": 1}', "the body") == {"a": 1}
    with refused("bad-request") as check:
        parse_json(b"{nope", "the body")
    assert "the body is not a JSON document" in check.value.message


@pytest.mark.parametrize("value", [None, [], "x", 1, True])
def test_an_object_is_required(value):
    with refused("bad-request") as check:
        json_object(value, "the request")
    assert "the request must be an object" in check.value.message


def test_required_and_unknown_keys():
    assert json_object({"a": 1}, "r", required=("a",)) == {"a": 1}
    with refused("bad-request") as check:
        json_object({}, "r", required=("a",))
    assert "has no 'a'" in check.value.message
    with refused("bad-request") as check:
        json_object({"a": 1, "b": 2}, "r", required=("a",), optional=("c",))
    assert "unknown key 'b'" in check.value.message and "'a', 'c'" in check.value.message
    # peers may add fields
    assert json_object({"a": 1, "b": 2}, "r", required=("a",), strict=False) == {"a": 1, "b": 2}


def test_lists():
    assert json_list([1, 2], "ids", maximum=2) == [1, 2]
    with refused("bad-request"):
        json_list({"a": 1}, "ids", maximum=2)
    with refused("bad-request") as check:
        json_list([1, 2, 3], "ids", maximum=2)
    assert "at most 2" in check.value.message
    with refused("bad-request"):
        json_list([], "ids", maximum=2, minimum=1)


def test_text():
    assert text("Bob", "name", maximum=3) == "Bob"
    assert text("a\nb\tc", "text", maximum=10, single_line=False) == "a\nb\tc"
    with refused("bad-request"):
        text(3, "name", maximum=10)
    with refused("bad-request"):
        text("", "name", maximum=10)
    with refused("bad-request"):
        text("abcd", "name", maximum=3)
    with refused("bad-request") as check:
        text("a\nb", "name", maximum=10)
    assert "U+000A" in check.value.message
    with refused("bad-request"):
        text("a\x00b", "text", maximum=10, single_line=False)


@pytest.mark.parametrize("value", ["bob", "b.o_b-1", "ab", "a" * 64])
def test_valid_handles(value):
    assert handle(value, "handle") == value


@pytest.mark.parametrize("value", ["b", "a" * 65, "Bob", "bob!", "bøb", "bob\n", "", 5, None])
def test_invalid_handles(value):
    with refused("invalid-handle"):
        handle(value, "handle")


def test_ids_are_canonical_uuids():
    assert uuid_id(ID, "id") == ID
    for value in [ID.upper(), ID.replace("-", ""), "{" + ID + "}", "x" * 36, 7, None]:
        with refused("bad-request"):
            uuid_id(value, "id")


def test_domains():
    assert domain("b.example", "domain") == "b.example"
    for value in ["B.example", "b..example", "-b.example", "b.example/x", "", 3]:
        with refused("bad-request"):
            domain(value, "domain")


def test_qualified_ids():
    qid = QualifiedId.from_json({"id": ID, "domain": "b.example", "extra": 1}, "user")
    assert qid == QualifiedId("b.example", ID)
    assert qid.to_json() == {"id": ID, "domain": "b.example"}
    assert str(qid) == f"{ID}@b.example"
    with refused("bad-request"):
        QualifiedId.from_json({"id": ID}, "user")
    with refused("bad-request"):
        QualifiedId.from_json({"id": "nope", "domain": "b.example"}, "user")
    with refused("bad-request"):
        QualifiedId.from_json(ID, "user")


def test_lists_of_qualified_ids_are_distinct():
    one = {"id": ID, "domain": "b.example"}
    assert qualified_ids([one], "members", maximum=2) == [QualifiedId("b.example", ID)]
    with refused("bad-request") as check:
        qualified_ids([one, one], "members", maximum=2)
    assert "twice" in check.value.message
    with refused("bad-request"):
        qualified_ids([one] * 3, "members", maximum=2)
    with refused("bad-request") as check:
        qualified_ids([one, {"id": 1}], "members", maximum=2)
    assert "members[1]" in check.value.message


def test_times():
    assert iso_time(0) == "1970-01-01T00:00:00.000Z"
    assert iso_time(1715170000.25) == "2024-05-08T12:06:40.250Z"
    assert iso_time(59.9996) == "1970-01-01T00:01:00.000Z"
    assert timestamp("2024-05-08T12:06:40.250Z", "time") == "2024-05-08T12:06:40.250Z"
    assert timestamp("2024-05-08T12:06:40Z", "time") == "2024-05-08T12:06:40Z"
    for value in ["2024-05-08 12:06:40", "yesterday", 5]:
        with refused("bad-request"):
            timestamp(value, "time")


def test_query_integers():
    assert query_integer(None, "size", minimum=1, maximum=5, default=3) == 3
    assert query_integer("5", "size", minimum=1, maximum=5, default=3) == 5
    for value in ["0", "6", "-1", "x", "1.5", "٣"]:
        with refused("bad-request"):
            query_integer(value, "size", minimum=1, maximum=5, default=3)
