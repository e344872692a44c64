"""
The durable outbound queue benchmark: how fast one-way calls are accepted
and delivered, on SQLite and on PostgreSQL, beside the same calls sent
directly, in one run on 127.0.0.1 (issue 8).

    python bench/outbound_queue.py [--seconds 5] [--connections 32] [--destinations 8]
                          [--postgresql URL] [--only SCENARIO ...] [--profile] [--json FILE] [--keep]

Run it with the Python fedserver is installed in.  It needs wrk
(C{apt-get install -y wrk}) and, for the PostgreSQL scenarios, a server at
C{--postgresql} (default C{postgresql://127.0.0.1:5432/postgres}, where the
bench creates a database of its own and drops it at the end).  It installs
nothing itself.

b.example (C{twistd -n fedserver}, SQLite) answers through bench/component.py
and deduplicates on the queue's idempotency keys, as every receiver does.
a.example (SQLite or PostgreSQL) takes wrk's POSTs on its outward listener
and sends them to b.example over mutual TLS; the C{--destinations} domains
C{d0.example ...} are all served by b.example, so that the queue has that
many destinations to deliver to in parallel:

- C{direct}: C{POST /rpc/b.example/brig/on-bench}, answered with the
  remote's answer (the baseline);
- C{queued-sqlite-1}: the same with C{Fedserver-Delivery: queued}, answered
  202 once committed, to one destination (delivered one at a time, in
  order);
- C{queued-sqlite}: queued, spread over the destinations;
- C{queued-postgresql}: the same with a.example on PostgreSQL;
- C{queued-postgresql-2}: two a.example processes (workers) on one
  PostgreSQL database, each loaded by its own wrk with half the connections.

Each call's body carries its own id.  wrk loads for C{--seconds}; for the
queued scenarios the bench then waits until a.example's workers have
delivered every call committed to the queue (the destinations' sequence
numbers in a.example's database say how many;
C{fedserver_queue_attempts_total} on C{/metrics} counts the deliveries).
It reports the calls accepted per second (wrk), the calls delivered per
second (from the start of the load to the last delivery), the drain time
after the load and CPU ms per call over every process, and checks that the
calls a.example took, the calls it delivered, the calls the component ran
and the distinct bodies the component saw are the same number (none lost,
none run twice).  Prints a table and ratios, writes
bench/results/queue-latest.json (and --json FILE).  Exits 0 when
everything ran and the checks pass, 1 otherwise, 2 when wrk is missing.
Every process it starts is stopped, and
the PostgreSQL database dropped, before it exits, also on Ctrl-C.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import secrets
import sys
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple
from urllib.parse import urlsplit, urlunsplit

from run import (
    BENCH,
    BIN,
    Processes,
    ScenarioError,
    add_output_arguments,
    cpu_seconds,
    finish,
    finish_profile,
    free_port,
    interrupted_exit,
    machine,
    now,
    peak_rss_mb,
    py_spy_missing,
    record_profile,
    run_scenarios,
    run_wrk,
    start_fedserver,
    start_work,
    wrk_cells,
    wrk_missing,
)

A, B = ("a.example", "fed.a.example"), ("b.example", "fed.b.example")
RPC = "on-bench"
#: the body of each call: C{%s} becomes the call's own id (the worker and a counter)
BODY = '{"conversation":"5a4d7f2e-9c1b-4e0a-8f3d-2b6c1e9a7d40","message":"hello, b.example","n":"%s"}'
#: seconds the queue may take to empty after the load, at most
DRAIN_WAIT = 600.0
POSTGRESQL = os.environ.get("FEDSERVER_BENCH_POSTGRESQL", "postgresql://127.0.0.1:5432/postgres")

#: name -> (what it measures, storage, destinations ("one" or "all"), workers, queued)
SCENARIOS: Dict[str, Tuple[str, str, str, int, bool]] = {
    "direct": ("direct calls, answered with the remote's answer", "sqlite", "one", 1, False),
    "queued-sqlite-1": ("queued, one destination, SQLite", "sqlite", "one", 1, True),
    "queued-sqlite": ("queued, all destinations, SQLite", "sqlite", "all", 1, True),
    "queued-postgresql": ("queued, all destinations, PostgreSQL", "postgresql", "all", 1, True),
    "queued-postgresql-2": ("queued, all destinations, PostgreSQL, two workers", "postgresql", "all", 2, True),
}


class Database:
    """A PostgreSQL database of the bench's own, dropped by L{drop}."""

    def __init__(self, admin_url: str) -> None:
        import psycopg

        try:
            self._admin = psycopg.connect(admin_url, autocommit=True, connect_timeout=5)
        except psycopg.Error as e:
            raise ScenarioError(f"PostgreSQL does not answer at {admin_url}: {str(e).strip()[:200]} "
                                "(--postgresql URL names another server)") from None
        self.name = f"fedserver_bench_{secrets.token_hex(6)}"
        self._admin.execute(f"CREATE DATABASE {self.name} TEMPLATE template0 ENCODING 'UTF8' "
                            "LC_COLLATE 'C' LC_CTYPE 'C'")
        self.url = urlunsplit(urlsplit(admin_url)._replace(path="/" + self.name))
        self._schemas = 0

    def schema(self) -> str:
        """The URL of a fresh schema in the database, for one scenario."""
        import psycopg

        self._schemas += 1
        name = f"scenario_{self._schemas}"
        with psycopg.connect(self.url, autocommit=True, connect_timeout=5) as connection:
            connection.execute(f"CREATE SCHEMA {name}")
        return f"{self.url}?options=-csearch_path%3D{name}"

    def drop(self) -> None:
        self._admin.execute(f"DROP DATABASE IF EXISTS {self.name} WITH (FORCE)")
        self._admin.close()


class Bench:
    """The work folder, the PKI, the component and how the scenarios start."""

    def __init__(self, workdir: str, processes: Processes, args: argparse.Namespace) -> None:
        from fedserver.pki import issue, make_ca, write_issued

        self.workdir, self.processes, self.args = workdir, processes, args
        pki = os.path.join(workdir, "pki")
        os.makedirs(pki)
        ca = make_ca("fedserver queue bench CA")
        self.ca_path, _ = write_issued(pki, "ca", ca)
        self.tls = {infra: write_issued(pki, infra, issue(ca, [infra]), chain=[ca]) for _, infra in (A, B)}
        self.destinations = [f"d{i}.example" for i in range(args.destinations)]
        self.database: Optional[Database] = None
        self.component_port = free_port()
        self.component = processes.start("component", [sys.executable, os.path.join(BENCH, "component.py"),
                                                       "--port", str(self.component_port)], [self.component_port])

    def script(self, destinations: List[str], queued: bool, worker: str) -> str:
        """A wrk script POSTing a body with its own id (C{worker}, a counter) to C{destinations} in turn."""
        path = os.path.join(self.workdir, f"{worker}.lua")
        delivery = "queued" if queued else "direct"
        names = ", ".join(f'"{d}"' for d in destinations)
        with open(path, "w") as f:
            f.write(f'local destinations = {{{names}}}\nlocal n = 0\n'
                    f'wrk.method = "POST"\n'
                    'wrk.headers["Content-Type"] = "application/json"\n'
                    f'wrk.headers["Fedserver-Delivery"] = "{delivery}"\n'
                    'request = function()\n'
                    '  n = n + 1\n'
                    f'  local body = string.format(\'{BODY}\', "{worker}-" .. n)\n'
                    f'  return wrk.format(nil, "/rpc/" .. destinations[n % #destinations + 1] .. "/brig/{RPC}", '
                    'nil, body)\n'
                    'end\n')
        return path

    def config(self, own: Tuple[str, str], *, inward: int, outward: int, data: str, discovery: Dict[str, Any],
               allow: Sequence[str], database: Optional[str] = None,
               components: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
        cert, key = self.tls[own[1]]
        config: Dict[str, Any] = {
            "server": {"backend_domain": own[0], "infra_domain": own[1], "data_dir": os.path.join(self.workdir, data)},
            "inward": {"listen": f"tcp:{inward}:interface=127.0.0.1"},
            "outward": {"listen": f"tcp:{outward}:interface=127.0.0.1"},
            "tls": {"certificate": cert, "private_key": key, "ca_certificates": [self.ca_path]},
            "discovery": {"plugin": "static", "domains": discovery},
            "authenticator": {"plugin": "mtls"},
            "authorizers": [{"plugin": "allow-list", "domains": list(allow)}],
            "logging": {"format": "text"},
        }
        if database is not None:
            config["storage"] = {"database": database}
        if components:
            config["components"] = components
        return config

    def start(self, name: str, storage: str, workers: int) -> Tuple[Dict[str, Any], List[int], str]:
        """
        b.example and C{workers} a.example processes: the processes, a's
        outward ports and a's database (a PostgreSQL URL, or the SQLite
        file of its one worker).
        """
        b_in, b_out = free_port(), free_port()
        a_ports = [(free_port(), free_port()) for _ in range(workers)]
        served_by_b = {"infra_domain": B[1], "host": "127.0.0.1", "port": b_in}
        b = start_fedserver(self.processes, f"{name}-b", self.config(
            B, inward=b_in, outward=b_out, data=f"var/{name}-b",
            discovery={A[0]: {"infra_domain": A[1], "host": "127.0.0.1", "port": a_ports[0][0]}}, allow=[A[0]],
            components={"brig": {"plugin": "http-forward", "url": f"http://127.0.0.1:{self.component_port}"}},
        ), [b_in, b_out])
        database = None
        if storage == "postgresql":
            if self.database is None:
                self.database = Database(self.args.postgresql)
            database = self.database.schema()
        a_database = database or os.path.join(self.workdir, f"var/{name}-a", "fedserver.sqlite")
        processes: Dict[str, Any] = {"b": b}
        for i, (a_in, a_out) in enumerate(a_ports):
            label = "a" if workers == 1 else f"a{i + 1}"
            processes[label] = start_fedserver(self.processes, f"{name}-{label}", self.config(
                A, inward=a_in, outward=a_out, data=f"var/{name}-{label}", database=database,
                discovery={B[0]: served_by_b, **{d: served_by_b for d in self.destinations}},
                allow=[B[0], *self.destinations],
            ), [a_in, a_out])
        return processes, [out for _, out in a_ports], a_database


def metric_sum(port: int, name: str, **labels: str) -> float:
    """The sum of metric C{name}'s samples (with C{labels}) on 127.0.0.1:C{port}/metrics."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        connection.request("GET", "/metrics")
        text = connection.getresponse().read().decode()
    finally:
        connection.close()
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        series, _, value = line.rpartition(" ")
        if all(f'{key}="{wanted}"' in series for key, wanted in labels.items()):
            total += float(value)
    return total


def delivered_by(a_outward: List[int]) -> float:
    """The calls a.example's queue workers delivered so far."""
    return sum(metric_sum(port, "fedserver_queue_attempts_total", outcome="delivered") for port in a_outward)


def queued_once(port: int, destination: str, queued: bool) -> None:
    """One call through the outward listener, which must be answered 202 (queued) or 200 (direct)."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        connection.request("POST", f"/rpc/{destination}/brig/{RPC}", body=BODY % f"first-{port}", headers={
            "Content-Type": "application/json", "Fedserver-Delivery": "queued" if queued else "direct"})
        response = connection.getresponse()
        body = response.read()
    finally:
        connection.close()
    if response.status != (202 if queued else 200):
        raise ScenarioError(f"the first call to {destination} was answered {response.status} {body[:300]!r}")


def measure(bench: Bench, name: str) -> Dict[str, Any]:
    title, storage, spread, workers, queued = SCENARIOS[name]
    args = bench.args
    destinations = [B[0]] if spread == "one" else bench.destinations
    processes, a_outward, a_database = bench.start(name, storage, workers)
    try:
        for port in a_outward:
            queued_once(port, destinations[0], queued)
        if queued:
            wait_delivered(a_outward, len(a_outward))
        taken_before = queued_in(a_database) if queued else 0
        component_before = component_stats(bench.component_port)
        delivered_before = delivered_by(a_outward)
        scripts = [bench.script(destinations, queued, f"{name}-{worker}") for worker in range(workers)]
        share = argparse.Namespace(threads=1, connections=max(1, args.connections // workers))
        busy = [*processes.values(), bench.component]
        cpu_before = sum(cpu_seconds(p.pid) for p in busy)
        spies = ({label: record_profile(p.pid, os.path.join(bench.workdir, f"profile-{name}-{label}.txt"),
                                        args.seconds)
                  for label, p in processes.items()} if args.profile else {})
        started = time.monotonic()
        targets = [(f"http://127.0.0.1:{port}/", script) for port, script in zip(a_outward, scripts, strict=True)]
        results = _parallel_wrk(targets, args.seconds, share)
        loaded = time.monotonic() - started
        component_calls = component_stats(bench.component_port)["calls"] - component_before["calls"]
        if queued:
            # every call committed to a.example's queue: wrk stopped without reading the answers of the
            # last few, which may still be committing; so until no more come
            taken = -1
            while taken != (taken := queued_in(a_database) - taken_before):
                wait_delivered(a_outward, delivered_before + taken)
        else:
            taken = component_calls  # a direct call is only known taken once it ran
        drained = time.monotonic() - started if queued else loaded
        cpu = sum(cpu_seconds(p.pid) for p in busy) - cpu_before
        component = component_stats(bench.component_port)
        delivered = int(delivered_by(a_outward) - delivered_before) if queued else taken
        result = _combine(results, seconds=loaded)
        if spies:
            result["profile"] = {label: finish_profile(*spy) for label, spy in spies.items()}
        result.update({
            "title": title,
            "taken": taken,
            "delivered": delivered,
            "component_calls": component["calls"] - component_before["calls"],
            "component_distinct": component["distinct"] - component_before["distinct"],
            "delivered_per_s": delivered / drained if drained else None,
            "drain_s": max(0.0, drained - loaded),
            "cpu_ms_per_request": cpu * 1000 / taken if taken else None,
            "peak_rss_mb": {label: peak_rss_mb(p.pid) for label, p in processes.items()},
        })
        return result
    finally:
        bench.processes.stop(processes.values())


def queued_in(database: str) -> int:
    """
    The calls ever committed to a.example's queue: each destination numbers
    its items from 1 (C{next_seq}), in the transaction that queues them.
    """
    sql = "SELECT COALESCE(SUM(next_seq - 1), 0) FROM fedserver_queue_destinations"
    if database.startswith("postgresql"):
        import psycopg

        with psycopg.connect(database, autocommit=True, connect_timeout=10) as connection:
            row = connection.execute(sql).fetchone()
    else:
        import sqlite3

        with contextlib.closing(sqlite3.connect(f"file:{database}?mode=ro", uri=True, timeout=10)) as connection:
            row = connection.execute(sql).fetchone()
    return int(row[0]) if row else 0


def component_stats(port: int) -> Dict[str, int]:
    """The calls the component answered and their distinct bodies, so far."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        connection.request("GET", "/stats")
        return dict(json.loads(connection.getresponse().read()))
    finally:
        connection.close()


def _parallel_wrk(targets: List[Tuple[str, str]], seconds: float, share: argparse.Namespace) -> List[Dict[str, Any]]:
    """wrk against every (URL, script) at once (one per worker): their results."""
    import concurrent.futures

    with concurrent.futures.ThreadPoolExecutor(len(targets)) as pool:
        return list(pool.map(lambda target: run_wrk(target[0], target[1], seconds, share), targets))


def _combine(results: List[Dict[str, Any]], seconds: float) -> Dict[str, Any]:
    """One wrk result of several run side by side: requests added, latencies the worst."""
    return {
        "requests": sum(r["requests"] for r in results),
        "requests_per_s": sum(r["requests_per_s"] for r in results),
        "latency_ms": {p: max(r["latency_ms"][p] for r in results) for p in ("50", "90", "99")},
        "errors": sum(r["errors"] for r in results),
        "status_errors": sum(r["status_errors"] for r in results),
        "load_s": seconds,
    }


def wait_delivered(a_outward: List[int], total: float) -> None:
    """Wait until a.example's workers have delivered C{total} calls in all (their C{/metrics})."""
    deadline = time.monotonic() + DRAIN_WAIT
    while (delivered := delivered_by(a_outward)) < total:
        if time.monotonic() > deadline:
            raise ScenarioError(f"{total - delivered:.0f} calls are still not delivered after {DRAIN_WAIT:.0f} s")
        time.sleep(0.02)


def ratios(results: Dict[str, Dict[str, Any]]) -> Dict[str, float]:
    def rate(name: str, key: str) -> Optional[float]:
        return results.get(name, {}).get(key)

    pairs = {
        "queued-sqlite accepted / direct": (rate("queued-sqlite", "requests_per_s"), rate("direct", "requests_per_s")),
        "queued-sqlite delivered / direct": (rate("queued-sqlite", "delivered_per_s"),
                                             rate("direct", "requests_per_s")),
        "queued-sqlite delivered / queued-sqlite-1": (rate("queued-sqlite", "delivered_per_s"),
                                                      rate("queued-sqlite-1", "delivered_per_s")),
        "queued-postgresql delivered / queued-sqlite": (rate("queued-postgresql", "delivered_per_s"),
                                                        rate("queued-sqlite", "delivered_per_s")),
        "queued-postgresql-2 delivered / queued-postgresql": (rate("queued-postgresql-2", "delivered_per_s"),
                                                              rate("queued-postgresql", "delivered_per_s")),
    }
    return {pair: mine / theirs for pair, (mine, theirs) in pairs.items() if mine and theirs}


def checks(results: Dict[str, Dict[str, Any]]) -> List[Dict[str, str]]:
    """
    Every call a.example took (committed to its queue; for a direct call,
    ran at the component) was delivered once and ran once at the
    component, which saw each call's own body once; nothing failed.
    """
    found = []
    for name, r in results.items():
        if "error" in r:
            continue
        ok = (r["taken"] == r["delivered"] == r["component_calls"] == r["component_distinct"]
              and r["errors"] == 0)
        found.append({"result": "PASS" if ok else "FAIL",
                      "check": f"{name}: every call taken was delivered and ran once",
                      "detail": f"{r['taken']} taken, {r['delivered']} delivered, {r['component_calls']} ran at "
                                f"the component ({r['component_distinct']} distinct), {r['errors']} errors"})
    return found


def report(document: Dict[str, Any]) -> str:
    settings = document["settings"]
    lines = [f"fedserver queue bench: {settings['seconds']:g} s of load per scenario, {settings['connections']} "
             f"connections, {settings['destinations']} destinations, {document['machine']['cpus']} CPUs", "",
             f"{'scenario':<22} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'errors':>7} {'CPU ms/req':>10} "
             f"{'delivered/s':>11} {'drain s':>8}  peak RSS MB"]
    for name, r in document["scenarios"].items():
        if "error" in r:
            lines.append(f"{name:<22} could not run: {r['error'].splitlines()[0]}")
            continue
        rss = ", ".join(f"{label} {mb:.0f}" for label, mb in r["peak_rss_mb"].items() if mb is not None)
        lines.append(f"{name:<22} {wrk_cells(r, cpu_digits=2)} {r['delivered_per_s']:>11.0f} "
                     f"{r['drain_s']:>8.1f}  {rss}")
    lines.append("")
    for pair, ratio in document["ratios"].items():
        lines.append(f"{pair:<52} {ratio:5.2f} x")
    for name, r in document["scenarios"].items():
        for label, profile in r.get("profile", {}).items():
            lines += ["", f"profile of {name} {label} ({profile.get('samples', 0)} samples, py-spy)"]
            if "error" in profile:
                lines.append(f"  {profile['error']}")
                continue
            for kind in ("own", "inclusive"):
                lines.append(f"  {kind}:")
                lines += [f"    {row['share'] * 100:5.1f} %  {row['function']}" for row in profile[kind]]
    lines.append("")
    for c in document["checks"]:
        lines.append(f"{c['result']:<4}  {c['check']}: {c['detail']}")
    return "\n".join(lines)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0] + " (see bench/README.md)")
    parser.add_argument("--seconds", type=float, default=5, help="seconds of load per scenario (default 5)")
    parser.add_argument("--connections", type=int, default=32, help="wrk connections (default 32)")
    parser.add_argument("--destinations", type=int, default=8,
                        help="destination domains of the spread scenarios (default 8)")
    parser.add_argument("--postgresql", default=POSTGRESQL, metavar="URL",
                        help=f"a PostgreSQL server where the bench may create a database (default {POSTGRESQL})")
    parser.add_argument("--profile", action="store_true",
                        help="record each fedserver process with py-spy during the load and print where the time went")
    parser.add_argument("--only", action="append", choices=list(SCENARIOS), metavar="SCENARIO",
                        help=f"run only this scenario (repeatable): {', '.join(SCENARIOS)}")
    add_output_arguments(parser)
    args = parser.parse_args(argv)
    if args.seconds <= 0 or args.connections < 2 or not 1 <= args.destinations <= 100:
        parser.error("need --seconds > 0, --connections >= 2 and 1 <= --destinations <= 100")
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    if wrk_missing() or (args.profile and py_spy_missing()):
        return 2
    if not os.path.exists(os.path.join(BIN, "twistd")):
        print(f"bench: no twistd next to {sys.executable}: run this with the Python fedserver is installed in",
              file=sys.stderr)
        return 1
    workdir, processes = start_work("fedserver-queue-bench-")

    def drop_database(bench: Optional[Bench]) -> None:
        if bench is not None and bench.database is not None:
            bench.database.drop()

    results, interrupted = run_scenarios(
        {name: SCENARIOS[name][0] for name in args.only or SCENARIOS}, processes,
        lambda: Bench(workdir, processes, args), measure, drop_database,
    )
    if interrupted:
        return interrupted_exit(workdir)
    document: Dict[str, Any] = {
        "when": now(),
        "machine": machine(),
        "settings": {"seconds": args.seconds, "connections": args.connections, "destinations": args.destinations,
                     "body_bytes": len(BODY)},
        "scenarios": results,
        "ratios": ratios(results),
        "checks": checks(results),
    }
    print(report(document))
    failed = any("error" in r for r in results.values()) or any(c["result"] != "PASS" for c in document["checks"])
    return finish(document, "queue-latest.json", args, workdir, failed)


if __name__ == "__main__":
    sys.exit(main())
