"""
Operations (issue 8, item 7): the example systemd unit (etc/systemd/) and
moving a backend with C{fedserver backup} and C{fedserver restore}, as
docs/operations.md describes them, against real processes.
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import sqlite3
import subprocess
import threading
import time
from typing import Any, Dict, List

import pytest

from tests.integration.harness import (
    BIN,
    PKI,
    Fedserver,
    backend_config,
    free_port,
    post,
    stop,
    to_toml,
    tool,
    wait_for_port,
)

UNIT = os.path.join(os.path.dirname(__file__), "..", "..", "etc", "systemd", "fedserver.service")
INSTALLED = "/opt/fedserver/bin/"
CONFIG = "/etc/fedserver/fedserver.toml"


def unit_settings() -> Dict[str, List[str]]:
    settings: Dict[str, List[str]] = {}
    with open(UNIT) as f:
        for line in f:
            line = line.strip()
            if line and not line.startswith(("#", "[")):
                key, _, value = line.partition("=")
                settings.setdefault(key, []).append(value)
    return settings


def test_the_unit_is_what_the_documentation_says() -> None:
    settings = unit_settings()
    assert settings["Type"] == ["simple"] and settings["User"] == ["fedserver"]
    assert settings["Restart"] == ["on-failure"]
    assert settings["ExecStart"] == [f"{INSTALLED}twist --log-format=text fedserver --config {CONFIG}"]
    assert settings["NoNewPrivileges"] == ["yes"] and settings["ProtectSystem"] == ["strict"]
    assert settings["ReadWritePaths"] == ["/var/lib/fedserver"]
    assert int(settings["LimitNOFILE"][0]) >= 4 * 1024  # [limits] max_connections and the pools
    assert int(settings["TimeoutStopSec"][0]) > 10 + 5  # the drain, then closing the connections
    assert "ExecReload" not in settings  # SIGHUP would stop twist


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_systemd_verifies_the_unit(tmp_path: Any) -> None:
    with open(UNIT) as f:
        text = f.read().replace(INSTALLED, BIN + "/")
    unit = tmp_path / "fedserver.service"
    unit.write_text(text)
    result = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60)
    complaints = [line for line in (result.stdout + result.stderr).splitlines() if "fedserver.service" in line]
    assert result.returncode == 0 and complaints == [], result.stdout + result.stderr


def test_the_units_commands_run_fedserver_and_sigterm_stops_it(tmp_path: Any) -> None:
    """ExecStartPre, then ExecStart, as systemd runs them (the paths of this checkout), then KillSignal."""
    pki = PKI(str(tmp_path / "pki"))
    inward, outward = free_port(), free_port()
    config = backend_config("b.example", "fed.b.example", pki=pki, inward_port=inward, outward_port=outward,
                            discovery={}, allow=["a.example"], components={})
    config_path = tmp_path / "fedserver.toml"
    config_path.write_text(to_toml(config))
    settings = unit_settings()

    def command(line: str) -> List[str]:
        return shlex.split(line.replace(INSTALLED, BIN + "/").replace(CONFIG, str(config_path)))

    (pre,) = settings["ExecStartPre"]
    check = subprocess.run(command(pre), capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert check.returncode == 0 and check.stdout.strip() == f"{config_path}: OK", check.stderr
    (start,) = settings["ExecStart"]
    process = subprocess.Popen(command(start), cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        wait_for_port(outward, process)
        # the ports are bound before the reactor runs: an answer shows it runs (and handles SIGTERM)
        assert post(outward, "/nothing")[0] == 403
        process.send_signal(getattr(signal, settings["KillSignal"][0]))
        process.wait(timeout=int(settings["TimeoutStopSec"][0]))
        output = process.stdout.read().decode() if process.stdout else ""
    finally:
        stop(process)
        if process.stdout:
            process.stdout.close()
    # twist ends by the signal it stopped for, which systemd counts as a clean exit (not restarted)
    assert process.returncode in (0, -signal.SIGTERM), output
    # text lines for the journal, not Twisted's JSON records
    assert "[twisted.internet.base#info] Received SIGTERM, shutting down." in output, output
    assert "\x1e" not in output and output.rstrip().endswith("Main loop terminated.")


# moving a backend


def _wire_config(pki: PKI, inward: int, outward: int) -> Dict[str, Any]:
    config = backend_config("w.example", "fed.w.example", pki=pki, inward_port=inward, outward_port=outward,
                            discovery={}, allow=["a.example"], components={})
    config["components"] = {"brig": {"plugin": "wire-brig"}, "galley": {"plugin": "wire-galley"}}
    return config


def _create(server: Fedserver, handle: str) -> int:
    status, _, _ = post(server.outward_port, "/wire/users", {"handle": handle, "name": handle},
                        headers={"Content-Type": "application/json"})
    return status


def _handles(database: str) -> List[str]:
    with sqlite3.connect(database) as db:
        return sorted(row[0] for row in db.execute("SELECT handle FROM wire_users"))


def test_a_backend_moves_to_a_new_host(tmp_path: Any) -> None:
    old_host, new_host = tmp_path / "old", tmp_path / "new"
    old_host.mkdir()
    pki = PKI(str(old_host / "pki"))
    server = Fedserver(str(old_host), "w", _wire_config(pki, free_port(), free_port()), command="twist")
    backup_path = str(tmp_path / "w.backup")
    try:
        created = [f"user{i}" for i in range(20)]
        assert all(_create(server, handle) == 201 for handle in created)

        # the backup is taken while users keep being created
        during: List[str] = []
        writing = True

        def keep_writing() -> None:
            i = 0
            while writing:
                if _create(server, f"during{i}") == 201:
                    during.append(f"during{i}")
                i += 1

        writer = threading.Thread(target=keep_writing)
        writer.start()
        time.sleep(0.3)
        try:
            result = subprocess.run([tool("fedserver"), "backup", "--config", server.config_path, backup_path],
                                    capture_output=True, text=True, timeout=60)
        finally:
            writing = False
            writer.join(30)
        assert result.returncode == 0, result.stderr
        assert "integrity ok" in result.stdout
        assert during, "nothing was written during the backup"
    finally:
        server.stop()

    saved = _handles(backup_path)
    assert set(created) <= set(saved)  # everything answered 201 before the backup is in it
    assert set(saved) - set(created) <= set(during)  # and what came during it, whole or not at all

    # the new host: the same configuration and [tls] files, other ports (the old host's are taken in this test)
    shutil.copytree(old_host / "pki", new_host / "pki")
    config = _wire_config(pki, free_port(), free_port())
    config["tls"] = {key: value.replace(str(old_host), str(new_host)) if isinstance(value, str)
                     else [v.replace(str(old_host), str(new_host)) for v in value]
                     for key, value in config["tls"].items()}
    config_path = new_host / "w.toml"
    config_path.write_text(to_toml(config))
    result = subprocess.run([tool("fedserver"), "restore", "--config", str(config_path), backup_path],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    database = str(new_host / "var" / "w.example" / "fedserver.sqlite")
    assert result.stdout.startswith(f"{database}: restored from {backup_path}")

    moved = Fedserver(str(new_host), "w", config, command="twist")
    try:
        for handle in (created[0], created[-1], *saved[-1:]):
            status, _, answer = post(moved.outward_port, f"/wire/handles/w.example/{handle}", method="GET")
            assert status == 200 and answer["handle"] == handle, answer
        assert _create(moved, "after-the-move") == 201
        assert _create(moved, created[0]) == 409  # the restored users are the backend's users
    finally:
        moved.stop()
    assert "Traceback" not in moved.log()
