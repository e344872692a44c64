"""
The C{relay} plugin (L{fedserver_relay.plugin}) through fedserver's real
startup path: no C{[relay]} table, no relay; a table, a L{RelayService}
among the services and C{/relay/status} on the outward listener.
"""

from __future__ import annotations

import os
from typing import Any, List, Tuple

import pytest
from twisted.internet.testing import MemoryReactorClock

import fedserver.builtin.allow_list
import fedserver.builtin.mtls
import fedserver.builtin.static_discovery
import fedserver_relay.plugin
from fedserver.errors import ConfigError
from fedserver.registry import make_plugin_manager
from fedserver.service import build_service
from fedserver_relay.fingerprint import fingerprint_of_pem, short_id
from fedserver_relay.link import RelayLink
from fedserver_relay.participants import ParticipantPort
from fedserver_relay.plugin import RelayService, StatusResource
from tests.unit.helpers import HTTPConnection, make_context, minimal_config_file
from tests.unit.relay_helpers import A, B, D, FakeLink, frame

PLUGINS = [fedserver.builtin.allow_list, fedserver.builtin.mtls, fedserver.builtin.static_discovery,
           fedserver_relay.plugin]
TOKEN = "a-room-token-0123"

RELAY = f"""
[relay]
listen = "tcp:7443:interface=127.0.0.1"
udp = "127.0.0.1:7443"
participants = "127.0.0.1:7500"
label = "Relay 1"
max_federation_hops = 3
room_rate_limit = 100

[[relay.peers]]
address = "127.0.0.1:7444"
fingerprint = "{A}"
label = "Relay A"

[[relay.trusted]]
fingerprint = "{B}"
label = "Relay B"
delegate = true

[[relay.rooms]]
name = "standup"
token = "{TOKEN}"
"""


@pytest.fixture
def config_file(tmp_path):
    return minimal_config_file(tmp_path, "a.example", "fed.a.example", outward=True)


@pytest.fixture
def own_fingerprint(tmp_path, config_file):
    config_file()
    with open(os.path.join(str(tmp_path), "fed.a.example.pem"), "rb") as f:
        return fingerprint_of_pem(f.read())


def build(path: str, reactor: Any = None) -> Any:
    manager = make_plugin_manager(load_entrypoints=False, plugins=PLUGINS)
    return build_service(path, reactor=reactor or MemoryReactorClock(), plugin_manager=manager, listen=False)


def relay_of(top: Any) -> Any:
    relays = [s for s in top if isinstance(s, RelayService)]
    return relays[0] if relays else None


def get(top: Any, path: bytes, method: bytes = b"GET") -> Any:
    connection = HTTPConnection.to(top.outward_site)
    connection.request(method, path)
    answer = connection.answer()
    connection.close()
    return answer


def test_without_a_relay_table_there_is_no_relay(config_file):
    top = build(config_file())
    assert relay_of(top) is None
    assert top.outward_resource.getStaticEntity(b"relay") is None
    get(top, b"/relay/status").labelled(403, "invalid-endpoint")


def test_a_relay_table_makes_a_relay_service(config_file, own_fingerprint):
    top = build(config_file(RELAY))
    relay = relay_of(top)
    assert isinstance(relay, RelayService)
    assert isinstance(top.outward_resource.getStaticEntity(b"relay"), StatusResource)
    assert top.inward_resource.getStaticEntity(b"relay") is None
    assert relay.mesh.fingerprint == own_fingerprint
    assert relay.settings.label == "Relay 1" and relay.mesh.max_hops == 3
    assert relay.policy.known == {A, B} and relay.policy.delegates(B)
    assert isinstance(relay.participants, ParticipantPort) and relay.mesh.participants is relay.participants
    assert relay.links.udp_port == 7443 and relay.links.label == "Relay 1"
    # one dialler per peer
    assert len([s for s in relay if s.name != "relay"]) == len(list(relay)) == 1
    # the resource and the service hooks share one relay
    assert top.outward_resource.getStaticEntity(b"relay").relay is relay


def test_the_plugin_is_installed_under_its_name():
    manager = make_plugin_manager(load_entrypoints=True)
    assert fedserver_relay.plugin in manager.get_plugins()


def test_a_bad_relay_table_stops_startup_naming_the_key(config_file):
    with pytest.raises(ConfigError) as info:
        build(config_file(RELAY.replace('max_federation_hops = 3', 'max_federation_hops = 0')))
    assert info.value.path == "[relay] max_federation_hops"
    assert info.value.file == config_file()


def test_an_unknown_key_of_the_relay_table_stops_startup(config_file):
    with pytest.raises(ConfigError, match="is not a known option here") as info:
        build(config_file(RELAY.replace('label = "Relay 1"', 'label = "Relay 1"\nmax_hops = 2')))
    assert info.value.path == "[relay] max_hops"


def test_our_own_fingerprint_in_the_table_stops_startup(config_file, own_fingerprint):
    with pytest.raises(ConfigError, match="our own") as info:
        build(config_file(RELAY.replace(B, own_fingerprint)))
    assert info.value.path == "[relay.trusted[0]] fingerprint"


def test_the_relay_needs_the_tls_table():
    context = make_context(tables={"relay": {"listen": "tcp:7443"}}, reactor=MemoryReactorClock())
    with pytest.raises(ConfigError, match="the relay needs \\[tls\\] certificate") as info:
        fedserver_relay.plugin.fedserver_services(context=context)
    assert info.value.path == "[tls]"


def test_without_the_table_the_hooks_give_nothing():
    context = make_context(reactor=MemoryReactorClock())
    assert fedserver_relay.plugin.fedserver_services(context=context) == []
    assert fedserver_relay.plugin.fedserver_resources(context=context) == []


# GET /relay/status


def test_the_status_route(config_file, own_fingerprint):
    top = build(config_file(RELAY))
    relay = relay_of(top)
    link = FakeLink(B)
    relay.mesh.link_up(link)
    relay.mesh.subscribe(link, [frame(B).room_hash], True)
    relay.mesh.frame_from_link(link, frame(B))
    relay.mesh.frame_from_link(link, frame(D))
    answer = get(top, b"/relay/status")
    assert answer.code == 200 and answer.header("content-type") == "application/json"
    status = answer.json()
    assert status == {
        "fingerprint": own_fingerprint,
        "label": "Relay 1",
        "maxFederationHops": 3,
        "links": [{
            "fingerprint": B, "label": "Relay B", "delegate": True, "vouched": [], "subscribedRooms": 1,
            "direction": "in", "udp": False,
        }],
        "counters": {
            "accepted": {"Relay B": 1},
            "dropped": {"unknown-origin": {"Relay B": 1}, "no-delegation": {}, "ttl-exhausted": {},
                        "duplicate": {}, "rate-limited": {}, "replayed": {}, "malformed": {}, "congested": {}},
            "originated": 0, "delivered": 0, "forwarded": 0,
        },
        "participants": 0,
        "refusedHandshakes": {},
        "refusedHandshakesTotal": 0,
        "unknownDatagrams": 0,
    }
    assert short_id(own_fingerprint) == relay.mesh.origin


def test_the_status_of_a_dialled_link_with_udp(config_file):
    top = build(config_file(RELAY))
    relay = relay_of(top)
    link = RelayLink(relay.links, is_client=True, clock=MemoryReactorClock())
    link.fingerprint = A
    link.udp_confirmed = True
    relay.mesh.links[A] = link
    status = get(top, b"/relay/status").json()
    assert [(x["fingerprint"], x["direction"], x["udp"]) for x in status["links"]] == [(A, "out", True)]


@pytest.mark.parametrize("path", [b"/relay", b"/relay/", b"/relay/status/", b"/relay/statuses", b"/relay/status/x",
                                  b"/relay/links"])
def test_other_paths_are_404(config_file, path):
    top = build(config_file(RELAY))
    body = get(top, path).labelled(404, "no-endpoint")
    assert "GET /relay/status" in body["message"]


@pytest.mark.parametrize("method", [b"POST", b"PUT", b"DELETE"])
def test_other_methods_are_405(config_file, method):
    top = build(config_file(RELAY))
    answer = get(top, b"/relay/status", method)
    answer.labelled(405, "method-not-allowed")
    assert answer.header("allow") == "GET, HEAD"


# starting and stopping


class UDPReactor(MemoryReactorClock):
    """A memory reactor that also keeps the UDP ports asked for."""

    def __init__(self) -> None:
        super().__init__()
        self.udp: List[Tuple[int, Any, str]] = []
        self.stopped: List[int] = []

    def listenUDP(self, port: int, protocol: Any, interface: str = "", maxPacketSize: int = 8192) -> Any:
        self.udp.append((port, protocol, interface))
        reactor = self

        class Port:
            def stopListening(self) -> None:
                reactor.stopped.append(port)

        return Port()


def test_starting_and_stopping(config_file):
    reactor = UDPReactor()
    top = build(config_file(RELAY), reactor)
    relay = relay_of(top)
    relay.startService()
    assert reactor.udp == [(7443, relay.router, "127.0.0.1"), (7500, relay.participants, "127.0.0.1")]
    ((port, _, _, interface),) = reactor.tcpServers
    assert (port, interface) == (7443, "127.0.0.1")
    # the dialler tried the peer
    assert [(host, port) for host, port, *_ in reactor.tcpClients] == [("127.0.0.1", 7444)]
    relay.stopService()
    assert not relay.running
    assert sorted(reactor.stopped) == [7443, 7500]
