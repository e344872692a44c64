"""
C{fedserver backup} and C{fedserver restore}: a copy of an SQLite
database that is consistent while fedserver runs, and putting one in place
on a stopped (or new) backend.

The backup uses SQLite's online backup API (L{sqlite3.Connection.backup}):
one read transaction copies every page, so the copy is a snapshot of
committed data, and fedserver goes on writing meanwhile (WAL mode: readers
never block the writer).  The copy is written next to its destination and
renamed into place once it is complete, on disk (fsync) and has passed
C{PRAGMA integrity_check}; an existing destination is never overwritten.

A restore checks the backup the same way, refuses a backup that a newer
fedserver wrote (the check of C{fedserver check-config}), refuses while
something listens on the inward listener's port (fedserver must be
stopped), moves the current database files (with their C{-wal} and
C{-shm} files, which must not meet another database) into a folder beside
them, and copies the backup into place.

A PostgreSQL database is backed up with its own tools (C{pg_dump},
C{pg_restore}); see docs/operations.md.
"""

from __future__ import annotations

import argparse
import os
import socket
import sqlite3
import sys
import time
from typing import Any, List, Optional, Tuple

from fedserver.config import Config, load_config
from fedserver.errors import ConfigError

#: the files SQLite keeps next to a database in WAL mode
SIDE_FILES = ("-wal", "-shm")


class BackupError(Exception):
    """The backup or restore cannot be done; the message says why and what to do."""


def sqlite_path(config: Config) -> str:
    """The SQLite file of C{config}'s C{[storage] database}."""
    url = config.storage_database
    if not url.startswith("sqlite:"):
        scheme = url.split(":", 1)[0]
        raise BackupError(
            f"[storage] database is a {scheme} database, not SQLite: back it up and restore it with its own "
            "tools (for PostgreSQL, pg_dump and pg_restore; see docs/operations.md)"
        )
    return url[len("sqlite:"):]


def check_copy(path: str) -> List[Tuple[str, int]]:
    """
    C{PRAGMA integrity_check} of the database at C{path}, read-only; its
    schema versions (C{(owner, version)}).

    @raise BackupError: it cannot be opened, is not a fedserver database,
        or is damaged.
    """
    try:
        connection = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    except sqlite3.Error as e:
        raise BackupError(f"cannot open {path}: {e}") from None
    try:
        result = [row[0] for row in connection.execute("PRAGMA integrity_check").fetchall()]
        if result != ["ok"]:
            raise BackupError(f"{path} is damaged: PRAGMA integrity_check says {'; '.join(result[:5])}")
        try:
            return sorted(connection.execute("SELECT owner, version FROM fedserver_schema").fetchall())
        except sqlite3.Error:
            raise BackupError(f"{path} is not a fedserver database (it has no fedserver_schema table)") from None
    except sqlite3.DatabaseError as e:
        raise BackupError(f"{path} is not a usable SQLite database: {e}") from None
    finally:
        connection.close()


def _copy(source: str, destination: str) -> None:
    """Copy the database C{source} to the new file C{destination} with the online backup API, and sync it."""
    reader = sqlite3.connect(f"file:{source}?mode=ro", uri=True)
    try:
        writer = sqlite3.connect(destination)
        try:
            reader.backup(writer)  # every page in one step: one consistent snapshot
            # the copy stands alone: one file, no -wal to go with it
            writer.execute("PRAGMA journal_mode=DELETE")
        finally:
            writer.close()
    finally:
        reader.close()
    with open(destination, "rb") as f:
        os.fsync(f.fileno())


def _place(partial: str, destination: str) -> None:
    """Give the finished copy its name, never replacing a file that appeared meanwhile."""
    try:
        os.link(partial, destination)  # fails if the destination exists
    except FileExistsError:
        raise
    except OSError:
        # a file system without hard links: check, then rename
        if os.path.lexists(destination):
            raise FileExistsError(destination) from None
        os.rename(partial, destination)


def _sync_folder(path: str) -> None:
    descriptor = os.open(os.path.dirname(os.path.abspath(path)) or ".", os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def backup(config: Config, destination: str) -> Tuple[int, List[Tuple[str, int]]]:
    """
    Copy C{config}'s SQLite database to C{destination} (a new file); return
    its size and schema versions.

    @raise BackupError: why not.
    """
    source = sqlite_path(config)
    if not os.path.exists(source):
        raise BackupError(f"{source} does not exist: fedserver has not run with this configuration yet")
    if os.path.lexists(destination):
        raise BackupError(f"{destination} exists already; name a new file (a backup never overwrites)")
    folder = os.path.dirname(os.path.abspath(destination))
    if not os.path.isdir(folder):
        raise BackupError(f"{folder} is not a folder")
    partial = f"{destination}.partial-{os.getpid()}"
    try:
        _copy(source, partial)
        versions = check_copy(partial)
        _place(partial, destination)
    except sqlite3.Error as e:
        raise BackupError(f"copying {source} failed: {e}") from None
    except OSError as e:
        raise BackupError(f"writing {destination} failed: {e.strerror or e}") from None
    finally:
        for leftover in (partial, *(partial + side for side in SIDE_FILES)):
            if os.path.exists(leftover):
                os.unlink(leftover)
    _sync_folder(destination)
    return os.path.getsize(destination), versions


def _listening(description: str) -> Optional[str]:
    """Where a listener of C{description} (a tcp: or unix: endpoint) accepts connections now, if it does."""
    kind, _, rest = description.partition(":")
    parts = rest.replace("\\:", "\0").split(":")
    if kind == "unix":
        address: Any = parts[0].replace("\0", ":")
        family = socket.AF_UNIX
    elif kind in ("tcp", "tcp6") and parts and parts[0].isdigit():
        options = dict(p.partition("=")[::2] for p in parts[1:])
        host = options.get("interface", "").replace("\0", ":") or ("::1" if kind == "tcp6" else "127.0.0.1")
        host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
        address, family = (host, int(parts[0])), (socket.AF_INET6 if ":" in host else socket.AF_INET)
    else:
        return None
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        try:
            probe.connect(address)
        except OSError:
            return None
    return f"{address[0]}:{address[1]}" if isinstance(address, tuple) else address


def restore(config: Config, source: str, *, check_schema: bool = True) -> Tuple[str, Optional[str]]:
    """
    Put the backup C{source} in place of C{config}'s SQLite database, which
    must not be in use.  Returns the database's path and the folder the
    files it replaced were moved to (C{None} if there were none).

    @raise BackupError: why not; nothing was changed.
    """
    target = sqlite_path(config)
    check_copy(source)
    where = _listening(config.inward_listen)
    if where is not None:
        raise BackupError(
            f"something listens on the inward listener ({where}): stop fedserver before restoring its database"
        )
    if check_schema:
        _check_schema(config, source)
    os.makedirs(os.path.dirname(os.path.abspath(target)), exist_ok=True)
    replaced = None
    present = [target + side for side in ("", *SIDE_FILES) if os.path.exists(target + side)]
    if present:
        replaced = f"{target}.replaced-{time.strftime('%Y%m%dT%H%M%S')}"
        os.makedirs(replaced)
        for path in present:  # together, so that the -wal still goes with its database
            os.rename(path, os.path.join(replaced, os.path.basename(path)))
    partial = f"{target}.partial-{os.getpid()}"
    try:
        _copy(source, partial)
        check_copy(partial)
        os.rename(partial, target)
    except (sqlite3.Error, OSError) as e:
        raise BackupError(f"copying {source} to {target} failed: {e}"
                          + (f"; the replaced files are in {replaced}" if replaced else "")) from None
    finally:
        if os.path.exists(partial):
            os.unlink(partial)
    _sync_folder(target)
    return target, replaced


def _check_schema(config: Config, source: str) -> None:
    """Refuse a backup whose schemas are newer than this fedserver's (as startup would)."""
    import attrs

    from fedserver.service import build_service

    try:
        build_service(attrs.evolve(config, storage_database=f"sqlite:{source}"), migrate=False, listen=False)
    except ConfigError as e:
        raise BackupError(f"the backup cannot serve this configuration: {e}") from None


# the commands


def backup_command(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.config)
        size, versions = backup(config, args.destination)
    except (ConfigError, BackupError) as e:
        print(f"fedserver: {e}", file=sys.stderr)
        return 1
    schemas = ", ".join(f"{owner} {version}" for owner, version in versions)
    print(f"{args.destination}: {size} bytes from {config.storage_database[len('sqlite:'):]}, "
          f"integrity ok, schemas {schemas}")
    print("Also keep: the configuration file and the files it names ([tls] certificate, private_key and "
          "ca_certificates, a Matrix signing_key, MIMI token files); see docs/operations.md.")
    return 0


def restore_command(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.config)
        target, replaced = restore(config, args.backup)
    except (ConfigError, BackupError) as e:
        print(f"fedserver: {e}", file=sys.stderr)
        return 1
    print(f"{target}: restored from {args.backup}")
    if replaced:
        print(f"the database it replaced is in {replaced} (remove it when the restored backend works)")
    return 0


def add_commands(commands: Any) -> None:
    """The C{backup} and C{restore} subcommands, for L{fedserver.cli.make_parser}."""
    backup_parser = commands.add_parser(
        "backup", help="copy the SQLite database while fedserver runs, and check the copy",
        description="Copy [storage] database (SQLite) to DEST with SQLite's online backup API: consistent while "
        "fedserver runs. DEST must not exist. The copy is checked with PRAGMA integrity_check.",
    )
    backup_parser.add_argument("--config", required=True, metavar="FILE")
    backup_parser.add_argument("destination", metavar="DEST", help="the new backup file")
    backup_parser.set_defaults(run=backup_command)
    restore_parser = commands.add_parser(
        "restore", help="put a backup in place of the SQLite database of a stopped fedserver",
        description="Check BACKUP, move the current database files aside (into a folder next to them) and copy "
        "BACKUP into place. fedserver must be stopped.",
    )
    restore_parser.add_argument("--config", required=True, metavar="FILE")
    restore_parser.add_argument("backup", metavar="BACKUP", help="a file made by fedserver backup")
    restore_parser.set_defaults(run=restore_command)
