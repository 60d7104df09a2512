"""gstream.locust users run inside a real Locust Environment + LocalRunner,
in this (monkey-patched) process, against real servers on 127.0.0.1: an SSE
app on gevent.pywsgi whose ids we control, and the ``websockets`` reference
server (tests/apps/ws_echo.py) in a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import gevent
import pytest
from locust import constant, task
from locust.env import Environment

from gstream.errors import Closed
from gstream.events import Event
from gstream.locust import SSEUser, WebSocketUser, json_timestamp, stream_counters
from gstream.sse import SSEWriter, last_event_id, query_param
from tests.helpers import open_fds, reference_ws_server, wait_until

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def sse_app(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
    """``/events``: ids ``start..total`` (resuming after Last-Event-ID) as JSON
    ``{"seq", "ts"}``; ``skip=a,b`` leaves ids out (a lost event, on purpose);
    ``per_conn=n`` ends the stream after n events (the client reconnects);
    after ``total`` the stream stays open, idle. Anything else: 404."""
    if environ["PATH_INFO"] != "/events":
        start_response("404 Not Found", [("Content-Type", "text/plain")])
        return [b"no"]
    total = int(query_param(environ, "total") or 10)
    per_conn = int(query_param(environ, "per_conn") or 0)
    skip = {int(x) for x in (query_param(environ, "skip") or "").split(",") if x}
    resume = last_event_id(environ)
    sse = SSEWriter(environ, start_response)
    sse.set_retry(50)
    sent = 0
    try:
        for n in range(int(resume) + 1 if resume.isdigit() else 1, total + 1):
            if per_conn and sent == per_conn:
                return sse.close()
            sent += 1
            if n in skip:
                continue
            sse.send(Event(name="feed", id=str(n), data=json.dumps({"seq": n, "ts": time.time()})))
        sse.open()
        while True:  # idle until the client goes away
            gevent.sleep(0.2)
            sse.write_comment("")
    except Closed:
        pass
    return sse.close()


@pytest.fixture
def sse_url(serve: Callable[..., Any]) -> str:
    return str(serve(sse_app).url)


@pytest.fixture(scope="module")
def ws_url() -> Iterator[str]:
    with reference_ws_server() as port:
        yield f"http://127.0.0.1:{port}"


class Run:
    """A Locust Environment + LocalRunner running ``users`` of ``user_class``."""

    def __init__(self, user_class: type, host: str, users: int, stop_timeout: float | None = None):
        self.env = Environment(user_classes=[user_class], host=host, stop_timeout=stop_timeout)
        self.runner = self.env.create_local_runner()
        self.counters = stream_counters(self.env)
        self.runner.start(users, spawn_rate=10_000)

    def stat(self, name: str, kind: str = "SSE") -> Any:
        return self.env.stats.get(name, kind)

    def quit(self, bound: float = 3.0) -> float:
        start = time.monotonic()
        with gevent.Timeout(bound + 5):
            self.runner.quit()
        took = time.monotonic() - start
        assert took < bound, f"runner.quit() took {took:.2f} s"
        return took


def error_texts(run: Run) -> set[str]:
    return {e.error if isinstance(e.error, str) else repr(e.error)
            for e in run.env.stats.errors.values()}


def test_sse_statistics_names_and_counts(sse_url: str) -> None:
    class Sub(SSEUser):
        path = "/events?total=10"

    run = Run(Sub, sse_url, users=20)
    try:
        assert wait_until(lambda: run.stat("event").num_requests == 200, timeout=10)
        gevent.sleep(0.2)  # nothing more may arrive
        assert run.stat("connect").num_requests == 20
        assert run.stat("first_event").num_requests == 20
        assert run.stat("event").num_requests == 200
        assert run.env.stats.total.num_failures == 0
        assert run.stat("missed").num_requests == 0
        assert run.stat("reconnect").num_requests == 0
        assert run.counters.open == 20 and run.counters.events == 200
        # latency from the server's "ts": present, non-negative and small on loopback
        event = run.stat("event")
        assert event.min_response_time >= 0 and event.max_response_time < 2000
        assert event.total_response_time > 0  # computed, not the 0 of "no timestamp"
        assert event.total_content_length > 200 * 20  # JSON data of every event
        first = run.stat("first_event")
        assert first.avg_response_time >= run.stat("connect").min_response_time
    finally:
        run.quit()
    assert run.counters.open == 0 and run.counters.disconnects == 0
    assert {(e.method, e.name) for e in run.env.stats.entries.values()} == {
        ("SSE", "connect"), ("SSE", "first_event"), ("SSE", "event"),
        ("SSE", "missed"), ("SSE", "reconnect")}  # the last two: read by this test, zero


def test_sse_gaps_detected_when_the_server_drops_events(sse_url: str) -> None:
    class Sub(SSEUser):
        path = "/events?total=10&skip=3,7,8"

    run = Run(Sub, sse_url, users=10)
    try:
        assert wait_until(lambda: run.stat("event").num_requests == 70, timeout=10)
        assert wait_until(lambda: run.stat("missed").num_failures == 20)  # two gaps per user
        gevent.sleep(0.2)
        assert run.counters.missed == 30  # three events per user
        assert run.stat("missed").total_content_length == 30
        assert run.stat("event").num_failures == 0
        errors = error_texts(run)
        assert errors == {"MissedEvents('gap in event ids')"}
    finally:
        run.quit()


def test_sse_reconnects_resume_without_loss_and_count(sse_url: str) -> None:
    class Sub(SSEUser):
        path = "/events?total=12&per_conn=4"  # 3 connections of 4 events, the last stays open

    run = Run(Sub, sse_url, users=5)
    try:
        assert wait_until(lambda: run.stat("event").num_requests == 60, timeout=10)
        assert wait_until(lambda: run.stat("connect").num_requests == 15)
        gevent.sleep(0.3)
        assert run.stat("connect").num_requests == 15
        assert run.stat("reconnect").num_requests == 10
        assert run.counters.reconnects == 10 and run.counters.disconnects == 10
        # downtime is at least the server's retry: 50 ms
        assert run.stat("reconnect").min_response_time >= 45
        assert run.stat("missed").num_requests == 0
        assert run.stat("duplicate").num_requests == 0
        assert run.env.stats.total.num_failures == 0
        assert run.stat("first_event").num_requests == 15
        assert run.counters.open == 5
    finally:
        run.quit()


def test_sse_gap_across_a_reconnect(sse_url: str) -> None:
    class Sub(SSEUser):
        path = "/events?total=8&per_conn=4&skip=5"  # the event after the resume is lost

    run = Run(Sub, sse_url, users=3)
    try:
        assert wait_until(lambda: run.stat("missed").num_failures == 3, timeout=10)
        assert wait_until(lambda: run.stat("event").num_requests == 21)
        assert run.counters.missed == 3 and run.stat("reconnect").num_requests >= 3
    finally:
        run.quit()


def test_sse_connect_failures_reported_and_users_still_stop(sse_url: str) -> None:
    class Refused(SSEUser):
        path = "/nowhere"  # 404: EventSource gives up

    run = Run(Refused, sse_url, users=5)
    try:
        assert wait_until(lambda: run.stat("connect").num_failures == 5, timeout=5)
        assert "404" in error_texts(run).pop()
    finally:
        run.quit()
    assert run.counters.errors == 5 and run.counters.open == 0


def test_tasks_run_while_streams_are_open_and_users_stop_on_time(sse_url: str) -> None:
    ticks: list[int] = []

    class Busy(SSEUser):
        path = "/events?total=3"
        streams = 3
        wait_time = constant(0.05)

        @task
        def tick(self) -> None:
            ticks.append(1)

    # stop_timeout lets running tasks finish; the users still stop at once
    run = Run(Busy, sse_url, users=30, stop_timeout=5)
    try:
        assert wait_until(lambda: run.counters.open == 90, timeout=10)
        assert wait_until(lambda: run.stat("event").num_requests == 270)
        before = len(ticks)
        gevent.sleep(0.3)
        assert len(ticks) > before + 30  # tasks keep running while 90 streams are held
    finally:
        run.quit(bound=2.0)
    assert run.counters.open == 0
    assert Busy.tasks == [Busy.tick]  # no hidden hold task mixed into the user's tasks


def test_idle_users_stop_promptly_with_a_stop_timeout(sse_url: str) -> None:
    class Idle(SSEUser):
        path = "/events?total=1"
        hold_interval = 20.0  # were the hold not interruptible, quit() would wait for it

    fds = open_fds()
    run = Run(Idle, sse_url, users=100, stop_timeout=30)
    assert wait_until(lambda: run.counters.open == 100, timeout=10)
    assert open_fds() >= fds + 100
    run.quit(bound=2.0)  # holding users are waiting, so Locust kills them at once
    assert run.counters.open == 0
    assert len(run.runner.user_greenlets) == 0
    assert wait_until(lambda: open_fds() <= fds + 5, timeout=3)  # client sockets closed


# -- WebSocket ----------------------------------------------------------------


def test_ws_round_trips_pings_and_bytes(ws_url: str) -> None:
    replies: list[Any] = []

    class Echo(WebSocketUser):
        path = "/echo"
        wait_time = constant(0.02)

        @task(3)
        def roundtrip(self) -> None:
            replies.append(self.request({"text": "x" * 100}))

        @task
        def ping_server(self) -> None:
            self.ping()

    run = Run(Echo, ws_url, users=10)
    try:
        assert wait_until(lambda: run.stat("rtt", "WS").num_requests >= 100, timeout=10)
        assert wait_until(lambda: run.stat("ping", "WS").num_requests >= 10)
    finally:
        run.quit()
    rtt = run.stat("rtt", "WS")
    assert run.stat("connect", "WS").num_requests == 10
    assert run.env.stats.total.num_failures == 0
    assert rtt.total_content_length >= rtt.num_requests * 100
    assert 0 < rtt.avg_response_time < 1000
    assert all(r is not None and r["text"] == "x" * 100 and "ref" in r for r in replies)
    assert run.stat("message", "WS").num_requests == 0  # every reply matched its request
    assert run.counters.bytes_received >= rtt.total_content_length
    assert run.counters.open == 0


def test_ws_listener_counts_messages(ws_url: str) -> None:
    class Listener(WebSocketUser):
        path = "/count"  # the server sends "0".."199"
        reconnect = False

    run = Run(Listener, ws_url, users=5)
    try:
        assert wait_until(lambda: run.stat("message", "WS").num_requests == 1000, timeout=10)
        assert run.counters.events == 1000
    finally:
        run.quit()
    assert run.env.stats.total.num_failures == 0


def test_ws_reconnect_after_server_close_and_close_codes_as_failures(ws_url: str) -> None:
    class Bye(WebSocketUser):
        path = "/bye"  # a greeting, then close 1001: a normal close, then reconnect
        reconnect_delay = 0.05

    class TooBig(WebSocketUser):
        path = "/big?n=5000"
        connect_options = {"max_size": 1000}  # the client closes with 1009
        reconnect = False

    run = Run(Bye, ws_url, users=3)
    try:
        assert wait_until(lambda: run.stat("reconnect", "WS").num_requests >= 6, timeout=10)
        assert run.env.stats.total.num_failures == 0
        assert run.counters.disconnects >= 6
    finally:
        run.quit()
    run = Run(TooBig, ws_url, users=2)
    try:
        assert wait_until(lambda: run.stat("disconnect", "WS").num_failures == 2, timeout=10)
        errors = error_texts(run)
        assert errors == {"Disconnected('closed with code 1009 by the client')"}
    finally:
        run.quit()


def test_ws_request_timeout_and_users_stop_on_time(ws_url: str) -> None:
    class Waiting(WebSocketUser):
        path = "/count"  # never answers requests
        request_timeout = 0.3

        @task
        def ask(self) -> None:
            self.request({"q": 1})

    run = Run(Waiting, ws_url, users=5, stop_timeout=1)
    try:
        assert wait_until(lambda: run.stat("rtt", "WS").num_failures >= 5, timeout=10)
        assert "TimeoutError" in error_texts(run).pop()
    finally:
        run.quit(bound=2.5)  # tasks mid-request are given stop_timeout, no more
    assert run.counters.open == 0


def test_json_timestamp() -> None:
    assert json_timestamp('{"ts": 12.5}') == 12.5
    assert json_timestamp(b'{"ts": 3}') == 3.0
    assert json_timestamp('{"ts": "x"}') is None
    assert json_timestamp("plain") is None and json_timestamp("{bad") is None
    assert json_timestamp('{"t": 1}', "t") == 1.0


def test_clear_import_error_without_locust() -> None:
    code = ("import sys; sys.modules['locust'] = None\n"
            "try:\n    import gstream.locust\nexcept ImportError as e:\n    print(e)\n"
            "import gstream; assert 'gstream.locust' not in sys.modules\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         env=dict(os.environ, PYTHONPATH=ROOT), timeout=30)
    assert out.returncode == 0, out.stderr
    assert "pip install 'gstream[locust]'" in out.stdout


def test_hook_errors_are_reported_and_do_not_end_the_stream(sse_url: str) -> None:
    class Buggy(SSEUser):
        path = "/events?total=6"

        def on_event(self, event: Any) -> None:
            if json.loads(event.data)["seq"] % 2:
                raise ValueError("bug in a hook")

    run = Run(Buggy, sse_url, users=2)
    errors: list[BaseException] = []
    run.env.events.user_error.add_listener(lambda user_instance, exception, tb: errors.append(exception))
    try:
        assert wait_until(lambda: run.stat("event").num_requests == 12, timeout=10)
        assert wait_until(lambda: len(errors) == 6)
        assert all(isinstance(e, ValueError) for e in errors)
    finally:
        run.quit()


def test_ws_without_session_fails_fast(ws_url: str) -> None:
    outcomes: list[bool] = []

    class Manual(WebSocketUser):
        path = "/echo"
        autostart = False
        wait_time = constant(0.05)

        @task
        def go(self) -> None:
            if len(outcomes) == 0:
                started = time.monotonic()
                outcomes.append(self.send("x"))  # no session: fails at once
                assert time.monotonic() - started < 0.5
                self.start_session()
            elif len(outcomes) == 1:
                outcomes.append(self.request({"a": 1}) is not None)

    run = Run(Manual, ws_url, users=1)
    try:
        assert wait_until(lambda: len(outcomes) == 2, timeout=10)
    finally:
        run.quit()
    assert outcomes == [False, True]
    assert run.stat("send", "WS").num_failures == 1 and run.stat("rtt", "WS").num_failures == 0
