"""Benchmark the SSEBroker: fan-out throughput, latency and memory per subscriber.

A program, not a test. It starts one server process (gevent.pywsgi + one
SSEBroker) and, for each N, several load-generator processes holding N raw
socket subscribers between them (each process binds its own 127.0.0.x
source address). Then it measures:

* server RSS per idle subscriber (KiB): (RSS with N idle streams - RSS
  before) / N, read from /proc/PID/status;
* publish-to-last-delivery latency: the server publishes paced events that
  carry their publish timestamp; for each event, the latest arrival over all
  N subscribers minus that timestamp; median and p99 over the events;
* deliveries per second: a burst of events published back to back, N x
  burst / (last arrival - first publish);
* losses: every client must receive every event exactly once, in order.

Usage::

    python bench/bench_broker.py                      # N = 1000 and 10000
    python bench/bench_broker.py -n 50 --paced 10 --burst 50 --json out.json

Clients are Python too, so on a small machine they compete with the server
for CPU; the figures are a floor, not a ceiling.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
import urllib.request

HERE = os.path.abspath(__file__)
ROOT = os.path.dirname(os.path.dirname(HERE))


def raise_fd_limit() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


# -- server process ----------------------------------------------------------

def run_server(args: argparse.Namespace) -> None:
    from gevent import monkey

    monkey.patch_all()
    import gc
    from urllib.parse import parse_qs

    import gevent
    from gevent.pywsgi import WSGIServer

    sys.path.insert(0, ROOT)
    from gstream import Event
    from gstream.broker import SSEBroker

    raise_fd_limit()
    broker = SSEBroker(topic="bench", heartbeat_interval=args.heartbeat, max_buffer=4096,
                       history_size=256)

    def publish(q: dict[str, list[str]]) -> dict[str, object]:
        phase = q.get("phase", ["p"])[0]
        count = int(q.get("count", ["10"])[0])
        interval = float(q.get("interval", ["0"])[0])
        t0 = time.time()
        for i in range(count):
            broker.publish(Event(data=f"{phase}:{i}:{time.time():.6f}"))
            if interval:
                gevent.sleep(interval)
        return {"first": t0, "last": time.time()}

    def app(environ, start_response):  # type: ignore[no-untyped-def]
        path = environ["PATH_INFO"]
        if path == "/events":
            return broker.subscribe(environ, start_response)
        q = parse_qs(environ.get("QUERY_STRING", ""))
        if path == "/publish":
            body = publish(q)
        elif path == "/stats":
            gc.collect()
            body = dict(broker.stats(), rss_kib=rss_kib(os.getpid()))
        else:
            start_response("404 Not Found", [])
            return [b""]
        start_response("200 OK", [("Content-Type", "application/json")])
        return [json.dumps(body).encode()]

    server = WSGIServer(("127.0.0.1", args.port), app, log=None, backlog=4096)
    server.start()
    print(server.server_port, flush=True)
    server.serve_forever()


# -- load generator process --------------------------------------------------

def run_clients(args: argparse.Namespace) -> None:
    from gevent import monkey

    monkey.patch_all()
    import socket

    import gevent
    from gevent.pool import Pool

    raise_fd_limit()
    expected = {"p": args.paced, "b": args.burst}
    total = args.paced + args.burst
    counts: list[int] = [0] * args.count
    errors: list[str] = []
    worst: dict[str, list[float]] = {}  # "phase:seq" -> [publish ts, latest arrival]

    def client(k: int) -> None:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.bind((args.source, 0))
        s.connect(("127.0.0.1", args.port))
        s.sendall(b"GET /events?buffer=4096 HTTP/1.1\r\nHost: bench\r\n\r\n")
        buf = b""
        while b"\r\n\r\n" not in buf:
            chunk = s.recv(4096)
            if not chunk:
                errors.append("closed during handshake")
                return
            buf += chunk
        ready.append(k)
        last = {"p": -1, "b": -1}
        got = 0
        while got < total:
            data = s.recv(65536)
            now = time.time()
            if not data:
                errors.append(f"client {k}: EOF after {got}")
                break
            buf += data
            cut = buf.rfind(b"\n\n")
            if cut < 0:
                continue
            frames, buf = buf[: cut + 2], buf[cut + 2 :]
            start = 0
            while True:
                i = frames.find(b"data: ", start)
                if i < 0:
                    break
                j = frames.find(b"\n", i)
                phase, seq, ts = frames[i + 6 : j].decode().split(":")
                n = int(seq)
                if n != last[phase] + 1:
                    errors.append(f"client {k}: {phase} {last[phase]} -> {n}")
                last[phase] = n
                key = f"{phase}:{seq}"
                w = worst.get(key)
                if w is None:
                    worst[key] = [float(ts), now]
                elif w[1] < now:
                    w[1] = now
                got += 1
                start = j
        counts[k] = got
        s.close()

    ready: list[int] = []
    pool = Pool(args.count)
    for k in range(args.count):
        pool.spawn(client, k)
        if k % 200 == 199:
            gevent.sleep(0.01)  # stay under the listen backlog
    with gevent.Timeout(args.timeout, False):
        while len(ready) < args.count and not errors:
            gevent.sleep(0.05)
    print("READY" if len(ready) == args.count else f"FAILED {errors[:3]}", flush=True)
    finished = pool.join(timeout=args.timeout)
    result = {
        "clients": args.count,
        "complete": sum(1 for c in counts if c == total),
        "lost": sum(total - c for c in counts),
        "errors": errors[:10],
        "timed_out": not finished,
        "worst": worst,
        "expected": expected,
    }
    print(json.dumps(result), flush=True)
    pool.kill()


# -- orchestration -----------------------------------------------------------

def http_json(port: int, path: str, timeout: float = 120) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout) as r:
        return json.loads(r.read())


def bench_one(port: int, server_pid: int, n: int, args: argparse.Namespace) -> dict:
    before = http_json(port, "/stats")
    per = [n // args.procs + (1 if i < n % args.procs else 0) for i in range(args.procs)]
    procs = []
    for i, count in enumerate(c for c in per if c):
        cmd = [sys.executable, HERE, "--client", "--port", str(port), "--count", str(count),
               "--source", f"127.0.0.{10 + i}", "--paced", str(args.paced),
               "--burst", str(args.burst), "--timeout", str(args.timeout)]
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True))
    for p in procs:
        line = p.stdout.readline().strip() if p.stdout else ""
        if line != "READY":
            for q in procs:
                q.kill()
            raise SystemExit(f"client process failed to connect: {line}")
    time.sleep(1.0)  # let the server settle with N idle streams
    idle = http_json(port, "/stats")
    assert idle["subscribers"] == n + before["subscribers"], idle
    per_sub = (idle["rss_kib"] - before["rss_kib"]) / n
    http_json(port, f"/publish?phase=p&count={args.paced}&interval={args.interval}")
    time.sleep(0.5)
    burst = http_json(port, f"/publish?phase=b&count={args.burst}&interval=0")
    results = [json.loads(p.stdout.read() if p.stdout else "{}") for p in procs]
    for p in procs:
        p.wait(timeout=30)
    worst: dict[str, list[float]] = {}
    for r in results:
        for k, (ts, arrival) in r["worst"].items():
            w = worst.setdefault(k, [ts, arrival])
            w[1] = max(w[1], arrival)
    # Latency from the paced events only (a burst measures throughput): the
    # publish timestamp travels in each event's data.
    lat_ms = sorted((worst[f"p:{i}"][1] - worst[f"p:{i}"][0]) * 1000
                    for i in range(args.paced) if f"p:{i}" in worst)
    burst_end = max((worst[f"b:{i}"][1] for i in range(args.burst) if f"b:{i}" in worst),
                    default=0.0)
    deliveries = n * args.burst / max(burst_end - burst["first"], 1e-9)
    lost = sum(r["lost"] for r in results)
    return {
        "subscribers": n,
        "rss_per_idle_kib": round(per_sub, 2),
        "latency_median_ms": round(statistics.median(lat_ms), 2) if lat_ms else None,
        "latency_p99_ms": round(lat_ms[min(len(lat_ms) - 1, int(len(lat_ms) * 0.99))], 2) if lat_ms else None,
        "deliveries_per_s": round(deliveries),
        "lost": lost,
        "complete_clients": sum(r["complete"] for r in results),
        "errors": [e for r in results for e in r["errors"]][:5],
        "server_dropped": http_json(port, "/stats")["dropped"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-n", type=int, action="append", help="subscriber counts (default 1000 and 10000)")
    ap.add_argument("--procs", type=int, default=4, help="load-generator processes")
    ap.add_argument("--paced", type=int, default=20, help="paced events for latency")
    ap.add_argument("--interval", type=float, default=0.1, help="seconds between paced events")
    ap.add_argument("--burst", type=int, default=200, help="back-to-back events for throughput")
    ap.add_argument("--heartbeat", type=float, default=30.0)
    ap.add_argument("--timeout", type=float, default=120.0, help="bound on each phase (s)")
    ap.add_argument("--json", help="also write the results to this file")
    ap.add_argument("--server", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--client", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--count", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--source", default="127.0.0.1", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.server:
        return run_server(args)
    if args.client:
        return run_clients(args)
    hard = raise_fd_limit()
    sizes = args.n or [1000, 10000]
    server = subprocess.Popen([sys.executable, HERE, "--server", "--heartbeat", str(args.heartbeat)],
                              stdout=subprocess.PIPE, text=True)
    rows = []
    try:
        port = int(server.stdout.readline()) if server.stdout else 0
        for n in sizes:
            if n + 100 > hard:
                print(f"skipping N={n}: fd hard limit is {hard}", file=sys.stderr)
                continue
            rows.append(bench_one(port, server.pid, n, args))
    finally:
        server.kill()
        server.wait()
    cols = ["subscribers", "deliveries_per_s", "latency_median_ms", "latency_p99_ms",
            "rss_per_idle_kib", "lost", "server_dropped"]
    print(" | ".join(f"{c:>17}" for c in cols))
    for r in rows:
        print(" | ".join(f"{str(r[c]):>17}" for c in cols))
        if r["errors"]:
            print("  errors:", r["errors"])
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"results": rows, "args": {k: v for k, v in vars(args).items()
                                                 if k not in ("server", "client")}}, f, indent=2)


if __name__ == "__main__":
    main()
