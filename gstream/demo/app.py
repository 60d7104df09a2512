"""The demo application: a live SSE feed, a WebSocket chat room and live statistics.

Its endpoints are the demo's HTTP contract (docs/demo-contract.md); the
Locust users, load tests, benchmarks and the browser test rely on them.
"""

from __future__ import annotations

import json
import logging
import mimetypes
import re
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import gevent

from ..broker import SSEBroker
from ..errors import BackplaneUnavailable
from ..events import Event
from ..sse import query_param
from ..types import Environ, StartResponse
from ..websocket import WebSocket, WSConfig, websocket_app
from .chat import ChatRoom

__all__ = ["DemoApp", "make_app", "MAX_PUBLISH_BODY", "MAX_PUBLISH_COUNT"]

log = logging.getLogger("gstream.demo")

STATIC_DIR = Path(__file__).resolve().parent / "static"
MAX_PUBLISH_BODY = 64 * 1024
"""Largest ``POST /publish`` body, in bytes (larger: 413)."""
MAX_PUBLISH_COUNT = 1000
"""Most events one ``POST /publish?count=N`` may publish."""
MAX_TEXT = 4096
#: A tab's private topic: ``tab/`` and 32 random hex digits the page draws
#: itself (the unguessable name is the capability; docs/topics.md).
TAB_TOPIC = re.compile(r"tab/[0-9a-f]{32}")


def _demo_topic(environ: Environ, topic: str) -> bool:
    """The demo's authorize hook: the shared feed and any tab's private topic."""
    return topic == "feed" or TAB_TOPIC.fullmatch(topic) is not None
#: Longest ``POST /publish`` waits for a durable backplane (Redis) to number
#: its last event, so that ``last_id`` is an id clients can resume from.
LAST_ID_WAIT = 0.05
ECHO_MAX = 1 << 20


def _load_static() -> dict[str, tuple[bytes, str]]:
    # Read once: the page is tiny, and serving from memory means no path
    # from a request ever reaches the file system.
    files: dict[str, tuple[bytes, str]] = {}
    for path in sorted(STATIC_DIR.iterdir()):
        if path.is_file() and not path.name.startswith("."):
            ctype = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
            if ctype.startswith("text/") or ctype.endswith("javascript"):
                ctype += "; charset=utf-8"
            files[path.name] = (path.read_bytes(), ctype)
    return files


def _echo(ws: WebSocket) -> None:
    for message in ws:
        ws.send(message)


def _json_response(start_response: StartResponse, obj: Any, status: str = "200 OK") -> list[bytes]:
    body = json.dumps(obj, separators=(",", ":")).encode()
    start_response(status, [("Content-Type", "application/json"),
                            ("Content-Length", str(len(body))), ("Cache-Control", "no-store")])
    return [body]


def _text_response(start_response: StartResponse, status: str, text: str,
                   extra: list[tuple[str, str]] | None = None) -> list[bytes]:
    body = (text + "\n").encode()
    start_response(status, [("Content-Type", "text/plain; charset=utf-8"),
                            ("Content-Length", str(len(body))), *(extra or [])])
    return [body]


class _Rates:
    """Per-second rates of a few counters, sampled once a second."""

    def __init__(self) -> None:
        self.last: dict[str, float] = {}
        self.rates: dict[str, float] = {}
        self.at = time.monotonic()

    def sample(self, counters: dict[str, float]) -> None:
        now = time.monotonic()
        elapsed = now - self.at
        if elapsed <= 0:
            return
        for key, value in counters.items():
            previous = self.last.get(key)
            self.rates[key] = 0.0 if previous is None else round(max(0.0, value - previous) / elapsed, 1)
            self.last[key] = value
        self.at = now


class DemoApp:
    """The demo as a WSGI application (see :func:`make_app`).

    Attributes:
        feed: the feed's :class:`~gstream.SSEBroker` (topic ``feed``).
        chat: the :class:`~gstream.demo.chat.ChatRoom` behind ``/chat``.
        server: the :class:`gstream.Server` serving the app, when known
            (``gstream demo`` / ``gstream serve`` set it through
            :meth:`bind_server`); gives the ``connections`` statistic.
    """

    def __init__(self, *, ticker: bool = True, backplane: Any = None,
                 hub_backplane: Any = None, tick_interval: float = 1.0,
                 presence: Any = None) -> None:
        self.ticker = ticker
        self.tick_interval = max(0.05, tick_interval)
        self.feed = SSEBroker(topic="feed", backplane=backplane, retry=2000,
                              heartbeat_interval=15.0, history_size=1024,
                              authorize=_demo_topic, max_topics=2)
        # Statistics are per process: never shared through a backplane.
        self.stats_feed = SSEBroker(topic="demo.stats", retry=2000, history_size=0,
                                    heartbeat_interval=15.0)
        self.chat = ChatRoom(backplane=hub_backplane, presence=presence)
        self.echo = websocket_app(self._echo_session, WSConfig(read_limit=ECHO_MAX))
        self.server: Any = None
        self.echo_sessions = 0
        self.started_at = time.time()
        # Ids continue from the clock (microseconds), like the broker's own,
        # so a restarted demo never re-issues ids a browser may resume from.
        self._seq = time.time_ns() // 1000
        self._static = _load_static()
        self._rates = _Rates()
        self._greenlets: list[gevent.Greenlet] = []
        self._started = False
        self._routes = {
            "/": self._page,
            "/index.html": self._page,
            "/events": self.feed.subscribe,
            "/publish": self._publish,
            "/chat": self.chat.app,
            "/echo": self.echo,
            "/stats": self._stats,
            "/stats/stream": self.stats_feed.subscribe,
            "/healthz": self._healthz,
        }

    # -- lifecycle --------------------------------------------------------

    def bind_server(self, server: Any) -> None:
        """Remember the server (for the ``connections`` figure) and start the background work."""
        self.server = server
        self.start()

    def start(self) -> None:
        """Start the hub, the ticker and the statistics sampler (idempotent).

        Called on the first request too, so the app works under any server
        (and under gunicorn, only in the worker processes).
        """
        if self._started:
            return
        self._started = True
        self.chat.start()
        self._greenlets.append(gevent.spawn(self._sampler))
        if self.ticker:
            self._greenlets.append(gevent.spawn(self._tick))

    def close(self) -> None:
        """Stop the background greenlets, end the streams and close the chat room."""
        gevent.killall(self._greenlets, timeout=2)
        self._greenlets.clear()
        self.feed.close()
        self.stats_feed.close()
        self.chat.stop(2.0)

    def _tick(self) -> None:
        while True:
            self.publish(time.strftime("%H:%M:%S"))
            gevent.sleep(self.tick_interval)

    def _sampler(self) -> None:
        while True:
            gevent.sleep(1.0)
            try:
                self._rates.sample(self._counters())
                if self.stats_feed.subscriber_count:
                    self.stats_feed.publish(Event(name="stats", data=json.dumps(self.stats())))
            except Exception:  # statistics must never take the demo down
                log.exception("statistics sampler failed")

    # -- feed -------------------------------------------------------------

    def publish(self, text: str, topic: str | None = None, *,
                wait_for_id: float | None = None) -> str | None:
        """Publish one feed event, or one to a tab's private ``topic``; return its id, None if not known yet.

        In memory the id is ``seq`` (a tab topic's: its position). With a
        durable backplane (Redis) it is the stream entry's id, returned only
        if Redis numbered the event within ``wait_for_id`` seconds (default:
        not waited for).
        """
        self._seq += 1
        seq = self._seq
        data = json.dumps({"seq": seq, "ts": time.time(), "text": text},
                          separators=(",", ":"), ensure_ascii=False)
        # With a durable backplane (Redis) the broker assigns the id (the
        # stream entry id); report that one, it is what clients resume from.
        # (seq is never a resumable id there: None says "not known yet").
        # A tab's events are plain messages: typed by their topic on the stream.
        event = Event(name="feed", data=data, id=str(seq)) if topic is None else Event(data=data)
        return self.feed.publish(event, topic=topic, wait_for_id=wait_for_id)

    # -- statistics ---------------------------------------------------------

    def _counters(self) -> dict[str, float]:
        feed = self.feed.stats()
        chat = self.chat.hub.stats()
        return {
            "published": feed["published"],
            "delivered": feed["delivered"] + chat["deliveries"],
            "chat": chat["broadcasts"],
        }

    def stats(self) -> dict[str, Any]:
        """The ``/stats`` document (docs/demo-contract.md, plus details)."""
        feed = self.feed.stats()
        chat = self.chat.hub.stats()
        members = self.chat.members
        sse = self.feed.subscriber_count
        if self.server is not None:
            connections = int(self.server.connections)
        else:  # no server handle: count the long-lived ones we know of
            connections = sse + self.stats_feed.subscriber_count + members + self.echo_sessions
        rates = self._rates.rates
        try:
            present: int | None = self.chat.hub.presence_count()
        except BackplaneUnavailable:
            present = None
        return {
            "sse_subscribers": sse,
            "ws_members": members,
            "published": feed["published"],
            "delivered": feed["delivered"] + chat["deliveries"],
            "dropped": feed["dropped"] + chat["drops"] + chat["member_drops"],
            "events_per_second": rates.get("published", 0.0),
            "connections": connections,
            "uptime": round(time.time() - self.started_at, 1),
            # Details beyond the contract, for the page and for curious people.
            "deliveries_per_second": rates.get("delivered", 0.0),
            "chat_per_second": rates.get("chat", 0.0),
            "stats_subscribers": self.stats_feed.subscriber_count,
            "echo_sessions": self.echo_sessions,
            "chat_present": present,
            "feed": {k: feed[k] for k in ("published", "delivered", "dropped", "replayed",
                                          "resets", "rejected", "last_id")},
            "chat": chat,
        }

    # -- WSGI -------------------------------------------------------------

    def __call__(self, environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        if not self._started:
            self.start()
        path = environ.get("PATH_INFO") or "/"
        route = self._routes.get(path)
        if route is not None:
            return route(environ, start_response)
        if path.startswith("/static/") and path[8:] in self._static:
            return self._file(environ, start_response, path[8:])
        if path == "/favicon.ico":
            start_response("204 No Content", [])
            return []
        return _text_response(start_response, "404 Not Found", "not found")

    def _file(self, environ: Environ, start_response: StartResponse, name: str) -> list[bytes]:
        if environ.get("REQUEST_METHOD") not in ("GET", "HEAD"):
            return _text_response(start_response, "405 Method Not Allowed", "GET only",
                                  [("Allow", "GET, HEAD")])
        body, ctype = self._static[name]
        start_response("200 OK", [("Content-Type", ctype), ("Content-Length", str(len(body))),
                                  ("Cache-Control", "no-cache"),
                                  ("X-Content-Type-Options", "nosniff")])
        return [body]

    def _page(self, environ: Environ, start_response: StartResponse) -> list[bytes]:
        return self._file(environ, start_response, "index.html")

    def _healthz(self, environ: Environ, start_response: StartResponse) -> list[bytes]:
        return _text_response(start_response, "200 OK", "ok")

    def _stats(self, environ: Environ, start_response: StartResponse) -> list[bytes]:
        return _json_response(start_response, self.stats())

    def _echo_session(self, ws: WebSocket) -> None:
        self.echo_sessions += 1
        try:
            _echo(ws)
        finally:
            self.echo_sessions -= 1

    def _publish(self, environ: Environ, start_response: StartResponse) -> list[bytes]:
        if environ.get("REQUEST_METHOD") != "POST":
            return _text_response(start_response, "405 Method Not Allowed", "POST only",
                                  [("Allow", "POST")])
        raw_count = query_param(environ, "count")
        count = 1
        if raw_count is not None:
            if not (raw_count.isascii() and raw_count.isdigit() and len(raw_count) <= 4):
                return _text_response(start_response, "400 Bad Request", "count must be 1..1000")
            count = int(raw_count)
            if not 1 <= count <= MAX_PUBLISH_COUNT:
                return _text_response(start_response, "400 Bad Request", "count must be 1..1000")
        topic = query_param(environ, "topic")
        if topic is not None and not TAB_TOPIC.fullmatch(topic):
            return _text_response(start_response, "400 Bad Request",
                                  "topic must be a tab's private topic (tab/<32 hex>)")
        try:
            length = int(environ.get("CONTENT_LENGTH") or 0)
        except ValueError:
            return _text_response(start_response, "400 Bad Request", "bad Content-Length")
        if length > MAX_PUBLISH_BODY:
            return _text_response(start_response, "413 Content Too Large",
                                  f"body over {MAX_PUBLISH_BODY} bytes")
        if length > 0:
            body = environ["wsgi.input"].read(length)
        elif "chunked" in environ.get("HTTP_TRANSFER_ENCODING", "").lower():
            body = environ["wsgi.input"].read(MAX_PUBLISH_BODY + 1)
            if len(body) > MAX_PUBLISH_BODY:
                return _text_response(start_response, "413 Content Too Large",
                                      f"body over {MAX_PUBLISH_BODY} bytes")
        else:
            body = b""
        text = self._text_of(body, environ.get("CONTENT_TYPE", ""))
        last: str | None = None
        try:
            for i in range(count):
                last = self.publish(text, topic,
                                    wait_for_id=LAST_ID_WAIT if i == count - 1 else None)
        except BackplaneUnavailable as exc:
            return _text_response(start_response, "503 Service Unavailable",
                                  f"backplane unavailable: {exc}", [("Retry-After", "1")])
        return _json_response(start_response, {"published": count, "last_id": last})

    @staticmethod
    def _text_of(body: bytes, content_type: str) -> str:
        raw = body.decode("utf-8", "replace")
        if "json" in content_type or raw.lstrip().startswith("{"):
            try:
                obj = json.loads(raw)
            except ValueError:
                obj = None
            if isinstance(obj, dict):
                value = obj.get("text", "")
                raw = value if isinstance(value, str) else json.dumps(value)
        return raw[:MAX_TEXT]


def make_app(*, ticker: bool = True, backplane: Any = None,
             hub_backplane: Any = None, presence: Any = None) -> DemoApp:
    """Return the demo WSGI application.

    Args:
        ticker: publish one feed event per second (``gstream demo --no-ticker`` turns it off).
        backplane: the feed broker's :class:`gstream.backplane.Backplane`, to share the
            feed between processes (e.g. Redis).
        hub_backplane: the chat room Hub's backplane (``HubBackplane``), to share the chat.
        presence: the chat room's :class:`gstream.presence.Presence` (in-memory by
            default; a ``RedisPresence`` lists the members of every process).
    """
    return DemoApp(ticker=ticker, backplane=backplane, hub_backplane=hub_backplane,
                   presence=presence)
