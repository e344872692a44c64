"""Tests for fedserver_matrix.xmatrix: the X-Matrix Authorization header and the signed request."""

from __future__ import annotations

import pytest
from signedjson.key import get_verify_key
from signedjson.sign import SignatureVerifyException, verify_signed_json

from fedserver.errors import AuthenticationFailure, FederationError
from fedserver_matrix.keys import generate_signing_key, signing_key_from_seed
from fedserver_matrix.xmatrix import (
    MATRIX_LABELS,
    XMatrixAuthorization,
    XMatrixError,
    authorizations_of,
    format_authorization,
    is_server_name,
    is_x_matrix,
    parse_authorization,
    parse_body,
    request_json,
    request_uri,
    sign_request,
    split_server_name,
)

SIG = "KqmLSbO39/Bzb0QIYE82zqLwsA+PDzYIpIRA2sRQ4sL53+sN6/fpNSoqE7BP7vBZhG6kYdD13EIMJpvhJI+6Bw"
EXPECTED = XMatrixAuthorization("origin.hs.example.com", "destination.hs.example.com", "ed25519:key1", SIG)


def malformed(value: str) -> XMatrixError:
    with pytest.raises(XMatrixError) as info:
        parse_authorization(value)
    error = info.value
    assert (error.matrix_label, error.errcode, error.matrix_status) == (
        "malformed-authorization", "M_UNAUTHORIZED", 400)
    assert error.message.startswith("malformed X-Matrix Authorization header: ")
    return error


# parsing


@pytest.mark.parametrize(
    "value",
    [
        # the specification's example
        f'X-Matrix origin="origin.hs.example.com",destination="destination.hs.example.com",'
        f'key="ed25519:key1",sig="{SIG}"',
        # unquoted values, colons included, as older servers send them
        f"X-Matrix origin=origin.hs.example.com,destination=destination.hs.example.com,key=ed25519:key1,sig={SIG}",
        # any order, names in any case, spaces around commas and '=', several spaces after the scheme
        f'X-Matrix   sig="{SIG}" , KEY = "ed25519:key1",Destination="destination.hs.example.com",'
        "  ORIGIN=origin.hs.example.com",
        # the scheme in any case, a tab, unknown parameters ignored, empty list elements
        f'x-matrix\torigin="origin.hs.example.com",,foo="bar, \\"baz\\"",destination="destination.hs.example.com",'
        f'key="ed25519:key1",sig="{SIG}",',
        # backslash escapes in quoted values
        f'X-Matrix origin="origin.hs.\\example.com",destination="destination.hs.example.com",'
        f'key="ed25519:\\k\\e\\y1",sig="{SIG}"',
    ],
)
def test_parse(value):
    assert parse_authorization(value) == EXPECTED


def test_parse_without_destination():
    value = f'X-Matrix origin=origin.hs.example.com,key="ed25519:key1",sig="{SIG}"'
    assert parse_authorization(value) == XMatrixAuthorization("origin.hs.example.com", None, "ed25519:key1", SIG)


@pytest.mark.parametrize("origin", ["1.2.3.4", "1.2.3.4:1234", "[1234:5678::abcd]", "[1234:5678::abcd]:5678",
                                    "matrix.org:8888", "Matrix.ORG"])
def test_parse_server_name_forms(origin):
    value = f'X-Matrix origin="{origin}",key="ed25519:k",sig="{SIG}"'
    assert parse_authorization(value).origin == origin
    # unquoted too: brackets and colons are allowed
    assert parse_authorization(f"X-Matrix origin={origin},key=ed25519:k,sig={SIG}").origin == origin


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("Bearer abc", "does not start with 'X-Matrix '"),
        ("X-Matrix", "does not start with 'X-Matrix '"),
        ("X-Matrixorigin=a", "does not start with 'X-Matrix '"),
        ("X-Matrix ", "does not start with 'X-Matrix '"),
        ("X-Matrix ,,", "it has no parameters"),
        (f'X-Matrix key="ed25519:k",sig="{SIG}"', "origin is missing or empty"),
        ('X-Matrix origin="a.example",key="ed25519:k"', "sig is missing or empty"),
        ('X-Matrix origin="a.example"', "key, sig are missing or empty"),
        (f'X-Matrix origin="",key="ed25519:k",sig="{SIG}"', "origin is missing or empty"),
        (f'X-Matrix origin="a.example",origin="b.example",key="ed25519:k",sig="{SIG}"',
         "the parameter 'origin' appears twice"),
        (f'X-Matrix origin="a.example,key="ed25519:k",sig="{SIG}', "expected ',' after the parameter 'origin'"),
        (f'X-Matrix origin="a.example",key="ed25519:k",sig="{SIG}', "a quoted value is not closed"),
        ('X-Matrix origin="a.example",key="ed25519:k",sig="abc\\', "a quoted value is not closed"),
        (f'X-Matrix origin="a.example" key="ed25519:k",sig="{SIG}"', "expected ',' after the parameter 'origin'"),
        (f'X-Matrix origin,key="ed25519:k",sig="{SIG}"', "the parameter 'origin' has no '=value'"),
        (f'X-Matrix origin=,key="ed25519:k",sig="{SIG}"', "the parameter 'origin' has no value"),
        (f'X-Matrix ="a.example",key="ed25519:k",sig="{SIG}"', "expected a parameter name at character 10"),
        (f'X-Matrix origin="a.example"x,key="ed25519:k",sig="{SIG}"', "expected ',' after the parameter 'origin'"),
        (f'X-Matrix origin="a.example",key="ed25519",sig="{SIG}"', "key id 'ed25519' is not ALGORITHM:VERSION"),
        (f'X-Matrix origin="a.example",key="ed25519:k-1",sig="{SIG}"', "is not ALGORITHM:VERSION"),
        (f'X-Matrix origin="a example",key="ed25519:k",sig="{SIG}"', "origin 'a example' is not a Matrix server name"),
        (f'X-Matrix origin="a.example:0",key="ed25519:k",sig="{SIG}"', "is not a Matrix server name"),
        (f'X-Matrix origin="[::1",key="ed25519:k",sig="{SIG}"', "is not a Matrix server name"),
        (f'X-Matrix origin="a.example",key="ed25519:k",sig="{SIG}\x01"', "characters other than printable ASCII"),
        (f'X-Matrix origin="ä.example",key="ed25519:k",sig="{SIG}"', "characters other than printable ASCII"),
    ],
)
def test_malformed_headers(value, reason):
    assert reason in malformed(value).message


def test_the_errors_are_labelled_authentication_failures():
    error = malformed("X-Matrix nonsense")
    assert isinstance(error, AuthenticationFailure)
    assert (error.label, error.code) == ("authentication-failure", 403)
    assert "malformed-authorization" in repr(error)


def test_every_matrix_label_is_unauthorized_or_not_json():
    assert {errcode for _, errcode in MATRIX_LABELS.values()} == {"M_UNAUTHORIZED", "M_NOT_JSON"}
    for label, (status, errcode) in MATRIX_LABELS.items():
        error = XMatrixError("x", label)
        assert (error.matrix_status, error.errcode) == (status, errcode)
        assert error.label == ("invalid-json" if label == "not-json" else "authentication-failure")


def test_is_x_matrix():
    assert is_x_matrix("X-Matrix origin=a")
    assert is_x_matrix("  x-matrix\torigin=a")
    assert is_x_matrix("X-Matrix")
    assert not is_x_matrix("Bearer token")
    assert not is_x_matrix("X-Matrixy origin=a")


# several headers


def header(origin="a.example", key="ed25519:k1", sig=SIG, destination="b.example"):
    return ("Authorization", format_authorization(XMatrixAuthorization(origin, destination, key, sig)))


def test_authorizations_of_several_headers():
    headers = [("Content-Type", "application/json"), header(key="ed25519:k1"), ("authorization", "Bearer xyz"),
               header(key="ed25519:k2")]
    found = authorizations_of(headers)
    assert [a.key for a in found] == ["ed25519:k1", "ed25519:k2"]
    assert {a.origin for a in found} == {"a.example"}


def test_no_x_matrix_header_is_missing_authorization():
    for headers in ([], [("Authorization", "Bearer xyz")], [("Content-Type", "application/json")]):
        with pytest.raises(XMatrixError) as info:
            authorizations_of(headers)
        assert (info.value.matrix_label, info.value.matrix_status) == ("missing-authorization", 401)


@pytest.mark.parametrize(
    ("headers", "reason"),
    [
        ([header(), header(origin="c.example", key="ed25519:k2")], "different origins"),
        ([header(), header(destination="c.example", key="ed25519:k2")], "different destinations"),
        ([header(), header(destination=None, key="ed25519:k2")], "different destinations"),
        ([header(), header()], "two headers carry a signature by the same key"),
        ([header(), ("Authorization", "X-Matrix garbage")], "the parameter 'garbage' has no '=value'"),
    ],
)
def test_several_headers_that_disagree(headers, reason):
    with pytest.raises(XMatrixError, match=reason) as info:
        authorizations_of(headers)
    assert info.value.matrix_label == "malformed-authorization"


# formatting


def test_format_as_the_specification_writes_it():
    assert format_authorization(EXPECTED) == (
        'X-Matrix origin="origin.hs.example.com",destination="destination.hs.example.com",'
        f'key="ed25519:key1",sig="{SIG}"'
    )
    without = XMatrixAuthorization("a.example", None, "ed25519:k", "c2ln")
    assert format_authorization(without) == 'X-Matrix origin="a.example",key="ed25519:k",sig="c2ln"'


@pytest.mark.parametrize(
    "authorization",
    [
        EXPECTED,
        XMatrixAuthorization("[::1]:8448", None, "ed25519:a_Xy1", "sig+/="),
        XMatrixAuthorization("a.example", 'odd "name"\\', "ed25519:k", "s, i=g"),
    ],
)
def test_format_parse_round_trip(authorization):
    assert parse_authorization(format_authorization(authorization)) == authorization


# the signed request


def test_request_uri():
    assert request_uri("/_matrix/federation/v1/query/profile") == "/_matrix/federation/v1/query/profile"
    query = "user_id=%40a%3Ab&field=displayname"
    assert request_uri("/_matrix/x", query) == f"/_matrix/x?{query}"


def test_request_json_has_content_only_with_a_body():
    assert request_json("GET", "/x", "a", "b") == {"method": "GET", "uri": "/x", "origin": "a", "destination": "b"}
    assert request_json("PUT", "/x", "a", "b", {"pdus": []})["content"] == {"pdus": []}
    assert "content" not in request_json("PUT", "/x", "a", "b", parse_body(b""))


def test_parse_body():
    assert parse_body(b"") is None
    assert parse_body(b'{"a": [1, "\xc3\xa9"]}') == {"a": [1, "é"]}
    with pytest.raises(XMatrixError, match="the request body is not JSON") as info:
        parse_body(b"{not json")
    error = info.value
    assert (error.matrix_label, error.errcode, error.matrix_status) == ("not-json", "M_NOT_JSON", 400)
    assert isinstance(error, FederationError) and error.label == "invalid-json"
    for constant in (b"NaN", b'{"a": Infinity}', b"[-Infinity]"):
        with pytest.raises(XMatrixError, match="is not a JSON value"):
            parse_body(constant)


def test_sign_request_verifies_as_the_specification_says():
    key = signing_key_from_seed("key1", "YJDBA9Xnr2sVqXD9Vj7XVUnmFZcZrlw8Md7kMW+3XA1")
    content = {"edus": [{"edu_type": "m.typing", "content": {}}]}
    authorization = sign_request(key, "a.example", "b.example:8448", "PUT", "/_matrix/federation/v1/send/1", content)
    assert (authorization.origin, authorization.destination, authorization.key) == (
        "a.example", "b.example:8448", "ed25519:key1")
    signed = {
        "method": "PUT", "uri": "/_matrix/federation/v1/send/1", "origin": "a.example",
        "destination": "b.example:8448", "content": content,
        "signatures": {"a.example": {"ed25519:key1": authorization.sig}},
    }
    verify_signed_json(signed, "a.example", get_verify_key(key))
    for field, value in [("method", "POST"), ("uri", "/_matrix/federation/v1/send/2"),
                         ("destination", "c.example"), ("content", {})]:
        with pytest.raises(SignatureVerifyException):
            verify_signed_json({**signed, field: value}, "a.example", get_verify_key(key))


def test_sign_request_is_deterministic():
    key = generate_signing_key("k")
    first = sign_request(key, "a.example", "b.example", "GET", "/x")
    assert first == sign_request(key, "a.example", "b.example", "GET", "/x")
    assert first != sign_request(key, "a.example", "b.example", "GET", "/x", {})


# server names


@pytest.mark.parametrize(
    ("name", "split"),
    [
        ("matrix.org", ("matrix.org", None)),
        ("matrix.org:8888", ("matrix.org", 8888)),
        ("1.2.3.4", ("1.2.3.4", None)),
        ("1.2.3.4:1234", ("1.2.3.4", 1234)),
        ("[1234:5678::abcd]", ("[1234:5678::abcd]", None)),
        ("[1234:5678::abcd]:5678", ("[1234:5678::abcd]", 5678)),
        ("localhost", ("localhost", None)),
    ],
)
def test_server_names(name, split):
    assert split_server_name(name) == split
    assert is_server_name(name)


@pytest.mark.parametrize(
    "name",
    ["", "a..b", ".a", "a b", "a.example:", "a.example:0", "a.example:65536", "a.example:123456", "a.example:x",
     "a:1:2", "1.2.3.256", "[1234:5678::abcd", "[zz::1]", "[::1]x", "[::1]:", "a_b.example", "é.example"],
)
def test_not_server_names(name):
    assert not is_server_name(name)
    with pytest.raises(ValueError):
        split_server_name(name)
