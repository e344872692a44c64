"""
A third-party plugin travels the same road as the built-ins: the example
distribution in docs/examples/fedserver-hosts-discovery is built as a wheel,
installed outside the shared venv (pip --target), put on PYTHONPATH, and then
found by C{fedserver plugins} and used by two fedserver processes under
twistd that federate through its C{hosts-file} discovery.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from typing import Any, Dict, Iterator

import pytest

from tests.integration.harness import PKI, Component, Fedserver, backend_config, free_port, post, tool

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EXAMPLE = os.path.join(ROOT, "docs", "examples", "fedserver-hosts-discovery")


def _run(argv: list, cwd: Any, env: Dict[str, str] | None = None, timeout: float = 300) -> str:
    result = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{argv}:\n{result.stdout}\n{result.stderr}"
    return result.stdout


@pytest.fixture(scope="module")
def plugin_env(tmp_path_factory: Any) -> Dict[str, str]:
    """An environment whose PYTHONPATH holds the installed example plugin."""
    tmp = tmp_path_factory.mktemp("hosts-plugin")
    # build from a copy, so that the build leaves nothing in the checkout
    source = tmp / "source"
    shutil.copytree(EXAMPLE, source, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    wheels = tmp / "wheels"
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(wheels), str(source)], tmp)
    (wheel,) = wheels.glob("fedserver_hosts_discovery-*.whl")
    target = tmp / "target"
    _run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)], tmp)
    pythonpath = [str(target)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])
    return dict(os.environ, PYTHONPATH=os.pathsep.join(pythonpath))


def test_plugins_lists_hosts_file(plugin_env: Dict[str, str], tmp_path: Any) -> None:
    listing = _run([tool("fedserver"), "plugins"], tmp_path, env=plugin_env, timeout=60)
    rows = [line.split(None, 2) for line in listing.splitlines()]
    assert ["discovery", "hosts-file", "fedserver-hosts-discovery 1.0.0"] in rows, listing
    # the built-ins are still there beside it
    assert ["discovery", "static", "fedserver 0.1.0"] in rows, listing


def test_not_found_without_the_plugin(tmp_path: Any) -> None:
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    listing = _run([tool("fedserver"), "plugins"], tmp_path, env=env, timeout=60)
    assert "hosts-file" not in listing


@pytest.fixture(scope="module")
def federation(plugin_env: Dict[str, str], tmp_path_factory: Any) -> Iterator[Dict[str, Any]]:
    tmp = tmp_path_factory.mktemp("hosts-federation")
    pki = PKI(str(tmp / "pki"))
    ports = {name: free_port() for name in ("a_in", "a_out", "b_in", "b_out")}
    component = Component(lambda path, headers, body: (200, {"answered-by": "b.example", "path": path}))
    # relative paths: the plugin resolves them against the configuration's folder
    (tmp / "a.hosts").write_text(
        "# backend-domain  infra-domain  host  port\n"
        f"b.example fed.b.example 127.0.0.1 {ports['b_in']}\n"
    )
    (tmp / "b.hosts").write_text(f"a.example fed.a.example 127.0.0.1 {ports['a_in']}\n")
    servers = []
    try:
        for name, backend, infra, peers, hosts in [
            ("b", "b.example", "fed.b.example", ["a.example"], "b.hosts"),
            ("a", "a.example", "fed.a.example", ["b.example", "c.example"], "a.hosts"),
        ]:
            config = backend_config(
                backend, infra, pki=pki,
                inward_port=ports[f"{name}_in"], outward_port=ports[f"{name}_out"],
                discovery={}, allow=peers,
                components={"brig": component.url} if name == "b" else {},
            )
            config["discovery"] = {"plugin": "hosts-file", "path": hosts}
            servers.append(Fedserver(str(tmp), name, config, command="twistd", env=plugin_env))
        yield {"tmp": tmp, "ports": ports, "component": component, "servers": servers}
    finally:
        for server in reversed(servers):
            server.stop()
        component.close()


def test_federation_through_hosts_file(federation: Dict[str, Any]) -> None:
    ports, component = federation["ports"], federation["component"]
    before = len(component.requests)
    code, _, answer = post(ports["a_out"], "/rpc/b.example/brig/some-rpc", {"question": 42})
    assert code == 200, answer
    assert answer == {"answered-by": "b.example", "path": "/federation/some-rpc"}
    assert len(component.requests) == before + 1
    path, headers, body = component.requests[-1]
    assert path == "/federation/some-rpc"
    assert headers["wire-origin-domain"] == "a.example"
    assert body == b'{"question": 42}'


def test_hosts_file_read_again_when_changed(federation: Dict[str, Any]) -> None:
    tmp, ports = federation["tmp"], federation["ports"]
    code, _, answer = post(ports["a_out"], "/rpc/c.example/brig/some-rpc", {})
    assert (code, answer["label"]) == (422, "invalid-domain"), answer
    # c.example is now served by b's infrastructure; a new modification time
    # makes the running process read the file again
    hosts = tmp / "a.hosts"
    hosts.write_text(hosts.read_text() + f"c.example fed.b.example 127.0.0.1 {ports['b_in']}\n")
    status = os.stat(hosts)
    os.utime(hosts, ns=(status.st_atime_ns, status.st_mtime_ns + 1_000_000_000))
    code, _, answer = post(ports["a_out"], "/rpc/c.example/brig/some-rpc", {})
    assert code == 200, answer
    assert answer["path"] == "/federation/some-rpc"
