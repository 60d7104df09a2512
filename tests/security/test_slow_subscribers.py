"""1,000 SSE subscribers that stop reading (tiny receive windows) while
publishing continues, against a ``gstream serve`` subprocess: the server's
memory is bounded by the subscribers' buffer sizes (it does not grow with
the number of events published), a healthy subscriber keeps its latency and
loses nothing, and every seat is freed when the stalled clients leave
(python-anchors section 3: channels_redis#96 unbounded queues, #11 memory)."""

from __future__ import annotations

import json
import socket
import time

import gevent
import pytest
import requests
from gevent.pool import Pool

from tests.helpers import SSEStream, read_response_head
from tests.security.conftest import raise_nofile

STALLED = 1000
BUFFER = 16  # frames each stalled subscriber may queue (?buffer=16)
SIZE = 512  # bytes of data per event
PHASE = 2000  # events per publishing phase


def stats(url: str) -> dict:
    return requests.get(url + "/stats", timeout=10, headers={"Connection": "close"}).json()


def stalled(port: int) -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)  # before connect: tiny window
    s.settimeout(10)
    s.connect(("127.0.0.1", port))
    s.sendall(f"GET /events?buffer={BUFFER} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    status, _, _ = read_response_head(s)
    assert status == 200
    return s  # never read again


class Healthy:
    def __init__(self, port: int) -> None:
        self.stream = SSEStream(port, "/events?buffer=1024", timeout=30)
        self.latencies: list[float] = []
        self.missed = 0
        self.g = gevent.spawn(self._run)

    def _run(self) -> None:
        while True:
            ev = self.stream.next_event(timeout=60)
            if ev.event == "gstream.missed":
                self.missed += json.loads(ev.data)["missed"]
                continue
            self.latencies.append(time.time() - json.loads(ev.data)["t"])


@pytest.mark.slow
def test_thousand_stalled_subscribers_memory_bounded_healthy_latency(server_process):
    assert raise_nofile() >= STALLED + 200, "needs a higher RLIMIT_NOFILE hard limit"
    proc = server_process("--max-connections", "5000", "--header-timeout", "10",
                          "--log-level", "warning", env={"GS_HEARTBEAT": "30"})
    url = proc.url
    healthy = Healthy(proc.port)
    requests.get(url + f"/publish?n=100&size={SIZE}", timeout=10).raise_for_status()
    gevent.sleep(0.3)
    base = stats(url)

    pool = Pool(100)
    socks = [j for j in (pool.spawn(stalled, proc.port) for _ in range(STALLED))]
    pool.join(timeout=60, raise_error=True)
    socks = [j.value for j in socks]
    connected = stats(url)
    assert connected["broker"]["subscribers"] == STALLED + 1

    phases = []
    # Phase 1 fills the kernel's socket buffers and the queues; phases 2 and
    # 3 run in the steady state, where memory must stay flat.
    for _ in range(3):
        r = requests.get(url + f"/publish?n={PHASE}&size={SIZE}&batch=50", timeout=60)
        r.raise_for_status()
        gevent.sleep(0.5)
        phases.append(stats(url))
    p1, p2, p3 = phases
    frame = SIZE + 40  # an encoded frame: data plus "data: ", "id: ..." and newlines
    queue_bound = (STALLED * BUFFER + 1024) * frame
    # The broker's queues never hold more than the buffers allow...
    for p in phases:
        assert p["queued_frames"] <= STALLED * BUFFER + 1024
        assert p["queued_bytes"] <= queue_bound
    # They really are stalled: most events were dropped for them. (Their
    # queues may be empty at the moment of sampling: the kernel's send
    # buffer on loopback absorbs a few hundred KiB per socket, and the
    # coalescing reader hands it whole bursts.)
    assert p3["broker"]["dropped"] > STALLED * PHASE  # ...and dropped their oldest
    # ...and the process does not grow with the number of events published:
    # a stalled subscriber costs at most its queue plus one coalesced chunk
    # stuck in a socket write (each at most BUFFER frames).
    growth_fill = p2["rss"] - connected["rss"]
    growth_steady = p3["rss"] - p2["rss"]
    assert growth_fill < 2 * queue_bound + (16 << 20), growth_fill
    assert growth_steady < 4 << 20, growth_steady

    # The healthy subscriber got everything, promptly.
    with gevent.Timeout(10):
        while len(healthy.latencies) < 100 + 3 * PHASE:
            gevent.sleep(0.05)
    assert healthy.missed == 0
    lat = sorted(healthy.latencies[100:])
    p50, p99 = lat[len(lat) // 2], lat[int(len(lat) * 0.99)]
    assert p50 < 0.25 and p99 < 1.0, (p50, p99, lat[-1])

    # The stalled clients leave (with unread data: the kernel resets): every
    # seat and fd is freed.
    for s in socks:
        s.close()
    requests.get(url + "/publish?n=5", timeout=10).raise_for_status()
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        after = stats(url)
        if after["broker"]["subscribers"] == 1 and after["fds"] <= base["fds"] + 5:
            break
        gevent.sleep(0.2)
    assert after["broker"]["subscribers"] == 1 and after["lifecycle"] == 1
    assert after["fds"] <= base["fds"] + 5, (base["fds"], after["fds"])
    assert after["greenlets"] <= base["greenlets"] + 5, (base["greenlets"], after["greenlets"])
    healthy.g.kill()
    healthy.stream.close()
    print(f"\nstalled={STALLED} published={3 * PHASE + 105} rss: base={base['rss'] >> 20} MiB "
          f"connected={connected['rss'] >> 20} MiB p1={p1['rss'] >> 20} MiB p2={p2['rss'] >> 20} MiB p3={p3['rss'] >> 20} MiB "
          f"after={after['rss'] >> 20} MiB; queued={p3['queued_bytes'] >> 10} KiB; "
          f"healthy p50={p50 * 1000:.1f} ms p99={p99 * 1000:.1f} ms")
    proc.terminate()
    assert proc.wait(15) == 0
    assert "Traceback" not in proc.stderr(), proc.stderr()
