"""
The Wire federation flows of the seed document, played across two backends
whose backend and infrastructure domains differ, found through real DNS SRV
records, over mutual TLS, on 127.0.0.1:

 1. user discovery: Alice on a.example finds @bob@b.example;
 2. conversation establishment: Alice claims Bob's prekeys and creates a
    conversation; b.example learns of it (on-conversation-created);
 3. message sending: Alice writes (on-message-sent to b.example); Bob answers
    (send-message to the owner, a.example), and each reads their inbox.

    python etc/wire/flows.py          # play the flows, then serve until Ctrl-C
    python etc/wire/flows.py --once   # play the flows and stop

It starts Twisted's DNS server with example.zone.py on 127.0.0.1:15353, and
both backends under twistd with the reference brig and galley components.
"""

import argparse
import json
import os
import sys
import urllib.parse

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
from launcher import Processes, call, check_configs, make_pki  # noqa: E402

VAR = os.path.join(HERE, "var")
DNS_PORT = 15353
OUTWARD = {"a.example": 19080, "b.example": 29080}
INWARD = {"a.example": 19443, "b.example": 29443}


def api(domain, method, path, body=None):
    status, answer = call(method, f"http://127.0.0.1:{OUTWARD[domain]}/wire/{path}", body)
    if status >= 300:
        raise SystemExit(f"{method} /wire/{path} on {domain} failed: HTTP {status} {json.dumps(answer)}")
    return answer


def user(domain, handle, name):
    """The user with C{handle}, created unless an earlier run made it."""
    status, answer = call("POST", f"http://127.0.0.1:{OUTWARD[domain]}/wire/users", {"handle": handle, "name": name})
    if status == 409:
        return api(domain, "GET", f"handles/{domain}/{handle}")
    if status >= 300:
        raise SystemExit(f"creating @{handle} on {domain} failed: HTTP {status} {json.dumps(answer)}")
    return answer


def step(text):
    print(f"\n== {text}", flush=True)


def show(label, value):
    print(f"   {label}: {json.dumps(value)}", flush=True)


def play():
    step("users: alice on a.example, bob on b.example")
    alice = user("a.example", "alice", "Alice")
    bob = user("b.example", "bob", "Bob")
    show("alice", alice["qualified_id"])
    show("bob", bob["qualified_id"])

    step("1. user discovery: alice searches for @bob@b.example")
    found = api("a.example", "GET", "search?" + urllib.parse.urlencode({"q": "@bob@b.example"}))
    show("a.example's brig asked b.example's (search-users)", found["documents"])
    bob_id = found["documents"][0]["qualified_id"]

    step("2. conversation establishment: alice creates a conversation with bob")
    created = api("a.example", "POST", "conversations",
                  {"creator": alice["qualified_id"]["id"], "name": "Tea", "members": [bob_id]})
    conversation = created["conversation"]["qualified_id"]
    show("conversation (owned by a.example)", conversation)
    show("bob's prekey bundle (claim-prekey-bundle)",
         [b for b in created["prekey_bundles"] if b["user"] == bob_id])
    inbox = api("b.example", "GET", f"users/{bob_id['id']}/inbox")
    show("bob's inbox on b.example (on-conversation-created)", [e["type"] for e in inbox["events"]])

    step("3. message sending: alice writes, bob answers")
    path = f"conversations/{conversation['domain']}/{conversation['id']}/messages"
    api("a.example", "POST", path, {"sender": alice["qualified_id"]["id"], "text": "tea at five?"})
    api("b.example", "POST", path, {"sender": bob_id["id"], "text": "yes, see you then"})
    for domain, user_id in (("b.example", bob_id["id"]), ("a.example", alice["qualified_id"]["id"])):
        inbox = api(domain, "GET", f"users/{user_id}/inbox")
        texts = [e["data"]["text"] for e in inbox["events"] if e["type"] == "conversation.message-add"]
        show(f"inbox of {user_id[:8]}… on {domain}", texts)
    print("\nall three flows completed", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--once", action="store_true", help="stop after playing the flows")
    args = parser.parse_args()

    make_pki(os.path.join(VAR, "pki"), ["fed-a.infra.example", "fed-b.infra.example"])
    configs = {domain: os.path.join(HERE, f"{domain}.toml") for domain in OUTWARD}
    check_configs(configs.values())
    with Processes(VAR) as processes:
        processes.twistd("dns", "dns", "--pyzone", os.path.join(HERE, "example.zone.py"),
                         "--port", str(DNS_PORT), "--interface", "127.0.0.1", ports=[DNS_PORT])
        print(f"DNS: 127.0.0.1:{DNS_PORT} serves the example zone")
        for domain, config in configs.items():
            log = processes.twistd(f"{domain}/fedserver", "fedserver", "--config", config,
                                   ports=[INWARD[domain], OUTWARD[domain]])
            print(f"{domain}: inward 127.0.0.1:{INWARD[domain]}, outward 127.0.0.1:{OUTWARD[domain]}; "
                  f"log {os.path.relpath(log)}")
        play()
        if not args.once:
            processes.serve_until_stopped(
                "Both backends are running; try for example:\n"
                "  fedserver discover --config etc/wire/a.example.toml b.example"
            )


if __name__ == "__main__":
    main()
