"""The WSGI application the security suite serves, in process or as a
``gstream serve tests.security.apps:make_app()`` subprocess.

Routes:

* ``/events`` an :class:`~gstream.broker.SSEBroker` stream;
* ``/publish?n=N&size=S&batch=B`` publishes N events (data: a JSON object
  with the send time ``t`` and index ``i``, padded to about S bytes), yielding
  to other greenlets every B events; answers JSON with the elapsed time;
* ``/stats`` JSON: rss, fds, live greenlets, broker stats, queued frames and
  queued bytes (sum over subscriber queues), live lifecycle streams;
* ``/sse`` an endless :class:`~gstream.sse.SSEWriter` stream, ``/chunked`` an
  endless :class:`~gstream.sse.ChunkedWriter` stream (both count their
  endings in ``/stats``);
* ``/gen`` an endless :func:`~gstream.sse.stream_events` generator;
* ``/boom`` raises before responding, ``/boom-mid`` raises mid-stream;
* ``/ws`` a WebSocket echo, ``/ws-boom`` a WebSocket handler that raises
  after the first message (close codes land in ``ws_closes``);
* ``/`` says ``ok``.

Environment: ``GS_HEARTBEAT`` (seconds, default 30), ``GS_MAX_BUFFER``.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable, Iterator
from typing import Any
from urllib.parse import parse_qs

import gevent

from gstream.broker import SSEBroker
from gstream.errors import Closed
from gstream.events import Event
from gstream.lifecycle import lifecycle
from gstream.sse import SSE_HEADERS, ChunkedWriter, SSEWriter, stream_events
from gstream.websocket import WebSocket, WSConfig, open_connections, websocket_app
from tests.helpers import live_greenlets


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class SecurityApp:
    """See the module docstring."""

    def __init__(self, broker: SSEBroker | None = None, ws_config: WSConfig | None = None) -> None:
        self.broker = broker or SSEBroker(
            heartbeat_interval=float(os.environ.get("GS_HEARTBEAT", "30")),
            max_buffer=int(os.environ.get("GS_MAX_BUFFER", "1024")),
        )
        self.open_streams = 0
        self.ended_streams = 0
        self.ws_closes: list[int | None] = []
        """Close code of every finished WebSocket session, in order."""
        self.ws_echo = websocket_app(self._echo, ws_config)
        self.ws_boom = websocket_app(self._boom_ws, ws_config)

    def _echo(self, ws: WebSocket) -> None:
        ws.on_close(lambda w: self.ws_closes.append(w.close_code))
        for message in ws:
            ws.send(message)

    def _boom_ws(self, ws: WebSocket) -> None:
        ws.on_close(lambda w: self.ws_closes.append(w.close_code))
        ws.receive()
        raise RuntimeError("boom: websocket handler error")

    def stats(self) -> dict[str, Any]:
        queued_frames = queued_bytes = 0
        for sub in list(self.broker._subs.values()):
            queued_frames += len(sub.items)
            queued_bytes += sum(len(f) for f in sub.items)
        return {
            "rss": _rss(),
            "fds": len(os.listdir("/proc/self/fd")),
            "greenlets": live_greenlets(),  # this thread's: the resolver pool is not a leak
            "broker": self.broker.stats(),
            "queued_frames": queued_frames,
            "queued_bytes": queued_bytes,
            "lifecycle": len(lifecycle),
            "open_streams": self.open_streams,
            "ended_streams": self.ended_streams,
            "websockets": len(open_connections()),
        }

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "/")
        q = {k: v[0] for k, v in parse_qs(environ.get("QUERY_STRING", "")).items()}
        if path == "/events":
            return self.broker.subscribe(environ, start_response)
        if path == "/ws":
            return self.ws_echo(environ, start_response)
        if path == "/ws-boom":
            return self.ws_boom(environ, start_response)
        if path == "/publish":
            return self._json(start_response, self._publish(
                int(q.get("n", "1")), int(q.get("size", "64")), int(q.get("batch", "100"))))
        if path == "/stats":
            return self._json(start_response, self.stats())
        if path == "/sse":
            return self._sse(environ, start_response)
        if path == "/chunked":
            return self._chunked(environ, start_response)
        if path == "/gen":
            start_response("200 OK", list(SSE_HEADERS))
            return stream_events(self._gen())
        if path == "/boom":
            raise RuntimeError("boom: application error before the response")
        if path == "/boom-mid":
            start_response("200 OK", [("Content-Type", "text/plain")])
            return self._boom_mid()
        start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "3")])
        return [b"ok\n"]

    def _json(self, start_response: Any, obj: Any) -> list[bytes]:
        body = json.dumps(obj).encode()
        start_response("200 OK", [("Content-Type", "application/json"),
                                  ("Content-Length", str(len(body)))])
        return [body]

    def _publish(self, n: int, size: int, batch: int) -> dict[str, Any]:
        t0 = time.monotonic()
        pad = "x" * max(0, size - 40)
        for i in range(n):
            self.broker.publish(Event(data=json.dumps({"t": time.time(), "i": i, "p": pad})))
            if (i + 1) % batch == 0:
                gevent.sleep(0)
        return {"published": n, "elapsed": time.monotonic() - t0}

    def _sse(self, environ: dict[str, Any], start_response: Any) -> list[bytes]:
        sse = SSEWriter(environ, start_response)
        self.open_streams += 1
        try:
            n = 0
            while True:
                n += 1
                sse.send(Event(data="tick " + "y" * 200, id=str(n)))
                gevent.sleep(0.001)
        except Closed:
            pass
        finally:
            self.ended_streams += 1
        return sse.close()

    def _chunked(self, environ: dict[str, Any], start_response: Any) -> list[bytes]:
        out = ChunkedWriter(environ, start_response)
        self.open_streams += 1
        try:
            while True:
                out.write_chunk(b"z" * 512)
                gevent.sleep(0.001)
        except Closed:
            pass
        finally:
            self.ended_streams += 1
        return out.close()

    def _gen(self) -> Iterator[Event]:
        # A framework-style generator: it must be closed when the client leaves.
        self.open_streams += 1
        try:
            n = 0
            while True:
                n += 1
                yield Event(data="gen " + "w" * 200, id=str(n))
                gevent.sleep(0.001)
        finally:
            self.ended_streams += 1

    def _boom_mid(self) -> Iterator[bytes]:
        yield b"partial\n"
        raise RuntimeError("boom: application error mid-stream")


def make_app() -> SecurityApp:
    """Factory for ``gstream serve 'tests.security.apps:make_app()'``."""
    return SecurityApp()
