"""
Tests for L{fedserver.addresses}: which resolved addresses DNS-based
discovery may hand on, and C{[outward] allow_ip_ranges}.
"""

from __future__ import annotations

import pytest

from fedserver.addresses import AddressPolicy, parse_networks
from fedserver.errors import ConfigError
from tests.unit.helpers import make_context

KEY = "[outward] allow_ip_ranges"

REFUSED = [
    # private (RFC 1918, RFC 4193)
    "10.0.0.1", "10.255.255.255", "172.16.0.1", "172.31.255.254", "192.168.1.1", "fc00::1", "fd12:3456::1",
    # loopback
    "127.0.0.1", "127.1.2.3", "::1",
    # link-local (and the cloud metadata address in it)
    "169.254.169.254", "169.254.0.1", "fe80::1", "fe80::1%eth0",
    # shared address space (CGNAT, RFC 6598)
    "100.64.0.1", "100.127.255.254",
    # documentation
    "192.0.2.1", "198.51.100.7", "203.0.113.9", "2001:db8::1",
    # multicast and broadcast
    "224.0.0.1", "239.255.255.250", "ff02::1", "ff0e::1", "255.255.255.255",
    # this network, unspecified, reserved, benchmarking, IETF protocol assignments
    "0.0.0.0", "0.1.2.3", "::", "240.0.0.1", "198.18.0.1", "192.0.0.1",
    # IPv4-mapped IPv6 of refused IPv4
    "::ffff:127.0.0.1", "::ffff:10.0.0.1", "::ffff:169.254.169.254", "::ffff:7f00:1",
]

ALLOWED = ["8.8.8.8", "1.1.1.1", "93.184.216.34", "172.32.0.1", "100.128.0.1", "2606:4700:4700::1111",
           "2a00:1450:4001:80b::200e", "::ffff:8.8.8.8"]


@pytest.mark.parametrize("address", REFUSED)
def test_special_addresses_are_refused(address: str) -> None:
    assert not AddressPolicy().allows(address)


@pytest.mark.parametrize("address", ALLOWED)
def test_public_addresses_are_allowed(address: str) -> None:
    assert AddressPolicy().allows(address)


def test_an_allowed_range_opens_only_that_range() -> None:
    policy = AddressPolicy(parse_networks(["127.0.0.0/8", "10.1.0.0/16"], KEY))
    assert policy.allows("127.0.0.1")
    assert policy.allows("127.8.9.10")
    assert policy.allows("10.1.2.3")
    assert not policy.allows("10.2.0.1")
    assert not policy.allows("192.168.1.1")
    assert not policy.allows("::1")
    assert policy.allows("8.8.8.8")


def test_an_allowed_range_covers_mapped_addresses() -> None:
    policy = AddressPolicy(parse_networks(["127.0.0.0/8"], KEY))
    assert policy.allows("::ffff:127.0.0.1")
    assert not policy.allows("::ffff:10.0.0.1")


def test_an_allowed_ipv6_range() -> None:
    policy = AddressPolicy(parse_networks(["::1/128", "fd00::/8"], KEY))
    assert policy.allows("::1")
    assert policy.allows("fd12::1")
    assert not policy.allows("127.0.0.1")
    assert not policy.allows("fe80::1")


def test_allowing_multicast_explicitly() -> None:
    assert AddressPolicy(parse_networks(["224.0.0.0/4"], KEY)).allows("224.0.0.1")


def test_the_reason_names_the_address_and_the_key() -> None:
    reason = AddressPolicy().reason("10.0.0.1")
    assert reason == (
        "10.0.0.1 is not a public address; list its range in [outward] allow_ip_ranges to federate with it"
    )


def test_networks_are_parsed_leniently_about_host_bits() -> None:
    networks = parse_networks(["10.1.2.3/8", "192.0.2.7", "2001:db8::1/32"], KEY)
    assert [str(n) for n in networks] == ["10.0.0.0/8", "192.0.2.7/32", "2001:db8::/32"]


@pytest.mark.parametrize("value", ["10.0.0.0/33", "not-a-network", "10.0.0/8x", "", "::1/129", "10.0.0.0/-1"])
def test_a_bad_cidr_is_a_config_error_naming_the_key(value: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_networks(["127.0.0.0/8", value], KEY)
    assert caught.value.path == KEY
    assert f"{value!r} is not an IP network in CIDR form" in str(caught.value)
    assert str(caught.value).startswith("[outward] allow_ip_ranges: ")


def test_the_context_builds_the_policy_from_the_configuration() -> None:
    context = make_context(tables={"outward": {"allow_ip_ranges": ["127.0.0.0/8"]}})
    assert context.address_policy.allows("127.0.0.1")
    assert not context.address_policy.allows("10.0.0.1")
    assert context.address_policy is context.address_policy


def test_no_outward_table_allows_only_public_addresses() -> None:
    policy = make_context().address_policy
    assert not policy.allows("127.0.0.1")
    assert policy.allows("8.8.8.8")


def test_the_context_reports_a_bad_range_by_its_key() -> None:
    context = make_context(tables={"outward": {"allow_ip_ranges": ["127.0.0.0/8", "10.0.0.0/40"]}})
    with pytest.raises(ConfigError, match=r"^\[outward\] allow_ip_ranges: '10.0.0.0/40' is not an IP network"):
        context.address_policy  # noqa: B018
