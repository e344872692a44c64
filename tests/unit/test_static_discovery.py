"""Tests for the static discovery plugin (fedserver.builtin.static_discovery)."""

from __future__ import annotations

import pytest
from zope.interface.verify import verifyObject

from fedserver.builtin import static_discovery
from fedserver.builtin.static_discovery import StaticDiscovery, make_static_discovery
from fedserver.errors import ConfigError, DiscoveryFailure
from fedserver.interfaces import IDiscovery
from fedserver.values import Target
from tests.unit.helpers import build_plugin, failure_result_of, labelled_failure, options_for, success_result_of


def build(domains):
    values = {"plugin": "static"}
    if domains is not None:
        values["domains"] = domains
    return build_plugin(static_discovery, "discovery", options_for("discovery", values))


def test_the_hook_registers_static():
    assert static_discovery.fedserver_discovery_plugins() == {"static": make_static_discovery}


def test_provides_idiscovery():
    assert verifyObject(IDiscovery, build(None))


def test_one_target_with_defaults():
    discovery = build({"b.example": {}})
    assert success_result_of(discovery.discover("b.example")) == [Target("b.example", "b.example", 443)]


def test_one_target_spelled_out():
    discovery = build({"b.example": {"infra_domain": "fed.b.example", "host": "127.0.0.1", "port": 28443}})
    assert success_result_of(discovery.discover("B.Example")) == [
        Target("fed.b.example", "127.0.0.1", 28443)
    ]


def test_several_targets_keep_their_order():
    discovery = build({"b.example": [{"host": "10.0.0.2", "port": 1}, {"host": "10.0.0.1", "port": 2}]})
    targets = success_result_of(discovery.discover("b.example"))
    assert [(t.host, t.port) for t in targets] == [("10.0.0.2", 1), ("10.0.0.1", 2)]


def test_the_answer_is_a_copy():
    discovery = build({"b.example": {}})
    success_result_of(discovery.discover("b.example")).clear()
    assert len(success_result_of(discovery.discover("b.example"))) == 1


def test_an_unknown_domain_is_invalid_domain():
    error = labelled_failure(build({"b.example": {}}).discover("c.example"), "invalid-domain")
    assert isinstance(error, DiscoveryFailure)
    assert "c.example is not in the static discovery table" in error.message
    assert error.code == 422


def test_an_empty_table_knows_nobody():
    failure_result_of(StaticDiscovery({"b.example": []}).discover("b.example"), DiscoveryFailure)


@pytest.mark.parametrize(
    "domains, expected",
    [
        ({"B.example": {}}, r"\[discovery.domains\] B.example: 'B.example' is not a lower-case DNS domain name"),
        ({"b.example": {"prot": 1}}, r'\[discovery.domains."b.example"\] prot: is not a known option'),
        ({"b.example": {"port": 0}}, r'\[discovery.domains."b.example"\] port: must be at least 1'),
        ({"b.example": {"port": 65536}}, r"port: must be at most 65535"),
        ({"b.example": {"port": "443"}}, r"port: must be an integer, not a string"),
        ({"b.example": {"infra_domain": "fed..b"}}, r"infra_domain: 'fed..b' is not a lower-case"),
        ({"b.example": [{"host": "x"}, {"hots": "y"}]}, r'\[discovery.domains."b.example"\[1\]\] hots'),
        ({"b.example": "10.0.0.1"}, r"must be an array of tables"),
    ],
)
def test_bad_tables_name_the_key(domains, expected):
    with pytest.raises(ConfigError, match=expected):
        build(domains)


@pytest.mark.parametrize("host, ok", [("127.0.0.1", True), ("::1", True), ("fed.b.example", True),
                                      ("bad host!", False), ("", False)])
def test_hosts_are_addresses_or_domain_names(host, ok):
    from fedserver.builtin.static_discovery import make_static_discovery
    from fedserver.errors import ConfigError
    from tests.unit.helpers import options_for

    options = options_for("discovery", {"plugin": "static", "domains": {"b.example": {"host": host, "port": 1}}})
    if ok:
        assert make_static_discovery(options, None).table["b.example"][0].host == host
    else:
        with pytest.raises(ConfigError, match=r'\[discovery.domains."b.example"\] host'):
            make_static_discovery(options, None)
