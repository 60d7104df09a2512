"""Helpers shared by the benchmark servers (imported after any monkey-patching)."""

from __future__ import annotations

import os
import socket
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # bench/ for ``common``

from common import raise_nofile  # noqa: E402


def listen(host: str, port: int, backlog: int = 4096) -> socket.socket:
    """A listening socket with a deep backlog (the default ~128 makes connect storms stall on SYN retries)."""
    raise_nofile()
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if os.environ.get("BENCH_NODELAY", "1") == "1":
        # Accepted sockets inherit TCP_NODELAY on Linux. Without it, stacks that
        # send headers and body in two writes (gevent.pywsgi) stall 40 ms on
        # Nagle + delayed ACK, which would hide everything else we measure.
        # asyncio (websockets, uvicorn) sets it on every socket already.
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    s.bind((host, port))
    s.listen(backlog)
    return s


def make_flask_app():  # type: ignore[no-untyped-def]
    """The 'legacy' Flask app: one ordinary view at /view."""
    from common import VIEW_ITEMS
    from flask import Flask

    app = Flask("legacy")

    @app.route("/view")
    def view():  # type: ignore[no-untyped-def]
        total = sum(item["price"] for item in VIEW_ITEMS)
        return {"items": VIEW_ITEMS, "total": total}

    return app


def simple_response(start_response, body: bytes, status: str = "200 OK"):  # type: ignore[no-untyped-def]
    start_response(status, [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]
