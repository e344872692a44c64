"""
Stopping a fedserver that is answering: the request in flight is answered
and delivered, over TLS too, before the process exits.
"""

from __future__ import annotations

import signal
import threading
import time
from typing import Any

from tests.integration.harness import PKI, Component, Fedserver, backend_config, free_port, post_tls, tls_context


def test_a_request_in_flight_is_answered_when_stopping(tmp_path: Any) -> None:
    pki = PKI(str(tmp_path / "pki"))
    component = Component(lambda path, headers, body: (200, {"slow": True}), delay=1.5)
    server = Fedserver(str(tmp_path), "b", backend_config(
        "b.example", "fed.b.example", pki=pki, inward_port=free_port(), outward_port=free_port(),
        discovery={"a.example": {"infra_domain": "fed.a.example", "host": "127.0.0.1", "port": 9}},
        allow=["a.example"], components={"brig": component.url},
    ))
    answers: list = []
    try:
        peer = pki.issue("peer", ["fed.a.example"])

        def call() -> None:
            answers.append(post_tls(server.inward_port, "fed.b.example", tls_context(pki.ca_path, peer),
                                    "/federation/brig/slow", raw=b"{}",
                                    headers={"Wire-Origin-Domain": "a.example"}))

        caller = threading.Thread(target=call)
        caller.start()
        time.sleep(0.5)  # the request is at the component now
        server.process.send_signal(signal.SIGTERM)
        caller.join(timeout=30)
        server.process.wait(timeout=30)
    finally:
        server.stop()
        component.close()
    assert answers and answers[0][0] == 200, answers
    assert answers[0][2] == {"slow": True}
    # twistd ends by re-raising the signal that stopped it
    assert server.process.returncode == -signal.SIGTERM
    assert "Server Shut Down." in server.log()
