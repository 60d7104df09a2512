"""Shared plumbing of the Redis backplanes: clients, backoff, state logging."""

from __future__ import annotations

import logging
import random
import re
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

try:
    import redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "the Redis backplane needs the 'redis' package: pip install 'gstream[redis]'"
    ) from exc

__all__ = ["redis", "TRANSIENT", "Backoff", "StateLog", "make_client", "redact", "parse_id",
           "DEFAULT_URL"]

DEFAULT_URL = "redis://127.0.0.1:6379/0"

#: Errors after which a retry may succeed (Redis down, restarting, loading,
#: failing over, refusing our password for now). Everything redis-py raises.
TRANSIENT: tuple[type[BaseException], ...] = (redis.RedisError, OSError)

_STREAM_ID = re.compile(r"^(\d{1,20})-(\d{1,20})$")


def parse_id(value: str | bytes | None) -> tuple[int, int] | None:
    """Parse a Redis stream id ``<ms>-<seq>``; None if it is not one."""
    if value is None:
        return None
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace")
    m = _STREAM_ID.match(value)
    return (int(m.group(1)), int(m.group(2))) if m else None


def redact(url: str) -> str:
    """``url`` without its password, for logs."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = f":{parts.port}" if parts.port else ""
        return f"{parts.scheme}://{host}{port}{parts.path}"
    except ValueError:
        return "<invalid redis url>"


def make_client(url: str, *, max_connections: int, connect_timeout: float,
                socket_timeout: float | None, **kwargs: Any) -> Any:
    """A ``redis.Redis`` over a bounded blocking pool, with redis-py's own retries off.

    Retries are ours to decide: a silently retried ``XADD`` could append an
    event twice, and the reader has its own backoff loop. A pooled
    connection that died with a Redis restart is detected and replaced by
    the pool when it is checked out (redis-py checks it before use).
    """
    kwargs.setdefault("health_check_interval", 30)
    pool = redis.BlockingConnectionPool.from_url(
        url, max_connections=max(1, max_connections), timeout=connect_timeout,
        socket_connect_timeout=connect_timeout, socket_timeout=socket_timeout,
        retry=Retry(NoBackoff(), 0), **kwargs)
    return redis.Redis(connection_pool=pool)


class Backoff:
    """Exponential backoff, capped, with jitter (so restarting fleets do not stampede)."""

    def __init__(self, base: float, cap: float) -> None:
        self.base = max(0.001, base)
        self.cap = max(self.base, cap)
        self.attempt = 0

    def next(self) -> float:
        """The next delay in seconds (between half and all of the exponential step)."""
        step = min(self.cap, self.base * (2 ** min(self.attempt, 30)))
        self.attempt += 1
        return random.uniform(step / 2, step)

    def reset(self) -> None:
        """Back to the shortest delay (after a success)."""
        self.attempt = 0


class StateLog:
    """Logs connection state *changes* only: one line when lost, one when back."""

    def __init__(self, log: logging.Logger, what: str) -> None:
        self.log = log
        self.what = what
        self.up: bool | None = None
        self.since = time.monotonic()
        self.failures = 0

    def ok(self, detail: Callable[[], str] | None = None) -> bool:
        """Record a success; True if this is a recovery (was down).

        ``detail()`` is appended to the recovery line (computed only then).
        """
        recovered = self.up is False
        if recovered:
            self.log.warning("%s: Redis reachable again after %.1fs (%d failed attempts)%s",
                             self.what, time.monotonic() - self.since, self.failures,
                             detail() if detail is not None else "")
        elif self.up is None:
            self.log.info("%s: connected", self.what)
        if self.up is not True:
            self.up, self.since, self.failures = True, time.monotonic(), 0
        return recovered

    def failed(self, exc: BaseException) -> None:
        """Record a failure; logs only the first one of an outage."""
        self.failures += 1
        if self.up is not False:
            self.log.warning("%s: Redis unavailable (%s: %s); retrying with backoff",
                             self.what, type(exc).__name__, exc)
            self.up, self.since = False, time.monotonic()
        else:
            self.log.debug("%s: still unavailable (%s)", self.what, exc)
