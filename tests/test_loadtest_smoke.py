"""CI smoke load test: a few hundred Locust users against the real demo server
(``python -m gstream demo --no-ticker`` in a subprocess, or the server at
``GSTREAM_SMOKE_URL``), for a few seconds; fails on any lost event or any error.

Checks exact fan-out, not only "no gaps": every subscriber connects before the
first publish, so each must receive every published event; every chat message
must reach every member of the room.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import gevent
import gevent.event
import pytest
import requests
from locust import constant, task
from locust.env import Environment

from gstream.locust import SSEUser, WebSocketUser, stream_counters
from tests.helpers import wait_until

pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SSE_USERS, ECHO_USERS, CHAT_USERS = 300, 40, 20
CHAT_MESSAGES = 3  # per chat member
PUBLISHES, PER_PUBLISH = 4, 10


def _demo_lacks(url: str) -> str | None:
    """Why the server at ``url`` does not implement the demo contract, or None."""
    try:
        if requests.get(url + "/healthz", timeout=5).status_code != 200:
            return "no /healthz"
        stats = requests.get(url + "/stats", timeout=5)
        if stats.status_code != 200 or "sse_subscribers" not in stats.json():
            return "no /stats"
        with requests.get(url + "/events", stream=True, timeout=5) as events:
            if not events.headers.get("content-type", "").startswith("text/event-stream"):
                return "no /events"
    except (requests.RequestException, ValueError) as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


@pytest.fixture(scope="module")
def demo_url() -> Iterator[str]:
    if os.environ.get("GSTREAM_SMOKE_URL"):
        yield os.environ["GSTREAM_SMOKE_URL"].rstrip("/")
        return
    env = dict(os.environ, PYTHONPATH=ROOT)
    proc = subprocess.Popen(
        [sys.executable, "-m", "gstream", "demo", "--port", "0", "--no-ticker",
         "--log-level", "warning"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stderr is not None
        with gevent.Timeout(20):
            banner = proc.stdout.readline()
        if not banner:
            err = proc.stderr.read()
            if "--no-ticker" in err:
                pytest.skip("this branch's demo lacks --no-ticker (the demo contract)")
            pytest.fail(f"the demo did not start: {err[-2000:]}")
        match = re.search(r"https?://\S+?(?=/?\s*$)", banner)
        assert match, banner
        url = match.group(0).rstrip("/")
        reason = _demo_lacks(url)
        if reason is not None:
            pytest.skip(f"this branch's demo lacks the contract's endpoints: {reason}")
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def test_smoke_load_no_lost_event_no_error(demo_url: str) -> None:
    chat_gate = gevent.event.Event()

    class Subscriber(SSEUser):
        path = "/events"
        fixed_count = SSE_USERS
        stat_prefix = "feed "
        read_timeout = 30.0

    class Echo(WebSocketUser):
        path = "/echo"
        fixed_count = ECHO_USERS
        stat_prefix = "echo "
        wait_time = constant(0.1)

        @task
        def roundtrip(self) -> None:
            self.request({"text": "ping"})

    class Chat(WebSocketUser):
        path = "/chat"
        fixed_count = CHAT_USERS
        stat_prefix = "chat "
        wait_time = constant(0.1)
        said = 0

        @task
        def talk(self) -> None:
            if chat_gate.is_set() and self.said < CHAT_MESSAGES:
                self.said += 1
                self.request({"text": f"message {self.said}"})

    env = Environment(user_classes=[Subscriber, Echo, Chat], host=demo_url, stop_timeout=5)
    runner = env.create_local_runner()
    counters = stream_counters(env)
    total = SSE_USERS + ECHO_USERS + CHAT_USERS
    try:
        runner.start(total, spawn_rate=total)
        assert wait_until(lambda: counters.open == total, timeout=20), counters

        def server_sees_everyone() -> bool:
            stats = requests.get(demo_url + "/stats", timeout=5).json()
            return bool(stats["sse_subscribers"] >= SSE_USERS
                        and stats.get("ws_members", CHAT_USERS) >= CHAT_USERS)

        assert wait_until(server_sees_everyone, timeout=10, interval=0.2)

        last_id = 0
        for _ in range(PUBLISHES):
            resp = requests.post(f"{demo_url}/publish?count={PER_PUBLISH}",
                                 json={"text": "smoke"}, timeout=5)
            assert resp.status_code == 200 and resp.json()["published"] == PER_PUBLISH
            last_id = int(resp.json()["last_id"])
            gevent.sleep(0.1)
        chat_gate.set()

        subscribers = [g.args[0] for g in runner.user_greenlets if isinstance(g.args[0], Subscriber)]
        assert len(subscribers) == SSE_USERS

        def all_delivered() -> bool:
            return all(u.sse_streams[0].last_id == last_id for u in subscribers)

        assert wait_until(all_delivered, timeout=20, interval=0.1), "events not delivered"
        chat_total = CHAT_USERS * CHAT_MESSAGES
        assert wait_until(lambda: env.stats.get("chat rtt", "WS").num_requests == chat_total
                          and env.stats.get("chat message", "WS").num_requests
                          == chat_total * (CHAT_USERS - 1), timeout=20)
        assert wait_until(lambda: env.stats.get("echo rtt", "WS").num_requests >= ECHO_USERS * 5)
    finally:
        with gevent.Timeout(15):
            runner.quit()

    def count(name: str, kind: str) -> Any:
        return env.stats.get(name, kind).num_requests

    events = PUBLISHES * PER_PUBLISH
    assert count("feed event", "SSE") == SSE_USERS * events  # each event, to each subscriber
    assert count("feed connect", "SSE") == SSE_USERS
    assert count("feed missed", "SSE") == 0 and count("feed duplicate", "SSE") == 0
    assert count("feed reconnect", "SSE") == 0
    assert count("chat connect", "WS") == CHAT_USERS and count("echo connect", "WS") == ECHO_USERS
    failures = {f"{e.method} {e.name}: {e.error}" for e in env.stats.errors.values()}
    assert env.stats.total.num_failures == 0, failures
    assert counters.missed == 0 and counters.errors == 0 and counters.open == 0
