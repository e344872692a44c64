"""
Observability of real fedserver processes: two backends federate over
mutual TLS, then each one's C{/metrics} is scraped and parsed as Prometheus
would, C{/status/domains} shows the call, and with C{[logging] format =
"json"} every line of the log (under twistd and under twist) is a JSON
object, the call's request id among them.
"""

from __future__ import annotations

import json
from typing import Any, Dict, Iterator, List

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.harness import PKI, Component, Fedserver, backend_config, free_port, post

REQUEST_ID = "obs-req-1"


@pytest.fixture(scope="module")
def pair(tmp_path_factory: Any) -> Iterator[Dict[str, Any]]:
    tmp = tmp_path_factory.mktemp("observability")
    pki = PKI(str(tmp / "pki"))
    ports = {name: free_port() for name in ("a_in", "a_out", "b_in", "b_out")}
    component = Component()
    servers: List[Fedserver] = []
    try:
        b_config = backend_config(
            "b.example", "fed.b.example", pki=pki, inward_port=ports["b_in"], outward_port=ports["b_out"],
            discovery={"a.example": {"infra_domain": "fed.a.example", "host": "127.0.0.1", "port": ports["a_in"]}},
            allow=["a.example"], components={"brig": component.url},
        )
        b_config["logging"] = {"format": "json"}
        servers.append(Fedserver(str(tmp), "b", b_config, command="twist"))
        a_config = backend_config(
            "a.example", "fed.a.example", pki=pki, inward_port=ports["a_in"], outward_port=ports["a_out"],
            discovery={"b.example": {"infra_domain": "fed.b.example", "host": "127.0.0.1", "port": ports["b_in"]}},
            allow=["b.example"], components={},
        )
        a_config["logging"] = {"format": "json"}
        servers.append(Fedserver(str(tmp), "a", a_config))
        b, a = servers
        status, _, answer = post(a.outward_port, "/rpc/b.example/brig/get-user", {"handle": "bob"},
                                 headers={"Wire-Origin-Request-Id": REQUEST_ID,
                                          "Content-Type": "application/json"})
        assert status == 200, answer
        yield {"a": a, "b": b}
    finally:
        for server in servers:
            server.stop()
        component.close()


def scrape(port: int) -> Dict[str, Any]:
    status, headers, body = post(port, "/metrics", method="GET")
    assert status == 200
    assert headers["content-type"].startswith("text/plain; version=0.0.4")
    assert isinstance(body, bytes)
    return {family.name: family for family in text_string_to_metric_families(body.decode())}


def value(family: Any, name: str, **labels: str) -> float:
    matching = [s.value for s in family.samples if s.name == name and all(s.labels.get(k) == v
                                                                         for k, v in labels.items())]
    assert len(matching) == 1, (name, labels, family.samples)
    return matching[0]


def test_the_outward_metrics_show_the_call(pair: Dict[str, Any]) -> None:
    families = scrape(pair["a"].outward_port)
    labels = dict(destination="b.example", component="brig", rpc="get-user")
    assert value(families["fedserver_outbound_requests"], "fedserver_outbound_requests_total",
                 **labels, outcome="success") == 1
    latency = families["fedserver_outbound_request_duration_seconds"]
    assert value(latency, "fedserver_outbound_request_duration_seconds_count", component="brig", rpc="get-user") == 1
    assert 0 < value(latency, "fedserver_outbound_request_duration_seconds_sum", component="brig",
                     rpc="get-user") < 30
    assert value(latency, "fedserver_outbound_request_duration_seconds_bucket", component="brig", rpc="get-user",
                 le="+Inf") == 1
    assert value(families["fedserver_info"], "fedserver_info", backend_domain="a.example") == 1
    # this scrape's own connection to the outward listener
    assert value(families["fedserver_connections"], "fedserver_connections", listener="outward") >= 1


def test_the_remote_counts_the_call_by_peer(pair: Dict[str, Any]) -> None:
    families = scrape(pair["b"].outward_port)
    assert value(families["fedserver_inbound_requests"], "fedserver_inbound_requests_total",
                 peer="a.example", component="brig", rpc="get-user", outcome="success") == 1
    assert value(families["fedserver_inbound_request_duration_seconds"],
                 "fedserver_inbound_request_duration_seconds_count", component="brig", rpc="get-user") == 1


def test_the_status_route_shows_the_last_success(pair: Dict[str, Any]) -> None:
    status, _, report = post(pair["a"].outward_port, "/status/domains/b.example", method="GET")
    assert status == 200, report
    assert report["domain"] == "b.example"
    assert report["outbound"]["requests"] == 1
    assert report["outbound"]["consecutive_failures"] == 0
    assert report["outbound"]["last_success"]["time"].endswith("Z")
    assert report["outbound"]["last_error"] is None
    status, _, listing = post(pair["a"].outward_port, "/status/domains", method="GET")
    assert status == 200
    assert [d["domain"] for d in listing["domains"]] == ["b.example"]
    status, _, remote = post(pair["b"].outward_port, "/status/domains/a.example", method="GET")
    assert status == 200
    assert remote["inbound"]["last_success"] is not None


@pytest.mark.parametrize("name, runner", [("a", "twistd"), ("b", "twist")])
def test_json_logs_are_one_object_a_line_with_the_request_id(pair: Dict[str, Any], name: str, runner: str) -> None:
    text = pair[name].log()
    lines = text.splitlines()
    assert lines, f"{runner} wrote no log"
    records = []
    for line in lines:
        try:
            records.append(json.loads(line))
        except ValueError:
            raise AssertionError(f"a line of the {runner} log is not JSON: {line!r}") from None
    assert all(isinstance(r, dict) and {"time", "level", "message"} <= set(r) for r in records)
    about_the_call = [r for r in records if r.get("request_id") == REQUEST_ID]
    assert about_the_call, f"no line of the {runner} log has request_id {REQUEST_ID}"
    assert any(REQUEST_ID in r["message"] and "200" in r["message"] for r in about_the_call)
