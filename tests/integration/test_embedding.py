"""
Embedding: an application builds fedserver with L{fedserver.build_service},
serves the inward federation route from its own Site next to its own
resources, and uses the outward resource, all in its own reactor.
"""

from __future__ import annotations

import json
import os
from typing import Any

import pytest_twisted
import treq
from twisted.internet import reactor
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.web import resource, server

import fedserver
from tests.integration.harness import PKI, Component, backend_config, to_toml


def _write(tmp: Any, name: str, config: dict) -> str:
    path = os.path.join(tmp, f"{name}.toml")
    with open(path, "w") as f:
        f.write(to_toml(config))
    return path


@pytest_twisted.ensureDeferred
async def test_embedded_federation(tmp_path: Any) -> None:
    pki = PKI(str(tmp_path / "pki"))
    component = Component()
    listening = []
    services = []
    try:
        # b.example: the application's own Site serves /health and, mounted
        # from fedserver, /federation, over fedserver's mutual TLS settings
        b = fedserver.build_service(_write(tmp_path, "b", backend_config(
            "b.example", "fed.b.example", pki=pki, inward_port=1, outward_port=2,
            discovery={"a.example": {"infra_domain": "fed.a.example", "port": 1}},
            allow=["a.example"], components={"brig": component.url},
        )), reactor=reactor, listen=False)
        services.append(b)
        app = resource.Resource()
        app.putChild(b"health", resource.Resource())
        app.putChild(b"federation", b.inward_resource.getStaticEntity(b"federation"))
        tls = TLSMemoryBIOFactory(b.context.authenticator.server_tls_options(), False, server.Site(app))
        b_port = reactor.listenTCP(0, tls, interface="127.0.0.1")
        listening.append(b_port)

        # a.example: only the outward resource, in the application's reactor
        a = fedserver.build_service(_write(tmp_path, "a", backend_config(
            "a.example", "fed.a.example", pki=pki, inward_port=1, outward_port=2,
            discovery={"b.example": {"infra_domain": "fed.b.example", "host": "127.0.0.1",
                                     "port": b_port.getHost().port}},
            allow=["b.example"], components={},
        )), reactor=reactor, listen=False)
        services.append(a)
        a_port = reactor.listenTCP(0, server.Site(a.outward_resource), interface="127.0.0.1")
        listening.append(a_port)
        for service in services:
            service.startService()

        url = f"http://127.0.0.1:{a_port.getHost().port}/rpc/b.example/brig/get-user-by-handle"
        response = await treq.post(url, json.dumps({"handle": "bob"}).encode(), timeout=30)
        body = json.loads(await response.content())
        assert response.code == 200, body
        assert body == {"path": "/federation/get-user-by-handle"}
        assert component.requests[0][1]["wire-origin-domain"] == "a.example"

        # the application's own Site enforces fedserver's body limit too
        limit = a.context.config.limits.max_body_bytes
        response = await treq.post(url, b"[" + b" " * limit + b"]", timeout=30)
        assert response.code == 413
        assert json.loads(await response.content())["label"] == "request-too-large"
    finally:
        for port in listening:
            await port.stopListening()
        for service in services:
            if service.running:
                await service.stopService()
        component.close()
