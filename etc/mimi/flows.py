"""
The MIMI cross-gateway flow, played between two MIMI gateways (a.example and
b.example) that federate over mutual TLS on 127.0.0.1:

 1. each application server registers a client with its gateway (Alice's
    phone on a.example, Carol's laptop on b.example), creates a key queue
    and uploads KeyPackages;
 2. b.example's application discovers a.example's applications and Alice's
    clients, and claims one of Alice's KeyPackages across domains (claiming
    again gives the same one);
 3. Carol creates a group on b.example and commits epoch 0 -> 1 with a
    Welcome for Alice's KeyPackage; b.example's gateway delivers it to
    a.example's, where Alice's application server fetches it;
 4. a stale commit for epoch 0 is refused, and a new claim gives another
    KeyPackage, since the Welcome consumed the first.

    python etc/mimi/flows.py          # play the flow, then serve until Ctrl-C
    python etc/mimi/flows.py --once   # play the flow and stop

It makes a development CA, certificates and the applications' bearer tokens
under etc/mimi/var (once), and starts both backends under twistd with the
mimi-gateway component.  The MLS messages are framed and signed as RFC 9420
says (fedserver_mimi.encode), with random bytes where an MLS client would
have encrypted something: the gateways never decrypt.
"""

import argparse
import base64
import json
import os
import secrets
import sys
import time
import urllib.parse

import nacl.signing

from fedserver_mimi.encode import (
    encode_add_proposal,
    encode_proposal_by_value,
    make_group_info,
    make_key_package,
    make_public_commit,
    make_welcome,
)
from fedserver_mimi.keypackage import parse_key_package_message
from fedserver_mimi.messages import key_package_ref

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
from launcher import Processes, call, check_configs, make_pki  # noqa: E402

VAR = os.path.join(HERE, "var")
OUTWARD = {"a.example": 17080, "b.example": 27080}
INWARD = {"a.example": 17443, "b.example": 27443}
#: each backend's application, as declared in its configuration: (id, token file)
APPS = {
    "a.example": ("6cae8cb6-aeea-4e6a-9923-7f2891dfcce4", os.path.join(VAR, "chat-a.token")),
    "b.example": ("41d98527-6f63-4268-983f-f1d565f2c8c5", os.path.join(VAR, "chat-b.token")),
}
VERSION, SUITE = 1, 1  # mls10, MLS_128_DHKEMX25519_AES128GCM_SHA256_Ed25519
KEY_PACKAGES = 3


def make_tokens():
    """The applications' bearer tokens, made once (the configurations name these files)."""
    os.makedirs(VAR, exist_ok=True)
    for _, path in APPS.values():
        if not os.path.exists(path):
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_urlsafe(32) + "\n")


def token(domain):
    with open(APPS[domain][1]) as f:
        return f.read().strip()


def request(domain, method, path, query=None, body=None):
    """A request to C{domain}'s gateway API as its application; (status, answer)."""
    url = f"http://127.0.0.1:{OUTWARD[domain]}/mimi/{path}"
    if query:
        url += "?" + urllib.parse.urlencode(query)
    return call(method, url, body, headers={"Authorization": f"Bearer {token(domain)}"})


def api(domain, method, path, query=None, body=None):
    status, answer = request(domain, method, path, query, body)
    if status >= 300:
        raise SystemExit(f"{method} /mimi/{path} on {domain} failed: HTTP {status} {json.dumps(answer)}")
    return answer


def b64(data):
    return base64.b64encode(data).decode("ascii")


def unb64(text):
    return base64.b64decode(text)


def ref_of(key_package):
    """The KeyPackageRef of an encoded KeyPackage (an MLSMessage), hex."""
    return key_package_ref(parse_key_package_message(key_package)).hex()


def step(text):
    print(f"\n== {text}", flush=True)


def show(label, value):
    print(f"   {label}: {json.dumps(value, ensure_ascii=False)}", flush=True)


def check(condition, failure, value=None):
    """Stop the example (and the backends) when the gateways did not do what the flow expects."""
    if not condition:
        raise SystemExit(f"unexpected: {failure}" + ("" if value is None else f": {json.dumps(value)}"))


def client(domain, handle, tags):
    """The client with C{handle} of C{domain}'s application, registered unless an earlier run did."""
    app = APPS[domain][0]
    status, answer = request(domain, "POST", f"apps/{app}/clients", body={"clientHandle": b64(handle.encode()),
                                                                          "tags": tags})
    if status == 409 and answer.get("label") == "client-handle-exists":
        return answer["data"]["clientId"], "registered by an earlier run"
    if status >= 300:
        raise SystemExit(f"registering {handle} on {domain} failed: HTTP {status} {json.dumps(answer)}")
    return answer["clientId"], "registered"


def queue(domain, client_id):
    """The client's key queue for mls10 and our cipher suite, created unless an earlier run did."""
    app = APPS[domain][0]
    status, answer = request(domain, "POST", f"apps/{app}/clients/{client_id}/queues",
                             body={"protocolVersion": VERSION, "cipherSuite": SUITE})
    if status == 409 and answer.get("label") == "queue-exists":
        return answer["data"]["queueId"]
    if status >= 300:
        raise SystemExit(f"creating a queue on {domain} failed: HTTP {status} {json.dumps(answer)}")
    return answer["queueId"]


def upload(domain, client_id, queue_id, handle, signing_key):
    """Fresh KeyPackages of C{handle}, replacing the unclaimed ones of earlier runs; their refs."""
    now = int(time.time())
    packages = [make_key_package(signing_key, identity=handle.encode(), cipher_suite=SUITE,
                                 not_before=now - 60, not_after=now + 7 * 86400)
                for _ in range(KEY_PACKAGES)]
    answer = api(domain, "PATCH", f"apps/{APPS[domain][0]}/clients/{client_id}/queues/{queue_id}",
                 body={"keyPackages": [b64(p) for p in packages], "isReset": True})
    return [ref_of(p) for p in packages], answer["keyPackagesInPool"]


def claim(alice, carol):
    """b.example's application claims a KeyPackage of Alice (on a.example) for Carol."""
    a_app, b_app = APPS["a.example"][0], APPS["b.example"][0]
    answer = api("b.example", "GET", f"apps/{b_app}/clients/{alice}/keyPackage",
                 {"protocolVersion": VERSION, "cipherSuite": SUITE, "receiverClientId": carol,
                  "domain": "a.example", "app": a_app})
    return unb64(answer["keyPackage"]), answer["isFinalKey"]


def play():
    a_app, b_app = APPS["a.example"][0], APPS["b.example"][0]
    step("applications: chat-a on a.example, chat-b on b.example (declared in the configurations)")
    for domain in OUTWARD:
        app = api(domain, "GET", f"apps/{APPS[domain][0]}")
        show(f"{domain}", {k: app[k] for k in ("appId", "name", "identityConfiguration")})

    step("1. clients: Alice's phone on a.example, Carol's laptop on b.example")
    alice_handle, carol_handle = "alice@a.example/phone", "carol@b.example/laptop"
    alice, how = client("a.example", alice_handle, ["account:alice@a.example", "device:phone"])
    show(f"alice's phone ({how})", alice)
    carol, how = client("b.example", carol_handle, ["account:carol@b.example", "device:laptop"])
    show(f"carol's laptop ({how})", carol)
    alice_key, carol_key = nacl.signing.SigningKey.generate(), nacl.signing.SigningKey.generate()
    uploaded = {}
    for domain, client_id, handle, key in (("a.example", alice, alice_handle, alice_key),
                                           ("b.example", carol, carol_handle, carol_key)):
        queue_id = queue(domain, client_id)
        refs, pool = upload(domain, client_id, queue_id, handle, key)
        uploaded[domain] = refs
        show(f"{handle}: queue {queue_id}, uploaded KeyPackages (refs)", [r[:16] + "…" for r in refs])
        show(f"{handle}: KeyPackages available to claim", pool)

    step("2. b.example's application finds Alice on a.example and claims a KeyPackage")
    apps = api("b.example", "GET", "apps", {"domain": "a.example"})["apps"]
    show("a.example's federating applications (list-apps)", [(a["appId"], a["name"]) for a in apps])
    check(any(a["appId"] == a_app for a in apps), "a.example does not list chat-a", apps)
    found = api("b.example", "GET", f"apps/{b_app}/clients",
                {"tag": "account:alice@a.example", "domain": "a.example", "app": a_app})["identities"]
    show("clients tagged account:alice@a.example (list-clients)",
         [(c["clientId"], unb64(c["clientIdentity"]).decode()) for c in found])
    check(alice in [c["clientId"] for c in found], "a.example does not list Alice's phone", found)
    key_package, final = claim(alice, carol)
    claimed_ref = ref_of(key_package)
    credential = parse_key_package_message(key_package).credential.identity.decode()
    note = "uploaded above" if claimed_ref in uploaded["a.example"] else "Carol has held it since an earlier run"
    show(f"claimed for Carol (claim-key-package; {note})",
         {"ref": claimed_ref[:16] + "…", "credential": credential, "isFinalKey": final})
    again, _ = claim(alice, carol)
    check(again == key_package, "a second claim by the same receiver gave another KeyPackage")
    show("claimed again: the same KeyPackage", ref_of(again) == claimed_ref)

    step("3. Carol creates a group and adds Alice: commit epoch 0 -> 1 with a Welcome")
    group_bytes = secrets.token_bytes(16)
    created = api("b.example", "PUT", f"apps/{b_app}/groups",
                  body={"groupInfo": b64(make_group_info(carol_key, group_id=group_bytes, epoch=0))})
    group = created["groupId"]
    show("group created", created)
    add = encode_proposal_by_value(encode_add_proposal(parse_key_package_message(key_package).raw))
    commit = make_public_commit(group_id=group_bytes, epoch=0, proposals=[add])
    welcome = make_welcome(cipher_suite=SUITE, key_package_refs=[bytes.fromhex(claimed_ref)])
    committed = api("b.example", "PUT", f"apps/{b_app}/groups/{group}/epochs",
                    body={"commitPacket": b64(commit), "welcomePacket": b64(welcome),
                          "groupInfo": b64(make_group_info(carol_key, group_id=group_bytes, epoch=1))})
    show("committed (b.example sent the Welcome to a.example: deliver-welcome)", committed)
    check(committed["epoch"] == 1 and {"domain": "a.example", "clientId": alice} in committed["welcomed"],
          "the commit did not welcome Alice's phone on a.example", committed)
    inbox = api("a.example", "GET", f"apps/{a_app}/clients/{alice}/welcome-msgs")["welcomeMessages"]
    mine = [w for w in inbox if w["groupId"] == group]
    check(len(mine) == 1 and unb64(mine[0]["welcomePacket"]) == welcome,
          "Alice's phone did not get the Welcome once", inbox)
    show("Alice's Welcome messages on a.example, for this group",
         [{k: w[k] for k in ("domain", "groupId", "epoch")} for w in mine])
    show("it is the Welcome Carol sent", unb64(mine[0]["welcomePacket"]) == welcome)
    info = api("a.example", "GET", f"apps/{a_app}/groups/{group}/group-info", {"domain": "b.example", "app": b_app})
    show("the group's info, read by a.example's application (group-info)",
         {"groupId": info["groupId"], "epoch": info["epoch"]})

    step("4. a stale commit, and the next claim")
    status, refused = request("b.example", "PUT", f"apps/{b_app}/groups/{group}/epochs",
                              body={"commitPacket": b64(make_public_commit(group_id=group_bytes, epoch=0))})
    check(status == 409 and refused.get("label") == "stale-epoch" and refused.get("data") == {"currentEpoch": 1},
          f"a commit for epoch 0 of a group at epoch 1 got HTTP {status}", refused)
    show(f"another commit for epoch 0: HTTP {status}", {k: refused[k] for k in ("label", "data")})
    third, _ = claim(alice, carol)
    third_ref = ref_of(third)
    check(third_ref != claimed_ref, "the Welcome did not consume the claimed KeyPackage")
    show("claimed for Carol again: another KeyPackage (the Welcome consumed the first)",
         {"ref": third_ref[:16] + "…", "credential": parse_key_package_message(third).credential.identity.decode()})
    print("\nthe cross-gateway flow completed", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--once", action="store_true", help="stop after playing the flow")
    args = parser.parse_args()

    make_pki(os.path.join(VAR, "pki"), ["fed.a.example", "fed.b.example"])
    make_tokens()
    configs = {domain: os.path.join(HERE, f"{domain}.toml") for domain in OUTWARD}
    check_configs(configs.values())
    with Processes(VAR) as processes:
        for domain, config in configs.items():
            log = processes.twistd(f"{domain}/fedserver", "fedserver", "--config", config,
                                   ports=[INWARD[domain], OUTWARD[domain]])
            print(f"{domain}: inward 127.0.0.1:{INWARD[domain]}, outward 127.0.0.1:{OUTWARD[domain]}; "
                  f"log {os.path.relpath(log)}")
        play()
        if not args.once:
            processes.serve_until_stopped(
                "Both gateways are running; try for example:\n"
                f"  curl -s -H \"Authorization: Bearer $(cat {os.path.relpath(APPS['a.example'][1])})\" "
                f"'http://127.0.0.1:{OUTWARD['a.example']}/mimi/apps?domain=b.example'"
            )


if __name__ == "__main__":
    main()
