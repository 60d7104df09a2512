"""Mass reconnect: thousands of SSE streams cut at once, all resuming with Last-Event-ID.

    python bench/bench_reconnect.py                      # 3,000 streams, backlog 128 vs default
    python bench/bench_reconnect.py --clients 1000 --backlogs default --reps 1

What a load balancer reload does to a streaming server: every stream is reset
(RST) at the same moment while events keep flowing, and every client
reconnects at once with ``Last-Event-ID``. The server (``gstream serve`` in its
own process, this file's :func:`app`: one broker publishing ``--rate`` events
per second) must replay exactly what each client missed. Checked per client,
over both connections: ids strictly consecutive (no gap, no duplicate).
Reported: the time from the cut until every client has caught up (received
the first event published after the cut), per listen backlog.

The client is one process driving non-blocking sockets with epoll (no gevent),
so it is never the bottleneck of the reconnect storm. See docs/performance.md.
"""

from __future__ import annotations

import argparse
import errno
import os
import re
import select
import socket
import statistics
import struct
import subprocess
import sys
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

# -- the server side (imported by ``gstream serve bench.bench_reconnect:app``) --

_broker: Any = None


def _publisher(broker: Any, rate: float) -> None:
    import gevent

    n = 0
    while True:
        n += 1
        broker.publish(str(n))
        gevent.sleep(1.0 / rate)


def app(environ: dict[str, Any], start_response: Any) -> Any:
    """One broker; events ``1, 2, 3...`` (ids equal to the data) at ``RECONNECT_RATE``/s."""
    global _broker
    if _broker is None:
        import gevent

        from gstream import SSEBroker

        _broker = SSEBroker(topic="reconnect", first_id=1, history_size=8192,
                            history_max_age=600)
        gevent.spawn(_publisher, _broker, float(os.environ.get("RECONNECT_RATE", "20")))
    return _broker.subscribe(environ, start_response)


# -- the client side ------------------------------------------------------------

_ID = re.compile(rb"^id: ?(\d+)$", re.M)


class Stream:
    """One client: its socket, parse state, and every id it received."""

    __slots__ = ("sock", "buf", "body", "head_done", "chunk_left", "last", "gaps", "dups",
                 "caught_up", "connects")

    def __init__(self) -> None:
        self.sock: socket.socket | None = None
        self.buf = b""
        self.body = b""
        self.head_done = False
        self.chunk_left = 0
        self.last = 0
        self.gaps = 0
        self.dups = 0
        self.caught_up = 0.0
        self.connects = 0

    def feed(self, data: bytes) -> None:
        self.buf += data
        if not self.head_done:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            self.head_done = True
            self.buf = self.buf[end + 4:]
        # Dechunk what is complete.
        while self.buf:
            if self.chunk_left == 0:
                nl = self.buf.find(b"\r\n")
                if nl < 0:
                    return
                size = int(self.buf[:nl].split(b";")[0] or b"0", 16)
                self.buf = self.buf[nl + 2:]
                self.chunk_left = size + 2  # with the chunk's CRLF
            take = min(self.chunk_left, len(self.buf))
            self.body += self.buf[:take]
            self.buf = self.buf[take:]
            self.chunk_left -= take
            if self.chunk_left == 0:
                self.body = self.body[:-2]
        end = self.body.rfind(b"\n\n")
        if end < 0:
            return
        events, self.body = self.body[:end + 2], self.body[end + 2:]
        for m in _ID.finditer(events):
            n = int(m.group(1))
            if self.last and n <= self.last:
                self.dups += 1
                continue
            if self.last and n != self.last + 1:
                self.gaps += 1
            self.last = n


def _request(port: int, last_id: int) -> bytes:
    head = f"GET /events HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAccept: text/event-stream\r\n"
    if last_id:
        head += f"Last-Event-ID: {last_id}\r\n"
    return (head + "\r\n").encode()


def run_once(clients: int, backlog: int | None, rate: float, hold: float,
             timeout: float) -> dict[str, Any]:
    """One server, ``clients`` streams, one cut; returns the figures."""
    env = dict(os.environ, PYTHONPATH=ROOT, RECONNECT_RATE=str(rate))
    args = [sys.executable, "-m", "gstream", "serve", "bench.bench_reconnect:app", "--port", "0",
            "--log-level", "warning"]
    if backlog is not None:
        args += ["--backlog", str(backlog)]
    server = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None
        m = re.search(r":(\d+)\s*$", server.stdout.readline())
        assert m, "server did not start"
        port = int(m.group(1))
        return _drive(port, clients, hold, timeout)
    finally:
        server.terminate()
        server.wait(15)


def _drive(port: int, n: int, hold: float, timeout: float) -> dict[str, Any]:
    ep = select.epoll()
    streams = [Stream() for _ in range(n)]
    by_fd: dict[int, Stream] = {}
    pending: dict[int, bytes] = {}

    def open_stream(st: Stream) -> None:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setblocking(False)
        err = s.connect_ex(("127.0.0.1", port))
        if err not in (0, errno.EINPROGRESS):
            s.close()
            raise OSError(err, os.strerror(err))
        st.sock, st.buf, st.body, st.head_done, st.chunk_left = s, b"", b"", False, 0
        st.connects += 1
        by_fd[s.fileno()] = st
        pending[s.fileno()] = _request(port, st.last)
        ep.register(s.fileno(), select.EPOLLOUT | select.EPOLLIN)

    def drop(st: Stream, rst: bool) -> None:
        s = st.sock
        if s is None:
            return
        fd = s.fileno()
        ep.unregister(fd)
        by_fd.pop(fd, None)
        pending.pop(fd, None)
        if rst:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        s.close()
        st.sock = None

    def pump(until: Any, limit: float) -> bool:
        deadline = time.monotonic() + limit
        while not until():
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            for fd, mask in ep.poll(min(left, 0.05)):
                st = by_fd.get(fd)
                if st is None or st.sock is None:
                    continue
                if mask & select.EPOLLOUT and fd in pending:
                    try:
                        st.sock.send(pending.pop(fd))
                    except OSError:
                        drop(st, False)
                        open_stream(st)  # as EventSource does after a failed attempt
                        continue
                    ep.modify(fd, select.EPOLLIN)
                if mask & (select.EPOLLIN | select.EPOLLERR | select.EPOLLHUP):
                    try:
                        data = st.sock.recv(65536)
                    except BlockingIOError:
                        continue
                    except OSError:
                        data = b""
                    if not data:
                        drop(st, False)
                        open_stream(st)
                        continue
                    st.feed(data)
                    if not st.caught_up and cut_id and st.last > cut_id:
                        st.caught_up = time.monotonic()
        return True

    cut_id = 0
    t0 = time.monotonic()
    for st in streams:
        open_stream(st)
    assert pump(lambda: all(st.last for st in streams), 120), "streams did not open"
    opened = time.monotonic() - t0
    end = time.monotonic() + hold
    pump(lambda: time.monotonic() >= end, hold + 1)
    # The cut: every stream reset at once, then every client reconnects.
    for st in streams:
        drop(st, True)
    t_cut = time.monotonic()
    cut_id = max(st.last for st in streams)
    for st in streams:
        open_stream(st)
    done = pump(lambda: all(st.caught_up for st in streams), timeout)
    waits = sorted(st.caught_up - t_cut for st in streams if st.caught_up)
    for st in list(streams):
        drop(st, False)
    ep.close()
    return {
        "clients": n,
        "opened_s": opened,
        "all_caught_up": done,
        "caught_up": len(waits),
        "p50_s": waits[len(waits) // 2] if waits else None,
        "p99_s": waits[int(len(waits) * 0.99) - 1] if waits else None,
        "last_s": waits[-1] if waits else None,
        "gaps": sum(st.gaps for st in streams),
        "dups": sum(st.dups for st in streams),
        "connects": sum(st.connects for st in streams),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clients", type=int, default=3000)
    p.add_argument("--backlogs", default="128,default",
                   help="comma-separated listen backlogs; 'default' is gstream's own")
    p.add_argument("--rate", type=float, default=20.0, help="events per second")
    p.add_argument("--hold", type=float, default=2.0, help="seconds streamed before the cut")
    p.add_argument("--timeout", type=float, default=90.0, help="longest wait for catching up")
    p.add_argument("--reps", type=int, default=3)
    a = p.parse_args()
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < a.clients + 100:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, a.clients + 1000), hard))
    print(f"{a.clients} SSE streams, {a.rate:g} events/s, reset at once, resumed with "
          f"Last-Event-ID; {a.reps} run(s) per backlog")
    print("| backlog | caught up | last (median) | last (runs) | p50 | p99 | gaps | dups |")
    print("|---|---|---|---|---|---|---|---|")
    for name in a.backlogs.split(","):
        backlog = None if name == "default" else int(name)
        runs = [run_once(a.clients, backlog, a.rate, a.hold, a.timeout) for _ in range(a.reps)]
        lasts = [r["last_s"] for r in runs if r["last_s"] is not None]
        label = name if backlog is not None else "default (min(4096, somaxconn))"
        print(f"| {label} | {min(r['caught_up'] for r in runs)}/{a.clients} "
              f"| {statistics.median(lasts):.2f} s | {', '.join(f'{x:.2f}' for x in lasts)} "
              f"| {statistics.median(r['p50_s'] for r in runs):.2f} s "
              f"| {statistics.median(r['p99_s'] for r in runs):.2f} s "
              f"| {sum(r['gaps'] for r in runs)} | {sum(r['dups'] for r in runs)} |", flush=True)


if __name__ == "__main__":
    main()
