"""
Benchmark fedserver against the same component reached directly and through
a hand-written proxy chain, in one run, on 127.0.0.1.

    python bench/run.py [--duration 10] [--connections 32] [--warmup 2] [--threads 1]
                        [--only SCENARIO ...] [--json FILE] [--keep]

Run it with the Python fedserver is installed in (it starts twistd, the
component and the proxies with that same Python).  It needs wrk
(C{apt-get install -y wrk}) and installs nothing itself.

Scenarios, each loaded by wrk with POSTs of a ~100 byte JSON body:

- C{direct}: wrk -> bench/component.py (the one-hop ceiling);
- C{naive}: wrk -> bench/naive_proxy.py outward -> mutual TLS ->
  bench/naive_proxy.py inward -> the component;
- C{fedserver}: wrk -> a.example outward -> mutual TLS -> b.example inward
  -> http-forward -> the component (two C{twistd -n fedserver});
- C{fedserver-inprocess}: the same with b.example's component C{bench-echo}
  (bench/echo_plugin.py) answering inside the fedserver process.

Prints a table, the ratios fedserver/naive and fedserver/direct and one
PASS/FAIL line per target of issue 4; writes the same as JSON to
bench/results/latest.json (and --json FILE).  Exits 0 whatever the targets
say, 1 when a scenario could not run, 2 when wrk is missing.  Every process
it starts is stopped before it exits, also on Ctrl-C.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import json
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

BENCH = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH)
RESULTS = os.path.join(BENCH, "results")
BIN = os.path.dirname(sys.executable)

WRK_INSTALL = "apt-get install -y wrk"
#: seconds for a process to listen, for a process to stop, for one check request
START_WAIT, STOP_WAIT, CHECK_WAIT = 30.0, 15.0, 10.0
#: wrk counts a request that takes longer as a timeout error
WRK_TIMEOUT = "5s"

RPC = "get-user-by-handle"
BODY = json.dumps({"handle": "bob", "domain": "b.example", "fields": ["id", "name", "handle", "accent_id"],
                   "locale": "en-GB"}, separators=(",", ":"))
#: (backend domain, infrastructure domain) of the two sides
A, B = ("a.example", "fed.a.example"), ("b.example", "fed.b.example")
OUTWARD_PATH = f"/rpc/{B[0]}/brig/{RPC}"
COMPONENT_PATH = f"/federation/{RPC}"

#: the issue 4 targets
MIN_SPEEDUP, MAX_RSS_MB = 1.5, 150.0


class ScenarioError(Exception):
    """A scenario could not run; the message says why."""


# processes

def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


class Processes:
    """
    The processes the benchmark started, each writing its output to
    C{logs/NAME.out} in the work folder.  L{stop_all} stops every one still
    running; every wait is bounded.
    """

    def __init__(self, workdir: str) -> None:
        self.workdir = workdir
        self.logs = os.path.join(workdir, "logs")
        os.makedirs(self.logs, exist_ok=True)
        self.running: List[subprocess.Popen] = []

    def log_path(self, name: str, suffix: str = "out") -> str:
        return os.path.join(self.logs, f"{name}.{suffix}")

    def start(self, name: str, argv: Sequence[str], ports: Iterable[int],
              env: Optional[Dict[str, str]] = None, timeout: float = START_WAIT) -> subprocess.Popen:
        """Start C{argv} and wait (at most C{timeout} s) until it listens on every port in C{ports}."""
        with open(self.log_path(name), "wb") as out:
            process = subprocess.Popen(list(argv), cwd=self.workdir, env=env, stdin=subprocess.DEVNULL,
                                       stdout=out, stderr=subprocess.STDOUT)
        self.running.append(process)
        deadline = time.monotonic() + timeout
        for port in ports:
            while not _listening(port):
                if process.poll() is not None or time.monotonic() > deadline:
                    why = (f"exited with code {process.returncode}" if process.poll() is not None
                           else f"does not listen on 127.0.0.1:{port} after {timeout:.0f} s")
                    self.stop([process])
                    raise ScenarioError(f"{name} {why}\n{self.tail(name)}")
                time.sleep(0.05)
        return process

    def tail(self, name: str, lines: int = 15) -> str:
        """The last lines of what process C{name} wrote (output, then twistd log)."""
        text = []
        for suffix in ("out", "log"):
            try:
                with open(self.log_path(name, suffix), errors="replace") as f:
                    text += [f"  {suffix}: {line.rstrip()}" for line in f.readlines()[-lines:]]
            except OSError:
                pass
        return "\n".join(text)

    def stop(self, processes: Iterable[subprocess.Popen]) -> None:
        """Terminate C{processes} (the last started first) and wait; kill those that linger."""
        wanted = list(processes)
        processes = [p for p in reversed(self.running) if p in wanted]
        for process in processes:
            if process.poll() is None:
                process.terminate()
        for process in processes:
            try:
                process.wait(timeout=STOP_WAIT)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=STOP_WAIT)
            self.running.remove(process)

    def stop_all(self) -> None:
        self.stop(list(self.running))


def peak_rss_mb(pid: int) -> Optional[float]:
    """The peak resident set size of process C{pid} (VmHWM), in MB."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time process C{pid} has used so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# configuration

def _toml_key(key: str) -> str:
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else json.dumps(key)


def to_toml(table: Dict[str, Any], prefix: str = "") -> str:
    """TOML for a configuration of tables, arrays of tables, and scalars or lists of them."""
    lines, nested = [], []
    for key, value in table.items():
        if isinstance(value, dict) or (isinstance(value, list) and value and isinstance(value[0], dict)):
            nested.append((key, value))
        else:  # JSON strings, numbers, booleans and arrays of them are TOML too
            lines.append(f"{_toml_key(key)} = {json.dumps(value)}")
    text = "".join(f"{line}\n" for line in lines)
    for key, value in nested:
        name = f"{prefix}.{_toml_key(key)}" if prefix else _toml_key(key)
        for item in [value] if isinstance(value, dict) else value:
            brackets = ("[", "]") if isinstance(value, dict) else ("[[", "]]")
            text += f"\n{brackets[0]}{name}{brackets[1]}\n" + to_toml(item, name)
    return text


# the scenarios

@dataclass
class Entry:
    """Where a scenario takes its load, and the processes it started for it."""

    port: int
    path: str
    #: label -> process, each reported with its peak RSS
    processes: Dict[str, subprocess.Popen] = field(default_factory=dict)
    #: whether the shared component answers (its CPU time then counts)
    uses_component: bool = True


class Bench:
    """The work folder, the PKI, the shared component, and how each scenario starts."""

    def __init__(self, workdir: str, processes: Processes) -> None:
        from fedserver.pki import issue, make_ca, write_issued

        self.workdir = workdir
        self.processes = processes
        pki = os.path.join(workdir, "pki")
        os.makedirs(pki)
        ca = make_ca("fedserver bench CA")
        self.ca_path, _ = write_issued(pki, "ca", ca)
        self.tls = {infra: write_issued(pki, infra, issue(ca, [infra]), chain=[ca]) for _, infra in (A, B)}

        self.wrk_script = os.path.join(workdir, "post.lua")
        with open(self.wrk_script, "w") as f:
            f.write(f'wrk.method = "POST"\nwrk.body = {json.dumps(BODY)}\n'
                    'wrk.headers["Content-Type"] = "application/json"\n')

        # bench-echo as an installed distribution would be seen: a .dist-info
        # with an entry point in the group "fedserver", and its module importable
        site = os.path.join(workdir, "site")
        dist_info = os.path.join(site, "fedserver_bench_echo-0.dist-info")
        os.makedirs(dist_info)
        with open(os.path.join(dist_info, "METADATA"), "w") as f:
            f.write("Metadata-Version: 2.1\nName: fedserver-bench-echo\nVersion: 0\n")
        with open(os.path.join(dist_info, "entry_points.txt"), "w") as f:
            f.write("[fedserver]\nbench-echo = echo_plugin\n")
        self.plugin_env = dict(os.environ)
        self.plugin_env["PYTHONPATH"] = os.pathsep.join(
            [site, BENCH, *filter(None, [os.environ.get("PYTHONPATH")])])

        self.component_port = free_port()
        self.component = processes.start("component", [sys.executable, os.path.join(BENCH, "component.py"),
                                                       "--port", str(self.component_port)], [self.component_port])
        self.component_url = f"http://127.0.0.1:{self.component_port}"

    def direct(self, name: str) -> Entry:
        return Entry(self.component_port, COMPONENT_PATH)

    def naive(self, name: str) -> Entry:
        outward_port, inward_port = free_port(), free_port()

        def proxy(mode: str, port: int, infra: str, *options: str) -> subprocess.Popen:
            cert, key = self.tls[infra]
            argv = [sys.executable, os.path.join(BENCH, "naive_proxy.py"), mode, "--port", str(port),
                    "--certificate", cert, "--private-key", key, "--ca", self.ca_path, *options]
            return self.processes.start(f"{name}-{mode}", argv, [port])

        inward = proxy("inward", inward_port, B[1], "--component", f"brig={self.component_url}")
        outward = proxy("outward", outward_port, A[1], "--domain", A[0], "--peer-domain", B[0],
                        "--peer", f"https://127.0.0.1:{inward_port}", "--peer-name", B[1])
        return Entry(outward_port, OUTWARD_PATH, {"A' outward": outward, "B' inward": inward})

    def fedserver(self, name: str) -> Entry:
        return self._fedserver_pair(name, {"plugin": "http-forward", "url": self.component_url})

    def fedserver_inprocess(self, name: str) -> Entry:
        entry = self._fedserver_pair(name, {"plugin": "bench-echo"}, env=self.plugin_env)
        entry.uses_component = False
        return entry

    def _fedserver_pair(self, name: str, brig: Dict[str, Any], env: Optional[Dict[str, str]] = None) -> Entry:
        """b.example (inward, component C{brig}) then a.example (outward), under twistd."""
        a_inward, a_outward, b_inward = free_port(), free_port(), free_port()
        b = self._twistd(name, B, A, inward=b_inward, peer_inward=a_inward, components={"brig": brig}, env=env)
        a = self._twistd(name, A, B, inward=a_inward, peer_inward=b_inward, outward=a_outward, env=env)
        return Entry(a_outward, OUTWARD_PATH, {A[0]: a, B[0]: b})

    def _twistd(self, name: str, own: Tuple[str, str], peer: Tuple[str, str], *, inward: int, peer_inward: int,
                outward: Optional[int] = None, components: Optional[Dict[str, Any]] = None,
                env: Optional[Dict[str, str]] = None) -> subprocess.Popen:
        cert, key = self.tls[own[1]]
        config: Dict[str, Any] = {
            "server": {"backend_domain": own[0], "infra_domain": own[1],
                       "data_dir": os.path.join(self.workdir, "var", f"{name}-{own[0]}")},
            "inward": {"listen": f"tcp:{inward}:interface=127.0.0.1"},
            "tls": {"certificate": cert, "private_key": key, "ca_certificates": [self.ca_path]},
            "discovery": {"plugin": "static",
                          "domains": {peer[0]: {"infra_domain": peer[1], "host": "127.0.0.1", "port": peer_inward}}},
            "authenticator": {"plugin": "mtls"},
            "authorizers": [{"plugin": "allow-list", "domains": [peer[0]]}],
        }
        if outward is not None:
            config["outward"] = {"listen": f"tcp:{outward}:interface=127.0.0.1"}
        if components:
            config["components"] = components
        return start_fedserver(self.processes, f"{name}-{own[0]}", config, [p for p in (inward, outward) if p],
                               env=env)


def start_fedserver(processes: Processes, label: str, config: Dict[str, Any], ports: Iterable[int],
                    env: Optional[Dict[str, str]] = None) -> subprocess.Popen:
    """
    Write C{config} to C{LABEL.toml} in the work folder and start C{twistd -n
    fedserver} with it (log in C{logs/LABEL.log}); wait until it listens on
    every port in C{ports}.
    """
    path = os.path.join(processes.workdir, f"{label}.toml")
    with open(path, "w") as f:
        f.write(to_toml(config))
    argv = [os.path.join(BIN, "twistd"), "-n", "--pidfile=", f"--logfile={processes.log_path(label, 'log')}",
            "fedserver", "--config", path]
    return processes.start(label, argv, ports, env=env)


#: name -> (what it measures, how it starts)
SCENARIOS: Dict[str, Tuple[str, Callable[[Bench, str], Entry]]] = {
    "direct": ("wrk -> component", Bench.direct),
    "naive": ("wrk -> treq proxy -> mTLS -> treq proxy -> component", Bench.naive),
    "fedserver": ("wrk -> a outward -> mTLS -> b inward -> http-forward -> component", Bench.fedserver),
    "fedserver-inprocess": ("wrk -> a outward -> mTLS -> b inward -> bench-echo", Bench.fedserver_inprocess),
}


# load

def check_answer(url: str) -> None:
    """One request must get 200 and the component's document, or the scenario cannot run."""
    from component import answer

    request = urllib.request.Request(url, data=BODY.encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=CHECK_WAIT) as response:
            status, body = response.status, response.read()
    except urllib.error.HTTPError as e:
        status, body = e.code, e.read()
    except OSError as e:
        raise ScenarioError(f"POST {url} failed: {e}") from None
    if status != 200 or body != answer(RPC):
        raise ScenarioError(f"POST {url} answered {status} {body[:300]!r}, not 200 and the component's document")


_UNITS_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0, "h": 3_600_000.0}


def parse_wrk(text: str) -> Dict[str, Any]:
    """The figures of a C{wrk --latency} report."""

    def number(pattern: str) -> re.Match:
        match = re.search(pattern, text)
        if match is None:
            raise ScenarioError(f"no {pattern!r} in the output of wrk:\n{text}")
        return match

    def latency(percent: str) -> float:
        match = number(rf"\n\s+{percent}%\s+([\d.]+)([a-z]+)")
        return float(match.group(1)) * _UNITS_MS[match.group(2)]

    socket_errors = dict.fromkeys(("connect", "read", "write", "timeout"), 0)
    match = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    if match:
        socket_errors = dict(zip(socket_errors, map(int, match.groups()), strict=True))
    match = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    status_errors = int(match.group(1)) if match else 0
    return {
        "requests_per_s": float(number(r"Requests/sec:\s+([\d.]+)").group(1)),
        "requests": int(number(r"(\d+) requests in ").group(1)),
        "latency_ms": {p: latency(p) for p in ("50", "90", "99")},
        "socket_errors": socket_errors,
        # wrk counts answers with a status of 400 or more on this line
        "status_errors": status_errors,
        "errors": sum(socket_errors.values()) + status_errors,
    }


def run_wrk(url: str, script: str, seconds: float, args: argparse.Namespace) -> Dict[str, Any]:
    argv = ["wrk", "--latency", "-t", str(args.threads), "-c", str(args.connections), "-d", f"{seconds:g}s",
            "--timeout", WRK_TIMEOUT, "-s", script, url]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 30)
    except subprocess.TimeoutExpired:
        raise ScenarioError(f"wrk did not finish within {seconds + 30:g} s") from None
    if done.returncode != 0:
        raise ScenarioError(f"wrk exited with {done.returncode}: {done.stderr.strip() or done.stdout.strip()}")
    return parse_wrk(done.stdout)


def measure(bench: Bench, name: str, args: argparse.Namespace) -> Dict[str, Any]:
    """Start scenario C{name}, check it answers, warm it up, load it, stop it."""
    title, start = SCENARIOS[name]
    entry = start(bench, name)
    try:
        url = f"http://127.0.0.1:{entry.port}{entry.path}"
        check_answer(url)
        if args.warmup > 0:
            run_wrk(url, bench.wrk_script, args.warmup, args)
        busy = list(entry.processes.values()) + ([bench.component] if entry.uses_component else [])
        cpu_before = sum(cpu_seconds(p.pid) for p in busy)
        result = run_wrk(url, bench.wrk_script, args.duration, args)
        cpu = sum(cpu_seconds(p.pid) for p in busy) - cpu_before
        result["cpu_ms_per_request"] = cpu * 1000 / result["requests"] if result["requests"] else None
        result["peak_rss_mb"] = {label: peak_rss_mb(p.pid) for label, p in entry.processes.items()}
        return {"title": title, "url": url, **result}
    finally:
        bench.processes.stop(entry.processes.values())


# the verdict

def ratios(results: Dict[str, Dict[str, Any]]) -> Dict[str, Dict[str, float]]:
    """fedserver (both kinds) over naive and over direct: requests/s and p99."""
    found = {}
    for ours in ("fedserver", "fedserver-inprocess"):
        for theirs in ("naive", "direct"):
            mine, other = results.get(ours, {}), results.get(theirs, {})
            if "requests_per_s" in mine and "requests_per_s" in other and other["requests_per_s"]:
                found[f"{ours}/{theirs}"] = {
                    "requests_per_s": mine["requests_per_s"] / other["requests_per_s"],
                    "p99": mine["latency_ms"]["99"] / other["latency_ms"]["99"],
                }
    return found


def targets(results: Dict[str, Dict[str, Any]]) -> List[Dict[str, str]]:
    """One verdict per target of issue 4 (C{n/a} when a scenario it needs did not run)."""
    fed, naive = results.get("fedserver", {}), results.get("naive", {})
    both = "requests_per_s" in fed and "requests_per_s" in naive
    measured = {name: r for name, r in results.items() if name.startswith("fedserver") and "errors" in r}
    rss = [(f"{name} {label}", mb) for name, r in measured.items()
           for label, mb in r["peak_rss_mb"].items() if mb is not None]
    verdicts = []

    def verdict(target: str, ok: Optional[bool], detail: str) -> None:
        verdicts.append({"target": target, "result": "n/a" if ok is None else "PASS" if ok else "FAIL",
                         "detail": detail})

    if both:
        speedup = fed["requests_per_s"] / naive["requests_per_s"]
        verdict(f"fedserver req/s >= {MIN_SPEEDUP:g} x naive", speedup >= MIN_SPEEDUP,
                f"{speedup:.2f} x ({fed['requests_per_s']:.0f} vs {naive['requests_per_s']:.0f} req/s)")
        p99, naive_p99 = fed["latency_ms"]["99"], naive["latency_ms"]["99"]
        verdict("fedserver p99 <= naive p99", p99 <= naive_p99, f"{p99:.1f} vs {naive_p99:.1f} ms")
    else:
        verdict(f"fedserver req/s >= {MIN_SPEEDUP:g} x naive", None, "needs the fedserver and naive scenarios")
        verdict("fedserver p99 <= naive p99", None, "needs the fedserver and naive scenarios")
    verdict("zero errors (fedserver scenarios)", all(r["errors"] == 0 for r in measured.values()) if measured
            else None, ", ".join(f"{name} {r['errors']}" for name, r in measured.items()) or "no fedserver scenario")
    worst = max(rss, key=lambda item: item[1], default=None)
    verdict(f"peak RSS <= {MAX_RSS_MB:g} MB per fedserver process",
            None if worst is None else worst[1] <= MAX_RSS_MB,
            "no fedserver process measured" if worst is None else f"largest {worst[1]:.1f} MB ({worst[0]})")
    return verdicts



def wrk_cells(r: Dict[str, Any], *, cpu_digits: int = 3) -> str:
    """A measured scenario's req/s, p50 and p99 (ms), errors and CPU ms per request, as table cells."""
    cpu = "-" if r["cpu_ms_per_request"] is None else f"{r['cpu_ms_per_request']:.{cpu_digits}f}"
    return (f"{r['requests_per_s']:>8.0f} {r['latency_ms']['50']:>8.2f} {r['latency_ms']['99']:>8.2f} "
            f"{r['errors']:>7} {cpu:>10}")

def report(document: Dict[str, Any]) -> str:
    """The table, the ratios and the verdicts, as text."""
    settings = document["settings"]
    lines = [f"fedserver bench: {settings['duration']:g} s per scenario after {settings['warmup']:g} s warm-up, "
             f"{settings['connections']} connections, {settings['threads']} wrk thread(s), "
             f"{document['machine']['cpus']} CPUs",
             "",
             f"{'scenario':<20} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'errors':>7} {'CPU ms/req':>10}  "
             "peak RSS MB"]
    for name, r in document["scenarios"].items():
        if "error" in r:
            lines.append(f"{name:<20} could not run: {r['error'].splitlines()[0]}")
            continue
        rss = ", ".join(f"{label} {mb:.1f}" for label, mb in r["peak_rss_mb"].items() if mb is not None) or "-"
        lines.append(f"{name:<20} {wrk_cells(r, cpu_digits=2)}  {rss}")
    if document["ratios"]:
        lines.append("")
        for pair, ratio in document["ratios"].items():
            lines.append(f"{pair:<28} req/s {ratio['requests_per_s']:5.2f} x   p99 {ratio['p99']:5.2f} x")
    lines.append("")
    for v in document["targets"]:
        lines.append(f"{v['result']:<4}  {v['target']}: {v['detail']}")
    return "\n".join(lines)


def machine(wrk: bool = True) -> Dict[str, Any]:
    """The CPUs, platform, Python and load average (and wrk's version, unless C{wrk} is false)."""
    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        pass
    found = {"cpus": os.cpu_count(), "cpu_model": model, "platform": platform.platform(),
             "python": platform.python_version(), "load_average": os.getloadavg()}
    if wrk:
        done = subprocess.run(["wrk", "--version"], capture_output=True, text=True, timeout=10)
        found["wrk"] = (done.stdout or done.stderr).splitlines()[0] if (done.stdout or done.stderr) else "?"
    return found


# profiles

def record_profile(pid: int, path: str, seconds: float) -> Tuple[subprocess.Popen, str]:
    """Start py-spy recording process C{pid} for about C{seconds} into C{path}; L{finish_profile} reads it."""
    argv = [os.path.join(BIN, "py-spy"), "record", "--pid", str(pid), "--duration",
            str(max(1, int(seconds) - 1)), "--rate", "200", "--format", "raw", "--threads", "--nonblocking",
            "--output", path]
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE), path


def finish_profile(spy: subprocess.Popen, path: str, top: int = 15) -> Dict[str, Any]:
    """
    The profile's samples: per thread, the functions with the most samples
    of their own, and fedserver's functions with the most samples inclusive
    of what they call.
    """
    try:
        _, err = spy.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        spy.kill()
        _, err = spy.communicate()
    if spy.returncode != 0 or not os.path.exists(path):
        return {"error": f"py-spy exited with {spy.returncode}: {err.decode(errors='replace')[-300:]}"}
    own: Dict[str, int] = collections.Counter()
    inclusive: Dict[str, int] = collections.Counter()
    threads: Dict[str, int] = collections.Counter()
    total = 0
    with open(path) as f:
        for line in f:
            stack, _, count = line.rstrip("\n").rpartition(" ")
            if not stack:
                continue
            n = int(count)
            frames = stack.split(";")
            threads[frames[0]] += n
            frames = [_frame(f) for f in frames[1:]]
            total += n
            if frames:
                own[frames[-1]] += n
            for frame in set(frames):
                if frame.startswith("fedserver"):
                    inclusive[frame] += n

    def rows(counter: Dict[str, int]) -> List[Dict[str, Any]]:
        return [{"function": f, "share": n / total} for f, n in sorted(counter.items(), key=lambda i: -i[1])[:top]]

    return {"samples": total, "file": path, "threads": rows(threads), "own": rows(own), "inclusive": rows(inclusive)}


#: the folders a profile's file names are shortened from: they then start with their package
_FOLDERS = ("site-packages/", os.path.join(ROOT, "plugins", ""), os.path.join(ROOT, ""),
            os.path.join(sysconfig.get_paths()["stdlib"], ""))


def _frame(frame: str) -> str:
    # "function (/path/to/package/file.py:123)" -> "package/file.py:function"
    name, _, where = frame.partition(" (")
    file = where.rsplit(":", 1)[0]
    if "/__editable__." in file:  # a strict editable install: build/__editable__.NAME/package/...
        file = file.split("/__editable__.", 1)[1].partition("/")[2]
    for folder in _FOLDERS:
        if folder in file:
            file = file.split(folder, 1)[1]
            break
    return f"{file}:{name}"


# the command

def _interrupted(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def add_output_arguments(parser: argparse.ArgumentParser) -> None:
    """The C{--json} and C{--keep} options every benchmark has (see L{finish})."""
    parser.add_argument("--json", metavar="FILE", help="also write the results to FILE")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (configs, logs) afterwards")


def check_baseline(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse a C{--baseline DIR} that is not a source tree with C{fedserver/} and C{plugins/}."""
    if args.baseline and not all(os.path.isdir(os.path.join(args.baseline, d)) for d in ("fedserver", "plugins")):
        parser.error(f"--baseline {args.baseline} has no fedserver/ and plugins/")


def baseline_env(directory: str) -> Dict[str, str]:
    """The environment of processes started from the source tree C{directory} (its fedserver and plugins)."""
    base = os.path.abspath(directory)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([base, os.path.join(base, "plugins"),
                                         *filter(None, [os.environ.get("PYTHONPATH")])])
    return env


def wrk_missing() -> bool:
    """Whether wrk is missing (and say how to install it)."""
    if shutil.which("wrk") is None:
        print(f"bench: wrk is not installed; install it with:\n  {WRK_INSTALL}", file=sys.stderr)
        return True
    return False


def py_spy_missing() -> bool:
    """Whether py-spy, which C{--profile} needs, is missing next to this Python (and say so)."""
    if not os.path.exists(os.path.join(BIN, "py-spy")):
        print(f"bench: --profile needs py-spy next to {sys.executable} (pip install py-spy)", file=sys.stderr)
        return True
    return False


def not_installed(what: str, error: Exception, script: str) -> int:
    """Say that this Python cannot import C{what}; the exit code for it."""
    print(f"bench: {sys.executable} cannot import {what} ({error}): run this with the Python fedserver is "
          f"installed in (for example .venv/bin/python bench/{script})", file=sys.stderr)
    return 1


def start_work(prefix: str) -> Tuple[str, Processes]:
    """
    Make SIGTERM stop the benchmark as Ctrl-C does, and make its work folder
    (C{prefix} and a random part); the folder, and the processes started in it.
    """
    signal.signal(signal.SIGTERM, _interrupted)
    workdir = tempfile.mkdtemp(prefix=prefix)
    return workdir, Processes(workdir)


def now() -> str:
    """This moment (UTC, to the second), as the results' C{when} gives it."""
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.strip().splitlines()[0] + " (see bench/README.md)")
    parser.add_argument("--duration", type=float, default=10, help="seconds of load per scenario (default 10)")
    parser.add_argument("--warmup", type=float, default=2, help="seconds of load before measuring (default 2)")
    parser.add_argument("--connections", type=int, default=32, help="wrk connections (default 32)")
    parser.add_argument("--threads", type=int, default=1, help="wrk threads (default 1: the CPUs go to the servers)")
    parser.add_argument("--only", action="append", choices=list(SCENARIOS), metavar="SCENARIO",
                        help=f"run only this scenario (repeatable): {', '.join(SCENARIOS)}")
    add_output_arguments(parser)
    args = parser.parse_args(argv)
    if args.duration <= 0 or args.warmup < 0 or args.threads < 1 or args.connections < args.threads:
        parser.error("need --duration > 0, --warmup >= 0 and --connections >= --threads >= 1")
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    if wrk_missing():
        return 2
    try:
        import fedserver.pki  # noqa: F401 - the certificates are made with it
    except ImportError:
        available = False
    else:
        available = os.path.exists(os.path.join(BIN, "twistd"))
    if not available:
        print(f"bench: {sys.executable} has no fedserver or no twistd next to it: run this with the Python "
              "fedserver is installed in (for example .venv/bin/python bench/run.py)", file=sys.stderr)
        return 1

    workdir, processes = start_work("fedserver-bench-")
    results, interrupted = run_scenarios(
        {name: SCENARIOS[name][0] for name in args.only or SCENARIOS}, processes,
        lambda: Bench(workdir, processes), lambda bench, name: measure(bench, name, args),
    )
    if interrupted:
        return interrupted_exit(workdir)
    failed = any("error" in r for r in results.values())

    document = {
        "when": now(),
        "machine": machine(),
        "settings": {"duration": args.duration, "warmup": args.warmup, "connections": args.connections,
                     "threads": args.threads, "body_bytes": len(BODY), "wrk_timeout": WRK_TIMEOUT},
        "scenarios": results,
        "ratios": ratios(results),
        "targets": targets(results),
        "work_folder": workdir if (failed or args.keep) else None,
    }
    print(report(document))
    return finish(document, "latest.json", args, workdir, failed)


def run_scenarios(
    titles: Dict[str, str],
    processes: Processes,
    setup: Callable[[], Any],
    measure_one: Callable[[Any, str], Dict[str, Any]],
    cleanup: Callable[[Any], None] = lambda bench: None,
) -> Tuple[Dict[str, Dict[str, Any]], bool]:
    """
    Run each scenario named in C{titles} with C{measure_one(bench, name)},
    C{bench} being what C{setup()} made; a scenario that cannot run is
    recorded with its error, the others still run.  Afterwards (also on
    Ctrl-C) stop every process and call C{cleanup(bench)} (C{bench} is
    C{None} if the setup failed).  Returns the results and whether the run
    was interrupted.
    """
    results: Dict[str, Dict[str, Any]] = {}
    bench = None
    interrupted = False
    try:
        bench = setup()
        for name, title in titles.items():
            print(f"bench: {name} ({title})...", file=sys.stderr, flush=True)
            try:
                results[name] = measure_one(bench, name)
            except ScenarioError as e:
                print(f"bench: {name} could not run: {e}", file=sys.stderr, flush=True)
                results[name] = {"title": title, "error": str(e)}
    except ScenarioError as e:
        print(f"bench: cannot start: {e}", file=sys.stderr)
        results["setup"] = {"error": str(e)}
    except KeyboardInterrupt:
        interrupted = True
    finally:
        wind_down(processes)
        cleanup(bench)
    return results, interrupted


def wind_down(processes: Processes) -> None:
    """Stop everything; a second Ctrl-C must not leave processes behind (every wait is bounded)."""
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, signal.SIG_IGN)
    processes.stop_all()


def interrupted_exit(workdir: str) -> int:
    print("bench: interrupted; stopped what it started", file=sys.stderr)
    shutil.rmtree(workdir, ignore_errors=True)
    return 130


def finish(document: Dict[str, Any], name: str, args: argparse.Namespace, workdir: str, failed: bool) -> int:
    """
    Write the results (C{results/NAME} and C{--json}), keep the work folder
    when something failed or C{--keep} asks, and return the exit code.
    """
    text = json.dumps(document, indent=2) + "\n"
    os.makedirs(RESULTS, exist_ok=True)
    for path in [os.path.join(RESULTS, name), *filter(None, [args.json])]:
        with open(path, "w") as f:
            f.write(text)
    if failed or args.keep:
        print(f"\nconfigurations and logs: {workdir}")
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
