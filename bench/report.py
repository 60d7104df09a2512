"""Tables (Markdown) and plots (PNG) from the runner's raw rows.

Each cell is the median over repetitions; the ratio in brackets is the cell
divided by the best Python peer's median in the same column (the raw epoll
limit and gstream itself are not peers). Lower-is-better metrics keep the
same ratio definition, so for them a ratio below 1 is the good side.
"""

from __future__ import annotations

import math
import os
import statistics
from typing import Any

#: (scenario, metric, title, unit, higher_is_better, digits)
METRICS = [
    ("idle", "kib_per_conn", "Idle: server RSS per connection", "KiB", False, 1),
    ("idle", "server_cpu_pct", "Idle: server CPU with 2 s heartbeats", "% of a core", False, 1),
    ("fanout", "deliveries_per_s", "Fan-out: deliveries per second (100-byte events)", "/s",
     True, 0),
    ("fanout", "lat_p50_ms", "Fan-out: publish -> last delivery, median", "ms", False, 1),
    ("fanout", "lat_p99_ms", "Fan-out: publish -> last delivery, p99", "ms", False, 1),
    ("fanout", "lost", "Fan-out: events lost (sum over clients; must be 0)", "", False, 0),
    ("fanout", "loadgen_cpu_pct", "Fan-out: busiest loadgen worker CPU", "% of a core", False, 0),
    ("echo", "round_trips_per_s", "Echo: WebSocket round trips per second", "/s", True, 0),
    ("echo", "lat_p50_ms", "Echo: round-trip latency p50", "ms", False, 2),
    ("echo", "lat_p99_ms", "Echo: round-trip latency p99", "ms", False, 2),
    ("echo", "loadgen_cpu_pct", "Echo: busiest loadgen worker CPU", "% of a core", False, 0),
    ("legacy", "view_p99_ms", "Legacy: Flask /view p99 while streams are open and events flow",
     "ms", False, 2),
    ("legacy", "base_p99_ms", "Legacy: Flask /view p99 with no streams (baseline)", "ms", False, 2),
    ("legacy", "views_per_s", "Legacy: /view requests per second under load (2 conns)", "/s",
     True, 0),
]
RATIO_METRICS = {"kib_per_conn", "server_cpu_pct", "deliveries_per_s", "lat_p50_ms",
                 "lat_p99_ms", "round_trips_per_s", "view_p99_ms"}


def summarize(runs: list[dict]) -> dict:
    """summary[scenario][kind][server][size] = {metric: median, 'n': reps, 'failed': k}."""
    groups: dict[tuple, list[dict]] = {}
    for r in runs:
        if "size" not in r:
            continue
        groups.setdefault((r["scenario"], r["kind"], r["server"], r["size"]), []).append(r)
    out: dict[str, Any] = {}
    for (sc, kind, server, size), rows in groups.items():
        cell: dict[str, Any] = {"n": len(rows), "failed": sum(1 for x in rows if not x.get("ok"))}
        keys = {k for x in rows for k, v in x.items() if isinstance(v, (int, float))
                and not isinstance(v, bool) and k not in ("rep", "size")}
        for k in keys:
            vals = [x[k] for x in rows if isinstance(x.get(k), (int, float))
                    and not (isinstance(x[k], float) and math.isnan(x[k]))]
            if vals:
                cell[k] = statistics.median(vals)
        out.setdefault(sc, {}).setdefault(kind, {}).setdefault(server, {})[str(size)] = cell
    return out


def fmt(v: float, digits: int) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "?"
    if digits == 0:
        return f"{v:,.0f}"
    return f"{v:,.{digits}f}"


def render_tables(runs: list[dict], caps: dict, labels: dict, servers: list[str],
                  not_peers: set[str], expected_reps: dict[str, int] | None = None,
                  ) -> tuple[str, dict]:
    summary = summarize(runs)
    errors: dict[tuple, str] = {}
    for r in runs:
        if r.get("error") or r.get("skipped"):
            errors[(r["scenario"], r["kind"], r["server"])] = r.get("error") or r["skipped"]
    lines: list[str] = []
    for sc, metric, title, unit, higher, digits in METRICS:
        for kind in ("sse", "ws"):
            data = summary.get(sc, {}).get(kind)
            if not data:
                continue
            sizes = sorted({int(s) for srv in data.values() for s in srv}, key=int)
            lines.append(f"### {title} [{kind.upper()}]" + (f" ({unit})" if unit else ""))
            lines.append("")
            col = "streams" if sc == "legacy" else ("clients" if sc == "echo" else "N")
            lines.append("| server | " + " | ".join(f"{col}={s:,}" for s in sizes) + " |")
            lines.append("|---|" + "---|" * len(sizes))
            best: dict[int, float] = {}
            for s in sizes:
                vals = [data[srv][str(s)][metric] for srv in data
                        if srv not in not_peers and str(s) in data[srv]
                        and metric in data[srv][str(s)]]
                vals = [v for v in vals if v == v]
                if vals:
                    best[s] = max(vals) if higher else min(vals)
            for srv in servers:
                row = [labels.get(srv, srv)]
                info = caps.get(srv, {})
                if srv not in data:
                    if "unavailable" in info:
                        why = "not available"
                    elif "error" in info:
                        why = "server failed to start"
                    elif (sc, kind, srv) in errors:
                        why = "ERROR: " + errors[(sc, kind, srv)][:60]
                    else:
                        continue  # the stack does not offer this scenario: no row
                    lines.append(f"| {row[0]} | " + " | ".join([why] * len(sizes)) + " |")
                    continue
                for s in sizes:
                    cell = data[srv].get(str(s))
                    if cell is None or metric not in cell:
                        row.append("fail" if cell else "—")
                        continue
                    txt = fmt(cell[metric], digits)
                    if metric in RATIO_METRICS and best.get(s):
                        txt += f" ({cell[metric] / best[s]:.2f}x)"
                    if cell.get("failed"):
                        txt += f" !{cell['failed']}/{cell['n']}"
                    want = (expected_reps or {}).get(sc, 0)
                    if cell["n"] < want:
                        txt += f" [{cell['n']} of {want} reps]"
                    if metric in ("deliveries_per_s", "round_trips_per_s") and \
                            cell.get("loadgen_cpu_pct", 0) > 90:
                        txt += " LG-bound?"
                    row.append(txt)
                lines.append("| " + " | ".join(row) + " |")
            lines.append("")
    lines.append("Cells are medians over repetitions; (Nx) = cell / best Python peer in the column "
                 "(raw epoll, Go net/http and gstream, with or without workers, excluded from 'peer'). '!a/b' = a of b runs had losses, "
                 "errors or too few connections. 'LG-bound?' = a loadgen worker was above 90% CPU. "
                 "'[a of b reps]' = only a of the b repetitions ran (time budget).")
    unavailable = {k: v.get("unavailable") or v.get("error") for k, v in caps.items()
                   if "unavailable" in v or "error" in v}
    if unavailable:
        lines.append("")
        for k, v in unavailable.items():
            lines.append(f"- {labels.get(k, k)}: {v}")
    return "\n".join(lines) + "\n", summary


def save_plots(summary: dict, labels: dict, outdir: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for sc, metric, title, unit, _higher, _d in METRICS:
        if metric in ("lost", "loadgen_cpu_pct", "base_p99_ms"):
            continue
        for kind in ("sse", "ws"):
            data = summary.get(sc, {}).get(kind)
            if not data:
                continue
            sizes = sorted({int(s) for srv in data.values() for s in srv})
            servers = list(data)
            fig, ax = plt.subplots(figsize=(8, 4.2))
            width = 0.8 / max(1, len(servers))
            for i, srv in enumerate(servers):
                ys = [data[srv].get(str(s), {}).get(metric, 0) or 0 for s in sizes]
                xs = [j + i * width for j in range(len(sizes))]
                ax.bar(xs, ys, width, label=labels.get(srv, srv))
            ax.set_xticks([j + width * (len(servers) - 1) / 2 for j in range(len(sizes))])
            ax.set_xticklabels([f"{s:,}" for s in sizes])
            ax.set_title(f"{title} [{kind.upper()}]", fontsize=10)
            ax.set_ylabel(unit)
            ax.legend(fontsize=7)
            fig.tight_layout()
            path = os.path.join(outdir, f"{sc}-{kind}-{metric}.png")
            fig.savefig(path, dpi=100)
            plt.close(fig)
            paths.append(path)
    return paths
