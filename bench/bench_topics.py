"""Benchmark many topics on one SSEBroker: state per topic and per subscriber, publish
cost, and multi-topic fan-out beside single-topic fan-out (docs/topics.md).

A program, not a test. Three parts, one process each (run under
``flock /tmp/gstream-bench.lock``):

* ``state``: 100,000 streams registered through ``broker.stream(environ)``
  (the broker's state only: no socket, no serving greenlet, which cost the
  same for every stream and are measured by bench_broker.py). Bytes from
  tracemalloc, per stream, for: single-topic streams (today's broker);
  multi-topic streams each on its own topic (100,000 topics, one subscriber
  each); multi-topic streams all on one topic. The difference of the last
  two is the state of one idle topic.
* ``publish``: microseconds per publish to one topic with one subscriber, with
  10 topics or 100,000 topics on the broker (O(subscribers of the topic),
  not O(topics)), to a topic nobody subscribes to, and a single-topic publish.
* ``fanout``: N real socket subscribers (127.0.0.1, clients in the same
  process) receive a burst of events: single-topic streams, against
  multi-topic streams on ``feed`` plus a private topic each. Deliveries/s and
  the frame size on the wire.

Usage::

    flock /tmp/gstream-bench.lock python bench/bench_topics.py
    python bench/bench_topics.py --topics 10000 --fanout 200 --burst 100
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import socket
import sys
import time
import tracemalloc
from typing import Any

from gevent import monkey

monkey.patch_all()

import gevent  # noqa: E402
from gevent.pywsgi import WSGIServer  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from gstream.broker import SSEBroker  # noqa: E402
from gstream.lifecycle import lifecycle  # noqa: E402


def environ(query: str) -> dict[str, Any]:
    return {"REQUEST_METHOD": "GET", "QUERY_STRING": query, "PATH_INFO": "/"}


def measure_state(n: int) -> dict[str, float]:
    out: dict[str, float] = {}
    cases = {
        "single_topic_stream": lambda i: "",
        "multi_topic_stream_own_topic": lambda i: f"topic=user/{i}",
        "multi_topic_stream_shared_topic": lambda i: "topic=news",
    }
    for name, query in cases.items():
        broker = SSEBroker(heartbeat_interval=None)
        gc.collect()
        tracemalloc.start()
        before = tracemalloc.get_traced_memory()[0]
        bodies = []
        for i in range(n):
            status, _headers, body = broker.stream(environ(query(i)))
            assert status == "200 OK", status
            bodies.append(body)
        gc.collect()
        after = tracemalloc.get_traced_memory()[0]
        tracemalloc.stop()
        # The prelude bytes are held by the unstarted generator; a served
        # stream drops them after its first write: subtract them.
        out[name] = (after - before) / n
        stats = broker.stats()
        out[name + "_topics"] = stats["topics"]
        for body in bodies:
            body.close()
        broker.close()
        lifecycle.reset()
        del bodies
    out["idle_topic"] = out["multi_topic_stream_own_topic"] - out["multi_topic_stream_shared_topic"]
    out["view_over_single"] = out["multi_topic_stream_shared_topic"] - out["single_topic_stream"]
    return out


def time_publishes(broker: SSEBroker, topics: list[str | None], repeat: int = 3) -> float:
    """Best-of ``repeat`` microseconds per publish, one publish per listed topic."""
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        for topic in topics:
            broker.publish("x" * 64, topic=topic)
        best = min(best, (time.perf_counter() - start) / len(topics) * 1e6)
    return best


def measure_publish(n: int) -> dict[str, float]:
    out: dict[str, float] = {}
    sample = 10_000
    for count in (10, n):
        broker = SSEBroker(heartbeat_interval=None, topic_history=1000)
        bodies = [broker.stream(environ(f"topic=user/{i}"))[2] for i in range(count)]
        targets: list[str | None] = [f"user/{i % count}" for i in range(sample)]
        out[f"one_subscriber_topic_among_{count}_topics_us"] = time_publishes(broker, targets)
        out[f"unsubscribed_topic_among_{count}_topics_us"] = time_publishes(
            broker, [f"nobody/{i}" for i in range(sample)])
        for body in bodies:
            body.close()
        broker.close()
        lifecycle.reset()
    broker = SSEBroker(heartbeat_interval=None)
    bodies = [broker.stream(environ(""))[2]]
    out["single_topic_one_subscriber_us"] = time_publishes(broker, [None] * sample)
    bodies[0].close()
    broker.close()
    lifecycle.reset()
    return out


def reader(port: int, path: str, want: int, done: list[float], sizes: list[int]) -> None:
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nAccept: text/event-stream\r\n\r\n".encode())
    seen, tail, total = 0, b"", 0
    while seen < want:
        chunk = sock.recv(262144)
        if not chunk:
            break
        data = tail + chunk
        seen += data.count(b"\ndata: ")
        tail = data[-6:]
        total += len(chunk)
    done.append(time.perf_counter())
    sizes.append(total)
    sock.close()


def measure_fanout(n: int, burst: int) -> dict[str, float]:
    out: dict[str, float] = {}
    for kind in ("single", "multi"):
        broker = SSEBroker(topic="feed", heartbeat_interval=None, max_buffer=4096,
                           default_buffer=burst + 16)
        server = WSGIServer(("127.0.0.1", 0), broker.subscribe, log=None)
        server.start()
        done: list[float] = []
        sizes: list[int] = []
        paths = ["/" if kind == "single" else f"/?topic=feed&topic=user/{i}" for i in range(n)]
        readers = [gevent.spawn(reader, server.server_port, p, burst, done, sizes) for p in paths]
        deadline = time.monotonic() + 60
        while broker.subscriber_count < n and time.monotonic() < deadline:
            gevent.sleep(0.05)
        assert broker.subscriber_count == n, broker.subscriber_count
        gevent.sleep(0.2)
        payload = json.dumps({"seq": 0, "text": "x" * 80})
        start = time.perf_counter()
        for i in range(burst):
            broker.publish(payload)
            if i % 16 == 15:
                gevent.sleep(0)
        gevent.joinall(readers, timeout=120)
        took = max(done) - start
        out[f"{kind}_deliveries_per_s"] = n * burst / took
        out[f"{kind}_bytes_per_event"] = (sum(sizes) / n) / burst
        server.stop(timeout=1)
        broker.close()
        lifecycle.reset()
    out["multi_over_single_throughput"] = out["multi_deliveries_per_s"] / out["single_deliveries_per_s"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--topics", type=int, default=100_000)
    ap.add_argument("--fanout", type=int, default=1000, help="subscribers in the fan-out part")
    ap.add_argument("--burst", type=int, default=200)
    ap.add_argument("--json", help="write the figures here too")
    ap.add_argument("--fanout-only", action="store_true", help="only the fan-out part")
    args = ap.parse_args()
    result: dict[str, Any] = {"topics": args.topics, "fanout": args.fanout, "burst": args.burst}
    if args.fanout_only:
        print(json.dumps(measure_fanout(args.fanout, args.burst), indent=2))
        return
    result["state_bytes"] = measure_state(args.topics)
    result["publish"] = measure_publish(args.topics)
    result["fanout_result"] = measure_fanout(args.fanout, args.burst)
    print(json.dumps(result, indent=2))
    s, p, f = result["state_bytes"], result["publish"], result["fanout_result"]
    print(f"\nstate per stream (bytes, {args.topics:,} streams, broker state only):")
    print(f"  single-topic stream                     {s['single_topic_stream']:8.0f}")
    print(f"  multi-topic stream, all on one topic    {s['multi_topic_stream_shared_topic']:8.0f}")
    print(f"  multi-topic stream, each its own topic  {s['multi_topic_stream_own_topic']:8.0f}")
    print(f"  => one idle topic                       {s['idle_topic']:8.0f}")
    print("publish (us):")
    for k, v in p.items():
        print(f"  {k:44s} {v:8.2f}")
    print(f"fan-out ({args.fanout} sockets x {args.burst} events):")
    for k, v in f.items():
        print(f"  {k:44s} {v:12.2f}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=2)


if __name__ == "__main__":
    main()
