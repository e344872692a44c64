"""
C{twistd fedserver} / C{twist fedserver}: options and service maker.
"""

from __future__ import annotations

import resource
from typing import Callable, Tuple

from twisted.application.service import IService
from twisted.logger import Logger
from twisted.python import usage

from fedserver.config import load_config
from fedserver.errors import ConfigError

log = Logger()

#: file descriptors fedserver needs beside the inward listener's connections:
#: the outward listener's, the outbound and component connection pools, the
#: database, DNS and the log
SPARE_FILES = 1024


class Options(usage.Options):
    synopsis = "--config FILE"
    longdesc = (
        "Run a fedserver backend: the inward (federation) and outward (local "
        "components) listeners, as the TOML configuration FILE describes. "
        "`fedserver check-config FILE` runs the same validation without starting."
    )
    optParameters = [
        ["config", "c", None, "The configuration file (TOML)."],
    ]

    def postOptions(self) -> None:
        if not self["config"]:
            raise usage.UsageError("--config FILE is required")
        try:
            self["loaded_config"] = load_config(self["config"])
        except ConfigError as e:
            raise usage.UsageError(str(e)) from None


def makeService(options: Options) -> IService:
    """
    Build the service; a configuration error exits with its message.
    C{[logging] format} chooses how the runner (C{twistd} or C{twist},
    whose options are C{options.parent}) writes the log.
    """
    from fedserver import logs
    from fedserver.service import build_service

    config = options["loaded_config"]
    raise_open_file_limit(config.limits.max_connections + SPARE_FILES)
    try:
        service = build_service(config)
    except ConfigError as e:
        raise SystemExit(f"fedserver: {e}") from None
    return logs.install(service, config.log_format, getattr(options, "parent", None))


def raise_open_file_limit(
    wanted: int,
    getrlimit: Callable[[int], Tuple[int, int]] = resource.getrlimit,
    setrlimit: Callable[[int, Tuple[int, int]], None] = resource.setrlimit,
) -> int:
    """
    Raise this process's soft limit of open files to C{wanted}, or to the
    hard limit if that is lower, so the inward listener can hold
    C{[limits] max_connections} connections (shells and many service
    managers start processes with a soft limit of 1024).  Only C{twistd
    fedserver} and C{twist fedserver} do this: an application embedding
    fedserver owns its process's limits.  Never lowers a limit; warns
    when the hard limit is too low.  Returns the soft limit now in force.
    """
    soft, hard = getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= wanted:
        return soft
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if target > soft:
        try:
            setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (OSError, ValueError) as e:
            log.warn("could not raise the limit of open files from {soft} to {target}: {error}",
                     soft=soft, target=target, error=e)
            return soft
        log.info("raised the limit of open files from {soft} to {target}", soft=soft, target=target)
        soft = target
    if soft < wanted:
        log.warn("the hard limit of open files is {hard}, below the {wanted} that [limits] "
                 "max_connections needs with {spare} to spare: raise it (LimitNOFILE= in a systemd "
                 "unit, ulimit -Hn in a shell) or lower max_connections",
                 hard=hard, wanted=wanted, spare=SPARE_FILES)
    return soft


__all__ = ["Options", "makeService", "raise_open_file_limit"]
