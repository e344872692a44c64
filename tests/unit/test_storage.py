"""
Tests for fedserver.storage.  Migrations run blocking, as at startup; the
asynchronous methods run on adbapi's threads, so those few tests use the real
reactor through pytest-twisted, each bounded in time.
"""

from __future__ import annotations

import sqlite3

import pytest
import pytest_twisted
from twisted.internet.defer import Deferred

from fedserver.errors import ConfigError
from fedserver.storage import Store, _statements

ITEMS_V1 = "CREATE TABLE items (id INTEGER PRIMARY KEY, name TEXT NOT NULL)"
ITEMS_V2 = "ALTER TABLE items ADD COLUMN colour TEXT; CREATE INDEX items_name ON items (name)"

#: seconds any database operation in these tests may take
BOUND = 10


def store_at(path, **schemas) -> Store:
    store = Store(f"sqlite:{path}", reactor=None)
    for owner, steps in schemas.items():
        store.register_schema(owner, steps)
    return store


def rows(path, sql, params=()):
    connection = sqlite3.connect(str(path))
    try:
        return connection.execute(sql, params).fetchall()
    finally:
        connection.close()


def versions(path):
    return dict(rows(path, "SELECT owner, version FROM fedserver_schema"))


def tables(path):
    return {name for (name,) in rows(path, "SELECT name FROM sqlite_master WHERE type = 'table'")}


@pytest.fixture
def db(tmp_path):
    return tmp_path / "data" / "fedserver.sqlite"


# URLs


@pytest.mark.parametrize("url", ["postgresql://db/fed", "mysql:x", "/var/fed.sqlite"])
def test_unsupported_urls(url):
    with pytest.raises(ConfigError, match="is not a supported database URL") as info:
        Store(url, reactor=None)
    assert info.value.path == "[storage] database"


def test_sqlite_needs_a_file():
    with pytest.raises(ConfigError, match="names no file"):
        Store("sqlite:", reactor=None)


# schemas and migrations


def test_migrations_apply_in_order_and_record_the_version(db):
    store = store_at(db, items=[ITEMS_V1, ITEMS_V2], keys=["CREATE TABLE keys (k TEXT)"])
    assert store.migrate() == [("items", 1), ("items", 2), ("keys", 1)]
    assert versions(db) == {"items": 2, "keys": 1}
    assert {"items", "keys", "fedserver_schema"} <= tables(db)
    assert [c[1] for c in rows(db, "PRAGMA table_info(items)")] == ["id", "name", "colour"]


def test_a_second_run_changes_nothing(db):
    store_at(db, items=[ITEMS_V1, ITEMS_V2]).migrate()
    assert store_at(db, items=[ITEMS_V1, ITEMS_V2]).migrate() == []
    assert versions(db) == {"items": 2}


def test_only_new_steps_run(db):
    store_at(db, items=[ITEMS_V1]).migrate()
    rows(db, "SELECT 1")
    assert store_at(db, items=[ITEMS_V1, ITEMS_V2]).migrate() == [("items", 2)]
    assert versions(db) == {"items": 2}


def test_a_database_newer_than_the_code_is_refused(db):
    store_at(db, items=[ITEMS_V1, ITEMS_V2]).migrate()
    with pytest.raises(ConfigError) as info:
        store_at(db, items=[ITEMS_V1]).migrate()
    assert info.value.path == "[storage] database"
    assert "items schema version 2, but this fedserver knows only up to 1" in info.value.reason


def test_a_failing_step_is_rolled_back(db):
    broken = "CREATE TABLE half (x INTEGER); INSERT INTO no_such_table VALUES (1)"
    with pytest.raises(ConfigError, match=r"\[storage\] database: items schema step 2 failed in .*no such table"):
        store_at(db, items=[ITEMS_V1, broken]).migrate()
    assert versions(db) == {"items": 1}
    assert "half" not in tables(db)
    assert store_at(db, items=[ITEMS_V1, "CREATE TABLE half (x INTEGER)"]).migrate() == [("items", 2)]


def test_sqlite_runs_in_wal_mode(db):
    store_at(db, items=[ITEMS_V1]).migrate()
    assert rows(db, "PRAGMA journal_mode") == [("wal",)]


def test_a_database_that_cannot_be_opened(tmp_path):
    (tmp_path / "dir.sqlite").mkdir()
    with pytest.raises(ConfigError, match="cannot open"):
        store_at(tmp_path / "dir.sqlite").migrate()


def test_registering_a_schema_twice():
    store = Store("sqlite:/nonexistent/x.sqlite", reactor=None)
    store.register_schema("items", [ITEMS_V1])
    store.register_schema("items", (ITEMS_V1,))
    with pytest.raises(ValueError, match="two different schemas are registered for 'items'"):
        store.register_schema("items", [ITEMS_V1, ITEMS_V2])


def test_statements_split_on_semicolons_outside_literals_and_triggers():
    script = """
        CREATE TABLE t (v TEXT DEFAULT 'a;b');
        -- a comment; with a semicolon
        CREATE TRIGGER t_log AFTER INSERT ON t BEGIN
            INSERT INTO t (v) SELECT 'x;y' WHERE 0;
        END;
        CREATE INDEX t_v ON t (v)
    """
    statements = _statements(script)
    assert len(statements) == 3
    assert statements[0].startswith("CREATE TABLE t") and "'a;b'" in statements[0]
    assert "CREATE TRIGGER" in statements[1] and statements[1].rstrip(";").endswith("END")
    assert statements[2].startswith("CREATE INDEX")


def test_a_step_with_a_trigger_migrates(db):
    step = (
        "CREATE TABLE t (v TEXT); CREATE TABLE log (v TEXT);"
        "CREATE TRIGGER t_log AFTER INSERT ON t BEGIN INSERT INTO log VALUES (new.v); END"
    )
    store_at(db, t=[step]).migrate()
    connection = sqlite3.connect(str(db))
    connection.execute("INSERT INTO t VALUES ('a;b')")
    connection.commit()
    connection.close()
    assert rows(db, "SELECT v FROM log") == [("a;b",)]


def test_methods_need_a_running_store(db):
    with pytest.raises(RuntimeError, match="startService was not called"):
        store_at(db).run_query("SELECT 1")


# the asynchronous methods, on adbapi threads


@pytest.fixture
def running(db):
    from twisted.internet import reactor

    store = Store(f"sqlite:{db}", reactor=reactor)
    store.register_schema("items", [ITEMS_V1])
    store.migrate()
    store.startService()
    yield store
    store.stopService()


def bounded(d: Deferred) -> Deferred:
    from twisted.internet import reactor

    return d.addTimeout(BOUND, reactor)


@pytest_twisted.ensureDeferred
async def test_operations_commit_and_queries_read(running, db):
    await bounded(running.run_operation("INSERT INTO items (name) VALUES (?)", ["alice"]))
    assert rows(db, "SELECT name FROM items") == [("alice",)]
    assert await bounded(running.run_query("SELECT id, name FROM items WHERE name = ?", ("alice",))) == [(1, "alice")]


@pytest_twisted.ensureDeferred
async def test_an_interaction_is_one_transaction(running, db):
    def add_two(cursor, first, second):
        cursor.execute("INSERT INTO items (name) VALUES (?)", (first,))
        cursor.execute("INSERT INTO items (name) VALUES (?)", (second,))
        return cursor.execute("SELECT count(*) FROM items").fetchone()[0]

    assert await bounded(running.run_interaction(add_two, "a", "b")) == 2
    assert rows(db, "SELECT name FROM items ORDER BY id") == [("a",), ("b",)]


@pytest_twisted.ensureDeferred
async def test_a_failing_interaction_is_rolled_back(running, db):
    def add_then_fail(cursor):
        cursor.execute("INSERT INTO items (name) VALUES ('ghost')")
        cursor.execute("INSERT INTO items (name) VALUES (NULL)")

    with pytest.raises(sqlite3.IntegrityError):
        await bounded(running.run_interaction(add_then_fail))
    assert rows(db, "SELECT name FROM items") == []
    await bounded(running.run_operation("INSERT INTO items (name) VALUES ('after')"))
    assert rows(db, "SELECT name FROM items") == [("after",)]


def test_stopping_closes_the_pool(running):
    running.stopService()
    with pytest.raises(RuntimeError):
        running.run_query("SELECT 1")


# group commit: run_grouped


def insert(cursor, name):
    cursor.execute("INSERT INTO items (name) VALUES (?)", (name,))
    return cursor.lastrowid


def names(db):
    return [name for (name,) in rows(db, "SELECT name FROM items ORDER BY id")]


async def outcomes(deferreds):
    """Each Deferred's result, or its failure's exception, in order."""
    found = []
    for d in deferreds:
        try:
            found.append(await bounded(d))
        except Exception as e:  # the failure is the outcome here
            found.append(e)
    return found


@pytest_twisted.ensureDeferred
async def test_grouped_works_given_together_share_one_commit(running, db):
    # the first starts a group at once; the four given while it runs wait and form the next one
    results = await outcomes([running.run_grouped(insert, name) for name in "abcde"])
    assert results == [1, 2, 3, 4, 5]
    assert names(db) == ["a", "b", "c", "d", "e"]
    assert running.groups_committed == 2


@pytest_twisted.ensureDeferred
async def test_grouped_works_run_in_order_and_see_the_changes_before_them(running, db):
    def count(cursor):
        return cursor.execute("SELECT count(*) FROM items").fetchone()[0]

    first = running.run_grouped(insert, "alone")
    together = [running.run_grouped(insert, "a"), running.run_grouped(count), running.run_grouped(insert, "b"),
                running.run_grouped(count)]
    assert await outcomes([first, *together]) == [1, 2, 2, 3, 3]


@pytest_twisted.ensureDeferred
async def test_a_failing_grouped_work_is_rolled_back_alone(running, db):
    def insert_then_fail(cursor, name):
        insert(cursor, name)
        raise ValueError(f"{name} refused")

    first = running.run_grouped(insert, "first")
    group = [running.run_grouped(insert, "x"), running.run_grouped(insert_then_fail, "ghost"),
             running.run_grouped(insert, "z"), running.run_grouped(insert, None)]  # NOT NULL: an IntegrityError
    results = await outcomes([first, *group])
    assert results[:2] == [1, 2] and results[3] == 3  # the ghost's row is gone: z takes the next id
    assert isinstance(results[2], ValueError) and str(results[2]) == "ghost refused"
    assert isinstance(results[4], sqlite3.IntegrityError)
    assert names(db) == ["first", "x", "z"]
    assert running.groups_committed == 2


@pytest_twisted.ensureDeferred
async def test_a_work_that_breaks_the_transaction_fails_its_whole_group(running, db):
    def end_the_transaction(cursor):
        cursor.execute("ROLLBACK")

    first = running.run_grouped(insert, "kept")
    group = [running.run_grouped(insert, "lost"), running.run_grouped(end_the_transaction),
             running.run_grouped(insert, "lost too")]
    results = await outcomes([first, *group])
    assert results[0] == 1
    assert all(isinstance(r, sqlite3.OperationalError) for r in results[1:]), results
    assert names(db) == ["kept"]
    # the store goes on
    assert await bounded(running.run_grouped(insert, "after")) == 2
    assert names(db) == ["kept", "after"]


@pytest_twisted.ensureDeferred
async def test_a_failing_commit_fails_the_whole_group_and_keeps_nothing(running, db):
    def tables(cursor):
        cursor.execute("CREATE TABLE parents (id INTEGER PRIMARY KEY)")
        cursor.execute("CREATE TABLE children (parent INTEGER REFERENCES parents (id) DEFERRABLE INITIALLY DEFERRED)")

    await bounded(running.run_interaction(tables))

    def orphan(cursor):  # accepted now, refused by the commit (a deferred foreign key)
        cursor.execute("INSERT INTO children (parent) VALUES (99)")

    first = running.run_grouped(insert, "kept")
    group = [running.run_grouped(insert, "lost"), running.run_grouped(orphan)]
    results = await outcomes([first, *group])
    assert results[0] == 1
    assert all(isinstance(r, sqlite3.IntegrityError) for r in results[1:]), results
    assert names(db) == ["kept"]
    assert rows(db, "SELECT count(*) FROM children") == [(0,)]
    assert await bounded(running.run_grouped(insert, "after")) == 2


@pytest_twisted.ensureDeferred
async def test_groups_are_bounded(running, db, monkeypatch):
    import fedserver.storage

    monkeypatch.setattr(fedserver.storage, "MAX_GROUP", 3)
    results = await outcomes([running.run_grouped(insert, str(i)) for i in range(8)])
    assert results == list(range(1, 9))
    assert running.groups_committed == 4  # 1, then 3, 3 and 1 of those that waited


@pytest_twisted.ensureDeferred
async def test_a_cancelled_grouped_work_still_runs_as_given(running, db):
    first = running.run_grouped(insert, "a")
    cancelled = running.run_grouped(insert, "b")
    cancelled.cancel()
    last = running.run_grouped(insert, "c")
    results = await outcomes([first, cancelled, last])
    assert results[0] == 1 and results[2] == 3
    assert type(results[1]).__name__ == "CancelledError"
    assert names(db) == ["a", "b", "c"]  # as with run_interaction, cancelling does not undo the work


@pytest_twisted.ensureDeferred
async def test_stopping_fails_the_works_still_waiting(running, db):
    running.run_grouped(insert, "running")
    waiting = running.run_grouped(insert, "waiting")
    running.stopService()
    with pytest.raises(RuntimeError, match="the store stopped before this work ran"):
        await bounded(waiting)
    with pytest.raises(RuntimeError, match="startService was not called"):
        running.run_grouped(insert, "later")
