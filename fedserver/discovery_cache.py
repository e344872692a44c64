"""
A cache for discovery answers, shared by the DNS-based discovery plugins.

 - A positive answer is kept for its TTL, bounded by C{min_ttl} and
   C{max_ttl}.
 - A negative answer (C{invalid-domain}: the domain has no federation
   record) is kept for C{negative_ttl}.
 - When a lookup fails (timeout, SERVFAIL), the last positive answer is
   served, stale, for up to C{stale_ttl} after it expired, and the fact is
   logged: a known peer stays reachable while DNS is down.  DNS is asked
   again only after C{negative_ttl}, so calls meanwhile do not each wait
   for a lookup that times out.
 - A failed lookup with no answer to serve stale is passed on, and kept
   for C{failure_ttl} when that is set (by default it is not kept).
 - Concurrent lookups of one name are merged into one.

L{cache_settings} reads these bounds from a discovery plugin's options.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Callable, Dict, Generic, List, Optional, Tuple, TypeVar

import attrs
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from fedserver.config import Options
from fedserver.errors import DiscoveryFailure

log = Logger(namespace="fedserver.discovery")

T = TypeVar("T")


@attrs.frozen
class CacheSettings:
    min_ttl: float = 60.0
    max_ttl: float = 86400.0
    negative_ttl: float = 60.0
    stale_ttl: float = 86400.0
    #: names kept at most; the least recently used goes first (peers choose
    #: the origin domains we look up, so the cache must not grow unbounded)
    max_entries: int = 10000
    #: how long a failed lookup (not C{invalid-domain}) is kept when there is
    #: no answer to serve stale; 0: not kept, the next call asks again
    failure_ttl: float = 0.0


@attrs.define
class _Entry(Generic[T]):
    value: Optional[T]
    error: Optional[DiscoveryFailure]
    expires: float
    # the last good value, kept for serving stale
    good: Optional[T] = None
    good_until: float = 0.0
    #: being served stale since this time (the last look-up failed)
    stale_since: Optional[float] = None


class DiscoveryCache(Generic[T]):
    """
    @param fetch: looks a name up: fires with C{(value, ttl)}, or fails with
        a L{DiscoveryFailure} whose label is C{invalid-domain} (a negative
        answer, cached) or anything else (a failed lookup, not cached).
    """

    def __init__(self, clock: Any, fetch: Callable[[str], Deferred[Tuple[T, float]]],
                 settings: CacheSettings = CacheSettings()) -> None:
        self._clock = clock
        self._fetch = fetch
        self.settings = settings
        self._entries: OrderedDict[str, _Entry[T]] = OrderedDict()
        self._pending: Dict[str, List[Deferred[T]]] = {}
        self.hits = 0
        self.misses = 0
        #: failed look-ups answered with an expired answer
        self.stale = 0

    def get(self, name: str) -> Deferred[T]:
        """The value for C{name}, from the cache or a lookup."""
        now = self._clock.seconds()
        entry = self._entries.get(name)
        if entry is not None and entry.expires > now:
            self._entries.move_to_end(name)
            self.hits += 1
            if entry.error is not None:
                return defer.fail(entry.error)
            return defer.succeed(entry.value)  # type: ignore[arg-type]
        self.misses += 1
        waiting: Deferred[T] = Deferred()
        if name in self._pending:
            self._pending[name].append(waiting)
            return waiting
        self._pending[name] = [waiting]
        d = defer.maybeDeferred(self._fetch, name)
        d.addCallbacks(self._fetched, self._failed, callbackArgs=(name,), errbackArgs=(name,))
        return waiting

    def _store(self, name: str, entry: _Entry[T]) -> None:
        self._entries[name] = entry
        self._entries.move_to_end(name)
        while len(self._entries) > self.settings.max_entries:
            self._entries.popitem(last=False)

    def __len__(self) -> int:
        return len(self._entries)

    def describe(self, name: str) -> Optional[Dict[str, Any]]:
        """
        What the cache holds for C{name} (for status pages), without
        touching it: C{None} when nothing, else C{state} (C{fresh},
        C{stale}: served after a failed look-up, C{negative}: the name does
        not federate, C{failed}: a failed look-up kept, C{expired}: asked
        again on next use), C{expires_in} seconds and, for C{negative} and
        C{failed}, the C{error}.
        """
        entry = self._entries.get(name)
        if entry is None:
            return None
        now = self._clock.seconds()
        if entry.expires <= now:
            state = "expired"
        elif entry.error is not None:
            state = "negative" if entry.error.label == "invalid-domain" else "failed"
        elif entry.stale_since is not None:
            state = "stale"
        else:
            state = "fresh"
        described: Dict[str, Any] = {"state": state, "expires_in": round(max(entry.expires - now, 0.0), 3)}
        if entry.error is not None:
            described["error"] = {"label": entry.error.label, "message": entry.error.message}
        if entry.stale_since is not None:
            described["stale_for"] = round(now - entry.stale_since, 3)
        return described

    def _settle(self, name: str, outcome: Any) -> None:
        for d in self._pending.pop(name, []):
            if isinstance(outcome, Failure):
                d.errback(outcome)
            else:
                d.callback(outcome)

    def _fetched(self, result: Tuple[T, float], name: str) -> None:
        value, ttl = result
        s = self.settings
        now = self._clock.seconds()
        expires = now + min(max(ttl, s.min_ttl), s.max_ttl)
        self._store(name, _Entry(value, None, expires, value, expires + s.stale_ttl))
        self._settle(name, value)

    def _failed(self, failure: Failure, name: str) -> None:
        now = self._clock.seconds()
        previous = self._entries.get(name)
        error = failure.value
        if isinstance(error, DiscoveryFailure) and error.label == "invalid-domain":
            self._store(name, _Entry(None, error, now + self.settings.negative_ttl))
            self._settle(name, failure)
            return
        if previous is not None and previous.good is not None and previous.good_until > now:
            log.warn(
                "discovery of {name} failed ({error}); using the answer that expired {ago:.0f} s ago",
                name=name, error=getattr(error, "message", str(error)),
                ago=now - (previous.good_until - self.settings.stale_ttl),
            )
            # serve it without asking DNS again for a while: every call
            # would otherwise wait for a lookup that is likely to fail too
            previous.expires = min(now + self.settings.negative_ttl, previous.good_until)
            if previous.stale_since is None:
                previous.stale_since = now
            self.stale += 1
            self._settle(name, previous.good)
            return
        if self.settings.failure_ttl > 0 and isinstance(error, DiscoveryFailure):
            self._store(name, _Entry(None, error, now + self.settings.failure_ttl))
        self._settle(name, failure)


def cache_settings(options: Options) -> CacheSettings:
    """
    The cache options of a discovery plugin's table (seconds): C{min_ttl},
    C{max_ttl}, C{negative_ttl}, C{stale_ttl} and C{cache_entries}.
    """
    default = CacheSettings()
    values: Dict[str, float] = {
        key: options.get_number(key, getattr(default, key), minimum=0, maximum=30 * 86400)
        for key in ("min_ttl", "max_ttl", "negative_ttl", "stale_ttl")
    }
    if values["min_ttl"] > values["max_ttl"]:
        raise options.error("min_ttl", f"must not exceed max_ttl ({values['max_ttl']})")
    max_entries = options.get_int("cache_entries", default.max_entries, minimum=1, maximum=10_000_000)
    return CacheSettings(**values, max_entries=max_entries)
