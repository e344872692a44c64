"""
C{udp_advertise_port} of the C{[relay]} table: the UDP port announced to
linked relays in C{Hello} when they reach us on another port than the one we
listen on (NAT, port forwarding).
"""

from __future__ import annotations

import hashlib

import pytest
from twisted.internet.testing import MemoryReactorClock

from fedserver.errors import ConfigError
from fedserver_relay.link import RelayTLS
from fedserver_relay.mesh import RelayMesh
from fedserver_relay.plugin import RelayService
from fedserver_relay.settings import RelaySettings, TrustPolicy, read_settings
from tests.unit.helpers import options_for

OURS = hashlib.sha256(b"ours").hexdigest()


def settings(**values: object) -> RelaySettings:
    return read_settings(options_for("relay", {"listen": "tcp:7443:interface=127.0.0.1", **values}), OURS)


def test_the_udp_port_is_announced_by_default() -> None:
    assert settings(udp="127.0.0.1:7443").udp_advertise_port == 7443


def test_another_port_can_be_announced() -> None:
    read = settings(udp="127.0.0.1:7443", udp_advertise_port=17443)
    assert read.udp == ("127.0.0.1", 7443)  # still listened on
    assert read.udp_advertise_port == 17443


def test_without_udp_nothing_is_announced() -> None:
    assert settings().udp_advertise_port == 0


def test_announcing_a_port_needs_udp() -> None:
    with pytest.raises(ConfigError, match=r"udp_advertise_port.*set udp = "):
        settings(udp_advertise_port=17443)


@pytest.mark.parametrize("port", [-1, 65536, "17443"])
def test_the_announced_port_is_a_port_number(port: object) -> None:
    with pytest.raises(ConfigError, match="udp_advertise_port"):
        settings(udp="127.0.0.1:7443", udp_advertise_port=port)


@pytest.mark.parametrize("advertise, announced", [(None, 7443), (17443, 17443)])
def test_links_announce_the_advertised_port(dev_pki, advertise: object, announced: int) -> None:
    values = {"udp": "127.0.0.1:7443"} if advertise is None else {"udp": "127.0.0.1:7443",
                                                                   "udp_advertise_port": advertise}
    read = settings(**values)
    policy = TrustPolicy(read.peers, read.trusted)
    reactor = MemoryReactorClock()
    mesh = RelayMesh(OURS, policy, max_hops=read.max_hops, room_rate_limit=read.room_rate_limit, clock=reactor)
    tls = RelayTLS(dev_pki.material("relay.example"), policy.may_connect, policy.label)
    relay = RelayService(read, policy, tls, mesh, reactor=reactor)
    assert relay.links.udp_port == announced  # what each link's Hello carries
