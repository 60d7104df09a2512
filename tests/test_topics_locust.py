"""Locust's SSEUser on a multi-topic stream: one connection, several topics, gaps counted
per topic (a real Locust Environment and LocalRunner against a real broker)."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from gstream.broker import SSEBroker
from gstream.locust import SSEUser
from tests.helpers import wait_until
from tests.test_locust_users import Run


def test_sse_user_subscribes_to_topics_and_counts_gaps_per_topic(serve: Callable[..., Any]) -> None:
    broker = SSEBroker(heartbeat_interval=0.2)
    srv = serve(broker.subscribe)

    class Reader(SSEUser):
        path = "/events"
        topics = ["a", "b/*"]

    run = Run(Reader, srv.url, users=3)
    try:
        assert wait_until(lambda: broker.subscriber_count == 3, timeout=10)
        assert broker.topic_subscribers("a") == 3 and broker.topic_subscribers("b/*") == 3
        for seq in (1, 2, 3, 4, 5):
            broker.publish(json.dumps({"seq": seq}), topic="a")
        for seq in (1, 2, 5, 6):  # 3 and 4 never published: a gap of 2 in b/x
            broker.publish(json.dumps({"seq": seq}), topic="b/x")
        broker.publish(json.dumps({"seq": 1}), topic="c")  # not subscribed
        assert wait_until(lambda: run.stat("event").num_requests == 27, timeout=10)
        assert wait_until(lambda: run.stat("missed b/x").num_failures == 3)
        assert run.stat("missed b/x").total_content_length == 6
        assert run.stat("missed a").num_requests == 0
        assert run.counters.missed == 6 and run.counters.duplicates == 0
        users = run.runner.user_greenlets and [g.args[0] for g in run.runner.user_greenlets]
        assert [u.topic_missed for u in users] == [{"b/x": 2}] * 3
    finally:
        run.quit()
        broker.close()
