"""Backplane delivery promises from the seed (issue 18): a subscriber that
raises does not stop the reader's next delivery, and a publish on one process
reaches another process's subscriber within 2 s. Two RedisBackplane objects
on a real Redis server play the two processes."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest

from gstream.backplane.redis import RedisBackplane
from gstream.events import Event
from tests.helpers import wait_until
from tests.redis_fixture import RedisServer


@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    srv = RedisServer()
    srv.start()
    yield srv.url
    srv.stop()


def test_raising_subscriber_does_not_stop_the_next_delivery(redis_url: str) -> None:
    a = RedisBackplane(redis_url, block=0.5)
    b = RedisBackplane(redis_url, block=0.5)
    got: list[tuple[str, float]] = []
    raised: list[str] = []

    def broken(event: Event, frame: bytes, may_block: bool = False) -> int:
        raised.append(event.data)
        raise RuntimeError("subscriber bug")

    def healthy(event: Event, frame: bytes, may_block: bool = False) -> int:
        got.append((event.data, time.monotonic()))
        return 1

    try:
        b.attach("room", broken)  # first: its exception comes before the healthy one
        b.attach("room", healthy)
        sent: dict[str, float] = {}
        for data in ("one", "two"):
            sent[data] = time.monotonic()
            a.publish("room", Event(data), b"")
            assert wait_until(lambda: len(got) == len(sent), 3), got
        assert [d for d, _ in got] == ["one", "two"]
        assert raised == ["one", "two"]  # the broken one was called for both
        for data, at in got:
            assert at - sent[data] < 2.0  # A.publish reached B within 2 s
        assert b.stats()["delivered"] == 2
    finally:
        a.close()
        b.close()


def test_publish_reaches_a_healthy_subscriber_of_another_process(redis_url: str) -> None:
    a = RedisBackplane(redis_url, block=5.0)  # the reader's default block, shortened nowhere
    b = RedisBackplane(redis_url, block=5.0)
    got: list[float] = []

    def healthy(event: Event, frame: Any, may_block: bool = False) -> int:
        got.append(time.monotonic())
        return 1

    try:
        b.attach("news", healthy)
        time.sleep(0.2)  # B's reader is parked in XREAD BLOCK
        t0 = time.monotonic()
        a.publish("news", Event("hello"), b"")
        assert wait_until(lambda: got, 2.0)
        assert got[0] - t0 < 2.0
    finally:
        a.close()
        b.close()
