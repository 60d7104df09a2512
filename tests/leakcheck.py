"""Leak checks: count live greenlets, open file descriptors and registry
entries before and after a scenario, and fail on growth.

Usage::

    with LeakCheck(extra={"subscribers": lambda: broker.subscriber_count}):
        ...scenario...
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from types import TracebackType

import gevent

from tests.helpers import live_greenlets, open_fds


def hub_greenlets() -> int:
    """Live greenlets of this thread (tests.helpers.live_greenlets): the
    resolver's worker threads and their greenlets are a pool, not a leak."""
    return live_greenlets()


class LeakCheck:
    """Fail if greenlets, fds or any ``extra`` counter grew across the block.

    ``slack`` tolerates a little noise (the hub's own greenlets, a lazily
    created resolver, ...). Counts are re-sampled for up to ``settle``
    seconds so that teardown still in flight is not reported as a leak.
    """

    def __init__(
        self,
        *,
        extra: dict[str, Callable[[], int]] | None = None,
        greenlet_slack: int = 2,
        fd_slack: int = 2,
        settle: float = 3.0,
    ) -> None:
        self.extra = extra or {}
        self.greenlet_slack = greenlet_slack
        self.fd_slack = fd_slack
        self.settle = settle
        self.before: dict[str, int] = {}
        self.after: dict[str, int] = {}

    def _sample(self) -> dict[str, int]:
        gc.collect()
        counts = {"greenlets": hub_greenlets(), "fds": open_fds()}
        for name, fn in self.extra.items():
            counts[name] = fn()
        return counts

    def _grown(self, now: dict[str, int]) -> dict[str, tuple[int, int]]:
        slack = {"greenlets": self.greenlet_slack, "fds": self.fd_slack}
        return {
            k: (self.before[k], v)
            for k, v in now.items()
            if v > self.before[k] + slack.get(k, 0)
        }

    def __enter__(self) -> LeakCheck:
        gevent.sleep(0)
        self.before = self._sample()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is not None:
            return
        deadline = time.monotonic() + self.settle
        while True:
            gevent.sleep(0.05)
            self.after = self._sample()
            grown = self._grown(self.after)
            if not grown or time.monotonic() > deadline:
                break
        assert not grown, f"leak: {grown} (before -> after)"
