"""``gstream serve`` and ``gstream demo`` as real subprocesses."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import gevent
import pytest
import requests

from gstream.client import SSEClient

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Proc:
    def __init__(self, *args: str) -> None:
        env = dict(os.environ, PYTHONPATH=ROOT, PYTHONUNBUFFERED="1")
        self.p = subprocess.Popen([sys.executable, "-m", "gstream", *args], cwd=ROOT, env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.url = ""

    def wait_url(self, timeout: float = 15) -> str:
        assert self.p.stdout is not None
        with gevent.Timeout(timeout):
            line = self.p.stdout.readline()
        m = re.search(r"(https?://[\w.:\[\]]+)", line)
        assert m, f"no URL in {line!r}; stderr: {self.stderr()}"
        self.url = m.group(1)
        return self.url

    def stderr(self) -> str:
        if self.p.poll() is None:
            return ""
        assert self.p.stderr is not None
        return self.p.stderr.read()

    def exit_code(self, timeout: float) -> int:
        return self.p.wait(timeout)


@pytest.fixture
def procs() -> Iterator[Any]:
    started: list[Proc] = []

    def run(*args: str) -> Proc:
        p = Proc(*args)
        started.append(p)
        return p

    yield run
    for p in started:
        if p.p.poll() is None:
            p.p.kill()
            p.p.wait(5)


def test_serve_applies_monkey_patching_before_import(procs: Any) -> None:
    p = procs("serve", "tests.apps.basic:app", "--port", "0")
    url = p.wait_url()
    assert requests.get(url + "/", timeout=5).text == "hello\n"
    assert requests.get(url + "/patched", timeout=5).json() == {
        "socket": True, "time": True, "ssl": True, "at_import": True}
    # Blocking time.sleep in the app is cooperative: 5 x 0.4 s run concurrently.
    t0 = time.monotonic()
    jobs = [gevent.spawn(requests.get, url + "/slow?t=0.4", timeout=5) for _ in range(5)]
    gevent.joinall(jobs, raise_error=True)
    assert time.monotonic() - t0 < 1.5
    p.p.send_signal(signal.SIGINT)
    assert p.exit_code(5) == 0


def test_sigterm_drains_streams_and_requests(procs: Any) -> None:
    p = procs("serve", "tests.apps.basic:app", "--port", "0", "--shutdown-timeout", "4")
    url = p.wait_url()
    clients = [SSEClient(url + "/stream", reconnect=False) for _ in range(3)]
    got: list[list[Any]] = [[] for _ in clients]
    readers = [gevent.spawn(lambda c=c, out=out: out.extend(c)) for c, out in zip(clients, got, strict=True)]
    with gevent.Timeout(5):
        while not all(got):
            gevent.sleep(0.02)
    slow = gevent.spawn(requests.get, url + "/slow?t=0.8", timeout=5)
    gevent.sleep(0.2)
    t0 = time.monotonic()
    p.p.send_signal(signal.SIGTERM)
    gevent.joinall(readers, timeout=4, raise_error=True)
    for out, client in zip(got, clients, strict=True):
        assert [e.data for e in out] == ["hello", "server shutting down"]
        assert out[-1].event == "shutdown" and client.retry_ms == 1500
    r = slow.get(timeout=4)
    assert r.status_code == 200 and r.text == "done\n"
    assert p.exit_code(4) == 0
    assert time.monotonic() - t0 < 3
    assert "shutting down" in p.stderr()


def test_sigterm_deadline_cuts_rogue_stream(procs: Any) -> None:
    p = procs("serve", "tests.apps.basic:app", "--port", "0", "--shutdown-timeout", "0.7")
    url = p.wait_url()
    client = SSEClient(url + "/rogue", reconnect=False)
    got: list[Any] = []
    reader = gevent.spawn(lambda: got.extend(client))
    with gevent.Timeout(5):
        while not got:
            gevent.sleep(0.02)
    t0 = time.monotonic()
    p.p.send_signal(signal.SIGTERM)
    assert p.exit_code(5) == 0
    assert 0.6 <= time.monotonic() - t0 < 3
    reader.join(timeout=2)
    assert reader.dead
    assert "still open at the deadline" in p.stderr()


def test_connection_cap_from_the_command_line(procs: Any) -> None:
    p = procs("serve", "tests.apps.basic:app", "--port", "0", "--max-connections", "1",
              "--overflow", "reject")
    url = p.wait_url()
    held = gevent.spawn(requests.get, url + "/slow?t=0.8", timeout=5)
    gevent.sleep(0.3)
    r = requests.get(url + "/", timeout=5)
    assert r.status_code == 503
    assert held.get(timeout=5).status_code == 200
    p.p.send_signal(signal.SIGTERM)
    assert p.exit_code(5) == 0


def test_bad_app_spec_fails_clearly(procs: Any) -> None:
    p = procs("serve", "tests.apps.basic:nope", "--port", "0")
    assert p.exit_code(15) != 0
    assert "no attribute" in p.stderr()
    p = procs("serve", "no_colon", "--port", "0")
    assert p.exit_code(15) != 0
    assert "module:app" in p.stderr()


def test_importing_gstream_does_not_import_ssl() -> None:
    # So `gstream serve` can still patch ssl properly after `import gstream`.
    code = "import sys, gstream, gstream.client, gstream.cli; print('ssl' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         env=dict(os.environ, PYTHONPATH=ROOT), timeout=30)
    assert out.stdout.strip() == "False", out.stderr
