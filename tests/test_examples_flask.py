"""The Flask example (examples/flask_app) under ``gstream serve`` and ``gunicorn -k gevent``:
every view, SSE, WebSocket, and 1,000 idle SSE streams not slowing the views."""

from __future__ import annotations

from typing import Any

import pytest

from tests import examples_support as ex

pytest.importorskip("flask")
pytest.importorskip("gunicorn")

server = ex.example_server("examples.flask_app.app:app", lambda d: {})


def test_blocking_views(server: Any) -> None:
    srv, upstream = server
    ex.check_blocking_views(srv.url, upstream)


def test_sse(server: Any) -> None:
    srv, _ = server
    ex.check_sse(srv.url, srv.port)


def test_websocket(server: Any) -> None:
    srv, _ = server
    ex.check_websocket(srv.url)


def test_idle_streams_do_not_slow_views(server: Any) -> None:
    srv, _ = server
    ex.check_idle_streams_do_not_slow_views(srv.url, srv.port)


def test_gunicorn_gstream_worker_ends_streams_on_sigterm(tmp_path: Any) -> None:
    upstream = ex.Upstream()
    srv = ex.ExampleServer("gunicorn", "examples.flask_app.app:app",
                           {"EXAMPLE_UPSTREAM": upstream.url}, tmp_path,
                           worker="gstream.contrib.gunicorn.GeventWorker")
    try:
        ex.check_sigterm_ends_streams(srv, srv.port)
    finally:
        srv.stop()
        upstream.stop()


def test_gstream_serve_ends_streams_on_sigterm(tmp_path: Any) -> None:
    upstream = ex.Upstream()
    srv = ex.ExampleServer("gstream", "examples.flask_app.app:app",
                           {"EXAMPLE_UPSTREAM": upstream.url}, tmp_path)
    try:
        ex.check_sigterm_ends_streams(srv, srv.port)
    finally:
        srv.stop()
        upstream.stop()
