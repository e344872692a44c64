"""
Other servers' signing keys: fetched, verified, kept and looked up.

L{Keyring.get_verify_keys} answers which of a server's keys are known and
valid at a time.  What it does not know it fetches, once for any number of
concurrent callers:

 1. through each notary of C{trusted_key_servers} in turn
    (C{POST /_matrix/key/v2/query}): every entry must be signed by the
    notary, with its own keys fetched directly from it, and self-signed by
    the server;
 2. else directly from the server (C{GET /_matrix/key/v2/server}), found
    through the configured discovery and sent with the L{FederationClient}:
    the answer must be self-signed.

An answer is refused when its C{server_name} is not the server asked about,
when it is not signed by one of the C{verify_keys} it lists, or when a
signature by one of them does not verify.  A key is valid until the
answer's C{valid_until_ts}, but never more than 7 days after it was fetched
(the specification's cap); an old key (C{old_verify_keys}) until its
C{expired_ts}.  Keys live in memory and, when a store is given, in the
C{matrix_server_keys} table (schema owner C{matrix-keys}), so they survive a
restart.  Each source gets C{timeout} seconds; a server whose keys were
fetched (or failed to be) less than C{refetch_interval} seconds ago is not
asked again, so a flood of requests naming unknown keys cannot make us flood
it.
"""

from __future__ import annotations

import json
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import attrs
from signedjson.sign import SignatureVerifyException, verify_signed_json
from signedjson.types import VerifyKey
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from fedserver.client import NotDelivered, bounded
from fedserver.errors import FederationError
from fedserver.values import OutboundRequest, Response
from fedserver_matrix.keys import ALGORITHM, KeyFormatError, encode_verify_key, verify_key_from_base64

log = Logger(namespace="fedserver.matrix.keyring")

#: the schema owner in L{fedserver.storage.Store}
SCHEMA_OWNER = "matrix-keys"
SCHEMA = [
    """
    CREATE TABLE matrix_server_keys (
        server_name TEXT NOT NULL,
        key_id TEXT NOT NULL,
        verify_key TEXT NOT NULL,
        valid_until_ts BIGINT NOT NULL,
        expired_ts BIGINT,
        fetched_ts BIGINT NOT NULL,
        from_server TEXT NOT NULL,
        response_json TEXT NOT NULL,
        PRIMARY KEY (server_name, key_id)
    )
    """,
]

#: the longest a fetched key is trusted, whatever its C{valid_until_ts}
MAX_VALIDITY_MS = 7 * 24 * 3600 * 1000

SERVER_KEYS_PATH = "/_matrix/key/v2/server"
QUERY_PATH = "/_matrix/key/v2/query"


class KeyLookupError(Exception):
    """A server's keys could not be had; the message says from where and why."""


class KeyResponseError(Exception):
    """An answer about keys that is refused."""


@attrs.frozen(eq=False)
class ServerKey:
    """
    One key of a server, as fetched.

    @ivar valid_until_ts: until when it may be used (ms), already capped.
    @ivar expired_ts: for an old key, when it stopped being used; else C{None}.
    @ivar from_server: the server that answered (the server itself or a notary).
    @ivar response: the verified answer the key came from.
    """

    server_name: str
    key_id: str
    verify_key: VerifyKey
    valid_until_ts: int
    expired_ts: Optional[int]
    fetched_ts: int
    from_server: str
    response: Mapping[str, Any] = attrs.field(repr=False)


def _int(value: Any) -> Optional[int]:
    """C{value} if it is an integer (not a boolean), else C{None}."""
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def keys_from_response(
    server_name: str, response: Any, fetched_ts: int, from_server: Optional[str] = None
) -> List[ServerKey]:
    """
    The keys of a server keys object (a C{/_matrix/key/v2/server} answer,
    or an entry of a notary's), checked: it must be about C{server_name},
    well formed, and self-signed (every signature by one of its
    C{verify_keys} verifies, and there is one).  Keys of algorithms other
    than ed25519 are left out.

    @raise KeyResponseError: saying what is wrong.
    """
    source = from_server or server_name
    if not isinstance(response, dict):
        raise KeyResponseError(f"the keys from {source} are not a JSON object")
    named = response.get("server_name")
    if named != server_name:
        raise KeyResponseError(f"{source} answered with the keys of {str(named)[:100]!r}, not of {server_name}")
    valid_until_ts = _int(response.get("valid_until_ts"))
    if valid_until_ts is None:
        raise KeyResponseError(f"the keys of {server_name} from {source} have no integer valid_until_ts")
    where = f"of {server_name} (from {source})"
    current = {key_id: key for key_id, (key, _) in _key_table(response, "verify_keys", where).items()}
    old = _key_table(response, "old_verify_keys", where)
    signatures = response.get("signatures")
    own = signatures.get(server_name) if isinstance(signatures, dict) else None
    if not isinstance(own, dict):
        raise KeyResponseError(f"the keys {where} are not signed by {server_name}")
    verified = False
    for key_id in own:
        key = current.get(key_id)
        if key is None:
            continue
        try:
            verify_signed_json(response, server_name, key)
        except SignatureVerifyException:
            raise KeyResponseError(f"the signature by {key_id} of the keys {where} does not verify") from None
        verified = True
    if not verified:
        raise KeyResponseError(f"the keys {where} are not signed by any of the verify_keys they list")
    cap = fetched_ts + MAX_VALIDITY_MS
    keys = [
        ServerKey(server_name, key_id, key, min(valid_until_ts, cap), None, fetched_ts, source, response)
        for key_id, key in current.items()
    ]
    for key_id, (key, expired) in old.items():
        if key_id not in current and expired is not None:
            keys.append(ServerKey(server_name, key_id, key, min(expired, cap), expired, fetched_ts, source, response))
    return keys


def _key_table(response: Mapping[str, Any], field: str, where: str) -> Dict[str, Tuple[VerifyKey, Optional[int]]]:
    """C{verify_keys} or C{old_verify_keys}: key id -> (key, expired_ts)."""
    old = field == "old_verify_keys"
    table = response.get(field)
    if table is None and old:
        return {}
    if not isinstance(table, dict):
        raise KeyResponseError(f"the keys {where} have no {field} object")
    keys: Dict[str, Tuple[VerifyKey, Optional[int]]] = {}
    for key_id, entry in table.items():
        if not key_id.startswith(ALGORITHM + ":"):
            continue  # an algorithm we cannot use
        if not isinstance(entry, dict) or not isinstance(entry.get("key"), str):
            raise KeyResponseError(f"{field} {key_id[:100]!r} {where} has no key")
        expired = _int(entry.get("expired_ts"))
        if old and expired is None:
            raise KeyResponseError(f"old_verify_keys {key_id[:100]!r} {where} has no integer expired_ts")
        try:
            keys[key_id] = (verify_key_from_base64(key_id, entry["key"]), expired)
        except KeyFormatError as e:
            raise KeyResponseError(f"{field} {where}: {e}") from None
    return keys


class _Shared:
    """One Deferred's result, handed to any number of waiters; cancelling a waiter leaves the others alone."""

    def __init__(self, d: Deferred[Any]) -> None:
        self._waiters: List[Deferred[Any]] = []
        self.done = False
        self._result: Any = None
        d.addBoth(self._fire)

    def wait(self) -> Deferred[Any]:
        if self.done:
            return defer.fail(self._result) if isinstance(self._result, Failure) else defer.succeed(self._result)
        waiter: Deferred[Any] = Deferred()
        self._waiters.append(waiter)
        return waiter

    def _fire(self, result: Any) -> None:
        self.done = True
        self._result = result
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if isinstance(result, Failure):
                waiter.errback(result)
            else:
                waiter.callback(result)


class Keyring:
    """
    @param clock: gives the time and bounds the fetches.
    @param discovery: an L{fedserver.interfaces.IDiscovery} for server names.
    @param client: sends requests to targets (C{send(target, request)}, as
        L{fedserver.client.FederationClient}).
    @param prepare: C{prepare(request, target)} -> Deferred of the request
        to send (the authenticator's C{prepare_outbound}, which signs it);
        by default requests go unsigned.
    @param store: a running L{fedserver.storage.Store} with L{SCHEMA}
        registered under L{SCHEMA_OWNER}, or C{None} to keep keys in memory
        only.
    @param trusted_key_servers: notaries to ask first, in order.
    @param timeout: seconds each source (a notary, the server) may take.
    @param refetch_interval: seconds before a server is asked again.
    """

    def __init__(
        self,
        *,
        clock: Any,
        discovery: Any,
        client: Any,
        prepare: Optional[Callable[[OutboundRequest, Any], Deferred[OutboundRequest]]] = None,
        store: Any = None,
        trusted_key_servers: Sequence[str] = (),
        timeout: float = 30.0,
        refetch_interval: float = 60.0,
    ) -> None:
        self._clock = clock
        self._discovery = discovery
        self._client = client
        self._prepare = prepare
        self._store = store
        self.trusted_key_servers = list(trusted_key_servers)
        self.timeout = timeout
        self.refetch_interval = refetch_interval
        self._keys: Dict[str, Dict[str, ServerKey]] = {}
        self._loads: Dict[str, _Shared] = {}
        self._fetches: Dict[str, _Shared] = {}
        self._last_fetch: Dict[str, float] = {}
        self._last_error: Dict[str, str] = {}

    def now_ms(self) -> int:
        """The clock's time in milliseconds."""
        return int(self._clock.seconds() * 1000)

    # lookups

    def get_verify_keys(
        self, server_name: str, key_ids: Iterable[str], valid_at: Optional[int] = None
    ) -> Deferred[Dict[str, VerifyKey]]:
        """
        Those of C{key_ids} of C{server_name} that are known and valid at
        C{valid_at} (ms; default now), fetching the server's keys if one is
        missing.  Fires with C{{key_id: verify_key}}, possibly empty (the
        server has no such valid key); fails with L{KeyLookupError} when
        none is known and the keys could not be fetched.
        """
        return Deferred.fromCoroutine(self._get(server_name, list(key_ids), valid_at, notaries=True))

    def known_keys(self, server_name: str) -> Dict[str, ServerKey]:
        """What is in memory about C{server_name} (a copy)."""
        return dict(self._keys.get(server_name, {}))

    async def _get(
        self, server_name: str, key_ids: List[str], valid_at: Optional[int], *, notaries: bool
    ) -> Dict[str, VerifyKey]:
        when = self.now_ms() if valid_at is None else valid_at
        await self._load(server_name)
        usable = self._usable(server_name, key_ids, when)
        if len(usable) == len(set(key_ids)):
            return usable
        await self._refresh(server_name, key_ids, notaries)
        usable = self._usable(server_name, key_ids, when)
        if not usable and server_name in self._last_error:
            raise KeyLookupError(f"cannot get the keys of {server_name}: {self._last_error[server_name]}")
        return usable

    def keys_for_notary(
        self, server_name: str, key_ids: Iterable[str], valid_at: int
    ) -> Deferred[Dict[str, ServerKey]]:
        """
        For our notary: every key known of C{server_name} (stored ones
        included), after fetching the server's keys if one of C{key_ids} is
        not known and valid at C{valid_at} (ms) -- with no key ids, if no
        current key of the server is.  What cannot be fetched is not an error:
        the keys known before (possibly expired) are the answer, possibly
        none.
        """
        return Deferred.fromCoroutine(self._for_notary(server_name, list(key_ids), valid_at))

    async def _for_notary(self, server_name: str, key_ids: List[str], valid_at: int) -> Dict[str, ServerKey]:
        await self._load(server_name)
        if key_ids:
            enough = len(self._usable(server_name, key_ids, valid_at)) == len(set(key_ids))
        else:
            # a key the server no longer lists stays known: one current key valid then will do
            current = [k.key_id for k in self._keys.get(server_name, {}).values() if k.expired_ts is None]
            enough = bool(self._usable(server_name, current, valid_at))
        if not enough:
            await self._refresh(server_name, key_ids, notaries=True)
        return self.known_keys(server_name)

    async def _refresh(self, server_name: str, key_ids: List[str], notaries: bool) -> None:
        """Fetch the keys of C{server_name}, joining a fetch under way, unless it was asked too recently."""
        fetch = self._fetches.get(server_name)
        last = self._last_fetch.get(server_name)
        if fetch is None and (last is None or self._clock.seconds() - last >= self.refetch_interval):
            fetch = _Shared(Deferred.fromCoroutine(self._fetch(server_name, key_ids, notaries)))
            if not fetch.done:
                self._fetches[server_name] = fetch
        if fetch is not None:
            await fetch.wait()

    def keys_in_memory(self, server_name: str, key_ids: Sequence[str]) -> Optional[Dict[str, VerifyKey]]:
        """
        Every one of C{key_ids} if all are in memory and valid now (the
        hot path needs no lookup then), else C{None}.
        """
        usable = self._usable(server_name, key_ids, self.now_ms())
        return usable if len(usable) == len(key_ids) else None

    def _usable(self, server_name: str, key_ids: Iterable[str], when: int) -> Dict[str, VerifyKey]:
        known = self._keys.get(server_name, {})
        usable = {}
        for key_id in key_ids:
            key = known.get(key_id)
            if key is not None and key.valid_until_ts >= when:
                usable[key_id] = key.verify_key
        return usable

    def _remember(self, keys: Iterable[ServerKey]) -> List[ServerKey]:
        """Keep what is newer than what we have; return what was kept."""
        kept = []
        for key in keys:
            table = self._keys.setdefault(key.server_name, {})
            current = table.get(key.key_id)
            if current is None or key.valid_until_ts >= current.valid_until_ts:
                table[key.key_id] = key
                kept.append(key)
        return kept

    # fetching

    async def _fetch(self, server_name: str, key_ids: List[str], notaries: bool) -> None:
        errors: List[str] = []
        answered = False
        # a notary's own keys come from the notary itself: asking another
        # notary for them could wait on a fetch that waits on this one
        notaries = notaries and server_name not in self.trusted_key_servers
        try:
            sources: List[Optional[str]] = list(self.trusted_key_servers) if notaries else []
            sources.append(None)
            for notary in sources:
                what = f"notary {notary}" if notary else f"{server_name} itself"
                try:
                    work = (self._from_notary(notary, server_name, key_ids) if notary
                            else self._from_server(server_name))
                    keys = await bounded(Deferred.fromCoroutine(work), self.timeout, self._clock)
                except defer.TimeoutError:
                    errors.append(f"{what} did not answer within {self.timeout:g} s")
                    continue
                except (KeyResponseError, KeyLookupError) as e:
                    errors.append(f"{what}: {e}")
                    continue
                except FederationError as e:
                    errors.append(f"{what}: {e.label}: {e.message}")
                    continue
                except Exception:
                    log.failure("asking {what} for the keys of {server} failed", what=what, server=server_name)
                    errors.append(f"{what}: an internal error (logged)")
                    continue
                answered = True
                self._last_error.pop(server_name, None)
                await self._save(self._remember(keys))
                if not key_ids or any(k.key_id in key_ids for k in keys):
                    return
                errors.append(f"{what} does not list {', '.join(key_ids)}")
            if not answered:
                self._last_error[server_name] = "; ".join(errors)
            log.warn("cannot get the keys {key_ids} of {server}: {errors}",
                     key_ids=", ".join(key_ids), server=server_name, errors="; ".join(errors))
        finally:
            self._last_fetch[server_name] = self._clock.seconds()
            self._fetches.pop(server_name, None)

    async def _send(self, request: OutboundRequest) -> Response:
        """Discover C{request.destination} and send to the first target that takes it."""
        targets = await self._discovery.discover(request.destination)
        last: Optional[FederationError] = None
        for target in targets:
            prepared = request if self._prepare is None else await self._prepare(request, target)
            try:
                response: Response = await self._client.send(target, prepared)
                return response
            except NotDelivered as e:
                last = e
        if last is None:
            raise KeyResponseError(f"discovery found no target for {request.destination}")
        raise last

    async def _json(self, request: OutboundRequest) -> Any:
        response = await self._send(request)
        if response.code != 200:
            raise KeyResponseError(f"{request.method} {request.path} answered HTTP {response.code}")
        try:
            return json.loads(response.body)
        except (ValueError, RecursionError):
            raise KeyResponseError(f"the answer to {request.method} {request.path} is not JSON") from None

    async def _from_server(self, server_name: str) -> List[ServerKey]:
        request = OutboundRequest(destination=server_name, method="GET", path=SERVER_KEYS_PATH, headers=())
        answer = await self._json(request)
        return keys_from_response(server_name, answer, self.now_ms())

    async def _from_notary(self, notary: str, server_name: str, key_ids: List[str]) -> List[ServerKey]:
        now = self.now_ms()
        criteria = {key_id: {"minimum_valid_until_ts": now} for key_id in key_ids}
        body = json.dumps({"server_keys": {server_name: criteria}}).encode()
        request = OutboundRequest(destination=notary, method="POST", path=QUERY_PATH,
                                  headers=[("Content-Type", "application/json")], body=body)
        answer = await self._json(request)
        entries = answer.get("server_keys") if isinstance(answer, dict) else None
        if not isinstance(entries, list):
            raise KeyResponseError("the answer has no server_keys list")
        keys: List[ServerKey] = []
        for entry in entries:
            if not isinstance(entry, dict) or entry.get("server_name") != server_name:
                continue  # about another server: not asked for, not used
            await self._check_notary_signature(notary, server_name, entry)
            keys += keys_from_response(server_name, entry, now, notary)
        if not keys:
            raise KeyResponseError(f"it has no keys for {server_name}")
        return keys

    async def _check_notary_signature(self, notary: str, server_name: str, entry: Mapping[str, Any]) -> None:
        signatures = entry.get("signatures")
        by_notary = signatures.get(notary) if isinstance(signatures, dict) else None
        if not isinstance(by_notary, dict) or not by_notary:
            raise KeyResponseError(f"its entry for {server_name} is not signed by {notary}")
        notary_keys = await self._get(notary, list(by_notary), None, notaries=False)
        if not notary_keys:
            raise KeyResponseError(
                f"its entry for {server_name} is signed by {', '.join(sorted(by_notary))}, "
                f"none of which is a valid key of {notary}"
            )
        for key_id, key in notary_keys.items():
            try:
                verify_signed_json(dict(entry), notary, key)
            except SignatureVerifyException:
                raise KeyResponseError(
                    f"its signature by {key_id} on the keys of {server_name} does not verify"
                ) from None

    # storage

    async def _load(self, server_name: str) -> None:
        if self._store is None or server_name in self._keys:
            return
        load = self._loads.get(server_name)
        if load is None:
            load = _Shared(self._store.run_query(
                "SELECT key_id, verify_key, valid_until_ts, expired_ts, fetched_ts, from_server, response_json "
                "FROM matrix_server_keys WHERE server_name = ?", (server_name,)
            ))
            self._loads[server_name] = load
        try:
            rows = await load.wait()
        except Exception as e:
            log.error("cannot read the stored keys of {server}: {error}", server=server_name, error=e)
            self._loads.pop(server_name, None)
            return
        if server_name in self._keys:
            return  # another caller loaded them
        keys = []
        for key_id, key_base64, valid_until_ts, expired_ts, fetched_ts, from_server, response in rows:
            try:
                verify_key = verify_key_from_base64(key_id, key_base64)
                keys.append(ServerKey(server_name, key_id, verify_key, valid_until_ts, expired_ts,
                                      fetched_ts, from_server, json.loads(response)))
            except (KeyFormatError, ValueError) as e:
                log.error("the stored key {key_id} of {server} is unusable: {error}",
                          key_id=key_id, server=server_name, error=e)
        self._keys.setdefault(server_name, {})
        self._remember(keys)
        self._loads.pop(server_name, None)

    async def _save(self, keys: List[ServerKey]) -> None:
        if self._store is None or not keys:
            return
        rows = [
            (k.server_name, k.key_id, encode_verify_key(k.verify_key), k.valid_until_ts, k.expired_ts,
             k.fetched_ts, k.from_server, json.dumps(k.response))
            for k in keys
        ]
        try:
            await self._store.run_interaction(_save_rows, rows)
        except Exception as e:
            # the keys are in memory and serve; they will be fetched again after a restart
            log.error("cannot store the keys of {server}: {error}", server=keys[0].server_name, error=e)


def _save_rows(cursor: Any, rows: List[Tuple[Any, ...]]) -> None:
    cursor.executemany(
        "INSERT INTO matrix_server_keys (server_name, key_id, verify_key, valid_until_ts, expired_ts, "
        "fetched_ts, from_server, response_json) VALUES (?, ?, ?, ?, ?, ?, ?, ?) "
        "ON CONFLICT (server_name, key_id) DO UPDATE SET verify_key = excluded.verify_key, "
        "valid_until_ts = excluded.valid_until_ts, expired_ts = excluded.expired_ts, "
        "fetched_ts = excluded.fetched_ts, from_server = excluded.from_server, "
        "response_json = excluded.response_json "
        "WHERE excluded.valid_until_ts >= matrix_server_keys.valid_until_ts",
        rows,
    )
