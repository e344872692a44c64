"""
fedserver discovery plugin C{hosts-file}: targets from a file that the
operator writes, one target per line::

    # backend-domain  infra-domain   host       port
    b.example         fed.b.example  127.0.0.1  8443
    b.example         fed.b.example  10.0.0.7   8443
    c.example         fed.c.example  10.0.0.9   443

The lines of one backend domain are its targets, tried in the order written.
Blank lines and everything after a C{#} are ignored.  Configure it with::

    [discovery]
    plugin = "hosts-file"
    path = "federation-hosts"   # relative paths start at the config file's folder

The file is read at startup; a missing or bad file stops startup.  Each
lookup checks the file's modification time, size and inode, and reads the
file again when one of them changed.  While a changed file cannot be read
or parsed, lookups fail with C{discovery-failure}.
"""

from __future__ import annotations

import os
import re
from typing import Dict, List, Optional, Tuple

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from zope.interface import implementer

from fedserver import DiscoveryFailure, Target, hookimpl
from fedserver.config import Options
from fedserver.interfaces import IDiscovery

log = Logger(namespace="fedserver_hosts_discovery")

_DOMAIN = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)*")

Table = Dict[str, List[Target]]


class HostsFileError(Exception):
    """The hosts file cannot be read, or one of its lines is wrong."""


def parse_hosts(text: str, path: str) -> Table:
    """The targets that C{text} (the content of C{path}) lists, by backend domain."""
    table: Table = {}
    for number, line in enumerate(text.splitlines(), 1):
        fields = line.split("#", 1)[0].split()
        if not fields:
            continue
        where = f"{path} line {number}"
        if len(fields) != 4:
            raise HostsFileError(f"{where}: expected 'backend-domain infra-domain host port'")
        domain, infra, host, port_text = fields
        for name in (domain, infra):
            if len(name) > 253 or not _DOMAIN.fullmatch(name):
                raise HostsFileError(f"{where}: {name!r} is not a lower-case domain name")
        if not (port_text.isascii() and port_text.isdigit()) or not 1 <= int(port_text) <= 65535:
            raise HostsFileError(f"{where}: the port must be a number from 1 to 65535, not {port_text!r}")
        table.setdefault(domain, []).append(Target(infra_domain=infra, host=host, port=int(port_text)))
    return table


@implementer(IDiscovery)
class HostsFileDiscovery:
    """
    Answers from the hosts file at C{path}, read again when it changes.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._table: Table = {}
        self._stamp: Optional[Tuple[int, int, int]] = None

    def reload_if_changed(self) -> None:
        """
        Read the file if it changed since the last good read.

        @raise HostsFileError: it cannot be read or parsed; the table read
            before stays as it was.
        """
        try:
            # stat before reading: a change made while we read is seen next time
            status = os.stat(self.path)
            stamp = (status.st_mtime_ns, status.st_size, status.st_ino)
            if stamp == self._stamp:
                return
            with open(self.path, encoding="utf-8") as f:
                text = f.read()
        except OSError as e:
            raise HostsFileError(f"cannot read {self.path}: {e.strerror}") from None
        except UnicodeDecodeError:
            raise HostsFileError(f"{self.path} is not UTF-8 text") from None
        self._table = parse_hosts(text, self.path)
        self._stamp = stamp
        log.info("read {count} backend domains from {path}", count=len(self._table), path=self.path)

    def discover(self, domain: str) -> Deferred[List[Target]]:
        try:
            self.reload_if_changed()
        except HostsFileError as e:
            return defer.fail(DiscoveryFailure(f"{e}; fix the hosts file", "discovery-failure"))
        targets = self._table.get(domain.lower())
        if not targets:
            return defer.fail(
                DiscoveryFailure(f"{domain} is not in the hosts file {self.path}", "invalid-domain")
            )
        return defer.succeed(list(targets))


def make_hosts_file_discovery(options: Options, context: object) -> HostsFileDiscovery:
    """The factory: C{options} is the C{[discovery]} table."""
    discovery = HostsFileDiscovery(options.get_path("path"))
    try:
        discovery.reload_if_changed()
    except HostsFileError as e:
        raise options.error("path", str(e)) from None
    return discovery


@hookimpl
def fedserver_discovery_plugins() -> Dict[str, object]:
    return {"hosts-file": make_hosts_file_discovery}
