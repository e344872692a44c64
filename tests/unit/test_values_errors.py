"""Tests for fedserver.values and fedserver.errors."""

from __future__ import annotations

import json

import attrs
import pytest

import fedserver
from fedserver.errors import (
    LABELS,
    AuthenticationFailure,
    ConfigError,
    DiscoveryFailure,
    FederationDenied,
    FederationError,
    ValidationError,
)
from fedserver.values import OutboundRequest, Peer, Response, Target
from tests.unit.helpers import make_call, make_inbound

# values


def test_values_are_frozen():
    call = make_call()
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        call.rpc = "other"  # type: ignore[misc]
    assert attrs.evolve(call, rpc="other").rpc == "other"


def test_header_lookup_is_case_insensitive_and_takes_the_first():
    request = make_inbound(headers=[("X-A", "1"), ("x-a", "2")])
    assert request.header("x-A") == "1"
    assert request.header("missing") is None


def test_headers_accept_a_mapping_and_become_string_pairs():
    response = Response(200, {"Content-Type": "application/json", "X-Count": 3})
    assert response.headers == (("Content-Type", "application/json"), ("X-Count", "3"))
    assert response.body == b""


def test_with_header_replaces_every_value_of_that_name():
    request = OutboundRequest(
        destination="b.example",
        method="POST",
        path="/federation/brig/x",
        headers=[("wire-origin-domain", "forged.example"), ("Request-Id", "r")],
    )
    changed = request.with_header("Wire-Origin-Domain", "a.example")
    assert changed.headers == (("Request-Id", "r"), ("Wire-Origin-Domain", "a.example"))
    assert request.header("Wire-Origin-Domain") == "forged.example"


def test_peer_identities_become_a_frozenset():
    peer = Peer(identities=["fed.b.example", "fed.b.example"], claimed_domain="b.example")
    assert peer.identities == frozenset({"fed.b.example"})
    assert peer.domain_proven is False
    assert hash(peer) == hash(Peer(identities={"fed.b.example"}, claimed_domain="b.example"))


def test_target_defaults():
    target = Target("fed.b.example", "127.0.0.1", 8443)
    assert (target.ttl, target.priority, target.weight) == (None, 0, 0)


def test_public_surface():
    for name in fedserver.__all__:
        assert getattr(fedserver, name) is not None
    assert fedserver.hookimpl.project_name == "fedserver"


# errors


@pytest.mark.parametrize(
    "label, code",
    [
        ("invalid-endpoint", 403),
        ("invalid-json", 400),
        ("request-too-large", 413),
        ("validation-error", 403),
        ("federation-denied", 400),
        ("invalid-domain", 422),
        ("discovery-failure", 400),
        ("federation-connection-refused", 521),
        ("federation-tls-error", 525),
        ("federation-timeout", 504),
        ("federation-remote-error", 533),
        ("component-unavailable", 502),
        ("internal-error", 500),
    ],
)
def test_a_label_has_its_fixed_code(label, code):
    assert LABELS[label] == code
    assert FederationError("m", label).code == code


def test_every_code_is_an_http_error_status():
    assert all(400 <= code <= 599 for code in LABELS.values())


def test_an_unknown_label_is_refused():
    with pytest.raises(ValueError, match="no-such-label"):
        FederationError("m", "no-such-label")


@pytest.mark.parametrize(
    "cls, label",
    [
        (FederationError, "internal-error"),
        (DiscoveryFailure, "discovery-failure"),
        (AuthenticationFailure, "authentication-failure"),
        (FederationDenied, "federation-denied"),
        (ValidationError, "validation-error"),
    ],
)
def test_default_labels(cls, label):
    error = cls("what happened")
    assert (error.label, error.code, error.message) == (label, LABELS[label], "what happened")
    assert label in repr(error)


def test_json_shape_without_data_or_inner():
    error = FederationError("no such path", "invalid-endpoint")
    assert error.to_json() == {"code": 403, "label": "invalid-endpoint", "message": "no such path"}
    assert json.loads(error.to_bytes()) == error.to_json()


def test_json_shape_with_data_and_inner():
    inner = {"code": 404, "label": "not-found", "message": "x"}
    error = FederationError(
        "b.example answered 404",
        "federation-remote-error",
        data={"type": "federation", "domain": "b.example"},
        inner=inner,
    )
    body = json.loads(error.to_bytes())
    assert body["data"] == {"type": "federation", "domain": "b.example"}
    assert body["inner"] == inner
    assert body["code"] == 533


def test_config_error_names_file_and_path():
    error = ConfigError("must be a string", file="/etc/f.toml", path="[server] backend_domain")
    assert str(error) == "/etc/f.toml: [server] backend_domain: must be a string"
    assert (error.file, error.path, error.reason) == (
        "/etc/f.toml",
        "[server] backend_domain",
        "must be a string",
    )
    assert str(ConfigError("bare")) == "bare"
    assert str(ConfigError("m", path="[tls] certificate")) == "[tls] certificate: m"
