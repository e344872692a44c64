"""
A three-relay media mesh with delegated trust, on 127.0.0.1:

    Relay 1 (trusted zone)  <--  Relay 2 (hub)  <--  Relay 3
    trusts Relay 2 with          dials Relay 1,      dials Relay 2
    delegate = true              accepts Relay 3

 1. each relay's identity is its certificate's fingerprint, printed by
    `fedserver relay-fingerprint` and written into the other relays'
    configurations (from the templates r1/r2/r3.template.toml);
 2. the relays link over mutual TLS 1.3; Relay 2 vouches for Relay 3 in its
    trust chain, which Relay 1 takes because it delegates to Relay 2;
 3. a participant joins the room "standup" on Relay 1, and one on Relay 3;
 4. Relay 3's participant sends media: it travels Relay 3 -> Relay 2 ->
    Relay 1 as sealed UDP datagrams, with Relay 3 as its origin, and
    reaches Relay 1's participant;
 5. the status counters of the three relays (GET /relay/status).

    python etc/relay/mesh.py          # play, then serve until Ctrl-C
    python etc/relay/mesh.py --once   # play and stop

It makes a development CA and the relays' certificates under etc/relay/var
(once), writes var/r1.toml, var/r2.toml and var/r3.toml, and starts the
relays under twistd.
"""

import argparse
import json
import os
import socket
import subprocess
import sys
import time

from fedserver_relay.fingerprint import short_id
from fedserver_relay.participants import JOINED, MEDIA_OUT, VERSION, join_datagram, media_datagram

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
from launcher import Processes, call, check_configs, make_pki, tool  # noqa: E402

VAR = os.path.join(HERE, "var")
RELAYS = ("r1", "r2", "r3")
LABELS = {"r1": "Relay 1", "r2": "Relay 2", "r3": "Relay 3"}
DOMAINS = {name: f"relay-{name[1]}.example" for name in RELAYS}
INWARD = {"r1": 26401, "r2": 26402, "r3": 26403}
STATUS = {"r1": 26411, "r2": 26412, "r3": 26413}
LINKS = {"r1": 26421, "r2": 26422, "r3": 26423}
PARTICIPANTS = {"r1": 26441, "r3": 26443}
ROOM, TOKEN = "standup", "standup-token-for-the-example"
FRAMES = 5
WAIT = 30.0


def step(text):
    print(f"\n== {text}", flush=True)


def fingerprints():
    """Each relay's fingerprint, as `fedserver relay-fingerprint` prints it: (with colons, plain)."""
    found = {}
    for name in RELAYS:
        pem = os.path.join(VAR, "pki", f"{DOMAINS[name]}.pem")
        result = subprocess.run([tool("fedserver"), "relay-fingerprint", pem], capture_output=True, text=True,
                                check=True)
        colons, plain = result.stdout.split()
        found[name] = (colons, plain)
        print(f"   {LABELS[name]}: fedserver relay-fingerprint {os.path.relpath(pem)}\n      {colons}")
    return found


def write_configs(found):
    """var/rN.toml from rN.template.toml, with the other relays' fingerprints filled in."""
    paths = {}
    for name in RELAYS:
        with open(os.path.join(HERE, f"{name}.template.toml")) as f:
            text = f.read()
        for other in RELAYS:
            text = text.replace(f"@{other.upper()}_FINGERPRINT@", found[other][0])
        paths[name] = os.path.join(VAR, f"{name}.toml")
        with open(paths[name], "w") as f:
            f.write(f"# written by etc/relay/mesh.py from {name}.template.toml: edit the template\n\n{text}")
    return paths


def status(name):
    code, answer = call("GET", f"http://127.0.0.1:{STATUS[name]}/relay/status")
    if code != 200:
        raise SystemExit(f"GET /relay/status on {LABELS[name]} failed: HTTP {code} {json.dumps(answer)}")
    return answer


def link(name, other_fingerprint):
    for entry in status(name)["links"]:
        if entry["fingerprint"] == other_fingerprint:
            return entry
    return None


def wait_for(what, check):
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.1)
    raise SystemExit(f"gave up after {WAIT} s waiting for {what}")


class Participant:
    """A local participant: a UDP socket in the room ROOM of one relay."""

    def __init__(self, name):
        self.relay = ("127.0.0.1", PARTICIPANTS[name])
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.5)

    def join(self):
        deadline = time.monotonic() + WAIT
        while time.monotonic() < deadline:
            self.sock.sendto(join_datagram(ROOM, TOKEN), self.relay)
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            if data[:2] == bytes((VERSION, JOINED)):
                return data[2:]
        raise SystemExit(f"no JOINED from {self.relay} within {WAIT} s")

    def send(self, payload):
        self.sock.sendto(media_datagram(payload), self.relay)

    def receive(self, count):
        """Media datagrams: (origin relay short id, payload), until C{count} came or WAIT passed."""
        got = []
        deadline = time.monotonic() + WAIT
        while len(got) < count and time.monotonic() < deadline:
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            if data[:2] == bytes((VERSION, MEDIA_OUT)):
                got.append((data[2:10], data[10:]))
        return got

    def close(self):
        self.sock.close()


def show_status(name):
    answer = status(name)
    counters = answer["counters"]
    links = [
        {k: entry[k] for k in ("label", "direction", "udp", "delegate", "vouched", "subscribedRooms")}
        for entry in answer["links"]
    ]
    dropped = {reason: by_peer for reason, by_peer in counters["dropped"].items() if by_peer}
    print(f"   {LABELS[name]} ({answer['fingerprint'][:16]}…):")
    print(f"      links: {json.dumps(links)}")
    print(f"      accepted: {json.dumps(counters['accepted'])}; dropped: {json.dumps(dropped)}; "
          f"originated {counters['originated']}, forwarded {counters['forwarded']}, "
          f"delivered {counters['delivered']}; refused handshakes: {json.dumps(answer['refusedHandshakes'])}")


def play(found):
    plain = {name: found[name][1] for name in RELAYS}
    step("the relays link: Relay 2 dials Relay 1, Relay 3 dials Relay 2 (mutual TLS 1.3, UDP confirmed)")
    r1_r2 = wait_for("Relay 1's link to Relay 2, vouching for Relay 3",
                     lambda: (e := link("r1", plain["r2"])) and e["udp"] and e["vouched"] and e)
    wait_for("Relay 3's link to Relay 2", lambda: (e := link("r3", plain["r2"])) and e["udp"])
    print(f"   Relay 1 -> {r1_r2['label']}: delegate {json.dumps(r1_r2['delegate'])}, "
          f"vouched for {json.dumps(r1_r2['vouched'])} (Relay 3 is {short_id(plain['r3']).hex()})")

    step(f"participants join the room {ROOM!r} on Relay 1 and on Relay 3")
    listener, speaker = Participant("r1"), Participant("r3")
    try:
        for who, participant in (("Relay 1", listener), ("Relay 3", speaker)):
            print(f"   {who}'s participant joined (room hash {participant.join().hex()})")
        wait_for("Relay 3 to learn that Relay 2 wants the room",
                 lambda: (e := link("r3", plain["r2"])) and e["subscribedRooms"])
        wait_for("Relay 2 to learn that Relay 1 wants the room",
                 lambda: (e := link("r2", plain["r1"])) and e["subscribedRooms"])

        step(f"Relay 3's participant sends {FRAMES} media packets")
        for i in range(FRAMES):
            speaker.send(f"media packet {i} from Relay 3's participant".encode())
        names = {short_id(plain[name]): LABELS[name] for name in RELAYS}
        got = listener.receive(FRAMES)
        for origin, payload in got:
            print(f"   Relay 1's participant got {payload.decode()!r} (origin {origin.hex()}: "
                  f"{names.get(origin, 'unknown')}, via Relay 2)")
        if len(got) != FRAMES:
            raise SystemExit(f"Relay 1's participant got {len(got)} of {FRAMES} packets")
    finally:
        listener.close()
        speaker.close()

    step("status counters (GET /relay/status)")
    for name in RELAYS:
        show_status(name)
    print("\nthe three-relay mesh completed", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--once", action="store_true", help="stop after playing")
    args = parser.parse_args()

    make_pki(os.path.join(VAR, "pki"), DOMAINS.values())
    step("fingerprints, for the other relays' [[relay.peers]] and [[relay.trusted]]")
    found = fingerprints()
    configs = write_configs(found)
    check_configs(configs.values())
    with Processes(VAR) as processes:
        for name, config in configs.items():
            log = processes.twistd(f"{name}/fedserver", "fedserver", "--config", config,
                                   ports=[INWARD[name], STATUS[name], LINKS[name]])
            print(f"{LABELS[name]}: relay links on 127.0.0.1:{LINKS[name]}, status on "
                  f"http://127.0.0.1:{STATUS[name]}/relay/status; log {os.path.relpath(log)}")
        play(found)
        if not args.once:
            processes.serve_until_stopped(
                "The three relays are running; try for example:\n"
                f"  curl -s http://127.0.0.1:{STATUS['r1']}/relay/status"
            )


if __name__ == "__main__":
    main()
