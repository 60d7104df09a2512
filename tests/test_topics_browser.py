"""A multi-topic EventSource in a real headless Chromium: events of two topics on one
connection typed by topic, a refused topic reported, and an exact resume of both
topics after the server restarts (the browser sends the cursor as Last-Event-ID)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import gevent
import pytest

from gstream.broker import SSEBroker
from gstream.lifecycle import lifecycle
from gstream.server import Server
from tests.test_demo import Proc

pytestmark = pytest.mark.browser

ROOT = Path(__file__).resolve().parent.parent
DRIVER = ROOT / "tests" / "topics_browser_driver.py"

PAGE = b"""<!doctype html><meta charset="utf-8"><title>topics</title><script>
window.got = []; window.opens = 0; window.errors = 0;
const es = new EventSource("/events?topic=news&topic=user/tab1&topic=secret");
es.onopen = () => { window.opens++; };
es.onerror = () => { window.errors++; };
for (const type of ["news", "user/tab1", "secret", "gstream.denied", "gstream.reset"]) {
  es.addEventListener(type, (e) => window.got.push([e.type, e.data, e.lastEventId]));
}
</script>"""


def make_app(broker: SSEBroker) -> Any:
    def app(environ: dict[str, Any], start_response: Any) -> Any:
        if environ.get("PATH_INFO") == "/events":
            return broker.subscribe(environ, start_response)
        start_response("200 OK", [("Content-Type", "text/html; charset=utf-8")])
        return [PAGE]
    return app


@pytest.mark.skipif(not os.path.exists("/usr/bin/chromium"), reason="needs /usr/bin/chromium")
def test_multi_topic_eventsource_in_chromium_resumes_after_restart(tmp_path: Path) -> None:
    broker = SSEBroker(retry=200, heartbeat_interval=0.5,
                       authorize=lambda environ, topic: topic != "secret")
    app = make_app(broker)
    servers = [Server(app, "127.0.0.1", 0, shutdown_timeout=1.0)]
    servers[0].start()
    port = servers[0].port
    driver = subprocess.Popen(
        [sys.executable, str(DRIVER), f"http://127.0.0.1:{port}"], cwd=ROOT,
        env=dict(os.environ, PYTHONPATH=str(ROOT)), stdin=subprocess.PIPE,
        stdout=subprocess.PIPE, stderr=(tmp_path / "driver.log").open("w"), text=True)
    assert driver.stdin is not None and driver.stdout is not None
    seen: dict[str, Any] = {}
    try:
        with gevent.Timeout(60, AssertionError("the browser driver took too long")):
            for line in driver.stdout:
                line = line.strip()
                if line == "publish":
                    broker.publish("n1", topic="news")
                    broker.publish("u1", topic="user/tab1")
                    broker.publish("other tab", topic="user/tab2")
                    broker.publish("n2", topic="news")
                elif line == "stop":
                    servers[-1].stop(timeout=1)
                    lifecycle.reset()
                    broker.publish("n3", topic="news")  # while the page is disconnected
                    broker.publish("u2", topic="user/tab1")
                    broker.publish("n4", topic="news")
                elif line == "start":
                    servers.append(Server(app, "127.0.0.1", port, shutdown_timeout=1.0))
                    servers[-1].start()
                elif line.startswith("{"):
                    seen = json.loads(line)
                    continue
                else:
                    continue
                driver.stdin.write("done\n")
                driver.stdin.flush()
            assert driver.wait(10) == 0, (tmp_path / "driver.log").read_text()[-3000:]
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait(5)
        for srv in servers:
            if not srv.draining:
                srv.stop(timeout=1)
        lifecycle.reset()
        broker.close()

    got = seen["got"]
    assert seen["page_errors"] == []
    denied = [i for i, (t, _, _) in enumerate(got) if t == "gstream.denied"]
    assert denied == [0, 4]  # told on each connection, before any event
    assert got[0][1] == '{"topics":["secret"]}'
    events = [(t, d, c) for t, d, c in got if t != "gstream.denied"]
    assert [(t, d) for t, d, _ in events] == [
        ("news", "n1"), ("user/tab1", "u1"), ("news", "n2"),
        ("news", "n3"), ("user/tab1", "u2"), ("news", "n4")]  # no gap, no duplicate
    assert all(c.startswith("1;news=") and ";user/tab1=" in c for _, _, c in events)


@pytest.mark.skipif(not os.path.exists("/usr/bin/chromium"), reason="needs /usr/bin/chromium")
def test_demo_tab_topic_beside_the_shared_feed(tmp_path: Path) -> None:
    demo = Proc("demo", "--no-ticker")
    try:
        with gevent.Timeout(60, AssertionError("the browser driver took too long")):
            run = subprocess.run(
                [sys.executable, str(DRIVER), demo.url, "demo"], cwd=ROOT,
                env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True, text=True,
                timeout=55)
        assert run.returncode == 0, run.stderr[-3000:]
        seen = json.loads(run.stdout.strip().splitlines()[-1])
    finally:
        demo.stop()
    assert seen["page_errors"] == []
    assert seen["second_private"] == 0  # the other tab never saw the private message
    assert seen["first_texts"][:2] == ["for everyone", "(this tab only) just for tab one"]
    one, two = seen["tabs"]
    assert one != two and one.startswith("tab/") and len(one) == 36
