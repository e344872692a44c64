"""
Tests for fedserver.backup: C{fedserver backup} while the database is in
use, and C{fedserver restore} on a stopped backend.
"""

from __future__ import annotations

import os
import socket
import sqlite3
from typing import Any, Tuple

import pytest
from twisted.internet.testing import MemoryReactorClock

from fedserver.backup import BackupError, backup, check_copy, restore
from fedserver.cli import main
from fedserver.config import load_config
from fedserver.service import build_service
from tests.unit.helpers import minimal_config_file

WIRE = '[components.brig]\nplugin = "wire-brig"\n[components.galley]\nplugin = "wire-galley"\n'


@pytest.fixture
def backend(tmp_path: Any) -> Tuple[str, str]:
    """A configuration with the Wire reference's schema, migrated: its path and its database."""
    path = minimal_config_file(tmp_path, "b.example", "fed.b.example")(WIRE)
    build_service(path, reactor=MemoryReactorClock(), listen=False)  # creates and migrates the database
    return path, str(tmp_path / "var" / "b.example" / "fedserver.sqlite")


def add_user(database: str, handle: str, connection: Any = None) -> None:
    db = connection or sqlite3.connect(database, isolation_level=None)
    db.execute("INSERT INTO wire_users (id, handle, name, created) VALUES (?, ?, ?, ?)",
               (f"id-{handle}", handle, handle.title(), 1795000000.0))
    if connection is None:
        db.close()


def handles(database: str) -> list:
    with sqlite3.connect(database) as db:
        return sorted(row[0] for row in db.execute("SELECT handle FROM wire_users"))


def test_a_backup_while_the_database_is_written(backend: Any, tmp_path: Any) -> None:
    path, database = backend
    # as fedserver runs it: WAL, and a change that is only in the -wal file so far
    writer = sqlite3.connect(database, isolation_level=None, check_same_thread=False)
    writer.execute("PRAGMA journal_mode=WAL")
    writer.execute("PRAGMA wal_autocheckpoint=0")
    add_user(database, "alice", writer)
    assert os.path.getsize(database + "-wal") > 0
    # and a transaction in progress, which holds the write lock
    writer.execute("BEGIN IMMEDIATE")
    add_user(database, "bob", writer)

    size, versions = backup(load_config(path), str(tmp_path / "copy.sqlite"))

    writer.execute("COMMIT")
    writer.close()
    copy = str(tmp_path / "copy.sqlite")
    assert handles(copy) == ["alice"]  # what was committed, nothing that was not
    assert size == os.path.getsize(copy)
    assert "wire-reference" in dict(versions)
    assert not os.path.exists(copy + "-wal")  # one file that stands alone
    with sqlite3.connect(copy) as db:
        assert db.execute("PRAGMA journal_mode").fetchone() == ("delete",)
    assert [name for name in os.listdir(tmp_path) if ".partial-" in name] == []


def test_the_command(backend: Any, tmp_path: Any, capsys: Any) -> None:
    path, database = backend
    add_user(database, "carol")
    destination = str(tmp_path / "b.backup")
    assert main(["backup", "--config", path, destination]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"{destination}: ") and "integrity ok, schemas " in out and "wire-reference" in out
    assert "Also keep: the configuration file" in out
    assert handles(destination) == ["carol"]


def test_an_existing_destination_is_never_overwritten(backend: Any, tmp_path: Any, capsys: Any) -> None:
    path, _ = backend
    destination = tmp_path / "b.backup"
    destination.write_bytes(b"precious")
    assert main(["backup", "--config", path, str(destination)]) == 1
    assert "exists already; name a new file" in capsys.readouterr().err
    assert destination.read_bytes() == b"precious"


def test_nothing_to_back_up(tmp_path: Any) -> None:
    path = minimal_config_file(tmp_path, "b.example", "fed.b.example")()
    with pytest.raises(BackupError, match=r"does not exist: fedserver has not run with this configuration yet$"):
        backup(load_config(path), str(tmp_path / "x"))


def test_postgresql_is_backed_up_with_its_own_tools(tmp_path: Any) -> None:
    path = minimal_config_file(tmp_path, "b.example", "fed.b.example")(
        '[storage]\ndatabase = "postgresql://fedserver@db.internal/fedserver"\n')
    with pytest.raises(BackupError, match=r"is a postgresql database, not SQLite: .* pg_dump and pg_restore"):
        backup(load_config(path), str(tmp_path / "x"))


def test_a_damaged_or_foreign_file_is_refused(tmp_path: Any) -> None:
    garbage = tmp_path / "garbage"
    garbage.write_bytes(b"SQLite format 3\0" + b"\xff" * 5000)
    with pytest.raises(BackupError, match=r"is not a usable SQLite database|is damaged"):
        check_copy(str(garbage))
    foreign = str(tmp_path / "foreign.sqlite")
    with sqlite3.connect(foreign) as db:
        db.execute("CREATE TABLE t (x)")
    with pytest.raises(BackupError, match="is not a fedserver database"):
        check_copy(foreign)


def test_restore_moves_the_old_files_aside_together(backend: Any, tmp_path: Any, capsys: Any) -> None:
    path, database = backend
    add_user(database, "alice")
    saved = str(tmp_path / "saved.sqlite")
    backup(load_config(path), saved)
    # the backend goes on, then something goes wrong; a stale -wal must not meet the restored file
    writer = sqlite3.connect(database, isolation_level=None)
    writer.execute("PRAGMA journal_mode=WAL")
    writer.execute("PRAGMA wal_autocheckpoint=0")
    add_user(database, "mallory", writer)
    assert main(["restore", "--config", path, saved]) == 0
    writer.close()
    out = capsys.readouterr().out
    assert f"{database}: restored from {saved}" in out
    assert handles(database) == ["alice"]
    (replaced,) = [name for name in os.listdir(os.path.dirname(database)) if ".replaced-" in name]
    kept = os.path.join(os.path.dirname(database), replaced)
    assert "fedserver.sqlite" in os.listdir(kept)
    assert handles(os.path.join(kept, "fedserver.sqlite")) == ["alice", "mallory"]
    # and the restored backend starts on it
    build_service(path, reactor=MemoryReactorClock(), listen=False)


def test_restore_onto_a_new_host(backend: Any, tmp_path: Any) -> None:
    path, database = backend
    add_user(database, "alice")
    saved = str(tmp_path / "saved.sqlite")
    backup(load_config(path), saved)
    new_host = tmp_path / "new"
    new_host.mkdir()
    new_path = minimal_config_file(new_host, "b.example", "fed.b.example")(WIRE)
    target, replaced = restore(load_config(new_path), saved)
    assert replaced is None
    assert handles(target) == ["alice"]


def test_restore_refuses_while_fedserver_runs(tmp_path: Any) -> None:
    saved = str(tmp_path / "saved.sqlite")
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        port = listener.getsockname()[1]
        directory = tmp_path / "running"
        directory.mkdir()
        path = minimal_config_file(directory, "b.example", "fed.b.example")(WIRE)
        with open(path) as f:
            text = f.read().replace('listen = "tcp:0"', f'listen = "tcp:{port}"')
        with open(path, "w") as f:
            f.write(text)
        build_service(path, reactor=MemoryReactorClock(), listen=False)
        backup(load_config(path), saved)
        with pytest.raises(BackupError, match=f"something listens on the inward listener \\(127.0.0.1:{port}\\): "
                                              "stop fedserver before restoring its database"):
            restore(load_config(path), saved)


def test_restore_refuses_a_backup_of_a_newer_fedserver(backend: Any, tmp_path: Any, capsys: Any) -> None:
    path, database = backend
    saved = str(tmp_path / "saved.sqlite")
    backup(load_config(path), saved)
    with sqlite3.connect(saved) as db:
        db.execute("UPDATE fedserver_schema SET version = 99 WHERE owner = 'wire-reference'")
    before = handles(database)
    assert main(["restore", "--config", path, saved]) == 1
    err = capsys.readouterr().err
    assert "the backup cannot serve this configuration" in err and "used by a newer fedserver" in err
    assert handles(database) == before and not [n for n in os.listdir(os.path.dirname(database)) if "replaced" in n]
