"""
fedserver.storage on a real PostgreSQL server, beside SQLite.

The server is the one at C{FEDSERVER_TEST_POSTGRESQL} (default
C{postgresql://127.0.0.1:5432/postgres}: the machine's own, which
tests/run.sh starts when it is down); this module creates its own database,
C{fedserver_test_<random>}, and drops it at the end.  Each test works in a
fresh schema of that database (the URL's C{options=-csearch_path=...}).  A
server that does not answer fails these tests with what to do; they are
never skipped.

- the Store's contract (migrations, transactions, group commit) on both
  databases, and the portable SQL rules;
- what only PostgreSQL has: concurrent migrations, retries, row locks;
- every schema that fedserver and its plugins register, migrated on
  PostgreSQL from a real configuration, with the same tables as on SQLite;
- two fedserver processes (twistd) on one database, hammered with
  concurrent KeyPackage claims: no KeyPackage is handed out twice;
- Matrix transaction answers shared by two stores.
"""

from __future__ import annotations

import base64
import concurrent.futures
import http.client
import json
import os
import secrets
import sqlite3
import threading
import time
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple
from urllib.parse import quote, urlsplit, urlunsplit

import psycopg
import pytest
import pytest_twisted
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import deferLater

from fedserver.errors import ConfigError, FederationError
from fedserver.storage import POSTGRESQL, SQLITE, Store
from tests.integration.harness import Fedserver, free_port, stop, to_toml

ADMIN_URL = os.environ.get("FEDSERVER_TEST_POSTGRESQL", "postgresql://127.0.0.1:5432/postgres")

#: seconds any database operation in these tests may take
BOUND = 30

ITEMS_V1 = "CREATE TABLE items (id INTEGER PRIMARY KEY, name TEXT NOT NULL)"
ITEMS_V2 = "ALTER TABLE items ADD COLUMN colour TEXT; CREATE INDEX items_name ON items (name)"


# the server, a database for this module, a schema for each test


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


class Database:
    """A database of its own on the test server; L{schema} gives a URL for a fresh schema in it."""

    def __init__(self, admin_url: str) -> None:
        try:
            self._admin = psycopg.connect(admin_url, autocommit=True, connect_timeout=5)
        except psycopg.Error as e:
            pytest.fail(
                f"PostgreSQL does not answer at {admin_url} ({_first_line(e)}). These tests need a real server: "
                "tests/run.sh starts the machine's own (pg_ctlcluster ... main start); or set "
                "FEDSERVER_TEST_POSTGRESQL to the URL of a server where this user may CREATE DATABASE",
                pytrace=False,
            )
        self.name = f"fedserver_test_{secrets.token_hex(6)}"
        # bytewise collation and ASCII-only case rules: text sorts and LOWER() as on SQLite
        self._admin.execute(
            f"CREATE DATABASE {self.name} TEMPLATE template0 ENCODING 'UTF8' LC_COLLATE 'C' LC_CTYPE 'C'"
        )
        parts = urlsplit(admin_url)
        self.url = urlunsplit(parts._replace(path="/" + self.name))
        self._query = parts.query

    def schema(self) -> str:
        """A new, empty schema; the URL of the database with it as the only schema searched."""
        name = f"s_{secrets.token_hex(6)}"
        with psycopg.connect(self.url, autocommit=True) as connection:
            connection.execute(f"CREATE SCHEMA {name}")
        options = "options=" + quote(f"-csearch_path={name}")
        return self.url + "?" + "&".join(q for q in (self._query, options) if q)

    def drop(self) -> None:
        self._admin.execute(f"DROP DATABASE IF EXISTS {self.name} WITH (FORCE)")
        self._admin.close()


@pytest.fixture(scope="module")
def pg() -> Iterator[Database]:
    database = Database(ADMIN_URL)
    try:
        yield database
    finally:
        database.drop()


def pg_rows(url: str, sql: str, params: Sequence[Any] = ()) -> List[Tuple]:
    with psycopg.connect(url, autocommit=True) as connection:
        return connection.execute(sql, tuple(params)).fetchall()


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request: Any, tmp_path: Any) -> str:
    """A fresh, empty database of each kind."""
    if request.param == "sqlite":
        return f"sqlite:{tmp_path / 'data' / 'fedserver.sqlite'}"
    return request.getfixturevalue("pg").schema()


def store_for(url: str, reactor: Any = None, **schemas: Sequence[str]) -> Store:
    store = Store(url, reactor=reactor)
    for owner, steps in schemas.items():
        store.register_schema(owner, steps)
    return store


def bounded(d: Deferred) -> Deferred:
    from twisted.internet import reactor

    return d.addTimeout(BOUND, reactor)


@pytest.fixture
def running(url: str) -> Iterator[Store]:
    from twisted.internet import reactor

    store = store_for(url, reactor, items=[ITEMS_V1])
    store.migrate()
    store.startService()
    yield store
    store.stopService()


async def names(store: Store) -> List[str]:
    return [name for (name,) in await bounded(store.run_query("SELECT name FROM items ORDER BY id"))]


async def outcomes(deferreds: Sequence[Deferred]) -> List[Any]:
    """Each Deferred's result, or its failure's exception, in order."""
    found = []
    for d in deferreds:
        try:
            found.append(await bounded(d))
        except Exception as e:  # the failure is the outcome here
            found.append(e)
    return found


INTEGRITY_ERRORS = (sqlite3.IntegrityError, psycopg.IntegrityError)


# the Store's contract, on both databases


def test_the_url_chooses_the_dialect(url: str) -> None:
    assert store_for(url).dialect is (POSTGRESQL if url.startswith("postgresql://") else SQLITE)


def test_migrations_apply_in_order_once(url: str) -> None:
    assert store_for(url, items=[ITEMS_V1], keys=["CREATE TABLE keys (k TEXT)"]).migrate() == [
        ("items", 1), ("keys", 1)]
    assert store_for(url, items=[ITEMS_V1, ITEMS_V2], keys=["CREATE TABLE keys (k TEXT)"]).migrate() == [("items", 2)]
    assert store_for(url, items=[ITEMS_V1, ITEMS_V2]).migrate() == []
    store_for(url, items=[ITEMS_V1, ITEMS_V2]).check()


def test_a_database_newer_than_the_code_is_refused(url: str) -> None:
    store_for(url, items=[ITEMS_V1, ITEMS_V2]).migrate()
    for refuse in (store_for(url, items=[ITEMS_V1]).migrate, store_for(url, items=[ITEMS_V1]).check):
        with pytest.raises(ConfigError) as info:
            refuse()
        assert info.value.path == "[storage] database"
        assert "items schema version 2, but this fedserver knows only up to 1" in info.value.reason


def test_a_failing_step_is_rolled_back(url: str) -> None:
    broken = "CREATE TABLE half (x INTEGER); INSERT INTO no_such_table VALUES (1)"
    with pytest.raises(ConfigError, match=r"items schema step 2 failed in .*no_such_table.*previous step"):
        store_for(url, items=[ITEMS_V1, broken]).migrate()
    # the database is at step 1, without the half-made table: the corrected step applies
    assert store_for(url, items=[ITEMS_V1, "CREATE TABLE half (x INTEGER)"]).migrate() == [("items", 2)]


def test_check_on_an_empty_database(url: str) -> None:
    store_for(url, items=[ITEMS_V1]).check()


@pytest_twisted.ensureDeferred
async def test_operations_interactions_and_rollbacks(running: Store) -> None:
    await bounded(running.run_operation("INSERT INTO items (name) VALUES (?)", ["alice"]))
    assert await bounded(running.run_query("SELECT id, name FROM items WHERE name = ?", ("alice",))) == [
        (1, "alice")]

    def add_two(cursor: Any, first: str, second: str) -> int:
        cursor.execute("INSERT INTO items (name) VALUES (?)", (first,))
        cursor.execute("INSERT INTO items (name) VALUES (?)", (second,))
        return int(cursor.execute("SELECT count(*) FROM items").fetchone()[0])

    assert await bounded(running.run_interaction(add_two, "a", "b")) == 3

    def add_then_fail(cursor: Any) -> None:
        cursor.execute("INSERT INTO items (name) VALUES ('ghost')")
        cursor.execute("INSERT INTO items (name) VALUES (NULL)")

    with pytest.raises(INTEGRITY_ERRORS):
        await bounded(running.run_interaction(add_then_fail))
    assert await names(running) == ["alice", "a", "b"]


@pytest_twisted.ensureDeferred
async def test_portable_types_and_sql(running: Store) -> None:
    def work(cursor: Any) -> Any:
        cursor.execute(
            "CREATE TABLE kinds (id INTEGER PRIMARY KEY AUTOINCREMENT, big INTEGER, at REAL, data BLOB, flag INTEGER,"
            " word TEXT)"
        )
        cursor.execute(
            "INSERT INTO kinds (big, at, data, flag, word) VALUES (?, ?, ?, ?, ?) RETURNING id",
            (2**62 + 1, 1767225600.123456, b"\x00\xffbytes", True, "100% sure?"),
        )
        new_id = cursor.fetchone()[0]
        cursor.execute(
            "SELECT big, at, data, flag, word FROM kinds WHERE id = ? AND word LIKE '100%' AND flag = ?",
            (new_id, True),
        )
        return new_id, cursor.fetchone()

    new_id, row = await bounded(running.run_interaction(work))
    assert new_id == 1
    assert row == (2**62 + 1, 1767225600.123456, b"\x00\xffbytes", 1, "100% sure?")
    assert type(row[2]) is bytes


@pytest_twisted.ensureDeferred
async def test_grouped_works_share_a_commit_in_order(running: Store) -> None:
    def insert(cursor: Any, name: Optional[str]) -> str:
        cursor.execute("INSERT INTO items (name) VALUES (?)", (name,))
        return str(name)

    def count(cursor: Any) -> int:
        return int(cursor.execute("SELECT count(*) FROM items").fetchone()[0])

    def insert_then_fail(cursor: Any, name: str) -> None:
        insert(cursor, name)
        raise ValueError(f"{name} refused")

    first = running.run_grouped(insert, "alone")
    group = [running.run_grouped(insert, "a"), running.run_grouped(count), running.run_grouped(insert_then_fail, "x"),
             running.run_grouped(insert, None), running.run_grouped(insert, "b"), running.run_grouped(count)]
    results = await outcomes([first, *group])
    assert results[:3] == ["alone", "a", 2] and results[5:] == ["b", 3]
    assert isinstance(results[3], ValueError) and isinstance(results[4], INTEGRITY_ERRORS)
    assert await names(running) == ["alone", "a", "b"]
    assert running.groups_committed == 2


@pytest_twisted.ensureDeferred
async def test_a_work_that_breaks_the_transaction_fails_its_group(running: Store) -> None:
    def insert(cursor: Any, name: str) -> None:
        cursor.execute("INSERT INTO items (name) VALUES (?)", (name,))

    def end_the_transaction(cursor: Any) -> None:
        cursor.execute("ROLLBACK")

    first = running.run_grouped(insert, "kept")
    group = [running.run_grouped(insert, "lost"), running.run_grouped(end_the_transaction),
             running.run_grouped(insert, "lost too")]
    results = await outcomes([first, *group])
    assert results[0] is None and all(isinstance(r, Exception) for r in results[1:]), results
    assert await names(running) == ["kept"]
    await bounded(running.run_grouped(insert, "after"))
    assert await names(running) == ["kept", "after"]


@pytest_twisted.ensureDeferred
async def test_a_failing_commit_fails_the_whole_group(running: Store) -> None:
    def tables(cursor: Any) -> None:
        cursor.execute("CREATE TABLE parents (id INTEGER PRIMARY KEY)")
        cursor.execute("CREATE TABLE children (parent INTEGER REFERENCES parents (id) DEFERRABLE INITIALLY DEFERRED)")

    await bounded(running.run_interaction(tables))

    def insert(cursor: Any, name: str) -> None:
        cursor.execute("INSERT INTO items (name) VALUES (?)", (name,))

    def orphan(cursor: Any) -> None:  # accepted now, refused by the commit
        cursor.execute("INSERT INTO children (parent) VALUES (99)")

    first = running.run_grouped(insert, "kept")
    group = [running.run_grouped(insert, "lost"), running.run_grouped(orphan)]
    results = await outcomes([first, *group])
    assert all(isinstance(r, INTEGRITY_ERRORS) for r in results[1:]), results
    assert await names(running) == ["kept"]
    assert await bounded(running.run_query("SELECT count(*) FROM children")) == [(0,)]


# what only PostgreSQL has


def test_processes_starting_together_migrate_once(pg: Database) -> None:
    url = pg.schema()
    slow = "CREATE TABLE slow (x INTEGER); SELECT pg_sleep(0.3)"
    barrier = threading.Barrier(4)

    def start() -> List[Tuple[str, int]]:
        store = store_for(url, items=[ITEMS_V1, ITEMS_V2], slow=[slow])
        barrier.wait()
        return store.migrate()

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        applied = [step for steps in pool.map(lambda _: start(), range(4)) for step in steps]
    assert sorted(applied) == [("items", 1), ("items", 2), ("slow", 1)]
    assert dict(pg_rows(url, "SELECT owner, version FROM fedserver_schema")) == {"items": 2, "slow": 1}


def test_a_server_that_does_not_answer(pg: Database) -> None:
    port = free_port()  # nothing listens there
    store = store_for(f"postgresql://fed:s3cret@127.0.0.1:{port}/fed?connect_timeout=5", items=[ITEMS_V1])
    expected = rf"cannot connect to postgresql://fed:\*\*\*@127.0.0.1:{port}/fed"
    for attempt in (store.migrate, store.check):
        with pytest.raises(ConfigError, match=expected) as info:
            attempt()
        assert info.value.path == "[storage] database" and "s3cret" not in str(info.value)


def test_schemas_use_64_bit_integers_and_doubles(pg: Database) -> None:
    url = pg.schema()
    step = "ALTER TABLE items ADD COLUMN at_ms INTEGER; ALTER TABLE items ADD w REAL"
    store_for(url, items=[ITEMS_V1, step]).migrate()
    types = dict(pg_rows(url, "SELECT column_name, data_type FROM information_schema.columns "
                              "WHERE table_name = 'items' AND table_schema = current_schema()"))
    assert types == {"id": "bigint", "name": "text", "at_ms": "bigint", "w": "double precision"}
    identity = pg_rows(url, "SELECT is_identity FROM information_schema.columns "
                            "WHERE table_name = 'items' AND column_name = 'id' AND table_schema = current_schema()")
    assert identity == [("YES",)]


@pytest_twisted.ensureDeferred
async def test_lastrowid_says_what_to_write_instead(pg: Database) -> None:
    from twisted.internet import reactor

    store = store_for(pg.schema(), reactor, items=[ITEMS_V1])
    store.migrate()
    store.startService()
    try:
        def insert(cursor: Any) -> int:
            cursor.execute("INSERT INTO items (name) VALUES ('a')")
            return int(cursor.lastrowid)

        with pytest.raises(psycopg.NotSupportedError, match=r"write INSERT \.\.\. RETURNING id"):
            await bounded(store.run_interaction(insert))
        assert await names(store) == []
    finally:
        store.stopService()


@pytest_twisted.ensureDeferred
async def test_an_error_caught_inside_a_work_does_not_commit_silently(pg: Database) -> None:
    from twisted.internet import reactor

    store = store_for(pg.schema(), reactor, items=[ITEMS_V1])
    store.migrate()
    store.startService()
    try:
        def swallow(cursor: Any) -> str:
            cursor.execute("INSERT INTO items (name) VALUES ('lost')")
            try:
                cursor.execute("INSERT INTO items (name) VALUES (NULL)")
            except psycopg.IntegrityError:
                pass  # on PostgreSQL the transaction is broken now, and its COMMIT rolls back
            return "done"

        with pytest.raises(psycopg.errors.InFailedSqlTransaction, match="rolled back at its commit"):
            await bounded(store.run_interaction(swallow))
        assert await names(store) == []
    finally:
        store.stopService()


@pytest.mark.parametrize("method", ["run_interaction", "run_grouped"])
@pytest_twisted.ensureDeferred
async def test_a_check_then_insert_race_is_run_again(pg: Database, method: str) -> None:
    """
    Two stores (as two processes) insert the same name after checking for
    it: one wins, the other is run again (in a group: rolled back to its
    savepoint and run alone after the group) and sees it.
    """
    from twisted.internet import reactor

    url = pg.schema()
    store_for(url, items=["CREATE TABLE items (id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE)"]).migrate()
    stores = [store_for(url, reactor) for _ in range(2)]
    for store in stores:
        store.startService()
    checked = threading.Barrier(2, timeout=BOUND)
    attempts: List[str] = []

    def create(cursor: Any, who: str) -> str:
        attempts.append(who)
        found = cursor.execute("SELECT id FROM items WHERE name = ?", ("taken",)).fetchone()
        if found is not None:
            return f"{who}: exists"
        if len(attempts) <= 2:
            checked.wait()  # both first tries have checked and found nothing
        cursor.execute("INSERT INTO items (name) VALUES (?)", ("taken",))
        return f"{who}: created"

    try:
        results = await outcomes([getattr(stores[0], method)(create, "one"), getattr(stores[1], method)(create, "two")])
    finally:
        for store in stores:
            store.stopService()
    assert sorted(r.split(": ")[1] for r in results) == ["created", "exists"], results
    assert len(attempts) == 3  # the loser ran again once, and answered from what the winner committed
    assert pg_rows(url, "SELECT name FROM items") == [("taken",)]


@pytest_twisted.ensureDeferred
async def test_a_grouped_work_waiting_for_a_row_does_not_hold_up_its_group(pg: Database) -> None:
    """
    Another process holds a row: the grouped work that wants it gives up
    after the lock timeout and runs again alone once its group committed,
    so the rest of the group is not held up while the other holds the row.
    """
    from twisted.internet import reactor

    url = pg.schema()
    store = store_for(url, reactor, items=[ITEMS_V1])
    store.migrate()
    store.startService()
    holder = psycopg.connect(url, autocommit=True)
    try:
        await bounded(store.run_operation("INSERT INTO items (id, name) VALUES (1, 'held')"))
        holder.execute("BEGIN")
        holder.execute("UPDATE items SET name = 'holder' WHERE id = 1")
        done: List[str] = []

        def rename(cursor: Any, row: int, name: str) -> str:
            cursor.execute("UPDATE items SET name = ? WHERE id = ?", (name, row))
            if cursor.rowcount == 0:
                cursor.execute("INSERT INTO items (id, name) VALUES (?, ?)", (row, name))
            return name

        waiting = store.run_grouped(rename, 1, "grouped")
        free = store.run_grouped(rename, 2, "free")
        waiting.addCallback(done.append)
        assert await bounded(free) == "free"  # committed while the row is still held
        assert done == []
        holder.execute("COMMIT")
        await bounded(waiting)  # run alone after the holder let go
        assert done == ["grouped"]
    finally:
        holder.close()
        store.stopService()
    assert pg_rows(url, "SELECT id, name FROM items ORDER BY id") == [(1, "grouped"), (2, "free")]


@pytest_twisted.ensureDeferred
async def test_skip_locked_takes_different_rows(pg: Database) -> None:
    from twisted.internet import reactor

    url = pg.schema()
    store = store_for(url, reactor, pool=["CREATE TABLE pool (id INTEGER PRIMARY KEY, taken_by TEXT)"])
    store.migrate()
    store.startService()
    both_locked = threading.Barrier(2, timeout=BOUND)

    def take(cursor: Any, who: str) -> int:
        cursor.execute("SELECT id FROM pool WHERE taken_by IS NULL ORDER BY id LIMIT 1"
                       + store.dialect.for_update(skip_locked=True))
        row_id = int(cursor.fetchone()[0])
        both_locked.wait()  # each holds its row while the other picks
        cursor.execute("UPDATE pool SET taken_by = ? WHERE id = ?", (who, row_id))
        return row_id

    try:
        await bounded(store.run_interaction(lambda c: c.executemany("INSERT INTO pool (taken_by) VALUES (?)",
                                                                      [(None,)] * 3)))
        taken = await outcomes([store.run_interaction(take, "a"), store.run_interaction(take, "b")])
    finally:
        store.stopService()
    assert sorted(taken) == [1, 2]


# every schema fedserver and its plugins register, from a real configuration


def _all_plugins_config(tmp: Any, database: str) -> str:
    from fedserver.pki import create_dev_pki
    from fedserver_matrix.keys import generate_signing_key, write_signing_keys

    pki = os.path.join(tmp, "pki")
    if not os.path.exists(os.path.join(pki, "ca.pem")):
        create_dev_pki(pki, ["fed.b.example"])
        write_signing_keys(os.path.join(tmp, "signing.key"), [generate_signing_key("k1")])
        with open(os.path.join(tmp, "app.token"), "w") as f:
            f.write(secrets.token_urlsafe(32) + "\n")
    config = {
        "server": {"backend_domain": "b.example", "infra_domain": "fed.b.example",
                   "data_dir": os.path.join(tmp, "var")},
        "inward": {"listen": "tcp:0:interface=127.0.0.1"},
        "outward": {"listen": "tcp:0:interface=127.0.0.1"},
        "tls": {"certificate": os.path.join(pki, "fed.b.example.pem"),
                "private_key": os.path.join(pki, "fed.b.example.key"),
                "ca_certificates": [os.path.join(pki, "ca.pem")]},
        "storage": {"database": database},
        "discovery": {"plugin": "static"},
        # the Matrix authenticator keeps other servers' keys; with it the Matrix routes keep transactions
        "authenticator": {"plugin": "matrix-signature", "server_name": "b.example",
                          "signing_key": os.path.join(tmp, "signing.key")},
        "authorizers": [{"plugin": "allow-list", "allow_all": True}],
        "identity_providers": {"handles": {"plugin": "basic"}},
        "components": {
            "brig": {"plugin": "wire-brig"},
            "galley": {"plugin": "wire-galley"},
            "matrix": {"plugin": "matrix-http", "url": "http://127.0.0.1:9"},
            "mimi": {"plugin": "mimi-gateway", "apps": [
                {"id": "0b5e2c1e-6a47-4d1c-9a3e-5f4c8d2b7a10", "name": "chat", "identity_provider": "handles",
                 "token_file": os.path.join(tmp, "app.token")}]},
        },
    }
    path = os.path.join(tmp, f"{secrets.token_hex(4)}.toml")
    with open(path, "w") as f:
        f.write(to_toml(config))
    return path


def _built(config_path: str) -> Store:
    from twisted.internet.testing import MemoryReactorClock

    from fedserver.service import build_service

    store = build_service(config_path, reactor=MemoryReactorClock(), listen=False).context.storage
    assert isinstance(store, Store)
    return store


def test_every_registered_schema_migrates_on_postgresql(pg: Database, tmp_path: Any) -> None:
    url = pg.schema()
    store = _built(_all_plugins_config(str(tmp_path), url))
    owners = set(store._schemas)
    assert {"wire-reference", "matrix-keys", "matrix-transactions", "mimi-gateway"} <= owners
    expected = {owner: len(steps) for owner, steps in store._schemas.items()}
    assert dict(pg_rows(url, "SELECT owner, version FROM fedserver_schema")) == expected

    # the same tables and columns as on SQLite
    sqlite_store = _built(_all_plugins_config(str(tmp_path), f"sqlite:{tmp_path / 'all.sqlite'}"))
    assert set(sqlite_store._schemas) == owners
    connection = sqlite3.connect(sqlite_store.path)
    try:
        sqlite_tables = {
            table: {row[1] for row in connection.execute(f"PRAGMA table_info({table})")}
            for (table,) in connection.execute("SELECT name FROM sqlite_master WHERE type = 'table' "
                                               "AND name NOT LIKE 'sqlite_%'")
        }
    finally:
        connection.close()
    pg_tables: Dict[str, set] = {}
    for table, column, kind in pg_rows(url, "SELECT table_name, column_name, data_type FROM information_schema.columns "
                                            "WHERE table_schema = current_schema()"):
        pg_tables.setdefault(table, set()).add(column)
        # nothing 32-bit: SQLite's INTEGER and REAL are 64-bit
        assert kind not in ("integer", "smallint", "real"), (table, column, kind)
    assert pg_tables == sqlite_tables

    # a second start applies nothing; the check finds nothing to refuse
    assert _built(_all_plugins_config(str(tmp_path), url)).migrate() == []


# two fedserver processes on one database


BACKEND, INFRA = "b.example", "fed.b.example"
APP_ID = "0b5e2c1e-6a47-4d1c-9a3e-5f4c8d2b7a10"
TARGET = b"pool-target"
#: KeyPackages in the pool, and receivers claiming concurrently (more than the pool)
POOL, CLAIMS = 500, 800
#: the second round: receivers that each claim several times at once, through both workers
SAME_RECEIVERS, CLAIMS_EACH, EXTRA = 10, 6, 20
THREADS = 32


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


class API:
    """The gateway's internal interface on one worker."""

    def __init__(self, port: int, token: str) -> None:
        self.port = port
        self.headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}

    def call(self, method: str, path: str, body: Any = None) -> Tuple[int, Any]:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=BOUND)
        try:
            connection.request(method, path, body=None if body is None else json.dumps(body).encode(),
                               headers=self.headers)
            response = connection.getresponse()
            return response.status, json.loads(response.read() or b"null")
        finally:
            connection.close()

    def ok(self, method: str, path: str, body: Any = None) -> Any:
        status, answer = self.call(method, path, body)
        assert status in (200, 201), (method, path, status, answer)
        return answer


def _key_packages(count: int) -> List[bytes]:
    import nacl.signing

    from fedserver_mimi.encode import make_key_package

    key = nacl.signing.SigningKey.generate()
    now = int(time.time())
    return [make_key_package(key, identity=TARGET, not_before=now - 3600, not_after=now + 86400)
            for _ in range(count)]


@pytest.fixture
def workers(pg: Database, tmp_path: Any) -> Iterator[Tuple[str, List[Fedserver], List[API]]]:
    from fedserver.pki import create_dev_pki

    url = pg.schema()
    pki = str(tmp_path / "pki")
    create_dev_pki(pki, [INFRA])
    token = secrets.token_urlsafe(32)
    (tmp_path / "app.token").write_text(token + "\n")

    def config(name: str) -> Dict[str, Any]:
        return {
            "server": {"backend_domain": BACKEND, "infra_domain": INFRA, "data_dir": f"var/{name}"},
            "inward": {"listen": f"tcp:{free_port()}:interface=127.0.0.1"},
            "outward": {"listen": f"tcp:{free_port()}:interface=127.0.0.1"},
            "tls": {"certificate": f"{pki}/{INFRA}.pem", "private_key": f"{pki}/{INFRA}.key",
                    "ca_certificates": [f"{pki}/ca.pem"]},
            "storage": {"database": url},
            "discovery": {"plugin": "static"},
            "authenticator": {"plugin": "mtls"},
            "authorizers": [{"plugin": "allow-list", "allow_all": True}],
            "identity_providers": {"handles": {"plugin": "basic"}},
            "components": {"mimi": {
                "plugin": "mimi-gateway", "key_packages_per_queue": 1000,
                "apps": [{"id": APP_ID, "name": "chat", "identity_provider": "handles",
                          "token_file": str(tmp_path / "app.token")}],
            }},
        }

    # both start at once, on an empty database: one migrates, the other waits for it
    configs = [config("w1"), config("w2")]
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        starting = [pool.submit(Fedserver, str(tmp_path), f"w{i + 1}", c) for i, c in enumerate(configs)]
        started, failures = [], []
        for future in starting:
            try:
                started.append(future.result())
            except Exception as e:
                failures.append(e)
    try:
        if failures:
            raise failures[0]
        yield url, started, [API(w.outward_port or 0, token) for w in started]
    finally:
        for worker in started:
            stop(worker.process)
            if worker.process.stdout is not None:
                worker.process.stdout.close()


def test_two_workers_never_hand_out_a_key_package_twice(workers: Tuple[str, List[Fedserver], List[API]]) -> None:
    url, processes, apis = workers
    app = f"/mimi/apps/{APP_ID}"

    # each schema step was applied by one of the two processes, once
    applied = [line.split("applied ", 1)[1].strip() for w in processes for line in w.log().splitlines()
               if "applied " in line and "schema step" in line]
    assert sorted(applied) == sorted(set(applied)) and any("mimi-gateway schema step 1" in a for a in applied)

    # the setup, through the first worker: a client, its queue, its KeyPackages; receivers through both
    target = apis[0].ok("POST", f"{app}/clients", {"clientHandle": _b64(TARGET)})["clientId"]
    queue = apis[0].ok("POST", f"{app}/clients/{target}/queues", {"protocolVersion": 1, "cipherSuite": 1})["queueId"]
    made = time.perf_counter()
    key_packages = _key_packages(POOL + EXTRA)
    made = time.perf_counter() - made
    for start in range(0, POOL, 100):
        apis[0].ok("PATCH", f"{app}/clients/{target}/queues/{queue}",
                   {"keyPackages": [_b64(kp) for kp in key_packages[start:min(start + 100, POOL)]]})
    with concurrent.futures.ThreadPoolExecutor(THREADS) as pool:
        receivers = list(pool.map(
            lambda i: apis[i % 2].ok("POST", f"{app}/clients", {"clientHandle": _b64(b"receiver-%d" % i)})["clientId"],
            range(CLAIMS + SAME_RECEIVERS)))
    claim_path = f"{app}/clients/{target}/keyPackage?protocolVersion=1&cipherSuite=1&receiverClientId="

    # the hammer: every receiver claims once, alternately through each worker, THREADS at a time
    def claim(i: int, receiver: str) -> Tuple[int, str, Any]:
        status, answer = apis[i % 2].call("GET", claim_path + receiver)
        return status, receiver, answer

    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(THREADS) as pool:
        answers = list(pool.map(claim, range(CLAIMS), receivers[:CLAIMS]))
    elapsed = time.perf_counter() - started
    statuses = sorted({status for status, _, _ in answers})
    assert set(statuses) <= {200, 404}, [a for a in answers if a[0] not in (200, 404)][:3]
    given = {receiver: answer["keyPackage"] for status, receiver, answer in answers if status == 200}
    assert all(answer["label"] == "no-key-package" for status, _, answer in answers if status == 404)
    assert len(given) == min(CLAIMS, POOL)
    assert len(set(given.values())) == len(given), "a KeyPackage was handed out twice"

    # the database agrees: each claimed KeyPackage held by one receiver, who got it in the answer
    held = pg_rows(url, "SELECT claimed_by, data FROM mimi_key_packages WHERE claimed_by IS NOT NULL")
    assert len(held) == len(given) == len({r for r, _ in held})
    assert {receiver: _b64(bytes(data)) for receiver, data in held} == {
        f"{BACKEND}/{r}": kp for r, kp in given.items()}

    # the second round: each receiver claims several times at once through both workers, and always gets
    # the one KeyPackage it holds
    apis[1].ok("PATCH", f"{app}/clients/{target}/queues/{queue}",
               {"keyPackages": [_b64(kp) for kp in key_packages[POOL:]]})
    same = receivers[CLAIMS:]
    jobs = [(i, same[i % SAME_RECEIVERS]) for i in range(SAME_RECEIVERS * CLAIMS_EACH)]
    with concurrent.futures.ThreadPoolExecutor(THREADS) as pool:
        again = list(pool.map(lambda job: claim(*job), jobs))
    assert {status for status, _, _ in again} == {200}, again[:3]
    by_receiver: Dict[str, set] = {}
    for _, receiver, answer in again:
        by_receiver.setdefault(receiver, set()).add(answer["keyPackage"])
    assert all(len(kps) == 1 for kps in by_receiver.values()), by_receiver
    assert len({kp for kps in by_receiver.values() for kp in kps} | set(given.values())) == POOL + SAME_RECEIVERS
    held = pg_rows(url, "SELECT claimed_by, count(*) FROM mimi_key_packages WHERE claimed_by IS NOT NULL "
                        "GROUP BY claimed_by HAVING count(*) > 1")
    assert held == []

    print(f"\ntwo workers on PostgreSQL: {CLAIMS} claims for distinct receivers against a pool of {POOL}, "
          f"{THREADS} at a time: {len(given)} given, {CLAIMS - len(given)} answered no-key-package, 0 twice; "
          f"{CLAIMS / elapsed:.0f} claims/s ({elapsed:.2f} s); then {len(jobs)} concurrent claims by "
          f"{SAME_RECEIVERS} receivers: one KeyPackage each ({made:.2f} s to make {POOL + EXTRA} KeyPackages)")


# Matrix transactions, shared


def transaction_workers(url: str) -> Tuple[List[Store], List[Any]]:
    """Two processes' stores on one database, running, each with its Matrix transactions."""
    from twisted.internet import reactor

    from fedserver_matrix.transactions import Transactions

    stores = [Store(url, reactor=reactor) for _ in range(2)]
    workers = [Transactions(store, reactor) for store in stores]
    stores[0].migrate()
    for store in stores:
        store.startService()
    return stores, workers


@pytest_twisted.ensureDeferred
async def test_matrix_transaction_answers_are_shared_by_two_stores(pg: Database) -> None:
    from fedserver.values import Response

    url = pg.schema()
    stores, workers = transaction_workers(url)
    processed: List[str] = []

    def process(worker: str) -> Any:
        def run() -> Deferred:
            processed.append(worker)
            return Deferred.fromCoroutine(_answer())
        return run

    async def _answer() -> Response:
        return Response(200, [("Content-Type", "application/json")], b'{"pdus": {}}')

    body = b'{"pdus": [], "edus": []}'
    try:
        first = await bounded(workers[0].handle("a.example", "txn1", body, process("one")))
        again = await bounded(workers[1].handle("a.example", "txn1", body, process("two")))
        other = await bounded(workers[1].handle("a.example", "txn2", body, process("two")))
    finally:
        for store in stores:
            store.stopService()
    assert processed == ["one", "two"]  # txn1 once, by the first; txn2 by the second
    assert (again.code, again.body) == (first.code, first.body) == (200, b'{"pdus": {}}')
    assert other.code == 200
    rows = pg_rows(url, "SELECT origin, txn_id, received_ms FROM matrix_transactions ORDER BY txn_id")
    assert [r[:2] for r in rows] == [("a.example", "txn1"), ("a.example", "txn2")]
    assert all(r[2] > 2**31 for r in rows)  # milliseconds: a 64-bit column


@pytest_twisted.ensureDeferred
async def test_one_matrix_transaction_in_flight_per_origin_across_stores(pg: Database) -> None:
    """Two processes' stores: while one processes a.example's transaction, the other refuses the next."""
    from twisted.internet import reactor

    from fedserver.values import Response

    url = pg.schema()
    stores, workers = transaction_workers(url)
    answer = Response(200, [("Content-Type", "application/json")], b'{"pdus": {}}')
    pending: Deferred = Deferred()
    calls: List[str] = []

    def process(worker: str, result: Any) -> Any:
        def run() -> Deferred:
            calls.append(worker)
            return result
        return run

    body = b'{"pdus": [], "edus": []}'
    try:
        first = workers[0].handle("a.example", "txn1", body, process("one", pending))
        while not calls:  # the first has its lease and is processing
            await bounded(deferLater(reactor, 0.01))
        with pytest.raises(FederationError) as refused:
            await bounded(workers[1].handle("a.example", "txn2", body, process("two", succeed(answer))))
        other = await bounded(workers[1].handle("b.example", "txn1", body, process("two", succeed(answer))))
        pending.callback(answer)
        assert (await bounded(first)).code == 200
        after = await bounded(workers[1].handle("a.example", "txn2", body, process("two", succeed(answer))))
    finally:
        for store in stores:
            store.stopService()
    assert (refused.value.code, refused.value.label) == (429, "too-many-requests")
    assert refused.value.headers == [("Retry-After", "1")]
    assert other.code == after.code == 200
    assert calls == ["one", "two", "two"]  # a.example's txn2 only once the lease was let go
    assert pg_rows(url, "SELECT COUNT(*) FROM matrix_transactions_in_flight") == [(0,)]


def test_a_transaction_answered_while_another_process_waits_is_replayed(pg: Database) -> None:
    """
    Process A stores its answer to txn1 and lets the origin go in one
    database transaction; process B, asked the same txn1 meanwhile, waits
    for A's commit on the lease and then replays A's answer: it does not
    take the origin and process txn1 a second time.
    """
    from fedserver import _postgresql
    from fedserver.values import Response
    from fedserver_matrix.transactions import Transactions

    url = pg.schema()
    store = Store(url, reactor=None)
    transactions = Transactions(store, None)
    store.migrate()
    answer = Response(200, [("Content-Type", "application/json")], b'{"pdus": {}}')
    now = int(time.time() * 1000)
    with _postgresql.connect(url) as a, _postgresql.connect(url) as b:
        a_cursor, b_cursor = a.cursor(), b.cursor()
        a_cursor.execute("BEGIN")
        assert transactions._begin(a_cursor, "a.example", "txn1", "process-a", now) is True
        a_cursor.execute("COMMIT")
        # A has processed txn1: its answer and the release, not committed yet
        a_cursor.execute("BEGIN")
        Transactions._end(a_cursor, "a.example", "txn1", "process-a", answer, now)
        seen: List[Any] = []

        def process_b() -> None:
            b_cursor.execute("BEGIN")
            seen.append(transactions._begin(b_cursor, "a.example", "txn1", "process-b", now))
            b_cursor.execute("COMMIT")

        waiter = threading.Thread(target=process_b)
        waiter.start()
        waiter.join(0.5)
        assert waiter.is_alive(), f"B did not wait for A's lease: {seen}"
        a_cursor.execute("COMMIT")
        waiter.join(BOUND)
        assert not waiter.is_alive()
    assert seen == [(200, b'{"pdus": {}}')]
    assert pg_rows(url, "SELECT COUNT(*) FROM matrix_transactions_in_flight") == [(0,)]


@pytest_twisted.ensureDeferred
async def test_a_database_restart_loses_nothing_that_was_answered(pg: Database) -> None:
    """
    The server drops every connection of the store, as a restart does: what
    was committed before is there, a work that meets a dropped connection
    fails (it is never reported done), and the pool reconnects for the next.
    """
    from twisted.internet import reactor

    url = pg.schema()
    store = store_for(url, reactor, items=[ITEMS_V1])
    store.migrate()
    store.startService()
    try:
        for name in ("before-1", "before-2"):
            await bounded(store.run_operation("INSERT INTO items (name) VALUES (?)", [name]))
        terminated = pg_rows(
            pg.url,
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid()",
        )
        assert terminated and all(ok for (ok,) in terminated)
        answered = []
        for attempt in range(20):  # every pooled connection was dropped; each fails once, then reconnects
            try:
                await bounded(store.run_operation("INSERT INTO items (name) VALUES (?)", [f"after-{attempt}"]))
            except psycopg.OperationalError:
                continue
            answered.append(f"after-{attempt}")
            if len(answered) == 3:
                break
        assert len(answered) == 3
        stored = [name for (name,) in pg_rows(url, "SELECT name FROM items ORDER BY id")]
        # everything answered is stored, and nothing that failed is
        assert stored == ["before-1", "before-2", *answered]
    finally:
        store.stopService()
