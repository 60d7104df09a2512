"""Topic streams on a Redis backplane, served by `python -m gstream serve` in tests.

Environment: GSTREAM_REDIS_URL (required). ``/events?topic=...`` streams
topics (``secret/*`` topics are refused by the authorize hook),
``/publish?topic=t&count=n&tag=x`` publishes, ``/stats`` reports.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from typing import Any
from urllib.parse import parse_qs

from gstream.backplane.redis import RedisBackplane
from gstream.broker import SSEBroker
from gstream.errors import BackplaneUnavailable
from gstream.events import Event


def _json(start_response: Any, status: str, obj: Any) -> list[bytes]:
    start_response(status, [("Content-Type", "application/json")])
    return [json.dumps(obj).encode()]


def make_app() -> Any:
    backplane = RedisBackplane(os.environ["GSTREAM_REDIS_URL"], block=1.0, publish_wait=5.0,
                               backoff=0.02, backoff_cap=0.3, catch_up_timeout=2.0)
    broker = SSEBroker(topic="feed", backplane=backplane, heartbeat_interval=0.5,
                       authorize=lambda environ, topic: not topic.startswith("secret/"))

    def app(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "/")
        if path == "/events":
            return broker.subscribe(environ, start_response)  # type: ignore[no-any-return]
        if path == "/publish":
            q = parse_qs(environ.get("QUERY_STRING", ""))
            count = min(max(int(q.get("count", ["1"])[0]), 1), 1000)
            topic = q.get("topic", ["feed"])[0]
            tag = q.get("tag", [""])[0]
            ids: list[str | None] = []
            try:
                for i in range(count):
                    ids.append(broker.publish(Event(data=f"{tag}:{i}"), topic=topic))
            except BackplaneUnavailable as exc:
                return _json(start_response, "503 Service Unavailable",
                             {"error": str(exc), "ids": ids})
            return _json(start_response, "200 OK", {"ids": ids})
        if path == "/stats":
            return _json(start_response, "200 OK",
                         {"broker": broker.stats(), "backplane": backplane.stats(),
                          "pid": os.getpid()})
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"ok\n"]

    return app
