"""
The MIMI gateway's OpenAPI document: valid, in step with the router, and
naming every refusal the gateway can answer.
"""

from __future__ import annotations

import ast
import json
import os
import re
from typing import Any, Dict, Iterator, List, Set, Tuple, cast

import pytest
import schemathesis
from openapi_spec_validator import validate
from twisted.internet.defer import Deferred
from twisted.web.test.requesthelper import DummyRequest

import fedserver_mimi
from fedserver.jsonapi import APIError
from fedserver.values import Response
from fedserver_mimi.gateway import Gateway
from fedserver_mimi.gateway_api import SEGMENT, GatewayAPI
from fedserver_mimi.openapi import LABELS, openapi_document

METHODS = ("get", "put", "post", "delete", "patch")
PLUGIN_DIR = os.path.dirname(fedserver_mimi.__file__)


@pytest.fixture(scope="module")
def document() -> Dict[str, Any]:
    return openapi_document()


def api() -> GatewayAPI:
    # the router and the document need no gateway; a request that got past them would
    return GatewayAPI(cast(Gateway, object()))


def operations(document: Dict[str, Any]) -> Iterator[Tuple[str, str, Dict[str, Any]]]:
    for path, item in document["paths"].items():
        for method in METHODS:
            if method in item:
                yield path, method, item[method]


def error_responses(document: Dict[str, Any]) -> Iterator[Tuple[str, str, int, Dict[str, Any]]]:
    for path, method, operation in operations(document):
        for status, response in operation["responses"].items():
            if int(status) >= 400:
                yield path, method, int(status), response


def documented_labels(response: Dict[str, Any]) -> List[str]:
    schema = response["content"]["application/json"]["schema"]
    return list(schema["allOf"][1]["properties"]["label"]["enum"])


def test_document_is_valid_openapi(document: Dict[str, Any]) -> None:
    validate(document)
    loaded = schemathesis.openapi.from_dict(openapi_document())
    loaded.validate()
    assert len(list(loaded.get_all_operations())) == len(list(operations(document)))


def test_document_is_json_and_fresh_each_call(document: Dict[str, Any]) -> None:
    assert json.loads(json.dumps(document)) == document
    copy = openapi_document()
    copy["paths"].clear()
    assert openapi_document() == document


def test_every_route_is_documented_and_every_internal_path_is_a_route(document: Dict[str, Any]) -> None:
    routes = {(method.lower(), "/" + "/".join((SEGMENT, *template))): query
              for method, template, query in api().router.routes()}
    internal = {}
    for path, method, operation in operations(document):
        if operation["tags"] == ["internal"]:
            template = re.sub(r"\{[A-Za-z]+\}", "{}", path)
            queries = tuple(p["name"] for p in operation["parameters"] if p["in"] == "query")
            internal[(method, template)] = queries
    assert set(internal) == set(routes)
    for key, query in routes.items():
        assert sorted(internal[key]) == sorted(query), key


def test_path_parameters_are_exact(document: Dict[str, Any]) -> None:
    for path, method, operation in operations(document):
        in_path = re.findall(r"\{([A-Za-z]+)\}", path)
        declared = [p["name"] for p in operation["parameters"] if p["in"] == "path"]
        assert declared == in_path, (method, path)
        for parameter in operation["parameters"]:
            if parameter["in"] != "path":
                continue
            schema = parameter["schema"]
            if parameter["name"] == "groupId":
                assert schema["pattern"] == "^[A-Za-z0-9_-]+$"
            else:
                assert schema["format"] == "uuid" and schema["maxLength"] == 36


def test_external_rpcs_are_the_components(document: Dict[str, Any]) -> None:
    external = {path: method for path, method, operation in operations(document)
                if operation["tags"] == ["external"]}
    rpcs = Gateway.__new__(Gateway).rpcs()  # rpcs() only names bound methods
    assert external == {f"/federation/mimi/{name}": "post" for name in rpcs}
    for path in external:
        item = document["paths"][path]
        assert item["servers"][0]["url"].startswith("https://")
        assert item["post"]["security"] == [{"peerMutualTLS": []}]
        assert "inward listener" in item["post"]["description"]


def test_request_bodies_are_strict_where_the_server_is(document: Dict[str, Any]) -> None:
    for path, method, operation in operations(document):
        if "requestBody" not in operation:
            continue
        schema = operation["requestBody"]["content"]["application/json"]["schema"]
        strict = operation["tags"] == ["internal"]
        assert (schema.get("additionalProperties") is False) == strict, (method, path)


def test_security(document: Dict[str, Any]) -> None:
    assert document["security"] == [{"bearerToken": []}]
    assert document["paths"]["/mimi/openapi.json"]["get"]["security"] == []
    internal = [op for _, _, op in operations(document) if op["tags"] == ["internal"]]
    assert sum("security" in op for op in internal) == 1


def test_error_responses_are_labelled(document: Dict[str, Any]) -> None:
    for path, method, status, response in error_responses(document):
        schema = response["content"]["application/json"]["schema"]
        assert schema["allOf"][0] == {"$ref": "#/components/schemas/Error"}
        assert schema["allOf"][1]["properties"]["code"] == {"const": status}
        for label in documented_labels(response):
            assert label in LABELS
            assert f"`{label}`" in response["description"], (method, path, status, label)
    required = document["components"]["schemas"]["Error"]["required"]
    assert required == ["code", "label", "message"]


def test_authenticated_routes_document_401(document: Dict[str, Any]) -> None:
    for _, _, operation in operations(document):
        if operation["tags"] == ["internal"] and operation.get("security") != []:
            assert documented_labels(operation["responses"]["401"]) == ["missing-token", "invalid-token"]


def raised_labels() -> Set[Tuple[int, str]]:
    """(status, label) of every refusal raised in gateway*.py, found in the source."""
    helpers = {"bad_request": (400, "bad-request"), "not_found": (404, "not-found"),
               "stale_epoch": (409, "stale-epoch")}
    found: Set[Tuple[int, str]] = set()
    for name in sorted(os.listdir(PLUGIN_DIR)):
        if not (name.startswith("gateway") and name.endswith(".py")):
            continue
        with open(os.path.join(PLUGIN_DIR, name), encoding="utf-8") as f:
            tree = ast.parse(f.read())
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Name):
                continue
            if node.func.id == "APIError":
                code, label = node.args[0], node.args[1]
                assert isinstance(code, ast.Constant) and isinstance(label, ast.Constant), ast.dump(node)
                assert isinstance(code.value, int) and isinstance(label.value, str), ast.dump(node)
                found.add((code.value, label.value))
            elif node.func.id in helpers:
                found.add(helpers[node.func.id])
    return found


def test_every_label_the_gateway_raises_is_documented(document: Dict[str, Any]) -> None:
    raised = raised_labels()
    assert len(raised) > 20  # the scan works
    documented = {(status, label) for _, _, status, response in error_responses(document)
                  for label in documented_labels(response)}
    assert raised - documented == set()
    # and the router's own refusals, in the label enum and the description
    enum = document["components"]["schemas"]["Error"]["properties"]["label"]["enum"]
    for label in ("no-endpoint", "method-not-allowed", *(label for _, label in raised)):
        assert label in enum
    assert "404 no-endpoint" in document["info"]["description"]
    assert "405 method-not-allowed" in document["info"]["description"]


def test_every_documented_label_is_real(document: Dict[str, Any]) -> None:
    from fedserver.errors import LABELS as FEDERATION_LABELS

    raised = {label for _, label in raised_labels()}
    others = {"no-endpoint", "method-not-allowed", "federation-unexpected-body"}
    for label in LABELS:
        assert label in raised or label in FEDERATION_LABELS or label in others, label


def run(d: Deferred[Response]) -> Any:
    results: List[Any] = []
    d.addBoth(results.append)
    assert results, "the answer is not ready"
    return results[0]


def test_openapi_json_is_served_without_a_token() -> None:
    gateway_api = api()
    answer = run(Deferred.fromCoroutine(gateway_api._handle("GET", "/mimi/openapi.json", {}, None, b"", "r")))
    assert answer.code == 200
    assert json.loads(answer.body) == openapi_document()
    # even with an Authorization header that is not a bearer token
    answer = run(Deferred.fromCoroutine(gateway_api._handle("GET", "/mimi/openapi.json", {}, b"Basic eA==", b"",
                                                            "r")))
    assert answer.code == 200


@pytest.mark.parametrize("header", [b"Basic eA==", b"Bearer", b"Bearer \xff\xfe"])
def test_a_malformed_authorization_header_is_a_refusal_not_a_crash(header: bytes) -> None:
    # handle() must not raise: a refusal raised outside its Deferred was answered 500 internal-error
    request = DummyRequest([b"mimi", b"apps"])
    request.method = b"GET"
    request.path = b"/mimi/apps"  # type: ignore[attr-defined]
    request.requestHeaders.setRawHeaders(b"authorization", [header])
    failure = run(api().handle(request, b"", "r"))
    assert isinstance(failure.value, APIError)
    assert failure.value.code == 401
    assert failure.value.label in ("missing-token", "invalid-token")
