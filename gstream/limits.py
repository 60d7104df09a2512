"""Process limits a server meets at scale: the listen backlog, open descriptors, worker count.

Used by :class:`gstream.server.Server` when it starts; see docs/server.md
("Backlog" and "Descriptors") for why each default is what it is.
"""

from __future__ import annotations

import logging
import os

try:
    import resource
except ImportError:  # not on Windows
    resource = None  # type: ignore[assignment]

__all__ = ["DEFAULT_BACKLOG", "FD_RESERVE", "WORKERS_PER_CPU", "default_backlog", "somaxconn",
           "raise_nofile_limit", "max_workers"]

log = logging.getLogger("gstream.server")

#: The listen backlog gstream asks for unless told otherwise (the kernel
#: clamps it to ``net.core.somaxconn``, 4096 by default since Linux 5.4).
DEFAULT_BACKLOG = 4096

#: Descriptors kept for everything but client connections: the listener, the
#: event loop, logs, the application's own files and outbound connections.
FD_RESERVE = 64

#: Worker processes allowed per CPU (``gstream serve --workers``): past that the
#: processes only compete for the same cores.
WORKERS_PER_CPU = 4

_SOMAXCONN = "/proc/sys/net/core/somaxconn"
_raised = False


def somaxconn() -> int | None:
    """The kernel's ceiling on a listen backlog (Linux), or None if unknown."""
    try:
        with open(_SOMAXCONN, encoding="ascii") as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None


def default_backlog() -> int:
    """``min(DEFAULT_BACKLOG, somaxconn)``: the largest queue the kernel will grant."""
    ceiling = somaxconn()
    return DEFAULT_BACKLOG if ceiling is None or ceiling <= 0 else min(DEFAULT_BACKLOG, ceiling)


def raise_nofile_limit(wanted: int) -> int | None:
    """Raise the soft ``RLIMIT_NOFILE`` toward the hard limit, up to ``wanted``.

    Only as far as asked (not to the hard limit itself, which can be ~1M):
    children inherit the soft limit, and some programs walk every possible
    descriptor at start. Never lowers it. Logs once per process when it
    raises. Returns the soft limit in force afterwards, or None where there
    is no such limit (Windows).
    """
    global _raised
    if resource is None:
        return None
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    except (OSError, ValueError):
        return None
    infinity = resource.RLIM_INFINITY
    if soft == infinity:
        return None
    target = wanted if hard == infinity else min(wanted, hard)
    if target <= soft:
        return int(soft)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (OSError, ValueError) as exc:  # e.g. macOS refuses more than OPEN_MAX
        log.warning("could not raise the open-files limit (RLIMIT_NOFILE) from %d to %d: %s",
                    soft, target, exc)
        return int(soft)
    if not _raised:
        _raised = True
        log.info("raised the open-files limit (RLIMIT_NOFILE) from %d to %d (hard limit %s)",
                 soft, target, "unlimited" if hard == infinity else hard)
    return int(target)


def max_workers() -> int:
    """The most worker processes allowed: ``WORKERS_PER_CPU`` x the CPU count."""
    return WORKERS_PER_CPU * (os.cpu_count() or 1)
