"""A small SSE demo: a page with a live clock fed by an event stream."""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

import gevent

from .errors import Closed
from .events import Event
from .sse import SSEWriter, last_event_id

PAGE = b"""<!doctype html><meta charset=utf-8><title>gstream demo</title>
<h1>gstream demo</h1><p>Live feed over Server-Sent Events:</p><ul id=feed></ul>
<script>
const es = new EventSource('/events');
es.addEventListener('tick', e => {
  const li = document.createElement('li'); li.textContent = e.lastEventId + ': ' + e.data;
  const feed = document.getElementById('feed'); feed.prepend(li);
  while (feed.children.length > 20) feed.lastChild.remove();
});
</script>"""


def make_app() -> Any:
    """Return the demo WSGI application."""

    def app(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "/")
        if path == "/events":
            sse = SSEWriter(environ, start_response)
            start = int(last_event_id(environ) or 0) if last_event_id(environ).isdigit() else 0
            sse.set_retry(2000)
            try:
                for n in range(start + 1, start + 10_000):
                    sse.send(Event(name="tick", data=time.strftime("%H:%M:%S"), id=str(n)))
                    gevent.sleep(1)
            except Closed:
                pass  # the browser went away
            return sse.close()
        start_response("200 OK", [("Content-Type", "text/html; charset=utf-8")])
        return [PAGE]

    return app
