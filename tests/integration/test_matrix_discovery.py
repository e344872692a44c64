"""
Matrix discovery against real things on 127.0.0.1: Twisted's own DNS server
(C{twistd dns}) and an HTTPS server for C{/.well-known/matrix/server} with a
certificate of a test CA, in the test's reactor.

The specification fetches the well-known from port 443; the fetcher is
pointed at the test server's unprivileged port instead.  Only 127.0.0.1 is
ever connected to: private.example resolves to 10.0.0.1, which the address
policy must refuse before any connection.
"""

from __future__ import annotations

import json
from typing import Any, Iterator

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.web import server
from twisted.web.resource import Resource

import fedserver_matrix.discovery as matrix_discovery
from fedserver.errors import DiscoveryFailure
from fedserver.tls import ClientCertificateServerOptions, TLSMaterial
from fedserver_matrix.discovery import MatrixDiscovery
from tests.integration.harness import PKI, DNSServer
from tests.unit.helpers import build_plugin, make_context, options_for

#: where the delegated server's SRV record points (nothing needs to listen)
FEDERATION_PORT = 8443


class WellKnown(Resource):
    """Delegates home.example to hs.example; knows no other host."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.hosts: list = []

    def render_GET(self, request: Any) -> bytes:
        host = (request.getHeader(b"host") or b"").split(b":")[0]
        self.hosts.append(host)
        if request.path != b"/.well-known/matrix/server" or host != b"home.example":
            request.setResponseCode(404)
            return b"{}"
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"cache-control", b"max-age=3600")
        return json.dumps({"m.server": "hs.example"}).encode()


@pytest.fixture(scope="module")
def dns(tmp_path_factory: Any) -> Iterator[DNSServer]:
    tmp = tmp_path_factory.mktemp("matrix-dns")
    server_ = DNSServer(str(tmp), [
        DNSServer.a("home.example", "127.0.0.1"),
        DNSServer.srv("_matrix-fed._tcp.hs.example", 0, 0, FEDERATION_PORT, "fed.hosting.example"),
        DNSServer.a("fed.hosting.example", "127.0.0.1"),
        DNSServer.a("plain.example", "127.0.0.1"),
        DNSServer.a("private.example", "10.0.0.1"),
    ])
    server_.start()
    try:
        yield server_
    finally:
        server_.stop()


@pytest_twisted.ensureDeferred
async def test_delegation_srv_and_fallback_for_real(dns: DNSServer, tmp_path: Any) -> None:
    pki = PKI(str(tmp_path / "pki"))
    cert, key = pki.issue("home", ["home.example"])
    site = WellKnown()
    tls = ClientCertificateServerOptions(TLSMaterial.load(cert, key, [pki.ca_path]))
    port = reactor.listenTCP(0, TLSMemoryBIOFactory(tls, False, server.Site(site)), interface="127.0.0.1")
    try:
        context = make_context(reactor=reactor, tables={
            "outward": {"allow_ip_ranges": ["127.0.0.0/8"]},
            "tls": {"ca_certificates": [pki.ca_path]},
        })
        options = options_for("discovery", {"plugin": "matrix", "nameservers": [f"127.0.0.1:{dns.port}"],
                                            "timeout": 2, "well_known_timeout": 5})
        discovery: MatrixDiscovery = build_plugin(matrix_discovery, "discovery", options, context)
        discovery.fetcher.port = port.getHost().port

        # delegated by the well-known, then the delegated name's SRV record
        targets = await discovery.discover("home.example")
        assert [(t.infra_domain, t.host, t.port) for t in targets] == [("hs.example", "127.0.0.1", FEDERATION_PORT)]
        assert site.hosts == [b"home.example"]

        # plain.example: the server has no certificate for it, so no
        # delegation; no SRV record either: the name itself at 8448
        targets = await discovery.discover("plain.example")
        assert [(t.infra_domain, t.host, t.port) for t in targets] == [("plain.example", "127.0.0.1", 8448)]
        assert site.hosts == [b"home.example"]

        # a private address is refused before anything connects to it
        with pytest.raises(DiscoveryFailure) as caught:
            await discovery.discover("private.example")
        assert caught.value.label == "discovery-failure"
        assert "10.0.0.1 is not a public address" in caught.value.message

        # a name nobody knows (the zone answers NXDOMAIN)
        with pytest.raises(DiscoveryFailure) as caught:
            await discovery.discover("nowhere.example")
        assert caught.value.label == "invalid-domain"
        assert caught.value.message.startswith("nowhere.example resolves nowhere: ")
    finally:
        await port.stopListening()
