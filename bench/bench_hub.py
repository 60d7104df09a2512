"""Hub broadcast benchmark: gstream's Hub vs the ``websockets`` asyncio server's
``broadcast()`` vs a gevent-websocket send loop, in the same run.

A program, not a test. It reuses the harness of bench/run.py: each server is
its own process (bench/servers/gstream_server.py, websockets_server.py,
geventws_server.py: every one serves ``/ws`` members and ``/publish``), and
the members are raw-socket clients in separate load-generator processes
(bench/loadgen.py), identical for every server. For each member count N it
broadcasts K messages of 100 bytes back to back (K = budget / N, 10..2000)
and reports

- deliveries per second (N x K over the span from the first broadcast to the
  last delivery anywhere),
- broadcast-to-last-delivery latency per message (the time from the
  broadcast call to its delivery to the last member), median and p99,
- losses and out-of-order deliveries (expected 0), and server CPU%.

The lead's real run (about 3-5 minutes on 2 cores)::

    python bench/bench_hub.py --sizes 100,1000,10000 --reps 3

Smoke run (seconds)::

    python bench/bench_hub.py --sizes 10,30 --budget 300 --reps 1
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
import run  # noqa: E402
from common import raise_nofile  # noqa: E402

PEERS = ("gstream", "websockets", "geventws")


def _median(rows: list[dict], key: str) -> float:
    vals = [r[key] for r in rows if isinstance(r.get(key), (int, float)) and r[key] == r[key]]
    return statistics.median(vals) if vals else float("nan")


def table(runs: list[dict], servers: list[str], sizes: list[int]) -> str:
    """Markdown: one row per (members, server), medians over repetitions."""
    labels = {k: v[1] for k, v in run.SERVERS.items()}
    out = ["| members | server | deliveries/s | vs best peer | p50 ms | p99 ms | lost | out of order | server CPU % | ok |",
           "|---:|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for n in sizes:
        rows = {s: [r for r in runs if r.get("server") == s and r.get("size") == n
                    and "deliveries_per_s" in r] for s in servers}
        rates = {s: _median(v, "deliveries_per_s") for s, v in rows.items() if v}
        peers = [v for s, v in rates.items() if s != "gstream" and v == v]
        best = max(peers) if peers else float("nan")
        for s in servers:
            rs = rows.get(s) or []
            if not rs:
                errs = [r.get("error") or r.get("skipped") for r in runs
                        if r.get("server") == s and r.get("size") in (n, None)]
                out.append(f"| {n} | {labels.get(s, s)} | n/a | | | | | | | {errs[:1]} |")
                continue
            rate = rates[s]
            ratio = f"{rate / best:.2f}x" if best == best and best > 0 else ""
            out.append(
                f"| {n} | {labels.get(s, s)} | {rate:,.0f} | {ratio} | {_median(rs, 'lat_p50_ms'):.1f} "
                f"| {_median(rs, 'lat_p99_ms'):.1f} | {sum(r.get('lost', 0) for r in rs)} "
                f"| {sum(r.get('out_of_order', 0) for r in rs)} | {_median(rs, 'server_cpu_pct'):.0f} "
                f"| {all(r.get('ok') for r in rs)} |")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--sizes", default="100,1000,10000", help="member counts, comma list")
    p.add_argument("--servers", default=",".join(PEERS))
    p.add_argument("--reps", type=int, default=3, help="repetitions (medians are reported)")
    p.add_argument("--budget", type=int, default=100_000,
                   help="deliveries per measurement: K = budget / N messages (10..2000)")
    p.add_argument("--workers", type=int, default=2, help="load generator processes")
    p.add_argument("--kind", choices=("ws", "sse"), default="ws",
                   help="ws: the Hub (default); sse: the same bursts through SSEBroker "
                        "(gstream only)")
    p.add_argument("--max-minutes", type=float, default=10.0, help="total time budget")
    p.add_argument("--out", default=os.path.join(HERE, "results"))
    p.add_argument("--gstream-path", default=ROOT,
                   help="checkout whose gstream/ is benchmarked (default: this worktree)")
    opts = p.parse_args(argv)
    sizes = sorted(int(x) for x in opts.sizes.split(",") if x)
    servers = [s for s in opts.servers.split(",") if s]
    unknown = [s for s in servers if s not in run.SERVERS]
    if unknown:
        p.error(f"unknown servers {unknown}; choose from {list(run.SERVERS)}")

    cfg: dict[str, Any] = dict(run.FULL)
    cfg.update(fanout=sizes, fanout_budget=opts.budget, reps=opts.reps, workers=opts.workers,
               max_minutes=opts.max_minutes)
    bench_opts = argparse.Namespace(scenarios=["fanout"], servers=servers,
                                    gstream_path=opts.gstream_path)
    raise_nofile()
    outdir = os.path.join(opts.out, "hub-" + time.strftime("%Y%m%d-%H%M%S"))
    os.makedirs(outdir, exist_ok=True)
    bench = run.Bench(bench_opts, cfg, outdir)
    bench.plan = lambda: [("fanout", opts.kind, s) for s in servers]  # type: ignore[method-assign]
    print(f"hub bench -> {outdir}\nsizes {sizes}, budget {opts.budget}, reps {opts.reps}",
          flush=True)
    t0 = time.monotonic()
    bench.run_all()
    md = table(bench.runs, servers, sizes)
    with open(os.path.join(outdir, "results.json"), "w") as f:
        json.dump({"config": cfg, "capabilities": bench.caps, "runs": bench.runs}, f, indent=1)
    with open(os.path.join(outdir, "tables.md"), "w") as f:
        f.write(md)
    title = "WebSocket broadcast (hub)" if opts.kind == "ws" else "SSE fan-out (broker)"
    print(f"\n## {title}\n\n" + md)
    print(f"done in {time.monotonic() - t0:.0f}s; raw results: {outdir}/results.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
