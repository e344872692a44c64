"""
Prometheus metrics for one fedserver: a registry of its own, fed by the
pipeline and by collectors that read counters kept elsewhere, served at
C{GET /metrics} on the outward listener.

Each L{Metrics} has its own C{CollectorRegistry}, never the global one:
several fedservers may run in one process (tests, embedding applications),
and each must show only its own numbers.

What is exported (docs/observability.md explains each):

 - C{fedserver_inbound_requests_total{peer,component,rpc,outcome}} and
   C{fedserver_outbound_requests_total{destination,component,rpc,outcome}}:
   calls through the pipeline; C{outcome} is C{success} or the error label;
 - C{fedserver_inbound_request_duration_seconds{component,rpc}} and
   C{fedserver_outbound_request_duration_seconds{component,rpc}}: their
   latency;
 - C{fedserver_connections{listener}}, C{fedserver_connections_limit} and
   C{fedserver_connections_refused_total}: the listeners' connections;
 - C{fedserver_discovery_cache_requests_total{cache,result}},
   C{fedserver_discovery_cache_stale_total{cache}} and
   C{fedserver_discovery_cache_entries{cache}}: the discovery caches;
 - what plugins and other parts register with L{Metrics.register_collector}
   (the relay's frame counters, the outbound queue's depth and age);
 - C{fedserver_info} and the standard C{process_*} and C{python_*} metrics.

Peer-chosen label values are bounded: at most C{max_domains} distinct
domains and C{max_names} distinct component and RPC names are shown; more
are counted under C{other}.
"""

from __future__ import annotations

import importlib.metadata
import json
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Set, Tuple

from prometheus_client import CollectorRegistry, Counter, Histogram, PlatformCollector, ProcessCollector
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from twisted.logger import Logger
from twisted.web import resource, server

from fedserver.discovery_cache import DiscoveryCache
from fedserver.pipeline import CallOutcome

log = Logger(namespace="fedserver.metrics")

#: latency buckets, in seconds: a call within a data centre takes
#: milliseconds, a slow peer seconds, and the default request timeout is 30 s
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, float("inf"))

#: distinct domains shown in labels; more are counted as L{OTHER}
MAX_DOMAINS = 1000
#: distinct component and RPC names shown in labels
MAX_NAMES = 200
#: the label value of what is beyond a bound
OTHER = "other"
#: the peer label of an inbound call refused before its peer was established
UNAUTHENTICATED = "unauthenticated"

#: what a collector registered with L{Metrics.register_collector} is
CollectorFunction = Callable[[], Iterable[Metric]]


class BoundedLabel:
    """
    Label values with a bound: the first C{limit} distinct values are shown
    as they are, any later one as L{OTHER}.  Peers choose our origin
    domains and RPC names, so they must not be able to grow the number of
    time series without end.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._seen: Set[str] = set()

    def __call__(self, value: str) -> str:
        if value in self._seen:
            return value
        if len(self._seen) >= self.limit:
            return OTHER
        self._seen.add(value)
        return value


class _Collector:
    """A collector function as prometheus_client wants it; its failures are logged, not raised."""

    def __init__(self, collect: CollectorFunction) -> None:
        self._collect = collect

    def collect(self) -> Iterator[Metric]:
        try:
            yield from self._collect()
        except Exception:
            log.failure("a metrics collector failed: {collector!r}", collector=self._collect)


class Metrics:
    """
    One fedserver's metrics.

    @ivar registry: the C{CollectorRegistry} served at C{/metrics}.
    """

    def __init__(self, *, backend_domain: str = "", max_domains: int = MAX_DOMAINS,
                 max_names: int = MAX_NAMES, process: bool = True) -> None:
        self.registry = CollectorRegistry()
        self.domains = BoundedLabel(max_domains)
        self.names = BoundedLabel(max_names)
        self._series: Dict[Tuple[Any, ...], Tuple[Any, Any]] = {}
        r = self.registry
        self.inbound_requests = Counter(
            "fedserver_inbound_requests",
            "Calls from remote backends through the pipeline, by peer backend domain, component, RPC and "
            "outcome (success, or the error label)",
            ["peer", "component", "rpc", "outcome"], registry=r,
        )
        self.outbound_requests = Counter(
            "fedserver_outbound_requests",
            "Calls to remote backends through the pipeline, by destination backend domain, component, RPC "
            "and outcome (success, or the error label)",
            ["destination", "component", "rpc", "outcome"], registry=r,
        )
        self.inbound_seconds = Histogram(
            "fedserver_inbound_request_duration_seconds",
            "Time from an inbound call's authentication to the component's answer, by component and RPC",
            ["component", "rpc"], buckets=LATENCY_BUCKETS, registry=r,
        )
        self.outbound_seconds = Histogram(
            "fedserver_outbound_request_duration_seconds",
            "Time of an outbound call from discovery to the remote's answer, by component and RPC",
            ["component", "rpc"], buckets=LATENCY_BUCKETS, registry=r,
        )
        version = _version()
        self.register_collector(lambda: [_info(backend_domain, version)])
        if process:
            ProcessCollector(registry=r)
            PlatformCollector(registry=r)

    def observe(self, outcome: CallOutcome) -> None:
        """Count one finished call (a L{fedserver.pipeline.Pipeline} observer)."""
        if outcome.domain is None:
            domain = UNAUTHENTICATED
        else:
            domain = self.domains(outcome.domain)
        key = (outcome.direction, domain, self.names(outcome.component), self.names(outcome.rpc),
               outcome.label or "success")
        series = self._series.get(key)
        if series is None:
            # labels() takes a lock and builds its key each time: kept per
            # series (as bounded as the labels), observe() stays cheap
            direction, *labels = key
            if direction == "inbound":
                series = (self.inbound_requests.labels(*labels), self.inbound_seconds.labels(*labels[1:3]))
            else:
                series = (self.outbound_requests.labels(*labels), self.outbound_seconds.labels(*labels[1:3]))
            self._series[key] = series
        series[0].inc()
        series[1].observe(outcome.seconds)

    def register_collector(self, collect: CollectorFunction) -> Any:
        """
        Call C{collect()} on every scrape: it returns metric families
        (C{prometheus_client.metrics_core.GaugeMetricFamily} and the like)
        read from counters kept elsewhere, so nothing is counted twice.  A
        collector that raises is logged and skipped.  Returns a handle for
        L{unregister_collector}.
        """
        collector = _Collector(collect)
        self.registry.register(collector)
        return collector

    def unregister_collector(self, handle: Any) -> None:
        """Stop calling a collector registered with L{register_collector}."""
        self.registry.unregister(handle)

    def exposition(self, accept: Optional[str] = None) -> Tuple[bytes, str]:
        """
        The metrics in the format the C{Accept} header asks for (the
        Prometheus text format by default, OpenMetrics on request) and its
        content type.
        """
        encode, content_type = choose_encoder(accept or "")
        return encode(self.registry), content_type


def _version() -> str:
    try:
        return importlib.metadata.version("fedserver")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _info(backend_domain: str, version: str) -> Metric:
    info = GaugeMetricFamily("fedserver_info", "This fedserver: its backend domain and version (always 1)",
                             labels=["backend_domain", "version"])
    info.add_metric([backend_domain, version], 1)
    return info


def connection_metrics(listeners: Iterable[Tuple[str, Any]]) -> CollectorFunction:
    """
    A collector for the listeners' connections: C{listeners} pairs a name
    (C{inward}, C{outward}) with its L{fedserver.service.ConnectionLimit}.
    """
    listeners = list(listeners)

    def collect() -> List[Metric]:
        open_ = GaugeMetricFamily("fedserver_connections", "Connections open on a listener", labels=["listener"])
        limit = GaugeMetricFamily("fedserver_connections_limit",
                                  "Connections a listener holds at most ([limits] max_connections)",
                                  labels=["listener"])
        refused = CounterMetricFamily("fedserver_connections_refused",
                                      "Connections closed on arrival because the listener held its limit",
                                      labels=["listener"])
        for name, connections in listeners:
            open_.add_metric([name], len(connections.protocols))
            refused.add_metric([name], connections.refused)
            if connections.limit is not None:
                limit.add_metric([name], connections.limit)
        return [open_, limit, refused]

    return collect


def discovery_caches(discovery: Any) -> List[Tuple[str, DiscoveryCache[Any]]]:
    """
    The L{DiscoveryCache}s a discovery plugin keeps as attributes, named:
    C{cache} is C{discovery}, any other attribute by its name
    (C{well_known} is C{well-known}).
    """
    found = []
    for attribute, value in sorted(vars(discovery).items()):
        if isinstance(value, DiscoveryCache):
            found.append(("discovery" if attribute == "cache" else attribute.replace("_", "-"), value))
    return found


def discovery_cache_metrics(caches: Iterable[Tuple[str, DiscoveryCache[Any]]]) -> CollectorFunction:
    """A collector for the hits, misses, stale answers and size of discovery caches."""
    caches = list(caches)

    def collect() -> List[Metric]:
        requests = CounterMetricFamily(
            "fedserver_discovery_cache_requests",
            "Discovery cache look-ups: hit (a fresh or negative entry answered) or miss (asked DNS or the "
            "network, or waited for a look-up in progress)",
            labels=["cache", "result"])
        stale = CounterMetricFamily(
            "fedserver_discovery_cache_stale",
            "Look-ups that failed and were answered with an expired answer (served stale)", labels=["cache"])
        entries = GaugeMetricFamily("fedserver_discovery_cache_entries", "Names held in a discovery cache",
                                    labels=["cache"])
        for name, cache in caches:
            requests.add_metric([name, "hit"], cache.hits)
            requests.add_metric([name, "miss"], cache.misses)
            stale.add_metric([name], cache.stale)
            entries.add_metric([name], len(cache))
        return [requests, stale, entries]

    return collect


class MetricsResource(resource.Resource):
    """
    C{GET /metrics}: the registry in the Prometheus text format (or
    OpenMetrics, when the scraper's C{Accept} asks for it).  Scrapes are not
    logged: Prometheus asks every few seconds.
    """

    isLeaf = True

    def __init__(self, metrics: Metrics) -> None:
        super().__init__()
        self.metrics = metrics

    def render(self, request: server.Request) -> bytes:
        if request.postpath not in ([], [b""]):
            return _refuse(request, 404, "no-endpoint", "the metrics are at GET /metrics")
        if request.method not in (b"GET", b"HEAD"):
            request.setHeader(b"allow", b"GET, HEAD")
            return _refuse(request, 405, "method-not-allowed", "/metrics takes GET")
        accept = request.getHeader(b"accept")
        body, content_type = self.metrics.exposition(accept.decode("latin-1") if accept else None)
        request.setHeader(b"content-type", content_type.encode("ascii"))
        return body


def _refuse(request: server.Request, code: int, label: str, message: str) -> bytes:
    request.setResponseCode(code)
    request.setHeader(b"content-type", b"application/json")
    return json.dumps({"code": code, "label": label, "message": message}).encode("utf-8")


__all__ = [
    "BoundedLabel",
    "Metrics",
    "MetricsResource",
    "connection_metrics",
    "discovery_cache_metrics",
    "discovery_caches",
]
