"""
Relay federation with delegated trust, with relay processes under twistd on
127.0.0.1: each relay is a fedserver with a C{[relay]} table and its own
certificate, whose fingerprint the others list.  The topology is the one of
issue 7: R1 trusts R2 (with C{delegate = true}, or without), R2 links R3,
and R4 is in nobody's lists.

Participants are plain UDP sockets of this test process that join a room on
a relay; every test judges by the media datagrams they receive and by the
counters of C{GET /relay/status}.  Every process is stopped by the fixture
that started it, and every wait has a deadline.
"""

from __future__ import annotations

import itertools
import os
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import pytest

from fedserver_relay.fingerprint import fingerprint_of_pem, format_fingerprint, short_id
from fedserver_relay.participants import JOINED, MEDIA_OUT, VERSION, join_datagram, media_datagram
from tests.integration.harness import PKI, Fedserver, backend_config, free_port, post, wait_for_port, wait_until

ROOM = "standup"
TOKEN = "sixteen-or-more-characters"
#: frames each sending participant sends in a test
N = 20
#: how long every wait may take
WAIT = 20.0
#: after the expected datagrams arrived, how long to wait for any that should not come
SETTLE = 0.4


def free_udp_port() -> int:
    """A UDP port on 127.0.0.1 that nothing is bound to right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Participant:
    """A local participant of a relay: a UDP socket of the test process, in room L{ROOM}."""

    def __init__(self, name: str, port: int) -> None:
        self.name = name
        self.relay = ("127.0.0.1", port)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        #: (origin relay short id, payload) of every media datagram received
        self.media: List[Tuple[bytes, bytes]] = []

    def _receive(self, until: float) -> bool:
        """Read one datagram before the monotonic time C{until}; whether it was JOINED."""
        left = until - time.monotonic()
        if left <= 0:
            return False
        self.sock.settimeout(left)
        try:
            data = self.sock.recv(4096)
        except TimeoutError:
            return False
        if data[:2] == bytes((VERSION, MEDIA_OUT)):
            self.media.append((data[2:10], data[10:]))
        return data[:2] == bytes((VERSION, JOINED))

    def join(self, timeout: float = WAIT) -> None:
        """Join L{ROOM}, asking again every half second until JOINED comes back."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.sock.sendto(join_datagram(ROOM, TOKEN), self.relay)
            attempt = min(deadline, time.monotonic() + 0.5)
            while time.monotonic() < attempt:
                if self._receive(attempt):
                    return
        raise AssertionError(f"participant {self.name} was not joined to {ROOM} within {timeout} s")

    def send(self, payloads: Sequence[bytes]) -> None:
        for payload in payloads:
            self.sock.sendto(media_datagram(payload), self.relay)

    def drain(self, seconds: float = SETTLE) -> None:
        """Read whatever arrives within C{seconds}."""
        until = time.monotonic() + seconds
        while time.monotonic() < until:
            self._receive(until)

    def wait_for(self, count: int, origin: Optional[bytes] = None, timeout: float = WAIT) -> None:
        """Read until C{count} media datagrams (from C{origin}, if given) arrived."""
        deadline = time.monotonic() + timeout
        while len(self.payloads(origin)) < count:
            if time.monotonic() > deadline:
                raise AssertionError(f"participant {self.name} got {len(self.payloads(origin))} of {count} "
                                     f"media datagrams within {timeout} s")
            self._receive(deadline)

    def payloads(self, origin: Optional[bytes] = None) -> List[bytes]:
        return [payload for o, payload in self.media if origin is None or o == origin]

    def close(self) -> None:
        self.sock.close()


class UdpForwarder:
    """
    A UDP port in front of a relay's real one (announced with
    C{udp_advertise_port}, as behind port forwarding): it forwards every
    datagram and keeps a copy, to send it again later.
    """

    def __init__(self, target_port: int) -> None:
        self.target = ("127.0.0.1", target_port)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.1)
        self.port = self.sock.getsockname()[1]
        self.captured: List[bytes] = []
        self._lock = threading.Lock()
        self._running = True
        self._thread = threading.Thread(target=self._forward, daemon=True)
        self._thread.start()

    def _forward(self) -> None:
        while self._running:
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            with self._lock:
                self.captured.append(data)
            self.sock.sendto(data, self.target)

    def forget(self) -> None:
        with self._lock:
            self.captured.clear()

    def replay(self) -> int:
        """Send every datagram forwarded so far again; how many."""
        with self._lock:
            copies = list(self.captured)
        for data in copies:
            self.sock.sendto(data, self.target)
        return len(copies)

    def close(self) -> None:
        self._running = False
        self._thread.join(timeout=5)
        self.sock.close()


class Relay:
    """One relay process: its ports, certificate fingerprint and base configuration."""

    def __init__(self, directory: str, pki: PKI, name: str) -> None:
        self.name = name
        self.label = name.upper()
        self.listen = free_port()
        self.udp = free_udp_port()
        self.participant_port = free_udp_port()
        self.base = backend_config(
            f"{name}.example", f"{name}.relay.example", pki=pki, inward_port=free_port(), outward_port=free_port(),
            discovery={}, allow=["nobody.example"], components={},
        )
        with open(self.base["tls"]["certificate"], "rb") as f:
            self.fingerprint = fingerprint_of_pem(f.read())
        self.short = short_id(self.fingerprint)
        self.server: Optional[Fedserver] = None
        self.config: Dict[str, Any] = {}
        self.starts = 0

    @property
    def outward(self) -> int:
        return int(self.base["outward"]["listen"].split(":")[1])

    def start(self, directory: str) -> None:
        self.starts += 1
        name = self.name if self.starts == 1 else f"{self.name}-start{self.starts}"
        self.server = Fedserver(directory, name, self.config)
        wait_for_port(self.listen, self.server.process)

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()

    def kill(self) -> None:
        """End the process at once, as a crash would."""
        assert self.server is not None
        self.server.process.kill()
        self.server.stop()

    def status(self) -> Dict[str, Any]:
        code, _, document = post(self.outward, "/relay/status", method="GET", timeout=10)
        assert code == 200, document
        return document

    def log(self) -> str:
        return self.server.log() if self.server is not None else ""

    def link(self, other: Relay) -> Optional[Dict[str, Any]]:
        """This relay's link to C{other} as its status shows it, if up."""
        for link in self.status()["links"]:
            if link["fingerprint"] == other.fingerprint:
                return link
        return None


def counter(status: Dict[str, Any], kind: str, label: str) -> int:
    """C{accepted} frames from the peer C{label}, or frames dropped for the reason C{kind}."""
    counters = status["counters"]
    by_peer = counters["accepted"] if kind == "accepted" else counters["dropped"][kind]
    return int(by_peer.get(label, 0))


class Mesh:
    """Relays of one topology, their participants, and whatever else a test starts with them."""

    def __init__(self, directory: Any, names: Sequence[str]) -> None:
        self.directory = str(directory)
        pki = PKI(os.path.join(self.directory, "pki"))
        self.relays = {name: Relay(self.directory, pki, name) for name in names}
        self.participants: Dict[str, Participant] = {}
        self.forwarders: List[UdpForwarder] = []

    def __getitem__(self, name: str) -> Relay:
        return self.relays[name]

    def table(self, name: str, *, peers: Sequence[str] = (), trusted: Sequence[Tuple[str, bool]] = (),
              **extra: Any) -> Dict[str, Any]:
        """The C{[relay]} table of C{name}: it dials C{peers} and accepts C{trusted} (name, delegate)."""
        relay = self.relays[name]
        table: Dict[str, Any] = {
            "listen": f"tcp:{relay.listen}:interface=127.0.0.1",
            "udp": f"127.0.0.1:{relay.udp}",
            "participants": f"127.0.0.1:{relay.participant_port}",
            "label": relay.label,
            **extra,
            "rooms": [{"name": ROOM, "token": TOKEN}],
        }
        if peers:  # written with colons, as `fedserver relay-fingerprint` prints them
            table["peers"] = [
                {"address": f"127.0.0.1:{self.relays[p].listen}",
                 "fingerprint": format_fingerprint(self.relays[p].fingerprint), "label": self.relays[p].label}
                for p in peers
            ]
        if trusted:
            table["trusted"] = [
                {"fingerprint": self.relays[t].fingerprint, "label": self.relays[t].label, "delegate": delegate}
                for t, delegate in trusted
            ]
        return table

    def start(self, tables: Dict[str, Dict[str, Any]]) -> None:
        """Start a relay for each table, all at once; each is stopped by L{stop}, even when this fails."""
        for name, table in tables.items():
            self.relays[name].config = {**self.relays[name].base, "relay": table}
        with ThreadPoolExecutor(len(tables)) as pool:
            futures = [pool.submit(self.relays[name].start, self.directory) for name in tables]
        for future in futures:
            future.result()

    def restart(self, name: str) -> None:
        self.relays[name].start(self.directory)

    def participant(self, name: str) -> Participant:
        """A participant joined to L{ROOM} on relay C{name}."""
        if name in self.participants:
            self.participants[name].close()
        participant = Participant(name, self.relays[name].participant_port)
        self.participants[name] = participant
        participant.join()
        return participant

    def forget_media(self) -> None:
        """Forget what the participants received so far (tests of one topology may run in any order)."""
        for participant in self.participants.values():
            participant.drain(0.05)
            participant.media.clear()

    def forwarder(self, target_port: int) -> UdpForwarder:
        forwarder = UdpForwarder(target_port)
        self.forwarders.append(forwarder)
        return forwarder

    def logs(self) -> str:
        return "\n".join(f"--- {r.name} log (tail):\n{r.log()[-3000:]}" for r in self.relays.values())

    def wait(self, what: str, check: Callable[[], Any], timeout: float = WAIT) -> Any:
        return wait_until(what, check, timeout, self.logs)

    def wait_linked(self, *pairs: Tuple[str, str], udp: bool = True) -> None:
        """Wait until each pair of relays holds a link, both sides up (and UDP confirmed both ways)."""
        for a, b in pairs:
            for one, other in ((self[a], self[b]), (self[b], self[a])):
                def up(one: Relay = one, other: Relay = other) -> bool:
                    link = one.link(other)
                    return link is not None and (link["udp"] or not udp)

                self.wait(f"{one.label}'s link to {other.label}", up)

    def wait_subscribed(self, *path: str) -> None:
        """Wait until along C{path} (sender first) each relay knows the next one wants L{ROOM}."""
        for a, b in itertools.pairwise(path):
            def wanted(a: Relay = self[a], b: Relay = self[b]) -> bool:
                link = a.link(b)
                return link is not None and link["subscribedRooms"] >= 1

            self.wait(f"{b} subscribed to {ROOM} at {a}", wanted)

    def wait_counter(self, name: str, kind: str, label: str, at_least: int) -> Dict[str, Any]:
        """Wait until relay C{name}'s counter reaches C{at_least}; its status then."""
        def reached() -> Optional[Dict[str, Any]]:
            status = self[name].status()
            return status if counter(status, kind, label) >= at_least else None

        return self.wait(f"{name}'s {kind} counter for {label} to reach {at_least}", reached)

    def stop(self) -> None:
        for participant in self.participants.values():
            participant.close()
        for forwarder in self.forwarders:
            forwarder.close()
        with ThreadPoolExecutor(len(self.relays)) as pool:
            list(pool.map(Relay.stop, self.relays.values()))


def frames(sender: str, count: int = N, tag: str = "") -> List[bytes]:
    return [f"{sender}{tag} frame {i}".encode() for i in range(count)]


def assert_exactly(participant: Participant, expected: Sequence[bytes], origin: Optional[bytes] = None) -> None:
    """C{participant} got each of C{expected} exactly once (from C{origin}), and nothing more comes."""
    participant.wait_for(len(expected), origin)
    participant.drain()
    assert sorted(participant.payloads(origin)) == sorted(expected)


def running_mesh(tmp_path_factory: Any, label: str, names: Sequence[str],
                 tables: Callable[[Mesh], Dict[str, Dict[str, Any]]], *, linked: Sequence[Tuple[str, str]],
                 joined: Sequence[str], subscribed: Sequence[str]) -> Iterator[Mesh]:
    """
    Start the relays C{names} with the C{[relay]} tables C{tables} makes,
    wait for the C{linked} pairs, join a participant on each relay of
    C{joined}, wait for L{ROOM} to be subscribed along C{subscribed}; yield
    the mesh, and stop all of it afterwards (also when starting fails).
    """
    mesh = Mesh(tmp_path_factory.mktemp(label), names)
    try:
        mesh.start(tables(mesh))
        mesh.wait_linked(*linked)
        for name in joined:
            mesh.participant(name)
        mesh.wait_subscribed(*subscribed)
        yield mesh
    finally:
        mesh.stop()


# R1 trusts R2 with delegate = true; R2 links R3; R4 is unknown and dials R1


@pytest.fixture(scope="class")
def delegated(tmp_path_factory: Any) -> Iterator[Mesh]:
    def tables(mesh: Mesh) -> Dict[str, Dict[str, Any]]:
        return {
            "r1": mesh.table("r1", trusted=[("r2", True)]),
            "r2": mesh.table("r2", peers=["r1"], trusted=[("r3", False)]),
            "r3": mesh.table("r3", peers=["r2"]),
            "r4": mesh.table("r4", peers=["r1"]),
        }

    yield from running_mesh(tmp_path_factory, "delegated", ["r1", "r2", "r3", "r4"], tables,
                            linked=[("r1", "r2"), ("r2", "r3")], joined=("r1", "r3", "r4"),
                            subscribed=("r3", "r2", "r1"))


class TestDelegatedTrust:
    def test_media_from_r3_reaches_r1_through_r2_with_delegate(self, delegated: Mesh) -> None:
        delegated.forget_media()
        r1, r2, r3 = delegated["r1"], delegated["r2"], delegated["r3"]
        link = r1.link(r2)
        assert link is not None and link["delegate"] is True
        assert link["vouched"] == [r3.short.hex()]  # R2 announced R3 in its trust chain
        assert r1.link(r3) is None  # no direct link: R3's media can only come through R2
        before = r1.status()

        sent = frames("r3")
        delegated.participants["r3"].send(sent)
        assert_exactly(delegated.participants["r1"], sent, origin=r3.short)

        after = r1.status()
        assert counter(after, "accepted", "R2") - counter(before, "accepted", "R2") == N
        for reason in ("no-delegation", "unknown-origin", "duplicate", "ttl-exhausted"):
            assert after["counters"]["dropped"][reason] == {}, reason
        assert counter(r2.status(), "accepted", "R3") >= N
        assert r3.status()["counters"]["originated"] >= N

    def test_unknown_relay_r4_is_refused_during_the_handshake(self, delegated: Mesh) -> None:
        delegated.forget_media()
        r1, r3, r4 = delegated["r1"], delegated["r3"], delegated["r4"]
        refused = delegated.wait(
            "R1 to refuse R4's handshake", lambda: r1.status()["refusedHandshakes"].get(r4.fingerprint, 0))
        assert refused >= 1
        log = delegated.wait("R1's log to say it refused R4",
                             lambda: r4.fingerprint in r1.log() and r1.log())
        assert f"refused a relay link during the TLS handshake: certificate fingerprint {r4.fingerprint}" in log
        assert all(link["fingerprint"] != r4.fingerprint for link in r1.status()["links"])

        delegated.participants["r4"].send(frames("r4"))
        status = delegated.wait("R4 to take its participant's frames",
                                lambda: (s := r4.status())["counters"]["originated"] >= N and s)
        assert status["links"] == []  # its dialled link never came up
        assert status["counters"]["forwarded"] == 0
        # media sent after R4's reaches R1; R4's never does
        marker = frames("r3", 3, " after r4")
        delegated.participants["r3"].send(marker)
        p1 = delegated.participants["r1"]
        p1.wait_for(3, origin=r3.short)
        p1.drain()
        assert p1.payloads(origin=r4.short) == []
        assert set(marker) <= set(p1.payloads(origin=r3.short))
        assert r1.status()["refusedHandshakes"][r4.fingerprint] >= refused


# R1 trusts R2 without delegate; R2 links R3


@pytest.fixture(scope="class")
def undelegated(tmp_path_factory: Any) -> Iterator[Mesh]:
    def tables(mesh: Mesh) -> Dict[str, Dict[str, Any]]:
        return {
            "r1": mesh.table("r1", trusted=[("r2", False)]),
            "r2": mesh.table("r2", peers=["r1"], trusted=[("r3", False)]),
            "r3": mesh.table("r3", peers=["r2"]),
        }

    yield from running_mesh(tmp_path_factory, "undelegated", ["r1", "r2", "r3"], tables,
                            linked=[("r1", "r2"), ("r2", "r3")], joined=("r1", "r2", "r3"),
                            subscribed=("r3", "r2", "r1"))


class TestWithoutDelegation:
    def test_media_from_r3_is_dropped_at_r1_without_delegate(self, undelegated: Mesh) -> None:
        undelegated.forget_media()
        r1, r3 = undelegated["r1"], undelegated["r3"]
        earlier = r1.status()
        before = counter(earlier, "no-delegation", "R2")

        sent = frames("r3")
        undelegated.participants["r3"].send(sent)
        # the hub's participant gets them (R2 trusts R3 directly), so they did travel
        assert_exactly(undelegated.participants["r2"], sent, origin=r3.short)
        status = undelegated.wait_counter("r1", "no-delegation", "R2", before + N)

        assert counter(status, "no-delegation", "R2") == before + N
        undelegated.participants["r1"].drain()
        assert undelegated.participants["r1"].payloads(origin=r3.short) == []
        assert status["counters"]["delivered"] == earlier["counters"]["delivered"]

    def test_non_delegate_peer_forwarded_foreign_origin_is_dropped(self, undelegated: Mesh) -> None:
        undelegated.forget_media()
        r1, r2 = undelegated["r1"], undelegated["r2"]
        link = r1.link(r2)
        assert link is not None and link["delegate"] is False
        assert link["vouched"] == []  # R2 vouches for R3, and R1 does not listen
        assert "ignoring the trust chain of R2: it is not trusted with delegate = true" in r1.log()
        before = r1.status()

        own, foreign = frames("r2"), frames("r3", tag=" foreign")
        for mine, theirs in zip(own, foreign, strict=True):  # interleaved on the same link
            undelegated.participants["r2"].send([mine])
            undelegated.participants["r3"].send([theirs])
        p1 = undelegated.participants["r1"]
        assert_exactly(p1, own, origin=r2.short)  # R2's own media is accepted
        after = undelegated.wait_counter(
            "r1", "no-delegation", "R2", counter(before, "no-delegation", "R2") + N)

        assert counter(after, "accepted", "R2") - counter(before, "accepted", "R2") == N
        assert counter(after, "no-delegation", "R2") - counter(before, "no-delegation", "R2") == N
        assert not set(foreign) & set(p1.payloads())


# R1 trusts R2 without delegate, and R3 directly; R2 links R3


@pytest.fixture(scope="class")
def direct(tmp_path_factory: Any) -> Iterator[Mesh]:
    def tables(mesh: Mesh) -> Dict[str, Dict[str, Any]]:
        return {
            "r1": mesh.table("r1", trusted=[("r2", False), ("r3", False)]),
            "r2": mesh.table("r2", peers=["r1"], trusted=[("r3", False)]),
            "r3": mesh.table("r3", peers=["r2"]),
        }

    yield from running_mesh(tmp_path_factory, "direct", ["r1", "r2", "r3"], tables,
                            linked=[("r1", "r2"), ("r2", "r3")], joined=("r1", "r3"),
                            subscribed=("r3", "r2", "r1"))


class TestDirectTrust:
    def test_r3_media_is_accepted_by_r1_that_trusts_r3_through_non_delegate_r2(self, direct: Mesh) -> None:
        direct.forget_media()
        r1, r2, r3 = direct["r1"], direct["r2"], direct["r3"]
        assert r1.link(r3) is None  # R3 dials only R2
        link = r1.link(r2)
        assert link is not None and link["delegate"] is False

        sent = frames("r3")
        direct.participants["r3"].send(sent)
        assert_exactly(direct.participants["r1"], sent, origin=r3.short)

        status = r1.status()
        assert counter(status, "accepted", "R2") == N  # forwarded by R2, accepted for R3's sake
        assert status["counters"]["dropped"]["no-delegation"] == {}
        assert status["counters"]["dropped"]["unknown-origin"] == {}


# TTL: R3 gives its frames max_federation_hops = 1


@pytest.fixture(scope="class")
def short_ttl(tmp_path_factory: Any) -> Iterator[Mesh]:
    def tables(mesh: Mesh) -> Dict[str, Dict[str, Any]]:
        return {
            "r1": mesh.table("r1", trusted=[("r2", True)]),
            "r2": mesh.table("r2", peers=["r1"], trusted=[("r3", False)]),
            "r3": mesh.table("r3", peers=["r2"], max_federation_hops=1),
        }

    yield from running_mesh(tmp_path_factory, "ttl", ["r1", "r2", "r3"], tables,
                            linked=[("r1", "r2"), ("r2", "r3")], joined=("r1", "r2", "r3"),
                            subscribed=("r3", "r2", "r1"))


class TestHopLimit:
    def test_ttl_exhausted_frames_reach_r2_but_not_r1(self, short_ttl: Mesh) -> None:
        short_ttl.forget_media()
        r1, r2, r3 = short_ttl["r1"], short_ttl["r2"], short_ttl["r3"]
        p1, p2 = short_ttl.participants["r1"], short_ttl.participants["r2"]
        assert r3.status()["maxFederationHops"] == 1
        # R2 -> R1 works: R2's own frames arrive
        control = frames("r2", 3)
        p2.send(control)
        assert_exactly(p1, control, origin=r2.short)

        sent = frames("r3")
        short_ttl.participants["r3"].send(sent)
        assert_exactly(p2, sent, origin=r3.short)
        status = short_ttl.wait_counter("r2", "ttl-exhausted", "R3", N)

        assert counter(status, "ttl-exhausted", "R3") == N
        assert counter(status, "accepted", "R3") == N
        p1.drain()
        assert p1.payloads(origin=r3.short) == []
        assert counter(r1.status(), "accepted", "R2") == len(control)


# a loop: R1 -> R2 -> R3 -> R1, all trusting each other


@pytest.fixture(scope="class")
def loop(tmp_path_factory: Any) -> Iterator[Mesh]:
    hops = 8  # frames could go round the loop twice: only duplicate suppression ends them

    def tables(mesh: Mesh) -> Dict[str, Dict[str, Any]]:
        return {
            "r1": mesh.table("r1", peers=["r2"], trusted=[("r3", False)], max_federation_hops=hops),
            "r2": mesh.table("r2", peers=["r3"], trusted=[("r1", False)], max_federation_hops=hops),
            "r3": mesh.table("r3", peers=["r1"], trusted=[("r2", False)], max_federation_hops=hops),
        }

    yield from running_mesh(tmp_path_factory, "loop", ["r1", "r2", "r3"], tables,
                            linked=[("r1", "r2"), ("r2", "r3"), ("r3", "r1")], joined=("r1", "r2", "r3"),
                            subscribed=("r1", "r2", "r3", "r1", "r3", "r2", "r1"))


class TestLoop:
    def test_three_relay_loop_delivers_each_frame_exactly_once(self, loop: Mesh) -> None:
        loop.forget_media()
        names = ("r1", "r2", "r3")
        sent = {name: frames(name) for name in names}
        for i in range(N):
            for name in names:
                loop.participants[name].send([sent[name][i]])

        for name in names:
            participant = loop.participants[name]
            expected = [frame for other in names if other != name for frame in sent[other]]
            participant.wait_for(len(expected))
        for name in names:
            participant = loop.participants[name]
            participant.drain()
            for other in names:
                got = participant.payloads(origin=loop[other].short)
                assert sorted(got) == ([] if other == name else sorted(sent[other])), (name, other)

        # each frame crosses four links of the triangle, and two of the copies are duplicates
        def duplicates() -> int:
            return sum(sum(loop[name].status()["counters"]["dropped"]["duplicate"].values()) for name in names)

        total = loop.wait("every duplicate to be counted", lambda: duplicates() >= 2 * 3 * N and duplicates())
        time.sleep(SETTLE)
        assert duplicates() == total == 2 * 3 * N
        for name in names:
            status = loop[name].status()
            assert status["counters"]["originated"] == N
            assert sum(status["counters"]["accepted"].values()) == 2 * N


# two relays, for replays and reconnection: R1 dials R2, whose UDP port sits behind a forwarder


@pytest.fixture(scope="class")
def pair(tmp_path_factory: Any) -> Iterator[Mesh]:
    def tables(mesh: Mesh) -> Dict[str, Dict[str, Any]]:
        forwarder = mesh.forwarder(mesh["r2"].udp)
        return {
            "r1": mesh.table("r1", peers=["r2"]),
            "r2": mesh.table("r2", trusted=[("r1", False)], udp_advertise_port=forwarder.port),
        }

    yield from running_mesh(tmp_path_factory, "pair", ["r1", "r2"], tables,
                            linked=[("r1", "r2")], joined=("r1", "r2"),
                            subscribed=("r1", "r2"))


class TestPair:
    def test_replayed_udp_datagram_is_dropped(self, pair: Mesh) -> None:
        pair.forget_media()
        r1, r2 = pair["r1"], pair["r2"]
        forwarder = pair.forwarders[0]
        link = r1.link(r2)
        assert link is not None and link["udp"] is True  # R1's frames to R2 go through the forwarder
        p2 = pair.participants["r2"]
        forwarder.forget()  # UDP is confirmed: R1 probes no more, and only this link's frames pass from now on

        sent = frames("r1")
        pair.participants["r1"].send(sent)
        assert_exactly(p2, sent, origin=r1.short)
        before = r2.status()

        replayed = forwarder.replay()
        assert replayed == N  # each sealed frame, sent once more
        status = pair.wait_counter("r2", "replayed", "R1", counter(before, "replayed", "R1") + replayed)

        assert counter(status, "replayed", "R1") - counter(before, "replayed", "R1") == replayed
        assert status["counters"]["dropped"]["duplicate"] == before["counters"]["dropped"]["duplicate"]
        assert counter(status, "accepted", "R1") == counter(before, "accepted", "R1")
        p2.drain()
        assert sorted(p2.payloads(origin=r1.short)) == sorted(sent)  # still each frame once

    def test_link_reconnects_after_the_peer_restarts(self, pair: Mesh) -> None:
        pair.forget_media()
        r1, r2 = pair["r1"], pair["r2"]
        r2.kill()
        pair.wait("R1 to see the link to R2 go down", lambda: r1.link(r2) is None)

        started = time.monotonic()
        pair.restart("r2")  # same ports, certificate and configuration
        pair.wait_linked(("r1", "r2"))
        reconnected = time.monotonic() - started
        assert reconnected < WAIT
        p2 = pair.participant("r2")  # the restarted relay forgot its participants
        pair.wait_subscribed("r1", "r2")

        sent = frames("r1", tag=" after restart")
        pair.participants["r1"].send(sent)
        assert_exactly(p2, sent, origin=r1.short)
        assert counter(r2.status(), "accepted", "R1") == N
        assert f"relay link to R2 ({r2.fingerprint}) is down" in r1.log()
