"""
L{fedserver.logs}: one JSON object per line, and how C{[logging] format}
reaches C{twistd} and C{twist}.
"""

from __future__ import annotations

import io
import json
import signal
from typing import Any, Dict, List

import pytest
from twisted.application.service import Application, IService, Service
from twisted.logger import ILogObserver, Logger, textFileLogObserver
from twisted.python.failure import Failure

from fedserver.config import parse_config
from fedserver.errors import ConfigError
from fedserver.logs import event_as_json, install, json_file_observer


def events_of(emit: Any) -> List[Dict[str, Any]]:
    events: List[Dict[str, Any]] = []
    emit(Logger(namespace="fedserver.web", observer=events.append))
    return events


def test_an_event_is_one_line_of_json_with_its_fields():
    (event,) = events_of(lambda log: log.info(
        "outward {describe} -> {code} [request {request_id}]",
        describe="brig/get-user to b.example", code=200, request_id="req-42", peer=object(), ratio=float("nan"),
    ))
    line = event_as_json(event)
    assert line is not None and line.endswith("\n") and line.count("\n") == 1
    record = json.loads(line)
    assert record["message"] == "outward brig/get-user to b.example -> 200 [request req-42]"
    assert record["request_id"] == "req-42"
    assert record["code"] == 200
    assert record["level"] == "info"
    assert record["namespace"] == "fedserver.web"
    assert record["time"].endswith("Z")
    assert "peer" not in record  # not a plain value
    assert record["ratio"] == "nan"  # JSON has no NaN


def test_a_failure_carries_its_traceback_on_the_same_line():
    try:
        raise ValueError("broken\nacross lines")
    except ValueError:
        failure = Failure()
    (event,) = events_of(lambda log: log.failure("{describe} failed [request {request_id}]", failure,
                                                  describe="inward brig/x", request_id="req-7"))
    line = event_as_json(event)
    assert line is not None and line.count("\n") == 1
    record = json.loads(line)
    assert record["level"] == "critical"
    assert "ValueError: broken" in record["traceback"]
    assert record["request_id"] == "req-7"


def test_the_file_observer_writes_lines():
    out = io.StringIO()
    observer = json_file_observer(out)
    for event in events_of(lambda log: (log.info("one", request_id="a"), log.warn("two {n}", n=2))):
        observer(event)
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [r["message"] for r in lines] == ["one", "two 2"]
    assert [r["level"] for r in lines] == ["info", "warn"]


# the runners


def test_twist_gets_the_json_file_observer():
    runner: Dict[str, Any] = {"fileLogObserverFactory": textFileLogObserver, "logFormat": "text"}
    service = Service()
    assert install(service, "json", runner) is service
    assert runner["fileLogObserverFactory"] is json_file_observer
    assert install(service, "text", runner) is service
    assert runner["fileLogObserverFactory"] is textFileLogObserver


def test_twistd_logs_json_to_its_log_file(tmp_path: Any):
    previous = signal.getsignal(signal.SIGUSR1)
    path = tmp_path / "fedserver.log"
    service = Service()
    try:
        wrapped = install(service, "json", {"logfile": str(path), "nodaemon": True, "syslog": False})
        assert wrapped is not service
        application = Application("fedserver")
        IService(wrapped).setServiceParent(application)
        observer = application.getComponent(ILogObserver)
        assert observer is not None
        assert service.parent is wrapped
        for event in events_of(lambda log: log.info("hello [request {request_id}]", request_id="req-1")):
            observer(event)
        (line,) = path.read_text().splitlines()
        assert json.loads(line)["request_id"] == "req-1"
    finally:
        signal.signal(signal.SIGUSR1, previous)


@pytest.mark.parametrize("runner", [
    {"logfile": "x.log", "syslog": True},
    {"logfile": "x.log", "logger": lambda: None},
    None,
])
def test_twistd_destinations_chosen_on_the_command_line_stay(runner: Any):
    service = Service()
    assert install(service, "json", runner) is service


def test_no_format_leaves_the_runner_alone():
    runner: Dict[str, Any] = {"fileLogObserverFactory": textFileLogObserver}
    service = Service()
    assert install(service, None, runner) is service
    assert runner["fileLogObserverFactory"] is textFileLogObserver


def test_daemons_cannot_log_json_to_stdout():
    with pytest.raises(SystemExit):
        install(Service(), "json", {"logfile": "-", "nodaemon": False})


# configuration


def _config(logging: Any) -> Any:
    raw = {
        "server": {"backend_domain": "a.example"},
        "inward": {"listen": "tcp:8443"},
        "discovery": {"plugin": "static"},
        "authenticator": {"plugin": "mtls"},
        "logging": logging,
    }
    return parse_config(raw, file="/etc/fedserver.toml", base_dir="/etc")


def test_the_logging_table():
    assert _config({"format": "json"}).log_format == "json"
    assert _config({}).log_format is None
    with pytest.raises(ConfigError, match=r"\[logging\] format.*must be \"text\" or \"json\""):
        _config({"format": "xml"})
    with pytest.raises(ConfigError, match="level"):
        _config({"format": "json", "level": "debug"})
