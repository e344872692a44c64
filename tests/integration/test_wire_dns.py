"""
Wire discovery through a real DNS server: Twisted's own (C{twistd dns})
serving SRV and A records on 127.0.0.1, and two fedserver processes whose
backend domains (a.example, b.example) differ from their infrastructure
domains (fed-a.infra.example, fed-b.infra.example).

Only 127.0.0.1 is ever connected to.  private.example's target resolves to
10.0.0.1, which the address policy must refuse before any connection.
"""

from __future__ import annotations

import json
import time
from typing import Any, Dict, Iterator

import pytest

from tests.integration.harness import (
    PKI,
    Component,
    DNSServer,
    Fedserver,
    backend_config,
    discover_json,
    free_port,
    post,
    post_tls,
    tls_context,
)

SERVICE = "_wire-server-federator._tcp"
#: answers are kept at most this long (max_ttl), then asked again
MAX_TTL = 1
#: seconds for one DNS lookup
DNS_TIMEOUT = 1


def zone(ports: Dict[str, int]) -> list:
    srv, a = DNSServer.srv, DNSServer.a
    return [
        srv(f"{SERVICE}.a.example", 0, 0, ports["a_in"], "fed-a.infra.example"),
        srv(f"{SERVICE}.b.example", 0, 0, ports["b_in"], "fed-b.infra.example"),
        # b's federator again, but first (priority 0) at a port nobody listens on
        srv(f"{SERVICE}.failover.example", 0, 0, ports["closed"], "fed-b.infra.example"),
        srv(f"{SERVICE}.failover.example", 10, 0, ports["b_in"], "fed-b.infra.example"),
        # a third backend, whose federator is not the one a's certificate names
        srv(f"{SERVICE}.c.example", 0, 0, ports["b_in"], "fed-c.infra.example"),
        # a federator in a private range, which fedserver must refuse to contact
        srv(f"{SERVICE}.private.example", 0, 0, ports["b_in"], "fed-private.infra.example"),
        # "no such service here"
        srv(f"{SERVICE}.dot.example", 0, 0, 0, "."),
        a("fed-a.infra.example", "127.0.0.1"),
        a("fed-b.infra.example", "127.0.0.1"),
        a("fed-c.infra.example", "127.0.0.1"),
        a("fed-private.infra.example", "10.0.0.1"),
    ]


def wire_config(backend: str, infra: str, *, pki: PKI, inward: int, outward: int, dns_port: int,
                allow: list, components: Dict[str, str]) -> Dict[str, Any]:
    config = backend_config(backend, infra, pki=pki, inward_port=inward, outward_port=outward, discovery={},
                            allow=allow, components=components,
                            limits={"request_timeout": 10, "connect_timeout": 2})
    config["discovery"] = {
        "plugin": "wire-srv",
        "nameservers": [f"127.0.0.1:{dns_port}"],
        "timeout": DNS_TIMEOUT,
        "min_ttl": 0,
        "max_ttl": MAX_TTL,
        "negative_ttl": 1,
        "stale_ttl": 3600,
    }
    config["outward"]["allow_ip_ranges"] = ["127.0.0.0/8"]
    return config


def component_answer(path: str, headers: Dict[str, str], body: bytes) -> tuple:
    return 200, {"path": path, "origin": headers.get("wire-origin-domain"), "echo": json.loads(body or b"null")}


@pytest.fixture(scope="module")
def wire(tmp_path_factory: Any) -> Iterator[Dict[str, Any]]:
    tmp = tmp_path_factory.mktemp("wire-dns")
    pki = PKI(str(tmp / "pki"))
    ports = {name: free_port() for name in ("a_in", "a_out", "b_in", "b_out", "closed")}
    dns = DNSServer(str(tmp), zone(ports))
    component = Component(component_answer)
    servers = []
    try:
        dns.start()
        b_config = wire_config("b.example", "fed-b.infra.example", pki=pki, inward=ports["b_in"],
                               outward=ports["b_out"], dns_port=dns.port, allow=["a.example"],
                               components={"brig": component.url})
        servers.append(Fedserver(str(tmp), "b", b_config))
        a_config = wire_config("a.example", "fed-a.infra.example", pki=pki, inward=ports["a_in"],
                               outward=ports["a_out"], dns_port=dns.port,
                               allow=["b.example", "c.example", "failover.example", "private.example",
                                      "dot.example", "nowhere.example"],
                               components={})
        servers.append(Fedserver(str(tmp), "a", a_config))
        a_cert = (a_config["tls"]["certificate"], a_config["tls"]["private_key"])
        yield {"a": servers[1], "b": servers[0], "dns": dns, "pki": pki, "component": component,
               "ports": ports, "a_cert": a_cert}
    finally:
        for server in servers:
            server.stop()
        dns.stop()
        component.close()


def call(wire: Dict[str, Any], domain: str, rpc: str = "get-user-by-handle", request_id: str = "") -> tuple:
    headers = {"Content-Type": "application/json"}
    if request_id:
        headers["Wire-Origin-Request-Id"] = request_id
    return post(wire["a"].outward_port, f"/rpc/{domain}/brig/{rpc}", {"handle": "bob"}, headers=headers,
                timeout=30)


def test_a_call_is_discovered_through_srv_and_validated_through_srv(wire: Dict[str, Any]) -> None:
    component = wire["component"]
    before = len(component.requests)
    status, _, answer = call(wire, "b.example", request_id="req-srv-1")
    assert status == 200, answer
    assert answer == {"path": "/federation/get-user-by-handle", "origin": "a.example", "echo": {"handle": "bob"}}
    path, headers, _ = component.requests[before]
    assert path == "/federation/get-user-by-handle"
    # b validated the claim a.example: SRV of a.example names fed-a.infra.example, the
    # name in a's client certificate
    assert headers["wire-origin-domain"] == "a.example"
    assert headers["request-id"] == "req-srv-1"


def test_fail_over_to_the_next_srv_target(wire: Dict[str, Any]) -> None:
    status, _, answer = call(wire, "failover.example", request_id="req-failover")
    assert status == 200, answer
    assert answer["origin"] == "a.example"
    closed = wire["ports"]["closed"]
    log = wire["a"].log()
    assert f"failover.example: target 127.0.0.1:{closed} failed (federation-connection-refused); 1 more to try" in log


def test_a_certificate_claiming_another_backend_is_refused(wire: Dict[str, Any]) -> None:
    context = tls_context(wire["pki"].ca_path, cert=wire["a_cert"])
    b_in = wire["ports"]["b_in"]
    # the same certificate for its own backend domain passes
    status, _, answer = post_tls(b_in, "fed-b.infra.example", context, "/federation/brig/get-user-by-handle",
                                 {}, headers={"Wire-Origin-Domain": "a.example"})
    assert status == 200, answer
    before = len(wire["component"].requests)
    status, _, answer = post_tls(b_in, "fed-b.infra.example", context, "/federation/brig/get-user-by-handle",
                                 {}, headers={"Wire-Origin-Domain": "c.example"})
    assert status == 403, answer
    assert answer["label"] == "validation-error"
    assert answer["message"] == (
        "the client certificate is for fed-a.infra.example, but discovery says c.example is served by "
        "fed-c.infra.example"
    )
    assert answer["data"] == {"type": "federation", "domain": "c.example"}
    assert len(wire["component"].requests) == before


def test_an_address_outside_the_allowed_ranges_is_refused(wire: Dict[str, Any]) -> None:
    status, _, answer = call(wire, "private.example")
    assert status == 400, answer
    assert answer["label"] == "discovery-failure"
    assert answer["message"] == (
        "no usable federation target for private.example: 10.0.0.1 is not a public address; list its "
        "range in [outward] allow_ip_ranges to federate with it"
    )
    assert answer["data"]["domain"] == "private.example"
    # refused before any connection: no target was tried
    assert "target 10.0.0.1" not in wire["a"].log()


@pytest.mark.parametrize("domain", ["dot.example", "nowhere.example"])
def test_a_domain_without_federation_is_invalid_domain(wire: Dict[str, Any], domain: str) -> None:
    status, _, answer = call(wire, domain)
    assert status == 422, answer
    assert answer["label"] == "invalid-domain"
    assert answer["message"].startswith(f"{domain} ")
    assert answer["data"]["domain"] == domain


def test_a_known_peer_is_reached_while_dns_is_down(wire: Dict[str, Any]) -> None:
    # last in this module: it stops the DNS server (and starts it again)
    status, _, answer = call(wire, "b.example")
    assert status == 200, answer
    wire["dns"].stop()
    try:
        time.sleep(MAX_TTL + 0.5)  # every cached answer has expired
        before = len(wire["component"].requests)
        started = time.monotonic()
        status, _, answer = call(wire, "b.example", request_id="req-stale")
        assert status == 200, answer
        assert answer["origin"] == "a.example"
        assert len(wire["component"].requests) == before + 1
        # each side waited for one DNS timeout (a for b.example, b for a.example)
        assert time.monotonic() - started < 4 * DNS_TIMEOUT + 5
        assert "discovery of b.example failed (cannot discover b.example: the DNS lookup of " \
               f"{SERVICE}.b.example timed out); using the answer that expired" in wire["a"].log()
        assert "discovery of a.example failed (cannot discover a.example: the DNS lookup of " \
               f"{SERVICE}.a.example timed out); using the answer that expired" in wire["b"].log()
        # a peer a never discovered has nothing stale to serve
        status, _, answer = call(wire, "c.example")
        assert status == 400, answer
        assert answer["label"] == "discovery-failure"
        assert answer["message"] == f"cannot discover c.example: the DNS lookup of {SERVICE}.c.example timed out"
    finally:
        wire["dns"].start()


def _discover(wire: Dict[str, Any], domain: str) -> tuple:
    return discover_json(wire["a"].config_path, domain)


def test_discover_shows_the_srv_records_of_a_reachable_domain(wire: Dict[str, Any]) -> None:
    code, report = _discover(wire, "b.example")
    assert code == 0, report
    (record,) = report["records"]
    assert (record["target"], record["port"], record["allowed"]) == (
        "fed-b.infra.example", wire["ports"]["b_in"], ["127.0.0.1"])
    (target,) = report["targets"]
    assert target["infra_domain"] == "fed-b.infra.example"
    assert target["handshake"]["ok"] and target["handshake"]["names"] == ["fed-b.infra.example"]
    assert report["verdict"].startswith("reachable: fed-b.infra.example")


def test_discover_explains_an_address_the_policy_refuses(wire: Dict[str, Any]) -> None:
    code, report = _discover(wire, "private.example")
    assert code == 1
    assert report["records"][0]["refused"] == ["10.0.0.1"]
    assert report["targets"] == []
    assert "10.0.0.1 is not a public address" in report["verdict"]
