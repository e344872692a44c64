"""
The plain UDP forwarder bench/relay.py measures the relays against: what a
competent Twisted user would write to pass datagrams on, one hop of the
chain.  Every datagram that arrives on C{--port} is sent as it is to
C{--to}.  No crypto, no authorization, no parsing, no per-datagram logging.

    python bench/udp_forwarder.py --port PORT --to HOST:PORT

It prints C{listening} once the port is bound.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, Tuple

from twisted.internet import protocol


class Forwarder(protocol.DatagramProtocol):
    def __init__(self, target: Tuple[str, int]) -> None:
        self.target = target

    def datagramReceived(self, data: bytes, address: Any) -> None:
        self.transport.write(data, self.target)  # type: ignore[union-attr]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--port", type=int, required=True, help="UDP port to receive on, on 127.0.0.1")
    parser.add_argument("--to", required=True, help="HOST:PORT to send every datagram to")
    args = parser.parse_args()
    host, _, port = args.to.rpartition(":")

    from twisted.internet import reactor

    reactor.listenUDP(args.port, Forwarder((host, int(port))), interface="127.0.0.1")  # type: ignore[attr-defined]
    print(f"listening on 127.0.0.1:{args.port}, forwarding to {args.to}", flush=True)
    sys.stdout.flush()
    reactor.run()


if __name__ == "__main__":
    main()
