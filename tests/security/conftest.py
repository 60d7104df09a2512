"""Fixtures for the security suite: in-process gstream servers whose
unhandled errors are captured, and ``gstream serve`` subprocesses."""

from __future__ import annotations

import logging
import os
import re
import resource
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import Any

import gevent
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def raise_nofile() -> int:
    """Raise this process's fd limit to the hard limit (children inherit it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


class ErrorLog:
    """Everything the server reported as an error while the test ran.

    ``unhandled`` holds exceptions that reached gevent's hub (an application
    error pywsgi could only print, a greenlet that died); ``records`` holds
    ``gstream.*`` log records at WARNING or above.
    """

    def __init__(self) -> None:
        self.unhandled: list[tuple[type, BaseException]] = []
        self.records: list[logging.LogRecord] = []

    def exceptions(self) -> list[tuple[type, BaseException]]:
        """Unhandled exceptions plus exceptions logged with a traceback."""
        logged = [(r.exc_info[0], r.exc_info[1]) for r in self.records
                  if r.exc_info and r.exc_info[0] is not None]
        return self.unhandled + logged  # type: ignore[return-value]

    def unexpected(self, allow: tuple[type, ...] = ()) -> list[Any]:
        return [(t, v) for t, v in self.exceptions() if not issubclass(t, allow)]


class _Capture(logging.Handler):
    def __init__(self, sink: list[logging.LogRecord]) -> None:
        super().__init__(logging.WARNING)
        self.sink = sink

    def emit(self, record: logging.LogRecord) -> None:
        self.sink.append(record)


@pytest.fixture
def errors(monkeypatch: pytest.MonkeyPatch) -> Iterator[ErrorLog]:
    """Record unhandled exceptions (hub.handle_error) and gstream warnings."""
    log = ErrorLog()
    hub = gevent.get_hub()
    original = hub.handle_error

    def handle_error(context: Any, type_: Any, value: Any, tb: Any) -> None:
        if type_ is not None and not issubclass(type_, gevent.GreenletExit):
            log.unhandled.append((type_, value))
        original(context, type_, value, tb)

    monkeypatch.setattr(hub, "handle_error", handle_error)
    handler = _Capture(log.records)
    logger = logging.getLogger("gstream")
    logger.addHandler(handler)
    try:
        yield log
    finally:
        logger.removeHandler(handler)




class ServerProcess:
    """``python -m gstream serve tests.security.apps:make_app() ...`` as a child.

    stderr goes to a temporary file (a pipe could fill up and block the
    server under a flood of log lines).
    """

    def __init__(self, *args: str, env: dict[str, str] | None = None) -> None:
        self.errfile = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115 (closed in kill())
        full_env = dict(os.environ, PYTHONPATH=ROOT, PYTHONUNBUFFERED="1", **(env or {}))
        self.p = subprocess.Popen(
            [sys.executable, "-m", "gstream", "serve", "tests.security.apps:make_app()",
             "--port", "0", *args],
            cwd=ROOT, env=full_env, stdout=subprocess.PIPE, stderr=self.errfile, text=True)
        assert self.p.stdout is not None
        with gevent.Timeout(20):
            line = self.p.stdout.readline()
        m = re.search(r"(https?://[\w.:\[\]]+)", line)
        assert m, f"no URL in {line!r}; stderr: {self.stderr()}"
        self.url = m.group(1)
        self.port = int(self.url.rsplit(":", 1)[1])

    @property
    def pid(self) -> int:
        return self.p.pid

    def rss(self) -> int:
        """Resident set size of the server process, in bytes."""
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS")

    def fds(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def stderr(self) -> str:
        self.errfile.seek(0)
        return self.errfile.read()

    def terminate(self) -> float:
        """Send SIGTERM; return the time it was sent (monotonic)."""
        t0 = time.monotonic()
        self.p.send_signal(signal.SIGTERM)
        return t0

    def wait(self, timeout: float) -> int:
        """Wait cooperatively for the exit code."""
        with gevent.Timeout(timeout):
            while self.p.poll() is None:
                gevent.sleep(0.02)
        return self.p.returncode

    def kill(self) -> None:
        if self.p.poll() is None:
            self.p.kill()
            self.p.wait(5)
        self.errfile.close()


@pytest.fixture
def server_process() -> Iterator[Callable[..., ServerProcess]]:
    started: list[ServerProcess] = []

    def run(*args: str, env: dict[str, str] | None = None) -> ServerProcess:
        proc = ServerProcess(*args, env=env)
        started.append(proc)
        return proc

    yield run
    for proc in started:
        proc.kill()
