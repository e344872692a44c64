"""
The relay benchmark: media frames forwarded R3 -> R2 -> R1 under delegated
trust, against a plain Twisted UDP forwarder chain of the same shape, in one
run on 127.0.0.1.

    python bench/relay.py [--step-seconds 3] [--payload 1000] [--start-rate 1000] [--max-rate 200000]
                          [--refine 2] [--rounds 1] [--ladder PATH ...] [--latency-rate 500]
                          [--latency-seconds 4] [--baseline DIR] [--profile] [--json FILE] [--keep]

Run it with the Python fedserver is installed in (it starts twistd, the
forwarders and the load processes with that same Python).  C{--profile}
needs py-spy in the same environment.  It installs nothing itself.

Three relays run as C{twistd -n fedserver} with certificates and
fingerprints made for the run: R3 dials R2, which accepts it; R2 dials R1,
which trusts R2 with C{delegate = true}, so R1 takes R3's media because R2
vouches for R3.  Links are mutual TLS 1.3; the bench measures only once
C{GET /relay/status} shows UDP confirmed on every link.  The relays' room
rate limit (and link rate limit, where the relay has one) is set to its
largest value so that no limit caps the measurement.  The plain chain is
two C{bench/udp_forwarder.py} processes.  The paths:

- C{relay}: participant -> R3 -> R2 -> R1 -> participant (sealed UDP
  between the relays; R1 authorizes R3's frames by R2's delegation);
- C{plain}: sender -> forwarder 1 -> forwarder 2 -> receiver;
- C{relay-1hop}: participant -> R2 -> R1 -> participant (another room);
- C{plain-1hop}: sender -> forwarder 2 -> receiver;
- C{plain-3} (only with C{--ladder plain-3}): sender -> forwarder 0 ->
  forwarder 1 -> forwarder 2 -> receiver, as many processes as C{relay};
- C{baseline} and C{baseline-1hop} (with C{--baseline DIR}): C{relay} and
  C{relay-1hop} through three more relays started from the source tree
  DIR, to measure a change within one run.

Load: C{bench/udp_load.py}, one sender and one receiver process per path
(plain sockets; the relay ones are participants that joined the room).
Every datagram carries a step, a sequence number and its send time
(monotonic ns).  Throughput: for each C{--ladder} path, steps of
C{--step-seconds} at offered rates from C{--start-rate} up by sqrt(2),
until two steps in a row lose 1 % or more, then two steps between the
last that passed and the first that failed; the path's figure is the
delivered frames/s of the highest step with less than 1 % loss, with the
CPU time per frame of each of its processes (the scheduler's count,
/proc/PID/task/*/schedstat).  Latency: every path
at C{--latency-rate} for C{--latency-seconds}, in rounds that alternate
the paths; one-way p50/p90/p99 from send to arrival.

Prints a table, the ratio relay/plain (the issue's goal: >= 0.5x), the
latency added per relay hop ((relay - plain) / 2) and PASS/FAIL lines;
writes the same as JSON to bench/results/relay-latest.json (and --json
FILE).  Exits 0 when everything ran and the checks pass, whatever the goal
says; 1 when something could not run or a check failed (UDP not confirmed,
frames dropped by the relays' rules); 2 when py-spy is missing for
--profile.  Every process it starts is stopped before it exits, also on
Ctrl-C.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import selectors
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any, Callable, Dict, List, Optional, Sequence

from run import (
    Processes,
    ScenarioError,
    add_output_arguments,
    baseline_env,
    check_baseline,
    cpu_seconds,
    finish,
    finish_profile,
    free_port,
    interrupted_exit,
    machine,
    not_installed,
    now,
    py_spy_missing,
    record_profile,
    start_fedserver,
    start_work,
    wind_down,
)

BENCH = os.path.dirname(os.path.abspath(__file__))

#: the issue's goal: relay frames/s at least this much of the plain chain's
MIN_RATIO = 0.5
#: a step passes with less loss than this
LOSS_LIMIT = 0.01
#: steps in a row over the loss limit (or short of the offered rate) that end a ladder
FAILURES_TO_STOP = 2
#: a step whose sender sent less than this share of the offered rate did not offer it
SENDER_SHORT = 0.9
#: seconds: to wait after a step for the last datagrams; for links, joins and subscriptions
SETTLE, WAIT = 0.3, 30.0
#: frames of the check that each path works, at this rate
CHECK_FRAMES, CHECK_RATE = 50, 500.0
#: rooms of the two relay paths, and their token
ROOM, ROOM_ONE_HOP, TOKEN = "bench", "bench-one-hop", "bench-room-token-0123456789"
#: the relays' room (and link) rate limits: the largest allowed, so that they do not cap the measurement
RATE_LIMIT = 1_000_000
#: participant datagrams from a relay carry its type byte and the 8-byte origin before the payload
RELAY_HEADER, PLAIN_HEADER = 10, 2

PATHS = {
    "relay": "participant -> R3 -> R2 -> R1 -> participant",
    "plain": "sender -> forwarder 1 -> forwarder 2 -> receiver",
    "relay-1hop": "participant -> R2 -> R1 -> participant",
    "plain-1hop": "sender -> forwarder 2 -> receiver",
    "plain-3": "sender -> forwarder 0 -> forwarder 1 -> forwarder 2 -> receiver: as many processes as relay",
    "baseline": "as relay, relays from the --baseline source tree",
    "baseline-1hop": "as relay-1hop, relays from the --baseline source tree",
}


def free_udp_port() -> int:
    """A UDP port on 127.0.0.1 that nothing is bound to right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_time(pid: int) -> float:
    """
    Seconds of CPU process C{pid} has used: the scheduler's own count over
    its threads (/proc/PID/task/*/schedstat, in ns), or user plus system time
    in clock ticks where that is missing.
    """
    try:
        total = 0
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/schedstat") as f:
                total += int(f.read().split()[0])
        return total / 1e9
    except (OSError, ValueError, IndexError):
        return cpu_seconds(pid)


def udp_receive_buffer_errors() -> Optional[int]:
    """The kernel's count of datagrams dropped for a full receive buffer (/proc/net/snmp, whole machine)."""
    try:
        with open("/proc/net/snmp") as f:
            rows = [line.split() for line in f if line.startswith("Udp:")]
        return int(dict(zip(rows[0][1:], rows[1][1:], strict=True))["RcvbufErrors"])
    except (OSError, IndexError, KeyError, ValueError):
        return None


def wait_until(what: str, check: Callable[[], Any], timeout: float = WAIT) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise ScenarioError(f"gave up after {timeout:g} s waiting for {what}")
        time.sleep(0.1)


# the processes

class Load:
    """A bench/udp_load.py process: a sender or a receiver, one command a line, one JSON answer a line."""

    def __init__(self, processes: Processes, name: str, arguments: Sequence[str]) -> None:
        self.name = name
        self.processes = processes
        argv = [sys.executable, os.path.join(BENCH, "udp_load.py"), *arguments]
        with open(processes.log_path(name), "wb") as log:
            self.process = subprocess.Popen(argv, cwd=processes.workdir, stdin=subprocess.PIPE,
                                            stdout=subprocess.PIPE, stderr=log)
        processes.running.append(self.process)
        self.hello = self._read(WAIT + 10)
        self.port = int(self.hello["port"])

    def _read(self, timeout: float) -> Dict[str, Any]:
        assert self.process.stdout is not None
        with selectors.DefaultSelector() as selector:
            selector.register(self.process.stdout, selectors.EVENT_READ)
            if not selector.select(timeout):
                raise ScenarioError(f"{self.name} did not answer within {timeout:g} s\n"
                                    f"{self.processes.tail(self.name)}")
        line = self.process.stdout.readline()
        if not line:
            raise ScenarioError(f"{self.name} exited with code {self.process.wait(timeout=5)}\n"
                                f"{self.processes.tail(self.name)}")
        document = json.loads(line)
        if "error" in document:
            raise ScenarioError(f"{self.name}: {document['error']}")
        return document

    def command(self, line: str, timeout: float = WAIT) -> Dict[str, Any]:
        assert self.process.stdin is not None
        try:
            self.process.stdin.write(line.encode() + b"\n")
            self.process.stdin.flush()
        except OSError as e:
            raise ScenarioError(f"{self.name} does not take commands: {e}\n{self.processes.tail(self.name)}") from None
        return self._read(timeout)


@dataclass
class Relay:
    name: str
    domain: str
    inward: int = field(default_factory=free_port)
    outward: int = field(default_factory=free_port)
    listen: int = field(default_factory=free_port)
    udp: int = field(default_factory=free_udp_port)
    participants: int = field(default_factory=free_udp_port)
    fingerprint: str = ""
    process: Optional[subprocess.Popen] = None

    @property
    def short(self) -> str:
        return self.fingerprint[:16]

    def status(self) -> Dict[str, Any]:
        url = f"http://127.0.0.1:{self.outward}/relay/status"
        try:
            with urllib.request.urlopen(url, timeout=10) as response:
                return json.loads(response.read())
        except OSError as e:
            raise ScenarioError(f"GET {url} failed: {e}") from None

    def link(self, other: Relay, status: Optional[Dict[str, Any]] = None) -> Optional[Dict[str, Any]]:
        for link in (status or self.status())["links"]:
            if link["fingerprint"] == other.fingerprint:
                return link
        return None


class Trio:
    """
    R1, R2 and R3 of one source tree: R3 dials R2, which accepts it; R2 dials
    R1, which trusts R2 with C{delegate = true}.  R1 has participants in both
    rooms, R3 in L{ROOM}, R2 in L{ROOM_ONE_HOP}.
    """

    def __init__(self, label: str, env: Optional[Dict[str, str]], settings: str) -> None:
        self.label = label
        self.env = env
        self.relays = {name: Relay(name, f"{name.lower()}.{label}.example") for name in ("R1", "R2", "R3")}
        # relays that have a per-link rate limit ([relay] link_rate_limit) get it lifted too
        with open(settings) as f:
            self.rate_limits = ("room_rate_limit", *(["link_rate_limit"] if '"link_rate_limit"' in f.read() else []))

    def process_name(self, relay: Relay) -> str:
        return relay.name if self.label == "relay" else f"{self.label}-{relay.name}"

    def start(self, processes: Processes) -> None:
        from fedserver.pki import create_dev_pki
        from fedserver_relay.fingerprint import fingerprint_of_pem

        workdir = processes.workdir
        pki = os.path.join(workdir, "pki")
        create_dev_pki(pki, [relay.domain for relay in self.relays.values()])  # reuses the CA of an earlier trio
        for relay in self.relays.values():
            with open(os.path.join(pki, f"{relay.domain}.pem"), "rb") as f:
                relay.fingerprint = fingerprint_of_pem(f.read())
        r1, r2, r3 = self.relays["R1"], self.relays["R2"], self.relays["R3"]

        def peer(relay: Relay) -> Dict[str, Any]:
            return {"address": f"127.0.0.1:{relay.listen}", "fingerprint": relay.fingerprint, "label": relay.name}

        def room(name: str) -> Dict[str, str]:
            return {"name": name, "token": TOKEN}

        tables: Dict[str, Dict[str, Any]] = {
            "R1": {"trusted": [{"fingerprint": r2.fingerprint, "label": "R2", "delegate": True}],
                   "rooms": [room(ROOM), room(ROOM_ONE_HOP)]},
            "R2": {"peers": [peer(r1)], "trusted": [{"fingerprint": r3.fingerprint, "label": "R3"}],
                   "rooms": [room(ROOM_ONE_HOP)]},
            "R3": {"peers": [peer(r2)], "rooms": [room(ROOM)]},
        }
        for name, relay in self.relays.items():
            label = self.process_name(relay)
            config = {
                "server": {"backend_domain": relay.domain, "infra_domain": relay.domain,
                           "data_dir": os.path.join(workdir, "var", label)},
                "inward": {"listen": f"tcp:{relay.inward}:interface=127.0.0.1"},
                "outward": {"listen": f"tcp:{relay.outward}:interface=127.0.0.1"},
                "tls": {"certificate": os.path.join(pki, f"{relay.domain}.pem"),
                        "private_key": os.path.join(pki, f"{relay.domain}.key"),
                        "ca_certificates": [os.path.join(pki, "ca.pem")]},
                "discovery": {"plugin": "static"},
                "authenticator": {"plugin": "mtls"},
                "authorizers": [{"plugin": "allow-list", "domains": []}],
                "relay": {
                    "label": name,
                    "listen": f"tcp:{relay.listen}:interface=127.0.0.1",
                    "udp": f"127.0.0.1:{relay.udp}",
                    "participants": f"127.0.0.1:{relay.participants}",
                    **dict.fromkeys(self.rate_limits, RATE_LIMIT),
                    **tables[name],
                },
            }
            relay.process = start_fedserver(processes, label, config, [relay.inward, relay.outward, relay.listen],
                                            env=self.env)

    def links_ready(self) -> Dict[str, Any]:
        """Every link up with UDP confirmed both ways, and R1 holding R2's vouching for R3; the links then."""
        r1, r2, r3 = self.relays["R1"], self.relays["R2"], self.relays["R3"]
        found = {}
        for one, other in ((r3, r2), (r2, r3), (r2, r1), (r1, r2)):
            link = one.link(other)
            if link is None or not link["udp"]:
                return {}
            found[f"{one.name}->{other.name}"] = link
        link = found["R1->R2"]
        if not link["delegate"] or r3.short not in link["vouched"]:
            return {}
        return found

    def subscribed(self) -> bool:
        """R2 subscribed to the room at R3, and R1 to both rooms at R2 (R3 forwards only what R2 wants)."""
        r1, r2, r3 = self.relays["R1"], self.relays["R2"], self.relays["R3"]
        return ((r3.link(r2) or {}).get("subscribedRooms", 0) >= 1
                and (r2.link(r1) or {}).get("subscribedRooms", 0) >= 2)

    def counters(self) -> Dict[str, Dict[str, Any]]:
        return {self.process_name(relay): relay.status()["counters"] for relay in self.relays.values()}


@dataclass
class Path:
    """One way through: its sender, its receiver, and the processes in between (label -> process)."""

    name: str
    sender: Load
    receiver: Load
    chain: Dict[str, subprocess.Popen]
    sequence: int = 0  # the next sequence number of the latency steps


class Bench:
    """The relays, the plain chain, the load processes, and the steps run through them."""

    def __init__(self, processes: Processes, args: argparse.Namespace) -> None:
        self.processes = processes
        self.args = args
        self.next_step = 1
        self.paths: Dict[str, Path] = {}
        import fedserver_relay.settings

        self.trios = {"relay": Trio("relay", None, fedserver_relay.settings.__file__)}
        if args.baseline:
            base = os.path.abspath(args.baseline)
            env = baseline_env(base)
            self.trios["baseline"] = Trio("baseline", env, os.path.join(base, "plugins", "fedserver_relay",
                                                                        "settings.py"))

    # starting

    def start_relays(self) -> Dict[str, Any]:
        """Start every trio; their links once UDP is confirmed on all of them."""
        for trio in self.trios.values():
            trio.start(self.processes)
        links = {}
        for label, trio in self.trios.items():
            found = wait_until(f"every {label} link up with UDP confirmed, and R1 holding R2's vouching for R3",
                               trio.links_ready)
            links.update({f"{label} {name}": link for name, link in found.items()})
        return links

    def links_ready(self) -> bool:
        return all(trio.links_ready() for trio in self.trios.values())

    def counters(self) -> Dict[str, Dict[str, Any]]:
        return {name: c for trio in self.trios.values() for name, c in trio.counters().items()}

    def start_load(self) -> None:
        payload = str(self.args.payload)

        def receiver(name: str, *arguments: str) -> Load:
            return Load(self.processes, f"{name}-receiver", ["receive", *arguments])

        def sender(name: str, port: int, *arguments: str) -> Load:
            return Load(self.processes, f"{name}-sender",
                        ["send", "--to", f"127.0.0.1:{port}", "--payload", payload, *arguments])

        # the relay paths: receivers join R1, senders join R3 (two hops) and R2 (one hop)
        for label, trio in self.trios.items():
            r1, r2, r3 = trio.relays["R1"], trio.relays["R2"], trio.relays["R3"]
            two_hops = receiver(label, "--join", f"127.0.0.1:{r1.participants}", ROOM, TOKEN,
                                "--header", str(RELAY_HEADER), "--origin", r3.short)
            one_hop = receiver(f"{label}-1hop", "--join", f"127.0.0.1:{r1.participants}", ROOM_ONE_HOP, TOKEN,
                               "--header", str(RELAY_HEADER), "--origin", r2.short)
            self.paths[label] = Path(label, sender(label, r3.participants, "--join", ROOM, TOKEN), two_hops,
                                     {"R3": r3.process, "R2": r2.process, "R1": r1.process})  # type: ignore[dict-item]
            self.paths[f"{label}-1hop"] = Path(
                f"{label}-1hop", sender(f"{label}-1hop", r2.participants, "--join", ROOM_ONE_HOP, TOKEN), one_hop,
                {"R2": r2.process, "R1": r1.process})  # type: ignore[dict-item]

        # the plain chain: receiver <- forwarder 2 <- forwarder 1 (<- forwarder 0, for plain-3)
        plain_in = receiver("plain", "--header", str(PLAIN_HEADER))
        f2_port, f1_port, f0_port = free_udp_port(), free_udp_port(), free_udp_port()
        f2 = self._forwarder("F2", f2_port, plain_in.port)
        f1 = self._forwarder("F1", f1_port, f2_port)
        self.paths["plain"] = Path("plain", sender("plain", f1_port), plain_in, {"F1": f1, "F2": f2})
        self.paths["plain-1hop"] = Path("plain-1hop", sender("plain-1hop", f2_port), plain_in, {"F2": f2})
        if "plain-3" in self.args.ladder:
            f0 = self._forwarder("F0", f0_port, f1_port)
            self.paths["plain-3"] = Path("plain-3", sender("plain-3", f0_port), plain_in,
                                         {"F0": f0, "F1": f1, "F2": f2})

        for label, trio in self.trios.items():
            wait_until(f"{label}: R2 to subscribe to the room at R3 and R1 to both rooms at R2", trio.subscribed)

    def _forwarder(self, name: str, port: int, to: int) -> subprocess.Popen:
        argv = [sys.executable, os.path.join(BENCH, "udp_forwarder.py"), "--port", str(port),
                "--to", f"127.0.0.1:{to}"]
        process = self.processes.start(name, argv, [])

        def listening() -> bool:
            if process.poll() is not None:
                raise ScenarioError(f"{name} exited with code {process.returncode}\n{self.processes.tail(name)}")
            with open(self.processes.log_path(name), errors="replace") as f:
                return "listening" in f.read()

        wait_until(f"{name} to listen", listening)
        return process

    # measuring

    def step(self, path: Path, rate: float, seconds: float) -> Dict[str, Any]:
        """Send at C{rate} for C{seconds} through C{path}: what was sent, delivered, lost, and the CPU it took."""
        step = self.next_step
        self.next_step += 1
        watched = {**path.chain, "sender": path.sender.process, "receiver": path.receiver.process}
        cpu = {label: cpu_time(p.pid) for label, p in watched.items()}
        kernel = udp_receive_buffer_errors()
        sent = path.sender.command(f"run {step} {rate:.3f} {seconds:g}", timeout=seconds + WAIT)
        time.sleep(SETTLE)
        got = path.receiver.command(f"report {step}")
        cpu = {label: cpu_time(p.pid) - cpu[label] for label, p in watched.items()}
        kernel_after = udp_receive_buffer_errors()
        received = got["received"]
        per_frame = {label: (used * 1e6 / received if received else None) for label, used in cpu.items()}
        chain = [per_frame[label] for label in path.chain]
        return {
            "offered_per_s": rate,
            "sent": sent["sent"],
            "skipped": sent["skipped"],
            "seconds": sent["seconds"],
            "sent_per_s": sent["sent"] / sent["seconds"],
            "received": received,
            "delivered_per_s": received / sent["seconds"],
            "duplicates": got["duplicates"],
            "loss": 1 - received / sent["sent"] if sent["sent"] else 0.0,
            "latency_us": got["latency_us"],
            "cpu_us_per_frame": per_frame,
            "chain_cpu_us_per_frame": None if None in chain else sum(v for v in chain if v is not None),
            "kernel_receive_buffer_drops": (kernel_after - kernel) if kernel is not None and kernel_after is not None
            else None,
        }

    def check(self, path: Path) -> None:
        """A few frames through C{path}, all of which must arrive (joins and subscriptions may still travel)."""
        for _ in range(5):
            result = self.step(path, CHECK_RATE, CHECK_FRAMES / CHECK_RATE)
            if result["received"] == result["sent"] == CHECK_FRAMES:
                return
            time.sleep(1)
        raise ScenarioError(f"{path.name}: {result['received']} of {result['sent']} check frames arrived "
                            f"({PATHS[path.name]})")

    def ladder(self, path: Path) -> Dict[str, Any]:
        """Offered rates up by sqrt(2) until two steps in a row fail, then two between the best and the next."""
        args = self.args
        steps: List[Dict[str, Any]] = []

        def run(rate: float) -> Dict[str, Any]:
            result = self.step(path, rate, args.step_seconds)
            result["passed"] = result["loss"] < LOSS_LIMIT and result["duplicates"] == 0
            result["sender_short"] = result["sent_per_s"] < SENDER_SHORT * rate
            steps.append(result)
            print(f"bench: {path.name:<10} offered {rate:8.0f}/s: sent {result['sent_per_s']:8.0f}/s, delivered "
                  f"{result['delivered_per_s']:8.0f}/s, loss {result['loss'] * 100:6.2f} %", file=sys.stderr,
                  flush=True)
            return result

        rate, failures = float(args.start_rate), 0
        while rate <= args.max_rate and failures < FAILURES_TO_STOP:
            result = run(rate)
            failures = 0 if result["passed"] and not result["sender_short"] else failures + 1
            if result["loss"] > 0.5:
                break
            rate *= math.sqrt(2)
        for _ in range(args.refine):
            best = max((s for s in steps if s["passed"]), key=lambda s: s["offered_per_s"], default=None)
            above = [s["offered_per_s"] for s in steps if not s["passed"]
                     and (best is None or s["offered_per_s"] > best["offered_per_s"])]
            if best is None or not above or min(above) / best["offered_per_s"] < 1.08:
                break
            run(math.sqrt(best["offered_per_s"] * min(above)))
        passed = [s for s in steps if s["passed"]]
        best = max(passed, key=lambda s: s["delivered_per_s"], default=None)
        # no step lost frames: the ladder ended because the sender could offer no more (or at --max-rate)
        lossless = not any(s["loss"] >= LOSS_LIMIT or s["duplicates"] for s in steps)
        return {"steps": sorted(steps, key=lambda s: s["offered_per_s"]), "best": best,
                "sender_limited": best is not None and lossless}

    def latency(self) -> Dict[str, Any]:
        """Every path at the latency rate, in rounds that alternate the paths; one step id per path."""
        args = self.args
        rounds = max(1, round(args.latency_seconds))
        ids = {name: self._new_step() for name in self.paths}
        sent: Dict[str, int] = dict.fromkeys(self.paths, 0)
        for _ in range(rounds):
            for name, path in self.paths.items():
                answer = path.sender.command(f"run {ids[name]} {args.latency_rate:g} "
                                             f"{args.latency_seconds / rounds:g} {path.sequence}",
                                             timeout=args.latency_seconds + WAIT)
                path.sequence += answer["sent"]
                sent[name] += answer["sent"]
                time.sleep(0.1)
        time.sleep(SETTLE)
        found = {}
        for name, path in self.paths.items():
            got = path.receiver.command(f"report {ids[name]}")
            found[name] = {"sent": sent[name], "received": got["received"], "latency_us": got["latency_us"]}
        return found

    def _new_step(self) -> int:
        self.next_step += 1
        return self.next_step - 1

    def profile(self, rate: float) -> Dict[str, Any]:
        """py-spy on the three relays during one step of the relay path at C{rate}."""
        seconds = max(self.args.step_seconds, 3.0)
        spies = {name: record_profile(relay.process.pid,  # type: ignore[union-attr]
                                      os.path.join(self.processes.workdir, f"profile-{name}.txt"), seconds + 1)
                 for name, relay in self.trios["relay"].relays.items()}
        time.sleep(0.5)
        step = self.step(self.paths["relay"], rate, seconds)
        return {"step": step, "relays": {name: finish_profile(*spy) for name, spy in spies.items()}}


# the verdict

def dropped_by_rules(before: Dict[str, Dict[str, Any]], after: Dict[str, Dict[str, Any]]) -> Dict[str, int]:
    """Frames each relay dropped (any reason) between the two counter snapshots, by relay and reason."""
    found = {}
    for name, counters in after.items():
        for reason, by_peer in counters["dropped"].items():
            earlier = before[name]["dropped"].get(reason, {})
            count = sum(by_peer.values()) - sum(earlier.values())
            if count:
                found[f"{name} {reason}"] = count
    return found


def targets(document: Dict[str, Any]) -> List[Dict[str, str]]:
    verdicts = []

    def verdict(target: str, ok: Optional[bool], detail: str) -> None:
        verdicts.append({"target": target, "result": "n/a" if ok is None else "PASS" if ok else "FAIL",
                         "detail": detail})

    ratio = document.get("ratio")
    throughput = document.get("throughput", {})
    if ratio is not None:
        relay, plain = throughput["relay"]["best"], throughput["plain"]["best"]
        note = "; the plain chain reached the senders' limit, so this is an upper bound" if (
            throughput["plain"]["sender_limited"]) else ""
        verdict(f"relay frames/s >= {MIN_RATIO:g} x plain", ratio >= MIN_RATIO,
                f"{ratio:.2f} x ({relay['delivered_per_s']:.0f} vs {plain['delivered_per_s']:.0f} frames/s with "
                f"< {LOSS_LIMIT * 100:g} % loss){note}")
    else:
        verdict(f"relay frames/s >= {MIN_RATIO:g} x plain", None, "needs the relay and plain ladders, each with a "
                "step under the loss limit")
    udp = document.get("udp_confirmed")
    if udp is not None:
        verdict("UDP confirmed on every relay link, before and after the measurements", udp["ok"], udp["detail"])
    drops = document.get("relay_drops")
    if drops is not None:
        verdict("no frame dropped by the relays' rules while measuring", not drops,
                ", ".join(f"{k} {v}" for k, v in drops.items()) or "none dropped (authorization, duplicates, rate, "
                                                                    "replay, malformed)")
    return verdicts


def _us(value: Optional[float]) -> str:
    return "-" if value is None or value != value else f"{value:.0f}"


def report(document: Dict[str, Any]) -> str:
    s = document["settings"]
    m = document["machine"]
    lines = [f"fedserver relay bench: {s['payload']}-byte payloads, {s['step_seconds']:g} s per step, loss limit "
             f"{LOSS_LIMIT * 100:g} %, {m['cpus']} CPUs ({m['cpu_model']}), load average "
             f"{m['load_average'][0]:.2f}", ""]
    throughput = document.get("throughput", {})
    if throughput:
        lines.append(f"{'path':<11} {'offered/s':>9} {'sent/s':>8} {'delivered/s':>11} {'loss %':>7} "
                     f"{'p50 us':>7} {'p99 us':>7}  CPU us/frame")
        for name, ladder in throughput.items():
            if "error" in ladder:
                lines.append(f"{name:<11} could not run: {ladder['error'].splitlines()[0]}")
                continue
            for step in ladder["steps"]:
                mark = "*" if step is ladder["best"] else " "
                cpu = ", ".join(f"{label} {_us(v)}" for label, v in step["cpu_us_per_frame"].items()
                                if label not in ("sender", "receiver"))
                lines.append(f"{name:<10}{mark} {step['offered_per_s']:>9.0f} {step['sent_per_s']:>8.0f} "
                             f"{step['delivered_per_s']:>11.0f} {step['loss'] * 100:>7.2f} "
                             f"{_us(step['latency_us']['50']):>7} {_us(step['latency_us']['99']):>7}  {cpu}")
        lines += ["", f"* the highest step with < {LOSS_LIMIT * 100:g} % loss:"]
        for name, ladder in throughput.items():
            if "error" in ladder:
                continue
            best = ladder.get("best")
            if not best:
                lines.append(f"  {name:<11} no step under the loss limit")
                continue
            cpu = ", ".join(f"{label} {v:.1f}" for label, v in best["cpu_us_per_frame"].items() if v is not None)
            limited = " (the senders' limit, not the chain's)" if ladder["sender_limited"] else ""
            lines.append(f"  {name:<11} {best['delivered_per_s']:>7.0f} frames/s{limited}; CPU us/frame {cpu}; "
                         f"chain {best['chain_cpu_us_per_frame']:.1f}")
        for pair, ratio in document.get("ratios", {}).items():
            lines.append(f"  {pair:<17} {ratio['frames_per_s']:5.2f} x frames/s, {ratio['cpu_per_frame']:5.2f} x CPU "
                         "per frame (the chains' processes)")
    latency = document.get("latency")
    if latency:
        lines += ["", f"latency at {s['latency_rate']:g} frames/s, one way, send to arrival "
                      f"({s['latency_seconds']:g} s per path, rounds alternating the paths)",
                  f"{'path':<11} {'frames':>7} {'lost':>5} {'p50 us':>7} {'p90 us':>7} {'p99 us':>7}  way"]
        for name, r in latency.items():
            lines.append(f"{name:<11} {r['received']:>7} {r['sent'] - r['received']:>5} "
                         f"{_us(r['latency_us']['50']):>7} {_us(r['latency_us']['90']):>7} "
                         f"{_us(r['latency_us']['99']):>7}  {PATHS[name]}")
        for key, added in document.get("added_latency_us", {}).items():
            label, kind = key.split()
            what = (f"added per {label} hop, ({label} - plain) / 2" if kind == "per_hop"
                    else f"one {label} hop, {label}-1hop - plain-1hop")
            lines.append(f"{what + ':':<44} p50 {added['50']:4.0f} us, p90 {added['90']:4.0f} us, "
                         f"p99 {added['99']:4.0f} us")
    profile = document.get("profile")
    if profile:
        for name, found in profile["relays"].items():
            lines += ["", f"profile of {name} ({found.get('samples', 0)} samples at "
                          f"{profile['step']['offered_per_s']:.0f} frames/s offered; {found.get('file', '')})"]
            if "error" in found:
                lines.append(f"  {found['error']}")
                continue
            lines.append("  own time:")
            lines += [f"    {row['share'] * 100:5.1f} %  {row['function']}" for row in found["own"]]
            lines.append("  inclusive (fedserver's functions):")
            lines += [f"    {row['share'] * 100:5.1f} %  {row['function']}" for row in found["inclusive"]]
    lines.append("")
    for v in document["targets"]:
        lines.append(f"{v['result']:<4}  {v['target']}: {v['detail']}")
    return "\n".join(lines)


def ratios(throughput: Dict[str, Any]) -> Dict[str, Dict[str, float]]:
    """Frames/s and chain CPU per frame of the best steps, relay over plain (the goal) and the others."""
    found = {}
    for ours, theirs in (("relay", "plain"), ("baseline", "plain"), ("relay", "plain-3"), ("relay", "baseline"),
                         ("plain-3", "plain")):
        mine, other = (throughput.get(ours) or {}).get("best"), (throughput.get(theirs) or {}).get("best")
        if mine and other:
            found[f"{ours}/{theirs}"] = {
                "frames_per_s": mine["delivered_per_s"] / other["delivered_per_s"],
                "cpu_per_frame": mine["chain_cpu_us_per_frame"] / other["chain_cpu_us_per_frame"],
            }
    return found


def added_latency(latency: Dict[str, Any]) -> Dict[str, Any]:
    """Per relay hop, (relay - plain) / 2; and over one hop, relay-1hop - plain-1hop (for the baseline too)."""
    found: Dict[str, Any] = {}
    for label in ("relay", "baseline"):
        if label in latency and "plain" in latency:
            found[f"{label} per_hop"] = {p: (latency[label]["latency_us"][p] - latency["plain"]["latency_us"][p]) / 2
                                         for p in ("50", "90", "99")}
        if f"{label}-1hop" in latency and "plain-1hop" in latency:
            found[f"{label} one_hop"] = {
                p: latency[f"{label}-1hop"]["latency_us"][p] - latency["plain-1hop"]["latency_us"][p]
                for p in ("50", "90", "99")}
    return found


# the command

def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--step-seconds", type=float, default=3, help="seconds of each throughput step (default 3)")
    parser.add_argument("--payload", type=int, default=1000, help="media payload bytes (default 1000; 20 to 1171)")
    parser.add_argument("--start-rate", type=float, default=1000, help="first offered rate, frames/s (default 1000)")
    parser.add_argument("--max-rate", type=float, default=200_000, help="highest offered rate (default 200000)")
    parser.add_argument("--refine", type=int, default=2,
                        help="steps between the best passing and the first failing rate (default 2)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="ladders per path, alternating the paths; the best counts (default 1)")
    parser.add_argument("--ladder", action="append", choices=list(PATHS), metavar="PATH",
                        help=f"throughput ladder of this path (repeatable; default relay and plain, and baseline with "
                             f"--baseline; plain-3 runs only when asked for): {', '.join(PATHS)}")
    parser.add_argument("--latency-rate", type=float, default=500, help="frames/s of the latency runs (default 500)")
    parser.add_argument("--latency-seconds", type=float, default=4,
                        help="seconds of latency run per path, in 1 s rounds (default 4)")
    parser.add_argument("--baseline", metavar="DIR",
                        help="also start R1, R2, R3 from the source tree DIR (with fedserver/ and plugins/), as the "
                             "paths baseline and baseline-1hop, and ladder baseline too: a change measured in one run")
    parser.add_argument("--profile", action="store_true",
                        help="after the ladders, record the three relays with py-spy during one step at the relay "
                             "path's best rate, and print where the time went")
    add_output_arguments(parser)
    args = parser.parse_args(argv)
    if args.step_seconds <= 0 or args.latency_seconds < 1 or args.latency_rate <= 0 or args.rounds < 1:
        parser.error("need --step-seconds > 0, --latency-seconds >= 1, --latency-rate > 0, --rounds >= 1")
    if not 20 <= args.payload <= 1171:
        parser.error("--payload must be 20 to 1171 bytes")
    if not 0 < args.start_rate <= args.max_rate:
        parser.error("need 0 < --start-rate <= --max-rate")
    check_baseline(parser, args)
    if not args.baseline and any(name.startswith("baseline") for name in args.ladder or ()):
        parser.error("the baseline paths need --baseline DIR")
    args.ladder = args.ladder or ["relay", "plain", *(["baseline"] if args.baseline else [])]
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    if args.profile and py_spy_missing():
        return 2
    try:
        import fedserver.pki  # noqa: F401 - the certificates are made with it
        import fedserver_relay  # noqa: F401
    except ImportError as e:
        return not_installed("fedserver or fedserver_relay", e, "relay.py")

    workdir, processes = start_work("fedserver-relay-bench-")
    document: Dict[str, Any] = {}
    failed = False
    interrupted = False
    try:
        bench = Bench(processes, args)
        print(f"bench: starting R1, R2, R3{' twice' if args.baseline else ''} and waiting for their links "
              "(UDP confirmed)...", file=sys.stderr, flush=True)
        links = bench.start_relays()
        document["relays"] = {label: {"pythonpath": (trio.env or os.environ).get("PYTHONPATH", ""),
                                      "rate_limits_lifted": list(trio.rate_limits)}
                              for label, trio in bench.trios.items()}
        print("bench: starting the plain forwarders and the load processes...", file=sys.stderr, flush=True)
        bench.start_load()
        for path in bench.paths.values():
            bench.check(path)
        before = bench.counters()
        print("bench: latency...", file=sys.stderr, flush=True)
        document["latency"] = bench.latency()
        ladders: Dict[str, List[Dict[str, Any]]] = {}
        throughput: Dict[str, Any] = {}
        for round_ in range(args.rounds):
            for name in args.ladder:
                print(f"bench: {name} ladder{f' (round {round_ + 1})' if args.rounds > 1 else ''}...",
                      file=sys.stderr, flush=True)
                try:
                    ladders.setdefault(name, []).append(bench.ladder(bench.paths[name]))
                except ScenarioError as e:
                    print(f"bench: {name} could not run: {e}", file=sys.stderr, flush=True)
                    throughput[name] = {"error": str(e)}
                    failed = True
        for name, found in ladders.items():
            # the round whose best step delivered most; the others are kept in the JSON
            best = max(found, key=lambda ladder: ladder["best"]["delivered_per_s"] if ladder["best"] else -1.0)
            throughput[name] = {**best, "rounds": [ladder["best"]["delivered_per_s"] if ladder["best"] else None
                                                   for ladder in found],
                                "other_rounds": [ladder["steps"] for ladder in found if ladder is not best]}
        document["throughput"] = throughput
        document["ratios"] = ratios(throughput)
        if "relay/plain" in document["ratios"]:
            document["ratio"] = document["ratios"]["relay/plain"]["frames_per_s"]
        relay_best = (throughput.get("relay") or {}).get("best")
        after = bench.counters()
        document["relay_drops"] = dropped_by_rules(before, after)
        document["relay_counters"] = after
        links_after = bench.links_ready()
        document["links"] = {name: {k: link[k] for k in ("udp", "direction", "delegate", "vouched",
                                                           "subscribedRooms")}
                             for name, link in links.items()}
        document["udp_confirmed"] = {
            "ok": links_after,
            "detail": ", ".join(f"{name} udp" for name in links) + (
                "; still after the measurements" if links_after else "; NOT after the measurements"),
        }
        if args.profile and relay_best:
            print("bench: profiling the relays...", file=sys.stderr, flush=True)
            document["profile"] = bench.profile(relay_best["offered_per_s"])
    except ScenarioError as e:
        print(f"bench: could not run: {e}", file=sys.stderr)
        document["error"] = str(e)
        failed = True
    except KeyboardInterrupt:
        interrupted = True
    finally:
        wind_down(processes)
    if interrupted:
        return interrupted_exit(workdir)

    document = {
        "when": now(),
        "machine": machine(wrk=False),
        "software": {name: metadata.version(name) for name in ("Twisted", "cryptography", "pyOpenSSL", "attrs")},
        "settings": {"payload": args.payload, "step_seconds": args.step_seconds, "start_rate": args.start_rate,
                     "max_rate": args.max_rate, "refine": args.refine, "rounds": args.rounds,
                     "ladders": args.ladder, "loss_limit": LOSS_LIMIT, "latency_rate": args.latency_rate,
                     "latency_seconds": args.latency_seconds, "rate_limits": RATE_LIMIT,
                     "profiled": args.profile,
                     "baseline": os.path.abspath(args.baseline) if args.baseline else None},
        "paths": PATHS,
        **document,
    }
    if document.get("latency"):
        document["added_latency_us"] = added_latency(document["latency"])
    document["targets"] = targets(document)
    checks_failed = any(v["result"] == "FAIL" and "relay frames/s" not in v["target"] for v in document["targets"])
    document["work_folder"] = workdir if (failed or checks_failed or args.keep) else None
    if "error" in document:
        print(f"bench: could not run: {document['error']}")
    else:
        print(report(document))
    return finish(document, "relay-latest.json", args, workdir, failed or checks_failed)


if __name__ == "__main__":
    sys.exit(main())
