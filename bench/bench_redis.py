"""Benchmark the Redis backplane against the in-memory one.

A program, not a test. For each backplane it starts server processes
(gevent.pywsgi + one SSEBroker, topic ``bench``):

* ``memory``: one process, the default in-memory backplane;
* ``redis``: two processes A and B sharing one Redis (a redis-server started
  here, or ``--redis-url``). Events are published on A; half the
  subscribers are on A ("local"), half on B ("remote").

Subscribers are raw-socket SSE readers in this process (gevent). Measured:

* latency: paced events carry their publish time; arrival minus publish,
  median and p99, for local and remote subscribers (what the backplane adds
  is the difference with the ``memory`` row);
* deliveries per second: a burst of events published back to back,
  subscribers x burst / (last arrival - first publish). ``--publish many``
  (default) publishes the burst with ``SSEBroker.publish_many`` in chunks of
  64 (one pipeline per chunk on Redis); ``--publish single`` calls
  ``publish()`` per event (it returns once the event is queued;
  ``--publish-wait 0.05`` makes it wait for each Redis id, as before 2026-12-06);
* lost: events a subscriber never received (must be 0; subscriber buffers
  are large so drop-oldest never triggers).

Usage::

    python bench/bench_redis.py                     # 100 subscribers, 2000-event burst
    python bench/bench_redis.py -n 10 --paced 5 --burst 50   # smoke run

Everything shares the machine's cores (clients, servers, Redis), so the
figures compare backplanes; they are not absolute capacities.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.abspath(__file__)
PUBLISH = "many"  # how the servers publish a burst (--publish)
PUBLISH_WAIT: float | None = None  # the servers' RedisBackplane(publish_wait=...); None: default
ROOT = os.path.dirname(os.path.dirname(HERE))


def run_server(args: argparse.Namespace) -> None:
    from gevent import monkey

    monkey.patch_all()
    import gevent
    from gevent.pywsgi import WSGIServer

    from gstream.broker import SSEBroker
    from gstream.events import Event

    backplane = None
    if args.backplane == "redis":
        from gstream.backplane.redis import RedisBackplane

        extra = {} if args.publish_wait is None else {"publish_wait": args.publish_wait}
        backplane = RedisBackplane(args.redis_url, maxlen=100_000, **extra)
    broker = SSEBroker(topic="bench", backplane=backplane, default_buffer=65536,
                       max_buffer=65536, heartbeat_interval=None, history_size=16)

    def app(environ, start_response):  # type: ignore[no-untyped-def]
        path = environ.get("PATH_INFO")
        if path == "/events":
            return broker.subscribe(environ, start_response)
        if path == "/run":
            q = dict(p.split("=", 1) for p in environ["QUERY_STRING"].split("&") if "=" in p)
            count, interval = int(q["count"]), float(q.get("interval", "0"))
            if not interval and args.publish == "many":
                for start in range(0, count, 64):
                    broker.publish_many([Event(data=f"{q['tag']} {i} {time.time():.6f}")
                                         for i in range(start, min(count, start + 64))])
                    gevent.sleep(0)  # let the reader/subscribers run during a burst
                count = 0
            for i in range(count):
                broker.publish(Event(data=f"{q['tag']} {i} {time.time():.6f}"))
                if interval:
                    gevent.sleep(interval)
                elif i % 64 == 63:
                    gevent.sleep(0)  # let the reader/subscribers run during a burst
            start_response("200 OK", [("Content-Type", "text/plain")])
            return [b"ok"]
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [str(broker.subscriber_count).encode()]

    server = WSGIServer(("127.0.0.1", 0), app, log=None)
    server.start()
    print(server.address[1], flush=True)
    server.serve_forever()


class Sub:
    """One SSE subscriber: records (tag, index, latency) of every event."""

    def __init__(self, port: int, group: str) -> None:
        from tests.helpers import SSEStream

        self.group = group
        self.stream = SSEStream(port, "/events", timeout=60)
        self.seen: dict[str, list[tuple[int, float, float]]] = {}

    def run(self) -> None:
        from gstream.sseparse import EventStreamParser

        parser = EventStreamParser()
        reader = self.stream.reader
        while True:
            chunk = reader.read_chunk()
            if chunk is None:
                return
            now = time.time()
            for ev in parser.feed(chunk):
                tag, i, ts = ev.data.split()
                self.seen.setdefault(tag, []).append((int(i), float(ts), now))


def start_server(backplane: str, redis_url: str) -> tuple[subprocess.Popen[str], int]:
    env = dict(os.environ, PYTHONPATH=ROOT)
    p = subprocess.Popen([sys.executable, HERE, "--role", "server", "--backplane", backplane,
                          "--redis-url", redis_url, "--publish", PUBLISH,
                          *(["--publish-wait", str(PUBLISH_WAIT)] if PUBLISH_WAIT is not None
                            else [])], env=env,
                         stdout=subprocess.PIPE, text=True)
    assert p.stdout is not None
    return p, int(p.stdout.readline())


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


def bench(backplane: str, args: argparse.Namespace, redis_url: str) -> dict:
    import gevent
    import requests

    procs = [start_server(backplane, redis_url)]
    if backplane == "redis":
        procs.append(start_server(backplane, redis_url))
    try:
        ports = [port for _, port in procs]
        subs = []
        for i in range(args.n):
            on_b = backplane == "redis" and i % 2 == 1
            subs.append(Sub(ports[1] if on_b else ports[0], "remote" if on_b else "local"))
        readers = [gevent.spawn(s.run) for s in subs]
        pub = f"http://127.0.0.1:{ports[0]}/run"
        requests.get(pub, params={"tag": "warm", "count": 5}, timeout=60)
        requests.get(pub, params={"tag": "paced", "count": args.paced,
                                  "interval": args.interval}, timeout=600)
        t0 = time.time()
        requests.get(pub, params={"tag": "burst", "count": args.burst}, timeout=600)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and any(
                len(s.seen.get("burst", ())) < args.burst for s in subs):
            gevent.sleep(0.05)
        row: dict = {"backplane": backplane, "subscribers": args.n}
        for group in ("local", "remote"):
            lat = [(now - ts) * 1000 for s in subs if s.group == group
                   for _, ts, now in s.seen.get("paced", ())]
            row[f"{group}_p50_ms"] = round(pct(lat, 0.5), 3) if lat else None
            row[f"{group}_p99_ms"] = round(pct(lat, 0.99), 3) if lat else None
        last = max((now for s in subs for _, _, now in s.seen.get("burst", ())), default=t0)
        got = sum(len(s.seen.get("burst", ())) for s in subs)
        row["deliveries_per_s"] = round(got / max(last - t0, 1e-9))
        row["lost"] = sum(args.paced + args.burst - len(s.seen.get("paced", ()))
                          - len(s.seen.get("burst", ())) for s in subs)
        row["in_order"] = all([i for i, _, _ in s.seen.get("burst", ())] == sorted(
            i for i, _, _ in s.seen.get("burst", ())) for s in subs)
        gevent.killall(readers, timeout=2)
        for s in subs:
            s.stream.close()
        return row
    finally:
        for p, _ in procs:
            p.kill()
            p.wait(5)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--role", default="bench", choices=("bench", "server"))
    ap.add_argument("--backplane", default="memory", choices=("memory", "redis"))
    ap.add_argument("--redis-url", default="", help="use this Redis instead of starting one")
    ap.add_argument("-n", type=int, default=100, help="subscribers (split over A and B)")
    ap.add_argument("--paced", type=int, default=50, help="paced events for latency")
    ap.add_argument("--interval", type=float, default=0.02, help="seconds between paced events")
    ap.add_argument("--burst", type=int, default=2000, help="events in the throughput burst")
    ap.add_argument("--publish", default="many", choices=("many", "single"),
                    help="burst with publish_many (chunks of 64) or publish() per event")
    ap.add_argument("--publish-wait", type=float, default=None,
                    help="RedisBackplane(publish_wait=...) (default: the backplane's, 0: "
                         "publish() never waits for ids); 0.05 was the default before")
    ap.add_argument("--json", help="also write the rows to this file")
    args = ap.parse_args()
    global PUBLISH, PUBLISH_WAIT
    PUBLISH, PUBLISH_WAIT = args.publish, args.publish_wait
    if args.role == "server":
        run_server(args)
        return
    from gevent import monkey

    monkey.patch_all()
    sys.path.insert(0, ROOT)
    redis = None
    url = args.redis_url
    if not url:
        from tests.redis_fixture import RedisServer

        redis = RedisServer()
        redis.start()
        url = redis.url
    try:
        rows = [bench("memory", args, url), bench("redis", args, url)]
    finally:
        if redis is not None:
            redis.stop()
    cols = ["backplane", "subscribers", "local_p50_ms", "local_p99_ms", "remote_p50_ms",
            "remote_p99_ms", "deliveries_per_s", "lost", "in_order"]
    print(" | ".join(cols))
    print(" | ".join("---" for _ in cols))
    for row in rows:
        print(" | ".join(str(row[c]) for c in cols))
    base, red = rows[0]["local_p50_ms"], rows[1]
    print(f"\nadded p50 latency: local {red['local_p50_ms'] - base:.3f} ms, "
          f"remote {red['remote_p50_ms'] - base:.3f} ms; throughput ratio redis/memory "
          f"{red['deliveries_per_s'] / max(rows[0]['deliveries_per_s'], 1):.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
