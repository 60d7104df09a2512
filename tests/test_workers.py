"""``gstream serve --workers N`` (gstream.workers.Supervisor) as real subprocesses.

Every server here is ``python -m gstream serve ... --workers 2`` (or the Python
API in tests/apps/workers_preload.py) on 127.0.0.1, talked to by real clients.
Which worker accepts a connection is the kernel's choice; where a test needs
both, it blocks one worker's loop (``/hog``) so the next connections can only
go to the other.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import gevent
import pytest
import requests

from gstream.client import connect
from gstream.errors import Closed
from tests.helpers import SSEStream, wait_until
from tests.tlsutil import make_cert

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
APP = "tests.apps.workers_app:app"


class Supervised:
    """A supervisor process; its stderr is collected as it comes (no pipe can fill)."""

    def __init__(self, cmd: list[str]) -> None:
        env = dict(os.environ, PYTHONPATH=ROOT, PYTHONUNBUFFERED="1")
        # A session of its own: a test sends SIGINT to its whole group, as Ctrl-C does.
        self.p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True, start_new_session=True)
        self.lines: list[str] = []
        self._reader = gevent.spawn(self._read)
        self.url = ""
        self.port = 0

    def _read(self) -> None:
        assert self.p.stderr is not None
        for line in self.p.stderr:
            self.lines.append(line)

    @property
    def log(self) -> str:
        return "".join(self.lines)

    def wait_url(self, timeout: float = 20) -> str:
        assert self.p.stdout is not None
        with gevent.Timeout(timeout, AssertionError(f"no URL; log:\n{self.log}")):
            line = self.p.stdout.readline()
        m = re.search(r"(https?://[\d.]+:(\d+))", line)
        assert m, f"no URL in {line!r}; log:\n{self.log}"
        self.url, self.port = m.group(1), int(m.group(2))
        return self.url

    def workers(self) -> set[int]:
        """The pids of the supervisor's live children (from /proc)."""
        kids = set()
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/stat") as f:
                    stat = f.read()
            except OSError:
                continue
            fields = stat[stat.rindex(")") + 2:].split()
            if int(fields[1]) == self.p.pid and fields[0] != "Z":
                kids.add(int(entry))
        return kids

    def pid_of_one_request(self) -> int:
        return int(requests.get(self.url + "/pid", timeout=5).text)

    def exit_code(self, timeout: float) -> int:
        code = self.p.wait(timeout)
        self._reader.join(timeout=5)
        return code


@pytest.fixture
def supervised() -> Iterator[Any]:
    started: list[Supervised] = []

    def run(*args: str, module: str = "gstream") -> Supervised:
        s = Supervised([sys.executable, "-m", module, *args])
        started.append(s)
        return s

    yield run
    for s in started:
        if s.p.poll() is None:
            kids = s.workers()
            s.p.kill()
            s.p.wait(5)
            for pid in kids:  # they would drain on their own (parent gone); don't wait
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
        s._reader.join(timeout=5)


def serve(supervised: Any, *extra: str) -> Supervised:
    s: Supervised = supervised("serve", APP, "--port", "0", "--workers", "2", *extra)
    s.wait_url()
    return s


def both_workers(s: Supervised, make: Any, limit: int = 40) -> list[tuple[int, Any]]:
    """Call ``make()`` (which returns (pid, thing)) until both workers have answered.

    After a few answers from one worker only, one ``/hog`` blocks a worker's
    loop while the next ``make()`` runs, so the other worker must take it.
    """
    got: list[tuple[int, Any]] = []
    for i in range(limit):
        if i >= 4 and len({pid for pid, _ in got}) < 2:
            hog = gevent.spawn(requests.get, s.url + "/hog?t=0.4", timeout=10,
                               verify=getattr(s, "verify", True))
            gevent.sleep(0.1)  # (a head start only; the loop does not rely on it)
            got.append(make())
            hog.get(timeout=10)
        else:
            got.append(make())
        if len({pid for pid, _ in got}) >= 2:
            return got
    raise AssertionError(f"only worker {got[0][0]} answered {limit} connections")


def open_sse(s: Supervised) -> tuple[int, SSEStream]:
    """An SSE stream to ``/stream`` and the pid of the worker serving it (its first event)."""
    stream = SSEStream(s.port, "/stream")
    return int(stream.next_event(5).data), stream


def test_two_workers_serve_patched_apps_from_distinct_pids(supervised: Any) -> None:
    s = serve(supervised)
    kids = s.workers()
    assert len(kids) == 2 and s.p.pid not in kids
    seen = {pid for pid, _ in both_workers(s, lambda: (s.pid_of_one_request(), None))}
    assert seen == kids
    # Each worker imported the app after gevent's patching, as one process does.
    for _ in range(4):
        assert requests.get(s.url + "/patched", timeout=5).json() == {
            "socket": True, "time": True, "ssl": True, "at_import": True}
    assert wait_until(lambda: s.log.count("gstream serving on") == 3, 5), s.log  # 2 workers + 1
    assert "in-memory broker, hub" in s.log and "docs/redis.md" in s.log
    # Ctrl-C in a terminal reaches every process of the group: a drain, not a cut
    # (the workers ignore SIGINT; the supervisor sends each one SIGTERM).
    pid, stream = open_sse(s)
    os.killpg(s.p.pid, signal.SIGINT)
    events = stream.read_until_end(timeout=8)
    assert events and events[-1].event == "shutdown", (events, s.log)
    stream.close()
    assert s.exit_code(10) == 0
    assert "closing every connection now" not in s.log


def test_sse_and_websocket_echo_through_both_workers(supervised: Any) -> None:
    s = serve(supervised)
    ws_url = s.url.replace("http://", "ws://")

    def open_ws() -> tuple[int, Any]:
        ws = connect(ws_url + "/echo")
        ws.send("pid?")
        return int(ws.recv(timeout=5)), ws

    sockets = both_workers(s, open_ws)
    for i, (_, ws) in enumerate(sockets):
        ws.send(f"message {i}" * 100)
        assert ws.recv(timeout=5) == f"message {i}" * 100
        ws.send(b"\x00\xff" * 1000)
        assert ws.recv(timeout=5) == b"\x00\xff" * 1000
        ws.close()

    for _, stream in both_workers(s, lambda: open_sse(s)):
        stream.close()
    s.p.send_signal(signal.SIGTERM)
    assert s.exit_code(10) == 0


def test_killed_worker_is_replaced_and_service_continues(supervised: Any) -> None:
    s = serve(supervised)
    before = s.workers()
    victim = min(before)
    os.kill(victim, signal.SIGKILL)
    assert wait_until(lambda: len(s.workers() - {victim}) == 2 and "ready" in s.log, 15), s.log
    after = s.workers()
    assert victim not in after and len(after & before) == 1
    (new,) = after - before
    assert wait_until(lambda: f"(pid {new}) ready" in s.log, 15), s.log
    assert f"(pid {victim}) was killed by SIGKILL" in s.log
    # Both, the survivor and the replacement, serve.
    seen = {pid for pid, _ in both_workers(s, lambda: (s.pid_of_one_request(), None))}
    assert seen == after
    # SIGTERM to one worker: it drains (its stream gets the final event) and is replaced.
    opened = both_workers(s, lambda: open_sse(s))
    streams = [stream for pid, stream in opened if pid == new]
    for pid, stream in opened:
        if pid != new:
            stream.close()
    os.kill(new, signal.SIGTERM)
    for stream in streams:
        events = stream.read_until_end(timeout=5)
        assert events[-1].event == "shutdown", events
        stream.close()
    assert wait_until(lambda: new not in s.workers() and len(s.workers()) == 2
                      and s.log.count(") ready") >= 2, 15), s.log
    assert f"(pid {new}) exited with status 0" in s.log
    assert s.pid_of_one_request() in s.workers()
    s.p.send_signal(signal.SIGTERM)
    assert s.exit_code(10) == 0


def test_a_worker_whose_loop_is_blocked_is_killed_and_replaced(supervised: Any) -> None:
    s = serve(supervised, "--worker-timeout", "2")
    before = s.workers()
    # A block shorter than the timeout is tolerated (heartbeats every 0.5 s).
    assert int(requests.get(s.url + "/hog?t=0.3", timeout=10).text) in before
    gevent.sleep(2.5)
    assert s.workers() == before and "sent no heartbeat" not in s.log, s.log
    # A loop blocked for good: no heartbeat, so the worker is killed and replaced.
    stuck = gevent.spawn(requests.get, s.url + "/hog?t=20", timeout=30)
    assert wait_until(lambda: "sent no heartbeat" in s.log, 15), s.log
    m = re.search(r"worker \d+ \(pid (\d+)\) sent no heartbeat for ([\d.]+) s", s.log)
    assert m, s.log
    victim, silent = int(m.group(1)), float(m.group(2))
    assert victim in before and 2 <= silent < 10
    assert wait_until(lambda: victim not in s.workers() and len(s.workers()) == 2
                      and s.log.count(") ready") >= 1, 15), s.log
    assert f"(pid {victim}) was killed by SIGKILL" in s.log
    stuck.join(timeout=10)  # its connection died with the worker
    assert stuck.ready() and not stuck.successful()
    (new,) = s.workers() - before
    assert wait_until(lambda: f"(pid {new}) ready" in s.log, 15), s.log
    seen = {pid for pid, _ in both_workers(s, lambda: (s.pid_of_one_request(), None))}
    assert seen == s.workers()
    s.p.send_signal(signal.SIGTERM)
    assert s.exit_code(15) == 0


def test_sigterm_drains_every_worker(supervised: Any) -> None:
    s = serve(supervised, "--shutdown-timeout", "4")
    ws_url = s.url.replace("http://", "ws://")
    streams = [stream for _, stream in both_workers(s, lambda: open_sse(s))]
    sockets = [connect(ws_url + "/echo") for _ in range(4)]
    for ws in sockets:
        ws.send("before")
        assert ws.recv(timeout=5) == "before"
    kids = s.workers()
    t0 = time.monotonic()
    s.p.send_signal(signal.SIGTERM)
    for stream in streams:
        events = stream.read_until_end(timeout=6)
        assert events and events[-1].event == "shutdown", events
        assert events[-1].data == "server shutting down"
        stream.close()
    for ws in sockets:
        with pytest.raises(Closed), gevent.Timeout(6):
            while True:
                ws.recv(timeout=6)
        assert ws.close_code == 1001
    assert s.exit_code(8) == 0, s.log
    assert time.monotonic() - t0 < 7
    assert all(f"(pid {pid}) exited with status 0" in s.log for pid in kids), s.log
    assert "all workers stopped" in s.log


def test_a_worker_that_ignores_sigterm_is_killed_at_the_deadline(supervised: Any) -> None:
    s = serve(supervised, "--shutdown-timeout", "0.5")
    wedged = int(requests.get(s.url + "/ignore-sigterm", timeout=5).text)
    t0 = time.monotonic()
    s.p.send_signal(signal.SIGTERM)
    assert s.exit_code(15) == 0, s.log
    # 0.5 s of drain + the supervisor's 3 s of grace, then SIGKILL.
    assert 3.3 <= time.monotonic() - t0 < 12
    assert f"(pid {wedged}) still running at the deadline: killing it" in s.log
    assert f"(pid {wedged}) was killed by SIGKILL" in s.log
    assert "all workers stopped" in s.log


def test_crash_looping_app_gives_up_with_a_clear_error(supervised: Any) -> None:
    s = supervised("serve", "tests.apps.crash_at_import:app", "--port", "0", "--workers", "2")
    t0 = time.monotonic()
    assert s.exit_code(30) == 1, s.log
    assert time.monotonic() - t0 < 30
    assert "RuntimeError: boom at import" in s.log
    assert "could not load the application" in s.log
    assert "giving up" in s.log
    assert "starting a replacement in" in s.log  # with a back-off
    assert s.p.stdout is not None and s.p.stdout.read() == ""  # never announced a URL


def test_worker_count_is_bounded(supervised: Any) -> None:
    for bad in ("0", "-1", str(4 * (os.cpu_count() or 1) + 1), "two"):
        s = supervised("serve", APP, "--port", "0", "--workers", bad)
        assert s.exit_code(15) == 2
        assert "--workers" in s.log and ("between 1 and" in s.log or "whole number" in s.log)


def test_tls_through_both_workers(supervised: Any, tmp_path: Any) -> None:
    # The listener is bound once in the supervisor; each worker wraps what it accepts.
    cert, key = make_cert(str(tmp_path))
    s = serve(supervised, "--certfile", cert, "--keyfile", key)
    assert s.url.startswith("https://")
    s.verify = cert  # both_workers' /hog too
    seen = {pid for pid, _ in both_workers(
        s, lambda: (int(requests.get(s.url + "/pid", timeout=5, verify=cert).text), None))}
    assert seen == s.workers()
    with pytest.raises(requests.exceptions.ConnectionError):
        requests.get(s.url.replace("https://", "http://") + "/pid", timeout=5)
    s.p.send_signal(signal.SIGTERM)
    assert s.exit_code(15) == 0


def test_the_demo_refuses_workers(supervised: Any) -> None:
    # Its rooms live in memory: with two workers a chat would be split in two.
    s = supervised("demo", "--port", "0", "--workers", "2")
    assert s.exit_code(15) == 2
    assert "the demo runs in one process" in s.log


def test_bad_spec_and_busy_port_fail_before_forking(supervised: Any) -> None:
    s = supervised("serve", "no_colon", "--port", "0", "--workers", "2")
    assert s.exit_code(15) == 1
    assert "expected module:app" in s.log and "worker" not in s.log
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        s = supervised("serve", APP, "--port", str(port), "--workers", "2")
        assert s.exit_code(15) == 1
    assert f"cannot listen on 127.0.0.1:{port}" in s.log and "started" not in s.log
    for bad in ("-1", "nan", "soon"):
        s = supervised("serve", APP, "--port", "0", "--workers", "2", "--worker-timeout", bad)
        assert s.exit_code(15) == 2
        assert "--worker-timeout" in s.log and "started" not in s.log, s.log


def test_server_serves_a_socket_bound_elsewhere() -> None:
    from gstream.server import Server
    from tests.apps.workers_app import app

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    server = Server(app, "ignored.invalid", 1, listener=sock)
    server.start()
    try:
        assert server.port == sock.getsockname()[1]
        assert server.url == f"http://127.0.0.1:{server.port}"
        assert requests.get(server.url + "/pid", timeout=5).text == str(os.getpid())
    finally:
        server.stop(timeout=2)


def test_supervisor_refuses_bad_arguments_before_binding() -> None:
    from gstream import Supervisor
    from gstream.limits import max_workers

    def app(environ: Any, start_response: Any) -> list[bytes]:
        return []

    for bad in (0, -1, max_workers() + 1, True, 2.0):
        with pytest.raises(ValueError, match="workers must be between 1 and"):
            Supervisor(app, workers=bad)
    with pytest.raises(ValueError, match="exactly one of app and load_app"):
        Supervisor(app, load_app=lambda: app)
    with pytest.raises(TypeError, match="max_conections"):
        Supervisor(app, max_conections=5)
    for bad_timeout in (0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="worker_timeout must be positive or None"):
            Supervisor(app, worker_timeout=bad_timeout)
    sup = Supervisor(app, port=0, workers=2, max_connections=5)
    assert sup.pids == [] and sup.url == "http://127.0.0.1:0"  # nothing bound or forked yet


def test_python_api_with_an_app_imported_before_fork(supervised: Any) -> None:
    s = supervised("0", module="tests.apps.workers_preload")
    s.wait_url()
    seen = {pid for pid, _ in both_workers(s, lambda: (s.pid_of_one_request(), None))}
    assert seen == s.workers()
    s.p.send_signal(signal.SIGTERM)
    assert s.exit_code(10) == 0
