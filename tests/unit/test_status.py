"""
L{fedserver.status}: the per-domain status fed by the pipeline, and the
C{/status/domains} routes.
"""

from __future__ import annotations

from typing import Any, Dict, Optional

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from fedserver.discovery_cache import DiscoveryCache
from fedserver.errors import DiscoveryFailure
from fedserver.pipeline import CallOutcome
from fedserver.status import DomainStatus, StatusAPI, status_resource
from fedserver.web import ListenerRoot
from tests.unit.helpers import (
    HTTPConnection,
    json_response,
    labelled_failure,
    make_call,
    make_inbound,
    make_rig,
    site_for,
    success_result_of,
    target,
)

START = 1_700_000_000.0


def status_rig(**kwargs: Any) -> Any:
    rig = make_rig(**kwargs)
    clock = Clock()
    clock.advance(START)
    status = DomainStatus(clock)
    rig.pipeline.observers.append(status.observe)
    return rig, status, clock


def test_success_then_errors_then_success():
    rig, status, clock = status_rig(table={})
    labelled_failure(rig.pipeline.call_remote(make_call(request_id="r1")), "invalid-domain")
    clock.advance(5)
    labelled_failure(rig.pipeline.call_remote(make_call(request_id="r2")), "invalid-domain")
    outbound = status.get("b.example", "outbound")
    assert outbound is not None
    report = outbound.to_json()
    assert report["requests"] == 2
    assert report["failures"] == 2
    assert report["consecutive_failures"] == 2
    assert report["last_success"] is None
    error = report["last_error"]
    assert error["label"] == "invalid-domain"
    assert error["request_id"] == "r2"
    assert (error["component"], error["rpc"]) == ("brig", "get-user")
    assert error["timestamp"] == START + 5
    assert error["time"] == "2023-11-14T22:13:25.000Z"

    rig.discovery.table = {"b.example": [target("fed.b.example")]}
    clock.advance(1)
    success_result_of(rig.pipeline.call_remote(make_call()))
    report = status.get("b.example", "outbound").to_json()  # type: ignore[union-attr]
    assert report["consecutive_failures"] == 0
    assert report["last_success"]["timestamp"] == START + 6
    assert report["last_error"]["label"] == "invalid-domain"  # still shown


def test_a_remote_error_answer_is_an_error_with_its_code():
    rig, status, _ = status_rig(outcomes={"fed.b.example": json_response(500, {})})
    success_result_of(rig.pipeline.call_remote(make_call()))
    error = status.get("b.example", "outbound").last_error  # type: ignore[union-attr]
    assert (error["label"], error["code"]) == ("federation-remote-error", 500)


def test_inbound_calls_count_once_the_peer_is_known():
    rig, status, _ = status_rig()
    success_result_of(rig.pipeline.handle_inbound(make_inbound(), "brig", "get-user", "r"))
    assert status.get("b.example", "inbound").requests == 1  # type: ignore[union-attr]
    assert status.get("b.example", "outbound") is None
    stranger = status_rig(peer=DiscoveryFailure("who?"))
    labelled_failure(stranger[0].pipeline.handle_inbound(make_inbound(), "brig", "x", "r"), "discovery-failure")
    assert stranger[1].domains() == []


def test_domains_are_bounded_least_recently_seen_first_out():
    status = DomainStatus(Clock(), max_domains=2)
    for domain in ("a.example", "b.example", "a.example", "c.example"):
        status.observe(CallOutcome("outbound", domain, "brig", "x", None, 200, "", 0.1, None))
    assert status.domains() == ["a.example", "c.example"]


# the routes


def status_site(status: DomainStatus, caches: Any = (), queue: Any = None) -> Any:
    root = ListenerRoot("outward listener")
    root.mount(b"status", status_resource(StatusAPI(status, caches=caches, queue=queue), max_body_bytes=1000))
    return site_for(root)


def get(site: Any, path: bytes, method: bytes = b"GET") -> Any:
    connection = HTTPConnection.to(site)
    connection.request(method, path)
    return connection.answer()


def test_the_routes_show_each_domain():
    rig, status, clock = status_rig()
    success_result_of(rig.pipeline.call_remote(make_call()))
    success_result_of(rig.pipeline.handle_inbound(make_inbound(), "brig", "get-user", "r"))
    cache: DiscoveryCache[str] = DiscoveryCache(clock, lambda name: defer.succeed(("B", 300.0)))
    success_result_of(cache.get("b.example"))
    site = status_site(status, caches=[("discovery", cache)])

    answer = get(site, b"/status/domains")
    assert answer.code == 200
    assert answer.header("content-type") == "application/json"
    (domain,) = answer.json()["domains"]
    assert domain["domain"] == "b.example"
    assert domain["outbound"]["last_success"]["timestamp"] == START
    assert domain["inbound"]["requests"] == 1
    assert domain["discovery"] == {"discovery": {"state": "fresh", "expires_in": 300.0}}
    assert domain["queue"] is None

    one = get(site, b"/status/domains/b.example")
    assert one.code == 200
    assert one.json() == domain


def test_the_queue_is_shown_when_there_is_one():
    status = DomainStatus(Clock())
    shown: Dict[str, Any] = {"c.example": {"depth": 2, "oldest_age": 30.0, "next_attempt_in": 12.0}}

    def about(domain: str) -> Deferred[Optional[Dict[str, Any]]]:
        return defer.succeed(shown.get(domain))

    site = status_site(status, queue=lambda: (lambda: list(shown), about))
    (domain,) = get(site, b"/status/domains").json()["domains"]
    assert domain["domain"] == "c.example"
    assert domain["queue"]["depth"] == 2
    assert get(site, b"/status/domains/c.example").json()["queue"]["next_attempt_in"] == 12.0


def test_refusals():
    site = status_site(DomainStatus(Clock()))
    get(site, b"/status/domains/nobody.example").labelled(404, "not-found")
    get(site, b"/status/elsewhere").labelled(404, "no-endpoint")
    get(site, b"/status/domains", b"POST").labelled(405, "method-not-allowed")
    get(site, b"/status/domains?x=1").labelled(400, "bad-request")
