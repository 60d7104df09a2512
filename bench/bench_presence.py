"""Benchmark presence: memory per present member, and the cost of a join and a leave.

A program, not a test. Measured, for the in-memory store
(:class:`gstream.presence.MemoryPresence`) and the Redis one
(:class:`gstream.backplane.redis_presence.RedisPresence`, a redis-server started here):

* memory per present member: Python heap (tracemalloc) after N joins of
  distinct members with a 20-byte meta, in one topic and in N/10 topics;
  for Redis also Redis's ``used_memory`` growth per member;
* join and leave: the caller's cost per call (in-memory: the whole change,
  with one watcher or none; Redis: the local part, it never waits), and for
  Redis the time until all N are written (``count`` reaches N, then 0);
* reap: the time until a survivor has reaped the N members of a process
  whose lease expired (from its expiry).
* SSE streams served by gstream's Server (2,000): the extra Python heap of
  a stream with presence, for a default-topic stream and multi-topic ones
  (2 and 4 topics, and 2 with ``presence_events``: the per-topic watchers).

Usage::

    flock /tmp/gstream-bench.lock python bench/bench_presence.py            # N = 100,000
    flock /tmp/gstream-bench.lock python bench/bench_presence.py -n 10000   # smoke run
"""

from __future__ import annotations

from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import gc  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import tracemalloc  # noqa: E402

import gevent  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from gstream.presence import MemoryPresence  # noqa: E402


def _meta(i: int) -> dict[str, str]:
    return {"name": f"user-{i:010d}"}  # 20 bytes as JSON text, plus the key


def memory_per_member(n: int, topics: int) -> float:
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    p = MemoryPresence(max_members=n, max_local=n)
    conns = [p.join(f"t{i % topics}", f"m{i}", _meta(i)) for i in range(n)]
    gc.collect()
    used = tracemalloc.get_traced_memory()[0] - before
    # The caller keeps the connection ids anyway (a Hub or broker does): count them apart.
    ids = sum(sys.getsizeof(c) for c in conns) + sys.getsizeof(conns)
    tracemalloc.stop()
    del conns
    return (used - ids) / n


def memory_costs(n: int, watcher: bool) -> tuple[float, float]:
    p = MemoryPresence(max_members=n, max_local=n)
    if watcher:
        p.watch("t", lambda e: None)
    started = time.perf_counter()
    conns = [p.join("t", f"m{i}", _meta(i)) for i in range(n)]
    joined = time.perf_counter()
    for c in conns:
        p.leave(c)
    left = time.perf_counter()
    gevent.sleep(0)  # let the dispatcher run
    return (joined - started) / n * 1e6, (left - joined) / n * 1e6


def sse_heap(n: int, presence: MemoryPresence | None, topics: int = 0,
             events: bool = False) -> float:
    """Python heap per idle SSE stream served by gstream's Server (detached), clients in
    this process too (their sockets are in the figure: compare runs, not absolutes).

    ``topics=0``: a default-topic stream; ``topics=k``: a multi-topic stream of one
    shared topic and k-1 private ones (``?topic=shared&topic=p/<i>/<j>``).
    """
    import socket
    from urllib.parse import parse_qs

    from gstream.broker import SSEBroker
    from gstream.server import Server

    def user(environ: dict[str, str]) -> str:
        return parse_qs(environ.get("QUERY_STRING", ""))["user"][0]

    broker = SSEBroker(topic="t", presence=presence, principal=user,
                       presence_events=events and presence is not None)
    srv = Server(broker.subscribe, "127.0.0.1", 0)
    srv.start()
    port = srv.address[1]
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    socks = []
    for i in range(n):
        query = f"user=u{i}"
        if topics:
            query += "&topic=shared" + "".join(f"&topic=p/{i}/{j}" for j in range(topics - 1))
        s = socket.create_connection(("127.0.0.1", port))
        s.sendall(f"GET /?{query} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        socks.append(s)
    while broker.subscriber_count < n:
        gevent.sleep(0.01)
    gevent.sleep(0.2)  # the prelude written, the streams detached, presence events sent
    gc.collect()
    used = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    for s in socks:
        s.close()
    srv.stop(timeout=2)
    broker.close()
    return used / n


def sse_overheads(n: int) -> list[tuple[str, float]]:
    """Heap per SSE stream with presence minus without, per kind of stream."""
    sse_heap(n, None)  # warm up: first-use allocations are nobody's share
    out = []
    for label, topics, events in (("default topic", 0, False),
                                  ("2 topics (1 shared, 1 private)", 2, False),
                                  ("2 topics, presence_events", 2, True),
                                  ("4 topics (1 shared, 3 private)", 4, False)):
        without = sse_heap(n, None, topics)
        with_presence = sse_heap(n, MemoryPresence(max_members=n, max_local=4 * n), topics,
                                 events)
        out.append((label, with_presence - without))
    return out


def redis_figures(n: int) -> dict[str, float]:
    from gstream.backplane.redis_presence import RedisPresence
    from tests.redis_fixture import RedisServer

    srv = RedisServer()
    srv.start()
    out: dict[str, float] = {}
    try:
        probe = RedisPresence(srv.url, prefix="bench", max_members=n, max_local=n)
        info = probe._client.info("memory")  # noqa: SLF001 - a benchmark's peek
        base = int(info["used_memory"])
        p = RedisPresence(srv.url, prefix="bench", max_members=n, max_local=n)
        started = time.perf_counter()
        conns = [p.join("t", f"m{i}", _meta(i)) for i in range(n)]
        out["join call (us)"] = (time.perf_counter() - started) / n * 1e6
        while p.count("t") < n:
            gevent.sleep(0.01)
        out["joins written (/s)"] = n / (time.perf_counter() - started)
        used = int(probe._client.info("memory")["used_memory"])  # noqa: SLF001
        out["Redis memory per member (B)"] = (used - base) / n
        started = time.perf_counter()
        for c in conns:
            p.leave(c)
        out["leave call (us)"] = (time.perf_counter() - started) / n * 1e6
        while p.count("t") > 0:
            gevent.sleep(0.01)
        out["leaves written (/s)"] = n / (time.perf_counter() - started)

        # Reap: a process with n members stops refreshing (its greenlets are
        # killed, as kill -9 would), a survivor with a short lease reaps it.
        doomed = RedisPresence(srv.url, prefix="bench", max_members=n, max_local=n, lease=1.0)
        for i in range(n):
            doomed.join("t", f"m{i}")
        while probe.count("t") < n:
            gevent.sleep(0.01)
        doomed._writer.kill()  # noqa: SLF001 - simulate a dead process
        doomed._reader.kill()  # noqa: SLF001
        expiry = time.perf_counter() + 1.0  # at most one lease after its last refresh
        survivor = RedisPresence(srv.url, prefix="bench", max_members=n, max_local=n, lease=0.4)
        while probe.count("t") > 0:
            gevent.sleep(0.01)
        out["reap after expiry (s)"] = max(0.0, time.perf_counter() - expiry)
        out["reaped (/s)"] = n / max(1e-6, time.perf_counter() - expiry)
        survivor.close()
        p.close()
        probe.close()
    finally:
        srv.stop()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("-n", type=int, default=100_000, help="members")
    ap.add_argument("--no-redis", action="store_true")
    ap.add_argument("--sse-only", action="store_true", help="only the SSE stream figures")
    args = ap.parse_args()
    n = args.n
    if args.sse_only:
        for label, extra in sse_overheads(min(n, 2000)):
            print(f"| SSE stream with presence, extra heap, {label} (B) | {extra:.0f} |")
        return
    print(f"presence benchmark, N = {n:,} members (one connection each, 20-byte meta)\n")
    print("| in-memory | value |\n|---|---|")
    print(f"| heap per member, one topic (B) | {memory_per_member(n, 1):.0f} |")
    print(f"| heap per member, N/10 topics (B) | {memory_per_member(n, max(1, n // 10)):.0f} |")
    for watcher in (False, True):
        j, lv = memory_costs(n, watcher)
        what = "one watcher" if watcher else "no watcher"
        print(f"| join, {what} (us) | {j:.2f} |")
        print(f"| leave, {what} (us) | {lv:.2f} |")
    sse_n = min(n, 2000)
    for label, extra in sse_overheads(sse_n):
        print(f"| SSE stream with presence, extra heap, {label} (B, {sse_n:,} streams) | "
              f"{extra:.0f} |")
    if not args.no_redis:
        print("\n| Redis | value |\n|---|---|")
        for k, v in redis_figures(n).items():
            print(f"| {k} | {v:,.2f} |")


if __name__ == "__main__":
    main()
