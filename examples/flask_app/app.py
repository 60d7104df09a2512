"""A "legacy" Flask app: ordinary blocking views beside SSE and WebSocket endpoints.

The views are written the way any Flask app is written (``time.sleep``,
``sqlite3``, ``requests``); under gevent's monkey-patching (which
``gstream serve`` and gunicorn's gevent worker apply) they block only their
own greenlet, so thousands of idle streams and slow views share one process.

Run it::

    gstream serve examples.flask_app.app:app --port 8000
    gunicorn -k gevent -w 2 -b 127.0.0.1:8000 examples.flask_app.app:app

Endpoints:

* ``GET /healthz``              ``ok``
* ``GET /sleep?seconds=0.1``    a blocking ``time.sleep`` (at most 2 s)
* ``GET /items``, ``POST /items`` a ``sqlite3`` query / insert (JSON ``{"name": ...}``)
* ``GET /fetch``                an outbound ``requests`` call to ``EXAMPLE_UPSTREAM``
  (default: this app's own ``/healthz``)
* ``GET /events``               SSE stream of the ``news`` broker (resumable)
* ``POST /publish``             publish the body (text) to ``/events``
* ``GET /ws``                   WebSocket echo

Settings (environment): ``EXAMPLE_DB`` (sqlite file; default: an in-memory
database per process), ``EXAMPLE_UPSTREAM`` (URL ``/fetch`` calls).
"""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import Callable, Iterable
from typing import Any

import requests
from flask import Flask, jsonify, request

from gstream import SSEBroker, WebSocket, websocket_app
from gstream.contrib.flask import flask_response

app = Flask(__name__)
app.config["MAX_CONTENT_LENGTH"] = 64 * 1024  # bodies past this get 413

news = SSEBroker(topic="news", heartbeat_interval=15.0)

# -- database -----------------------------------------------------------------

DB = os.environ.get("EXAMPLE_DB") or "file:gstream-flask-example?mode=memory&cache=shared"
_USE_URI = DB.startswith("file:")


def db() -> sqlite3.Connection:
    """A new connection per request: sqlite3 connections are cheap, and a
    shared one would be shared by every greenlet."""
    conn = sqlite3.connect(DB, uri=_USE_URI, timeout=5)
    conn.row_factory = sqlite3.Row
    return conn


# An in-memory database lives as long as one connection to it: keep one open.
_keeper = db()
with _keeper:
    _keeper.execute("CREATE TABLE IF NOT EXISTS items (id INTEGER PRIMARY KEY, name TEXT NOT NULL)")
    if _keeper.execute("SELECT COUNT(*) FROM items").fetchone()[0] == 0:
        _keeper.executemany("INSERT INTO items (name) VALUES (?)",
                            [("apple",), ("banana",), ("cherry",)])


# -- ordinary blocking views ---------------------------------------------------


@app.get("/healthz")
def healthz() -> Any:
    return "ok\n", 200, {"Content-Type": "text/plain; charset=utf-8"}


@app.get("/sleep")
def sleep() -> Any:
    try:
        seconds = min(max(float(request.args.get("seconds", "0.1")), 0.0), 2.0)
    except ValueError:
        return jsonify(error="seconds must be a number"), 400
    time.sleep(seconds)  # blocks this greenlet only (monkey-patched)
    return jsonify(slept=seconds)


@app.get("/items")
def list_items() -> Any:
    with db() as conn:
        rows = conn.execute("SELECT id, name FROM items ORDER BY id").fetchall()
    return jsonify(items=[dict(row) for row in rows])


@app.post("/items")
def add_item() -> Any:
    payload = request.get_json(silent=True) or {}
    name = payload.get("name") if isinstance(payload, dict) else None
    if not isinstance(name, str) or not 0 < len(name.strip()) <= 100:
        return jsonify(error="name: 1 to 100 characters"), 400
    with db() as conn:
        cur = conn.execute("INSERT INTO items (name) VALUES (?)", (name.strip(),))
    return jsonify(id=cur.lastrowid, name=name.strip()), 201


@app.get("/fetch")
def fetch() -> Any:
    # A fixed upstream (never a URL from the request: no open proxy).
    upstream = os.environ.get("EXAMPLE_UPSTREAM") or request.host_url + "healthz"
    started = time.perf_counter()
    try:
        r = requests.get(upstream, timeout=5)
    except requests.RequestException as exc:
        return jsonify(error=f"upstream failed: {type(exc).__name__}"), 502
    return jsonify(status=r.status_code, body=r.text[:200],
                   ms=round((time.perf_counter() - started) * 1000, 1))


# -- streaming ----------------------------------------------------------------


@app.get("/events")
def events() -> Any:
    return flask_response(news)


@app.post("/publish")
def publish() -> Any:
    text = request.get_data(as_text=True)[:4096]
    # The id, or None (null) when it is not known yet: on a Redis backplane
    # publish() does not wait for Redis to number the event unless asked to
    # (wait_for_id=0.05); an in-memory broker always knows it.
    return jsonify(id=news.publish(text))


def echo(ws: WebSocket) -> None:
    for message in ws:
        ws.send(message)


# WebSocket endpoints are routed before Flask: a WebSocket session takes the
# connection over, which works with every server when the WSGI app itself
# returns ws.wsgi_result() (under gunicorn that raises StopIteration, which a
# Flask view would turn into a 500). See docs/readme-integrations.md.
WEBSOCKETS: dict[str, Callable[..., Iterable[bytes]]] = {"/ws": websocket_app(echo)}
_flask_wsgi = app.wsgi_app


def _wsgi(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
    endpoint = WEBSOCKETS.get(environ.get("PATH_INFO", ""))
    if endpoint is not None:
        return endpoint(environ, start_response)
    return _flask_wsgi(environ, start_response)


app.wsgi_app = _wsgi  # type: ignore[method-assign]
