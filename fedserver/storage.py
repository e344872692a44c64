"""
fedserver's store: a small asynchronous database layer on
L{twisted.enterprise.adbapi}.

The database is named by a URL: C{sqlite:PATH} (the default is
C{fedserver.sqlite} in C{[server] data_dir}), or C{postgresql://...} (a libpq
URL, through psycopg 3), which several fedserver processes may share.  SQL is
written portably, in SQLite's dialect with C{?} placeholders; on PostgreSQL
every statement is translated in one place, L{fedserver._postgresql.translate}
(placeholders, C{INTEGER} as C{BIGINT}, C{BLOB} as C{BYTEA}, C{REAL} as
C{DOUBLE PRECISION}, C{INTEGER PRIMARY KEY} as an identity column).  What
cannot be written the same way for both, row locks, comes from
L{Store.dialect}.

Each plugin that keeps data registers its schema as an ordered list of
migration steps under its own name; L{Store.migrate} applies the steps a
database lacks, each in a transaction with its version record, at startup
and before any listener accepts a connection (on PostgreSQL under an
advisory lock, so that processes starting together migrate one after the
other).  SQLite runs in WAL mode with C{synchronous=FULL}: a write that was
reported done survives a crash.

SQLite has one writer at a time: each transaction starts with C{BEGIN
IMMEDIATE} on the store's one connection, so transactions never interleave.
PostgreSQL runs a pool of connections at READ COMMITTED: transactions of this
process and of others run side by side, SQL that must not race takes row
locks (L{Dialect.for_update}, L{Dialect.lock}), and a transaction that
collides with another one (a deadlock, or a unique key taken between its
check and its insert) is run again (see L{fedserver._postgresql}).

Every commit waits for the disk.  Small writes that arrive together (a
request each) may use L{Store.run_grouped}: they are run one after the other
in one transaction, each in its own savepoint, and committed together (group
commit), so that one wait for the disk serves all of them; on both databases.
"""

from __future__ import annotations

import os
import sqlite3
from types import ModuleType
from typing import Any, Callable, Dict, Iterable, List, Sequence, Tuple

from twisted.application.service import Service
from twisted.enterprise import adbapi
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from fedserver.errors import ConfigError

log = Logger(namespace="fedserver.storage")

_SCHEMA_TABLE = """
CREATE TABLE IF NOT EXISTS fedserver_schema (
    owner TEXT PRIMARY KEY,
    version INTEGER NOT NULL
)
"""

_POSTGRESQL_SCHEMES = ("postgresql://", "postgres://")


def _prepare_sqlite(connection: sqlite3.Connection) -> None:
    connection.execute("PRAGMA journal_mode=WAL")
    connection.execute("PRAGMA synchronous=FULL")
    connection.execute("PRAGMA foreign_keys=ON")
    connection.execute("PRAGMA busy_timeout=5000")


#: at most this many works of L{Store.run_grouped} share one transaction
MAX_GROUP = 256

#: connections of a PostgreSQL store (each with its thread); one for SQLite
POSTGRESQL_CONNECTIONS = 10


class Dialect:
    """
    What portable SQL cannot say the same way on both databases: row locks.
    A plugin takes it from L{Store.dialect} and passes it to its works.

    On SQLite each transaction holds the whole database for writing (C{BEGIN
    IMMEDIATE}), so every lock is already held and these give nothing; on
    PostgreSQL they take the locks that make a read-then-write safe against
    the other connections and processes.

    @ivar name: C{"sqlite"} or C{"postgresql"}.
    """

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return f"<Dialect {self.name}>"

    def for_update(self, of: str = "", *, skip_locked: bool = False) -> str:
        """
        The clause to append to a C{SELECT} (after C{ORDER BY} and
        C{LIMIT}) that locks the rows it reads until the transaction ends:
        C{" FOR UPDATE"}, C{" FOR UPDATE OF t"} to lock only table (or
        alias) C{of} of a join, and with C{skip_locked} C{" ... SKIP
        LOCKED"}: rows another transaction holds are passed over instead of
        waited for, so concurrent claims take different rows of a pool.
        C{""} on SQLite.
        """
        if self.name != "postgresql":
            return ""
        return " FOR UPDATE" + (f" OF {of}" if of else "") + (" SKIP LOCKED" if skip_locked else "")

    def lock(self, cursor: Any, key: str) -> None:
        """
        Hold the lock named C{key} (any string) until the transaction ends;
        wait while another transaction holds it: one way to make
        transactions about the same thing (a receiver, a name) run one after
        the other when there is no row to lock yet.  Nothing on SQLite.
        """
        if self.name == "postgresql":
            cursor.execute("SELECT pg_advisory_xact_lock(hashtextextended(?, 0))", ("fedserver: " + key,))


SQLITE = Dialect("sqlite")
POSTGRESQL = Dialect("postgresql")


def _load_postgresql(url: str) -> ModuleType:
    try:
        from fedserver import _postgresql
    except ImportError:
        raise ConfigError(
            "a postgresql:// database needs psycopg 3, which is not installed; install it with "
            "pip install 'fedserver[postgresql]'",
            path="[storage] database",
        ) from None
    try:
        _postgresql.connection_options(url)
    except ValueError as e:
        where = _postgresql.display(url)
        raise ConfigError(f"{where} is not a PostgreSQL URL libpq reads: {str(e).replace(url, where)}",
                          path="[storage] database") from None
    return _postgresql


class Store(Service):
    """
    The database, as a service: the connection pool opens on start and
    closes on stop.

    @ivar url: the database URL it was made from.
    @ivar dialect: L{SQLITE} or L{POSTGRESQL}, for the SQL that differs.
    @ivar where: the database for messages: the SQLite file, or the URL
        without its password.
    @ivar path: the SQLite file (C{""} for PostgreSQL).
    """

    def __init__(self, url: str, *, reactor: Any) -> None:
        self.url = url
        self._reactor = reactor
        self._schemas: Dict[str, Sequence[str]] = {}
        self._pool: Any = None
        #: works of run_grouped waiting for the next group, and whether a group is running
        self._waiting: List[Tuple[Callable[..., Any], Tuple[Any, ...], Deferred[Any]]] = []
        self._grouping = False
        #: groups committed so far (each one transaction with its commit)
        self.groups_committed = 0
        self._pg: Any = None
        self._in_transaction: Callable[..., Any] = _in_transaction
        self._in_group: Callable[..., Any] = _in_group
        if url.startswith("sqlite:"):
            self.dialect = SQLITE
            self.path = url[len("sqlite:"):]
            if not self.path:
                raise ConfigError(f"{url!r} names no file; use sqlite:PATH", path="[storage] database")
            self.where = self.path
        elif url.startswith(_POSTGRESQL_SCHEMES):
            self.dialect = POSTGRESQL
            self._pg = _load_postgresql(url)
            self._in_transaction = self._pg.in_transaction
            self._in_group = self._pg.in_group
            self.path = ""
            self.where = self._pg.display(url)
        else:
            raise ConfigError(
                f"{url!r} is not a supported database URL; this version supports sqlite:PATH and "
                "postgresql://USER@HOST/DATABASE",
                path="[storage] database",
            )

    def register_schema(self, owner: str, steps: Sequence[str]) -> None:
        """
        Declare C{owner}'s tables as migration steps: step I{n} (from 1)
        takes the schema from version I{n-1} to I{n}.  Steps are never edited
        once released; a change is a new step.  Each step may hold several
        statements separated by semicolons, written portably (they are
        translated for PostgreSQL).
        """
        if owner in self._schemas and list(self._schemas[owner]) != list(steps):
            raise ValueError(f"two different schemas are registered for {owner!r}")
        self._schemas[owner] = list(steps)

    def _connect(self) -> sqlite3.Connection:
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        connection = sqlite3.connect(self.path, isolation_level=None)
        _prepare_sqlite(connection)
        return connection

    def migrate(self) -> List[Tuple[str, int]]:
        """
        Bring every registered schema up to date, blocking (this runs at
        startup, before the reactor serves anything).  Returns the
        C{(owner, version)} steps applied.

        @raise ConfigError: the database cannot be opened, or it is newer than
            this code.
        """
        if self._pg is not None:
            return self._migrate_postgresql()
        try:
            connection = self._connect()
        except sqlite3.Error as e:
            raise ConfigError(f"cannot open {self.path}: {e}", path="[storage] database") from None
        try:
            return self._apply_steps(connection.execute, "BEGIN IMMEDIATE", (sqlite3.Error,), str)
        finally:
            connection.close()

    def _migrate_postgresql(self) -> List[Tuple[str, int]]:
        pg = self._pg
        connection = self._connect_postgresql()
        try:
            cursor = connection.cursor()
            # released when the connection closes, if not before
            cursor.execute("SELECT pg_advisory_lock(hashtextextended(?, 0))", (pg.MIGRATION_LOCK,))
            warning = pg.warn_about_collation(cursor)
            if warning is not None:
                log.warn("{warning}", warning=warning)
            return self._apply_steps(cursor.execute, "BEGIN", (pg.Error,), pg.message)
        except pg.Error as e:
            raise ConfigError(f"cannot migrate {self.where}: {pg.message(e)}", path="[storage] database") from None
        finally:
            connection.close()

    def _connect_postgresql(self) -> Any:
        try:
            return self._pg.connect(self.url)
        except self._pg.Error as e:
            raise ConfigError(
                f"cannot connect to {self.where}: {self._pg.message(e)}", path="[storage] database"
            ) from None

    def _apply_steps(
        self, execute: Callable[..., Any], begin: str, errors: Tuple[type[BaseException], ...],
        describe: Callable[[Any], str],
    ) -> List[Tuple[str, int]]:
        applied = []
        execute(_SCHEMA_TABLE)
        for owner, steps in sorted(self._schemas.items()):
            row = execute("SELECT version FROM fedserver_schema WHERE owner = ?", (owner,)).fetchone()
            current = row[0] if row else 0
            self._check_version(owner, current)
            for version in range(current + 1, len(steps) + 1):
                execute(begin)
                try:
                    for statement in _statements(steps[version - 1]):
                        execute(statement)
                    execute(
                        "INSERT INTO fedserver_schema (owner, version) VALUES (?, ?) "
                        "ON CONFLICT (owner) DO UPDATE SET version = excluded.version",
                        (owner, version),
                    )
                    execute("COMMIT")
                except errors as e:
                    execute("ROLLBACK")
                    raise ConfigError(
                        f"{owner} schema step {version} failed in {self.where}: {describe(e)}; "
                        "the database was left at the previous step",
                        path="[storage] database",
                    ) from None
                except BaseException:
                    execute("ROLLBACK")
                    raise
                applied.append((owner, version))
                log.info("applied {owner} schema step {version}", owner=owner, version=version)
        return applied

    def _check_version(self, owner: str, version: int) -> None:
        known = len(self._schemas.get(owner, ()))
        if owner in self._schemas and version > known:
            raise ConfigError(
                f"the database has {owner} schema version {version}, but this fedserver knows only up "
                f"to {known}: it was used by a newer fedserver",
                path="[storage] database",
            )

    def check(self) -> None:
        """
        What L{migrate} would refuse, without writing anything: a database
        that cannot be opened or is newer than this code, or a folder where
        it cannot be created.
        """
        if self._pg is not None:
            self._check_versions(self._postgresql_versions())
            return
        if not os.path.exists(self.path):
            folder = os.path.dirname(os.path.abspath(self.path))
            while not os.path.exists(folder):
                folder = os.path.dirname(folder)
            if not os.access(folder, os.W_OK):
                raise ConfigError(f"cannot create {self.path}: {folder} is not writable",
                                  path="[storage] database")
            return
        try:
            connection = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True)
            try:
                rows = connection.execute("SELECT owner, version FROM fedserver_schema").fetchall()
            except sqlite3.OperationalError:
                rows = []  # no schema table yet: migrate will create it
            finally:
                connection.close()
        except sqlite3.Error as e:
            raise ConfigError(f"cannot open {self.path}: {e}", path="[storage] database") from None
        self._check_versions(rows)

    def _postgresql_versions(self) -> List[Tuple[str, int]]:
        connection = self._connect_postgresql()
        try:
            cursor = connection.cursor()
            if cursor.execute("SELECT to_regclass('fedserver_schema')").fetchone()[0] is None:
                return []  # no schema table yet: migrate will create it
            return list(cursor.execute("SELECT owner, version FROM fedserver_schema").fetchall())
        except self._pg.Error as e:
            raise ConfigError(f"cannot read {self.where}: {self._pg.message(e)}", path="[storage] database") from None
        finally:
            connection.close()

    def _check_versions(self, rows: Iterable[Tuple[str, int]]) -> None:
        for owner, version in rows:
            self._check_version(owner, version)

    def startService(self) -> None:
        super().startService()
        if self._pg is not None:
            self._pool = adbapi.ConnectionPool(
                "psycopg",
                self.url,
                **self._pg.connection_options(self.url),
                cp_min=1,
                cp_max=POSTGRESQL_CONNECTIONS,
                # a connection that failed is tested, and dropped if broken (the server restarted)
                cp_reconnect=True,
                cp_good_sql="SELECT 1",
                cp_reactor=self._reactor,
            )
        else:
            self._pool = adbapi.ConnectionPool(
                "sqlite3",
                self.path,
                check_same_thread=False,
                isolation_level=None,
                cp_min=1,
                cp_max=1,
                cp_openfun=_prepare_sqlite,
                cp_reactor=self._reactor,
            )
        self._pool.start()

    def stopService(self) -> None:
        super().stopService()
        waiting, self._waiting = self._waiting, []
        for _, _, d in waiting:
            d.errback(RuntimeError("the store stopped before this work ran"))
        if self._pool is not None:
            self._pool.close()
            self._pool = None

    def _require_pool(self) -> Any:
        if self._pool is None:
            raise RuntimeError("the store is not running (startService was not called)")
        return self._pool

    def run_query(self, sql: str, params: Sequence[Any] = ()) -> Deferred[List[Tuple]]:
        """Run a query; fire with its rows."""
        return self._require_pool().runQuery(sql, tuple(params))

    def run_operation(self, sql: str, params: Sequence[Any] = ()) -> Deferred[None]:
        """Run one statement in its own transaction; fire when committed."""
        return self._require_pool().runInteraction(self._in_transaction, _execute, sql, tuple(params))

    def run_interaction(self, work: Callable[..., Any], *args: Any) -> Deferred[Any]:
        """
        Run C{work(cursor, *args)} in a thread within one transaction;
        commit when it returns, roll back when it raises.  On PostgreSQL a
        work that collided with a concurrent transaction (a deadlock, a
        unique key taken meanwhile) is rolled back and run again: it must
        act only through C{cursor}.
        """
        return self._require_pool().runInteraction(self._in_transaction, work, *args)

    def run_grouped(self, work: Callable[..., Any], *args: Any) -> Deferred[Any]:
        """
        Run C{work(cursor, *args)} as L{run_interaction} does, but sharing
        the transaction, and its commit, with the other works given while
        the previous group runs (group commit): each work runs in a
        savepoint, in the order they were given, and sees the changes of the
        works before it, as if each had its own transaction.  When C{work}
        raises, only its own changes are rolled back and its L{Deferred}
        fails.  Every L{Deferred} of a group fires after the commit; if the
        transaction itself fails (at its start, its commit, or because a
        work broke it), nothing of the group is kept and each fails.

        On PostgreSQL the groups of one process run one at a time, on one
        connection, as on SQLite; a work that collided with another process
        (a deadlock, a unique key taken meanwhile) or waited more than 100
        ms for a row another transaction holds is rolled back to its
        savepoint and, once its group committed, run again alone in a
        transaction of its own (as L{run_interaction}), so that the next
        groups need not wait for it: it may then run after works given
        later.

        For short works only: the others of its group wait for each one.
        """
        pool = self._require_pool()
        d: Deferred[Any] = Deferred()
        self._waiting.append((work, args, d))
        if not self._grouping:
            self._next_group(pool)
        return d

    def _next_group(self, pool: Any) -> None:
        group, self._waiting = self._waiting[:MAX_GROUP], self._waiting[MAX_GROUP:]
        self._grouping = True
        done = pool.runInteraction(self._in_group, [(work, args) for work, args, _ in group])
        done.addBoth(self._group_done, group)

    def _group_done(self, outcome: Any, group: List[Tuple[Callable[..., Any], Tuple[Any, ...], Deferred[Any]]]) -> None:
        if isinstance(outcome, Failure):
            for _, _, d in group:
                d.errback(outcome)
        else:
            self.groups_committed += 1
            for (work, args, d), done in zip(group, outcome, strict=True):
                if done is None:
                    # it collided with another process or waited for its rows (PostgreSQL): alone now
                    self.run_interaction(work, *args).chainDeferred(d)
                elif done[0]:
                    d.callback(done[1])
                else:
                    d.errback(done[1])
        # works given by those callbacks wait for the next group, which starts now with all that are waiting
        self._grouping = False
        if self._waiting and self._pool is not None:
            self._next_group(self._pool)


def _execute(cursor: Any, sql: str, params: Tuple) -> None:
    cursor.execute(sql, params)


def _in_transaction(cursor: Any, work: Callable[..., Any], *args: Any) -> Any:
    # The connections run in autocommit mode (isolation_level=None), so the
    # transaction is explicit: adbapi's own commit then has nothing to do.
    cursor.execute("BEGIN IMMEDIATE")
    try:
        result = work(cursor, *args)
    except BaseException:
        cursor.execute("ROLLBACK")
        raise
    cursor.execute("COMMIT")
    return result


def _in_group(cursor: Any, works: List[Tuple[Callable[..., Any], Tuple[Any, ...]]]) -> List[Tuple[bool, Any]]:
    # One transaction; each work in a savepoint, released when it returns and
    # rolled back to when it raises (its failure is its outcome).  Anything
    # that escapes (a savepoint or the commit failing, a BaseException) rolls
    # the whole transaction back, and every work of the group fails with it.
    outcomes: List[Tuple[bool, Any]] = []
    cursor.execute("BEGIN IMMEDIATE")
    try:
        for work, args in works:
            cursor.execute("SAVEPOINT grouped")
            try:
                result = work(cursor, *args)
            except Exception:
                outcomes.append((False, Failure()))
                cursor.execute("ROLLBACK TO grouped")
            else:
                outcomes.append((True, result))
            cursor.execute("RELEASE grouped")
        cursor.execute("COMMIT")
    except BaseException:
        if cursor.connection.in_transaction:
            try:
                cursor.execute("ROLLBACK")
            except sqlite3.Error:
                pass  # the error that brought us here is the one to report
        raise
    return outcomes


def _statements(script: str) -> List[str]:
    # A semicolon inside a string literal, a comment or a trigger body does
    # not end a statement: let SQLite say when one is complete.
    statements: List[str] = []
    current = ""
    for piece in script.split(";"):
        current += piece + ";"
        if sqlite3.complete_statement(current):
            if current.strip(" \t\r\n;"):
                statements.append(current.strip())
            current = ""
    if current.strip(" \t\r\n;"):
        statements.append(current.strip())
    return statements
