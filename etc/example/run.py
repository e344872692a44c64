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
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
from launcher import Processes, call, check_configs, make_pki  # noqa: E402

VAR = os.path.join(HERE, "var")

BACKENDS = {
    # domain: (inward port, outward port, component port, users)
    "a.example": (18443, 18080, 18081, ["alice=Alice Liddell", "alan=Alan Turing"]),
    "b.example": (28443, 28080, 28081, ["bob=Bob Dylan", "barbara=Barbara Liskov"]),
}


def main():
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--once", action="store_true", help="stop after showing the calls")
    args = parser.parse_args()

    make_pki(os.path.join(VAR, "pki"), ["fed.a.example", "fed.b.example"])
    check_configs([os.path.join(HERE, f"{domain}.toml") for domain in BACKENDS])
    with Processes(VAR) as processes:
        for domain, (inward, outward, component, users) in BACKENDS.items():
            processes.start(
                [sys.executable, os.path.join(HERE, "directory.py"), "--port", str(component),
                 "--domain", domain] + [arg for u in users for arg in ("--user", u)],
                ports=[component],
            )
            log = processes.twistd(f"{domain}/fedserver", "fedserver", "--config",
                                   os.path.join(HERE, f"{domain}.toml"), ports=[inward, outward])
            print(f"{domain}: fedserver inward 127.0.0.1:{inward}, outward 127.0.0.1:{outward}; "
                  f"log {os.path.relpath(log)}")

        print()
        for origin, target, handle in [("a.example", "b.example", "bob"),
                                       ("b.example", "a.example", "alice"),
                                       ("a.example", "b.example", "nobody"),
                                       ("a.example", "c.example", "carol")]:
            outward = BACKENDS[origin][1]
            status, answer = call("POST", f"http://127.0.0.1:{outward}/rpc/{target}/brig/get-user-by-handle",
                                  {"handle": handle})
            note = " (not federated)" if target == "c.example" else ""
            print(f"{origin} asks {target}{note} for @{handle}: HTTP {status}")
            print("   " + json.dumps(answer))
        if not args.once:
            processes.serve_until_stopped(
                "The federation is running; try for example:\n"
                "  curl -s -X POST -d '{\"term\": \"b\"}' http://127.0.0.1:18080/rpc/b.example/brig/search-users"
            )


if __name__ == "__main__":
    main()
