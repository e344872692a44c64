"""
Helpers for integration tests: real processes on 127.0.0.1.

Every process started here is stopped by the fixture that started it, and
every wait has a deadline.
"""

from __future__ import annotations

import http.client
import http.server
import json
import os
import random
import socket
import ssl
import subprocess
import sys
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from fedserver.pki import Issued, issue, make_ca, write_issued

BIN = os.path.dirname(sys.executable)
WAIT = 30.0


def tool(name: str) -> str:
    """A console script installed next to this Python."""
    return os.path.join(BIN, name)


#: where L{free_port} looks: below Linux's ephemeral range (32768 and up), so
#: that no outgoing connection of another process takes the port as its own
#: end between the choice and the server's listening on it; above the
#: examples' fixed ports (17080 to 29443)
_PORTS = range(29500, 32700)


_given: set = set()


def free_port() -> int:
    """
    A TCP port on 127.0.0.1 that nothing uses right now, outside the
    ephemeral range, and not given before in this run (a test asks for
    several before it starts anything on them).
    """
    if len(_given) > len(_PORTS) // 2:
        _given.clear()
    for port in random.sample([p for p in _PORTS if p not in _given], 200):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            _given.add(port)
            return port
    raise AssertionError(f"no free TCP port on 127.0.0.1 in {_PORTS.start}-{_PORTS.stop - 1}")


def wait_for_port(port: int, process: Optional[subprocess.Popen] = None, timeout: float = WAIT) -> None:
    """Wait until 127.0.0.1:C{port} accepts connections (or C{process} exits)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise AssertionError(f"process exited with {process.returncode} before listening on {port}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise AssertionError(f"nothing listens on 127.0.0.1:{port} after {timeout} s")


def wait_until(what: str, check: Callable[[], Any], timeout: float = WAIT,
               on_timeout: Callable[[], str] = str) -> Any:
    """
    Poll C{check} until it returns something true, and return that; after
    C{timeout} seconds fail naming C{what}, the last value and
    C{on_timeout()} (logs, say).
    """
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what} (last: {value!r})\n{on_timeout()}")
        time.sleep(0.05)


def stop(process: subprocess.Popen, timeout: float = 15.0) -> None:
    """Terminate C{process}; kill it if it does not exit in time."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=timeout)


# TOML

def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(value)


def _toml_key(key: str) -> str:
    return key if key.replace("_", "").replace("-", "").isalnum() else json.dumps(key)


def to_toml(document: Dict[str, Any], prefix: str = "") -> str:
    """A small TOML writer for test configurations (tables, arrays of tables, scalars)."""
    lines: List[str] = []
    nested: List[Tuple[str, Any]] = []
    for key, value in document.items():
        if isinstance(value, dict) or (isinstance(value, list) and value and isinstance(value[0], dict)):
            nested.append((key, value))
        else:
            lines.append(f"{_toml_key(key)} = {_toml_value(value)}")
    text = "\n".join(lines) + ("\n" if lines else "")
    for key, value in nested:
        name = f"{prefix}.{_toml_key(key)}" if prefix else _toml_key(key)
        if isinstance(value, dict):
            text += f"\n[{name}]\n" + to_toml(value, name)
        else:
            for item in value:
                text += f"\n[[{name}]]\n" + to_toml(item, name)
    return text


# PKI

class PKI:
    """A CA made for the test, issuing certificates into C{directory}."""

    def __init__(self, directory: str, name: str = "test CA") -> None:
        self.directory = directory
        os.makedirs(directory, exist_ok=True)
        self.ca = make_ca(name)
        safe = name.replace(" ", "-")
        self.ca_path, _ = write_issued(directory, safe, self.ca)

    def issue(self, stem: str, names: Sequence[str], **kwargs: Any) -> Tuple[str, str]:
        """Write C{stem}.pem (with the CA after the leaf) and C{stem}.key."""
        issued: Issued = issue(self.ca, list(names), **kwargs)
        return write_issued(self.directory, stem, issued, chain=[self.ca])


# a local component

class Component:
    """
    A local HTTP component in a thread of the test process.  Records every
    request; answers with C{answer(path, headers, body) -> (code, document)}.
    """

    def __init__(self, answer: Optional[Callable[[str, Dict[str, str], bytes], Tuple[int, Any]]] = None, *,
                 delay: float = 0.0) -> None:
        self.requests: List[Tuple[str, Dict[str, str], bytes]] = []
        self.answer = answer or (lambda path, headers, body: (200, {"path": path}))
        component = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            # the answer's head and body are two writes: without this, Nagle's algorithm holds the
            # body until fedserver's delayed acknowledgement of the head, 40 ms later
            disable_nagle_algorithm = True

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                headers = {k.lower(): v for k, v in self.headers.items()}
                component.requests.append((self.path, headers, body))
                time.sleep(delay)  # a slow component, for requests still in flight
                code, document = component.answer(self.path, headers, body)
                data = json.dumps(document).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("X-Component-Secret", "not-for-peers")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            # a Matrix homeserver behind fedserver is asked with every method
            do_GET = do_PUT = do_DELETE = do_POST

            def log_message(self, *args: Any) -> None:
                pass

        self.server = _ComponentServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class _ComponentServer(http.server.ThreadingHTTPServer):
    # fedserver opens up to 128 connections to a component at once; the
    # default backlog of 5 would drop most of them
    request_queue_size = 1024


# fedserver processes

class Fedserver:
    """A fedserver process under twistd (or twist), with its configuration."""

    def __init__(self, directory: str, name: str, config: Dict[str, Any], *, command: str = "twistd",
                 env: Optional[Dict[str, str]] = None, soft_open_files: Optional[int] = None) -> None:
        self.directory = directory
        self.name = name
        self.config_path = os.path.join(directory, f"{name}.toml")
        self.log_path = os.path.join(directory, f"{name}.log")
        with open(self.config_path, "w") as f:
            f.write(to_toml(config))
        self.inward_port = _port_of(config["inward"]["listen"])
        self.outward_port = _port_of(config["outward"]["listen"]) if "outward" in config else None
        if command == "twistd":
            argv = [tool("twistd"), "-n", "--pidfile=", f"--logfile={self.log_path}", "fedserver",
                    "--config", self.config_path]
        else:
            argv = [tool("twist"), f"--log-file={self.log_path}", "fedserver", "--config", self.config_path]
        if soft_open_files is not None:
            # started with this soft limit of open files, as from a shell (exec keeps the pid)
            argv = ["sh", "-c", f'ulimit -Sn {soft_open_files} && exec "$@"', "sh", *argv]
        self.process = subprocess.Popen(argv, cwd=directory, env=env, stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT)
        try:
            wait_for_port(self.inward_port, self.process)
            if self.outward_port:
                wait_for_port(self.outward_port, self.process)
        except AssertionError:
            output = self.output()
            self.stop()
            raise AssertionError(f"{name} did not start:\n{output}\n{self.log()}") from None

    def output(self) -> str:
        if self.process.poll() is None or self.process.stdout is None or self.process.stdout.closed:
            return ""
        return self.process.stdout.read().decode(errors="replace")

    def log(self) -> str:
        try:
            with open(self.log_path) as f:
                return f.read()
        except OSError:
            return ""

    def stop(self) -> None:
        stop(self.process)
        if self.process.stdout is not None:
            self.process.stdout.close()


def _port_of(endpoint: str) -> int:
    return int(endpoint.split(":")[1])


def backend_config(
    backend: str,
    infra: str,
    *,
    pki: PKI,
    inward_port: int,
    outward_port: int,
    discovery: Dict[str, Any],
    allow: Sequence[str],
    components: Dict[str, str],
    limits: Optional[Dict[str, Any]] = None,
) -> Dict[str, Any]:
    """A typical backend configuration for tests."""
    cert, key = pki.issue(infra, [infra])
    config: Dict[str, Any] = {
        "server": {"backend_domain": backend, "infra_domain": infra, "data_dir": f"var/{backend}"},
        "inward": {"listen": f"tcp:{inward_port}:interface=127.0.0.1"},
        "outward": {"listen": f"tcp:{outward_port}:interface=127.0.0.1"},
        "tls": {"certificate": cert, "private_key": key, "ca_certificates": [pki.ca_path]},
        "discovery": {"plugin": "static", "domains": discovery},
        "authenticator": {"plugin": "mtls"},
        "authorizers": [{"plugin": "allow-list", "domains": list(allow)}],
        "components": {name: {"plugin": "http-forward", "url": url} for name, url in components.items()},
    }
    if limits:
        config["limits"] = limits
    return config


# clients

def post(port: int, path: str, body: Any = None, *, method: str = "POST", raw: Optional[bytes] = None,
         headers: Optional[Dict[str, str]] = None, timeout: float = 30.0) -> Tuple[int, Dict[str, str], Any]:
    """A plain HTTP request to 127.0.0.1:C{port}; the JSON answer decoded."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    return _exchange(connection, method, path, body, raw, headers)


def discover_json(config_path: str, domain: str, timeout: float = 5.0) -> Tuple[int, Any]:
    """C{fedserver discover --json} with a backend's configuration: its exit code and report."""
    result = subprocess.run(
        [tool("fedserver"), "discover", "--config", config_path, "--json", "--timeout", str(timeout), domain],
        capture_output=True, text=True, timeout=60,
    )
    return result.returncode, json.loads(result.stdout)


def tls_context(ca_path: str, cert: Optional[Tuple[str, str]] = None) -> ssl.SSLContext:
    """A client TLS context trusting C{ca_path}, presenting C{cert} if given."""
    context = ssl.create_default_context(cafile=ca_path)
    if cert is not None:
        context.load_cert_chain(*cert)
    return context


def post_tls(port: int, server_name: str, context: ssl.SSLContext, path: str, body: Any = None, *,
             method: str = "POST", raw: Optional[bytes] = None, headers: Optional[Dict[str, str]] = None,
             timeout: float = 30.0) -> Tuple[int, Dict[str, str], Any]:
    """A request over TLS to an inward listener, as a remote backend would send it."""
    connection = http.client.HTTPSConnection("127.0.0.1", port, context=context, timeout=timeout)
    # the certificate is checked against the infrastructure domain, not 127.0.0.1
    connection._tunnel_host = None  # type: ignore[attr-defined]
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    connection.sock = context.wrap_socket(sock, server_hostname=server_name)
    return _exchange(connection, method, path, body, raw, headers)


def _exchange(connection: http.client.HTTPConnection, method: str, path: str, body: Any,
              raw: Optional[bytes], headers: Optional[Dict[str, str]]) -> Tuple[int, Dict[str, str], Any]:
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    try:
        connection.request(method, path, body=data, headers=headers or {})
        response = connection.getresponse()
        payload = response.read()
        answer_headers = {k.lower(): v for k, v in response.getheaders()}
    finally:
        connection.close()
    try:
        document = json.loads(payload) if payload else None
    except ValueError:
        document = payload
    return response.status, answer_headers, document


# a DNS server

class DNSServer:
    """
    Twisted's own DNS server (C{twistd -n dns}) on 127.0.0.1:C{port}, UDP
    and TCP, authoritative for C{zone} with C{records}.

    C{records} are lines of a Python zone file (see L{srv} and L{a}); the
    zone file is written when the server starts, so records may name ports
    chosen after the server object was made.  L{stop} and L{start} again
    (same port, same zone) to simulate DNS going away and coming back.
    """

    def __init__(self, directory: str, records: Sequence[str], *, zone: str = "example",
                 port: Optional[int] = None) -> None:
        self.directory = directory
        self.zone = zone
        self.records = list(records)
        self.port = port or free_port()
        self.zone_path = os.path.join(directory, f"{zone}.zone.py")
        self.log_path = os.path.join(directory, f"dns-{self.port}.log")
        self.process: Optional[subprocess.Popen] = None

    @staticmethod
    def srv(name: str, priority: int, weight: int, port: int, target: str, ttl: int = 1) -> str:
        """An SRV record line; C{target} C{"."} says the domain has no such service."""
        target_text = 'b"."' if target == "." else repr(target)
        return f"SRV({name!r}, {priority}, {weight}, {port}, {target_text}, ttl={ttl})"

    @staticmethod
    def a(name: str, address: str, ttl: int = 1) -> str:
        """An A record line."""
        return f"A({name!r}, {address!r}, ttl={ttl})"

    def write_zone(self) -> None:
        soa = (f"SOA({self.zone!r}, mname='ns.{self.zone}', rname='hostmaster.{self.zone}', serial=1, "
               "refresh=60, retry=60, expire=60, minimum=1, ttl=1)")
        with open(self.zone_path, "w") as f:
            f.write("zone = [\n" + "".join(f"    {line},\n" for line in [soa, *self.records]) + "]\n")

    def start(self, timeout: float = WAIT) -> None:
        """Write the zone and start the server; return once it accepts TCP (UDP is bound with it)."""
        assert self.process is None or self.process.poll() is not None, "already running"
        self.write_zone()
        argv = [tool("twistd"), "-n", "--pidfile=", f"--logfile={self.log_path}", "dns",
                "--pyzone", self.zone_path, "--port", str(self.port), "--interface", "127.0.0.1"]
        self.process = subprocess.Popen(argv, cwd=self.directory, stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT)
        try:
            wait_for_port(self.port, self.process, timeout)
        except AssertionError as e:
            exited = self.process.poll() is not None and self.process.stdout is not None
            output = self.process.stdout.read().decode(errors="replace") if exited else ""  # type: ignore[union-attr]
            self.stop()
            raise AssertionError(f"the DNS server did not start ({e}):\n{output}\n{self.log()}") from None

    def log(self) -> str:
        try:
            with open(self.log_path) as f:
                return f.read()
        except OSError:
            return ""

    def stop(self) -> None:
        """Stop the server (bounded); nothing happens if it is not running."""
        if self.process is None:
            return
        stop(self.process)
        if self.process.stdout is not None:
            self.process.stdout.close()
