"""Shared checks for the Flask and Django examples, run as real processes
under ``python -m gstream serve`` and ``gunicorn -k gevent``."""

from __future__ import annotations

import os
import resource
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import gevent
import pytest
import requests
from gevent.pool import Pool
from gevent.pywsgi import WSGIServer

from gstream.client import connect
from gstream.errors import Closed
from tests.helpers import SSEStream

ROOT = str(Path(__file__).resolve().parent.parent)
IDLE_STREAMS = 1000


def raise_fd_limit() -> None:
    """Two sockets per stream in this process's share of the test: lift the soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _child_limits() -> None:  # runs in the child before exec
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = int(s.getsockname()[1])
    s.close()
    return port


class Upstream:
    """A tiny local HTTP server that the examples' ``/fetch`` view calls."""

    def __init__(self) -> None:
        self.hits = 0

        def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
            self.hits += 1
            start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "12")])
            return [b"upstream ok\n"]

        self.server = WSGIServer(("127.0.0.1", 0), app, log=None)
        self.server.start()
        self.url = f"http://127.0.0.1:{self.server.server_port}/"

    def stop(self) -> None:
        self.server.stop(timeout=1)


class ExampleServer:
    """One example app in a subprocess; ``kind`` is ``gstream`` or ``gunicorn``."""

    def __init__(self, kind: str, spec: str, env: dict[str, str], logdir: Path,
                 worker: str = "gevent") -> None:
        self.kind = kind
        self.log_path = logdir / f"{kind}.log"
        self.log = open(self.log_path, "w")  # noqa: SIM115 - lives as long as the server
        full_env = dict(os.environ, PYTHONPATH=ROOT, PYTHONUNBUFFERED="1", **env)
        if kind == "gstream":
            cmd = [sys.executable, "-m", "gstream", "serve", spec, "--port", "0",
                   "--shutdown-timeout", "3", "--log-level", "warning"]
        else:
            self.port = _free_port()
            cmd = [sys.executable, "-m", "gunicorn", "-k", worker, "-w", "1",
                   "--worker-connections", str(IDLE_STREAMS + 200),
                   "-b", f"127.0.0.1:{self.port}",
                   # Plain gevent workers wait the whole graceful timeout for
                   # streams whose clients left (nothing tells them): keep it short.
                   "--graceful-timeout", "1" if worker == "gevent" else "3",
                   "--control-socket", str(logdir / "gunicorn.ctl"),
                   "--log-level", "warning", spec]
        self.p = subprocess.Popen(cmd, cwd=ROOT, env=full_env, stdout=subprocess.PIPE,
                                  stderr=self.log, text=True, preexec_fn=_child_limits)
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self) -> None:
        assert self.p.stdout is not None
        with gevent.Timeout(30, AssertionError(f"{self.kind} did not start: {self.logs()}")):
            if self.kind == "gstream":
                line = self.p.stdout.readline()
                assert "http://" in line, f"{line!r} {self.logs()}"
                self.port = int(line.strip().rsplit(":", 1)[1].rstrip("/"))
            while True:
                assert self.p.poll() is None, self.logs()
                try:
                    socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                    break
                except OSError:
                    gevent.sleep(0.1)
        self.url = f"http://127.0.0.1:{self.port}"

    def logs(self) -> str:
        self.log.flush()
        return self.log_path.read_text()[-3000:]

    def stop(self) -> int | None:
        """SIGTERM, then the exit status (killed if it does not exit in time)."""
        code = None
        if self.p.poll() is None:
            self.p.send_signal(signal.SIGTERM)
            try:
                code = self.p.wait(8)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait(5)
        self.log.close()
        return code


def example_server(spec: str, env: Callable[[Path], dict[str, str]]) -> Callable[..., Any]:
    """A module-scoped fixture factory: the example under both servers."""

    @pytest.fixture(scope="module", params=["gstream", "gunicorn"])
    def fixture(request: Any, tmp_path_factory: Any) -> Iterator[tuple[ExampleServer, Upstream]]:
        raise_fd_limit()
        upstream = Upstream()
        logdir = tmp_path_factory.mktemp(request.param)
        server = ExampleServer(request.param, spec,
                               dict(env(logdir), EXAMPLE_UPSTREAM=upstream.url), logdir)
        yield server, upstream
        code = server.stop()
        upstream.stop()
        assert code == 0, server.logs()

    return fixture


# -- checks -----------------------------------------------------------------


def check_blocking_views(url: str, upstream: Upstream) -> None:
    assert requests.get(url + "/healthz", timeout=5).text.strip() == "ok"
    r = requests.get(url + "/sleep?seconds=0.05", timeout=5)
    assert r.status_code == 200 and r.json()["slept"] == 0.05
    assert requests.get(url + "/sleep?seconds=x", timeout=5).status_code == 400
    # time.sleep is cooperative: five 0.4 s sleeps overlap.
    t0 = time.monotonic()
    jobs = [gevent.spawn(requests.get, url + "/sleep?seconds=0.4", timeout=5) for _ in range(5)]
    gevent.joinall(jobs, raise_error=True)
    assert all(j.value.status_code == 200 for j in jobs)
    assert time.monotonic() - t0 < 1.5
    # sqlite3: insert, then read back.
    name = f"item-{time.monotonic_ns()}"
    r = requests.post(url + "/items", json={"name": name}, timeout=5)
    assert r.status_code == 201, r.text
    assert name in [i["name"] for i in requests.get(url + "/items", timeout=5).json()["items"]]
    assert requests.post(url + "/items", json={"name": ""}, timeout=5).status_code == 400
    assert requests.post(url + "/items", data=b"x" * 70_000, timeout=5).status_code in (400, 413)
    # Outbound requests call to the local upstream.
    hits = upstream.hits
    r = requests.get(url + "/fetch", timeout=5)
    assert r.status_code == 200 and r.json()["status"] == 200
    assert r.json()["body"] == "upstream ok\n" and upstream.hits == hits + 1


def check_sse(url: str, port: int) -> None:
    a = SSEStream(port, "/events")
    assert a.status == 200 and a.headers["content-type"].startswith("text/event-stream")
    with gevent.Timeout(5):
        assert b"stream open" in (a.reader.read_chunk() or b"")  # subscribed
    ids = [requests.post(url + "/publish", data=f"news {i}".encode(), timeout=5).json()["id"]
           for i in range(3)]
    got = a.events(3)
    assert [e.data for e in got] == ["news 0", "news 1", "news 2"]
    assert [e.last_event_id for e in got] == ids
    a.close()
    # Resume after the first: the other two are replayed, in order.
    b = SSEStream(port, "/events", headers={"Last-Event-ID": ids[0]})
    assert [e.data for e in b.events(2)] == ["news 1", "news 2"]
    b.close()


def check_websocket(url: str) -> None:
    ws_url = url.replace("http://", "ws://") + "/ws"
    with connect(ws_url) as ws:
        for message in ("hello", b"\x00\xffbinary", "x" * 100_000):
            ws.send(message)
            assert ws.recv(timeout=5) == message
    ws = connect(ws_url)
    ws.close(1000, "bye")
    assert ws.close_code == 1000
    with pytest.raises(Closed):
        ws.recv(timeout=2)
    # A plain GET on the WebSocket endpoint is refused, and the app still works.
    assert requests.get(ws_url.replace("ws://", "http://"), timeout=5).status_code == 426
    assert requests.get(url + "/healthz", timeout=5).status_code == 200


def _latencies(url: str, rounds: int) -> list[float]:
    out = []
    session = requests.Session()
    for _ in range(rounds):
        for path in ("/items", "/fetch", "/sleep?seconds=0"):
            t0 = time.perf_counter()
            r = session.get(url + path, timeout=10)
            out.append(time.perf_counter() - t0)
            assert r.status_code == 200, (path, r.status_code)
    session.close()
    return out


def check_idle_streams_do_not_slow_views(url: str, port: int) -> None:
    _latencies(url, 3)  # warm up (imports, connections)
    baseline = statistics.median(_latencies(url, 15))
    streams: list[SSEStream] = []

    def open_one() -> None:
        s = SSEStream(port, "/events", timeout=10)
        streams.append(s)  # before asserting, so it is closed whatever happens
        assert s.status == 200
        assert b"stream open" in (s.reader.read_chunk() or b"")

    try:
        with gevent.Timeout(60, AssertionError("opening the idle streams took too long")):
            pool = Pool(100)
            for _ in range(IDLE_STREAMS):
                pool.spawn(open_one)
            pool.join(raise_error=True)
        assert len(streams) == IDLE_STREAMS
        loaded = statistics.median(_latencies(url, 15))
        # A functional bound, not a benchmark: idle streams must not block views.
        assert loaded < baseline + 0.050, (baseline, loaded)
        # The streams are alive: an event published now reaches them.
        event_id = requests.post(url + "/publish", data=b"to everyone", timeout=5).json()["id"]
        for s in streams[:: IDLE_STREAMS // 20]:
            e = s.next_event(10)
            assert e.data == "to everyone" and e.last_event_id == event_id
    finally:
        for s in streams:
            s.close()


def check_sigterm_ends_streams(srv: ExampleServer, port: int, started: float | None = None) -> None:
    """SIGTERM with open SSE and WebSocket clients: final event + retry, 1001, exit 0."""
    streams = [SSEStream(port, "/events") for _ in range(3)]
    for s in streams:
        with gevent.Timeout(5):
            assert b"stream open" in (s.reader.read_chunk() or b"")
    sockets = [connect(srv.url.replace("http://", "ws://") + "/ws") for _ in range(2)]
    for ws in sockets:
        ws.send("before")
        assert ws.recv(timeout=5) == "before"
    t0 = time.monotonic()
    srv.p.send_signal(signal.SIGTERM)
    for s in streams:
        events = s.read_until_end(timeout=5)
        assert events and events[-1].event == "gstream.shutdown", events
        assert s.parser.retry == 3000
        s.close()
    for ws in sockets:
        with pytest.raises(Closed), gevent.Timeout(5):
            while True:
                ws.recv(timeout=5)
        assert ws.close_code == 1001
    assert srv.p.wait(6) == 0, srv.logs()
    assert time.monotonic() - t0 < 4.5
