"""The Django example (examples/django_app) under ``gstream serve`` and ``gunicorn -k gevent``:
every view, SSE, WebSocket, and 1,000 idle SSE streams not slowing the views."""

from __future__ import annotations

from typing import Any

import pytest

from tests import examples_support as ex

pytest.importorskip("django")
pytest.importorskip("gunicorn")

server = ex.example_server("examples.django_app.wsgi:application", lambda d: {"EXAMPLE_DB": str(d / "example.sqlite3")})


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
