"""
The load generator and the receiver of bench/relay.py: plain sockets, one
process each, driven by one command a line on stdin and answering one JSON
line per command on stdout.

    python bench/udp_load.py send --to 127.0.0.1:PORT [--join ROOM TOKEN] [--payload 1000]
    python bench/udp_load.py receive [--join 127.0.0.1:PORT ROOM TOKEN] [--header 2] [--origin HEX]

Both first print C{{"port": N}}, the UDP port they bound on 127.0.0.1 (after
joining the room, with C{--join}).  A joined one sends a participant
KEEPALIVE every 10 s, so the relay does not forget it between runs.

The sender sends participant MEDIA datagrams (C{01 02} then the payload);
each payload starts with C{step} (4 bytes), a sequence number (8) and the
C{time.monotonic_ns()} of the send (8), big-endian, padded to C{--payload}
bytes.  CLOCK_MONOTONIC is one clock for every process of the machine, so
the receiver's arrival time less the send time is the one-way latency.

sender commands:

- C{run STEP RATE SECONDS [FIRST]}: send C{RATE} datagrams a second for
  C{SECONDS}, numbered from C{FIRST} (default 0), paced by the clock; a
  backlog of more than L{MAX_BACKLOG} seconds (the process did not get the
  CPU) is skipped rather than sent in one burst.  Answers C{{"step",
  "sent", "skipped", "seconds"}}.

receiver commands:

- C{report STEP}: what arrived of step C{STEP}: C{received} (distinct
  sequence numbers), C{duplicates}, and the latency percentiles in
  microseconds; then forgets the step.  Datagrams that are not such media
  (or carry another origin, with C{--origin}) are counted in C{other}.

and C{quit} for both.
"""

from __future__ import annotations

import argparse
import array
import json
import math
import os
import selectors
import socket
import struct
import sys
import time
from typing import Any, Dict, List, Optional, Tuple

from fedserver_relay.participants import JOINED, KEEPALIVE, MEDIA, VERSION, join_datagram

#: step, sequence number, send time (monotonic ns)
STAMP = struct.Struct(">IQQ")
KEEPALIVE_EVERY = 10.0
JOIN_WAIT = 20.0
#: seconds of sending the sender may fall behind before it skips
MAX_BACKLOG = 0.002
#: the receive buffer asked for (the kernel caps it at net.core.rmem_max)
RECEIVE_BUFFER = 4 * 1024 * 1024


def address(text: str) -> Tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


def answer(document: Dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(document) + "\n")
    sys.stdout.flush()


def join(sock: socket.socket, relay: Tuple[str, int], room: str, token: str) -> None:
    """Join C{room} on C{relay}'s participant port, asking again every half second until JOINED comes back."""
    deadline = time.monotonic() + JOIN_WAIT
    while time.monotonic() < deadline:
        sock.sendto(join_datagram(room, token), relay)
        sock.settimeout(0.5)
        try:
            while True:
                data = sock.recv(4096)
                if data[:2] == bytes((VERSION, JOINED)):
                    sock.settimeout(None)
                    return
        except TimeoutError:
            continue
    raise SystemExit(f"udp_load: no JOINED from {relay} for room {room!r} within {JOIN_WAIT:g} s")


class Commands:
    """Lines from stdin, read without blocking, for a selector loop."""

    def __init__(self) -> None:
        self._buffer = b""
        os.set_blocking(0, False)

    def read(self) -> List[str]:
        try:
            data = os.read(0, 65536)
        except BlockingIOError:
            return []
        if not data:
            return ["quit"]  # the bench went away
        self._buffer += data
        *lines, self._buffer = self._buffer.split(b"\n")
        return [line.decode().strip() for line in lines if line.strip()]


def serve(sock: socket.socket, keepalive_to: Optional[Tuple[str, int]], on_datagrams: Any, on_command: Any) -> None:
    """Read datagrams and commands until C{quit}; keep the participant alive."""
    commands = Commands()
    selector = selectors.DefaultSelector()
    sock.setblocking(False)
    selector.register(sock, selectors.EVENT_READ, "socket")
    selector.register(0, selectors.EVENT_READ, "stdin")
    keepalive = bytes((VERSION, KEEPALIVE))
    next_keepalive = time.monotonic() + KEEPALIVE_EVERY
    while True:
        for key, _ in selector.select(timeout=1.0):
            if key.data == "socket":
                on_datagrams(sock)
                continue
            for line in commands.read():
                if line == "quit":
                    return
                sock.setblocking(True)
                on_command(line.split())
                sock.setblocking(False)
        if keepalive_to is not None and time.monotonic() >= next_keepalive:
            sock.sendto(keepalive, keepalive_to)
            next_keepalive = time.monotonic() + KEEPALIVE_EVERY


# the sender

def send(args: argparse.Namespace) -> None:
    target = address(args.to)
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    if args.join:
        join(sock, target, *args.join)
    answer({"port": sock.getsockname()[1]})
    datagram = bytearray(bytes((VERSION, MEDIA)) + bytes(args.payload))
    pack_into, sendto, clock = STAMP.pack_into, sock.sendto, time.monotonic_ns

    def drain(sock: socket.socket) -> None:
        while True:  # JOINED again, ERROR, or anything else: read and forget
            try:
                sock.recv(4096)
            except BlockingIOError:
                return

    def command(words: List[str]) -> None:
        if words[0] != "run" or len(words) not in (4, 5):
            answer({"error": f"unknown command {' '.join(words)!r}"})
            return
        step, rate, seconds = int(words[1]), float(words[2]), float(words[3])
        first = int(words[4]) if len(words) == 5 else 0
        total = int(rate * seconds)
        interval_ns = 1e9 / rate
        backlog = max(1, int(rate * MAX_BACKLOG))
        sent = skipped = 0
        start = clock()
        while sent + skipped < total:
            now = clock()
            due = min(total, int((now - start) / interval_ns) + 1)
            if due - sent - skipped > backlog:  # we did not get the CPU: skip rather than burst
                skipped = due - backlog - sent
            while sent + skipped < due:
                pack_into(datagram, 2, step, first + sent, clock())
                sendto(datagram, target)
                sent += 1
            wake = start + (sent + skipped) * interval_ns
            left = wake - clock()
            if left > 0:
                time.sleep(left / 1e9)
        answer({"step": step, "sent": sent, "skipped": skipped, "seconds": (clock() - start) / 1e9})

    serve(sock, target if args.join else None, drain, command)


# the receiver

class Step:
    __slots__ = ("latency_ns", "received", "sequences")

    def __init__(self) -> None:
        self.received = 0
        self.sequences: set = set()
        self.latency_ns = array.array("q")


def percentile(ordered: List[int], fraction: float) -> float:
    """The C{fraction} percentile of C{ordered} (nearest rank), in microseconds."""
    if not ordered:
        return float("nan")
    index = min(len(ordered) - 1, max(0, math.ceil(fraction * len(ordered)) - 1))
    return ordered[index] / 1000


def receive(args: argparse.Namespace) -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECEIVE_BUFFER)
    sock.bind(("127.0.0.1", 0))
    relay = None
    if args.join:
        relay = address(args.join[0])
        join(sock, relay, args.join[1], args.join[2])
    answer({"port": sock.getsockname()[1], "receive_buffer": sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)})
    header = args.header
    origin = bytes.fromhex(args.origin) if args.origin else None
    kinds = (bytes((VERSION, 0x82)), bytes((VERSION, MEDIA)))  # media from a relay, or as sent
    steps: Dict[int, Step] = {}
    other = 0
    buffer = bytearray(4096)
    view = memoryview(buffer)
    need = header + STAMP.size
    unpack_from, clock = STAMP.unpack_from, time.monotonic_ns

    def datagrams(sock: socket.socket) -> None:
        nonlocal other
        recv_into = sock.recv_into
        while True:
            try:
                size = recv_into(buffer)
            except BlockingIOError:
                return
            now = clock()
            if size < need or view[:2] not in kinds or (origin is not None and view[2:10] != origin):
                other += 1
                continue
            step, sequence, sent_ns = unpack_from(buffer, header)
            found = steps.get(step)
            if found is None:
                found = steps[step] = Step()
            found.received += 1
            found.sequences.add(sequence)
            found.latency_ns.append(now - sent_ns)

    def command(words: List[str]) -> None:
        nonlocal other
        if words[0] != "report" or len(words) != 2:
            answer({"error": f"unknown command {' '.join(words)!r}"})
            return
        step = int(words[1])
        found = steps.pop(step, Step())
        ordered = sorted(found.latency_ns)
        answer({
            "step": step, "received": len(found.sequences), "duplicates": found.received - len(found.sequences),
            "other": other,
            "latency_us": {"50": percentile(ordered, 0.50), "90": percentile(ordered, 0.90),
                           "99": percentile(ordered, 0.99), "max": percentile(ordered, 1.0)},
        })
        other = 0

    serve(sock, relay, datagrams, command)


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    sender = commands.add_parser("send", help="send media datagrams")
    sender.add_argument("--to", required=True, help="HOST:PORT the datagrams go to")
    sender.add_argument("--join", nargs=2, metavar=("ROOM", "TOKEN"), help="join ROOM on --to first")
    sender.add_argument("--payload", type=int, default=1000, help="payload bytes (default 1000)")
    receiver = commands.add_parser("receive", help="count media datagrams and their latency")
    receiver.add_argument("--join", nargs=3, metavar=("HOST:PORT", "ROOM", "TOKEN"),
                          help="join ROOM on this relay participant port first")
    receiver.add_argument("--header", type=int, default=2,
                          help="bytes before the payload: 2 as sent, 10 from a relay (with the origin)")
    receiver.add_argument("--origin", help="count only media with this origin (16 hex digits)")
    args = parser.parse_args(argv)
    if args.command == "send":
        if not STAMP.size <= args.payload <= 1171:
            parser.error(f"--payload must be {STAMP.size} to 1171 bytes")
        send(args)
    else:
        receive(args)


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        pass
