"""
Structured logs: fedserver's log as one JSON object per line, chosen by
C{[logging] format = "json"} (see docs/observability.md).

Each line holds C{time} (ISO 8601, UTC), C{level}, C{namespace}, C{system}
when there is one, C{message} (the event formatted as the text log shows
it), C{traceback} for a logged failure, and every field of the event whose
value is a string, number, boolean or null: C{request_id} on the lines
about a request, C{label}, C{code}, C{destination} and so on.

L{install} puts the observer in place under C{twistd} or C{twist}; an
application that embeds fedserver adds L{json_file_observer} to its own
logging.
"""

from __future__ import annotations

import datetime
import json
import math
import sys
from typing import IO, Any, Dict, Optional

from twisted.application.service import IService, MultiService
from twisted.logger import FileLogObserver, ILogObserver, LogEvent, formatEvent, textFileLogObserver
from twisted.python import logfile
from twisted.python.components import Componentized

#: event keys that are Twisted's own bookkeeping, not fields
_LEGACY_KEYS = frozenset({"message", "format", "isError", "system", "time", "why", "failure"})


def event_as_json(event: LogEvent) -> Optional[str]:
    """One log event as a line of JSON (with its newline)."""
    moment = datetime.datetime.fromtimestamp(event.get("log_time") or 0, datetime.timezone.utc)
    level = event.get("log_level")
    record: Dict[str, Any] = {
        "time": moment.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        "level": level.name if level is not None else "info",
        "namespace": event.get("log_namespace"),
    }
    system = event.get("log_system")
    if system is not None and system != "-":
        record["system"] = str(system)
    record["message"] = formatEvent(event)
    failure = event.get("log_failure")
    if failure is not None:
        try:
            record["traceback"] = failure.getTraceback()
        except Exception:
            record["traceback"] = repr(failure)
    for key, value in event.items():
        if key.startswith("log_") or key in _LEGACY_KEYS or key in record:
            continue
        if isinstance(value, float) and not math.isfinite(value):
            value = str(value)
        if value is None or isinstance(value, (str, int, float, bool)):
            record[key] = value
    return json.dumps(record, ensure_ascii=False) + "\n"


def json_file_observer(out: IO[Any]) -> FileLogObserver:
    """An observer that writes each event to C{out} as a line of JSON."""
    return FileLogObserver(out, event_as_json)


class _WithLogObserver(MultiService):
    """
    fedserver under twistd with a log observer of its own: twistd logs to
    the C{ILogObserver} component of its application if there is one (as a
    C{.tac} file would set it), and this service sets it when it joins the
    application.
    """

    def __init__(self, service: IService, observer: ILogObserver) -> None:
        super().__init__()
        self.observer = observer
        service.setServiceParent(self)

    def setServiceParent(self, parent: Any) -> None:
        if isinstance(parent, Componentized):
            parent.setComponent(ILogObserver, self.observer)
        super().setServiceParent(parent)


def _twistd_log_file(runner: Any) -> IO[Any]:
    """Where twistd would write its log, given its options (as twistd's own logger chooses)."""
    name = runner.get("logfile") or ""
    nodaemon = runner.get("nodaemon", True)
    if name == "-":
        if not nodaemon:
            raise SystemExit("fedserver: daemons cannot log to stdout, exiting")
        return sys.stdout
    if nodaemon and not name:
        return sys.stdout
    out = logfile.LogFile.fromFullPath(name or "twistd.log")
    try:
        import signal
    except ImportError:  # pragma: no cover - not on this platform
        return out
    if not signal.getsignal(signal.SIGUSR1):
        # as twistd does: SIGUSR1 rotates the log file
        def rotate(signum: int, frame: Any) -> None:
            from twisted.internet import reactor

            reactor.callFromThread(out.rotate)  # type: ignore[attr-defined]

        signal.signal(signal.SIGUSR1, rotate)
    return out


def install(service: IService, log_format: Optional[str], runner: Any) -> IService:
    """
    Make the runner log in C{log_format} (C{"json"} or C{"text"}; C{None}:
    the runner's own choice); returns the service to hand to the runner.

    @param runner: the runner's parsed options (C{Options.parent} of
        fedserver's options): C{twist}'s, whose file observer factory is
        set, or C{twistd}'s, whose log file the JSON observer takes over
        (unless C{--syslog} or C{--logger} chose another destination).
    """
    if log_format is None or runner is None:
        return service
    if "fileLogObserverFactory" in runner:  # twist
        runner["fileLogObserverFactory"] = json_file_observer if log_format == "json" else textFileLogObserver
        runner["logFormat"] = log_format
        return service
    if log_format == "json" and "logfile" in runner and not runner.get("syslog") and not runner.get("logger"):
        return _WithLogObserver(service, json_file_observer(_twistd_log_file(runner)))
    return service


__all__ = ["event_as_json", "install", "json_file_observer"]
