"""
The Matrix benchmarks of issue 5, in one run on 127.0.0.1.

    python bench/matrix.py [--seconds 10] [--warmup 2] [--connections 32] [--threads 1]
                           [--objects 2000] [--rounds 15] [--only verify|keyserver]
                           [--synapse-python PATH] [--profile] [--json FILE] [--keep]

Run it with the Python fedserver is installed in.  Two parts:

- C{verify} (in this process): N requests signed with a real Ed25519 key
  (a third each: a profile query, an event fetch, a transaction carrying a
  to-device EDU).  The same loop, best of several rounds, runs (a) raw
  C{signedjson.sign.verify_signed_json} over their signed JSON objects and
  (b) fedserver's whole inbound authentication of the same requests as
  C{InboundRequest}s: C{MatrixSignatureAuthenticator.authenticate} with a
  keyring that already holds the origin's key (Authorization header
  parsing, the destination check, the body's JSON, the signed object,
  the key lookup, the signature check).  Target: (b) >= 0.8 x (a).
- C{keyserver}: wrk loads C{GET /_matrix/key/v2/server} over TLS, first on
  fedserver's inward listener (C{twistd -n fedserver}, authenticator
  C{matrix-signature}), then on a Synapse federation listener (Synapse from
  PyPI in its own virtualenv, the one the interop tests build and cache),
  logging at INFO as the interop tests run it (C{synapse}: one access log
  line per request) and at WARNING (C{synapse-quiet}, for information);
  same wrk settings, one server running at a time.  Target: fedserver >=
  2 x C{synapse}'s requests/s.

Prints a table and one PASS/FAIL line per target; writes the same as JSON to
bench/results/matrix-latest.json (and --json FILE).  Exits 0 when the
measurements ran, whatever the targets say, 1 when a part could not run,
2 when wrk is missing.  Every process it starts is stopped before it exits,
also on Ctrl-C.
"""

from __future__ import annotations

import argparse
import cProfile
import http.client
import json
import os
import pstats
import shutil
import socket
import ssl
import subprocess
import sys
import time
from importlib import metadata
from typing import Any, Callable, Dict, List, Optional, Sequence

from run import (
    WRK_TIMEOUT,
    Processes,
    ScenarioError,
    add_output_arguments,
    cpu_seconds,
    finish,
    free_port,
    interrupted_exit,
    machine,
    not_installed,
    now,
    peak_rss_mb,
    run_wrk,
    start_fedserver,
    start_work,
    wind_down,
    wrk_cells,
    wrk_missing,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KEY_PATH = "/_matrix/key/v2/server"
#: the issue 5 targets
MIN_VERIFY_RATIO, MIN_KEYSERVER_SPEEDUP = 0.8, 2.0
#: seconds: building the Synapse virtualenv (first time), Synapse answering, one check request
SYNAPSE_BUILD_WAIT, SYNAPSE_START_WAIT, CHECK_WAIT = 1500.0, 90.0, 10.0
#: the origin and destination of the signed requests of the verification part
ORIGIN, DESTINATION = "origin.example:8448", "localhost:8448"
PARTS = ("verify", "keyserver")


# verification, in process

def signed_requests(count: int, signing_key: Any) -> List[Any]:
    """
    C{count} requests from L{ORIGIN} to L{DESTINATION}, each as
    C{(signed JSON object, InboundRequest)}: the object carries the
    signature, the request carries it in its C{Authorization} header.
    """
    from fedserver.values import InboundRequest
    from fedserver_matrix.xmatrix import format_authorization, request_json, request_uri, sign_request

    made = []
    for i in range(count):
        content: Any = None
        query = ""
        if i % 3 == 0:
            method, path = "GET", "/_matrix/federation/v1/query/profile"
            query = f"user_id=%40user{i}%3Alocalhost%3A8448&field=displayname"
        elif i % 3 == 1:
            method, path = "GET", f"/_matrix/federation/v1/event/%24{i:08d}QuRsPvXxZmKtHbNnYwEaLcDdFfGgJjSs"
        else:
            method, path = "PUT", f"/_matrix/federation/v1/send/{1_700_000_000_000 + i}"
            content = {"origin": ORIGIN, "origin_server_ts": 1_700_000_000_000 + i, "pdus": [], "edus": [{
                "edu_type": "m.direct_to_device",
                "content": {"sender": f"@user{i}:{ORIGIN}", "type": "m.room_key_request", "message_id": f"m{i}",
                            "messages": {"@bob:localhost:8448": {"*": {
                                "action": "request", "request_id": f"r{i}", "requesting_device_id": "QWERTYUIOP",
                                "body": {"algorithm": "m.megolm.v1.aes-sha2", "room_id": "!room:origin.example",
                                         "sender_key": "S" * 43, "session_id": "X" * 43}}}}},
            }]}
        uri = request_uri(path, query)
        authorization = sign_request(signing_key, ORIGIN, DESTINATION, method, uri, content)
        signed = request_json(method, uri, ORIGIN, DESTINATION, content)
        signed["signatures"] = {ORIGIN: {authorization.key: authorization.sig}}
        body = b"" if content is None else json.dumps(content).encode()
        headers = [("Authorization", format_authorization(authorization)), ("Content-Type", "application/json")]
        made.append((signed, InboundRequest(method=method, path=path, query=query, headers=headers, body=body)))
    return made


def authenticator_with_origin_key(origin_key: Any) -> Any:
    """
    fedserver's authenticator for L{DESTINATION}, its keyring holding the
    origin's key: fetched once, as in production, from a stand-in network
    that answers the origin's self-signed keys document.
    """
    from twisted.internet import defer
    from twisted.internet.task import Clock

    from fedserver.values import Response, Target
    from fedserver_matrix.authenticator import MatrixSignatureAuthenticator
    from fedserver_matrix.keyring import Keyring
    from fedserver_matrix.keys import generate_signing_key, server_keys_document

    clock = Clock()
    clock.advance(time.time())

    class Discovery:
        def discover(self, domain: str) -> Any:
            return defer.succeed([Target(infra_domain="origin.example", host="127.0.0.1", port=8448)])

    class Network:
        def send(self, target: Any, request: Any) -> Any:
            document = server_keys_document(ORIGIN, [origin_key], int((clock.seconds() + 86400) * 1000))
            return defer.succeed(Response(200, [("Content-Type", "application/json")], json.dumps(document).encode()))

    authenticator = MatrixSignatureAuthenticator(server_name=DESTINATION, signing_keys=[generate_signing_key("d1")],
                                                 clock=clock)
    authenticator.keyring = Keyring(clock=clock, discovery=Discovery(), client=Network())
    return authenticator


def _authenticated(deferred: Any) -> Any:
    """The result of a Deferred that has fired; raises its failure."""
    results: List[Any] = []
    deferred.addBoth(results.append)
    if not results:
        raise RuntimeError("the authentication did not complete synchronously")
    if hasattr(results[0], "raiseException"):
        results[0].raiseException()
    return results[0]


def measure_verify(args: argparse.Namespace) -> Dict[str, Any]:
    from signedjson.key import get_verify_key
    from signedjson.sign import SignatureVerifyException, verify_signed_json

    from fedserver.values import InboundRequest, Peer
    from fedserver_matrix.keys import generate_signing_key
    from fedserver_matrix.xmatrix import XMatrixError

    origin_key = generate_signing_key("o1")
    verify_key = get_verify_key(origin_key)
    pairs = signed_requests(args.objects, origin_key)
    objects = [signed for signed, _ in pairs]
    requests = [request for _, request in pairs]
    authenticator = authenticator_with_origin_key(origin_key)
    authenticate = authenticator.authenticate

    # both sides must accept every request, and fedserver must refuse a forgery
    for signed, request in pairs:
        verify_signed_json(signed, ORIGIN, verify_key)
        peer = _authenticated(authenticate(request))
        if peer.claimed_domain != ORIGIN or not peer.domain_proven:
            raise ScenarioError(f"fedserver authenticated {request.method} {request.path} as {peer}")
    forged = requests[2]
    forged = InboundRequest(forged.method, forged.path, forged.query, forged.headers, forged.body.replace(b"r", b"R"))
    try:
        _authenticated(authenticate(forged))
    except XMatrixError as e:
        if e.matrix_label != "bad-signature":
            raise ScenarioError(f"a forged request was refused as {e.matrix_label}, not bad-signature") from None
    else:
        raise ScenarioError("fedserver accepted a request whose body was altered after signing")
    try:
        verify_signed_json({**objects[2], "uri": "/elsewhere"}, ORIGIN, verify_key)
    except SignatureVerifyException:
        pass
    else:
        raise ScenarioError("signedjson accepted an altered object")

    def raw() -> None:
        for signed in objects:
            verify_signed_json(signed, ORIGIN, verify_key)

    def fedserver() -> None:
        for request in requests:
            if authenticate(request).result.__class__ is not Peer:
                raise ScenarioError("an authentication failed or did not complete synchronously")

    times: Dict[str, List[float]] = {"raw": [], "fedserver": []}
    for _ in range(args.rounds):  # interleaved, so that a busy moment of the machine hits both
        for name, loop in (("raw", raw), ("fedserver", fedserver)):
            started = time.perf_counter()
            loop()
            times[name].append(time.perf_counter() - started)
    result: Dict[str, Any] = {"objects": args.objects, "rounds": args.rounds,
                              "body_bytes": sorted({len(r.body) for r in requests})}
    for name, seconds in times.items():
        best = min(seconds)
        result[name] = {"ops_per_s": args.objects / best, "us_per_op": best * 1e6 / args.objects,
                        "rounds_ops_per_s": [round(args.objects / s) for s in seconds]}
    result["ratio"] = result["fedserver"]["ops_per_s"] / result["raw"]["ops_per_s"]
    if args.profile or result["ratio"] < MIN_VERIFY_RATIO:
        result["profile"] = profile(fedserver)
    return result


def profile(loop: Callable[[], None], top: int = 12) -> List[Dict[str, Any]]:
    """The functions the loop spends most time in (their own time), with their share of the loop's."""
    profiler = cProfile.Profile()
    profiler.runcall(loop)
    stats = pstats.Stats(profiler)
    total = stats.total_tt  # type: ignore[attr-defined]
    rows = []
    for (file, line, function), (_, calls, own, cumulative, _) in stats.stats.items():  # type: ignore[attr-defined]
        where = function if file == "~" else f"{_short(file)}:{line}({function})"
        rows.append({"function": where, "calls": calls, "own_share": own / total,
                     "cumulative_share": cumulative / total})
    rows.sort(key=lambda row: row["own_share"], reverse=True)
    return rows[:top]


def _short(path: str) -> str:
    for marker in ("site-packages/", "plugins/", "lib/python3"):
        if marker in path:
            return path.split(marker, 1)[1]
    return os.path.basename(path)


# the key servers, under load

def get_document(port: int, ca_path: str) -> bytes:
    """C{GET /_matrix/key/v2/server} over TLS to 127.0.0.1, the certificate checked for C{localhost}."""
    context = ssl.create_default_context(cafile=ca_path)
    with socket.create_connection(("127.0.0.1", port), timeout=CHECK_WAIT) as raw, \
            context.wrap_socket(raw, server_hostname="localhost") as tls:
        tls.sendall(f"GET {KEY_PATH} HTTP/1.1\r\nHost: localhost:{port}\r\nConnection: close\r\n\r\n".encode())
        response = http.client.HTTPResponse(tls)
        response.begin()
        body = response.read()
    if response.status != 200:
        raise ScenarioError(f"GET {KEY_PATH} answered {response.status} {body[:300]!r}")
    return body


def check_document(port: int, ca_path: str, server_name: str) -> int:
    """The answer must be the self-signed keys document of C{server_name}; its size."""
    from fedserver_matrix.keyring import KeyResponseError, keys_from_response

    body = get_document(port, ca_path)
    try:
        keys_from_response(server_name, json.loads(body), int(time.time() * 1000))
    except (ValueError, KeyResponseError) as e:
        raise ScenarioError(f"GET {KEY_PATH} did not answer the keys of {server_name}: {e}") from None
    return len(body)


def _wait_until(check: Callable[[], Any], process: subprocess.Popen, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        try:
            return check()
        except (OSError, ScenarioError) as e:
            last = e
        if process.poll() is not None:
            raise ScenarioError(f"{what} exited with code {process.returncode} (last: {last})")
        if time.monotonic() > deadline:
            raise ScenarioError(f"{what} does not answer {KEY_PATH} after {timeout:.0f} s (last: {last})")
        time.sleep(0.2)


class KeyServers:
    """The work folder, the CA, and how each key server starts (answering on 127.0.0.1 over TLS)."""

    def __init__(self, workdir: str, processes: Processes, args: argparse.Namespace) -> None:
        from fedserver.pki import issue, make_ca, write_issued

        self.workdir = workdir
        self.processes = processes
        self.args = args
        self.synapse_python: Optional[str] = None
        self.synapse_error: Optional[str] = None
        pki = os.path.join(workdir, "pki")
        os.makedirs(pki)
        ca = make_ca("fedserver matrix bench CA")
        self.ca_path, _ = write_issued(pki, "ca", ca)
        self.certificate, self.private_key = write_issued(pki, "localhost", issue(ca, ["localhost"]), chain=[ca])
        self.wrk_script = os.path.join(workdir, "get.lua")
        with open(self.wrk_script, "w") as f:
            f.write('wrk.method = "GET"\n')

    def fedserver(self, name: str) -> Dict[str, Any]:
        from fedserver_matrix.keys import generate_signing_key, write_signing_keys

        port = free_port()
        server_name = f"localhost:{port}"
        key_path = os.path.join(self.workdir, "fedserver-signing.key")
        write_signing_keys(key_path, [generate_signing_key("bench1")])
        config = {
            "server": {"backend_domain": "localhost", "infra_domain": "localhost",
                       "data_dir": os.path.join(self.workdir, "var", name)},
            "inward": {"listen": f"tcp:{port}:interface=127.0.0.1"},
            "tls": {"certificate": self.certificate, "private_key": self.private_key,
                    "ca_certificates": [self.ca_path]},
            "discovery": {"plugin": "matrix"},
            "authenticator": {"plugin": "matrix-signature", "server_name": server_name, "signing_key": key_path},
            "authorizers": [{"plugin": "allow-list", "allow_all": True}],
        }
        process = start_fedserver(self.processes, name, config, [port])
        return {"process": process, "port": port, "server_name": server_name}

    def synapse(self, name: str, log_level: str = "INFO") -> Dict[str, Any]:
        """Synapse as the interop tests run it: its own virtualenv, a federation listener with TLS, SQLite."""
        from fedserver_matrix.keys import generate_signing_key, write_signing_keys

        if self.synapse_error is not None:  # not tried twice: building it may take minutes
            raise ScenarioError(self.synapse_error)
        if self.synapse_python is None:
            try:
                self.synapse_python = self.args.synapse_python or synapse_python()
            except ScenarioError as e:
                self.synapse_error = str(e)
                raise
        python = self.synapse_python
        port = free_port()
        server_name = f"localhost:{port}"
        directory = os.path.join(self.workdir, name)
        os.makedirs(directory)
        key_path = os.path.join(directory, "signing.key")
        write_signing_keys(key_path, [generate_signing_key("a_bnch")])  # Synapse's format
        log_config = os.path.join(directory, "log.yaml")
        write_json(log_config, {
            "version": 1,
            "formatters": {"precise": {"format": "%(asctime)s - %(name)s - %(lineno)d - %(levelname)s - "
                                                 "%(request)s - %(message)s"}},
            "handlers": {"file": {"class": "logging.FileHandler", "formatter": "precise",
                                  "filename": self.processes.log_path(name, "log"), "encoding": "utf8"}},
            "root": {"level": log_level, "handlers": ["file"]},
            "disable_existing_loggers": False,
        })
        config = os.path.join(directory, "homeserver.yaml")
        write_json(config, {  # JSON is YAML
            "server_name": server_name,
            "pid_file": os.path.join(directory, "homeserver.pid"),
            "listeners": [{"port": port, "bind_addresses": ["127.0.0.1"], "type": "http", "tls": True,
                           "x_forwarded": False, "resources": [{"names": ["federation"], "compress": False}]}],
            "tls_certificate_path": self.certificate,
            "tls_private_key_path": self.private_key,
            "federation_custom_ca_list": [self.ca_path],
            "ip_range_whitelist": ["127.0.0.0/8"],
            "trusted_key_servers": [],
            "suppress_key_server_warning": True,
            "signing_key_path": key_path,
            "database": {"name": "sqlite3", "args": {"database": os.path.join(directory, "homeserver.db")}},
            "media_store_path": os.path.join(directory, "media_store"),
            "log_config": log_config,
            "report_stats": False,
            "enable_metrics": False,
            "url_preview_enabled": False,
            "presence": {"enabled": False},
            "rc_federation": {"window_size": 1000, "sleep_limit": 10000, "sleep_delay": 1,
                              "reject_limit": 10000, "concurrent": 1000},
        })
        argv = [python, "-m", "synapse.app.homeserver", "-c", config]
        process = self.processes.start(name, argv, [port], env=clean_env(), timeout=SYNAPSE_START_WAIT)
        return {"process": process, "port": port, "server_name": server_name}


def write_json(path: str, document: Dict[str, Any]) -> None:
    with open(path, "w") as f:
        json.dump(document, f, indent=2)
        f.write("\n")


def clean_env() -> Dict[str, str]:
    """Our environment without what would mix our interpreter's packages into Synapse's."""
    return {k: v for k, v in os.environ.items()
            if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONSTARTUP", "PYTHONSAFEPATH")}


def synapse_python() -> str:
    """
    The Python of the Synapse virtualenv of the interop tests (pinned
    Synapse, cached under ~/.cache/fedserver-tests), built the first time
    by their own builder, run in a child process so that bench/ imports
    nothing from tests/.
    """
    code = ("import sys; sys.path.insert(0, sys.argv[1]); "
            "from tests.integration.synapse import ensure_synapse; print(ensure_synapse())")
    try:
        done = subprocess.run([sys.executable, "-c", code, ROOT], cwd=ROOT, stdin=subprocess.DEVNULL,
                              stdout=subprocess.PIPE, text=True, timeout=SYNAPSE_BUILD_WAIT)
    except subprocess.TimeoutExpired:
        raise ScenarioError(f"the Synapse virtualenv was not ready within {SYNAPSE_BUILD_WAIT:.0f} s") from None
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        raise ScenarioError(f"the Synapse virtualenv cannot be built (exit code {done.returncode}; "
                            "its reason is above); or pass --synapse-python")
    return lines[-1]


def versions(python: str, code: str, env: Optional[Dict[str, str]] = None) -> str:
    try:
        done = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=60, env=env)
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    return done.stdout.strip() or "?"


#: name -> (what it is, how it starts)
KEYSERVERS: Dict[str, Any] = {
    "fedserver": ("twistd -n fedserver, inward listener, matrix-signature", KeyServers.fedserver),
    "synapse": ("Synapse federation listener, log level INFO (one access line per request)", KeyServers.synapse),
    "synapse-quiet": ("the same, log level WARNING (no access log)",
                      lambda servers, name: servers.synapse(name, "WARNING")),
}


def measure_keyserver(servers: KeyServers, name: str) -> Dict[str, Any]:
    """Start key server C{name}, check its answer, warm it up, load it, stop it."""
    title, start = KEYSERVERS[name]
    started = start(servers, name)
    process = started["process"]
    try:
        size = _wait_until(lambda: check_document(started["port"], servers.ca_path, started["server_name"]),
                           process, SYNAPSE_START_WAIT, name)
        url = f"https://127.0.0.1:{started['port']}{KEY_PATH}"
        args = servers.args
        if args.warmup > 0:
            run_wrk(url, servers.wrk_script, args.warmup, args)
        cpu_before = cpu_seconds(process.pid)
        result = run_wrk(url, servers.wrk_script, args.seconds, args)
        cpu = cpu_seconds(process.pid) - cpu_before
        result["cpu_ms_per_request"] = cpu * 1000 / result["requests"] if result["requests"] else None
        result["peak_rss_mb"] = peak_rss_mb(process.pid)
        result["answer_bytes"] = size
        return {"title": title, "url": url, "server_name": started["server_name"], **result}
    finally:
        servers.processes.stop([process])


# the verdict

def targets(document: Dict[str, Any]) -> List[Dict[str, str]]:
    verdicts = []

    def verdict(target: str, ok: Optional[bool], detail: str) -> None:
        verdicts.append({"target": target, "result": "n/a" if ok is None else "PASS" if ok else "FAIL",
                         "detail": detail})

    verify = document.get("verify", {})
    target = f"inbound X-Matrix verification >= {MIN_VERIFY_RATIO:g} x raw verify_signed_json"
    if "ratio" in verify:
        verdict(target, verify["ratio"] >= MIN_VERIFY_RATIO,
                f"{verify['ratio']:.2f} x ({verify['fedserver']['ops_per_s']:.0f} vs "
                f"{verify['raw']['ops_per_s']:.0f} ops/s)")
    else:
        verdict(target, None, verify.get("error", "not run").splitlines()[0])
    keyservers = document.get("keyserver", {})
    ours, theirs = keyservers.get("fedserver", {}), keyservers.get("synapse", {})
    target = f"{KEY_PATH} req/s >= {MIN_KEYSERVER_SPEEDUP:g} x Synapse"
    if "requests_per_s" in ours and "requests_per_s" in theirs:
        speedup = ours["requests_per_s"] / theirs["requests_per_s"]
        verdict(target, speedup >= MIN_KEYSERVER_SPEEDUP,
                f"{speedup:.2f} x ({ours['requests_per_s']:.0f} vs {theirs['requests_per_s']:.0f} req/s)")
    else:
        why = next((r["error"] for r in (ours, theirs) if "error" in r), "not run")
        verdict(target, None, why.splitlines()[0])
    measured = {name: r for name, r in keyservers.items() if "errors" in r}
    if measured:
        verdict("zero errors (key servers)", all(r["errors"] == 0 for r in measured.values()),
                ", ".join(f"{name} {r['errors']}" for name, r in measured.items()))
    return verdicts


def ratios(keyservers: Dict[str, Dict[str, Any]]) -> Dict[str, Dict[str, float]]:
    """fedserver over each Synapse: requests/s (higher is better) and p99 (lower is better)."""
    found = {}
    ours = keyservers.get("fedserver", {})
    for other in ("synapse", "synapse-quiet"):
        theirs = keyservers.get(other, {})
        if "requests_per_s" in ours and "requests_per_s" in theirs:
            found[f"fedserver/{other}"] = {"requests_per_s": ours["requests_per_s"] / theirs["requests_per_s"],
                                           "p99": ours["latency_ms"]["99"] / theirs["latency_ms"]["99"]}
    return found


def report(document: Dict[str, Any]) -> str:
    settings = document["settings"]
    lines = [f"fedserver matrix bench, {document['machine']['cpus']} CPUs, Python {document['machine']['python']}"]
    verify = document.get("verify")
    if verify is not None:
        lines.append("")
        if "error" in verify:
            lines.append(f"verification could not run: {verify['error'].splitlines()[0]}")
        else:
            lines += [f"verification: {verify['objects']} signed requests (bodies {verify['body_bytes']} bytes), "
                      f"best of {verify['rounds']} rounds",
                      f"{'':<38} {'ops/s':>8} {'us/op':>8}"]
            for key, title in (("raw", "raw signedjson.verify_signed_json"),
                               ("fedserver", "fedserver inbound X-Matrix auth")):
                lines.append(f"{title:<38} {verify[key]['ops_per_s']:>8.0f} {verify[key]['us_per_op']:>8.1f}")
            lines.append(f"{'fedserver/raw':<38} {verify['ratio']:>7.2f} x")
            if "profile" in verify:
                lines.append("profile of the fedserver loop (own time, share of the loop):")
                for row in verify["profile"]:
                    lines.append(f"  {row['own_share'] * 100:5.1f} %  {row['calls']:>7}  {row['function']}")
    keyservers = document.get("keyserver")
    if keyservers is not None:
        lines += ["", f"key server: GET {KEY_PATH} over TLS, wrk {settings['threads']} thread(s), "
                      f"{settings['connections']} connections, {settings['seconds']:g} s after "
                      f"{settings['warmup']:g} s warm-up",
                  f"{'server':<14} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'errors':>7} {'CPU ms/req':>10} "
                  f"{'RSS MB':>7} {'bytes':>6}"]
        for name, r in keyservers.items():
            if "error" in r:
                lines.append(f"{name:<14} could not run: {r['error'].splitlines()[0]}")
                continue
            rss = "-" if r["peak_rss_mb"] is None else f"{r['peak_rss_mb']:.1f}"
            lines.append(f"{name:<14} {wrk_cells(r)} {rss:>7} {r['answer_bytes']:>6}")
        for pair, ratio in document["ratios"].items():
            lines.append(f"{pair:<26} req/s {ratio['requests_per_s']:5.2f} x   p99 {ratio['p99']:5.2f} x")
    lines.append("")
    for v in document["targets"]:
        lines.append(f"{v['result']:<4}  {v['target']}: {v['detail']}")
    return "\n".join(lines)


# the command

def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=10, help="seconds of wrk load per key server (default 10)")
    parser.add_argument("--warmup", type=float, default=2, help="seconds of load before measuring (default 2)")
    parser.add_argument("--connections", type=int, default=32, help="wrk connections (default 32)")
    parser.add_argument("--threads", type=int, default=1, help="wrk threads (default 1: the CPUs go to the servers)")
    parser.add_argument("--objects", type=int, default=2000, help="signed requests to verify (default 2000)")
    parser.add_argument("--rounds", type=int, default=15, help="verification rounds, the best counts (default 15)")
    parser.add_argument("--only", action="append", choices=PARTS, help="run only this part (repeatable)")
    parser.add_argument("--synapse-python", metavar="PATH",
                        help="the Python of a virtualenv with Synapse (default: the interop tests' cached one)")
    parser.add_argument("--profile", action="store_true", help="profile the fedserver verification loop anyway")
    add_output_arguments(parser)
    args = parser.parse_args(argv)
    if (args.seconds <= 0 or args.warmup < 0 or args.threads < 1 or args.connections < args.threads
            or args.objects < 3 or args.rounds < 1):
        parser.error("need --seconds > 0, --warmup >= 0, --connections >= --threads >= 1, --objects >= 3, "
                     "--rounds >= 1")
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    parts = args.only or list(PARTS)
    if "keyserver" in parts and wrk_missing():
        return 2
    try:
        import fedserver_matrix.authenticator  # noqa: F401 - both parts need it
    except ImportError as e:
        return not_installed("fedserver_matrix", e, "matrix.py")

    workdir, processes = start_work("fedserver-matrix-bench-")
    servers: Optional[KeyServers] = None
    document: Dict[str, Any] = {}
    interrupted = False
    try:
        if "verify" in parts:
            print("bench: verify (in process)...", file=sys.stderr, flush=True)
            try:
                document["verify"] = measure_verify(args)
            except ScenarioError as e:
                document["verify"] = {"error": str(e)}
        if "keyserver" in parts:
            servers = KeyServers(workdir, processes, args)
            document["keyserver"] = {}
            for name in KEYSERVERS:
                print(f"bench: keyserver {name}...", file=sys.stderr, flush=True)
                try:
                    document["keyserver"][name] = measure_keyserver(servers, name)
                except ScenarioError as e:
                    print(f"bench: {name} could not run: {e}", file=sys.stderr, flush=True)
                    document["keyserver"][name] = {"error": str(e)}
    except KeyboardInterrupt:
        interrupted = True
    finally:
        wind_down(processes)
    if interrupted:
        return interrupted_exit(workdir)
    failed = "error" in document.get("verify", {}) or any("error" in r for r in document.get("keyserver", {}).values())

    synapse_python_used = servers.synapse_python if servers is not None else None
    document = {
        "when": now(),
        "machine": machine() if shutil.which("wrk") else {"cpus": os.cpu_count(), "python": sys.version.split()[0]},
        "software": {
            **{name: metadata.version(name) for name in ("Twisted", "pyOpenSSL", "signedjson", "canonicaljson",
                                                         "PyNaCl")},
            "synapse": (versions(synapse_python_used, "import synapse, twisted; "
                                 "print('synapse', synapse.__version__, 'twisted', twisted.__version__)",
                                 clean_env()) if synapse_python_used else None),
        },
        "settings": {"seconds": args.seconds, "warmup": args.warmup, "connections": args.connections,
                     "threads": args.threads, "wrk_timeout": WRK_TIMEOUT, "objects": args.objects,
                     "rounds": args.rounds},
        **document,
        "work_folder": workdir if (failed or args.keep) else None,
    }
    document["ratios"] = ratios(document.get("keyserver", {}))
    document["targets"] = targets(document)
    print(report(document))
    return finish(document, "matrix-latest.json", args, workdir, failed)


if __name__ == "__main__":
    sys.exit(main())
