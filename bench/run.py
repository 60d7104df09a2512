"""gstream comparative benchmark: the one command.

    python bench/run.py                 # full suite (< 15 min on 2 cores)
    python bench/run.py --quick         # smoke run with tiny sizes (< 2 min)
    python bench/run.py --scenarios fanout,echo --servers gstream,raw_epoll,websockets

Every server runs as its own process on 127.0.0.1; the load generator runs in
separate worker processes (bench/loadgen.py). Results: medians over --reps
repetitions, printed as Markdown tables with ratios against the best Python
peer, and saved with the raw per-run data and PNG plots under
bench/results/<timestamp>/. See docs/performance.md for the method.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import select
import socket
import subprocess
import sys
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
from common import (  # noqa: E402
    machine_cpu_ticks,
    proc_children,
    proc_cpu_seconds,
    proc_tree_cpu_seconds,
    proc_tree_rss_kib,
    raise_nofile,
)
from report import render_tables, save_plots  # noqa: E402

#: Server name -> (script, label). Order = table order. raw_epoll is the limit.
SERVERS: dict[str, tuple[str, str]] = {
    "gstream": ("gstream_server.py", "gstream"),
    "gstream_w2": ("gstream_w2_server.py", "gstream, 2 workers"),
    "gstream_w2_loop": ("gstream_w2_loop_server.py", "gstream, 2 workers, in-loop callbacks"),
    "websockets": ("websockets_server.py", "websockets asyncio"),
    "geventws": ("geventws_server.py", "gevent-websocket"),
    "pywsgi_sse": ("pywsgi_sse_server.py", "plain pywsgi SSE"),
    "starlette": ("starlette_server.py", "sse-starlette/uvicorn"),
    "flasksock": ("flasksock_server.py", "Flask-Sock/gevent"),
    "gonethttp": ("gonethttp_server.py", "Go net/http"),
    "raw_epoll": ("raw_epoll_server.py", "raw epoll (limit)"),
}
#: Not Python peers: ratios are against the best of the others. Go net/http is
#: a reference anchor (issue 21), not a library a Python shop would pick.
#: gstream_w2 is gstream itself (`gstream serve --workers 2`), echo only;
#: gstream_w2_loop the same with the echo as websocket_callback_app(in_loop=True).
NOT_PEERS = {"gstream", "gstream_w2", "gstream_w2_loop", "raw_epoll", "gonethttp"}
#: Servers whose script must build something first (``script --build``): run
#: once before the probe, outside the 30 s start timeout.
BUILD_FIRST = {"gonethttp"}
BUILD_TIMEOUT = 900

FULL = {
    "idle": [1000, 5000, 15000], "fanout": [100, 1000, 5000], "echo": [1, 50, 500],
    # Timings keep three repetitions inside the 14-minute budget on a host
    # half as fast as the one the targets were set on (see docs/performance.md).
    "legacy": [5000], "reps": 3, "idle_window": 2.0, "idle_window_last": 2.0, "settle": 0.25,
    "echo_secs": 1.5, "view_secs": 2.0, "fanout_budget": 60_000,
    "fanout_min_events": 12, "max_minutes": 13.5,
    "workers": 2,
    # The legacy scenario carries no target: one repetition keeps the full
    # run under 15 minutes on 2 cores (the target scenarios get all of them).
    "legacy_reps": 1,
}
QUICK = {
    "idle": [50, 200], "fanout": [20, 100], "echo": [1, 10], "legacy": [100], "reps": 1,
    "idle_window": 1.0, "idle_window_last": 1.0, "settle": 0.3, "echo_secs": 1.0,
    "view_secs": 1.0, "fanout_budget": 4000, "fanout_min_events": 5,
    "max_minutes": 2.0, "workers": 2, "legacy_reps": 1,
}
RUN_ORDER = ["fanout", "echo", "legacy", "idle"]
EVENT_SIZE = 100
HEARTBEAT = 2.0
LEGACY_RATE = 2.0  # events per second while the legacy view is measured
CONNECT_RATE_FLOOR = 300  # connections/s below which a connect phase times out


class Unavailable(Exception):
    """The server cannot run on this branch/machine (e.g. gstream modules not merged)."""


# ---- processes ---------------------------------------------------------------
_unread: dict[int, bytearray] = {}  # bytes read past a line, per pipe


def read_line(pipe, timeout: float) -> str:  # type: ignore[no-untyped-def]
    """One line from a subprocess pipe, or TimeoutError (never blocks past timeout).

    Reads in 64 KiB chunks and keeps what follows the line for the next call
    (echo replies carry every sample: a byte-wise read of a 2 MB line took
    tens of seconds).
    """
    fd = pipe.fileno()
    buf = _unread.setdefault(fd, bytearray())
    end = time.monotonic() + timeout
    start = 0
    while True:
        nl = buf.find(b"\n", start)
        if nl >= 0:
            line = bytes(buf[:nl + 1])
            del buf[:nl + 1]
            return line.decode()
        start = len(buf)
        left = end - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            raise TimeoutError(f"no answer within {timeout:.0f}s")
        chunk = os.read(fd, 65536)
        if not chunk:
            raise EOFError("process exited")
        buf += chunk


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


class ServerProc:
    def __init__(self, name: str, heartbeat: float, env: dict, logdir: str) -> None:
        script = os.path.join(HERE, "servers", SERVERS[name][0])
        self.log = open(os.path.join(logdir, f"server-{name}.log"), "ab")  # noqa: SIM115
        cmd = [sys.executable, script, "--port", str(free_port()), "--heartbeat", str(heartbeat)]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self.log, env=env,
                                     cwd=HERE)
        try:
            info = json.loads(read_line(self.proc.stdout, 30))
        except (TimeoutError, EOFError, ValueError) as exc:
            self.stop()
            raise RuntimeError(f"server did not start: {exc}") from exc
        if not info.get("ready"):
            self.stop()
            raise Unavailable(info.get("unavailable", "not available"))
        self.info = info
        self.port = int(info["port"])
        self.pid = self.proc.pid
        deadline = time.monotonic() + 15
        while True:  # servers that bind inside serve() announce first: wait for the port
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    self.stop()
                    raise RuntimeError("server never accepted a connection") from None
                time.sleep(0.1)

    def http_get(self, target: str, timeout: float = 10) -> bytes:
        with socket.create_connection(("127.0.0.1", self.port), timeout=timeout) as s:
            s.sendall(f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
                      .encode())
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = s.recv(4096)
                if not chunk:
                    break
                data += chunk
        if not data.startswith(b"HTTP/1.1 200"):
            raise RuntimeError(f"GET {target}: {data[:60]!r}")
        return data

    # A pre-fork server (gstream_w2) serves from child processes: its CPU and
    # memory are the whole tree's.
    def rss(self) -> int:
        return proc_tree_rss_kib(self.pid)

    def cpu(self) -> float:
        return proc_tree_cpu_seconds(self.pid)

    def stop(self) -> None:
        # Nothing is measured after this: kill instead of waiting for a
        # graceful shutdown (uvicorn spent 3.5 s draining 15,000 connections).
        # Workers first: they would drain on their own once their parent is gone.
        if self.proc.poll() is None:
            for kid in proc_children(self.pid):
                try:
                    os.kill(kid, 9)
                except OSError:
                    pass
            self.proc.kill()
            self.proc.wait(5)
        self.log.close()


class LoadGen:
    """``n`` loadgen worker processes driven over stdin/stdout JSON lines."""

    def __init__(self, n: int, port: int, src_addrs: list[str], logdir: str) -> None:
        self.log = open(os.path.join(logdir, "loadgen.log"), "ab")  # noqa: SIM115
        cfg = json.dumps({"host": "127.0.0.1", "port": port, "src_addrs": src_addrs})
        self.procs = [
            subprocess.Popen([sys.executable, os.path.join(HERE, "loadgen.py"), cfg],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log)
            for _ in range(n)
        ]

    def ask(self, cmds: list[dict | None], timeout: float) -> list[dict | None]:
        """Send cmds[i] to worker i (None = skip); gather the answers."""
        for p, cmd in zip(self.procs, cmds, strict=False):
            if cmd is not None:
                p.stdin.write((json.dumps(cmd) + "\n").encode())
                p.stdin.flush()
        return [json.loads(read_line(p.stdout, timeout)) if cmd is not None else None
                for p, cmd in zip(self.procs, cmds, strict=False)]

    def all(self, cmd: dict, timeout: float) -> list[dict]:
        return [r for r in self.ask([cmd] * len(self.procs), timeout) if r is not None]

    def split(self, kind: str, n: int, timeout: float) -> dict:
        """Open n more connections of kind, spread over the workers.

        ``connected`` in the answer is the total now open of that kind.
        """
        w = len(self.procs)
        shares = [n // w + (1 if i < n % w else 0) for i in range(w)]
        cmds = [{"cmd": "connect", "kind": kind, "n": s, "timeout": timeout} if s else None
                for s in shares]
        res = [r for r in self.ask(cmds, timeout + 10) if r]
        held = self.all({"cmd": "stats"}, 10)
        return {"connected": sum(r["open"].get(kind, 0) for r in held),
                "failed": sum(r["failed"] for r in res),
                "errors": merge_counts(r.get("errors", {}) for r in res)}

    def cpu(self) -> list[float]:
        return [proc_cpu_seconds(p.pid) for p in self.procs]

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
            p.wait(3)
        self.log.close()


def merge_counts(dicts) -> dict:  # type: ignore[no-untyped-def]
    out: dict[str, int] = {}
    for d in dicts:
        for k, v in d.items():
            out[k] = out.get(k, 0) + v
    return out


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, max(0, int(round(q / 100 * (len(s) - 1)))))]


class CpuWindow:
    """CPU% of the server and of each loadgen worker over a window."""

    def __init__(self, srv: ServerProc, lg: LoadGen) -> None:
        self.srv, self.lg = srv, lg
        self.t0 = time.monotonic()
        self.s0 = srv.cpu()
        self.l0 = lg.cpu()
        self.m0 = machine_cpu_ticks()

    def done(self) -> dict:
        dt = max(time.monotonic() - self.t0, 1e-6)
        lg = [(b - a) / dt * 100 for a, b in zip(self.l0, self.lg.cpu(), strict=False)]
        m1 = machine_cpu_ticks()
        total = max(1, m1[2] - self.m0[2])
        return {"server_cpu_pct": (self.srv.cpu() - self.s0) / dt * 100,
                "loadgen_cpu_pct": max(lg) if lg else 0.0,
                "loadgen_cpu_pct_all": lg,
                "machine_busy_pct": (m1[0] - self.m0[0]) / total * 100,
                "machine_softirq_pct": (m1[1] - self.m0[1]) / total * 100}


# ---- scenarios -----------------------------------------------------------------
class Bench:
    def __init__(self, opts: argparse.Namespace, cfg: dict, outdir: str) -> None:
        self.opts, self.cfg, self.outdir = opts, cfg, outdir
        self.env = dict(os.environ)
        self.env["PYTHONPATH"] = os.pathsep.join(
            [opts.gstream_path, HERE, self.env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
        self.env["PYTHONWARNINGS"] = "ignore"
        self.deadline = time.monotonic() + cfg["max_minutes"] * 60
        self.runs: list[dict] = []
        self.caps: dict[str, Any] = {}
        # (scenario, kind, server) -> smallest size that failed: later
        # repetitions do not spend a connect timeout on it again.
        self.failed_at: dict[tuple[str, str, str], int] = {}
        self.run_id = int(time.time()) % 100000 * 100

    def src_addrs(self, total: int) -> list[str]:
        # The ephemeral range gives ~28k ports per (src, dst) pair; spread large
        # runs over several loopback sources so TIME_WAIT leftovers never bite.
        return [f"127.0.0.{i}" for i in range(2, 6)] if total > 4000 else []

    def start(self, name: str, heartbeat: float, total: int) -> tuple[ServerProc, LoadGen]:
        srv = ServerProc(name, heartbeat, self.env, self.outdir)
        self.caps[name] = srv.info
        lg = LoadGen(self.cfg["workers"], srv.port, self.src_addrs(total), self.outdir)
        return srv, lg

    def connect_timeout(self, n: int) -> float:
        return 10 + n / CONNECT_RATE_FLOOR

    def record(self, **row: Any) -> None:
        self.runs.append(row)
        brief = {k: (round(v, 2) if isinstance(v, float) else v) for k, v in row.items()
                 if k not in ("errors",)}
        print("  ", json.dumps(brief), flush=True)

    # -- idle: RSS per connection and idle CPU with heartbeats
    def sizes_for(self, scenario: str, kind: str, name: str, rep: int) -> list[int]:
        """The scenario's sizes, minus those this server already failed at."""
        sizes = self.cfg[scenario]
        limit = self.failed_at.get((scenario, kind, name))
        if limit is None:
            return sizes
        for n in sizes:
            if n >= limit:
                self.runs.append({"scenario": scenario, "kind": kind, "server": name, "rep": rep,
                                  "size": n, "ok": False,
                                  "skipped": "failed in an earlier repetition"})
        return [n for n in sizes if n < limit]

    def note_failure(self, scenario: str, kind: str, name: str, n: int) -> None:
        key = (scenario, kind, name)
        self.failed_at[key] = min(n, self.failed_at.get(key, n))

    def idle(self, name: str, kind: str, rep: int) -> None:
        sizes = self.sizes_for("idle", kind, name, rep)
        if not sizes:
            return
        srv, lg = self.start(name, HEARTBEAT, max(sizes))
        try:
            warm = 10
            warm = lg.split(kind, warm, self.connect_timeout(warm))["connected"]
            time.sleep(self.cfg["settle"])
            base = srv.rss()
            have = warm
            for n in sizes:
                c = lg.split(kind, n - (have - warm), self.connect_timeout(n - have))
                have = c["connected"]
                ok = have - warm >= n * 0.99
                time.sleep(self.cfg["settle"])
                rss = srv.rss()
                # Windows are whole heartbeat periods: servers that ping in
                # one pass per period would read 1x or 2x in a 1.5-period
                # window. The largest size may get a longer one (--idle-window).
                window = self.cfg["idle_window_last" if n == sizes[-1] else "idle_window"]
                win = CpuWindow(srv, lg)
                idle = lg.all({"cmd": "idle", "seconds": window}, window + 20)
                cpu = win.done()
                held = sum(sum(r["open"].values()) for r in idle)
                self.record(scenario="idle", kind=kind, server=name, rep=rep, size=n,
                            ok=ok and held >= have * 0.99,
                            kib_per_conn=(rss - base) / max(1, have - warm), held=held - warm,
                            rss_base_kib=base, rss_kib=rss,
                            hb_bytes_per_s=sum(r["bytes"] for r in idle) / window,
                            errors=c["errors"], **cpu)
                if not ok:
                    self.note_failure("idle", kind, name, n)
                    break
        finally:
            lg.stop()
            srv.stop()

    # -- fan-out: deliveries/s, publish->last-delivery latency, losses
    def fanout(self, name: str, kind: str, rep: int) -> None:
        sizes = self.cfg["fanout"]
        srv, lg = self.start(name, 0, max(sizes))
        try:
            have = 0
            for n in sizes:
                c = lg.split(kind, n - have, self.connect_timeout(n - have))
                have = c["connected"]
                if have < n:
                    self.record(scenario="fanout", kind=kind, server=name, rep=rep, size=n,
                                ok=False, error=f"connected {have}/{n}", errors=c["errors"])
                    break
                self.one_fanout(srv, lg, kind, n, 3)  # warm-up, not recorded
                row = self.one_fanout(srv, lg, kind, n, self.fanout_events(n))
                self.record(scenario="fanout", kind=kind, server=name, rep=rep, size=n, **row)
        finally:
            lg.stop()
            srv.stop()

    def fanout_events(self, n: int) -> int:
        """How many events to publish to n subscribers in the measured round.

        The same for every server at a given n: publish->last-delivery
        latency grows with the length of a back-to-back burst, so a server
        given fewer events would look faster. ``fanout_budget`` deliveries
        (600 / 60 / 12 events at 100 / 1,000 / 5,000), at least
        ``fanout_min_events``.
        """
        return max(self.cfg["fanout_min_events"], min(2000, self.cfg["fanout_budget"] // n))

    def one_fanout(self, srv: ServerProc, lg: LoadGen, kind: str, n: int, k: int) -> dict:
        """Publish k events to n subscribers once; merge the workers' receipts."""
        self.run_id += 1
        run = self.run_id
        lg.all({"cmd": "arm", "run": run, "k": k}, 10)
        win = CpuWindow(srv, lg)
        timeout = min(90.0, 10 + n * k / 10_000)
        srv.http_get(f"/publish?kind={kind}&n={k}&size={EVENT_SIZE}&interval=0&run={run}")
        res = lg.all({"cmd": "collect", "timeout": timeout}, timeout + 10)
        cpu = win.done()
        maxrecv = [max(r["maxrecv"][i] for r in res) for i in range(k)]
        pubts = [max(r["pubts"][i] for r in res) for i in range(k)]
        lat = [(m - p) / 1e6 for m, p in zip(maxrecv, pubts, strict=False) if m and p]
        deliveries = sum(r["deliveries"] for r in res)
        first = min((p for p in pubts if p), default=0)
        last = max(maxrecv)
        span = (last - first) / 1e9 if first and last > first else float("nan")
        lost = sum(r["lost"] for r in res)
        return {"ok": lost == 0 and deliveries == n * k, "events": k,
                "deliveries": deliveries, "expected": n * k, "lost": lost,
                "clients_incomplete": sum(r["clients"] - r["complete"] for r in res),
                "out_of_order": sum(r["ooo"] for r in res), "dup": sum(r["dup"] for r in res),
                "deliveries_per_s": deliveries / span if span == span else 0.0,
                "lat_p50_ms": pct(lat, 50), "lat_p99_ms": pct(lat, 99), "span_s": span,
                "errors": merge_counts(r.get("errors", {}) for r in res), **cpu}

    # -- echo: round trips/s and latency percentiles with C clients
    def echo(self, name: str, kind: str, rep: int) -> None:
        sizes = self.cfg["echo"]
        srv, lg = self.start(name, 0, max(sizes))
        try:
            have = 0
            for n in sizes:
                c = lg.split("echo", n - have, self.connect_timeout(n - have))
                have = c["connected"]
                secs = self.cfg["echo_secs"]
                win = CpuWindow(srv, lg)
                res = lg.all({"cmd": "echo", "seconds": secs}, secs + 15)
                cpu = win.done()
                samples = [s / 1000 for r in res for s in r["samples_us"]]
                errs = merge_counts(r.get("errors", {}) for r in res)
                self.record(scenario="echo", kind="ws", server=name, rep=rep, size=n,
                            ok=have >= n and not errs.get("echo-mismatch"), clients=have,
                            round_trips_per_s=len(samples) / secs, lat_p50_ms=pct(samples, 50),
                            lat_p99_ms=pct(samples, 99), errors=errs, **cpu)
        finally:
            lg.stop()
            srv.stop()

    # -- legacy: p99 of an ordinary Flask view while streams are open and events flow
    def legacy(self, name: str, kind: str, rep: int) -> None:
        m = self.cfg["legacy"][0]
        srv, lg = self.start(name, 0, m)
        try:
            secs = self.cfg["view_secs"]
            rest = [None] * (len(lg.procs) - 1)  # commands for the first worker only
            lg.ask([{"cmd": "connect", "kind": "view", "n": 2, "timeout": 10}] + rest, 20)
            base = lg.ask([{"cmd": "view", "seconds": secs}] + rest, secs + 15)[0]
            c = lg.split(kind, m, self.connect_timeout(m))
            n_events = int(LEGACY_RATE * (secs + 15))
            self.run_id += 1
            srv.http_get(f"/publish?kind={kind}&n={n_events}&size={EVENT_SIZE}"
                         f"&interval={1 / LEGACY_RATE}&run={self.run_id}")
            time.sleep(1.0)
            # A server may close a keep-alive connection left idle through the
            # connect phase (uvicorn's timeout_keep_alive is 5 s): replace it,
            # so that every server is measured on two live connections.
            open_views = lg.ask([{"cmd": "stats"}] + rest, 10)[0]["open"].get("view", 0)
            if open_views < 2:
                lg.ask([{"cmd": "connect", "kind": "view", "n": 2 - open_views, "timeout": 10}]
                       + rest, 20)
            win = CpuWindow(srv, lg)
            loaded = lg.ask([{"cmd": "view", "seconds": secs}] + rest, secs + 15)[0]
            cpu = win.done()
            b = [s / 1000 for s in base["samples_us"]]
            lo = [s / 1000 for s in loaded["samples_us"]]
            held = lg.all({"cmd": "stats"}, 10)
            open_streams = sum(r["open"].get(kind, 0) for r in held)
            self.record(scenario="legacy", kind=kind, server=name, rep=rep, size=m,
                        ok=open_streams >= m * 0.99 and bool(lo), streams=open_streams,
                        base_p50_ms=pct(b, 50), base_p99_ms=pct(b, 99),
                        view_p50_ms=pct(lo, 50), view_p99_ms=pct(lo, 99),
                        views_per_s=len(lo) / secs, view_reconnects=2 - open_views,
                        errors=c["errors"], **cpu)
        finally:
            lg.stop()
            srv.stop()

    # -- driver
    def plan(self) -> list[tuple[str, str, str]]:
        """(scenario, kind, server) units of one repetition, in run order.

        Idle runs last: when a slow host exhausts the time budget, the
        units left out are the idle ones of the last repetition, whose
        memory figures vary least between runs (the idle-CPU target has
        its own runs, see docs/performance.md), not fan-out or echo.
        """
        units = []
        order = [sc for sc in RUN_ORDER if sc in self.opts.scenarios]
        for sc in order + [sc for sc in self.opts.scenarios if sc not in order]:
            kinds = ["ws"] if sc == "echo" else (["sse"] if sc == "legacy" else ["sse", "ws"])
            for kind in kinds:
                for name in self.opts.servers:
                    units.append((sc, kind, name))
        return units

    def supported(self, sc: str, kind: str, name: str) -> bool | None:
        info = self.caps.get(name)
        if info is None:
            return None  # unknown until the server has started once
        if sc == "echo":
            return bool(info.get("echo"))
        if sc == "legacy":
            return bool(info.get("legacy"))
        if sc == "idle":
            return kind in info.get("idle_kinds", info.get("kinds", []))
        return kind in info.get("kinds", [])

    def build(self, name: str) -> dict | None:
        """Run ``script --build``; the server's unavailable/error info if that failed."""
        script = os.path.join(HERE, "servers", SERVERS[name][0])
        t0 = time.monotonic()
        try:
            res = subprocess.run([sys.executable, script, "--build"], capture_output=True,
                                 text=True, env=self.env, cwd=HERE, timeout=BUILD_TIMEOUT)
        except subprocess.TimeoutExpired:
            return {"error": f"build took over {BUILD_TIMEOUT}s"}
        with open(os.path.join(self.outdir, f"server-{name}.log"), "a") as log:
            log.write(res.stderr)
        if res.returncode == 0:
            print(f"  {name:11s} built in {time.monotonic() - t0:.1f}s: "
                  f"{res.stdout.strip()}", flush=True)
            return None
        try:
            info = json.loads(res.stdout.splitlines()[0])
        except (IndexError, ValueError):
            info = {}
        if "unavailable" in info:
            return {"unavailable": info["unavailable"]}
        return {"error": f"build exited {res.returncode}: {res.stderr.strip()[-200:]}"}

    def probe(self) -> None:
        """Start each server once (briefly) to learn what it supports."""
        for name in self.opts.servers:
            failed = self.build(name) if name in BUILD_FIRST else None
            if failed is not None:
                self.caps[name] = failed
                print(f"  {name:11s} {json.dumps(failed)}", flush=True)
                continue
            try:
                srv = ServerProc(name, 0, self.env, self.outdir)
                self.caps[name] = srv.info
                srv.stop()
            except Unavailable as exc:
                self.caps[name] = {"unavailable": str(exc)}
            except Exception as exc:
                self.caps[name] = {"error": str(exc)}
            print(f"  {name:11s} {json.dumps(self.caps[name])}", flush=True)

    def run_all(self) -> None:
        self.probe()
        for rep in range(self.cfg["reps"]):
            for sc, kind, name in self.plan():
                info = self.caps.get(name, {})
                if "unavailable" in info or "error" in info:
                    continue
                if sc == "legacy":
                    kind = info.get("legacy") or kind
                    if rep >= self.cfg.get("legacy_reps", self.cfg["reps"]):
                        continue
                if not self.supported(sc, kind, name):
                    continue
                if time.monotonic() > self.deadline:
                    self.runs.append({"scenario": sc, "kind": kind, "server": name, "rep": rep,
                                      "skipped": "time budget"})
                    continue
                print(f"[rep {rep + 1}/{self.cfg['reps']}] {sc} {kind} {name}", flush=True)
                t0 = time.monotonic()
                try:
                    getattr(self, sc)(name, kind, rep)
                except Exception as exc:
                    self.runs.append({"scenario": sc, "kind": kind, "server": name, "rep": rep,
                                      "ok": False, "error": f"{type(exc).__name__}: {exc}"})
                    print(f"   FAILED: {type(exc).__name__}: {exc}", flush=True)
                print(f"   ({time.monotonic() - t0:.1f}s)", flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny sizes, 1 rep (smoke test)")
    p.add_argument("--scenarios", default="idle,fanout,echo,legacy")
    p.add_argument("--servers", default=",".join(SERVERS))
    p.add_argument("--out", default=os.path.join(HERE, "results"))
    p.add_argument("--reps", type=int, help="repetitions (medians are reported)")
    p.add_argument("--workers", type=int, help="loadgen worker processes")
    p.add_argument("--max-minutes", type=float, help="total time budget")
    p.add_argument("--idle-sizes", help="comma list, e.g. 1000,5000,15000")
    p.add_argument("--idle-window", type=float,
                   help="seconds of idle CPU measured at the largest idle size (default: one "
                        "2 s heartbeat period; whole periods only, e.g. 4 for a CPU-target run)")
    p.add_argument("--fanout-sizes")
    p.add_argument("--echo-sizes")
    p.add_argument("--legacy-streams", type=int)
    p.add_argument("--gstream-path", default=ROOT,
                   help="checkout whose gstream/ is benchmarked (default: this worktree)")
    opts = p.parse_args(argv)
    cfg = dict(QUICK if opts.quick else FULL)
    for key, attr in (("reps", "reps"), ("workers", "workers"), ("max_minutes", "max_minutes")):
        if getattr(opts, attr) is not None:
            cfg[key] = getattr(opts, attr)
    for key, attr in (("idle", "idle_sizes"), ("fanout", "fanout_sizes"), ("echo", "echo_sizes")):
        if getattr(opts, attr):
            cfg[key] = [int(x) for x in getattr(opts, attr).split(",")]
    if opts.idle_window:
        cfg["idle_window_last"] = opts.idle_window
    if opts.legacy_streams:
        cfg["legacy"] = [opts.legacy_streams]
    opts.scenarios = [s for s in opts.scenarios.split(",") if s]
    opts.servers = [s for s in opts.servers.split(",") if s]
    unknown = [s for s in opts.servers if s not in SERVERS]
    if unknown:
        p.error(f"unknown servers {unknown}; choose from {list(SERVERS)}")

    raise_nofile()
    outdir = os.path.join(opts.out, time.strftime("%Y%m%d-%H%M%S"))
    os.makedirs(outdir, exist_ok=True)
    t0 = time.monotonic()
    bench = Bench(opts, cfg, outdir)
    print(f"gstream bench -> {outdir}\nconfig: {json.dumps(cfg)}\nservers:", flush=True)
    bench.run_all()
    env = {"python": sys.version.split()[0], "platform": platform.platform(),
           "cpus": os.cpu_count(), "loadavg_end": os.getloadavg(),
           "elapsed_s": time.monotonic() - t0, "gstream_path": opts.gstream_path}
    labels = {k: v[1] for k, v in SERVERS.items()}
    expected = {sc: cfg["reps"] for sc in opts.scenarios}
    if "legacy" in expected:
        expected["legacy"] = min(cfg["reps"], cfg.get("legacy_reps", cfg["reps"]))
    tables, summary = render_tables(bench.runs, bench.caps, labels, opts.servers, NOT_PEERS,
                                    expected)
    with open(os.path.join(outdir, "results.json"), "w") as f:
        json.dump({"config": cfg, "env": env, "capabilities": bench.caps, "runs": bench.runs,
                   "medians": summary}, f, indent=1)
    with open(os.path.join(outdir, "tables.md"), "w") as f:
        f.write(tables)
    print("\n" + tables)
    try:
        for path in save_plots(summary, labels, outdir):
            print("plot:", path)
    except Exception as exc:  # plots are a convenience; never lose the tables for them
        print("plots failed:", exc)
    print(f"done in {env['elapsed_s']:.0f}s; raw results: {outdir}/results.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
