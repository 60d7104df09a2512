"""Shared pieces of the locustfiles: settings from the environment and the publisher.

Every locustfile here targets the demo's HTTP contract (docs/demo-contract.md)
and reads its knobs from environment variables, so ``loadtests/run.sh`` and
``locust -f`` take the same settings:

* ``GSTREAM_STREAMS``: SSE connections per subscriber user (default 1);
* ``GSTREAM_PUBLISH_INTERVAL``: seconds between publishes (default 0.5);
* ``GSTREAM_PUBLISH_COUNT``: events per publish (default 1);
* ``GSTREAM_PUBLISH_DELAY``: seconds the publisher waits before its first publish (default 1);
* ``GSTREAM_CHAT_INTERVAL``: seconds between a chat sender's messages (default 2);
* ``GSTREAM_LEGACY_HOST``: base URL of the legacy app for mixed.py (default: the demo).
"""

from __future__ import annotations

import os
import time

from locust import HttpUser, constant, task


def env_float(name: str, default: float) -> float:
    """A float from the environment, ``default`` when unset or empty."""
    value = os.environ.get(name, "")
    return float(value) if value else default


def env_int(name: str, default: int) -> int:
    """An int from the environment, ``default`` when unset or empty."""
    value = os.environ.get(name, "")
    return int(value) if value else default


class Publisher(HttpUser):
    """One user publishing to the feed through ``POST /publish``."""

    fixed_count = 1
    wait_time = constant(env_float("GSTREAM_PUBLISH_INTERVAL", 0.5))
    count = env_int("GSTREAM_PUBLISH_COUNT", 1)

    def on_start(self) -> None:
        # Let subscribers connect before the first event, so early ones see it.
        time.sleep(env_float("GSTREAM_PUBLISH_DELAY", 1.0))

    @task
    def publish(self) -> None:
        with self.client.post(f"/publish?count={self.count}", json={"text": "load test"},
                              name="/publish", catch_response=True) as resp:
            if resp.status_code != 200:
                resp.failure(f"HTTP {resp.status_code}")
                return
            try:
                published = resp.json().get("published")
            except ValueError:
                resp.failure("not JSON")
                return
            if published != self.count:
                resp.failure(f"published {published!r}, expected {self.count}")
