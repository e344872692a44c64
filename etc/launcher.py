"""
Process handling for the example scripts in etc/: start fedserver, DNS and
component processes, wait for their ports, stop them all on exit, Ctrl-C or
SIGTERM, and call JSON APIs.  Standard library only.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

BIN = os.path.dirname(sys.executable)


def tool(name):
    """A console script installed next to this Python, else on PATH."""
    found = os.path.join(BIN, name)
    return found if os.path.exists(found) else shutil.which(name) or name


def _stop_requested(signum, frame):
    raise KeyboardInterrupt


class Processes:
    """
    The processes an example started; use as a context manager: leaving it
    (normally, on Ctrl-C or on SIGTERM) stops every one of them.
    """

    def __init__(self, log_dir):
        self.log_dir = log_dir
        self.running = []

    def __enter__(self):
        signal.signal(signal.SIGTERM, _stop_requested)
        return self

    def __exit__(self, *exc):
        for process in reversed(self.running):
            process.terminate()
        for process in reversed(self.running):
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        return exc[0] is KeyboardInterrupt

    def start(self, argv, ports=(), timeout=30.0):
        """Start C{argv} and wait until it listens on every port in C{ports}."""
        for port in ports:
            if _listening(port):
                raise SystemExit(f"127.0.0.1:{port} is already in use: is this example running already?")
        process = subprocess.Popen(argv)
        self.running.append(process)
        for port in ports:
            wait_for_port(port, process, timeout)
        return process

    def twistd(self, name, *args, ports=()):
        """C{twistd -n ...} logging to C{log_dir}/C{name}.log."""
        log = os.path.join(self.log_dir, f"{name}.log")
        os.makedirs(os.path.dirname(log), exist_ok=True)
        self.start([tool("twistd"), "-n", "--pidfile=", f"--logfile={log}", *args], ports)
        return log

    @staticmethod
    def serve_until_stopped(hint):
        print(f"\n{hint}\nPress Ctrl-C to stop.", flush=True)
        while True:
            signal.pause()


def _listening(port):
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def wait_for_port(port, process, timeout=30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"a process exited early with code {process.returncode}: {process.args}")
        if _listening(port):
            return
        time.sleep(0.1)
    raise SystemExit(f"nothing listens on 127.0.0.1:{port} after {timeout} s")


def call(method, url, body=None, timeout=15, headers=None):
    """An HTTP request with a JSON body (and extra C{headers}); returns (status, decoded JSON answer)."""
    request = urllib.request.Request(
        url,
        data=None if body is None else json.dumps(body).encode(),
        headers={"Content-Type": "application/json", **(headers or {})},
        method=method,
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as e:
        return e.code, json.load(e)


def make_pki(directory, names):
    """A development CA and certificates for C{names}, made once."""
    if not os.path.exists(os.path.join(directory, "ca.pem")):
        argv = [tool("fedserver"), "dev-pki", directory]
        for name in names:
            argv += ["--domain", name]
        subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)


def check_configs(paths):
    for path in paths:
        subprocess.run([tool("fedserver"), "check-config", path], check=True)
