"""Many idle SSE subscribers on the demo's feed, plus one publisher.

Every subscriber holds ``GSTREAM_STREAMS`` connections to ``/events`` and
reports connect time, time to first event, per-event delivery latency (from
the event's ``ts``), reconnects and missed events (gaps in ids). One
publisher posts to ``/publish`` every ``GSTREAM_PUBLISH_INTERVAL`` seconds.

    locust -f loadtests/sse_idle.py --headless -u 1000 -r 200 -t 30s --host http://127.0.0.1:8000
"""

from __future__ import annotations

from _common import Publisher, env_int

from gstream.locust import SSEUser

__all__ = ["Subscriber", "Publisher"]


class Subscriber(SSEUser):
    """An idle subscriber of the feed."""

    path = "/events"
    streams = env_int("GSTREAM_STREAMS", 1)
    read_timeout = 60.0  # the broker's heartbeats keep a healthy stream busy
