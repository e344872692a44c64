"""
The MIMI gateway benchmark: KeyPackage claims and client registrations per
second over HTTP on SQLite, in one run on 127.0.0.1.

    python bench/mimi.py [--duration 10] [--warmup 2] [--connections 32] [--threads 1]
                         [--key-packages 40000] [--only SCENARIO ...] [--profile]
                         [--baseline DIR] [--json FILE] [--keep]

Run it with the Python fedserver is installed in.  It needs wrk
(C{apt-get install -y wrk}); C{--profile} needs py-spy in the same
environment.  It installs nothing itself.

One C{twistd -n fedserver} runs the gateway (C{[components.mimi]}, one
application declared with a token file, identity provider C{basic}, the
store in its data folder: SQLite, WAL, C{synchronous=FULL}).  Before the load
the bench registers a target client, gives it a queue and fills it with
C{--key-packages} real KeyPackages (L{fedserver_mimi.encode.make_key_package},
uploaded 100 per C{PATCH}, each checked by the gateway), and registers as
many receiver clients; it reports how fast each step went.  Then wrk loads,
one scenario after the other, on the outward listener with the
application's bearer token:

- C{app}: C{GET /mimi/apps/{app}}, an authenticated read that touches no
  table: the ceiling of the internal API on this machine;
- C{claim-new}: C{GET .../clients/{target}/keyPackage} with a receiver that
  has not claimed yet on every request, so each one takes a KeyPackage;
- C{claim-same}: the same with one receiver on every request, which gets the
  KeyPackage it already holds (the idempotent path);
- C{register}: C{POST /mimi/apps/{app}/clients} with a new handle on every
  request.

After the claims it checks, against the SQLite file, that every KeyPackage
answered went to one receiver only, that the database holds exactly the
claims answered (plus those still in flight when wrk stopped, at most one
per connection and run) and that every receiver holds at most one; after the
registrations, that the database holds exactly the clients answered (plus
those in flight).

C{--baseline DIR} also starts the same gateway from another source tree
(DIR holding C{fedserver/} and C{plugins/}, e.g. a worktree of an earlier
commit) and runs every scenario on both, alternating, to compare a change
within one run.

Prints a table, ratios, the setup rates and PASS/FAIL lines (the issue's
goal: C{claim-new} >= 1,000 claims/s; zero errors; the checks); writes the
same as JSON to bench/results/mimi-latest.json (and --json FILE).  Exits 0
when everything ran and the checks pass, whatever the goal says; 1 when a
scenario could not run or a check failed; 2 when wrk (or py-spy for
--profile) is missing.  Every process it starts is stopped before it exits,
also on Ctrl-C.
"""

from __future__ import annotations

import argparse
import base64
import collections
import concurrent.futures
import http.client
import json
import os
import secrets
import sqlite3
import subprocess
import sys
import threading
import time
from importlib import metadata
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

from run import (
    WRK_TIMEOUT,
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
    peak_rss_mb,
    py_spy_missing,
    record_profile,
    run_wrk,
    start_fedserver,
    start_work,
    wind_down,
    wrk_cells,
    wrk_missing,
)

BACKEND, INFRA = "b.example", "fed.b.example"
APP_ID = "0b5e2c1e-6a47-4d1c-9a3e-5f4c8d2b7a10"
#: the queue the target client's KeyPackages go to
VERSION, SUITE = 1, 1
TARGET_HANDLE = b"bench-target"
#: KeyPackages per PATCH (the gateway's default key_packages_per_upload)
UPLOAD_BATCH = 100
#: concurrent connections of the bench's own setup requests
SETUP_CONNECTIONS = 8
#: seconds: one setup request, the wait for in-flight requests to settle after wrk stops
REQUEST_WAIT, SETTLE = 60.0, 1.0
#: the issue's goal
MIN_CLAIMS_PER_S = 1000.0

SCENARIOS = {
    "app": "GET /mimi/apps/{app}: authenticated, no table read",
    "claim-new": "GET .../keyPackage, a new receiver each request: one KeyPackage taken",
    "claim-same": "GET .../keyPackage, one receiver every request: the one it holds",
    "register": "POST /mimi/apps/{app}/clients, a new handle each request",
}


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


# the bench's own HTTP client, for the setup and the checks

class API:
    """JSON requests to the internal interface, one keep-alive connection per thread."""

    def __init__(self, port: int, token: str) -> None:
        self.port = port
        self.headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
        self._local = threading.local()

    def call(self, method: str, path: str, body: Any = None, expect: Sequence[int] = (200, 201)) -> Any:
        data = None if body is None else json.dumps(body).encode()
        for attempt in (1, 2):  # once more on a fresh connection if the kept one was closed
            connection = getattr(self._local, "connection", None)
            if connection is None:
                connection = self._local.connection = http.client.HTTPConnection("127.0.0.1", self.port,
                                                                                  timeout=REQUEST_WAIT)
            try:
                connection.request(method, path, body=data, headers=self.headers)
                response = connection.getresponse()
                answer = response.read()
                break
            except (http.client.HTTPException, ConnectionError) as e:
                connection.close()
                self._local.connection = None
                if attempt == 2:
                    raise ScenarioError(f"{method} {path} failed: {e}") from None
            except OSError as e:
                connection.close()
                self._local.connection = None
                raise ScenarioError(f"{method} {path} failed: {e}") from None
        if response.status not in expect:
            raise ScenarioError(f"{method} {path} answered {response.status}: {answer[:300]!r}")
        return json.loads(answer)


def _generate(seed: bytes, count: int, not_before: int, not_after: int) -> List[bytes]:
    import nacl.signing

    from fedserver_mimi.encode import make_key_package

    key = nacl.signing.SigningKey(seed)
    return [make_key_package(key, identity=TARGET_HANDLE, not_before=not_before, not_after=not_after)
            for _ in range(count)]


def generate_key_packages(count: int) -> Tuple[List[bytes], float]:
    """C{count} KeyPackages of the target client (one signing key), made on every CPU; and the seconds it took."""
    started = time.perf_counter()
    now = int(time.time())
    seed = secrets.token_bytes(32)
    workers = os.cpu_count() or 1
    chunks = [count // workers + (1 if i < count % workers else 0) for i in range(workers)]
    with concurrent.futures.ProcessPoolExecutor(workers) as pool:
        parts = pool.map(_generate, [seed] * workers, chunks, [now - 3600] * workers, [now + 30 * 86400] * workers)
        made = [kp for part in parts for kp in part]
    return made, time.perf_counter() - started


def in_parallel(work: Any, items: Sequence[Any], connections: int) -> List[Any]:
    with concurrent.futures.ThreadPoolExecutor(connections) as pool:
        return list(pool.map(work, items))


# one gateway

class Gateway:
    """A running gateway (its process, ports, database) with its target client, queue and receivers."""

    def __init__(self, processes: Processes, label: str, env: Optional[Dict[str, str]],
                 args: argparse.Namespace) -> None:
        from fedserver.pki import create_dev_pki

        self.label = label
        self.workdir = workdir = processes.workdir
        pki = os.path.join(workdir, "pki")
        create_dev_pki(pki, [INFRA])  # reuses the CA when a second gateway is made
        self.token = secrets.token_urlsafe(32)
        token_file = os.path.join(workdir, f"{label}.token")
        with open(token_file, "w") as f:
            f.write(self.token + "\n")
        data_dir = os.path.join(workdir, "var", label)
        self.database = os.path.join(data_dir, "fedserver.sqlite")
        self.port, inward = free_port(), free_port()
        config = {
            "server": {"backend_domain": BACKEND, "infra_domain": INFRA, "data_dir": data_dir},
            "inward": {"listen": f"tcp:{inward}:interface=127.0.0.1"},
            "outward": {"listen": f"tcp:{self.port}:interface=127.0.0.1"},
            "tls": {"certificate": os.path.join(pki, f"{INFRA}.pem"), "private_key": os.path.join(pki, f"{INFRA}.key"),
                    "ca_certificates": [os.path.join(pki, "ca.pem")]},
            "discovery": {"plugin": "static"},
            "authenticator": {"plugin": "mtls"},
            "authorizers": [{"plugin": "allow-list", "allow_all": True}],
            "identity_providers": {"handles": {"plugin": "basic"}},
            "components": {"mimi": {
                "plugin": "mimi-gateway",
                "key_packages_per_upload": UPLOAD_BATCH,
                "key_packages_per_queue": max(1000, args.key_packages),
                "apps": [{"id": APP_ID, "name": "bench", "identity_provider": "handles", "token_file": token_file}],
            }},
        }
        self.process = start_fedserver(processes, label, config, [self.port, inward], env=env)
        self.api = API(self.port, self.token)
        self.app_path = f"/mimi/apps/{APP_ID}"
        self.receivers: List[str] = []
        self.same_receiver = ""
        self.claim_path = ""
        #: keyPackage (base64) of every claim-new answer 200 seen, and how many answers the claim runs saw
        self.claimed_answers: List[str] = []
        self.claims_in_flight_allowed = 0
        self.same_answers: List[str] = []

    def setup(self, key_packages: List[bytes], args: argparse.Namespace) -> Dict[str, Any]:
        """Register the target client, fill its queue, register the receivers; how fast each went."""
        api = self.api
        target = api.call("POST", f"{self.app_path}/clients", {"clientHandle": b64(TARGET_HANDLE)})["clientId"]
        queue = api.call("POST", f"{self.app_path}/clients/{target}/queues",
                         {"protocolVersion": VERSION, "cipherSuite": SUITE})["queueId"]
        self.claim_path = (f"{self.app_path}/clients/{target}/keyPackage?protocolVersion={VERSION}"
                           f"&cipherSuite={SUITE}&receiverClientId=")
        batches = [key_packages[i:i + UPLOAD_BATCH] for i in range(0, len(key_packages), UPLOAD_BATCH)]
        started = time.perf_counter()
        cpu = cpu_seconds(self.process.pid)
        pools = in_parallel(lambda batch: api.call("PATCH", f"{self.app_path}/clients/{target}/queues/{queue}",
                                                   {"keyPackages": [b64(kp) for kp in batch]}), batches,
                            SETUP_CONNECTIONS)
        upload_s, upload_cpu = time.perf_counter() - started, cpu_seconds(self.process.pid) - cpu
        in_pool = api.call("GET", f"{self.app_path}/clients/{target}/queues")["queues"][0]["keyPackagesInPool"]
        if in_pool != len(key_packages) or max(p["keyPackagesInPool"] for p in pools) != len(key_packages):
            raise ScenarioError(f"{len(key_packages)} KeyPackages were uploaded but the queue holds {in_pool}")

        started = time.perf_counter()
        cpu = cpu_seconds(self.process.pid)
        self.receivers = in_parallel(
            lambda i: api.call("POST", f"{self.app_path}/clients",
                               {"clientHandle": b64(b"receiver-%d" % i)})["clientId"],
            range(len(key_packages)), SETUP_CONNECTIONS)
        register_s, register_cpu = time.perf_counter() - started, cpu_seconds(self.process.pid) - cpu
        self.same_receiver = self.receivers.pop()
        # the first claim of the idempotent scenario's receiver takes its KeyPackage; later ones get it again
        self.same_answers.append(self.claim(self.same_receiver))
        return {
            "key_packages": len(key_packages),
            "upload_s": upload_s, "upload_per_s": len(key_packages) / upload_s,
            "upload_cpu_ms_per_key_package": upload_cpu * 1000 / len(key_packages),
            "receivers": len(self.receivers) + 1,
            "register_s": register_s, "register_per_s": (len(self.receivers) + 1) / register_s,
            "register_cpu_ms_per_client": register_cpu * 1000 / (len(self.receivers) + 1),
        }

    def claim(self, receiver: str) -> str:
        answer = self.api.call("GET", self.claim_path + receiver, expect=(200,))
        if answer.get("isFinalKey") is not False or not isinstance(answer.get("keyPackage"), str):
            raise ScenarioError(f"a claim answered {str(answer)[:300]}")
        return answer["keyPackage"]

    # the database, read-only

    def query(self, sql: str, params: Sequence[Any] = ()) -> List[Tuple]:
        connection = sqlite3.connect(f"file:{self.database}?mode=ro", uri=True, timeout=30)
        try:
            return connection.execute(sql, tuple(params)).fetchall()
        finally:
            connection.close()

    def claims_by_receiver(self) -> Dict[str, List[str]]:
        """receiver (domain/id) -> the KeyPackages (base64) it holds, from the database."""
        held: Dict[str, List[str]] = collections.defaultdict(list)
        for receiver, data in self.query("SELECT claimed_by, data FROM mimi_key_packages WHERE claimed_by IS NOT NULL"):
            held[receiver].append(b64(bytes(data)))
        return held

    def unclaimed_receivers(self) -> List[str]:
        held = self.claims_by_receiver()
        return [r for r in self.receivers if f"{BACKEND}/{r}" not in held]


# the wrk scripts

_HEADERS = """\
wrk.headers["Authorization"] = {authorization}
wrk.headers["Content-Type"] = "application/json"
local next_tid = 0
function setup(thread)
  thread:set("tid", next_tid)
  next_tid = next_tid + 1
end
"""

#: every answer, one per line (status, tab, body), into LOG<tid>.log
_LOG_ANSWERS = """\
local log
local function open_log()
  log = io.open({log_prefix} .. tid .. ".log", "w")
  log:setvbuf("line")
end
function response(status, headers, body)
  log:write(status, "\\t", body, "\\n")
end
"""

_CLAIM_NEW = """\
local receivers, sent = {{}}, 0
function init(args)
  for line in io.lines({receivers}) do receivers[#receivers + 1] = line end
  open_log()
end
function request()
  local i = tid + sent * {threads}
  sent = sent + 1
  return wrk.format("GET", {prefix} .. receivers[i % #receivers + 1])
end
"""

_CLAIM_SAME = """\
function init(args) open_log() end
wrk.path = {path}
"""

_REGISTER = """\
local alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
local function b64(data)
  local out = {{}}
  for i = 1, #data, 3 do
    local a, b, c = data:byte(i, i + 2)
    local n = a * 65536 + (b or 0) * 256 + (c or 0)
    local chars = 2 + (b and 1 or 0) + (c and 1 or 0)
    for j = 1, 4 do
      local k = math.floor(n / 64 ^ (4 - j)) % 64
      out[#out + 1] = j <= chars and alphabet:sub(k + 1, k + 1) or "="
    end
  end
  return table.concat(out)
end
local sent = 0
function request()
  sent = sent + 1
  local handle = string.format("{handle_prefix}%d-%d", tid, sent)
  return wrk.format("POST", {path}, nil, '{{"clientHandle":"' .. b64(handle) .. '"}}')
end
"""


def lua(value: str) -> str:
    """A Lua string literal (JSON's escapes are Lua's for these)."""
    return json.dumps(value)


class Run:
    """What one wrk run loads, written as its script, and where its answers go."""

    def __init__(self, workdir: str, name: str, gateway: Gateway, args: argparse.Namespace) -> None:
        self.name = name
        self.log_prefix = os.path.join(workdir, "answers", f"{name}-")
        os.makedirs(os.path.dirname(self.log_prefix), exist_ok=True)
        self.script = os.path.join(workdir, f"{name}.lua")
        self.threads = args.threads
        self.gateway = gateway
        self.handle_prefix = ""
        self.receivers: List[str] = []
        self.url = f"http://127.0.0.1:{gateway.port}"

    def write(self, kind: str) -> None:
        g = self.gateway
        text = _HEADERS.format(authorization=lua(f"Bearer {g.token}"))
        if kind == "app":
            text += f"wrk.path = {lua(g.app_path)}\n"
        elif kind == "claim-new":
            receivers_file = self.log_prefix + "receivers.txt"
            with open(receivers_file, "w") as f:
                f.write("".join(f"{r}\n" for r in self.receivers))
            text += _LOG_ANSWERS.format(log_prefix=lua(self.log_prefix))
            text += _CLAIM_NEW.format(receivers=lua(receivers_file), threads=self.threads, prefix=lua(g.claim_path))
        elif kind == "claim-same":
            text += _LOG_ANSWERS.format(log_prefix=lua(self.log_prefix))
            text += _CLAIM_SAME.format(path=lua(g.claim_path + g.same_receiver))
        elif kind == "register":
            text += _REGISTER.format(handle_prefix=self.handle_prefix, path=lua(f"{g.app_path}/clients"))
        with open(self.script, "w") as f:
            f.write(text)

    def answers(self) -> Iterator[Tuple[int, str]]:
        """(status, body) of every answer the run logged."""
        for tid in range(self.threads):
            path = f"{self.log_prefix}{tid}.log"
            if not os.path.exists(path):
                continue
            with open(path) as f:
                for line in f:
                    status, _, body = line.rstrip("\n").partition("\t")
                    yield int(status), body


def load(run: Run, kind: str, seconds: float, args: argparse.Namespace) -> Dict[str, Any]:
    run.write(kind)
    url = run.url + (run.gateway.app_path if kind in ("app", "register") else "/")
    return run_wrk(url, run.script, seconds, args)


# scenarios

def check(gateway: Gateway, kind: str) -> None:
    """One request of the scenario, answered as it should be, or the scenario does not run."""
    api = gateway.api
    if kind == "app":
        answer = api.call("GET", gateway.app_path, expect=(200,))
        if answer.get("appId") != APP_ID:
            raise ScenarioError(f"GET {gateway.app_path} answered {str(answer)[:300]}")
    elif kind == "claim-new":
        receiver = gateway.receivers.pop()
        gateway.claimed_answers.append(gateway.claim(receiver))
    elif kind == "claim-same":
        gateway.same_answers.append(gateway.claim(gateway.same_receiver))
    elif kind == "register":
        answer = api.call("POST", f"{gateway.app_path}/clients", {"clientHandle": b64(b"check-register")},
                          expect=(201,))
        if "clientId" not in answer:
            raise ScenarioError(f"a registration answered {str(answer)[:300]}")


def measure(gateway: Gateway, kind: str, args: argparse.Namespace, profile: bool) -> Dict[str, Any]:
    """Check, warm up, load, and collect what the scenario's runs answered."""
    workdir = gateway.workdir
    check(gateway, kind)
    runs = []
    result: Dict[str, Any] = {}
    for phase, seconds in (("warmup", args.warmup), ("measured", args.duration)):
        if seconds <= 0:
            continue
        run = Run(workdir, f"{gateway.label}-{kind}-{phase}", gateway, args)
        if kind == "claim-new":
            run.receivers = gateway.unclaimed_receivers()
            if len(run.receivers) < args.connections:
                raise ScenarioError("the receivers are used up; rerun with a larger --key-packages")
        run.handle_prefix = f"reg-{phase}-"
        runs.append(run)
        if phase == "warmup":
            load(run, kind, seconds, args)
            time.sleep(SETTLE)
            continue
        spy = start_profile(gateway, kind, seconds, workdir) if profile else None
        cpu_before = cpu_seconds(gateway.process.pid)
        result = load(run, kind, seconds, args)
        cpu = cpu_seconds(gateway.process.pid) - cpu_before
        result["cpu_ms_per_request"] = cpu * 1000 / result["requests"] if result["requests"] else None
        result["peak_rss_mb"] = peak_rss_mb(gateway.process.pid)
        if spy is not None:
            result["profile"] = finish_profile(*spy)
        time.sleep(SETTLE)
        if kind == "claim-new" and result["requests"] > len(run.receivers):
            raise ScenarioError(f"wrk sent more requests than there were receivers ({len(run.receivers)}): "
                                "rerun with a larger --key-packages")
    result["title"] = SCENARIOS[kind]
    if kind in ("claim-new", "claim-same"):
        for run in runs:
            for status, body in run.answers():
                if status == 200:
                    answer = json.loads(body)
                    if answer.get("isFinalKey") is not False:
                        raise ScenarioError(f"a claim answered {body[:300]}")
                    (gateway.claimed_answers if kind == "claim-new" else gateway.same_answers).append(
                        answer["keyPackage"])
        if kind == "claim-new":
            gateway.claims_in_flight_allowed += args.connections * len(runs)
    elif kind == "register":
        result["check"] = check_registrations(gateway, result["requests"] - result["status_errors"], args)
    return result


def check_registrations(gateway: Gateway, answered_measured: int, args: argparse.Namespace) -> Dict[str, Any]:
    """The measured run's registrations in the database: those answered, plus at most one in flight per connection."""
    prefix = b"reg-measured-"
    stored = gateway.query("SELECT COUNT(*), COUNT(DISTINCT handle) FROM mimi_clients "
                           "WHERE substr(handle, 1, ?) = ?", (len(prefix), prefix))[0]
    in_flight = stored[0] - answered_measured
    ok = stored[0] == stored[1] and 0 <= in_flight <= args.connections
    return {"ok": ok, "stored": stored[0], "distinct_handles": stored[1], "answered": answered_measured,
            "in_flight_at_stop": in_flight,
            "detail": f"{stored[0]} stored, {answered_measured} answered 201, {in_flight} in flight at wrk's stop "
                      f"(at most {args.connections})"}


def check_claims(gateway: Gateway) -> Dict[str, Any]:
    """
    Every claim-new answer carried a KeyPackage no other answer carried, held
    in the database by one receiver only; the database holds as many
    claims as were answered (plus those in flight when wrk stopped); every
    receiver holds at most one; the idempotent receiver always got the same.
    """
    held = gateway.claims_by_receiver()
    same_key = f"{BACKEND}/{gateway.same_receiver}"
    same_held = held.pop(same_key, [])
    owner_of = {kp: receiver for receiver, kps in held.items() for kp in kps}
    answered = gateway.claimed_answers
    problems = []
    distinct_answered = len(set(answered))
    if distinct_answered != len(answered):
        problems.append(f"{len(answered) - distinct_answered} KeyPackages were answered twice")
    stray = [kp for kp in answered if kp not in owner_of]
    if stray:
        problems.append(f"{len(stray)} KeyPackages answered are not recorded as claimed")
    doubles = [r for r, kps in held.items() if len(kps) > 1]
    if doubles:
        problems.append(f"{len(doubles)} receivers hold more than one KeyPackage")
    claimed = sum(len(kps) for kps in held.values())
    in_flight = claimed - distinct_answered
    if not 0 <= in_flight <= gateway.claims_in_flight_allowed:
        problems.append(f"{claimed} KeyPackages are claimed in the database but {distinct_answered} claims were "
                        f"answered (at most {gateway.claims_in_flight_allowed} may have been in flight)")
    if len(same_held) != 1 or set(gateway.same_answers) != set(same_held):
        problems.append(f"the idempotent receiver holds {len(same_held)} KeyPackages and was answered "
                        f"{len(set(gateway.same_answers))} different ones")
    detail = (f"{distinct_answered} claims answered 200, each a different KeyPackage; {claimed} claimed in the "
              f"database ({in_flight} in flight at wrk's stop), held by {len(held)} receivers, one each; "
              f"{len(gateway.same_answers)} idempotent claims answered the same one")
    return {"ok": not problems, "answered": distinct_answered, "claimed": claimed, "receivers_holding": len(held),
            "in_flight_at_stop": in_flight, "idempotent_answers": len(gateway.same_answers),
            "detail": "; ".join(problems) if problems else detail}


# profiles

def start_profile(gateway: Gateway, kind: str, seconds: float, workdir: str) -> Tuple[subprocess.Popen, str]:
    return record_profile(gateway.process.pid, os.path.join(workdir, f"profile-{gateway.label}-{kind}.txt"), seconds)


# the verdict

def targets(document: Dict[str, Any]) -> List[Dict[str, str]]:
    verdicts = []

    def verdict(target: str, ok: Optional[bool], detail: str) -> None:
        verdicts.append({"target": target, "result": "n/a" if ok is None else "PASS" if ok else "FAIL",
                         "detail": detail})

    ours = document["gateways"].get("fedserver", {})
    claims = ours.get("scenarios", {}).get("claim-new", {})
    target = f"claim-new >= {MIN_CLAIMS_PER_S:,.0f} claims/s"
    if "requests_per_s" in claims:
        verdict(target, claims["requests_per_s"] >= MIN_CLAIMS_PER_S,
                f"{claims['requests_per_s']:.0f} claims/s, p99 {claims['latency_ms']['99']:.1f} ms")
    else:
        verdict(target, None, claims.get("error", "not run").splitlines()[0])
    for label, gateway in document["gateways"].items():
        measured = {n: r for n, r in gateway.get("scenarios", {}).items() if "errors" in r}
        if measured:
            verdict(f"zero errors ({label})", all(r["errors"] == 0 for r in measured.values()),
                    ", ".join(f"{n} {r['errors']}" for n, r in measured.items()))
        for name, found in (("claims", gateway.get("claims_check")),
                            ("registrations", gateway.get("scenarios", {}).get("register", {}).get("check"))):
            if found is not None:
                verdict(f"{name} check ({label})", found["ok"], found["detail"])
    return verdicts


def report(document: Dict[str, Any]) -> str:
    s = document["settings"]
    lines = [f"fedserver MIMI bench: {s['duration']:g} s per scenario after {s['warmup']:g} s warm-up, "
             f"{s['connections']} connections, {s['threads']} wrk thread(s), {document['machine']['cpus']} CPUs, "
             f"{s['key_packages']} KeyPackages"]
    generated = document.get("generated")
    if generated:
        lines.append(f"KeyPackages made by the bench: {generated['count']} in {generated['seconds']:.1f} s "
                     f"({generated['per_s']:.0f}/s on {generated['processes']} processes)")
    lines += ["", f"{'gateway':<10} {'scenario':<11} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'errors':>7} "
                  f"{'CPU ms/req':>10} {'RSS MB':>7}"]
    for label, gateway in document["gateways"].items():
        if "error" in gateway:
            lines.append(f"{label:<10} could not run: {gateway['error'].splitlines()[0]}")
            continue
        for name, r in gateway["scenarios"].items():
            if "error" in r:
                lines.append(f"{label:<10} {name:<11} could not run: {r['error'].splitlines()[0]}")
                continue
            rss = "-" if r["peak_rss_mb"] is None else f"{r['peak_rss_mb']:.1f}"
            lines.append(f"{label:<10} {name:<11} {wrk_cells(r)} {rss:>7}")
    lines.append("")
    for label, gateway in document["gateways"].items():
        setup = gateway.get("setup")
        if setup:
            lines.append(f"{label} setup: uploaded {setup['key_packages']} KeyPackages in {setup['upload_s']:.1f} s "
                         f"({setup['upload_per_s']:.0f}/s, {UPLOAD_BATCH} per PATCH, {SETUP_CONNECTIONS} connections, "
                         f"{setup['upload_cpu_ms_per_key_package']:.3f} CPU ms each); registered "
                         f"{setup['receivers']} receivers in {setup['register_s']:.1f} s "
                         f"({setup['register_per_s']:.0f}/s, {SETUP_CONNECTIONS} connections of the bench's Python "
                         "client)")
    if document["ratios"]:
        lines.append("")
        for pair, ratio in document["ratios"].items():
            lines.append(f"{pair:<34} req/s {ratio['requests_per_s']:5.2f} x   p99 {ratio['p99']:5.2f} x")
    for label, gateway in document["gateways"].items():
        for name, r in gateway.get("scenarios", {}).items():
            profile = r.get("profile")
            if not profile:
                continue
            lines += ["", f"profile of {label} {name} ({profile.get('samples', 0)} samples, py-spy; "
                          f"{profile.get('file', '')})"]
            if "error" in profile:
                lines.append(f"  {profile['error']}")
                continue
            lines.append("  threads: " + ", ".join(f"{row['function']} {row['share'] * 100:.0f} %"
                                                   for row in profile["threads"]))
            lines.append("  own time:")
            lines += [f"    {row['share'] * 100:5.1f} %  {row['function']}" for row in profile["own"]]
            lines.append("  inclusive (fedserver's functions):")
            lines += [f"    {row['share'] * 100:5.1f} %  {row['function']}" for row in profile["inclusive"]]
    lines.append("")
    for v in document["targets"]:
        lines.append(f"{v['result']:<4}  {v['target']}: {v['detail']}")
    return "\n".join(lines)


def ratios(gateways: Dict[str, Dict[str, Any]]) -> Dict[str, Dict[str, float]]:
    """Within a gateway, each scenario over claim-new; and fedserver over the baseline, scenario by scenario."""
    found = {}

    def ratio(name: str, a: Dict[str, Any], b: Dict[str, Any]) -> None:
        if "requests_per_s" in a and "requests_per_s" in b and b["requests_per_s"] and b["latency_ms"]["99"]:
            found[name] = {"requests_per_s": a["requests_per_s"] / b["requests_per_s"],
                           "p99": a["latency_ms"]["99"] / b["latency_ms"]["99"]}

    for label, gateway in gateways.items():
        scenarios = gateway.get("scenarios", {})
        for name in ("app", "claim-same", "register"):
            ratio(f"{label} {name}/claim-new", scenarios.get(name, {}), scenarios.get("claim-new", {}))
    ours, base = gateways.get("fedserver", {}).get("scenarios", {}), gateways.get("baseline", {}).get("scenarios", {})
    for name in SCENARIOS:
        ratio(f"{name} fedserver/baseline", ours.get(name, {}), base.get(name, {}))
    return found


# the command

def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=10, help="seconds of load per scenario (default 10)")
    parser.add_argument("--warmup", type=float, default=2, help="seconds of load before measuring (default 2)")
    parser.add_argument("--connections", type=int, default=32, help="wrk connections (default 32)")
    parser.add_argument("--threads", type=int, default=1, help="wrk threads (default 1: the CPUs go to the server)")
    parser.add_argument("--key-packages", type=int, default=40000,
                        help="KeyPackages in the target's queue, and receivers registered (default 40000; each "
                             "claim-new request uses one; at most 100000)")
    parser.add_argument("--only", action="append", choices=list(SCENARIOS), metavar="SCENARIO",
                        help=f"run only this scenario (repeatable): {', '.join(SCENARIOS)}")
    parser.add_argument("--profile", action="store_true",
                        help="record each measured run of the gateway with py-spy and print where the time went "
                             "(py-spy takes CPU too: the figures of such a run are lower)")
    parser.add_argument("--baseline", metavar="DIR",
                        help="also run every scenario on a gateway started from the source tree DIR (with "
                             "fedserver/ and plugins/), alternating with this one")
    add_output_arguments(parser)
    args = parser.parse_args(argv)
    if args.duration <= 0 or args.warmup < 0 or args.threads < 1 or args.connections < args.threads:
        parser.error("need --duration > 0, --warmup >= 0 and --connections >= --threads >= 1")
    if not 100 <= args.key_packages <= 100_000:
        parser.error("--key-packages must be between 100 and 100000")
    check_baseline(parser, args)
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    if wrk_missing():
        return 2
    if args.profile and py_spy_missing():
        return 2
    try:
        import fedserver_mimi.encode  # noqa: F401 - the KeyPackages are made with it
    except ImportError as e:
        return not_installed("fedserver_mimi", e, "mimi.py")

    workdir, processes = start_work("fedserver-mimi-bench-")
    gateways: Dict[str, Dict[str, Any]] = {}
    document: Dict[str, Any] = {}
    interrupted = False
    try:
        print(f"bench: making {args.key_packages} KeyPackages...", file=sys.stderr, flush=True)
        key_packages, seconds = generate_key_packages(args.key_packages)
        document["generated"] = {"count": len(key_packages), "seconds": seconds,
                                 "per_s": len(key_packages) / seconds, "processes": os.cpu_count()}
        running: Dict[str, Gateway] = {}
        sources: Dict[str, Tuple[str, Optional[Dict[str, str]]]] = {"fedserver": ("installed", None)}
        if args.baseline:
            sources["baseline"] = (os.path.abspath(args.baseline), baseline_env(args.baseline))
        for label, (source, env) in sources.items():
            print(f"bench: {label}: starting, uploading KeyPackages, registering receivers...", file=sys.stderr,
                  flush=True)
            try:
                gateway = Gateway(processes, label, env, args)
                gateways[label] = {"source": source, "scenarios": {}, "setup": gateway.setup(key_packages, args)}
                running[label] = gateway
            except ScenarioError as e:
                print(f"bench: {label} could not start: {e}", file=sys.stderr, flush=True)
                gateways[label] = {"error": str(e)}
        for name in args.only or SCENARIOS:
            for label, gateway in running.items():
                print(f"bench: {label} {name}...", file=sys.stderr, flush=True)
                try:
                    gateways[label]["scenarios"][name] = measure(gateway, name, args,
                                                                 args.profile and label == "fedserver")
                except ScenarioError as e:
                    print(f"bench: {label} {name} could not run: {e}", file=sys.stderr, flush=True)
                    gateways[label]["scenarios"][name] = {"title": SCENARIOS[name], "error": str(e)}
        for label, gateway in running.items():
            claims = [r for name, r in gateways[label]["scenarios"].items() if name.startswith("claim-")]
            if any("error" in r for r in claims):
                gateways[label]["claims_check"] = {"ok": None, "detail": "a claim scenario could not run"}
            elif claims:
                gateways[label]["claims_check"] = check_claims(gateway)
    except KeyboardInterrupt:
        interrupted = True
    finally:
        wind_down(processes)
    if interrupted:
        return interrupted_exit(workdir)
    failed = any("error" in g or any("error" in r for r in g["scenarios"].values()) for g in gateways.values())
    document = {
        "when": now(),
        "machine": machine(),
        "software": {name: metadata.version(name) for name in ("Twisted", "PyNaCl")},
        "sqlite": sqlite3.sqlite_version,
        "settings": {"duration": args.duration, "warmup": args.warmup, "connections": args.connections,
                     "threads": args.threads, "key_packages": args.key_packages, "wrk_timeout": WRK_TIMEOUT,
                     "upload_batch": UPLOAD_BATCH, "setup_connections": SETUP_CONNECTIONS,
                     "profiled": args.profile},
        **document,
        "gateways": gateways,
        "ratios": ratios(gateways),
    }
    document["targets"] = targets(document)
    checks_failed = any(v["result"] == "FAIL" and "check" in v["target"] for v in document["targets"])
    document["work_folder"] = workdir if (failed or checks_failed or args.keep) else None
    print(report(document))
    return finish(document, "mimi-latest.json", args, workdir, failed or checks_failed)


if __name__ == "__main__":
    sys.exit(main())
