"""
Run the two-backend example federation on 127.0.0.1 and show it working.

    python etc/example/run.py          # run, show calls, serve until Ctrl-C
    python etc/example/run.py --once   # run, show calls, stop

It makes a development CA and certificates under etc/example/var/pki (once),
starts each backend's directory component and fedserver under twistd, then
asks each backend's fedserver to call the other: a component on a.example
looks up @bob on b.example, and b.example's looks up @alice on a.example.
"""

import argparse
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

HERE = os.path.dirname(os.path.abspath(__file__))
VAR = os.path.join(HERE, "var")
BIN = os.path.dirname(sys.executable)

BACKENDS = {
    # domain: (inward port, outward port, component port, users)
    "a.example": (18443, 18080, 18081, ["alice=Alice Liddell", "alan=Alan Turing"]),
    "b.example": (28443, 28080, 28081, ["bob=Bob Dylan", "barbara=Barbara Liskov"]),
}


def tool(name):
    found = os.path.join(BIN, name)
    return found if os.path.exists(found) else shutil.which(name) or name


def wait_for_port(port, process, timeout=30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"a process exited early with code {process.returncode}; see {VAR}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise SystemExit(f"nothing listens on 127.0.0.1:{port} after {timeout} s")


def call(outward_port, domain, component, rpc, body):
    request = urllib.request.Request(
        f"http://127.0.0.1:{outward_port}/rpc/{domain}/{component}/{rpc}",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=15) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as e:
        return e.code, json.load(e)


def _stop_requested(signum, frame):
    raise KeyboardInterrupt


def main():
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--once", action="store_true", help="stop after showing the calls")
    args = parser.parse_args()

    pki = os.path.join(VAR, "pki")
    if not os.path.exists(os.path.join(pki, "ca.pem")):
        subprocess.run([tool("fedserver"), "dev-pki", pki, "--domain", "fed.a.example",
                        "--domain", "fed.b.example"], check=True)
    for domain in BACKENDS:
        config = os.path.join(HERE, f"{domain}.toml")
        subprocess.run([tool("fedserver"), "check-config", config], check=True)

    # SIGTERM, like Ctrl-C, ends the wait below through the finally clause,
    # which stops every process started here.
    signal.signal(signal.SIGTERM, _stop_requested)
    processes = []
    try:
        for domain, (inward, outward, component, users) in BACKENDS.items():
            os.makedirs(os.path.join(VAR, domain), exist_ok=True)
            directory = subprocess.Popen(
                [sys.executable, os.path.join(HERE, "directory.py"), "--port", str(component),
                 "--domain", domain] + [arg for u in users for arg in ("--user", u)]
            )
            processes.append(directory)
            wait_for_port(component, directory)
            log = os.path.join(VAR, domain, "fedserver.log")
            server = subprocess.Popen(
                [tool("twistd"), "-n", "--pidfile=", f"--logfile={log}", "fedserver",
                 "--config", os.path.join(HERE, f"{domain}.toml")]
            )
            processes.append(server)
            wait_for_port(inward, server)
            wait_for_port(outward, server)
            print(f"{domain}: fedserver inward 127.0.0.1:{inward}, outward 127.0.0.1:{outward}; "
                  f"log {os.path.relpath(log)}")

        print()
        for origin, target, handle in [("a.example", "b.example", "bob"),
                                       ("b.example", "a.example", "alice"),
                                       ("a.example", "b.example", "nobody")]:
            outward = BACKENDS[origin][1]
            status, answer = call(outward, target, "brig", "get-user-by-handle", {"handle": handle})
            print(f"{origin} asks {target} for @{handle}: HTTP {status}")
            print("   " + json.dumps(answer))
        status, answer = call(BACKENDS["a.example"][1], "c.example", "brig", "get-user-by-handle",
                              {"handle": "carol"})
        print(f"a.example asks c.example (not federated) for @carol: HTTP {status}")
        print("   " + json.dumps(answer))
        if not args.once:
            print("\nThe federation is running; try for example:\n"
                  "  curl -s -X POST -d '{\"term\": \"b\"}' "
                  "http://127.0.0.1:18080/rpc/b.example/brig/search-users\n"
                  "Press Ctrl-C to stop.")
            while True:
                signal.pause()
    except KeyboardInterrupt:
        pass
    finally:
        for process in reversed(processes):
            process.terminate()
        for process in reversed(processes):
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


if __name__ == "__main__":
    main()
