"""
fedserver's store: a small asynchronous database layer on
L{twisted.enterprise.adbapi}.

The database is named by a URL: C{sqlite:PATH} (the default is C{fedserver.sqlite} in
C{[server] data_dir}).  SQL is written portably with
C{?} placeholders.  Each plugin that keeps data registers its schema as an
ordered list of migration steps under its own name; L{Store.migrate} applies
the steps a database lacks, each in a transaction with its version record, at
startup and before any listener accepts a connection.  SQLite runs in WAL mode
with C{synchronous=FULL}: a write that was reported done survives a crash.

Every commit waits for the disk.  Small writes that arrive together (a
request each) may use L{Store.run_grouped}: they are run one after the other
in one transaction, each in its own savepoint, and committed together (group
commit), so that one wait for the disk serves all of them.
"""

from __future__ import annotations

import os
import sqlite3
from typing import Any, Callable, Dict, List, Sequence, Tuple

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


def _prepare_sqlite(connection: sqlite3.Connection) -> None:
    connection.execute("PRAGMA journal_mode=WAL")
    connection.execute("PRAGMA synchronous=FULL")
    connection.execute("PRAGMA foreign_keys=ON")
    connection.execute("PRAGMA busy_timeout=5000")


#: at most this many works of L{Store.run_grouped} share one transaction
MAX_GROUP = 256


class Store(Service):
    """
    The database, as a service: the connection pool opens on start and
    closes on stop.

    @ivar url: the database URL it was made from.
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
        if url.startswith("sqlite:"):
            self.path = url[len("sqlite:"):]
            if not self.path:
                raise ConfigError(f"{url!r} names no file; use sqlite:PATH", path="[storage] database")
        else:
            raise ConfigError(
                f"{url!r} is not a supported database URL; this version supports sqlite:PATH",
                path="[storage] database",
            )

    def register_schema(self, owner: str, steps: Sequence[str]) -> None:
        """
        Declare C{owner}'s tables as migration steps: step I{n} (from 1)
        takes the schema from version I{n-1} to I{n}.  Steps are never edited
        once released; a change is a new step.  Each step may hold several
        statements separated by semicolons.
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
        try:
            connection = self._connect()
        except sqlite3.Error as e:
            raise ConfigError(f"cannot open {self.path}: {e}", path="[storage] database") from None
        applied = []
        try:
            connection.execute(_SCHEMA_TABLE)
            for owner, steps in sorted(self._schemas.items()):
                row = connection.execute(
                    "SELECT version FROM fedserver_schema WHERE owner = ?", (owner,)
                ).fetchone()
                current = row[0] if row else 0
                if current > len(steps):
                    raise ConfigError(
                        f"the database has {owner} schema version {current}, but this fedserver "
                        f"knows only up to {len(steps)}: it was used by a newer fedserver",
                        path="[storage] database",
                    )
                for version in range(current + 1, len(steps) + 1):
                    connection.execute("BEGIN IMMEDIATE")
                    try:
                        for statement in _statements(steps[version - 1]):
                            connection.execute(statement)
                        connection.execute(
                            "INSERT INTO fedserver_schema (owner, version) VALUES (?, ?) "
                            "ON CONFLICT (owner) DO UPDATE SET version = excluded.version",
                            (owner, version),
                        )
                        connection.execute("COMMIT")
                    except sqlite3.Error as e:
                        connection.execute("ROLLBACK")
                        raise ConfigError(
                            f"{owner} schema step {version} failed in {self.path}: {e}; "
                            "the database was left at the previous step",
                            path="[storage] database",
                        ) from None
                    except BaseException:
                        connection.execute("ROLLBACK")
                        raise
                    applied.append((owner, version))
                    log.info("applied {owner} schema step {version}", owner=owner, version=version)
        finally:
            connection.close()
        return applied

    def check(self) -> None:
        """
        What L{migrate} would refuse, without writing anything: a database
        that cannot be opened or is newer than this code, or a folder where
        it cannot be created.
        """
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
        for owner, version in rows:
            known = len(self._schemas.get(owner, ()))
            if owner in self._schemas and version > known:
                raise ConfigError(
                    f"the database has {owner} schema version {version}, but this fedserver knows only up "
                    f"to {known}: it was used by a newer fedserver",
                    path="[storage] database",
                )

    def startService(self) -> None:
        super().startService()
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
        return self._require_pool().runInteraction(_execute_committed, sql, tuple(params))

    def run_interaction(self, work: Callable[..., Any], *args: Any) -> Deferred[Any]:
        """
        Run C{work(cursor, *args)} in a thread within one transaction;
        commit when it returns, roll back when it raises.
        """
        return self._require_pool().runInteraction(_in_transaction, work, *args)

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
        done = pool.runInteraction(_in_group, [(work, args) for work, args, _ in group])
        done.addBoth(self._group_done, group)

    def _group_done(self, outcome: Any, group: List[Tuple[Callable[..., Any], Tuple[Any, ...], Deferred[Any]]]) -> None:
        if isinstance(outcome, Failure):
            for _, _, d in group:
                d.errback(outcome)
        else:
            self.groups_committed += 1
            for (_, _, d), (ok, result) in zip(group, outcome, strict=True):
                if ok:
                    d.callback(result)
                else:
                    d.errback(result)
        # works given by those callbacks wait for the next group, which starts now with all that are waiting
        self._grouping = False
        if self._waiting and self._pool is not None:
            self._next_group(self._pool)


def _execute_committed(cursor: Any, sql: str, params: Tuple) -> None:
    _in_transaction(cursor, lambda c: c.execute(sql, params))


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
