"""A tiny stand-in for ``gstream.hub.Hub``, used by the demo's tests only
while the real Hub is not on this branch yet (see :func:`install`)."""

from __future__ import annotations

import sys
import types
from typing import Any

from gstream.websocket import prepare


class Hub:
    """Just enough of the Hub API for the demo's chat room."""

    def __init__(self, config: Any = None, *, name: str = "", backplane: Any = None,
                 **overrides: Any) -> None:
        self.name = name
        self.members: set[Any] = set()
        self._stats = {"broadcasts": 0, "deliveries": 0, "drops": 0, "member_drops": 0}

    def start(self) -> None:
        pass

    def register(self, ws: Any, key: Any = None) -> bool:
        self.members.add(ws)
        ws.on_close(self.unregister)
        return True

    def unregister(self, ws: Any) -> None:
        self.members.discard(ws)

    def broadcast(self, message: str | bytes, *, exclude: Any = None, where: Any = None) -> bool:
        prepared = prepare(message)
        self._stats["broadcasts"] += 1
        for ws in list(self.members):
            if ws is exclude:
                continue
            if ws.try_send_prepared(prepared):
                self._stats["deliveries"] += 1
            else:
                self._stats["drops"] += 1
        return True

    def stop(self, timeout: float | None = None) -> None:
        for ws in list(self.members):
            ws.close(1001, "going away", wait=False)

    @property
    def count(self) -> int:
        return len(self.members)

    def stats(self) -> dict[str, Any]:
        return dict(self._stats, members=len(self.members))


def install() -> bool:
    """Make ``gstream.hub`` importable; True if the stand-in was needed."""
    try:
        import gstream.hub  # noqa: F401
        return False
    except ImportError:
        module = types.ModuleType("gstream.hub")
        module.Hub = Hub  # type: ignore[attr-defined]
        sys.modules["gstream.hub"] = module
        return True
