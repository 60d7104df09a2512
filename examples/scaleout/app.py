"""The gstream demo scaled out: every process shares one Redis backplane.

Run it under gunicorn (2 gevent workers) or as several ``gstream serve``
processes; see README.md here. ``GSTREAM_REDIS_URL`` picks the Redis
(default ``redis://127.0.0.1:6379/0``; ``redis://:password@host:port/db``,
``rediss://`` for TLS).

The demo (``gstream.demo.make_app``) is used when it accepts a
``backplane`` (and ``hub_backplane``) argument, its ticker off unless
``GSTREAM_TICKER=1`` (each process would tick); until then a small feed
with the same HTTP contract for ``/events``, ``/publish``, ``/stats`` and
``/healthz`` stands in (docs/demo-contract.md). Every response carries
``X-Worker-Pid`` so you can see which process served it.
"""

from __future__ import annotations

import inspect
import json
import os
import time
from collections.abc import Iterable
from typing import Any

from gstream.backplane.redis import RedisBackplane
from gstream.broker import SSEBroker
from gstream.errors import BackplaneUnavailable
from gstream.events import json_event

REDIS_URL = os.environ.get("GSTREAM_REDIS_URL", "redis://127.0.0.1:6379/0")

PAGE = b"""<!doctype html><meta charset=utf-8><title>gstream scale-out</title>
<h1>gstream scale-out</h1><p>Served by process <b id=pid></b>. Publish with
<code>curl -X POST localhost:PORT/publish -d hello</code> on any process.</p><ul id=feed></ul>
<script>
fetch('/healthz').then(r => document.getElementById('pid').textContent = r.headers.get('X-Worker-Pid'));
const es = new EventSource('/events');
es.addEventListener('feed', e => {
  const li = document.createElement('li'); li.textContent = e.lastEventId + ' ' + e.data;
  document.getElementById('feed').prepend(li);
});
</script>"""


def _feed_app(backplane: RedisBackplane) -> Any:
    broker = SSEBroker(topic="feed", backplane=backplane)
    seq = 0

    def respond(start_response: Any, status: str, obj: Any) -> list[bytes]:
        start_response(status, [("Content-Type", "application/json")])
        return [json.dumps(obj).encode()]

    def app(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        nonlocal seq
        path = environ.get("PATH_INFO", "/")
        if path == "/events":
            return broker.subscribe(environ, start_response)  # type: ignore[no-any-return]
        if path == "/publish" and environ.get("REQUEST_METHOD") == "POST":
            size = min(int(environ.get("CONTENT_LENGTH") or 0), 65536)
            raw = environ["wsgi.input"].read(size).decode("utf-8", "replace") if size else ""
            try:
                text = json.loads(raw)["text"] if raw.startswith("{") else raw
            except (ValueError, KeyError, TypeError):
                text = raw
            qs = dict(p.split("=", 1) for p in environ.get("QUERY_STRING", "").split("&") if "=" in p)
            count = min(max(int(qs.get("count", "1")) if qs.get("count", "1").isdigit() else 1, 1), 1000)
            last = None
            try:
                for i in range(count):
                    seq += 1
                    # The Redis id is known only once Redis numbered the event:
                    # publish() does not wait for it, except for the last one,
                    # 50 ms at most (last_id is null if Redis was slower).
                    last = broker.publish(json_event(
                        {"seq": seq, "ts": time.time(), "text": str(text)}, name="feed"),
                        wait_for_id=0.05 if i == count - 1 else None)
            except BackplaneUnavailable as exc:
                # Loud, not silent: the caller learns its event went nowhere.
                return respond(start_response, "503 Service Unavailable", {"error": str(exc)})
            return respond(start_response, "200 OK", {"published": count, "last_id": last})
        if path == "/stats":
            s = broker.stats()
            return respond(start_response, "200 OK", {
                "sse_subscribers": s["subscribers"], "published": s["published"],
                "delivered": s["delivered"], "dropped": s["dropped"],
                "backplane": backplane.stats(), "pid": os.getpid()})
        if path == "/healthz":
            start_response("200 OK", [("Content-Type", "text/plain")])
            return [b"ok"]
        start_response("200 OK", [("Content-Type", "text/html; charset=utf-8")])
        return [PAGE]

    return app


def _demo_factory() -> Any:
    """The demo's ``make_app`` if it accepts a backplane, else None."""
    import importlib

    for name in ("gstream.demo", "gstream.demo_app"):
        try:
            factory = importlib.import_module(name).make_app
        except (ImportError, AttributeError):
            continue
        if "backplane" in inspect.signature(factory).parameters:
            return factory
    return None


def make_app() -> Any:
    """Build the application for this process (call it after the fork)."""
    backplane = RedisBackplane(REDIS_URL)
    factory = _demo_factory()
    if factory is not None:
        params = inspect.signature(factory).parameters
        kwargs: dict[str, Any] = {"backplane": backplane}
        if "hub_backplane" in params:
            kwargs["hub_backplane"] = backplane.hub_backplane()
        if "presence" in params:  # who is in the chat room, in every process
            from gstream.backplane.redis_presence import RedisPresence

            kwargs["presence"] = RedisPresence(REDIS_URL)
        if "ticker" in params:
            # Every process would tick: one ticker per cluster is enough, so
            # it is opt-in here (GSTREAM_TICKER=1 on one process).
            kwargs["ticker"] = os.environ.get("GSTREAM_TICKER") == "1"
        inner = factory(**kwargs)
    else:
        inner = _feed_app(backplane)
    pid = str(os.getpid())

    def app(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        def start(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
            return start_response(status, [*headers, ("X-Worker-Pid", pid)], exc_info)

        return inner(environ, start)  # type: ignore[no-any-return]

    return app
