"""Shared fixtures: every test runs under gevent monkey-patching, as a
legacy app would, and talks to real servers on 127.0.0.1."""

from gevent import monkey

monkey.patch_all()

import logging  # noqa: E402
from collections.abc import Callable, Iterator  # noqa: E402
from typing import Any  # noqa: E402

import pytest  # noqa: E402
from gevent.pywsgi import WSGIServer  # noqa: E402

from tests.helpers import RunningServer  # noqa: E402


@pytest.fixture
def serve() -> Iterator[Callable[..., RunningServer]]:
    """Start a WSGI app on gevent.pywsgi on 127.0.0.1 (a free port)."""
    started: list[WSGIServer] = []

    def start(app: Any, server_class: type[WSGIServer] = WSGIServer, **kwargs: Any) -> RunningServer:
        kwargs.setdefault("log", None)
        kwargs.setdefault("error_log", logging.getLogger("tests.pywsgi"))
        srv = server_class(("127.0.0.1", 0), app, **kwargs)
        srv.start()
        started.append(srv)
        return RunningServer(srv)

    yield start
    for srv in started:
        srv.stop(timeout=2)


@pytest.fixture(autouse=True)
def _fresh_lifecycle() -> Iterator[None]:
    """Tests that exercise graceful shutdown leave the process-wide registry
    in its shutting-down state; every test starts from a live one."""
    from gstream.lifecycle import lifecycle

    lifecycle.reset()
    yield
    lifecycle.reset()


@pytest.fixture
def gserver() -> Iterator[Callable[..., Any]]:
    """Start ``gstream.server.Server`` in this process on 127.0.0.1:0."""
    from gstream.lifecycle import lifecycle
    from gstream.server import Server

    servers: list[Server] = []

    def run(app: Any, **kwargs: Any) -> Server:
        kwargs.setdefault("shutdown_timeout", 2.0)
        srv = Server(app, "127.0.0.1", 0, **kwargs)
        srv.start()
        servers.append(srv)
        return srv

    yield run
    for srv in servers:
        if not srv.draining:
            srv.stop(timeout=1)
    # stop() marks the process-wide lifecycle as shutting down; later tests
    # in this process must start from a clean state.
    lifecycle.reset()
