"""
Tests for L{fedserver.discovery_cache}: TTL bounds, negative answers, stale
answers while lookups fail, merged lookups, counters; all on a L{Clock}.
"""

from __future__ import annotations

from typing import Any, Dict, List

import pytest
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.logger import Logger

from fedserver import discovery_cache
from fedserver.discovery_cache import CacheSettings, DiscoveryCache
from fedserver.errors import DiscoveryFailure
from tests.unit.helpers import assert_no_result, failure_result_of, labelled_failure, success_result_of

SETTINGS = CacheSettings(min_ttl=10, max_ttl=1000, negative_ttl=30, stale_ttl=500)


class Fetcher:
    """A fetch function whose lookups the test answers."""

    def __init__(self) -> None:
        self.calls: List[str] = []
        self.pending: List[Deferred] = []

    def __call__(self, name: str) -> Deferred:
        self.calls.append(name)
        d: Deferred = Deferred()
        self.pending.append(d)
        return d

    def answer(self, value: Any, ttl: float) -> None:
        self.pending.pop(0).callback((value, ttl))

    def fail(self, error: Exception) -> None:
        self.pending.pop(0).errback(error)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def fetch() -> Fetcher:
    return Fetcher()


@pytest.fixture
def cache(clock: Clock, fetch: Fetcher) -> DiscoveryCache:
    return DiscoveryCache(clock, fetch, SETTINGS)


@pytest.fixture
def events(monkeypatch: pytest.MonkeyPatch) -> List[Dict[str, Any]]:
    seen: List[Dict[str, Any]] = []
    monkeypatch.setattr(discovery_cache, "log", Logger(namespace="fedserver.discovery", observer=seen.append))
    return seen


def invalid_domain() -> DiscoveryFailure:
    return DiscoveryFailure("b.example does not federate", "invalid-domain")


def lookup_failed() -> DiscoveryFailure:
    return DiscoveryFailure("cannot discover b.example: SERVFAIL")


def cached(cache: DiscoveryCache, name: str = "b.example") -> Any:
    """The value of a lookup that must be answered without fetching."""
    return success_result_of(cache.get(name))


def test_a_lookup_fetches_and_answers(cache: DiscoveryCache, fetch: Fetcher) -> None:
    d = cache.get("b.example")
    assert_no_result(d)
    assert fetch.calls == ["b.example"]
    fetch.answer("answer", 100)
    assert success_result_of(d) == "answer"


def test_the_ttl_is_honoured(cache: DiscoveryCache, fetch: Fetcher, clock: Clock) -> None:
    cache.get("b.example")
    fetch.answer("first", 100)
    clock.advance(99.9)
    assert cached(cache) == "first"
    assert fetch.calls == ["b.example"]
    clock.advance(0.1)
    d = cache.get("b.example")
    assert fetch.calls == ["b.example", "b.example"]
    fetch.answer("second", 100)
    assert success_result_of(d) == "second"


@pytest.mark.parametrize("ttl, kept", [(0, 10), (3, 10), (10, 10), (500, 500), (1000, 1000), (86400 * 7, 1000)])
def test_the_ttl_is_clamped(cache: DiscoveryCache, fetch: Fetcher, clock: Clock, ttl: float, kept: float) -> None:
    cache.get("b.example")
    fetch.answer("value", ttl)
    clock.advance(kept - 0.01)
    assert cached(cache) == "value"
    clock.advance(0.01)
    assert_no_result(cache.get("b.example"))
    assert len(fetch.calls) == 2


def test_names_are_cached_apart(cache: DiscoveryCache, fetch: Fetcher) -> None:
    cache.get("b.example")
    fetch.answer("b", 100)
    c = cache.get("c.example")
    assert fetch.calls == ["b.example", "c.example"]
    fetch.answer("c", 100)
    assert success_result_of(c) == "c"
    assert cached(cache, "b.example") == "b"


def test_a_negative_answer_is_cached_for_negative_ttl(cache: DiscoveryCache, fetch: Fetcher, clock: Clock) -> None:
    d = cache.get("b.example")
    fetch.fail(invalid_domain())
    labelled_failure(d, "invalid-domain")
    clock.advance(29.9)
    error = labelled_failure(cache.get("b.example"), "invalid-domain")
    assert error.message == "b.example does not federate"
    assert fetch.calls == ["b.example"]
    clock.advance(0.1)
    d = cache.get("b.example")
    assert fetch.calls == ["b.example", "b.example"]
    fetch.answer("federates now", 100)
    assert success_result_of(d) == "federates now"


def test_a_negative_ttl_of_zero_caches_nothing(clock: Clock, fetch: Fetcher) -> None:
    cache = DiscoveryCache(clock, fetch, CacheSettings(negative_ttl=0))
    cache.get("b.example")
    fetch.fail(invalid_domain())
    assert_no_result(cache.get("b.example"))
    assert len(fetch.calls) == 2


def test_a_failed_lookup_is_not_cached(cache: DiscoveryCache, fetch: Fetcher) -> None:
    d = cache.get("b.example")
    fetch.fail(lookup_failed())
    assert labelled_failure(d, "discovery-failure").message == "cannot discover b.example: SERVFAIL"
    assert_no_result(cache.get("b.example"))
    assert len(fetch.calls) == 2


def test_any_other_error_is_passed_on_uncached(cache: DiscoveryCache, fetch: Fetcher) -> None:
    d = cache.get("b.example")
    fetch.fail(RuntimeError("bug"))
    failure_result_of(d, RuntimeError)
    assert_no_result(cache.get("b.example"))


def test_a_failed_lookup_is_kept_for_failure_ttl(clock: Clock, fetch: Fetcher) -> None:
    cache = DiscoveryCache(clock, fetch, CacheSettings(min_ttl=10, failure_ttl=100))
    d = cache.get("b.example")
    fetch.fail(lookup_failed())
    labelled_failure(d, "discovery-failure")
    clock.advance(99)
    assert labelled_failure(cache.get("b.example"), "discovery-failure").message == (
        "cannot discover b.example: SERVFAIL")
    assert len(fetch.calls) == 1
    clock.advance(1)
    assert_no_result(cache.get("b.example"))
    assert len(fetch.calls) == 2


def test_failure_ttl_does_not_hide_a_stale_answer(clock: Clock, fetch: Fetcher) -> None:
    cache = DiscoveryCache(clock, fetch, CacheSettings(min_ttl=10, max_ttl=10, negative_ttl=5, stale_ttl=100,
                                                       failure_ttl=1000))
    cache.get("b.example")
    fetch.answer("targets", 10)
    clock.advance(10)
    d = cache.get("b.example")
    fetch.fail(lookup_failed())
    assert success_result_of(d) == "targets"
    clock.advance(105)  # the stale answer is over: now the failure is kept
    d = cache.get("b.example")
    fetch.fail(lookup_failed())
    labelled_failure(d, "discovery-failure")
    clock.advance(999)
    labelled_failure(cache.get("b.example"), "discovery-failure")
    assert len(fetch.calls) == 3


def test_a_fetch_that_raises_is_a_failed_lookup(clock: Clock) -> None:
    def fetch(name: str) -> Deferred:
        raise DiscoveryFailure("cannot discover")

    cache: DiscoveryCache = DiscoveryCache(clock, fetch, SETTINGS)
    labelled_failure(cache.get("b.example"), "discovery-failure")
    # nothing left pending: the next lookup fetches again
    labelled_failure(cache.get("b.example"), "discovery-failure")


def test_stale_answer_while_lookups_fail(
    cache: DiscoveryCache, fetch: Fetcher, clock: Clock, events: List[Dict[str, Any]]
) -> None:
    cache.get("b.example")
    fetch.answer("known", 100)
    clock.advance(150)  # expired 50 s ago
    d = cache.get("b.example")
    assert_no_result(d)
    fetch.fail(lookup_failed())
    assert success_result_of(d) == "known"
    [event] = events
    assert event["name"] == "b.example"
    assert event["error"] == "cannot discover b.example: SERVFAIL"
    assert event["ago"] == 50
    assert event["log_level"].name == "warn"
    # for negative_ttl, the stale answer serves without asking DNS again
    assert success_result_of(cache.get("b.example")) == "known"
    assert len(fetch.calls) == 2
    clock.advance(30)
    d = cache.get("b.example")
    assert len(fetch.calls) == 3
    fetch.fail(lookup_failed())
    assert success_result_of(d) == "known"


def test_stale_only_up_to_stale_ttl(cache: DiscoveryCache, fetch: Fetcher, clock: Clock) -> None:
    cache.get("b.example")
    fetch.answer("known", 100)
    clock.advance(100 + 499.9)
    d = cache.get("b.example")
    fetch.fail(lookup_failed())
    assert success_result_of(d) == "known"
    clock.advance(0.1)
    d = cache.get("b.example")
    fetch.fail(lookup_failed())
    labelled_failure(d, "discovery-failure")


def test_stale_follows_the_clamped_ttl(cache: DiscoveryCache, fetch: Fetcher, clock: Clock) -> None:
    cache.get("b.example")
    fetch.answer("known", 1)  # kept for min_ttl = 10, then stale for 500
    clock.advance(509)
    d = cache.get("b.example")
    fetch.fail(lookup_failed())
    assert success_result_of(d) == "known"
    clock.advance(1)
    d = cache.get("b.example")
    fetch.fail(lookup_failed())
    labelled_failure(d, "discovery-failure")


def test_a_fresh_answer_replaces_the_stale_one(cache: DiscoveryCache, fetch: Fetcher, clock: Clock) -> None:
    cache.get("b.example")
    fetch.answer("old", 100)
    clock.advance(100)
    d = cache.get("b.example")
    fetch.answer("new", 200)
    assert success_result_of(d) == "new"
    clock.advance(200 + 499)
    d = cache.get("b.example")
    fetch.fail(lookup_failed())
    assert success_result_of(d) == "new"


def test_a_negative_answer_is_not_covered_by_a_stale_one(
    cache: DiscoveryCache, fetch: Fetcher, clock: Clock
) -> None:
    # the domain stopped federating: DNS answered, nothing is unknown
    cache.get("b.example")
    fetch.answer("old", 100)
    clock.advance(100)
    d = cache.get("b.example")
    fetch.fail(invalid_domain())
    labelled_failure(d, "invalid-domain")
    d = cache.get("b.example")
    labelled_failure(d, "invalid-domain")
    assert len(fetch.calls) == 2


def test_concurrent_lookups_are_merged(cache: DiscoveryCache, fetch: Fetcher) -> None:
    waiting = [cache.get("b.example") for _ in range(5)]
    assert fetch.calls == ["b.example"]
    for d in waiting:
        assert_no_result(d)
    fetch.answer("answer", 100)
    assert [success_result_of(d) for d in waiting] == ["answer"] * 5
    assert cached(cache) == "answer"
    assert fetch.calls == ["b.example"]


def test_concurrent_failures_are_merged(cache: DiscoveryCache, fetch: Fetcher) -> None:
    waiting = [cache.get("b.example") for _ in range(3)]
    fetch.fail(lookup_failed())
    for d in waiting:
        labelled_failure(d, "discovery-failure")
    assert fetch.calls == ["b.example"]


def test_concurrent_lookups_after_expiry_are_merged(cache: DiscoveryCache, fetch: Fetcher, clock: Clock) -> None:
    cache.get("b.example")
    fetch.answer("old", 100)
    clock.advance(100)
    waiting = [cache.get("b.example") for _ in range(3)]
    assert len(fetch.calls) == 2
    fetch.fail(lookup_failed())
    assert [success_result_of(d) for d in waiting] == ["old"] * 3


def test_one_waiter_giving_up_does_not_disturb_the_others(cache: DiscoveryCache, fetch: Fetcher) -> None:
    first, second = cache.get("b.example"), cache.get("b.example")
    first.cancel()
    failure_result_of(first, defer.CancelledError)
    fetch.answer("answer", 100)
    assert success_result_of(second) == "answer"


def test_hit_and_miss_counters(cache: DiscoveryCache, fetch: Fetcher, clock: Clock) -> None:
    assert (cache.hits, cache.misses) == (0, 0)
    cache.get("b.example")
    cache.get("b.example")  # merged, but not answered from the cache
    assert (cache.hits, cache.misses) == (0, 2)
    fetch.answer("answer", 100)
    cached(cache)
    cached(cache)
    assert (cache.hits, cache.misses) == (2, 2)
    cache.get("c.example")
    fetch.fail(invalid_domain())
    labelled_failure(cache.get("c.example"), "invalid-domain")  # a negative hit
    assert (cache.hits, cache.misses) == (3, 3)
    clock.advance(100)
    cache.get("b.example")
    assert (cache.hits, cache.misses) == (3, 4)


def test_default_settings() -> None:
    assert CacheSettings() == CacheSettings(min_ttl=60, max_ttl=86400, negative_ttl=60, stale_ttl=86400,
                                            failure_ttl=0)


def test_the_cache_keeps_at_most_max_entries_least_recently_used_first():
    from twisted.internet import defer as _defer
    from twisted.internet.task import Clock as _Clock

    from fedserver.discovery_cache import CacheSettings as _Settings
    from fedserver.discovery_cache import DiscoveryCache as _Cache

    fetched = []

    def fetch(name):
        fetched.append(name)
        return _defer.succeed((name.upper(), 3600))

    cache = _Cache(_Clock(), fetch, _Settings(max_entries=2))
    for name in ("a", "b", "a", "c"):  # "b" is then the least recently used
        cache.get(name)
    assert len(cache) == 2
    cache.get("a")
    cache.get("b")
    assert fetched == ["a", "b", "c", "b"]


def test_while_dns_fails_the_stale_answer_is_served_without_asking_each_time():
    from twisted.internet import defer as _defer
    from twisted.internet.task import Clock as _Clock

    from fedserver.discovery_cache import CacheSettings as _Settings
    from fedserver.discovery_cache import DiscoveryCache as _Cache
    from fedserver.errors import DiscoveryFailure as _Failure

    clock = _Clock()
    asked = []
    answers = [_defer.succeed(("targets", 10))]

    def fetch(name):
        asked.append(clock.seconds())
        return answers.pop(0) if answers else _defer.fail(_Failure("DNS is down"))

    cache = _Cache(clock, fetch, _Settings(min_ttl=10, negative_ttl=30))
    cache.get("b.example")
    clock.advance(11)  # expired: the refresh fails, the stale answer serves
    results = []
    cache.get("b.example").addCallback(results.append)
    clock.advance(10)
    cache.get("b.example").addCallback(results.append)  # within negative_ttl: not asked
    clock.advance(25)
    cache.get("b.example").addCallback(results.append)  # asked again, still stale
    assert results == ["targets", "targets", "targets"]
    assert asked == [0, 11, 46]
