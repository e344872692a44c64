"""
A hand-written federation proxy chain: what a competent Twisted user would
write instead of fedserver.  The C{naive} scenario of the benchmark runs two
of them:

    wrk -> outward (A') -> mutual TLS -> inward (B') -> component

    python bench/naive_proxy.py outward --port 18080 --domain a.example \\
        --peer-domain b.example --peer https://127.0.0.1:28443 --peer-name fed.b.example \\
        --certificate fed.a.example.pem --private-key fed.a.example.key --ca ca.pem
    python bench/naive_proxy.py inward --port 28443 --component brig=http://127.0.0.1:28081 \\
        --certificate fed.b.example.pem --private-key fed.b.example.key --ca ca.pem

C{outward} forwards C{POST /rpc/{domain}/{component}/{rpc}} to the peer as
C{POST /federation/{component}/{rpc}} over mutual TLS (our certificate
presented, the peer's verified against the CA for C{--peer-name}), adding
C{Wire-Origin-Domain}.  C{inward} terminates mutual TLS, requires a client
certificate signed by the CA, and forwards C{POST /federation/{component}/{rpc}}
to that component as C{POST /federation/{rpc}}.  Both use treq with one
persistent connection pool and log nothing per request.  The answer's
status, C{Content-Type} and body go back as they came.
"""

from __future__ import annotations

import argparse
import json
from typing import Any, Callable, Dict, List, Optional, Tuple

from component import serve
from treq.client import HTTPClient
from twisted.internet import ssl
from twisted.internet.defer import CancelledError
from twisted.python.failure import Failure
from twisted.web import resource, server
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.http_headers import Headers
from twisted.web.iweb import IPolicyForHTTPS
from zope.interface import implementer

#: (URL, headers) to forward a request to, or None when the path is not ours
Route = Callable[[List[bytes], server.Request], Optional[Tuple[str, Headers]]]

JSON = [b"application/json"]


@implementer(IPolicyForHTTPS)
class PeerTLS:
    """The same client TLS options for every connection: our certificate, the peer's name and CA."""

    def __init__(self, options: Any) -> None:
        self.options = options

    def creatorForNetloc(self, hostname: bytes, port: int) -> Any:
        return self.options


class Forward(resource.Resource):
    """POSTs whose path C{route} knows are forwarded; the answer is relayed."""

    isLeaf = True

    def __init__(self, http: HTTPClient, route: Route) -> None:
        super().__init__()
        self.http = http
        self.route = route

    def render_POST(self, request: server.Request) -> Any:
        found = self.route(request.postpath or [], request)
        if found is None:
            request.setResponseCode(404)
            request.setHeader(b"content-type", b"application/json")
            return b'{"label":"no-endpoint"}'
        url, headers = found
        body = request.content.read() if request.content is not None else b""
        d = self.http.post(url, data=body, headers=headers, timeout=30)
        d.addCallback(lambda response: response.content().addCallback(lambda content: (response, content)))
        d.addCallbacks(self._relay, self._failed, callbackArgs=(request,), errbackArgs=(request,))
        request.notifyFinish().addErrback(lambda _: d.cancel())
        return server.NOT_DONE_YET

    @staticmethod
    def _relay(answer: Tuple[Any, bytes], request: server.Request) -> None:
        if request._disconnected:
            return  # the client went away while we waited
        response, body = answer
        request.setResponseCode(response.code)
        request.setHeader(b"content-type", response.headers.getRawHeaders(b"content-type", JSON)[0])
        request.write(body)
        request.finish()

    @staticmethod
    def _failed(failure: Failure, request: server.Request) -> None:
        if request._disconnected or failure.check(CancelledError):
            return  # the client went away; the answer (or its failure) has nowhere to go
        request.setResponseCode(502)
        request.setHeader(b"content-type", b"application/json")
        request.write(json.dumps({"label": "bad-gateway", "message": failure.getErrorMessage()}).encode())
        request.finish()


def outward_route(domain: str, peer_domain: str, peer: str) -> Route:
    """C{/rpc/{peer_domain}/{component}/{rpc}} -> C{{peer}/federation/{component}/{rpc}}."""
    origin = [domain.encode()]
    expected = peer_domain.encode()

    def route(path: List[bytes], request: server.Request) -> Optional[Tuple[str, Headers]]:
        if len(path) != 4 or path[0] != b"rpc" or path[1] != expected:
            return None
        url = f"{peer}/federation/{path[2].decode()}/{path[3].decode()}"
        return url, Headers({b"content-type": JSON, b"wire-origin-domain": origin})

    return route


def inward_route(components: Dict[str, str]) -> Route:
    """C{/federation/{component}/{rpc}} -> C{{component URL}/federation/{rpc}}."""
    urls = {name.encode(): url.rstrip("/") for name, url in components.items()}

    def route(path: List[bytes], request: server.Request) -> Optional[Tuple[str, Headers]]:
        if len(path) != 3 or path[0] != b"federation" or path[1] not in urls:
            return None
        origin = request.requestHeaders.getRawHeaders(b"wire-origin-domain", [b""])
        url = f"{urls[path[1]]}/federation/{path[2].decode()}"
        return url, Headers({b"content-type": JSON, b"wire-origin-domain": origin})

    return route


def http_client(pool_size: int, tls: Optional[IPolicyForHTTPS] = None) -> HTTPClient:
    """treq over one persistent pool keeping up to C{pool_size} idle connections per host."""
    from twisted.internet import reactor

    pool = HTTPConnectionPool(reactor, persistent=True)
    pool.maxPersistentPerHost = pool_size
    agent = Agent(reactor, pool=pool) if tls is None else Agent(reactor, contextFactory=tls, pool=pool)
    return HTTPClient(agent)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("mode", choices=["outward", "inward"])
    parser.add_argument("--port", type=int, required=True, help="TCP port on 127.0.0.1")
    parser.add_argument("--certificate", required=True, help="our certificate (PEM)")
    parser.add_argument("--private-key", required=True, help="its private key (PEM)")
    parser.add_argument("--ca", required=True, help="the CA certificate that signs the peers (PEM)")
    parser.add_argument("--pool-size", type=int, default=128, help="persistent connections per host")
    parser.add_argument("--domain", help="outward: our backend domain")
    parser.add_argument("--peer-domain", help="outward: the backend domain we forward to")
    parser.add_argument("--peer", help="outward: the peer's base URL, https://host:port")
    parser.add_argument("--peer-name", help="outward: the name the peer's certificate must carry")
    parser.add_argument("--component", action="append", default=[], metavar="NAME=URL",
                        help="inward: a component and its base URL (repeatable)")
    args = parser.parse_args()

    with open(args.certificate, "rb") as f, open(args.private_key, "rb") as g:
        own = ssl.PrivateCertificate.loadPEM(f.read() + g.read())
    with open(args.ca, "rb") as f:
        ca = ssl.Certificate.loadPEM(f.read())

    if args.mode == "outward":
        if not (args.domain and args.peer_domain and args.peer and args.peer_name):
            parser.error("outward needs --domain, --peer-domain, --peer and --peer-name")
        tls = PeerTLS(ssl.optionsForClientTLS(args.peer_name, trustRoot=ca, clientCertificate=own))
        root = Forward(http_client(args.pool_size, tls),
                       outward_route(args.domain, args.peer_domain, args.peer.rstrip("/")))
        serve(root, args.port)
    else:
        if not args.component:
            parser.error("inward needs at least one --component NAME=URL")
        components = dict(item.split("=", 1) for item in args.component)
        root = Forward(http_client(args.pool_size), inward_route(components))
        # verify=True, requireCertificate=True: mutual TLS against the CA
        serve(root, args.port, tls=own.options(ca))


if __name__ == "__main__":
    main()
