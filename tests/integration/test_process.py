"""
fedserver as a process: startup failures, both launchers, the console script
and the shipped example.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from typing import Any

import pytest

from tests.integration.harness import (
    PKI,
    Component,
    Fedserver,
    backend_config,
    free_port,
    post_tls,
    stop,
    tls_context,
    to_toml,
    tool,
)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _config(tmp: Any, pki: PKI, component_url: str = "http://127.0.0.1:9", **changes: Any) -> dict:
    config = backend_config(
        "b.example", "fed.b.example", pki=pki, inward_port=free_port(), outward_port=free_port(),
        discovery={"a.example": {"infra_domain": "fed.a.example", "host": "127.0.0.1", "port": 9}},
        allow=["a.example"], components={"brig": component_url},
    )
    config.update(changes)
    return config


def _run_twistd(tmp: Any, config: dict, timeout: float = 60) -> subprocess.CompletedProcess:
    path = os.path.join(tmp, "server.toml")
    with open(path, "w") as f:
        f.write(to_toml(config))
    return subprocess.run(
        [tool("twistd"), "-n", "--pidfile=", f"--logfile={tmp}/twistd.log", "fedserver", "--config", path],
        capture_output=True, text=True, timeout=timeout, cwd=tmp,
    )


def test_busy_port_stops_startup(tmp_path: Any) -> None:
    pki = PKI(str(tmp_path / "pki"))
    config = _config(tmp_path, pki)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        config["inward"]["listen"] = f"tcp:{port}:interface=127.0.0.1"
        result = _run_twistd(str(tmp_path), config)
    assert result.returncode != 0
    assert "Address already in use" in result.stdout + result.stderr + open(f"{tmp_path}/twistd.log").read()


@pytest.mark.parametrize(
    "change, expected",
    [
        ({"limits": {"max_body_bytes": "big"}}, "[limits] max_body_bytes: must be an integer"),
        ({"authenticator": {"plugin": "kerberos"}}, "no installed authenticator plugin is called 'kerberos'"),
        ({"authorizers": [{"plugin": "allow-list", "domain": ["a.example"]}]}, "[authorizers[0]] domain"),
        ({"extra": {"x": 1}}, "[extra]: is not a table"),
    ],
)
def test_bad_config_stops_startup_naming_the_key(tmp_path: Any, change: dict, expected: str) -> None:
    pki = PKI(str(tmp_path / "pki"))
    result = _run_twistd(str(tmp_path), _config(tmp_path, pki, **change))
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert expected in output
    assert "server.toml" in output
    assert "Traceback" not in output
    check = subprocess.run([tool("fedserver"), "check-config", f"{tmp_path}/server.toml"],
                           capture_output=True, text=True, timeout=60)
    assert check.returncode == 1
    assert expected in check.stderr


def test_missing_certificate_file_is_named(tmp_path: Any) -> None:
    pki = PKI(str(tmp_path / "pki"))
    config = _config(tmp_path, pki)
    config["tls"]["certificate"] = "no-such.pem"
    result = _run_twistd(str(tmp_path), config)
    assert result.returncode != 0
    assert "[tls] certificate: cannot read" in result.stdout + result.stderr
    assert "no-such.pem" in result.stdout + result.stderr


def test_twist_runs_fedserver(tmp_path: Any) -> None:
    pki = PKI(str(tmp_path / "pki"))
    component = Component()
    server = None
    try:
        server = Fedserver(str(tmp_path), "b", _config(tmp_path, pki, component.url), command="twist")
        # a.example is discovered at a closed port, so origin validation uses
        # b's table only: a valid certificate for fed.a.example passes
        cert = pki.issue("peer", ["fed.a.example"])
        status, _, answer = post_tls(server.inward_port, "fed.b.example", tls_context(pki.ca_path, cert),
                                     "/federation/brig/hello", raw=b"{}",
                                     headers={"Wire-Origin-Domain": "a.example"})
        assert status == 200, answer
        assert component.requests[0][0] == "/federation/hello"
    finally:
        if server is not None:
            server.stop()
        component.close()


def test_federation_request_command(tmp_path: Any) -> None:
    pki = PKI(str(tmp_path / "pki"))
    component = Component()
    servers = []
    try:
        b_config = _config(tmp_path, pki, component.url)
        b = Fedserver(str(tmp_path), "b", b_config)
        servers.append(b)
        a_config = backend_config(
            "a.example", "fed.a.example", pki=pki, inward_port=free_port(), outward_port=free_port(),
            discovery={"b.example": {"infra_domain": "fed.b.example", "host": "127.0.0.1",
                                     "port": b.inward_port}},
            allow=["b.example"], components={},
        )
        b_config["discovery"]["domains"]["a.example"]["port"] = a_config["inward"]["listen"].split(":")[1]
        a_path = os.path.join(tmp_path, "a.toml")
        with open(a_path, "w") as f:
            f.write(to_toml(a_config))
        result = subprocess.run(
            [tool("fedserver"), "federation-request", "--config", a_path, "--body", '{"q": 1}',
             "b.example", "/federation/brig/get-user-by-handle"],
            capture_output=True, text=True, timeout=60,
        )
        assert result.returncode == 0, result.stderr
        assert '"path": "/federation/get-user-by-handle"' in result.stdout
        refused = subprocess.run(
            [tool("fedserver"), "federation-request", "--config", a_path, "c.example", "/federation/brig/x"],
            capture_output=True, text=True, timeout=60,
        )
        assert refused.returncode == 1
        assert "federation-denied" in refused.stderr
    finally:
        for server in servers:
            server.stop()
        component.close()


def test_shipped_example_runs_and_stops_everything_on_sigterm(tmp_path: Any) -> None:
    example = shutil.copytree(os.path.join(ROOT, "etc", "example"), tmp_path / "etc" / "example",
                              ignore=shutil.ignore_patterns("var"))
    shutil.copy(os.path.join(ROOT, "etc", "launcher.py"), tmp_path / "etc" / "launcher.py")
    env = dict(os.environ, PATH=os.path.dirname(tool("twistd")) + os.pathsep + os.environ["PATH"])
    process = subprocess.Popen([tool("python"), os.path.join(example, "run.py")],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    lines: list = []
    reader = threading.Thread(target=lambda: lines.extend(process.stdout), daemon=True)  # type: ignore[arg-type]
    reader.start()
    try:
        deadline = time.monotonic() + 120
        while not any("Press Ctrl-C" in line for line in lines):
            assert process.poll() is None and time.monotonic() < deadline, "".join(lines)
            time.sleep(0.1)
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=60)
    finally:
        stop(process)
    reader.join(timeout=10)
    output = "".join(lines)
    assert process.returncode == 0, output
    assert "a.example asks b.example for @bob: HTTP 200" in output
    assert '"qualified_id": "bob@b.example"' in output
    assert "b.example asks a.example for @alice: HTTP 200" in output
    assert "HTTP 533" in output and "federation-denied" in output
    # every process the example started is gone with it
    for port in (18443, 18080, 18081, 28443, 28080, 28081):
        with socket.socket() as s:
            assert s.connect_ex(("127.0.0.1", port)) != 0, f"port {port} still open"
    for name in ("a.example", "b.example"):
        check = subprocess.run([tool("fedserver"), "check-config", os.path.join(example, f"{name}.toml")],
                               capture_output=True, text=True, timeout=60)
        assert check.returncode == 0, check.stderr
