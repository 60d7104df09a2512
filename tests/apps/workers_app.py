"""The app of tests/test_workers.py, served by ``gstream serve --workers 2``.

* ``/pid`` answers the worker's process id;
* ``/hog?t=S`` blocks its worker's whole event loop for S seconds, at most 20 (the
  original, unpatched ``time.sleep``), then answers the pid: meanwhile only the other
  worker accepts, which spreads the next connections deterministically, and a long
  one stops the worker's heartbeat;
* ``/ignore-sigterm`` makes its worker ignore SIGTERM from now on (a straggler the
  supervisor must kill at its deadline) and answers the pid;
* ``/stream`` is an SSE stream registered with gstream's lifecycle: its first
  event is the worker's pid, its last (on shutdown) a ``shutdown`` event;
* ``/echo`` is a WebSocket echo (``pid?`` is answered with the pid; closed with
  1001 on shutdown);
* anything else is tests/apps/basic.py's app.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterable
from typing import Any
from urllib.parse import parse_qs

from gevent import monkey

import gstream
from gstream.errors import Closed
from gstream.events import Event
from gstream.lifecycle import lifecycle
from gstream.sse import SSEWriter
from tests.apps.basic import DrainableStream
from tests.apps.basic import app as basic_app

_blocking_sleep = monkey.get_original("time", "sleep")
_echo = gstream.websocket_app(
    lambda ws: [ws.send(str(os.getpid()) if m == "pid?" else m) for m in ws])


def _text(start_response: Any, body: str) -> list[bytes]:
    data = body.encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(data)))])
    return [data]


def app(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
    path = environ.get("PATH_INFO", "/")
    if path == "/pid":
        return _text(start_response, str(os.getpid()))
    if path == "/hog":
        seconds = float(parse_qs(environ.get("QUERY_STRING", "")).get("t", ["0.2"])[0])
        _blocking_sleep(min(seconds, 20.0))  # bounded: a test's stuck loop must end
        return _text(start_response, str(os.getpid()))
    if path == "/ignore-sigterm":
        # The original signal(): replacing the disposition bypasses the server's handler.
        monkey.get_original("signal", "signal")(signal.SIGTERM, signal.SIG_IGN)
        return _text(start_response, str(os.getpid()))
    if path == "/echo":
        return _echo(environ, start_response)  # type: ignore[no-any-return]
    if path == "/stream":
        sse = SSEWriter(environ, start_response)
        stream = DrainableStream()
        lifecycle.register(stream)
        try:
            sse.send(Event(data=str(os.getpid())))
            while not stream.stopping.wait(0.5):
                sse.write_comment("heartbeat")
            sse.send(Event(data=stream.reason, name="shutdown", retry=1500))
        except Closed:
            pass
        finally:
            lifecycle.unregister(stream)
        return sse.close()
    return basic_app(environ, start_response)
