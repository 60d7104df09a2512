"""The README's Python examples compile, and the self-contained ones run
against a real server."""

import re
from pathlib import Path

import pytest
import requests

from gstream.client import connect
from tests.helpers import SSEStream, wait_until

README = Path(__file__).resolve().parent.parent / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), re.S)


def test_readme_has_examples():
    assert len(BLOCKS) >= 6


@pytest.mark.parametrize("i", range(len(BLOCKS)))
def test_example_compiles(i):
    compile(BLOCKS[i], f"README block {i}", "exec")


def _block(marker: str) -> str:
    matches = [b for b in BLOCKS if marker in b]
    assert matches, marker
    return matches[0]


def test_hub_example_runs(serve):
    ns: dict = {}
    exec(_block("room = Hub()"), ns)
    srv = serve(ns["app"])
    url = f"ws://127.0.0.1:{srv.port}/"
    with connect(url) as a, connect(url) as b:
        import gevent

        gevent.sleep(0.1)  # both registered
        a.send("hi")
        assert b.recv(timeout=5) == "hi"
    ns["room"].stop(2)


def test_callback_example_runs(gserver):
    ns: dict = {}
    exec(_block("room = Hub()"), ns)
    exec(_block("websocket_callback_app(room.register)"), ns)
    feed, chat = gserver(ns["feed"]), gserver(ns["chat_cb"])
    with connect(f"ws://127.0.0.1:{feed.port}/") as listener, \
            connect(f"ws://127.0.0.1:{chat.port}/") as a, connect(f"ws://127.0.0.1:{chat.port}/") as b:
        assert wait_until(lambda: ns["room"].count == 3)
        a.send("hi")
        assert b.recv(timeout=5) == "hi"
        assert listener.recv(timeout=5) == "hi"
    ns["room"].stop(2)


def test_in_loop_example_runs(gserver):
    ns: dict = {}
    exec(_block("in_loop=True"), ns)
    srv = gserver(ns["echo_fast"])
    with connect(f"ws://127.0.0.1:{srv.port}/") as c:
        for i in range(3):
            c.send(f"m{i}")
            assert c.recv(timeout=5) == f"m{i}"


def test_broker_example_runs(serve):
    ns: dict = {}
    exec(_block('feed = SSEBroker(topic="feed"'), ns)
    srv = serve(ns["app"])
    stream = SSEStream(srv.port, "/events")  # connected once this returns
    try:
        assert wait_until(lambda: ns["feed"].subscriber_count == 1)
        assert requests.post(srv.url + "/publish", timeout=5).status_code == 204
        ev = stream.next_event()
        assert (ev.event, ev.data) == ("update", "hello")
    finally:
        stream.close()
