"""Tests for the allow-list authorizer (fedserver.builtin.allow_list)."""

from __future__ import annotations

import pytest
from zope.interface.verify import verifyObject

from fedserver.builtin import allow_list
from fedserver.builtin.allow_list import AllowList, make_allow_list
from fedserver.errors import ConfigError, FederationDenied
from fedserver.interfaces import IAuthorizer
from fedserver.values import Peer
from tests.unit.helpers import build_plugin, labelled_failure, make_call, options_for, success_result_of


def build(**values):
    return build_plugin(allow_list, "authorizer", options_for("authorizers[0]", {"plugin": "allow-list", **values}))


def peer(domain):
    return Peer(identities={f"fed.{domain}"}, claimed_domain=domain)


def test_the_hook_registers_allow_list():
    assert allow_list.fedserver_authorizer_plugins() == {"allow-list": make_allow_list}


def test_provides_iauthorizer():
    assert verifyObject(IAuthorizer, build(domains=["b.example"]))
    assert verifyObject(IAuthorizer, build(allow_all=True))


def test_listed_domains_are_allowed_both_ways():
    authorizer = build(domains=["B.example"])
    assert authorizer.domains == frozenset({"b.example"})
    assert success_result_of(authorizer.authorize_inbound(peer("b.example"), make_call())) is None
    assert success_result_of(authorizer.authorize_outbound("B.EXAMPLE", make_call())) is None


@pytest.mark.parametrize("direction", ["inbound", "outbound"])
def test_other_domains_are_denied(direction):
    authorizer = build(domains=["b.example"])
    if direction == "inbound":
        d = authorizer.authorize_inbound(peer("c.example"), make_call())
    else:
        d = authorizer.authorize_outbound("c.example", make_call())
    error = labelled_failure(d, "federation-denied")
    assert isinstance(error, FederationDenied)
    assert f"c.example is not in this backend's federation allow list ({direction})" == error.message
    assert error.data == {"type": "federation", "domain": "c.example"}


def test_an_empty_list_denies_everybody():
    labelled_failure(build(domains=[]).authorize_outbound("b.example", make_call()), "federation-denied")


def test_allow_all():
    authorizer = build(allow_all=True)
    assert authorizer.domains is None
    assert success_result_of(authorizer.authorize_inbound(peer("z.example"), make_call())) is None
    assert success_result_of(AllowList(None).authorize_outbound("z.example", make_call())) is None


@pytest.mark.parametrize(
    "values, expected",
    [
        ({}, r"\[authorizers\[0\]\] domains: is required \(or allow_all = true\)"),
        ({"allow_all": False}, r"domains: is required"),
        ({"allow_all": True, "domains": ["b.example"]}, r"allow_all: set either allow_all = true or domains"),
        ({"allow_all": 1}, r"allow_all: must be true or false"),
        ({"domains": "b.example"}, r"domains: must be a list of strings"),
        ({"domains": ["b_example"]}, r"domains: 'b_example' is not a lower-case DNS domain name"),
    ],
)
def test_bad_options(values, expected):
    with pytest.raises(ConfigError, match=expected):
        build(**values)


def test_matrix_server_names_with_a_port_may_be_listed():
    from fedserver.builtin.allow_list import make_allow_list
    from fedserver.errors import ConfigError
    from tests.unit.helpers import options_for

    allowed = make_allow_list(options_for("authorizers[0]", {"plugin": "allow-list",
                                                             "domains": ["localhost:8448", "b.example"]}), None)
    assert allowed.domains == frozenset({"localhost:8448", "b.example"})
    for bad in ("localhost:0", "localhost:x", "bad name:1"):
        with pytest.raises(ConfigError, match=r"\[authorizers\[0\]\] domains"):
            make_allow_list(options_for("authorizers[0]", {"plugin": "allow-list", "domains": [bad]}), None)
