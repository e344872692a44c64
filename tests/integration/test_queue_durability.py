"""
The durable outbound queue across real processes: a.example queues
notifications for b.example while b is down, is killed with SIGKILL while a
delivery is in flight at b's (slow) component, and is started again; every
notification reaches the component exactly once and in order (b
deduplicates the one sent again on its idempotency key), and
C{fedserver queue} shows the queue as it goes.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from typing import Any, Dict, List, Optional

from tests.integration.harness import PKI, Component, Fedserver, backend_config, free_port, post, tool, wait_until

N = 20
#: seconds any one wait in this test may take
WAIT = 60.0


def queue_command(config_path: str, *args: str) -> Any:
    """C{fedserver queue --config FILE --json ARGS}, decoded."""
    result = subprocess.run([tool("fedserver"), "queue", "--config", config_path, "--json", *args],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def destination(config_path: str, name: str = "b.example") -> Optional[Dict[str, Any]]:
    found = [d for d in queue_command(config_path)["destinations"] if d["destination"] == name]
    return found[0] if found else None


def test_a_killed_worker_with_queued_items_loses_nothing(tmp_path: Any) -> None:
    pki = PKI(str(tmp_path / "pki"))
    component = Component(lambda path, headers, body: (200, {"got": json.loads(body)["n"]}), delay=0.25)
    a_in, a_out, b_in, b_out = free_port(), free_port(), free_port(), free_port()
    a_config = backend_config(
        "a.example", "fed.a.example", pki=pki, inward_port=a_in, outward_port=a_out,
        discovery={"b.example": {"infra_domain": "fed.b.example", "host": "127.0.0.1", "port": b_in}},
        allow=["b.example"], components={},
    )
    # quick retries for the test; the defaults are 10 s doubling to 4000 s
    a_config["queue"] = {"initial_backoff": 0.2, "max_backoff": 1, "poll_interval": 0.2}
    b_config = backend_config(
        "b.example", "fed.b.example", pki=pki, inward_port=b_in, outward_port=b_out,
        discovery={"a.example": {"infra_domain": "fed.a.example", "host": "127.0.0.1", "port": a_in}},
        allow=["a.example"], components={"galley": component.url},
    )
    started: List[Fedserver] = []

    def start(name: str, config: Dict[str, Any]) -> Fedserver:
        server = Fedserver(str(tmp_path), name, config)
        started.append(server)
        return server

    try:
        # 1. b is down: a takes every notification, answering once it is on disk
        a = start("a", a_config)
        ids = []
        for n in range(N):
            code, _, answer = post(a.outward_port, "/rpc/b.example/galley/on-x", {"n": n},
                                   headers={"Content-Type": "application/json", "Fedserver-Delivery": "queued"})
            assert code == 202, answer
            ids.append(answer["queued"])
        assert len(set(ids)) == N
        waiting = wait_until("a failed attempt to b",
                             lambda: (d := destination(a.config_path)) and d["failures"] >= 1 and d, WAIT)
        assert waiting["depth"] == N and "federation-connection-refused" in waiting["last_error"]

        # 2. b comes up; a delivers one at a time; a is killed while one is at b's component
        b = start("b", b_config)
        wait_until("five deliveries", lambda: len(component.requests) >= 5, WAIT)
        a.process.send_signal(signal.SIGKILL)
        a.process.wait(timeout=30)
        at_kill = len(component.requests)
        # nothing was lost: what b's component has not seen is still in a's queue
        left = destination(a.config_path)
        assert left is not None and left["depth"] >= N - at_kill, (left, at_kill)

        # 3. a starts again and finishes: each item exactly once, in order
        a = start("a", a_config)
        wait_until("every delivery", lambda: len(component.requests) >= N, WAIT)
        wait_until("a's queue to empty", lambda: destination(a.config_path) is None, WAIT)
        time.sleep(0.5)  # anything sent twice would arrive now
        received = [json.loads(body)["n"] for _, _, body in component.requests]
        assert received == list(range(N)), received
        assert {path for path, _, _ in component.requests} == {"/federation/on-x"}
        # the item in flight at the kill was sent again, and b answered it without its component
        assert "repeated call" in b.log(), b.log()[-3000:]
        assert "Traceback" not in a.log() + b.log()
        assert queue_command(a.config_path, "dead") == {"dead": []}
    finally:
        for server in reversed(started):
            server.stop()
        component.close()
