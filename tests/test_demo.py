"""The demo's HTTP contract (docs/demo-contract.md), in process and as ``gstream demo``."""

from __future__ import annotations

import json
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

from gstream.client import SSEClient, connect
from gstream.demo import DemoApp, make_app
from gstream.errors import Closed
from gstream.server import Server
from tests.helpers import wait_until

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def demo() -> Iterator[tuple[DemoApp, str]]:
    app = make_app(ticker=False)
    server = Server(app, "127.0.0.1", 0, shutdown_timeout=2)
    app.bind_server(server)
    server.start()
    yield app, server.url
    server.stop(2)
    app.close()


def _events(url: str, n: int, timeout: float = 5, **kwargs: Any) -> tuple[list[Any], SSEClient]:
    client = SSEClient(url, reconnect=False, **kwargs)
    got: list[Any] = []
    with gevent.Timeout(timeout):
        for event in client:
            got.append(event)
            if len(got) == n:
                break
    client.close()
    return got, client


def test_page_static_and_health(demo: tuple[DemoApp, str]) -> None:
    _, url = demo
    page = requests.get(url + "/", timeout=5)
    assert page.status_code == 200 and page.headers["Content-Type"].startswith("text/html")
    assert "gstream" in page.text and "/static/app.js" in page.text
    # Offline: the page references nothing outside the server.
    for asset in ("/", "/static/app.js", "/static/style.css"):
        body = requests.get(url + asset, timeout=5).text
        assert not re.search(r"(src|href)=\"(https?:)?//", body), asset
        assert "http://" not in body.replace("http://www.w3.org", "") or asset == "/"
    assert requests.get(url + "/static/app.js", timeout=5).headers["Content-Type"].startswith(
        "text/javascript")
    assert requests.get(url + "/healthz", timeout=5).text.strip() == "ok"
    assert requests.get(url + "/static/../app.py", timeout=5).status_code == 404
    assert requests.get(url + "/nope", timeout=5).status_code == 404


def test_publish_and_resume(demo: tuple[DemoApp, str]) -> None:
    app, url = demo
    r = requests.post(url + "/publish?count=5", json={"text": "hello"}, timeout=5)
    assert r.status_code == 200
    body = r.json()
    assert body["published"] == 5
    first = int(body["last_id"]) - 4
    # Resume after the second one: exactly events 3..5, in order, no duplicates.
    got, _ = _events(url + "/events", 3, last_event_id=str(first + 1))
    assert [e.event for e in got] == ["feed"] * 3
    ids = [int(e.last_event_id) for e in got]
    assert ids == [first + 2, first + 3, first + 4]
    for e in got:
        data = json.loads(e.data)
        assert data["seq"] == int(e.last_event_id) and data["text"] == "hello"
        assert abs(data["ts"] - time.time()) < 5
    # Query-string resume (for clients that cannot set headers) and plain text bodies.
    requests.post(url + "/publish", data="plain words", timeout=5)
    got, _ = _events(url + f"/events?last_event_id={first + 4}", 1)
    assert json.loads(got[0].data)["text"] == "plain words"


def test_publish_refuses_bad_input(demo: tuple[DemoApp, str]) -> None:
    app, url = demo
    assert requests.get(url + "/publish", timeout=5).status_code == 405
    for count in ("0", "1001", "-1", "x", "99999999999"):
        assert requests.post(url + f"/publish?count={count}", data="x", timeout=5).status_code == 400
    big = requests.post(url + "/publish", data=b"x" * (64 * 1024 + 1), timeout=5)
    assert big.status_code == 413
    assert app.feed.stats()["published"] == 0  # nothing was published by the refusals


def test_stats_and_stats_stream(demo: tuple[DemoApp, str]) -> None:
    app, url = demo
    sub = SSEClient(url + "/events", reconnect=False)
    reader = gevent.spawn(lambda: list(sub))
    assert wait_until(lambda: app.feed.subscriber_count == 1, timeout=5)
    requests.post(url + "/publish?count=3", data="x", timeout=5)
    st = requests.get(url + "/stats", timeout=5).json()
    for key in ("sse_subscribers", "ws_members", "published", "delivered", "dropped",
                "events_per_second", "connections", "uptime"):
        assert key in st, key
    assert st["sse_subscribers"] == 1 and st["published"] == 3 and st["connections"] >= 2
    got, _ = _events(url + "/stats/stream", 2, timeout=5)
    assert [e.event for e in got] == ["stats", "stats"]
    live = json.loads(got[-1].data)
    assert live["sse_subscribers"] == 1 and live["stats_subscribers"] == 1
    sub.close()
    reader.join(timeout=2)


def test_chat_broadcasts_to_every_member(demo: tuple[DemoApp, str]) -> None:
    app, url = demo
    ws_url = url.replace("http", "ws")
    with connect(ws_url + "/chat") as a, connect(ws_url + "/chat") as b:
        assert wait_until(lambda: app.chat.members == 2, timeout=5)
        a.send(json.dumps({"text": "hi all", "ref": "r1", "name": "Ann\x00\n"}))
        got_a = json.loads(a.recv(timeout=5))
        got_b = json.loads(b.recv(timeout=5))
        assert got_a == got_b
        assert got_a["type"] == "chat" and got_a["text"] == "hi all" and got_a["ref"] == "r1"
        assert got_a["name"] == "Ann" and abs(got_a["ts"] - time.time()) < 5
        b.send("not json")
        from_b = json.loads(a.recv(timeout=5))
        assert from_b["text"] == "not json" and "ref" not in from_b
        assert from_b["from"] != got_a["from"]
        assert requests.get(url + "/stats", timeout=5).json()["ws_members"] == 2
    assert wait_until(lambda: app.chat.members == 0, timeout=5)


def test_chat_refuses_hostile_messages(demo: tuple[DemoApp, str]) -> None:
    app, url = demo
    ws_url = url.replace("http", "ws")
    with connect(ws_url + "/chat") as bystander:
        big = connect(ws_url + "/chat")
        big.send("x" * 5000)
        with pytest.raises(Closed):
            big.recv(timeout=5)
        assert big.close_code == 1009
        binary = connect(ws_url + "/chat")
        binary.send(b"\x00\x01")
        with pytest.raises(Closed):
            binary.recv(timeout=5)
        assert binary.close_code == 1003
        flood = connect(ws_url + "/chat", max_queue=1000)
        for i in range(100):
            flood.send(f"m{i}")
        with gevent.Timeout(5):
            while True:
                try:
                    flood.recv(timeout=5)
                except Closed:
                    break
        assert flood.close_code == 1008
        # The bystander got the flood's allowed burst and is still connected.
        received = 0
        with pytest.raises(TimeoutError):
            while True:
                bystander.recv(timeout=0.5)
                received += 1
        assert 1 <= received <= 60
        bystander.send("still here")
        assert json.loads(bystander.recv(timeout=5))["text"] == "still here"


def test_echo(demo: tuple[DemoApp, str]) -> None:
    _, url = demo
    with connect(url.replace("http", "ws") + "/echo") as ws:
        for message in ("one", b"\x00two", "three" * 1000):
            ws.send(message)
            assert ws.recv(timeout=5) == message
    assert requests.get(url + "/echo", timeout=5).status_code == 426


# -- as a process ---------------------------------------------------------


class Proc:
    """``python -m gstream ...`` on a free port."""

    def __init__(self, *args: str, port: int = 0) -> None:
        env = dict(os.environ, PYTHONPATH=ROOT, PYTHONUNBUFFERED="1")
        self.p = subprocess.Popen([sys.executable, "-m", "gstream", *args, "--port", str(port)], cwd=ROOT,
                                  env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True)
        assert self.p.stdout is not None
        with gevent.Timeout(20):
            line = self.p.stdout.readline()
        m = re.search(r"(http://[\d.:]+)", line)
        assert m, f"no URL in {line!r}: {self.p.stderr.read() if self.p.stderr else ''}"
        self.url = m.group(1)
        self.port = int(self.url.rsplit(":", 1)[1])

    def stop(self) -> None:
        if self.p.poll() is None:
            self.p.kill()
            self.p.wait(5)


def test_gstream_demo_no_ticker() -> None:
    p = Proc("demo", "--no-ticker")
    try:
        assert "gstream demo" in requests.get(p.url + "/", timeout=5).text
        gevent.sleep(1.3)
        assert requests.get(p.url + "/stats", timeout=5).json()["published"] == 0
        p.p.send_signal(signal.SIGTERM)
        assert p.p.wait(5) == 0
    finally:
        p.stop()


def test_gstream_demo_ticks() -> None:
    p = Proc("demo")
    try:
        got, _ = _events(p.url + "/events", 2, timeout=5)
        assert [e.event for e in got] == ["feed", "feed"]
        assert int(got[1].last_event_id) == int(got[0].last_event_id) + 1
    finally:
        p.p.send_signal(signal.SIGTERM)
        assert p.p.wait(5) == 0
        p.stop()


def test_sigterm_ends_sse_and_websockets_gracefully() -> None:
    p = Proc("serve", "gstream.demo:make_app()", "--shutdown-timeout", "4")
    try:
        ws_url = p.url.replace("http", "ws")
        feeds = [SSEClient(p.url + "/events", reconnect=False) for _ in range(3)]
        got: list[list[Any]] = [[] for _ in feeds]
        readers = [gevent.spawn(lambda c=c, out=out: out.extend(c))
                   for c, out in zip(feeds, got, strict=True)]
        chats = [connect(ws_url + "/chat") for _ in range(2)]
        echo = connect(ws_url + "/echo")
        echo.send("ping")
        assert echo.recv(timeout=5) == "ping"
        with gevent.Timeout(5):  # every stream has seen a ticker event
            while not all(any(e.event == "feed" for e in out) for out in got):
                gevent.sleep(0.05)
        t0 = time.monotonic()
        p.p.send_signal(signal.SIGTERM)
        gevent.joinall(readers, timeout=4, raise_error=True)
        for out, client in zip(got, feeds, strict=True):
            assert out[-1].event == "gstream.shutdown"
            assert client.retry_ms == 2000
        for ws in [*chats, echo]:
            with pytest.raises(Closed), gevent.Timeout(4):
                while True:
                    ws.recv(timeout=4)
            assert ws.close_code == 1001
        assert p.p.wait(4) == 0
        assert time.monotonic() - t0 < 3.5
    finally:
        p.stop()
