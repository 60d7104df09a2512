"""Shared helpers for the benchmark servers, the load generator and the runner.

Everything here is stdlib-only so every server process (asyncio, gevent, raw
epoll) can import it without pulling in another event loop.

Wire contract shared by all servers (see docs/performance.md):

* ``GET /sse``            an event stream; every event is one ``data:`` line
  whose payload is :func:`make_payload` (``"<run> <seq> <t_ns> xxx..."``).
* ``GET /ws``             a WebSocket that receives the same payloads as text.
* ``GET /echo``           a WebSocket echoing every message back.
* ``GET /view``           an ordinary (Flask where the stack allows) view.
* ``GET /publish?kind=sse|ws&n=K&size=B&interval=S&run=R``  answers at once,
  then publishes K events, sleeping S seconds between them (0 = just yield).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import resource
import sys
import time
from urllib.parse import parse_qs

WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC11B65"
CLK_TCK = os.sysconf("SC_CLK_TCK")


def raise_nofile() -> int:
    """Raise RLIMIT_NOFILE to the hard limit; return the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    return soft


def now_ns() -> int:
    """CLOCK_MONOTONIC in ns: system-wide on Linux, so comparable across processes."""
    return time.monotonic_ns()


def make_payload(run: int, seq: int, size: int) -> str:
    """An event payload of exactly ``size`` characters (at least the header)."""
    head = f"{run} {seq} {now_ns()} "
    return head + "x" * max(0, size - len(head))


def parse_publish_query(qs: str) -> dict[str, float]:
    """Parse the ``/publish`` query with bounded, defaulted values."""
    q = parse_qs(qs or "")

    def num(name: str, default: float, lo: float, hi: float) -> float:
        try:
            v = float(q.get(name, [default])[0])
        except ValueError:
            v = default
        return min(max(v, lo), hi)

    return {
        "n": int(num("n", 1, 0, 10_000_000)),
        "size": int(num("size", 100, 16, 65536)),
        "interval": num("interval", 0.0, 0.0, 60.0),
        "run": int(num("run", 0, 0, 1 << 40)),
        "kind": (q.get("kind", ["sse"])[0]),
    }


def sse_frame(payload: str) -> bytes:
    return b"data: " + payload.encode() + b"\n\n"


def ws_frame(payload: bytes, opcode: int = 0x1) -> bytes:
    """An unmasked (server-to-client) WebSocket frame."""
    n = len(payload)
    if n < 126:
        head = bytes((0x80 | opcode, n))
    elif n < 65536:
        head = bytes((0x80 | opcode, 126)) + n.to_bytes(2, "big")
    else:
        head = bytes((0x80 | opcode, 127)) + n.to_bytes(8, "big")
    return head + payload


def ws_accept(key: str) -> str:
    return base64.b64encode(hashlib.sha1(key.encode() + WS_GUID).digest()).decode()


def proc_rss_kib(pid: int) -> int:
    """VmRSS of ``pid`` in KiB (0 if the process is gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def proc_cpu_seconds(pid: int) -> float:
    """utime+stime of ``pid`` (and its reaped children) in seconds."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            data = f.read()
    except OSError:
        return 0.0
    fields = data[data.rindex(")") + 2 :].split()
    # fields[11..14] = utime stime cutime cstime (stat fields 14..17)
    return sum(int(x) for x in fields[11:15]) / CLK_TCK


def proc_children(pid: int) -> list[int]:
    """The live child processes of ``pid`` (from each process's /proc stat ppid)."""
    kids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                data = f.read()
        except OSError:
            continue
        fields = data[data.rindex(")") + 2 :].split()
        if int(fields[1]) == pid and fields[0] != "Z":
            kids.append(int(entry))
    return kids


def proc_tree_cpu_seconds(pid: int) -> float:
    """CPU seconds of ``pid`` and of its live children (a pre-fork server's workers).

    A child that has ended and been reaped is already in the parent's
    cutime/cstime (proc_cpu_seconds), so nothing is counted twice.
    """
    return proc_cpu_seconds(pid) + sum(proc_cpu_seconds(kid) for kid in proc_children(pid))


def proc_tree_rss_kib(pid: int) -> int:
    """VmRSS of ``pid`` plus its live children's, in KiB.

    Pages a forked worker still shares with its parent (copy-on-write) are
    counted in each process, so for a pre-fork server this is an upper bound.
    """
    return proc_rss_kib(pid) + sum(proc_rss_kib(kid) for kid in proc_children(pid))


def announce_ready(port: int, **info: object) -> None:
    """Tell the runner the server listens (one JSON line on stdout)."""
    sys.stdout.write(json.dumps({"ready": True, "port": port, "pid": os.getpid(), **info}) + "\n")
    sys.stdout.flush()


def announce_unavailable(reason: str) -> None:
    """Tell the runner this server cannot run here, then exit 3."""
    sys.stdout.write(json.dumps({"ready": False, "unavailable": reason}) + "\n")
    sys.stdout.flush()
    sys.exit(3)


def server_args(argv: list[str] | None = None):  # type: ignore[no-untyped-def]
    """The command line every server accepts."""
    import argparse

    p = argparse.ArgumentParser()
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--heartbeat", type=float, default=2.0, help="seconds; 0 disables")
    return p.parse_args(argv)


VIEW_ITEMS = [{"id": i, "name": f"item-{i}", "price": i * 1.25} for i in range(20)]


def view_body() -> bytes:
    """The 'ordinary view' work: build and serialise a small JSON document."""
    total = sum(item["price"] for item in VIEW_ITEMS)  # type: ignore[misc]
    return json.dumps({"items": VIEW_ITEMS, "total": total}).encode()


def machine_cpu_ticks() -> tuple[int, int, int]:
    """(busy, softirq, total) jiffies over all cores, from /proc/stat.

    Loopback TCP work done in softirq context is often not charged to any
    process, so per-process CPU under-reports at high message rates; the
    machine-wide figure shows how close the box was to saturation.
    """
    with open("/proc/stat") as f:
        vals = [int(x) for x in f.readline().split()[1:]]
    idle = vals[3] + (vals[4] if len(vals) > 4 else 0)
    total = sum(vals[:8])
    softirq = vals[6] if len(vals) > 6 else 0
    return total - idle, softirq, total
