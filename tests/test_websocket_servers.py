"""The same WebSocket app under every supported server: gevent's pywsgi with
its default handler, GStreamHandler, and gunicorn's gevent and gevent_pywsgi
workers started for real."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest
import websocket as wsclient
from gevent.pywsgi import WSGIServer
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from gstream.handler import GStreamHandler
from tests import wsraw
from tests.apps.gstream_ws_echo import app
from tests.helpers import raw_http, read_response_head

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


@pytest.fixture(scope="module", params=["gunicorn-gevent", "gunicorn-gevent_pywsgi"])
def gunicorn_port(request: Any) -> Iterator[int]:
    worker = request.param.split("-", 1)[1]
    port = _free_port()
    env = dict(os.environ, PYTHONPATH=ROOT)
    proc = subprocess.Popen(
        [sys.executable, "-m", "gunicorn", "-k", worker, "-w", "1", "-b", f"127.0.0.1:{port}",
         "--graceful-timeout", "2", "--log-level", "warning", "tests.apps.gstream_ws_echo:app"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            assert proc.poll() is None, proc.stdout.read().decode() if proc.stdout else ""
            time.sleep(0.1)
    else:
        proc.kill()
        pytest.fail("gunicorn did not start")
    yield port
    proc.send_signal(signal.SIGTERM)
    try:
        out, _ = proc.communicate(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
    text = out.decode(errors="replace")
    assert "Traceback" not in text and "Error handling request" not in text, text


@pytest.fixture(params=["pywsgi", "gstream"])
def local_port(request: Any, serve: Any) -> int:
    kw = {"handler_class": GStreamHandler} if request.param == "gstream" else {}
    return int(serve(app, server_class=WSGIServer, **kw).port)


def _exercise(port: int) -> None:
    for path in ("/echo", "/inline", "/frameworkish"):
        with connect(f"ws://127.0.0.1:{port}{path}", max_size=None) as c:
            c.send("hi")
            got = c.recv(timeout=3)
            assert got == ("hi" if path == "/echo" else f"{path}:hi")
            big = b"\x01" * 300_000
            c.send(big)
            assert c.recv(timeout=3) == big
        assert c.protocol.close_code == 1000
    # websocket-client too, and pre-read bytes riding with the handshake.
    c2 = wsclient.create_connection(f"ws://127.0.0.1:{port}/echo", timeout=5)
    c2.send("wc")
    assert c2.recv() == "wc"
    c2.close()
    sock, status, _, rest = wsraw.handshake(port, "/echo", extra=wsraw.text("early"))
    assert status == 101
    r = wsraw.Reader(sock, rest)
    assert r.next() == (0x1, b"early", True)
    sock.sendall(wsraw.close_frame(1000))
    assert r.until_close() == (1000, b"")
    # Nothing at all after the close frame: no stray HTTP response.
    assert r.at_eof() and r.buf == b""
    sock.close()
    # A refused handshake gets a real status; plain HTTP still works.
    s, status, hdrs, _ = wsraw.handshake(port, "/echo", headers={"Sec-WebSocket-Version": "7"})
    assert status == 426 and hdrs["sec-websocket-version"] == "13"
    s.close()
    s = raw_http(port, b"GET /plain HTTP/1.1\r\nHost: x\r\n\r\n")
    assert read_response_head(s)[0] == 200
    s.close()


def test_local_servers(local_port: int) -> None:
    _exercise(local_port)


def test_gunicorn_workers(gunicorn_port: int) -> None:
    _exercise(gunicorn_port)


def test_gunicorn_oversized_message_closes_1009(gunicorn_port: int) -> None:
    with connect(f"ws://127.0.0.1:{gunicorn_port}/echo") as c:
        c.send(b"\xff" * 10)  # binary is fine
        assert c.recv(timeout=3) == b"\xff" * 10
    with pytest.raises(ConnectionClosed), connect(f"ws://127.0.0.1:{gunicorn_port}/echo") as c:
        c.send("x" * (2 << 20))  # over the 1 MiB default read limit
        c.recv(timeout=3)
    assert c.protocol.close_code == 1009
