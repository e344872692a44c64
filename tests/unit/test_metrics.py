"""
L{fedserver.metrics}: counters and histograms fed by the real pipeline,
bounded labels, collectors, and C{GET /metrics} parsed as Prometheus would.
"""

from __future__ import annotations

import types
from typing import Any, Dict, Optional

import pytest
from prometheus_client.metrics_core import GaugeMetricFamily
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.logger import capturedLogs
from twisted.web.resource import Resource

import fedserver.builtin.allow_list
import fedserver.builtin.http_forward
import fedserver.builtin.mtls
import fedserver.builtin.static_discovery
from fedserver.client import NotDelivered
from fedserver.discovery_cache import CacheSettings, DiscoveryCache
from fedserver.errors import AuthenticationFailure, DiscoveryFailure
from fedserver.metrics import (
    OTHER,
    UNAUTHENTICATED,
    BoundedLabel,
    Metrics,
    MetricsResource,
    connection_metrics,
    discovery_cache_metrics,
    discovery_caches,
)
from fedserver.pipeline import route_names
from fedserver.registry import make_plugin_manager
from fedserver.service import ConnectionLimit, build_service
from fedserver_relay.mesh import Counters
from fedserver_relay.plugin import relay_metrics
from tests.unit.helpers import (
    HTTPConnection,
    assert_no_result,
    failure_result_of,
    json_response,
    labelled_failure,
    make_call,
    make_inbound,
    make_rig,
    minimal_config_file,
    site_for,
    success_result_of,
    target,
)


def sample(metrics: Metrics, name: str, **labels: str) -> Optional[float]:
    return metrics.registry.get_sample_value(name, labels)


def observed_rig(**kwargs: Any) -> Any:
    rig = make_rig(**kwargs)
    metrics = Metrics(process=False)
    rig.pipeline.observers.append(metrics.observe)
    return rig, metrics


OUT = dict(destination="b.example", component="brig", rpc="get-user")
IN = dict(peer="b.example", component="brig", rpc="get-user")


# outbound, through Pipeline.call_remote


def test_an_outbound_call_is_counted_and_timed():
    rig, metrics = observed_rig()
    ticks = iter([10.0, 10.25])
    rig.pipeline.timer = lambda: next(ticks)
    success_result_of(rig.pipeline.call_remote(make_call()))
    assert sample(metrics, "fedserver_outbound_requests_total", **OUT, outcome="success") == 1
    histogram = dict(component="brig", rpc="get-user")
    assert sample(metrics, "fedserver_outbound_request_duration_seconds_count", **histogram) == 1
    assert sample(metrics, "fedserver_outbound_request_duration_seconds_sum", **histogram) == 0.25
    assert sample(metrics, "fedserver_outbound_request_duration_seconds_bucket", **histogram, le="0.1") == 0
    assert sample(metrics, "fedserver_outbound_request_duration_seconds_bucket", **histogram, le="0.25") == 1


def test_a_remote_error_answer_is_counted_with_its_label():
    rig, metrics = observed_rig(outcomes={"fed.b.example": json_response(404, {"label": "not-found"})})
    success_result_of(rig.pipeline.call_remote(make_call()))
    assert sample(metrics, "fedserver_outbound_requests_total", **OUT, outcome="federation-remote-error") == 1
    assert sample(metrics, "fedserver_outbound_requests_total", **OUT, outcome="success") is None


def test_an_undelivered_call_is_counted_once_with_the_last_label():
    table = {"b.example": [target("fed.b.example", host="10.0.0.1"), target("fed.b.example", host="10.0.0.2")]}
    refused = {h: NotDelivered(f"cannot connect to {h}", "federation-connection-refused")
               for h in ("10.0.0.1", "10.0.0.2")}
    rig, metrics = observed_rig(table=table, outcomes=refused)
    labelled_failure(rig.pipeline.call_remote(make_call()), "federation-connection-refused")
    assert sample(metrics, "fedserver_outbound_requests_total", **OUT,
                  outcome="federation-connection-refused") == 1


def test_a_discovery_failure_is_counted():
    rig, metrics = observed_rig(table={})
    labelled_failure(rig.pipeline.call_remote(make_call()), "invalid-domain")
    assert sample(metrics, "fedserver_outbound_requests_total", **OUT, outcome="invalid-domain") == 1


def test_a_denied_call_is_not_an_outbound_request():
    # authorization comes before the call to the remote: nothing was sent
    rig, metrics = observed_rig(deny=(True,))
    labelled_failure(rig.pipeline.call_remote(make_call()), "federation-denied")
    assert sample(metrics, "fedserver_outbound_requests_total", **OUT, outcome="federation-denied") is None


def test_an_unlabelled_exception_is_internal_error():
    rig, metrics = observed_rig(outcomes={"fed.b.example": ValueError("boom")})
    failure_result_of(rig.pipeline.call_remote(make_call()), ValueError)
    assert sample(metrics, "fedserver_outbound_requests_total", **OUT, outcome="internal-error") == 1


def test_a_cancelled_call_is_counted_as_cancelled():
    pending: Deferred = Deferred()
    rig, metrics = observed_rig(outcomes={"fed.b.example": pending})
    d = rig.pipeline.call_remote(make_call())
    assert_no_result(d)
    d.cancel()
    failure_result_of(d)
    assert sample(metrics, "fedserver_outbound_requests_total", **OUT, outcome="cancelled") == 1


def test_matrix_and_other_paths_are_named_by_route():
    assert route_names("/federation/brig/get-user") == ("brig", "get-user")
    assert route_names("/_matrix/federation/v1/send/txn1") == ("matrix", "send")
    assert route_names("/_matrix/key/v2/query?x=1") == ("matrix", "query")
    assert route_names("/elsewhere") == ("other", "other")


# inbound, through Pipeline.handle_inbound


def test_an_inbound_call_is_counted_by_peer_and_timed():
    rig, metrics = observed_rig()
    success_result_of(rig.pipeline.handle_inbound(make_inbound(), "brig", "get-user", "req-9"))
    assert sample(metrics, "fedserver_inbound_requests_total", **IN, outcome="success") == 1
    assert sample(metrics, "fedserver_inbound_request_duration_seconds_count",
                  component="brig", rpc="get-user") == 1


def test_an_unauthenticated_call_does_not_name_a_peer():
    rig, metrics = observed_rig(peer=AuthenticationFailure("no certificate"))
    failure_result_of(rig.pipeline.handle_inbound(make_inbound(), "brig", "get-user", "req-9"))
    assert sample(metrics, "fedserver_inbound_requests_total", peer=UNAUTHENTICATED, component="brig",
                  rpc="get-user", outcome="authentication-failure") == 1


def test_inbound_refusals_after_authentication_name_the_peer():
    rig, metrics = observed_rig()
    labelled_failure(rig.pipeline.handle_inbound(make_inbound(), "nope", "x", "r"), "unknown-component")
    assert sample(metrics, "fedserver_inbound_requests_total", peer="b.example", component="nope", rpc="x",
                  outcome="unknown-component") == 1


def test_a_component_error_answer_is_counted():
    rig, metrics = observed_rig(answer=json_response(503, {"label": "busy"}))
    success_result_of(rig.pipeline.handle_inbound(make_inbound(), "brig", "get-user", "r"))
    assert sample(metrics, "fedserver_inbound_requests_total", **IN, outcome="component-error") == 1


def test_a_failing_observer_is_logged_and_the_call_goes_on():
    rig, metrics = observed_rig()

    def broken(outcome: Any) -> None:
        raise RuntimeError("observer bug")

    rig.pipeline.observers.insert(0, broken)
    with capturedLogs() as events:
        assert success_result_of(rig.pipeline.call_remote(make_call())).code == 200
    assert any(e.get("log_failure") is not None for e in events)
    assert sample(metrics, "fedserver_outbound_requests_total", **OUT, outcome="success") == 1


# bounds and registries


def test_labels_beyond_the_bound_are_other():
    label = BoundedLabel(2)
    assert [label(v) for v in ("a", "b", "c", "a", "d")] == ["a", "b", OTHER, "a", OTHER]


def test_peer_domains_are_bounded():
    table = {d: [target(f"fed.{d}")] for d in ("b.example", "c.example", "d.example")}
    rig = make_rig(table=table)
    metrics = Metrics(process=False, max_domains=2)
    rig.pipeline.observers.append(metrics.observe)
    for domain in table:
        success_result_of(rig.pipeline.call_remote(make_call(target_domain=domain)))
    values = {s.labels["destination"] for s in _family(metrics, "fedserver_outbound_requests").samples
              if s.name.endswith("_total")}
    assert values == {"b.example", "c.example", OTHER}


def test_each_metrics_has_its_own_registry():
    first, second = Metrics(process=False), Metrics(process=False)
    rig = make_rig()
    rig.pipeline.observers.append(first.observe)
    success_result_of(rig.pipeline.call_remote(make_call()))
    assert sample(first, "fedserver_outbound_requests_total", **OUT, outcome="success") == 1
    assert sample(second, "fedserver_outbound_requests_total", **OUT, outcome="success") is None


def test_registered_collectors_are_read_at_each_scrape_and_failures_skipped():
    metrics = Metrics(process=False)
    state = {"depth": 3}

    def depth() -> Any:
        gauge = GaugeMetricFamily("fedserver_test_depth", "a test gauge")
        gauge.add_metric([], state["depth"])
        return [gauge]

    def broken() -> Any:
        raise RuntimeError("collector bug")

    metrics.register_collector(broken)
    handle = metrics.register_collector(depth)
    with capturedLogs() as events:
        assert sample(metrics, "fedserver_test_depth") == 3
        state["depth"] = 5
        assert sample(metrics, "fedserver_test_depth") == 5
    assert any("collector" in e.get("log_format", "") for e in events)
    metrics.unregister_collector(handle)
    assert sample(metrics, "fedserver_test_depth") is None


def test_info_names_the_backend():
    metrics = Metrics(backend_domain="a.example", process=False)
    family = _family(metrics, "fedserver_info")
    assert family.samples[0].labels["backend_domain"] == "a.example"
    assert family.samples[0].value == 1


# collectors of counters kept elsewhere


def test_discovery_cache_hits_misses_and_stale_answers():
    clock = Clock()
    answers: Dict[str, Any] = {"b.example": ("B", 60.0)}

    def fetch(name: str) -> Deferred:
        from twisted.internet import defer

        value = answers[name]
        return defer.fail(value) if isinstance(value, Exception) else defer.succeed(value)

    cache: DiscoveryCache[str] = DiscoveryCache(clock, fetch, CacheSettings(min_ttl=60, negative_ttl=10))
    metrics = Metrics(process=False)
    metrics.register_collector(discovery_cache_metrics([("discovery", cache)]))
    assert cache.describe("b.example") is None
    success_result_of(cache.get("b.example"))
    success_result_of(cache.get("b.example"))
    assert cache.describe("b.example") == {"state": "fresh", "expires_in": 60.0}
    clock.advance(61)
    assert cache.describe("b.example")["state"] == "expired"
    answers["b.example"] = DiscoveryFailure("DNS timed out")
    assert success_result_of(cache.get("b.example")) == "B"
    described = cache.describe("b.example")
    assert described["state"] == "stale" and described["stale_for"] == 0
    assert sample(metrics, "fedserver_discovery_cache_requests_total", cache="discovery", result="hit") == 1
    assert sample(metrics, "fedserver_discovery_cache_requests_total", cache="discovery", result="miss") == 2
    assert sample(metrics, "fedserver_discovery_cache_stale_total", cache="discovery") == 1
    assert sample(metrics, "fedserver_discovery_cache_entries", cache="discovery") == 1
    answers["c.example"] = DiscoveryFailure("no record", "invalid-domain")
    failure_result_of(cache.get("c.example"))
    assert cache.describe("c.example")["state"] == "negative"
    assert cache.describe("c.example")["error"]["label"] == "invalid-domain"


def test_the_discovery_caches_of_a_plugin_are_found_by_attribute():
    clock = Clock()
    plugin = types.SimpleNamespace(cache=DiscoveryCache(clock, lambda n: Deferred()),
                                   well_known=DiscoveryCache(clock, lambda n: Deferred()), other=1)
    assert [name for name, _ in discovery_caches(plugin)] == ["discovery", "well-known"]


def test_connection_counts():
    from twisted.internet.protocol import Factory, Protocol
    from twisted.internet.testing import StringTransport

    limit = ConnectionLimit(Factory.forProtocol(Protocol), 1)
    metrics = Metrics(process=False)
    metrics.register_collector(connection_metrics([("inward", limit)]))
    limit.buildProtocol(None).makeConnection(StringTransport())
    assert limit.buildProtocol(None) is None
    assert sample(metrics, "fedserver_connections", listener="inward") == 1
    assert sample(metrics, "fedserver_connections_limit", listener="inward") == 1
    assert sample(metrics, "fedserver_connections_refused_total", listener="inward") == 1


def test_relay_frames_are_read_from_the_mesh_counters():
    counters = Counters()
    counters.accept("relay-b")
    counters.accept("relay-b")
    counters.drop("no-delegation", "relay-c")
    counters.forwarded = 4
    relay = types.SimpleNamespace(
        mesh=types.SimpleNamespace(counters=counters, links={"fp": object()}),
        participants=None,
        tls=types.SimpleNamespace(refusals={"x": 2, "y": 1}, refused_total=3),
        router=types.SimpleNamespace(unknown=7),
    )
    metrics = Metrics(process=False)
    metrics.register_collector(relay_metrics(relay))  # type: ignore[arg-type]
    assert sample(metrics, "fedserver_relay_frames_accepted_total", peer="relay-b") == 2
    assert sample(metrics, "fedserver_relay_frames_dropped_total", reason="no-delegation", peer="relay-c") == 1
    assert sample(metrics, "fedserver_relay_frames_total", kind="forwarded") == 4
    assert sample(metrics, "fedserver_relay_links") == 1
    assert sample(metrics, "fedserver_relay_handshakes_refused_total") == 3
    assert sample(metrics, "fedserver_relay_datagrams_unknown_total") == 7
    # counted once, by the mesh: a second scrape reads the same numbers
    assert sample(metrics, "fedserver_relay_frames_accepted_total", peer="relay-b") == 2


# GET /metrics


def _family(metrics: Metrics, name: str) -> Any:
    body, _ = metrics.exposition()
    return {f.name: f for f in text_string_to_metric_families(body.decode())}[name]


def _scrape(site: Any, path: bytes = b"/metrics", method: bytes = b"GET",
            headers: Any = ()) -> Any:
    connection = HTTPConnection.to(site)
    connection.request(method, path, headers=headers)
    return connection.answer()


def _metrics_site(metrics: Metrics) -> Any:
    root = Resource()
    root.putChild(b"metrics", MetricsResource(metrics))
    return site_for(root)


def test_the_metrics_resource_serves_the_text_format():
    rig, metrics = observed_rig()
    success_result_of(rig.pipeline.call_remote(make_call()))
    answer = _scrape(_metrics_site(metrics))
    assert answer.code == 200
    assert answer.header("content-type") == "text/plain; version=0.0.4; charset=utf-8"
    families = {f.name: f for f in text_string_to_metric_families(answer.body.decode())}
    (total,) = [s for s in families["fedserver_outbound_requests"].samples if s.name.endswith("_total")]
    assert (total.labels, total.value) == ({**OUT, "outcome": "success"}, 1.0)
    assert families["fedserver_outbound_request_duration_seconds"].type == "histogram"


def test_the_metrics_resource_speaks_openmetrics_on_request():
    answer = _scrape(_metrics_site(Metrics(process=False)),
                     headers=[(b"Accept", b"application/openmetrics-text; version=1.0.0")])
    assert answer.header("content-type").startswith("application/openmetrics-text")
    assert answer.body.endswith(b"# EOF\n")


@pytest.mark.parametrize("method, path, code, label", [
    (b"POST", b"/metrics", 405, "method-not-allowed"),
    (b"GET", b"/metrics/more", 404, "no-endpoint"),
])
def test_the_metrics_resource_refuses_other_requests(method: bytes, path: bytes, code: int, label: str):
    answer = _scrape(_metrics_site(Metrics(process=False)), path, method)
    answer.labelled(code, label)


def test_build_service_serves_metrics_on_the_outward_listener(tmp_path: Any):
    write = minimal_config_file(tmp_path, "a.example", "fed.a.example", outward=True)
    manager = make_plugin_manager(load_entrypoints=False, plugins=[
        fedserver.builtin.allow_list, fedserver.builtin.http_forward, fedserver.builtin.mtls,
        fedserver.builtin.static_discovery,
    ])
    from twisted.internet.testing import MemoryReactorClock

    top = build_service(write(), reactor=MemoryReactorClock(), plugin_manager=manager)
    # the outbound queue observes too (a destination heard from again is retried at once)
    assert top.pipeline.observers == [top.context.metrics.observe, top.domain_status.observe,
                                      top.context.queue.observe]
    answer = _scrape(top.outward_site)
    assert answer.code == 200
    families = {f.name: f for f in text_string_to_metric_families(answer.body.decode())}
    assert families["fedserver_info"].samples[0].labels["backend_domain"] == "a.example"
    connections = {s.labels["listener"]: s.value for s in families["fedserver_connections"].samples}
    assert connections == {"inward": 0, "outward": 0}  # this scrape came around the connection limit
    assert "process_cpu_seconds" in families or "process_virtual_memory_bytes" in families
    assert "fedserver_inbound_requests" in families  # declared, even before the first call
