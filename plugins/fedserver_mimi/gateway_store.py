"""
The MIMI gateway's data, kept with L{fedserver.storage} under the schema
C{mimi-gateway}.

- applications, each with the identity provider it uses and the SHA-256 of
  its bearer token;
- clients of an application, with their handle (unique per application) and
  tags;
- key queues, one per client, protocol version, cipher suite and label,
  holding KeyPackages (by their KeyPackageRef) and an optional final key;
- claims: which receiver (domain and client id) holds which KeyPackage, until
  a commit's Welcome consumes it or the claim lifetime ends, and who was
  given a queue's final key (which is never consumed; each claim of it is
  good for one Welcome);
- groups with their current epoch and group info, the commit of every epoch,
  the proposals of the current epoch, and Welcome messages per client;
- KeyPackages this gateway's applications claimed from other gateways, so
  that a Welcome of the application that claimed them is sent to the
  gateway that issued them, and the client handles other gateways listed.

Every method that writes runs one transaction (through
L{fedserver.storage.Store.run_interaction}), or, for claims and
registrations, one savepoint of a transaction shared with those that arrive
together (L{fedserver.storage.Store.run_grouped}: group commit, each still
applied alone and in order); a claim and a commit each read
and write within that one transaction, and a commit moves the epoch with
C{UPDATE ... WHERE epoch = ?}, so two concurrent requests can never take one
KeyPackage or both commit one epoch.

On SQLite transactions never interleave.  On PostgreSQL, where several
connections and fedserver processes share the database, the reads that a
write depends on take row locks (L{fedserver.storage.Dialect}): a claim
serializes the claims of one receiver on one queue (an advisory lock) and
picks its KeyPackage with C{FOR UPDATE SKIP LOCKED}, so concurrent claims
for different receivers take different KeyPackages without waiting for each
other (but another domain's claims of one queue, which are counted against
its allowance, take a second advisory lock for that domain and queue, so
that they run one at a time); a proposal and a commit lock their group's row; consuming a
KeyPackage for a Welcome locks its row.  A check-then-insert that loses to a
concurrent insert (a client handle, a queue, a group) is run again by the
store and then answers as on SQLite (C{409}).
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import attrs
from twisted.internet.defer import Deferred

from fedserver.jsonapi import APIError, new_id
from fedserver.storage import SQLITE, Dialect, Store

SCHEMA_OWNER = "mimi-gateway"

SCHEMA_STEPS = [
    """
    CREATE TABLE mimi_apps (
        id TEXT PRIMARY KEY,
        name TEXT NOT NULL,
        identity_provider TEXT NOT NULL,
        token_hash TEXT NOT NULL UNIQUE,
        federate INTEGER NOT NULL,
        declared INTEGER NOT NULL,
        created REAL NOT NULL
    );
    CREATE TABLE mimi_clients (
        id TEXT PRIMARY KEY,
        app_id TEXT NOT NULL REFERENCES mimi_apps (id),
        handle BLOB NOT NULL,
        created REAL NOT NULL,
        UNIQUE (app_id, handle)
    );
    CREATE TABLE mimi_client_tags (
        client_id TEXT NOT NULL REFERENCES mimi_clients (id) ON DELETE CASCADE,
        tag TEXT NOT NULL,
        PRIMARY KEY (client_id, tag)
    );
    CREATE INDEX mimi_client_tags_by_tag ON mimi_client_tags (tag, client_id);
    CREATE TABLE mimi_queues (
        id TEXT PRIMARY KEY,
        client_id TEXT NOT NULL REFERENCES mimi_clients (id) ON DELETE CASCADE,
        protocol_version INTEGER NOT NULL,
        cipher_suite INTEGER NOT NULL,
        app_label TEXT NOT NULL,
        final_key BLOB,
        final_ref BLOB,
        final_not_before INTEGER,
        final_not_after INTEGER,
        UNIQUE (client_id, protocol_version, cipher_suite, app_label)
    );
    CREATE INDEX mimi_queues_by_final_ref ON mimi_queues (final_ref);
    -- a receiver's claim of a queue's final key: good for one Welcome (the row is then deleted), released
    -- after the claim lifetime
    CREATE TABLE mimi_final_claims (
        ref BLOB NOT NULL,
        claimed_by TEXT NOT NULL,
        queue_id TEXT NOT NULL REFERENCES mimi_queues (id) ON DELETE CASCADE,
        claimed_at REAL NOT NULL,
        PRIMARY KEY (ref, claimed_by)
    );
    CREATE INDEX mimi_final_claims_by_queue ON mimi_final_claims (queue_id, claimed_by);
    CREATE TABLE mimi_key_packages (
        ref BLOB PRIMARY KEY,
        queue_id TEXT NOT NULL REFERENCES mimi_queues (id) ON DELETE CASCADE,
        data BLOB NOT NULL,
        not_before INTEGER NOT NULL,
        not_after INTEGER NOT NULL,
        claimed_by TEXT,
        claimed_at REAL,
        consumed INTEGER NOT NULL DEFAULT 0
    );
    CREATE INDEX mimi_key_packages_by_queue ON mimi_key_packages (queue_id, consumed, not_after);
    -- a claim reads the KeyPackage its receiver holds, or the unclaimed one that expires first, straight from
    -- this index (claimed_by IS NULL is an equality here): no scan of the queue, no sort
    CREATE INDEX mimi_key_packages_by_claim ON mimi_key_packages (queue_id, claimed_by, consumed, not_after, ref);
    -- claims past the claim lifetime are released from this index (claimed_at IS NULL for unclaimed ones)
    CREATE INDEX mimi_key_packages_by_claimed_at ON mimi_key_packages (queue_id, consumed, claimed_at);
    -- KeyPackages an application of this gateway (local_app_id) claimed from another gateway (domain), whose
    -- application app_id and client client_id issued them
    CREATE TABLE mimi_remote_claims (
        ref BLOB NOT NULL,
        local_app_id TEXT NOT NULL,
        domain TEXT NOT NULL,
        app_id TEXT NOT NULL,
        client_id TEXT NOT NULL,
        claimed_at REAL NOT NULL,
        PRIMARY KEY (ref, local_app_id)
    );
    -- the client handles other gateways listed (list-clients), to check the KeyPackages claimed from them
    CREATE TABLE mimi_remote_clients (
        domain TEXT NOT NULL,
        app_id TEXT NOT NULL,
        client_id TEXT NOT NULL,
        handle BLOB NOT NULL,
        seen REAL NOT NULL,
        PRIMARY KEY (domain, app_id, client_id)
    );
    CREATE TABLE mimi_groups (
        id TEXT PRIMARY KEY,
        app_id TEXT NOT NULL REFERENCES mimi_apps (id),
        cipher_suite INTEGER NOT NULL,
        epoch INTEGER NOT NULL,
        group_info BLOB NOT NULL,
        ratchet_tree BLOB,
        created REAL NOT NULL
    );
    CREATE TABLE mimi_commits (
        group_id TEXT NOT NULL REFERENCES mimi_groups (id),
        epoch INTEGER NOT NULL,
        commit_message BLOB NOT NULL,
        welcome BLOB,
        created REAL NOT NULL,
        PRIMARY KEY (group_id, epoch)
    );
    CREATE TABLE mimi_proposals (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        group_id TEXT NOT NULL REFERENCES mimi_groups (id),
        epoch INTEGER NOT NULL,
        proposal BLOB NOT NULL,
        created REAL NOT NULL
    );
    CREATE INDEX mimi_proposals_by_epoch ON mimi_proposals (group_id, epoch);
    CREATE TABLE mimi_welcomes (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        client_id TEXT NOT NULL REFERENCES mimi_clients (id) ON DELETE CASCADE,
        origin_domain TEXT NOT NULL,
        group_id TEXT NOT NULL,
        epoch INTEGER NOT NULL,
        welcome BLOB NOT NULL,
        created REAL NOT NULL,
        UNIQUE (client_id, origin_domain, group_id, epoch)
    );
    """,
]

#: at most this many rows in one listing
MAX_LISTING = 1000
#: a listing of MLS messages (Welcome messages, commits, proposals) stops adding rows once their messages hold
#: this many bytes (it always has one row, if there is one); the answer then says C{truncated: true}
MAX_LISTING_BYTES = 8 * 1024 * 1024
#: a claim neither consumed nor given again within this many seconds is released (L{GatewayStore.claim})
DEFAULT_CLAIM_TTL = 7 * 24 * 3600
#: a client keeps at most this many Welcome messages by default
DEFAULT_WELCOMES_PER_CLIENT = 1000


def not_found(what: str) -> APIError:
    """C{404 not-found}."""
    return APIError(404, "not-found", what)


@attrs.frozen
class App:
    """An application as stored."""

    id: str
    name: str
    identity_provider: str
    federate: bool
    declared: bool
    #: declared in the configuration once and no longer: no token opens it, and nobody reaches it
    retired: bool = False

    def to_json(self) -> Dict[str, Any]:
        return {"appId": self.id, "name": self.name, "federate": self.federate, "declared": self.declared}


@attrs.frozen
class Client:
    """A client of an application."""

    id: str
    app_id: str
    handle: bytes
    tags: Tuple[str, ...]


@attrs.frozen
class Queue:
    """A key queue of a client."""

    id: str
    client_id: str
    protocol_version: int
    cipher_suite: int
    app_label: str
    has_final_key: bool


@attrs.frozen
class NewKeyPackage:
    """A KeyPackage checked and ready to be filed."""

    ref: bytes
    data: bytes
    not_before: int
    not_after: int


@attrs.frozen
class Claimed:
    """What a claim gives: the KeyPackage (encoded) and whether it is the final key."""

    key_package: bytes
    is_final_key: bool


@attrs.frozen
class Group:
    """A group as stored."""

    id: str
    app_id: str
    cipher_suite: int
    epoch: int
    group_info: bytes
    ratchet_tree: Optional[bytes]


@attrs.frozen
class WelcomeTarget:
    """A local client a Welcome is for, by the KeyPackage it consumes."""

    ref: bytes
    client_id: str
    claimed_by: Optional[str]


class GatewayStore:
    """
    The gateway's queries.  Every method fires a L{Deferred}; refusals that
    depend on the data (unknown ids, conflicts, stale epochs) fail it with
    L{APIError}.

    @param clock: gives the time (C{seconds()}), for lifetimes and records.
    """

    def __init__(self, store: Store, *, clock: Any) -> None:
        self._store = store
        self._clock = clock

    def _now(self) -> float:
        return float(self._clock.seconds())

    # applications

    def upsert_declared_app(
        self, app_id: str, name: str, identity_provider: str, token_hash: str, federate: bool
    ) -> Deferred[None]:
        """Record an application declared in the configuration, as configured now."""
        return self._store.run_interaction(
            _upsert_app, app_id, name, identity_provider, token_hash, federate, self._now()
        )

    def retire_undeclared_apps(self, declared_ids: Iterable[str]) -> Deferred[List[str]]:
        """
        Take away the token and the federation of every application once
        declared in the configuration but no longer (its data stays, and
        declaring it again restores it); fire with their ids.
        """
        return self._store.run_interaction(_retire_undeclared_apps, frozenset(declared_ids))

    def create_app(self, name: str, identity_provider: str, token_hash: str, federate: bool) -> Deferred[App]:
        """A new application with a fresh id."""
        return self._store.run_interaction(_create_app, name, identity_provider, token_hash, federate, self._now())

    def app_by_token(self, token_hash: str) -> Deferred[Optional[App]]:
        """The application whose token hashes to C{token_hash}."""
        return self._store.run_interaction(_app_where, "token_hash = ?", token_hash)

    def app(self, app_id: str) -> Deferred[Optional[App]]:
        """The application C{app_id}, or C{None}."""
        return self._store.run_interaction(_app_where, "id = ?", app_id)

    def apps(self, *, federating_only: bool = False) -> Deferred[List[App]]:
        """Every application (those that federate)."""
        return self._store.run_interaction(_apps, federating_only)

    # clients

    def register_client(self, app_id: str, handle: bytes, tags: Sequence[str]) -> Deferred[str]:
        """
        A new client; C{409 client-handle-exists} if the handle is taken in
        the application.  Concurrent registrations share their commit
        (L{Store.run_grouped}).
        """
        return self._store.run_grouped(_register_client, app_id, handle, tuple(tags), self._now())

    def patch_client(
        self, app_id: str, client_id: str, handle: Optional[bytes], add: Sequence[str], remove: Sequence[str],
        max_tags: int,
    ) -> Deferred[Client]:
        """Change a client's handle and tags; C{409 client-handle-exists} on a handle conflict."""
        return self._store.run_interaction(
            _patch_client, app_id, client_id, handle, tuple(add), tuple(remove), max_tags
        )

    def client(self, app_id: str, client_id: str) -> Deferred[Client]:
        """The client C{client_id} of C{app_id}; C{404 not-found} otherwise."""
        return self._store.run_interaction(_require_client, app_id, client_id)

    def delete_client(self, app_id: str, client_id: str) -> Deferred[None]:
        """Delete a client with its tags, queues, KeyPackages and Welcome messages."""
        return self._store.run_interaction(_delete_client, app_id, client_id)

    def clients_by_tag(self, app_id: str, tag: str) -> Deferred[List[Client]]:
        """The clients of C{app_id} with C{tag}, at most L{MAX_LISTING}."""
        return self._store.run_interaction(_clients_by_tag, app_id, tag)

    # key queues

    def create_queue(
        self, app_id: str, client_id: str, protocol_version: int, cipher_suite: int, app_label: str
    ) -> Deferred[str]:
        """A new queue; C{409 queue-exists} (with its id) if the triple has one."""
        return self._store.run_interaction(_create_queue, app_id, client_id, protocol_version, cipher_suite, app_label)

    def queue(self, app_id: str, client_id: str, queue_id: str) -> Deferred[Queue]:
        """The queue C{queue_id} of a client; C{404 not-found} otherwise."""
        return self._store.run_interaction(_require_queue, app_id, client_id, queue_id)

    def queues(self, app_id: str, client_id: str) -> Deferred[List[Tuple[Queue, int]]]:
        """A client's queues, each with the number of KeyPackages available."""
        return self._store.run_interaction(_queues, app_id, client_id, int(self._now()))

    def fill_queue(
        self,
        app_id: str,
        client_id: str,
        queue_id: str,
        key_packages: Sequence[NewKeyPackage],
        *,
        reset: bool,
        final_key: Optional[NewKeyPackage],
        max_in_pool: int,
    ) -> Deferred[int]:
        """
        Add KeyPackages to a queue (after removing the unclaimed ones when
        C{reset}), set its final key if given, drop expired ones; fire with
        how many are available.  A KeyPackage already filed is left as it is.
        """
        return self._store.run_interaction(
            _fill_queue, app_id, client_id, queue_id, tuple(key_packages), reset, final_key, max_in_pool,
            int(self._now()),
        )

    def claim(
        self,
        app_id: str,
        client_id: str,
        protocol_version: int,
        cipher_suite: int,
        app_label: str,
        receiver: str,
        *,
        receiver_client: Optional[Tuple[str, str]] = None,
        claim_ttl: float = DEFAULT_CLAIM_TTL,
        max_per_origin: Optional[int] = None,
    ) -> Deferred[Claimed]:
        """
        Claim a KeyPackage of C{client_id} for C{receiver} (C{domain/client
        id}): the one it already holds, if still valid and not consumed; else
        the valid unclaimed one that expires first; else the final key (if
        its lifetime has begun and not ended).  C{404 no-key-package} when
        there is none.  A claim that no Welcome consumed within C{claim_ttl}
        seconds is released first: its KeyPackage is unclaimed again, and a
        final-key claim is forgotten.  With C{max_per_origin}, the receiver's
        domain may hold at most that many unconsumed KeyPackages of the queue,
        and as many claims of its final key (C{429 too-many-claims}).  With
        C{receiver_client} (C{(app id, client id)}), that client must exist
        first (C{404 not-found}), checked in the same transaction.
        Concurrent claims share their commit (L{Store.run_grouped}).
        """
        return self._store.run_grouped(
            _claim, app_id, client_id, protocol_version, cipher_suite, app_label, receiver, self._now(),
            receiver_client, self._store.dialect, float(claim_ttl), max_per_origin,
        )

    def record_remote_claim(
        self, ref: bytes, domain: str, app_id: str, client_id: str, local_app_id: str
    ) -> Deferred[None]:
        """
        Remember that application C{local_app_id} of this gateway claimed
        C{ref} from C{domain}'s client C{client_id} of its application
        C{app_id}.  C{409 key-package-exists} when C{ref} was claimed from
        another domain: a KeyPackage has one issuer.
        """
        return self._store.run_interaction(_record_remote_claim, ref, domain, app_id, client_id, local_app_id,
                                           self._now())

    def remote_claims(self, refs: Iterable[bytes], local_app_id: str) -> Deferred[Dict[bytes, Tuple[str, str, str]]]:
        """
        For each of C{refs} that application C{local_app_id} claimed from
        another gateway: C{(domain, app id, client id)}.
        """
        return self._store.run_interaction(_remote_claims, tuple(refs), local_app_id)

    def record_remote_clients(
        self, domain: str, app_id: str, clients: Sequence[Tuple[str, bytes]], keep: float
    ) -> Deferred[None]:
        """
        Remember the handles of C{domain}'s clients of its application
        C{app_id} (C{(client id, handle)}, as its C{list-clients} gave them),
        forgetting those of that application not seen for C{keep} seconds.
        """
        return self._store.run_interaction(_record_remote_clients, domain, app_id, tuple(clients), self._now(),
                                           float(keep))

    def remote_client_handle(
        self, domain: str, app_id: str, client_id: str, keep: float
    ) -> Deferred[Optional[bytes]]:
        """
        The handle C{domain}'s C{list-clients} last gave for C{client_id} of
        C{app_id}, if it did within C{keep} seconds.
        """
        return self._store.run_interaction(_remote_client_handle, domain, app_id, client_id, self._now() - keep)

    # groups

    def create_group(
        self, app_id: str, group_id: str, cipher_suite: int, group_info: bytes, ratchet_tree: Optional[bytes]
    ) -> Deferred[None]:
        """A new group at epoch 0; C{409 group-exists} if the id is taken."""
        return self._store.run_interaction(
            _create_group, app_id, group_id, cipher_suite, group_info, ratchet_tree, self._now()
        )

    def group(self, app_id: str, group_id: str) -> Deferred[Group]:
        """The group C{group_id} of C{app_id}; C{404 not-found} otherwise."""
        return self._store.run_interaction(_require_group, app_id, group_id)

    def add_proposal(
        self, app_id: str, group_id: str, epoch: int, proposal: bytes, max_proposals: int
    ) -> Deferred[int]:
        """File a proposal for the current epoch; C{409 stale-epoch} when C{epoch} is not it."""
        return self._store.run_interaction(
            _add_proposal, app_id, group_id, epoch, proposal, max_proposals, self._now(), self._store.dialect
        )

    def proposals(self, app_id: str, group_id: str, start: int = 0) -> Deferred[Tuple[int, List[bytes], bool]]:
        """
        The current epoch, its proposals oldest first from the C{start}th
        (0: the first), at most L{MAX_LISTING} of them and no more once they
        hold L{MAX_LISTING_BYTES}, and whether some were left out.
        """
        return self._store.run_interaction(_proposals, app_id, group_id, start)

    def commit(
        self,
        app_id: str,
        group_id: str,
        epoch: int,
        commit_message: bytes,
        group_info: Optional[bytes],
        ratchet_tree: Optional[bytes],
        welcome: Optional[bytes],
        welcome_refs: Sequence[bytes],
        remote_refs: Sequence[bytes],
        local_domain: str,
        *,
        max_welcomes: int = DEFAULT_WELCOMES_PER_CLIENT,
        outbox: Optional[Callable[[Any], None]] = None,
    ) -> Deferred[List[WelcomeTarget]]:
        """
        Record the commit of C{epoch} and move the group to C{epoch + 1}.
        C{outbox(cursor)}, if given, runs last in the same transaction (the
        gateway queues the Welcome for other gateways there, so that it is
        queued exactly when the commit is recorded).
        With a Welcome, every one of C{welcome_refs} must be one of
        C{remote_refs}, or a KeyPackage of this gateway that a client of
        C{app_id} claimed (C{local_domain/client id}) and no Welcome
        consumed yet (consumed now, and the Welcome filed for its owner), or
        a final key of this gateway with such a claim (the claim is used up;
        the final key stays); the owner's application must not be retired.
        C{422 unknown-key-package} names any other.  C{429
        too-many-welcomes} when an owner keeps C{max_welcomes} Welcome
        messages already.  C{409 stale-epoch} (with the current epoch) when
        C{epoch} is not the group's epoch.  Fires with the local clients
        welcomed.
        """
        return self._store.run_interaction(
            _commit, app_id, group_id, epoch, commit_message, group_info, ratchet_tree, welcome,
            tuple(welcome_refs), tuple(remote_refs), local_domain, self._now(), self._store.dialect, max_welcomes,
            outbox,
        )

    def commits(
        self, app_id: str, group_id: str, start: int, end: Optional[int]
    ) -> Deferred[Tuple[int, List[Tuple[int, bytes]], bool]]:
        """
        The group's current epoch, its commits for epochs C{start..end}, at
        most L{MAX_LISTING} and no more once they hold L{MAX_LISTING_BYTES},
        and whether some were left out.
        """
        return self._store.run_interaction(_commits, app_id, group_id, start, end)

    # welcome messages

    def deliver_welcome(
        self, origin: str, group_id: str, epoch: int, welcome: bytes, refs: Sequence[bytes], *,
        max_welcomes: int = DEFAULT_WELCOMES_PER_CLIENT,
    ) -> Deferred[List[WelcomeTarget]]:
        """
        File a Welcome sent by the gateway of C{origin} for the KeyPackages
        among C{refs} that C{origin} claimed here, consuming them (a final
        key's claim is used up), unless the owner's application is retired;
        fires with the clients welcomed (C{422 unknown-key-package} when
        none is, C{404 not-found} when the only ones were of retired
        applications, C{429 too-many-welcomes} when an owner keeps
        C{max_welcomes} already).
        """
        return self._store.run_interaction(
            _deliver_welcome, origin, group_id, epoch, welcome, tuple(refs), self._now(), self._store.dialect,
            max_welcomes,
        )

    def welcomes(
        self, app_id: str, client_id: str, since: int
    ) -> Deferred[Tuple[List[Tuple[int, str, str, int, bytes]], bool]]:
        """
        A client's Welcome messages after id C{since} (id, origin domain,
        group id, epoch, welcome), at most L{MAX_LISTING} and no more once
        they hold L{MAX_LISTING_BYTES}, and whether some were left out.
        """
        return self._store.run_interaction(_welcomes, app_id, client_id, since)


# the interactions: each runs in one transaction on the database thread


def _app_row(row: Sequence[Any]) -> App:
    return App(id=row[0], name=row[1], identity_provider=row[2], federate=bool(row[3]), declared=bool(row[4]),
               retired=bool(row[5]))


#: what L{_retire_undeclared_apps} sets the token hash of a retired application to
_RETIRED = "'retired:' || id"
_APP_COLUMNS = f"id, name, identity_provider, federate, declared, CASE WHEN token_hash = {_RETIRED} THEN 1 ELSE 0 END"


def _upsert_app(
    cursor: Any, app_id: str, name: str, provider: str, token_hash: str, federate: bool, now: float
) -> None:
    cursor.execute(f"SELECT {_APP_COLUMNS} FROM mimi_apps WHERE token_hash = ? AND id <> ?", (token_hash, app_id))
    other = cursor.fetchone()
    if other is not None:
        # the configuration is at fault, not the request that found it out: 503, like a missing identity provider
        raise APIError(
            503, "token-in-use",
            f"the configuration gives application {app_id} the token of stored application {other[0]}; "
            "the operator must give it another token_file",
        )
    cursor.execute(
        "INSERT INTO mimi_apps (id, name, identity_provider, token_hash, federate, declared, created) "
        "VALUES (?, ?, ?, ?, ?, 1, ?) ON CONFLICT (id) DO UPDATE SET name = excluded.name, "
        "identity_provider = excluded.identity_provider, token_hash = excluded.token_hash, "
        "federate = excluded.federate, declared = 1",
        (app_id, name, provider, token_hash, int(federate), now),
    )


def _retire_undeclared_apps(cursor: Any, declared_ids: frozenset) -> List[str]:
    cursor.execute("SELECT id, token_hash FROM mimi_apps WHERE declared = 1 ORDER BY id")
    retired = [row[0] for row in cursor.fetchall() if row[0] not in declared_ids and row[1] != f"retired:{row[0]}"]
    # no SHA-256 in hex is ever equal to this, so no token opens it
    cursor.executemany(
        "UPDATE mimi_apps SET token_hash = 'retired:' || id, federate = 0 WHERE id = ?", [(i,) for i in retired]
    )
    return retired


def _create_app(cursor: Any, name: str, provider: str, token_hash: str, federate: bool, now: float) -> App:
    app_id = new_id()
    cursor.execute(
        "INSERT INTO mimi_apps (id, name, identity_provider, token_hash, federate, declared, created) "
        "VALUES (?, ?, ?, ?, ?, 0, ?)",
        (app_id, name, provider, token_hash, int(federate), now),
    )
    return App(id=app_id, name=name, identity_provider=provider, federate=federate, declared=False)


def _app_where(cursor: Any, where: str, value: str) -> Optional[App]:
    cursor.execute(f"SELECT {_APP_COLUMNS} FROM mimi_apps WHERE {where}", (value,))
    row = cursor.fetchone()
    return None if row is None else _app_row(row)


def _apps(cursor: Any, federating_only: bool) -> List[App]:
    where = "WHERE federate = 1 " if federating_only else ""
    cursor.execute(f"SELECT {_APP_COLUMNS} FROM mimi_apps {where}ORDER BY created, id LIMIT {MAX_LISTING}")
    return [_app_row(row) for row in cursor.fetchall()]


def _tags(cursor: Any, client_id: str) -> Tuple[str, ...]:
    cursor.execute("SELECT tag FROM mimi_client_tags WHERE client_id = ? ORDER BY tag", (client_id,))
    return tuple(row[0] for row in cursor.fetchall())


def _handle_taken(cursor: Any, app_id: str, handle: bytes, except_id: str) -> None:
    cursor.execute(
        "SELECT id FROM mimi_clients WHERE app_id = ? AND handle = ? AND id <> ?", (app_id, handle, except_id)
    )
    row = cursor.fetchone()
    if row is not None:
        raise APIError(
            409, "client-handle-exists",
            f"client {row[0]} of application {app_id} already has this client handle",
            data={"clientId": row[0]},
        )


def _register_client(cursor: Any, app_id: str, handle: bytes, tags: Tuple[str, ...], now: float) -> str:
    _handle_taken(cursor, app_id, handle, "")
    client_id = new_id()
    cursor.execute(
        "INSERT INTO mimi_clients (id, app_id, handle, created) VALUES (?, ?, ?, ?)", (client_id, app_id, handle, now)
    )
    cursor.executemany(
        "INSERT INTO mimi_client_tags (client_id, tag) VALUES (?, ?) ON CONFLICT DO NOTHING",
        [(client_id, tag) for tag in tags],
    )
    return client_id


def _require_client(cursor: Any, app_id: str, client_id: str) -> Client:
    cursor.execute("SELECT id, app_id, handle FROM mimi_clients WHERE id = ? AND app_id = ?", (client_id, app_id))
    row = cursor.fetchone()
    if row is None:
        raise not_found(f"application {app_id} has no client {client_id}")
    return Client(id=row[0], app_id=row[1], handle=bytes(row[2]), tags=_tags(cursor, client_id))


def _require_client_id(cursor: Any, app_id: str, client_id: str) -> None:
    """What L{_require_client} checks, without reading the client: one indexed lookup."""
    cursor.execute("SELECT 1 FROM mimi_clients WHERE id = ? AND app_id = ?", (client_id, app_id))
    if cursor.fetchone() is None:
        raise not_found(f"application {app_id} has no client {client_id}")


def _patch_client(
    cursor: Any, app_id: str, client_id: str, handle: Optional[bytes], add: Tuple[str, ...], remove: Tuple[str, ...],
    max_tags: int,
) -> Client:
    _require_client(cursor, app_id, client_id)
    if handle is not None:
        _handle_taken(cursor, app_id, handle, client_id)
        cursor.execute("UPDATE mimi_clients SET handle = ? WHERE id = ?", (handle, client_id))
    cursor.executemany("DELETE FROM mimi_client_tags WHERE client_id = ? AND tag = ?", [(client_id, t) for t in remove])
    cursor.executemany(
        "INSERT INTO mimi_client_tags (client_id, tag) VALUES (?, ?) ON CONFLICT DO NOTHING",
        [(client_id, tag) for tag in add],
    )
    client = _require_client(cursor, app_id, client_id)
    if len(client.tags) > max_tags:
        raise APIError(
            400, "bad-request", f"a client has at most {max_tags} tags; this change gives it {len(client.tags)}"
        )
    return client


def _delete_client(cursor: Any, app_id: str, client_id: str) -> None:
    _require_client(cursor, app_id, client_id)
    cursor.execute("DELETE FROM mimi_clients WHERE id = ?", (client_id,))


def _clients_by_tag(cursor: Any, app_id: str, tag: str) -> List[Client]:
    cursor.execute(
        "SELECT c.id, c.app_id, c.handle FROM mimi_client_tags t JOIN mimi_clients c ON c.id = t.client_id "
        f"WHERE t.tag = ? AND c.app_id = ? ORDER BY c.created, c.id LIMIT {MAX_LISTING}",
        (tag, app_id),
    )
    rows = cursor.fetchall()
    return [Client(id=r[0], app_id=r[1], handle=bytes(r[2]), tags=_tags(cursor, r[0])) for r in rows]


def _queue_row(row: Sequence[Any]) -> Queue:
    return Queue(
        id=row[0], client_id=row[1], protocol_version=row[2], cipher_suite=row[3], app_label=row[4],
        has_final_key=row[5] is not None,
    )


_QUEUE_COLUMNS = "id, client_id, protocol_version, cipher_suite, app_label, final_key"


def _create_queue(cursor: Any, app_id: str, client_id: str, version: int, suite: int, label: str) -> str:
    _require_client(cursor, app_id, client_id)
    cursor.execute(
        "SELECT id FROM mimi_queues "
        "WHERE client_id = ? AND protocol_version = ? AND cipher_suite = ? AND app_label = ?",
        (client_id, version, suite, label),
    )
    row = cursor.fetchone()
    if row is not None:
        raise APIError(
            409, "queue-exists",
            f"client {client_id} already has queue {row[0]} for protocol version {version}, cipher suite {suite} "
            f"and label {label!r}",
            data={"queueId": row[0]},
        )
    queue_id = new_id()
    cursor.execute(
        "INSERT INTO mimi_queues (id, client_id, protocol_version, cipher_suite, app_label) VALUES (?, ?, ?, ?, ?)",
        (queue_id, client_id, version, suite, label),
    )
    return queue_id


def _require_queue(cursor: Any, app_id: str, client_id: str, queue_id: str) -> Queue:
    _require_client(cursor, app_id, client_id)
    cursor.execute(f"SELECT {_QUEUE_COLUMNS} FROM mimi_queues WHERE id = ? AND client_id = ?", (queue_id, client_id))
    row = cursor.fetchone()
    if row is None:
        raise not_found(f"client {client_id} has no queue {queue_id}")
    return _queue_row(row)


def _available(cursor: Any, queue_id: str, now: int) -> int:
    cursor.execute(
        "SELECT COUNT(*) FROM mimi_key_packages WHERE queue_id = ? AND consumed = 0 AND claimed_by IS NULL "
        "AND not_after >= ?",
        (queue_id, now),
    )
    return int(cursor.fetchone()[0])


def _queues(cursor: Any, app_id: str, client_id: str, now: int) -> List[Tuple[Queue, int]]:
    _require_client(cursor, app_id, client_id)
    cursor.execute(f"SELECT {_QUEUE_COLUMNS} FROM mimi_queues WHERE client_id = ? ORDER BY id", (client_id,))
    queues = [_queue_row(row) for row in cursor.fetchall()]
    return [(queue, _available(cursor, queue.id, now)) for queue in queues]


def _fill_queue(
    cursor: Any,
    app_id: str,
    client_id: str,
    queue_id: str,
    key_packages: Tuple[NewKeyPackage, ...],
    reset: bool,
    final_key: Optional[NewKeyPackage],
    max_in_pool: int,
    now: int,
) -> int:
    _require_queue(cursor, app_id, client_id, queue_id)
    # expired ones are of no use to anybody; claimed, unconsumed ones stay for their receivers
    cursor.execute("DELETE FROM mimi_key_packages WHERE queue_id = ? AND not_after < ?", (queue_id, now))
    if reset:
        cursor.execute(
            "DELETE FROM mimi_key_packages WHERE queue_id = ? AND claimed_by IS NULL AND consumed = 0", (queue_id,)
        )
    for kp in key_packages:
        cursor.execute("SELECT queue_id FROM mimi_key_packages WHERE ref = ?", (kp.ref,))
        row = cursor.fetchone()
        if row is not None:
            if row[0] != queue_id:
                raise APIError(
                    409, "key-package-exists",
                    f"KeyPackage {kp.ref.hex()} is already filed in another queue ({row[0]})",
                )
            continue
        cursor.execute(
            "INSERT INTO mimi_key_packages (ref, queue_id, data, not_before, not_after) VALUES (?, ?, ?, ?, ?)",
            (kp.ref, queue_id, kp.data, kp.not_before, kp.not_after),
        )
    if final_key is not None:
        cursor.execute(
            "UPDATE mimi_queues SET final_key = ?, final_ref = ?, final_not_before = ?, final_not_after = ? "
            "WHERE id = ?",
            (final_key.data, final_key.ref, final_key.not_before, final_key.not_after, queue_id),
        )
        # the claims of the final key it replaces can no longer be used
        cursor.execute("DELETE FROM mimi_final_claims WHERE queue_id = ? AND ref <> ?", (queue_id, final_key.ref))
    available = _available(cursor, queue_id, now)
    if available > max_in_pool:
        raise APIError(
            400, "too-many-key-packages",
            f"queue {queue_id} would hold {available} KeyPackages; it holds at most {max_in_pool}",
        )
    return available


def too_many_claims(origin: str, client_id: str, maximum: int, what: str) -> APIError:
    """C{429 too-many-claims}."""
    return APIError(
        429, "too-many-claims",
        f"{origin} holds {maximum} {what} of client {client_id} that no Welcome has used yet, as many as one domain "
        "may; send the Welcomes for them, or wait until unused claims are released",
    )


def _claim(
    cursor: Any, app_id: str, client_id: str, version: int, suite: int, label: str, receiver: str, now_f: float,
    receiver_client: Optional[Tuple[str, str]] = None, dialect: Dialect = SQLITE,
    claim_ttl: float = DEFAULT_CLAIM_TTL, max_per_origin: Optional[int] = None,
) -> Claimed:
    now = int(now_f)
    released = now_f - claim_ttl
    # the receiver's domain, as its claims are named: "domain/client id"
    origin = receiver.rpartition("/")[0] + "/"
    if receiver_client is not None:
        _require_client_id(cursor, *receiver_client)
    _require_client_id(cursor, app_id, client_id)
    cursor.execute(
        "SELECT id, final_key, final_not_after, final_ref, final_not_before FROM mimi_queues "
        "WHERE client_id = ? AND protocol_version = ? AND cipher_suite = ? AND app_label = ?",
        (client_id, version, suite, label),
    )
    queue = cursor.fetchone()
    if queue is None:
        raise APIError(
            404, "no-key-package",
            f"client {client_id} has no key queue for protocol version {version}, cipher suite {suite} "
            f"and label {label!r}",
        )
    queue_id = queue[0]
    # one claim at a time per receiver and queue, so that a receiver never holds two (concurrent claims for
    # different receivers go on side by side)
    dialect.lock(cursor, f"mimi-claim {queue_id} {receiver}")
    if max_per_origin is not None:
        # and one at a time per domain and queue, so that the domain's count below stays true until the end
        dialect.lock(cursor, f"mimi-claims-of {queue_id} {origin}")
    # claims that no Welcome consumed in time are released: claimable again (through the index on claimed_at,
    # which passes over the unclaimed ones)
    cursor.execute(
        "UPDATE mimi_key_packages SET claimed_by = NULL, claimed_at = NULL "
        "WHERE queue_id = ? AND consumed = 0 AND claimed_at < ?",
        (queue_id, released),
    )
    cursor.execute(
        "SELECT data FROM mimi_key_packages WHERE queue_id = ? AND claimed_by = ? AND consumed = 0 "
        "AND not_before <= ? AND not_after >= ? ORDER BY not_after, ref LIMIT 1",
        (queue_id, receiver, now, now),
    )
    held = cursor.fetchone()
    if held is not None:
        return Claimed(bytes(held[0]), False)
    if max_per_origin is not None:
        cursor.execute(
            "SELECT COUNT(*) FROM mimi_key_packages WHERE queue_id = ? AND consumed = 0 AND claimed_by IS NOT NULL "
            "AND substr(claimed_by, 1, ?) = ?",
            (queue_id, len(origin), origin),
        )
        if cursor.fetchone()[0] >= max_per_origin:
            raise too_many_claims(origin[:-1], client_id, max_per_origin, "KeyPackages")
    cursor.execute(
        "SELECT ref, data FROM mimi_key_packages WHERE queue_id = ? AND claimed_by IS NULL AND consumed = 0 "
        "AND not_before <= ? AND not_after >= ? ORDER BY not_after, ref LIMIT 1" + dialect.for_update(skip_locked=True),
        (queue_id, now, now),
    )
    row = cursor.fetchone()
    if row is not None:
        cursor.execute(
            "UPDATE mimi_key_packages SET claimed_by = ?, claimed_at = ? WHERE ref = ? AND claimed_by IS NULL",
            (receiver, now_f, row[0]),
        )
        if cursor.rowcount != 1:  # never: the row is locked (on SQLite, the database)
            raise APIError(503, "claim-conflict", f"a concurrent claim took the KeyPackage of {client_id}; retry")
        return Claimed(bytes(row[1]), False)
    if queue[1] is not None and (queue[4] or 0) <= now <= queue[2]:
        # the final key is never consumed, but a Welcome may name it only for those it was given to, once per claim;
        # claims of an earlier final key, and those not used in time, are gone
        cursor.execute(
            "DELETE FROM mimi_final_claims WHERE queue_id = ? AND (ref <> ? OR claimed_at < ?)",
            (queue_id, queue[3], released),
        )
        cursor.execute("SELECT 1 FROM mimi_final_claims WHERE ref = ? AND claimed_by = ?", (queue[3], receiver))
        if cursor.fetchone() is None:
            if max_per_origin is not None:
                cursor.execute(
                    "SELECT COUNT(*) FROM mimi_final_claims WHERE queue_id = ? AND substr(claimed_by, 1, ?) = ?",
                    (queue_id, len(origin), origin),
                )
                if cursor.fetchone()[0] >= max_per_origin:
                    raise too_many_claims(origin[:-1], client_id, max_per_origin, "claims of the final key")
            cursor.execute(
                "INSERT INTO mimi_final_claims (ref, claimed_by, queue_id, claimed_at) VALUES (?, ?, ?, ?) "
                "ON CONFLICT DO NOTHING",
                (queue[3], receiver, queue_id, now_f),
            )
        return Claimed(bytes(queue[1]), True)
    # the queue's id is internal: this answer may go to another gateway
    raise APIError(
        404, "no-key-package",
        f"client {client_id} has no KeyPackage left for protocol version {version}, cipher suite {suite} and label "
        f"{label!r}",
    )


def _record_remote_claim(
    cursor: Any, ref: bytes, domain: str, app_id: str, client_id: str, local_app_id: str, now: float
) -> None:
    cursor.execute("SELECT domain FROM mimi_remote_claims WHERE ref = ? AND domain <> ? LIMIT 1", (ref, domain))
    row = cursor.fetchone()
    if row is not None:
        raise APIError(
            409, "key-package-exists",
            f"KeyPackage {ref.hex()} was claimed from {row[0]} already; {domain} cannot have issued it too",
        )
    cursor.execute(
        "INSERT INTO mimi_remote_claims (ref, local_app_id, domain, app_id, client_id, claimed_at) "
        "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (ref, local_app_id) DO UPDATE SET app_id = excluded.app_id, "
        "client_id = excluded.client_id, claimed_at = excluded.claimed_at",
        (ref, local_app_id, domain, app_id, client_id, now),
    )


def _remote_claims(cursor: Any, refs: Tuple[bytes, ...], local_app_id: str) -> Dict[bytes, Tuple[str, str, str]]:
    found = {}
    for ref in refs:
        cursor.execute(
            "SELECT domain, app_id, client_id FROM mimi_remote_claims WHERE ref = ? AND local_app_id = ?",
            (ref, local_app_id),
        )
        row = cursor.fetchone()
        if row is not None:
            found[ref] = (row[0], row[1], row[2])
    return found


def _record_remote_clients(
    cursor: Any, domain: str, app_id: str, clients: Tuple[Tuple[str, bytes], ...], now: float, keep: float
) -> None:
    cursor.execute("DELETE FROM mimi_remote_clients WHERE domain = ? AND app_id = ? AND seen < ?",
                   (domain, app_id, now - keep))
    cursor.executemany(
        "INSERT INTO mimi_remote_clients (domain, app_id, client_id, handle, seen) VALUES (?, ?, ?, ?, ?) "
        "ON CONFLICT (domain, app_id, client_id) DO UPDATE SET handle = excluded.handle, seen = excluded.seen",
        [(domain, app_id, client_id, handle, now) for client_id, handle in clients],
    )


def _remote_client_handle(cursor: Any, domain: str, app_id: str, client_id: str, since: float) -> Optional[bytes]:
    cursor.execute("SELECT handle FROM mimi_remote_clients WHERE domain = ? AND app_id = ? AND client_id = ? "
                   "AND seen >= ?", (domain, app_id, client_id, since))
    row = cursor.fetchone()
    return None if row is None else bytes(row[0])


def _group_row(row: Sequence[Any]) -> Group:
    return Group(
        id=row[0], app_id=row[1], cipher_suite=row[2], epoch=row[3], group_info=bytes(row[4]),
        ratchet_tree=None if row[5] is None else bytes(row[5]),
    )


def _create_group(
    cursor: Any, app_id: str, group_id: str, suite: int, group_info: bytes, tree: Optional[bytes], now: float
) -> None:
    cursor.execute("SELECT app_id FROM mimi_groups WHERE id = ?", (group_id,))
    if cursor.fetchone() is not None:
        raise APIError(409, "group-exists", f"group {group_id} exists already")
    cursor.execute(
        "INSERT INTO mimi_groups (id, app_id, cipher_suite, epoch, group_info, ratchet_tree, created) "
        "VALUES (?, ?, ?, 0, ?, ?, ?)",
        (group_id, app_id, suite, group_info, tree, now),
    )


def _require_group(cursor: Any, app_id: str, group_id: str, lock: str = "") -> Group:
    """The group, read with C{lock} (L{Dialect.for_update}: the epoch cannot move until the transaction ends)."""
    cursor.execute(
        "SELECT id, app_id, cipher_suite, epoch, group_info, ratchet_tree FROM mimi_groups WHERE id = ? AND app_id = ?"
        + lock,
        (group_id, app_id),
    )
    row = cursor.fetchone()
    if row is None:
        raise not_found(f"application {app_id} has no group {group_id}")
    return _group_row(row)


def stale_epoch(group_id: str, epoch: int, current: int) -> APIError:
    """C{409 stale-epoch}, with the group's current epoch under C{data}."""
    return APIError(
        409, "stale-epoch",
        f"group {group_id} is at epoch {current}, not {epoch}; fetch the commits since and retry",
        data={"currentEpoch": current},
    )


def _add_proposal(
    cursor: Any, app_id: str, group_id: str, epoch: int, proposal: bytes, max_proposals: int, now: float,
    dialect: Dialect = SQLITE,
) -> int:
    group = _require_group(cursor, app_id, group_id, dialect.for_update())
    if epoch != group.epoch:
        raise stale_epoch(group_id, epoch, group.epoch)
    cursor.execute("SELECT COUNT(*) FROM mimi_proposals WHERE group_id = ? AND epoch = ?", (group_id, epoch))
    if cursor.fetchone()[0] >= max_proposals:
        raise APIError(
            400, "too-many-proposals", f"group {group_id} has {max_proposals} proposals in epoch {epoch}; commit first"
        )
    cursor.execute(
        "INSERT INTO mimi_proposals (group_id, epoch, proposal, created) VALUES (?, ?, ?, ?) RETURNING id",
        (group_id, epoch, proposal, now),
    )
    return int(cursor.fetchone()[0])


def _listing_bounds(cursor: Any) -> Tuple[Any, Any, bool]:
    """
    The rows C{(key, size in bytes)} of the query just run (in the
    listing's order, at most L{MAX_LISTING} + 1): the first and last keys
    of those a listing takes, at most L{MAX_LISTING} and no more once their
    sizes add up to more than L{MAX_LISTING_BYTES} (but at least one), and
    whether any were left out.  The messages are read afterwards, by key:
    only the rows taken are ever read whole.
    """
    first = last = None
    total = count = 0
    for key, size in cursor.fetchall():
        size = int(size or 0)
        if count >= MAX_LISTING or (count and total + size > MAX_LISTING_BYTES):
            return first, last, True
        if count == 0:
            first = key
        last = key
        total += size
        count += 1
    return first, last, False


def _proposals(cursor: Any, app_id: str, group_id: str, start: int = 0) -> Tuple[int, List[bytes], bool]:
    group = _require_group(cursor, app_id, group_id)
    cursor.execute(
        "SELECT id, length(proposal) FROM mimi_proposals WHERE group_id = ? AND epoch = ? ORDER BY id LIMIT ? OFFSET ?",
        (group_id, group.epoch, MAX_LISTING + 1, start),
    )
    first, last, truncated = _listing_bounds(cursor)
    if first is None:
        return group.epoch, [], False
    cursor.execute(
        "SELECT proposal FROM mimi_proposals WHERE group_id = ? AND epoch = ? AND id >= ? AND id <= ? ORDER BY id",
        (group_id, group.epoch, first, last),
    )
    return group.epoch, [bytes(row[0]) for row in cursor.fetchall()], truncated


def _final_key_claim(
    cursor: Any, ref: bytes, prefix: str, app_id: Optional[str] = None, dialect: Dialect = SQLITE
) -> Optional[WelcomeTarget]:
    """
    A claim of the current final key C{ref} by a receiver whose name starts
    with C{prefix} (and, with C{app_id}, who is a client of that
    application), or C{None}.
    """
    sql = ("SELECT q.client_id, f.claimed_by FROM mimi_final_claims f JOIN mimi_queues q ON q.id = f.queue_id "
           "WHERE f.ref = ? AND q.final_ref = f.ref AND substr(f.claimed_by, 1, ?) = ?")
    params: List[Any] = [ref, len(prefix), prefix]
    if app_id is not None:
        sql += " AND EXISTS (SELECT 1 FROM mimi_clients r WHERE r.id = substr(f.claimed_by, ?) AND r.app_id = ?)"
        params += [len(prefix) + 1, app_id]
    cursor.execute(sql + " ORDER BY f.claimed_by LIMIT 1" + dialect.for_update("f"), params)
    row = cursor.fetchone()
    return None if row is None else WelcomeTarget(ref=ref, client_id=row[0], claimed_by=row[1])


def _use_final_key_claim(cursor: Any, target: WelcomeTarget) -> bool:
    """Use up a claim of a final key (one Welcome each); C{False} if a concurrent Welcome used it first."""
    cursor.execute("DELETE FROM mimi_final_claims WHERE ref = ? AND claimed_by = ?", (target.ref, target.claimed_by))
    return bool(cursor.rowcount == 1)


def _owner_served(cursor: Any, client_id: str) -> bool:
    """Whether the application of client C{client_id} is not retired (L{_retire_undeclared_apps})."""
    cursor.execute(
        "SELECT 1 FROM mimi_clients c JOIN mimi_apps a ON a.id = c.app_id "
        "WHERE c.id = ? AND a.token_hash <> 'retired:' || a.id",
        (client_id,),
    )
    return cursor.fetchone() is not None


def _consume(
    cursor: Any, ref: bytes, dialect: Dialect = SQLITE, *, app_id: str, local_domain: str
) -> Optional[WelcomeTarget]:
    """
    The local client a Welcome that application C{app_id} commits may name
    by C{ref}: a KeyPackage that a client of C{app_id} claimed
    (C{local_domain/client id}) and no Welcome consumed yet (consumed now),
    or a final key that such a client claimed (the claim is used up, the
    final key stays), when the owner's application is not retired.
    """
    prefix = local_domain + "/"
    cursor.execute(
        "SELECT k.ref, q.client_id, k.claimed_by FROM mimi_key_packages k JOIN mimi_queues q ON q.id = k.queue_id "
        "WHERE k.ref = ? AND k.consumed = 0 AND substr(k.claimed_by, 1, ?) = ? "
        "AND EXISTS (SELECT 1 FROM mimi_clients r WHERE r.id = substr(k.claimed_by, ?) AND r.app_id = ?)"
        + dialect.for_update("k"),
        (ref, len(prefix), prefix, len(prefix) + 1, app_id),
    )
    row = cursor.fetchone()
    if row is None:
        final = _final_key_claim(cursor, ref, prefix, app_id, dialect)
        if final is None or not _owner_served(cursor, final.client_id) or not _use_final_key_claim(cursor, final):
            return None
        return final
    if not _owner_served(cursor, row[1]):
        return None
    cursor.execute("UPDATE mimi_key_packages SET consumed = 1 WHERE ref = ?", (ref,))
    return WelcomeTarget(ref=bytes(row[0]), client_id=row[1], claimed_by=row[2])


def _welcome_filed(cursor: Any, client_id: str, origin: str, group_id: str, epoch: int) -> bool:
    cursor.execute(
        "SELECT 1 FROM mimi_welcomes WHERE client_id = ? AND origin_domain = ? AND group_id = ? AND epoch = ?",
        (client_id, origin, group_id, epoch),
    )
    return cursor.fetchone() is not None


def _file_welcome(
    cursor: Any, client_id: str, origin: str, group_id: str, epoch: int, welcome: bytes, now: float,
    max_welcomes: int = DEFAULT_WELCOMES_PER_CLIENT,
) -> None:
    if _welcome_filed(cursor, client_id, origin, group_id, epoch):
        return
    cursor.execute("SELECT COUNT(*) FROM mimi_welcomes WHERE client_id = ?", (client_id,))
    if cursor.fetchone()[0] >= max_welcomes:
        raise APIError(
            429, "too-many-welcomes",
            f"client {client_id} keeps {max_welcomes} Welcome messages already, as many as a client may; it takes "
            "no other until some are gone",
            data={"clientId": client_id},
        )
    cursor.execute(
        "INSERT INTO mimi_welcomes (client_id, origin_domain, group_id, epoch, welcome, created) "
        "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
        (client_id, origin, group_id, epoch, welcome, now),
    )


def _commit(
    cursor: Any,
    app_id: str,
    group_id: str,
    epoch: int,
    commit_message: bytes,
    group_info: Optional[bytes],
    tree: Optional[bytes],
    welcome: Optional[bytes],
    welcome_refs: Tuple[bytes, ...],
    remote_refs: Tuple[bytes, ...],
    local_domain: str,
    now: float,
    dialect: Dialect = SQLITE,
    max_welcomes: int = DEFAULT_WELCOMES_PER_CLIENT,
    outbox: Optional[Callable[[Any], None]] = None,
) -> List[WelcomeTarget]:
    group = _require_group(cursor, app_id, group_id, dialect.for_update())
    if epoch != group.epoch:
        raise stale_epoch(group_id, epoch, group.epoch)
    cursor.execute(
        "UPDATE mimi_groups SET epoch = ?, group_info = COALESCE(?, group_info), "
        "ratchet_tree = COALESCE(?, ratchet_tree) WHERE id = ? AND epoch = ?",
        (epoch + 1, group_info, tree, group_id, epoch),
    )
    if cursor.rowcount != 1:  # never: the group's row is locked (on SQLite, the database)
        raise stale_epoch(group_id, epoch, epoch + 1)
    cursor.execute(
        "INSERT INTO mimi_commits (group_id, epoch, commit_message, welcome, created) VALUES (?, ?, ?, ?, ?)",
        (group_id, epoch, commit_message, welcome, now),
    )
    welcomed: List[WelcomeTarget] = []
    unknown = []
    remote = set(remote_refs)
    for ref in welcome_refs:
        if ref in remote:
            continue
        target = _consume(cursor, ref, dialect, app_id=app_id, local_domain=local_domain)
        if target is None:
            unknown.append(ref.hex())
            continue
        welcomed.append(target)
    if unknown:
        raise APIError(
            422, "unknown-key-package",
            f"the Welcome names KeyPackages that were never claimed through this gateway or are used up: "
            f"{', '.join(unknown[:10])}",
            data={"keyPackageRefs": unknown[:100]},
        )
    if welcome is not None:
        for target in welcomed:
            _file_welcome(cursor, target.client_id, local_domain, group_id, epoch + 1, welcome, now, max_welcomes)
    if outbox is not None:
        outbox(cursor)
    return welcomed


def _commits(
    cursor: Any, app_id: str, group_id: str, start: int, end: Optional[int]
) -> Tuple[int, List[Tuple[int, bytes]], bool]:
    group = _require_group(cursor, app_id, group_id)
    last = group.epoch - 1 if end is None else end
    cursor.execute(
        "SELECT epoch, length(commit_message) FROM mimi_commits WHERE group_id = ? AND epoch >= ? AND epoch <= ? "
        "ORDER BY epoch LIMIT ?",
        (group_id, start, last, MAX_LISTING + 1),
    )
    first, last_taken, truncated = _listing_bounds(cursor)
    if first is None:
        return group.epoch, [], False
    cursor.execute(
        "SELECT epoch, commit_message FROM mimi_commits WHERE group_id = ? AND epoch >= ? AND epoch <= ? "
        "ORDER BY epoch",
        (group_id, first, last_taken),
    )
    return group.epoch, [(row[0], bytes(row[1])) for row in cursor.fetchall()], truncated


def _deliver_welcome(
    cursor: Any, origin: str, group_id: str, epoch: int, welcome: bytes, refs: Tuple[bytes, ...], now: float,
    dialect: Dialect = SQLITE, max_welcomes: int = DEFAULT_WELCOMES_PER_CLIENT,
) -> List[WelcomeTarget]:
    welcomed = []
    retired = False
    prefix = origin + "/"
    for ref in refs:
        cursor.execute(
            "SELECT k.claimed_by, q.client_id, k.consumed FROM mimi_key_packages k "
            "JOIN mimi_queues q ON q.id = k.queue_id WHERE k.ref = ?" + dialect.for_update("k"),
            (ref,),
        )
        row = cursor.fetchone()
        if row is not None and row[0] is not None and row[0].startswith(prefix):
            if not _owner_served(cursor, row[1]):
                retired = True
                continue
            if row[2]:
                # consumed already: the same Welcome delivered again is welcome; another group's is not
                if _welcome_filed(cursor, row[1], origin, group_id, epoch):
                    welcomed.append(WelcomeTarget(ref=ref, client_id=row[1], claimed_by=row[0]))
                continue
            cursor.execute("UPDATE mimi_key_packages SET consumed = 1 WHERE ref = ?", (ref,))
            _file_welcome(cursor, row[1], origin, group_id, epoch, welcome, now, max_welcomes)
            welcomed.append(WelcomeTarget(ref=ref, client_id=row[1], claimed_by=row[0]))
            continue
        # a final key: the same Welcome delivered again is welcome (its claim was used the first time)
        cursor.execute(
            "SELECT q.client_id FROM mimi_queues q JOIN mimi_welcomes w ON w.client_id = q.client_id "
            "WHERE q.final_ref = ? AND w.origin_domain = ? AND w.group_id = ? AND w.epoch = ? LIMIT 1",
            (ref, origin, group_id, epoch),
        )
        again = cursor.fetchone()
        if again is not None:
            welcomed.append(WelcomeTarget(ref=ref, client_id=again[0], claimed_by=None))
            continue
        # else it needs a claim of the sender's that no Welcome used yet
        final = _final_key_claim(cursor, ref, prefix, dialect=dialect)
        if final is None:
            continue  # not ours, or not claimed by the sender: the Welcome is for other gateways too
        if not _owner_served(cursor, final.client_id):
            retired = True
            continue
        if not _use_final_key_claim(cursor, final):
            continue
        _file_welcome(cursor, final.client_id, origin, group_id, epoch, welcome, now, max_welcomes)
        welcomed.append(final)
    if not welcomed:
        if retired:
            raise not_found("the Welcome names KeyPackages only of applications this gateway no longer serves")
        raise APIError(
            422, "unknown-key-package",
            f"the Welcome names no KeyPackage that {origin} claimed from this gateway (and did not use already)",
        )
    return welcomed


def _welcomes(
    cursor: Any, app_id: str, client_id: str, since: int
) -> Tuple[List[Tuple[int, str, str, int, bytes]], bool]:
    _require_client(cursor, app_id, client_id)
    cursor.execute(
        "SELECT id, length(welcome) FROM mimi_welcomes WHERE client_id = ? AND id > ? ORDER BY id LIMIT ?",
        (client_id, since, MAX_LISTING + 1),
    )
    first, last, truncated = _listing_bounds(cursor)
    if first is None:
        return [], False
    cursor.execute(
        "SELECT id, origin_domain, group_id, epoch, welcome FROM mimi_welcomes WHERE client_id = ? AND id >= ? "
        "AND id <= ? ORDER BY id",
        (client_id, first, last),
    )
    return [(row[0], row[1], row[2], row[3], bytes(row[4])) for row in cursor.fetchall()], truncated

