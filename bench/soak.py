"""Soak test: hours-long behaviour in minutes. A program, not a test.

Starts ``gstream serve bench.soak_app:make_app()`` as a subprocess and one
load process (gevent) that, for the whole run:

* keeps ``--clients`` SSE subscribers churning: each stays a random 0.2-4 s,
  then leaves (half by closing, a quarter with a TCP reset, a quarter
  resuming with ``Last-Event-ID``) and is replaced;
* sends ``--pings`` plain requests a second (and, with WebSocket support,
  keeps ``--ws`` WebSocket clients churning with pings and echoes, and
  ``--room`` members of a Hub room churning: each stays 0.5-6 s reading the
  room's broadcasts and now and then talking to the room; one in ten stops
  reading and leaves with a reset).

WebSocket ping round trips and the room's broadcast-to-member latency are
reported (p50/p99/max, ms) with the load counts.

Every ``--interval`` seconds the server's ``/stats`` (RSS, fds, greenlets,
subscribers) is sampled. At the end the samples are written to
``bench/results/soak-<ts>/samples.json`` with a plot ``soak.png``, and the
run fails (exit 1) if any series grows without bound: the slope of a
least-squares line over the second half of the run exceeds its threshold
(RSS ``--max-rss-slope`` MiB/min, fds and greenlets ``--max-count-slope``
per minute), or if the load saw errors beyond ``--max-error-rate``.

Usage::

    python bench/soak.py                 # 10 minutes
    python bench/soak.py --minutes 1     # a smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from typing import Any

HERE = os.path.abspath(__file__)
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, ROOT)  # this checkout's gstream, not an installed one


# -- the load process ----------------------------------------------------------

def _percentiles(xs: list[float]) -> dict[str, float]:
    """p50/p99/max of ``xs`` (seconds) in milliseconds."""
    if not xs:
        return {}
    xs = sorted(xs)
    return {"n": len(xs), "p50_ms": round(xs[len(xs) // 2] * 1e3, 2),
            "p99_ms": round(xs[min(len(xs) - 1, int(len(xs) * 0.99))] * 1e3, 2),
            "max_ms": round(xs[-1] * 1e3, 2)}


def load_worker(url: str, clients: int, pings: float, ws_clients: int, seconds: float,
                room_members: int = 0) -> None:
    """Run in a child process: churn SSE, WebSocket and room clients, ping."""
    from gevent import monkey

    monkey.patch_all()
    import random
    import socket
    import struct

    import gevent

    host, port = url.split("//")[1].split(":")
    port_i = int(port)
    counts = {"sse_sessions": 0, "sse_events": 0, "sse_errors": 0, "pings": 0,
              "ping_errors": 0, "ws_sessions": 0, "ws_errors": 0, "room_sessions": 0,
              "room_messages": 0, "room_stalled": 0, "room_errors": 0}
    ws_rtts: list[float] = []
    room_lat: list[float] = []
    stop_at = time.monotonic() + seconds
    rng = random.Random(1)

    def sse_client() -> None:
        last_id = ""
        while time.monotonic() < stop_at:
            life = rng.uniform(0.2, 4.0)
            mode = rng.random()
            try:
                s = socket.create_connection((host, port_i), timeout=10)
                extra = f"Last-Event-ID: {last_id}\r\n" if last_id and mode > 0.75 else ""
                s.sendall(f"GET /events HTTP/1.1\r\nHost: x\r\n{extra}\r\n".encode())
                end = time.monotonic() + life
                buf = b""
                s.settimeout(1.0)
                while time.monotonic() < end:
                    try:
                        data = s.recv(65536)
                    except TimeoutError:
                        continue
                    if not data:
                        break
                    buf = (buf + data)[-4096:]
                    counts["sse_events"] += data.count(b"\ndata: ")
                    ids = re.findall(rb"\nid: (\d+)", buf)
                    if ids:
                        last_id = ids[-1].decode()
                if 0.5 < mode <= 0.75:
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                s.close()
                counts["sse_sessions"] += 1
            except OSError:
                counts["sse_errors"] += 1
                gevent.sleep(0.5)

    def pinger() -> None:
        while time.monotonic() < stop_at:
            try:
                with socket.create_connection((host, port_i), timeout=10) as s:
                    s.sendall(b"GET /ping HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                    if not s.recv(64).startswith(b"HTTP/1.1 200"):
                        counts["ping_errors"] += 1
                counts["pings"] += 1
            except OSError:
                counts["ping_errors"] += 1
            gevent.sleep(1.0 / pings)

    def ws_client() -> None:
        from gstream.client import connect

        while time.monotonic() < stop_at:
            try:
                ws = connect(url.replace("http", "ws") + "/ws", open_timeout=10)
                for i in range(rng.randrange(1, 20)):
                    ws.send(f"echo {i}")
                    ws.recv(timeout=10)
                    ws_rtts.append(ws.ping().get(timeout=10))
                    gevent.sleep(rng.uniform(0.0, 0.2))
                ws.close()
                counts["ws_sessions"] += 1
            except Exception:
                counts["ws_errors"] += 1
                gevent.sleep(0.5)

    def room_member() -> None:
        from gstream.client import connect

        while time.monotonic() < stop_at:
            life = rng.uniform(0.5, 6.0)
            stalled = rng.random() < 0.1
            try:
                # A stalled member buffers one message, then stops reading.
                ws = connect(url.replace("http", "ws") + "/room", open_timeout=10,
                             max_queue=1 if stalled else 256)
                end = time.monotonic() + life
                if stalled:
                    ws._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
                    gevent.sleep(life)
                    ws._sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                        struct.pack("ii", 1, 0))
                    ws.abort()
                    counts["room_stalled"] += 1
                    continue
                while time.monotonic() < end:
                    try:
                        msg = ws.recv(timeout=max(0.01, end - time.monotonic()))
                    except TimeoutError:
                        break
                    counts["room_messages"] += 1
                    if isinstance(msg, str) and msg.startswith("{"):
                        room_lat.append(time.time() - json.loads(msg)["t"])
                    if rng.random() < 0.01:
                        ws.send("hello room")
                ws.close()
                counts["room_sessions"] += 1
            except Exception:
                counts["room_errors"] += 1
                gevent.sleep(0.5)

    jobs = [gevent.spawn(sse_client) for _ in range(clients)]
    jobs.append(gevent.spawn(pinger))
    jobs += [gevent.spawn(ws_client) for _ in range(ws_clients)]
    jobs += [gevent.spawn(room_member) for _ in range(room_members)]
    gevent.joinall(jobs, timeout=seconds + 30)
    counts["ws_ping"] = _percentiles(ws_rtts)
    counts["room_latency"] = _percentiles(room_lat)
    print(json.dumps(counts), flush=True)


# -- the driver ------------------------------------------------------------------

def slope_per_minute(ts: list[float], ys: list[float]) -> float:
    """Least-squares slope of ys over ts (seconds), per minute."""
    n = len(ts)
    if n < 3:
        return 0.0
    mt, my = sum(ts) / n, sum(ys) / n
    var = sum((t - mt) ** 2 for t in ts)
    if var == 0:
        return 0.0
    return 60.0 * sum((t - mt) * (y - my) for t, y in zip(ts, ys, strict=False)) / var


def get_stats(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(url + "/stats", timeout=10) as r:
        return json.loads(r.read())


def ws_available() -> bool:
    try:
        import gstream.websocket  # noqa: F401
    except ImportError:
        return False
    return True


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--clients", type=int, default=200, help="churning SSE subscribers")
    p.add_argument("--ws", type=int, default=50, help="churning WebSocket clients (if available)")
    p.add_argument("--room", type=int, default=50,
                   help="churning Hub room members (if WebSocket support is available)")
    p.add_argument("--room-rate", type=float, default=20.0,
                   help="room broadcasts per second")
    p.add_argument("--pings", type=float, default=20.0, help="plain requests per second")
    p.add_argument("--rate", type=float, default=50.0, help="events published per second")
    p.add_argument("--interval", type=float, default=2.0, help="seconds between samples")
    p.add_argument("--max-rss-slope", type=float, default=1.0, help="MiB per minute")
    p.add_argument("--max-count-slope", type=float, default=20.0,
                   help="fds or greenlets per minute")
    p.add_argument("--max-error-rate", type=float, default=0.01)
    p.add_argument("--out", default=None, help="output directory")
    p.add_argument("--worker", nargs=6,
                   metavar=("URL", "CLIENTS", "PINGS", "WS", "SECONDS", "ROOM"),
                   help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        u, c, pg, w, s, r = args.worker
        load_worker(u, int(c), float(pg), int(w), float(s), int(r))
        return 0

    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    seconds = args.minutes * 60
    out = args.out or os.path.join(ROOT, "bench", "results", time.strftime("soak-%Y%m%d-%H%M%S"))
    os.makedirs(out, exist_ok=True)
    env = dict(os.environ, PYTHONPATH=ROOT, PYTHONUNBUFFERED="1", SOAK_RATE=str(args.rate),
               SOAK_ROOM_RATE=str(args.room_rate))
    errlog = open(os.path.join(out, "server.log"), "w")  # noqa: SIM115
    server = subprocess.Popen(
        [sys.executable, "-m", "gstream", "serve", "bench.soak_app:make_app()", "--port", "0",
         "--log-level", "warning", "--header-timeout", "10"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=errlog, text=True)
    assert server.stdout is not None
    m = re.search(r"(http://[\d.:]+)", server.stdout.readline())
    if not m:
        server.kill()
        print("server did not start; see", errlog.name, file=sys.stderr)
        return 2
    url = m.group(1)
    ws_n = args.ws if ws_available() else 0
    room_n = args.room if ws_available() else 0
    print(f"soak: {url}, {args.minutes} min, {args.clients} SSE clients, {ws_n} WS clients, "
          f"{room_n} room members, {args.pings}/s pings, {args.rate} events/s, "
          f"{args.room_rate} room broadcasts/s -> {out}", flush=True)
    load = subprocess.Popen(
        [sys.executable, HERE, "--worker", url, str(args.clients), str(args.pings), str(ws_n),
         str(seconds), str(room_n)], cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True)
    samples: list[dict[str, Any]] = []
    t0 = time.time()
    try:
        while time.time() - t0 < seconds:
            st = get_stats(url)
            st["elapsed"] = time.time() - t0
            samples.append(st)
            print(f"  t={st['elapsed']:6.0f}s rss={st['rss'] / 2**20:6.1f} MiB fds={st['fds']:5d} "
                  f"greenlets={st['greenlets']:5d} subscribers={st['subscribers']:5d} "
                  f"room={(st.get('room') or {}).get('members', 0):4d}", flush=True)
            time.sleep(args.interval)
        load_out, _ = load.communicate(timeout=120)
    finally:
        if load.poll() is None:
            load.kill()
        server.send_signal(signal.SIGTERM)
        try:
            code = server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
            code = -9
        errlog.close()
    counts = json.loads(load_out.strip().splitlines()[-1]) if load_out.strip() else {}

    half = [s for s in samples if s["elapsed"] >= seconds / 2]
    ts = [s["elapsed"] for s in half]
    slopes = {
        "rss_mib_per_min": slope_per_minute(ts, [s["rss"] / 2**20 for s in half]),
        "fds_per_min": slope_per_minute(ts, [s["fds"] for s in half]),
        "greenlets_per_min": slope_per_minute(ts, [s["greenlets"] for s in half]),
    }
    limits = {"rss_mib_per_min": args.max_rss_slope, "fds_per_min": args.max_count_slope,
              "greenlets_per_min": args.max_count_slope}
    failures = [f"{k} = {v:.2f} > {limits[k]}" for k, v in slopes.items() if v > limits[k]]
    sessions = sum(counts.get(k, 0) for k in ("sse_sessions", "pings", "ws_sessions",
                                              "room_sessions", "room_stalled"))
    errors = sum(counts.get(k, 0) for k in ("sse_errors", "ping_errors", "ws_errors",
                                            "room_errors"))
    if sessions == 0 or errors > args.max_error_rate * max(1, sessions):
        failures.append(f"load errors: {errors} of {sessions}")
    if code != 0:
        failures.append(f"server exit code {code} after SIGTERM")
    with open(os.path.join(out, "server.log")) as f:
        if "Traceback" in f.read():
            failures.append("tracebacks in server.log")
    room_last = (samples[-1].get("room") or {}) if samples else {}
    summary = {"url": url, "minutes": args.minutes, "args": vars(args), "load": counts,
               "slopes_second_half": slopes, "limits": limits, "failures": failures,
               "rss_first_mib": samples[0]["rss"] / 2**20 if samples else None,
               "rss_last_mib": samples[-1]["rss"] / 2**20 if samples else None,
               "ws_ping": counts.get("ws_ping"), "room_latency": counts.get("room_latency"),
               "room_hub": {k: room_last.get(k) for k in (
                   "members", "fanned_out", "deliveries", "member_drops", "drops",
                   "registered", "unregistered")},
               "samples": samples}
    with open(os.path.join(out, "samples.json"), "w") as f:
        json.dump(summary, f, indent=1)
    _plot(samples, os.path.join(out, "soak.png"), slopes)
    print(json.dumps({k: v for k, v in summary.items() if k != "samples"}, indent=1))
    print("soak:", "FAILED: " + "; ".join(failures) if failures else "OK (nothing grows)")
    return 1 if failures else 0


def _plot(samples: list[dict[str, Any]], path: str, slopes: dict[str, float]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = [s["elapsed"] / 60 for s in samples]
    fig, axes = plt.subplots(4, 1, figsize=(9, 10), sharex=True)
    series = [("rss", "RSS (MiB)", 2**20, "rss_mib_per_min"), ("fds", "open fds", 1, "fds_per_min"),
              ("greenlets", "live greenlets", 1, "greenlets_per_min"),
              ("subscribers", "SSE subscribers", 1, None)]
    for ax, (key, label, scale, slope_key) in zip(axes, series, strict=False):
        ax.plot(t, [s[key] / scale for s in samples], label=label)
        if key == "subscribers" and any(s.get("room") for s in samples):
            ax.plot(t, [(s.get("room") or {}).get("members", 0) for s in samples],
                    label="room members")
            ax.legend(fontsize=8)
            label = "SSE subscribers, room members"
        title = label if slope_key is None else f"{label}: 2nd-half slope {slopes[slope_key]:+.2f}/min"
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
    axes[-1].set_xlabel("minutes")
    fig.tight_layout()
    fig.savefig(path, dpi=90)


if __name__ == "__main__":
    sys.exit(main())
