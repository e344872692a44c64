"""
The benchmark's local component: a minimal twisted.web JSON service.

    python bench/component.py --port 8081

It answers C{POST /federation/{rpc}} with a small JSON document (L{answer}),
as brig answers C{get-user-by-handle}, and logs nothing per request.  It
counts the calls it answered and their distinct bodies: C{GET /stats}
answers C{{"calls": N, "distinct": M}} (bench/outbound_queue.py checks with
it that no call arrived twice).  The
C{direct} scenario loads it alone (the one-hop ceiling); the C{naive} and
C{fedserver} scenarios forward to it.  L{QuietSite} and L{serve} are shared
with the naive proxies, so every Twisted server of the benchmark is set up
the same way.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Optional

from twisted.internet.interfaces import IOpenSSLServerConnectionCreator
from twisted.logger import globalLogBeginner, textFileLogObserver
from twisted.web import resource, server

#: the user every answer describes
USER = {
    "id": "5a4d7f2e-9c1b-4e0a-8f3d-2b6c1e9a7d40",
    "domain": "b.example",
    "handle": "bob",
    "name": "Bob Dylan",
    "accent_id": 3,
}


def answer(rpc: str) -> bytes:
    """The JSON document answered for C{rpc} (about 150 bytes)."""
    return json.dumps({"rpc": rpc, "user": USER}, separators=(",", ":")).encode()


class QuietSite(server.Site):
    """A L{server.Site} without the access log: nothing is written per request."""

    def log(self, request: Any) -> None:
        pass


class Federation(resource.Resource):
    """C{/federation/{rpc}}: the component's answer for C{rpc}; C{/stats}: what it answered."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0
        self.bodies: set = set()

    def render_POST(self, request: server.Request) -> bytes:
        path = request.postpath or []
        request.setHeader(b"content-type", b"application/json")
        if len(path) != 2 or path[0] != b"federation":
            request.setResponseCode(404)
            return b'{"label":"no-endpoint"}'
        self.calls += 1
        self.bodies.add(request.content.read() if request.content is not None else b"")
        return answer(path[1].decode("latin-1"))

    def render_GET(self, request: server.Request) -> bytes:
        request.setHeader(b"content-type", b"application/json")
        if request.postpath != [b"stats"]:
            request.setResponseCode(404)
            return b'{"label":"no-endpoint"}'
        return json.dumps({"calls": self.calls, "distinct": len(self.bodies)}).encode()


def serve(root: resource.Resource, port: int,
          tls: Optional[IOpenSSLServerConnectionCreator] = None) -> None:
    """Serve C{root} on 127.0.0.1:C{port} (over TLS with C{tls}) until stopped; log to stderr."""
    from twisted.internet import reactor as _reactor

    reactor: Any = _reactor
    globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stderr)], redirectStandardIO=False)
    site = QuietSite(root)
    if tls is None:
        reactor.listenTCP(port, site, interface="127.0.0.1")
    else:
        reactor.listenSSL(port, site, tls, interface="127.0.0.1")
    reactor.run()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--port", type=int, required=True, help="TCP port on 127.0.0.1")
    serve(Federation(), parser.parse_args().port)


if __name__ == "__main__":
    main()
